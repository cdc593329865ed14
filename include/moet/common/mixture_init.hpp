// The backend-free parts of the mixture layers, shared by the CPU and CUDA layers so that they
// cannot drift apart: the host-side initial values (drawn from the Rng in one fixed order, so a
// seed gives the same layer on every backend), the shape of an IA3 mixture and its checks, with
// their messages. The aux-loss formula is router.hpp's aux_losses().
#pragma once

#include <string>
#include <utility>

#include "../core/error.hpp"
#include "../core/random.hpp"
#include "../core/tensor.hpp"
#include "../expert.hpp"
#include "../mixture.hpp"

namespace moet::common {

/// A router kernel W_r (d_in, E) ~ normal(0, init_stddev).
inline Matrix<double> router_init(Index d_in, Index experts, const RouterOptions& options, Rng& rng) {
  Matrix<double> w(d_in, experts);
  rng.fill_normal(w, 0.0, options.init_stddev);
  return w;
}

/// A LoRA mixture's trainable initial values, drawn in this order: the router kernel (d_in, E),
/// then the E "A" matrices side by side (d_in, E R) as LoRA<R>::Options say. B starts at zero.
template <int R>
struct LoraInit {
  Matrix<double> router, down;

  LoraInit(Index d_in, Index experts, const MixtureOptions<LoRA<R>>& options, Rng& rng)
      : router(router_init(d_in, experts, options.router, rng)), down(d_in, experts * R) {
    LoRA<R>::init_down(down, options.expert, rng);
  }
};

/// The checks every backend's additive mixture makes on its options and frozen weight.
template <class S>
void check_additive_mixture(const std::string& layer, const MixtureOptions<S>& options, Index d_in, Index d_out) {
  if constexpr (requires { options.expert.validate(layer); }) options.expert.validate(layer);
  options.router.validate(layer);
  detail::expect_positive(layer, "d_in (rows of W0)", d_in);
  detail::expect_positive(layer, "d_out (columns of W0)", d_out);
}

/// An IA3 mixture's shape: `heads` routing groups of head_dim columns (keys and values route per
/// head), or one group over the whole width routed on the caller's input (router_width > 0).
/// Checks and messages are the same on every backend.
struct Ia3Shape {
  std::string layer;
  Index heads = 1, head_dim = 0, router_in = 0;
  bool external = false;  ///< routed on a separate input of router_in columns

  Ia3Shape() = default;
  Ia3Shape(std::string name, Index width, const MixtureOptions<IA3>& options) : layer(std::move(name)) {
    options.expert.validate(layer, width);
    options.router.validate(layer);
    heads = options.expert.heads;
    head_dim = width / heads;
    external = options.expert.router_width > 0;
    router_in = external ? options.expert.router_width : head_dim;
  }

  Index width() const { return heads * head_dim; }
  /// Routing rows per token: one per head when self-routed, one when routed on a separate input.
  Index groups() const { return external ? 1 : heads; }

  /// forward(h): the mixture must route on h itself.
  void check_self_routed(Index rows, Index cols) const {
    if (external)
      throw value_error(detail::concat(layer, ": this mixture routes on a separate input of width ", router_in,
                                       "; call forward(h, router_input)"));
    check_h(rows, cols);
  }
  /// forward(h, r): the mixture must route on r.
  void check_routed_on(Index rows, Index cols, Index r_rows, Index r_cols) const {
    if (!external)
      throw value_error(detail::concat(layer, ": this mixture routes on h itself (Options::expert.router_width = 0); "
                                              "call forward(h)"));
    check_h(rows, cols);
    detail::expect_shape(layer, "router input r", r_rows, r_cols, rows, router_in, "tokens x router_width");
  }
  void check_h(Index rows, Index cols) const {
    detail::expect_cols(layer, "input h", rows, cols, width(), "tokens x heads*head_dim");
  }
  /// backward: the context's kind, h and dy as forward saw them.
  void check_backward(bool context_external, bool called_external, Index tokens, Index h_rows, Index h_cols, Index dy_rows,
                      Index dy_cols) const {
    if (context_external && !called_external)
      throw value_error(detail::concat(layer, ": the context comes from forward(h, r); call backward(c, h, r, dy, mode)"));
    if (!context_external && called_external)
      throw value_error(detail::concat(layer, ": the context comes from forward(h); call backward(c, h, dy, mode)"));
    detail::expect_shape(layer, "input h", h_rows, h_cols, tokens, width(), "the h given to forward");
    detail::expect_shape(layer, "output gradient dy", dy_rows, dy_cols, tokens, width(), "tokens x width");
  }
  void check_backward_router_input(Index tokens, Index r_rows, Index r_cols) const {
    detail::expect_shape(layer, "router input r", r_rows, r_cols, tokens, router_in, "the r given to forward");
  }
};

/// An IA3 mixture's initial values, drawn in this order: the router kernel (router_in, E), then
/// the noise added to the experts' vectors of ones (heads E, head_dim), when init_stddev > 0
/// (else `noise` is empty and the mixture starts as the identity).
struct Ia3Init {
  Matrix<double> router, noise;

  Ia3Init(const Ia3Shape& shape, Index experts, const MixtureOptions<IA3>& options, Rng& rng)
      : router(router_init(shape.router_in, experts, options.router, rng)) {
    if (options.expert.init_stddev > 0) {
      noise.resize(shape.heads * experts, shape.head_dim);
      for (Index i = 0; i < noise.size(); ++i) noise.data()[i] = rng.normal(0.0, options.expert.init_stddev);
    }
  }
};

}  // namespace moet::common
