// Decoder<Arch, Slots<...>>: a frozen pretrained decoder-only transformer with adapters placed
// into named slots, declared as a type. The architecture and the slots are compile-time; widths,
// layer counts, heads and vocabulary come from the checkpoint's config.json at run time.
//
//   using namespace moet::slot;
//   using MoVModel = moet::Decoder<moet::GPT2, moet::Slots<moet::at<keys, moet::MoV<10>>,
//                                                          moet::at<values, moet::MoV<10>>,
//                                                          moet::at<ffn_hidden, moet::MoV<10>>>>;
//   MoVModel::model<float> model(config, rng);     // or moet::load_pretrained<MoVModel, float>(dir, rng)
//
// Linear slots (q, k, v, o, ffn_up, ffn_gate, ffn_down) take additive mixtures (LoRA or user
// experts; a plain LoRA is a one-expert mixture, moet::LoRAAdapter<R>); each wraps the frozen
// projection it replaces. Activation slots (keys, values, ffn_hidden) take IA3 mixtures that
// scale the projected keys and values and the MLP's hidden activation; their router reads the
// normalised block input (attention) or the normalised residual (MLP), as in MoV. A slot is
// placed on every layer, or on a list: at<q, Spec, layers<0, 3>>; it may appear several times
// with disjoint lists and different mixtures (per-layer mixtures), each with its own options.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include "core/backend.hpp"
#include "core/error.hpp"
#include "core/tensor.hpp"
#include "expert.hpp"
#include "mixture.hpp"
#include "router.hpp"

namespace moet {

/// Slot names. Linear slots replace a projection; activation slots scale an activation.
namespace slot {
#define MOET_SLOT(id, is_linear)                          \
  struct id {                                             \
    static constexpr const char* name = #id;              \
    static constexpr bool linear = is_linear;             \
  }
MOET_SLOT(q, true);
MOET_SLOT(k, true);
MOET_SLOT(v, true);
MOET_SLOT(o, true);
MOET_SLOT(ffn_up, true);
MOET_SLOT(ffn_gate, true);
MOET_SLOT(ffn_down, true);
MOET_SLOT(keys, false);
MOET_SLOT(values, false);
MOET_SLOT(ffn_hidden, false);
#undef MOET_SLOT
}  // namespace slot

/// Which layers a slot is placed on.
struct all_layers {
  static constexpr bool contains(Index) { return true; }
  static std::string name() { return "all"; }
};
template <int... I>
struct layers {
  static_assert(sizeof...(I) > 0, "moet::layers<...> needs at least one layer index");
  static_assert(((I >= 0) && ...), "moet::layers<...>: layer indices are >= 0");
  static constexpr bool contains(Index i) { return ((i == I) || ...); }
  static constexpr int max() {
    int m = 0;
    ((m = I > m ? I : m), ...);
    return m;
  }
  static std::string name() {
    std::string s;
    ((s += (s.empty() ? "" : ",") + std::to_string(I)), ...);
    return s;
  }
};

/// The options of a slot's mixture: the model-wide ones (ModelOptions) as they are. A slot
/// names its own with a type whose static apply(MixtureOptions<S>&) changes them after the
/// model-wide ones are filled in, e.g. for a user's expert type:
///   struct WideBottleneck { static void apply(moet::MixtureOptions<Bottleneck<16>>& o) { o.expert.init_stddev = 0.1; } };
///   at<q, Mixture<Router<Soft>, Expert<Bottleneck<16>>, 4>, all_layers, WideBottleneck>
struct model_options {
  template <class Options>
  static void apply(Options&) {}
};

namespace detail {
template <class M>
struct mixture_traits {
  static constexpr bool is_mixture = false;
  static constexpr bool scaling = false;
};
template <class R, class S, int E>
struct mixture_traits<Mixture<R, Expert<S>, E>> {
  static constexpr bool is_mixture = true;
  static constexpr bool scaling = is_scaling_expert<S>;
  using expert = S;
};
template <class L>
struct is_layer_list : std::false_type {};
template <>
struct is_layer_list<all_layers> : std::true_type {};
template <int... I>
struct is_layer_list<layers<I...>> : std::true_type {};

/// Whether two layer lists share a layer.
template <class A, class B>
struct layers_overlap : std::true_type {};  // all_layers overlaps everything
template <int... I, int... J>
struct layers_overlap<layers<I...>, layers<J...>> : std::bool_constant<((layers<J...>::contains(I)) || ...)> {};

template <class Configure, class Spec>
constexpr bool configures() {
  if constexpr (!mixture_traits<Spec>::is_mixture) return true;  // reported by its own message
  else return requires(MixtureOptions<typename mixture_traits<Spec>::expert>& o) { Configure::apply(o); };
}
}  // namespace detail

/// Places `Spec` (a Mixture<...>) into slot `Slot` of the layers in `Layers`, its options made
/// by `Configure` (see model_options). A slot may appear several times with disjoint layer
/// lists and different specs (per-layer mixtures, as MoLA): at<q, MoLoRA<2, 4>, layers<0, 1>>,
/// at<q, MoLoRA<8, 4>, layers<2, 3>>.
template <class Slot, class Spec, class Layers = all_layers, class Configure = model_options>
struct at {
  static_assert(detail::mixture_traits<Spec>::is_mixture, "moet::at<Slot, Spec>: Spec must be a moet::Mixture<...>");
  static_assert(!Slot::linear || !detail::mixture_traits<Spec>::scaling,
                "moet::at: linear slots (q, k, v, o, ffn_up, ffn_gate, ffn_down) take additive experts (LoRA or "
                "user experts), not IA3");
  static_assert(Slot::linear || detail::mixture_traits<Spec>::scaling,
                "moet::at: activation slots (keys, values, ffn_hidden) take IA3 mixtures");
  static_assert(detail::is_layer_list<Layers>::value, "moet::at: Layers must be moet::all_layers or moet::layers<...>");
  static_assert(detail::configures<Configure, Spec>(),
                "moet::at<Slot, Spec, Layers, Configure>: Configure needs a static apply(MixtureOptions<S>&) for the "
                "mixture's expert type S (see moet::model_options)");
  using slot = Slot;
  using spec = Spec;
  using where = Layers;
  using configure = Configure;
};

template <class... At>
struct Slots {};

/// Architectures. GPT-2: learned positions, pre-LayerNorm, fused qkv stored as Conv1D, GELU (tanh)
/// MLP, biases, tied embeddings. Llama: RMSNorm, rotary embeddings, grouped-query attention,
/// SwiGLU MLP, no biases, untied lm_head.
struct GPT2 {
  static constexpr const char* name = "gpt2";
  static constexpr bool llama = false;
};
struct Llama {
  static constexpr const char* name = "llama";
  static constexpr bool llama = true;
};

/// MoV and MoLoRA as in their paper (soft merging), and a plain LoRA (one expert).
template <int E>
using MoV = Mixture<Router<Soft>, Expert<IA3>, E>;
template <int E, int R>
using MoLoRA = Mixture<Router<Soft>, Expert<LoRA<R>>, E>;
template <int R>
using LoRAAdapter = Mixture<Router<Soft>, Expert<LoRA<R>>, 1>;

/// Runtime settings shared by every adapter of a model.
struct ModelOptions {
  RouterOptions router{};
  double lora_alpha = 0;  ///< 0: alpha = R (scale 1)
  LoraInit lora_init = LoraInit::normal;
  double lora_init_stddev = 0.02;
  double ia3_init_stddev = 0;  ///< 0: MoV starts as the identity
  Dispatch dispatch = Dispatch::automatic;
  bool recompute = false;  ///< keep only each block's input in forward; backward recomputes the block
};

/// How a model's frozen weights start (a model constructor's last argument):
///   a stddev (0.02 by default)   drawn normal(0, stddev) from the model's Rng;
///   0                            zeros; nothing is drawn;
///   FrozenInit::placeholder()    zeros, and the Rng advanced as if they had been drawn, so the
///                                adapters drawn after them get the values that a random model of
///                                the same seed has. load_pretrained builds its model so: the
///                                checkpoint replaces the weights, and drawing a 1B-parameter
///                                model on the host would take most of a minute.
struct FrozenInit {
  double stddev = 0.02;
  bool advance_rng = false;
  FrozenInit(double s = 0.02) : stddev(s) {  // NOLINT: a stddev is a FrozenInit
    if (!(s >= 0.0) || !std::isfinite(s))
      throw value_error(detail::concat("FrozenInit: the frozen weights' stddev must be finite and >= 0, got ", s));
  }
  static FrozenInit placeholder() {
    FrozenInit f(0.0);
    f.advance_rng = true;
    return f;
  }
};

/// A list of types.
template <class... X>
struct type_list {
  static constexpr std::size_t size = sizeof...(X);
};

namespace detail {
template <class Slot, class List, class... At>
struct entries_of;
template <class Slot, class... Found>
struct entries_of<Slot, type_list<Found...>> {
  using type = type_list<Found...>;
};
template <class Slot, class... Found, class First, class... Rest>
struct entries_of<Slot, type_list<Found...>, First, Rest...> {
  using type = typename std::conditional_t<std::is_same_v<typename First::slot, Slot>,
                                           entries_of<Slot, type_list<Found..., First>, Rest...>,
                                           entries_of<Slot, type_list<Found...>, Rest...>>::type;
};
template <class Slot, class... At>
inline constexpr int slot_count = (0 + ... + int(std::is_same_v<typename At::slot, Slot>));

/// Whether entries a and b put the same slot on a common layer.
template <class A, class B>
inline constexpr bool clash = std::is_same_v<typename A::slot, typename B::slot> &&
                              (layers_overlap<typename A::where, typename B::where>::value ||
                               layers_overlap<typename B::where, typename A::where>::value);
/// Number of pairs (a, b), a before b, that clash.
template <class... At>
struct clashes;
template <>
struct clashes<> : std::integral_constant<int, 0> {};
template <class First, class... Rest>
struct clashes<First, Rest...> : std::integral_constant<int, (0 + ... + int(clash<First, Rest>)) + clashes<Rest...>::value> {};
}  // namespace detail

template <class Arch, class SlotList = Slots<>>
struct Decoder;

template <class Arch, class... At>
struct Decoder<Arch, Slots<At...>> {
  static_assert(std::is_same_v<Arch, GPT2> || std::is_same_v<Arch, Llama>, "moet::Decoder<Arch, ...>: Arch is moet::GPT2 or moet::Llama");
  static_assert(detail::clashes<At...>::value == 0,
                "moet::Decoder: a slot appears twice in Slots<...> on a common layer; entries of one slot need disjoint "
                "layers<...> lists (all_layers overlaps every other entry)");
  static_assert(Arch::llama || detail::slot_count<slot::ffn_gate, At...> == 0, "moet::Decoder<GPT2>: GPT-2 has no ffn_gate slot");

  using arch = Arch;
  using slot_entries = type_list<At...>;
  /// The at<Slot, Spec, Layers, Configure> entries for Slot, in declaration order.
  template <class Slot>
  using entries = typename detail::entries_of<Slot, type_list<>, At...>::type;

  static std::string name() { return std::string("Decoder<") + Arch::name + ">"; }

  template <class T, class Backend = cpu>
  using model = layer<Decoder, T, Backend>;
};

}  // namespace moet
