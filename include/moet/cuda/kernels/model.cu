// The model ops' kernels (model_kernels.hpp): the frozen transformer parts between the
// projections, in float32 arithmetic over T storage. Row kernels use one block per row and
// reduce in a fixed order (per-thread partial sums in index order, then the warps' sums in warp
// order), so every result has the same bits on every run.
#include <cfloat>
#include <climits>

#include "../model_kernels.hpp"
#include "common.cuh"

namespace moet::cuda_impl {
namespace device {

constexpr int row_threads = 256;

__device__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  const int warps = int((blockDim.x + 31) >> 5);
  for (int i = 0; i < warps; ++i) m = fmaxf(m, scratch[i]);
  return m;
}

#define MOET_GRID_STRIDE(i, n) \
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += std::int64_t(gridDim.x) * blockDim.x)

template <class T>
__global__ void embed_kernel(const int* ids, const int* positions, std::int64_t tokens, const T* wte, std::int64_t ld_wte,
                             const T* wpe, std::int64_t ld_wpe, std::int64_t width, T* out, std::int64_t ld_out) {
  MOET_GRID_STRIDE(i, tokens * width) {
    const std::int64_t t = i / width, c = i % width;
    float v = to_f(wte[std::int64_t(ids[t]) * ld_wte + c]);
    if (wpe) v += to_f(wpe[std::int64_t(positions[t]) * ld_wpe + c]);
    out[t * ld_out + c] = from_f<T>(v);
  }
}

template <class T>
__global__ void __launch_bounds__(row_threads)
    norm_forward_kernel(const T* x, std::int64_t ld_x, const T* res, std::int64_t ld_res, T* sum, std::int64_t ld_sum,
                        std::int64_t rows, std::int64_t width, const T* w, const T* b, float eps, int centered, T* y,
                        std::int64_t ld_y, float* stats) {
  __shared__ float scratch[32];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * ld_x;
    if (res) {
      // The residual add: s = x + res rounded to T (as a separate add would store it), then the
      // passes below read s. Each thread reads back only the columns it wrote, so no barrier.
      T* sr = sum + r * ld_sum;
      for (std::int64_t c = threadIdx.x; c < width; c += blockDim.x) sr[c] = from_f<T>(to_f(xr[c]) + to_f(res[r * ld_res + c]));
      xr = sr;
    }
    float mean = 0.f;
    if (centered) {
      float s = 0.f;
      for (std::int64_t c = threadIdx.x; c < width; c += blockDim.x) s += to_f(xr[c]);
      mean = block_sum(s, scratch) / float(width);
    }
    float sq = 0.f;
    for (std::int64_t c = threadIdx.x; c < width; c += blockDim.x) {
      const float d = to_f(xr[c]) - mean;
      sq += d * d;
    }
    const float rstd = 1.f / sqrtf(block_sum(sq, scratch) / float(width) + eps);
    for (std::int64_t c = threadIdx.x; c < width; c += blockDim.x) {
      float v = (to_f(xr[c]) - mean) * rstd * to_f(w[c]);
      if (b) v += to_f(b[c]);
      y[r * ld_y + c] = from_f<T>(v);
    }
    if (threadIdx.x == 0) {
      stats[2 * r] = mean;
      stats[2 * r + 1] = rstd;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(row_threads)
    norm_backward_kernel(const T* x, std::int64_t ld_x, const T* dy, std::int64_t ld_dy, const T* dres, std::int64_t ld_dres,
                         std::int64_t rows, std::int64_t width, const T* w, const float* stats, int centered, T* dx,
                         std::int64_t ld_dx) {
  __shared__ float scratch[32];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float mean = stats[2 * r], rstd = stats[2 * r + 1];
    float sg = 0.f, sgx = 0.f;
    for (std::int64_t c = threadIdx.x; c < width; c += blockDim.x) {
      const float g = to_f(dy[r * ld_dy + c]) * to_f(w[c]);
      sg += g;
      sgx += g * (to_f(x[r * ld_x + c]) - mean) * rstd;
    }
    const float mean_g = centered ? block_sum(sg, scratch) / float(width) : 0.f;
    const float mean_gx = block_sum(sgx, scratch) / float(width);
    for (std::int64_t c = threadIdx.x; c < width; c += blockDim.x) {
      const float g = to_f(dy[r * ld_dy + c]) * to_f(w[c]);
      const float xh = (to_f(x[r * ld_x + c]) - mean) * rstd;
      const float around = dres ? to_f(dres[r * ld_dres + c]) : 0.f;  // the residual path's gradient
      dx[r * ld_dx + c] = from_f<T>(rstd * (g - mean_g - xh * mean_gx) + around);
    }
  }
}

// Activation kinds, as moet::Activation: gelu_tanh, gelu, relu, silu.
__device__ __forceinline__ float act_value(int kind, float x) {
  switch (kind) {
    case 0: {
      const float k = 0.7978845608028654f, u = k * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.f + tanhf(u));
    }
    case 1: return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
    case 2: return x > 0.f ? x : 0.f;
    default: return x / (1.f + expf(-x));
  }
}
__device__ __forceinline__ float act_derivative(int kind, float x) {
  switch (kind) {
    case 0: {
      const float k = 0.7978845608028654f, u = k * (x + 0.044715f * x * x * x), t = tanhf(u);
      return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * x * x);
    }
    case 1: return 0.5f * (1.f + erff(x * 0.7071067811865476f)) + x * expf(-0.5f * x * x) * 0.3989422804014327f;
    case 2: return x > 0.f ? 1.f : 0.f;
    default: {
      const float s = 1.f / (1.f + expf(-x));
      return s * (1.f + x * (1.f - s));
    }
  }
}

template <class T>
__global__ void activation_kernel(int kind, const T* x, std::int64_t ld_x, const T* dy, std::int64_t ld_dy, std::int64_t rows,
                                  std::int64_t cols, T* out, std::int64_t ld_out) {
  MOET_GRID_STRIDE(i, rows * cols) {
    const std::int64_t r = i / cols, c = i % cols;
    const float v = to_f(x[r * ld_x + c]);
    out[r * ld_out + c] = from_f<T>(dy ? act_derivative(kind, v) * to_f(dy[r * ld_dy + c]) : act_value(kind, v));
  }
}

template <class T>
__global__ void swiglu_kernel(const T* gate, std::int64_t ld_g, const T* up, std::int64_t ld_u, const T* dy, std::int64_t ld_dy,
                              std::int64_t rows, std::int64_t cols, T* out, std::int64_t ld_out, T* d_up, std::int64_t ld_du) {
  MOET_GRID_STRIDE(i, rows * cols) {
    const std::int64_t r = i / cols, c = i % cols;
    const float g = to_f(gate[r * ld_g + c]), u = to_f(up[r * ld_u + c]);
    const float s = 1.f / (1.f + expf(-g)), silu = g * s;
    if (!dy) {
      out[r * ld_out + c] = from_f<T>(silu * u);
    } else {
      const float d = to_f(dy[r * ld_dy + c]);
      out[r * ld_out + c] = from_f<T>(d * u * s * (1.f + g * (1.f - s)));  // d_gate
      d_up[r * ld_du + c] = from_f<T>(d * silu);
    }
  }
}

template <class T>
__global__ void add_kernel(const T* a, std::int64_t ld_a, const T* b, std::int64_t ld_b, std::int64_t rows, std::int64_t cols,
                           T* out, std::int64_t ld_out) {
  MOET_GRID_STRIDE(i, rows * cols) {
    const std::int64_t r = i / cols, c = i % cols;
    out[r * ld_out + c] = from_f<T>(to_f(a[r * ld_a + c]) + to_f(b[r * ld_b + c]));
  }
}

template <class T>
__global__ void scale_kernel(const T* x, std::int64_t ld_x, const T* scale, std::int64_t rows, std::int64_t cols, T* out,
                             std::int64_t ld_out) {
  const float s = to_f(scale[0]);
  MOET_GRID_STRIDE(i, rows * cols) {
    const std::int64_t r = i / cols, c = i % cols;
    out[r * ld_out + c] = from_f<T>(s * to_f(x[r * ld_x + c]));
  }
}

template <class T>
__global__ void fill_kernel(T* dst, std::int64_t n, float value) {
  MOET_GRID_STRIDE(i, n) dst[i] = from_f<T>(value);
}

template <class T>
__global__ void fill_uniform_kernel(T* dst, std::int64_t rows, std::int64_t cols, std::int64_t ld, std::uint64_t seed, float bound) {
  MOET_GRID_STRIDE(i, rows * cols) {
    std::uint64_t z = seed + std::uint64_t(i) * 0x9e3779b97f4a7c15ull;  // splitmix64
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float u = float(z >> 40) * 0x1p-24f;  // [0, 1)
    dst[(i / cols) * ld + i % cols] = from_f<T>((2.f * u - 1.f) * bound);
  }
}

template <class T>
__global__ void rotate_kernel(const T* x, std::int64_t ld_x, std::int64_t tokens, int heads, int head_dim, const int* positions,
                              const double* inv_freq, int sign, T* out, std::int64_t ld_out) {
  const int half = head_dim / 2;
  MOET_GRID_STRIDE(i, tokens * half) {
    const std::int64_t t = i / half;
    const int k = int(i % half);
    const double angle = double(positions[t]) * inv_freq[k];
    const float cs = float(cos(angle)), sn = float(sign * sin(angle));
    for (int h = 0; h < heads; ++h) {
      const std::int64_t a = std::int64_t(h) * head_dim + k, b = a + half;
      const float x1 = to_f(x[t * ld_x + a]), x2 = to_f(x[t * ld_x + b]);
      out[t * ld_out + a] = from_f<T>(x1 * cs - x2 * sn);
      out[t * ld_out + b] = from_f<T>(x2 * cs + x1 * sn);
    }
  }
}

/// One thread per element of the head-major side; to_heads reads token-major and writes
/// head-major, else the reverse. Consecutive threads touch consecutive head_dim columns of both.
template <class T>
__global__ void heads_kernel(const T* src, T* dst, std::int64_t ld, std::int64_t seq_stride, std::int64_t batch, std::int64_t seq,
                             int heads, int head_dim, int into_heads) {
  MOET_GRID_STRIDE(i, batch * heads * seq * head_dim) {
    const std::int64_t c = i % head_dim, row = i / head_dim;
    const std::int64_t t = row % seq, h = (row / seq) % heads, b = row / (seq * heads);
    const std::int64_t token = (b * seq_stride + t) * ld + h * head_dim + c;
    if (into_heads) dst[i] = src[token];
    else dst[token] = src[i];
  }
}

template <class T>
__global__ void __launch_bounds__(row_threads)
    softmax_rows_kernel(const float* scores, std::int64_t heads, std::int64_t q_len, std::int64_t k_len, std::int64_t rows,
                        const unsigned char* valid, float* lse_out, const float* lse_in, T* p) {
  __shared__ float scratch[32];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const std::int64_t b = r / (heads * q_len), i = r % q_len;
    const std::int64_t visible = k_len - q_len + i + 1;
    const unsigned char* v = valid + b * k_len;
    const float* s = scores + r * k_len;
    float l;
    if (lse_out) {
      float m = -INFINITY;
      for (std::int64_t j = threadIdx.x; j < visible; j += blockDim.x)
        if (v[j]) m = fmaxf(m, s[j]);
      m = block_max(m, scratch);
      float sum = 0.f;
      if (m != -INFINITY)
        for (std::int64_t j = threadIdx.x; j < visible; j += blockDim.x)
          if (v[j]) sum += expf(s[j] - m);
      sum = block_sum(sum, scratch);
      l = m == -INFINITY ? -INFINITY : m + logf(sum);
      if (threadIdx.x == 0) lse_out[r] = l;
    } else {
      l = lse_in[r];
    }
    for (std::int64_t j = threadIdx.x; j < k_len; j += blockDim.x)
      p[r * k_len + j] = from_f<T>(j < visible && v[j] && l != -INFINITY ? expf(s[j] - l) : 0.f);
  }
}

template <class T>
__global__ void softmax_grad_kernel(const T* p, const float* dp, const float* d, std::int64_t rows, std::int64_t k_len, float scale,
                                    T* ds) {
  MOET_GRID_STRIDE(i, rows * k_len) {
    const float pv = to_f(p[i]);
    ds[i] = from_f<T>(pv == 0.f ? 0.f : pv * (dp[i] - d[i / k_len]) * scale);
  }
}

template <class T>
__global__ void row_dot_kernel(const T* dy, std::int64_t ld_dy, const T* y, std::int64_t ld_y, std::int64_t heads, std::int64_t q_len,
                               int head_dim, std::int64_t rows, float* d) {
  const int lane = threadIdx.x & 31;
  const std::int64_t warps = std::int64_t(blockDim.x) >> 5;
  for (std::int64_t r = std::int64_t(blockIdx.x) * warps + (threadIdx.x >> 5); r < rows; r += std::int64_t(gridDim.x) * warps) {
    const std::int64_t b = r / (heads * q_len), h = (r / q_len) % heads, i = r % q_len;
    const std::int64_t t = b * q_len + i;
    float s = 0.f;
    for (int c = lane; c < head_dim; c += 32) s += to_f(dy[t * ld_dy + h * head_dim + c]) * to_f(y[t * ld_y + h * head_dim + c]);
    s = warp_sum(s);
    if (lane == 0) d[r] = s;
  }
}

template <class T>
__global__ void __launch_bounds__(row_threads) argmax_rows_kernel(const T* x, std::int64_t ld, std::int64_t rows, std::int64_t cols,
                                                                  int* out) {
  __shared__ float best_values[32];
  __shared__ int best_columns[32];
  __shared__ float nans[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = int((blockDim.x + 31) >> 5);
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float best = -INFINITY, nan = 0.f;
    int column = INT_MAX;
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float v = to_f(x[r * ld + j]);
      if (v != v) nan = 1.f;
      else if (v > best || (v == best && int(j) < column)) {
        best = v;
        column = int(j);
      }
    }
    warp_argmax(best, column);
    nan = warp_sum(nan);
    __syncthreads();  // the scratch may still be read for the previous row
    if (lane == 0) {
      best_values[warp] = best;
      best_columns[warp] = column;
      nans[warp] = nan;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float b = best_values[0], any_nan = nans[0];
      int c = best_columns[0];
      for (int w = 1; w < warps; ++w) {
        any_nan += nans[w];
        if (best_values[w] > b || (best_values[w] == b && best_columns[w] < c)) {
          b = best_values[w];
          c = best_columns[w];
        }
      }
      out[r] = any_nan > 0.f ? -1 : c;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(row_threads)
    cross_entropy_kernel(const float* logits, std::int64_t rows, std::int64_t vocab, const int* targets, float* loss_rows,
                         float* lse_rows, T* d_logits, const T* scale_ptr, float inv_count) {
  __shared__ float scratch[32];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* x = logits + r * vocab;
    float m = -INFINITY;
    for (std::int64_t j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, x[j]);
    m = block_max(m, scratch);
    float sum = 0.f;
    for (std::int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(x[j] - m);
    const float lse = m + logf(block_sum(sum, scratch));
    const int target = targets[r];
    if (threadIdx.x == 0) {
      loss_rows[r] = target >= 0 ? lse - x[target] : 0.f;
      lse_rows[r] = lse;
    }
    if (d_logits) {
      const float scale = (scale_ptr ? to_f(scale_ptr[0]) : 1.f) * inv_count;
      for (std::int64_t j = threadIdx.x; j < vocab; j += blockDim.x)
        d_logits[r * vocab + j] =
            from_f<T>(target >= 0 && scale != 0.f ? (expf(x[j] - lse) - (j == target ? 1.f : 0.f)) * scale : 0.f);
    }
  }
}

__global__ void __launch_bounds__(row_threads) sum_scaled_kernel(const float* values, std::int64_t n, float scale, float* out) {
  __shared__ float scratch[32];
  float s = 0.f;
  for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x) s += values[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) out[0] = s * scale;
}

__global__ void __launch_bounds__(row_threads) sum_squares_kernel(const GradSegment* segments, double* partials) {
  __shared__ double scratch[32];
  const GradSegment g = segments[blockIdx.y];
  const std::int64_t n = g.rows * g.cols;
  double s = 0.0;
  MOET_GRID_STRIDE(i, n) {
    const double v = g.data[(i / g.cols) * g.ld + i % g.cols];
    s += v * v;
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partials[std::int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = s;
}

__global__ void __launch_bounds__(row_threads) sum_partials_kernel(const double* partials, std::int64_t n, double* out) {
  __shared__ double scratch[32];
  double s = 0.0;
  for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partials[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) out[0] = s;
}

/// Every gradient times scale, and times max_norm / (norm + 1e-6) when the scaled norm is finite
/// and above max_norm > 0; zero: every gradient set to 0 instead.
__global__ void clip_segments_kernel(const GradSegment* segments, const double* sq, double max_norm, double scale, int zero) {
  float factor = 0.f;
  if (!zero) {
    const double norm = sqrt(sq[0]) * scale;
    const bool clip = max_norm > 0 && norm - norm == 0.0 && norm > max_norm;  // finite and above the bound
    const double f = clip ? scale * (max_norm / (norm + 1e-6)) : scale;
    if (f == 1.0) return;
    factor = float(f);
  }
  const GradSegment g = segments[blockIdx.y];
  MOET_GRID_STRIDE(i, g.rows * g.cols) {
    float& v = g.data[(i / g.cols) * g.ld + i % g.cols];
    v = zero ? 0.f : v * factor;
  }
}

/// sums[0] (+)= loss, sums[1] (+)= aux (0 without one): a step's micro-batches, summed in double.
__global__ void add_step_numbers_kernel(const float* loss, const double* aux, double* sums, int first) {
  if (threadIdx.x != 0) return;
  sums[0] = (first ? 0.0 : sums[0]) + double(loss[0]);
  sums[1] = (first ? 0.0 : sums[1]) + (aux ? aux[0] : 0.0);
}

/// out = {mean loss, mean aux loss, squared norm of the scaled gradients}; scale = 1 / parts.
__global__ void gather_step_numbers_kernel(const double* sums, const double* sq, double scale, double* out) {
  if (threadIdx.x != 0) return;
  out[0] = sums[0] * scale;
  out[1] = sums[1] * scale;
  out[2] = sq ? sq[0] * scale * scale : 0.0;
}

#undef MOET_GRID_STRIDE

inline unsigned row_grid(std::int64_t rows) { return unsigned(rows < 1 ? 1 : (rows > 65535 ? 65535 : rows)); }

}  // namespace device

using device::grid_for;
using device::row_grid;
using device::row_threads;

template <class T>
void embed(const int* ids, const int* positions, std::int64_t tokens, const T* wte, std::int64_t ld_wte, const T* wpe,
           std::int64_t ld_wpe, std::int64_t width, T* out, std::int64_t ld_out, cudaStream_t stream) {
  if (tokens * width == 0) return;
  MOET_LAUNCH(grid_for(tokens * width, 256, 4096u), 256, 0, stream, device::embed_kernel<T>)
  (ids, positions, tokens, wte, ld_wte, wpe, ld_wpe, width, out, ld_out);
  MOET_CUDA_CHECK_LAUNCH("embed_kernel");
}

template <class T>
void norm_forward(const T* x, std::int64_t ld_x, const T* res, std::int64_t ld_res, T* sum, std::int64_t ld_sum, std::int64_t rows,
                  std::int64_t width, const T* w, const T* b, float eps, bool centered, T* y, std::int64_t ld_y, float* stats,
                  cudaStream_t stream) {
  if (rows == 0) return;
  MOET_LAUNCH(row_grid(rows), row_threads, 0, stream, device::norm_forward_kernel<T>)
  (x, ld_x, res, ld_res, sum, ld_sum, rows, width, w, b, eps, centered ? 1 : 0, y, ld_y, stats);
  MOET_CUDA_CHECK_LAUNCH("norm_forward_kernel");
}

template <class T>
void norm_backward(const T* x, std::int64_t ld_x, const T* dy, std::int64_t ld_dy, const T* dres, std::int64_t ld_dres,
                   std::int64_t rows, std::int64_t width, const T* w, const float* stats, bool centered, T* dx, std::int64_t ld_dx,
                   cudaStream_t stream) {
  if (rows == 0) return;
  MOET_LAUNCH(row_grid(rows), row_threads, 0, stream, device::norm_backward_kernel<T>)
  (x, ld_x, dy, ld_dy, dres, ld_dres, rows, width, w, stats, centered ? 1 : 0, dx, ld_dx);
  MOET_CUDA_CHECK_LAUNCH("norm_backward_kernel");
}

template <class T>
void activation(int kind, const T* x, std::int64_t ld_x, std::int64_t rows, std::int64_t cols, T* out, std::int64_t ld_out,
                cudaStream_t stream) {
  if (rows * cols == 0) return;
  MOET_LAUNCH(grid_for(rows * cols, 256, 4096u), 256, 0, stream, device::activation_kernel<T>)
  (kind, x, ld_x, static_cast<const T*>(nullptr), std::int64_t(0), rows, cols, out, ld_out);
  MOET_CUDA_CHECK_LAUNCH("activation_kernel");
}

template <class T>
void activation_backward(int kind, const T* x, std::int64_t ld_x, const T* dy, std::int64_t ld_dy, std::int64_t rows,
                         std::int64_t cols, T* out, std::int64_t ld_out, cudaStream_t stream) {
  if (rows * cols == 0) return;
  MOET_LAUNCH(grid_for(rows * cols, 256, 4096u), 256, 0, stream, device::activation_kernel<T>)
  (kind, x, ld_x, dy, ld_dy, rows, cols, out, ld_out);
  MOET_CUDA_CHECK_LAUNCH("activation_kernel");
}

template <class T>
void swiglu(const T* gate, std::int64_t ld_g, const T* up, std::int64_t ld_u, std::int64_t rows, std::int64_t cols, T* out,
            std::int64_t ld_out, cudaStream_t stream) {
  if (rows * cols == 0) return;
  MOET_LAUNCH(grid_for(rows * cols, 256, 4096u), 256, 0, stream, device::swiglu_kernel<T>)
  (gate, ld_g, up, ld_u, static_cast<const T*>(nullptr), std::int64_t(0), rows, cols, out, ld_out, static_cast<T*>(nullptr),
   std::int64_t(0));
  MOET_CUDA_CHECK_LAUNCH("swiglu_kernel");
}

template <class T>
void swiglu_backward(const T* gate, std::int64_t ld_g, const T* up, std::int64_t ld_u, const T* dy, std::int64_t ld_dy,
                     std::int64_t rows, std::int64_t cols, T* d_gate, std::int64_t ld_dg, T* d_up, std::int64_t ld_du,
                     cudaStream_t stream) {
  if (rows * cols == 0) return;
  MOET_LAUNCH(grid_for(rows * cols, 256, 4096u), 256, 0, stream, device::swiglu_kernel<T>)
  (gate, ld_g, up, ld_u, dy, ld_dy, rows, cols, d_gate, ld_dg, d_up, ld_du);
  MOET_CUDA_CHECK_LAUNCH("swiglu_kernel");
}

template <class T>
void add(const T* a, std::int64_t ld_a, const T* b, std::int64_t ld_b, std::int64_t rows, std::int64_t cols, T* out,
         std::int64_t ld_out, cudaStream_t stream) {
  if (rows * cols == 0) return;
  MOET_LAUNCH(grid_for(rows * cols, 256, 4096u), 256, 0, stream, device::add_kernel<T>)(a, ld_a, b, ld_b, rows, cols, out, ld_out);
  MOET_CUDA_CHECK_LAUNCH("add_kernel");
}

template <class T>
void scale_by(const T* x, std::int64_t ld_x, const T* scale, std::int64_t rows, std::int64_t cols, T* out, std::int64_t ld_out,
              cudaStream_t stream) {
  if (rows * cols == 0) return;
  MOET_LAUNCH(grid_for(rows * cols, 256, 4096u), 256, 0, stream, device::scale_kernel<T>)(x, ld_x, scale, rows, cols, out, ld_out);
  MOET_CUDA_CHECK_LAUNCH("scale_kernel");
}

template <class T>
void fill(T* dst, std::int64_t n, float value, cudaStream_t stream) {
  if (n == 0) return;
  MOET_LAUNCH(grid_for(n, 256, 4096u), 256, 0, stream, device::fill_kernel<T>)(dst, n, value);
  MOET_CUDA_CHECK_LAUNCH("fill_kernel");
}

template <class T>
void fill_uniform(T* dst, std::int64_t rows, std::int64_t cols, std::int64_t ld, std::uint64_t seed, float bound,
                  cudaStream_t stream) {
  if (rows * cols == 0) return;
  MOET_LAUNCH(grid_for(rows * cols, 256, 4096u), 256, 0, stream, device::fill_uniform_kernel<T>)(dst, rows, cols, ld, seed, bound);
  MOET_CUDA_CHECK_LAUNCH("fill_uniform_kernel");
}

template <class T>
void rotate(const T* x, std::int64_t ld_x, std::int64_t tokens, int heads, int head_dim, const int* positions,
            const double* inv_freq, int sign, T* out, std::int64_t ld_out, cudaStream_t stream) {
  if (tokens == 0) return;
  MOET_LAUNCH(grid_for(tokens * (head_dim / 2), 256, 4096u), 256, 0, stream, device::rotate_kernel<T>)
  (x, ld_x, tokens, heads, head_dim, positions, inv_freq, sign, out, ld_out);
  MOET_CUDA_CHECK_LAUNCH("rotate_kernel");
}

template <class T>
void to_heads(const T* x, std::int64_t ld, std::int64_t seq_stride, std::int64_t batch, std::int64_t seq, int heads, int head_dim,
              T* out, cudaStream_t stream) {
  const std::int64_t n = batch * heads * seq * head_dim;
  if (n == 0) return;
  MOET_LAUNCH(grid_for(n, 256, 8192u), 256, 0, stream, device::heads_kernel<T>)(x, out, ld, seq_stride, batch, seq, heads, head_dim, 1);
  MOET_CUDA_CHECK_LAUNCH("heads_kernel");
}

template <class T>
void from_heads(const T* x, std::int64_t batch, std::int64_t seq, int heads, int head_dim, T* out, std::int64_t ld,
                std::int64_t seq_stride, cudaStream_t stream) {
  const std::int64_t n = batch * heads * seq * head_dim;
  if (n == 0) return;
  MOET_LAUNCH(grid_for(n, 256, 8192u), 256, 0, stream, device::heads_kernel<T>)(x, out, ld, seq_stride, batch, seq, heads, head_dim, 0);
  MOET_CUDA_CHECK_LAUNCH("heads_kernel");
}

template <class T>
void softmax_rows(const float* scores, std::int64_t batch, std::int64_t heads, std::int64_t q_len, std::int64_t k_len,
                  const unsigned char* valid, float* lse_out, const float* lse_in, T* p, cudaStream_t stream) {
  const std::int64_t rows = batch * heads * q_len;
  if (rows == 0) return;
  MOET_LAUNCH(row_grid(rows), row_threads, 0, stream, device::softmax_rows_kernel<T>)
  (scores, heads, q_len, k_len, rows, valid, lse_out, lse_in, p);
  MOET_CUDA_CHECK_LAUNCH("softmax_rows_kernel");
}

template <class T>
void softmax_grad_rows(const T* p, const float* dp, const float* d, std::int64_t rows, std::int64_t k_len, float scale, T* ds,
                       cudaStream_t stream) {
  if (rows * k_len == 0) return;
  MOET_LAUNCH(grid_for(rows * k_len, 256, 4096u), 256, 0, stream, device::softmax_grad_kernel<T>)(p, dp, d, rows, k_len, scale, ds);
  MOET_CUDA_CHECK_LAUNCH("softmax_grad_kernel");
}

template <class T>
void attention_row_dot(const T* dy, std::int64_t ld_dy, const T* y, std::int64_t ld_y, std::int64_t batch, std::int64_t heads,
                       std::int64_t q_len, int head_dim, float* d, cudaStream_t stream) {
  const std::int64_t rows = batch * heads * q_len;
  if (rows == 0) return;
  MOET_LAUNCH(grid_for(rows, 8, 4096u), 256, 0, stream, device::row_dot_kernel<T>)(dy, ld_dy, y, ld_y, heads, q_len, head_dim, rows, d);
  MOET_CUDA_CHECK_LAUNCH("row_dot_kernel");
}

template <class T>
void argmax_rows(const T* x, std::int64_t ld, std::int64_t rows, std::int64_t cols, int* out, cudaStream_t stream) {
  if (rows == 0) return;
  MOET_LAUNCH(row_grid(rows), row_threads, 0, stream, device::argmax_rows_kernel<T>)(x, ld, rows, cols, out);
  MOET_CUDA_CHECK_LAUNCH("argmax_rows_kernel");
}

template <class T>
void cross_entropy_rows(const float* logits, std::int64_t rows, std::int64_t vocab, const int* targets, float* loss_rows,
                        float* lse_rows, T* d_logits, const T* scale_ptr, float inv_count, cudaStream_t stream) {
  if (rows == 0) return;
  MOET_LAUNCH(row_grid(rows), row_threads, 0, stream, device::cross_entropy_kernel<T>)
  (logits, rows, vocab, targets, loss_rows, lse_rows, d_logits, scale_ptr, inv_count);
  MOET_CUDA_CHECK_LAUNCH("cross_entropy_kernel");
}

void sum_scaled(const float* values, std::int64_t n, float scale, float* out, cudaStream_t stream) {
  MOET_LAUNCH(1, row_threads, 0, stream, device::sum_scaled_kernel)(values, n, scale, out);
  MOET_CUDA_CHECK_LAUNCH("sum_scaled_kernel");
}

void sum_squares(const GradSegment* segments, int count, int blocks, double* partials, double* sq, cudaStream_t stream) {
  if (count == 0) {
    MOET_CUDA_CHECK(cudaMemsetAsync(sq, 0, sizeof(double), stream));
    return;
  }
  MOET_LAUNCH(dim3(unsigned(blocks), unsigned(count)), row_threads, 0, stream, device::sum_squares_kernel)(segments, partials);
  MOET_CUDA_CHECK_LAUNCH("sum_squares_kernel");
  MOET_LAUNCH(1, row_threads, 0, stream, device::sum_partials_kernel)(partials, std::int64_t(blocks) * count, sq);
  MOET_CUDA_CHECK_LAUNCH("sum_partials_kernel");
}

void clip_segments(const GradSegment* segments, int count, const double* sq, double max_norm, double scale, cudaStream_t stream) {
  if (count == 0) return;
  MOET_LAUNCH(dim3(64u, unsigned(count)), 256, 0, stream, device::clip_segments_kernel)(segments, sq, max_norm, scale, 0);
  MOET_CUDA_CHECK_LAUNCH("clip_segments_kernel");
}

void zero_segments(const GradSegment* segments, int count, cudaStream_t stream) {
  if (count == 0) return;
  MOET_LAUNCH(dim3(64u, unsigned(count)), 256, 0, stream, device::clip_segments_kernel)
  (segments, static_cast<const double*>(nullptr), 0.0, 1.0, 1);
  MOET_CUDA_CHECK_LAUNCH("clip_segments_kernel");
}

void add_step_numbers(const float* loss, const double* aux, double* sums, bool first, cudaStream_t stream) {
  MOET_LAUNCH(1, 32, 0, stream, device::add_step_numbers_kernel)(loss, aux, sums, first ? 1 : 0);
  MOET_CUDA_CHECK_LAUNCH("add_step_numbers_kernel");
}

void gather_step_numbers(const double* sums, const double* sq, double scale, double* out, cudaStream_t stream) {
  MOET_LAUNCH(1, 32, 0, stream, device::gather_step_numbers_kernel)(sums, sq, scale, out);
  MOET_CUDA_CHECK_LAUNCH("gather_step_numbers_kernel");
}

#define MOET_INSTANTIATE_MODEL(T)                                                                                              \
  template void embed<T>(const int*, const int*, std::int64_t, const T*, std::int64_t, const T*, std::int64_t, std::int64_t, T*, \
                         std::int64_t, cudaStream_t);                                                                           \
  template void norm_forward<T>(const T*, std::int64_t, const T*, std::int64_t, T*, std::int64_t, std::int64_t, std::int64_t,  \
                                const T*, const T*, float, bool, T*, std::int64_t, float*, cudaStream_t);                       \
  template void norm_backward<T>(const T*, std::int64_t, const T*, std::int64_t, const T*, std::int64_t, std::int64_t,         \
                                 std::int64_t, const T*, const float*, bool, T*, std::int64_t, cudaStream_t);                   \
  template void activation<T>(int, const T*, std::int64_t, std::int64_t, std::int64_t, T*, std::int64_t, cudaStream_t);       \
  template void activation_backward<T>(int, const T*, std::int64_t, const T*, std::int64_t, std::int64_t, std::int64_t, T*,    \
                                       std::int64_t, cudaStream_t);                                                             \
  template void swiglu<T>(const T*, std::int64_t, const T*, std::int64_t, std::int64_t, std::int64_t, T*, std::int64_t,        \
                          cudaStream_t);                                                                                        \
  template void swiglu_backward<T>(const T*, std::int64_t, const T*, std::int64_t, const T*, std::int64_t, std::int64_t,       \
                                   std::int64_t, T*, std::int64_t, T*, std::int64_t, cudaStream_t);                             \
  template void add<T>(const T*, std::int64_t, const T*, std::int64_t, std::int64_t, std::int64_t, T*, std::int64_t,           \
                       cudaStream_t);                                                                                           \
  template void scale_by<T>(const T*, std::int64_t, const T*, std::int64_t, std::int64_t, T*, std::int64_t, cudaStream_t);    \
  template void fill<T>(T*, std::int64_t, float, cudaStream_t);                                                                 \
  template void fill_uniform<T>(T*, std::int64_t, std::int64_t, std::int64_t, std::uint64_t, float, cudaStream_t);              \
  template void rotate<T>(const T*, std::int64_t, std::int64_t, int, int, const int*, const double*, int, T*, std::int64_t,    \
                          cudaStream_t);                                                                                        \
  template void to_heads<T>(const T*, std::int64_t, std::int64_t, std::int64_t, std::int64_t, int, int, T*, cudaStream_t);    \
  template void from_heads<T>(const T*, std::int64_t, std::int64_t, int, int, T*, std::int64_t, std::int64_t, cudaStream_t);  \
  template void softmax_rows<T>(const float*, std::int64_t, std::int64_t, std::int64_t, std::int64_t, const unsigned char*,    \
                                float*, const float*, T*, cudaStream_t);                                                                \
  template void softmax_grad_rows<T>(const T*, const float*, const float*, std::int64_t, std::int64_t, float, T*,              \
                                     cudaStream_t);                                                                             \
  template void attention_row_dot<T>(const T*, std::int64_t, const T*, std::int64_t, std::int64_t, std::int64_t, std::int64_t, \
                                     int, float*, cudaStream_t);                                                                \
  template void argmax_rows<T>(const T*, std::int64_t, std::int64_t, std::int64_t, int*, cudaStream_t);                     \
  template void cross_entropy_rows<T>(const float*, std::int64_t, std::int64_t, const int*, float*, float*, T*, const T*,      \
                                      float, cudaStream_t);
MOET_INSTANTIATE_MODEL(float)
MOET_INSTANTIATE_MODEL(__nv_bfloat16)
MOET_INSTANTIATE_MODEL(__half)
#undef MOET_INSTANTIATE_MODEL

}  // namespace moet::cuda_impl
