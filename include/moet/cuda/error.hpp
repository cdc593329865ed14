// Errors of the CUDA backend. Every CUDA runtime call, every cuBLASLt call and every kernel
// launch goes through one of these checks; a failure throws moet::cuda_error whose message names
// the call, the status name and its description, and where in moet it was made. Eigen-free, so
// the kernel translation units include it too.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <string>

#include "../core/error.hpp"

namespace moet {

/// A CUDA runtime or cuBLASLt call failed (or a kernel launch did).
class cuda_error : public error {
 public:
  cuda_error(const std::string& message, int status) : error(message), status_(status) {}
  /// The cudaError_t or cublasStatus_t value.
  int status() const { return status_; }

 private:
  int status_;
};

namespace cuda_impl {

inline void check_cuda(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  throw cuda_error(detail::concat(call, " failed: ", cudaGetErrorName(status), " (", cudaGetErrorString(status), ") at ",
                                  file, ":", line),
                   int(status));
}

inline void check_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw cuda_error(detail::concat(call, " failed: ", cublasLtGetStatusName(status), " (", cublasLtGetStatusString(status),
                                  ") at ", file, ":", line),
                   int(status));
}

/// After a launch: a bad configuration shows up here; a fault inside the kernel shows up at the
/// next synchronising call, which is checked too.
inline void check_launch(const char* kernel, const char* file, int line) {
  const cudaError_t status = cudaGetLastError();
  if (status == cudaSuccess) return;
  throw cuda_error(detail::concat("launch of ", kernel, " failed: ", cudaGetErrorName(status), " (",
                                  cudaGetErrorString(status), ") at ", file, ":", line),
                   int(status));
}

}  // namespace cuda_impl
}  // namespace moet

#define MOET_CUDA_CHECK(call) ::moet::cuda_impl::check_cuda((call), #call, __FILE__, __LINE__)
#define MOET_CUBLAS_CHECK(call) ::moet::cuda_impl::check_cublas((call), #call, __FILE__, __LINE__)
#define MOET_CUDA_CHECK_LAUNCH(kernel) ::moet::cuda_impl::check_launch(kernel, __FILE__, __LINE__)
