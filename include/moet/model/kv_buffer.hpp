// A decoding cache's keys or values of one layer, written once over a backend's ops, for `batch`
// sequences decoded in lockstep (the same number of new positions each per call; padding is
// flagged by the cache, not here). Sequence b's rows are [b capacity, b capacity + rows) of one
// (batch * capacity, width) storage. Appending copies only the new rows (one copy for every
// sequence: Ops::copy_blocks); the storage doubles when full, so n positions copy O(n) rows in all.
// The attention reads the storage in place (storage(), sequences capacity() rows apart); one
// sequence can also be read as a plain view().
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
  explicit KvBuffer(Index width = 0, Index capacity = 0, Index batch = 1)
      : data_(Ops::zeros(batch * capacity, width)), width_(width), capacity_(capacity), batch_(batch) {
    detail::expect_positive("KvBuffer", "batch", batch);
  }

  /// Positions cached per sequence.
  Index rows() const { return rows_; }
  Index width() const { return width_; }
  /// The storage (to see whether an append moved it).
  const auto* data() const { return data_.data(); }
  Index capacity() const { return capacity_; }
  Index batch() const { return batch_; }

  /// r: (batch * n, width), sequence b's n new rows at [b n, (b + 1) n).
  void append(View r) {
    const auto [total, w] = Ops::shape(r);
    detail::expect_cols("KvBuffer", "new rows", total, w, width_, "tokens x width");
    if (total % batch_)
      throw shape_error(detail::concat("KvBuffer: ", total, " new rows for ", batch_, " sequences (the same number each)"));
    const Index n = total / batch_;
    if (rows_ + n > capacity_) grow(std::max<Index>({Index(16), 2 * capacity_, rows_ + n}));
    Ops::copy_blocks(data_, rows_, capacity_, r, 0, n, batch_, n);
    rows_ += n;
  }

  /// Makes room for `rows` positions per sequence without moving again before then.
  void reserve(Index rows) {
    if (rows > capacity_) grow(std::max<Index>({Index(16), 2 * capacity_, rows}));
  }

  /// The whole storage, (batch * capacity, width): sequence b's cached rows start at row b capacity.
  View storage() const { return Ops::rows(data_, 0, batch_ * capacity_); }

  /// The cached rows of one sequence (batch 1), in place.
  View view() const {
    if (batch_ != 1) throw value_error("KvBuffer: view() reads one sequence; a cache of several is read through storage()");
    return Ops::rows(data_, 0, rows_);
  }
  /// Forgets the rows past `rows` (a failed decode call rewinds to where it started).
  void truncate(Index rows) { rows_ = std::clamp<Index>(rows, 0, rows_); }

 private:
  void grow(Index capacity) {
    Tensor grown = Ops::zeros(batch_ * capacity, width_);
    Ops::copy_blocks(grown, 0, capacity, data_, 0, capacity_, batch_, rows_);
    data_ = std::move(grown);
    capacity_ = capacity;
  }

  Tensor data_;
  Index width_ = 0, capacity_ = 0, batch_ = 1;
  Index rows_ = 0;
};

}  // namespace moet::model_impl
