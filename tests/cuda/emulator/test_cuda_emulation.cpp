// The host emulation of the CUDA device checks what it promises (emulation.cuh, runtime.cpp):
// block barriers and warp shuffles behave as on a device, threads run in an order that exposes
// a missing barrier, impossible launches and barriers that
// can never complete are reported, fresh device memory reads as NaN, writes past an
// allocation's end are caught, the warp matrix functions (wmma) multiply as documented and
// refuse misaligned operands, and the emulated cublasLtMatmul follows cuBLASLt's column-major
// contract (op(A) from A's own layout, beta C, the bias epilogue, strided batches, the alignments an
// algorithm was chosen for). An access far outside an
// allocation ends the program with SIGSEGV and a message naming the kernel. If the emulation were wrong
// here, test_cuda_layers_emulated could pass for the wrong reasons.
#include <cublasLt.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <moet/cuda/kernels/emulation.cuh>
#include <vector>

namespace {

using namespace moet::cuda_emulation;

// --- kernels ----------------------------------------------------------------------------------
/// out[block] = sum of in over the block's threads: shared memory, barriers, warp shuffles.
__global__ void block_sum(const float* in, float* out) {
  __shared__ float partial[32];
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < int(blockDim.x + 31) / 32; ++w) total += partial[w];
    out[blockIdx.x] = total;
  }
}

/// Half the warp waits at a block barrier, the other half at a warp barrier: on a device this
/// hangs (or is undefined); the emulation must say so instead of finishing.
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16)
    __syncthreads();
  else
    __syncwarp();
  out[threadIdx.x] = 1;
}

/// Lane 5 leaves before the warp's shuffle: undefined on a device with the full mask.
__global__ void shuffle_after_exit(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

__global__ void write_one_past(float* p, int n) {
  if (threadIdx.x == 0) p[n] = 1.f;
}

__global__ void read_at(const float* p, std::int64_t i, float* out) {
  if (threadIdx.x == 0) out[0] = p[i];
}

__global__ void copy_dynamic_shared(float* out) {
  MOET_DYNAMIC_SHARED(float, smem);
  out[threadIdx.x] = smem[threadIdx.x];
}

/// Each thread reads its neighbour's shared value, with or without the barrier that makes it safe.
__global__ void read_neighbour(float* out, bool barrier) {
  MOET_DYNAMIC_SHARED(float, smem);
  const int t = int(threadIdx.x), n = int(blockDim.x);
  smem[t] = float(t);
  if (barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = smem[(t + 1) % n];
}

/// c (16 x 16, row-major) = a b with a row-major at a + offset and b column-major, both rows ldm
/// apart. check_lane: each thread then reads element threadIdx.x * 8 of c (another lane's share
/// of the store), with or without the __syncwarp that makes it safe, into seen.
__global__ void wmma_product(const __half* a, const __half* b, float* c, int offset, int ldm, int sync, float* seen) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 1.f);
  wmma::load_matrix_sync(fa, a + offset, unsigned(ldm));
  wmma::load_matrix_sync(fb, b + offset, unsigned(ldm));
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16u, wmma::mem_row_major);
  if (sync) __syncwarp();
  seen[threadIdx.x] = c[threadIdx.x * 8 + 1];
}

template <class T>
T* device_array(std::size_t n) {
  void* p = nullptr;
  REQUIRE(cudaMalloc(&p, n * sizeof(T)) == cudaSuccess);
  return static_cast<T*>(p);
}

}  // namespace

TEST_CASE("emulated blocks: shared memory, barriers and warp shuffles give a device's results", "[emulation]") {
  const int blocks = 3, threads = 96;  // three warps per block
  std::vector<float> in(blocks * threads);
  for (std::size_t i = 0; i < in.size(); ++i) in[i] = float(i % 7) - 2.f;
  float* d_in = device_array<float>(in.size());
  float* d_out = device_array<float>(blocks);
  REQUIRE(cudaMemcpy(d_in, in.data(), in.size() * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
  MOET_LAUNCH(blocks, threads, 0, nullptr, block_sum)(d_in, d_out);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  std::vector<float> out(blocks);
  REQUIRE(cudaMemcpy(out.data(), d_out, blocks * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  for (int b = 0; b < blocks; ++b) {
    float expected = 0.f;
    for (int t = 0; t < threads; ++t) expected += in[std::size_t(b * threads + t)];
    CHECK(out[std::size_t(b)] == expected);
  }
  CHECK(cudaFree(d_in) == cudaSuccess);
  CHECK(cudaFree(d_out) == cudaSuccess);
}

TEST_CASE("emulated blocks run their threads in shuffled order, so a missing barrier shows", "[emulation]") {
  const int blocks = 4, threads = 256;
  float* d = device_array<float>(blocks * threads);
  std::vector<float> out(blocks * threads);
  auto wrong_reads = [&](bool barrier) {
    MOET_LAUNCH(blocks, threads, threads * sizeof(float), nullptr, read_neighbour)(d, barrier);
    REQUIRE(cudaGetLastError() == cudaSuccess);
    REQUIRE(cudaMemcpy(out.data(), d, out.size() * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
    int wrong = 0;
    for (int i = 0; i < blocks * threads; ++i) wrong += out[std::size_t(i)] != float((i % threads + 1) % threads);
    return wrong;
  };
  CHECK(wrong_reads(true) == 0);
  CHECK(wrong_reads(false) > 0);
  CHECK(cudaFree(d) == cudaSuccess);
}

TEST_CASE("emulated launches: impossible configurations fail as on a device", "[emulation]") {
  float* d = device_array<float>(1024);
  MOET_LAUNCH(1, 2048, 0, nullptr, write_one_past)(d, 0);  // more than 1024 threads per block
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
  MOET_LAUNCH(dim3(1, 70000), 32, 0, nullptr, write_one_past)(d, 0);  // grid.y > 65535
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
  MOET_LAUNCH(1, 32, 64 << 10, nullptr, copy_dynamic_shared)(d);  // 64 KiB of dynamic shared memory, no opt-in
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  CHECK(cudaGetLastError() == cudaSuccess);  // read and cleared
  CHECK(cudaFree(d) == cudaSuccess);
}

TEST_CASE("emulated barriers that can never complete are reported", "[emulation]") {
  int* d = device_array<int>(32);
  MOET_LAUNCH(1, 32, 0, nullptr, divergent_barrier)(d);
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  CHECK(cudaStreamSynchronize(nullptr) == cudaErrorLaunchFailure);  // sticky, as a device fault is
  clear_faults();
  CHECK(cudaFree(d) == cudaSuccess);
}

TEST_CASE("emulated warp operations need every lane; kernels need device pointers", "[emulation]") {
  float* d = device_array<float>(32);
  MOET_LAUNCH(1, 32, 0, nullptr, shuffle_after_exit)(d);
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  clear_faults();
  std::vector<float> host(32);
  MOET_LAUNCH(1, 32, 0, nullptr, write_one_past)(host.data(), 0);  // a host pointer as a kernel argument
  CHECK(cudaGetLastError() == cudaErrorIllegalAddress);
  CHECK(host[0] == 0.f);  // and the kernel did not run
  clear_faults();
  CHECK(cudaFree(d) == cudaSuccess);
}

TEST_CASE("emulated memory: fresh memory reads as NaN, writes past the end are caught", "[emulation]") {
  float* d = device_array<float>(8);
  std::vector<float> host(8, 0.f);
  REQUIRE(cudaMemcpy(host.data(), d, 8 * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  for (float v : host) CHECK(std::isnan(v));
  MOET_LAUNCH(1, 32, 256, nullptr, copy_dynamic_shared)(d);  // dynamic shared memory starts as NaN too
  REQUIRE(cudaGetLastError() == cudaSuccess);
  REQUIRE(cudaMemcpy(host.data(), d, 8 * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(std::isnan(host[3]));

  MOET_LAUNCH(1, 32, 0, nullptr, write_one_past)(d, 8);
  CHECK(cudaGetLastError() == cudaSuccess);                          // the launch itself is fine
  CHECK(cudaStreamSynchronize(nullptr) == cudaErrorIllegalAddress);  // the next synchronisation reports it
  clear_faults();
  CHECK(cudaFree(d) == cudaSuccess);
  int not_device = 0;
  CHECK(cudaFree(&not_device) == cudaErrorInvalidValue);
}

TEST_CASE("emulated memory: an access well outside an allocation ends the program, naming the kernel", "[emulation]") {
  // As compute-sanitizer would: a read 4 KiB past the end, or before the start, faults.
  for (const std::int64_t index : {std::int64_t(8 + 1024), std::int64_t(-1024)}) {
    const pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      std::signal(SIGSEGV, SIG_DFL);  // not the test framework's handler: the child just dies
      float* d = device_array<float>(8);
      float* out = device_array<float>(1);
      MOET_LAUNCH(1, 32, 0, nullptr, read_at)(d, index, out);
      std::_Exit(0);  // not reached when the read faults
    }
    int status = 0;
    REQUIRE(waitpid(child, &status, 0) == child);
    CHECK(WIFSIGNALED(status));
    CHECK((WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV));
  }
}

TEST_CASE("emulated cublasLtMatmul follows cuBLASLt's column-major contract", "[emulation]") {
  // D (2 x 3) = 2 * A^T B + 1 * C + bias, A stored as its (4 x 2) transpose, B (4 x 3), all
  // column-major with leading dimensions larger than the rows.
  const int m = 2, n = 3, k = 4, lda = 5, ldb = 6, ldc = 3;
  std::vector<float> a(std::size_t(lda * m), 99.f), b(std::size_t(ldb * n), 99.f), c(std::size_t(ldc * n), 99.f);
  auto A = [&](int kk, int i) -> float& { return a[std::size_t(kk + i * lda)]; };  // A^T(i, kk) = A(kk, i)
  auto B = [&](int kk, int j) -> float& { return b[std::size_t(kk + j * ldb)]; };
  auto C = [&](int i, int j) -> float& { return c[std::size_t(i + j * ldc)]; };
  for (int i = 0; i < m; ++i)
    for (int kk = 0; kk < k; ++kk) A(kk, i) = float(i + 2 * kk - 3);
  for (int kk = 0; kk < k; ++kk)
    for (int j = 0; j < n; ++j) B(kk, j) = float(kk - j);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) C(i, j) = float(10 * i + j);
  const float bias[2] = {0.5f, -0.25f};

  float* d_a = device_array<float>(a.size());
  float* d_b = device_array<float>(b.size());
  float* d_c = device_array<float>(c.size());
  float* d_bias = device_array<float>(2);
  REQUIRE(cudaMemcpy(d_a, a.data(), a.size() * 4, cudaMemcpyHostToDevice) == cudaSuccess);
  REQUIRE(cudaMemcpy(d_b, b.data(), b.size() * 4, cudaMemcpyHostToDevice) == cudaSuccess);
  REQUIRE(cudaMemcpy(d_c, c.data(), c.size() * 4, cudaMemcpyHostToDevice) == cudaSuccess);
  REQUIRE(cudaMemcpy(d_bias, bias, sizeof bias, cudaMemcpyHostToDevice) == cudaSuccess);

  cublasLtHandle_t lt = nullptr;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  REQUIRE(cublasLtCreate(&lt) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
  const cublasOperation_t t = CUBLAS_OP_T;
  const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
  REQUIRE(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue) ==
          CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &d_bias, sizeof d_bias) ==
          CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, k, m, lda) == CUBLAS_STATUS_SUCCESS);  // A as stored
  REQUIRE(cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, k, n, ldb) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, m, n, ldc) == CUBLAS_STATUS_SUCCESS);
  const float alpha = 2.f, beta = 1.f;
  REQUIRE(cublasLtMatmul(lt, desc, &alpha, d_a, la, d_b, lb, &beta, d_c, lc, d_c, lc, nullptr, nullptr, 0, nullptr) ==
          CUBLAS_STATUS_SUCCESS);
  std::vector<float> d(c.size());
  REQUIRE(cudaMemcpy(d.data(), d_c, d.size() * 4, cudaMemcpyDeviceToHost) == cudaSuccess);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float expected = C(i, j) + bias[i];
      for (int kk = 0; kk < k; ++kk) expected += 2.f * A(kk, i) * B(kk, j);
      CHECK(d[std::size_t(i + j * ldc)] == expected);
    }

  // A layout whose leading dimension is below its rows is refused, as cuBLASLt refuses it.
  cublasLtMatrixLayout_t bad = nullptr;
  REQUIRE(cublasLtMatrixLayoutCreate(&bad, CUDA_R_32F, k, m, k - 1) == CUBLAS_STATUS_SUCCESS);
  CHECK(cublasLtMatmul(lt, desc, &alpha, d_a, bad, d_b, lb, &beta, d_c, lc, d_c, lc, nullptr, nullptr, 0, nullptr) ==
        CUBLAS_STATUS_INVALID_VALUE);
  for (auto layout : {la, lb, lc, bad}) cublasLtMatrixLayoutDestroy(layout);
  cublasLtMatmulDescDestroy(desc);
  cublasLtDestroy(lt);
  for (void* p :
       {static_cast<void*>(d_a), static_cast<void*>(d_b), static_cast<void*>(d_c), static_cast<void*>(d_bias)})
    CHECK(cudaFree(p) == cudaSuccess);
}

TEST_CASE("emulated cublasLtMatmul runs strided batches and refuses inconsistent ones", "[emulation]") {
  // Two products D_i (2 x 2) = A_i (2 x 3) B_i (3 x 2), column-major, operands `stride` apart.
  const int m = 2, n = 2, k = 3, count = 2;
  const std::int64_t sa = 8, sb = 7, sd = 5;
  std::vector<float> a(std::size_t(sa * count)), b(std::size_t(sb * count));
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = float(i % 5) - 2.f;
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = float(i % 3) + 0.5f;
  float* d_a = device_array<float>(a.size());
  float* d_b = device_array<float>(b.size());
  float* d_d = device_array<float>(std::size_t(sd * count));
  REQUIRE(cudaMemcpy(d_a, a.data(), a.size() * 4, cudaMemcpyHostToDevice) == cudaSuccess);
  REQUIRE(cudaMemcpy(d_b, b.data(), b.size() * 4, cudaMemcpyHostToDevice) == cudaSuccess);
  REQUIRE(cudaMemset(d_d, 0, std::size_t(sd * count) * 4) == cudaSuccess);

  cublasLtHandle_t lt = nullptr;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
  REQUIRE(cublasLtCreate(&lt) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, m, k, m) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, k, n, k) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatrixLayoutCreate(&ld, CUDA_R_32F, m, n, m) == CUBLAS_STATUS_SUCCESS);
  auto batch = [&](cublasLtMatrixLayout_t l, std::int32_t c, std::int64_t stride) {
    REQUIRE(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &c, sizeof c) == CUBLAS_STATUS_SUCCESS);
    REQUIRE(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride) ==
            CUBLAS_STATUS_SUCCESS);
  };
  batch(la, count, sa);
  batch(lb, count, sb);
  batch(ld, count, sd);
  const float alpha = 1.f, beta = 0.f;
  auto matmul = [&] {
    return cublasLtMatmul(lt, desc, &alpha, d_a, la, d_b, lb, &beta, d_d, ld, d_d, ld, nullptr, nullptr, 0, nullptr);
  };
  REQUIRE(matmul() == CUBLAS_STATUS_SUCCESS);
  std::vector<float> d(std::size_t(sd * count));
  REQUIRE(cudaMemcpy(d.data(), d_d, d.size() * 4, cudaMemcpyDeviceToHost) == cudaSuccess);
  for (int i = 0; i < count; ++i)
    for (int r = 0; r < m; ++r)
      for (int c = 0; c < n; ++c) {
        float expected = 0.f;
        for (int kk = 0; kk < k; ++kk) expected += a[std::size_t(i * sa + r + kk * m)] * b[std::size_t(i * sb + kk + c * k)];
        CHECK(d[std::size_t(i * sd + r + c * m)] == expected);
      }
  CHECK(d[4] == 0.f);  // the gap between D_0 and D_1 is not written

  batch(lb, 3, sb);  // batch counts that disagree
  CHECK(matmul() == CUBLAS_STATUS_INVALID_VALUE);
  batch(lb, count, sb * 2);  // B_1 would run past its allocation
  CHECK(matmul() == CUBLAS_STATUS_INVALID_VALUE);
  batch(lb, count, sb);
  batch(ld, count, 3);  // D_0 and D_1 would overlap
  CHECK(matmul() == CUBLAS_STATUS_INVALID_VALUE);
  for (auto layout : {la, lb, ld}) cublasLtMatrixLayoutDestroy(layout);
  cublasLtMatmulDescDestroy(desc);
  cublasLtDestroy(lt);
  for (void* p : {static_cast<void*>(d_a), static_cast<void*>(d_b), static_cast<void*>(d_d)}) CHECK(cudaFree(p) == cudaSuccess);
}

TEST_CASE("emulated cublasLtMatmul refuses operands less aligned than its algorithm was chosen for", "[emulation]") {
  // As on the device: an algorithm from the heuristic assumes the preference's MIN_ALIGNMENT_*
  // (256 bytes unless set) and the alignment of the bias pointer the descriptor held then.
  const int m = 4, n = 3, k = 2;
  float* d_a = device_array<float>(m * k + 1);
  float* d_b = device_array<float>(k * n + 1);
  float* d_d = device_array<float>(m * n);
  float* d_bias = device_array<float>(m + 1);
  REQUIRE(cudaMemset(d_a, 0, (m * k + 1) * 4) == cudaSuccess);
  REQUIRE(cudaMemset(d_b, 0, (k * n + 1) * 4) == cudaSuccess);
  REQUIRE(cudaMemset(d_bias, 0, (m + 1) * 4) == cudaSuccess);
  cublasLtHandle_t lt = nullptr;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
  cublasLtMatmulPreference_t preference = nullptr;
  REQUIRE(cublasLtCreate(&lt) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
  const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
  REQUIRE(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue) == CUBLAS_STATUS_SUCCESS);
  auto set_bias = [&](const float* p) {
    REQUIRE(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p, sizeof p) == CUBLAS_STATUS_SUCCESS);
  };
  REQUIRE(cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, m, k, m) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, k, n, k) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatrixLayoutCreate(&ld, CUDA_R_32F, m, n, m) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasLtMatmulPreferenceCreate(&preference) == CUBLAS_STATUS_SUCCESS);
  auto heuristic = [&] {
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    REQUIRE(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, ld, ld, preference, 1, &result, &found) == CUBLAS_STATUS_SUCCESS);
    REQUIRE(found == 1);
    REQUIRE(result.state == CUBLAS_STATUS_SUCCESS);
    return result.algo;
  };
  const float alpha = 1.f, beta = 0.f;
  auto matmul = [&](const float* a, const cublasLtMatmulAlgo_t* algo) {
    return cublasLtMatmul(lt, desc, &alpha, a, la, d_b, lb, &beta, d_d, ld, d_d, ld, algo, nullptr, 0, nullptr);
  };
  set_bias(nullptr);  // chosen with no bias pointer yet: it looks fully aligned
  const cublasLtMatmulAlgo_t aligned = heuristic();
  set_bias(d_bias);
  CHECK(matmul(d_a, &aligned) == CUBLAS_STATUS_SUCCESS);
  set_bias(d_bias + 1);  // 4-byte aligned
  CHECK(matmul(d_a, &aligned) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(matmul(d_a, nullptr) == CUBLAS_STATUS_SUCCESS);  // no algorithm: cuBLASLt chooses for these pointers
  const cublasLtMatmulAlgo_t for_bias = heuristic();     // chosen with the 4-byte aligned bias
  CHECK(matmul(d_a, &for_bias) == CUBLAS_STATUS_SUCCESS);
  CHECK(matmul(d_a + 1, &for_bias) == CUBLAS_STATUS_INVALID_VALUE);  // A at 4 bytes, the preference says 256
  const std::uint32_t four = 4;
  REQUIRE(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &four, sizeof four) ==
          CUBLAS_STATUS_SUCCESS);
  const cublasLtMatmulAlgo_t for_a = heuristic();
  CHECK(matmul(d_a + 1, &for_a) == CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulAlgo_t made_up{};
  CHECK(matmul(d_a, &made_up) == CUBLAS_STATUS_INVALID_VALUE);  // not from the heuristic
  CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &four, 8) ==
        CUBLAS_STATUS_INVALID_VALUE);  // uint32_t, as cublasLt.h says
  cublasLtMatmulPreferenceDestroy(preference);
  for (auto layout : {la, lb, ld}) cublasLtMatrixLayoutDestroy(layout);
  cublasLtMatmulDescDestroy(desc);
  cublasLtDestroy(lt);
  for (void* p : {static_cast<void*>(d_a), static_cast<void*>(d_b), static_cast<void*>(d_d), static_cast<void*>(d_bias)})
    CHECK(cudaFree(p) == cudaSuccess);
}

TEST_CASE("emulated wmma: 16 x 16 x 16 products as documented, misaligned operands refused", "[emulation]") {
  const int ldm = 24;  // 48 bytes: a multiple of 16 bytes, as wmma requires
  std::vector<__half> a(16 * ldm + 16), b(16 * ldm + 16);
  for (int i = 0; i < int(a.size()); ++i) {
    a[std::size_t(i)] = __float2half(float(i % 5) - 2.f);
    b[std::size_t(i)] = __float2half(float(i % 3) * 0.5f);
  }
  __half* d_a = device_array<__half>(a.size());
  __half* d_b = device_array<__half>(b.size());
  float* d_c = device_array<float>(256);
  float* d_seen = device_array<float>(32);
  REQUIRE(cudaMemcpy(d_a, a.data(), a.size() * sizeof(__half), cudaMemcpyHostToDevice) == cudaSuccess);
  REQUIRE(cudaMemcpy(d_b, b.data(), b.size() * sizeof(__half), cudaMemcpyHostToDevice) == cudaSuccess);
  std::vector<float> c(256), seen(32);
  MOET_LAUNCH(1, 32, 0, nullptr, wmma_product)(d_a, d_b, d_c, 16, ldm, 1, d_seen);  // 16 halves: 32 bytes in
  REQUIRE(cudaGetLastError() == cudaSuccess);
  REQUIRE(cudaMemcpy(c.data(), d_c, c.size() * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  REQUIRE(cudaMemcpy(seen.data(), d_seen, seen.size() * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float want = 1.f;  // the accumulator's fill
      for (int k = 0; k < 16; ++k)
        want += __half2float(a[std::size_t(16 + i * ldm + k)]) * __half2float(b[std::size_t(16 + j * ldm + k)]);
      CHECK(c[std::size_t(i * 16 + j)] == want);
    }
  for (int t = 0; t < 32; ++t) CHECK(seen[std::size_t(t)] == c[std::size_t(t * 8 + 1)]);

  // Without the __syncwarp, a lane reads elements other lanes have not stored yet.
  REQUIRE(cudaMemcpy(d_c, std::vector<float>(256, -1.f).data(), 256 * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
  MOET_LAUNCH(1, 32, 0, nullptr, wmma_product)(d_a, d_b, d_c, 16, ldm, 0, d_seen);
  REQUIRE(cudaMemcpy(seen.data(), d_seen, seen.size() * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  int stale = 0;
  for (int t = 0; t < 32; ++t) stale += seen[std::size_t(t)] == -1.f;
  CHECK(stale > 0);

  MOET_LAUNCH(1, 32, 0, nullptr, wmma_product)(d_a, d_b, d_c, 8, ldm, 1, d_seen);  // 16 bytes in: not 32-byte aligned
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  clear_faults();
  MOET_LAUNCH(1, 32, 0, nullptr, wmma_product)(d_a, d_b, d_c, 16, 20, 1, d_seen);  // ldm of 40 bytes
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  clear_faults();
  for (void* p : {static_cast<void*>(d_a), static_cast<void*>(d_b), static_cast<void*>(d_c), static_cast<void*>(d_seen)})
    CHECK(cudaFree(p) == cudaSuccess);
}
