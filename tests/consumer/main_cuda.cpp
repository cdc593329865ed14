// The CUDA backend through an installed moet: a 2-layer Llama with a MoLoRA slot trains one step
// and generates on the GPU. Without a device it says why and exits 77 (run.cmake counts that as
// skipped, as ctest does for the CUDA tests).
#include <moet/cuda/models.hpp>

#include <cstdio>

int main() {
  if (const auto reason = moet::cuda_unavailable_reason()) {
    std::printf("consumer_cuda: skipped, no CUDA device (%s)\n", reason->c_str());
    return 77;
  }
  using namespace moet;
  io::ModelConfig c;
  c.architecture = io::Architecture::llama;
  c.vocab = 32, c.d_model = 16, c.layers = 2, c.heads = 2, c.kv_heads = 1, c.d_ff = 24, c.max_positions = 64;
  CudaContext ctx;
  Rng rng(1);
  Decoder<Llama, Slots<at<slot::q, MoLoRA<2, 2>>>>::model<bf16, cuda> model(ctx, c, rng);
  CudaAdamW opt(ctx);
  const TrainStepResult r = model.train_step({1, 4, {1, 2, 3, 4}, {}, {}, {}}, opt);
  const std::vector<int> out = model.generate({1, 2}, {.max_new_tokens = 3});
  std::printf("consumer_cuda: %s loss %.4f, generated %zu tokens\n", ctx.device_name().c_str(), r.loss, out.size());
  return out.size() == 3 ? 0 : 1;
}
