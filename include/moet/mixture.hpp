// Mixture<RouterSpec, ExpertSpec, E>: an empty type describing a mixture of E experts; its
// layer for a scalar type and backend holds the numbers:
//
//   using MoLoRA = moet::Mixture<moet::Router<moet::TopK<2>>, moet::Expert<moet::LoRA<8>>, 16>;
//   MoLoRA::layer<float> mix(W0, rng, {.expert = {.alpha = 16}});
//
// Additive experts (LoRA, user-defined) wrap a frozen linear layer W0 (d_in, d_out) with an
// optional frozen bias:  y = x W0 + b + sum_i g_i(x) delta_i(x).
// IA3 experts scale an activation: y = h * sum_i g_i(r) l_i, r = h by default.
#pragma once

#include <string>

#include "core/backend.hpp"
#include "expert.hpp"
#include "router.hpp"

namespace moet {

/// Spec of a frozen linear layer y = x W0 + b (the base every additive mixture wraps).
struct FrozenLinear {
  static std::string name() { return "FrozenLinear"; }
};

/// How a top-k mixture of LoRA experts computes the experts (see docs/design.md).
enum class Dispatch {
  automatic,  ///< by the cost model
  dense,      ///< every expert on every token, inside the fused GEMMs; unselected gates are 0
  grouped,    ///< only the chosen experts: tokens gathered per expert
};

/// Whether a mixture with top-k routing (k > 0; Soft routing is always dense) runs grouped: as
/// asked, or as the backend's cost model prefers when asked for `automatic`.
constexpr bool runs_grouped(int k, Dispatch dispatch, bool cost_model_prefers_grouped) {
  if (k == 0) return false;
  return dispatch == Dispatch::automatic ? cost_model_prefers_grouped : dispatch == Dispatch::grouped;
}

/// Runtime settings of a mixture layer.
template <class S>
struct MixtureOptions {
  typename S::Options expert{};
  RouterOptions router{};
  Dispatch dispatch = Dispatch::automatic;
};

namespace detail {
template <class X>
struct spec_of {
  using type = void;
};
template <class S>
struct spec_of<Expert<S>> {
  using type = typename Expert<S>::spec;
};

template <class R>
constexpr int router_k() {
  if constexpr (is_router<R>::value) return R::policy::k;
  else return 0;
}
}  // namespace detail

template <class RouterSpec, class ExpertSpec, int E>
struct Mixture {
  static_assert(detail::is_router<RouterSpec>::value,
                "moet::Mixture<RouterSpec, ExpertSpec, E>: RouterSpec must be moet::Router<Soft> or moet::Router<TopK<K>>");
  static_assert(detail::is_expert<ExpertSpec>::value,
                "moet::Mixture<RouterSpec, ExpertSpec, E>: ExpertSpec must be moet::Expert<...>");
  static_assert(E >= 1, "moet::Mixture needs at least one expert");
  static_assert(detail::router_k<RouterSpec>() <= E, "TopK<K> needs at least K experts in the mixture");

  using router = RouterSpec;
  using expert = ExpertSpec;
  /// Naming the spec instantiates Expert<S>, whose static_assert checks the concept once.
  using expert_spec = typename detail::spec_of<ExpertSpec>::type;
  static constexpr int experts = E;

  static std::string name() {
    return "Mixture<" + RouterSpec::name() + ", " + ExpertSpec::name() + ", " + std::to_string(E) + ">";
  }

  template <class T, class Backend = cpu>
  using layer = moet::layer<Mixture, T, Backend>;
};

}  // namespace moet
