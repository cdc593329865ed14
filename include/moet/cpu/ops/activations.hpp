// Elementwise activations of the frozen MLPs:
//   GELU (tanh approximation, GPT-2):  y = x/2 (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   SwiGLU (Llama):                    y = silu(gate) * up,     silu(a) = a sigmoid(a)
//   and the other activation_function values of GPT-2 checkpoints, elementwise:
//   GELU (exact)  y = x/2 (1 + erf(x / sqrt 2)),  ReLU,  SiLU
#pragma once

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>
#include <utility>

#include "../../core/error.hpp"
#include "../../core/param.hpp"
#include "../../core/shapes.hpp"
#include "../../core/util.hpp"

namespace moet::cpu_impl {

template <class T>
struct GeluTanh {
  using Scalar = T;
  using Context = OutputContext<T>;
  static std::string name() { return "GeluTanh"; }
  static constexpr T k = T(0.7978845608028654);  // sqrt(2 / pi)
  static constexpr T c = T(0.044715);
  static constexpr Index block = 64;  // rows per task; Eigen's vectorised tanh inside

  Context forward(In<T> x) const {
    Context out;
    out.y.resize(x.rows(), x.cols());
    MOET_OMP(omp parallel for schedule(static) if (x.size() > 65536))
    for (Index r0 = 0; r0 < x.rows(); r0 += block) {
      const Index n = std::min(block, x.rows() - r0);
      const auto v = x.middleRows(r0, n).array();
      out.y.middleRows(r0, n).array() = T(0.5) * v * (T(1) + (k * (v + c * v.cube())).tanh());
    }
    return out;
  }
  Matrix<T> backward(const Context&, In<T> x, In<T> dy, GradMode) const {
    detail::expect_shape(name(), "output gradient dy", dy.rows(), dy.cols(), x.rows(), x.cols(), "the shape of x");
    Matrix<T> dx(x.rows(), x.cols());
    MOET_OMP(omp parallel for schedule(static) if (x.size() > 65536))
    for (Index r0 = 0; r0 < x.rows(); r0 += block) {
      const Index n = std::min(block, x.rows() - r0);
      const auto v = x.middleRows(r0, n).array();
      const Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> th = (k * (v + c * v.cube())).tanh();
      dx.middleRows(r0, n).array() =
          dy.middleRows(r0, n).array() * (T(0.5) * (T(1) + th) + T(0.5) * v * (T(1) - th.square()) * k * (T(1) + T(3) * c * v.square()));
    }
    return dx;
  }
};

/// y = f(x) elementwise for the activations without a block-vectorised path (exact GELU, ReLU,
/// SiLU); dy f'(x) backward.
template <class T>
struct Elementwise {
  Activation kind;

  static T value(Activation kind, T x) {
    switch (kind) {
      case Activation::gelu: return T(0.5) * x * (T(1) + std::erf(x * T(std::numbers::sqrt2 / 2)));
      case Activation::relu: return x > T(0) ? x : T(0);
      case Activation::silu: return x / (T(1) + std::exp(-x));
      case Activation::gelu_tanh: break;
    }
    throw value_error("Elementwise: gelu_tanh has its own op (GeluTanh)");
  }
  static T derivative(Activation kind, T x) {
    switch (kind) {
      case Activation::gelu: {
        const T cdf = T(0.5) * (T(1) + std::erf(x * T(std::numbers::sqrt2 / 2)));
        return cdf + x * std::exp(T(-0.5) * x * x) * T(std::numbers::inv_sqrtpi / std::numbers::sqrt2);
      }
      case Activation::relu: return x > T(0) ? T(1) : T(0);
      case Activation::silu: {
        const T s = T(1) / (T(1) + std::exp(-x));
        return s * (T(1) + x * (T(1) - s));
      }
      case Activation::gelu_tanh: break;
    }
    throw value_error("Elementwise: gelu_tanh has its own op (GeluTanh)");
  }

  Matrix<T> forward(In<T> x) const {
    return x.unaryExpr([k = kind](T v) { return value(k, v); });
  }
  Matrix<T> backward(In<T> x, In<T> dy) const {
    detail::expect_shape("Activation", "output gradient dy", dy.rows(), dy.cols(), x.rows(), x.cols(), "the shape of x");
    return x.binaryExpr(dy, [k = kind](T v, T d) { return d * derivative(k, v); });
  }
};

template <class T>
struct SwiGLU {
  using Scalar = T;
  using Context = OutputContext<T>;
  static std::string name() { return "SwiGLU"; }
  static T sigmoid(T a) { return T(1) / (T(1) + std::exp(-a)); }

  Context forward(In<T> gate, In<T> up) const {
    detail::expect_shape(name(), "up", up.rows(), up.cols(), gate.rows(), gate.cols(), "the shape of gate");
    Context c;
    c.y = gate.binaryExpr(up, [](T a, T b) { return a * sigmoid(a) * b; });
    return c;
  }
  /// Returns {d_gate, d_up}.
  std::pair<Matrix<T>, Matrix<T>> backward(const Context&, In<T> gate, In<T> up, In<T> dy, GradMode) const {
    detail::expect_shape(name(), "output gradient dy", dy.rows(), dy.cols(), gate.rows(), gate.cols(), "the shape of gate");
    Matrix<T> d_gate(gate.rows(), gate.cols()), d_up(gate.rows(), gate.cols());
    for (Index r = 0; r < gate.rows(); ++r)
      for (Index c = 0; c < gate.cols(); ++c) {
        const T a = gate(r, c), s = sigmoid(a);
        d_up(r, c) = dy(r, c) * a * s;
        d_gate(r, c) = dy(r, c) * up(r, c) * s * (T(1) + a * (T(1) - s));
      }
    return {std::move(d_gate), std::move(d_up)};
  }
};

}  // namespace moet::cpu_impl
