// The optimizer kernel: AdamW on one parameter, its float32 master copy, moments and gradient,
// elementwise (optim/adamw.hpp has the math; cuda/adamw.hpp the state).
#include "common.cuh"

namespace moet::cuda_impl {
namespace device {

template <class T>
__global__ void adamw_kernel(T* value, std::int64_t ld_value, const float* grad, std::int64_t ld_grad, float* master,
                             float* m, float* v, std::int64_t rows, std::int64_t cols, AdamWCoefficients k) {
  const std::int64_t n = rows * cols;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / cols, c = i % cols;
    const float g = grad[r * ld_grad + c];
    const float m1 = k.beta1 * m[i] + (1.f - k.beta1) * g;
    const float v1 = k.beta2 * v[i] + (1.f - k.beta2) * g * g;
    const float p = k.decay * master[i] - k.lr * (m1 / k.correction1) / (sqrtf(v1 / k.correction2) + k.eps);
    m[i] = m1;
    v[i] = v1;
    master[i] = p;
    value[r * ld_value + c] = from_f<T>(p);
  }
}

/// blockIdx.y picks the tensor; the update is adamw_kernel's.
template <class T>
__global__ void adamw_many_kernel(const AdamWTensor<T>* tensors, AdamWCoefficients k) {
  const AdamWTensor<T> t = tensors[blockIdx.y];
  const std::int64_t n = t.rows * t.cols;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / t.cols, c = i % t.cols;
    const float g = t.grad[r * t.ld_grad + c];
    const float m1 = k.beta1 * t.m[i] + (1.f - k.beta1) * g;
    const float v1 = k.beta2 * t.v[i] + (1.f - k.beta2) * g * g;
    const float p = k.decay * t.master[i] - k.lr * (m1 / k.correction1) / (sqrtf(v1 / k.correction2) + k.eps);
    t.m[i] = m1;
    t.v[i] = v1;
    t.master[i] = p;
    t.value[r * t.ld_value + c] = from_f<T>(p);
  }
}

}  // namespace device

template <class T>
void adamw_update_many(const AdamWTensor<T>* tensors, int count, const AdamWCoefficients& k, cudaStream_t stream) {
  if (count == 0) return;
  MOET_LAUNCH(dim3(64u, unsigned(count)), 256, 0, stream, device::adamw_many_kernel<T>)(tensors, k);
  MOET_CUDA_CHECK_LAUNCH("adamw_many_kernel");
}

template <class T>
void adamw_update(T* value, std::int64_t ld_value, const float* grad, std::int64_t ld_grad, float* master, float* m, float* v,
                  std::int64_t rows, std::int64_t cols, const AdamWCoefficients& k, cudaStream_t stream) {
  if (rows * cols == 0) return;
  MOET_LAUNCH(device::grid_for(rows * cols, 256, 4096u), 256, 0, stream, device::adamw_kernel<T>)
  (value, ld_value, grad, ld_grad, master, m, v, rows, cols, k);
  MOET_CUDA_CHECK_LAUNCH("adamw_kernel");
}

#define MOET_INSTANTIATE_ADAMW(T)                                                                                      \
  template void adamw_update<T>(T*, std::int64_t, const float*, std::int64_t, float*, float*, float*, std::int64_t, \
                                std::int64_t, const AdamWCoefficients&, cudaStream_t);                      \
  template void adamw_update_many<T>(const AdamWTensor<T>*, int, const AdamWCoefficients&, cudaStream_t);
MOET_INSTANTIATE_ADAMW(float)
MOET_INSTANTIATE_ADAMW(__nv_bfloat16)
MOET_INSTANTIATE_ADAMW(__half)
#undef MOET_INSTANTIATE_ADAMW

}  // namespace moet::cuda_impl
