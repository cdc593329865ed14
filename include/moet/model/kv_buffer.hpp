// A decoding cache's keys or values of one layer, written once over a backend's ops, for `batch`
// sequences decoded in lockstep (the same number of new positions each per call; padding is
// flagged by the cache, not here). Sequence b's rows are [b capacity, b capacity + rows) of one
// (batch * capacity, width) storage. Appending copies only the new rows; the storage doubles when
// full, so n positions copy O(n) rows in all. One sequence is read in place (view()); several are
// gathered into one (batch * rows, width) tensor for the attention (gather()).
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
    if (rows_ + n > capacity_) {
      const Index grown_capacity = std::max<Index>({Index(16), 2 * capacity_, rows_ + n});
      Tensor grown = Ops::zeros(batch_ * grown_capacity, width_);
      for (Index b = 0; b < batch_; ++b) Ops::copy_rows(grown, b * grown_capacity, Ops::rows(data_, b * capacity_, rows_));
      data_ = std::move(grown);
      capacity_ = grown_capacity;
    }
    for (Index b = 0; b < batch_; ++b) Ops::copy_rows(data_, b * capacity_ + rows_, Ops::rows(r, b * n, n));
    rows_ += n;
  }

  /// The cached rows of one sequence (batch 1), in place.
  View view() const {
    if (batch_ != 1) throw value_error("KvBuffer: view() reads one sequence; a cache of several is read with gather()");
    return Ops::rows(data_, 0, rows_);
  }
  /// Every sequence's cached rows, sequence after sequence: (batch * rows, width).
  Tensor gather() const {
    Tensor out = Ops::zeros(batch_ * rows_, width_);
    for (Index b = 0; b < batch_; ++b) Ops::copy_rows(out, b * rows_, Ops::rows(data_, b * capacity_, rows_));
    return out;
  }
  /// Forgets the rows past `rows` (a failed decode call rewinds to where it started).
  void truncate(Index rows) { rows_ = std::clamp<Index>(rows, 0, rows_); }

 private:
  Tensor data_;
  Index width_ = 0, capacity_ = 0, batch_ = 1;
  Index rows_ = 0;
};

}  // namespace moet::model_impl
