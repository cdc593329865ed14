// A new backend is a new ops<B, T> plus its layers, nothing in the model level: a test backend
// (`counting`: the CPU's layers, and ops that count their calls) runs the decoder and CALM
// written in include/moet/model/ unchanged, with the CPU backend's results to the bit.
#include <catch2/catch.hpp>

#include <moet/models.hpp>

using namespace moet;
using namespace moet::slot;

struct counting {
  static constexpr const char* name = "counting";
};

namespace moet {
template <class T>
struct ops<counting, T> : ops<cpu, T> {
  using Base = ops<cpu, T>;
  static inline int attentions = 0, embeddings = 0, heads = 0;
  static typename Base::Attention attention(const AttentionShape& shape, const std::vector<unsigned char>& valid) {
    ++attentions;
    return Base::attention(shape, valid);
  }
  static typename Base::Tensor embed(const typename Base::Embedding& wte, const typename Base::Embedding* wpe,
                                     const std::vector<int>& ids, const typename Base::Positions& positions) {
    ++embeddings;
    return Base::embed(wte, wpe, ids, positions);
  }
  static typename Base::LossContext head_loss(const typename Base::CrossEntropy& loss, const typename Base::Frozen& w,
                                              typename Base::View h, typename Base::Tensor* dh) {
    ++heads;
    return Base::head_loss(loss, w, h, dh);
  }
};
template <class R, class X, int E, class T>
struct LayerFor<Mixture<R, X, E>, T, counting> : LayerFor<Mixture<R, X, E>, T, cpu> {};
template <class T>
struct LayerFor<FrozenLinear, T, counting> : LayerFor<FrozenLinear, T, cpu> {};
}  // namespace moet

namespace {
io::ModelConfig llama() {
  io::ModelConfig c;
  c.architecture = io::Architecture::llama;
  c.vocab = 13, c.d_model = 8, c.layers = 2, c.heads = 2, c.kv_heads = 1, c.d_ff = 10, c.max_positions = 16;
  c.rope_theta = 100.0, c.tied_embeddings = false;
  return c;
}
}  // namespace

TEST_CASE("A test backend runs the model level unchanged, with the CPU's results", "[backend][model]") {
  using M = Decoder<Llama, Slots<at<q, MoLoRA<2, 2>>, at<ffn_hidden, MoV<2>>>>;
  Rng a(3), b(3);
  M::model<double> cpu_model(llama(), a, {}, 0.3);
  M::model<double, counting> test_model(CpuDevice{}, llama(), b, {}, 0.3);
  const TokenBatch batch{2, 4, {1, 5, 2, 7, 3, 3, 9, 0}, {1, 1, 1, 1, 0, 1, 1, 1}, {}};
  const auto c1 = cpu_model.forward(batch);
  const auto c2 = test_model.forward(batch);
  REQUIRE(c1.output() == c2.output());
  cpu_model.backward(c1, overwrite);
  test_model.backward(c2, overwrite);
  std::vector<Matrix<double>> g1, g2;
  for_each_param(cpu_model, [&](auto& p) { g1.emplace_back(p.grad()); });
  for_each_param(test_model, [&](auto& p) { g2.emplace_back(p.grad()); });
  REQUIRE(g1 == g2);
  REQUIRE(test_model.generate({1, 2}, {.max_new_tokens = 3}) == cpu_model.generate({1, 2}, {.max_new_tokens = 3}));
  REQUIRE(ops<counting, double>::attentions > 0);
  REQUIRE(ops<counting, double>::embeddings > 0);
  REQUIRE(ops<counting, double>::heads > 0);

  using Pair = Compose<Decoder<Llama>, Decoder<Llama>, CrossAttention<>, Every<1>>;
  Rng c(4), d(4);
  Pair::model<double> cpu_pair(llama(), llama(), c, {.init_stddev = 0.3});
  Pair::model<double, counting> test_pair(CpuDevice{}, llama(), llama(), d, {.init_stddev = 0.3});
  for (auto* m : {&cpu_pair.composition, &test_pair.composition}) {
    Rng r(5);
    for_each_param(*m, [&](auto& p) { r.fill_normal(p.value(), 0.0, 0.3); });
  }
  REQUIRE(test_pair.logits(batch) == cpu_pair.logits(batch));
}
