// The CUDA backend's own kernels, as plain launchers with runtime sizes. Their definitions are
// compiled once into the moet::cuda library (include/moet/cuda/kernels/*.cu), so a program that
// uses the CUDA layers is ordinary C++: it includes this header (through the layers) without
// nvcc, and without Eigen or Boost.Hana ever reaching nvcc. Every launcher checks its launch and
// throws moet::cuda_error naming the kernel.
//
// Shapes are row-major with row strides (ld). Routing runs in float32 whatever T is, one warp
// per routing row, with up to 256 experts and top-k up to 8 (checked by the layers).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "buffer.hpp"

namespace moet::cuda_impl {

inline constexpr int max_experts = 256;
inline constexpr int max_top_k = 8;

/// What a router keeps between forward and backward, on the device (float32 throughout).
struct RoutingState {
  std::int64_t rows = 0;  ///< routing rows (tokens, or tokens * heads for per-head IA3)
  int experts = 0;
  int k = 0;              ///< 0: Soft
  bool renorm = true;     ///< top-k gates renormalised over the K kept
  float* probs = nullptr;     ///< (rows, E) softmax over all experts
  float* gates = nullptr;     ///< (rows, E) mixing weights, zero where not selected
  int* selected = nullptr;    ///< (rows, K) chosen expert ids, best first (top-k only)
  float* lse = nullptr;       ///< (rows) logsumexp of the logits
  double* stats = nullptr;    ///< (2E + 1): routing slots per expert, sum of probs per expert, sum of lse^2
  double load_balance_weight = 0;
  double z_loss_weight = 0;
};

/// Routes `rows` rows of logits (ld apart); fills probs, gates, selected, lse and adds to stats
/// (which the caller zeroes first).
template <class L>
void route_forward(const L* logits, std::int64_t ld, const RoutingState& state, cudaStream_t stream);

/// MoLoRA's routing and gate scaling in one pass: row t of z holds the router logits at column
/// logits_col and U = x A at u_col (E*rank values); writes V = g_e * scale * U_e (rows, E*rank).
template <class T>
void lora_route_scale(const T* z, std::int64_t ld_z, std::int64_t logits_col, std::int64_t u_col, int rank, float scale,
                      T* v, std::int64_t ld_v, const RoutingState& state, cudaStream_t stream);

/// d(logits) from d(gates) (rows, E), aux-loss gradients included; d_logits (rows, E) overwritten.
template <class T>
void route_backward(const float* d_gates, std::int64_t ld_dg, const RoutingState& state, T* d_logits,
                    std::int64_t ld_dl, cudaStream_t stream);

/// MoLoRA's backward row pass: from dV (row t of dv, E*rank values) and U (row t of u) forms
/// dg_e = scale <dV_e, U_e> and dU_e = g_e scale dV_e, runs the router backward, and writes
/// d_right row t = [dU (E*rank) | d_logits (E) | zeros (pad)].
template <class T>
void lora_backward_rows(const T* dv, std::int64_t ld_dv, const T* u, std::int64_t ld_u, int rank, float scale,
                        const RoutingState& state, T* d_right, std::int64_t ld_dr, int pad, cudaStream_t stream);

/// The (IA)^3 merged-vector pass over an activation of `tokens` rows, `heads` heads of head_dim:
/// s(t, hd) = [1 +] sum_e g(t, hd)_e (l(hd, e) [- 1])   ("1 +" and "- 1" when the gates sum to one)
///   forward  (ds == nullptr): out = a * s                 (a = h)
///   backward (ds != nullptr): out = a * s, ds = a * b     (a = dy, b = h)
/// gates: (tokens * groups, E), groups = heads (per-head routing) or 1 (one gate row per token).
struct Ia3Shape {
  std::int64_t tokens = 0;
  int heads = 1, head_dim = 0, experts = 0, groups = 1;
  bool gates_sum_to_one = true;
};
template <class T>
void ia3_scale(const Ia3Shape& shape, const float* gates, const T* scales, const T* a, std::int64_t ld_a, const T* b,
               std::int64_t ld_b, T* out, std::int64_t ld_out, T* ds, std::int64_t ld_ds, cudaStream_t stream);

/// mix = l - 1 (subtract_one) or l, elementwise over n values.
template <class T>
void ia3_mix(const T* scales, std::int64_t n, bool subtract_one, T* mix, cudaStream_t stream);

/// dst (rows, cols) = src, converted from float.
template <class T>
void convert(const float* src, std::int64_t ld_src, std::int64_t rows, std::int64_t cols, T* dst, std::int64_t ld_dst,
             cudaStream_t stream);

}  // namespace moet::cuda_impl
