// Tensor vocabulary. moet has one layout: row-major, tokens as rows. A batch of T tokens of
// width d is a (T, d) matrix; parameters are stored the way they are multiplied (x W with W of
// shape (d_in, d_out)). Inputs are taken as `In<T>`, a const reference that accepts any
// row-major matrix, block or map with unit inner stride without copying.
#pragma once

#include <Eigen/Core>

#include <cstdint>

namespace moet {

using Index = Eigen::Index;

template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A row vector, e.g. a bias of shape (1, d_out).
template <class T>
using RowVector = Eigen::Matrix<T, 1, Eigen::Dynamic, Eigen::RowMajor>;

/// A mutable view of row-major storage owned elsewhere (parameters in fused buffers, outputs).
template <class T>
using MatrixView = Eigen::Map<Matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

template <class T>
using ConstMatrixView = Eigen::Map<const Matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// How layers take inputs.
template <class T>
using In = Eigen::Ref<const Matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// How layers take outputs they write into.
template <class T>
using Out = Eigen::Ref<Matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// A view of `cols` columns starting at `first_col` of a row-major buffer with `stride` columns.
template <class T>
MatrixView<T> column_block(T* data, Index rows, Index stride, Index first_col, Index cols) {
  return MatrixView<T>(data + first_col, rows, cols, Eigen::OuterStride<>(stride));
}

template <class T>
ConstMatrixView<T> column_block(const T* data, Index rows, Index stride, Index first_col, Index cols) {
  return ConstMatrixView<T>(data + first_col, rows, cols, Eigen::OuterStride<>(stride));
}

}  // namespace moet
