// The slots of a decoder block as data. A slot tag (q, k, ..., ffn_hidden) names where an adapter
// may sit; a Decoder's Slots<at<...>...> may place one or several mixtures in a slot (on
// disjoint layer lists), so a block's slot holds one of: the plain frozen op, or the mixture of
// whichever entry names this layer. A block keeps its ten slots in one tuple, visited by
// for_each_slot; nothing below spells a slot out by hand.
//
//   LinearSlot  the frozen projection alone, or the additive mixture that wraps it
//   ScaleSlot   the identity, or an IA3 mixture that scales the activation (routed on a
//               separate input: the normalised block input or residual, as in MoV)
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>

#include <boost/hana/define_struct.hpp>

#include "../core/error.hpp"
#include "../core/random.hpp"
#include "../core/shapes.hpp"
#include "../model.hpp"

namespace moet {

namespace model_impl {

/// Calls f(I) for the index I of the variant's active alternative, as a compile-time constant.
template <std::size_t N, class F>
decltype(auto) with_index(std::size_t index, F&& f) {
  return [&]<std::size_t... I>(std::index_sequence<I...>) -> decltype(f(std::integral_constant<std::size_t, 0>{})) {
    using R = decltype(f(std::integral_constant<std::size_t, 0>{}));
    if constexpr (std::is_void_v<R>) {
      (void)((index == I ? (f(std::integral_constant<std::size_t, I>{}), true) : false) || ...);
    } else {
      std::optional<R> result;
      (void)((index == I ? (result.emplace(f(std::integral_constant<std::size_t, I>{})), true) : false) || ...);
      return std::move(*result);
    }
  }(std::make_index_sequence<N>{});
}

/// A mixture's options: the model-wide ones, then the entry's own (at<..., Configure>). IA3
/// routers read the d_model-wide block input.
template <class Entry>
auto slot_options(const ModelOptions& o, Index d_model) {
  using S = typename detail::mixture_traits<typename Entry::spec>::expert;
  MixtureOptions<S> m;
  m.router = o.router;
  m.dispatch = o.dispatch;
  if constexpr (detail::is_scaling_expert<S>) {
    m.expert.heads = 1;
    m.expert.router_width = d_model;
    m.expert.init_stddev = o.ia3_init_stddev;
  } else if constexpr (detail::is_lora<S>::value) {
    if (o.lora_alpha != 0) m.expert.alpha = o.lora_alpha;
    m.expert.init = o.lora_init;
    m.expert.init_stddev = o.lora_init_stddev;
  }
  Entry::configure::apply(m);
  return m;
}

template <class Context>
inline constexpr bool routed = requires(const Context& c) { c.routing; };

/// Adds a context's weighted auxiliary loss into the pass's sum, for routed layers only.
template <class Ops, class Context>
void add_aux(typename Ops::AuxSum& sum, const Context& c) {
  if constexpr (routed<Context>) Ops::add_aux(sum, c);
}

template <class Slot, class Entries, class T, class Backend>
class LinearSlot;

template <class Slot, class... E, class T, class Backend>
class LinearSlot<Slot, type_list<E...>, T, Backend> {
  using Ops = ops<Backend, T>;
  using View = typename Ops::View;
  using Tensor = typename Ops::Tensor;
  using Plain = layer<FrozenLinear, T, Backend>;
  using Layer = std::variant<Plain, layer<typename E::spec, T, Backend>...>;
  static constexpr std::size_t N = 1 + sizeof...(E);

 public:
  using slot = Slot;
  struct Context {
    std::variant<typename Plain::Context, typename layer<typename E::spec, T, Backend>::Context...> value;
    View output() const {
      return std::visit([](const auto& c) { return View(c.output()); }, value);
    }
  };

  /// The slot of layer `index`: the mixture of the entry that names this layer, else the plain
  /// projection; w (d_in, d_out: a host matrix or expression) and the optional bias (1, d_out)
  /// are the frozen weights.
  template <class W>
  LinearSlot(typename Ops::Device device, Index index, const Eigen::MatrixBase<W>& w, const typename Ops::HostMatrix* bias,
             Rng& rng, const ModelOptions& options, Index d_model)
      : layer_(make<0, W>(device, index, w, bias, rng, options, d_model)) {}
  LinearSlot(LinearSlot&&) noexcept = default;

  bool adapted() const { return layer_.index() != 0; }
  /// The spec of the mixture in this slot ("" when plain).
  std::string spec_name() const {
    static const std::string names[] = {std::string(), E::spec::name()...};
    return names[layer_.index()];
  }

  Context forward(View x, RowMask rows) const {
    return with_index<N>(layer_.index(), [&](auto i) {
      const auto& l = std::get<i()>(layer_);
      if constexpr (i() == 0) return Context{decltype(Context::value)(std::in_place_index<0>, l.forward(x))};
      else return Context{decltype(Context::value)(std::in_place_index<i()>, l.forward(x, rows))};
    });
  }

  Tensor backward(const Context& c, View x, View dy, GradMode mode) {
    check(c);
    return with_index<N>(layer_.index(), [&](auto i) -> Tensor {
      return std::get<i()>(layer_).backward(std::get<i()>(c.value), x, dy, mode);
    });
  }

  /// dst += backward(c, x, dy, mode) (an empty dst becomes it): a layer with its own
  /// backward_into accumulates in place (the frozen projection: in its GEMM), others add theirs.
  void backward_into(Tensor& dst, const Context& c, View x, View dy, GradMode mode) {
    check(c);
    with_index<N>(layer_.index(), [&](auto i) {
      auto& l = std::get<i()>(layer_);
      const auto& ctx = std::get<i()>(c.value);
      if constexpr (requires { l.backward_into(dst, ctx, x, dy, mode); }) l.backward_into(dst, ctx, x, dy, mode);
      else Ops::add_into(dst, l.backward(ctx, x, dy, mode));
    });
  }

  template <class Sum>
  static void add_aux(Sum& sum, const Context& c) {
    std::visit([&](const auto& ctx) { model_impl::add_aux<Ops>(sum, ctx); }, c.value);
  }

  /// Folds a plain LoRA (a one-expert mixture) into the frozen weight; false for other slots.
  bool merge_into_base(Rng& rng) {
    return std::visit(
        [&](auto& l) {
          if constexpr (requires { l.merge_into_base(rng); }) {
            l.merge_into_base(rng);
            return true;
          } else {
            return false;
          }
        },
        layer_);
  }

  /// The frozen W0 (d_in, d_out) and bias (1, d_out; empty without bias), for checkpoints.
  typename Ops::Frozen& weight() {
    return std::visit([](auto& l) -> typename Ops::Frozen& { return l.frozen_weight(); }, layer_);
  }
  typename Ops::Frozen& bias() {
    return std::visit([](auto& l) -> typename Ops::Frozen& { return l.frozen_bias(); }, layer_);
  }

 private:
  void check(const Context& c) const {
    if (c.value.index() != layer_.index())
      throw value_error(detail::concat("slot ", Slot::name, ": the context comes from a different slot"));
  }

  template <std::size_t I, class W>
  static Layer make(typename Ops::Device device, Index index, const Eigen::MatrixBase<W>& w,
                    const typename Ops::HostMatrix* bias, Rng& rng, const ModelOptions& o, Index d_model) {
    if constexpr (I == sizeof...(E)) {
      if (bias) return Layer(std::in_place_index<0>, device, w, *bias);
      return Layer(std::in_place_index<0>, device, w);
    } else {
      using Entry = std::tuple_element_t<I, std::tuple<E...>>;
      if (!Entry::where::contains(index)) return make<I + 1, W>(device, index, w, bias, rng, o, d_model);
      const auto options = slot_options<Entry>(o, d_model);
      if (bias) return Layer(std::in_place_index<I + 1>, device, w, *bias, rng, options);
      return Layer(std::in_place_index<I + 1>, device, w, rng, options);
    }
  }


 public:
  BOOST_HANA_DEFINE_STRUCT(LinearSlot, (Layer, layer_));
};

template <class Slot, class Entries, class T, class Backend>
class ScaleSlot;

template <class Slot, class... E, class T, class Backend>
class ScaleSlot<Slot, type_list<E...>, T, Backend> {
  using Ops = ops<Backend, T>;
  using View = typename Ops::View;
  using Tensor = typename Ops::Tensor;
  using Layer = std::variant<std::monostate, layer<typename E::spec, T, Backend>...>;
  static constexpr std::size_t N = 1 + sizeof...(E);

 public:
  using slot = Slot;
  struct Context {
    std::variant<std::monostate, typename layer<typename E::spec, T, Backend>::Context...> value;
  };

  ScaleSlot(typename Ops::Device device, Index index, Index width, Rng& rng, const ModelOptions& options, Index d_model)
      : layer_(make<0>(device, index, width, rng, options, d_model)) {}
  ScaleSlot(ScaleSlot&&) noexcept = default;

  bool adapted() const { return layer_.index() != 0; }
  std::string spec_name() const {
    static const std::string names[] = {std::string(), E::spec::name()...};
    return names[layer_.index()];
  }

  Context forward(View h, View router_input, RowMask rows) const {
    return with_index<N>(layer_.index(), [&](auto i) {
      if constexpr (i() == 0) return Context{};
      else return Context{decltype(Context::value)(std::in_place_index<i()>, std::get<i()>(layer_).forward(h, router_input, rows))};
    });
  }

  /// The scaled activation: h itself when the slot is empty.
  static View output(const Context& c, View h) {
    return std::visit(
        [&](const auto& ctx) -> View {
          if constexpr (std::is_same_v<std::decay_t<decltype(ctx)>, std::monostate>) return h;
          else return View(ctx.output());
        },
        c.value);
  }

  /// Returns dh; adds the router input's gradient into d_router (empty: set on first use).
  Tensor backward(const Context& c, View h, View router_input, Tensor&& dy, Tensor& d_router, GradMode mode) {
    if (c.value.index() != layer_.index())
      throw value_error(detail::concat("slot ", Slot::name, ": the context comes from a different slot"));
    return with_index<N>(layer_.index(), [&](auto i) -> Tensor {
      if constexpr (i() == 0) {
        return std::move(dy);
      } else {
        auto [dh, dr] = std::get<i()>(layer_).backward(std::get<i()>(c.value), h, router_input, dy, mode);
        Ops::add_into(d_router, std::move(dr));
        return std::move(dh);
      }
    });
  }

  template <class Sum>
  static void add_aux(Sum& sum, const Context& c) {
    std::visit(
        [&](const auto& ctx) {
          if constexpr (!std::is_same_v<std::decay_t<decltype(ctx)>, std::monostate>) model_impl::add_aux<Ops>(sum, ctx);
        },
        c.value);
  }

  bool merge_into_base(Rng&) { return false; }

 private:
  template <std::size_t I>
  static Layer make(typename Ops::Device device, Index index, Index width, Rng& rng, const ModelOptions& o, Index d_model) {
    if constexpr (I == sizeof...(E)) {
      return Layer(std::in_place_index<0>);
    } else {
      using Entry = std::tuple_element_t<I, std::tuple<E...>>;
      if (!Entry::where::contains(index)) return make<I + 1>(device, index, width, rng, o, d_model);
      return Layer(std::in_place_index<I + 1>, device, width, rng, slot_options<Entry>(o, d_model));
    }
  }


 public:
  BOOST_HANA_DEFINE_STRUCT(ScaleSlot, (Layer, layer_));
};

/// The slot holder of Slot in a block of decoder Spec.
template <class Slot, class Spec, class T, class Backend>
using slot_holder = std::conditional_t<Slot::linear, LinearSlot<Slot, typename Spec::template entries<Slot>, T, Backend>,
                                       ScaleSlot<Slot, typename Spec::template entries<Slot>, T, Backend>>;

template <class Order, class Spec, class T, class Backend>
struct slot_tuple;
template <class... S, class Spec, class T, class Backend>
struct slot_tuple<type_list<S...>, Spec, T, Backend> {
  using type = std::tuple<slot_holder<S, Spec, T, Backend>...>;
  using contexts = std::tuple<typename slot_holder<S, Spec, T, Backend>::Context...>;
};

template <class Slot, class... S>
constexpr std::size_t slot_index(type_list<S...>) {
  std::size_t i = 0, found = sizeof...(S);
  ((std::is_same_v<Slot, S> ? (found = i, ++i) : ++i), ...);
  return found;
}

}  // namespace model_impl
}  // namespace moet
