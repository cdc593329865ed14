// Routing kernels: softmax / top-k over router logits in float32 (one warp per routing row,
// EPL experts per lane), the MoLoRA gate scaling fused into the same pass, and the router
// backward, fused into MoLoRA's backward row pass. The math is the CPU's (cpu/routing.hpp),
// including its tie rule (the lower expert id wins) and the order of its sums over the K kept.
#include <cfloat>
#include <climits>

#include "common.cuh"

namespace moet::cuda_impl {
namespace device {

constexpr int warps_per_block = 8;
constexpr int block_threads = 32 * warps_per_block;

/// One lane's share of the routing statistics of the rows its warp routes: the slots and the
/// probability sums of the experts it holds (lane + 32 i) and, in lane 0, the sum of lse^2.
/// Summed without floating-point atomics: each lane in row order, the block's warps in warp
/// order (BlockStats), the blocks in block order (sum_route_stats_kernel), so the statistics,
/// and the aux losses and gradients formed from them, are the same bits on every run.
template <int EPL>
struct LaneStats {
  double slots[EPL] = {}, probs[EPL] = {};
  double lse2 = 0.0;

  /// Adds one slot to `expert` (the lane holding it does).
  __device__ void add_slot(int expert, int lane) {
#pragma unroll
    for (int i = 0; i < EPL; ++i)
      if (lane + 32 * i == expert) slots[i] += 1.0;
  }
};

/// The block's statistics in shared memory: the warps add their lanes' shares one warp after
/// another, then the block writes them to its column of s.partials ((2E + 1) x blocks).
struct BlockStats {
  double values[2 * max_experts + 1];

  template <int EPL>
  __device__ void gather(const LaneStats<EPL>& mine, const RoutingState& s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, E = s.experts, n = 2 * s.experts + 1;
    for (int i = threadIdx.x; i < n; i += blockDim.x) values[i] = 0.0;
    __syncthreads();
    for (int w = 0; w < int(blockDim.x >> 5); ++w) {
      if (warp == w) {
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
          const int e = lane + 32 * i;
          if (e < E) {
            values[e] += mine.slots[i];
            values[E + e] += mine.probs[i];
          }
        }
        if (lane == 0) values[2 * E] += mine.lse2;
      }
      __syncthreads();
    }
    const std::int64_t blocks = gridDim.x;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s.partials[i * blocks + blockIdx.x] = values[i];
  }
};

/// Routes one row; leaves the row's gates in `gates_smem` (E floats, this warp's) as well.
template <int EPL, class L>
__device__ void route_row(const L* logits, const RoutingState& s, std::int64_t row, int lane, float* gates_smem,
                          LaneStats<EPL>& stats) {
  const int E = s.experts;
  const bool counts = !s.counted || s.counted[row / s.groups];  // rows that do not count add nothing to the statistics
  float p[EPL];
  float max_logit = -INFINITY;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    p[i] = e < E ? to_f(logits[e]) : -INFINITY;
    max_logit = fmaxf(max_logit, p[i]);
  }
  max_logit = warp_max(max_logit);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    p[i] = lane + 32 * i < E ? expf(p[i] - max_logit) : 0.f;
    sum += p[i];
  }
  sum = warp_sum(sum);
  const float inv = 1.f / sum;
#pragma unroll
  for (int i = 0; i < EPL; ++i) p[i] *= inv;
  const float lse = max_logit + logf(sum);

  float g[EPL];
  if (s.k == 0) {
    float best = -1.f;
    int best_index = INT_MAX;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      g[i] = p[i];
      const int e = lane + 32 * i;
      if (e < E && p[i] > best) {
        best = p[i];
        best_index = e;
      }
    }
    warp_argmax(best, best_index);
    if (best_index >= E) best_index = 0;  // every probability NaN: count somewhere valid (the output is NaN anyway)
    if (counts) stats.add_slot(best_index, lane);
  } else {
    unsigned chosen = 0;  // bit i: this lane's slot i is selected
    int selected[max_top_k];
    float kept = 0.f;
    for (int j = 0; j < s.k; ++j) {
      float best = -1.f;
      int best_index = INT_MAX;
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        const int e = lane + 32 * i;
        if (e < E && !((chosen >> i) & 1u) && p[i] > best) {
          best = p[i];
          best_index = e;
        }
      }
      warp_argmax(best, best_index);
      if (best_index >= E) best_index = j;  // NaN probabilities: a valid id, so that no index runs out of bounds
      selected[j] = best_index;
      kept += best;
      if ((best_index & 31) == lane) chosen |= 1u << (best_index >> 5);
    }
    const float scale = s.renorm ? 1.f / kept : 1.f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) g[i] = ((chosen >> i) & 1u) ? p[i] * scale : 0.f;
    for (int j = 0; j < s.k; ++j) {
      if (lane == 0) s.selected[row * s.k + j] = selected[j];
      if (counts) stats.add_slot(selected[j], lane);  // every lane knows the picks
    }
  }
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    if (e < E) {
      s.probs[row * E + e] = p[i];
      s.gates[row * E + e] = g[i];
      gates_smem[e] = g[i];
      if (counts) stats.probs[i] += double(p[i]);
    }
  }
  if (lane == 0) {
    s.lse[row] = lse;
    if (counts) stats.lse2 += double(lse) * double(lse);
  }
  __syncwarp();
}

/// d(logits) of one row from this lane's d(gates) values; aux-loss gradients included.
template <int EPL, class T>
__device__ void route_backward_row(const RoutingState& s, std::int64_t row, int lane, const float (&d_gates)[EPL],
                                   float* scratch_smem, T* d_logits) {
  const int E = s.experts;
  float p[EPL], dp[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    p[i] = e < E ? s.probs[row * E + e] : 0.f;
  }
  if (s.k == 0) {
#pragma unroll
    for (int i = 0; i < EPL; ++i) dp[i] = d_gates[i];
  } else {
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      if (e < E) scratch_smem[e] = d_gates[i];
      dp[i] = 0.f;
    }
    __syncwarp();
    const int* selected = s.selected + row * s.k;
    float kept = 0.f, weighted = 0.f;
    for (int j = 0; j < s.k; ++j) {
      const int e = selected[j];
      kept += s.probs[row * E + e];
      weighted += scratch_smem[e] * s.gates[row * E + e];
    }
    for (int j = 0; j < s.k; ++j) {
      const int e = selected[j];
      if ((e & 31) == lane) {
#pragma unroll
        for (int i = 0; i < EPL; ++i)
          if (i == (e >> 5)) dp[i] = s.renorm ? (d_gates[i] - weighted) / kept : d_gates[i];
      }
    }
    __syncwarp();
  }
  const bool aux = !s.counted || s.counted[row / s.groups];  // rows that do not count get no aux-loss gradient
  const float rows = float(s.counted_rows);
  if (aux && s.load_balance_weight != 0.0) {
    const float w = float(s.load_balance_weight) * float(E) / rows;
    const double slots = double(s.counted_rows) * double(s.k > 0 ? s.k : 1);
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      if (e < E) dp[i] += w * float(s.stats[e] / slots);
    }
  }
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) dot += dp[i] * p[i];
  dot = warp_sum(dot);
  const float z_coef = aux ? float(s.z_loss_weight) * 2.f / rows * s.lse[row] : 0.f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    if (e < E) d_logits[e] = from_f<T>(p[i] * (dp[i] - dot + z_coef));
  }
}

template <int EPL, class L>
__global__ void __launch_bounds__(block_threads) route_forward_kernel(const L* logits, std::int64_t ld, RoutingState s) {
  __shared__ BlockStats stats;
  __shared__ float gates[warps_per_block][max_experts];
  LaneStats<EPL> mine;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (std::int64_t row = std::int64_t(blockIdx.x) * warps_per_block + warp; row < s.rows;
       row += std::int64_t(gridDim.x) * warps_per_block)
    route_row<EPL>(logits + row * ld, s, row, lane, gates[warp], mine);
  stats.gather(mine, s);
}

template <int EPL, class T>
__global__ void __launch_bounds__(block_threads)
    lora_route_scale_kernel(const T* z, std::int64_t ld_z, std::int64_t logits_col, std::int64_t u_col, int rank,
                            float scale, T* v, std::int64_t ld_v, RoutingState s) {
  __shared__ BlockStats stats;
  __shared__ float gates[warps_per_block][max_experts];
  LaneStats<EPL> mine;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const std::int64_t width = std::int64_t(s.experts) * rank;
  for (std::int64_t row = std::int64_t(blockIdx.x) * warps_per_block + warp; row < s.rows;
       row += std::int64_t(gridDim.x) * warps_per_block) {
    const T* z_row = z + row * ld_z;
    route_row<EPL>(z_row + logits_col, s, row, lane, gates[warp], mine);
    const T* u = z_row + u_col;
    T* v_row = v + row * ld_v;
    for (std::int64_t c = lane; c < width; c += 32) v_row[c] = from_f<T>((gates[warp][c / rank] * scale) * to_f(u[c]));
    __syncwarp();
  }
  stats.gather(mine, s);
}

template <int EPL, class T>
__global__ void __launch_bounds__(block_threads)
    route_backward_kernel(const float* d_gates, std::int64_t ld_dg, RoutingState s, T* d_logits, std::int64_t ld_dl) {
  __shared__ float scratch[warps_per_block][max_experts];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (std::int64_t row = std::int64_t(blockIdx.x) * warps_per_block + warp; row < s.rows;
       row += std::int64_t(gridDim.x) * warps_per_block) {
    float dg[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      dg[i] = e < s.experts ? d_gates[row * ld_dg + e] : 0.f;
    }
    route_backward_row<EPL>(s, row, lane, dg, scratch[warp], d_logits + row * ld_dl);
  }
}

template <int EPL, class T>
__global__ void __launch_bounds__(block_threads)
    lora_backward_rows_kernel(const T* dv, std::int64_t ld_dv, const T* u, std::int64_t ld_u, int rank, float scale,
                              RoutingState s, T* d_right, std::int64_t ld_dr, int logits_pad, int u_pad) {
  __shared__ float scratch[warps_per_block][max_experts];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int E = s.experts;
  const std::int64_t u_col = E + logits_pad, width = std::int64_t(E) * rank;
  for (std::int64_t row = std::int64_t(blockIdx.x) * warps_per_block + warp; row < s.rows;
       row += std::int64_t(gridDim.x) * warps_per_block) {
    const T* dv_row = dv + row * ld_dv;
    const T* u_row = u + row * ld_u;
    T* dr_row = d_right + row * ld_dr;
    float dg[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      dg[i] = 0.f;
      if (e < E) {
        const float g = s.gates[row * E + e] * scale;
        float acc = 0.f;
        for (int j = 0; j < rank; ++j) {
          const float d = to_f(dv_row[e * rank + j]);
          acc += d * to_f(u_row[e * rank + j]);
          dr_row[u_col + e * rank + j] = from_f<T>(g * d);
        }
        dg[i] = scale * acc;
      }
    }
    route_backward_row<EPL>(s, row, lane, dg, scratch[warp], dr_row);
    for (int c = lane; c < logits_pad; c += 32) dr_row[E + c] = from_f<T>(0.f);
    for (int c = lane; c < u_pad; c += 32) dr_row[u_col + width + c] = from_f<T>(0.f);
  }
}

/// The grouped path's backward row pass: a warp per token; slot s = row K + j holds rank values
/// of dv and u (slot-indexed buffers).
template <int EPL, class T>
__global__ void __launch_bounds__(block_threads)
    lora_grouped_backward_rows_kernel(const T* dv, const T* u, int rank, float scale, RoutingState s, T* du, T* d_logits,
                                      std::int64_t ld_dl, int logits_pad) {
  __shared__ float scratch[warps_per_block][max_experts];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int E = s.experts;
  for (std::int64_t row = std::int64_t(blockIdx.x) * warps_per_block + warp; row < s.rows;
       row += std::int64_t(gridDim.x) * warps_per_block) {
    float dg[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) dg[i] = 0.f;
    for (int j = 0; j < s.k; ++j) {
      const std::int64_t slot = row * s.k + j;
      const int e = s.selected[slot];
      const float g = s.gates[row * E + e] * scale;
      float acc = 0.f;
      for (int r = lane; r < rank; r += 32) {
        const float d = to_f(dv[slot * rank + r]);
        acc += d * to_f(u[slot * rank + r]);
        du[slot * rank + r] = from_f<T>(g * d);
      }
      acc = warp_sum(acc);
#pragma unroll
      for (int i = 0; i < EPL; ++i)
        if (lane + 32 * i == e) dg[i] = scale * acc;
    }
    T* dl_row = d_logits + row * ld_dl;
    route_backward_row<EPL>(s, row, lane, dg, scratch[warp], dl_row);
    for (int c = lane; c < logits_pad; c += 32) dl_row[E + c] = from_f<T>(0.f);
  }
}

/// stats[i] += statistic i summed over the blocks' partials (a block per statistic, fixed order).
__global__ void __launch_bounds__(block_threads) sum_route_stats_kernel(RoutingState s, std::int64_t blocks) {
  __shared__ double scratch[32];
  const double* shares = s.partials + std::int64_t(blockIdx.x) * blocks;
  double v = 0.0;
  for (std::int64_t b = threadIdx.x; b < blocks; b += blockDim.x) v += shares[b];
  v = block_sum(v, scratch);
  if (threadIdx.x == 0) s.stats[blockIdx.x] += v;
}

__global__ void add_weighted_aux_kernel(RoutingState s, double* sum) {
  if (threadIdx.x != 0) return;
  const double rows = double(s.counted_rows);
  const double slots = rows * (s.k > 0 ? s.k : 1);
  double load_balance = 0.0;
  for (int e = 0; e < s.experts; ++e) {
    const double f = s.stats[e] / slots;
    load_balance += double(s.experts) * f * s.stats[s.experts + e] / rows;
  }
  sum[0] += s.load_balance_weight * load_balance + s.z_loss_weight * (s.stats[2 * s.experts] / rows);
}

/// Calls f(std::integral_constant<int, EPL>) for the smallest experts-per-lane that fits E.
template <class F>
void by_experts_per_lane(int experts, F&& f) {
  if (experts <= 32) f(std::integral_constant<int, 1>{});
  else if (experts <= 64) f(std::integral_constant<int, 2>{});
  else if (experts <= 128) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

static_assert(warps_per_block == 8, "routing_blocks (kernels.hpp) counts 8 rows a block");
inline unsigned routing_grid(std::int64_t rows) { return unsigned(routing_blocks(rows)); }

/// Adds the blocks' shares of the statistics into state.stats (after a routing kernel).
inline void sum_route_stats(const RoutingState& state, cudaStream_t stream) {
  MOET_LAUNCH(unsigned(2 * state.experts + 1), block_threads, 0, stream, sum_route_stats_kernel)(state, routing_blocks(state.rows));
  MOET_CUDA_CHECK_LAUNCH("sum_route_stats_kernel");
}

}  // namespace device

template <class L>
void route_forward(const L* logits, std::int64_t ld, const RoutingState& state, cudaStream_t stream) {
  if (state.rows == 0) return;
  device::by_experts_per_lane(state.experts, [&](auto epl) {
    MOET_LAUNCH(device::routing_grid(state.rows), device::block_threads, 0, stream,
                device::route_forward_kernel<decltype(epl)::value, L>)
    (logits, ld, state);
  });
  MOET_CUDA_CHECK_LAUNCH("route_forward_kernel");
  device::sum_route_stats(state, stream);
}

void add_weighted_aux(const RoutingState& state, double* sum, cudaStream_t stream) {
  if (state.counted_rows <= 0 || (state.load_balance_weight == 0.0 && state.z_loss_weight == 0.0)) return;
  MOET_LAUNCH(1, 32, 0, stream, device::add_weighted_aux_kernel)(state, sum);
  MOET_CUDA_CHECK_LAUNCH("add_weighted_aux_kernel");
}

template <class T>
void lora_route_scale(const T* z, std::int64_t ld_z, std::int64_t logits_col, std::int64_t u_col, int rank, float scale,
                      T* v, std::int64_t ld_v, const RoutingState& state, cudaStream_t stream) {
  if (state.rows == 0) return;
  device::by_experts_per_lane(state.experts, [&](auto epl) {
    MOET_LAUNCH(device::routing_grid(state.rows), device::block_threads, 0, stream,
                device::lora_route_scale_kernel<decltype(epl)::value, T>)
    (z, ld_z, logits_col, u_col, rank, scale, v, ld_v, state);
  });
  MOET_CUDA_CHECK_LAUNCH("lora_route_scale_kernel");
  device::sum_route_stats(state, stream);
}

template <class T>
void route_backward(const float* d_gates, std::int64_t ld_dg, const RoutingState& state, T* d_logits, std::int64_t ld_dl,
                    cudaStream_t stream) {
  if (state.rows == 0) return;
  device::by_experts_per_lane(state.experts, [&](auto epl) {
    MOET_LAUNCH(device::routing_grid(state.rows), device::block_threads, 0, stream,
                device::route_backward_kernel<decltype(epl)::value, T>)
    (d_gates, ld_dg, state, d_logits, ld_dl);
  });
  MOET_CUDA_CHECK_LAUNCH("route_backward_kernel");
}

template <class T>
void lora_backward_rows(const T* dv, std::int64_t ld_dv, const T* u, std::int64_t ld_u, int rank, float scale,
                        const RoutingState& state, T* d_right, std::int64_t ld_dr, int logits_pad, int u_pad,
                        cudaStream_t stream) {
  if (state.rows == 0) return;
  device::by_experts_per_lane(state.experts, [&](auto epl) {
    MOET_LAUNCH(device::routing_grid(state.rows), device::block_threads, 0, stream,
                device::lora_backward_rows_kernel<decltype(epl)::value, T>)
    (dv, ld_dv, u, ld_u, rank, scale, state, d_right, ld_dr, logits_pad, u_pad);
  });
  MOET_CUDA_CHECK_LAUNCH("lora_backward_rows_kernel");
}

template <class T>
void lora_grouped_backward_rows(const T* dv, const T* u, int rank, float scale, const RoutingState& state, T* du,
                                T* d_logits, std::int64_t ld_dl, int logits_pad, cudaStream_t stream) {
  if (state.rows == 0) return;
  device::by_experts_per_lane(state.experts, [&](auto epl) {
    MOET_LAUNCH(device::routing_grid(state.rows), device::block_threads, 0, stream,
                device::lora_grouped_backward_rows_kernel<decltype(epl)::value, T>)
    (dv, u, rank, scale, state, du, d_logits, ld_dl, logits_pad);
  });
  MOET_CUDA_CHECK_LAUNCH("lora_grouped_backward_rows_kernel");
}

#define MOET_INSTANTIATE_ROUTING(T)                                                                                    \
  template void route_forward<T>(const T*, std::int64_t, const RoutingState&, cudaStream_t);                          \
  template void lora_route_scale<T>(const T*, std::int64_t, std::int64_t, std::int64_t, int, float, T*, std::int64_t, \
                                    const RoutingState&, cudaStream_t);                                                \
  template void route_backward<T>(const float*, std::int64_t, const RoutingState&, T*, std::int64_t, cudaStream_t);   \
  template void lora_backward_rows<T>(const T*, std::int64_t, const T*, std::int64_t, int, float, const RoutingState&, \
                                      T*, std::int64_t, int, int, cudaStream_t);                                       \
  template void lora_grouped_backward_rows<T>(const T*, const T*, int, float, const RoutingState&, T*, T*, std::int64_t, \
                                              int, cudaStream_t);
MOET_INSTANTIATE_ROUTING(float)
MOET_INSTANTIATE_ROUTING(__nv_bfloat16)
MOET_INSTANTIATE_ROUTING(__half)
#undef MOET_INSTANTIATE_ROUTING

}  // namespace moet::cuda_impl
