// Backend tags and device handles. A layer instance is made for a backend and a scalar type;
// implementations live in include/moet/<backend>/. The CUDA backend has its own folder and is
// never included by CPU-only builds.
//
// Every layer and model takes its backend's device handle as its first constructor argument:
// an empty `CpuDevice` on the CPU, a `CudaContext&` on CUDA. So a layer or model is built the
// same way on either backend, and code written once over a backend (include/moet/model/)
// constructs its layers without knowing which one it runs on. CPU layers also keep their
// device-less constructors as a shorthand.
#pragma once

namespace moet {

struct cpu {
  static constexpr const char* name = "cpu";
};

/// The CPU's device handle: nothing to hold.
struct CpuDevice {};

/// Maps a spec (Mixture<...>, Router<...>) to its layer type for scalar T on Backend. The
/// primary template is never valid: backends specialise it.
template <class Spec, class T, class Backend>
struct LayerFor {
  static_assert(sizeof(Spec) == 0, "moet: no layer implementation for this spec on this backend "
                                   "(include <moet/moet.hpp> for the CPU backend)");
};

template <class Spec, class T, class Backend = cpu>
using layer = typename LayerFor<Spec, T, Backend>::type;

/// The operations a model is written over (tensors, norms, attention, ...), supplied by each
/// backend for each storage type: ops<cpu, float> in cpu/ops.hpp. docs/design.md lists what a
/// backend provides.
template <class Backend, class T>
struct ops {
  static_assert(sizeof(T) == 0, "moet: no ops for this backend and scalar type "
                                "(include <moet/models.hpp> for the CPU backend's ops)");
};

}  // namespace moet
