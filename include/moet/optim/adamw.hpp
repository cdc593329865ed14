// AdamW (Loshchilov & Hutter): Adam with bias correction and weight decay decoupled from the
// gradient. Works on any model the parameter visitor can walk; the state (first and second
// moments) is made on the first step and belongs to that model. On a model with a gradient arena
// (core/arena.hpp) the moments are two buffers laid out as the arena: the moment updates are one
// pass over them, and each parameter's value is updated through its view.
//   m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
//   p -= lr * wd * p;        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/visit.hpp"

namespace moet {

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

namespace detail {

inline void check_adamw_options(const AdamWOptions& o) {
  if (!(o.lr >= 0) || !std::isfinite(o.lr) || !(o.beta1 >= 0 && o.beta1 < 1) || !(o.beta2 >= 0 && o.beta2 < 1) ||
      !(o.eps > 0) || !(o.weight_decay >= 0) || !std::isfinite(o.weight_decay))
    throw value_error(concat("AdamW: expected lr >= 0, 0 <= beta1, beta2 < 1, eps > 0, weight_decay >= 0; got lr=", o.lr,
                             " beta1=", o.beta1, " beta2=", o.beta2, " eps=", o.eps, " weight_decay=", o.weight_decay));
}

/// The parameters of the model being stepped against the optimizer's state (made for the one
/// model it first stepped): same count, same shapes, or a moet::value_error saying which differs.
inline void check_adamw_state(const std::vector<std::pair<Index, Index>>& model,
                              const std::vector<std::pair<Index, Index>>& state) {
  if (model.size() != state.size())
    throw value_error(concat("AdamW: the model has ", model.size(), " parameter tensors but this optimizer's state has ",
                             state.size(), " (an optimizer serves the one model it first stepped)"));
  for (std::size_t i = 0; i < model.size(); ++i)
    if (model[i] != state[i])
      throw value_error(concat("AdamW: parameter ", i, " has shape ", shape_string(model[i].first, model[i].second),
                               ", expected ", shape_string(state[i].first, state[i].second), " from the optimizer's state"));
}

}  // namespace detail

template <class T>
class AdamW {
 public:
  explicit AdamW(const AdamWOptions& options = {}) : options_(options) { detail::check_adamw_options(options); }

  /// A new learning rate (a schedule); checked as the constructor checks it, the old one kept on error.
  void set_lr(double lr) {
    AdamWOptions o = options_;
    o.lr = lr;
    detail::check_adamw_options(o);
    options_ = o;
  }
  const AdamWOptions& options() const { return options_; }
  long steps() const { return steps_; }

  /// What a checkpoint keeps of the optimizer (train/fit.hpp): the steps taken and both moments
  /// of every parameter, in the order for_each_param visits `model`'s (the model it steps), row
  /// by row: independent of where the model's gradient arena put each tensor. Empty before the
  /// first step.
  struct State {
    long steps = 0;
    std::vector<T> first, second;
  };
  template <class Model>
  State state(Model& model) const {
    State s;
    s.steps = steps_;
    if (!started_) return s;
    const_cast<AdamW*>(this)->for_each_moment(model, [&](auto& m, auto& v) {
      for (Index r = 0; r < m.rows(); ++r)
        for (Index c = 0; c < m.cols(); ++c) s.first.push_back(m(r, c)), s.second.push_back(v(r, c));
    });
    return s;
  }
  /// The optimizer as it was when `s` was taken from a model like `model`: a state whose size
  /// does not fit the model is a moet::value_error, and the optimizer is left as it was.
  template <class Model>
  void restore(Model& model, const State& s) {
    AdamW fresh(options_);
    if (s.steps == 0 && s.first.empty()) {
      *this = std::move(fresh);
      return;
    }
    fresh.check_state(model);
    std::size_t need = 0;
    for_each_param(model, [&](Param<T>& p) { need += std::size_t(p.size()); });
    if (s.first.size() != need || s.second.size() != need || s.steps < 1)
      throw value_error(detail::concat("AdamW: the saved state holds ", s.first.size(), " and ", s.second.size(), " moment values after ", s.steps,
                                       " steps; this model needs ", need, " after at least one"));
    std::size_t at = 0;
    fresh.for_each_moment(model, [&](auto& m, auto& v) {
      for (Index r = 0; r < m.rows(); ++r)
        for (Index c = 0; c < m.cols(); ++c, ++at) m(r, c) = s.first[at], v(r, c) = s.second[at];
    });
    fresh.steps_ = s.steps;
    *this = std::move(fresh);
  }

  /// One update of every trainable parameter of `model` from its gradient.
  template <class Model>
  void step(Model& model) {
    check_state(model);
    ++steps_;
    const T b1 = T(options_.beta1), b2 = T(options_.beta2), lr = T(options_.lr), eps = T(options_.eps);
    const T decay = T(1) - lr * T(options_.weight_decay);
    const T correction1 = T(1) - T(std::pow(options_.beta1, double(steps_)));
    const T correction2 = T(1) - T(std::pow(options_.beta2, double(steps_)));
    auto update = [&](Param<T>& p, const auto& m, const auto& v) {
      p.value().array() = decay * p.value().array() - lr * (m.array() / correction1) / ((v.array() / correction2).sqrt() + eps);
    };
    if constexpr (requires { model.gradient_arena().all(); }) {
      auto& arena = model.gradient_arena();
      const auto g = arena.all();
      Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>, Eigen::Aligned64> m(flat_first_.data(), arena.size()),
          v(flat_second_.data(), arena.size());
      m = b1 * m + (T(1) - b1) * g;
      v = b2 * v + (T(1) - b2) * g.square();
      for_each_param(model, [&](Param<T>& p) {
        if (p.size() == 0) return;
        const Index offset = arena.offset_of(p.grad().data()), stride = p.grad().outerStride();
        update(p, ConstMatrixView<T>(flat_first_.data() + offset, p.rows(), p.cols(), Eigen::OuterStride<>(stride)),
               ConstMatrixView<T>(flat_second_.data() + offset, p.rows(), p.cols(), Eigen::OuterStride<>(stride)));
      });
    } else {
      std::size_t i = 0;
      for_each_param(model, [&](Param<T>& p) {
        auto m = first_[i].array();
        auto v = second_[i].array();
        const auto g = p.grad().array();
        m = b1 * m + (T(1) - b1) * g;
        v = b2 * v + (T(1) - b2) * g.square();
        update(p, first_[i], second_[i]);
        ++i;
      });
    }
  }

 private:
  /// f(m, v) with each parameter's moments as (rows, cols) views, in for_each_param order.
  template <class Model, class F>
  void for_each_moment(Model& model, F&& f) {
    if (with_arena_) {
      if constexpr (requires { model.gradient_arena().all(); }) {
        auto& arena = model.gradient_arena();
        for_each_param(model, [&](Param<T>& p) {
          if (p.size() == 0) return;
          const Index offset = arena.offset_of(p.grad().data()), stride = p.grad().outerStride();
          MatrixView<T> m(flat_first_.data() + offset, p.rows(), p.cols(), Eigen::OuterStride<>(stride));
          MatrixView<T> v(flat_second_.data() + offset, p.rows(), p.cols(), Eigen::OuterStride<>(stride));
          f(m, v);
        });
      }
    } else {
      for (std::size_t i = 0; i < first_.size(); ++i) f(first_[i], second_[i]);
    }
  }

  template <class Model>
  void check_state(Model& model) {
    std::vector<std::pair<Index, Index>> shapes;
    for_each_param(model, [&](Param<T>& p) { shapes.emplace_back(p.rows(), p.cols()); });
    constexpr bool arena = requires { model.gradient_arena().all(); };
    if (!started_) {
      started_ = true, with_arena_ = arena, shapes_ = shapes;
      if constexpr (arena) {
        flat_first_.assign(static_cast<std::size_t>(model.gradient_arena().size()), T(0));
        flat_second_ = flat_first_;
      } else {
        for (auto [r, c] : shapes) {
          first_.push_back(Matrix<T>::Zero(r, c));
          second_.push_back(Matrix<T>::Zero(r, c));
        }
      }
      return;
    }
    detail::check_adamw_state(shapes, shapes_);
    if (arena != with_arena_)
      throw value_error("AdamW: this optimizer's state was made for a model with a gradient arena and is now stepped on a layer "
                        "without one (or the other way round); an optimizer serves the one model it first stepped");
  }

  AdamWOptions options_;
  long steps_ = 0;
  bool started_ = false, with_arena_ = false;
  std::vector<std::pair<Index, Index>> shapes_;  // of the model's parameters, from the first step
  std::vector<Matrix<T>> first_, second_;        // per tensor, for a layer without a gradient arena
  AlignedVector<T> flat_first_, flat_second_;    // laid out as the model's gradient arena
};

}  // namespace moet
