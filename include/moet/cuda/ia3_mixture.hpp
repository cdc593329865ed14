// Mixture of (IA)^3 vectors on the GPU (MoV): y = h * s, s = [1 +] sum_e g_e(r) (l_e [- 1]),
// with the CPU layer's layout and options (per-head routing for keys / values, or a separate
// router input of the caller's). MoV is bandwidth-bound; the passes over the activation are
//   forward   logits = r W_r                  one cuBLASLt GEMM (float32 output), per head
//             route                           one kernel, a warp per routing row
//             y = h * s                       one pass over h: the merged vector is formed per
//                                             (token tile, column) and applied at once
//   backward  dh = dy * s, ds = dy * h        one pass over dy and h
//             dg = ds (l [- 1])^T             one GEMM per head (float32 output)
//             router backward                 one kernel
//             dl += g^T ds, dW_r += r^T d_logits, dh (or dr) += d_logits W_r^T   GEMMs
// so forward reads h twice and writes y once (the logits GEMM and the scaling pass), and the
// backward's extra reads are of ds and of the tiny (tokens, E) matrices.
#pragma once

#include <string>
#include <utility>

#include <boost/hana/define_struct.hpp>

#include "../core/random.hpp"
#include "../core/tensor.hpp"
#include "../common/mixture_init.hpp"
#include "../mixture.hpp"
#include "context.hpp"
#include "kernels.hpp"
#include "matmul.hpp"
#include "param.hpp"
#include "routing.hpp"

namespace moet::cuda_impl {

template <class Policy, int E, class T>
class Ia3Mixture {
  using Spec = Mixture<Router<Policy>, Expert<IA3>, E>;
  static constexpr bool gates_sum_to_one = Policy::k == 0 || Policy::renorm == Renorm::on;

 public:
  using spec = Spec;  ///< the Mixture<...> this layer implements
  using Options = MixtureOptions<IA3>;
  using Scalar = T;
  using OutputScalar = T;

  /// routing rows: tokens * heads (self-routed) or tokens (external router input).
  struct Context : RoutedContext {
    Index tokens = 0;
    bool external_router_input = false;
    DeviceMatrix<T> y;  // (tokens, width)
    DeviceView<const T> output() const { return y.view(); }
  };

  static std::string name() { return Spec::name(); }

  /// width = heads * head_dim. Parameters are drawn from `rng` as on the CPU (common/mixture_init.hpp).
  Ia3Mixture(CudaContext& ctx, Index width, Rng& rng, const Options& options = {})
      : Ia3Mixture(ctx, validated(width, options), rng, options) {}

  Ia3Mixture(Ia3Mixture&&) noexcept = default;

  Index width() const { return heads_ * head_dim_; }
  Index heads() const { return heads_; }
  Index head_dim() const { return head_dim_; }
  const Options& options() const { return options_; }

  /// Self-routed: h (tokens, width) is also the router input.
  Context forward(DeviceView<const T> h, RowMask rows = {}) const {
    shape_.check_self_routed(h.rows, h.cols);
    return forward_impl(h, h, false, rows);
  }

  /// Routed on the caller's r (tokens, router_width).
  /// rows: the token rows that count for the aux losses (a padded batch's real tokens).
  Context forward(DeviceView<const T> h, DeviceView<const T> router_input, RowMask rows = {}) const {
    shape_.check_routed_on(h.rows, h.cols, router_input.rows, router_input.cols);
    return forward_impl(h, router_input, true, rows);
  }

  /// Self-routed backward: returns dh.
  DeviceMatrix<T> backward(const Context& c, DeviceView<const T> h, DeviceView<const T> dy, GradMode mode) {
    shape_.check_backward(c.external_router_input, false, c.tokens, h.rows, h.cols, dy.rows, dy.cols);
    return std::move(backward_impl(c, h, h, dy, mode).first);
  }

  /// Backward for forward(h, r): returns {dh, dr}.
  std::pair<DeviceMatrix<T>, DeviceMatrix<T>> backward(const Context& c, DeviceView<const T> h, DeviceView<const T> router_input,
                                                       DeviceView<const T> dy, GradMode mode) {
    shape_.check_backward(c.external_router_input, true, c.tokens, h.rows, h.cols, dy.rows, dy.cols);
    shape_.check_backward_router_input(c.tokens, router_input.rows, router_input.cols);
    return backward_impl(c, h, router_input, dy, mode);
  }

 private:
  Ia3Mixture(CudaContext& ctx, common::Ia3Shape shape, Rng& rng, const Options& options)
      : ctx_(&ctx),
        options_(options),
        shape_(std::move(shape)),
        heads_(shape_.heads),
        head_dim_(shape_.head_dim),
        router_in_(shape_.router_in),
        kernel_value_(router_in_, E, ctx.stream()),
        kernel_grad_(DeviceMatrix<float>::zeros(router_in_, E, ctx.stream())),
        scales_value_(heads_ * E, head_dim_, ctx.stream()),
        scales_grad_(DeviceMatrix<float>::zeros(heads_ * E, head_dim_, ctx.stream())),
        router_kernel("router_kernel", kernel_value_.view(), kernel_grad_.view()),
        scales("ia3_scales", scales_value_.view(), scales_grad_.view()) {
    const common::Ia3Init init(shape_, E, options, rng);
    Matrix<double> l = Matrix<double>::Ones(heads_ * E, head_dim_);
    if (init.noise.size()) l += init.noise;
    upload(router_kernel.value(), init.router.data(), init.router.cols(), ctx.stream());
    upload(scales.value(), l.data(), l.cols(), ctx.stream());
  }

  static common::Ia3Shape validated(Index width, const Options& options) {
    check_routing_limits<E, Policy>();
    return common::Ia3Shape(name(), width, options);
  }

  bool external() const { return shape_.external; }
  Index groups() const { return shape_.groups(); }

  Ia3Shape shape(Index tokens) const {
    Ia3Shape s;
    s.tokens = tokens;
    s.heads = int(heads_);
    s.head_dim = int(head_dim_);
    s.experts = E;
    s.groups = int(groups());
    s.gates_sum_to_one = gates_sum_to_one;
    return s;
  }

  /// Rows of routing group j of a (tokens * G, cols) matrix: (tokens, cols), row stride G * ld.
  template <class U>
  static DeviceView<U> group_rows(DeviceView<U> m, Index groups, Index j) {
    return {m.data + j * m.ld, m.rows / groups, m.cols, m.ld * groups};
  }

  /// The router input of routing group j: (tokens, router_in).
  DeviceView<const T> router_block(DeviceView<const T> r, bool ext, Index j) const {
    return ext ? r : r.col_block(j * head_dim_, head_dim_);
  }

  Context forward_impl(DeviceView<const T> h, DeviceView<const T> r, bool ext, RowMask rows) const {
    const Index N = h.rows, G = groups();
    cudaStream_t stream = ctx_->stream();
    Context c;
    c.tokens = N;
    c.external_router_input = ext;
    c.routing = DeviceRouting::start<Policy>(N * G, E, options_.router, stream, rows, int(G));
    DeviceMatrix<float> logits(N * G, E, stream);  // row t * G + j
    for (Index j = 0; j < G; ++j)
      gemm<T, float>(*ctx_, Op::N, router_block(r, ext, j), Op::N, DeviceView<const T>(router_kernel.value()),
                     group_rows(logits.view(), G, j), 1.f, 0.f);
    route_forward<float>(logits.data(), logits.ld(), c.routing.state(), stream);
    c.y = DeviceMatrix<T>(N, width(), stream);
    ia3_scale<T>(shape(N), c.routing.gates.data(), scales.value().data, h.data, h.ld, nullptr, 0, c.y.data(), c.y.ld(), nullptr,
                 0, stream);
    return c;
  }

  /// {dh, dr}; dr is empty when self-routed (its gradient is part of dh).
  std::pair<DeviceMatrix<T>, DeviceMatrix<T>> backward_impl(const Context& c, DeviceView<const T> h, DeviceView<const T> r,
                                                            DeviceView<const T> dy, GradMode mode) {
    const Index N = c.tokens, G = groups(), D = head_dim_;
    const bool ext = c.external_router_input;
    const float beta = mode == GradMode::accumulate ? 1.f : 0.f;
    cudaStream_t stream = ctx_->stream();
    std::pair<DeviceMatrix<T>, DeviceMatrix<T>> grads{DeviceMatrix<T>(N, width(), stream), DeviceMatrix<T>()};
    DeviceMatrix<T>& dh = grads.first;
    DeviceMatrix<T> ds(N, width(), stream);
    ia3_scale<T>(shape(N), c.routing.gates.data(), scales.value().data, dy.data, dy.ld, h.data, h.ld, dh.data(), dh.ld(),
                 ds.data(), ds.ld(), stream);
    DeviceMatrix<T> mix(heads_ * E, D, stream);
    ia3_mix<T>(scales.value().data, heads_ * E * D, gates_sum_to_one, mix.data(), stream);

    DeviceMatrix<float> d_gates(N * G, E, stream);
    for (Index hd = 0; hd < heads_; ++hd) {
      const Index j = ext ? 0 : hd;  // with one gate row per token, every head adds into it
      gemm<T, float>(*ctx_, Op::N, DeviceView<const T>(ds.view().col_block(hd * D, D)), Op::T,
                     DeviceView<const T>(mix.view().row_block(hd * E, E)), group_rows(d_gates.view(), G, j), 1.f,
                     ext && hd > 0 ? 1.f : 0.f);
    }
    DeviceMatrix<T> d_logits(N * G, E, stream), gates_t(N * G, E, stream);
    route_backward<T>(d_gates.data(), d_gates.ld(), c.routing.state(), d_logits.data(), d_logits.ld(), stream);
    convert<T>(c.routing.gates.data(), c.routing.gates.ld(), N * G, E, gates_t.data(), gates_t.ld(), stream);

    for (Index hd = 0; hd < heads_; ++hd)
      gemm<T, float>(*ctx_, Op::T, DeviceView<const T>(group_rows(gates_t.view(), G, ext ? 0 : hd)), Op::N,
                     DeviceView<const T>(ds.view().col_block(hd * D, D)), scales.grad().row_block(hd * E, E), 1.f, beta);
    for (Index j = 0; j < G; ++j) {
      const DeviceView<const T> dl = group_rows(d_logits.view(), G, j);
      gemm<T, float>(*ctx_, Op::T, router_block(r, ext, j), Op::N, dl, router_kernel.grad(), 1.f, j == 0 ? beta : 1.f);
      if (!ext)
        gemm<T, T>(*ctx_, Op::N, dl, Op::T, DeviceView<const T>(router_kernel.value()), dh.view().col_block(j * D, D), 1.f, 1.f);
    }
    if (ext) {
      grads.second = DeviceMatrix<T>(N, router_in_, stream);
      gemm<T, T>(*ctx_, Op::N, DeviceView<const T>(d_logits.view()), Op::T, DeviceView<const T>(router_kernel.value()),
                 grads.second.view(), 1.f, 0.f);
    }
    return grads;
  }

  CudaContext* ctx_;
  Options options_;
  common::Ia3Shape shape_;
  Index heads_, head_dim_, router_in_;
  DeviceMatrix<T> kernel_value_;
  DeviceMatrix<float> kernel_grad_;
  DeviceMatrix<T> scales_value_;
  DeviceMatrix<float> scales_grad_;

 public:
  BOOST_HANA_DEFINE_STRUCT(Ia3Mixture,
                           (DeviceParam<T>, router_kernel),  // W_r (router_in, E)
                           (DeviceParam<T>, scales));        // l (heads * E, head_dim), init ones
};

}  // namespace moet::cuda_impl
