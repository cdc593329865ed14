// Mixture of LoRA experts on the GPU (MoLoRA), fused as on the CPU. The weights sit in one
// row-major device buffer; E8 = E rounded up to 8 and the tail pad keep every block 16-byte
// aligned when d_out is a multiple of 8:
//
//   weights (d_in + E*R, d_out + C) = [ W0 (frozen) | W_r | 0 | A_1 .. A_E | 0 ]     C = E8 + E*R + pad
//                                     [ B_1; ..; B_E |        0               ]
//
// Dense (every expert on every token; Soft routing, and top-k when it is cheaper), four GEMMs and
// one row kernel each way:
//   forward   z = x [W0 | W_r | 0 | A | 0] + [b | 0]   one GEMM (bias epilogue): [y0 | logits | 0 | U | 0]
//             route + V_e = g_e (alpha/R) U_e        one kernel, a warp per token
//             y = y0 + V B                           one GEMM, beta = 1 into z's first d_out columns
//   backward  [dx0 | dV] = dy [W0; B]^T              one GEMM (B stacked under W0)
//             dU, dg, router backward -> d_right = [d_logits | 0 | dU | 0]   one kernel, a warp per token
//             dB = V^T dy                            one GEMM, float32 gradient, beta by GradMode
//             [dW_r | 0 | dA | 0] = x^T d_right      one GEMM, float32 gradient, beta by GradMode
//             dx = dx0 + d_right [W_r | 0 | A | 0]^T one GEMM, beta = 1
// Grouped (top-k, Dispatch::grouped or the cost model): only the K chosen experts per token.
//   forward   z = x [W0 | W_r | 0] + [b | 0]         one GEMM over the first d_out + E8 columns
//             route; group the slots by (choice, expert)   kernels.hpp: a stable counting sort
//             U_s = x_t A_e, V_s = g (alpha/R) U_s   one kernel over tiles of one expert's slots
//             y_t += V_s B_e                         one kernel per choice (no two writers per row)
//   backward  dx = dy W0^T                           one GEMM
//             dV_s = dy_t B_e^T                      the shrink kernel on B's transpose
//             dU, dg, router backward -> d_logits    one kernel, a warp per token
//             dB_e, dA_e: sums over the expert's slots in group order (one kernel each)
//             dW_r = x^T d_logits, dx += d_logits W_r^T    two GEMMs
//             dx_t += dU_s A_e^T                     the expand kernel on A's transpose
// The output y is a column block of z and the dense dx one of [dx0 | dV] (row stride wider
// than d_out / d_in): no copies.
#pragma once

#include <string>

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

/// The device buffers of a SlotGroups (kernels.hpp) for `tokens` tokens.
struct DeviceSlotGroups {
  DeviceMatrix<int> order, offsets, tile_group, tile_begin, pass_tiles, block_counts;
  SlotGroups groups;

  DeviceSlotGroups() = default;
  DeviceSlotGroups(std::int64_t tokens, int k, int experts, int rank, cudaStream_t stream) {
    SlotGroups& g = groups;
    g.k = k, g.experts = experts, g.tile_size = grouped_tile_size(rank), g.slots = tokens * k;
    g.max_tiles = int((g.slots + g.tile_size - 1) / g.tile_size) + k * experts;  // each group ends at most one partial tile
    g.max_pass_tiles = int((tokens + g.tile_size - 1) / g.tile_size) + experts;
    const std::int64_t count_blocks = (g.slots + group_block_slots - 1) / group_block_slots;
    order = DeviceMatrix<int>(g.slots, 1, stream);
    offsets = DeviceMatrix<int>(1, k * experts + 1, stream);
    tile_group = DeviceMatrix<int>(g.max_tiles, 1, stream);
    tile_begin = DeviceMatrix<int>(g.max_tiles, 1, stream);
    pass_tiles = DeviceMatrix<int>(1, k + 1, stream);
    block_counts = DeviceMatrix<int>(count_blocks, k * experts, stream);
    g.order = order.data(), g.offsets = offsets.data(), g.tile_group = tile_group.data(), g.tile_begin = tile_begin.data();
    g.pass_tiles = pass_tiles.data(), g.block_counts = block_counts.data();
  }
};

template <class Policy, int R, int E, class T>
class LoraMixture {
  using Spec = Mixture<Router<Policy>, Expert<LoRA<R>>, E>;
  static constexpr int K = Policy::k;
  static constexpr Index ER = Index(E) * R;
  static constexpr Index E8 = (E + 7) / 8 * 8;                   // W_r and its pad
  static constexpr Index right_cols = (E8 + ER + 7) / 8 * 8;     // [W_r | 0 | A | 0]
  static constexpr int logits_pad = int(E8 - E), u_pad = int(right_cols - E8 - ER);

 public:
  using Options = MixtureOptions<LoRA<R>>;
  using spec = Spec;  ///< the Mixture<...> this layer implements
  using Scalar = T;
  using OutputScalar = T;

  struct Context : RoutedContext {
    Index tokens = 0, d_out = 0;
    bool grouped = false;
    DeviceMatrix<T> z;      // dense: (tokens, d_out + C) = [y | logits | 0 | U | 0]; grouped: (tokens, d_out + E8)
    DeviceMatrix<T> mixed;  // dense: V (tokens, E*R); grouped: V of each slot (tokens*K, R)
    DeviceMatrix<T> down;   // grouped: U of each slot (tokens*K, R)
    DeviceSlotGroups groups;  // grouped only
    /// The layer output y: (tokens, d_out), a column block of z.
    DeviceView<const T> output() const { return z.view().col_block(0, d_out); }
  };

  static std::string name() { return Spec::name(); }

  /// weight: the host (d_in, d_out) W0, converted to T. Router kernel and A are drawn from `rng`
  /// in the CPU layer's order, so the same seed gives the same initial values.
  /// (Any Eigen expression; Matrix::Zero is a fill on the device, with no host copy.)
  template <class Derived>
  LoraMixture(CudaContext& ctx, const Eigen::MatrixBase<Derived>& weight, Rng& rng, const Options& options = {})
      : LoraMixture(ctx, weight.rows(), weight.cols(), false, options) {
    upload(base_weight.mutable_value(), weight, ctx.stream());
    draw_adapters(rng);
  }
  /// bias: the host (1, d_out) b.
  template <class Derived, class DerivedBias>
  LoraMixture(CudaContext& ctx, const Eigen::MatrixBase<Derived>& weight, const Eigen::MatrixBase<DerivedBias>& bias, Rng& rng,
              const Options& options = {})
      : LoraMixture(ctx, weight.rows(), weight.cols(), true, options) {
    detail::expect_shape(name(), "bias", bias.rows(), bias.cols(), 1, d_out_, "1 x d_out");
    upload(base_weight.mutable_value(), weight, ctx.stream());
    upload(base_bias.mutable_value(), bias, ctx.stream());
    draw_adapters(rng);
  }

  LoraMixture(LoraMixture&&) noexcept = default;

  Index d_in() const { return d_in_; }
  Index d_out() const { return d_out_; }
  float scale() const { return scale_; }
  const Options& options() const { return options_; }
  /// The path a forward pass takes with these options.
  bool uses_grouped() const { return runs_grouped(K, options_.dispatch, prefers_grouped()); }

  /// The GPU cost model, per token and per unit of (d_in + d_out), in multiply-adds of a large
  /// tensor-core GEMM. Dense: the experts' columns of the wide GEMMs, E R. Grouped: K R
  /// multiply-adds on CUDA cores, ~16x slower than tensor cores, plus each pass's reads and
  /// writes of a token row (~2 values per column per slot; a value moved through HBM costs
  /// ~300 tensor-core multiply-adds on an H100). Estimates, to be calibrated on the GPU
  /// (docs/cuda.md).
  static constexpr bool prefers_grouped() {
    if constexpr (K == 0) return false;
    else return R <= 512 && double(K) * (16.0 * R + 600.0) < double(E) * R;
  }

  /// The frozen W0 (d_in, d_out) and bias (1, d_out; empty without bias), for checkpoints.
  DeviceFrozen<T>& frozen_weight() { return base_weight; }
  DeviceFrozen<T>& frozen_bias() { return base_bias; }

  /// rows: the token rows that count for the aux losses (a padded batch's real tokens).
  Context forward(DeviceView<const T> x, RowMask rows = {}) const {
    detail::expect_cols(name(), "input x", x.rows, x.cols, d_in(), "tokens x d_in");
    const Index N = x.rows, D = d_out_;
    cudaStream_t stream = ctx_->stream();
    Context c;
    c.tokens = N;
    c.d_out = D;
    c.grouped = uses_grouped();
    c.routing = DeviceRouting::start<Policy>(N, E, options_.router, stream, rows);
    if (c.grouped) {
      forward_grouped(x, c);
      return c;
    }
    c.z = DeviceMatrix<T>(N, cols_, stream);
    gemm<T, T>(*ctx_, Op::N, x, Op::N, top(), c.z.view(), 1.f, 0.f, has_bias_ ? bias_.data() : nullptr);
    c.mixed = DeviceMatrix<T>(N, ER, stream);
    lora_route_scale<T>(c.z.data(), c.z.ld(), D, D + E8, R, scale_, c.mixed.data(), c.mixed.ld(), c.routing.state(), stream);
    gemm<T, T>(*ctx_, Op::N, DeviceView<const T>(c.mixed.view()), Op::N, lower(), c.z.view().col_block(0, D), 1.f, 1.f);
    return c;
  }

  /// dy: (tokens, d_out). Returns dx (tokens, d_in), whose row stride may be wider than d_in.
  DeviceMatrix<T> backward(const Context& c, DeviceView<const T> x, DeviceView<const T> dy, GradMode mode) {
    detail::expect_shape(name(), "input x", x.rows, x.cols, c.tokens, d_in(), "the x given to forward");
    detail::expect_shape(name(), "output gradient dy", dy.rows, dy.cols, c.tokens, d_out(), "tokens x d_out");
    if (c.grouped) return backward_grouped(c, x, dy, mode);
    const Index N = c.tokens, D = d_out_, I = d_in_;
    const float beta = mode == GradMode::accumulate ? 1.f : 0.f;
    cudaStream_t stream = ctx_->stream();
    DeviceMatrix<T> dx_dv(N, I + ER, stream);  // [dx0 | dV]
    gemm<T, T>(*ctx_, Op::N, dy, Op::T, stacked(), dx_dv.view(), 1.f, 0.f);
    DeviceMatrix<T> d_right(N, right_cols, stream);  // [d_logits | 0 | dU | 0]
    lora_backward_rows<T>(dx_dv.data() + I, dx_dv.ld(), c.z.data() + D + E8, c.z.ld(), R, scale_, c.routing.state(),
                          d_right.data(), d_right.ld(), logits_pad, u_pad, stream);
    const DeviceView<const T> dr = d_right.view();
    gemm<T, float>(*ctx_, Op::T, DeviceView<const T>(c.mixed.view()), Op::N, dy, up_grad_.view(), 1.f, beta);
    gemm<T, float>(*ctx_, Op::T, x, Op::N, dr, right_grad_.view(), 1.f, beta);
    gemm<T, T>(*ctx_, Op::N, dr, Op::T, right(), dx_dv.view().col_block(0, I), 1.f, 1.f);
    return std::move(dx_dv).keep_cols(I);
  }

 private:
  void forward_grouped(DeviceView<const T> x, Context& c) const {
    const Index N = x.rows, D = d_out_;
    cudaStream_t stream = ctx_->stream();
    c.z = DeviceMatrix<T>(N, D + E8, stream);
    gemm<T, T>(*ctx_, Op::N, x, Op::N, top().col_block(0, D + E8), c.z.view(), 1.f, 0.f, has_bias_ ? bias_.data() : nullptr);
    const RoutingState state = c.routing.state();
    route_forward<T>(c.z.data() + D, c.z.ld(), state, stream);
    c.groups = DeviceSlotGroups(N, K, E, R, stream);
    group_slots(c.routing.selected.data(), c.groups.groups, stream);
    c.down = DeviceMatrix<T>(N * K, R, stream);
    c.mixed = DeviceMatrix<T>(N * K, R, stream);
    grouped_shrink<T>(x.data, x.ld, d_in_, down_matrix(), R, c.groups.groups, c.down.data(), c.routing.gates.data(), scale_,
                      c.mixed.data(), stream);
    grouped_expand<T>(c.mixed.data(), up_matrix(), D, R, c.groups.groups, c.z.data(), c.z.ld(), stream);
  }

  DeviceMatrix<T> backward_grouped(const Context& c, DeviceView<const T> x, DeviceView<const T> dy, GradMode mode) {
    const Index N = c.tokens, D = d_out_, I = d_in_;
    const float beta = mode == GradMode::accumulate ? 1.f : 0.f;
    cudaStream_t stream = ctx_->stream();
    const SlotGroups& groups = c.groups.groups;
    DeviceMatrix<T> dx(N, I, stream);
    gemm<T, T>(*ctx_, Op::N, dy, Op::T, base_weight.value(), dx.view(), 1.f, 0.f);
    DeviceMatrix<T> d_mixed(N * K, R, stream), d_down(N * K, R, stream);  // dV, dU of each slot
    grouped_shrink<T>(dy.data, dy.ld, D, up_matrix_transposed(), R, groups, d_mixed.data(), nullptr, 0.f, nullptr, stream);
    DeviceMatrix<T> d_logits(N, E8, stream);
    lora_grouped_backward_rows<T>(d_mixed.data(), c.down.data(), R, scale_, c.routing.state(), d_down.data(), d_logits.data(),
                                  d_logits.ld(), logits_pad, stream);
    grouped_outer<T>(c.mixed.data(), R, dy.data, dy.ld, D, groups,
                     {up_grad_.data(), R * up_grad_.ld(), up_grad_.ld(), 1}, beta, stream);  // dB_e (R, d_out)
    grouped_outer<T>(d_down.data(), R, x.data, x.ld, I, groups,
                     {right_grad_.data() + E8, R, 1, right_grad_.ld()}, beta, stream);  // dA_e (d_in, R), as (R, d_in)
    const DeviceView<const T> dl = d_logits.view().col_block(0, E);
    gemm<T, float>(*ctx_, Op::T, x, Op::N, dl, router_kernel.grad(), 1.f, beta);
    gemm<T, T>(*ctx_, Op::N, dl, Op::T, DeviceView<const T>(router_kernel.value()), dx.view(), 1.f, 1.f);
    grouped_expand<T>(d_down.data(), down_matrix_transposed(), I, R, groups, dx.data(), dx.ld(), stream);
    return dx;
  }

  /// A_e as an expert matrix (d_in, R), and its transpose (R, d_in).
  ExpertMatrix<const T> down_matrix() const { return {lora_down.value().data, R, lora_down.value().ld, 1}; }
  ExpertMatrix<const T> down_matrix_transposed() const { return {lora_down.value().data, R, 1, lora_down.value().ld}; }
  /// B_e as an expert matrix (R, d_out), and its transpose (d_out, R).
  ExpertMatrix<const T> up_matrix() const { return {lora_up.value().data, R * lora_up.value().ld, lora_up.value().ld, 1}; }
  ExpertMatrix<const T> up_matrix_transposed() const {
    return {lora_up.value().data, R * lora_up.value().ld, 1, lora_up.value().ld};
  }

  /// The buffers, zeroed; the constructors above write W0, b and the drawn adapters.
  LoraMixture(CudaContext& ctx, Index d_in, Index d_out, bool has_bias, const Options& options)
      : ctx_(&ctx),
        options_(validated(options, d_in, d_out)),
        scale_(float(options.expert.alpha / R)),
        d_in_(d_in),
        d_out_(d_out),
        cols_(d_out + right_cols),
        has_bias_(has_bias),
        weights_(DeviceMatrix<T>::zeros(d_in + ER, d_out + right_cols, ctx.stream())),
        bias_(DeviceMatrix<T>::zeros(1, d_out + right_cols, ctx.stream())),
        right_grad_(DeviceMatrix<float>::zeros(d_in, right_cols, ctx.stream())),
        up_grad_(DeviceMatrix<float>::zeros(ER, d_out, ctx.stream())),
        base_weight("base_weight", weights_.view().row_block(0, d_in_).col_block(0, d_out_)),
        base_bias("base_bias", bias_.view().row_block(0, has_bias_ ? 1 : 0).col_block(0, has_bias_ ? d_out_ : 0)),
        router_kernel("router_kernel", weights_.view().row_block(0, d_in_).col_block(d_out_, E),
                      right_grad_.view().col_block(0, E)),
        lora_down("lora_down", weights_.view().row_block(0, d_in_).col_block(d_out_ + E8, ER),
                  right_grad_.view().col_block(E8, ER)),
        lora_up("lora_up", weights_.view().row_block(d_in_, ER).col_block(0, d_out_), up_grad_.view()) {}

  /// The router kernel and A, drawn as the CPU layer draws them (B starts at zero).
  void draw_adapters(Rng& rng) {
    const common::LoraInit<R> init(d_in_, E, options_, rng);
    upload(router_kernel.value(), init.router.data(), init.router.cols(), ctx_->stream());
    upload(lora_down.value(), init.down.data(), init.down.cols(), ctx_->stream());
  }

  static const Options& validated(const Options& options, Index d_in, Index d_out) {
    check_routing_limits<E, Policy>();
    common::check_additive_mixture(name(), options, d_in, d_out);
    if (R > 512 && options.dispatch == Dispatch::grouped)
      throw value_error(detail::concat(name(), ": the CUDA grouped path takes LoRA ranks up to 512, got ", R));
    return options;
  }

  /// [W0 | W_r | 0 | A | 0]: the d_in rows that multiply x, (d_in, d_out + C).
  DeviceView<const T> top() const { return weights_.view().row_block(0, d_in_); }
  /// [W0; B]: (d_in + E*R, d_out).
  DeviceView<const T> stacked() const { return weights_.view().col_block(0, d_out_); }
  /// B: (E*R, d_out).
  DeviceView<const T> lower() const { return weights_.view().row_block(d_in_, ER).col_block(0, d_out_); }
  /// [W_r | 0 | A | 0]: (d_in, C).
  DeviceView<const T> right() const { return weights_.view().row_block(0, d_in_).col_block(d_out_, right_cols); }

  CudaContext* ctx_;
  Options options_;
  float scale_;
  Index d_in_, d_out_, cols_;
  bool has_bias_;
  DeviceMatrix<T> weights_;         // (d_in + E*R, d_out + C)
  DeviceMatrix<T> bias_;            // (1, d_out + C): [b | 0]
  DeviceMatrix<float> right_grad_;  // (d_in, C): [dW_r | 0 | dA | 0]
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
