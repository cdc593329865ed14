// The CUDA backend tag. This header includes no CUDA header, so code that only names the tag
// (a spec, a template argument) compiles anywhere; the layers themselves are in
// <moet/cuda/layers.hpp>, which needs the CUDA toolkit's headers and the moet::cuda library.
#pragma once

#include "../core/backend.hpp"

namespace moet {

struct cuda {
  static constexpr const char* name = "cuda";
};

}  // namespace moet
