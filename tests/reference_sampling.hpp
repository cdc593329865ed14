// Top-p sampling the plain way, as a reference: every token sorted by falling probability (equal
// ones by rising id), the nucleus walked in that order. sample_token must pick what this picks
// (test_model_api); moet_bench_model times sample_token against it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <numeric>
#include <vector>

#include <moet/model/sampling.hpp>

namespace moet::testing {

inline int whole_sort_sample(const std::vector<double>& logits, const SamplingOptions& s, Rng& rng) {
  const std::size_t V = logits.size();
  const double m = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(V);
  double sum = 0;
  for (std::size_t i = 0; i < V; ++i) sum += p[i] = std::exp((logits[i] - m) / s.temperature);
  std::vector<std::size_t> order(V);
  std::iota(order.begin(), order.end(), std::size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return p[a] > p[b]; });
  double kept = 0;
  std::size_t n = 0;
  while (n < V && kept < s.top_p * sum) kept += p[order[n++]];
  double u = rng.uniform() * kept;
  for (std::size_t i = 0; i < n; ++i)
    if ((u -= p[order[i]]) < 0) return int(order[i]);
  return int(order[n - 1]);
}

}  // namespace moet::testing
