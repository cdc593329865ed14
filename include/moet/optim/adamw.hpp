// AdamW (Loshchilov & Hutter): Adam with bias correction and weight decay decoupled from the
// gradient. Works on any model the parameter visitor can walk; the state (first and second
// moments) is made on the first step and belongs to that model.
//   m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
//   p -= lr * wd * p;        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
#pragma once

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

  void set_lr(double lr) { options_.lr = lr; }
  const AdamWOptions& options() const { return options_; }
  long steps() const { return steps_; }

  /// One update of every trainable parameter of `model` from its gradient.
  template <class Model>
  void step(Model& model) {
    check_state(model);
    ++steps_;
    const T b1 = T(options_.beta1), b2 = T(options_.beta2), lr = T(options_.lr), eps = T(options_.eps);
    const T decay = T(1) - lr * T(options_.weight_decay);
    const T correction1 = T(1) - T(std::pow(options_.beta1, double(steps_)));
    const T correction2 = T(1) - T(std::pow(options_.beta2, double(steps_)));
    std::size_t i = 0;
    for_each_param(model, [&](Param<T>& p) {
      auto m = first_[i].array();
      auto v = second_[i].array();
      const auto g = p.grad().array();
      m = b1 * m + (T(1) - b1) * g;
      v = b2 * v + (T(1) - b2) * g.square();
      p.value().array() = decay * p.value().array() - lr * (m / correction1) / ((v / correction2).sqrt() + eps);
      ++i;
    });
  }

 private:
  template <class Model>
  void check_state(Model& model) {
    std::vector<std::pair<Index, Index>> shapes;
    for_each_param(model, [&](Param<T>& p) { shapes.emplace_back(p.rows(), p.cols()); });
    if (first_.empty()) {
      for (auto [r, c] : shapes) {
        first_.push_back(Matrix<T>::Zero(r, c));
        second_.push_back(Matrix<T>::Zero(r, c));
      }
      return;
    }
    std::vector<std::pair<Index, Index>> state;
    for (const auto& m : first_) state.emplace_back(m.rows(), m.cols());
    detail::check_adamw_state(shapes, state);
  }

  AdamWOptions options_;
  long steps_ = 0;
  std::vector<Matrix<T>> first_, second_;
};

}  // namespace moet
