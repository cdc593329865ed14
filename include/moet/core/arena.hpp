// A model's gradients in one contiguous buffer (tiny-cuda-nn keeps parameters, inference
// parameters and gradients in one arena each; moet does so for gradients and optimizer state).
//
// After a model is built, GradientArena walks it, copies every trainable tensor's gradient into
// one buffer and re-points the Params' gradient views there (several Params that view one
// layer-owned GradStorage, as the fused LoRA layer's router and "A" gradients do, move together
// and keep their layout); the storage they came from is released. Zero-grad and the squared norm
// for clipping are then one pass over the buffer, and AdamW keeps its moments in buffers of the
// same layout and updates them in one pass too.
//
// Values stay where the layers need them: a LoRA mixture's trainable "A" and router columns sit
// inside its fused [W0 | W_r | A] GEMM operand, which is what makes its forward one GEMM
// (docs/design.md). So values are reached through the Params' views, gradients through the arena.
#pragma once

#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#include "error.hpp"
#include "param.hpp"
#include "tensor.hpp"
#include "visit.hpp"

namespace moet {

template <class T>
class GradientArena {
 public:
  GradientArena() = default;

  /// Moves the gradients of every Param of `model` into one buffer (their values are kept).
  template <class Model>
  explicit GradientArena(Model& model) {
    struct Range {
      const T* begin;
      const T* end;
      Index offset = 0;
      std::size_t first_visit = 0;  // the visitor's index of the first Param inside
    };
    std::vector<Range> ranges;
    auto extent = [](const Param<T>& p, std::size_t visit) {
      const auto& g = p.grad();
      const T* begin = g.data();
      return Range{begin, begin + (g.rows() - 1) * g.outerStride() + g.cols(), 0, visit};
    };
    for_each_param(model, [&](Param<T>& p) {
      if (p.size() > 0) ranges.push_back(extent(p, ranges.size()));
    });
    // Views into one layer buffer overlap: merge them, so that buffer moves whole.
    std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
    std::vector<Range> merged;
    for (const Range& r : ranges) {
      if (!merged.empty() && r.begin < merged.back().end) {
        merged.back().end = std::max(merged.back().end, r.end);
        merged.back().first_visit = std::min(merged.back().first_visit, r.first_visit);
      } else {
        merged.push_back(r);
      }
    }
    // The arena follows the visitor's order, not the heap's: every instance of a model type lays
    // its gradients out alike, so the norm's sum (clipping) adds them in the same order.
    std::vector<Range*> layout;
    for (Range& r : merged) layout.push_back(&r);
    std::sort(layout.begin(), layout.end(), [](const Range* a, const Range* b) { return a->first_visit < b->first_visit; });
    Index size = 0;
    for (Range* r : layout) {
      r->offset = size;
      size += Index(r->end - r->begin);
    }
    data_.assign(static_cast<std::size_t>(size), T(0));
    for (const Range& r : merged) std::memcpy(data_.data() + r.offset, r.begin, std::size_t(r.end - r.begin) * sizeof(T));
    auto find = [&](const T* p) -> const Range& {
      auto it = std::upper_bound(merged.begin(), merged.end(), p, [](const T* q, const Range& r) { return q < r.begin; });
      return *(it - 1);
    };
    // Where each Param's gradient lives in the arena, in the visitor's order.
    for_each_param(model, [&](Param<T>& p) {
      if (p.size() == 0) return;
      const Range& r = find(p.grad().data());
      T* target = data_.data() + r.offset + (p.grad().data() - r.begin);
      p.relocate_grad(target);
    });
    auto release = [](auto& leaf) {
      if constexpr (detail::is_grad_storage<std::remove_cvref_t<decltype(leaf)>>::value) leaf.release();
    };
    detail::walk(model, release);
  }

  GradientArena(GradientArena&&) noexcept = default;
  GradientArena& operator=(GradientArena&&) noexcept = default;

  Index size() const { return Index(data_.size()); }
  bool empty() const { return data_.empty(); }
  T* data() { return data_.data(); }
  const T* data() const { return data_.data(); }
  /// Offset of a gradient element of this arena.
  Index offset_of(const T* p) const { return Index(p - data_.data()); }
  bool contains(const T* p) const { return !data_.empty() && p >= data_.data() && p < data_.data() + data_.size(); }

  /// Every gradient, as one array.
  Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>, Eigen::Aligned64> all() { return {data_.data(), size()}; }
  Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>, Eigen::Aligned64> all() const { return {data_.data(), size()}; }

 private:
  AlignedVector<T> data_;
};

}  // namespace moet
