// Kernels of the grouped top-k path (Dispatch::grouped, kernels.hpp explains the slot groups):
// a stable counting sort of the routing slots by (choice, expert), and the three per-expert
// products of a LoRA with rank R:
//   shrink  u[s] = in[t] M_e       (width -> R: x A_e forward, dy B_e^T backward)
//   expand  out[t] += v[s] M_e     (R -> cols: V B_e forward, dU A_e^T backward)
//   outer   out_e += small^T big   (the gradients dA_e and dB_e, summed over the expert's slots)
// All accumulate in float32 on CUDA cores, each slot's tile of one expert sharing the expert's
// matrix through shared memory. Nothing reads the slot counts on the host: grids are sized by
// the bounds in SlotGroups and surplus blocks return at once.
#include "common.cuh"

namespace moet::cuda_impl {
namespace device {

constexpr int grouped_threads = 128;
constexpr int max_groups = max_top_k * max_experts;

/// Per counting block: how many of its slots fall in each group.
__global__ void __launch_bounds__(grouped_threads * 2)
    group_count_kernel(const int* selected, SlotGroups g) {
  __shared__ int counts[max_groups];
  const int groups = g.k * g.experts;
  for (int i = threadIdx.x; i < groups; i += blockDim.x) counts[i] = 0;
  __syncthreads();
  const std::int64_t first = std::int64_t(blockIdx.x) * group_block_slots;
  for (int i = threadIdx.x; i < group_block_slots && first + i < g.slots; i += blockDim.x) {
    const std::int64_t slot = first + i;
    atomicAdd(&counts[int(slot % g.k) * g.experts + selected[slot]], 1);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < groups; i += blockDim.x) g.block_counts[std::int64_t(blockIdx.x) * groups + i] = counts[i];
}

/// One block: group offsets, each counting block's first position per group, and the tiles.
__global__ void __launch_bounds__(1024) group_scan_kernel(SlotGroups g, int count_blocks) {
  __shared__ int totals[max_groups + 1], tiles[max_groups + 1];
  const int groups = g.k * g.experts;
  for (int group = threadIdx.x; group < groups; group += blockDim.x) {
    int running = 0;
    for (int b = 0; b < count_blocks; ++b) {
      int& c = g.block_counts[std::int64_t(b) * groups + group];
      const int n = c;
      c = running;  // exclusive within the group; the scatter adds the group's offset
      running += n;
    }
    totals[group] = running;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // at most 2048 groups: a serial scan is a few microseconds
    int position = 0, tile = 0;
    for (int group = 0; group < groups; ++group) {
      const int n = totals[group];
      totals[group] = position;
      tiles[group] = tile;
      position += n;
      tile += (n + g.tile_size - 1) / g.tile_size;
    }
    totals[groups] = position;
    tiles[groups] = tile;
  }
  __syncthreads();
  for (int group = threadIdx.x; group <= groups; group += blockDim.x) g.offsets[group] = totals[group];
  for (int j = threadIdx.x; j <= g.k; j += blockDim.x) g.pass_tiles[j] = tiles[j * g.experts];
  for (int group = threadIdx.x; group < groups; group += blockDim.x) {
    const int n = totals[group + 1] - totals[group];
    for (int t = 0; t * g.tile_size < n; ++t) {
      g.tile_group[tiles[group] + t] = group;
      g.tile_begin[tiles[group] + t] = totals[group] + t * g.tile_size;
    }
  }
}

/// Per counting block: writes its slots into `order`, in slot order within each group.
__global__ void __launch_bounds__(grouped_threads * 2) group_scatter_kernel(const int* selected, SlotGroups g) {
  __shared__ short slot_group[group_block_slots];
  const int groups = g.k * g.experts;
  const std::int64_t first = std::int64_t(blockIdx.x) * group_block_slots;
  const int n = int(g.slots - first < group_block_slots ? g.slots - first : group_block_slots);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const std::int64_t slot = first + i;
    slot_group[i] = short(int(slot % g.k) * g.experts + selected[slot]);
  }
  __syncthreads();
  for (int group = threadIdx.x; group < groups; group += blockDim.x) {
    int position = g.offsets[group] + g.block_counts[std::int64_t(blockIdx.x) * groups + group];
    for (int i = 0; i < n; ++i)
      if (slot_group[i] == group) g.order[position++] = int(first + i);
  }
}

/// This block's tile: its group, first position and slot count; false for a surplus block.
struct Tile {
  int group = 0, begin = 0, count = 0;
};
__device__ __forceinline__ bool find_tile(const SlotGroups& g, int tile, int end_tile, Tile& out) {
  if (tile >= end_tile) return false;
  out.group = g.tile_group[tile];
  out.begin = g.tile_begin[tile];
  const int end = g.offsets[out.group + 1];
  out.count = end - out.begin < g.tile_size ? end - out.begin : g.tile_size;
  return true;
}

/// Stages the tile's slot ids and their tokens in shared memory (tile_size <= 32 threads write).
__device__ __forceinline__ void stage_tile(const SlotGroups& g, const Tile& tile, int* slots, std::int64_t* rows) {
  if (threadIdx.x < tile.count) {
    slots[threadIdx.x] = g.order[tile.begin + threadIdx.x];
    rows[threadIdx.x] = slots[threadIdx.x] / g.k;
  }
  __syncthreads();
}

template <class T>
__device__ __forceinline__ float expert_at(const ExpertMatrix<const T>& m, int e, std::int64_t r, std::int64_t c) {
  return to_f(m.data[e * m.expert_stride + r * m.row_stride + c * m.col_stride]);
}

/// Chunk of the reduced dimension staged per step: CL rows of M_e (CL x rank floats).
__host__ __device__ inline int shrink_chunk(int rank) { return rank >= 128 ? (8192 / rank < 1 ? 1 : 8192 / rank) : 64; }

/// One tile (<= tile_size slots of one expert) per block; each thread keeps up to four of the
/// tile's tile_size x rank <= 512 outputs.
template <class T>
__global__ void __launch_bounds__(grouped_threads)
    grouped_shrink_kernel(const T* in, std::int64_t ld_in, std::int64_t width, ExpertMatrix<const T> m, int rank,
                          SlotGroups g, T* u, const float* gates, float scale, T* v) {
  MOET_DYNAMIC_SHARED(float, smem);
  __shared__ std::int64_t rows[32];
  __shared__ int slots[32];
  Tile tile;
  if (!find_tile(g, blockIdx.x, g.pass_tiles[g.k], tile)) return;
  const int e = tile.group % g.experts, TS = g.tile_size, CL = shrink_chunk(rank);
  float* xs = smem;            // [TS][CL]
  float* ms = smem + TS * CL;  // [CL][rank]
  stage_tile(g, tile, slots, rows);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const int outputs = tile.count * rank;
  for (std::int64_t l0 = 0; l0 < width; l0 += CL) {
    const int cl = width - l0 < CL ? int(width - l0) : CL;
    __syncthreads();
    for (int i = threadIdx.x; i < TS * CL; i += blockDim.x) {
      const int s = i / CL, l = i % CL;
      xs[i] = s < tile.count && l < cl ? to_f(in[rows[s] * ld_in + l0 + l]) : 0.f;
    }
    // Consecutive threads read consecutive addresses of M_e: along r when its rows are
    // contiguous (A), along l when M_e is a transposed view (B^T in the backward).
    const bool along_r = m.col_stride == 1;
    for (int i = threadIdx.x; i < CL * rank; i += blockDim.x) {
      const int l = along_r ? i / rank : i % CL, r = along_r ? i % rank : i / CL;
      ms[l * rank + r] = l < cl ? expert_at(m, e, l0 + l, r) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int o = threadIdx.x + q * grouped_threads;
      if (o < outputs) {
        const int s = o / rank, r = o % rank;
        float a = acc[q];
        for (int l = 0; l < cl; ++l) a += xs[s * CL + l] * ms[l * rank + r];
        acc[q] = a;
      }
    }
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int o = threadIdx.x + q * grouped_threads;
    if (o < outputs) {
      const int s = o / rank, r = o % rank;
      const std::int64_t at = std::int64_t(slots[s]) * rank + r;
      u[at] = from_f<T>(acc[q]);
      if (v) v[at] = from_f<T>(gates[rows[s] * g.experts + e] * scale * to_f(from_f<T>(acc[q])));
    }
  }
}

constexpr int expand_cols = grouped_threads;  // a column per thread
constexpr int expand_rank_chunk = 64;

/// One tile of choice `pass` per blockIdx.x, expand_cols columns per blockIdx.y.
template <class T>
__global__ void __launch_bounds__(grouped_threads)
    grouped_expand_kernel(const T* v, ExpertMatrix<const T> m, std::int64_t cols, int rank, SlotGroups g, int pass, T* out,
                          std::int64_t ld_out) {
  __shared__ float ms[expand_rank_chunk][expand_cols];
  __shared__ float vs[32 * expand_rank_chunk];
  __shared__ std::int64_t rows[32];
  __shared__ int slots[32];
  Tile tile;
  if (!find_tile(g, g.pass_tiles[pass] + blockIdx.x, g.pass_tiles[pass + 1], tile)) return;
  const int e = tile.group % g.experts;
  const std::int64_t c = std::int64_t(blockIdx.y) * expand_cols + threadIdx.x;
  stage_tile(g, tile, slots, rows);
  float acc[32];
#pragma unroll
  for (int s = 0; s < 32; ++s) acc[s] = 0.f;
  for (int r0 = 0; r0 < rank; r0 += expand_rank_chunk) {
    const int rc = rank - r0 < expand_rank_chunk ? rank - r0 : expand_rank_chunk;
    __syncthreads();
    for (int i = threadIdx.x; i < tile.count * rc; i += blockDim.x) {
      const int s = i / rc, r = i % rc;
      vs[s * expand_rank_chunk + r] = to_f(v[std::int64_t(slots[s]) * rank + r0 + r]);
    }
    if (m.col_stride == 1) {  // B_e: a row of M_e is contiguous, a thread per column
      for (int r = 0; r < rc; ++r) ms[r][threadIdx.x] = c < cols ? expert_at(m, e, r0 + r, c) : 0.f;
    } else {  // A_e^T in the backward: its columns are contiguous, so consecutive threads walk r
      const std::int64_t c0 = std::int64_t(blockIdx.y) * expand_cols;
      for (int i = threadIdx.x; i < rc * expand_cols; i += blockDim.x) {
        const int r = i % rc, cc = i / rc;
        ms[r][cc] = c0 + cc < cols ? expert_at(m, e, r0 + r, c0 + cc) : 0.f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < 32; ++s)
      if (s < tile.count) {
        float a = acc[s];
        for (int r = 0; r < rc; ++r) a += vs[s * expand_rank_chunk + r] * ms[r][threadIdx.x];
        acc[s] = a;
      }
  }
  if (c < cols) {
#pragma unroll
    for (int s = 0; s < 32; ++s)
      if (s < tile.count) {
        T* y = out + rows[s] * ld_out + c;
        *y = from_f<T>(to_f(*y) + acc[s]);
      }
  }
}

constexpr int outer_rank_chunk = 16;

/// blockIdx.x: expand_cols columns, blockIdx.y: the expert, blockIdx.z: outer_rank_chunk ranks.
template <class T>
__global__ void __launch_bounds__(grouped_threads)
    grouped_outer_kernel(const T* small, int rank, const T* big, std::int64_t ld_big, std::int64_t cols, SlotGroups g,
                         ExpertMatrix<float> out, float beta) {
  const int e = blockIdx.y, r0 = blockIdx.z * outer_rank_chunk;
  const std::int64_t c = std::int64_t(blockIdx.x) * expand_cols + threadIdx.x;
  const int rc = rank - r0 < outer_rank_chunk ? rank - r0 : outer_rank_chunk;
  float acc[outer_rank_chunk];
#pragma unroll
  for (int r = 0; r < outer_rank_chunk; ++r) acc[r] = 0.f;
  for (int j = 0; j < g.k; ++j) {
    const int group = j * g.experts + e;
    for (int p = g.offsets[group]; p < g.offsets[group + 1]; ++p) {
      const std::int64_t slot = g.order[p];
      const float b = c < cols ? to_f(big[(slot / g.k) * ld_big + c]) : 0.f;
      const T* a = small + slot * rank + r0;
#pragma unroll
      for (int r = 0; r < outer_rank_chunk; ++r)
        if (r < rc) acc[r] += to_f(a[r]) * b;
    }
  }
  if (c >= cols) return;
#pragma unroll
  for (int r = 0; r < outer_rank_chunk; ++r)
    if (r < rc) {
      float& o = out.data[e * out.expert_stride + std::int64_t(r0 + r) * out.row_stride + c * out.col_stride];
      o = beta == 0.f ? acc[r] : beta * o + acc[r];
    }
}

}  // namespace device

void group_slots(const int* selected, const SlotGroups& groups, cudaStream_t stream) {
  if (groups.slots == 0) {
    MOET_CUDA_CHECK(cudaMemsetAsync(groups.offsets, 0, sizeof(int) * std::size_t(groups.k * groups.experts + 1), stream));
    MOET_CUDA_CHECK(cudaMemsetAsync(groups.pass_tiles, 0, sizeof(int) * std::size_t(groups.k + 1), stream));
    return;
  }
  const int blocks = int((groups.slots + group_block_slots - 1) / group_block_slots);
  MOET_LAUNCH(blocks, device::grouped_threads * 2, 0, stream, device::group_count_kernel)(selected, groups);
  MOET_CUDA_CHECK_LAUNCH("group_count_kernel");
  MOET_LAUNCH(1, 1024, 0, stream, device::group_scan_kernel)(groups, blocks);
  MOET_CUDA_CHECK_LAUNCH("group_scan_kernel");
  MOET_LAUNCH(blocks, device::grouped_threads * 2, 0, stream, device::group_scatter_kernel)(selected, groups);
  MOET_CUDA_CHECK_LAUNCH("group_scatter_kernel");
}

template <class T>
void grouped_shrink(const T* in, std::int64_t ld_in, std::int64_t width, ExpertMatrix<const T> m, int rank,
                    const SlotGroups& groups, T* u, const float* gates, float scale, T* v, cudaStream_t stream) {
  if (groups.slots == 0) return;
  const int chunk = device::shrink_chunk(rank);
  const std::size_t smem = sizeof(float) * std::size_t(groups.tile_size * chunk + chunk * rank);
  MOET_LAUNCH(groups.max_tiles, device::grouped_threads, smem, stream, device::grouped_shrink_kernel<T>)
  (in, ld_in, width, m, rank, groups, u, gates, scale, v);
  MOET_CUDA_CHECK_LAUNCH("grouped_shrink_kernel");
}

template <class T>
void grouped_expand(const T* v, ExpertMatrix<const T> m, std::int64_t cols, int rank, const SlotGroups& groups, T* out,
                    std::int64_t ld_out, cudaStream_t stream) {
  if (groups.slots == 0 || cols == 0) return;
  const dim3 grid(unsigned(groups.max_pass_tiles), unsigned((cols + device::expand_cols - 1) / device::expand_cols));
  for (int pass = 0; pass < groups.k; ++pass) {
    MOET_LAUNCH(grid, device::grouped_threads, 0, stream, device::grouped_expand_kernel<T>)
    (v, m, cols, rank, groups, pass, out, ld_out);
    MOET_CUDA_CHECK_LAUNCH("grouped_expand_kernel");
  }
}

template <class T>
void grouped_outer(const T* small, int rank, const T* big, std::int64_t ld_big, std::int64_t cols, const SlotGroups& groups,
                   ExpertMatrix<float> out, float beta, cudaStream_t stream) {
  if (cols == 0) return;
  const dim3 grid(unsigned((cols + device::expand_cols - 1) / device::expand_cols), unsigned(groups.experts),
                  unsigned((rank + device::outer_rank_chunk - 1) / device::outer_rank_chunk));
  MOET_LAUNCH(grid, device::grouped_threads, 0, stream, device::grouped_outer_kernel<T>)
  (small, rank, big, ld_big, cols, groups, out, beta);
  MOET_CUDA_CHECK_LAUNCH("grouped_outer_kernel");
}

#define MOET_INSTANTIATE_GROUPED(T)                                                                                          \
  template void grouped_shrink<T>(const T*, std::int64_t, std::int64_t, ExpertMatrix<const T>, int, const SlotGroups&, T*, \
                                  const float*, float, T*, cudaStream_t);                                                   \
  template void grouped_expand<T>(const T*, ExpertMatrix<const T>, std::int64_t, int, const SlotGroups&, T*, std::int64_t,  \
                                  cudaStream_t);                                                                            \
  template void grouped_outer<T>(const T*, int, const T*, std::int64_t, std::int64_t, const SlotGroups&, ExpertMatrix<float>, \
                                 float, cudaStream_t);
MOET_INSTANTIATE_GROUPED(float)
MOET_INSTANTIATE_GROUPED(__nv_bfloat16)
MOET_INSTANTIATE_GROUPED(__half)
#undef MOET_INSTANTIATE_GROUPED

}  // namespace moet::cuda_impl
