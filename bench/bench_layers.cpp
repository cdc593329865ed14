// moet_bench_layers: forward + backward of each layer per iteration, T = 1024 tokens, float,
// two threads, inputs re-used, parameter gradients accumulated. Each adapter case also runs the
// frozen linear layer of its shape (the floor: x W0 forward and dx backward only) in the same
// iterations and reports the ratio as the counter vs_floor; the table after the run lists them,
// so it reads as "what the adapters cost on top of the base model".
#include <benchmark/benchmark.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <chrono>

#include <moet/moet.hpp>

#include "ratio_reporter.hpp"

namespace {

using namespace moet;
constexpr Index tokens = 1024;

/// One training step of a layer: forward, then backward with accumulated parameter gradients.
template <class Layer>
void step(Layer& layer, const Matrix<float>& x, const Matrix<float>& dy) {
  const auto c = layer.forward(x);
  Matrix<float> dx = layer.backward(c, x, dy, accumulate);
  benchmark::DoNotOptimize(dx.data());
  benchmark::ClobberMemory();
}

void frozen_linear(benchmark::State& state, Index d_in, Index d_out) {
  Rng rng(1);
  layer<FrozenLinear, float> linear(rng.normal_matrix<float>(d_in, d_out, 0, 0.02));
  const Matrix<float> x = rng.normal_matrix<float>(tokens, d_in), dy = rng.normal_matrix<float>(tokens, d_out);
  for (auto _ : state) step(linear, x, dy);
  state.SetItemsProcessed(state.iterations() * tokens);
}

/// Runs `floor_step` and `step` back to back in every iteration; the benchmark's time is the
/// step's alone (manual time) and counters report the floor's time and the ratio.
template <class Floor, class Step>
void timed_against_floor(benchmark::State& state, Floor floor_step, Step step) {
  using clock = std::chrono::steady_clock;
  double floor_total = 0, step_total = 0;
  for (auto _ : state) {
    const auto t0 = clock::now();
    floor_step();
    const auto t1 = clock::now();
    step();
    const auto t2 = clock::now();
    const double floor_s = std::chrono::duration<double>(t1 - t0).count(), step_s = std::chrono::duration<double>(t2 - t1).count();
    state.SetIterationTime(step_s);
    floor_total += floor_s;
    step_total += step_s;
  }
  state.counters["floor_ms"] = 1e3 * floor_total / double(state.iterations());
  state.counters["vs_floor"] = step_total / floor_total;
  state.SetItemsProcessed(state.iterations() * tokens);
}

template <class Spec>
void lora_mixture(benchmark::State& state, Index d_in, Index d_out, Dispatch dispatch) {
  Rng rng(2);
  typename Spec::template layer<float> mix(rng.normal_matrix<float>(d_in, d_out, 0, 0.02), rng,
                                           {.expert = {.alpha = 2.0 * Spec::expert::spec::rank}, .dispatch = dispatch});
  rng.fill_normal(mix.lora_up.value(), 0.0, 0.02);  // a trained adapter: no zero shortcut
  layer<FrozenLinear, float> floor(mix.base.base_weight.value());
  const Matrix<float> x = rng.normal_matrix<float>(tokens, d_in), dy = rng.normal_matrix<float>(tokens, d_out);
  timed_against_floor(state, [&] { step(floor, x, dy); }, [&] { step(mix, x, dy); });
  state.counters["grouped"] = mix.uses_grouped();
}

template <class Spec>
void ia3_mixture(benchmark::State& state, Index width) {
  Rng rng(3);
  typename Spec::template layer<float> mix(width, rng, {.expert = {.init_stddev = 0.01}});
  const Matrix<float> h = rng.normal_matrix<float>(tokens, width), dy = rng.normal_matrix<float>(tokens, width);
  // The floor of an activation scaling is the frozen linear layer that produces it (d_model 1024).
  layer<FrozenLinear, float> floor(rng.normal_matrix<float>(1024, width, 0, 0.02));
  const Matrix<float> x = rng.normal_matrix<float>(tokens, 1024);
  timed_against_floor(state, [&] { step(floor, x, dy); }, [&] { step(mix, h, dy); });
}

template <class F>
benchmark::internal::Benchmark* add(const std::string& name, F f) {
  return benchmark::RegisterBenchmark(name.c_str(), f)->Unit(benchmark::kMillisecond)->MinTime(0.5);
}

}  // namespace

int main(int argc, char** argv) {
  // Idle OpenMP threads spin by default and steal the cores OpenBLAS is about to use; libgomp
  // reads this once at start-up, so set it and start again (compare_pytorch.py does the same
  // for PyTorch). An explicit setting of the caller's is kept.
  if (!std::getenv("OMP_WAIT_POLICY")) {
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);
  }
  moet::set_num_threads(2);
  // Medians of 5 repetitions, interleaved in random order so that a slow spell of a shared
  // machine does not land on one case only. Flags given on the command line come later and win.
  std::vector<char*> args{argv[0]};
  std::string defaults[] = {"--benchmark_repetitions=5", "--benchmark_enable_random_interleaving=true",
                            "--benchmark_report_aggregates_only=true"};
  for (auto& d : defaults) args.push_back(d.data());
  for (int i = 1; i < argc; ++i) args.push_back(argv[i]);
  int args_count = int(args.size());
  using SoftLoRA10 = Mixture<Router<Soft>, Expert<LoRA<4>>, 10>;
  using Top2LoRA10 = Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 10>;
  using SoftLoRA15 = Mixture<Router<Soft>, Expert<LoRA<4>>, 15>;
  using Top2LoRA64 = Mixture<Router<TopK<2>>, Expert<LoRA<8>>, 64>;

  add("frozen_linear/1024/1024", [](auto& s) { frozen_linear(s, 1024, 1024); })->UseRealTime();
  add("frozen_linear/1024/4096", [](auto& s) { frozen_linear(s, 1024, 4096); })->UseRealTime();
  add("molora_soft/1024/1024/10/4", [](auto& s) { lora_mixture<SoftLoRA10>(s, 1024, 1024, Dispatch::automatic); })->UseManualTime();
  add("molora_top2/1024/1024/10/4", [](auto& s) { lora_mixture<Top2LoRA10>(s, 1024, 1024, Dispatch::automatic); })->UseManualTime();
  add("molora_soft/1024/4096/15/4", [](auto& s) { lora_mixture<SoftLoRA15>(s, 1024, 4096, Dispatch::automatic); })->UseManualTime();
  add("mov_soft/2816/30", [](auto& s) { ia3_mixture<Mixture<Router<Soft>, Expert<IA3>, 30>>(s, 2816); })->UseManualTime();
  add("mov_soft/1024/10", [](auto& s) { ia3_mixture<Mixture<Router<Soft>, Expert<IA3>, 10>>(s, 1024); })->UseManualTime();
  // The two dispatch paths of a top-k mixture on both sides of the cost model's choice
  // (E = 10: dense is chosen; E = 64: grouped is chosen).
  add("dispatch/top2_grouped/1024/1024/10/4", [](auto& s) { lora_mixture<Top2LoRA10>(s, 1024, 1024, Dispatch::grouped); })->UseManualTime();
  add("dispatch/top2_dense/1024/1024/64/8", [](auto& s) { lora_mixture<Top2LoRA64>(s, 1024, 1024, Dispatch::dense); })->UseManualTime();
  add("dispatch/top2_grouped/1024/1024/64/8", [](auto& s) { lora_mixture<Top2LoRA64>(s, 1024, 1024, Dispatch::grouped); })->UseManualTime();

  benchmark::Initialize(&args_count, args.data());
  if (benchmark::ReportUnrecognizedArguments(args_count, args.data())) return 1;
  // Colours only on a terminal (the reporter is ours, so --benchmark_color does not reach it).
  moet::bench::RatioReporter reporter(isatty(STDOUT_FILENO) ? benchmark::ConsoleReporter::OO_Defaults
                                                            : benchmark::ConsoleReporter::OO_Tabular);
  reporter.add_target("molora_soft/1024/1024/10/4", 1.20);
  reporter.add_target("molora_top2/1024/1024/10/4", 1.30);
  reporter.add_target("molora_soft/1024/4096/15/4", 1.15);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.print_ratios();
  benchmark::Shutdown();
  return 0;
}
