// The gradient harness on whole models (decoders, composed models): a model bound to one batch,
// and the model options the double-precision checks use.
#pragma once

#include <moet/model.hpp>

#include "harness.hpp"

namespace moet::testing {

/// Model options for gradient checks in double: the softmax in double, both aux losses on.
inline ModelOptions double_model_options() {
  ModelOptions o;
  o.router.fp32_softmax = false;
  o.router.load_balance_weight = 0.01;
  o.router.z_loss_weight = 0.001;
  return o;
}

/// A whole model on one batch: the harness through bind_batch, tensors sampled to at most
/// `max_entries` entries each.
template <class Model, class Batch, class Inputs>
GradReport check_model_gradients(Model& model, Rng& rng, const Batch& batch, Inputs inputs, Index max_entries = 30) {
  auto bound = bind_batch(model, model.geometry(batch));
  GradCheckOptions o;
  o.max_entries_per_tensor = max_entries;
  if constexpr (requires { std::tuple_size<Inputs>::value; }) return check_gradients(bound, rng, std::move(inputs), o);
  else return check_gradients(bound, rng, std::make_tuple(Matrix<double>(std::move(inputs))), o);
}

}  // namespace moet::testing
