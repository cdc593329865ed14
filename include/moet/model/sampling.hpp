// Choosing the next token from a row of logits, and the decoding loop every model shares.
// Sampling works on host values (a backend hands over a row: ops::row_to_host); a greedy pick is
// made by the backend itself (ops::argmax_rows).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/random.hpp"

namespace moet {

/// Decoding settings: greedy when temperature is 0, else temperature and nucleus (top-p) sampling.
struct SamplingOptions {
  int max_new_tokens = 16;
  double temperature = 0.0;
  double top_p = 1.0;
  std::uint64_t seed = 0;
  int eos = -1;  ///< stop after emitting this token; -1: never
};

/// Greedy when temperature is 0; else softmax(logits / temperature) cut to the top-p nucleus.
/// Logits that are not finite numbers (NaN from a NaN weight) are refused by name: no order
/// exists among them to pick from. +inf is a certain token; -inf an impossible one.
///
/// The nucleus is the shortest run of tokens, taken by falling probability (equal ones by
/// rising id, so the order is the same with every standard library), whose mass reaches top_p;
/// u ~ U(0, its mass) walks it in that order. Only the nucleus is sorted: a partial sort of the
/// 256 likeliest tokens, doubled while the mass falls short, so a peaked distribution costs
/// O(V) instead of a sort of the whole vocabulary. top_p = 1 keeps every token and walks them in
/// id order without sorting.
inline int sample_token(const std::vector<double>& logits, const SamplingOptions& s, Rng& rng) {
  const std::size_t V = logits.size();
  if (V == 0) throw value_error("sample_token: no logits to sample from");
  for (std::size_t i = 0; i < V; ++i)
    if (std::isnan(logits[i]))
      throw value_error(detail::concat("sample_token: logit ", i, " of ", V, " is NaN (a non-finite weight or input?); "
                                       "cannot choose a token"));
  const std::size_t best = std::size_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  if (s.temperature == 0 || std::isinf(logits[best])) return int(best);
  if (logits[best] == -INFINITY) throw value_error("sample_token: every logit is -inf; cannot choose a token");
  // Scratch kept per thread between calls: a vocabulary's worth of fresh pages per token cost
  // more than the arithmetic (page faults and zeroing, measured at 2.7 ms against 0.3 ms).
  thread_local std::vector<double> p;
  thread_local std::vector<std::size_t> order;
  p.resize(V);
  order.resize(V);
  const double m = logits[best];
  double sum = 0;
  for (std::size_t i = 0; i < V; ++i) sum += p[i] = std::exp((logits[i] - m) / s.temperature);
  std::iota(order.begin(), order.end(), std::size_t(0));
  double kept = sum;
  std::size_t n = V;
  if (s.top_p < 1) {
    const auto likelier = [&](std::size_t a, std::size_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); };
    const double target = s.top_p * sum;
    kept = 0;
    n = 0;
    std::size_t sorted = 0;
    while (kept < target && n < V) {
      if (n == sorted) {  // the next run of the order: everything past `sorted` is no likelier
        const std::size_t next = std::min(V, std::max<std::size_t>(256, 2 * sorted));
        std::partial_sort(order.begin() + std::ptrdiff_t(sorted), order.begin() + std::ptrdiff_t(next), order.end(), likelier);
        sorted = next;
      }
      kept += p[order[n++]];
    }
  }
  double u = rng.uniform() * kept;
  std::size_t last = order[0];  // u can outlast the walk by rounding: then the last possible token
  for (std::size_t i = 0; i < n; ++i) {
    const double pi = p[order[i]];
    u -= pi;
    if (u < 0) return int(order[i]);
    if (pi > 0) last = order[i];
  }
  return int(last);
}

/// The settings and prompt a generation needs: a non-empty prompt, max_new_tokens >= 0,
/// temperature >= 0 and 0 < top_p <= 1.
inline void check_sampling(const std::string& who, const std::vector<int>& prompt, const SamplingOptions& s) {
  if (prompt.empty()) throw value_error(who + ": generate needs a non-empty prompt");
  if (s.max_new_tokens < 0) throw value_error(detail::concat(who, ": max_new_tokens must be >= 0, got ", s.max_new_tokens));
  if (!(s.temperature >= 0) || !std::isfinite(s.temperature) || !(s.top_p > 0 && s.top_p <= 1))
    throw value_error(detail::concat(who, ": sampling needs temperature >= 0 and 0 < top_p <= 1, got temperature=",
                                     s.temperature, " top_p=", s.top_p));
}

/// The next token of each sequence from rows first, first + step, ... of a backend's logits (one
/// Rng per sequence; a sequence whose `active` flag is 0 is skipped and gets 0). The rows leave
/// the device at once: greedy picks are made where the logits live (Ops::argmax_rows: one int
/// per row crosses, not a row of the vocabulary), sampling reads the rows in one copy; a row
/// holding a NaN goes through sample_token, which refuses it by name.
template <class Ops, class Logits>
std::vector<int> next_tokens(const Logits& logits, Index first, Index step, const SamplingOptions& s, std::vector<Rng>& rngs,
                             const std::vector<unsigned char>& active = {}) {
  const Index count = Index(rngs.size());
  std::vector<int> picks, out(rngs.size(), 0);
  std::vector<std::vector<double>> rows;
  if (s.temperature == 0) picks = Ops::argmax_rows(logits, first, step, count);
  else rows = Ops::rows_to_host(logits, first, step, count);
  for (std::size_t b = 0; b < rngs.size(); ++b) {
    if (!active.empty() && !active[b]) continue;
    out[b] = s.temperature == 0 && picks[b] >= 0
                 ? picks[b]
                 : sample_token(rows.empty() ? Ops::row_to_host(logits, first + Index(b) * step) : rows[b], s, rngs[b]);
  }
  return out;
}

/// The decoding loop shared by models: step(ids) feeds ids after what came before and returns
/// their logits (the backend's tensor); each last row picks the next token (next_tokens).
template <class Ops, class Step>
std::vector<int> sample_loop(const std::string& who, const std::vector<int>& prompt, const SamplingOptions& s, Step&& step) {
  check_sampling(who, prompt, s);
  std::vector<Rng> rng{Rng(s.seed)};
  auto logits = step(prompt);
  std::vector<int> out;
  for (int i = 0; i < s.max_new_tokens; ++i) {
    const int next = next_tokens<Ops>(logits, Ops::shape(logits).first - 1, 1, s, rng)[0];
    out.push_back(next);
    if (next == s.eos || i + 1 == s.max_new_tokens) break;
    logits = step(std::vector<int>{next});
  }
  return out;
}

}  // namespace moet
