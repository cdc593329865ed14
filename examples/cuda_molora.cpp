// Training a MoLoRA layer on the GPU: the headline example's MoLoRA task (y = x W0 plus a
// low-rank correction that depends on the input's cluster), with bf16 storage, the CUDA layer
// and moet::CudaAdamW. The loss and its gradient are computed on the host here to keep the
// example short; in a model they come from the layers above.
//
//   build/examples/moet_example_cuda_molora            (needs a GPU; says so and exits 0 without)
//   ctest -R examples.cuda_molora_emulated              (the same program on the host emulation)
// Exits 1 if training does not cut the loss at least fivefold.
#include <moet/cuda/layers.hpp>
#include <moet/moet.hpp>

#include <cstdio>
#include <vector>

using namespace moet;

using MoLoRA = Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 8>;

int main() {
  if (const auto reason = cuda_unavailable_reason()) {
    std::printf("moet_example_cuda_molora: no CUDA device here (%s)\n", reason->c_str());
    return 0;
  }
  CudaContext ctx;
  cudaStream_t stream = ctx.stream();
  std::printf("device: %s\n", ctx.device_name().c_str());

  // Tokens from 4 clusters; cluster k (token i % 4) needs its own rank-3 correction of x W0.
  Rng rng(7);
  const Index d = 64, n = 512, clusters = 4;
  const int steps = 150;
  const Matrix<float> w0 = rng.normal_matrix<float>(d, d, 0.0, 1.0 / 8);
  std::vector<Matrix<float>> centers, corrections;
  for (Index k = 0; k < clusters; ++k) {
    centers.push_back(rng.normal_matrix<float>(1, d, 0.0, 2.0));
    corrections.push_back(rng.normal_matrix<float>(d, 3, 0.0, 0.2) * rng.normal_matrix<float>(3, d, 0.0, 0.2));
  }
  Matrix<float> x(n, d), target(n, d);
  for (Index i = 0; i < n; ++i) {
    x.row(i) = centers[std::size_t(i % clusters)] + rng.normal_matrix<float>(1, d, 0.0, 0.5);
    target.row(i) = x.row(i) * (w0 + corrections[std::size_t(i % clusters)]);
  }

  MoLoRA::layer<bf16, cuda> layer(ctx, w0, rng, {.expert = {.alpha = 8}, .router = {.load_balance_weight = 0.01}});
  CudaAdamW optimizer(ctx, {.lr = 5e-3});
  DeviceMatrix<bf16> dx(n, d, stream), dy(n, d, stream);
  cuda_impl::upload(dx.view(), x.data(), d, stream);  // the input, in bf16 on the device

  std::vector<double> losses;
  Matrix<float> grad(n, d);
  for (int step = 0; step < steps; ++step) {
    const auto c = layer.forward(dx);
    const std::vector<double> y = cuda_impl::download(c.output(), stream);
    double loss = 0;
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < d; ++j) {
        const double diff = y[std::size_t(i * d + j)] - double(target(i, j));
        loss += diff * diff;
        grad(i, j) = float(2 * diff / double(n * d));
      }
    losses.push_back(loss / double(n * d));
    cuda_impl::upload(dy.view(), grad.data(), d, stream);
    layer.backward(c, dx, dy, overwrite);  // float32 parameter gradients (plus the aux loss's)
    optimizer.step(layer);
  }
  for (int step = 0; step < steps; step += 15) std::printf("step %4d  loss %.4e\n", step + 1, losses[std::size_t(step)]);
  std::printf("step %4d  loss %.4e\n", steps, losses.back());
  const bool learned = losses.back() * 5 < losses.front();
  std::printf("%s: loss %.3e -> %.3e\n", learned ? "learned" : "DID NOT LEARN", losses.front(), losses.back());
  return learned ? 0 : 1;
}
