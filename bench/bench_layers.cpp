// moet_bench_layers: forward + backward of each layer per iteration, T = 1024 tokens, float,
// two threads, inputs re-used, parameter gradients accumulated. Each adapter case also runs the
// frozen linear layer of its shape (the floor: x W0 forward and dx backward only) in the same
// iterations and reports the ratio as the counter vs_floor; the table after the run lists them,
// so it reads as "what the adapters cost on top of the base model".
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include <algorithm>
#include <chrono>

#include <moet/models.hpp>

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

template <class Spec>
void lora_mixture(benchmark::State& state, Index d_in, Index d_out, Dispatch dispatch) {
  Rng rng(2);
  typename Spec::template layer<float> mix(rng.normal_matrix<float>(d_in, d_out, 0, 0.02), rng,
                                           {.expert = {.alpha = 2.0 * Spec::expert::spec::rank}, .dispatch = dispatch});
  rng.fill_normal(mix.lora_up.value(), 0.0, 0.02);  // a trained adapter: no zero shortcut
  layer<FrozenLinear, float> floor(mix.base.base_weight.value());
  const Matrix<float> x = rng.normal_matrix<float>(tokens, d_in), dy = rng.normal_matrix<float>(tokens, d_out);
  bench::timed_against_floor(state, [&] { step(floor, x, dy); }, [&] { step(mix, x, dy); }, tokens);
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
  bench::timed_against_floor(state, [&] { step(floor, x, dy); }, [&] { step(mix, h, dy); }, tokens);
}

/// The machine's float GEMM rate in this run: the best of five (1024 x 1024) x (1024 x 1024) products.
double gemm_gflops() {
  Rng rng(5);
  const Matrix<float> a = rng.normal_matrix<float>(1024, 1024), b = rng.normal_matrix<float>(1024, 1024);
  Matrix<float> c(1024, 1024);
  double best = 1e30;
  for (int i = 0; i < 6; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (i > 0) best = std::min(best, s);
  }
  return 2.0 * 1024 * 1024 * 1024 / best / 1e9;
}

/// One CALM composition layer (projection + causal cross-attention + W_O), forward + backward.
/// vs_gemm: the step's time over the time its GEMM FLOPs take at this run's GEMM rate (FLOPs
/// counted as compare_pytorch.py counts them: dense attention, backward's recomputed scores not
/// counted).
void calm_xattn(benchmark::State& state, Index B, Index LB, Index LA, Index DB, Index DA, Index H) {
  Rng rng(4);
  cpu_impl::CompositionLayer<float> layer(DB, DA, H, rng, 0.02);
  for_each_param(layer, [&](Param<float>& p) { rng.fill_normal(p.value(), 0.0, 0.02); });  // W_O trained, not zero
  const auto geometry = CrossAttentionGeometry::make(B, LB, LA);
  const Matrix<float> h = rng.normal_matrix<float>(B * LB, DB), a = rng.normal_matrix<float>(B * LA, DA),
                      dy = rng.normal_matrix<float>(B * LB, DB);
  const double rate = gemm_gflops();
  double total = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto c = layer.forward(h, a, geometry);
    auto [dh, da] = layer.backward(c, h, a, dy, accumulate);
    benchmark::DoNotOptimize(dh.data());
    benchmark::DoNotOptimize(da.data());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.SetIterationTime(s);
    total += s;
  }
  const double NB = double(B * LB), NA = double(B * LA), hd = double(DB / H);
  const double linear = 2 * NA * DA * DB + 2 * NB * DB * DB + 4 * NA * DB * DB + 2 * NB * DB * DB;
  const double attention = 4.0 * B * H * LB * LA * hd;
  const double flops = 3 * linear + attention + 2 * attention;  // forward, then backward: 2x linear, 2x attention
  state.counters["gemm_GFLOPs"] = rate;
  state.counters["GFLOPs"] = flops / (total / double(state.iterations())) / 1e9;
  state.counters["vs_gemm"] = (total / double(state.iterations())) / (flops / (rate * 1e9));
  state.SetItemsProcessed(state.iterations() * B * LB);
}

template <class F>
benchmark::internal::Benchmark* add(const std::string& name, F f) {
  return benchmark::RegisterBenchmark(name.c_str(), f)->Unit(benchmark::kMillisecond)->MinTime(0.5);
}

}  // namespace

int main(int argc, char** argv) {
  moet::prefer_passive_openmp(argv);
  moet::set_num_threads(2);
  // Medians of 5 repetitions, interleaved in random order so that a slow spell of a shared
  // machine does not land on one case only.
  std::vector<std::string> defaults{"--benchmark_repetitions=5", "--benchmark_enable_random_interleaving=true",
                                    "--benchmark_report_aggregates_only=true"};
  auto args = moet::bench::with_defaults(argc, argv, defaults);
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
  add("calm_xattn/4/256/256/1024/512/16", [](auto& s) { calm_xattn(s, 4, 256, 256, 1024, 512, 16); })->UseManualTime();
  add("dispatch/top2_grouped/1024/1024/64/8", [](auto& s) { lora_mixture<Top2LoRA64>(s, 1024, 1024, Dispatch::grouped); })->UseManualTime();

  return moet::bench::run_with_ratios(args, {{"molora_soft/1024/1024/10/4", 1.20},
                                             {"molora_top2/1024/1024/10/4", 1.30},
                                             {"molora_soft/1024/4096/15/4", 1.15}});
}
