// The CPU-vs-CUDA mode of the layer harness (tests/harness.hpp is the finite-difference mode):
//   auto report = moet::testing::compare_with_cpu<T>(cpu_layer, cuda_layer, ctx, rng, make_inputs);
//   REQUIRE(report.ok);
// works for any pair of layers with the same parameter names (a CPU layer in double and the CUDA
// layer of the same spec in T). It randomises the CPU layer's parameters, rounds them (and the
// inputs and the upstream gradient) to T so that both sides see exactly the same numbers, copies
// them into the CUDA layer, and compares, against the CPU in double: the frozen weights
// (exactly), the output, the routing (top-k ids exactly, gates, auxiliary loss), the input
// gradients and every parameter gradient; then it checks GradMode::accumulate (gradients double).
// Each comparison is   max |cuda - cpu| / max |cpu|  <=  tolerance(T)   per tensor.
// Tokens whose top-k routing has a near-tie closer than T's rounding can move are redrawn: there
// the two sides may legitimately choose differently. A tensor whose reference is zero is
// compared absolutely (max |cpu| counts as at least 1e-3).
#pragma once

#include <algorithm>
#include <functional>
#include <cmath>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <moet/cuda/layers.hpp>
#include <moet/moet.hpp>

#include "../harness.hpp"

namespace moet::testing {

struct CompareOptions {
  double tolerance = 0;            ///< max |cuda - cpu| / max |cpu| per tensor
  double min_routing_margin = 0;   ///< top-k: smallest gap allowed between the K-th and (K+1)-th logit
  double logit_ulp = 0;            ///< ... plus this times their magnitude (logits stored in T round by an ulp)
  double param_stddev = 0.5;
  int max_draws = 50;              ///< draws tried for the near-tie tokens before giving up
};

/// Tolerances by storage type, documented in docs/cuda.md: float is float32 end to end (about
/// 1e-5 relative); bf16 and fp16 round every stored intermediate (U, V, dV, d_logits, ...) to 8
/// or 11 significant bits, so a handful of roundings of 2^-9 (bf16) or 2^-12 (fp16).
template <class T>
CompareOptions compare_options() {
  CompareOptions o;
  if constexpr (std::is_same_v<T, float>) {
    o.tolerance = 2e-5;
    o.min_routing_margin = 1e-4;
    o.logit_ulp = 0x1p-23;
  } else if constexpr (std::is_same_v<T, bf16>) {
    o.tolerance = 2e-2;
    o.min_routing_margin = 3e-2;
    o.logit_ulp = 0x1p-7;
  } else {
    o.tolerance = 4e-3;
    o.min_routing_margin = 5e-3;
    o.logit_ulp = 0x1p-10;
  }
  return o;
}

struct CompareReport {
  bool ok = true;
  bool near_tie = false;
  std::vector<std::string> lines;

  std::string summary() const {
    std::ostringstream out;
    out << (ok ? "ok" : "FAILED") << (near_tie ? " (top-k near-ties could not be drawn away)" : "") << "\n";
    for (const auto& line : lines) out << "  " << line << "\n";
    return out.str();
  }
};

namespace detail {

/// m rounded to T's precision (and back to double).
template <class T>
Matrix<double> rounded(const Matrix<double>& m) {
  Matrix<double> out(m.rows(), m.cols());
  for (Index i = 0; i < m.size(); ++i) out.data()[i] = cuda_impl::to_double(cuda_impl::from_double<T>(m.data()[i]));
  return out;
}

template <class T>
Matrix<double> download_matrix(DeviceView<const T> v, cudaStream_t stream) {
  const std::vector<double> values = cuda_impl::download(v, stream);
  Matrix<double> m(v.rows, v.cols);
  std::copy(values.begin(), values.end(), m.data());
  return m;
}

/// max |got - want| / max |want| (the scale floored at 1e-30), with a line naming it and the
/// tolerance for the test's INFO; a shape mismatch is an infinite error.
struct Relative {
  double error;
  std::string line;
};
inline Relative relative_error(const std::string& what, const Matrix<double>& got, const Matrix<double>& want, double tolerance) {
  std::ostringstream line;
  if (got.rows() != want.rows() || got.cols() != want.cols()) {
    line << what << ": shape " << got.rows() << " x " << got.cols() << ", expected " << want.rows() << " x " << want.cols();
    return {INFINITY, line.str()};
  }
  const double error = want.size() == 0 ? 0.0 : (got - want).cwiseAbs().maxCoeff() / std::max(want.cwiseAbs().maxCoeff(), 1e-30);
  line << what << ": max |gpu - cpu| / max |cpu| = " << error << ", tolerance " << tolerance;
  return {error, line.str()};
}

template <class T>
DeviceMatrix<T> upload_matrix(const Matrix<double>& m, cudaStream_t stream) {
  DeviceMatrix<T> d(m.rows(), m.cols(), stream);
  cuda_impl::upload(d.view(), m.data(), m.cols(), stream);
  return d;
}

class Comparer {
 public:
  /// A tensor whose reference is (mathematically) zero, such as the router gradient of top-1
  /// with renormalisation, is compared absolutely: max |cpu| counts as at least this.
  static constexpr double zero_scale = 1e-3;

  explicit Comparer(double tolerance) : tolerance_(tolerance) {}

  void tensor(const std::string& what, const Matrix<double>& cuda, const Matrix<double>& cpu, double tolerance = -1) {
    if (tolerance < 0) tolerance = tolerance_;
    std::ostringstream line;
    if (cuda.rows() != cpu.rows() || cuda.cols() != cpu.cols()) {
      line << what << ": shape (" << cuda.rows() << ", " << cuda.cols() << ") vs CPU (" << cpu.rows() << ", " << cpu.cols() << ") FAILED";
      fail(line.str());
      return;
    }
    const double scale = cpu.size() ? cpu.cwiseAbs().maxCoeff() : 0.0;
    const double err = cpu.size() ? (cuda - cpu).cwiseAbs().maxCoeff() : 0.0;
    const double rel = err / std::max(scale, zero_scale);
    const bool ok = std::isfinite(rel) && rel <= tolerance;
    line << what << ": max abs err " << err << ", rel " << rel << " (tol " << tolerance << ")" << (ok ? "" : " FAILED");
    if (ok) report.lines.push_back(line.str());
    else fail(line.str());
  }

  void scalar(const std::string& what, double cuda, double cpu) {
    Matrix<double> a(1, 1), b(1, 1);
    a(0, 0) = cuda;
    b(0, 0) = cpu;
    tensor(what, a, b);
  }

  void fail(const std::string& line) {
    report.ok = false;
    report.lines.push_back(line);
  }

  CompareReport report;

 private:
  double tolerance_;
};

/// The routing rows whose gap between the k-th and (k+1)-th largest logit is below
/// margin + logit_ulp * (the larger magnitude of the two), k = K (top-k) or 1 (Soft: the argmax
/// decides the load-balancing usage). Logits are log-probabilities plus the row's logsumexp; the
/// magnitude term covers logits stored in T (one rounding moves a logit by up to an ulp).
template <class Routing>
std::vector<Index> near_tie_rows(const Routing& r, double margin, double logit_ulp) {
  const Index k = r.selected.cols() > 0 ? r.selected.cols() : 1;
  std::vector<Index> rows;
  if (k >= r.experts()) return rows;
  for (Index t = 0; t < r.rows(); ++t) {
    std::vector<double> p(r.experts());
    for (Index e = 0; e < r.experts(); ++e) p[std::size_t(e)] = r.probs(t, e);
    std::sort(p.begin(), p.end(), std::greater<>());
    const double lse = double(r.lse[std::size_t(t)]);
    const double above = std::log(p[std::size_t(k - 1)]) + lse, below = std::log(p[std::size_t(k)]) + lse;
    if (above - below < margin + logit_ulp * std::max(std::abs(above), std::abs(below))) rows.push_back(t);
  }
  return rows;
}

template <class R>
std::vector<Matrix<double>> cpu_grads(R&& r) {
  return as_list(std::forward<R>(r));
}

template <class T, class R>
std::vector<Matrix<double>> cuda_grads(R&& r, cudaStream_t stream) {
  if constexpr (requires { r.first; r.second; })
    return {download_matrix<T>(r.first.view(), stream), download_matrix<T>(r.second.view(), stream)};
  else return {download_matrix<T>(r.view(), stream)};
}

}  // namespace detail

/// make_inputs(Rng&) returns a std::tuple of (tokens, width) double matrices, the arguments of
/// forward.
template <class T, class CpuLayer, class CudaLayer, class MakeInputs>
CompareReport compare_with_cpu(CpuLayer& cpu, CudaLayer& gpu, CudaContext& ctx, Rng& rng, MakeInputs make_inputs,
                               CompareOptions o = compare_options<T>()) {
  using OutT = typename CudaLayer::OutputScalar;
  cudaStream_t stream = ctx.stream();
  detail::Comparer cmp(o.tolerance);

  // Parameters: random, rounded to T, the same on both sides.
  std::vector<std::string> names;
  std::vector<Matrix<double>> values;
  for_each_param(cpu, [&](auto& p) {
    Matrix<double> v = detail::rounded<T>(rng.normal_matrix<double>(p.rows(), p.cols(), 0.0, o.param_stddev));
    p.value() = v;
    names.push_back(p.name());
    values.push_back(std::move(v));
  });
  std::size_t index = 0;
  for_each_device_param(gpu, [&](auto& p) {
    if (index >= names.size() || p.name() != names[index] || p.rows() != values[index].rows() || p.cols() != values[index].cols()) {
      cmp.fail("parameter " + std::to_string(index) + " (" + p.name() + ") does not match the CPU layer's");
    } else {
      cuda_impl::upload(p.value(), values[index].data(), values[index].cols(), stream);
    }
    ++index;
  });
  if (index != names.size()) cmp.fail("the CUDA layer has " + std::to_string(index) + " parameters, the CPU layer " +
                                      std::to_string(names.size()));
  std::vector<Matrix<double>> frozen;
  for_each_frozen(cpu, [&](const auto& f) { frozen.emplace_back(f.value()); });
  index = 0;
  for_each_device_frozen(gpu, [&](auto& f) {
    if (index < frozen.size())
      cmp.tensor("frozen " + f.name() + " (exact)", detail::download_matrix<T>(f.value(), stream), frozen[index], 0.0);
    ++index;
  });
  if (!cmp.report.ok) return cmp.report;

  // Inputs: the tokens whose CPU routing has a near-tie are redrawn (from fresh draws).
  auto rounded_draw = [&] {
    auto in = make_inputs(rng);
    std::apply([&](auto&... m) { ((m = detail::rounded<T>(m)), ...); }, in);
    return in;
  };
  auto inputs = rounded_draw();
  auto cpu_forward = [&] { return std::apply([&](auto&... in) { return cpu.forward(in...); }, inputs); };
  auto cc = cpu_forward();
  if constexpr (requires { cc.routing.selected; }) {
    const Index tokens = std::get<0>(inputs).rows();
    const Index per_token = tokens > 0 ? cc.routing.rows() / tokens : 1;  // per-head routing: heads rows a token
    std::vector<Index> ties = detail::near_tie_rows(cc.routing, o.min_routing_margin, o.logit_ulp);
    for (int draws = 1; !ties.empty() && draws < o.max_draws; ++draws) {
      const auto fresh = rounded_draw();
      for (const Index row : ties) {
        const Index t = row / per_token;
        [&]<std::size_t... I>(std::index_sequence<I...>) {
          ((std::get<I>(inputs).row(t) = std::get<I>(fresh).row(t)), ...);
        }(std::make_index_sequence<std::tuple_size_v<decltype(inputs)>>{});
      }
      cc = cpu_forward();
      ties = detail::near_tie_rows(cc.routing, o.min_routing_margin, o.logit_ulp);
    }
    if (!ties.empty()) {
      cmp.report.near_tie = true;
      cmp.fail("top-k near-ties left in " + std::to_string(ties.size()) + " routing rows after " +
               std::to_string(o.max_draws) + " draws");
      return cmp.report;
    }
  }
  auto device_inputs = std::apply([&](auto&... in) { return std::make_tuple(detail::upload_matrix<T>(in, stream)...); }, inputs);
  auto gpu_forward = [&] {
    return std::apply([&](auto&... in) { return gpu.forward(DeviceView<const T>(in.view())...); }, device_inputs);
  };
  auto gc = gpu_forward();
  cmp.tensor("output", detail::download_matrix<OutT>(gc.output(), stream), Matrix<double>(cc.output()));

  if constexpr (requires { cc.routing.selected; }) {
    cmp.tensor("routing gates", detail::download_matrix<float>(gc.routing.gates.view(), stream), Matrix<double>(cc.routing.gates));
    if (cc.routing.selected.cols() > 0) {
      // The chosen set per token; its best-first order may differ where two chosen are near-tied.
      auto sorted_rows = [](Matrix<double> ids) {
        for (Index t = 0; t < ids.rows(); ++t) std::sort(ids.row(t).begin(), ids.row(t).end());
        return ids;
      };
      const Matrix<double> ids = sorted_rows(detail::download_matrix<int>(gc.routing.selected.view(), stream));
      const Matrix<double> cpu_ids = sorted_rows(cc.routing.selected.template cast<double>());
      cmp.tensor("top-k expert sets (exact)", ids, cpu_ids, 0.0);
    }
    cmp.scalar("aux loss", gc.aux_loss(), cc.aux_loss());
    const std::vector<double> usage = gc.expert_usage();
    Matrix<double> u(1, Index(usage.size())), cu(1, Index(cc.routing.usage.size()));
    for (std::size_t i = 0; i < usage.size(); ++i) u(0, Index(i)) = usage[i];
    for (std::size_t i = 0; i < cc.routing.usage.size(); ++i) cu(0, Index(i)) = cc.routing.usage[i];
    cmp.tensor("expert usage (exact)", u, cu, 0.0);
  }

  // Backward: overwrite, then accumulate once more (every parameter gradient doubles).
  const Matrix<double> probe =
      detail::rounded<OutT>(rng.normal_matrix<double>(cc.output().rows(), cc.output().cols()));
  const DeviceMatrix<OutT> d_probe = detail::upload_matrix<OutT>(probe, stream);
  const std::vector<Matrix<double>> cpu_in_grads = detail::cpu_grads(
      std::apply([&](auto&... in) { return cpu.backward(cc, in..., probe, GradMode::overwrite); }, inputs));
  auto gpu_backward = [&](GradMode mode) {
    return detail::cuda_grads<T>(std::apply([&](auto&... in) {
                                   return gpu.backward(gc, DeviceView<const T>(in.view())..., d_probe.view(), mode);
                                 },
                                 device_inputs),
                                 stream);
  };
  const std::vector<Matrix<double>> gpu_in_grads = gpu_backward(GradMode::overwrite);
  for (std::size_t i = 0; i < cpu_in_grads.size() && i < gpu_in_grads.size(); ++i)
    cmp.tensor("input gradient " + std::to_string(i), gpu_in_grads[i], cpu_in_grads[i]);

  std::vector<Matrix<double>> cpu_param_grads, gpu_param_grads;
  for_each_param(cpu, [&](auto& p) { cpu_param_grads.emplace_back(p.grad()); });
  for_each_device_param(gpu, [&](auto& p) { gpu_param_grads.push_back(detail::download_matrix<float>(p.grad(), stream)); });
  for (std::size_t i = 0; i < names.size() && i < gpu_param_grads.size(); ++i)
    cmp.tensor("gradient of " + names[i], gpu_param_grads[i], cpu_param_grads[i]);

  gpu_backward(GradMode::accumulate);
  index = 0;
  for_each_device_param(gpu, [&](auto& p) {
    if (index < gpu_param_grads.size())
      cmp.tensor("accumulate doubles " + p.name(), detail::download_matrix<float>(p.grad(), stream), 2.0 * gpu_param_grads[index], 1e-6);
    ++index;
  });
  ctx.synchronize();
  return cmp.report;
}

}  // namespace moet::testing
