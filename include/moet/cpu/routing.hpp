// Routing math on the CPU: softmax / top-k over router logits, the auxiliary losses, and the
// backward from d(gates) to d(logits). It works row by row so that fused layers (the IA3
// mixture) can route inside their own single pass over the activation; `route` and `backward`
// are the whole-matrix drivers. Only logits-derived state is kept for backward: the softmax
// probabilities, the gates, the top-k ids and the log-sum-exp (flash-attention's lesson).
//
// Gradient, for p = softmax(z) over all E experts and S the selected set:
//   Soft:             g = p                 dp = dg
//   TopK, renormalised g_S = p_S / s, s = sum_S p     dp_S = (dg_S - <dg_S, g_S>) / s
//   TopK, not renorm. g_S = p_S             dp_S = dg_S
//   load balancing    L = E sum_i f_i P_i, P_i = mean_t p_ti, f piecewise constant
//                     dp_ti += w E f_i / N
//   softmax           dz = p * (dp - <dp, p>)
//   z-loss            L = mean_t lse_t^2    dz_ti += w (2 / N) lse_t p_ti
// The auxiliary losses average over the rows that count (RowMask: a padded batch's real tokens;
// N is their number); rows that do not count get no auxiliary gradient.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/shapes.hpp"
#include "../core/tensor.hpp"
#include "../core/util.hpp"
#include "../router.hpp"

namespace moet::cpu_impl {

using IndexMatrix = Eigen::Matrix<int, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// What a router keeps between forward and backward.
template <class T>
struct Routing {
  RouterOptions options;
  Matrix<T> probs;       // (rows, E) softmax over all experts
  Matrix<T> gates;       // (rows, E) mixing weights; zero where an expert was not selected
  IndexMatrix selected;  // (rows, K) chosen expert ids, best first; (rows, 0) for Soft
  std::vector<T> lse;    // (rows) logsumexp of the logits
  std::vector<double> usage;  // (E) f_i: share of routing slots sent to each expert
  std::vector<unsigned char> counted;  // (rows) 1: the row counts for the aux losses; empty: every row
  Index counted_rows = 0;
  AuxLosses aux;

  Index rows() const { return probs.rows(); }
  bool counts(Index row) const { return counted.empty() || counted[std::size_t(row)]; }
  Index experts() const { return probs.cols(); }
  /// The weighted auxiliary loss whose gradient backward adds.
  double aux_loss() const { return options.load_balance_weight * aux.load_balance + options.z_loss_weight * aux.z_loss; }
};

/// The part of every routed layer's context that reports on routing.
template <class T>
struct RoutedContext {
  Routing<T> routing;

  /// Weighted auxiliary loss (its gradient is already part of backward).
  double aux_loss() const { return routing.aux_loss(); }
  /// The unweighted auxiliary losses.
  const AuxLosses& aux() const { return routing.aux; }
  /// Share of routing slots each expert received in this pass.
  const std::vector<double>& expert_usage() const { return routing.usage; }
};

template <class Policy, class T>
struct RouterMath {
  static constexpr int K = Policy::k;  // 0 for Soft
  static constexpr bool top_k = K > 0;

  /// `mask` flags the token rows that count for the aux losses; routing row r belongs to token
  /// r / groups (an IA3 mixture routes each head of a token on its own row).
  static Routing<T> start(Index rows, Index experts, const RouterOptions& options, RowMask mask = {}, Index groups = 1) {
    Routing<T> r;
    r.options = options;
    r.probs.resize(rows, experts);
    r.gates.resize(rows, experts);
    r.selected.resize(rows, K);
    r.lse.assign(static_cast<std::size_t>(rows), T(0));
    r.counted_rows = rows;
    if (!mask.all()) {
      if (mask.rows * groups != rows)
        throw shape_error(detail::concat("router: the row mask has ", mask.rows, " flags for ", rows / groups, " tokens"));
      r.counted.resize(static_cast<std::size_t>(rows));
      r.counted_rows = 0;
      for (Index i = 0; i < rows; ++i) r.counted_rows += r.counted[std::size_t(i)] = mask.flags[i / groups] ? 1 : 0;
    }
    return r;
  }

  /// Routes one row; rows are independent, so callers may run this in parallel.
  static void route_row(Routing<T>& r, Index row, const T* logits) {
    detail::bool_switch(r.options.fp32_softmax, [&](auto fp32) {
      using C = std::conditional_t<decltype(fp32)::value, float, T>;
      route_row_in<C>(r, row, logits);
    });
  }

  /// Aux losses and usage over all rows; call once after every row is routed.
  static void finish(Routing<T>& r) {
    const Index rows = r.rows(), E = r.experts();
    std::vector<double> slots(static_cast<std::size_t>(E), 0.0), prob_sums(static_cast<std::size_t>(E), 0.0);
    double lse_sq = 0.0;
    for (Index t = 0; t < rows; ++t) {
      if (!r.counts(t)) continue;
      for (Index e = 0; e < E; ++e) prob_sums[e] += double(r.probs(t, e));
      if constexpr (top_k) {
        for (int j = 0; j < K; ++j) slots[r.selected(t, j)] += 1.0;
      } else {
        Index best = 0;
        for (Index e = 1; e < E; ++e)
          if (r.probs(t, e) > r.probs(t, best)) best = e;
        slots[best] += 1.0;
      }
      lse_sq += double(r.lse[t]) * double(r.lse[t]);
    }
    r.aux = aux_losses(int(E), K, {slots.data(), prob_sums.data(), lse_sq, double(r.counted_rows)}, &r.usage);
  }

  /// logits: (rows, E); mask: the rows that count for the aux losses.
  static Routing<T> route(In<T> logits, const RouterOptions& options, RowMask mask = {}) {
    Routing<T> r = start(logits.rows(), logits.cols(), options, mask);
    const Index rows = logits.rows();
    MOET_OMP(omp parallel for schedule(static) if (rows * logits.cols() > 32768))
    for (Index t = 0; t < rows; ++t) route_row(r, t, logits.row(t).data());
    finish(r);
    return r;
  }

  /// d(loss)/d(logits) of one row from d(loss)/d(gates), aux-loss gradients included.
  static void backward_row(const Routing<T>& r, Index row, const T* dgates, T* dlogits) {
    detail::bool_switch(r.options.fp32_softmax, [&](auto fp32) {
      using C = std::conditional_t<decltype(fp32)::value, float, T>;
      backward_row_in<C>(r, row, dgates, dlogits);
    });
  }

  /// dgates: (rows, E); dlogits: (rows, E), overwritten.
  static void backward(const Routing<T>& r, In<T> dgates, Out<T> dlogits) {
    const Index rows = r.rows();
    MOET_OMP(omp parallel for schedule(static) if (rows * r.experts() > 32768))
    for (Index t = 0; t < rows; ++t) backward_row(r, t, dgates.row(t).data(), dlogits.row(t).data());
  }

 private:
  static constexpr int max_experts_on_stack = 256;

  template <class C>
  static void route_row_in(Routing<T>& r, Index row, const T* logits) {
    const Index E = r.experts();
    C max_logit = C(logits[0]);
    for (Index e = 1; e < E; ++e) max_logit = std::max(max_logit, C(logits[e]));
    C sum = 0;
    T* probs = &r.probs(row, 0);
    for (Index e = 0; e < E; ++e) {
      const C ex = std::exp(C(logits[e]) - max_logit);
      probs[e] = T(ex);
      sum += ex;
    }
    const C inv = C(1) / sum;
    for (Index e = 0; e < E; ++e) probs[e] = T(C(probs[e]) * inv);
    r.lse[row] = T(max_logit + std::log(sum));

    T* gates = &r.gates(row, 0);
    if constexpr (!top_k) {
      for (Index e = 0; e < E; ++e) gates[e] = probs[e];
    } else {
      // Insertion into a sorted list of K: O(E K), ties go to the lower expert id.
      int* chosen = &r.selected(row, 0);
      int count = 0;
      for (int e = 0; e < int(E); ++e) {
        int pos = count < K ? count : K;
        while (pos > 0 && probs[e] > probs[chosen[pos - 1]]) --pos;
        if (pos >= K) continue;
        for (int j = std::min(count, K - 1); j > pos; --j) chosen[j] = chosen[j - 1];
        chosen[pos] = e;
        count = std::min(count + 1, K);
      }
      for (Index e = 0; e < E; ++e) gates[e] = T(0);
      C kept = 0;
      for (int j = 0; j < K; ++j) kept += C(probs[chosen[j]]);
      const C scale = Policy::renorm == Renorm::on ? C(1) / kept : C(1);
      for (int j = 0; j < K; ++j) gates[chosen[j]] = T(C(probs[chosen[j]]) * scale);
    }
  }

  template <class C>
  static void backward_row_in(const Routing<T>& r, Index row, const T* dgates, T* dlogits) {
    const Index E = r.experts();
    C dprob_stack[max_experts_on_stack];
    std::vector<C> dprob_heap;
    C* dprob = dprob_stack;
    if (E > max_experts_on_stack) {
      dprob_heap.resize(static_cast<std::size_t>(E));
      dprob = dprob_heap.data();
    }
    const T* probs = &r.probs(row, 0);
    if constexpr (!top_k) {
      for (Index e = 0; e < E; ++e) dprob[e] = C(dgates[e]);
    } else {
      for (Index e = 0; e < E; ++e) dprob[e] = 0;
      const int* chosen = &r.selected(row, 0);
      if constexpr (Policy::renorm == Renorm::on) {
        C kept = 0, weighted = 0;
        for (int j = 0; j < K; ++j) {
          kept += C(probs[chosen[j]]);
          weighted += C(dgates[chosen[j]]) * C(r.gates(row, chosen[j]));
        }
        for (int j = 0; j < K; ++j) dprob[chosen[j]] = (C(dgates[chosen[j]]) - weighted) / kept;
      } else {
        for (int j = 0; j < K; ++j) dprob[chosen[j]] = C(dgates[chosen[j]]);
      }
    }
    const bool aux = r.counts(row);  // rows that do not count get no aux-loss gradient
    const C rows = C(r.counted_rows);
    if (aux && r.options.load_balance_weight != 0.0) {
      const C w = C(r.options.load_balance_weight) * C(E) / rows;
      for (Index e = 0; e < E; ++e) dprob[e] += w * C(r.usage[e]);
    }
    C dot = 0;
    for (Index e = 0; e < E; ++e) dot += dprob[e] * C(probs[e]);
    const C z_coef = aux ? C(r.options.z_loss_weight) * C(2) / rows * C(r.lse[row]) : C(0);
    for (Index e = 0; e < E; ++e) dlogits[e] = T(C(probs[e]) * (dprob[e] - dot + z_coef));
  }
};

}  // namespace moet::cpu_impl
