// moet_bench_cuda_model: whole training steps of pretrained-shaped models on the GPU, bf16
// storage (float32 accumulation, float32 gradients and AdamW state), the cases of issue 16:
//   gpt2_small   12 layers, d 768, 12 heads, vocab 50257, batch 8 x 1024 tokens
//   llama_1b     16 layers, d 2048, 32 heads / 8 kv heads, d_ff 8192, vocab 32000, batch 4 x 2048
// each as: frozen (no adapters: forward + backward to the embeddings, the floor), mov10 (MoV-10 on
// keys, values, ffn_hidden), molora10 (MoLoRA-10 r4 on q, k, v, o, ffn_up, ffn_down), lora16 (a
// LoRA r16 on the same slots) and molora64_top2 (top-2 MoLoRA-64 r8, same slots).
//
// A step is model.train_step(batch, CudaAdamW): forward, fused LM head + loss, backward, gradient
// clipping, AdamW; it reads the loss and the gradient norm back once each. Every adapter case runs
// the frozen model's step in the same iterations and reports vs_floor (its time over the frozen
// step's), tokens/s and peak device memory (the stream-ordered pool's high-water mark during its
// own steps). Decoding: greedy generation of 64 tokens after a 16-token prompt, tokens/s, one
// sequence and 32 decoded as one batch. Loading: load_pretrained of gpt2_small from a BF16
// checkpoint (written once to the temp folder, then read from the page cache) into a bf16 model
// with MoLoRA-10 on six slots, the files to a model ready to train. Attention is flash (kernels/attention.cu) for these
// shapes; frozen_materialized and batch32_materialized run the cuBLASLt path instead, so the two
// are compared in one run.
//
// MOET_CUDA_ATTENTION=materialized runs every case on the cuBLASLt attention (scripts/gpu-check.sh
// materialized: a second call's fallback should flash attention fault on a device).
// Without a CUDA device the program says why and exits 0. --moet_smoke shrinks every model to
// 2 layers of width 32 and runs each case twice; moet_bench_cuda_model_emulated --moet_smoke runs
// it so on the host emulation of the device. Neither is in the default build (bench/CMakeLists.txt).
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <moet/cuda/models.hpp>
#include <moet/models.hpp>

#include "ratio_reporter.hpp"

namespace {

using namespace moet;
using namespace moet::slot;
using T = bf16;

bool smoke = false;
/// The attention every case runs unless it names its own: the context's start, automatic unless
/// MOET_CUDA_ATTENTION says otherwise (materialized: the fallback should flash attention fault on
/// a device, so that the other numbers still come).
AttentionKernel base_kernel = AttentionKernel::automatic;

CudaContext& context() {
  static CudaContext ctx;
  return ctx;
}

struct Shape {
  io::ModelConfig config;
  Index batch = 1, seq = 1;
};

Shape gpt2_small() {
  Shape s;
  io::ModelConfig& c = s.config;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 50257, c.d_model = 768, c.layers = 12, c.heads = 12, c.kv_heads = 12, c.d_ff = 3072, c.max_positions = 1024;
  s.batch = 8, s.seq = 1024;
  if (smoke) c.vocab = 97, c.d_model = 32, c.layers = 2, c.heads = 2, c.kv_heads = 2, c.d_ff = 64, c.max_positions = 64, s.batch = 2,
             s.seq = 16;
  return s;
}

Shape llama_1b() {
  Shape s;
  io::ModelConfig& c = s.config;
  c.architecture = io::Architecture::llama;
  c.vocab = 32000, c.d_model = 2048, c.layers = 16, c.heads = 32, c.kv_heads = 8, c.d_ff = 8192, c.max_positions = 4096;
  c.rope_theta = 500000.0, c.tied_embeddings = false;
  s.batch = 4, s.seq = 2048;
  if (smoke) c.vocab = 101, c.d_model = 32, c.layers = 2, c.heads = 4, c.kv_heads = 2, c.d_ff = 64, c.max_positions = 64, s.batch = 2,
             s.seq = 16;
  return s;
}

TokenBatch random_batch(const Shape& s, std::uint64_t seed) {
  Rng rng(seed);
  TokenBatch b{s.batch, s.seq, {}, {}, {}, {}};
  b.ids.resize(std::size_t(s.batch * s.seq));
  for (int& id : b.ids) id = int(rng.next() % std::uint64_t(s.config.vocab));
  return b;
}

/// Elapsed milliseconds of f, host wall clock after the stream drained (a step reads its loss and
/// norm back, so it ends synchronised anyway).
template <class F>
double milliseconds(F&& f) {
  context().synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  f();
  context().synchronize();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

/// The pool's high-water mark since the last reset, in bytes.
std::uint64_t pool_high_water(bool reset) {
  cudaMemPool_t pool;
  MOET_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, context().device()));
  std::uint64_t v = 0;
  if (reset) MOET_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &v));
  else MOET_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &v));
  return v;
}

template <class Arch>
using Frozen = Decoder<Arch>;
template <class Arch>
using MoV10 = Decoder<Arch, Slots<at<keys, MoV<10>>, at<values, MoV<10>>, at<ffn_hidden, MoV<10>>>>;
template <class Arch, class S>
using SixSlots = Decoder<Arch, Slots<at<q, S>, at<k, S>, at<v, S>, at<o, S>, at<ffn_up, S>, at<ffn_down, S>>>;
template <class Arch>
using MoLoRA10 = SixSlots<Arch, MoLoRA<10, 4>>;
template <class Arch>
using LoRA16 = SixSlots<Arch, LoRAAdapter<16>>;
template <class Arch>
using MoLoRA64Top2 = SixSlots<Arch, Mixture<Router<TopK<2>>, Expert<LoRA<8>>, 64>>;

/// Stand-in pretrained weights, drawn on the device (uniform, the scale of a 0.02 normal):
/// the model is built with init_stddev 0 (zeros, nothing drawn on the host), then every frozen
/// matrix is filled; the norms' (1, d) weights and biases keep their 1 and 0.
template <class Model>
void fill_frozen(Model& model, std::uint64_t seed) {
  for_each_frozen(model, [&](auto& f) {
    const auto v = f.mutable_value();
    if (v.rows > 1) cuda_impl::fill_uniform(v.data, v.rows, v.cols, v.ld, seed++, 0.035f, context().stream());
  });
}

template <class M>
std::unique_ptr<M> make_model(const Shape& s, std::uint64_t seed) {
  Rng rng(seed);
  auto m = std::make_unique<M>(context(), s.config, rng, ModelOptions{.lora_init_stddev = 0.02, .ia3_init_stddev = 0.01}, 0.0);
  fill_frozen(*m, 1000 * seed);
  return m;
}

/// The frozen model of a shape, shared by the cases of that shape (its step is every case's floor).
template <class Arch>
struct Floor {
  std::unique_ptr<typename Frozen<Arch>::template model<T, cuda>> model;
  CudaAdamW opt;
  explicit Floor(const Shape& s) : model(make_model<typename Frozen<Arch>::template model<T, cuda>>(s, 1)), opt(context()) {}
};
template <class Arch>
Floor<Arch>& floor_of(const Shape& s) {
  static Floor<Arch> f(s);
  return f;
}

/// kernel: the attention the case's steps run (the floor's always run the automatic choice: flash
/// for these bf16 models of head_dim 64), so frozen_materialized's vs_floor is materialized over
/// flash attention in the same iterations.
template <class Arch, class Spec>
void train_step(benchmark::State& state, Shape (*shape)(), AttentionKernel kernel = base_kernel) {
  const Shape s = shape();
  Floor<Arch>& floor = floor_of<Arch>(s);
  std::unique_ptr<typename Spec::template model<T, cuda>> model;
  if constexpr (!std::is_same_v<Spec, Frozen<Arch>>) model = make_model<typename Spec::template model<T, cuda>>(s, 2);
  CudaAdamW opt(context(), {.lr = 1e-4});
  const TokenBatch batch = random_batch(s, 3);
  auto floor_step = [&] { floor.model->train_step(batch, floor.opt); };
  auto case_step = [&] {
    context().set_attention_kernel(kernel);
    if (model) model->train_step(batch, opt);
    else floor_step();
    context().set_attention_kernel(base_kernel);
  };
  for (int i = 0; i < (smoke ? 1 : 2); ++i) floor_step(), case_step();  // warm-up: plans, pool, clocks
  pool_high_water(true);
  double floor_total = 0, case_total = 0;
  for (auto _ : state) {
    const double f = milliseconds(floor_step);
    const double c = milliseconds(case_step);
    state.SetIterationTime(c * 1e-3);
    floor_total += f;
    case_total += c;
  }
  const double n = double(state.iterations());
  state.counters["floor_ms"] = floor_total / n;
  state.counters["vs_floor"] = case_total / floor_total;
  state.counters["tokens_per_s"] = double(s.batch * s.seq) / (case_total / n * 1e-3);
  state.counters["peak_GiB"] = double(pool_high_water(false)) / double(1 << 30);
  if (model) state.counters["trainable_M"] = double(count_parameters(*model).trainable) / 1e6;
}

template <class Arch>
void decode(benchmark::State& state, Shape (*shape)(), Index batch, AttentionKernel kernel = base_kernel) {
  const Shape s = shape();
  Floor<Arch>& floor = floor_of<Arch>(s);
  std::vector<std::vector<int>> prompts(std::size_t(batch), std::vector<int>(16));
  for (std::size_t b = 0; b < prompts.size(); ++b)
    for (std::size_t i = 0; i < 16; ++i) prompts[b][i] = int((7 * i + 3 * b + 1) % std::size_t(s.config.vocab));
  const int new_tokens = smoke ? 4 : 64;
  auto run = [&](int tokens) {
    const struct Kernel {
      explicit Kernel(AttentionKernel k) { context().set_attention_kernel(k); }
      ~Kernel() { context().set_attention_kernel(base_kernel); }
    } scoped(kernel);
    if (batch == 1) benchmark::DoNotOptimize(floor.model->generate(prompts[0], {.max_new_tokens = tokens}));
    else benchmark::DoNotOptimize(floor.model->generate_batch(prompts, {.max_new_tokens = tokens}));
  };
  run(2);  // warm-up
  double total = 0;
  for (auto _ : state) {
    const double ms = milliseconds([&] { run(new_tokens); });
    state.SetIterationTime(ms * 1e-3);
    total += ms;
  }
  state.counters["tokens_per_s"] = double(new_tokens) * double(batch) * double(state.iterations()) / (total * 1e-3);
}

void load(benchmark::State& state) {
  const Shape s = gpt2_small();
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    (smoke ? "moet_bench_cuda_model_gpt2_smoke" : "moet_bench_cuda_model_gpt2");
  if (!std::filesystem::exists(dir / "model.safetensors")) {
    Rng rng(1);
    Decoder<GPT2>::model<float> cpu(s.config, rng, {}, 0.0);  // zeros: no host draws in the GPU session's minutes
    save_pretrained(cpu, dir, {.dtype = io::DType::BF16});
  }
  double total = 0;
  for (auto _ : state) {
    std::optional<MoLoRA10<GPT2>::model<T, cuda>> model;
    const double ms = milliseconds([&] {
      Rng rng(3);
      model.emplace(load_pretrained<MoLoRA10<GPT2>, T, cuda>(context(), dir, rng));
    });
    state.SetIterationTime(ms * 1e-3);
    total += ms;
  }
  state.counters["load_s"] = total * 1e-3 / double(state.iterations());
}

/// iterations 0: as many as fill a second (two at smoke sizes).
template <class F>
void add(const std::string& name, F f, int iterations = 0) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), f)->Unit(benchmark::kMillisecond)->UseManualTime();
  if (smoke) b->Iterations(2);
  else if (iterations > 0) b->Iterations(iterations);
  else b->MinTime(1.0);  // 19 cases x 3 repetitions within gpu-check.sh's bench_model step
}

template <class Arch>
void add_shape(const std::string& name, Shape (*shape)()) {
  const std::string p = "train_step/" + name + "/";
  add(p + "frozen", [shape](auto& st) { train_step<Arch, Frozen<Arch>>(st, shape); });
  add(p + "frozen_materialized",
      [shape](auto& st) { train_step<Arch, Frozen<Arch>>(st, shape, AttentionKernel::materialized); });
  add(p + "mov10", [shape](auto& st) { train_step<Arch, MoV10<Arch>>(st, shape); });
  add(p + "molora10", [shape](auto& st) { train_step<Arch, MoLoRA10<Arch>>(st, shape); });
  add(p + "lora16", [shape](auto& st) { train_step<Arch, LoRA16<Arch>>(st, shape); });
  add(p + "molora64_top2", [shape](auto& st) { train_step<Arch, MoLoRA64Top2<Arch>>(st, shape); });
  add("decode/" + name + "/batch1", [shape](auto& st) { decode<Arch>(st, shape, 1); });
  add("decode/" + name + "/batch32", [shape](auto& st) { decode<Arch>(st, shape, 32); });
  add("decode/" + name + "/batch32_materialized",
      [shape](auto& st) { decode<Arch>(st, shape, 32, AttentionKernel::materialized); });
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> defaults{"--benchmark_repetitions=3", "--benchmark_report_aggregates_only=true"};
  std::vector<char*> kept{argv[0]};
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--moet_smoke") smoke = true;
    else kept.push_back(argv[i]);
  if (smoke) {
    defaults = {"--benchmark_repetitions=1"};
    std::printf("moet_bench_cuda_model --moet_smoke: 2-layer models of width 32; the timings mean nothing\n");
  }
  if (const auto reason = cuda_unavailable_reason()) {
    std::printf("moet_bench_cuda_model: no CUDA device here (%s); nothing to measure\n", reason->c_str());
    return 0;
  }
  try {
    base_kernel = context().attention_kernel();  // MOET_CUDA_ATTENTION, else automatic
  } catch (const moet::error& e) {
    std::fprintf(stderr, "moet_bench_cuda_model: %s\n", e.what());
    return 2;
  }
  std::printf("device: %s, %d SMs\n", context().device_name().c_str(), context().sm_count());
  if (base_kernel != AttentionKernel::automatic)
    std::printf("MOET_CUDA_ATTENTION=%s: every case (and the floor) runs it unless the case names its own\n",
                base_kernel == AttentionKernel::flash ? "flash" : "materialized");
  add_shape<GPT2>("gpt2_small", gpt2_small);
  add_shape<Llama>("llama_1b", llama_1b);
  add("load_pretrained/gpt2_small_bf16_file", load, 1);  // seconds each: one per repetition
  auto args = moet::bench::with_defaults(int(kept.size()), kept.data(), defaults);
  std::map<std::string, double> targets;  // issue 16's bounds on an H100/H200 (none at smoke sizes)
  if (!smoke)
    for (const char* shape : {"gpt2_small", "llama_1b"}) {
      targets[std::string("train_step/") + shape + "/mov10"] = 1.10;
      targets[std::string("train_step/") + shape + "/molora10"] = 1.25;
    }
  return moet::bench::run_with_ratios(args, targets);
}
