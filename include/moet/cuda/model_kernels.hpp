// The kernels of the CUDA backend's model ops (ops.hpp): the frozen parts of a transformer
// between its projections. Launchers with runtime sizes, compiled once into moet::cuda
// (kernels/model.cu) and, for tests, into the host emulation. Matrices are row-major with row
// strides (ld); every kernel reads and writes T (float, bf16, fp16) and computes in float32.
//
//   embed                 h[t] = wte[ids[t]] (+ wpe[positions[t]])
//   norm_forward/backward LayerNorm (centered) or RMSNorm; keeps mean and 1/std per row
//   activation*/swiglu*   elementwise, forward and backward
//   rotate                rotary embedding (Hugging Face's rotate-half), sign -1: its transpose
//   softmax_rows          attention's masked, causal softmax of float scores into probabilities
//   softmax_grad_rows     attention's dS = P (dP - D) scale from recomputed P
//   row_dot               D[r] = <a[r], b[r]> (attention's D = rowsum(dO * O))
//   flash_attention_*     attention without the (queries, keys) matrices: tensor-core tiles
//                         (wmma), online softmax, backward recomputing P (kernels/attention.cu)
//   cross_entropy_rows    the LM head's per-token loss and d(logits), one chunk of rows
//   sum_rows_scaled       out[0] = sum(values) * scale, one block in a fixed order (deterministic)
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moet::cuda_impl {

template <class T>
void embed(const int* ids, const int* positions, std::int64_t tokens, const T* wte, std::int64_t ld_wte, const T* wpe,
           std::int64_t ld_wpe, std::int64_t width, T* out, std::int64_t ld_out, cudaStream_t stream);

/// y = (x - mean) rstd w [+ b]; stats (rows, 2) float = {mean, rstd}; centered false: RMSNorm (mean 0).
/// With res (else null): the residual add first, in the same pass: sum = x + res (rounded to T,
/// as a separate add would store it) and y normalises sum.
template <class T>
void norm_forward(const T* x, std::int64_t ld_x, const T* res, std::int64_t ld_res, T* sum, std::int64_t ld_sum, std::int64_t rows,
                  std::int64_t width, const T* w, const T* b, float eps, bool centered, T* y, std::int64_t ld_y, float* stats,
                  cudaStream_t stream);
/// dx = rstd (g - mean(g) - xh mean(g xh)) [+ dres], g = dy w (mean(g) dropped when not centered);
/// dres (else null): the gradient that reaches x around the norm, on the residual path.
template <class T>
void norm_backward(const T* x, std::int64_t ld_x, const T* dy, std::int64_t ld_dy, const T* dres, std::int64_t ld_dres,
                   std::int64_t rows, std::int64_t width, const T* w, const float* stats, bool centered, T* dx, std::int64_t ld_dx,
                   cudaStream_t stream);

/// kind: moet::Activation as int. out = act(x); backward: out = act'(x) dy.
template <class T>
void activation(int kind, const T* x, std::int64_t ld_x, std::int64_t rows, std::int64_t cols, T* out, std::int64_t ld_out,
                cudaStream_t stream);
template <class T>
void activation_backward(int kind, const T* x, std::int64_t ld_x, const T* dy, std::int64_t ld_dy, std::int64_t rows,
                         std::int64_t cols, T* out, std::int64_t ld_out, cudaStream_t stream);
/// out = silu(gate) up; backward: d_gate = dy up silu'(gate), d_up = dy silu(gate).
template <class T>
void swiglu(const T* gate, std::int64_t ld_g, const T* up, std::int64_t ld_u, std::int64_t rows, std::int64_t cols, T* out,
            std::int64_t ld_out, cudaStream_t stream);
template <class T>
void swiglu_backward(const T* gate, std::int64_t ld_g, const T* up, std::int64_t ld_u, const T* dy, std::int64_t ld_dy,
                     std::int64_t rows, std::int64_t cols, T* d_gate, std::int64_t ld_dg, T* d_up, std::int64_t ld_du,
                     cudaStream_t stream);

/// out = a + b (out may be a).
template <class T>
void add(const T* a, std::int64_t ld_a, const T* b, std::int64_t ld_b, std::int64_t rows, std::int64_t cols, T* out,
         std::int64_t ld_out, cudaStream_t stream);
/// out = scale[0] x (scale: one value of T on the device).
template <class T>
void scale_by(const T* x, std::int64_t ld_x, const T* scale, std::int64_t rows, std::int64_t cols, T* out, std::int64_t ld_out,
              cudaStream_t stream);
/// n values of dst = value.
template <class T>
void fill(T* dst, std::int64_t n, float value, cudaStream_t stream);
/// (rows, cols) of dst (row stride ld) = uniform in [-bound, bound] from a counter-based hash of
/// (seed, index): quick stand-in weights of a chosen scale (benchmarks of models too large to draw
/// on the host), the same on every run.
template <class T>
void fill_uniform(T* dst, std::int64_t rows, std::int64_t cols, std::int64_t ld, std::uint64_t seed, float bound,
                  cudaStream_t stream);

/// x (tokens, heads * head_dim): per head, pairs (i, i + head_dim/2) rotated by positions[t] *
/// inv_freq[i] (double, head_dim/2 values); sign -1 rotates back.
template <class T>
void rotate(const T* x, std::int64_t ld_x, std::int64_t tokens, int heads, int head_dim, const int* positions,
            const double* inv_freq, int sign, T* out, std::int64_t ld_out, cudaStream_t stream);

/// Between token-major and head-major layouts. Token-major: (token, head * head_dim) rows with
/// row stride ld, sequence b's token t at row b seq_stride + t. Head-major: contiguous
/// (batch * heads * seq, head_dim), row (b heads + h) seq + t. to_heads copies token-major x
/// into head-major out; from_heads the other way.
template <class T>
void to_heads(const T* x, std::int64_t ld, std::int64_t seq_stride, std::int64_t batch, std::int64_t seq, int heads, int head_dim,
              T* out, cudaStream_t stream);
template <class T>
void from_heads(const T* x, std::int64_t batch, std::int64_t seq, int heads, int head_dim, T* out, std::int64_t ld,
                std::int64_t seq_stride, cudaStream_t stream);

/// Attention's masked softmax. scores: (batch * heads * q_len, k_len) float, row (b, h, i);
/// query i sees keys j <= k_len - q_len + i with valid[b k_len + j]. Writes p (T, same layout;
/// 0 where masked) and, with lse_out, each row's log-sum-exp (-inf when nothing is visible); or
/// reads it from lse_in (lse_out null) and recomputes p = exp(s - lse).
template <class T>
void softmax_rows(const float* scores, std::int64_t batch, std::int64_t heads, std::int64_t q_len, std::int64_t k_len,
                  const unsigned char* valid, float* lse_out, const float* lse_in, T* p, cudaStream_t stream);
/// ds = p (dp - d[row]) scale, in T; d: (batch, heads, q_len) as rows of softmax_rows.
template <class T>
void softmax_grad_rows(const T* p, const float* dp, const float* d, std::int64_t rows, std::int64_t k_len, float scale, T* ds,
                       cudaStream_t stream);
/// d[(b h + hh) q_len + i] = <dy row, y row> over head hh's head_dim columns of token row b q_len + i.
template <class T>
void attention_row_dot(const T* dy, std::int64_t ld_dy, const T* y, std::int64_t ld_y, std::int64_t batch, std::int64_t heads,
                       std::int64_t q_len, int head_dim, float* d, cudaStream_t stream);

/// Where flash attention's operands are: token-major rows (row stride ld_*), query i of sequence
/// b at row b q_len + i, head h at columns h head_dim; key j at row b kv_stride + j, kv head
/// h / (heads / kv_heads). Query i sees keys j <= k_len - q_len + i with valid[b k_len + j].
struct FlashShape {
  std::int64_t batch = 0, q_len = 0, k_len = 0, kv_stride = 0;
  int heads = 0, kv_heads = 0, head_dim = 0;
  std::int64_t ld_q = 0, ld_k = 0, ld_v = 0, ld_o = 0;  ///< o: the output (forward) or dO (backward)
  std::int64_t ld_dq = 0, ld_dk = 0, ld_dv = 0;
  float scale = 1.f;
};

/// Whether the flash kernels take this head_dim and storage type: bf16 and fp16 (wmma's 16-bit
/// inputs, float32 accumulation) with head_dim 16, 32, 64 or 128.
template <class T>
bool flash_attention_supported(int head_dim);
/// out (B q_len rows, token-major) = softmax(q k^T scale, masked) v; lse[(b heads + h) q_len + i]
/// = the row's log-sum-exp (-inf when no key is visible, and the output row is 0).
template <class T>
void flash_attention_forward(const T* q, const T* k, const T* v, const unsigned char* valid, T* out, float* lse,
                             const FlashShape& shape, cudaStream_t stream);
/// dq, dk, dv (overwritten; dk and dv rows k_len .. kv_stride of each sequence untouched) from
/// dout, the forward's lse and d[(b heads + h) q_len + i] = <dout row, out row> (attention_row_dot).
/// Two kernels, no atomics: one per query tile for dq, one per key tile (over the kv group's
/// query heads) for dk and dv, so every result has the same bits on every run.
template <class T>
void flash_attention_backward(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* d,
                              const unsigned char* valid, T* dq, T* dk, T* dv, const FlashShape& shape, cudaStream_t stream);

/// out[r] = the column of row r's largest value, the lowest column among equal ones (a row of
/// -inf gives 0), or -1 when the row holds a NaN: greedy decoding's pick, as the host's
/// sample_token makes it (std::max_element over the same values).
template <class T>
void argmax_rows(const T* x, std::int64_t ld, std::int64_t rows, std::int64_t cols, int* out, cudaStream_t stream);

/// One chunk of the LM head's cross-entropy: logits (rows, vocab) float. loss_rows[r] = lse -
/// logit[target] (0 when target < 0); lse_rows[r] = lse. With d_logits: d_logits = (softmax -
/// onehot) (*scale_ptr if given, else 1) * inv_count, 0 on ignored rows.
template <class T>
void cross_entropy_rows(const float* logits, std::int64_t rows, std::int64_t vocab, const int* targets, float* loss_rows,
                        float* lse_rows, T* d_logits, const T* scale_ptr, float inv_count, cudaStream_t stream);
/// out[0] = scale sum(values[0..n)), summed by one block in a fixed order.
void sum_scaled(const float* values, std::int64_t n, float scale, float* out, cudaStream_t stream);
/// A float32 gradient tensor as the gradient arena sees it: (rows, cols), row stride ld.
struct GradSegment {
  float* data;
  std::int64_t rows, cols, ld;
};
/// *sq = the sum of squares of every segment, in double and in a fixed order (per-block partials,
/// `blocks` per segment, then one block): the same bits on every run.
void sum_squares(const GradSegment* segments, int count, int blocks, double* partials, double* sq, cudaStream_t stream);
/// Multiplies every segment by scale, and by max_norm / (norm + 1e-6) when norm = sqrt(*sq) *
/// scale is finite and above max_norm > 0; reads *sq on the device.
void clip_segments(const GradSegment* segments, int count, const double* sq, double max_norm, double scale, cudaStream_t stream);
/// Zeroes every segment.
void zero_segments(const GradSegment* segments, int count, cudaStream_t stream);
/// sums[0..2) = {*loss, *aux (0 when null)} when first, else adds them: a training step's
/// micro-batches summed on the device.
void add_step_numbers(const float* loss, const double* aux, double* sums, bool first, cudaStream_t stream);
/// out[0..3) = {sums[0] scale, sums[1] scale, *sq scale^2 (0 when sq is null)}: a training step's
/// numbers in one place (scale = 1 / its micro-batches), so the host reads them with one copy.
void gather_step_numbers(const double* sums, const double* sq, double scale, double* out, cudaStream_t stream);

}  // namespace moet::cuda_impl
