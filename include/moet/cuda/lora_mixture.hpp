// Mixture of LoRA experts on the GPU (MoLoRA), fused as on the CPU, with four GEMMs and one row
// kernel each way. The weights sit in one row-major device buffer, padded to a multiple of 8
// columns so that every block starts 16-byte aligned when d_out is a multiple of 8:
//
//   weights (d_in + E*R, d_out + C) = [ W0 (frozen) | A_1 .. A_E | W_r | 0 ]     C = E*R + E + pad
//                                     [ B_1; ..; B_E |     0     |  0  | 0 ]
//
//   forward   z = x [W0 | A | W_r | 0] + [b | 0]     one GEMM (bias epilogue): [y0 | U | logits]
//             route + V_e = g_e (alpha/R) U_e        one kernel, a warp per token
//             y = y0 + V B                           one GEMM, beta = 1 into z's first d_out columns
//   backward  [dx0 | dV] = dy [W0; B]^T              one GEMM (B stacked under W0)
//             dU, dg, router backward -> d_right = [dU | d_logits | 0]   one kernel, a warp per token
//             dB = V^T dy                            one GEMM, float32 gradient, beta by GradMode
//             [dA | dW_r | 0] = x^T d_right          one GEMM, float32 gradient, beta by GradMode
//             dx = dx0 + d_right [A | W_r | 0]^T     one GEMM, beta = 1
// The output y is a column block of z and dx one of [dx0 | dV] (row stride wider than d_out /
// d_in): no copies. Top-k mixtures run the dense path (unselected gates are 0); the grouped
// path (tokens gathered per expert) is not written for CUDA yet and is refused by name.
#pragma once

#include <memory>
#include <string>

#include <boost/hana/define_struct.hpp>

#include "../core/random.hpp"
#include "../core/tensor.hpp"
#include "../mixture.hpp"
#include "context.hpp"
#include "kernels.hpp"
#include "matmul.hpp"
#include "param.hpp"
#include "routing.hpp"

namespace moet::cuda_impl {

template <class Policy, int R, int E, class T>
class LoraMixture {
  using Spec = Mixture<Router<Policy>, Expert<LoRA<R>>, E>;
  static constexpr int K = Policy::k;
  static constexpr Index ER = Index(E) * R;
  static constexpr Index right_cols = (ER + E + 7) / 8 * 8;  // [A | W_r | pad]
  static constexpr int pad = int(right_cols - ER - E);

 public:
  using Options = MixtureOptions<LoRA<R>>;
  using Scalar = T;
  using OutputScalar = T;

  struct Context : RoutedContext {
    Index tokens = 0, d_out = 0;
    DeviceMatrix<T> z;      // (tokens, d_out + C) = [y | U | logits | pad]
    DeviceMatrix<T> mixed;  // V (tokens, E*R)
    /// The layer output y: (tokens, d_out), a column block of z.
    DeviceView<const T> output() const { return z.view().col_block(0, d_out); }
  };

  static std::string name() { return Spec::name(); }

  /// weight: the host (d_in, d_out) W0, converted to T. Router kernel and A are drawn from `rng`
  /// in the CPU layer's order, so the same seed gives the same initial values.
  template <class Derived>
  LoraMixture(CudaContext& ctx, const Eigen::MatrixBase<Derived>& weight, Rng& rng, const Options& options = {})
      : LoraMixture(ctx, Matrix<double>(weight.template cast<double>()), nullptr, rng, options) {}
  /// bias: the host (1, d_out) b.
  template <class Derived, class DerivedBias>
  LoraMixture(CudaContext& ctx, const Eigen::MatrixBase<Derived>& weight, const Eigen::MatrixBase<DerivedBias>& bias, Rng& rng,
              const Options& options = {})
      : LoraMixture(ctx, Matrix<double>(weight.template cast<double>()),
                    std::make_unique<Matrix<double>>(bias.template cast<double>()), rng, options) {}

  LoraMixture(LoraMixture&&) noexcept = default;

  Index d_in() const { return d_in_; }
  Index d_out() const { return d_out_; }
  float scale() const { return scale_; }
  const Options& options() const { return options_; }
  /// Always false on CUDA for now: top-k mixtures compute every expert (see the header comment).
  bool uses_grouped() const { return false; }

  Context forward(DeviceView<const T> x) const {
    detail::expect_cols(name(), "input x", x.rows, x.cols, d_in(), "tokens x d_in");
    const Index N = x.rows, D = d_out_;
    cudaStream_t stream = ctx_->stream();
    Context c;
    c.tokens = N;
    c.d_out = D;
    c.z = DeviceMatrix<T>(N, cols_, stream);
    gemm<T, T>(*ctx_, Op::N, x, Op::N, top(), c.z.view(), 1.f, 0.f, has_bias_ ? bias_.data() : nullptr);
    c.routing = DeviceRouting::start<Policy>(N, E, options_.router, stream);
    c.mixed = DeviceMatrix<T>(N, ER, stream);
    lora_route_scale<T>(c.z.data(), c.z.ld(), D + ER, D, R, scale_, c.mixed.data(), c.mixed.ld(), c.routing.state(), stream);
    gemm<T, T>(*ctx_, Op::N, DeviceView<const T>(c.mixed.view()), Op::N, lower(), c.z.view().col_block(0, D), 1.f, 1.f);
    return c;
  }

  /// dy: (tokens, d_out). Returns dx (tokens, d_in), whose row stride is d_in + E*R.
  DeviceMatrix<T> backward(const Context& c, DeviceView<const T> x, DeviceView<const T> dy, GradMode mode) {
    detail::expect_shape(name(), "input x", x.rows, x.cols, c.tokens, d_in(), "the x given to forward");
    detail::expect_shape(name(), "output gradient dy", dy.rows, dy.cols, c.tokens, d_out(), "tokens x d_out");
    const Index N = c.tokens, D = d_out_, I = d_in_;
    const float beta = mode == GradMode::accumulate ? 1.f : 0.f;
    cudaStream_t stream = ctx_->stream();
    DeviceMatrix<T> dx_dv(N, I + ER, stream);  // [dx0 | dV]
    gemm<T, T>(*ctx_, Op::N, dy, Op::T, stacked(), dx_dv.view(), 1.f, 0.f);
    DeviceMatrix<T> d_right(N, right_cols, stream);  // [dU | d_logits | 0]
    lora_backward_rows<T>(dx_dv.data() + I, dx_dv.ld(), c.z.data() + D, c.z.ld(), R, scale_, c.routing.state(), d_right.data(),
                          d_right.ld(), pad, stream);
    const DeviceView<const T> dr = d_right.view();
    gemm<T, float>(*ctx_, Op::T, DeviceView<const T>(c.mixed.view()), Op::N, dy, up_grad_.view(), 1.f, beta);
    gemm<T, float>(*ctx_, Op::T, x, Op::N, dr, right_grad_.view(), 1.f, beta);
    gemm<T, T>(*ctx_, Op::N, dr, Op::T, right(), dx_dv.view().col_block(0, I), 1.f, 1.f);
    return std::move(dx_dv).keep_cols(I);
  }

 private:
  LoraMixture(CudaContext& ctx, const Matrix<double>& w, std::unique_ptr<Matrix<double>> b, Rng& rng, const Options& options)
      : ctx_(&ctx),
        options_(validated(options, w)),
        scale_(float(options.expert.alpha / R)),
        d_in_(w.rows()),
        d_out_(w.cols()),
        cols_(w.cols() + right_cols),
        has_bias_(b != nullptr),
        weights_(DeviceMatrix<T>::zeros(w.rows() + ER, w.cols() + right_cols, ctx.stream())),
        bias_(DeviceMatrix<T>::zeros(1, w.cols() + right_cols, ctx.stream())),
        right_grad_(DeviceMatrix<float>::zeros(w.rows(), right_cols, ctx.stream())),
        up_grad_(DeviceMatrix<float>::zeros(ER, w.cols(), ctx.stream())),
        base_weight("base_weight", weights_.view().row_block(0, d_in_).col_block(0, d_out_)),
        base_bias("base_bias", bias_.view().row_block(0, has_bias_ ? 1 : 0).col_block(0, has_bias_ ? d_out_ : 0)),
        router_kernel("router_kernel", weights_.view().row_block(0, d_in_).col_block(d_out_ + ER, E),
                      right_grad_.view().col_block(ER, E)),
        lora_down("lora_down", weights_.view().row_block(0, d_in_).col_block(d_out_, ER), right_grad_.view().col_block(0, ER)),
        lora_up("lora_up", weights_.view().row_block(d_in_, ER).col_block(0, d_out_), up_grad_.view()) {
    if (b) detail::expect_shape(name(), "bias", b->rows(), b->cols(), 1, d_out_, "1 x d_out");
    cudaStream_t stream = ctx.stream();
    upload(base_weight.mutable_value(), w.data(), w.cols(), stream);
    if (b) upload(base_bias.mutable_value(), b->data(), b->cols(), stream);
    Matrix<double> router(d_in_, E), down(d_in_, ER);  // drawn in the CPU layer's order
    rng.fill_normal(router, 0.0, options.router.init_stddev);
    LoRA<R>::init_down(down, options.expert, rng);
    upload(router_kernel.value(), router.data(), router.cols(), stream);
    upload(lora_down.value(), down.data(), down.cols(), stream);
  }

  static const Options& validated(const Options& options, const Matrix<double>& w) {
    check_routing_limits<E, Policy>();
    options.expert.validate(name());
    options.router.validate(name());
    detail::expect_positive(name(), "d_in (rows of W0)", w.rows());
    detail::expect_positive(name(), "d_out (columns of W0)", w.cols());
    if (K > 0 && options.dispatch == Dispatch::grouped)
      throw value_error(name() + ": Dispatch::grouped is not implemented on the CUDA backend yet; use Dispatch::dense or "
                                 "Dispatch::automatic (which is dense on CUDA)");
    return options;
  }

  /// [W0 | A | W_r | 0]: the d_in rows that multiply x, (d_in, d_out + C).
  DeviceView<const T> top() const { return weights_.view().row_block(0, d_in_); }
  /// [W0; B]: (d_in + E*R, d_out).
  DeviceView<const T> stacked() const { return weights_.view().col_block(0, d_out_); }
  /// B: (E*R, d_out).
  DeviceView<const T> lower() const { return weights_.view().row_block(d_in_, ER).col_block(0, d_out_); }
  /// [A | W_r | 0]: (d_in, C).
  DeviceView<const T> right() const { return weights_.view().row_block(0, d_in_).col_block(d_out_, right_cols); }

  CudaContext* ctx_;
  Options options_;
  float scale_;
  Index d_in_, d_out_, cols_;
  bool has_bias_;
  DeviceMatrix<T> weights_;         // (d_in + E*R, d_out + C)
  DeviceMatrix<T> bias_;            // (1, d_out + C): [b | 0]
  DeviceMatrix<float> right_grad_;  // (d_in, C): [dA | dW_r | 0]
  DeviceMatrix<float> up_grad_;     // (E*R, d_out)

 public:
  BOOST_HANA_DEFINE_STRUCT(LoraMixture,
                           (DeviceFrozen<T>, base_weight),  // W0 (d_in, d_out)
                           (DeviceFrozen<T>, base_bias),    // b (1, d_out) or empty
                           (DeviceParam<T>, router_kernel), // W_r (d_in, E)
                           (DeviceParam<T>, lora_down),     // A (d_in, E*R): expert e is columns [e R, (e+1) R)
                           (DeviceParam<T>, lora_up));      // B (E*R, d_out): expert e is rows [e R, (e+1) R)
};

}  // namespace moet::cuda_impl
