// A frozen linear layer y = x W0 + b: the floor every adapter is measured against. W0 and b
// get no gradient; backward returns dx = dy W0^T.
#pragma once

#include <optional>
#include <string>
#include <utility>

#include <boost/hana/define_struct.hpp>

#include "../core/backend.hpp"
#include "../core/error.hpp"
#include "../core/param.hpp"
#include "../core/visit.hpp"

namespace moet::cpu_impl {

template <class T>
class FrozenLinear {
 public:
  using Scalar = T;
  using Context = OutputContext<T>;  // y: (tokens, d_out)

  static std::string name() { return "FrozenLinear"; }

  explicit FrozenLinear(In<T> weight) : weight(make_frozen(name(), "weight", weight)), bias("bias", 0, 0) {}
  FrozenLinear(In<T> w, In<T> b) : weight(make_frozen(name(), "weight", w)), bias(make_frozen(name(), "bias", b)) {
    detail::expect_shape(name(), "bias", b.rows(), b.cols(), 1, w.cols(), "1 x d_out");
  }
  /// The device-first form every backend's layers share (the CPU's device is empty).
  template <class... Args>
  explicit FrozenLinear(CpuDevice, Args&&... args) : FrozenLinear(std::forward<Args>(args)...) {}
  FrozenLinear(FrozenLinear&&) noexcept = default;

  Index d_in() const { return weight.rows(); }
  Index d_out() const { return weight.cols(); }
  /// The frozen W0 and bias (1, d_out; empty without bias), as every additive layer names them.
  Frozen<T>& frozen_weight() { return weight; }
  Frozen<T>& frozen_bias() { return bias; }

  Context forward(In<T> x) const {
    detail::expect_cols(name(), "input x", x.rows(), x.cols(), d_in(), "tokens x d_in");
    Context c;
    c.y.noalias() = x * weight.value();
    if (bias.size()) c.y.rowwise() += bias.value().row(0);
    return c;
  }

  Matrix<T> backward(const Context& c, In<T> x, In<T> dy, GradMode) const {
    detail::expect_shape(name(), "output gradient dy", dy.rows(), dy.cols(), c.y.rows(), d_out(), "tokens x d_out");
    return dy * weight.value().transpose();
  }
  /// dx += dy W0^T in the product itself (an empty dx becomes it): how a block sums the input
  /// gradients of the projections that read one input.
  void backward_into(Matrix<T>& dx, const Context& c, In<T> x, In<T> dy, GradMode mode) const {
    if (dx.size() == 0) {
      dx = backward(c, x, dy, mode);
      return;
    }
    detail::expect_shape(name(), "output gradient dy", dy.rows(), dy.cols(), c.y.rows(), d_out(), "tokens x d_out");
    detail::expect_shape(name(), "accumulated input gradient", dx.rows(), dx.cols(), dy.rows(), d_in(), "tokens x d_in");
    dx.noalias() += dy * weight.value().transpose();
  }

 public:
  BOOST_HANA_DEFINE_STRUCT(FrozenLinear, (Frozen<T>, weight), (Frozen<T>, bias));
};

}  // namespace moet::cpu_impl
