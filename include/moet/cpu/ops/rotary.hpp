// Rotary position embeddings (Llama; Hugging Face's rotate-half layout): for each head, with
// x = [x1 | x2] split in halves and angle a_i = position * theta^(-2i / head_dim),
//   y1 = x1 cos a - x2 sin a,   y2 = x2 cos a + x1 sin a.
// A rotation: backward applies its transpose (the angle negated). The frequencies come from
// core/rope.hpp, with Hugging Face's rope_scaling types; dynamic NTK scaling depends on the
// largest position of each call, as in Hugging Face.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../../core/backend.hpp"
#include "../../core/error.hpp"
#include "../../core/param.hpp"
#include "../../core/rope.hpp"
#include "../../core/util.hpp"

namespace moet::cpu_impl {

template <class T>
class Rotary {
 public:
  using Scalar = T;
  using Context = OutputContext<T>;
  static std::string name() { return "Rotary"; }

  Rotary(Index heads, Index head_dim, double theta, const RopeScaling& scaling = {})
      : heads_(heads), head_dim_(head_dim), theta_(theta), scaling_(scaling) {
    detail::expect_positive(name(), "heads", heads);
    detail::expect_positive(name(), "head_dim", head_dim);
    if (head_dim % 2) throw value_error(detail::concat(name(), ": head_dim must be even, got ", head_dim));
    if (!(theta > 1) || !std::isfinite(theta)) throw value_error(detail::concat(name(), ": rope theta must be > 1, got ", theta));
    if (scaling.type != RopeScaling::Type::none && (!(scaling.factor >= 1) || !std::isfinite(scaling.factor)))
      throw value_error(detail::concat(name(), ": rope scaling factor must be >= 1, got ", scaling.factor));
    if ((scaling.type == RopeScaling::Type::dynamic || scaling.type == RopeScaling::Type::llama3) &&
        scaling.original_max_positions <= 0)
      throw value_error(detail::concat(name(), ": dynamic and llama3 rope scaling need the original context length, got ",
                                       scaling.original_max_positions));
    if (scaling.type == RopeScaling::Type::llama3 && !(scaling.high_freq_factor > scaling.low_freq_factor))
      throw value_error(detail::concat(name(), ": llama3 rope scaling needs high_freq_factor > low_freq_factor, got ",
                                       scaling.high_freq_factor, " and ", scaling.low_freq_factor));
    if (!scaling.depends_on_length()) inv_freq_ = rope_inverse_frequencies(head_dim, theta, scaling);
  }

  Rotary(CpuDevice, Index heads, Index head_dim, double theta, const RopeScaling& scaling = {})
      : Rotary(heads, head_dim, theta, scaling) {}

  /// x: (tokens, heads * head_dim); positions: one per token.
  Context forward(In<T> x, const std::vector<Index>& positions) const {
    Context c;
    c.y.resize(x.rows(), x.cols());
    rotate(x, positions, c.y, +1);
    return c;
  }
  Matrix<T> backward(const Context&, In<T> x, const std::vector<Index>& positions, In<T> dy, GradMode) const {
    Matrix<T> dx(dy.rows(), dy.cols());
    rotate(dy, positions, dx, -1);
    return dx;
  }

 private:
  void rotate(In<T> x, const std::vector<Index>& positions, Matrix<T>& out, int sign) const {
    detail::expect_cols(name(), "input", x.rows(), x.cols(), heads_ * head_dim_, "tokens x heads*head_dim");
    if (Index(positions.size()) != x.rows())
      throw shape_error(detail::concat(name(), ": ", x.rows(), " tokens but ", positions.size(), " positions"));
    const Index half = head_dim_ / 2;
    std::vector<double> scaled;
    if (scaling_.depends_on_length()) {
      Index length = 0;
      for (Index p : positions) length = std::max(length, p + 1);
      scaled = rope_inverse_frequencies(head_dim_, theta_, scaling_, length);
    }
    const std::vector<double>& inv_freq = scaling_.depends_on_length() ? scaled : inv_freq_;
    MOET_OMP(omp parallel for schedule(static) if (x.size() > 65536))
    for (Index t = 0; t < x.rows(); ++t)
      for (Index i = 0; i < half; ++i) {
        const double angle = double(positions[t]) * inv_freq[std::size_t(i)];
        const T cs = T(std::cos(angle)), sn = T(sign * std::sin(angle));
        for (Index h = 0; h < heads_; ++h) {
          const Index a = h * head_dim_ + i, b = a + half;
          const T x1 = x(t, a), x2 = x(t, b);
          out(t, a) = x1 * cs - x2 * sn;
          out(t, b) = x2 * cs + x1 * sn;
        }
      }
  }

  Index heads_, head_dim_;
  double theta_;
  RopeScaling scaling_;
  std::vector<double> inv_freq_;  // empty with dynamic scaling: made per call
};

}  // namespace moet::cpu_impl
