// Compose<Anchor, Augment, CrossAttention<H>, Placement>: CALM (Bansal et al. 2024). Frozen
// decoders, an anchor m_B and one or more augmenting models m_A, joined by trained composition
// layers: the output of m_A's layer i is projected to m_B's width and read by cross-attention
// from m_B's stream after its layer j, and the result is added back to that stream (feeding
// layer j + 1).
//
//   using Composed = moet::Compose<moet::Decoder<moet::Llama>, moet::Decoder<moet::GPT2>,
//                                  moet::CrossAttention<>, moet::Every<4>>;
//   Composed::model<float> calm(anchor_config, augment_config, rng);
//
// Several augmenting models: Augments<A1, A2, ...>, each of its own width and depth, each placed
// by the Compose's placement or its own (Placed<A, Every<2>>); the configs come as a list:
//   using Three = moet::Compose<moet::Decoder<moet::Llama>,
//                               moet::Augments<moet::Decoder<moet::GPT2>, moet::Placed<moet::Decoder<moet::Llama>, moet::Every<2>>>>;
//   Three::model<float> calm(anchor_config, {gpt2_config, llama_config}, rng);
// Compositions that write after the same anchor layer apply in the order the augments are listed.
//
// Every<K>: a composition layer after every K-th anchor layer (n = N_B / K of them), reading
// m_A's layers spaced N_A / n apart: pair k is (i, j) = ((k+1) N_A/n - 1, (k+1) K - 1).
// FromOptions: the (i, j) pairs are given at run time in ComposeOptions::pairs; layer -1 names
// a model's embeddings (i = -1: m_A's token embeddings are read; j = -1: the composition writes
// into m_B's embedding stream, before its first block).
// CrossAttention<H>: H heads (0: as many as the anchor has).
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.hpp"
#include "core/error.hpp"
#include "core/tensor.hpp"
#include "model.hpp"

namespace moet {

template <int Heads = 0>
struct CrossAttention {
  static_assert(Heads >= 0, "moet::CrossAttention<H>: H >= 0 (0: the anchor's head count)");
  static constexpr int heads = Heads;
};

template <int K>
struct Every {
  static_assert(K >= 1, "moet::Every<K>: K >= 1");
  static constexpr int spacing = K;
};

struct FromOptions {};

/// An augmenting model with a placement of its own (in Augments<...>).
template <class Model, class Placement>
struct Placed {
  using model = Model;
  using placement = Placement;
};

/// Several augmenting models, composed into one anchor.
template <class... Models>
struct Augments {
  static_assert(sizeof...(Models) >= 1, "moet::Augments<...> needs at least one augmenting model");
};

struct ComposeOptions {
  std::vector<std::pair<Index, Index>> pairs;  ///< (augment layer i, anchor layer j), -1: embeddings; FromOptions
  /// FromOptions with several augmenting models: pairs of augment m (empty, or shorter than the
  /// number of augments: `pairs` for the rest).
  std::vector<std::vector<std::pair<Index, Index>>> augment_pairs;
  double init_stddev = 0.02;                   ///< projections and W_q, W_k, W_v; W_O starts at zero
  /// Rotary positions in the cross-attention (0: none, the paper's plain attention). Queries are
  /// rotated by the anchor's positions and keys by the augmenting model's, so a score depends on
  /// their distance: an anchor with rotary embeddings keeps no absolute position in its stream,
  /// and without this anchor position t cannot tell augmenting position t from earlier ones.
  double rotary_theta = 0.0;
};

/// Where a composition layer's queries and keys sit: B sequences of L_B anchor positions read
/// L_A augmenting positions; anchor position t reads augmenting positions <= t (the last L_B of
/// the L_A when they differ, as when decoding) whose token is real. Positions (each token's, in
/// its sequence) matter only to rotary cross-attention. Made once per batch and shared by the
/// contexts of every composition layer of a forward.
struct CrossAttentionGeometry {
  Index batch = 0, anchor_seq = 0, augment_seq = 0;
  std::vector<unsigned char> valid;          ///< (B * L_A) the augmenting tokens: 1 real, 0 padding
  std::vector<Index> anchor_positions;       ///< (B * L_B)
  std::vector<Index> augment_positions;      ///< (B * L_A)

  /// Checks the sizes and fills what is left empty: valid with ones, positions with 0, 1, ...
  static std::shared_ptr<const CrossAttentionGeometry> make(Index batch, Index anchor_seq, Index augment_seq,
                                                            std::vector<unsigned char> valid = {},
                                                            std::vector<Index> anchor_positions = {},
                                                            std::vector<Index> augment_positions = {}) {
    const std::string who = "CrossAttentionGeometry";
    detail::expect_positive(who, "batch", batch);
    detail::expect_positive(who, "anchor positions per sequence", anchor_seq);
    detail::expect_positive(who, "augmenting positions per sequence", augment_seq);
    auto g = std::make_shared<CrossAttentionGeometry>();
    g->batch = batch, g->anchor_seq = anchor_seq, g->augment_seq = augment_seq;
    g->valid = valid.empty() ? std::vector<unsigned char>(std::size_t(batch * augment_seq), 1) : std::move(valid);
    if (Index(g->valid.size()) != batch * augment_seq)
      throw shape_error(detail::concat(who, ": ", g->valid.size(), " padding flags for ", batch, " x ", augment_seq,
                                       " augmenting tokens"));
    auto positions = [&](std::vector<Index> p, Index seq, const char* model) {
      if (p.empty()) {
        p.resize(std::size_t(batch * seq));
        for (Index i = 0; i < batch * seq; ++i) p[std::size_t(i)] = i % seq;
      }
      if (Index(p.size()) != batch * seq)
        throw shape_error(detail::concat(who, ": ", p.size(), " ", model, " positions for ", batch, " x ", seq, " tokens"));
      return p;
    };
    g->anchor_positions = positions(std::move(anchor_positions), anchor_seq, "anchor");
    g->augment_positions = positions(std::move(augment_positions), augment_seq, "augmenting");
    return g;
  }
};

namespace detail {
template <class D>
struct is_plain_decoder : std::false_type {};
template <class Arch>
struct is_plain_decoder<Decoder<Arch, Slots<>>> : std::true_type {};
template <class X>
struct is_cross_attention : std::false_type {};
template <int H>
struct is_cross_attention<CrossAttention<H>> : std::true_type {};
template <class P>
struct is_placement : std::false_type {};
template <int K>
struct is_placement<Every<K>> : std::true_type {};
template <>
struct is_placement<FromOptions> : std::true_type {};

/// One augmenting model and its placement.
template <class Model, class Placement>
struct augment_entry {
  static_assert(is_plain_decoder<Model>::value,
                "moet::Compose: augmenting models are frozen decoders without slots, e.g. moet::Decoder<moet::GPT2>; "
                "the trained parameters are the composition layers'");
  static_assert(is_placement<Placement>::value, "moet::Placed<Model, P>: P is moet::Every<K> or moet::FromOptions");
  using model = Model;
  using placement = Placement;
};
template <class A, class Default>
struct entry_of {
  using type = augment_entry<A, Default>;
};
template <class M, class P, class Default>
struct entry_of<Placed<M, P>, Default> {
  using type = augment_entry<M, P>;
};
/// The augmenting models of a Compose as a list of entries (one model, or Augments<...>).
template <class A, class Default>
struct augment_list {
  using type = type_list<typename entry_of<A, Default>::type>;
};
template <class... A, class Default>
struct augment_list<Augments<A...>, Default> {
  using type = type_list<typename entry_of<A, Default>::type...>;
};
template <class... E>
std::string augment_names(type_list<E...>) {
  std::string s;
  ((s += (s.empty() ? "" : ", ") + E::model::name()), ...);
  return s;
}
}  // namespace detail

template <class Anchor, class Augment, class XAttn = CrossAttention<>, class Placement = Every<4>>
struct Compose {
  static_assert(detail::is_plain_decoder<Anchor>::value,
                "moet::Compose<Anchor, Augment, ...>: the anchor is a frozen decoder without slots, "
                "e.g. moet::Decoder<moet::Llama>; the trained parameters are the composition layers'");
  static_assert(detail::is_cross_attention<XAttn>::value, "moet::Compose: the third argument is moet::CrossAttention<H>");
  static_assert(detail::is_placement<Placement>::value, "moet::Compose: the placement is moet::Every<K> or moet::FromOptions");
  using anchor = Anchor;
  /// type_list of entries, each with ::model (a Decoder) and ::placement.
  using augments = typename detail::augment_list<Augment, Placement>::type;
  using cross_attention = XAttn;
  using placement = Placement;

  static std::string name() { return "Compose<" + Anchor::name() + ", " + detail::augment_names(augments{}) + ">"; }

  template <class T, class Backend = cpu>
  using model = layer<Compose, T, Backend>;
};

}  // namespace moet
