// moet_bench_cuda: the CUDA layers, bf16 storage, T = 8192 tokens, one training step (forward +
// backward, parameter gradients accumulated) per iteration, timed with CUDA events on the
// context's stream after a warm-up; Google Benchmark reports the median of the repetitions.
//
// Every adapter case also runs its floor, the frozen linear layer of the same shape (x W0 forward,
// dy W0^T backward), in the same iterations and reports the ratio as vs_floor, as moet_bench_layers
// does on the CPU. The device's peaks are measured in the same run: a large cuBLASLt bf16 GEMM
// (TFLOP/s) and a device-to-device copy (GB/s, bytes read + written); each case prints its rate
// against them (pct_gemm_peak, pct_copy_peak).
//
// Without a CUDA device the program says why and exits 0 (a benchmark, not a test).
// --moet_smoke scales every size down (64 tokens, d_model 256) and runs each case twice: the
// test bench.cuda_smoke_emulated runs it so on the host emulation of the device, everywhere.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include <moet/cuda/layers.hpp>
#include <moet/models.hpp>

#include "ratio_reporter.hpp"

namespace {

using namespace moet;
using T = bf16;

/// The benchmark's sizes; --moet_smoke scales them down to check that the program runs from
/// start to end (CI does that on the host emulation of the device, where timings mean nothing).
struct Sizes {
  Index tokens = 8192, d_model = 4096, mov_width = 11008, peak_gemm = 8192;
  std::size_t peak_copy_bytes = std::size_t(1) << 30;
};
Sizes sizes;
int smoke_iterations = 0;  ///< > 0: that many iterations per case (--moet_smoke)

CudaContext& context() {
  static CudaContext ctx;
  return ctx;
}

/// A device matrix of normal(0, stddev) values.
DeviceMatrix<T> random_device(Index rows, Index cols, std::uint64_t seed, double stddev = 1.0) {
  Rng rng(seed);
  const Matrix<float> host = rng.normal_matrix<float>(rows, cols, 0.0, stddev);
  DeviceMatrix<T> d(rows, cols, context().stream());
  cuda_impl::upload(d.view(), host.data(), host.cols(), context().stream());
  return d;
}

/// Elapsed milliseconds of `f` on the context's stream, by CUDA events.
class EventTimer {
 public:
  EventTimer() {
    MOET_CUDA_CHECK(cudaEventCreate(&start_));
    MOET_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~EventTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  template <class F>
  double milliseconds(F&& f) {
    cudaStream_t s = context().stream();
    MOET_CUDA_CHECK(cudaEventRecord(start_, s));
    f();
    MOET_CUDA_CHECK(cudaEventRecord(stop_, s));
    MOET_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0;
    MOET_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return double(ms);
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

/// One training step of a layer; the returned gradient is freed (stream-ordered) right away.
template <class Layer>
void step(Layer& layer, const DeviceMatrix<T>& x, const DeviceMatrix<T>& dy) {
  const auto c = layer.forward(x);
  DeviceMatrix<T> dx = layer.backward(c, x, dy, accumulate);
  benchmark::DoNotOptimize(dx.data());
}

struct Peaks {
  double gemm_tflops = 0, copy_gbs = 0;
};

/// The device's rates in this run: the best of several 8192^3 bf16 GEMMs (float accumulation)
/// and of several 1 GiB device-to-device copies.
const Peaks& peaks() {
  static const Peaks p = [] {
    Peaks r;
    const Index n = sizes.peak_gemm;
    const DeviceMatrix<T> a = random_device(n, n, 1), b = random_device(n, n, 2);
    DeviceMatrix<T> c(n, n, context().stream());
    EventTimer timer;
    double best = 1e30;
    for (int i = 0; i < 8; ++i) {
      const double ms = timer.milliseconds(
          [&] { cuda_impl::gemm<T, T>(context(), cuda_impl::Op::N, a.view(), cuda_impl::Op::N, b.view(), c.view(), 1.f, 0.f); });
      if (i >= 2) best = std::min(best, ms);
    }
    r.gemm_tflops = 2.0 * double(n) * double(n) * double(n) / (best * 1e-3) / 1e12;
    const std::size_t bytes = sizes.peak_copy_bytes;
    DeviceBuffer src(bytes, context().stream()), dst(bytes, context().stream());
    MOET_CUDA_CHECK(cudaMemsetAsync(src.data(), 1, bytes, context().stream()));
    best = 1e30;
    for (int i = 0; i < 8; ++i) {
      const double ms = timer.milliseconds(
          [&] { MOET_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, context().stream())); });
      if (i >= 2) best = std::min(best, ms);
    }
    r.copy_gbs = 2.0 * double(bytes) / (best * 1e-3) / 1e9;
    std::printf("device: %s, %d SMs; measured peaks: bf16 GEMM %.1f TFLOP/s (%lld^3), copy %.0f GB/s (%zu MiB, read + "
                "write)\n",
                context().device_name().c_str(), context().sm_count(), r.gemm_tflops, static_cast<long long>(n), r.copy_gbs,
                bytes >> 20);
    return r;
  }();
  return p;
}

/// Runs floor and case back to back in every iteration, each timed by events; the benchmark's
/// time is the case's alone.
template <class Floor, class Case>
void timed_against_floor(benchmark::State& state, Floor floor_step, Case case_step) {
  EventTimer timer;
  for (int i = 0; i < 3; ++i) floor_step(), case_step();  // warm-up: plans, pools, clocks
  double floor_total = 0, case_total = 0;
  for (auto _ : state) {
    const double f = timer.milliseconds(floor_step), c = timer.milliseconds(case_step);
    state.SetIterationTime(c * 1e-3);
    floor_total += f;
    case_total += c;
  }
  const double n = double(state.iterations());
  state.counters["floor_ms"] = floor_total / n;
  state.counters["vs_floor"] = case_total / floor_total;
  state.SetItemsProcessed(std::int64_t(n) * sizes.tokens);
}

void frozen_linear(benchmark::State& state, Index d_in, Index d_out) {
  const Peaks& p = peaks();
  Rng rng(3);
  layer<FrozenLinear, T, cuda> linear(context(), rng.normal_matrix<float>(d_in, d_out, 0.0, 0.02));
  const DeviceMatrix<T> x = random_device(sizes.tokens, d_in, 4), dy = random_device(sizes.tokens, d_out, 5);
  EventTimer timer;
  for (int i = 0; i < 3; ++i) step(linear, x, dy);
  double total = 0;
  for (auto _ : state) {
    const double ms = timer.milliseconds([&] { step(linear, x, dy); });
    state.SetIterationTime(ms * 1e-3);
    total += ms;
  }
  const double tflops =
      4.0 * double(sizes.tokens) * double(d_in) * double(d_out) / (total / double(state.iterations()) * 1e-3) / 1e12;
  state.counters["TFLOPs"] = tflops;
  state.counters["pct_gemm_peak"] = 100.0 * tflops / p.gemm_tflops;
  state.SetItemsProcessed(state.iterations() * sizes.tokens);
}

template <class Spec>
void lora_mixture(benchmark::State& state, Index d_in, Index d_out, Dispatch dispatch = Dispatch::automatic) {
  const Peaks& p = peaks();
  Rng rng(6);
  const Matrix<float> w = rng.normal_matrix<float>(d_in, d_out, 0.0, 0.02);
  typename Spec::template layer<T, cuda> mix(context(), w, rng,
                                             {.expert = {.alpha = 2.0 * Spec::expert::spec::rank}, .dispatch = dispatch});
  state.SetLabel(mix.uses_grouped() ? "grouped" : "dense");
  const Matrix<float> up = rng.normal_matrix<float>(mix.lora_up.rows(), mix.lora_up.cols(), 0.0, 0.02);
  cuda_impl::upload(mix.lora_up.value(), up.data(), up.cols(), context().stream());  // a trained adapter
  layer<FrozenLinear, T, cuda> floor(context(), w);
  const DeviceMatrix<T> x = random_device(sizes.tokens, d_in, 7), dy = random_device(sizes.tokens, d_out, 8);
  timed_against_floor(state, [&] { step(floor, x, dy); }, [&] { step(mix, x, dy); });
  // The base model's FLOPs at the mixture's pace: how much of the GEMM peak the step keeps.
  const double ms = state.counters["floor_ms"].value * state.counters["vs_floor"].value;
  const double tflops = 4.0 * double(sizes.tokens) * double(d_in) * double(d_out) / (ms * 1e-3) / 1e12;
  state.counters["base_TFLOPs"] = tflops;
  state.counters["pct_gemm_peak"] = 100.0 * tflops / p.gemm_tflops;
}

template <class Spec>
void ia3_mixture(benchmark::State& state, Index width) {
  const Peaks& p = peaks();
  Rng rng(9);
  typename Spec::template layer<T, cuda> mix(context(), width, rng, {.expert = {.init_stddev = 0.01}});
  const DeviceMatrix<T> h = random_device(sizes.tokens, width, 10), dy = random_device(sizes.tokens, width, 11);
  // The floor of an activation scaling: the frozen linear layer that produces it (d_model 4096).
  layer<FrozenLinear, T, cuda> floor(context(), rng.normal_matrix<float>(sizes.d_model, width, 0.0, 0.02));
  const DeviceMatrix<T> x = random_device(sizes.tokens, sizes.d_model, 12);
  timed_against_floor(state, [&] { step(floor, x, dy); }, [&] { step(mix, h, dy); });
  // The activation traffic a step cannot avoid: forward reads h and writes y; backward reads dy
  // and h and writes dx.
  const double bytes = 5.0 * double(sizes.tokens) * double(width) * sizeof(T);
  const double ms = state.counters["floor_ms"].value * state.counters["vs_floor"].value;
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  state.counters["GBs"] = gbs;
  state.counters["pct_copy_peak"] = 100.0 * gbs / p.copy_gbs;
}

template <class F>
benchmark::internal::Benchmark* add(const std::string& name, F f) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), f)->Unit(benchmark::kMillisecond)->UseManualTime();
  return smoke_iterations > 0 ? b->Iterations(smoke_iterations) : b->MinTime(0.5);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> defaults{"--benchmark_repetitions=5", "--benchmark_report_aggregates_only=true"};
  bool smoke = false;
  std::vector<char*> kept{argv[0]};
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--moet_smoke") smoke = true;
    else kept.push_back(argv[i]);
  if (smoke) {
    sizes = Sizes{.tokens = 64, .d_model = 256, .mov_width = 688, .peak_gemm = 256, .peak_copy_bytes = std::size_t(1) << 20};
    smoke_iterations = 2;
    defaults = {"--benchmark_repetitions=1"};
    std::printf("moet_bench_cuda --moet_smoke: sizes scaled down to check that every case runs; the timings mean nothing\n");
  }
  if (const auto reason = cuda_unavailable_reason()) {
    std::printf("moet_bench_cuda: no CUDA device here (%s); nothing to measure\n", reason->c_str());
    return 0;
  }
  auto args = moet::bench::with_defaults(int(kept.size()), kept.data(), defaults);
  using SoftLoRA8 = Mixture<Router<Soft>, Expert<LoRA<16>>, 8>;
  using Top2LoRA64 = Mixture<Router<TopK<2>>, Expert<LoRA<16>>, 64>;
  using SoftMoV30 = Mixture<Router<Soft>, Expert<IA3>, 30>;

  const Index d = sizes.d_model, width = sizes.mov_width;
  const std::string shape = std::to_string(sizes.tokens) + "/" + std::to_string(d) + "/" + std::to_string(d);
  const std::string soft = "molora_soft/" + shape + "/8/16", top2 = "molora_top2/" + shape + "/64/16";
  add("frozen_linear/" + shape, [d](auto& s) { frozen_linear(s, d, d); });
  add(soft, [d](auto& s) { lora_mixture<SoftLoRA8>(s, d, d); });
  add(top2, [d](auto& s) { lora_mixture<Top2LoRA64>(s, d, d); });
  // both paths forced, to calibrate the cost model that picks between them (docs/cuda.md)
  add("dispatch/top2_dense/" + shape + "/64/16", [d](auto& s) { lora_mixture<Top2LoRA64>(s, d, d, Dispatch::dense); });
  add("dispatch/top2_grouped/" + shape + "/64/16", [d](auto& s) { lora_mixture<Top2LoRA64>(s, d, d, Dispatch::grouped); });
  add("mov_soft/" + std::to_string(sizes.tokens) + "/" + std::to_string(width) + "/30",
      [width](auto& s) { ia3_mixture<SoftMoV30>(s, width); });

  std::map<std::string, double> targets;  // none at smoke sizes: there the ratios mean nothing
  if (!smoke) targets = {{soft, 1.15}, {top2, 1.30}};
  return moet::bench::run_with_ratios(args, targets);
}
