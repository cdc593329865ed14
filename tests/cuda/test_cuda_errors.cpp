// Error paths of the CUDA backend that can be exercised with or without a GPU: a failing CUDA or
// cuBLASLt call throws moet::cuda_error naming the call and the status; a context on a machine
// without a usable device (or on a device that does not exist) refuses by name. Runs everywhere.
#include <catch2/catch.hpp>

#include <cstdlib>

#include <moet/cuda/layers.hpp>

using namespace moet;

TEST_CASE("a failed CUDA call names the call, the status and its description") {
  try {
    MOET_CUDA_CHECK(cudaErrorMemoryAllocation);
    FAIL("no exception");
  } catch (const cuda_error& e) {
    const std::string what = e.what();
    CHECK_THAT(what, Catch::Contains("cudaErrorMemoryAllocation failed: cudaErrorMemoryAllocation (out of memory)"));
    CHECK_THAT(what, Catch::Contains("test_cuda_errors.cpp"));
    CHECK(e.status() == int(cudaErrorMemoryAllocation));
  }
  CHECK_NOTHROW(MOET_CUDA_CHECK(cudaSuccess));
}

TEST_CASE("a failed cuBLASLt call names the call and the status") {
  CHECK_THROWS_AS(MOET_CUBLAS_CHECK(CUBLAS_STATUS_NOT_SUPPORTED), cuda_error);
  CHECK_THROWS_WITH(MOET_CUBLAS_CHECK(CUBLAS_STATUS_NOT_SUPPORTED), Catch::Contains("failed: CUBLAS_STATUS_NOT_SUPPORTED"));
  CHECK_THROWS_AS(MOET_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE), moet::error);  // catchable as any moet error
}

TEST_CASE("a context refuses a missing device by name") {
  if (const auto reason = cuda_unavailable_reason()) {
    WARN("no CUDA device here (" << *reason << "): checking the no-device path");
    CHECK_THROWS_AS(CudaContext(), cuda_error);
    CHECK_THROWS_WITH(CudaContext(), Catch::Contains("cudaGetDeviceCount"));
  } else {
    CHECK_THROWS_WITH(CudaContext(1000), Catch::Contains("device 1000 requested"));
  }
  CHECK_THROWS_AS(CudaContext(-1), cuda_error);
}

TEST_CASE("an allocation that cannot be served names cudaMallocAsync") {
  CHECK_THROWS_AS(DeviceBuffer(std::size_t(1) << 52, nullptr), cuda_error);
  CHECK_THROWS_WITH(DeviceBuffer(std::size_t(1) << 52, nullptr), Catch::Contains("cudaMallocAsync"));
}

TEST_CASE("host conversions round to nearest even") {
  CHECK(cuda_impl::to_double(cuda_impl::from_double<bf16>(1.0 + 1.0 / 256)) == 1.0);            // tie: to even
  CHECK(cuda_impl::to_double(cuda_impl::from_double<bf16>(1.0 + 3.0 / 256)) == 1.0 + 4.0 / 256);  // tie: to even
  CHECK(cuda_impl::to_double(cuda_impl::from_double<fp16>(1.0 + 1.0 / 4096)) == 1.0);
  CHECK(cuda_impl::to_double(cuda_impl::from_double<float>(0.1)) == double(0.1f));
}

TEST_CASE("MOET_CUDA_ATTENTION picks a context's first attention kernel, and a wrong value is refused by name") {
  const char* before = std::getenv("MOET_CUDA_ATTENTION");
  const std::string saved = before ? before : "";
  ::unsetenv("MOET_CUDA_ATTENTION");
  CHECK(moet::attention_kernel_from_environment() == moet::AttentionKernel::automatic);
  ::setenv("MOET_CUDA_ATTENTION", "materialized", 1);
  CHECK(moet::attention_kernel_from_environment() == moet::AttentionKernel::materialized);
  ::setenv("MOET_CUDA_ATTENTION", "flash", 1);
  CHECK(moet::attention_kernel_from_environment() == moet::AttentionKernel::flash);
  ::setenv("MOET_CUDA_ATTENTION", "Flash2", 1);
  CHECK_THROWS_WITH(moet::attention_kernel_from_environment(),
                    Catch::Contains("MOET_CUDA_ATTENTION is \"Flash2\"") && Catch::Contains("automatic, materialized or flash"));
  if (before) ::setenv("MOET_CUDA_ATTENTION", saved.c_str(), 1);
  else ::unsetenv("MOET_CUDA_ATTENTION");
}
