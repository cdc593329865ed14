// moet_bench_layers: forward + backward of each layer per iteration, T = 1024 tokens, float,
// two threads, inputs re-used, parameter gradients accumulated. After the run every case is
// printed as a ratio to the frozen linear layer of the same shape (the floor: x W0 forward and
// dx backward only), so the table reads as "what the adapters cost on top of the base model".
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include <moet/moet.hpp>

#include "ratio_reporter.hpp"

namespace {

using namespace moet;
constexpr Index tokens = 1024;

void frozen_linear(benchmark::State& state, Index d_in, Index d_out) {
  Rng rng(1);
  layer<FrozenLinear, float> linear(rng.normal_matrix<float>(d_in, d_out, 0, 0.02));
  const Matrix<float> x = rng.normal_matrix<float>(tokens, d_in), dy = rng.normal_matrix<float>(tokens, d_out);
  for (auto _ : state) {
    const auto c = linear.forward(x);
    Matrix<float> dx = linear.backward(c, x, dy, accumulate);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * tokens);
}

template <class Spec>
void lora_mixture(benchmark::State& state, Index d_in, Index d_out, Dispatch dispatch) {
  Rng rng(2);
  typename Spec::template layer<float> mix(rng.normal_matrix<float>(d_in, d_out, 0, 0.02), rng,
                                           {.expert = {.alpha = 2.0 * Spec::expert::spec::rank}, .dispatch = dispatch});
  rng.fill_normal(mix.lora_up.value(), 0.0, 0.02);  // a trained adapter: no zero shortcut
  const Matrix<float> x = rng.normal_matrix<float>(tokens, d_in), dy = rng.normal_matrix<float>(tokens, d_out);
  for (auto _ : state) {
    const auto c = mix.forward(x);
    Matrix<float> dx = mix.backward(c, x, dy, accumulate);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  state.counters["grouped"] = mix.uses_grouped();
  state.SetItemsProcessed(state.iterations() * tokens);
}

template <class Spec>
void ia3_mixture(benchmark::State& state, Index width) {
  Rng rng(3);
  typename Spec::template layer<float> mix(width, rng, {.expert = {.init_stddev = 0.01}});
  const Matrix<float> h = rng.normal_matrix<float>(tokens, width), dy = rng.normal_matrix<float>(tokens, width);
  for (auto _ : state) {
    const auto c = mix.forward(h);
    Matrix<float> dh = mix.backward(c, h, dy, accumulate);
    benchmark::DoNotOptimize(dh.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * tokens);
}

template <class F>
void add(const std::string& name, F f) {
  benchmark::RegisterBenchmark(name.c_str(), f)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);
}

}  // namespace

int main(int argc, char** argv) {
  moet::set_num_threads(2);
  using SoftLoRA10 = Mixture<Router<Soft>, Expert<LoRA<4>>, 10>;
  using Top2LoRA10 = Mixture<Router<TopK<2>>, Expert<LoRA<4>>, 10>;
  using SoftLoRA15 = Mixture<Router<Soft>, Expert<LoRA<4>>, 15>;
  using Top2LoRA64 = Mixture<Router<TopK<2>>, Expert<LoRA<8>>, 64>;

  add("frozen_linear/1024/1024", [](auto& s) { frozen_linear(s, 1024, 1024); });
  add("frozen_linear/1024/4096", [](auto& s) { frozen_linear(s, 1024, 4096); });
  add("molora_soft/1024/1024/10/4", [](auto& s) { lora_mixture<SoftLoRA10>(s, 1024, 1024, Dispatch::automatic); });
  add("molora_top2/1024/1024/10/4", [](auto& s) { lora_mixture<Top2LoRA10>(s, 1024, 1024, Dispatch::automatic); });
  add("molora_soft/1024/4096/15/4", [](auto& s) { lora_mixture<SoftLoRA15>(s, 1024, 4096, Dispatch::automatic); });
  add("mov_soft/2816/30", [](auto& s) { ia3_mixture<Mixture<Router<Soft>, Expert<IA3>, 30>>(s, 2816); });
  add("mov_soft/1024/10", [](auto& s) { ia3_mixture<Mixture<Router<Soft>, Expert<IA3>, 10>>(s, 1024); });
  // The two dispatch paths of a top-k mixture on both sides of the cost model's choice.
  add("dispatch/top2_grouped/1024/1024/10/4", [](auto& s) { lora_mixture<Top2LoRA10>(s, 1024, 1024, Dispatch::grouped); });
  add("dispatch/top2_dense/1024/1024/64/8", [](auto& s) { lora_mixture<Top2LoRA64>(s, 1024, 1024, Dispatch::dense); });
  add("dispatch/top2_grouped/1024/1024/64/8", [](auto& s) { lora_mixture<Top2LoRA64>(s, 1024, 1024, Dispatch::grouped); });

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  moet::bench::RatioReporter reporter;
  reporter.add_ratio("molora_soft/1024/1024/10/4", "frozen_linear/1024/1024", 1.20);
  reporter.add_ratio("molora_top2/1024/1024/10/4", "frozen_linear/1024/1024", 1.30);
  reporter.add_ratio("molora_soft/1024/4096/15/4", "frozen_linear/1024/4096", 1.15);
  reporter.add_ratio("mov_soft/1024/10", "frozen_linear/1024/1024");
  reporter.add_ratio("mov_soft/2816/30", "frozen_linear/1024/1024");
  reporter.add_ratio("dispatch/top2_grouped/1024/1024/10/4", "molora_top2/1024/1024/10/4");
  reporter.add_ratio("dispatch/top2_grouped/1024/1024/64/8", "dispatch/top2_dense/1024/1024/64/8");
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.print_ratios();
  benchmark::Shutdown();
  return 0;
}
