// Device memory and the device tensor vocabulary. The layout is the library's one layout,
// row-major with tokens as rows; a device matrix may have a leading dimension (row stride) `ld`
// larger than its column count, because fused layers hand out column blocks of wider buffers
// (the output y of a LoRA mixture is the first d_out columns of [y | U | logits]) instead of
// copying them. Every kernel and GEMM of the backend takes the stride.
//
// Memory is stream-ordered (cudaMallocAsync / cudaFreeAsync on the owning context's stream, from
// a pool that keeps freed memory): a training step allocates its contexts' buffers every time,
// and plain cudaMalloc / cudaFree would synchronise the device each time. It is ordinary device
// memory, never managed memory. A buffer must not outlive the stream it was allocated on.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "error.hpp"

namespace moet {

/// Storage types of the CUDA backend: float (fp32 throughout), bf16 and fp16 (fp32 accumulation).
using bf16 = __nv_bfloat16;
using fp16 = __half;

namespace cuda_impl {

template <class T>
inline constexpr bool is_storage_type = std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

template <class T>
cudaDataType_t data_type() {
  static_assert(is_storage_type<std::remove_const_t<T>>, "moet CUDA layers store float, moet::bf16 or moet::fp16");
  if constexpr (std::is_same_v<std::remove_const_t<T>, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<std::remove_const_t<T>, bf16>) return CUDA_R_16BF;
  else return CUDA_R_16F;
}

template <class T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, bf16>) return "bf16";
  else return "fp16";
}

/// Host-side conversions (round to nearest even), for uploads and downloads.
template <class T>
T from_double(double x) {
  if constexpr (std::is_same_v<T, float>) return float(x);
  else if constexpr (std::is_same_v<T, bf16>) return __double2bfloat16(x);
  else return __double2half(x);
}
/// A host value of type Host as T: float sources round once, straight from float (as the
/// device's conversions do); others through double.
template <class T, class Host>
T from_host(Host x) {
  if constexpr (std::is_same_v<Host, float> && std::is_same_v<T, bf16>) return __float2bfloat16_rn(x);
  else if constexpr (std::is_same_v<Host, float> && std::is_same_v<T, fp16>) return __float2half_rn(x);
  else return from_double<T>(double(x));
}
template <class T>
double to_double(T x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, bf16>) return double(__bfloat162float(x));
  else return double(__half2float(x));
}

}  // namespace cuda_impl

/// Raw device memory, owned. Movable, not copyable.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::size_t bytes, cudaStream_t stream) : bytes_(bytes), stream_(stream) {
    if (bytes_ > 0) MOET_CUDA_CHECK(cudaMallocAsync(&data_, bytes_, stream_));
  }
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)), stream_(other.stream_) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
      stream_ = other.stream_;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }

  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }
  cudaStream_t stream() const { return stream_; }

 private:
  void release() noexcept {
    if (data_) cudaFreeAsync(data_, stream_);  // a destructor does not throw; a failure here means the context died first
    data_ = nullptr;
  }
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
};

/// A non-owning view of a row-major device matrix: rows x cols, row stride ld >= cols.
template <class T>
struct DeviceView {
  T* data = nullptr;
  std::ptrdiff_t rows = 0, cols = 0, ld = 0;

  operator DeviceView<const T>() const { return {data, rows, cols, ld}; }
  /// Columns [first, first + count).
  DeviceView col_block(std::ptrdiff_t first, std::ptrdiff_t count) const { return {data + first, rows, count, ld}; }
  /// Rows [first, first + count).
  DeviceView row_block(std::ptrdiff_t first, std::ptrdiff_t count) const { return {data + first * ld, count, cols, ld}; }
};

/// An owning row-major device matrix of T (float, bf16, fp16), possibly wider than it looks
/// (ld >= cols).
template <class T>
class DeviceMatrix {
  static_assert(cuda_impl::is_storage_type<T> || std::is_same_v<T, int> || std::is_same_v<T, double> ||
                    std::is_same_v<T, unsigned char>,
                "DeviceMatrix holds float, bf16, fp16 (and int / double / flags for bookkeeping)");

 public:
  DeviceMatrix() = default;
  /// Uninitialised rows x cols (row stride ld, default cols), on `stream`.
  DeviceMatrix(std::ptrdiff_t rows, std::ptrdiff_t cols, cudaStream_t stream, std::ptrdiff_t ld = -1)
      : rows_(rows), cols_(cols), ld_(ld < 0 ? cols : ld), buffer_(std::size_t(rows * (ld < 0 ? cols : ld)) * sizeof(T), stream) {}

  static DeviceMatrix zeros(std::ptrdiff_t rows, std::ptrdiff_t cols, cudaStream_t stream, std::ptrdiff_t ld = -1) {
    DeviceMatrix m(rows, cols, stream, ld);
    m.set_zero();
    return m;
  }

  std::ptrdiff_t rows() const { return rows_; }
  std::ptrdiff_t cols() const { return cols_; }
  std::ptrdiff_t ld() const { return ld_; }
  std::ptrdiff_t size() const { return rows_ * cols_; }
  T* data() { return static_cast<T*>(buffer_.data()); }
  const T* data() const { return static_cast<const T*>(buffer_.data()); }
  cudaStream_t stream() const { return buffer_.stream(); }

  DeviceView<T> view() { return {data(), rows_, cols_, ld_}; }
  DeviceView<const T> view() const { return {data(), rows_, cols_, ld_}; }
  operator DeviceView<const T>() const { return view(); }

  /// Keeps the first `cols` columns in view (the row stride stays): hands out a column block of
  /// a wider buffer without copying it.
  DeviceMatrix&& keep_cols(std::ptrdiff_t cols) && {
    cols_ = cols < cols_ ? cols : cols_;
    return std::move(*this);
  }

  void set_zero() {
    if (rows_ * ld_ > 0) MOET_CUDA_CHECK(cudaMemsetAsync(data(), 0, std::size_t(rows_ * ld_) * sizeof(T), stream()));
  }

 private:
  std::ptrdiff_t rows_ = 0, cols_ = 0, ld_ = 0;
  DeviceBuffer buffer_;
};

namespace cuda_impl {

/// How often the host has waited for a stream (every download, upload and synchronize() of moet):
/// the tests hold a training step to one wait, the read of its numbers.
inline std::atomic<long>& host_waits() {
  static std::atomic<long> count{0};
  return count;
}
/// Waits for `stream`, counted in host_waits().
inline void wait_for(cudaStream_t stream) {
  host_waits().fetch_add(1, std::memory_order_relaxed);
  MOET_CUDA_CHECK(cudaStreamSynchronize(stream));
}

/// Copies a host row-major (rows, cols) matrix of any arithmetic type into `dst` (same shape),
/// converting to T on the host. Synchronous with respect to the host.
template <class T, class Host>
void upload(DeviceView<T> dst, const Host* host, std::ptrdiff_t host_ld, cudaStream_t stream) {
  const std::ptrdiff_t rows = dst.rows, cols = dst.cols;
  if (rows * cols == 0) return;
  // Converted on the host's threads (a checkpoint's tensors are large), into storage that is
  // written once and not zeroed first.
  const std::unique_ptr<T[]> staged(new T[std::size_t(rows * cols)]);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (rows * cols > (std::ptrdiff_t(1) << 18))
#endif
  for (std::ptrdiff_t r = 0; r < rows; ++r)
    for (std::ptrdiff_t c = 0; c < cols; ++c) staged[std::size_t(r * cols + c)] = from_host<T>(host[r * host_ld + c]);
  MOET_CUDA_CHECK(cudaMemcpy2DAsync(dst.data, std::size_t(dst.ld) * sizeof(T), staged.get(), std::size_t(cols) * sizeof(T),
                                    std::size_t(cols) * sizeof(T), std::size_t(rows), cudaMemcpyHostToDevice, stream));
  wait_for(stream);
}

/// The matrix as doubles, packed row-major (rows * cols). Synchronises the stream.
template <class T>
std::vector<double> download(DeviceView<const T> src, cudaStream_t stream) {
  std::vector<T> staged(std::size_t(src.rows * src.cols));
  if (!staged.empty())
    MOET_CUDA_CHECK(cudaMemcpy2DAsync(staged.data(), std::size_t(src.cols) * sizeof(T), src.data, std::size_t(src.ld) * sizeof(T),
                                      std::size_t(src.cols) * sizeof(T), std::size_t(src.rows), cudaMemcpyDeviceToHost, stream));
  wait_for(stream);
  std::vector<double> out(staged.size());
  for (std::size_t i = 0; i < staged.size(); ++i) {
    if constexpr (std::is_same_v<T, int> || std::is_same_v<T, double> || std::is_same_v<T, unsigned char>) out[i] = double(staged[i]);
    else out[i] = to_double(staged[i]);
  }
  return out;
}

/// A host vector on the device as a (size, 1) matrix, copied on `stream` without waiting for it
/// (a pageable host source is staged before the call returns, so `host` may go at once).
template <class X>
DeviceMatrix<X> to_device(const std::vector<X>& host, cudaStream_t stream) {
  DeviceMatrix<X> d(std::ptrdiff_t(host.size()), 1, stream);
  if (!host.empty())
    MOET_CUDA_CHECK(cudaMemcpyAsync(d.data(), host.data(), host.size() * sizeof(X), cudaMemcpyHostToDevice, stream));
  return d;
}

}  // namespace cuda_impl
}  // namespace moet
