// Batches of token sequences and their checked geometry.
//
// A `TokenBatch` is what a caller hands a model: ids, an optional padding mask and optional
// training targets in one of two conventions. A model checks it once and turns it into a
// `BatchGeometry` (the filled mask, each token's position, each position's target), which the
// forward context owns (through a shared pointer, so contexts of a composed model share one):
// the model itself keeps nothing of a batch, so several forwards may be in flight and their
// backwards run in any order.
//
// Targets, three ways (docs/models.md):
//   labels   Hugging Face's convention: one per token, and the model shifts, so position t
//            is trained to predict labels[t + 1] (pass labels = input_ids with -100 where a
//            token must not be predicted, as with transformers' causal-LM models).
//   targets  already shifted: targets[t] is what position t is trained to predict.
//   neither  the next token of ids.
// -100 means "ignored" in both. A padded position (mask 0) is never scored, whatever its target:
// its query attends to nothing. Hugging Face scores the last left-padding position's prediction
// of the first real token; moet does not (the one difference, documented in docs/models.md).
// Positions count real tokens only: cumsum(mask) - 1, clamped at 0 (Hugging Face's generate).
#pragma once

#include <algorithm>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor.hpp"

namespace moet {

/// A batch of token sequences, sequence b at ids[b*seq, (b+1)*seq).
struct TokenBatch {
  Index batch = 1;
  Index seq = 0;
  std::vector<int> ids;
  std::vector<unsigned char> mask;  ///< 1 real token, 0 padding (left or right); empty: all real
  std::vector<int> labels;          ///< Hugging Face convention: one per token, shifted by the model; -100 ignored
  std::vector<int> targets;         ///< already shifted: targets[t] is position t's target; -100 ignored
};

/// The label that marks a position as not scored (Hugging Face's ignore_index).
inline constexpr int ignore_label = -100;

/// A checked batch as a model's forward sees it.
struct BatchGeometry {
  Index batch = 0, seq = 0;
  std::vector<int> ids;             ///< (batch * seq)
  std::vector<unsigned char> mask;  ///< (batch * seq), filled: 1 real, 0 padding
  std::vector<Index> positions;     ///< (batch * seq) each token's position in its sequence, padding skipped
  std::vector<int> targets;         ///< (batch * seq) what each position predicts; ignore_label: not scored
  Index real_tokens = 0;            ///< tokens whose mask is 1

  Index tokens() const { return batch * seq; }
  bool padded() const { return real_tokens != tokens(); }
};

/// What a model's batch check needs to know of the model.
struct BatchLimits {
  Index vocab = 0;
  Index max_positions = 0;  ///< > 0: sequences longer than this (in real tokens) are refused
};

namespace detail {

/// batch * seq, or a moet::value_error when either is not positive or the product overflows.
inline Index checked_tokens(const std::string& who, Index batch, Index seq) {
  expect_positive(who, "batch", batch);
  expect_positive(who, "seq", seq);
  if (batch > std::numeric_limits<Index>::max() / seq)
    throw value_error(concat(who, ": batch ", batch, " x seq ", seq, " tokens overflow a 64-bit count"));
  return batch * seq;
}

}  // namespace detail

/// Checks `b` against the model's limits and makes its geometry; throws a moet::error naming the
/// first problem (the caller's state is never touched: the result is all that is made).
inline std::shared_ptr<const BatchGeometry> make_geometry(const std::string& who, const BatchLimits& limits,
                                                          const TokenBatch& b) {
  const Index n = detail::checked_tokens(who, b.batch, b.seq);
  const auto count = std::size_t(n);
  if (b.ids.size() != count)
    throw shape_error(detail::concat(who, ": batch has ", b.ids.size(), " token ids, expected batch*seq = ", n));
  if (!b.mask.empty() && b.mask.size() != count)
    throw shape_error(detail::concat(who, ": padding mask has ", b.mask.size(), " flags, expected batch*seq = ", n));
  if (!b.labels.empty() && !b.targets.empty())
    throw value_error(who + ": the batch has both labels (Hugging Face's convention, shifted by the model) and targets "
                            "(already shifted); give one of them");
  if (!b.labels.empty() && b.labels.size() != count)
    throw shape_error(detail::concat(who, ": batch has ", b.labels.size(), " labels, expected batch*seq = ", n));
  if (!b.targets.empty() && b.targets.size() != count)
    throw shape_error(detail::concat(who, ": batch has ", b.targets.size(), " targets, expected batch*seq = ", n));
  for (std::size_t t = 0; t < count; ++t)
    if (b.ids[t] < 0 || b.ids[t] >= limits.vocab)
      throw value_error(detail::concat(who, ": token id ", b.ids[t], " at position ", t, " is outside the vocabulary [0, ",
                                       limits.vocab, ")"));
  for (std::size_t t = 0; t < b.mask.size(); ++t)
    if (b.mask[t] > 1)
      throw value_error(detail::concat(who, ": padding mask flag ", int(b.mask[t]), " at position ", t, " is not 0 or 1"));
  auto check_target = [&](const char* what, int label, std::size_t t) {
    if (label != ignore_label && (label < 0 || label >= limits.vocab))
      throw value_error(detail::concat(who, ": ", what, " ", label, " of token ", t, " is outside the vocabulary [0, ",
                                       limits.vocab, ")"));
  };
  for (std::size_t t = 0; t < b.labels.size(); ++t) check_target("label", b.labels[t], t);
  for (std::size_t t = 0; t < b.targets.size(); ++t) check_target("target", b.targets[t], t);

  auto g = std::make_shared<BatchGeometry>();
  g->batch = b.batch, g->seq = b.seq, g->ids = b.ids;
  g->mask = b.mask.empty() ? std::vector<unsigned char>(count, 1) : b.mask;
  g->positions.assign(count, 0);
  g->targets.assign(count, ignore_label);
  for (Index s = 0; s < b.batch; ++s) {
    Index seen = 0;
    for (Index t = 0; t < b.seq; ++t) {
      const std::size_t i = std::size_t(s * b.seq + t);
      const bool real = g->mask[i] != 0;
      g->positions[i] = std::max<Index>(0, seen + (real ? 1 : 0) - 1);
      seen += real ? 1 : 0;
      if (!real) continue;  // a padded position is never scored
      const bool has_next = t + 1 < b.seq;
      if (!b.targets.empty()) g->targets[i] = b.targets[i];
      else if (!b.labels.empty()) g->targets[i] = has_next ? b.labels[i + 1] : ignore_label;
      else g->targets[i] = has_next && g->mask[i + 1] ? b.ids[i + 1] : ignore_label;
    }
    if (limits.max_positions > 0 && seen > limits.max_positions)
      throw value_error(detail::concat(who, ": sequence ", s, " has ", seen, " tokens, more than the ", limits.max_positions,
                                       " learned positions"));
    g->real_tokens += seen;
  }
  return g;
}

/// The same batch without targets: nothing is scored (logits, the augmenting model of CALM).
inline TokenBatch without_targets(TokenBatch b) {
  b.labels.clear();
  b.targets.assign(b.ids.size(), ignore_label);
  return b;
}

}  // namespace moet
