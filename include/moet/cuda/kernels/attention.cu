// Flash-style attention (the tiling of FlashAttention-2, Dao 2023): causal grouped-query
// attention with key padding and a KV cache's strided storage, without ever holding the
// (queries, keys) score matrix. Products run on the tensor cores through wmma (16 x 16 x 16
// tiles, bf16 / fp16 inputs, float32 accumulation); the softmax runs in float32.
//
//   forward   one block per (query tile, sequence, head): for each key tile, S = Q K^T into
//             shared memory, an online softmax (running max m and sum l per row), O = O alpha +
//             P V with P rounded to T (as the materialized path rounds it); keeps only O and
//             lse = m + log l.
//   backward  P = exp(S scale - lse) recomputed. dq: one block per query tile, over the key
//             tiles: dP = dO V^T, dS = P (dP - D) scale, dQ += dS K. dk, dv: one block per
//             (key tile, sequence, kv head), over the group's query heads and the query tiles
//             that see its keys: dV += P^T dO, dK += dS^T Q. No atomics: every result has the
//             same bits on every run.
//
// In a block, warp w owns 16 rows (queries, or keys for dk/dv); lane 2r + s of a warp owns row r
// of the warp's score tile and its half s of the columns. Tiles are staged in shared memory with
// rows D + 8 elements apart (16 bytes of padding against bank conflicts); a warp's scores live in
// its own float tile, which its P (in T) then overwrites. Tile sizes are chosen per kernel and
// head_dim so that a block needs at most 48 KiB of shared memory (no opt-in needed).
#include <cfloat>
#include <type_traits>

#include "../model_kernels.hpp"
#include "common.cuh"

namespace moet::cuda_impl {
namespace device {

/// The shared-memory layout of a kernel with `row_tiles` tiles of 16 W rows (owned by the warps)
/// and `col_tiles` tiles of C rows (streamed), head_dim D.
template <class T, int D, int W, int C, int row_tiles, int col_tiles>
struct FlashLayout {
  using Element = T;
  static constexpr int warps = W, rows = 16 * W, cols = C;
  static constexpr int ld = D + 8;      // elements between a T tile's rows
  static constexpr int sld = C + 4;     // floats between a score tile's rows
  static constexpr int pld = 2 * sld;   // the same pitch in T elements (P overlays the scores)
  static constexpr std::size_t row_tile_bytes = std::size_t(rows) * ld * sizeof(T);
  static constexpr std::size_t col_tile_bytes = std::size_t(cols) * ld * sizeof(T);
  static constexpr std::size_t score_bytes = std::size_t(16) * sld * sizeof(float);  // per warp
  static constexpr std::size_t scratch_bytes = 256 * sizeof(float);                  // per warp: one 16 x 16 tile
  static constexpr std::size_t bytes =
      row_tiles * row_tile_bytes + col_tiles * col_tile_bytes + W * (score_bytes + scratch_bytes);
  static_assert(D % 16 == 0 && C % 16 == 0 && D <= 128, "wmma tiles are 16 x 16");
  static_assert(bytes <= std::size_t(48) << 10, "a flash kernel's shared memory must fit the 48 KiB default");

  /// The first two row tiles (the second null where there is one) and the two column tiles.
  struct Tiles {
    T *row0, *row1, *col0, *col1;
  };
  __device__ static Tiles tiles(unsigned char* base) {
    return {row_tile(base, 0), row_tiles > 1 ? row_tile(base, 1) : nullptr, col_tile(base, 0), col_tile(base, 1)};
  }
  /// Tile i of the row tiles, then of the column tiles, then each warp's scores and scratch.
  __device__ static T* row_tile(unsigned char* base, int i) { return reinterpret_cast<T*>(base + i * row_tile_bytes); }
  __device__ static T* col_tile(unsigned char* base, int i) {
    return reinterpret_cast<T*>(base + row_tiles * row_tile_bytes + i * col_tile_bytes);
  }
  __device__ static float* scores(unsigned char* base, int warp) {
    return reinterpret_cast<float*>(base + row_tiles * row_tile_bytes + col_tiles * col_tile_bytes + warp * score_bytes);
  }
  __device__ static float* scratch(unsigned char* base, int warp) {
    return reinterpret_cast<float*>(base + row_tiles * row_tile_bytes + col_tiles * col_tile_bytes + W * score_bytes +
                                    warp * scratch_bytes);
  }
};

/// The first (W, C) of (4, 64), (4, 32), (2, 32) whose layout fits 48 KiB.
template <class T, int D, int row_tiles, int col_tiles>
struct FlashConfig {
  static constexpr std::size_t limit = std::size_t(48) << 10;
  static constexpr std::size_t bytes_of(int w, int c) {
    const std::size_t ld = std::size_t(D) + 8;
    return row_tiles * std::size_t(16 * w) * ld * sizeof(T) + col_tiles * std::size_t(c) * ld * sizeof(T) +
           std::size_t(w) * (16 * (std::size_t(c) + 4) + 256) * sizeof(float);
  }
  static constexpr int warps = bytes_of(4, 64) <= limit || bytes_of(4, 32) <= limit ? 4 : 2;
  static constexpr int cols = bytes_of(4, 64) <= limit ? 64 : 32;
  using Layout = FlashLayout<T, D, warps, cols, row_tiles, col_tiles>;
};

/// The unit of the flash kernels' dynamic shared memory: declared 128-byte aligned, so that every
/// tile (at multiples of 32 bytes from the start) meets wmma's 32-byte alignment.
struct alignas(128) FlashShared {
  unsigned char bytes[128];
};

template <class T>
__device__ __forceinline__ void copy16(T* dst, const T* src) {
#ifdef MOET_CUDA_EMULATION
  std::memcpy(dst, src, 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

/// Rows [first, first + rows) of a token-major operand (row i at src + i ld_src, D columns) into
/// a shared tile (rows ld apart); rows at or past `count` are zeros. vec: every row starts
/// 16-byte aligned, so 16-byte copies.
template <class T, int D>
__device__ void stage_rows(const T* src, std::int64_t ld_src, std::int64_t first, std::int64_t count, int rows, T* dst, int ld,
                           bool vec) {
  if (vec) {
    constexpr int per = 16 / int(sizeof(T)), chunks = D / per;
    for (int e = threadIdx.x; e < rows * chunks; e += blockDim.x) {
      const int r = e / chunks, c = (e % chunks) * per;
      const std::int64_t t = first + r;
      if (t < count) copy16(dst + r * ld + c, src + t * ld_src + c);
      else
        for (int x = 0; x < per; ++x) dst[r * ld + c + x] = from_f<T>(0.f);
    }
  } else {
    for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
      const int r = e / D, c = e % D;
      const std::int64_t t = first + r;
      dst[r * ld + c] = t < count ? src[t * ld_src + c] : from_f<T>(0.f);
    }
  }
}

/// out (16 x C scores at s, row pitch sld) = a (16 x D rows at a, pitch lda) b^T, b: C rows of D
/// at b (pitch ldb): the warp's S = Q K^T (or S^T = K Q^T, dP = dO V^T, dP^T = V dO^T).
template <class T, int D, int C>
__device__ void product_abt(const T* a, int lda, const T* b, int ldb, float* s, int sld) {
  for (int n = 0; n < C / 16; ++n) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kk = 0; kk < D / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, a + kk * 16, unsigned(lda));
      wmma::load_matrix_sync(fb, b + n * 16 * ldb + kk * 16, unsigned(ldb));
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(s + n * 16, acc, unsigned(sld), wmma::mem_row_major);
  }
}

/// acc[n] += p (16 x C at p, pitch pld) b[:, 16 n .. 16 n + 16), b: C rows of D (pitch ldb).
template <class T, int D, int C>
__device__ void accumulate_pb(const T* p, int pld, const T* b, int ldb,
                              wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&acc)[D / 16]) {
  for (int kk = 0; kk < C / 16; ++kk) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, p + kk * 16, unsigned(pld));
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, b + kk * 16 * ldb + n * 16, unsigned(ldb));
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

/// Writes the warp's 16 x D accumulators to rows first .. first + 15 (those below count) of a
/// token-major output, through the warp's 16 x 16 scratch tile.
template <class T, int D>
__device__ void write_rows(const wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&acc)[D / 16], float* scratch, T* out,
                           std::int64_t ld, std::int64_t first, std::int64_t count) {
  const int lane = threadIdx.x & 31;
  for (int n = 0; n < D / 16; ++n) {
    wmma::store_matrix_sync(scratch, acc[n], 16u, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const std::int64_t t = first + e / 16;
      if (t < count) out[t * ld + n * 16 + e % 16] = from_f<T>(scratch[e]);
    }
    __syncwarp();
  }
}

/// Whether query i of sequence b sees key j.
__device__ __forceinline__ bool flash_visible(const FlashShape& s, const unsigned char* valid, std::int64_t b, std::int64_t i,
                                              std::int64_t j) {
  return i < s.q_len && j < s.k_len && j <= s.k_len - s.q_len + i && valid[b * s.k_len + j];
}

/// One past the last key that queries q0 .. q0 + rows - 1 see (causal): the key loop's end.
__device__ __forceinline__ std::int64_t causal_key_end(const FlashShape& s, std::int64_t q0, int rows) {
  const std::int64_t last = (q0 + rows < s.q_len ? q0 + rows : s.q_len) - 1;
  const std::int64_t end = s.k_len - s.q_len + last + 1;
  return end < s.k_len ? end : s.k_len;
}

/// This thread's place: its warp, and its row (lane / 2) and half of the columns (lane % 2) of
/// the warp's score tile; scores: the warp's float tile, p: the same bytes as T (P or dS).
template <class L>
struct WarpTile {
  int warp, row, half;
  float* scores;
  typename L::Element* p;
  __device__ explicit WarpTile(unsigned char* base)
      : warp(int(threadIdx.x >> 5)), row(int(threadIdx.x & 31) >> 1), half(int(threadIdx.x & 1)),
        scores(L::scores(base, warp)), p(reinterpret_cast<typename L::Element*>(scores)) {}
  /// Column c of this thread's half of its row.
  __device__ int col(int c) const { return half * (L::cols / 2) + c; }
  __device__ float score(int c) const { return scores[row * L::sld + col(c)]; }
  /// Writes values (this thread's half-row, in T) over the scores once every lane has read them,
  /// and waits until the whole tile is written.
  __device__ void store(const float (&values)[L::cols / 2]) const {
    __syncwarp();
#pragma unroll
    for (int c = 0; c < L::cols / 2; ++c) p[row * L::pld + col(c)] = from_f<typename L::Element>(values[c]);
    __syncwarp();
  }
};

template <class T, int D>
__global__ void flash_forward_kernel(const T* q, const T* k, const T* v, const unsigned char* valid, T* out, float* lse,
                                     FlashShape s, int vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 wmma needs sm_80; the launcher refuses older devices
#else
  using L = typename FlashConfig<T, D, 1, 2>::Layout;
  constexpr int C = L::cols, R = L::rows;
  MOET_DYNAMIC_SHARED(FlashShared, shared_raw);
  unsigned char* base = reinterpret_cast<unsigned char*>(shared_raw);
  const auto [qs, no_second_row_tile, ks, vs] = L::tiles(base);
  const WarpTile<L> w(base);
  const int warp = w.warp, row = w.row, half = w.half;
  float* tw = L::scratch(base, warp);
  const std::int64_t b = blockIdx.y / s.heads;
  const int h = int(blockIdx.y % s.heads), hk = h / (s.heads / s.kv_heads);
  const std::int64_t q0 = std::int64_t(blockIdx.x) * R, i = q0 + warp * 16 + row;
  const T* kb = k + b * s.kv_stride * s.ld_k + hk * D;
  const T* vb = v + b * s.kv_stride * s.ld_v + hk * D;
  stage_rows<T, D>(q + b * s.q_len * s.ld_q + h * D, s.ld_q, q0, s.q_len, R, qs, L::ld, vec != 0);

  const std::int64_t key_end = causal_key_end(s, q0, R);
  float m = -INFINITY, l = 0.f;
  float o[D / 2];  // columns 16 n + 8 half + c of the lane's row, at o[8 n + c]
#pragma unroll
  for (int x = 0; x < D / 2; ++x) o[x] = 0.f;
  for (std::int64_t k0 = 0; k0 < key_end; k0 += C) {
    __syncthreads();  // the previous tiles are read (and the query tile is staged)
    stage_rows<T, D>(kb, s.ld_k, k0, s.k_len, C, ks, L::ld, vec != 0);
    stage_rows<T, D>(vb, s.ld_v, k0, s.k_len, C, vs, L::ld, vec != 0);
    __syncthreads();
    product_abt<T, D, C>(qs + warp * 16 * L::ld, L::ld, ks, L::ld, w.scores, L::sld);
    __syncwarp();
    float p[C / 2];
    float tile_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < C / 2; ++c) {
      p[c] = flash_visible(s, valid, b, i, k0 + w.col(c)) ? w.score(c) * s.scale : -INFINITY;
      tile_max = fmaxf(tile_max, p[c]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(full_mask, tile_max, 1));
    const float m_new = fmaxf(m, tile_max);
    const float alpha = m_new == -INFINITY ? 1.f : expf(m - m_new);
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < C / 2; ++c) {
      p[c] = p[c] == -INFINITY ? 0.f : expf(p[c] - m_new);
      sum += p[c];
    }
    sum += __shfl_xor_sync(full_mask, sum, 1);
    l = l * alpha + sum;
    m = m_new;
#pragma unroll
    for (int x = 0; x < D / 2; ++x) o[x] *= alpha;
    w.store(p);
    // O += P V, one 16-column chunk at a time through the scratch tile.
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fp[C / 16];
#pragma unroll
    for (int kk = 0; kk < C / 16; ++kk) wmma::load_matrix_sync(fp[kk], w.p + kk * 16, unsigned(L::pld));
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < C / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fv;
        wmma::load_matrix_sync(fv, vs + kk * 16 * L::ld + n * 16, unsigned(L::ld));
        wmma::mma_sync(acc, fp[kk], fv, acc);
      }
      wmma::store_matrix_sync(tw, acc, 16u, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int c = 0; c < 8; ++c) o[8 * n + c] += tw[row * 16 + 8 * half + c];
      __syncwarp();
    }
  }
  if (i < s.q_len) {
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* y = out + (b * s.q_len + i) * s.ld_o + h * D;
#pragma unroll
    for (int n = 0; n < D / 16; ++n)
#pragma unroll
      for (int c = 0; c < 8; ++c) y[16 * n + 8 * half + c] = from_f<T>(o[8 * n + c] * inv);
    if (half == 0) lse[(b * s.heads + h) * s.q_len + i] = l > 0.f ? m + logf(l) : -INFINITY;
  }
#endif
}

template <class T, int D>
__global__ void flash_dq_kernel(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* d,
                                const unsigned char* valid, T* dq, FlashShape s, int vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using L = typename FlashConfig<T, D, 2, 2>::Layout;
  constexpr int C = L::cols, R = L::rows;
  MOET_DYNAMIC_SHARED(FlashShared, shared_raw);
  unsigned char* base = reinterpret_cast<unsigned char*>(shared_raw);
  const auto [qs, dos, ks, vs] = L::tiles(base);
  const WarpTile<L> w(base);
  const int warp = w.warp;
  const std::int64_t b = blockIdx.y / s.heads;
  const int h = int(blockIdx.y % s.heads), hk = h / (s.heads / s.kv_heads);
  const std::int64_t q0 = std::int64_t(blockIdx.x) * R, i = q0 + warp * 16 + w.row;
  const std::int64_t r = (b * s.heads + h) * s.q_len + i;
  const float lse_i = i < s.q_len ? lse[r] : -INFINITY, d_i = i < s.q_len ? d[r] : 0.f;
  stage_rows<T, D>(q + b * s.q_len * s.ld_q + h * D, s.ld_q, q0, s.q_len, R, qs, L::ld, vec != 0);
  stage_rows<T, D>(dout + b * s.q_len * s.ld_o + h * D, s.ld_o, q0, s.q_len, R, dos, L::ld, vec != 0);
  const T* kb = k + b * s.kv_stride * s.ld_k + hk * D;
  const T* vb = v + b * s.kv_stride * s.ld_v + hk * D;

  const std::int64_t key_end = causal_key_end(s, q0, R);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
  for (std::int64_t k0 = 0; k0 < key_end; k0 += C) {
    __syncthreads();
    stage_rows<T, D>(kb, s.ld_k, k0, s.k_len, C, ks, L::ld, vec != 0);
    stage_rows<T, D>(vb, s.ld_v, k0, s.k_len, C, vs, L::ld, vec != 0);
    __syncthreads();
    product_abt<T, D, C>(qs + warp * 16 * L::ld, L::ld, ks, L::ld, w.scores, L::sld);  // S = Q K^T
    __syncwarp();
    float p[C / 2];
#pragma unroll
    for (int c = 0; c < C / 2; ++c)
      p[c] = lse_i != -INFINITY && flash_visible(s, valid, b, i, k0 + w.col(c)) ? expf(w.score(c) * s.scale - lse_i) : 0.f;
    __syncwarp();
    product_abt<T, D, C>(dos + warp * 16 * L::ld, L::ld, vs, L::ld, w.scores, L::sld);  // dP = dO V^T
    __syncwarp();
#pragma unroll
    for (int c = 0; c < C / 2; ++c) p[c] = p[c] == 0.f ? 0.f : p[c] * (w.score(c) - d_i) * s.scale;
    w.store(p);                                          // dS
    accumulate_pb<T, D, C>(w.p, L::pld, ks, L::ld, acc);  // dQ += dS K
  }
  write_rows<T, D>(acc, L::scratch(base, warp), dq + b * s.q_len * s.ld_dq + h * D, s.ld_dq, q0 + warp * 16, s.q_len);
#endif
}

template <class T, int D>
__global__ void flash_dkdv_kernel(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* d,
                                  const unsigned char* valid, T* dk, T* dv, FlashShape s, int vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using L = typename FlashConfig<T, D, 2, 2>::Layout;
  constexpr int C = L::cols, R = L::rows;
  MOET_DYNAMIC_SHARED(FlashShared, shared_raw);
  unsigned char* base = reinterpret_cast<unsigned char*>(shared_raw);
  const auto [ks, vs, qs, dos] = L::tiles(base);
  const WarpTile<L> w(base);
  const int warp = w.warp;
  const std::int64_t b = blockIdx.y / s.kv_heads;
  const int hk = int(blockIdx.y % s.kv_heads), group = s.heads / s.kv_heads;
  const std::int64_t j0 = std::int64_t(blockIdx.x) * R, j = j0 + warp * 16 + w.row, shift = s.k_len - s.q_len;
  stage_rows<T, D>(k + b * s.kv_stride * s.ld_k + hk * D, s.ld_k, j0, s.k_len, R, ks, L::ld, vec != 0);
  stage_rows<T, D>(v + b * s.kv_stride * s.ld_v + hk * D, s.ld_v, j0, s.k_len, R, vs, L::ld, vec != 0);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk_acc[D / 16], dv_acc[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(dk_acc[n], 0.f);
    wmma::fill_fragment(dv_acc[n], 0.f);
  }
  // Query i sees key j when i >= j - shift: the first query tile that sees the block's keys.
  const std::int64_t i_start = j0 - shift > 0 ? j0 - shift : 0;
  for (int g = 0; g < group; ++g) {
    const int h = hk * group + g;
    const T* qb = q + b * s.q_len * s.ld_q + h * D;
    const T* ob = dout + b * s.q_len * s.ld_o + h * D;
    const float* lse_h = lse + (b * s.heads + h) * s.q_len;
    const float* d_h = d + (b * s.heads + h) * s.q_len;
    for (std::int64_t i0 = i_start; i0 < s.q_len; i0 += C) {
      __syncthreads();
      stage_rows<T, D>(qb, s.ld_q, i0, s.q_len, C, qs, L::ld, vec != 0);
      stage_rows<T, D>(ob, s.ld_o, i0, s.q_len, C, dos, L::ld, vec != 0);
      __syncthreads();
      product_abt<T, D, C>(ks + warp * 16 * L::ld, L::ld, qs, L::ld, w.scores, L::sld);  // S^T = K Q^T
      __syncwarp();
      float p[C / 2];
#pragma unroll
      for (int c = 0; c < C / 2; ++c) {
        const std::int64_t ii = i0 + w.col(c);
        const float l_i = ii < s.q_len ? lse_h[ii] : -INFINITY;
        p[c] = l_i != -INFINITY && flash_visible(s, valid, b, ii, j) ? expf(w.score(c) * s.scale - l_i) : 0.f;
      }
      w.store(p);                                                // P^T
      accumulate_pb<T, D, C>(w.p, L::pld, dos, L::ld, dv_acc);  // dV += P^T dO
      __syncwarp();  // every lane has loaded P^T before dP^T overwrites it
      product_abt<T, D, C>(vs + warp * 16 * L::ld, L::ld, dos, L::ld, w.scores, L::sld);  // dP^T = V dO^T
      __syncwarp();
#pragma unroll
      for (int c = 0; c < C / 2; ++c) p[c] = p[c] == 0.f ? 0.f : p[c] * (w.score(c) - d_h[i0 + w.col(c)]) * s.scale;
      w.store(p);                                               // dS^T
      accumulate_pb<T, D, C>(w.p, L::pld, qs, L::ld, dk_acc);  // dK += dS^T Q
    }
  }
  float* scratch = L::scratch(base, warp);
  write_rows<T, D>(dk_acc, scratch, dk + b * s.kv_stride * s.ld_dk + hk * D, s.ld_dk, j0 + warp * 16, s.k_len);
  write_rows<T, D>(dv_acc, scratch, dv + b * s.kv_stride * s.ld_dv + hk * D, s.ld_dv, j0 + warp * 16, s.k_len);
#endif
}

/// Whether every row of an operand starts 16-byte aligned.
template <class T>
bool rows_aligned(const T* p, std::int64_t ld) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (ld * std::int64_t(sizeof(T))) % 16 == 0;
}

inline unsigned blocks_of(std::int64_t n, int per) { return unsigned((n + per - 1) / per); }

template <class T, int D>
void flash_forward(const T* q, const T* k, const T* v, const unsigned char* valid, T* out, float* lse, const FlashShape& s,
                   int vec, cudaStream_t stream) {
  using L = typename FlashConfig<T, D, 1, 2>::Layout;
  const dim3 grid(blocks_of(s.q_len, L::rows), unsigned(s.batch * s.heads));
  MOET_LAUNCH(grid, L::warps * 32, L::bytes, stream, flash_forward_kernel<T, D>)(q, k, v, valid, out, lse, s, vec);
  MOET_CUDA_CHECK_LAUNCH("flash_forward_kernel");
}

template <class T, int D>
void flash_backward(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* d,
                    const unsigned char* valid, T* dq, T* dk, T* dv, const FlashShape& s, int vec, cudaStream_t stream) {
  using L = typename FlashConfig<T, D, 2, 2>::Layout;
  const dim3 grid_q(blocks_of(s.q_len, L::rows), unsigned(s.batch * s.heads));
  MOET_LAUNCH(grid_q, L::warps * 32, L::bytes, stream, flash_dq_kernel<T, D>)(q, k, v, dout, lse, d, valid, dq, s, vec);
  MOET_CUDA_CHECK_LAUNCH("flash_dq_kernel");
  const dim3 grid_kv(blocks_of(s.k_len, L::rows), unsigned(s.batch * s.kv_heads));
  MOET_LAUNCH(grid_kv, L::warps * 32, L::bytes, stream, flash_dkdv_kernel<T, D>)(q, k, v, dout, lse, d, valid, dk, dv, s, vec);
  MOET_CUDA_CHECK_LAUNCH("flash_dkdv_kernel");
}

}  // namespace device

template <class T>
bool flash_attention_supported(int head_dim) {
  return !std::is_same_v<T, float> && (head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128);
}

namespace {
/// Calls f with head_dim as a compile-time constant.
template <class F>
void with_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: throw cuda_error(detail::concat("flash attention: head_dim ", head_dim, " (expected 16, 32, 64 or 128)"),
                              int(cudaErrorInvalidValue));
  }
}
}  // namespace

template <class T>
void flash_attention_forward(const T* q, const T* k, const T* v, const unsigned char* valid, T* out, float* lse,
                             const FlashShape& s, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    throw cuda_error("flash attention: float storage (expected bf16 or fp16)", int(cudaErrorInvalidValue));
  } else {
    if (s.batch * s.q_len == 0) return;
    const int vec = device::rows_aligned(q, s.ld_q) && device::rows_aligned(k, s.ld_k) && device::rows_aligned(v, s.ld_v);
    with_head_dim(s.head_dim,
                  [&](auto D) { device::flash_forward<T, decltype(D)::value>(q, k, v, valid, out, lse, s, vec, stream); });
  }
}

template <class T>
void flash_attention_backward(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* d,
                              const unsigned char* valid, T* dq, T* dk, T* dv, const FlashShape& s, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    throw cuda_error("flash attention: float storage (expected bf16 or fp16)", int(cudaErrorInvalidValue));
  } else {
    if (s.batch * (s.q_len + s.k_len) == 0) return;
    const int vec = device::rows_aligned(q, s.ld_q) && device::rows_aligned(k, s.ld_k) && device::rows_aligned(v, s.ld_v) &&
                    device::rows_aligned(dout, s.ld_o);
    with_head_dim(s.head_dim, [&](auto D) {
      device::flash_backward<T, decltype(D)::value>(q, k, v, dout, lse, d, valid, dq, dk, dv, s, vec, stream);
    });
  }
}

#define MOET_INSTANTIATE_FLASH(T)                                                                                              \
  template bool flash_attention_supported<T>(int);                                                                             \
  template void flash_attention_forward<T>(const T*, const T*, const T*, const unsigned char*, T*, float*, const FlashShape&, \
                                           cudaStream_t);                                                                      \
  template void flash_attention_backward<T>(const T*, const T*, const T*, const T*, const float*, const float*,              \
                                            const unsigned char*, T*, T*, T*, const FlashShape&, cudaStream_t);
MOET_INSTANTIATE_FLASH(__nv_bfloat16)
MOET_INSTANTIATE_FLASH(__half)
MOET_INSTANTIATE_FLASH(float)  // refuses: the launchers exist so that ops<cuda, float> links
#undef MOET_INSTANTIATE_FLASH

}  // namespace moet::cuda_impl
