// A user-defined expert: a bottleneck adapter (Houlsby et al. 2019) with a nonlinearity,
//   delta(x) = tanh(x W_down + b_down) W_up,   W_down: (d_in, H), W_up: (H, d_out), W_up = 0 at init
// It models moet::AdditiveExpert, so Mixture<Router<...>, Expert<Bottleneck<H>>, E> works, and
// the generic parameter visitor finds its parameters through BOOST_HANA_DEFINE_STRUCT.
#pragma once

#include <string>

#include <moet/moet.hpp>

template <int Hidden>
struct Bottleneck {
  struct Options {
    double init_stddev = 0.02;
  };

  static std::string name() { return "Bottleneck<" + std::to_string(Hidden) + ">"; }

  template <class T>
  struct instance {
    struct Context {
      moet::Matrix<T> hidden;  // (rows, H) tanh(x W_down + b_down)
      moet::Matrix<T> out;     // (rows, d_out)
      const moet::Matrix<T>& output() const { return out; }
    };

    BOOST_HANA_DEFINE_STRUCT(instance,
                             (moet::Param<T>, down),       // (d_in, H)
                             (moet::Param<T>, down_bias),  // (1, H)
                             (moet::Param<T>, up));        // (H, d_out)

    instance(moet::ExpertShape shape, const Options& options, moet::Rng& rng)
        : down("down", shape.d_in, Hidden), down_bias("down_bias", 1, Hidden), up("up", Hidden, shape.d_out) {
      rng.fill_normal(down.value(), 0.0, options.init_stddev);
    }

    Context forward(moet::In<T> x) const {
      Context c;
      c.hidden = ((x * down.value()).rowwise() + down_bias.value().row(0)).array().tanh().matrix();
      c.out.noalias() = c.hidden * up.value();
      return c;
    }

    moet::Matrix<T> backward(const Context& c, moet::In<T> x, moet::In<T> d_output, moet::GradMode mode) {
      moet::detail::assign_grad(up.grad(), c.hidden.transpose() * d_output, mode);
      const moet::Matrix<T> d_pre =
          ((d_output * up.value().transpose()).array() * (T(1) - c.hidden.array().square())).matrix();  // (rows, H)
      moet::detail::assign_grad(down.grad(), x.transpose() * d_pre, mode);
      moet::detail::assign_grad(down_bias.grad(), d_pre.colwise().sum(), mode);
      return d_pre * down.value().transpose();
    }
  };
};

static_assert(moet::AdditiveExpert<Bottleneck<4>>);
