// Backend tags. A layer instance is made for a backend and a scalar type; implementations live
// in include/moet/<backend>/. The CUDA backend arrives with its own folder and is never included
// by CPU-only builds.
#pragma once

namespace moet {

struct cpu {
  static constexpr const char* name = "cpu";
};

/// Maps a spec (Mixture<...>, Router<...>) to its layer type for scalar T on Backend. The
/// primary template is never valid: backends specialise it.
template <class Spec, class T, class Backend>
struct LayerFor {
  static_assert(sizeof(Spec) == 0, "moet: no layer implementation for this spec on this backend "
                                   "(include <moet/moet.hpp> for the CPU backend)");
};

template <class Spec, class T, class Backend = cpu>
using layer = typename LayerFor<Spec, T, Backend>::type;

}  // namespace moet
