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
