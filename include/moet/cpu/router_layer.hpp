// A router on its own: gates = route(x W_r). Mixtures fuse their router into their input GEMM;
// this layer is for callers who want only the routing weights (and for testing routers alone).
#pragma once

#include <string>
#include <utility>

#include <boost/hana/define_struct.hpp>

#include "../core/backend.hpp"
#include "../core/random.hpp"
#include "../core/visit.hpp"
#include "../common/mixture_init.hpp"
#include "../router.hpp"
#include "routing.hpp"

namespace moet::cpu_impl {

template <class Policy, class T>
class RouterLayer {
  using Math = RouterMath<Policy, T>;

 public:
  using Scalar = T;

  struct Context : RoutedContext<T> {
    const Matrix<T>& output() const { return this->routing.gates; }  // (tokens, E)
  };

  static std::string name() { return Router<Policy>::name(); }

  RouterLayer(Index d_in, Index experts, Rng& rng, const RouterOptions& options = {})
      : options_(validated(d_in, experts, options)), router_kernel("router_kernel", d_in, experts) {
    router_kernel.value() = common::router_init(d_in, experts, options, rng).template cast<T>();
  }

  /// The device-first form every backend's layers share (the CPU's device is empty).
  template <class... Args>
  explicit RouterLayer(CpuDevice, Args&&... args) : RouterLayer(std::forward<Args>(args)...) {}
  RouterLayer(RouterLayer&&) noexcept = default;

  Index d_in() const { return router_kernel.rows(); }
  Index experts() const { return router_kernel.cols(); }

  /// rows: the token rows whose routing counts for the auxiliary losses (empty: all).
  Context forward(In<T> x, RowMask rows = {}) const {
    detail::expect_cols(name(), "input x", x.rows(), x.cols(), d_in(), "tokens x d_in");
    const Matrix<T> logits = x * router_kernel.value();
    Context c;
    c.routing = Math::route(logits, options_, rows);
    return c;
  }

  /// d_gates: (tokens, E). Returns dx.
  Matrix<T> backward(const Context& c, In<T> x, In<T> d_gates, GradMode mode) {
    detail::expect_shape(name(), "input x", x.rows(), x.cols(), c.routing.rows(), d_in(), "the x given to forward");
    detail::expect_shape(name(), "gate gradient", d_gates.rows(), d_gates.cols(), c.routing.rows(), experts(),
                         "tokens x E");
    Matrix<T> d_logits(c.routing.rows(), experts());
    Math::backward(c.routing, d_gates, d_logits);
    detail::assign_grad(router_kernel.grad(), x.transpose() * d_logits, mode);
    return d_logits * router_kernel.value().transpose();
  }

 private:
  static const RouterOptions& validated(Index d_in, Index experts, const RouterOptions& options) {
    detail::check_router_shape<Policy>(name(), d_in, experts);
    options.validate(name());
    return options;
  }

  RouterOptions options_;

 public:
  BOOST_HANA_DEFINE_STRUCT(RouterLayer, (Param<T>, router_kernel));  // W_r (d_in, E)
};

}  // namespace moet::cpu_impl
