// Causal multi-head self-attention with grouped-query heads and key padding, forward and
// backward (the frozen path between a model's projections). Layout: q (B*Lq, H*hd),
// k and v (B*Lk, Hkv*hd), sequence b's rows are [b Lq, (b+1) Lq) and [b Lk, (b+1) Lk); query
// head h reads kv head h / (H / Hkv). With shape.kv_stride set, sequence b's keys and values are
// rows [b kv_stride, b kv_stride + Lk) of k and v (a decoding cache's storage, read in place). The queries are the last Lq of the Lk positions (Lq = Lk
// in training; Lq = 1 when decoding against a KV cache), and query i attends to key positions
// j <= (Lk - Lq) + i whose token is real.
//
// Only the output and the per-row log-sum-exp are kept; backward recomputes the probabilities
// (flash-attention's scheme), with D_i = <dO_i, O_i>:
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ = dS K / sqrt(hd),  dK = dS^T Q / sqrt(hd)
// A query row with no visible key (a padded position before the first real token) outputs 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../../core/error.hpp"
#include "../../core/param.hpp"
#include "../../core/shapes.hpp"
#include "../../core/util.hpp"

namespace moet::cpu_impl {

using moet::AttentionShape;

template <class T>
class CausalAttention {
 public:
  using Scalar = T;
  struct Context {
    Matrix<T> y;            // (B*L, H*hd)
    Matrix<T> lse;          // (B*H, Lq); -inf for rows with no visible key
    const Matrix<T>& output() const { return y; }
    double aux_loss() const { return 0.0; }
  };
  static std::string name() { return "CausalAttention"; }

  /// valid: one flag per key position (B*Lk), 1 for real tokens, 0 for padding; empty: all real.
  CausalAttention(AttentionShape shape, std::vector<unsigned char> valid = {}) : s_(shape), valid_(std::move(valid)) {
    if (s_.kv_seq == 0) s_.kv_seq = s_.seq;
    if (s_.kv_stride == 0) s_.kv_stride = s_.kv_seq;
    for (auto [what, v] : {std::pair{"batch", s_.batch}, {"seq", s_.seq}, {"heads", s_.heads}, {"kv_heads", s_.kv_heads},
                           {"head_dim", s_.head_dim}, {"kv_seq", s_.kv_seq}})
      detail::expect_positive(name(), what, v);
    if (s_.kv_stride < s_.kv_seq)
      throw value_error(detail::concat(name(), ": kv_stride ", s_.kv_stride, " is shorter than the ", s_.kv_seq, " key positions"));
    if (s_.heads % s_.kv_heads)
      throw value_error(detail::concat(name(), ": heads ", s_.heads, " is not a multiple of kv_heads ", s_.kv_heads));
    if (s_.kv_seq < s_.seq)
      throw value_error(detail::concat(name(), ": kv_seq ", s_.kv_seq, " is shorter than the ", s_.seq, " query positions"));
    if (valid_.empty()) valid_.assign(std::size_t(s_.batch * s_.kv_seq), 1);
    if (Index(valid_.size()) != s_.batch * s_.kv_seq)
      throw shape_error(detail::concat(name(), ": padding mask has ", valid_.size(), " flags, expected batch*kv_seq = ",
                                       s_.batch * s_.kv_seq));
  }

  Context forward(In<T> q, In<T> k, In<T> v) const {
    check(q, k, v);
    Context c;
    c.y = Matrix<T>::Zero(q.rows(), q.cols());
    c.lse.resize(s_.batch * s_.heads, s_.seq);
    const Index B = s_.batch, L = s_.seq, K = s_.kv_seq, KS = s_.kv_stride, H = s_.heads, hd = s_.head_dim, group = H / s_.kv_heads;
    MOET_OMP(omp parallel for schedule(dynamic) collapse(2) if (B * H * L * K * hd > 100000))
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < H; ++h) {
        const Matrix<T> p = probabilities<true>(q, k, b, h, c.lse.row(b * H + h));  // (L, K)
        c.y.block(b * L, h * hd, L, hd).noalias() = p * v.block(b * KS, (h / group) * hd, K, hd);
      }
    return c;
  }

  /// Returns {dq, dk, dv}.
  std::tuple<Matrix<T>, Matrix<T>, Matrix<T>> backward(const Context& c, In<T> q, In<T> k, In<T> v, In<T> dy, GradMode) const {
    check(q, k, v);
    detail::expect_shape(name(), "output gradient dy", dy.rows(), dy.cols(), q.rows(), q.cols(), "the shape of q");
    const Index B = s_.batch, L = s_.seq, K = s_.kv_seq, KS = s_.kv_stride, H = s_.heads, hd = s_.head_dim, group = H / s_.kv_heads;
    const T scale = T(1) / std::sqrt(T(hd));
    Matrix<T> dq(q.rows(), q.cols()), dk = Matrix<T>::Zero(k.rows(), k.cols()), dv = Matrix<T>::Zero(v.rows(), v.cols());
    // Heads of one kv group write the same dk, dv blocks: parallel over (sequence, kv head).
    MOET_OMP(omp parallel for schedule(dynamic) collapse(2) if (B * H * L * K * hd > 100000))
    for (Index b = 0; b < B; ++b)
      for (Index g = 0; g < s_.kv_heads; ++g)
        for (Index h = g * group; h < (g + 1) * group; ++h) {
          auto lse_row = c.lse.row(b * H + h);
          const Matrix<T> p = probabilities<false>(q, k, b, h, lse_row);  // (L, K)
          const auto d_out = dy.block(b * L, h * hd, L, hd);
          const auto out = c.y.block(b * L, h * hd, L, hd);
          dv.block(b * KS, g * hd, K, hd).noalias() += p.transpose() * d_out;
          Matrix<T> ds = d_out * v.block(b * KS, g * hd, K, hd).transpose();  // dP (L, K)
          const Matrix<T> d = (d_out.cwiseProduct(out)).rowwise().sum();    // (L, 1)
          ds = p.cwiseProduct(ds - d.replicate(1, K)) * scale;
          dq.block(b * L, h * hd, L, hd).noalias() = ds * k.block(b * KS, g * hd, K, hd);
          dk.block(b * KS, g * hd, K, hd).noalias() += ds.transpose() * q.block(b * L, h * hd, L, hd);
        }
    return {std::move(dq), std::move(dk), std::move(dv)};
  }

 private:
  void check(In<T> q, In<T> k, In<T> v) const {
    const Index rows = s_.batch * s_.seq, kv_rows = s_.batch * s_.kv_stride;
    const char* kv_shape = s_.kv_stride == s_.kv_seq ? "batch*kv_seq x kv_heads*head_dim" : "batch*kv_stride x kv_heads*head_dim";
    detail::expect_shape(name(), "q", q.rows(), q.cols(), rows, s_.heads * s_.head_dim, "batch*seq x heads*head_dim");
    detail::expect_shape(name(), "k", k.rows(), k.cols(), kv_rows, s_.kv_heads * s_.head_dim, kv_shape);
    detail::expect_shape(name(), "v", v.rows(), v.cols(), kv_rows, s_.kv_heads * s_.head_dim, kv_shape);
  }

  /// Softmax of the masked, scaled scores of sequence b, head h: (Lq, Lk). Forward writes the
  /// log-sum-exp of each row; backward reads it back.
  template <bool WriteLse, class LseRow>
  Matrix<T> probabilities(In<T> q, In<T> k, Index b, Index h, LseRow&& lse) const {
    const Index L = s_.seq, K = s_.kv_seq, hd = s_.head_dim, g = h / (s_.heads / s_.kv_heads);
    const T scale = T(1) / std::sqrt(T(hd));
    Matrix<T> s = (q.block(b * L, h * hd, L, hd) * k.block(b * s_.kv_stride, g * hd, K, hd).transpose()) * scale;
    constexpr T minus_inf = -std::numeric_limits<T>::infinity();
    const unsigned char* valid = valid_.data() + b * K;
    const bool padded = std::find(valid, valid + K, 0) != valid + K;
    for (Index i = 0; i < L; ++i) {
      const Index visible = K - L + i + 1;  // keys [0, visible) are not in the future
      auto row = s.row(i).head(visible).array();
      if (padded)
        for (Index j = 0; j < visible; ++j)
          if (!valid[j]) row(j) = minus_inf;
      if constexpr (WriteLse) {
        const T m = row.maxCoeff();
        lse(i) = m == minus_inf ? minus_inf : m + std::log((row - m).exp().sum());
      }
      const T l = lse(i);
      if (l == minus_inf) row.setZero();
      else row = (row - l).exp();  // vectorised; masked entries are set to exactly 0 below
      if (padded)
        for (Index j = 0; j < visible; ++j)
          if (!valid[j]) row(j) = T(0);
      s.row(i).tail(K - visible).setZero();
    }
    return s;
  }

  AttentionShape s_;
  std::vector<unsigned char> valid_;
};

}  // namespace moet::cpu_impl
