// The CPU backend's map from specs to layer types.
#pragma once

#include "../expert.hpp"
#include "../mixture.hpp"
#include "expert_mixture.hpp"
#include "frozen_linear.hpp"
#include "ia3_mixture.hpp"
#include "lora_mixture.hpp"
#include "router_layer.hpp"

namespace moet {

namespace detail {
/// Stands in for the layer of a spec that already failed a static_assert, so that the one
/// readable message is not followed by a cascade.
struct invalid_layer {
  template <class... Args>
  explicit invalid_layer(Args&&...) {}
};
}  // namespace detail

template <class Policy, class S, int E, class T>
struct LayerFor<Mixture<Router<Policy>, Expert<S>, E>, T, cpu> {
  static auto pick() {
    if constexpr (detail::is_scaling_expert<S>) return std::type_identity<cpu_impl::Ia3Mixture<Policy, E, T>>{};
    else if constexpr (detail::is_lora<S>::value) return std::type_identity<cpu_impl::LoraMixture<Policy, S::rank, E, T>>{};
    else if constexpr (AdditiveExpert<S> && Policy::k <= E) return std::type_identity<cpu_impl::ExpertMixture<Policy, S, E, T>>{};
    else return std::type_identity<detail::invalid_layer>{};
  }
  using type = typename decltype(pick())::type;
};

template <class Policy, class T>
struct LayerFor<Router<Policy>, T, cpu> {
  using type = cpu_impl::RouterLayer<Policy, T>;
};

template <class T>
struct LayerFor<FrozenLinear, T, cpu> {
  using type = cpu_impl::FrozenLinear<T>;
};

}  // namespace moet
