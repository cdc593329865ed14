// Device helpers shared by the kernel translation units: conversions to and from float, warp
// reductions, and the launch-shape helpers. Only kernels/*.cu include this.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels.hpp"

// Kernel launches and dynamic shared memory go through these two macros so that the host
// emulation (emulation.cuh, tests only) can run the same sources on a CPU.
#ifdef MOET_CUDA_EMULATION
#include "emulation.cuh"
namespace moet::cuda_impl::device {
namespace wmma = ::moet::cuda_emulation::wmma;
}
#else
#include <mma.h>
namespace moet::cuda_impl::device {
namespace wmma = ::nvcuda::wmma;
}
#define MOET_LAUNCH(grid, block, shared, stream, ...) __VA_ARGS__<<<grid, block, shared, stream>>>
#define MOET_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace moet::cuda_impl::device {

constexpr unsigned full_mask = 0xffffffffu;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <class T>
__device__ __forceinline__ T from_f(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else return __float2half_rn(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(full_mask, v, offset);
  return v;
}

template <class V>
__device__ __forceinline__ V warp_sum_any(V v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(full_mask, v, offset);
  return v;
}

/// The block's sum of v (every thread gets it), in a fixed order (each warp's butterfly, then
/// the warps in order): the same bits on every run. scratch: 32 values of shared memory.
template <class V>
__device__ V block_sum(V v, V* scratch) {
  v = warp_sum_any(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  V total = V(0);
  const int warps = int((blockDim.x + 31) >> 5);
  for (int i = 0; i < warps; ++i) total += scratch[i];
  return total;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(full_mask, v, offset));
  return v;
}

/// The largest value, ties to the lower index; every lane ends with the same (value, index).
__device__ __forceinline__ void warp_argmax(float& value, int& index) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_value = __shfl_xor_sync(full_mask, value, offset);
    const int other_index = __shfl_xor_sync(full_mask, index, offset);
    if (other_value > value || (other_value == value && other_index < index)) {
      value = other_value;
      index = other_index;
    }
  }
}

inline unsigned grid_for(std::int64_t work, int per_block, unsigned cap = 65535u * 8u) {
  const std::int64_t blocks = (work + per_block - 1) / per_block;
  return unsigned(blocks < 1 ? 1 : (blocks > std::int64_t(cap) ? cap : blocks));
}

}  // namespace moet::cuda_impl::device
