// Frozen normalisations of a transformer's residual stream, with backward to their input:
//   LayerNorm (GPT-2):  y = (x - mean) / sqrt(var + eps) * gamma + beta
//   RMSNorm (Llama):    y = x / sqrt(mean(x^2) + eps) * w
// gamma, beta and w are pretrained and frozen. Per row, with xh the normalised x and r = 1/std:
//   LayerNorm  dx = r (g - mean(g) - xh mean(g xh)),  g = dy * gamma
//   RMSNorm    dx = r (g - xh mean(g xh)),            g = dy * w
#pragma once

#include <cmath>
#include <string>
#include <utility>

#include <boost/hana/define_struct.hpp>

#include "../../core/backend.hpp"
#include "../../core/error.hpp"
#include "../../core/param.hpp"
#include "../../core/util.hpp"

namespace moet::cpu_impl {

template <class T, bool Centered>
class Normalization {
 public:
  using Scalar = T;
  struct Context {
    Matrix<T> y;        // (tokens, d)
    Matrix<T> xhat;     // (tokens, d) normalised input
    RowVector<T> rstd;  // (tokens) 1 / std
    const Matrix<T>& output() const { return y; }
    double aux_loss() const { return 0.0; }
  };

  static std::string name() { return Centered ? "LayerNorm" : "RMSNorm"; }

  /// weight (and bias for LayerNorm): (1, d).
  Normalization(In<T> weight, In<T> bias, double eps)
      : eps_(eps), weight("weight", 1, weight.cols()), bias("bias", 1, bias.cols()) {
    static_assert(Centered, "RMSNorm has no bias: use the one-argument constructor");
    init(weight, bias);
  }
  Normalization(In<T> weight, double eps) : eps_(eps), weight("weight", 1, weight.cols()), bias("bias", 0, 0) {
    init(weight, weight.topRows(0));
  }

  /// The device-first form every backend's layers share (the CPU's device is empty).
  template <class... Args>
  explicit Normalization(CpuDevice, Args&&... args) : Normalization(std::forward<Args>(args)...) {}
  Normalization(Normalization&&) noexcept = default;

  Index width() const { return weight.cols(); }

  Context forward(In<T> x) const {
    detail::expect_cols(name(), "input x", x.rows(), x.cols(), width(), "tokens x d");
    Context c;
    const Index N = x.rows(), D = width();
    c.y.resize(N, D);
    c.xhat.resize(N, D);
    c.rstd.resize(N);
    MOET_OMP(omp parallel for schedule(static) if (N * D > 65536))
    for (Index t = 0; t < N; ++t) {
      const auto row = x.row(t);
      const T mean = Centered ? row.mean() : T(0);
      const T var = (row.array() - mean).square().mean();
      const T r = T(1) / std::sqrt(var + T(eps_));
      c.rstd(t) = r;
      c.xhat.row(t) = (row.array() - mean) * r;
      c.y.row(t) = c.xhat.row(t).cwiseProduct(weight.value().row(0));
      if constexpr (Centered) c.y.row(t) += bias.value().row(0);
    }
    return c;
  }

  /// A residual add and the norm after it (the GPU fuses them into one pass): sum = x + r, then
  /// the normalisation of sum, which backward takes as its input.
  Context forward(In<T> x, In<T> r, Matrix<T>& sum) const {
    detail::expect_cols(name(), "input x", x.rows(), x.cols(), width(), "tokens x d");
    detail::expect_shape(name(), "residual r", r.rows(), r.cols(), x.rows(), x.cols(), "the shape of x");
    sum = x + r;
    return forward(sum);
  }

  Matrix<T> backward(const Context& c, In<T> x, In<T> dy, GradMode mode) const { return backward_impl(c, dy, nullptr, mode); }
  /// backward(c, x, dy) + dres: dres is the gradient reaching x around the norm (the residual path).
  Matrix<T> backward(const Context& c, In<T> x, In<T> dy, In<T> dres, GradMode mode) const {
    detail::expect_shape(name(), "residual gradient dres", dres.rows(), dres.cols(), dy.rows(), width(), "tokens x d");
    return backward_impl(c, dy, &dres, mode);
  }

 private:
  Matrix<T> backward_impl(const Context& c, In<T> dy, const In<T>* dres, GradMode) const {
    detail::expect_shape(name(), "output gradient dy", dy.rows(), dy.cols(), c.y.rows(), width(), "tokens x d");
    const Index N = dy.rows();
    Matrix<T> dx(N, width());
    MOET_OMP(omp parallel for schedule(static) if (N * width() > 65536))
    for (Index t = 0; t < N; ++t) {
      const RowVector<T> g = dy.row(t).cwiseProduct(weight.value().row(0));
      const T mean_gx = g.cwiseProduct(c.xhat.row(t)).mean();
      const T mean_g = Centered ? g.mean() : T(0);
      dx.row(t) = c.rstd(t) * (g.array() - mean_g - c.xhat.row(t).array() * mean_gx);
      if (dres) dx.row(t) += dres->row(t);
    }
    return dx;
  }

  void init(In<T> w, In<T> b) {
    detail::expect_positive(name(), "width", w.cols());
    detail::expect_shape(name(), "weight", w.rows(), w.cols(), 1, w.cols(), "1 x d");
    if (!(eps_ > 0) || !std::isfinite(eps_)) throw value_error(detail::concat(name(), ": eps must be positive and finite, got ", eps_));
    weight.mutable_value() = w;
    if constexpr (Centered) {
      detail::expect_shape(name(), "bias", b.rows(), b.cols(), 1, w.cols(), "1 x d");
      bias.mutable_value() = b;
    }
  }

  double eps_;

 public:
  BOOST_HANA_DEFINE_STRUCT(Normalization, (Frozen<T>, weight), (Frozen<T>, bias));
};

template <class T>
using LayerNorm = Normalization<T, true>;
template <class T>
using RMSNorm = Normalization<T, false>;

}  // namespace moet::cpu_impl
