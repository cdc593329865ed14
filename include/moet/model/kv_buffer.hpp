// A decoding cache's keys or values of one layer, written once over a backend's ops: (capacity,
// width) storage of which the first `rows` are used. Appending copies only the new rows; the
// storage doubles when full, so a sequence of n tokens copies O(n) rows in all.
#pragma once

#include <algorithm>
#include <utility>

#include "../core/error.hpp"
#include "../core/tensor.hpp"

namespace moet::model_impl {

template <class Ops>
class KvBuffer {
  using Tensor = typename Ops::Tensor;
  using View = typename Ops::View;

 public:
  explicit KvBuffer(Index width = 0, Index capacity = 0) : data_(Ops::zeros(capacity, width)), width_(width) {}

  Index rows() const { return rows_; }
  Index width() const { return width_; }
  /// The storage (to see whether an append moved it).
  const auto* data() const { return data_.data(); }
  Index capacity() const { return Ops::shape(data_).first; }

  void append(View r) {
    const auto [n, w] = Ops::shape(r);
    detail::expect_cols("KvBuffer", "new rows", n, w, width_, "tokens x width");
    if (rows_ + n > capacity()) {
      Tensor grown = Ops::zeros(std::max<Index>({Index(16), 2 * capacity(), rows_ + n}), width_);
      Ops::copy_rows(grown, 0, view());
      data_ = std::move(grown);
    }
    Ops::copy_rows(data_, rows_, r);
    rows_ += n;
  }
  View view() const { return Ops::rows(data_, 0, rows_); }
  /// Forgets the rows past `rows` (a failed decode call rewinds to where it started).
  void truncate(Index rows) { rows_ = std::clamp<Index>(rows, 0, rows_); }

 private:
  Tensor data_;
  Index width_ = 0;
  Index rows_ = 0;
};

}  // namespace moet::model_impl
