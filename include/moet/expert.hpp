// Expert specs and the Expert concept.
//
// Two kinds of expert exist:
//  - additive experts map a token x (width d_in) to a correction delta(x) (width d_out) that a
//    mixture adds to a frozen linear layer: y = x W0 + b + sum_i g_i(x) delta_i(x). LoRA<R> is
//    one; any user type modelling `AdditiveExpert` is another (see examples/bottleneck_expert.hpp).
//  - IA3 is a scaling expert: a learned vector that multiplies an activation elementwise.
//
// An AdditiveExpert S provides
//   S::name()                     -> std::string, for messages
//   S::Options                    aggregate of runtime settings with defaults
//   S::instance<T>                one expert's parameters for scalar T (float, double):
//     instance(ExpertShape, const Options&, Rng&)
//     Context forward(In<T> x) const                    x: (rows, d_in)
//     Context::output() -> (rows, d_out)                the correction delta(x)
//     Matrix<T> backward(const Context&, In<T> x, In<T> d_output, GradMode)   returns dx
//   and declares its Param<T> members with BOOST_HANA_DEFINE_STRUCT, so the generic visitor
//   (parameter count, zero-grad, AdamW) finds them.
#pragma once

#include <cmath>
#include <concepts>
#include <string>
#include <type_traits>

#include <boost/hana/define_struct.hpp>

#include "core/error.hpp"
#include "core/param.hpp"
#include "core/random.hpp"
#include "core/tensor.hpp"

namespace moet {

struct ExpertShape {
  Index d_in = 0;
  Index d_out = 0;
};

template <class S, class T>
concept AdditiveExpertFor =
    requires { typename S::Options; typename S::template instance<T>; { S::name() } -> std::convertible_to<std::string>; } &&
    std::constructible_from<typename S::template instance<T>, ExpertShape, const typename S::Options&, Rng&> &&
    requires(typename S::template instance<T>& expert, const typename S::template instance<T>& const_expert,
             const typename S::template instance<T>::Context& context, In<T> x, In<T> d_output) {
      { const_expert.forward(x) } -> std::same_as<typename S::template instance<T>::Context>;
      { context.output() } -> std::convertible_to<In<T>>;
      { expert.backward(context, x, d_output, GradMode::accumulate) } -> std::same_as<Matrix<T>>;
    };

/// A type usable as an additive expert for both scalar types.
template <class S>
concept AdditiveExpert = AdditiveExpertFor<S, float> && AdditiveExpertFor<S, double>;

enum class LoraInit {
  normal,           ///< A ~ normal(0, init_stddev) (MoLoRA's choice)
  kaiming_uniform,  ///< A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's kaiming_uniform_(a=sqrt(5)))
};

/// Low-rank adapter: delta(x) = (alpha / R) x A B, A: (d_in, R), B: (R, d_out), B starts at 0.
template <int R>
struct LoRA {
  static_assert(R >= 1, "LoRA<R> needs rank R >= 1");
  static constexpr int rank = R;

  struct Options {
    double alpha = R;  ///< the update is scaled by alpha / R
    LoraInit init = LoraInit::normal;
    double init_stddev = 0.02;

    void validate(const std::string& layer) const {
      if (!std::isfinite(alpha))
        throw value_error(detail::concat(layer, ": LoRA alpha must be finite, got ", alpha));
      if (!(init_stddev >= 0.0) || !std::isfinite(init_stddev))
        throw value_error(detail::concat(layer, ": LoRA init_stddev must be finite and >= 0, got ", init_stddev));
    }
  };

  static std::string name() { return "LoRA<" + std::to_string(R) + ">"; }

  /// Fills A (d_in, cols) as Options say.
  template <class M>
  static void init_down(M&& a, const Options& options, Rng& rng) {
    if (options.init == LoraInit::normal) {
      rng.fill_normal(a, 0.0, options.init_stddev);
    } else {
      const double bound = 1.0 / std::sqrt(double(a.rows()));
      rng.fill_uniform(a, -bound, bound);
    }
  }

  /// One standalone adapter, modelling AdditiveExpert. Mixtures of LoRA experts do not use it:
  /// they store all experts side by side and fuse them (cpu/lora_mixture.hpp); this type is the
  /// unfused reference they are tested against, and a plain LoRA for custom compositions.
  template <class T>
  struct instance {
    struct Context {
      Matrix<T> down;  // (rows, R)  x A
      Matrix<T> out;   // (rows, d_out)
      const Matrix<T>& output() const { return out; }
    };

    BOOST_HANA_DEFINE_STRUCT(instance, (Param<T>, lora_down), (Param<T>, lora_up));
    T scale;

    instance(ExpertShape shape, const Options& options, Rng& rng)
        : lora_down("lora_down", shape.d_in, R), lora_up("lora_up", R, shape.d_out), scale(T(options.alpha / R)) {
      options.validate(name());
      init_down(lora_down.value(), options, rng);
    }

    Context forward(In<T> x) const {
      Context c;
      c.down.noalias() = x * lora_down.value();
      c.out.noalias() = (scale * c.down) * lora_up.value();
      return c;
    }

    Matrix<T> backward(const Context& c, In<T> x, In<T> d_output, GradMode mode) {
      detail::assign_grad(lora_up.grad(), (scale * c.down).transpose() * d_output, mode);
      const Matrix<T> d_down = scale * (d_output * lora_up.value().transpose());  // (rows, R)
      detail::assign_grad(lora_down.grad(), x.transpose() * d_down, mode);
      return d_down * lora_down.value().transpose();
    }
  };
};

/// (IA)^3 scaling expert: a vector l (init ones) that scales an activation elementwise.
struct IA3 {
  struct Options {
    Index heads = 1;         ///< >1: per-head routing and per-head vectors (keys, values)
    Index router_width = 0;  ///< 0: the router reads the scaled activation itself; else the width of the caller's router input
    double init_stddev = 0;  ///< noise added to the initial ones (0: the mixture starts as the identity)

    /// Checks the options for an activation of `width` columns (every backend's IA3 mixture).
    void validate(const std::string& layer, Index width) const {
      detail::expect_positive(layer, "width", width);
      detail::expect_positive(layer, "heads", heads);
      if (width % heads != 0) throw value_error(detail::concat(layer, ": width ", width, " is not a multiple of heads ", heads));
      if (router_width < 0) throw value_error(detail::concat(layer, ": router_width must be >= 0, got ", router_width));
      if (!(init_stddev >= 0.0))
        throw value_error(detail::concat(layer, ": init_stddev must be finite and >= 0, got ", init_stddev));
    }
  };
  static std::string name() { return "IA3"; }
};

namespace detail {
template <class S>
inline constexpr bool is_scaling_expert = std::is_same_v<S, IA3>;
template <class S>
struct is_lora : std::false_type {};
template <int R>
struct is_lora<LoRA<R>> : std::true_type {};
}

/// Wraps an expert spec; checked once here so that a wrong type gives one message.
template <class S>
struct Expert {
  static_assert(detail::is_scaling_expert<S> || AdditiveExpert<S>,
                "moet::Expert<S>: S does not model moet::AdditiveExpert. It needs S::name(), S::Options, and "
                "S::instance<T> constructible from (ExpertShape, const Options&, Rng&) with "
                "Context forward(In<T>) const, Context::output(), and "
                "Matrix<T> backward(const Context&, In<T> x, In<T> d_output, GradMode). See docs/concepts.md.");
  using spec = S;
  static std::string name() { return "Expert<" + S::name() + ">"; }
};

namespace detail {
template <class X>
struct is_expert : std::false_type {};
template <class S>
struct is_expert<Expert<S>> : std::true_type {};
}  // namespace detail

}  // namespace moet
