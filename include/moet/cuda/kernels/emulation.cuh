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
//    the 48 KiB of dynamic shared memory available without an opt-in);
//  * the warp matrix functions (nvcuda::wmma, 16 x 16 x 16 tiles of bf16 / fp16 with float
//    accumulators) as documented: every lane holds the whole tile (a fragment's element layout
//    is unspecified, so kernels must not depend on it); load, mma and store wait for the whole
//    warp; a store writes only this lane's share of the tile (element e by lane e % 32), so a
//    lane that reads the stored tile without a __syncwarp in between sees the other lanes'
//    elements missing; pointers must be 32-byte aligned and ldm a multiple of 16 bytes, as the
//    device requires (a fault otherwise).
// The runtime half (cudart and cuBLASLt calls, the fiber scheduler) is tests/cuda/emulator/.
#pragma once

#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <cstddef>
#include <cstdint>
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
/// This thread's lane in its warp.
int lane();
/// Records a fault of the running kernel (what a device would report as a launch failure).
void kernel_fault(const char* what);
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

/// nvcuda::wmma's interface for the shapes moet uses (16 x 16 x 16, 16-bit inputs, float
/// accumulators); see the head of this file for what is emulated and how.
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has the 16 x 16 x 16 shape only");
  static constexpr int rows = 16, cols = 16;
  float v[rows * cols];  // the tile, row-major (bf16 and fp16 values are exact in float)
};

namespace detail {
template <class T>
void check_operands(const T* p, unsigned ldm) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) kernel_fault("a wmma load or store with a pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0) kernel_fault("a wmma load or store with ldm not a multiple of 16 bytes");
}
template <class T>
float to_float(const T& x) {
  return static_cast<float>(x);
}
}  // namespace detail

template <class Use, class T, class Layout, class S>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const S* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load names its memory layout");
  detail::check_operands(p, ldm);
  sync_warp();
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r * 16 + c] = detail::to_float(row ? p[r * ldm + c] : p[c * ldm + r]);
}

template <class T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float value) {
  for (float& x : f.v) x = value;
}

template <class A, class B, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, A, LA>& a,
              const fragment<matrix_b, 16, 16, 16, B, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  sync_warp();
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.v[i * 16 + k] * b.v[k * 16 + j];
      out[i * 16 + j] = s;
    }
  std::memcpy(d.v, out, sizeof out);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t layout) {
  detail::check_operands(p, ldm);
  sync_warp();
  for (int e = lane(); e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[e];
  }
}
}  // namespace wmma

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
