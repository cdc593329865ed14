// Router specs. A router maps each token's representation r (width d_r) to logits z = r W_r
// (W_r: (d_r, E), no bias, init normal(0, 0.02)) and then to mixing weights g over E experts:
//   Soft          g = softmax(z)                       (soft merging, MoV/MoLoRA's default)
//   TopK<K>       keep the K largest softmax(z) values, renormalised over the K
//   TopK<K, Renorm::off>   keep them as they are (the original MoV code's choice)
// Optional auxiliary losses, each with a weight (0 = off), are added to the training objective
// by backward: Switch-style load balancing and the router z-loss. See docs/routers.md.
#pragma once

#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/util.hpp"

namespace moet {

/// Whether top-k gates are renormalised over the K kept experts.
enum class Renorm { on, off };

struct Soft {
  static constexpr int k = 0;                      // every expert
  static constexpr Renorm renorm = Renorm::on;     // the gates sum to one
  static std::string name() { return "Soft"; }
};

template <int K, Renorm Renormalise = Renorm::on>
struct TopK {
  static_assert(K >= 1, "TopK<K> needs K >= 1");
  static constexpr int k = K;
  static constexpr Renorm renorm = Renormalise;
  static std::string name() {
    return "TopK<" + std::to_string(K) + (Renormalise == Renorm::on ? "" : ", Renorm::off") + ">";
  }
};

namespace detail {
template <class P>
struct is_router_policy : std::false_type {};
template <>
struct is_router_policy<Soft> : std::true_type {};
template <int K, Renorm R>
struct is_router_policy<TopK<K, R>> : std::true_type {};
}  // namespace detail

template <class Policy>
struct Router {
  static_assert(detail::is_router_policy<Policy>::value, "moet::Router<Policy>: Policy must be moet::Soft or moet::TopK<K>");
  using policy = Policy;
  static std::string name() { return "Router<" + Policy::name() + ">"; }
};

namespace detail {
template <class X>
struct is_router : std::false_type {};
template <class P>
struct is_router<Router<P>> : std::true_type {};
}  // namespace detail

/// Runtime router settings.
struct RouterOptions {
  double load_balance_weight = 0.0;  ///< Switch load-balancing loss weight (0: off)
  double z_loss_weight = 0.0;        ///< router z-loss weight (0: off)
  /// Softmax (and its backward) in float32 whatever the activation type, as the MoV code does.
  /// Gradient checks in double turn it off.
  bool fp32_softmax = true;
  double init_stddev = 0.02;  ///< W_r ~ normal(0, init_stddev)

  void validate(const std::string& layer) const {
    if (!(load_balance_weight >= 0.0) || !(z_loss_weight >= 0.0) || !(init_stddev >= 0.0))
      throw value_error(detail::concat(layer, ": router loss weights and init_stddev must be finite and >= 0, got "
                                              "load_balance_weight=", load_balance_weight,
                                       " z_loss_weight=", z_loss_weight, " init_stddev=", init_stddev));
  }
};

namespace detail {
/// The checks every backend's router layer makes on its shape.
template <class Policy>
void check_router_shape(const std::string& layer, long d_in, long experts) {
  expect_positive(layer, "d_in", d_in);
  expect_positive(layer, "number of experts E", experts);
  if (Policy::k > experts) throw value_error(concat(layer, ": needs at least ", Policy::k, " experts, got ", experts));
}
}  // namespace detail

/// Values of the auxiliary losses of one forward pass, unweighted.
struct AuxLosses {
  double load_balance = 0.0;  ///< E * sum_i f_i P_i  (1 when perfectly balanced)
  double z_loss = 0.0;        ///< mean over rows of logsumexp(z)^2
};

/// What a router's forward sums over the rows that count (a padded batch's real tokens): every
/// backend gathers these and forms the auxiliary losses from them with aux_losses() below.
struct RoutingStatistics {
  const double* slots_per_expert = nullptr;  ///< (E) routing slots each expert received (top-1 for Soft)
  const double* probability_sums = nullptr;  ///< (E) sum over counted rows of softmax(z)_i
  double lse_squared = 0.0;                  ///< sum over counted rows of logsumexp(z)^2
  double rows = 0.0;                         ///< rows counted
};

/// The auxiliary losses of one pass, with f_i = slots_i / (rows K) and P_i = probability_sums_i / rows:
///   load_balance = E sum_i f_i P_i      z_loss = lse_squared / rows
/// `usage`, when given, receives f (size E). No counted rows: zero losses and usage.
inline AuxLosses aux_losses(int experts, int k, const RoutingStatistics& s, std::vector<double>* usage = nullptr) {
  AuxLosses a;
  if (usage) usage->assign(static_cast<std::size_t>(experts), 0.0);
  if (s.rows <= 0) return a;
  const double slots = s.rows * (k > 0 ? k : 1);
  for (int e = 0; e < experts; ++e) {
    const double f = s.slots_per_expert[e] / slots;
    if (usage) (*usage)[std::size_t(e)] = f;
    a.load_balance += double(experts) * f * s.probability_sums[e] / s.rows;
  }
  a.z_loss = s.lse_squared / s.rows;
  return a;
}

}  // namespace moet
