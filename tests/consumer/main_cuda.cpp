// The CUDA backend through an installed moet: a MoLoRA layer in bf16 trains one step with
// CudaAdamW on the GPU (the whole models are <moet/cuda/models.hpp>, with the same target).
// Without a device it says why and exits 77 (run.cmake counts that as skipped, as ctest does for
// the CUDA tests).
#include <moet/cuda/layers.hpp>

#include <cstdio>

int main() {
  if (const auto reason = moet::cuda_unavailable_reason()) {
    std::printf("consumer_cuda: skipped, no CUDA device (%s)\n", reason->c_str());
    return 77;
  }
  using namespace moet;
  using MoLoRA = Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 4>;
  CudaContext ctx;
  Rng rng(1);
  MoLoRA::layer<bf16, cuda> mix(ctx, rng.normal_matrix<float>(16, 16, 0.0, 0.1), rng);
  DeviceMatrix<bf16> x(8, 16, ctx.stream()), dy(8, 16, ctx.stream());
  const Matrix<float> host = rng.normal_matrix<float>(8, 16);
  cuda_impl::upload(x.view(), host.data(), 16, ctx.stream());
  cuda_impl::upload(dy.view(), host.data(), 16, ctx.stream());
  CudaAdamW opt(ctx);
  auto c = mix.forward(x);
  const DeviceMatrix<bf16> dx = mix.backward(c, x, dy, accumulate);
  opt.step(mix);
  ctx.synchronize();
  std::printf("consumer_cuda: %s, dx %ldx%ld\n", ctx.device_name().c_str(), long(dx.rows()), long(dx.cols()));
  return dx.rows() == 8 ? 0 : 1;
}
