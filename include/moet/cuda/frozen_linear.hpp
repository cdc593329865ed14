// A frozen linear layer on the GPU, y = x W0 + b: one cuBLASLt GEMM with the bias in its
// epilogue; backward returns dx = dy W0^T. The floor the CUDA adapters are measured against.
#pragma once

#include <string>

#include <boost/hana/define_struct.hpp>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "context.hpp"
#include "matmul.hpp"
#include "param.hpp"

namespace moet::cuda_impl {

template <class T>
class FrozenLinear {
 public:
  using Scalar = T;
  using OutputScalar = T;

  struct Context {
    DeviceMatrix<T> y;  // (tokens, d_out)
    DeviceView<const T> output() const { return y.view(); }
    double aux_loss() const { return 0.0; }
  };

  static std::string name() { return "FrozenLinear"; }

  /// weight: the host (d_in, d_out) W0, converted to T (any Eigen expression; Matrix::Zero
  /// is a fill on the device, with no host copy).
  template <class Derived>
  FrozenLinear(CudaContext& ctx, const Eigen::MatrixBase<Derived>& weight) : FrozenLinear(ctx, weight.rows(), weight.cols(), false) {
    upload(weight_.view(), weight, ctx.stream());
  }
  /// bias: the host (1, d_out) b.
  template <class Derived, class DerivedBias>
  FrozenLinear(CudaContext& ctx, const Eigen::MatrixBase<Derived>& weight, const Eigen::MatrixBase<DerivedBias>& bias)
      : FrozenLinear(ctx, weight.rows(), weight.cols(), true) {
    detail::expect_shape(name(), "bias", bias.rows(), bias.cols(), 1, d_out(), "1 x d_out");
    upload(weight_.view(), weight, ctx.stream());
    upload(bias_.view(), bias, ctx.stream());
  }

  FrozenLinear(FrozenLinear&&) noexcept = default;

  Index d_in() const { return weight.rows(); }
  Index d_out() const { return weight.cols(); }

  DeviceFrozen<T>& frozen_weight() { return weight; }
  DeviceFrozen<T>& frozen_bias() { return bias; }

  Context forward(DeviceView<const T> x) const {
    detail::expect_cols(name(), "input x", x.rows, x.cols, d_in(), "tokens x d_in");
    Context c{DeviceMatrix<T>(x.rows, d_out(), ctx_->stream())};
    gemm<T, T>(*ctx_, Op::N, x, Op::N, weight.value(), c.y.view(), 1.f, 0.f, bias.size() ? bias.value().data : nullptr);
    return c;
  }

  DeviceMatrix<T> backward(const Context& c, DeviceView<const T> x, DeviceView<const T> dy, GradMode) const {
    detail::expect_shape(name(), "output gradient dy", dy.rows, dy.cols, c.y.rows(), d_out(), "tokens x d_out");
    DeviceMatrix<T> dx(dy.rows, d_in(), ctx_->stream());
    gemm<T, T>(*ctx_, Op::N, dy, Op::T, weight.value(), dx.view(), 1.f, 0.f);
    return dx;
  }
  /// dx += dy W0^T in the GEMM (beta = 1; an empty dx becomes it): how a block sums the input
  /// gradients of the projections that read one input, with no add kernel.
  void backward_into(DeviceMatrix<T>& dx, const Context& c, DeviceView<const T> x, DeviceView<const T> dy, GradMode mode) const {
    if (dx.size() == 0) {
      dx = backward(c, x, dy, mode);
      return;
    }
    detail::expect_shape(name(), "output gradient dy", dy.rows, dy.cols, c.y.rows(), d_out(), "tokens x d_out");
    detail::expect_shape(name(), "accumulated input gradient", dx.rows(), dx.cols(), dy.rows, d_in(), "tokens x d_in");
    gemm<T, T>(*ctx_, Op::N, dy, Op::T, weight.value(), dx.view(), 1.f, 1.f);
  }

 private:
  /// The storage, not yet written.
  FrozenLinear(CudaContext& ctx, Index d_in, Index d_out, bool has_bias)
      : ctx_(&ctx),
        weight_(validated(d_in, d_out), d_out, ctx.stream()),
        bias_(has_bias ? 1 : 0, has_bias ? d_out : 0, ctx.stream()),
        weight("weight", weight_.view()),
        bias("bias", bias_.view()) {}

  static Index validated(Index d_in, Index d_out) {
    if (d_in <= 0 || d_out <= 0)
      throw value_error(detail::concat(name(), ": weight must be non-empty, got shape ", detail::shape_string(d_in, d_out)));
    return d_in;
  }

  CudaContext* ctx_;
  DeviceMatrix<T> weight_, bias_;

 public:
  BOOST_HANA_DEFINE_STRUCT(FrozenLinear, (DeviceFrozen<T>, weight), (DeviceFrozen<T>, bias));
};

}  // namespace moet::cuda_impl
