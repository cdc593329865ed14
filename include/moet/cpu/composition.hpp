// CALM on the CPU: the composed model written once in model/composition.hpp over ops<cpu, T>,
// with the CPU's composition layer (composition_layer.hpp).
#pragma once

#include "../model/composition.hpp"
#include "composition_layer.hpp"
#include "decoder.hpp"
#include "ops.hpp"

namespace moet {
/// The CPU's composed decoding cache.
template <class T>
using ComposedCache = model_impl::ComposedCache<ops<cpu, T>>;
}  // namespace moet
