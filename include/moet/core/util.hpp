// Small shared helpers: the one runtime-to-compile-time dispatch helper (flash-attention's
// BOOL_SWITCH, as a function), the OpenMP pragma wrapper that compiles away without OpenMP, and
// the thread-count setter.
#pragma once

#include <string>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#define MOET_OMP(directive) _Pragma(#directive)
#else
#define MOET_OMP(directive)
#endif

#ifdef MOET_USE_OPENBLAS
extern "C" void openblas_set_num_threads(int);
#endif

#include <Eigen/Core>

#include <cstdlib>
#if defined(__linux__)
#include <unistd.h>
#endif

namespace moet {

namespace detail {

/// Calls f(std::true_type{}) or f(std::false_type{}), so a runtime flag becomes a template
/// argument once, at the API boundary.
template <class F>
decltype(auto) bool_switch(bool condition, F&& f) {
  if (condition) return f(std::true_type{});
  return f(std::false_type{});
}

/// Threads a parallel region may use, and this thread's number in one (0 outside).
inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace detail

/// Sets the threads used by moet's loops, Eigen and (when linked) OpenBLAS.
inline void set_num_threads(int threads) {
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  Eigen::setNbThreads(threads);
#ifdef MOET_USE_OPENBLAS
  openblas_set_num_threads(threads);
#endif
}

/// Idle OpenMP threads spin by default and steal the cores OpenBLAS (and the next parallel
/// region) are about to use, which can make small models several times slower. libgomp reads
/// OMP_WAIT_POLICY once at start-up, so this sets it to PASSIVE and restarts the program with
/// the same arguments (Linux); a policy the caller set is kept. Call it first thing in main.
inline void prefer_passive_openmp(char** argv) {
#if defined(_OPENMP) && defined(__linux__)
  if (!std::getenv("OMP_WAIT_POLICY")) {
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);  // returns only on failure: carry on as we are
  }
#else
  (void)argv;
#endif
}

}  // namespace moet
