// CALM on the CPU: the composition layer and the composed pair of frozen decoders.
//
// Composition layer, anchor states h (N_B, D_B), augmenting states a (N_A, D_A):
//   p = a W_p + b_p                       (D_A -> D_B)
//   q = h W_q,  k = p W_k,  v = p W_v     (heads of the anchor's head size)
//   [q, k = rotary(q, anchor positions), rotary(k, augmenting positions)]   only with rotary_theta > 0
//   o = softmax(q k^T / sqrt(hd) + mask) v   anchor position t reads augmenting positions <= t
//   y = h + o W_O                         W_O starts at zero: the pair starts exactly as the anchor
// Attention keeps only the log-sum-exp and recomputes probabilities in backward (flash style).
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <boost/hana/define_struct.hpp>

#include "../calm.hpp"
#include "../core/error.hpp"
#include "../core/param.hpp"
#include "../core/random.hpp"
#include "../core/visit.hpp"
#include "decoder.hpp"
#include "ops/attention.hpp"
#include "ops/rotary.hpp"

namespace moet {

/// The two models' inputs: the same ids for both, or (different vocabularies) one batch each.
struct ComposedBatch {
  TokenBatch anchor;
  TokenBatch augment;  ///< empty ids: the anchor's batch
};

/// Decoding state of a composed pair: both models' caches and the composition layers' keys and values.
template <class T>
struct ComposedCache {
  cpu_impl::KvCache<T> anchor, augment;
  std::vector<Matrix<T>> k, v;
};

}  // namespace moet

namespace moet::cpu_impl {

template <class T>
class CompositionLayer {
 public:
  using Scalar = T;
  struct Context {
    Matrix<T> p, q, k, v;  // projected augmenting states and the attention inputs (q, k rotated)
    typename CausalAttention<T>::Context attn;
    Matrix<T> y;  // (N_B, D_B)
    const Matrix<T>& output() const { return y; }
    double aux_loss() const { return 0.0; }
  };

  static std::string name() { return "CompositionLayer"; }

  /// rotary_theta > 0: rotary positions in the attention (see ComposeOptions::rotary_theta).
  CompositionLayer(Index d_anchor, Index d_augment, Index heads, Rng& rng, double init_stddev, double rotary_theta = 0.0)
      : heads_(heads),
        proj("proj", d_augment, d_anchor),
        proj_bias("proj_bias", 1, d_anchor),
        wq("wq", d_anchor, d_anchor),
        wk("wk", d_anchor, d_anchor),
        wv("wv", d_anchor, d_anchor),
        wo("wo", d_anchor, d_anchor) {
    detail::expect_positive(name(), "anchor width", d_anchor);
    detail::expect_positive(name(), "augmenting width", d_augment);
    detail::expect_positive(name(), "heads", heads);
    if (d_anchor % heads)
      throw value_error(detail::concat(name(), ": anchor width ", d_anchor, " is not a multiple of ", heads, " heads"));
    if (rotary_theta != 0.0) rope_.emplace(heads, d_anchor / heads, rotary_theta);
    for (auto* m : {&proj, &wq, &wk, &wv}) rng.fill_normal(m->value(), 0.0, init_stddev);
    // wo and proj_bias stay zero: the composed model starts as the anchor alone.
  }
  CompositionLayer(CompositionLayer&&) noexcept = default;

  Index d_anchor() const { return wq.rows(); }
  Index d_augment() const { return proj.rows(); }
  Index heads() const { return heads_; }
  bool rotary() const { return rope_.has_value(); }

  /// The batch: B sequences of L_B anchor and L_A augmenting positions; valid: the augmenting
  /// model's padding flags (B * L_A; empty: all real). With rotary positions, each model's
  /// position of every token (B * L_B and B * L_A; empty: 0, 1, ... in each sequence).
  void set_geometry(Index batch, Index anchor_seq, Index augment_seq, std::vector<unsigned char> valid = {},
                    std::vector<Index> anchor_positions = {}, std::vector<Index> augment_positions = {}) {
    attention_.emplace(AttentionShape{batch, anchor_seq, heads_, heads_, d_anchor() / heads_, augment_seq}, std::move(valid));
    anchor_positions_ = positions_or_default(std::move(anchor_positions), batch, anchor_seq, "anchor");
    augment_positions_ = positions_or_default(std::move(augment_positions), batch, augment_seq, "augmenting");
  }

  Context forward(In<T> h, In<T> a) const {
    check(h, a);
    Context c;
    c.p.noalias() = a * proj.value();
    c.p.rowwise() += proj_bias.value().row(0);
    c.q.noalias() = h * wq.value();
    c.k.noalias() = c.p * wk.value();
    c.v.noalias() = c.p * wv.value();
    if (rope_) {
      c.q = rope_->forward(c.q, anchor_positions_).y;
      c.k = rope_->forward(c.k, augment_positions_).y;
    }
    c.attn = attention_->forward(c.q, c.k, c.v);
    c.y = h;
    c.y.noalias() += c.attn.y * wo.value();
    return c;
  }

  /// Returns {dh, da}.
  std::pair<Matrix<T>, Matrix<T>> backward(const Context& c, In<T> h, In<T> a, In<T> dy, GradMode mode) {
    check(h, a);
    detail::expect_shape(name(), "output gradient dy", dy.rows(), dy.cols(), h.rows(), d_anchor(), "the shape of h");
    detail::assign_grad(wo.grad(), c.attn.y.transpose() * dy, mode);
    const Matrix<T> d_o = dy * wo.value().transpose();
    auto [dq, dk, dv] = attention_->backward(c.attn, c.q, c.k, c.v, d_o, mode);
    if (rope_) {  // a rotation: its backward needs no input
      dq = rope_->backward({}, c.q, anchor_positions_, dq, mode);
      dk = rope_->backward({}, c.k, augment_positions_, dk, mode);
    }
    detail::assign_grad(wq.grad(), h.transpose() * dq, mode);
    detail::assign_grad(wk.grad(), c.p.transpose() * dk, mode);
    detail::assign_grad(wv.grad(), c.p.transpose() * dv, mode);
    Matrix<T> dp = dk * wk.value().transpose();
    dp.noalias() += dv * wv.value().transpose();
    detail::assign_grad(proj.grad(), a.transpose() * dp, mode);
    detail::assign_grad(proj_bias.grad(), dp.colwise().sum(), mode);
    Matrix<T> dh = dy;
    dh.noalias() += dq * wq.value().transpose();
    return {std::move(dh), dp * proj.value().transpose()};
  }

  /// Decoding (one sequence): appends the new augmenting positions' keys and values to the
  /// caches and returns h + cross-attention of the new anchor positions over all of them.
  /// anchor_start: the anchor's position of h's first row (the augmenting positions continue
  /// the cache: k_cache.rows(), ...).
  Matrix<T> forward_cached(In<T> h, In<T> a, Matrix<T>& k_cache, Matrix<T>& v_cache, Index anchor_start = 0) const {
    detail::expect_cols(name(), "anchor states h", h.rows(), h.cols(), d_anchor(), "tokens x anchor width");
    detail::expect_cols(name(), "augmenting states a", a.rows(), a.cols(), d_augment(), "tokens x augmenting width");
    Matrix<T> p = a * proj.value();
    p.rowwise() += proj_bias.value().row(0);
    Matrix<T> k = p * wk.value(), q = h * wq.value();
    if (rope_) {
      k = rope_->forward(k, iota_positions(k_cache.rows(), a.rows())).y;
      q = rope_->forward(q, iota_positions(anchor_start, h.rows())).y;
    }
    append_rows<T>(k_cache, k);
    append_rows<T>(v_cache, p * wv.value());
    const CausalAttention<T> attention(AttentionShape{1, h.rows(), heads_, heads_, d_anchor() / heads_, k_cache.rows()});
    Matrix<T> y = h;
    y.noalias() += attention.forward(q, k_cache, v_cache).y * wo.value();
    return y;
  }

 private:
  void check(In<T> h, In<T> a) const {
    if (!attention_) throw value_error(name() + ": call set_geometry(batch, anchor_seq, augment_seq) first");
    detail::expect_cols(name(), "anchor states h", h.rows(), h.cols(), d_anchor(), "tokens x anchor width");
    detail::expect_cols(name(), "augmenting states a", a.rows(), a.cols(), d_augment(), "tokens x augmenting width");
  }

  static std::vector<Index> iota_positions(Index start, Index n) {
    std::vector<Index> p{};
    p.resize(std::size_t(n));
    std::iota(p.begin(), p.end(), start);
    return p;
  }
  std::vector<Index> positions_or_default(std::vector<Index> positions, Index batch, Index seq, const char* model) const {
    if (!rope_) return {};
    if (positions.empty()) {
      positions.resize(std::size_t(batch * seq));
      for (Index i = 0; i < batch * seq; ++i) positions[std::size_t(i)] = i % seq;
    }
    if (Index(positions.size()) != batch * seq)
      throw shape_error(detail::concat(name(), ": ", positions.size(), " ", model, " positions for ", batch, " x ", seq,
                                       " tokens"));
    return positions;
  }

  Index heads_;
  std::optional<CausalAttention<T>> attention_;
  std::optional<Rotary<T>> rope_;
  std::vector<Index> anchor_positions_, augment_positions_;

 public:
  BOOST_HANA_DEFINE_STRUCT(CompositionLayer, (Param<T>, proj), (Param<T>, proj_bias), (Param<T>, wq), (Param<T>, wk),
                           (Param<T>, wv), (Param<T>, wo));
};

template <class Spec, class T>
class ComposedModel {
  using AnchorModel = typename Spec::anchor::template model<T>;
  using AugmentModel = typename Spec::augment::template model<T>;
  using Placement = typename Spec::placement;

 public:
  using Scalar = T;
  struct Context {
    std::vector<Matrix<T>> augment_states;                          // m_A's output at each pair's layer i
    std::vector<Matrix<T>> inputs;                                  // anchor block j's input, j > lowest
    std::vector<std::optional<typename AnchorModel::BlockType::Context>> blocks;
    std::vector<Matrix<T>> composed_in;                             // each composition layer's h
    std::vector<std::optional<typename CompositionLayer<T>::Context>> composition;
    Matrix<T> top;                                                  // the last block's output (composed)
    typename AnchorModel::Norm::Context final_norm;
    typename CrossEntropy<T>::Context loss;
    Matrix<T> d_final;
    const Matrix<T>& output() const { return loss.loss; }
    double aux_loss() const { return 0.0; }
  };

  static std::string name() { return Spec::name(); }

  ComposedModel(const io::ModelConfig& anchor_config, const io::ModelConfig& augment_config, Rng& rng,
                const ComposeOptions& options = {})
      : ComposedModel(AnchorModel(anchor_config, rng), AugmentModel(augment_config, rng), rng, options) {}

  /// From two (pretrained) models, moved in.
  ComposedModel(AnchorModel&& anchor_model, AugmentModel&& augment_model, Rng& rng, const ComposeOptions& options = {})
      : anchor(std::move(anchor_model)), augment(std::move(augment_model)) {
    pairs_ = make_pairs(options);
    const Index heads = Spec::cross_attention::heads ? Spec::cross_attention::heads : anchor.config().heads;
    for (std::size_t k = 0; k < pairs_.size(); ++k)
      composition.emplace_back(anchor.config().d_model, augment.config().d_model, heads, rng, options.init_stddev,
                               options.rotary_theta);
  }
  ComposedModel(ComposedModel&&) noexcept = default;

  /// (augment layer i, anchor layer j) of each composition layer, by increasing j.
  const std::vector<std::pair<Index, Index>>& pairs() const { return pairs_; }

  // --- training ---------------------------------------------------------------------------------

  /// Checks both batches and makes them current.
  void set_batch(const ComposedBatch& b) {
    const TokenBatch& aug = b.augment.ids.empty() ? b.anchor : b.augment;
    if (aug.batch != b.anchor.batch || aug.seq != b.anchor.seq)
      throw shape_error(detail::concat(name(), ": the augmenting model's batch is ", aug.batch, " x ", aug.seq,
                                       " tokens but the anchor's is ", b.anchor.batch, " x ", b.anchor.seq,
                                       " (both read the same positions)"));
    TokenBatch aug_unlabelled = aug;
    aug_unlabelled.labels.assign(aug.ids.size(), CrossEntropy<T>::default_ignore);
    augment.set_batch(aug_unlabelled);  // checked first: a bad batch leaves the anchor's as it was
    anchor.set_batch(b.anchor);
    const auto& mask = augment.batch().mask;
    for (auto& layer : composition)
      layer.set_geometry(b.anchor.batch, b.anchor.seq, aug.seq, mask, anchor.positions(), augment.positions());
  }
  void set_batch(const TokenBatch& b) { set_batch(ComposedBatch{b, {}}); }

  Context forward(const ComposedBatch& b, bool for_backward = true) {
    set_batch(b);
    return forward_current(for_backward);
  }
  Context forward(const TokenBatch& b, bool for_backward = true) { return forward(ComposedBatch{b, {}}, for_backward); }

  /// Forward of the current batch; the augmenting model runs forward only and keeps nothing
  /// but the states the composition reads.
  Context forward_current(bool for_backward = true) const {
    Context c;
    c.augment_states = augment_states();
    return forward_anchor(anchor.embed(), std::move(c), for_backward, false);
  }

  /// Forward from given anchor embeddings and augmenting states (the gradient harness's view):
  /// inputs h0 (tokens, D_B) and the states of every pair, stacked (pairs * tokens, D_A).
  Context forward(In<T> h0, In<T> stacked_states) const {
    Context c;
    const Index n = h0.rows();
    for (std::size_t k = 0; k < pairs_.size(); ++k) c.augment_states.push_back(stacked_states.middleRows(Index(k) * n, n));
    return forward_anchor(h0, std::move(c), true, true);
  }
  /// Returns {d h0, d stacked_states}.
  std::pair<Matrix<T>, Matrix<T>> backward(const Context& c, In<T> h0, In<T>, In<T> d_loss, GradMode mode) {
    Matrix<T> d_states = Matrix<T>::Zero(Index(pairs_.size()) * h0.rows(), augment.config().d_model);
    Matrix<T> dh = backward_anchor(c, d_loss, mode, &d_states, true);
    return {std::move(dh), std::move(d_states)};
  }

  /// Backward of the current batch from d(loss) = 1, down to the lowest composition layer.
  void backward(const Context& c, GradMode mode) { backward_anchor(c, Matrix<T>::Ones(1, 1), mode, nullptr, false); }

  TrainStepResult train_step(const ComposedBatch& b, AdamW<T>& optimizer, double max_grad_norm = 1.0) {
    const Context c = forward(b);
    backward(c, GradMode::overwrite);
    TrainStepResult r;
    r.loss = double(c.loss.loss(0, 0));
    const ClipResult clip = clip_grad_norm(composition, max_grad_norm);
    r.grad_norm = clip.norm;
    r.clipped = clip.clipped;
    optimizer.step(composition);
    return r;
  }
  TrainStepResult train_step(const TokenBatch& b, AdamW<T>& optimizer, double max_grad_norm = 1.0) {
    return train_step(ComposedBatch{b, {}}, optimizer, max_grad_norm);
  }

  double loss(const ComposedBatch& b) { return double(forward(b, false).loss.loss(0, 0)); }
  double loss(const TokenBatch& b) { return loss(ComposedBatch{b, {}}); }

  /// Logits of every position: (batch*seq, anchor vocab).
  Matrix<T> logits(const ComposedBatch& b) {
    ComposedBatch unlabelled = b;
    unlabelled.anchor.labels.assign(b.anchor.ids.size(), CrossEntropy<T>::default_ignore);
    set_batch(unlabelled);
    const Context c = forward_current(false);
    return c.final_norm.y * anchor.head_weight().transpose();
  }
  Matrix<T> logits(const TokenBatch& b) { return logits(ComposedBatch{b, {}}); }

  // --- generation -------------------------------------------------------------------------------

  ComposedCache<T> start_cache() const {
    ComposedCache<T> cache{anchor.start_cache(), augment.start_cache(), {}, {}};
    cache.k.assign(pairs_.size(), Matrix<T>(0, anchor.config().d_model));
    cache.v = cache.k;
    return cache;
  }

  /// Feeds ids to both models (augment_ids: the augmenting model's ids when its vocabulary differs).
  Matrix<T> decode(ComposedCache<T>& cache, const std::vector<int>& ids, const std::vector<int>& augment_ids = {}) const {
    const std::vector<int>& aug_ids = augment_ids.empty() ? ids : augment_ids;
    if (aug_ids.size() != ids.size())
      throw shape_error(detail::concat(name(), ": ", aug_ids.size(), " augmenting ids for ", ids.size(), " anchor ids"));
    std::vector<Matrix<T>> states(pairs_.size());
    augment.decode_hidden(cache.augment, aug_ids, [&](Index i, Matrix<T>& h) {
      for (std::size_t k = 0; k < pairs_.size(); ++k)
        if (pairs_[k].first == i) states[k] = h;
    });
    const Index anchor_start = cache.anchor.length;
    const Matrix<T> top = anchor.decode_hidden(cache.anchor, ids, [&](Index j, Matrix<T>& h) {
      for (std::size_t k = 0; k < pairs_.size(); ++k)
        if (pairs_[k].second == j) h = composition[k].forward_cached(h, states[k], cache.k[k], cache.v[k], anchor_start);
    });
    return anchor.head_logits(top);
  }

  std::vector<int> generate(const std::vector<int>& prompt, const SamplingOptions& s) const {
    ComposedCache<T> cache = start_cache();
    return sample_loop<T>(name(), prompt, s, [&](const std::vector<int>& ids) { return decode(cache, ids); });
  }

  /// Different vocabularies: each model reads its own prompt (the same length), and each token
  /// the anchor emits is fed to the augmenting model as to_augment(token).
  template <class ToAugment>
  std::vector<int> generate(const std::vector<int>& prompt, const std::vector<int>& augment_prompt, const SamplingOptions& s,
                            ToAugment&& to_augment) const {
    ComposedCache<T> cache = start_cache();
    bool first = true;
    return sample_loop<T>(name(), prompt, s, [&](const std::vector<int>& ids) {
      if (std::exchange(first, false)) return decode(cache, ids, augment_prompt);
      std::vector<int> aug(ids.size());
      std::transform(ids.begin(), ids.end(), aug.begin(), [&](int id) { return int(to_augment(id)); });
      return decode(cache, ids, aug);
    });
  }

 private:
  std::vector<std::pair<Index, Index>> make_pairs(const ComposeOptions& options) const {
    const Index NA = augment.config().layers, NB = anchor.config().layers;
    std::vector<std::pair<Index, Index>> pairs;
    if constexpr (std::is_same_v<Placement, FromOptions>) {
      pairs = options.pairs;
      if (pairs.empty()) throw value_error(name() + ": FromOptions placement needs ComposeOptions::pairs");
    } else {
      const Index K = Placement::spacing;
      if (NB % K)
        throw value_error(detail::concat(name(), ": Every<", K, "> needs the anchor's layer count to be a multiple of ", K,
                                         ", got ", NB, " layers"));
      const Index n = NB / K;
      if (NA % n)
        throw value_error(detail::concat(name(), ": ", n, " composition layers need the augmenting model's layer count to be a "
                                                  "multiple of ", n, ", got ", NA, " layers"));
      for (Index k = 0; k < n; ++k) pairs.emplace_back((k + 1) * (NA / n) - 1, (k + 1) * K - 1);
    }
    for (const auto& [i, j] : pairs)
      if (i < -1 || i >= NA || j < -1 || j >= NB)
        throw value_error(detail::concat(name(), ": composition pair (", i, ", ", j, ") names a layer that does not exist: the "
                                                 "augmenting model has layers -1..", NA - 1, ", the anchor -1..", NB - 1,
                                                 " (-1: the embeddings)"));
    std::stable_sort(pairs.begin(), pairs.end(), [](const auto& x, const auto& y) { return x.second < y.second; });
    return pairs;
  }

  /// m_A's block outputs at every pair's layer i (forward only, nothing else kept).
  std::vector<Matrix<T>> augment_states() const {
    const BlockInputs<T> in = augment.batch_inputs();
    Index top = -1;
    for (const auto& [i, j] : pairs_) top = std::max(top, i);
    std::vector<Matrix<T>> states(pairs_.size());
    Matrix<T> h = augment.embed(), out;
    for (Index i = -1; i <= top; ++i) {
      if (i >= 0) {
        augment.blocks[std::size_t(i)].forward(h, in, out);
        h.swap(out);
      }
      for (std::size_t k = 0; k < pairs_.size(); ++k)
        if (pairs_[k].first == i) states[k] = h;
    }
    return states;
  }

  /// keep_all: keep every block's context (backward to h0), not only those above the lowest pair.
  Context forward_anchor(In<T> h0, Context c, bool for_backward, bool keep_all) const {
    const BlockInputs<T> in = anchor.batch_inputs();
    const Index NB = Index(anchor.blocks.size()), lowest = pairs_.front().second;
    c.inputs.resize(std::size_t(NB));
    c.blocks.resize(std::size_t(NB));
    c.composed_in.resize(pairs_.size());
    c.composition.resize(pairs_.size());
    Matrix<T> h = h0, out;
    for (Index j = -1; j < NB; ++j) {  // j = -1: the embeddings
      if (j >= 0) {
        if (j > lowest || keep_all) {  // backward passes through this block: keep what it needs
          c.inputs[std::size_t(j)] = h;
          c.blocks[std::size_t(j)].emplace(anchor.blocks[std::size_t(j)].forward(h, in, out));
        } else {
          anchor.blocks[std::size_t(j)].forward(h, in, out);
        }
        h.swap(out);
      }
      for (std::size_t k = 0; k < pairs_.size(); ++k)
        if (pairs_[k].second == j) {
          c.composed_in[k] = h;
          c.composition[k].emplace(composition[k].forward(h, c.augment_states[k]));
          h = c.composition[k]->y;
        }
    }
    c.top = std::move(h);
    c.final_norm = anchor.final_norm.forward(c.top);
    c.loss = lm_head_loss_forward<T>(anchor.loss_function(), anchor.head_weight(), c.final_norm.y, for_backward ? &c.d_final : nullptr);
    return c;
  }

  /// Returns d(h0) when to_input (else an empty matrix, stopping at the lowest composition layer).
  Matrix<T> backward_anchor(const Context& c, In<T> d_loss, GradMode mode, Matrix<T>* d_states, bool to_input) {
    const BlockInputs<T> in = anchor.batch_inputs();
    detail::expect_shape(name(), "loss gradient", d_loss.rows(), d_loss.cols(), 1, 1, "1 x 1");
    Matrix<T> dh = c.d_final.size() ? Matrix<T>(d_loss(0, 0) * c.d_final)
                                    : lm_head_loss_backward<T>(anchor.loss_function(), anchor.head_weight(), c.loss, c.final_norm.y, d_loss);
    dh = anchor.final_norm.backward(c.final_norm, c.top, dh, mode);
    const Index lowest = pairs_.front().second;
    for (Index j = Index(anchor.blocks.size()) - 1; j >= -1; --j) {
      for (std::size_t k = pairs_.size(); k-- > 0;)
        if (pairs_[k].second == j) {
          auto [d_in, d_a] = composition[k].backward(*c.composition[k], c.composed_in[k], c.augment_states[k], dh, mode);
          dh = std::move(d_in);
          if (d_states) d_states->middleRows(Index(k) * dh.rows(), dh.rows()) = d_a;
        }
      if (j < 0 || (j <= lowest && !to_input)) break;
      if (!c.blocks[std::size_t(j)])
        throw value_error(name() + ": backward to the input needs the blocks below the lowest composition layer "
                                   "(use forward(h0, states))");
      dh = anchor.blocks[std::size_t(j)].backward(*c.blocks[std::size_t(j)], c.inputs[std::size_t(j)], dh, in, mode);
    }
    return to_input ? dh : Matrix<T>();
  }

  std::vector<std::pair<Index, Index>> pairs_;

 public:
  BOOST_HANA_DEFINE_STRUCT(ComposedModel, (AnchorModel, anchor), (AugmentModel, augment),
                           (std::vector<CompositionLayer<T>>, composition));
};

}  // namespace moet::cpu_impl

namespace moet {
template <class Anchor, class Augment, class X, class P, class T>
struct LayerFor<Compose<Anchor, Augment, X, P>, T, cpu> {
  using type = cpu_impl::ComposedModel<Compose<Anchor, Augment, X, P>, T>;
};
}  // namespace moet
