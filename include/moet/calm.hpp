// Compose<Anchor, Augment, CrossAttention<H>, Placement>: CALM (Bansal et al. 2024). Two frozen
// decoders, an anchor m_B and an augmenting model m_A, joined by trained composition layers: the
// output of m_A's layer i is projected to m_B's width and read by cross-attention from m_B's
// stream after its layer j, and the result is added back to that stream (feeding layer j + 1).
//
//   using Composed = moet::Compose<moet::Decoder<moet::Llama>, moet::Decoder<moet::GPT2>,
//                                  moet::CrossAttention<>, moet::Every<4>>;
//   Composed::model<float> calm(anchor_config, augment_config, rng);
//
// Every<K>: a composition layer after every K-th anchor layer (n = N_B / K of them), reading
// m_A's layers spaced N_A / n apart: pair k is (i, j) = ((k+1) N_A/n - 1, (k+1) K - 1).
// FromOptions: the (i, j) pairs are given at run time in ComposeOptions::pairs; layer -1 names
// a model's embeddings (i = -1: m_A's token embeddings are read; j = -1: the composition writes
// into m_B's embedding stream, before its first block).
// CrossAttention<H>: H heads (0: as many as the anchor has).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "core/backend.hpp"
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

struct ComposeOptions {
  std::vector<std::pair<Index, Index>> pairs;  ///< (augment layer i, anchor layer j), -1: embeddings; FromOptions
  double init_stddev = 0.02;                   ///< projections and W_q, W_k, W_v; W_O starts at zero
  /// Rotary positions in the cross-attention (0: none, the paper's plain attention). Queries are
  /// rotated by the anchor's positions and keys by the augmenting model's, so a score depends on
  /// their distance: an anchor with rotary embeddings keeps no absolute position in its stream,
  /// and without this anchor position t cannot tell augmenting position t from earlier ones.
  double rotary_theta = 0.0;
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
}  // namespace detail

template <class Anchor, class Augment, class XAttn = CrossAttention<>, class Placement = Every<4>>
struct Compose {
  static_assert(detail::is_plain_decoder<Anchor>::value && detail::is_plain_decoder<Augment>::value,
                "moet::Compose<Anchor, Augment, ...>: both models are frozen decoders without slots, "
                "e.g. moet::Decoder<moet::Llama>; the trained parameters are the composition layers'");
  static_assert(detail::is_cross_attention<XAttn>::value, "moet::Compose: the third argument is moet::CrossAttention<H>");
  static_assert(detail::is_placement<Placement>::value, "moet::Compose: the placement is moet::Every<K> or moet::FromOptions");
  using anchor = Anchor;
  using augment = Augment;
  using cross_attention = XAttn;
  using placement = Placement;

  static std::string name() { return "Compose<" + Anchor::name() + ", " + Augment::name() + ">"; }

  template <class T, class Backend = cpu>
  using model = layer<Compose, T, Backend>;
};

}  // namespace moet
