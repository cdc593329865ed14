// Whole GPT-2 models on the CUDA backend against the CPU model (cuda_model_harness.hpp): every
// slot kind, moet::fit and resuming it, bad input, and the benchmarks' stand-in weights.
#include "cuda_model_harness.hpp"

using namespace moet;
using namespace moet::slot;
using namespace moet::testing::cuda_model;

TEST_CASE("CUDA GPT-2 with MoLoRA, LoRA and MoV slots matches the CPU model", "[cuda][model]") {
  compare_model<Gpt2AllSlots>(gpt2_config(), with_aux());
}

TEST_CASE("moet::fit trains a CUDA model as it trains the CPU model, and resumes it bit for bit", "[cuda][model][fit]") {
  compare_fit<Gpt2AllSlots>(gpt2_config(), with_aux());
}

TEST_CASE("CUDA models refuse bad input with moet errors", "[cuda][model][errors]") {
  using M = Decoder<GPT2, Slots<at<q, MoLoRA<2, 2>>>>;
  Rng rng(1);
  CHECK_THROWS_AS((M::model<float, cuda>(CudaDevice{}, gpt2_config(), rng)), value_error);
  M::model<float, cuda> gpu(context(), gpt2_config(), rng, {}, 0.3);
  TokenBatch bad{1, 3, {1, 2, 99}, {}, {}, {}};
  CHECK_THROWS_WITH(gpu.forward(bad), Catch::Contains("token id 99"));
  auto cache = gpu.start_cache();
  CHECK_THROWS_WITH(gpu.decode(cache, {1, -3}), Catch::Contains("outside the vocabulary"));
  CHECK(cache.layers[0].k.rows() == 0);
  CHECK_THROWS_WITH(gpu.generate({1, 2, 3}, {.max_new_tokens = 14}), Catch::Contains("ask for at most 13"));
}

TEST_CASE("Stand-in weights: fill_uniform is bounded, varied and the same on every run; init_stddev 0 draws nothing",
          "[cuda][model]") {
  const cudaStream_t st = context().stream();
  DeviceMatrix<float> a(5, 7, st, 9), b(5, 7, st, 9);
  cuda_impl::fill_uniform(a.data(), 5, 7, 9, 42, 0.5f, st);
  cuda_impl::fill_uniform(b.data(), 5, 7, 9, 42, 0.5f, st);
  const std::vector<double> va = host(a), vb = host(b);
  CHECK(va == vb);
  const auto [lo, hi] = std::minmax_element(va.begin(), va.end());
  CHECK(*lo >= -0.5);
  CHECK(*hi <= 0.5);
  CHECK(*hi - *lo > 0.5);  // 35 values spread over the interval
  Rng r1(3), r2(3);
  Decoder<GPT2>::model<float, cuda> zero(context(), gpt2_config(), r1, {}, 0.0);
  for_each_frozen(zero, [&](auto& f) {
    if (f.rows() > 1) CHECK(relative(host(f.value()), std::vector<double>(std::size_t(f.size()), 0.0)) == 0.0);
  });
  CHECK(r1.next() == r2.next());  // nothing was drawn
}

TEST_CASE("Frozen weights that start at zero are zeroed on the device, never uploaded from the host", "[cuda][model]") {
  // load_pretrained's placeholders and init_stddev 0 pass Matrix::Zero to the layers, which fill
  // their device storage with it; every host upload waits for the stream once, so the waits count
  // the uploads. The MoLoRA slot and the biases cover the fused layer as well as FrozenLinear.
  using M = Decoder<GPT2, Slots<at<q, MoLoRA<2, 2>>>>;
  const auto build = [](const FrozenInit& init, Rng& rng) {
    const long before = cuda_impl::host_waits();
    M::model<float, cuda> m(context(), gpt2_config(), rng, {}, init);
    return std::pair{std::move(m), cuda_impl::host_waits() - before};
  };
  Rng r1(5), r2(5), r3(5);
  auto [drawn, drawn_waits] = build(0.3, r1);
  auto [placeholder, placeholder_waits] = build(FrozenInit::placeholder(), r2);
  auto [zero, zero_waits] = build(0.0, r3);
  long weights = 0;  // the frozen matrices (the norms' vectors and the biases are uploaded as before)
  for_each_frozen(placeholder, [&](auto& f) {
    if (f.rows() > 1) {
      CHECK(relative(host(f.value()), std::vector<double>(std::size_t(f.size()), 0.0)) == 0.0);
      ++weights;
    }
  });
  CHECK(weights == 2 + 2 * 6);  // wte, wpe; q (the MoLoRA's W0), k, v, o, ffn_up, ffn_down per layer
  CHECK(placeholder_waits == zero_waits);
  CHECK(drawn_waits - placeholder_waits == weights);
  // The adapters are those of the random model of the same seed; the Rng ends where it does.
  std::vector<std::vector<double>> a, b;
  for_each_device_param(drawn, [&](auto& p) { a.push_back(host<float>(p.value())); });
  for_each_device_param(placeholder, [&](auto& p) { b.push_back(host<float>(p.value())); });
  CHECK(a == b);
  CHECK(r1.next() == r2.next());
}
