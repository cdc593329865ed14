// Elementwise activations of the frozen MLPs:
//   GELU (tanh approximation, GPT-2):  y = x/2 (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   SwiGLU (Llama):                    y = silu(gate) * up,     silu(a) = a sigmoid(a)
#pragma once

#include <cmath>
#include <numbers>
#include <string>
#include <utility>

#include "../../core/error.hpp"
#include "../../core/param.hpp"
#include "../../core/util.hpp"

namespace moet::cpu_impl {

template <class T>
struct GeluTanh {
  using Scalar = T;
  using Context = OutputContext<T>;
  static std::string name() { return "GeluTanh"; }
  static constexpr T k = T(0.7978845608028654);  // sqrt(2 / pi)

  Context forward(In<T> x) const {
    Context c;
    c.y = x.unaryExpr([](T v) { return T(0.5) * v * (T(1) + std::tanh(k * (v + T(0.044715) * v * v * v))); });
    return c;
  }
  Matrix<T> backward(const Context& c, In<T> x, In<T> dy, GradMode) const {
    detail::expect_shape(name(), "output gradient dy", dy.rows(), dy.cols(), x.rows(), x.cols(), "the shape of x");
    return x.binaryExpr(dy, [](T v, T g) {
      const T th = std::tanh(k * (v + T(0.044715) * v * v * v));
      const T du = k * (T(1) + T(3 * 0.044715) * v * v);
      return g * (T(0.5) * (T(1) + th) + T(0.5) * v * (T(1) - th * th) * du);
    });
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
