// (IA)^3 kernels: the merged-vector pass over an activation, forward and backward, and small
// elementwise helpers. The merged vector s = [1 +] sum_e g_e (l_e [- 1]) is a (tokens x E) by
// (E x head_dim) product per head; each thread owns one column, keeps that column of the E
// vectors in registers, and walks a tile of tokens, so the vectors are read once per tile rather
// than once per token.
#include "common.cuh"

namespace moet::cuda_impl {
namespace device {

constexpr int ia3_columns_per_block = 256;
constexpr int ia3_tokens_per_block = 32;

/// MAXE > 0: the column's E values live in registers (E <= MAXE); MAXE == 0: read on use.
template <int MAXE, class T>
__global__ void __launch_bounds__(ia3_columns_per_block)
    ia3_scale_kernel(Ia3Shape shape, const float* gates, const T* scales, const T* a, std::int64_t ld_a, const T* b,
                     std::int64_t ld_b, T* out, std::int64_t ld_out, T* ds, std::int64_t ld_ds) {
  const std::int64_t width = std::int64_t(shape.heads) * shape.head_dim;
  const std::int64_t col = std::int64_t(blockIdx.x) * ia3_columns_per_block + threadIdx.x;
  if (col >= width) return;
  const int E = shape.experts;
  const int head = int(col / shape.head_dim), d = int(col % shape.head_dim);
  const float shift = shape.gates_sum_to_one ? 1.f : 0.f;  // mix = l - 1 when the gates sum to one
  const T* column = scales + std::int64_t(head) * E * shape.head_dim + d;  // l(head, e, d) at column[e * head_dim]
  float mix[MAXE > 0 ? MAXE : 1];
  if constexpr (MAXE > 0) {
#pragma unroll
    for (int e = 0; e < MAXE; ++e) mix[e] = e < E ? to_f(column[std::int64_t(e) * shape.head_dim]) - shift : 0.f;
  }
  const std::int64_t t_begin = std::int64_t(blockIdx.y) * ia3_tokens_per_block;
  const std::int64_t t_end = t_begin + ia3_tokens_per_block < shape.tokens ? t_begin + ia3_tokens_per_block : shape.tokens;
  for (std::int64_t t = t_begin; t < t_end; ++t) {
    const float* g = gates + (t * shape.groups + (shape.groups == 1 ? 0 : head)) * E;
    float s = 0.f;
    if constexpr (MAXE > 0) {
#pragma unroll
      for (int e = 0; e < MAXE; ++e)
        if (e < E) s += g[e] * mix[e];
    } else {
      for (int e = 0; e < E; ++e) s += g[e] * (to_f(column[std::int64_t(e) * shape.head_dim]) - shift);
    }
    s += shift;
    const float av = to_f(a[t * ld_a + col]);
    out[t * ld_out + col] = from_f<T>(av * s);
    if (ds) ds[t * ld_ds + col] = from_f<T>(av * to_f(b[t * ld_b + col]));
  }
}

template <class T>
__global__ void ia3_mix_kernel(const T* scales, std::int64_t n, float shift, T* mix) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x)
    mix[i] = from_f<T>(to_f(scales[i]) - shift);
}

template <class T>
__global__ void convert_kernel(const float* src, std::int64_t ld_src, std::int64_t rows, std::int64_t cols, T* dst,
                               std::int64_t ld_dst) {
  const std::int64_t n = rows * cols;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / cols, c = i % cols;
    dst[r * ld_dst + c] = from_f<T>(src[r * ld_src + c]);
  }
}

}  // namespace device

template <class T>
void ia3_scale(const Ia3Shape& shape, const float* gates, const T* scales, const T* a, std::int64_t ld_a, const T* b,
               std::int64_t ld_b, T* out, std::int64_t ld_out, T* ds, std::int64_t ld_ds, cudaStream_t stream) {
  if (shape.tokens == 0) return;
  const std::int64_t width = std::int64_t(shape.heads) * shape.head_dim;
  const dim3 grid(unsigned((width + device::ia3_columns_per_block - 1) / device::ia3_columns_per_block),
                  unsigned((shape.tokens + device::ia3_tokens_per_block - 1) / device::ia3_tokens_per_block));
  auto launch = [&](auto kernel) {
    MOET_LAUNCH(grid, device::ia3_columns_per_block, 0, stream, kernel)
    (shape, gates, scales, a, ld_a, b, ld_b, out, ld_out, ds, ld_ds);
  };
  if (shape.experts <= 16)
    launch(device::ia3_scale_kernel<16, T>);
  else if (shape.experts <= 64) launch(device::ia3_scale_kernel<64, T>);
  else launch(device::ia3_scale_kernel<0, T>);
  MOET_CUDA_CHECK_LAUNCH("ia3_scale_kernel");
}

template <class T>
void ia3_mix(const T* scales, std::int64_t n, bool subtract_one, T* mix, cudaStream_t stream) {
  if (n == 0) return;
  MOET_LAUNCH(device::grid_for(n, 256, 4096u), 256, 0, stream, device::ia3_mix_kernel<T>)
  (scales, n, subtract_one ? 1.f : 0.f, mix);
  MOET_CUDA_CHECK_LAUNCH("ia3_mix_kernel");
}

template <class T>
void convert(const float* src, std::int64_t ld_src, std::int64_t rows, std::int64_t cols, T* dst, std::int64_t ld_dst,
             cudaStream_t stream) {
  if (rows * cols == 0) return;
  MOET_LAUNCH(device::grid_for(rows * cols, 256, 4096u), 256, 0, stream, device::convert_kernel<T>)
  (src, ld_src, rows, cols, dst, ld_dst);
  MOET_CUDA_CHECK_LAUNCH("convert_kernel");
}

#define MOET_INSTANTIATE_IA3(T)                                                                                          \
  template void ia3_scale<T>(const Ia3Shape&, const float*, const T*, const T*, std::int64_t, const T*, std::int64_t,   \
                             T*, std::int64_t, T*, std::int64_t, cudaStream_t);                                          \
  template void ia3_mix<T>(const T*, std::int64_t, bool, T*, cudaStream_t);                                             \
  template void convert<T>(const float*, std::int64_t, std::int64_t, std::int64_t, T*, std::int64_t, cudaStream_t);
MOET_INSTANTIATE_IA3(float)
MOET_INSTANTIATE_IA3(__nv_bfloat16)
MOET_INSTANTIATE_IA3(__half)
#undef MOET_INSTANTIATE_IA3

}  // namespace moet::cuda_impl
