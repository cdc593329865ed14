// Rotary frequencies, shared by every backend's rotary op: theta^(-2i / head_dim) for the
// head_dim / 2 pairs, stretched as Hugging Face's rope_scaling types do (modeling_rope_utils):
//   linear    every frequency / factor
//   dynamic   NTK: theta' = theta (factor s / max - (factor - 1))^(d / (d - 2)) once a forward
//             reaches s > max positions (s = its largest position + 1); unchanged below
//   llama3    long wavelengths (> original / low_freq_factor) / factor, short ones (<
//             original / high_freq_factor) kept, the band between interpolated smoothly
// None of these scale the attention logits (yarn and longrope do, and are refused by name).
#pragma once

#include <algorithm>
#include <cmath>
#include <numbers>
#include <vector>

#include "tensor.hpp"

namespace moet {

struct RopeScaling {
  enum class Type { none, linear, dynamic, llama3 };
  Type type = Type::none;
  double factor = 1.0;
  double low_freq_factor = 1.0;      ///< llama3
  double high_freq_factor = 4.0;     ///< llama3
  Index original_max_positions = 0;  ///< llama3: original_max_position_embeddings; dynamic: max_position_embeddings

  /// Whether the frequencies depend on the positions of a forward (dynamic NTK).
  bool depends_on_length() const { return type == Type::dynamic; }
};

/// The head_dim / 2 inverse frequencies of rotary embeddings; `length` (dynamic only) is the
/// largest position of the forward plus one.
inline std::vector<double> rope_inverse_frequencies(Index head_dim, double theta, const RopeScaling& scaling,
                                                    Index length = 0) {
  const Index half = head_dim / 2;
  double base = theta;
  if (scaling.type == RopeScaling::Type::dynamic) {
    const double max = double(scaling.original_max_positions);
    const double s = std::max(double(length), max);
    base = theta * std::pow(scaling.factor * s / max - (scaling.factor - 1.0), double(head_dim) / double(head_dim - 2));
  }
  std::vector<double> inv(static_cast<std::size_t>(half));
  for (Index i = 0; i < half; ++i) inv[std::size_t(i)] = std::pow(base, -2.0 * double(i) / double(head_dim));
  if (scaling.type == RopeScaling::Type::linear) {
    for (double& f : inv) f /= scaling.factor;
  } else if (scaling.type == RopeScaling::Type::llama3) {
    const double old_len = double(scaling.original_max_positions);
    const double low_wavelen = old_len / scaling.low_freq_factor, high_wavelen = old_len / scaling.high_freq_factor;
    for (double& f : inv) {
      const double wavelen = 2.0 * std::numbers::pi / f;
      if (wavelen > low_wavelen) {
        f /= scaling.factor;
      } else if (!(wavelen < high_wavelen)) {  // the band between: interpolate
        const double smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor);
        f = (1.0 - smooth) * f / scaling.factor + smooth * f;
      }
    }
  }
  return inv;
}

}  // namespace moet
