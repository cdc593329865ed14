// Mixture of LoRA experts on the CPU (MoLoRA), fused:
//
//   forward   z = x [W0 | W_r | A_1 .. A_E]              one GEMM: y0, router logits, U = x A
//             g = route(logits)
//             V_e = g_e (alpha/R) U_e                     (tokens, E*R), elementwise
//             y = y0 + b + V [B_1; ..; B_E]               one GEMM, accumulating into y0
//   backward  dB = V^T dy                                 one GEMM
//             [dx0 | dV] = dy [W0; B]^T                   one GEMM (B is stored under W0)
//             dg_e = (alpha/R) rowsum(dV_e * U_e),  dU_e = g_e (alpha/R) dV_e
//             d_logits = route backward(dg)
//             dx = dx0 + [d_logits | dU] [W_r | A]^T      one GEMM
//             [dW_r | dA] = x^T [d_logits | dU]           one GEMM
// Stacking B under W0 turns the skinny dy B^T (a GEMM with E*R output columns, which runs at
// about half speed) into extra columns of the big dx GEMM.
//
// Top-k mixtures may instead compute only the chosen experts (Dispatch::grouped): the fused
// GEMM covers [W0 | W_r], then tokens are grouped by expert and each expert runs on its rows.
// Dispatch::automatic picks by the cost model in `prefers_grouped` (docs/design.md).
#pragma once

#include <algorithm>
#include <optional>
#include <string>
#include <utility>

#include "../core/backend.hpp"
#include "../core/visit.hpp"
#include "../common/mixture_init.hpp"
#include "../mixture.hpp"
#include "routed_linear.hpp"
#include "routing.hpp"

namespace moet::cpu_impl {

template <class Policy, int R, int E, class T>
class LoraMixture {
  static_assert(std::is_floating_point_v<T>, "moet layers take float or double");
  using Spec = Mixture<Router<Policy>, Expert<LoRA<R>>, E>;
  using Math = RouterMath<Policy, T>;
  static constexpr int K = Policy::k;
  static constexpr Index ER = Index(E) * R;

 public:
  using Options = MixtureOptions<LoRA<R>>;
  using spec = Spec;  ///< the Mixture<...> this layer implements
  using Scalar = T;

  struct Context : RoutedContext<T> {
    Index tokens = 0;
    bool grouped = false;
    Matrix<T> z;      // dense: (tokens, d_out + E + E*R) = [y | logits | U]; grouped: (tokens, d_out + E)
    Matrix<T> mixed;  // dense: V (tokens, E*R); grouped: U of each slot (tokens*K, R), group order
    TokenGroups groups;  // grouped only
    Index d_out = 0;

    /// The layer output y: (tokens, d_out).
    ConstMatrixView<T> output() const { return column_block<T>(z.data(), tokens, z.cols(), 0, d_out); }
  };

  static std::string name() { return Spec::name(); }

  /// weight: the frozen (d_in, d_out) W0, copied in.
  LoraMixture(In<T> weight, Rng& rng, const Options& options = {}) : LoraMixture(Bias{}, weight, std::nullopt, rng, options) {}
  /// bias: the frozen (1, d_out) b.
  LoraMixture(In<T> weight, In<T> bias, Rng& rng, const Options& options = {})
      : LoraMixture(Bias{}, weight, std::optional<In<T>>(bias), rng, options) {}

  /// The device-first form every backend's layers share (the CPU's device is empty).
  template <class... Args>
  explicit LoraMixture(CpuDevice, Args&&... args) : LoraMixture(std::forward<Args>(args)...) {}
  LoraMixture(LoraMixture&&) noexcept = default;

  Index d_in() const { return base.d_in(); }
  Index d_out() const { return base.d_out(); }
  T scale() const { return scale_; }
  Frozen<T>& frozen_weight() { return base.base_weight; }
  Frozen<T>& frozen_bias() { return base.base_bias; }
  const Options& options() const { return options_; }

  /// The path a forward pass takes with these options.
  bool uses_grouped() const { return runs_grouped(K, options_.dispatch, prefers_grouped()); }

  /// The cost model, in units of "one multiply-add inside a large GEMM" per token and per
  /// unit of (d_in + d_out). Dense: the experts' share of the wide GEMMs, forward and backward
  /// (3 E R). Grouped: K experts per token on skinny GEMMs that run at about half efficiency
  /// (6 K R), plus moving each token's rows in and out of the groups (~30 multiply-adds per
  /// value moved, measured on AVX2 with two cores, two moves per pass: 60 K).
  static constexpr bool prefers_grouped() {
    if constexpr (K == 0) return false;
    else return double(K) * (6.0 * R + 60.0) < 3.0 * double(E) * R;
  }

  /// rows: the token rows whose routing counts for the auxiliary losses (empty: all).
  Context forward(In<T> x, RowMask rows = {}) const {
    detail::expect_cols(name(), "input x", x.rows(), x.cols(), d_in(), "tokens x d_in");
    Context c;
    c.tokens = x.rows();
    c.d_out = d_out();
    c.grouped = uses_grouped();
    if (c.grouped) forward_grouped(x, c, rows);
    else forward_dense(x, c, rows);
    return c;
  }

  /// dy: (tokens, d_out). Returns dx (tokens, d_in); adds (or writes) the parameter gradients.
  Matrix<T> backward(const Context& c, In<T> x, In<T> dy, GradMode mode) {
    detail::expect_shape(name(), "input x", x.rows(), x.cols(), c.tokens, d_in(), "the x given to forward");
    detail::expect_shape(name(), "output gradient dy", dy.rows(), dy.cols(), c.tokens, d_out(), "tokens x d_out");
    return c.grouped ? backward_grouped(c, x, dy, mode) : backward_dense(c, x, dy, mode);
  }

  /// A one-expert LoRA (E = 1, so its gate is always 1) folded into the frozen weight,
  /// W0 += scale A B, and restarted (A drawn again, B zero): the layer's function is unchanged.
  /// Repeated, this trains the base itself at low rank (ReLoRA).
  void merge_into_base(Rng& rng)
    requires(E == 1 && K == 0)  // only then is the update the same for every input
  {
    base.base_weight.mutable_value().noalias() += scale_ * (lora_down.value() * lora_up.value());
    LoRA<R>::init_down(lora_down.value(), options_.expert, rng);
    lora_up.value().setZero();
  }

 private:
  struct Bias {};  // tags the delegated-to constructor
  /// Checks first (a bad option throws before any random draw), then the initial values every
  /// backend draws alike (common/mixture_init.hpp).
  LoraMixture(Bias, In<T> weight, std::optional<In<T>> bias, Rng& rng, const Options& options)
      : LoraMixture(Bias{}, weight, bias, options,
                    (common::check_additive_mixture(name(), options, weight.rows(), weight.cols()),
                     common::LoraInit<R>(weight.rows(), E, options, rng))) {}
  LoraMixture(Bias, In<T> weight, std::optional<In<T>> bias, const Options& options, const common::LoraInit<R>& init)
      : options_(options),
        scale_(T(options.expert.alpha / R)),
        up_grad_(static_cast<std::size_t>(ER * weight.cols())),
        base(name(), weight, bias, E, ER, ER, init.router),
        lora_down("lora_down", base.extra_value(), base.extra_grad()),
        lora_up("lora_up", base.lower(), MatrixView<T>(up_grad_.data(), ER, weight.cols(), Eigen::OuterStride<>(weight.cols()))) {
    lora_down.value() = init.down.template cast<T>();
  }

  void forward_dense(In<T> x, Context& c, RowMask rows) const {
    const Index N = x.rows(), D = d_out();
    base.forward(x, D + E + ER, c.z);
    c.routing = Math::route(c.z.middleCols(D, E), options_.router, rows);
    c.mixed.resize(N, ER);
    MOET_OMP(omp parallel for schedule(static) if (N * ER > 32768))
    for (Index t = 0; t < N; ++t)
      for (Index e = 0; e < E; ++e)
        c.mixed.row(t).segment(e * R, R) = (c.routing.gates(t, e) * scale_) * c.z.row(t).segment(D + E + e * R, R);
    c.z.leftCols(D).noalias() += c.mixed * lora_up.value();
  }

  Matrix<T> backward_dense(const Context& c, In<T> x, In<T> dy, GradMode mode) {
    const Index N = c.tokens, D = d_out(), I = d_in();
    Matrix<T>& dx_dv = dx_dv_;  // [dx0 | dV] (N, d_in + E*R), a buffer kept between calls
    dx_dv.resize(N, I + ER);
    dx_dv.noalias() = dy * base.stacked().transpose();
    Matrix<T> d_right(N, E + ER);  // [d_logits | dU]
    Matrix<T> d_gates(N, E);
    MOET_OMP(omp parallel for schedule(static) if (N * ER > 32768))
    for (Index t = 0; t < N; ++t) {
      for (Index e = 0; e < E; ++e) {
        const auto dv = dx_dv.row(t).segment(I + e * R, R);
        d_gates(t, e) = scale_ * dv.dot(c.z.row(t).segment(D + E + e * R, R));
        d_right.row(t).segment(E + e * R, R) = (c.routing.gates(t, e) * scale_) * dv;
      }
    }
    auto d_logits = d_right.leftCols(E);
    Math::backward(c.routing, d_gates, d_logits);
    // The remaining GEMMs are skinny (E*R or E + E*R wide) and scale poorly across threads, so
    // they run side by side, one thread each (BLAS calls inside a parallel region stay serial):
    // dB on one, [dW_r | dA] on the other, and the rows of dx += [d_logits | dU] [W_r | A]^T
    // split between them so that both carry the same number of multiply-adds.
    Matrix<T> dx(N, I);
    auto finish_dx = [&](Index first, Index rows) {
      dx.middleRows(first, rows) = dx_dv.block(first, 0, rows, I);
      dx.middleRows(first, rows).noalias() += d_right.middleRows(first, rows) * base.right().transpose();
    };
    const double up_cost = double(ER) * double(D), right_cost = double(I) * double(E + ER);
    const Index split = Index(double(N) * std::clamp((2 * right_cost - up_cost) / (2 * right_cost), 0.0, 1.0));
    MOET_OMP(omp parallel sections if (N * (I + D) * ER > (1 << 22)))
    {
      MOET_OMP(omp section)
      {
        detail::assign_grad(lora_up.grad(), c.mixed.transpose() * dy, mode);
        finish_dx(0, split);
      }
      MOET_OMP(omp section)
      {
        detail::assign_grad(base.trainable_grad(), x.transpose() * d_right, mode);
        finish_dx(split, N - split);
      }
    }
    return dx;
  }

  void forward_grouped(In<T> x, Context& c, RowMask rows) const {
    const Index N = x.rows(), D = d_out();
    base.forward(x, D + E, c.z);
    c.routing = Math::route(c.z.rightCols(E), options_.router, rows);
    c.groups = TokenGroups::of(c.routing.selected, E);
    c.mixed.resize(N * K, R);
    Matrix<T> expert_out(N * K, D);  // each slot's g (alpha/R) U B, group order
    MOET_OMP(omp parallel for schedule(dynamic))
    for (Index e = 0; e < E; ++e) {
      const Index n = c.groups.count(e), first = c.groups.offsets[e];
      if (n == 0) continue;
      auto down = c.mixed.middleRows(first, n);
      down.noalias() = c.groups.gather(x, e) * lora_down.value().middleCols(e * R, R);
      Matrix<T> scaled = down;
      for (Index i = 0; i < n; ++i) scaled.row(i) *= c.routing.gates(c.groups.tokens[first + i], e) * scale_;
      expert_out.middleRows(first, n).noalias() = scaled * lora_up.value().middleRows(e * R, R);
    }
    MOET_OMP(omp parallel for schedule(static) if (N * D > 32768))
    for (Index t = 0; t < N; ++t)
      for (Index j = 0; j < K; ++j) c.z.row(t).head(D) += expert_out.row(c.groups.slot_of[t * K + j]);
  }

  Matrix<T> backward_grouped(const Context& c, In<T> x, In<T> dy, GradMode mode) {
    const Index N = c.tokens, D = d_out();
    if (mode == GradMode::overwrite) zero_grad(*this);  // experts without tokens get zero, not stale values
    Matrix<T> d_gates = Matrix<T>::Zero(N, E);
    Matrix<T> d_expert_in(N * K, d_in());  // each slot's contribution to dx, group order
    MOET_OMP(omp parallel for schedule(dynamic))
    for (Index e = 0; e < E; ++e) {
      const Index n = c.groups.count(e), first = c.groups.offsets[e];
      if (n == 0) continue;
      const auto down = c.mixed.middleRows(first, n);  // (n, R)
      const Matrix<T> dy_e = c.groups.gather(dy, e);   // (n, D)
      Matrix<T> scaled = down, d_down(n, R);
      for (Index i = 0; i < n; ++i) scaled.row(i) *= c.routing.gates(c.groups.tokens[first + i], e) * scale_;
      lora_up.grad().middleRows(e * R, R).noalias() += scaled.transpose() * dy_e;
      d_down.noalias() = dy_e * lora_up.value().middleRows(e * R, R).transpose();
      for (Index i = 0; i < n; ++i) {
        const Index t = c.groups.tokens[first + i];
        d_gates(t, e) = scale_ * d_down.row(i).dot(down.row(i));  // (t, e) pairs are unique: no race
        d_down.row(i) *= c.routing.gates(t, e) * scale_;
      }
      lora_down.grad().middleCols(e * R, R).noalias() += c.groups.gather(x, e).transpose() * d_down;
      d_expert_in.middleRows(first, n).noalias() = d_down * lora_down.value().middleCols(e * R, R).transpose();
    }
    Matrix<T> dz(N, D + E);  // [dy | d_logits]
    dz.leftCols(D) = dy;
    auto d_logits = dz.rightCols(E);
    Math::backward(c.routing, d_gates, d_logits);
    base.router_kernel.grad().noalias() += x.transpose() * d_logits;
    Matrix<T> dx = base.input_grad(dz);
    MOET_OMP(omp parallel for schedule(static) if (N * d_in() > 32768))
    for (Index t = 0; t < N; ++t)
      for (Index j = 0; j < K; ++j) dx.row(t) += d_expert_in.row(c.groups.slot_of[t * K + j]);
    return dx;
  }

  Options options_;
  T scale_;
  Matrix<T> dx_dv_;         // backward's largest temporary, kept so that steps do not fault its pages in again

 public:
  BOOST_HANA_DEFINE_STRUCT(LoraMixture,
                           (GradStorage<T>, up_grad_),  // (E*R, d_out): the gradient of B, until an arena takes it
                           (RoutedLinear<T>, base),  // W0, b (frozen) and the router kernel W_r (d_in, E)
                           (Param<T>, lora_down),    // A (d_in, E*R): expert e is columns [e R, (e+1) R)
                           (Param<T>, lora_up));     // B (E*R, d_out): expert e is rows [e R, (e+1) R)
};

}  // namespace moet::cpu_impl
