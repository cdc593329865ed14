// CALM's composition layer on the CPU. Anchor states h (N_B, D_B), augmenting states a (N_A, D_A):
//   p = a W_p + b_p                       (D_A -> D_B)
//   q = h W_q,  k = p W_k,  v = p W_v     (heads of the anchor's head size)
//   [q, k = rotary(q, anchor positions), rotary(k, augmenting positions)]   only with rotary_theta > 0
//   o = softmax(q k^T / sqrt(hd) + mask) v   anchor position t reads augmenting positions <= t
//   y = h + o W_O                         W_O starts at zero: the pair starts exactly as the anchor
// Attention keeps only the log-sum-exp and recomputes probabilities in backward (flash style).
// The batch geometry (padding, positions) comes with each forward and stays in its context.
#pragma once

#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <boost/hana/define_struct.hpp>

#include "../calm.hpp"
#include "../core/error.hpp"
#include "../core/param.hpp"
#include "../core/random.hpp"
#include "../core/visit.hpp"
#include "ops/attention.hpp"
#include "ops/rotary.hpp"

namespace moet::cpu_impl {

template <class T>
class CompositionLayer {
 public:
  using Scalar = T;
  using Geometry = std::shared_ptr<const CrossAttentionGeometry>;
  struct Context {
    Geometry geometry;
    Matrix<T> p, q, k, v;  // projected augmenting states and the attention inputs (q, k rotated)
    typename CausalAttention<T>::Context attn;
    Matrix<T> y;  // (N_B, D_B)
    const Matrix<T>& output() const { return y; }
    double aux_loss() const { return 0.0; }
  };

  static std::string name() { return "CompositionLayer"; }

  /// rotary_theta > 0: rotary positions in the attention (see ComposeOptions::rotary_theta).
  CompositionLayer(CpuDevice, Index d_anchor, Index d_augment, Index heads, Rng& rng, double init_stddev,
                   double rotary_theta = 0.0)
      : heads_(heads),
        proj("proj", d_augment, d_anchor),
        proj_bias("proj_bias", 1, d_anchor),
        wq("wq", d_anchor, d_anchor),
        wk("wk", d_anchor, d_anchor),
        wv("wv", d_anchor, d_anchor),
        wo("wo", d_anchor, d_anchor) {
    detail::expect_positive(name(), "anchor width", d_anchor);
    detail::expect_positive(name(), "augmenting width", d_augment);
    detail::expect_positive(name(), "heads", heads);
    if (d_anchor % heads)
      throw value_error(detail::concat(name(), ": anchor width ", d_anchor, " is not a multiple of ", heads, " heads"));
    if (rotary_theta != 0.0) rope_.emplace(heads, d_anchor / heads, rotary_theta);
    for (auto* m : {&proj, &wq, &wk, &wv}) rng.fill_normal(m->value(), 0.0, init_stddev);
    // wo and proj_bias stay zero: the composed model starts as the anchor alone.
  }
  CompositionLayer(Index d_anchor, Index d_augment, Index heads, Rng& rng, double init_stddev, double rotary_theta = 0.0)
      : CompositionLayer(CpuDevice{}, d_anchor, d_augment, heads, rng, init_stddev, rotary_theta) {}
  CompositionLayer(CompositionLayer&&) noexcept = default;

  Index d_anchor() const { return wq.rows(); }
  Index d_augment() const { return proj.rows(); }
  Index heads() const { return heads_; }
  bool rotary() const { return rope_.has_value(); }

  Context forward(In<T> h, In<T> a, Geometry geometry) const {
    check(h, a, geometry);
    Context c;
    c.geometry = std::move(geometry);
    c.p.noalias() = a * proj.value();
    c.p.rowwise() += proj_bias.value().row(0);
    c.q.noalias() = h * wq.value();
    c.k.noalias() = c.p * wk.value();
    c.v.noalias() = c.p * wv.value();
    if (rope_) {
      c.q = rope_->forward(c.q, c.geometry->anchor_positions).y;
      c.k = rope_->forward(c.k, c.geometry->augment_positions).y;
    }
    c.attn = attention(*c.geometry).forward(c.q, c.k, c.v);
    c.y = h;
    c.y.noalias() += c.attn.y * wo.value();
    return c;
  }

  /// Returns {dh, da}.
  std::pair<Matrix<T>, Matrix<T>> backward(const Context& c, In<T> h, In<T> a, In<T> dy, GradMode mode) {
    check(h, a, c.geometry);
    detail::expect_shape(name(), "output gradient dy", dy.rows(), dy.cols(), h.rows(), d_anchor(), "the shape of h");
    detail::assign_grad(wo.grad(), c.attn.y.transpose() * dy, mode);
    const Matrix<T> d_o = dy * wo.value().transpose();
    auto [dq, dk, dv] = attention(*c.geometry).backward(c.attn, c.q, c.k, c.v, d_o, mode);
    if (rope_) {  // a rotation: its backward needs no input
      dq = rope_->backward({}, c.q, c.geometry->anchor_positions, dq, mode);
      dk = rope_->backward({}, c.k, c.geometry->augment_positions, dk, mode);
    }
    detail::assign_grad(wq.grad(), h.transpose() * dq, mode);
    detail::assign_grad(wk.grad(), c.p.transpose() * dk, mode);
    detail::assign_grad(wv.grad(), c.p.transpose() * dv, mode);
    Matrix<T> dp = dk * wk.value().transpose();
    dp.noalias() += dv * wv.value().transpose();
    detail::assign_grad(proj.grad(), a.transpose() * dp, mode);
    detail::assign_grad(proj_bias.grad(), dp.colwise().sum(), mode);
    Matrix<T> dh = dy;
    dh.noalias() += dq * wq.value().transpose();
    return {std::move(dh), dp * proj.value().transpose()};
  }

  /// Decoding (one sequence): appends the new augmenting positions' keys and values to the
  /// caches and returns h + cross-attention of the new anchor positions over all of them.
  /// anchor_start: the anchor's position of h's first row (the augmenting positions continue
  /// the cache: k_cache.rows(), ...).
  template <class Cache>
  Matrix<T> forward_cached(In<T> h, In<T> a, Cache& k_cache, Cache& v_cache, Index anchor_start = 0) const {
    detail::expect_cols(name(), "anchor states h", h.rows(), h.cols(), d_anchor(), "tokens x anchor width");
    detail::expect_cols(name(), "augmenting states a", a.rows(), a.cols(), d_augment(), "tokens x augmenting width");
    Matrix<T> p = a * proj.value();
    p.rowwise() += proj_bias.value().row(0);
    Matrix<T> k = p * wk.value(), q = h * wq.value();
    if (rope_) {
      k = rope_->forward(k, iota_positions(k_cache.rows(), a.rows())).y;
      q = rope_->forward(q, iota_positions(anchor_start, h.rows())).y;
    }
    k_cache.append(k);
    v_cache.append(p * wv.value());
    const CausalAttention<T> attention(AttentionShape{1, h.rows(), heads_, heads_, d_anchor() / heads_, k_cache.rows()});
    Matrix<T> y = h;
    y.noalias() += attention.forward(q, k_cache.view(), v_cache.view()).y * wo.value();
    return y;
  }

 private:
  CausalAttention<T> attention(const CrossAttentionGeometry& g) const {
    return CausalAttention<T>(AttentionShape{g.batch, g.anchor_seq, heads_, heads_, d_anchor() / heads_, g.augment_seq}, g.valid);
  }

  void check(In<T> h, In<T> a, const Geometry& g) const {
    if (!g) throw value_error(name() + ": forward needs the batch's CrossAttentionGeometry (CrossAttentionGeometry::make)");
    detail::expect_shape(name(), "anchor states h", h.rows(), h.cols(), g->batch * g->anchor_seq, d_anchor(),
                         "batch*anchor_seq x anchor width");
    detail::expect_shape(name(), "augmenting states a", a.rows(), a.cols(), g->batch * g->augment_seq, d_augment(),
                         "batch*augment_seq x augmenting width");
  }

  static std::vector<Index> iota_positions(Index start, Index n) {
    std::vector<Index> p{};
    p.resize(std::size_t(n));
    std::iota(p.begin(), p.end(), start);
    return p;
  }

  Index heads_;
  std::optional<Rotary<T>> rope_;

 public:
  BOOST_HANA_DEFINE_STRUCT(CompositionLayer, (Param<T>, proj), (Param<T>, proj_bias), (Param<T>, wq), (Param<T>, wk),
                           (Param<T>, wv), (Param<T>, wo));
};

}  // namespace moet::cpu_impl
