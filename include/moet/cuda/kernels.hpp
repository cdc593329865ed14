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
  /// (routing_blocks(rows), 2E + 1): each block's share of stats, added into stats in block order
  /// by the routing call (no floating-point atomics: the sums are the same bits on every run).
  double* partials = nullptr;
  double load_balance_weight = 0;
  double z_loss_weight = 0;
  /// Rows that count for the aux losses (a padded batch's real tokens): routing row r counts when
  /// counted[r / groups] is 1; nullptr: every row. counted_rows is their number.
  const unsigned char* counted = nullptr;
  int groups = 1;
  std::int64_t counted_rows = 0;
};

/// How many blocks the routing kernels run for `rows` routing rows (a warp per row, 8 warps a
/// block, at most 8192 blocks): the rows of RoutingState::partials.
inline std::int64_t routing_blocks(std::int64_t rows) {
  const std::int64_t blocks = (rows + 7) / 8;
  return blocks < 1 ? 1 : (blocks > 8192 ? 8192 : blocks);
}

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

/// *sum += load_balance_weight * load_balance + z_loss_weight * z_loss from the state's statistics,
/// on the device (router.hpp's aux_losses formula, in double and in its order); nothing when no
/// row counted or both weights are zero. Lets a pass sum its aux losses without reading them.
void add_weighted_aux(const RoutingState& state, double* sum, cudaStream_t stream);

/// MoLoRA's backward row pass: from dV (row t of dv, E*rank values) and U (row t of u) forms
/// dg_e = scale <dV_e, U_e> and dU_e = g_e scale dV_e, runs the router backward, and writes
/// row t of d_right = [d_logits (E) | zeros (logits_pad) | dU (E*rank) | zeros (u_pad)].
template <class T>
void lora_backward_rows(const T* dv, std::int64_t ld_dv, const T* u, std::int64_t ld_u, int rank, float scale,
                        const RoutingState& state, T* d_right, std::int64_t ld_dr, int logits_pad, int u_pad,
                        cudaStream_t stream);

// --- top-k mixtures computed per expert (Dispatch::grouped) -----------------------------------
// A routing slot is one (token t, choice j) pair, numbered s = t K + j like the rows of
// RoutingState::selected. Slots are grouped by (j, expert): group j E + e, so that the slots of
// one choice j touch each token once and their results can be added into a token's row without
// atomics (one launch per j). Within a group, slots keep token order (a stable counting sort),
// so every sum over a group runs in the same order on every run.

/// The grouping, on the device. Tiles are runs of at most tile_size slots of one group, in group
/// order; the tiles of choice j are [pass_tiles[j], pass_tiles[j + 1]).
struct SlotGroups {
  int k = 0, experts = 0, tile_size = 0;
  std::int64_t slots = 0;      ///< tokens * k
  int max_tiles = 0;           ///< bound on the tile count, known on the host: ceil(slots / tile_size) + groups
  int max_pass_tiles = 0;      ///< bound on the tiles of one choice: ceil(tokens / tile_size) + experts
  int* order = nullptr;        ///< (slots) slot ids in group order
  int* offsets = nullptr;      ///< (k E + 1) first position of each group in `order`
  int* tile_group = nullptr;   ///< (max_tiles)
  int* tile_begin = nullptr;   ///< (max_tiles) first position in `order`
  int* pass_tiles = nullptr;   ///< (k + 1)
  int* block_counts = nullptr; ///< scratch: (count blocks, k E)
};
inline constexpr int group_block_slots = 1024;  ///< slots each counting block handles
/// The tile size for a rank: a tile's outputs (tile_size * rank) stay within 512.
inline int grouped_tile_size(int rank) { return rank >= 512 ? 1 : (512 / rank < 32 ? 512 / rank : 32); }

/// Fills order, offsets and the tiles from selected (tokens, k): three small kernels, no host sync.
void group_slots(const int* selected, const SlotGroups& groups, cudaStream_t stream);

/// An expert's (rows, cols) matrix inside a wider buffer: element (r, c) of expert e is
/// data[e expert_stride + r row_stride + c col_stride]. Lets one kernel read A (d_in, R), its
/// transpose, B (R, d_out) or its transpose where they sit in the layer's fused buffer.
template <class T>
struct ExpertMatrix {
  T* data = nullptr;
  std::int64_t expert_stride = 0, row_stride = 0, col_stride = 0;
};

/// For every slot s = t K + j of expert e: u[s] = in[t] M_e (rank values; in has `width`
/// columns, M_e is (width, rank)); with gates (tokens, E): v[s] = gates[t, e] scale u[s] too.
template <class T>
void grouped_shrink(const T* in, std::int64_t ld_in, std::int64_t width, ExpertMatrix<const T> m, int rank,
                    const SlotGroups& groups, T* u, const float* gates, float scale, T* v, cudaStream_t stream);

/// out[t] += v[s] M_e for every slot s = t K + j of expert e (M_e is (rank, cols)): one launch
/// per choice j, so no two writers share a row.
template <class T>
void grouped_expand(const T* v, ExpertMatrix<const T> m, std::int64_t cols, int rank, const SlotGroups& groups, T* out,
                    std::int64_t ld_out, cudaStream_t stream);

/// Per expert e, over its slots in group order: out_e(r, c) = beta out_e(r, c) + sum_s small[s, r] big[t, c]
/// (out_e is (rank, cols) float32, addressed like ExpertMatrix). Gradients dA and dB.
template <class T>
void grouped_outer(const T* small, int rank, const T* big, std::int64_t ld_big, std::int64_t cols, const SlotGroups& groups,
                   ExpertMatrix<float> out, float beta, cudaStream_t stream);

/// The grouped backward row pass: per token and choice, dg = scale <dv[s], u[s]> and
/// du[s] = g scale dv[s]; then the router backward into d_logits (tokens, E), whose row is padded
/// with logits_pad zeros.
template <class T>
void lora_grouped_backward_rows(const T* dv, const T* u, int rank, float scale, const RoutingState& state, T* du,
                                T* d_logits, std::int64_t ld_dl, int logits_pad, cudaStream_t stream);

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

/// AdamW's per-step scalars (optim/adamw.hpp), in float32.
struct AdamWCoefficients {
  float lr = 0, beta1 = 0, beta2 = 0, eps = 0;
  float decay = 1;                       ///< 1 - lr * weight_decay
  float correction1 = 1, correction2 = 1;  ///< 1 - beta^t
};

/// One AdamW step of a (rows, cols) parameter: master (float32, contiguous; may alias value
/// when T is float), moments m and v (float32, contiguous) updated from grad; value = master in T.
template <class T>
void adamw_update(T* value, std::int64_t ld_value, const float* grad, std::int64_t ld_grad, float* master, float* m, float* v,
                  std::int64_t rows, std::int64_t cols, const AdamWCoefficients& k, cudaStream_t stream);

/// One parameter tensor of a multi-tensor AdamW step: values (T, row stride ld_value), float32
/// gradient (ld_grad), master copy and moments (float32, contiguous rows x cols).
template <class T>
struct AdamWTensor {
  T* value;
  std::int64_t ld_value;
  const float* grad;
  std::int64_t ld_grad;
  float *master, *m, *v;
  std::int64_t rows, cols;
};
/// AdamW over `count` tensors (the table on the device) in one launch.
template <class T>
void adamw_update_many(const AdamWTensor<T>* tensors, int count, const AdamWCoefficients& k, cudaStream_t stream);

/// dst (rows, cols) = src, converted from float.
template <class T>
void convert(const float* src, std::int64_t ld_src, std::int64_t rows, std::int64_t cols, T* dst, std::int64_t ld_dst,
             cudaStream_t stream);

}  // namespace moet::cuda_impl
