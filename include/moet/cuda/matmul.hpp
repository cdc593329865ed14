// Row-major GEMMs on cuBLASLt: C (M x N) = alpha op_a(A) op_b(B) + beta C [+ bias], A and B of
// the storage type T (float, bf16, fp16), C of T or float, accumulation in float32
// (CUBLAS_COMPUTE_32F: true fp32 for float, never TF32). beta = 1 accumulates in place (C is
// also the output), which is how the layers add a second product onto a first without an add
// kernel; bias (length N, of C's type) uses the cuBLASLt BIAS epilogue.
//
// cuBLASLt is column-major; a row-major (r x c, ld) matrix is the column-major (c x r, ld) one,
// so C = op_a(A) op_b(B) is computed as C^T = op_b(B)^T op_a(A)^T: the operands swap, each keeps
// its own transpose flag, and no data moves.
//
// Strided batches (`Batch`): `count` products at once, operand i at a + i stride_a (elements),
// and likewise for B and C: one launch for attention's per-head products.
#pragma once

#include <cstdint>
#include <limits>

#include "buffer.hpp"
#include "context.hpp"
#include "matmul_cache.hpp"

namespace moet::cuda_impl {

enum class Op { N, T };

/// `count` products over operands `stride_*` elements apart (count 1: one product).
struct Batch {
  std::int64_t count = 1;
  std::int64_t stride_a = 0, stride_b = 0, stride_c = 0;
};

template <class T, class TC>
void gemm(CudaContext& ctx, Op op_a, DeviceView<const T> a, Op op_b, DeviceView<const T> b, DeviceView<TC> c, float alpha,
          float beta, const TC* bias = nullptr, Batch batch = {}) {
  static_assert(is_storage_type<T> && (std::is_same_v<TC, T> || std::is_same_v<TC, float>),
                "gemm: A and B of one storage type, C of that type or float");
  const std::int64_t M = op_a == Op::N ? a.rows : a.cols, K = op_a == Op::N ? a.cols : a.rows;
  const std::int64_t KB = op_b == Op::N ? b.rows : b.cols, N = op_b == Op::N ? b.cols : b.rows;
  if (K != KB || c.rows != M || c.cols != N)
    throw shape_error(detail::concat("cuBLASLt matmul: op(A) is ", detail::shape_string(M, K), ", op(B) is ",
                                     detail::shape_string(KB, N), ", C is ", detail::shape_string(c.rows, c.cols),
                                     "; expected C = (M, N) from (M, K) x (K, N)"));
  if (batch.count < 1 || batch.count > std::numeric_limits<std::int32_t>::max() || batch.stride_a < 0 || batch.stride_b < 0 ||
      batch.stride_c < 0 || (batch.count > 1 && bias))
    throw value_error(detail::concat("cuBLASLt matmul: a batch of ", batch.count, " with strides ", batch.stride_a, ", ",
                                     batch.stride_b, ", ", batch.stride_c, " (needs 1 <= count < 2^31, strides >= 0, no bias)"));
  if (M == 0 || N == 0) return;
  if (K == 0) {  // no product: C = beta C, done here for the two betas the layers use
    if ((beta != 0.f && beta != 1.f) || bias)
      throw value_error(detail::concat("cuBLASLt matmul: K = 0 with beta ", beta, bias ? " and a bias" : "",
                                       " (an empty product takes beta 0 or 1 and no bias)"));
    if (beta == 0.f)
      for (std::int64_t i = 0; i < batch.count; ++i)
        MOET_CUDA_CHECK(cudaMemset2DAsync(c.data + i * batch.stride_c, std::size_t(c.ld) * sizeof(TC), 0, std::size_t(N) * sizeof(TC),
                                          std::size_t(M), ctx.stream()));
    return;
  }
  // Column-major: D (N x M) = op_b(Bs) (N x K) * op_a(As) (K x M).
  MatmulKey key;
  key.m = N;
  key.n = M;
  key.k = K;
  key.lda = b.ld;
  key.ldb = a.ld;
  key.ldc = c.ld;
  key.trans_a = op_b == Op::T;
  key.trans_b = op_a == Op::T;
  key.ab_type = int(data_type<T>());
  key.c_type = int(data_type<TC>());
  key.align_bias = bias ? pointer_alignment(bias) : 0;
  key.align_a = pointer_alignment(b.data, batch.stride_b * std::int64_t(sizeof(T)));
  key.align_b = pointer_alignment(a.data, batch.stride_a * std::int64_t(sizeof(T)));
  key.align_c = pointer_alignment(c.data, batch.stride_c * std::int64_t(sizeof(TC)));
  if (batch.count > 1) {
    key.batch = int(batch.count);
    key.stride_a = batch.stride_b;
    key.stride_b = batch.stride_a;
    key.stride_c = batch.stride_c;
  }
  const MatmulPlan& plan = ctx.matmuls().plan(ctx.lt(), key, CudaContext::workspace_bytes, bias);
  if (bias)  // this call's bias: the plan's algorithm was chosen for one of the same alignment
    MOET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
  MOET_CUBLAS_CHECK(cublasLtMatmul(ctx.lt(), plan.desc, &alpha, b.data, plan.a, a.data, plan.b, &beta, c.data, plan.c, c.data,
                                   plan.c, &plan.algo, ctx.workspace(), CudaContext::workspace_bytes, ctx.stream()));
}

}  // namespace moet::cuda_impl
