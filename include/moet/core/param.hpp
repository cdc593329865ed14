// Parameters. A `Param<T>` is a trainable matrix with its gradient; a `Frozen<T>` is a
// pretrained matrix that gets no gradient (gradients flow through it, never into it). Both are
// views: they either own their storage or point into a layer's fused buffer (so that, for
// instance, the frozen W0, the router kernel and the LoRA "A" matrices can sit side by side in
// one (d_in, d_out + E + E*R) matrix read by a single GEMM). Layers are movable, not copyable:
// moving keeps heap buffers where they are, so the views stay valid.
//
// A model gathers the gradients of all its parameters into one contiguous buffer after it is
// built (core/arena.hpp): each Param's gradient view is moved there, and the storage it came
// from (the Param's own, or a layer's GradStorage) is released.
#pragma once

#include <new>
#include <string>
#include <utility>
#include <vector>

#include "error.hpp"
#include "tensor.hpp"

namespace moet {

/// Whether a backward pass adds into parameter gradients or replaces them. Always explicit.
enum class GradMode { accumulate, overwrite };
inline constexpr GradMode accumulate = GradMode::accumulate;
inline constexpr GradMode overwrite = GradMode::overwrite;

namespace detail {
/// dst = src or dst += src, by mode; written for Eigen expressions (products included).
template <class Dst, class Src>
void assign_grad(Dst&& dst, const Src& src, GradMode mode) {
  if (mode == GradMode::overwrite)
    dst.noalias() = src;
  else
    dst.noalias() += src;
}
}  // namespace detail

/// A layer's own gradient buffer that several Params view (a fused layer's trainable columns
/// share one, filled by one GEMM). A model's gradient arena takes the gradients over and
/// releases it.
template <class T>
class GradStorage {
 public:
  GradStorage() = default;
  explicit GradStorage(std::size_t size) : data_(size, T(0)) {}
  GradStorage(GradStorage&&) noexcept = default;
  T* data() { return data_.data(); }
  std::size_t size() const { return data_.size(); }
  void release() { AlignedVector<T>().swap(data_); }

 private:
  AlignedVector<T> data_;
};

template <class T>
class Param {
 public:
  using Scalar = T;

  /// Owns zero-initialised storage of shape (rows, cols).
  Param(std::string name, Index rows, Index cols)
      : name_(std::move(name)),
        storage_(static_cast<std::size_t>(rows * cols), T(0)),
        grad_storage_(static_cast<std::size_t>(rows * cols), T(0)),
        value_(storage_.data(), rows, cols, Eigen::OuterStride<>(cols)),
        grad_(grad_storage_.data(), rows, cols, Eigen::OuterStride<>(cols)) {}

  /// Views storage owned by a layer.
  Param(std::string name, MatrixView<T> value, MatrixView<T> grad)
      : name_(std::move(name)), value_(value), grad_(grad) {}

  Param(Param&&) noexcept = default;  // std::vector keeps its buffer: the views stay valid
  Param(const Param&) = delete;
  Param& operator=(const Param&) = delete;
  Param& operator=(Param&&) = delete;

  const std::string& name() const { return name_; }
  MatrixView<T>& value() { return value_; }
  const MatrixView<T>& value() const { return value_; }
  MatrixView<T>& grad() { return grad_; }
  const MatrixView<T>& grad() const { return grad_; }
  Index rows() const { return value_.rows(); }
  Index cols() const { return value_.cols(); }
  Index size() const { return value_.size(); }

  /// Points the gradient view at `data` (same shape and stride; the caller has copied the
  /// values there) and releases the gradient storage this Param owned, if any.
  void relocate_grad(T* data) {
    new (&grad_) MatrixView<T>(data, grad_.rows(), grad_.cols(), Eigen::OuterStride<>(grad_.outerStride()));
    AlignedVector<T>().swap(grad_storage_);
  }

 private:
  std::string name_;
  AlignedVector<T> storage_;       // empty for views
  AlignedVector<T> grad_storage_;  // empty for views and once the gradient lives in an arena
  MatrixView<T> value_;
  MatrixView<T> grad_;
};

template <class T>
class Frozen {
 public:
  using Scalar = T;

  Frozen(std::string name, Index rows, Index cols)
      : name_(std::move(name)),
        storage_(static_cast<std::size_t>(rows * cols), T(0)),
        value_(storage_.data(), rows, cols, Eigen::OuterStride<>(cols)) {}
  Frozen(std::string name, MatrixView<T> value) : name_(std::move(name)), value_(value) {}

  Frozen(Frozen&&) noexcept = default;
  Frozen(const Frozen&) = delete;
  Frozen& operator=(const Frozen&) = delete;
  Frozen& operator=(Frozen&&) = delete;

  const std::string& name() const { return name_; }
  const MatrixView<T>& value() const { return value_; }
  /// Writable for loading pretrained weights; training never writes here.
  MatrixView<T>& mutable_value() { return value_; }
  Index rows() const { return value_.rows(); }
  Index cols() const { return value_.cols(); }
  Index size() const { return value_.size(); }

 private:
  std::string name_;
  AlignedVector<T> storage_;
  MatrixView<T> value_;
};

/// A frozen copy of `value`, checked to be non-empty; `layer` and `what` name it in errors.
template <class T>
Frozen<T> make_frozen(const std::string& layer, const char* what, In<T> value) {
  if (value.rows() <= 0 || value.cols() <= 0)
    throw value_error(layer + ": " + what + " must be non-empty, got shape (" + std::to_string(value.rows()) + ", " +
                      std::to_string(value.cols()) + ")");
  Frozen<T> f(what, value.rows(), value.cols());
  f.mutable_value() = value;
  return f;
}

/// The context of a layer whose backward needs nothing but its inputs: the output alone.
template <class T>
struct OutputContext {
  Matrix<T> y;
  const Matrix<T>& output() const { return y; }
  double aux_loss() const { return 0.0; }
};

}  // namespace moet
