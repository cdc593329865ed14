// Routing state of the CUDA layers: the device buffers a router's forward leaves for its
// backward (float32 probabilities, gates, top-k ids, log-sum-exp) and the routing statistics from
// which the auxiliary losses are formed. As on the CPU, nothing else is kept. Reading the
// auxiliary losses or the usage copies 2E + 1 numbers to the host (and so waits for the stream).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/shapes.hpp"
#include "../router.hpp"
#include "buffer.hpp"
#include "kernels.hpp"

namespace moet::cuda_impl {

struct DeviceRouting {
  RouterOptions options;
  std::int64_t rows = 0;
  int experts = 0, k = 0;
  bool renorm = true;
  DeviceMatrix<float> probs;     // (rows, E)
  DeviceMatrix<float> gates;     // (rows, E)
  DeviceMatrix<int> selected;    // (rows, K)
  DeviceMatrix<float> lse;       // (rows, 1)
  DeviceMatrix<double> stats;    // (1, 2E + 1): slots per expert, probability sums, sum of lse^2
  DeviceMatrix<double> partials;  // (routing_blocks(rows), 2E + 1): each block's share, summed in block order
  DeviceMatrix<unsigned char> counted;  // (tokens) the RowMask's flags; empty: every row counts
  int groups = 1;                       // routing rows per token
  std::int64_t counted_rows = 0;
  cudaStream_t stream = nullptr;

  /// `mask` flags the token rows that count for the aux losses; routing row r belongs to token
  /// r / groups (per-head IA3 routes `groups` rows per token).
  template <class Policy>
  static DeviceRouting start(std::int64_t rows, int experts, const RouterOptions& options, cudaStream_t stream, RowMask mask = {},
                             int groups = 1) {
    DeviceRouting r;
    r.groups = groups;
    r.counted_rows = rows;
    if (!mask.all()) {
      if (mask.rows * groups != rows)
        throw shape_error(detail::concat("router: the row mask has ", mask.rows, " flags for ", rows / groups, " tokens"));
      std::vector<unsigned char> flags(mask.flags, mask.flags + mask.rows);
      r.counted_rows = 0;
      for (unsigned char f : flags) r.counted_rows += f ? groups : 0;
      r.counted = DeviceMatrix<unsigned char>(mask.rows, 1, stream);
      if (mask.rows > 0)
        MOET_CUDA_CHECK(cudaMemcpyAsync(r.counted.data(), flags.data(), flags.size(), cudaMemcpyHostToDevice, stream));
    }
    r.options = options;
    r.rows = rows;
    r.experts = experts;
    r.k = Policy::k;
    r.renorm = Policy::renorm == Renorm::on;
    r.stream = stream;
    r.probs = DeviceMatrix<float>(rows, experts, stream);
    r.gates = DeviceMatrix<float>(rows, experts, stream);
    r.selected = DeviceMatrix<int>(rows, Policy::k, stream);
    r.lse = DeviceMatrix<float>(rows, 1, stream);
    r.stats = DeviceMatrix<double>::zeros(1, 2 * experts + 1, stream);
    r.partials = DeviceMatrix<double>(routing_blocks(rows), 2 * experts + 1, stream);
    return r;
  }

  RoutingState state() const {
    RoutingState s;
    s.rows = rows;
    s.experts = experts;
    s.k = k;
    s.renorm = renorm;
    s.probs = const_cast<float*>(probs.data());
    s.gates = const_cast<float*>(gates.data());
    s.selected = const_cast<int*>(selected.data());
    s.lse = const_cast<float*>(lse.data());
    s.stats = const_cast<double*>(stats.data());
    s.partials = const_cast<double*>(partials.data());
    s.load_balance_weight = options.load_balance_weight;
    s.z_loss_weight = options.z_loss_weight;
    s.counted = counted.size() ? counted.data() : nullptr;
    s.groups = groups;
    s.counted_rows = counted_rows;
    return s;
  }

  /// Share of routing slots each expert received (f_i).
  std::vector<double> usage() const {
    std::vector<double> u;
    statistics(&u);
    return u;
  }

  /// The unweighted auxiliary losses, formed by the one formula both backends use (aux_losses).
  AuxLosses aux() const { return statistics(nullptr); }

  /// The losses from the device statistics (2E + 1 numbers copied to the host); usage: f.
  AuxLosses statistics(std::vector<double>* usage) const {
    if (rows == 0) return aux_losses(experts, k, {}, usage);
    const std::vector<double> s = download(stats.view(), stream);
    return aux_losses(experts, k, {s.data(), s.data() + experts, s[std::size_t(2 * experts)], double(counted_rows)}, usage);
  }

  double aux_loss() const {
    if (options.load_balance_weight == 0.0 && options.z_loss_weight == 0.0) return 0.0;
    const AuxLosses a = aux();
    return options.load_balance_weight * a.load_balance + options.z_loss_weight * a.z_loss;
  }

  /// *sum += aux_loss(), on the device: nothing is read back (a model pass sums its routers' aux
  /// losses this way and reads the total once).
  void add_aux_loss(double* sum) const {
    if (rows > 0) add_weighted_aux(state(), sum, stream);
  }
};

/// The part of every routed CUDA layer's context that reports on routing.
struct RoutedContext {
  DeviceRouting routing;

  double aux_loss() const { return routing.aux_loss(); }
  void add_aux_loss(double* sum) const { routing.add_aux_loss(sum); }
  AuxLosses aux() const { return routing.aux(); }
  std::vector<double> expert_usage() const { return routing.usage(); }
};

template <int E, class Policy>
constexpr void check_routing_limits() {
  static_assert(E <= max_experts, "the CUDA backend routes at most 256 experts per mixture");
  static_assert(Policy::k <= max_top_k, "the CUDA backend's top-k routing keeps at most 8 experts per token");
}

}  // namespace moet::cuda_impl
