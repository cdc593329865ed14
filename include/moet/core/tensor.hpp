// Tensor vocabulary. moet has one layout: row-major, tokens as rows. A batch of T tokens of
// width d is a (T, d) matrix; parameters are stored the way they are multiplied (x W with W of
// shape (d_in, d_out)). Inputs are taken as `In<T>`, a const reference that accepts any
// row-major matrix, block or map with unit inner stride without copying.
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace moet {

using Index = Eigen::Index;

template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A row vector, e.g. a bias of shape (1, d_out).
template <class T>
using RowVector = Eigen::Matrix<T, 1, Eigen::Dynamic, Eigen::RowMajor>;

/// An allocator whose blocks start on a 64-byte boundary (a cache line, an AVX-512 vector).
/// Eigen's vectorised loops over a view peel a number of leading elements that depends on the
/// address, and so sum in a different order at a different alignment: storage that only malloc
/// aligns (16 bytes) makes results depend on the heap's layout, i.e. differ from run to run.
template <class T>
struct CacheAlignedAllocator {
  using value_type = T;
  static constexpr std::align_val_t alignment{64};
  CacheAlignedAllocator() = default;
  template <class U>
  constexpr CacheAlignedAllocator(const CacheAlignedAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), alignment)); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, alignment); }
  template <class U>
  bool operator==(const CacheAlignedAllocator<U>&) const noexcept { return true; }
};

/// Heap storage that views (`MatrixView`) point into: 64-byte aligned, so bit-reproducible.
template <class T>
using AlignedVector = std::vector<T, CacheAlignedAllocator<T>>;

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
