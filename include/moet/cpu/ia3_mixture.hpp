// Mixture of (IA)^3 vectors on the CPU (MoV):  y = h * s,  s = sum_e g_e(r) l_e.
//
// h is (tokens, heads * head_dim). With heads > 1 (keys and values) every head is routed on its
// own slice: the router kernel (head_dim, E) is shared across heads and the experts are
// (heads, E, head_dim), stored as a (heads * E, head_dim) matrix. The router input r is h
// itself by default; with Options::router_width > 0 it is a separate (tokens, router_width)
// tensor of the caller's, and each token's gates then apply to all heads.
//
// MoV is bandwidth-bound, so forward and backward are each one pass over blocks of token rows,
// the blocks split across threads: logits, routing, the merged vector and the scaling are small
// single-threaded GEMMs on a block that stays in the core's L2 cache, and the parameter
// gradients are accumulated per thread, then summed in thread order (so a run repeats to the
// bit with the same thread count). Backward recomputes s instead of storing it.
//   ds = dy * h                 dg_e = <ds, l_e>          dl_e += g_e ds
//   dh = dy * s (+ d_logits W_r^T when r = h)             dW_r += r^T d_logits
#pragma once

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "../core/backend.hpp"
#include "../core/visit.hpp"
#include "../common/mixture_init.hpp"
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
  using spec = Spec;  ///< the Mixture<...> this layer implements
  using Scalar = T;

  /// routing rows: tokens * heads (self-routed) or tokens (external router input).
  struct Context : RoutedContext<T> {
    Index tokens = 0;
    bool external_router_input = false;
    Matrix<T> y;  // (tokens, width)

    const Matrix<T>& output() const { return y; }
  };

  static std::string name() { return Spec::name(); }

  /// width = heads * head_dim of the activation this mixture scales.
  Ia3Mixture(Index width, Rng& rng, const Options& options = {}) : Ia3Mixture(common::Ia3Shape(name(), width, options), rng, options) {}

  /// The device-first form every backend's layers share (the CPU's device is empty).
  template <class... Args>
  explicit Ia3Mixture(CpuDevice, Args&&... args) : Ia3Mixture(std::forward<Args>(args)...) {}
  Ia3Mixture(Ia3Mixture&&) noexcept = default;

  Index width() const { return shape_.width(); }
  Index heads() const { return shape_.heads; }
  Index head_dim() const { return shape_.head_dim; }
  const Options& options() const { return options_; }

  /// Self-routed: h (tokens, width) is also the router input. rows: the token rows whose
  /// routing counts for the auxiliary losses (empty: all).
  Context forward(In<T> h, RowMask rows = {}) const {
    shape_.check_self_routed(h.rows(), h.cols());
    return forward_impl(h, h, false, rows);
  }

  /// Routed on the caller's r (tokens, router_width).
  Context forward(In<T> h, In<T> router_input, RowMask rows = {}) const {
    shape_.check_routed_on(h.rows(), h.cols(), router_input.rows(), router_input.cols());
    return forward_impl(h, router_input, true, rows);
  }

  /// Self-routed backward: returns dh.
  Matrix<T> backward(const Context& c, In<T> h, In<T> dy, GradMode mode) {
    shape_.check_backward(c.external_router_input, false, c.tokens, h.rows(), h.cols(), dy.rows(), dy.cols());
    Matrix<T> dh(c.tokens, width());
    backward_impl(c, h, h, dy, mode, dh, dh);
    return dh;
  }

  /// Backward for forward(h, r): returns {dh, dr}.
  std::pair<Matrix<T>, Matrix<T>> backward(const Context& c, In<T> h, In<T> router_input, In<T> dy, GradMode mode) {
    shape_.check_backward(c.external_router_input, true, c.tokens, h.rows(), h.cols(), dy.rows(), dy.cols());
    shape_.check_backward_router_input(c.tokens, router_input.rows(), router_input.cols());
    std::pair<Matrix<T>, Matrix<T>> grads{Matrix<T>(c.tokens, width()), Matrix<T>::Zero(c.tokens, router_in_)};
    backward_impl(c, h, router_input, dy, mode, grads.first, grads.second);
    return grads;
  }

 private:
  /// Validated shape first (a bad option throws before any random draw), then the initial values
  /// every backend draws alike (common/mixture_init.hpp).
  Ia3Mixture(common::Ia3Shape shape, Rng& rng, const Options& options)
      : options_(options),
        shape_(std::move(shape)),
        heads_(shape_.heads),
        head_dim_(shape_.head_dim),
        router_in_(shape_.router_in),
        router_kernel("router_kernel", router_in_, E),
        scales("ia3_scales", heads_ * E, head_dim_) {
    const common::Ia3Init init(shape_, E, options, rng);
    router_kernel.value() = init.router.cast<T>();
    scales.value().setOnes();
    if (init.noise.size()) scales.value() += init.noise.cast<T>();
  }

  Index groups() const { return shape_.groups(); }  // routing rows per token

  /// Tokens per block: about 256 Ki values of h, so that a block of h, dy and the block's
  /// intermediates stay in one core's L2 cache while its small GEMMs run.
  Index block_tokens() const { return std::max<Index>(8, (256 * 1024) / std::max<Index>(1, width())); }

  /// Gates of head hd for tokens [t0, t0 + n): (n, E), a strided view into the routing rows.
  static ConstMatrixView<T> head_gates(const Routing<T>& r, Index t0, Index n, Index groups, Index j) {
    return ConstMatrixView<T>(r.gates.data() + (t0 * groups + j) * E, n, E, Eigen::OuterStride<>(groups * E));
  }

  /// The router input of routing group j for tokens [t0, t0 + n): (n, router_in).
  auto router_block(In<T> r, bool ext, Index t0, Index n, Index j) const {
    return r.block(t0, ext ? 0 : j * head_dim_, n, router_in_);
  }

  Context forward_impl(In<T> h, In<T> r, bool ext, RowMask rows) const {
    Context c;
    const Index N = h.rows(), G = groups(), B = block_tokens(), D = head_dim_;
    c.tokens = N;
    c.external_router_input = ext;
    c.y.resize(N, width());
    c.routing = Math::start(N * G, E, options_.router, rows, G);
    const Matrix<T> mix = mixing_vectors();
    MOET_OMP(omp parallel if (N > B))
    {
      Matrix<T> logits(B, E), merged(B, D);
      MOET_OMP(omp for schedule(static))
      for (Index t0 = 0; t0 < N; t0 += B) {
        const Index n = std::min(B, N - t0);
        for (Index j = 0; j < G; ++j) {
          logits.topRows(n).noalias() = router_block(r, ext, t0, n, j) * router_kernel.value();
          for (Index i = 0; i < n; ++i) Math::route_row(c.routing, (t0 + i) * G + j, logits.row(i).data());
        }
        for (Index hd = 0; hd < heads_; ++hd) {
          merge(head_gates(c.routing, t0, n, G, ext ? 0 : hd), mix.middleRows(hd * E, E), merged.topRows(n));
          c.y.block(t0, hd * D, n, D) = h.block(t0, hd * D, n, D).cwiseProduct(merged.topRows(n));
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

  template <class Gates, class Vectors, class Merged>
  static void merge(const Gates& gates, const Vectors& vectors, Merged&& merged) {
    merged.noalias() = gates * vectors;
    if constexpr (gates_sum_to_one) merged.array() += T(1);
  }

  /// dh is written; dr is accumulated into (it is dh itself when self-routed).
  void backward_impl(const Context& c, In<T> h, In<T> r, In<T> dy, GradMode mode, Matrix<T>& dh, Matrix<T>& dr) {
    if (mode == GradMode::overwrite) zero_grad(*this);
    const Index N = c.tokens, G = groups(), B = block_tokens(), D = head_dim_;
    const bool ext = c.external_router_input;
    const Matrix<T> mix = mixing_vectors();
    // Per-thread accumulators, summed below in thread order: deterministic, unlike a critical
    // section that adds in whatever order the threads arrive.
    const int threads = N > B ? detail::max_threads() : 1;
    std::vector<Matrix<T>> scale_parts(std::size_t(threads), Matrix<T>::Zero(heads_ * E, D)),
        kernel_parts(std::size_t(threads), Matrix<T>::Zero(router_in_, E));
    MOET_OMP(omp parallel if (N > B) num_threads(threads))
    {
      Matrix<T>& d_scales = scale_parts[std::size_t(detail::thread_id())];
      Matrix<T>& d_kernel = kernel_parts[std::size_t(detail::thread_id())];
      Matrix<T> ds(B, D), merged(B, D), d_gates(G * B, E), d_logits(B, E);
      MOET_OMP(omp for schedule(static))
      for (Index t0 = 0; t0 < N; t0 += B) {
        const Index n = std::min(B, N - t0);
        d_gates.setZero();
        for (Index hd = 0; hd < heads_; ++hd) {
          const Index j = ext ? 0 : hd;
          const auto gates = head_gates(c.routing, t0, n, G, j);  // (n, E)
          const auto l = mix.middleRows(hd * E, E);              // (E, D)
          const auto dy_h = dy.block(t0, hd * D, n, D);
          ds.topRows(n) = dy_h.cwiseProduct(h.block(t0, hd * D, n, D));
          d_gates.middleRows(j * B, n).noalias() += ds.topRows(n) * l.transpose();
          d_scales.middleRows(hd * E, E).noalias() += gates.transpose() * ds.topRows(n);
          merge(gates, l, merged.topRows(n));
          dh.block(t0, hd * D, n, D) = dy_h.cwiseProduct(merged.topRows(n));
        }
        for (Index j = 0; j < G; ++j) {
          for (Index i = 0; i < n; ++i)
            Math::backward_row(c.routing, (t0 + i) * G + j, d_gates.row(j * B + i).data(), d_logits.row(i).data());
          if (ext) dr.middleRows(t0, n).noalias() += d_logits.topRows(n) * router_kernel.value().transpose();
          else dr.block(t0, j * D, n, D).noalias() += d_logits.topRows(n) * router_kernel.value().transpose();
          d_kernel.noalias() += router_block(r, ext, t0, n, j).transpose() * d_logits.topRows(n);
        }
      }
    }
    for (int t = 0; t < threads; ++t) {
      scales.grad() += scale_parts[std::size_t(t)];
      router_kernel.grad() += kernel_parts[std::size_t(t)];
    }
  }

  Options options_;
  common::Ia3Shape shape_;
  Index heads_, head_dim_, router_in_;  // of shape_, for the loops below

 public:
  BOOST_HANA_DEFINE_STRUCT(Ia3Mixture,
                           (Param<T>, router_kernel),  // W_r (router_in, E); router_in = head_dim or router_width
                           (Param<T>, scales));        // l (heads * E, head_dim), init ones
};

}  // namespace moet::cpu_impl
