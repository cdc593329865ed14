// Gradient clipping by global norm (as torch.nn.utils.clip_grad_norm_): every trainable gradient
// of `model` is scaled by max_norm / (norm + 1e-6) when the norm of all of them together exceeds
// max_norm.
#pragma once

#include <cmath>

#include "../core/param.hpp"
#include "../core/visit.hpp"

namespace moet {

struct ClipResult {
  double norm = 0;  ///< the global norm before clipping
  bool clipped = false;
};

/// The rule: scale when max_norm > 0 and the norm is finite and above it.
inline bool clip_applies(double norm, double max_norm) { return max_norm > 0 && std::isfinite(norm) && norm > max_norm; }

/// What a training step reads after its backward (ops<Backend, T>::finish_step).
struct StepNumbers {
  double loss = 0;      ///< the language-model loss
  double aux_loss = 0;  ///< the routers' weighted aux losses
  ClipResult clip;
};

/// max_norm <= 0: only measures. A norm that is not finite scales nothing (a training step
/// refuses or skips it: model/decoder.hpp). On a model with a gradient arena (core/arena.hpp) the norm is
/// one pass over it, summed in double, and so is the scaling; a layer on its own is walked tensor
/// by tensor. `scale` multiplies every gradient first (gradient accumulation's 1 / parts), in the
/// same pass as the clipping: the norm reported and compared with max_norm is the scaled one.
namespace detail {
template <class Model>
ClipResult clip_on_host(Model& model, double max_norm, double scale) {
  constexpr bool arena = requires { model.gradient_arena().all(); };
  ClipResult r;
  double sq = 0;
  if constexpr (arena) {
    sq = model.gradient_arena().all().template cast<double>().square().sum();
  } else {
    for_each_param(model, [&](auto& p) { sq += double(p.grad().squaredNorm()); });
  }
  r.norm = std::sqrt(sq) * scale;
  double factor = scale;
  if (clip_applies(r.norm, max_norm)) {
    factor *= max_norm / (r.norm + 1e-6);
    r.clipped = true;
  }
  if (factor == 1.0) return r;
  if constexpr (arena) {
    auto all = model.gradient_arena().all();
    all *= static_cast<typename decltype(all)::Scalar>(factor);
  } else {
    for_each_param(model, [&](auto& p) { p.grad() *= static_cast<typename std::remove_reference_t<decltype(p)>::Scalar>(factor); });
  }
  return r;
}

}  // namespace detail

template <class Model>
ClipResult clip_grad_norm(Model& model, double max_norm, double scale = 1.0) {
  if constexpr (requires { model.gradient_arena().clip(max_norm, scale); })
    return model.gradient_arena().clip(max_norm, scale);  // a device arena (cuda/ops.hpp): the same rule, on the device
  else
    return detail::clip_on_host(model, max_norm, scale);
}

}  // namespace moet
