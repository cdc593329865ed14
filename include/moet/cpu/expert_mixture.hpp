// Mixture of any additive experts on the CPU: the path user-defined experts take.
//
//   z = x [W0 | W_r]  (one GEMM: frozen output and router logits),  g = route(logits)
//   y = z_y + b + sum_e g_e delta_e(x)
// Soft mixtures run every expert on all tokens; top-k mixtures group tokens by expert and run
// each expert on its rows only. Each expert's forward context is kept for its backward:
//   d delta_e = g_e dy,   dg_e = <dy, delta_e>,   dx = [dy | d_logits] [W0 | W_r]^T + sum_e dx_e
// Experts run one after another; each may use all threads inside its own GEMMs.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../core/backend.hpp"
#include "../core/visit.hpp"
#include "../common/mixture_init.hpp"
#include "../mixture.hpp"
#include "routed_linear.hpp"
#include "routing.hpp"

namespace moet::cpu_impl {

template <class Policy, class S, int E, class T>
class ExpertMixture {
  static_assert(std::is_floating_point_v<T>, "moet layers take float or double");
  using Spec = Mixture<Router<Policy>, Expert<S>, E>;
  using Math = RouterMath<Policy, T>;
  using Instance = typename S::template instance<T>;
  static constexpr int K = Policy::k;
  static constexpr bool grouped = K > 0;

 public:
  using Options = MixtureOptions<S>;
  using spec = Spec;  ///< the Mixture<...> this layer implements
  using Scalar = T;

  struct Context : RoutedContext<T> {
    Index tokens = 0, d_out = 0;
    Matrix<T> z;  // (tokens, d_out + E) = [y | logits]
    TokenGroups groups;                               // top-k only
    std::vector<Matrix<T>> inputs;                    // top-k only: each expert's gathered rows of x
    std::vector<typename Instance::Context> experts;  // (E)

    ConstMatrixView<T> output() const { return column_block<T>(z.data(), tokens, z.cols(), 0, d_out); }
  };

  static std::string name() { return Spec::name(); }

  ExpertMixture(In<T> weight, Rng& rng, const Options& options = {}) : ExpertMixture(Bias{}, weight, std::nullopt, rng, options) {}
  ExpertMixture(In<T> weight, In<T> bias, Rng& rng, const Options& options = {})
      : ExpertMixture(Bias{}, weight, std::optional<In<T>>(bias), rng, options) {}
  /// The device-first form every backend's layers share (the CPU's device is empty).
  template <class... Args>
  explicit ExpertMixture(CpuDevice, Args&&... args) : ExpertMixture(std::forward<Args>(args)...) {}
  ExpertMixture(ExpertMixture&&) noexcept = default;

  Index d_in() const { return base.d_in(); }
  Index d_out() const { return base.d_out(); }
  const Options& options() const { return options_; }
  Frozen<T>& frozen_weight() { return base.base_weight; }
  Frozen<T>& frozen_bias() { return base.base_bias; }

  /// rows: the token rows whose routing counts for the auxiliary losses (empty: all).
  Context forward(In<T> x, RowMask rows = {}) const {
    detail::expect_cols(name(), "input x", x.rows(), x.cols(), d_in(), "tokens x d_in");
    const Index N = x.rows(), D = d_out();
    Context c;
    c.tokens = N;
    c.d_out = D;
    base.forward(x, D + E, c.z);
    c.routing = Math::route(c.z.rightCols(E), options_.router, rows);
    if constexpr (grouped) {
      c.groups = TokenGroups::of(c.routing.selected, E);
      for (Index e = 0; e < E; ++e) c.inputs.push_back(c.groups.gather(x, e));
    }
    c.experts.reserve(E);
    for (Index e = 0; e < E; ++e) {
      c.experts.push_back(experts[e].forward(expert_input(c, x, e)));
      const auto delta = In<T>(c.experts[e].output());
      check_delta(delta, rows_of(c, e));
      for (Index i = 0; i < rows_of(c, e); ++i) {
        const Index t = token_of(c, e, i);
        c.z.row(t).head(D) += c.routing.gates(t, e) * delta.row(i);
      }
    }
    return c;
  }

  Matrix<T> backward(const Context& c, In<T> x, In<T> dy, GradMode mode) {
    detail::expect_shape(name(), "input x", x.rows(), x.cols(), c.tokens, d_in(), "the x given to forward");
    detail::expect_shape(name(), "output gradient dy", dy.rows(), dy.cols(), c.tokens, d_out(), "tokens x d_out");
    if (mode == GradMode::overwrite) zero_grad(*this);
    const Index N = c.tokens, D = d_out();
    Matrix<T> d_gates = Matrix<T>::Zero(N, E);
    std::vector<Matrix<T>> d_inputs(E);
    for (Index e = 0; e < E; ++e) {
      const Index n = rows_of(c, e);
      const auto delta = In<T>(c.experts[e].output());
      Matrix<T> d_delta(n, D);
      for (Index i = 0; i < n; ++i) {
        const Index t = token_of(c, e, i);
        d_gates(t, e) = dy.row(t).dot(delta.row(i));
        d_delta.row(i) = c.routing.gates(t, e) * dy.row(t);
      }
      d_inputs[e] = experts[e].backward(c.experts[e], expert_input(c, x, e), d_delta, GradMode::accumulate);
      detail::expect_shape(name(), "an expert's input gradient", d_inputs[e].rows(), d_inputs[e].cols(), n, d_in(),
                           "rows x d_in");
    }
    Matrix<T> dz(N, D + E);
    dz.leftCols(D) = dy;
    auto d_logits = dz.rightCols(E);
    Math::backward(c.routing, d_gates, d_logits);
    base.router_kernel.grad().noalias() += x.transpose() * d_logits;
    Matrix<T> dx = base.input_grad(dz);
    for (Index e = 0; e < E; ++e)
      for (Index i = 0; i < rows_of(c, e); ++i) dx.row(token_of(c, e, i)) += d_inputs[e].row(i);
    return dx;
  }

 private:
  struct Bias {};  // tags the delegated-to constructor
  ExpertMixture(Bias, In<T> weight, std::optional<In<T>> bias, Rng& rng, const Options& options)
      : options_(validated(options, weight)),
        base(name(), weight, bias, E, 0, 0, common::router_init(weight.rows(), E, options.router, rng)) {
    experts.reserve(E);
    for (Index e = 0; e < E; ++e) experts.emplace_back(ExpertShape{base.d_in(), base.d_out()}, options.expert, rng);
  }

  static const Options& validated(const Options& options, In<T> weight) {
    common::check_additive_mixture(name(), options, weight.rows(), weight.cols());
    return options;
  }

  static In<T> expert_input(const Context& c, In<T> x, Index e) {
    if constexpr (grouped) return In<T>(c.inputs[e]);
    else return x;
  }
  static Index rows_of(const Context& c, Index e) {
    if constexpr (grouped) return c.groups.count(e);
    else return c.tokens;
  }
  static Index token_of(const Context& c, Index e, Index i) {
    if constexpr (grouped) return c.groups.tokens[c.groups.offsets[e] + i];
    else return i;
  }
  void check_delta(In<T> delta, Index rows) const {
    detail::expect_shape(name(), "an expert's output", delta.rows(), delta.cols(), rows, d_out(), "rows x d_out");
  }

  Options options_;

 public:
  BOOST_HANA_DEFINE_STRUCT(ExpertMixture,
                           (RoutedLinear<T>, base),                // W0, b (frozen), router kernel (d_in, E)
                           (std::vector<Instance>, experts));     // E user experts
};

}  // namespace moet::cpu_impl
