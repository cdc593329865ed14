// A router on its own on the GPU: gates = route(x W_r). The logits come from one cuBLASLt GEMM
// with a float32 output (whatever T is), then one routing kernel; the output gates and the
// gradient it takes back are float32 (tokens, E).
#pragma once

#include <string>

#include <boost/hana/define_struct.hpp>

#include "../core/random.hpp"
#include "../core/tensor.hpp"
#include "../common/mixture_init.hpp"
#include "../router.hpp"
#include "context.hpp"
#include "kernels.hpp"
#include "matmul.hpp"
#include "param.hpp"
#include "routing.hpp"

namespace moet::cuda_impl {

template <class Policy, class T>
class RouterLayer {
 public:
  using Scalar = T;
  using OutputScalar = float;

  struct Context : RoutedContext {
    DeviceView<const float> output() const { return routing.gates.view(); }  // (tokens, E)
  };

  static std::string name() { return Router<Policy>::name(); }

  /// W_r ~ normal(0, init_stddev), drawn on the host from `rng` as the CPU layer draws it.
  RouterLayer(CudaContext& ctx, Index d_in, Index experts, Rng& rng, const RouterOptions& options = {})
      : ctx_(&ctx),
        options_(validated(d_in, experts, options)),
        value_(d_in, experts, ctx.stream()),
        grad_(DeviceMatrix<float>::zeros(d_in, experts, ctx.stream())),
        router_kernel("router_kernel", value_.view(), grad_.view()) {
    const Matrix<double> w = common::router_init(d_in, experts, options, rng);
    upload(value_.view(), w.data(), w.cols(), ctx.stream());
  }

  RouterLayer(RouterLayer&&) noexcept = default;

  Index d_in() const { return router_kernel.rows(); }
  Index experts() const { return router_kernel.cols(); }

  Context forward(DeviceView<const T> x) const {
    detail::expect_cols(name(), "input x", x.rows, x.cols, d_in(), "tokens x d_in");
    Context c;
    c.routing = DeviceRouting::start<Policy>(x.rows, int(experts()), options_, ctx_->stream());
    DeviceMatrix<float> logits(x.rows, experts(), ctx_->stream());
    gemm<T, float>(*ctx_, Op::N, x, Op::N, DeviceView<const T>(router_kernel.value()), logits.view(), 1.f, 0.f);
    route_forward<float>(logits.data(), logits.ld(), c.routing.state(), ctx_->stream());
    return c;
  }

  /// d_gates: (tokens, E) float. Returns dx.
  DeviceMatrix<T> backward(const Context& c, DeviceView<const T> x, DeviceView<const float> d_gates, GradMode mode) {
    detail::expect_shape(name(), "input x", x.rows, x.cols, c.routing.rows, d_in(), "the x given to forward");
    detail::expect_shape(name(), "gate gradient", d_gates.rows, d_gates.cols, c.routing.rows, experts(), "tokens x E");
    DeviceMatrix<T> d_logits(x.rows, experts(), ctx_->stream());
    route_backward<T>(d_gates.data, d_gates.ld, c.routing.state(), d_logits.data(), d_logits.ld(), ctx_->stream());
    gemm<T, float>(*ctx_, Op::T, x, Op::N, DeviceView<const T>(d_logits.view()), router_kernel.grad(), 1.f,
                   mode == GradMode::accumulate ? 1.f : 0.f);
    DeviceMatrix<T> dx(x.rows, d_in(), ctx_->stream());
    gemm<T, T>(*ctx_, Op::N, DeviceView<const T>(d_logits.view()), Op::T, DeviceView<const T>(router_kernel.value()), dx.view(), 1.f, 0.f);
    return dx;
  }

 private:
  static const RouterOptions& validated(Index d_in, Index experts, const RouterOptions& options) {
    detail::check_router_shape<Policy>(name(), d_in, experts);
    if (experts > max_experts)
      throw value_error(detail::concat(name(), ": the CUDA backend routes at most ", max_experts, " experts, got ", experts));
    static_assert(Policy::k <= max_top_k, "the CUDA backend's top-k routing keeps at most 8 experts per token");
    options.validate(name());
    return options;
  }

  CudaContext* ctx_;
  RouterOptions options_;
  DeviceMatrix<T> value_;
  DeviceMatrix<float> grad_;

 public:
  BOOST_HANA_DEFINE_STRUCT(RouterLayer, (DeviceParam<T>, router_kernel));  // W_r (d_in, E)
};

}  // namespace moet::cuda_impl
