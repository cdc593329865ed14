// The one generic layer harness. Any moet layer (or user layer) with
//   ctx = layer.forward(inputs...)            ctx.output(), ctx.aux_loss()
//   grads = layer.backward(ctx, inputs..., d_output, GradMode)
// where grads is dx (one input), a pair or a tuple (several inputs), is checked by one call:
//   auto report = moet::testing::check_gradients(layer, rng, x);
//   REQUIRE(report.ok);
// It randomises every trainable parameter (so a zero-initialised LoRA "B" hides nothing),
// takes the objective L = <output, probe> + aux_loss with a fixed random probe, and compares
// every analytic parameter and input gradient with a central finite difference in double.
// It also checks the GradMode contract (overwrite replaces, accumulate adds) and that forward is
// deterministic, and refuses inputs whose top-k routing has near-ties.
#pragma once

#include <algorithm>
#include <functional>
#include <cmath>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <moet/moet.hpp>

namespace moet::testing {

struct GradCheckOptions {
  double step = 1e-6;       // central-difference step
  double abs_tol = 1e-7;    // |numeric - analytic| <= abs_tol + rel_tol * max(|numeric|, |analytic|)
  double rel_tol = 1e-5;
  bool randomize_params = true;
  double param_stddev = 0.5;
  Index max_entries_per_tensor = 400;  // larger tensors are sampled
  double min_routing_margin = 1e-4;    // top-k: smallest allowed gap between the K-th and (K+1)-th probability
};

struct GradReport {
  bool ok = true;
  Index checked = 0;
  double worst_error = 0;  // the largest |numeric - analytic| / (abs_tol + rel_tol * scale)
  std::string worst_where;
  std::vector<std::string> failures;

  std::string summary() const {
    std::ostringstream out;
    out << (ok ? "ok" : "FAILED") << ": " << checked << " entries, worst " << worst_error << "x tolerance at "
        << worst_where;
    for (std::size_t i = 0; i < failures.size() && i < 10; ++i) out << "\n  " << failures[i];
    return out.str();
  }
};

namespace detail {

template <class T>
double dot(In<T> a, In<T> b) {
  double s = 0;
  for (Index r = 0; r < a.rows(); ++r)
    for (Index c = 0; c < a.cols(); ++c) s += double(a(r, c)) * double(b(r, c));
  return s;
}

/// Input gradients as a list: dx alone, a pair, or a tuple of them (or the list itself).
template <class R>
std::vector<Matrix<double>> as_list(R&& r) {
  if constexpr (std::is_same_v<std::remove_cvref_t<R>, std::vector<Matrix<double>>>) return r;
  else if constexpr (requires { r.first; r.second; }) return {r.first, r.second};
  else if constexpr (requires { std::tuple_size<std::remove_cvref_t<R>>::value; })
    return std::apply([](auto&... g) { return std::vector<Matrix<double>>{Matrix<double>(g)...}; }, r);
  else return {Matrix<double>(r)};
}

/// Smallest gap between the last kept and the first dropped probability of any row.
template <class Routing>
double top_k_margin(const Routing& r) {
  const Index K = r.selected.cols();
  if (K == 0 || K == r.experts()) return INFINITY;
  double margin = INFINITY;
  for (Index t = 0; t < r.rows(); ++t) {
    const double kth = double(r.probs(t, r.selected(t, K - 1)));
    double best_dropped = -INFINITY;
    for (Index e = 0; e < r.experts(); ++e) {
      bool kept = false;
      for (Index j = 0; j < K; ++j) kept |= r.selected(t, j) == e;
      if (!kept) best_dropped = std::max(best_dropped, double(r.probs(t, e)));
    }
    margin = std::min(margin, kth - best_dropped);
  }
  return margin;
}

class Recorder {
 public:
  explicit Recorder(const GradCheckOptions& o) : o_(o) {}
  void compare(const std::string& where, double numeric, double analytic) {
    ++report.checked;
    const double scale = std::max(std::abs(numeric), std::abs(analytic));
    const double err = std::abs(numeric - analytic) / (o_.abs_tol + o_.rel_tol * scale);
    if (err > report.worst_error || report.worst_where.empty()) {
      report.worst_error = err;
      report.worst_where = where;
    }
    if (!(err <= 1.0)) {
      report.ok = false;
      std::ostringstream msg;
      msg << where << ": numeric " << numeric << " analytic " << analytic;
      report.failures.push_back(msg.str());
    }
  }
  GradReport report;

 private:
  GradCheckOptions o_;
};

/// Entries to check: all, or an evenly spread sample.
inline std::vector<Index> entries(Index size, Index max_entries) {
  std::vector<Index> out;
  const Index step = std::max<Index>(1, (size + max_entries - 1) / max_entries);
  for (Index i = 0; i < size; i += step) out.push_back(i);
  return out;
}

}  // namespace detail

/// inputs: the (tokens, width) matrices forward takes, in double.
template <class Layer, class... Inputs>
GradReport check_gradients(Layer& layer, Rng& rng, std::tuple<Inputs...> inputs, GradCheckOptions o = {}) {
  static_assert((std::is_same_v<Inputs, Matrix<double>> && ...), "the harness works in double");
  detail::Recorder rec(o);
  if (o.randomize_params)
    for_each_param(layer, [&](auto& p) { rng.fill_normal(p.value(), 0.0, o.param_stddev); });

  auto forward = [&] { return std::apply([&](auto&... in) { return layer.forward(in...); }, inputs); };
  auto first = forward();
  const Matrix<double> probe = rng.normal_matrix<double>(first.output().rows(), first.output().cols());
  auto objective = [&] {
    const auto c = forward();
    return detail::dot<double>(c.output(), probe) + c.aux_loss();
  };

  if constexpr (requires { first.routing; }) {
    const double margin = detail::top_k_margin(first.routing);
    if (margin < o.min_routing_margin) {
      rec.report.ok = false;
      rec.report.failures.push_back("inputs have a top-k near-tie (margin " + std::to_string(margin) +
                                    "): finite differences would cross it; draw other inputs");
      return rec.report;
    }
  }
  {  // forward is deterministic
    const auto again = forward();
    if (!(Matrix<double>(again.output()) == Matrix<double>(first.output()))) {
      rec.report.ok = false;
      rec.report.failures.push_back("two forward passes on the same input differ");
    }
  }

  auto run_backward = [&](GradMode mode) {
    return detail::as_list(std::apply(
        [&](auto&... in) { return layer.backward(first, in..., probe, mode); }, inputs));
  };
  const std::vector<Matrix<double>> input_grads = run_backward(GradMode::overwrite);
  std::vector<Matrix<double>> param_grads;
  for_each_param(layer, [&](auto& p) { param_grads.emplace_back(p.grad()); });

  // GradMode contract: accumulate adds the same gradients once more; overwrite replaces them.
  run_backward(GradMode::accumulate);
  {
    std::size_t i = 0;
    for_each_param(layer, [&](auto& p) {
      const double err = (Matrix<double>(p.grad()) - 2.0 * param_grads[i]).cwiseAbs().maxCoeff();
      rec.compare("accumulate doubles " + p.name(), 0.0, err);
      ++i;
    });
  }
  run_backward(GradMode::overwrite);
  {
    std::size_t i = 0;
    for_each_param(layer, [&](auto& p) {
      const double err = (Matrix<double>(p.grad()) - param_grads[i]).cwiseAbs().maxCoeff();
      rec.compare("overwrite replaces " + p.name(), 0.0, err);
      ++i;
    });
  }

  auto central = [&](double& value) {
    const double saved = value;
    value = saved + o.step;
    const double plus = objective();
    value = saved - o.step;
    const double minus = objective();
    value = saved;
    return (plus - minus) / (2 * o.step);
  };

  std::size_t param_index = 0;
  for_each_param(layer, [&](auto& p) {
    for (Index i : detail::entries(p.size(), o.max_entries_per_tensor)) {
      const Index r = i / p.cols(), c = i % p.cols();
      const double numeric = central(p.value()(r, c));
      rec.compare(p.name() + "(" + std::to_string(r) + "," + std::to_string(c) + ")", numeric,
                  param_grads[param_index](r, c));
    }
    ++param_index;
  });

  std::size_t input_index = 0;
  std::apply(
      [&](auto&... in) {
        auto check_input = [&](Matrix<double>& x) {
          for (Index i : detail::entries(x.size(), o.max_entries_per_tensor)) {
            const Index r = i / x.cols(), c = i % x.cols();
            const double numeric = central(x(r, c));
            rec.compare("input" + std::to_string(input_index) + "(" + std::to_string(r) + "," + std::to_string(c) + ")",
                        numeric, input_grads[input_index](r, c));
          }
          ++input_index;
        };
        (check_input(in), ...);
      },
      inputs);
  return rec.report;
}

/// A model whose forward takes a batch geometry first (decoders, composed models), bound to one,
/// so that the harness can call forward(inputs...) and backward(ctx, inputs..., d_output, mode):
///   auto bound = testing::bind_batch(model, model.geometry(batch));
///   check_gradients(bound, rng, h0);
/// With several inputs (a composed model: h0 and each augmenting model's stacked states) the
/// inputs after the first go to forward as one list. The model's parameters are visited through
/// the reference.
template <class Model, class Geometry>
struct BoundToBatch {
  BOOST_HANA_DEFINE_STRUCT(BoundToBatch, (std::reference_wrapper<Model>, model), (Geometry, geometry));

  template <class X, class... Rest>
  auto forward(const X& h0, const Rest&... rest) const {
    if constexpr (sizeof...(Rest) == 0) return model.get().forward(geometry, h0);
    else return model.get().forward(geometry, h0, std::vector<In<double>>{In<double>(rest)...});
  }
  /// args: the inputs, d_output, mode; backward reads the first input (h0) again.
  template <class C, class... Args>
  std::vector<Matrix<double>> backward(const C& c, const Args&... args) {
    const auto all = std::forward_as_tuple(args...);
    constexpr std::size_t n = sizeof...(Args);
    auto grads = model.get().backward(c, std::get<0>(all), std::get<n - 2>(all), std::get<n - 1>(all));
    if constexpr (requires { grads.second.size(); grads.second[0]; }) {
      std::vector<Matrix<double>> list{std::move(grads.first)};
      for (auto& g : grads.second) list.push_back(std::move(g));
      return list;
    } else {
      return {std::move(grads)};
    }
  }
};

template <class Model, class Geometry>
BoundToBatch<Model, Geometry> bind_batch(Model& model, Geometry geometry) {
  return {std::ref(model), std::move(geometry)};
}

/// Shorthand for one input.
template <class Layer>
GradReport check_gradients(Layer& layer, Rng& rng, Matrix<double> x, GradCheckOptions o = {}) {
  return check_gradients(layer, rng, std::make_tuple(std::move(x)), o);
}

}  // namespace moet::testing
