// The shared core of additive mixtures on the CPU: a frozen linear layer whose input GEMM
// also computes the router logits and, optionally, more trainable columns (the LoRA "A"
// matrices of all experts). The weights sit side by side in one row-major buffer
//
//   weights (d_in + below, d_out + E + extra) = [ W0 (frozen) | W_r (router) | extra ]
//                                               [ lower       |      0     |   0   ]
//
// so `x * weights` reads x once for all of them, and `[dy | d_logits | d_extra] * weights^T`
// gives dx in one GEMM. `below` optional rows under W0 hold a trainable (below, d_out) matrix
// (the LoRA "B" matrices) so that dy [W0; lower]^T yields dx and dy lower^T in one GEMM too.
// The trainable columns [W_r | extra] have one contiguous gradient buffer (d_in, E + extra),
// filled by one GEMM x^T [d_logits | d_extra]; a model's gradient arena moves it whole (the
// gradient views are re-pointed, so the buffer is always reached through router_kernel.grad()).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <boost/hana/define_struct.hpp>

#include "../core/error.hpp"
#include "../core/param.hpp"
#include "../core/random.hpp"
#include "../core/tensor.hpp"

namespace moet::cpu_impl {

template <class T>
class RoutedLinear {
 public:
  /// weight: (d_in, d_out); bias: (1, d_out) or none; router: the router kernel's initial
  /// values (d_in, experts), drawn by common::router_init.
  RoutedLinear(const std::string& layer, In<T> weight, std::optional<In<T>> bias, Index experts, Index extra,
               Index below, const Matrix<double>& router)
      : d_in_(checked(layer, "d_in (rows of W0)", weight.rows())),
        d_out_(checked(layer, "d_out (columns of W0)", weight.cols())),
        experts_(experts),
        extra_(extra),
        below_(below),
        cols_(d_out_ + experts + extra),
        weights_(static_cast<std::size_t>((d_in_ + below) * cols_), T(0)),
        grads_(static_cast<std::size_t>(d_in_ * (experts + extra))),
        base_weight("base_weight", column_block(weights_.data(), d_in_, cols_, 0, d_out_)),
        base_bias("base_bias", bias ? 1 : 0, bias ? d_out_ : 0),
        router_kernel("router_kernel", column_block(weights_.data(), d_in_, cols_, d_out_, experts),
                      column_block(grads_.data(), d_in_, experts + extra, 0, experts)) {
    if (bias) detail::expect_shape(layer, "bias", bias->rows(), bias->cols(), 1, d_out_, "1 x d_out");
    base_weight.mutable_value() = weight;
    if (bias) base_bias.mutable_value() = *bias;
    detail::expect_shape(layer, "router kernel", router.rows(), router.cols(), d_in_, experts, "d_in x experts");
    router_kernel.value() = router.cast<T>();
  }

  RoutedLinear(RoutedLinear&&) noexcept = default;

  Index d_in() const { return d_in_; }
  Index d_out() const { return d_out_; }
  bool has_bias() const { return base_bias.size() > 0; }

  /// The first `cols` columns of the fused weights (the d_in rows that multiply x).
  ConstMatrixView<T> weights(Index cols) const { return column_block<T>(weights_.data(), d_in_, cols_, 0, cols); }
  /// [W0; lower]: (d_in + below, d_out).
  ConstMatrixView<T> stacked() const { return column_block<T>(weights_.data(), d_in_ + below_, cols_, 0, d_out_); }
  /// The trainable rows under W0: (below, d_out).
  MatrixView<T> lower() { return column_block(weights_.data() + d_in_ * cols_, below_, cols_, 0, d_out_); }
  /// The columns right of W0 in the x rows: [W_r | extra] (d_in, E + extra).
  ConstMatrixView<T> right() const { return column_block<T>(weights_.data(), d_in_, cols_, d_out_, experts_ + extra_); }
  MatrixView<T> extra_value() { return column_block(weights_.data(), d_in_, cols_, d_out_ + experts_, extra_); }
  MatrixView<T> extra_grad() { return column_block(router_kernel.grad().data(), d_in_, experts_ + extra_, experts_, extra_); }
  /// Gradients of [W_r | extra] (d_in, E + extra): from the router kernel's gradient view, which
  /// starts the buffer (wherever a gradient arena has moved it).
  MatrixView<T> trainable_grad() { return column_block(router_kernel.grad().data(), d_in_, experts_ + extra_, 0, experts_ + extra_); }

  /// z = x * weights(cols) (+ bias on the first d_out columns). z: (rows, cols), resized.
  void forward(In<T> x, Index cols, Matrix<T>& z) const {
    z.resize(x.rows(), cols);
    z.noalias() = x * weights(cols);
    if (has_bias()) z.leftCols(d_out_).rowwise() += base_bias.value().row(0);
  }

  /// dx = dz * weights(dz.cols())^T.
  Matrix<T> input_grad(In<T> dz) const { return dz * weights(dz.cols()).transpose(); }

  // Declared after the buffers they view.
 private:
  static Index checked(const std::string& layer, const char* what, Index value) {
    detail::expect_positive(layer, what, value);
    return value;
  }
  Index d_in_, d_out_, experts_, extra_, below_, cols_;
  AlignedVector<T> weights_;  // (d_in + below_, cols_)

 public:
  BOOST_HANA_DEFINE_STRUCT(RoutedLinear,
                           (GradStorage<T>, grads_),  // (d_in, experts + extra): gradients of [W_r | extra]
                           (Frozen<T>, base_weight), (Frozen<T>, base_bias), (Param<T>, router_kernel));
};

/// Tokens grouped by the expert that selected them (top-k): slot s in [offsets[e], offsets[e+1])
/// holds token tokens[s] for expert e; slot_of[t * K + j] is the slot of token t's j-th choice.
struct TokenGroups {
  std::vector<Index> offsets;  // (E + 1)
  std::vector<Index> tokens;   // (rows * K)
  std::vector<Index> slot_of;  // (rows * K)

  Index count(Index e) const { return offsets[e + 1] - offsets[e]; }

  template <class IndexMatrix>
  static TokenGroups of(const IndexMatrix& selected, Index experts) {
    const Index rows = selected.rows(), k = selected.cols();
    TokenGroups g;
    g.offsets.assign(static_cast<std::size_t>(experts + 1), 0);
    for (Index t = 0; t < rows; ++t)
      for (Index j = 0; j < k; ++j) ++g.offsets[selected(t, j) + 1];
    for (Index e = 0; e < experts; ++e) g.offsets[e + 1] += g.offsets[e];
    std::vector<Index> fill(g.offsets.begin(), g.offsets.end() - 1);
    g.tokens.resize(static_cast<std::size_t>(rows * k));
    g.slot_of.resize(static_cast<std::size_t>(rows * k));
    for (Index t = 0; t < rows; ++t)
      for (Index j = 0; j < k; ++j) {
        const Index slot = fill[selected(t, j)]++;
        g.tokens[slot] = t;
        g.slot_of[t * k + j] = slot;
      }
    return g;
  }

  /// Rows of `src` for expert e's tokens, in slot order: (count(e), src.cols()).
  template <class T>
  Matrix<T> gather(In<T> src, Index e) const {
    Matrix<T> out(count(e), src.cols());
    for (Index i = 0; i < count(e); ++i) out.row(i) = src.row(tokens[offsets[e] + i]);
    return out;
  }
};

}  // namespace moet::cpu_impl
