// The decoder, written once over a backend's ops: embeddings, blocks, final norm and the fused
// LM head + loss, with training passes, loss and logits, cached decoding and generation, and the
// Hugging Face names of its frozen tensors. `Decoder<Arch, Slots<...>>::model<T, Backend>` is
// this class; the backend supplies ops<Backend, T> and its layers.
//
// The model holds parameters only. A forward's context owns the batch geometry (mask,
// positions, targets), the embedded input when forward embedded it, and every activation its
// backward reads, so two forwards may be in flight and their backwards run in any order.
#pragma once

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <boost/hana/define_struct.hpp>

#include "../core/error.hpp"
#include "../core/param.hpp"
#include "../core/random.hpp"
#include "../core/visit.hpp"
#include "../io/config.hpp"
#include "../model.hpp"
#include "../optim/adamw.hpp"
#include "../optim/clip.hpp"
#include "batch.hpp"
#include "block.hpp"
#include "sampling.hpp"

namespace moet {

struct TrainStepResult {
  double loss = 0;       ///< the language-model loss (without auxiliary losses)
  double aux_loss = 0;   ///< the routers' weighted auxiliary losses
  double grad_norm = 0;  ///< global gradient norm before clipping
  bool clipped = false;
  bool applied = true;   ///< false: the loss or the norm was not finite and the update was skipped
};

namespace detail {
inline TrainStepResult step_result(const StepNumbers& n) {
  TrainStepResult r;
  r.loss = n.loss;
  r.aux_loss = n.aux_loss;
  r.grad_norm = n.clip.norm;
  r.clipped = n.clip.clipped;
  return r;
}
}  // namespace detail

/// What train_step does when the loss (with the aux losses) or the gradient norm is NaN or
/// infinite: raise (the default) throws a moet::numeric_error before the optimizer steps, skip
/// leaves parameters and optimizer state untouched, returns applied = false and counts the step
/// (skipped_steps()). Either way nothing is updated from a non-finite gradient; the gradients are
/// left as computed, for inspection.
enum class NonFinite { raise, skip };

namespace detail {
/// Whether a step with result r may update the parameters (see NonFinite).
inline bool finite_step(const std::string& who, TrainStepResult& r, NonFinite policy) {
  if (std::isfinite(r.loss) && std::isfinite(r.aux_loss) && std::isfinite(r.grad_norm)) return true;
  if (policy == NonFinite::raise)
    throw numeric_error(concat(who, ": train_step got loss ", r.loss, ", aux loss ", r.aux_loss, " and gradient norm ", r.grad_norm,
                               "; nothing was updated (NonFinite::skip skips such steps and counts them)"));
  r.applied = false;
  return false;
}

/// The end of every training step (train_step, apply_gradients, CALM's train_step): a non-finite
/// result is raised or skipped and counted in `skipped` (finite_step), else the optimizer steps.
template <class Model, class Optimizer>
TrainStepResult apply_step(Model& model, Optimizer& optimizer, TrainStepResult r, NonFinite policy, long& skipped) {
  if (!finite_step(model.name(), r, policy)) {
    ++skipped;
    return r;
  }
  optimizer.step(model);
  return r;
}


/// A training step over micro-batches, as the models' train_step (one part),
/// accumulate_gradients and apply_gradients run it: the parts' losses summed where the backend
/// keeps them, and how many of how many parts have run.
template <class Ops>
class AccumulatedStep {
 public:
  /// Part `part` of `parts`: pass(sum, first) runs its forward and backward (overwriting the
  /// gradients when first, adding to them after) and adds its losses to sum (Ops::add_to_step).
  /// Parts run in order from 0; one that throws abandons the step.
  template <class Pass>
  void run(const std::string& who, int part, int parts, Pass&& pass) {
    if (parts < 1 || part < 0 || part >= parts)
      throw value_error(concat(who, ": accumulate_gradients(part ", part, " of ", parts, ") is out of range"));
    if (part > 0 && (parts_ != parts || done_ != part))
      throw value_error(concat(who, ": accumulate_gradients(part ", part, " of ", parts, ") came after ", done_, " of ", parts_,
                               " parts; a step's parts run in order from part 0"));
    if (part == 0) parts_ = done_ = 0;
    try {
      pass(sum_, part == 0);
    } catch (...) {
      parts_ = done_ = 0;
      throw;
    }
    parts_ = parts;
    done_ = part + 1;
  }

  /// The step's end, once, after every part has run: Ops::finish_step (the mean gradient,
  /// clipped, and the mean losses), then apply_step.
  template <class Model, class Optimizer>
  TrainStepResult apply(const std::string& who, Model& model, Optimizer& optimizer, double max_norm, NonFinite policy,
                        long& skipped) {
    if (parts_ == 0 || done_ != parts_)
      throw value_error(concat(who, ": apply_gradients needs every part of a step from accumulate_gradients; ", done_, " of ",
                               parts_, " parts have run"));
    const int parts = parts_;
    parts_ = done_ = 0;  // the step is taken (or refused) once
    return apply_step(model, optimizer, step_result(Ops::finish_step(model, sum_, parts, max_norm)), policy, skipped);
  }

 private:
  typename Ops::StepSum sum_;
  int parts_ = 0, done_ = 0;
};
}  // namespace detail

namespace model_impl {

/// What a forward keeps for backward: everything, only each block's input (backward recomputes
/// the block), or nothing (loss and logits).
enum class Keep { nothing, inputs, everything };

/// A decoding cache: each layer's rotated, scaled keys and values of the positions so far, for
/// `batch` sequences decoded in lockstep (the same number of new positions each per call; a
/// padded position is flagged and never attended to).
template <class Ops>
struct KvCache {
  std::vector<KvLayer<Ops>> layers;
  Index length = 0;  ///< positions cached per sequence, padding included
  Index batch = 1;
  std::vector<std::vector<unsigned char>> valid;  ///< per sequence and cached position: 1 real, 0 padding
  std::vector<Index> seen;                        ///< per sequence: real tokens so far (its next position)

  /// Where the cache stands, to rewind a call that failed.
  struct Mark {
    KvMark layers;
    Index length = 0;
    std::vector<Index> seen;
  };
  Mark mark() const { return {kv_mark(layers), length, seen}; }
  void rewind(const Mark& m) {
    kv_rewind(layers, m.layers);
    length = m.length;
    seen = m.seen;
    for (auto& v : valid)
      if (Index(v.size()) > length) v.resize(std::size_t(length));
  }
};

template <class Spec, class T, class Backend>
class DecoderModel {
  using Ops = ops<Backend, T>;
  using Tensor = typename Ops::Tensor;
  using View = typename Ops::View;
  using Host = typename Ops::HostMatrix;
  using Arch = typename Spec::arch;
  static constexpr bool llama = Arch::llama;

 public:
  using Scalar = T;
  using BackendTag = Backend;
  using Device = typename Ops::Device;
  using BlockType = Block<Spec, T, Backend>;
  using Norm = typename BlockType::Norm;
  using Inputs = BlockInputs<Ops>;
  using Geometry = std::shared_ptr<const BatchGeometry>;
  using Cache = KvCache<Ops>;

  /// A run of blocks [first, last) as its backward needs it.
  struct BlockRun {
    Index first = 0, last = 0;
    Keep kept = Keep::nothing;
    std::vector<Tensor> outputs;                                     // blocks first .. last-2: the next block's input
    std::vector<std::optional<typename BlockType::Context>> blocks;  // empty under recomputation
  };

  struct Context {
    Geometry batch;    // the batch this pass ran on
    Tensor h0;         // the embedded batch, when forward(TokenBatch) embedded it
    BlockRun run;
    Tensor top;        // the last block's output
    typename Norm::Context final_norm;
    typename Ops::CrossEntropy loss_function;
    typename Ops::LossContext loss;
    Tensor d_final;    // d(loss)/d(final norm output) for d(loss) = 1, formed with the loss
    typename Ops::AuxSum aux{};

    auto output() const { return loss.output(); }  // (1, 1); float32 on the GPU whatever T is
    double aux_loss() const { return Ops::aux_value(aux); }
  };

  static std::string name() { return Spec::name(); }

  /// A model with random frozen weights (load a checkpoint over them with moet::load_base), or
  /// other ones as `init` says (FrozenInit: zeros, or placeholders for a checkpoint).
  DecoderModel(Device device, const io::ModelConfig& config, Rng& rng, const ModelOptions& options = {},
               const FrozenInit& init = {})
      : device_(device),
        config_(checked(config)),
        options_(options),
        wte(with_initial_weight<Host>(rng, config.vocab, config.d_model, init,
                                      [&](const auto& w) { return typename Ops::Embedding(device, w); })),
        final_norm(BlockType::make_norm(device, config)) {
    if constexpr (llama) {
      rope_q_.emplace(device, config.heads, config.head_dim(), config.rope_theta, config.rope_scaling);
      rope_k_.emplace(device, config.kv_heads, config.head_dim(), config.rope_theta, config.rope_scaling);
    } else {
      with_initial_weight<Host>(rng, config.max_positions, config.d_model, init, [&](const auto& w) { wpe.emplace(device, w); });
    }
    blocks.reserve(std::size_t(config.layers));
    for (Index i = 0; i < config.layers; ++i) blocks.emplace_back(device, config, i, rng, options, init);
    if (!config.tied_embeddings)
      with_initial_weight<Host>(rng, config.vocab, config.d_model, init,
                                [&](const auto& w) { lm_head.emplace(Ops::frozen(device, name(), "lm_head", w)); });
    arena_ = typename Ops::GradientArena(*this);
  }
  /// The CPU shorthand: no device handle.
  DecoderModel(const io::ModelConfig& config, Rng& rng, const ModelOptions& options = {}, const FrozenInit& init = {})
    requires std::is_same_v<Device, CpuDevice>
      : DecoderModel(CpuDevice{}, config, rng, options, init) {}
  DecoderModel(DecoderModel&&) noexcept = default;

  const io::ModelConfig& config() const { return config_; }
  const ModelOptions& options() const { return options_; }
  /// Every trainable gradient in one buffer: zero-grad, clipping and AdamW run one pass over it.
  typename Ops::GradientArena& gradient_arena() { return arena_; }
  Device device() const { return device_; }
  /// Activation recomputation for later forwards (a model setting, not a batch's).
  void set_recompute(bool on) { options_.recompute = on; }

  /// The (vocab, d_model) output embedding: the token table when tied, else lm_head.
  const typename Ops::Frozen& head_weight() const { return lm_head ? *lm_head : wte.table; }

  // --- batches -----------------------------------------------------------------------------------

  /// Checks a batch against this model and makes its geometry (the model keeps nothing of it).
  Geometry geometry(const TokenBatch& b) const {
    return make_geometry(name(), {config_.vocab, llama ? 0 : config_.max_positions}, b);
  }

  /// What the blocks read of a batch (made per pass; it points into `g` and this model).
  Inputs inputs(const BatchGeometry& g) const {
    return {Ops::attention({g.batch, g.seq, config_.heads, config_.kv_heads, config_.head_dim(), g.seq}, g.mask), &g.positions,
            opt_ptr(rope_q_), opt_ptr(rope_k_), g.padded() ? RowMask{g.mask.data(), g.tokens()} : RowMask{}};
  }

  /// The embedded batch h0 (tokens, d_model): token rows (+ learned positions).
  Tensor embed(const BatchGeometry& g) const { return Ops::embed(wte, opt_ptr(wpe), g.ids, g.positions); }

  // --- training passes -----------------------------------------------------------------------------

  /// Forward of a batch to its mean token loss; the context owns the batch and its embedding, so
  /// backward(c, mode) needs nothing else.
  Context forward(const TokenBatch& b, bool for_backward = true) const {
    Geometry g = geometry(b);
    Tensor h0 = embed(*g);
    Context c = forward(std::move(g), h0, for_backward);
    c.h0 = std::move(h0);
    return c;
  }

  /// Forward from an embedded batch h0 (tokens, d_model) of geometry g (the gradient harness's
  /// view; the caller keeps h0 for backward). Unless for_backward is false, the LM head's
  /// gradient is formed in the same pass (see lm_head_loss_forward).
  Context forward(Geometry g, View h0, bool for_backward = true) const {
    check_geometry(g);
    const auto [h0_rows, h0_cols] = Ops::shape(h0);
    detail::expect_shape(name(), "embedded batch h0", h0_rows, h0_cols, g->tokens(), config_.d_model, "tokens x d_model");
    Context c;
    c.batch = std::move(g);
    const Inputs in = inputs(*c.batch);
    c.top = run_blocks(h0, 0, Index(blocks.size()), in, options_.recompute ? Keep::inputs : Keep::everything, &c.run, &c.aux);
    finish(c, c.top, for_backward);
    return c;
  }

  /// d_loss: (1, 1). Returns d h0; adds (or writes) the adapters' gradients of d_loss * loss +
  /// the routers' aux losses (those count at weight 1 whatever d_loss is, as in the gradient
  /// harness's objective <output, probe> + aux_loss).
  Tensor backward(const Context& c, View h0, View d_loss, GradMode mode) {
    check_geometry(c.batch);
    const Inputs in = inputs(*c.batch);
    Tensor dh = Ops::empty(c.d_final) ? Ops::head_loss_backward(c.loss_function, head_weight(), c.loss, c.final_norm.output(), d_loss)
                                      : Ops::scaled(c.d_final, d_loss);
    dh = final_norm.backward(c.final_norm, c.top, dh, mode);
    return backward_blocks(c.run, h0, std::move(dh), in, mode);
  }

  /// Backward of forward(batch), from d(loss) = 1.
  void backward(const Context& c, GradMode mode) {
    if (Ops::empty(c.h0))
      throw value_error(name() + ": this context comes from forward(geometry, h0), which leaves h0 with the caller; "
                                 "call backward(c, h0, d_loss, mode)");
    backward(c, c.h0, Ops::scalar_one(), mode);
  }

  /// forward, backward, clip the global gradient norm to max_grad_norm (<= 0: no clipping), step.
  template <class Optimizer>
  TrainStepResult train_step(const TokenBatch& b, Optimizer& optimizer, double max_grad_norm = 1.0,
                             NonFinite on_non_finite = NonFinite::raise) {
    accumulate_gradients(b, 0, 1);
    return apply_gradients(optimizer, max_grad_norm, on_non_finite);
  }

  /// Gradient accumulation: micro-batch `part` of a step of `parts`, run in order from 0.
  /// Forward and backward of its whole objective (loss and aux losses), overwriting the
  /// gradients on part 0 and adding to them after; its losses are summed where the backend
  /// keeps them (on the device for CUDA: nothing is read back). apply_gradients ends the step
  /// with the mean over the parts: each part's mean token loss and aux losses weigh the same. A
  /// part that throws abandons the step (the next call must be part 0); so does train_step,
  /// which is a step of one part.
  void accumulate_gradients(const TokenBatch& b, int part, int parts) {
    accumulated_.run(name(), part, parts, [&](typename Ops::StepSum& sum, bool first) {
      const Context c = forward(b);
      backward(c, first ? GradMode::overwrite : GradMode::accumulate);
      Ops::add_to_step(sum, c.output(), &c.aux, first);
    });
  }

  /// The end of a step whose parts have all run (accumulate_gradients): the gradients scaled to
  /// their mean over the parts and clipped to max_grad_norm, a non-finite loss or norm refused
  /// or skipped as train_step does, then the optimizer's step. One read from the backend.
  template <class Optimizer>
  TrainStepResult apply_gradients(Optimizer& optimizer, double max_grad_norm = 1.0, NonFinite on_non_finite = NonFinite::raise) {
    return accumulated_.apply(name(), *this, optimizer, max_grad_norm, on_non_finite, skipped_steps_);
  }

  /// Training steps skipped for a non-finite loss or gradient (NonFinite::skip).
  long skipped_steps() const { return skipped_steps_; }

  /// Mean loss of a batch without backward (nothing is kept).
  double loss(const TokenBatch& b) const {
    Geometry g = geometry(b);
    const Tensor h0 = embed(*g);
    Context c;
    c.batch = std::move(g);
    c.top = run_blocks(h0, 0, Index(blocks.size()), inputs(*c.batch), Keep::nothing, nullptr, &c.aux);
    finish(c, c.top, false);
    return Ops::scalar(c.output());
  }

  // --- the block loop, for models built on this one (CALM) -------------------------------------

  /// Runs blocks [first, last) on h and returns the last one's output. With a run, it keeps what
  /// backward_blocks needs (`keep`); with aux, adds the routers' auxiliary losses.
  Tensor run_blocks(View h, Index first, Index last, const Inputs& in, Keep keep, BlockRun* run,
                    typename Ops::AuxSum* aux) const {
    if (first < 0 || last > Index(blocks.size()) || first > last)
      throw value_error(detail::concat(name(), ": blocks [", first, ", ", last, ") are not within the ", blocks.size(), " layers"));
    if (run) {
      *run = BlockRun{first, last, keep, {}, {}};
      if (keep != Keep::nothing) {
        run->outputs.reserve(std::size_t(std::max<Index>(0, last - first - 1)));
        run->blocks.resize(std::size_t(last - first));
      }
    }
    if (first == last) return Ops::copy(h);
    Tensor out;
    for (Index i = first; i < last; ++i) {
      typename BlockType::Context ctx;
      const View x = i == first ? h : View(run && keep != Keep::nothing ? run->outputs.back() : out);
      Tensor y = blocks[std::size_t(i)].forward(x, in, ctx);
      if (aux) BlockType::add_aux(*aux, ctx);
      if (run && keep == Keep::everything) run->blocks[std::size_t(i - first)].emplace(std::move(ctx));
      if (i + 1 == last) return y;
      if (run && keep != Keep::nothing) run->outputs.push_back(std::move(y));
      else out = std::move(y);
    }
    return out;  // not reached
  }

  /// Backward of a run of blocks: dh is the gradient of its output, h its input. Returns dh.
  Tensor backward_blocks(const BlockRun& run, View h, Tensor dh, const Inputs& in, GradMode mode) {
    if (run.first == run.last) return dh;
    if (run.kept == Keep::nothing)
      throw value_error(name() + ": backward through blocks whose forward kept nothing for it");
    for (Index i = run.last; i-- > run.first;) {
      const View x = i == run.first ? h : View(run.outputs[std::size_t(i - run.first - 1)]);
      const auto& kept = run.blocks[std::size_t(i - run.first)];
      if (kept) {
        dh = blocks[std::size_t(i)].backward(*kept, x, dh, in, mode);
      } else {  // recompute this block's activations
        typename BlockType::Context ctx;
        blocks[std::size_t(i)].forward(x, in, ctx);
        dh = blocks[std::size_t(i)].backward(ctx, x, dh, in, mode);
      }
    }
    return dh;
  }

  // --- inference -------------------------------------------------------------------------------

  /// Logits of every position of a batch: (batch*seq, vocab).
  Tensor logits(const TokenBatch& b) const {
    const Geometry g = geometry(without_targets(b));
    const Tensor top = run_blocks(embed(*g), 0, Index(blocks.size()), inputs(*g), Keep::nothing, nullptr, nullptr);
    return head_logits(top);
  }

  /// An empty decoding cache for `batch` sequences decoded together; `capacity` reserves room for
  /// that many positions per sequence (it grows anyway).
  Cache start_cache(Index capacity = 0, Index batch = 1) const {
    detail::expect_positive(name(), "sequences in a decoding cache", batch);
    Cache cache;
    const Index kvw = config_.kv_heads * config_.head_dim();
    for (std::size_t i = 0; i < blocks.size(); ++i)
      cache.layers.push_back({KvBuffer<Ops>(kvw, capacity, batch), KvBuffer<Ops>(kvw, capacity, batch)});
    cache.batch = batch;
    cache.valid.assign(std::size_t(batch), {});
    cache.seen.assign(std::size_t(batch), 0);
    return cache;
  }

  /// Feeds `ids` after the cached positions and returns their logits: (ids.size(), vocab). With a
  /// cache of B sequences, ids holds n new tokens of each, sequence after sequence (B n ids), and
  /// mask (empty: all real) flags padding, such as the left padding of prompts of different
  /// lengths; a padded position takes no position and is never attended to.
  Tensor decode(Cache& cache, const std::vector<int>& ids, const std::vector<unsigned char>& mask = {}) const {
    return head_logits(decode_hidden(cache, ids, mask, [](Index, Tensor&) {}));
  }

  /// Whether decode(cache, ids, mask) would be accepted: throws the moet::error it would throw (a
  /// cache of another model, ids not a whole number per sequence, an id outside the vocabulary,
  /// positions past GPT-2's learned ones).
  void check_decode(const Cache& cache, const std::vector<int>& ids, const std::vector<unsigned char>& mask = {}) const {
    detail::expect_positive(name(), "tokens to decode", Index(ids.size()));
    if (cache.layers.size() != blocks.size() || cache.batch < 1 || cache.seen.size() != std::size_t(cache.batch) ||
        cache.valid.size() != std::size_t(cache.batch))
      throw value_error(detail::concat(name(), ": the cache has ", cache.layers.size(), " layers, expected ", blocks.size(),
                                       " (use start_cache())"));
    const Index B = cache.batch;
    if (Index(ids.size()) % B)
      throw shape_error(detail::concat(name(), ": ", ids.size(), " ids for a cache of ", B,
                                       " sequences; give each sequence the same number of new tokens (pad with mask 0)"));
    if (!mask.empty() && mask.size() != ids.size())
      throw shape_error(detail::concat(name(), ": padding mask has ", mask.size(), " flags for ", ids.size(), " ids"));
    for (std::size_t t = 0; t < mask.size(); ++t)
      if (mask[t] > 1) throw value_error(detail::concat(name(), ": padding mask flag ", int(mask[t]), " at ", t, " is not 0 or 1"));
    for (std::size_t t = 0; t < ids.size(); ++t)
      if (ids[t] < 0 || ids[t] >= config_.vocab)
        throw value_error(detail::concat(name(), ": token id ", ids[t], " is outside the vocabulary [0, ", config_.vocab, ")"));
    if constexpr (!llama) {
      const Index n = Index(ids.size()) / B;
      for (Index b = 0; b < B; ++b) {
        Index real = 0;
        for (Index t = 0; t < n; ++t) real += mask.empty() || mask[std::size_t(b * n + t)] ? 1 : 0;
        if (cache.seen[std::size_t(b)] + real > config_.max_positions)
          throw value_error(detail::concat(name(), ": decoding ", real, " tokens after ", cache.seen[std::size_t(b)], " runs past the ",
                                           config_.max_positions, " learned positions"));
      }
    }
  }

  /// decode without the head: the last block's output for `ids`. after_block(i, h) is called
  /// on the embeddings (i = -1) and after block i, and may change h (a composition hooks in here).
  /// A call that throws leaves the cache as it was.
  template <class Hook>
  Tensor decode_hidden(Cache& cache, const std::vector<int>& ids, Hook&& after_block) const {
    return decode_hidden(cache, ids, {}, after_block);
  }
  template <class Hook>
  Tensor decode_hidden(Cache& cache, const std::vector<int>& ids, const std::vector<unsigned char>& mask, Hook&& after_block) const {
    check_decode(cache, ids, mask);
    const typename Cache::Mark mark = cache.mark();
    try {
      return decode_unchecked(cache, ids, mask, after_block);
    } catch (...) {
      cache.rewind(mark);
      throw;
    }
  }

  /// Continues `prompt` by up to max_new_tokens tokens with a KV cache; returns the new tokens.
  /// A GPT-2 prompt and max_new_tokens that together pass its learned positions are refused
  /// before anything is generated.
  std::vector<int> generate(const std::vector<int>& prompt, const SamplingOptions& s) const {
    check_generate(prompt, s);
    Cache cache = start_cache(cache_reserve(prompt, s));
    return sample_loop<Ops>(name(), prompt, s, [&](const std::vector<int>& ids) { return decode(cache, ids); });
  }

  /// The checks generate makes before it starts (a composition makes them for its anchor).
  void check_generate(const std::vector<int>& prompt, const SamplingOptions& s) const {
    check_sampling(name(), prompt, s);
    if (!llama && Index(prompt.size()) + s.max_new_tokens > config_.max_positions)
      throw value_error(detail::concat(name(), ": a prompt of ", prompt.size(), " tokens and max_new_tokens ", s.max_new_tokens,
                                       " pass the ", config_.max_positions, " learned positions; ask for at most ",
                                       std::max<Index>(0, config_.max_positions - Index(prompt.size())), " new tokens"));
  }

  /// Rows a generation's cache reserves: the whole generation, up to a bound (it grows past it).
  static Index cache_reserve(const std::vector<int>& prompt, const SamplingOptions& s) {
    return std::min<Index>(Index(prompt.size()) + Index(s.max_new_tokens), Index(1) << 12);
  }

  /// Continues several prompts together: each step decodes one token of every sequence as one
  /// batch. Prompts of different lengths are left-padded (the padding takes no position and is
  /// never attended to), so sequence b gets what generate(prompts[b], s) gives it alone, up to
  /// rounding; each sequence samples from its own Rng(s.seed), stops at s.eos on its own, and is
  /// fed padding once it has stopped.
  std::vector<std::vector<int>> generate_batch(const std::vector<std::vector<int>>& prompts, const SamplingOptions& s) const {
    if (prompts.empty()) throw value_error(name() + ": generate_batch needs at least one prompt");
    std::size_t longest = 0;
    for (const auto& p : prompts) {
      check_generate(p, s);
      longest = std::max(longest, p.size());
    }
    const Index B = Index(prompts.size()), L = Index(longest);
    std::vector<int> ids(std::size_t(B * L), 0);
    std::vector<unsigned char> mask(ids.size(), 0);
    for (Index b = 0; b < B; ++b) {
      const auto& p = prompts[std::size_t(b)];
      const Index pad = L - Index(p.size());
      for (std::size_t t = 0; t < p.size(); ++t) {
        ids[std::size_t(b * L + pad) + t] = p[t];
        mask[std::size_t(b * L + pad) + t] = 1;
      }
    }
    Cache cache = start_cache(std::min<Index>(L + Index(s.max_new_tokens), Index(1) << 12), B);
    Tensor logits = decode(cache, ids, mask);
    Index n = L;
    std::vector<Rng> rngs(std::size_t(B), Rng(s.seed));
    std::vector<std::vector<int>> out(static_cast<std::size_t>(B));
    std::vector<unsigned char> running(std::size_t(B), 1);
    for (int step = 0; step < s.max_new_tokens; ++step) {
      const std::vector<int> next = next_tokens<Ops>(logits, n - 1, n, s, rngs, running);  // one crossing for all
      for (Index b = 0; b < B; ++b) {
        if (!running[std::size_t(b)]) continue;
        const int token = next[std::size_t(b)];
        out[std::size_t(b)].push_back(token);
        if (token == s.eos || step + 1 == s.max_new_tokens) running[std::size_t(b)] = 0;
      }
      if (std::find(running.begin(), running.end(), 1) == running.end()) break;
      logits = decode(cache, next, running);  // stopped sequences are fed padding
      n = 1;
    }
    return out;
  }

 private:
  template <class Hook>
  Tensor decode_unchecked(Cache& cache, const std::vector<int>& ids, const std::vector<unsigned char>& mask, Hook& after_block) const {
    const Index B = cache.batch, n = Index(ids.size()) / B, K = cache.length + n;
    // Positions count each sequence's real tokens (a padded one repeats the last), as in a batch.
    std::vector<Index> positions(ids.size());
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < n; ++t) {
        const std::size_t i = std::size_t(b * n + t);
        const bool real = mask.empty() || mask[i];
        Index& seen = cache.seen[std::size_t(b)];
        positions[i] = std::max<Index>(0, seen + (real ? 1 : 0) - 1);
        seen += real ? 1 : 0;
        cache.valid[std::size_t(b)].push_back(real ? 1 : 0);
      }
    std::vector<unsigned char> valid;
    valid.reserve(std::size_t(B * K));
    for (const auto& v : cache.valid) valid.insert(valid.end(), v.begin(), v.end());
    // Room for K positions in every layer first: the attention reads each storage in place,
    // sequences `stride` rows apart.
    for (auto& layer : cache.layers) {
      layer.k.reserve(K);
      layer.v.reserve(K);
    }
    const Index stride = cache.layers.empty() ? K : cache.layers.front().k.capacity();
    for (const auto& layer : cache.layers)
      if (layer.k.capacity() != stride || layer.v.capacity() != stride)
        throw value_error(detail::concat(name(), ": the cache's layers hold ", layer.k.capacity(), " and ", stride,
                                         " positions; every layer must have the same capacity (use start_cache())"));
    const Inputs in{Ops::attention({B, n, config_.heads, config_.kv_heads, config_.head_dim(), K, stride}, valid), &positions,
                    opt_ptr(rope_q_), opt_ptr(rope_k_), RowMask{}};
    Tensor h = Ops::embed(wte, opt_ptr(wpe), ids, positions);
    after_block(Index(-1), h);
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      typename BlockType::Context ctx;
      h = blocks[i].forward(h, in, ctx, &cache.layers[i]);
      after_block(Index(i), h);
    }
    cache.length = K;
    return h;
  }

 public:

  /// Logits of final hidden states h (before the final norm): (rows, vocab).
  Tensor head_logits(View h) const { return Ops::head_logits(final_norm.forward(h).output(), head_weight()); }

  /// The final norm, the head and the loss over the last block's output `top` (c.batch set); a
  /// composition finishes its anchor so.
  void finish(Context& c, View top, bool for_backward) const {
    c.final_norm = final_norm.forward(top);
    c.loss_function = Ops::loss(c.batch->targets);
    c.loss = Ops::head_loss(c.loss_function, head_weight(), c.final_norm.output(), for_backward ? &c.d_final : nullptr);
  }

  // --- checkpoints and adapters --------------------------------------------------------------

  /// One frozen tensor in Hugging Face naming: its parts in moet's (in, out) layout, joined along
  /// columns; transposed: stored (out, in) as nn.Linear does; vector: stored 1-D.
  struct BaseTensor {
    std::string name;
    std::vector<typename Ops::Frozen*> parts;
    bool transposed = false;
    bool vector = false;
  };

  /// Every frozen tensor of the base model with its Hugging Face name.
  std::vector<BaseTensor> base_tensors(const std::string& gpt2_prefix = "transformer.") {
    std::vector<BaseTensor> out;
    auto add = [&](std::string n, std::vector<typename Ops::Frozen*> parts, bool transposed = false, bool vector = false) {
      out.push_back({std::move(n), std::move(parts), transposed, vector});
    };
    if constexpr (llama) {
      const bool ab = config_.attention_bias, mb = config_.mlp_bias;
      add("model.embed_tokens.weight", {&wte.table});
      for (std::size_t i = 0; i < blocks.size(); ++i) {
        auto& b = blocks[i];
        const std::string p = "model.layers." + std::to_string(i) + ".";
        auto linear = [&](const std::string& n, auto& s, bool bias) {
          add(p + n + ".weight", {&s.weight()}, true);
          if (bias) add(p + n + ".bias", {&s.bias()}, false, true);
        };
        add(p + "input_layernorm.weight", {&b.norm1.weight}, false, true);
        linear("self_attn.q_proj", b.template slot<slot::q>(), ab);
        linear("self_attn.k_proj", b.template slot<slot::k>(), ab);
        linear("self_attn.v_proj", b.template slot<slot::v>(), ab);
        linear("self_attn.o_proj", b.template slot<slot::o>(), ab);
        add(p + "post_attention_layernorm.weight", {&b.norm2.weight}, false, true);
        linear("mlp.gate_proj", b.template slot<slot::ffn_gate>(), mb);
        linear("mlp.up_proj", b.template slot<slot::ffn_up>(), mb);
        linear("mlp.down_proj", b.template slot<slot::ffn_down>(), mb);
      }
      add("model.norm.weight", {&final_norm.weight}, false, true);
      if (lm_head) add("lm_head.weight", {&*lm_head});
    } else {
      const std::string& t = gpt2_prefix;
      add(t + "wte.weight", {&wte.table});
      add(t + "wpe.weight", {&wpe->table});
      for (std::size_t i = 0; i < blocks.size(); ++i) {
        auto& b = blocks[i];
        auto& q = b.template slot<slot::q>();  // one declaration each: their types differ (clang refuses one auto for all)
        auto& k = b.template slot<slot::k>();
        auto& v = b.template slot<slot::v>();
        const std::string p = t + "h." + std::to_string(i) + ".";
        add(p + "ln_1.weight", {&b.norm1.weight}, false, true);
        add(p + "ln_1.bias", {&b.norm1.bias}, false, true);
        add(p + "attn.c_attn.weight", {&q.weight(), &k.weight(), &v.weight()});
        add(p + "attn.c_attn.bias", {&q.bias(), &k.bias(), &v.bias()}, false, true);
        add(p + "attn.c_proj.weight", {&b.template slot<slot::o>().weight()});
        add(p + "attn.c_proj.bias", {&b.template slot<slot::o>().bias()}, false, true);
        add(p + "ln_2.weight", {&b.norm2.weight}, false, true);
        add(p + "ln_2.bias", {&b.norm2.bias}, false, true);
        add(p + "mlp.c_fc.weight", {&b.template slot<slot::ffn_up>().weight()});
        add(p + "mlp.c_fc.bias", {&b.template slot<slot::ffn_up>().bias()}, false, true);
        add(p + "mlp.c_proj.weight", {&b.template slot<slot::ffn_down>().weight()});
        add(p + "mlp.c_proj.bias", {&b.template slot<slot::ffn_down>().bias()}, false, true);
      }
      add(t + "ln_f.weight", {&final_norm.weight}, false, true);
      add(t + "ln_f.bias", {&final_norm.bias}, false, true);
      if (lm_head) add("lm_head.weight", {&*lm_head});
    }
    return out;
  }

  /// Folds every plain-LoRA slot (LoRAAdapter<R>) into the frozen weights and restarts it
  /// (ReLoRA): the model's function is unchanged; returns how many slots were merged. Start a
  /// new optimizer afterwards, its moments belong to the old factors.
  int merge_lora_into_base(Rng& rng) {
    int merged = 0;
    for (auto& b : blocks) b.for_each_slot([&](auto, auto& s) { merged += s.merge_into_base(rng) ? 1 : 0; });
    return merged;
  }

  /// Every trainable tensor with a stable name: "layers.<i>.<slot>.<parameter>" (a name that
  /// repeats within a slot gets ".1", ".2", ...).
  template <class F>
  void for_each_named_param(F&& f) {
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      const std::string p = "layers." + std::to_string(i) + ".";
      blocks[i].for_each_slot([&]<class S>(S, auto& s) {
        std::vector<std::string> seen;
        for_each_param(s, [&](auto& param) {
          const auto repeats = std::count(seen.begin(), seen.end(), param.name());
          seen.push_back(param.name());
          f(p + S::name + "." + param.name() + (repeats ? "." + std::to_string(repeats) : ""), param);
        });
      });
    }
  }

  /// parameter_report per adapted slot, one line each, then the model's:
  ///   layers.0.q  Mixture<Router<Soft>, Expert<LoRA<2>>, 2>  trainable 52
  ///   ...
  ///   trainable params: 1,234 || all params: 56,789 || trainable%: 2.1731
  std::string adapter_report() const {
    std::string out;
    for (std::size_t i = 0; i < blocks.size(); ++i)
      blocks[i].for_each_slot([&]<class S>(S, const auto& s) {
        if (s.adapted())
          out += "layers." + std::to_string(i) + "." + S::name + "  " + s.spec_name() + "  trainable " +
                 std::to_string(count_parameters(s).trainable) + "\n";
      });
    return out + parameter_report(*this);
  }

  /// Which adapter sits where, e.g. {"layers.0.q": "Mixture<Router<Soft>, Expert<LoRA<4>>, 10>", ...}.
  std::map<std::string, std::string> adapter_layout() const {
    std::map<std::string, std::string> out;
    for (std::size_t i = 0; i < blocks.size(); ++i)
      blocks[i].for_each_slot([&]<class S>(S, const auto& s) {
        if (s.adapted()) out["layers." + std::to_string(i) + "." + S::name] = s.spec_name();
      });
    return out;
  }

 private:
  const io::ModelConfig& checked(const io::ModelConfig& c) const {
    if ((c.architecture == io::Architecture::llama) != llama)
      throw value_error(detail::concat(name(), ": the config describes a ", c.architecture == io::Architecture::llama ? "llama" : "gpt2",
                                       " model, expected ", Arch::name));
    for (auto [what, v] : {std::pair{"vocab", c.vocab}, {"d_model", c.d_model}, {"layers", c.layers}, {"heads", c.heads},
                           {"kv_heads", c.kv_heads}, {"d_ff", c.d_ff}, {"max_positions", c.max_positions}})
      detail::expect_positive(name(), what, v);
    if (c.explicit_head_dim < 0) throw value_error(detail::concat(name(), ": head_dim must be positive, got ", c.explicit_head_dim));
    if ((c.explicit_head_dim == 0 && c.d_model % c.heads) || c.heads % c.kv_heads)
      throw value_error(detail::concat(name(), ": d_model ", c.d_model, ", heads ", c.heads, " and kv_heads ", c.kv_heads,
                                       " do not divide"));
    if constexpr (!llama) {
      if (c.kv_heads != c.heads) throw value_error(name() + ": GPT-2 has as many key/value heads as heads");
      if (c.explicit_head_dim != 0 && c.explicit_head_dim * c.heads != c.d_model)
        throw value_error(detail::concat(name(), ": GPT-2's head size is d_model / heads = ", c.d_model / c.heads, ", got head_dim ",
                                         c.explicit_head_dim));
    }
    check_placement(c, typename Spec::slot_entries{});
    return c;
  }

  template <class... At>
  void check_placement(const io::ModelConfig& c, type_list<At...>) const {
    [[maybe_unused]] auto check = [&]<class E>(E) {  // unused when no slot is adapted
      if constexpr (requires { E::where::max(); })
        if (E::where::max() >= c.layers)
          throw value_error(detail::concat(name(), ": slot ", E::slot::name, " is placed on layer ", E::where::max(),
                                           " but the model has ", c.layers, " layers"));
    };
    (check(At{}), ...);
  }

  void check_geometry(const Geometry& g) const {
    if (!g) throw value_error(name() + ": no batch geometry (make one with geometry(batch))");
  }

  template <class X>
  static const X* opt_ptr(const std::optional<X>& x) {
    return x ? &*x : nullptr;
  }

  [[no_unique_address]] Device device_;
  io::ModelConfig config_;
  ModelOptions options_;
  std::optional<typename Ops::Rotary> rope_q_, rope_k_;  // Llama
  typename Ops::GradientArena arena_;
  long skipped_steps_ = 0;  // train_step with NonFinite::skip
  detail::AccumulatedStep<Ops> accumulated_;  // accumulate_gradients' step so far

 public:
  BOOST_HANA_DEFINE_STRUCT(DecoderModel, (typename Ops::Embedding, wte), (std::optional<typename Ops::Embedding>, wpe),
                           (std::vector<BlockType>, blocks), (Norm, final_norm), (std::optional<typename Ops::Frozen>, lm_head));
};

}  // namespace model_impl

template <class Arch, class SlotList, class T, class Backend>
struct LayerFor<Decoder<Arch, SlotList>, T, Backend> {
  using type = model_impl::DecoderModel<Decoder<Arch, SlotList>, T, Backend>;
};

}  // namespace moet
