// Gradient checks of the frozen-path transformer ops: norms, activations, loss, rotary,
// causal attention with padding and grouped-query heads.
#include <catch2/catch.hpp>

#include <moet/cpu/ops/activations.hpp>
#include <moet/cpu/ops/attention.hpp>
#include <moet/cpu/ops/embedding.hpp>
#include <moet/cpu/ops/lm_head_loss.hpp>
#include <moet/cpu/ops/loss.hpp>
#include <moet/cpu/ops/norms.hpp>
#include <moet/cpu/ops/rotary.hpp>

#include "harness.hpp"

using namespace moet;
using namespace moet::cpu_impl;
using moet::testing::check_gradients;

namespace {
template <class Layer, class... Inputs>
void require_gradients(Layer& layer, Rng& rng, Inputs... inputs) {
  const auto report = check_gradients(layer, rng, std::make_tuple(std::move(inputs)...));
  INFO(Layer::name() << ": " << report.summary());
  REQUIRE(report.ok);
  REQUIRE(report.checked > 10);
}

/// Rotary with its positions bound, so the harness sees a one-input layer.
struct RotaryAt {
  Rotary<double> rope;
  std::vector<Index> positions;
  static std::string name() { return "Rotary"; }
  auto forward(In<double> x) const { return rope.forward(x, positions); }
  Matrix<double> backward(const Rotary<double>::Context& c, In<double> x, In<double> dy, GradMode m) const {
    return rope.backward(c, x, positions, dy, m);
  }
};

/// A norm with its residual add, as a pre-norm block uses it: inputs x and r, output [y | s] with
/// s = x + r and y = norm(s); backward is the norm's backward with s's own gradient added in the
/// same call (the residual path), returned to both inputs.
template <class Norm>
struct ResidualNorm {
  Norm norm;
  struct Context {
    typename Norm::Context n;
    Matrix<double> sum, out;
    const Matrix<double>& output() const { return out; }
    double aux_loss() const { return 0.0; }
  };
  static std::string name() { return Norm::name() + " with a residual"; }
  Context forward(In<double> x, In<double> r) const {
    Context c;
    c.n = norm.forward(x, r, c.sum);
    c.out.resize(x.rows(), 2 * x.cols());
    c.out << c.n.output(), c.sum;
    return c;
  }
  std::pair<Matrix<double>, Matrix<double>> backward(const Context& c, In<double>, In<double>, In<double> d_out, GradMode m) const {
    const Index d = norm.width();
    Matrix<double> dx = norm.backward(c.n, c.sum, d_out.leftCols(d), d_out.rightCols(d), m);
    return {dx, dx};
  }
};
}  // namespace

TEST_CASE("LayerNorm and RMSNorm pass gradients to their input", "[grad][ops]") {
  Rng rng(1);
  LayerNorm<double> ln(rng.normal_matrix<double>(1, 6), rng.normal_matrix<double>(1, 6), 1e-5);
  require_gradients(ln, rng, rng.normal_matrix<double>(5, 6));
  RMSNorm<double> rms(rng.normal_matrix<double>(1, 6), 1e-6);
  require_gradients(rms, rng, rng.normal_matrix<double>(5, 6));
  REQUIRE(count_parameters(ln).total == 12);
  REQUIRE(count_parameters(ln).trainable == 0);
}

TEST_CASE("LayerNorm and RMSNorm fused with the residual add before them", "[grad][ops]") {
  Rng rng(11);
  ResidualNorm<LayerNorm<double>> ln{LayerNorm<double>(rng.normal_matrix<double>(1, 6), rng.normal_matrix<double>(1, 6), 1e-5)};
  require_gradients(ln, rng, rng.normal_matrix<double>(5, 6), rng.normal_matrix<double>(5, 6));
  ResidualNorm<RMSNorm<double>> rms{RMSNorm<double>(rng.normal_matrix<double>(1, 6), 1e-6)};
  require_gradients(rms, rng, rng.normal_matrix<double>(5, 6), rng.normal_matrix<double>(5, 6));
  // The fused calls equal the separate ones, and refuse mismatched residuals.
  const Matrix<double> x = rng.normal_matrix<double>(5, 6), r = rng.normal_matrix<double>(5, 6), dy = rng.normal_matrix<double>(5, 6),
                       dres = rng.normal_matrix<double>(5, 6);
  Matrix<double> sum;
  const auto fused = rms.norm.forward(x, r, sum);
  const Matrix<double> s = x + r;
  const auto plain = rms.norm.forward(s);
  REQUIRE(sum == s);
  REQUIRE(fused.output() == plain.output());
  const Matrix<double> expected = rms.norm.backward(plain, s, dy, GradMode::overwrite) + dres;
  REQUIRE((rms.norm.backward(fused, sum, dy, dres, GradMode::overwrite) - expected).cwiseAbs().maxCoeff() < 1e-15);
  REQUIRE_THROWS_WITH(rms.norm.forward(x, r.topRows(4), sum),
                      Catch::Contains("RMSNorm") && Catch::Contains("residual r") && Catch::Contains("(4, 6)"));
  REQUIRE_THROWS_WITH(rms.norm.backward(fused, sum, dy, dres.leftCols(5), GradMode::overwrite),
                      Catch::Contains("residual gradient dres"));
}

TEST_CASE("GELU (tanh) and SwiGLU", "[grad][ops]") {
  Rng rng(2);
  GeluTanh<double> gelu;
  require_gradients(gelu, rng, rng.normal_matrix<double>(4, 7, 0, 2));
  SwiGLU<double> swiglu;
  require_gradients(swiglu, rng, rng.normal_matrix<double>(4, 7, 0, 2), rng.normal_matrix<double>(4, 7));
}

TEST_CASE("Cross-entropy with an ignore label", "[grad][ops]") {
  Rng rng(3);
  CrossEntropy<double> loss({2, -100, 0, 4, -100, 1});
  require_gradients(loss, rng, rng.normal_matrix<double>(6, 5, 0, 2));
  // value: mean over the four counted tokens of lse - logit[label]
  const Matrix<double> logits = rng.normal_matrix<double>(6, 5);
  double expected = 0;
  for (auto [t, label] : {std::pair{0, 2}, {2, 0}, {3, 4}, {5, 1}})
    expected += std::log(logits.row(t).array().exp().sum()) - logits(t, label);
  REQUIRE(loss.forward(logits).output()(0, 0) == Approx(expected / 4));
  REQUIRE_THROWS_AS(CrossEntropy<double>({7}).forward(logits.topRows(1)), value_error);
}

TEST_CASE("Rotary embeddings", "[grad][ops]") {
  Rng rng(4);
  RotaryAt rope{Rotary<double>(2, 4, 10000.0), {0, 1, 5, 2, 9}};
  require_gradients(rope, rng, rng.normal_matrix<double>(5, 8));
  // position 0 is the identity; rotation keeps each pair's norm
  const Matrix<double> x = rng.normal_matrix<double>(1, 8);
  REQUIRE((rope.rope.forward(x, {0}).output() - x).cwiseAbs().maxCoeff() < 1e-15);
  REQUIRE(rope.rope.forward(x, {7}).output().norm() == Approx(x.norm()));
}

TEST_CASE("Causal attention: multi-head, grouped-query, padding", "[grad][ops]") {
  Rng rng(5);
  {
    CausalAttention<double> mha({.batch = 2, .seq = 4, .heads = 2, .kv_heads = 2, .head_dim = 3});
    require_gradients(mha, rng, rng.normal_matrix<double>(8, 6), rng.normal_matrix<double>(8, 6), rng.normal_matrix<double>(8, 6));
  }
  {  // Llama-style GQA (4 query heads on 2 kv heads), left padding in sequence 0, right in 1
    CausalAttention<double> gqa({.batch = 2, .seq = 4, .heads = 4, .kv_heads = 2, .head_dim = 2}, {0, 0, 1, 1, 1, 1, 1, 0});
    require_gradients(gqa, rng, rng.normal_matrix<double>(8, 8), rng.normal_matrix<double>(8, 4), rng.normal_matrix<double>(8, 4));
    // a padded query with no visible key outputs zero
    const auto c = gqa.forward(rng.normal_matrix<double>(8, 8), rng.normal_matrix<double>(8, 4), rng.normal_matrix<double>(8, 4));
    REQUIRE(c.output().row(0).isZero());
    REQUIRE(c.output().row(1).isZero());
  }
  {  // causality: changing a later token does not change an earlier output
    CausalAttention<double> att({.batch = 1, .seq = 5, .heads = 1, .kv_heads = 1, .head_dim = 4});
    Matrix<double> q = rng.normal_matrix<double>(5, 4), k = rng.normal_matrix<double>(5, 4), v = rng.normal_matrix<double>(5, 4);
    const Matrix<double> before = att.forward(q, k, v).output();
    k.row(4).setRandom();
    v.row(4).setRandom();
    const Matrix<double> after = att.forward(q, k, v).output();
    REQUIRE((before.topRows(4) - after.topRows(4)).cwiseAbs().maxCoeff() == 0.0);
    REQUIRE((before.row(4) - after.row(4)).norm() > 1e-6);
  }
  {  // queries against a longer key sequence (a KV cache): gradients, and equal to the full pass
    CausalAttention<double> cached({.batch = 2, .seq = 2, .heads = 2, .kv_heads = 1, .head_dim = 3, .kv_seq = 5},
                                   {1, 1, 1, 1, 1, 0, 1, 1, 1, 1});
    require_gradients(cached, rng, rng.normal_matrix<double>(4, 6), rng.normal_matrix<double>(10, 3), rng.normal_matrix<double>(10, 3));
    CausalAttention<double> full({.batch = 1, .seq = 5, .heads = 2, .kv_heads = 1, .head_dim = 3});
    CausalAttention<double> last({.batch = 1, .seq = 1, .heads = 2, .kv_heads = 1, .head_dim = 3, .kv_seq = 5});
    const Matrix<double> q = rng.normal_matrix<double>(5, 6), k = rng.normal_matrix<double>(5, 3), v = rng.normal_matrix<double>(5, 3);
    const Matrix<double> y_full = full.forward(q, k, v).output();
    const Matrix<double> y_last = last.forward(q.bottomRows(1), k, v).output();
    REQUIRE((y_full.bottomRows(1) - y_last).cwiseAbs().maxCoeff() < 1e-14);
  }
  {  // keys and values read in place from a cache's storage (sequences kv_stride rows apart): the
     // same output and gradients as the compact rows, gradients past each sequence's keys zero,
     // and finite differences through the strided layout
    const AttentionShape compact{.batch = 2, .seq = 2, .heads = 2, .kv_heads = 1, .head_dim = 3, .kv_seq = 4};
    AttentionShape strided = compact;
    strided.kv_stride = 7;
    const std::vector<unsigned char> valid{1, 1, 1, 1, 0, 1, 1, 1};
    CausalAttention<double> a(compact, valid), b(strided, valid);
    const Matrix<double> q = rng.normal_matrix<double>(4, 6), dy = rng.normal_matrix<double>(4, 6);
    const Matrix<double> ks = rng.normal_matrix<double>(14, 3), vs = rng.normal_matrix<double>(14, 3);
    Matrix<double> k(8, 3), v(8, 3);
    k << ks.middleRows(0, 4), ks.middleRows(7, 4);
    v << vs.middleRows(0, 4), vs.middleRows(7, 4);
    const auto ca = a.forward(q, k, v), cb = b.forward(q, ks, vs);
    REQUIRE((ca.output() - cb.output()).cwiseAbs().maxCoeff() == 0.0);
    const auto [dqa, dka, dva] = a.backward(ca, q, k, v, dy, overwrite);
    const auto [dqb, dkb, dvb] = b.backward(cb, q, ks, vs, dy, overwrite);
    REQUIRE((dqa - dqb).cwiseAbs().maxCoeff() == 0.0);
    for (Index s = 0; s < 2; ++s) {
      REQUIRE((dka.middleRows(4 * s, 4) - dkb.middleRows(7 * s, 4)).cwiseAbs().maxCoeff() == 0.0);
      REQUIRE((dva.middleRows(4 * s, 4) - dvb.middleRows(7 * s, 4)).cwiseAbs().maxCoeff() == 0.0);
      REQUIRE(dkb.middleRows(7 * s + 4, 3).isZero());
    }
    require_gradients(b, rng, q, ks, vs);
    REQUIRE_THROWS_WITH(b.forward(q, k, v), Catch::Matchers::Contains("expected (14, 3) (batch*kv_stride x kv_heads*head_dim)"));
    REQUIRE_THROWS_WITH(CausalAttention<double>({.seq = 2, .kv_seq = 4, .kv_stride = 3}),
                        Catch::Matchers::Contains("kv_stride 3 is shorter than the 4 key positions"));
  }
  REQUIRE_THROWS_WITH(CausalAttention<double>({.heads = 3, .kv_heads = 2}), Catch::Matchers::Contains("not a multiple of kv_heads"));
  REQUIRE_THROWS_WITH(CausalAttention<double>({.seq = 3, .kv_seq = 2}), Catch::Matchers::Contains("kv_seq 2 is shorter than the 3"));
}

TEST_CASE("Fused LM head + loss equals logits then cross-entropy, across chunks", "[grad][ops]") {
  Rng rng(6);
  const Index vocab = 11, d = 5;
  const Matrix<double> w = rng.normal_matrix<double>(vocab, d);
  LmHeadLoss<double> head(w);
  head.set_labels({3, -100, 10, 0, 7, -100, 2});
  require_gradients(head, rng, rng.normal_matrix<double>(7, d));

  // 600 tokens span three chunks; compare with the unfused pair
  std::vector<int> labels(600);
  for (std::size_t t = 0; t < labels.size(); ++t) labels[t] = t % 7 == 0 ? -100 : int(rng.next() % vocab);
  const Matrix<double> h = rng.normal_matrix<double>(600, d), dl = Matrix<double>::Constant(1, 1, 1.7);
  head.set_labels(labels);
  CrossEntropy<double> ce(labels);
  const Matrix<double> logits = h * w.transpose();
  const auto cf = head.forward(h);
  const auto cu = ce.forward(logits);
  REQUIRE(cf.output()(0, 0) == Approx(cu.output()(0, 0)).epsilon(1e-12));
  const Matrix<double> dh_unfused = ce.backward(cu, logits, dl, overwrite) * w;
  REQUIRE((head.backward(cf, h, dl, overwrite) - dh_unfused).cwiseAbs().maxCoeff() < 1e-12);
  REQUIRE_THROWS_WITH(head.set_labels({11}), Catch::Matchers::Contains("label 11 of token 0 is outside the vocabulary [0, 11)"));
  REQUIRE_THROWS_AS(head.forward(h.topRows(5)), shape_error);
}

TEST_CASE("Frozen embedding lookup", "[ops]") {
  Rng rng(7);
  const Matrix<float> table = rng.normal_matrix<float>(6, 3);
  Embedding<float> wte(table);
  const Matrix<float> rows = wte.lookup({5, 0, 5});
  REQUIRE(rows.row(0) == table.row(5));
  REQUIRE(rows.row(1) == table.row(0));
  REQUIRE(rows.row(2) == table.row(5));
  REQUIRE(wte.lookup({}).rows() == 0);
  REQUIRE(count_parameters(wte).total == 18);
  REQUIRE(count_parameters(wte).trainable == 0);
  REQUIRE_THROWS_WITH(wte.lookup({1, 6}), Catch::Matchers::Contains("id 6 at position 1 is outside [0, 6)"));
  REQUIRE_THROWS_AS(wte.lookup({-1}), value_error);
}
