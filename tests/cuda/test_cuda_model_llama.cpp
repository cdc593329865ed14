// Whole Llama models on the CUDA backend against the CPU model (cuda_model_harness.hpp): grouped
// top-k and MoV slots, the frozen model, checkpoints and adapter files between CPU and GPU, bf16
// and fp16 storage.
#include "cuda_model_harness.hpp"

using namespace moet;
using namespace moet::slot;
using namespace moet::testing::cuda_model;

TEST_CASE("CUDA Llama with grouped top-k MoLoRA and MoV slots matches the CPU model", "[cuda][model]") {
  using M = Decoder<Llama, Slots<at<q, Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 4>>, at<o, MoLoRA<2, 2>>, at<values, MoV<2>>,
                                 at<ffn_gate, LoRAAdapter<3>>, at<ffn_down, MoLoRA<2, 2>>, at<ffn_hidden, MoV<2>>>>;
  ModelOptions o = with_aux();
  o.dispatch = Dispatch::grouped;
  compare_model<M>(llama_config(), o);
}

TEST_CASE("CUDA frozen Llama (no adapters) matches the CPU model", "[cuda][model]") {
  using M = Decoder<Llama>;
  CudaContext& ctx = context();
  Rng a(3), b(3);
  M::model<double> cpu(llama_config(), a, {}, 0.3);
  M::model<float, cuda> gpu(ctx, llama_config(), b, {}, 0.3);
  share_weights(cpu, gpu, 1);
  const TokenBatch batch = padded_batch(29);
  CHECK(relative(host(gpu.logits(batch)), host(cpu.logits(batch))) <= tolerance);
  CHECK(std::abs(gpu.loss(batch) - cpu.loss(batch)) <= tolerance * cpu.loss(batch));
}

TEST_CASE("CUDA models load F32, F16 and BF16 checkpoints; adapter files move between CPU and GPU", "[cuda][model][io]") {
  using M = Decoder<Llama, Slots<at<q, MoLoRA<2, 2>>, at<ffn_hidden, MoV<2>>>>;
  CudaContext& ctx = context();
  Rng a(21);
  M::model<double> original(llama_config(), a, {}, 0.3);
  const TokenBatch batch = padded_batch(29);
  for (io::DType dtype : {io::DType::F32, io::DType::F16, io::DType::BF16}) {
    const auto dir = testing::scratch_folder("base_" + std::to_string(int(dtype)));
    save_pretrained(original, dir, {.dtype = dtype});
    Rng r1(4), r2(4);
    auto cpu = load_pretrained<M, double>(dir, r1);
    auto gpu = load_pretrained<M, float, cuda>(ctx, dir, r2);
    INFO("checkpoint dtype " << int(dtype));
    std::vector<std::vector<double>> frozen;
    for_each_frozen(gpu, [&](auto& f) { frozen.push_back(host(f.value())); });
    std::size_t i = 0;
    for_each_frozen(cpu, [&](auto& f) {  // the file's values, rounded to float
      CHECK(relative(frozen[i++], host(Matrix<double>(f.value()))) <= 1e-7);
    });
    share_weights(cpu, gpu, 9);
    CHECK(relative(host(gpu.logits(batch)), host(cpu.logits(batch))) <= tolerance);
  }

  // adapters trained on the GPU load on the CPU, and the other way round (the same files)
  Rng r1(5), r2(5);
  M::model<double> cpu(llama_config(), r1, {}, 0.3);
  M::model<float, cuda> gpu(ctx, llama_config(), r2, {}, 0.3);
  share_weights(cpu, gpu, 13);
  const auto from_gpu = testing::scratch_folder("adapters_gpu");
  save_adapters(gpu, from_gpu);
  Rng r4(6);
  M::model<double> cpu_same_base(llama_config(), r4, {}, 0.3);
  load_adapters(cpu_same_base, from_gpu);
  std::vector<std::vector<double>> gpu_values;
  for_each_param(gpu, [&](auto& p) { gpu_values.push_back(host(DeviceView<const float>(p.value()))); });
  std::size_t i = 0;
  for_each_param(cpu_same_base, [&](auto& p) { CHECK(relative(host(Matrix<double>(p.value())), gpu_values[i++]) == 0.0); });

  const auto from_cpu = testing::scratch_folder("adapters_cpu");
  Rng r5(7);
  M::model<double> trained(llama_config(), r5, {}, 0.3);
  Rng noise(8);
  for_each_param(trained, [&](auto& p) { noise.fill_normal(p.value(), 0.0, 0.3); });
  save_adapters(trained, from_cpu);
  load_adapters(gpu, from_cpu);
  std::vector<std::vector<double>> loaded;
  for_each_param(gpu, [&](auto& p) { loaded.push_back(host(DeviceView<const float>(p.value()))); });
  i = 0;
  for_each_param(trained, [&](auto& p) { CHECK(relative(loaded[i++], host(Matrix<double>(p.value()))) <= 1e-7); });

  // a file for another layout is refused by name, on the GPU as on the CPU
  using Other = Decoder<Llama, Slots<at<k, MoLoRA<2, 2>>>>;
  Rng r6(1);
  Other::model<float, cuda> other(ctx, llama_config(), r6, {}, 0.3);
  CHECK_THROWS_AS(load_adapters(other, from_cpu), format_error);
}

// bf16 and fp16 storage: the same model, the CPU's weights rounded to the storage type. Every
// stored activation and gradient rounds to 8 (bf16) or 11 (fp16) significant bits, some 20 times
// along a 2-layer model and its backward, and the routers' gradients pass softmax Jacobians that
// cancel. Measured (emulation, the same on a GPU up to cuBLASLt's order of sums; with the residual
// adds fused, which round once where they rounded twice): at most about 34 units of roundoff u
// (u = 2^-9 bf16, 2^-12 fp16) on any tensor, the worst a router's gradient in bf16 (6.5e-2,
// 33 u) and a LoRA down-projection's in fp16 (7.2e-3, 30 u): rounding and nothing else; the
// tolerance is 64 u per tensor (0.125 bf16, 0.0156 fp16), far below the O(1) error of a wrong op.
template <class T>
void compare_half(double tol, const io::ModelConfig& config = llama_config()) {
  using M = Decoder<Llama, Slots<at<q, MoLoRA<2, 2>>, at<ffn_hidden, MoV<2>>>>;
  CudaContext& ctx = context();
  Rng a(41), b(41);
  M::model<double> cpu(config, a, {}, 0.3);
  typename M::template model<T, cuda> gpu(ctx, config, b, {}, 0.3);
  share_weights(cpu, gpu, 3);
  require_same_pass(cpu, gpu, padded_batch(29), tol);
  // Decoding through the cache (2 positions, then 1 at a time) gives the full forward's logits.
  const std::vector<int> prompt{3, 1, 4, 1, 5};
  const std::vector<double> full = host(cpu.logits(TokenBatch{1, Index(prompt.size()), prompt, {}, {}, {}}));
  CHECK(relative(cached_logits(gpu, prompt), full) <= tol);
}

TEST_CASE("CUDA Llama in bf16 and fp16 matches the CPU model to the storage precision", "[cuda][model][half]") {
  compare_half<bf16>(64 * 0x1p-9);
  compare_half<fp16>(64 * 0x1p-12);
}

// head_dim 16 (the other tests' models have head_dim 4 or 8, which only the materialized
// attention takes): the whole model through the flash kernels, forced (AttentionKernel::flash
// refuses what it cannot run), then through the materialized path; both within the same bound.
TEST_CASE("CUDA Llama with flash attention matches the CPU model", "[cuda][model][half][flash]") {
  io::ModelConfig c = llama_config();
  c.d_model = 32, c.heads = 2, c.kv_heads = 1;
  for (AttentionKernel kernel : {AttentionKernel::flash, AttentionKernel::materialized}) {
    INFO("attention kernel " << int(kernel));
    context().set_attention_kernel(kernel);
    compare_half<bf16>(64 * 0x1p-9, c);
    compare_half<fp16>(64 * 0x1p-12, c);
  }
  context().set_attention_kernel(AttentionKernel::automatic);
}
