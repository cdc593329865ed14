// cuBLASLt matmul plans, cached per problem: the operation and layout descriptors and the
// algorithm the heuristic picked, created the first time a (shape, strides, types, transposes,
// epilogue, pointer alignment) combination is seen and reused afterwards, so steady-state
// training issues cublasLtMatmul alone.
//
// An algorithm may assume the alignments it was chosen for: A, B, C and D's come from the
// preference (MIN_ALIGNMENT_*, 256 bytes unless set), the bias's from the bias pointer the
// descriptor holds when the heuristic runs (cublasLt.h: the heuristic "depend[s] on its value to
// determine expected pointer alignment"; a null pointer looks fully aligned). So every alignment
// is part of the key, and the heuristic sees the call's own bias pointer.
#pragma once

#include <cublasLt.h>

#include <cstdint>
#include <cstddef>
#include <map>
#include <utility>
#include <tuple>

#include "error.hpp"

namespace moet::cuda_impl {

/// The largest power of two (at most 256) dividing the address and, for a batch, every
/// operand's offset (stride_bytes): the alignment cuBLASLt may assume for each of them.
inline int pointer_alignment(const void* p, std::int64_t stride_bytes = 0) {
  const auto address = reinterpret_cast<std::uintptr_t>(p) | std::uintptr_t(stride_bytes);
  int alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

/// Column-major cuBLASLt problem D (m x n) = op(A) (m x k) op(B) (k x n) [+ beta C] [+ bias],
/// `batch` times over strided operands (element strides; batch 1 is a single product).
struct MatmulKey {
  std::int64_t m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0;
  int trans_a = 0, trans_b = 0;
  int ab_type = 0, c_type = 0;
  int align_bias = 0;  ///< 0: no bias; else the bias pointer's alignment (BIAS epilogue)
  int align_a = 0, align_b = 0, align_c = 0;
  int batch = 1;
  std::int64_t stride_a = 0, stride_b = 0, stride_c = 0;

  auto tie() const {
    return std::tie(m, n, k, lda, ldb, ldc, trans_a, trans_b, ab_type, c_type, align_bias, align_a, align_b, align_c, batch, stride_a,
                    stride_b, stride_c);
  }
  bool operator<(const MatmulKey& other) const { return tie() < other.tie(); }
};

struct MatmulPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  std::size_t workspace = 0;  ///< bytes the algorithm asked for
};

class MatmulCache {
 public:
  MatmulCache() = default;
  MatmulCache(const MatmulCache&) = delete;
  MatmulCache& operator=(const MatmulCache&) = delete;
  ~MatmulCache() { clear(); }

  /// The plan of `key`, made on first use with the heuristic (workspace at most `workspace_bytes`);
  /// bias: the call's bias pointer (of alignment key.align_bias), null without one.
  const MatmulPlan& plan(cublasLtHandle_t lt, const MatmulKey& key, std::size_t workspace_bytes, const void* bias = nullptr) {
    ++lookups_;
    auto found = plans_.find(key);
    if (found != plans_.end()) return found->second;
    MatmulPlan plan;
    try {
      make(lt, key, workspace_bytes, bias, plan);
    } catch (...) {
      destroy(plan);
      throw;
    }
    ++heuristic_queries_;
    return plans_.emplace(key, plan).first->second;
  }

  /// How many times the heuristic was asked (once per distinct problem).
  std::int64_t heuristic_queries() const { return heuristic_queries_; }
  std::size_t size() const { return plans_.size(); }
  /// How many plans were asked for: one per cublasLtMatmul issued (a strided batch counts once).
  std::int64_t lookups() const { return lookups_; }

  void clear() noexcept {
    for (auto& entry : plans_) destroy(entry.second);
    plans_.clear();
  }

 private:
  static void make(cublasLtHandle_t lt, const MatmulKey& key, std::size_t workspace_bytes, const void* bias, MatmulPlan& plan) {
    const auto ab = cudaDataType_t(key.ab_type), c = cudaDataType_t(key.c_type);
    MOET_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    MOET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    MOET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    if (bias) {
      const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
      MOET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue));
      MOET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    }
    MOET_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.a, ab, key.trans_a ? key.k : key.m, key.trans_a ? key.m : key.k, key.lda));
    MOET_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.b, ab, key.trans_b ? key.n : key.k, key.trans_b ? key.k : key.n, key.ldb));
    MOET_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.c, c, key.m, key.n, key.ldc));
    if (key.batch > 1)
      for (auto [layout, stride] : {std::pair{plan.a, key.stride_a}, {plan.b, key.stride_b}, {plan.c, key.stride_c}}) {
        const std::int32_t count = key.batch;
        MOET_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count));
        MOET_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride));
      }

    cublasLtMatmulPreference_t preference = nullptr;
    MOET_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
    {
      const std::uint64_t max_workspace = workspace_bytes;
      const std::uint32_t align_a = std::uint32_t(key.align_a), align_b = std::uint32_t(key.align_b),
                          align_c = std::uint32_t(key.align_c);
      status = cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace,
                                                    sizeof max_workspace);
      if (status == CUBLAS_STATUS_SUCCESS)
        status = cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof align_a);
      if (status == CUBLAS_STATUS_SUCCESS)
        status = cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof align_b);
      if (status == CUBLAS_STATUS_SUCCESS)
        status = cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof align_c);
      if (status == CUBLAS_STATUS_SUCCESS)
        status = cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof align_c);
      if (status == CUBLAS_STATUS_SUCCESS)
        status = cublasLtMatmulAlgoGetHeuristic(lt, plan.desc, plan.a, plan.b, plan.c, plan.c, preference, 1, &result, &found);
    }
    cublasLtMatmulPreferenceDestroy(preference);
    MOET_CUBLAS_CHECK(status);
    // cublasLt.h: a result's fields "are only valid if ... this member [state] is set to CUBLAS_STATUS_SUCCESS".
    if (found == 0 || result.state != CUBLAS_STATUS_SUCCESS)
      throw cuda_error(detail::concat("cublasLtMatmulAlgoGetHeuristic found no algorithm for m=", key.m, " n=", key.n, " k=", key.k,
                                      " lda=", key.lda, " ldb=", key.ldb, " ldc=", key.ldc, " transa=", key.trans_a,
                                      " transb=", key.trans_b, " batch=", key.batch, " (column-major)",
                                      found == 0 ? "" : ": its result's state is ",
                                      found == 0 ? "" : cublasLtGetStatusName(result.state)),
                       int(found == 0 ? CUBLAS_STATUS_NOT_SUPPORTED : result.state));
    plan.algo = result.algo;
    plan.workspace = result.workspaceSize;
  }

  static void destroy(MatmulPlan& plan) noexcept {
    if (plan.a) cublasLtMatrixLayoutDestroy(plan.a);
    if (plan.b) cublasLtMatrixLayoutDestroy(plan.b);
    if (plan.c) cublasLtMatrixLayoutDestroy(plan.c);
    if (plan.desc) cublasLtMatmulDescDestroy(plan.desc);
    plan = MatmulPlan{};
  }

  std::map<MatmulKey, MatmulPlan> plans_;
  std::int64_t heuristic_queries_ = 0;
  std::int64_t lookups_ = 0;
};

}  // namespace moet::cuda_impl
