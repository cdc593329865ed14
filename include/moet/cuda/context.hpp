// CudaContext: what every CUDA layer runs on. It owns one non-blocking stream, one cuBLASLt
// handle, the 32 MiB cuBLASLt workspace Hopper's kernels want, and the cache of cuBLASLt
// matmul plans (descriptors + the heuristic's algorithm), queried once per shape (matmul.hpp).
// Layers keep a pointer to their context: it must outlive them and everything they return.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

#include "buffer.hpp"
#include "error.hpp"
#include "matmul_cache.hpp"

namespace moet {

/// Why no CUDA device can be used here (no driver, no device), or nothing when one can.
inline std::optional<std::string> cuda_unavailable_reason() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return detail::concat("cudaGetDeviceCount failed: ", cudaGetErrorName(status), " (", cudaGetErrorString(status), ")");
  }
  if (count == 0) return std::string("cudaGetDeviceCount reports no CUDA device");
  return std::nullopt;
}

/// Which attention the CUDA backend's ops run (ops.hpp's Attention):
///   automatic     flash where it applies (bf16 / fp16, head_dim 16, 32, 64 or 128, a device of
///                 compute capability 8.0 or newer), else materialized
///   materialized  cuBLASLt strided-batched GEMMs over the (queries, keys) scores and a softmax kernel
///   flash         the flash kernels (kernels/attention.cu); an attention they cannot run is refused
enum class AttentionKernel { automatic, materialized, flash };

/// The attention a new context starts with: MOET_CUDA_ATTENTION=automatic, materialized or flash
/// (unset or empty: automatic), so that a program can be run on the other kernel without a change
/// (scripts/gpu-check.sh materialized); any other value is a moet::value_error naming it.
inline AttentionKernel attention_kernel_from_environment() {
  const char* v = std::getenv("MOET_CUDA_ATTENTION");
  const std::string value = v ? v : "";
  if (value.empty() || value == "automatic") return AttentionKernel::automatic;
  if (value == "materialized") return AttentionKernel::materialized;
  if (value == "flash") return AttentionKernel::flash;
  throw value_error(detail::concat("MOET_CUDA_ATTENTION is \"", value, "\"; expected automatic, materialized or flash"));
}

class CudaContext;
namespace cuda_impl {
/// This thread's current context (PyTorch's "current stream", per thread): the one the backend's
/// model ops run on (ops.hpp). The first context made on a thread becomes current.
inline CudaContext*& current_context_slot() {
  thread_local CudaContext* current = nullptr;
  return current;
}
}  // namespace cuda_impl

class CudaContext {
 public:
  static constexpr std::size_t workspace_bytes = std::size_t(32) << 20;

  /// Uses device `device`; throws moet::cuda_error naming the failing call (cudaGetDeviceCount
  /// when there is no driver or no device).
  explicit CudaContext(int device = 0) : device_(device), attention_(attention_kernel_from_environment()) {
    int count = 0;
    MOET_CUDA_CHECK(cudaGetDeviceCount(&count));
    if (device < 0 || device >= count)
      throw cuda_error(detail::concat("CudaContext: device ", device, " requested, but cudaGetDeviceCount reports ", count,
                                      " device(s)"),
                       int(cudaErrorInvalidDevice));
    try {
      MOET_CUDA_CHECK(cudaSetDevice(device));
      MOET_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      MOET_CUBLAS_CHECK(cublasLtCreate(&lt_));
      MOET_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes));
      // Keep freed stream-ordered memory in the pool: steps re-allocate the same sizes.
      cudaMemPool_t pool;
      MOET_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
      std::uint64_t threshold = UINT64_MAX;
      MOET_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
      cudaDeviceProp prop{};
      MOET_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
      name_ = prop.name;
      sm_count_ = prop.multiProcessorCount;
      compute_capability_ = prop.major * 10 + prop.minor;
    } catch (...) {
      release();
      throw;
    }
    if (!cuda_impl::current_context_slot()) cuda_impl::current_context_slot() = this;
  }
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;
  ~CudaContext() {
    if (cuda_impl::current_context_slot() == this) cuda_impl::current_context_slot() = nullptr;
    release();
  }

  /// Makes this the context the model ops of this thread run on (needed only with several contexts).
  void make_current() { cuda_impl::current_context_slot() = this; }
  /// This thread's current context, or a moet::cuda_error when none was made.
  static CudaContext& current() {
    if (CudaContext* c = cuda_impl::current_context_slot()) return *c;
    throw cuda_error("moet CUDA backend: no CudaContext on this thread; make one (moet::CudaContext ctx;) before running a "
                     "CUDA model, or call ctx.make_current() on this thread",
                     int(cudaErrorInvalidDevice));
  }

  int device() const { return device_; }
  const std::string& device_name() const { return name_; }
  int sm_count() const { return sm_count_; }
  /// 10 major + minor (90 on an H100 / H200).
  int compute_capability() const { return compute_capability_; }
  /// The attention the model ops run from now on (AttentionKernel above; benchmarks compare them);
  /// a context starts with attention_kernel_from_environment().
  void set_attention_kernel(AttentionKernel kernel) { attention_ = kernel; }
  AttentionKernel attention_kernel() const { return attention_; }
  cudaStream_t stream() const { return stream_; }
  cublasLtHandle_t lt() const { return lt_; }
  void* workspace() const { return workspace_; }
  cuda_impl::MatmulCache& matmuls() { return cache_; }

  /// Waits for everything queued on the stream; reports a fault of an earlier kernel.
  void synchronize() const { cuda_impl::wait_for(stream_); }

 private:
  void release() noexcept {
    cache_.clear();
    if (stream_) cudaStreamSynchronize(stream_);
    if (workspace_) cudaFree(workspace_);
    if (lt_) cublasLtDestroy(lt_);
    if (stream_) cudaStreamDestroy(stream_);
    workspace_ = nullptr;
    lt_ = nullptr;
    stream_ = nullptr;
  }

  int device_ = 0;
  int sm_count_ = 0;
  int compute_capability_ = 0;
  AttentionKernel attention_ = AttentionKernel::automatic;
  std::string name_;
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  void* workspace_ = nullptr;
  cuda_impl::MatmulCache cache_;
};

}  // namespace moet
