// Parameters of the CUDA layers. A DeviceParam<T> is a trainable device matrix of the storage
// type T with a float32 gradient of the same shape (gradients are accumulated by cuBLASLt in
// float32 with beta = 1, whatever T is); a DeviceFrozen<T> is a pretrained device matrix. Both
// are views into a layer's fused buffers, named as on the CPU (router_kernel, lora_down, ...),
// and layers declare them with BOOST_HANA_DEFINE_STRUCT so that for_each_device_param walks any
// layer, in the CPU layer's order.
#pragma once

#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/param.hpp"
#include "../core/visit.hpp"
#include "buffer.hpp"

namespace moet {

namespace cuda_impl {
/// What a trainable and a frozen device tensor share: a name and a view of the values.
template <class T>
class NamedDeviceTensor {
 public:
  using Scalar = T;
  NamedDeviceTensor(std::string name, DeviceView<T> value) : name_(std::move(name)), value_(value) {}

  const std::string& name() const { return name_; }
  std::ptrdiff_t rows() const { return value_.rows; }
  std::ptrdiff_t cols() const { return value_.cols; }
  std::ptrdiff_t size() const { return value_.rows * value_.cols; }

 protected:
  std::string name_;
  DeviceView<T> value_;
};
}  // namespace cuda_impl

/// A trained device tensor: values of T, a float32 gradient of the same shape.
template <class T>
class DeviceParam : public cuda_impl::NamedDeviceTensor<T> {
 public:
  DeviceParam(std::string name, DeviceView<T> value, DeviceView<float> grad)
      : cuda_impl::NamedDeviceTensor<T>(std::move(name), value), grad_(grad) {}

  DeviceView<T> value() const { return this->value_; }
  DeviceView<float> grad() const { return grad_; }

 private:
  DeviceView<float> grad_;
};

namespace cuda_impl {
/// Whether a host matrix is the expression Matrix::Zero(rows, cols) (a Constant of 0): the frozen
/// weights' start when nothing is drawn (FrozenInit(0), FrozenInit::placeholder()), so that a
/// layer zeroes its device storage instead of converting and uploading a host matrix of zeros.
template <class Derived>
bool is_zero_expression(const Eigen::MatrixBase<Derived>& m) {
  if constexpr (std::is_same_v<Derived, typename Derived::ConstantReturnType>)
    return m.derived().functor()() == typename Derived::Scalar(0);
  else
    return false;
}

/// Writes a host matrix of dst's shape (any Eigen expression) into dst, converted to T: a zero
/// expression as a fill on the device, anything else converted from its own scalar type through
/// upload() (synchronous), as tensor_from_host reads a matrix.
template <class T, class Derived>
void upload(DeviceView<T> dst, const Eigen::MatrixBase<Derived>& host, cudaStream_t stream) {
  if (host.rows() != dst.rows || host.cols() != dst.cols)
    throw value_error(detail::concat("upload: a host matrix of shape ", detail::shape_string(host.rows(), host.cols()),
                                     " into a device matrix of shape ", detail::shape_string(dst.rows, dst.cols)));
  if (dst.rows * dst.cols == 0) return;
  if (is_zero_expression(host)) {
    MOET_CUDA_CHECK(cudaMemset2DAsync(dst.data, std::size_t(dst.ld) * sizeof(T), 0, std::size_t(dst.cols) * sizeof(T),
                                      std::size_t(dst.rows), stream));
  } else {  // a row-major matrix or column block is read in place, an expression evaluated once
    const Eigen::Ref<const Matrix<typename Derived::Scalar>, 0, Eigen::OuterStride<>> h(host);
    upload(dst, h.data(), h.outerStride(), stream);
  }
}

/// A new device matrix holding a host matrix (any Eigen expression), converted to T.
template <class T, class Derived>
DeviceMatrix<T> upload_matrix(const Eigen::MatrixBase<Derived>& host, cudaStream_t stream) {
  DeviceMatrix<T> d(host.rows(), host.cols(), stream);
  upload(d.view(), host, stream);
  return d;
}
}  // namespace cuda_impl

/// A frozen device tensor (pretrained weights).
template <class T>
class DeviceFrozen : public cuda_impl::NamedDeviceTensor<T> {
 public:
  using cuda_impl::NamedDeviceTensor<T>::NamedDeviceTensor;
  /// A frozen tensor that owns its storage (a model's embedding table, norm weights, LM head);
  /// the layers' frozen tensors are views into their fused buffers instead.
  DeviceFrozen(std::string name, DeviceMatrix<T>&& owned)
      : cuda_impl::NamedDeviceTensor<T>(std::move(name), owned.view()),
        storage_(std::make_shared<DeviceMatrix<T>>(std::move(owned))) {}

  DeviceView<const T> value() const { return this->value_; }
  /// Writable for loading pretrained weights; training never writes here.
  DeviceView<T> mutable_value() const { return this->value_; }

 private:
  std::shared_ptr<DeviceMatrix<T>> storage_;  // set when this tensor owns its values
};

// The generic walk (core/visit.hpp) reports device tensors as it reports host ones.
namespace detail {
template <class T>
struct is_param<DeviceParam<T>> : std::true_type {};
template <class T>
struct is_frozen<DeviceFrozen<T>> : std::true_type {};
}  // namespace detail

/// Calls f(DeviceParam&) for every trainable parameter of a CUDA layer, in declaration order
/// (the order of the CPU layer's for_each_param): for_each_param, named for the device.
template <class Layer, class F>
void for_each_device_param(Layer& layer, F&& f) {
  for_each_param(layer, f);
}

template <class Layer, class F>
void for_each_device_frozen(Layer& layer, F&& f) {
  for_each_frozen(layer, f);
}

/// Zeroes every parameter gradient of a CUDA layer (asynchronously, on `stream`).
template <class Layer>
void zero_device_grad(Layer& layer, cudaStream_t stream) {
  for_each_device_param(layer, [&](auto& p) {
    const DeviceView<float> g = p.grad();
    if (g.rows * g.cols > 0)
      MOET_CUDA_CHECK(cudaMemset2DAsync(g.data, std::size_t(g.ld) * sizeof(float), 0, std::size_t(g.cols) * sizeof(float),
                                        std::size_t(g.rows), stream));
  });
}

}  // namespace moet
