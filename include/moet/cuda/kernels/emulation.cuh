// Host emulation of the few CUDA device features moet's kernels use, so that the very same
// kernel sources (kernels/*.cu) can be compiled by the host compiler and run on a CPU. This is a
// test device, not a backend: it exists so that machines without a GPU (CI, most development
// sessions) still execute every kernel and every launch of the CUDA backend against the CPU
// layers (tests/cuda/emulator, `test_cuda_layers_emulated`).
//
// Compiled only with MOET_CUDA_EMULATION defined (common.cuh includes it after the CUDA headers
// and then re-defines the execution-space keywords). Semantics:
//  * each block runs on its own, one after another; its threads are cooperative fibers that
//    switch at __syncthreads, __syncwarp and warp shuffles, so block barriers and warp
//    exchanges behave as on the device (a barrier completes when every thread that has not
//    exited reaches it; a barrier that can never complete is reported as a deadlock); the
//    threads of a block run in a shuffled order (fixed seed), so a read of another thread's
//    shared value without the barrier in between usually sees the wrong value;
//  * `__shared__` variables are function statics (one copy, shared by the block running now);
//    dynamic shared memory and freshly allocated device memory start filled with 0xff bytes
//    (NaN for float, bf16 and fp16) so that a read before a write shows up in the results;
//  * launch configurations are validated as the device would (threads per block, grid limits,
//    the 48 KiB of dynamic shared memory available without an opt-in).
// The runtime half (cudart and cuBLASLt calls, the fiber scheduler) is tests/cuda/emulator/.
#pragma once

#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <cstddef>
#include <cstring>
#include <functional>
#include <type_traits>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace moet::cuda_emulation {

/// Where the emulated thread that runs now is.
struct Coordinates {
  uint3 thread{}, block{};
  dim3 block_dim, grid_dim;
};

const Coordinates& coordinates();
void sync_block();
void sync_warp();
/// Writes `bytes` of this lane's `value`, waits for the warp, reads lane (this lane ^ lane_mask).
void exchange_xor(const void* value, void* out, std::size_t bytes, int lane_mask);
void* dynamic_shared();
/// Whether p is null or inside (or one past) a live device allocation.
bool is_device_pointer(const void* p);
/// Records the fault of a launch whose argument `index` points outside device memory.
void host_pointer_argument(const char* kernel, int index);
/// Forgets a reported fault, which is otherwise sticky as on a device (the emulation's self-test).
void clear_faults();
/// Runs `body` on every thread of every block; returns (and records for cudaGetLastError) the
/// error a device would give for this configuration, without running anything then.
cudaError_t run(const char* kernel, dim3 grid, dim3 block, std::size_t shared_bytes, cudaStream_t stream,
                const std::function<void()>& body);

template <class V>
V shfl_xor(unsigned /*mask*/, V value, int lane_mask) {
  static_assert(sizeof(V) <= 8, "shuffles move at most 8 bytes");
  V out;
  exchange_xor(&value, &out, sizeof(V), lane_mask);
  return out;
}

/// The blocks of a grid run one after another, and a block's fibers never run at once, so a
/// plain read-modify-write is atomic here.
template <class T, class V>
T atomic_add(T* address, V value) {
  const T old = *address;
  *address = old + T(value);
  return old;
}

template <class Kernel>
struct Launch {
  const char* name;
  dim3 grid, block;
  std::size_t shared;
  cudaStream_t stream;
  Kernel kernel;

  template <class... Args>
  void operator()(Args&&... args) const {
    int index = 0;
    bool host_pointer = false;
    (
        [&](const auto& arg) {
          if constexpr (std::is_pointer_v<std::decay_t<decltype(arg)>>)
            if (!host_pointer && !is_device_pointer(arg)) {
              host_pointer_argument(name, index);
              host_pointer = true;
            }
          ++index;
        }(args),
        ...);
    if (!host_pointer) run(name, grid, block, shared, stream, [&] { kernel(args...); });
  }
};

template <class Kernel>
Launch<Kernel> launch(const char* name, dim3 grid, dim3 block, std::size_t shared, cudaStream_t stream, Kernel kernel) {
  return {name, grid, block, shared, stream, kernel};
}

}  // namespace moet::cuda_emulation

#define threadIdx (::moet::cuda_emulation::coordinates().thread)
#define blockIdx (::moet::cuda_emulation::coordinates().block)
#define blockDim (::moet::cuda_emulation::coordinates().block_dim)
#define gridDim (::moet::cuda_emulation::coordinates().grid_dim)
#define __syncthreads() ::moet::cuda_emulation::sync_block()
#define __syncwarp(...) ::moet::cuda_emulation::sync_warp()
#define __shfl_xor_sync ::moet::cuda_emulation::shfl_xor
#define atomicAdd ::moet::cuda_emulation::atomic_add

#define MOET_LAUNCH(grid, block, shared, stream, ...) \
  ::moet::cuda_emulation::launch(#__VA_ARGS__, grid, block, shared, stream, __VA_ARGS__)
#define MOET_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::moet::cuda_emulation::dynamic_shared())
