// Mixture of (IA)^3 vectors on the CPU (MoV):  y = h * s,  s = sum_e g_e(r) l_e.
//
// h is (tokens, heads * head_dim). With heads > 1 (keys and values) every head is routed on its
// own slice: the router kernel (head_dim, E) is shared across heads and the experts are
// (heads, E, head_dim), stored as a (heads * E, head_dim) matrix. The router input r is h
// itself by default; with Options::router_width > 0 it is a separate (tokens, router_width)
// tensor of the caller's, and each token's gates then apply to all heads.
//
// MoV is bandwidth-bound, so forward and backward are each one pass over the token rows:
// logits, routing, the merged vector and the scaling happen while a row is in cache, and the
// parameter gradients are accumulated per thread. Backward recomputes s instead of storing it.
//   ds = dy * h                 dg_e = <ds, l_e>          dl_e += g_e ds
//   dh = dy * s (+ d_logits W_r^T when r = h)             dW_r += r^T d_logits
#pragma once

#include <string>
#include <utility>

#include "../core/visit.hpp"
#include "../mixture.hpp"
#include "routing.hpp"

namespace moet::cpu_impl {

template <class Policy, int E, class T>
class Ia3Mixture {
  static_assert(std::is_floating_point_v<T>, "moet layers take float or double");
  using Spec = Mixture<Router<Policy>, Expert<IA3>, E>;
  using Math = RouterMath<Policy, T>;
  /// Soft and renormalised top-k gates sum to one, so s = 1 + sum_e g_e (l_e - 1) is the same
  /// merged vector, and it is exactly ones at init even when the float softmax sums to 1 +- ulp.
  static constexpr bool gates_sum_to_one = Policy::k == 0 || Policy::renorm == Renorm::on;

 public:
  using Options = MixtureOptions<IA3>;
  using Scalar = T;

  struct Context {
    Index tokens = 0;
    bool external_router_input = false;
    Matrix<T> y;  // (tokens, width)
    Routing<T> routing;  // rows: tokens * heads (self-routed) or tokens (external router input)

    const Matrix<T>& output() const { return y; }
    double aux_loss() const { return routing.aux_loss(); }
    const AuxLosses& aux() const { return routing.aux; }
    const std::vector<double>& expert_usage() const { return routing.usage; }
  };

  static std::string name() { return Spec::name(); }

  /// width = heads * head_dim of the activation this mixture scales.
  Ia3Mixture(Index width, Rng& rng, const Options& options = {})
      : options_(validated(width, options)),
        heads_(options.expert.heads),
        head_dim_(width / options.expert.heads),
        router_in_(options.expert.router_width > 0 ? options.expert.router_width : head_dim_),
        router_kernel("router_kernel", router_in_, E),
        scales("ia3_scales", heads_ * E, head_dim_) {
    rng.fill_normal(router_kernel.value(), 0.0, options.router.init_stddev);
    scales.value().setOnes();
    if (options.expert.init_stddev > 0)
      for (Index i = 0; i < scales.size(); ++i)
        scales.value().data()[i] += T(rng.normal(0.0, options.expert.init_stddev));
  }

  Ia3Mixture(Ia3Mixture&&) noexcept = default;

  Index width() const { return heads_ * head_dim_; }
  Index heads() const { return heads_; }
  Index head_dim() const { return head_dim_; }
  const Options& options() const { return options_; }

  /// Self-routed: h (tokens, width) is also the router input.
  Context forward(In<T> h) const {
    if (external())
      throw value_error(detail::concat(name(), ": this mixture routes on a separate input of width ", router_in_,
                                       "; call forward(h, router_input)"));
    check_h(h);
    return forward_impl(h, h, false);
  }

  /// Routed on the caller's r (tokens, router_width).
  Context forward(In<T> h, In<T> router_input) const {
    if (!external())
      throw value_error(detail::concat(name(), ": this mixture routes on h itself (Options::expert.router_width = 0); "
                                              "call forward(h)"));
    check_h(h);
    detail::expect_shape(name(), "router input r", router_input.rows(), router_input.cols(), h.rows(), router_in_,
                         "tokens x router_width");
    return forward_impl(h, router_input, true);
  }

  /// Self-routed backward: returns dh.
  Matrix<T> backward(const Context& c, In<T> h, In<T> dy, GradMode mode) {
    if (c.external_router_input)
      throw value_error(detail::concat(name(), ": the context comes from forward(h, r); call backward(c, h, r, dy, mode)"));
    check_backward(c, h, dy);
    Matrix<T> dh(c.tokens, width());
    backward_impl(c, h, h, dy, mode, dh, dh);
    return dh;
  }

  /// Backward for forward(h, r): returns {dh, dr}.
  std::pair<Matrix<T>, Matrix<T>> backward(const Context& c, In<T> h, In<T> router_input, In<T> dy, GradMode mode) {
    if (!c.external_router_input)
      throw value_error(detail::concat(name(), ": the context comes from forward(h); call backward(c, h, dy, mode)"));
    check_backward(c, h, dy);
    detail::expect_shape(name(), "router input r", router_input.rows(), router_input.cols(), c.tokens, router_in_,
                         "the r given to forward");
    std::pair<Matrix<T>, Matrix<T>> grads{Matrix<T>(c.tokens, width()), Matrix<T>::Zero(c.tokens, router_in_)};
    backward_impl(c, h, router_input, dy, mode, grads.first, grads.second);
    return grads;
  }

 private:
  static const Options& validated(Index width, const Options& options) {
    detail::expect_positive(name(), "width", width);
    detail::expect_positive(name(), "heads", options.expert.heads);
    if (width % options.expert.heads != 0)
      throw value_error(detail::concat(name(), ": width ", width, " is not a multiple of heads ", options.expert.heads));
    if (options.expert.router_width < 0)
      throw value_error(detail::concat(name(), ": router_width must be >= 0, got ", options.expert.router_width));
    if (!(options.expert.init_stddev >= 0.0))
      throw value_error(detail::concat(name(), ": init_stddev must be finite and >= 0, got ", options.expert.init_stddev));
    options.router.validate(name());
    return options;
  }

  bool external() const { return options_.expert.router_width > 0; }
  Index groups() const { return external() ? 1 : heads_; }  // routing rows per token

  void check_h(In<T> h) const { detail::expect_cols(name(), "input h", h.rows(), h.cols(), width(), "tokens x heads*head_dim"); }
  void check_backward(const Context& c, In<T> h, In<T> dy) const {
    detail::expect_shape(name(), "input h", h.rows(), h.cols(), c.tokens, width(), "the h given to forward");
    detail::expect_shape(name(), "output gradient dy", dy.rows(), dy.cols(), c.tokens, width(), "tokens x width");
  }

  /// The router input of routing row `j` of token t.
  auto router_row(In<T> r, bool ext, Index t, Index j) const {
    return r.row(t).segment(ext ? 0 : j * head_dim_, router_in_);
  }

  Context forward_impl(In<T> h, In<T> r, bool ext) const {
    Context c;
    const Index N = h.rows(), G = groups();
    c.tokens = N;
    c.external_router_input = ext;
    c.y.resize(N, width());
    c.routing = Math::start(N * G, E, options_.router);
    const Matrix<T> mix = mixing_vectors();
    MOET_OMP(omp parallel)
    {
      RowVector<T> logits(E), merged(head_dim_);
      MOET_OMP(omp for schedule(static))
      for (Index t = 0; t < N; ++t) {
        for (Index j = 0; j < G; ++j) {
          logits.noalias() = router_row(r, ext, t, j) * router_kernel.value();
          Math::route_row(c.routing, t * G + j, logits.data());
        }
        for (Index hd = 0; hd < heads_; ++hd) {
          merge(c.routing.gates.row(t * G + (ext ? 0 : hd)), mix.middleRows(hd * E, E), merged);
          c.y.row(t).segment(hd * head_dim_, head_dim_) = h.row(t).segment(hd * head_dim_, head_dim_).cwiseProduct(merged);
        }
      }
    }
    Math::finish(c.routing);
    return c;
  }

  /// The vectors the gates mix: l, or l - 1 when the gates sum to one (see gates_sum_to_one).
  Matrix<T> mixing_vectors() const {
    if constexpr (gates_sum_to_one) return scales.value().array() - T(1);
    else return scales.value();
  }

  template <class Gates, class Vectors>
  static void merge(const Gates& gates, const Vectors& vectors, RowVector<T>& merged) {
    merged.noalias() = gates * vectors;
    if constexpr (gates_sum_to_one) merged.array() += T(1);
  }

  /// dh is written; dr is accumulated into (it is dh itself when self-routed).
  void backward_impl(const Context& c, In<T> h, In<T> r, In<T> dy, GradMode mode, Matrix<T>& dh, Matrix<T>& dr) {
    if (mode == GradMode::overwrite) zero_grad(*this);
    const Index N = c.tokens, G = groups();
    const bool ext = c.external_router_input;
    const Matrix<T> mix = mixing_vectors();
    MOET_OMP(omp parallel)
    {
      Matrix<T> d_scales = Matrix<T>::Zero(heads_ * E, head_dim_);  // per-thread accumulators
      Matrix<T> d_kernel = Matrix<T>::Zero(router_in_, E);
      Matrix<T> d_gates(G, E), d_logits(G, E);
      RowVector<T> ds(head_dim_), merged(head_dim_);
      MOET_OMP(omp for schedule(static))
      for (Index t = 0; t < N; ++t) {
        d_gates.setZero();
        for (Index hd = 0; hd < heads_; ++hd) {
          const Index j = ext ? 0 : hd;
          const auto gates = c.routing.gates.row(t * G + j);
          const auto l = scales.value().middleRows(hd * E, E);  // (E, head_dim)
          const auto dy_h = dy.row(t).segment(hd * head_dim_, head_dim_);
          ds = dy_h.cwiseProduct(h.row(t).segment(hd * head_dim_, head_dim_));
          d_gates.row(j).noalias() += ds * l.transpose();
          for (Index e = 0; e < E; ++e)
            if (gates(e) != T(0)) d_scales.row(hd * E + e) += gates(e) * ds;
          merge(gates, mix.middleRows(hd * E, E), merged);
          dh.row(t).segment(hd * head_dim_, head_dim_) = dy_h.cwiseProduct(merged);
        }
        for (Index j = 0; j < G; ++j) {
          Math::backward_row(c.routing, t * G + j, d_gates.row(j).data(), d_logits.row(j).data());
          const auto rin = router_row(r, ext, t, j);
          (ext ? dr.row(t).segment(0, router_in_) : dr.row(t).segment(j * head_dim_, router_in_)).noalias() +=
              d_logits.row(j) * router_kernel.value().transpose();
          d_kernel.noalias() += rin.transpose() * d_logits.row(j);
        }
      }
      MOET_OMP(omp critical)
      {
        scales.grad() += d_scales;
        router_kernel.grad() += d_kernel;
      }
    }
  }

  Options options_;
  Index heads_, head_dim_, router_in_;

 public:
  BOOST_HANA_DEFINE_STRUCT(Ia3Mixture,
                           (Param<T>, router_kernel),  // W_r (router_in, E); router_in = head_dim or router_width
                           (Param<T>, scales));        // l (heads * E, head_dim), init ones
};

}  // namespace moet::cpu_impl
