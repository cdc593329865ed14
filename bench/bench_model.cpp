// moet_bench_model: one training step of a GPT-2-shaped model per iteration (6 layers, d_model
// 512, 8 heads, d_ff 2048, vocab 8192, batch 4 x 256 tokens, float, two threads): forward, loss,
// backward, gradient clipping and AdamW on the trainable parameters.
//   train_step/gpt2_small/frozen     no adapters: backward runs to the embeddings (the floor)
//   train_step/gpt2_small/mov10      MoV, E = 10, on keys, values and ffn_hidden
//   train_step/gpt2_small/molora10   MoLoRA, E = 10, R = 4, on q, k, v, o, ffn_up, ffn_down
// Adapter cases run the floor's step and their own back to back in every iteration and report
// the ratio (vs_floor). act_MiB is the heap that forward leaves alive for backward; the
// *_recompute cases keep only each block's input and recompute the block in backward.
//   sample_token/vocab50257/top_p*   one sampled token from 50257 logits against a sort of the
//                                    whole vocabulary (the floor): generation's host-side cost
//   load_pretrained/gpt2_124m        GPT-2 small's shapes (124M frozen values, an F32 checkpoint
//                                    written once to the temp folder, read from the page cache)
//                                    with MoLoRA on q and v, against the way it went before in
//                                    the same iterations (the floor): a random model, every frozen
//                                    weight drawn, then load_base. peak_MiB: how far the resident
//                                    set rose above where it started (VmHWM, reset before each).
#include <benchmark/benchmark.h>

#include <malloc.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <moet/models.hpp>

#include "../tests/reference_sampling.hpp"
#include "ratio_reporter.hpp"

namespace {

using namespace moet;
using namespace moet::slot;

constexpr Index batch_size = 4, seq = 256;

io::ModelConfig gpt2_small() {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 8192, c.d_model = 512, c.layers = 6, c.heads = 8, c.kv_heads = 8, c.d_ff = 2048, c.max_positions = seq;
  return c;
}

TokenBatch random_batch(Rng& rng, Index vocab) {
  TokenBatch b{batch_size, seq, {}, {}, {}};
  for (Index i = 0; i < batch_size * seq; ++i) b.ids.push_back(int(rng.uniform() * double(vocab)));
  return b;
}

double heap_bytes() {
  const struct mallinfo2 m = mallinfo2();
  return double(m.uordblks + m.hblkhd);
}

template <class Spec>
struct Trainer {
  Rng rng{7};
  typename Spec::template model<float> model;
  AdamW<float> optimizer{{.lr = 1e-3}};
  TokenBatch batch;
  double activation_bytes = 0;

  explicit Trainer(bool recompute) : model(gpt2_small(), rng, {.recompute = recompute}), batch(random_batch(rng, 8192)) {
    // Trained adapters: no zero-initialised factor, no identity scaling.
    for_each_param(model, [&](Param<float>& p) { rng.fill_normal(p.value(), p.name() == "ia3_scales" ? 1.0 : 0.0, 0.02); });
  }
  void step() {
    const double before = heap_bytes();
    const auto c = model.forward(batch);
    activation_bytes = heap_bytes() - before;
    model.backward(c, overwrite);
    clip_grad_norm(model, 1.0);
    optimizer.step(model);
    benchmark::ClobberMemory();
  }
};

using Frozen6 = Decoder<GPT2>;
using Mov10 = Decoder<GPT2, Slots<at<keys, MoV<10>>, at<values, MoV<10>>, at<ffn_hidden, MoV<10>>>>;
using Molora10 = Decoder<GPT2, Slots<at<q, MoLoRA<10, 4>>, at<k, MoLoRA<10, 4>>, at<v, MoLoRA<10, 4>>, at<o, MoLoRA<10, 4>>,
                                     at<ffn_up, MoLoRA<10, 4>>, at<ffn_down, MoLoRA<10, 4>>>>;

void frozen(benchmark::State& state) {
  Trainer<Frozen6> floor(false);
  for (auto _ : state) floor.step();
  state.SetItemsProcessed(state.iterations() * batch_size * seq);
  state.counters["act_MiB"] = floor.activation_bytes / (1 << 20);
}

template <class Spec>
void adapted(benchmark::State& state, bool recompute) {
  Trainer<Frozen6> floor(false);
  Trainer<Spec> trainer(recompute);
  bench::timed_against_floor(state, [&] { floor.step(); }, [&] { trainer.step(); }, double(batch_size * seq));
  state.counters["act_MiB"] = trainer.activation_bytes / (1 << 20);
  state.counters["trainable_%"] = count_parameters(trainer.model).trainable_percent();
}

/// One token drawn from GPT-2's 50257 logits (normal, stddev 3, temperature 0.8): sample_token
/// against a sort of the whole vocabulary (the floor; sample_token sorted so before), back to back in every iteration.
void sampling(benchmark::State& state, double top_p) {
  Rng rng(9);
  std::vector<double> logits(50257);
  for (double& l : logits) l = rng.normal(0.0, 3.0);
  const SamplingOptions s{.temperature = 0.8, .top_p = top_p};
  Rng a(1), b(1);
  bench::timed_against_floor(
      state, [&] { benchmark::DoNotOptimize(moet::testing::whole_sort_sample(logits, s, a)); },
      [&] { benchmark::DoNotOptimize(sample_token(logits, s, b)); }, 1.0);
}

/// A field of /proc/self/status in KiB (VmRSS, VmHWM), or -1.
double status_kib(const std::string& field) {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1));
  return -1;
}
/// How far f made the resident set rise above where it started, in MiB (-1 where the peak
/// cannot be reset).
template <class F>
double peak_growth_mib(F&& f) {
  malloc_trim(0);
  std::ofstream reset("/proc/self/clear_refs");
  reset << "5" << std::flush;  // resets VmHWM to VmRSS
  const bool ok = bool(reset);
  const double before = status_kib("VmRSS");
  f();
  return ok && before >= 0 ? (status_kib("VmHWM") - before) / 1024 : -1;
}

using Gpt2Lora = Decoder<GPT2, Slots<at<q, MoLoRA<4, 8>>, at<v, MoLoRA<4, 8>>>>;

/// GPT-2 small's checkpoint (zeros: the values do not change the work), written on first use.
struct Gpt2Checkpoint {
  std::filesystem::path dir = std::filesystem::temp_directory_path() / ("moet_bench_load_" + std::to_string(getpid()));
  Gpt2Checkpoint() {
    io::ModelConfig c;
    c.architecture = io::Architecture::gpt2;
    c.vocab = 50257, c.d_model = 768, c.layers = 12, c.heads = 12, c.kv_heads = 12, c.d_ff = 3072, c.max_positions = 1024;
    Rng rng(1);
    Decoder<GPT2>::model<float> m(c, rng, {}, 0.0);
    save_pretrained(m, dir);
  }
  ~Gpt2Checkpoint() { std::filesystem::remove_all(dir); }
  static const Gpt2Checkpoint& get() {
    static const Gpt2Checkpoint checkpoint;
    return checkpoint;
  }
};

void loading(benchmark::State& state) {
  const auto& checkpoint = Gpt2Checkpoint::get();
  double old_peak = 0, new_peak = 0, frozen_values = 0;
  bench::timed_against_floor(
      state,
      [&] {
        old_peak = peak_growth_mib([&] {
          Rng rng(3);
          Gpt2Lora::model<float> m(io::load_model_config(checkpoint.dir / "config.json"), rng);
          load_base(m, io::Checkpoint(checkpoint.dir));
          benchmark::DoNotOptimize(m);
        });
      },
      [&] {
        new_peak = peak_growth_mib([&] {
          Rng rng(3);
          auto m = load_pretrained<Gpt2Lora, float>(checkpoint.dir, rng);
          frozen_values = double(count_parameters(m).total - count_parameters(m).trainable);
          benchmark::DoNotOptimize(m);
        });
      },
      1.0);
  state.counters["peak_MiB"] = new_peak;
  state.counters["floor_peak_MiB"] = old_peak;
  state.counters["frozen_MiB"] = frozen_values * sizeof(float) / (1 << 20);
}

template <class F>
benchmark::internal::Benchmark* add(const std::string& name, F f) {
  return benchmark::RegisterBenchmark(name.c_str(), f)->Unit(benchmark::kMillisecond)->Iterations(2);
}

}  // namespace

int main(int argc, char** argv) {
  moet::prefer_passive_openmp(argv);
  moet::set_num_threads(2);
  // A step takes seconds: 3 repetitions of 2 steps each, interleaved, medians reported.
  std::vector<std::string> defaults{"--benchmark_repetitions=3", "--benchmark_enable_random_interleaving=true",
                                    "--benchmark_report_aggregates_only=true"};
  auto args = moet::bench::with_defaults(argc, argv, defaults);
  add("train_step/gpt2_small/frozen", frozen)->UseRealTime();
  add("train_step/gpt2_small/mov10", [](auto& s) { adapted<Mov10>(s, false); })->UseManualTime();
  add("train_step/gpt2_small/molora10", [](auto& s) { adapted<Molora10>(s, false); })->UseManualTime();
  add("train_step/gpt2_small/molora10_recompute", [](auto& s) { adapted<Molora10>(s, true); })->UseManualTime();
  for (const double top_p : {0.9, 1.0})
    benchmark::RegisterBenchmark(("sample_token/vocab50257/top_p" + std::to_string(top_p).substr(0, 3)).c_str(),
                                 [top_p](auto& st) { sampling(st, top_p); })
        ->Unit(benchmark::kMicrosecond)
        ->UseManualTime();
  add("load_pretrained/gpt2_124m", loading)->UseManualTime();
  return moet::bench::run_with_ratios(args, {{"train_step/gpt2_small/mov10", 1.15}, {"train_step/gpt2_small/molora10", 1.35}});
}
