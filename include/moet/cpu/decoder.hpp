// The CPU decoder: a frozen GPT-2 or Llama transformer whose slots hold adapter mixtures.
//
// One block, pre-norm, for both architectures (Llama's parts in brackets):
//   a  = norm1(x)
//   q, k, v = a Wq, a Wk, a Wv               linear slots q, k, v (each wraps its frozen projection)
//   k, v  *= IA3 mixtures routed on a        activation slots keys, values
//   [q, k = rotary(q), rotary(k)]
//   x1 = x + attention(q, k, v) Wo           linear slot o
//   b  = norm2(x1)
//   h  = gelu(b W_up)  [silu(b W_gate) * b W_up]     linear slots ffn_up [, ffn_gate]
//   h *= IA3 mixture routed on b             activation slot ffn_hidden
//   y  = x1 + h W_down                       linear slot ffn_down
// Backward runs through every frozen op to the adapters and on to the embeddings; frozen
// tensors have no gradient buffers. The model's loss is the cross-entropy of the (tied or
// untied) LM head, fused so that the (tokens, vocab) logits are never held whole.
#pragma once

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
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
#include "layers.hpp"
#include "ops/activations.hpp"
#include "ops/attention.hpp"
#include "ops/embedding.hpp"
#include "ops/lm_head_loss.hpp"
#include "ops/norms.hpp"
#include "ops/rotary.hpp"

namespace moet {

/// A batch of token sequences, sequence b at ids[b*seq, (b+1)*seq).
struct TokenBatch {
  Index batch = 1;
  Index seq = 0;
  std::vector<int> ids;
  std::vector<unsigned char> mask;  ///< 1 real token, 0 padding (left or right); empty: all real
  std::vector<int> labels;          ///< one per token, -100 ignored; empty: next-token labels from ids
};

/// Decoding settings: greedy when temperature is 0, else temperature and nucleus (top-p) sampling.
struct SamplingOptions {
  int max_new_tokens = 16;
  double temperature = 0.0;
  double top_p = 1.0;
  std::uint64_t seed = 0;
  int eos = -1;  ///< stop after emitting this token; -1: never
};

struct TrainStepResult {
  double loss = 0;       ///< the language-model loss (without auxiliary losses)
  double aux_loss = 0;   ///< the routers' weighted auxiliary losses
  double grad_norm = 0;  ///< global gradient norm before clipping
  bool clipped = false;
};

namespace cpu_impl {

template <class T>
struct none_layer {
  using Context = OutputContext<T>;
};

template <class Entry, class T>
struct slot_layer {
  using type = none_layer<T>;
};
template <class S, class Spec, class L, class T>
struct slot_layer<at<S, Spec, L>, T> {
  using type = layer<Spec, T, cpu>;
};

/// A mixture's options from the model-wide ones; IA3 routers read the d_model-wide block input.
template <class Spec>
auto slot_options(const ModelOptions& o, Index d_model) {
  using S = typename detail::mixture_traits<Spec>::expert;
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
  return m;
}

/// A linear slot: the frozen projection alone, or the mixture that wraps it.
template <class Entry, class T>
class LinearSlot {
  using Mix = typename slot_layer<Entry, T>::type;
  static constexpr bool can_adapt = !std::is_void_v<Entry>;

 public:
  struct Context {
    std::optional<OutputContext<T>> plain;
    std::optional<typename Mix::Context> mixed;
    ConstMatrixView<T> output() const {
      if constexpr (can_adapt)
        if (mixed) return mixed->output();
      return ConstMatrixView<T>(plain->y.data(), plain->y.rows(), plain->y.cols(), Eigen::OuterStride<>(plain->y.cols()));
    }
    double aux_loss() const {
      if constexpr (can_adapt)
        if (mixed) return mixed->aux_loss();
      return 0.0;
    }
  };

  LinearSlot() = default;
  LinearSlot(LinearSlot&&) noexcept = default;

  /// Makes the slot of layer `index`: adapted when the slot's entry names this layer.
  void build(Index index, In<T> w, std::optional<In<T>> b, Rng& rng, const ModelOptions& o, Index d_model) {
    if constexpr (can_adapt) {
      if (Entry::where::contains(index)) {
        const auto options = slot_options<typename Entry::spec>(o, d_model);
        if (b) mixed.emplace(w, *b, rng, options);
        else mixed.emplace(w, rng, options);
        return;
      }
    }
    if (b) plain.emplace(w, *b);
    else plain.emplace(w);
  }

  bool built() const { return adapted() || plain.has_value(); }
  bool adapted() const {
    if constexpr (can_adapt) return mixed.has_value();
    else return false;
  }

  Context forward(In<T> x) const {
    Context c;
    if constexpr (can_adapt)
      if (mixed) {
        c.mixed.emplace(mixed->forward(x));
        return c;
      }
    c.plain.emplace(plain->forward(x));
    return c;
  }

  Matrix<T> backward(const Context& c, In<T> x, In<T> dy, GradMode mode) {
    if constexpr (can_adapt)
      if (mixed) return mixed->backward(*c.mixed, x, dy, mode);
    return plain->backward(*c.plain, x, dy, mode);
  }

  /// Folds a plain LoRA (a one-expert mixture) into the frozen weight; false for other slots.
  bool merge_into_base(Rng& rng) {
    if constexpr (can_adapt && requires(Mix& m, Rng& r) { m.merge_into_base(r); })
      if (mixed) {
        mixed->merge_into_base(rng);
        return true;
      }
    return false;
  }

  /// The frozen W0 (d_in, d_out) and bias (1, d_out; empty without bias), for checkpoints.
  Frozen<T>& weight() {
    if constexpr (can_adapt)
      if (mixed) return mixed->base.base_weight;
    return plain->weight;
  }
  Frozen<T>& bias() {
    if constexpr (can_adapt)
      if (mixed) return mixed->base.base_bias;
    return plain->bias;
  }

  BOOST_HANA_DEFINE_STRUCT(LinearSlot, (std::optional<FrozenLinear<T>>, plain), (std::optional<Mix>, mixed));
};

/// An activation slot: the identity, or an IA3 mixture routed on a separate input.
template <class Entry, class T>
class ScaleSlot {
  using Mix = typename slot_layer<Entry, T>::type;
  static constexpr bool can_adapt = !std::is_void_v<Entry>;

 public:
  struct Context {
    std::optional<typename Mix::Context> mixed;
    double aux_loss() const {
      if constexpr (can_adapt)
        if (mixed) return mixed->aux_loss();
      return 0.0;
    }
  };

  ScaleSlot() = default;
  ScaleSlot(ScaleSlot&&) noexcept = default;

  void build(Index index, Index width, Rng& rng, const ModelOptions& o, Index d_model) {
    if constexpr (can_adapt)
      if (Entry::where::contains(index)) mixed.emplace(width, rng, slot_options<typename Entry::spec>(o, d_model));
  }
  bool adapted() const {
    if constexpr (can_adapt) return mixed.has_value();
    else return false;
  }

  Context forward(In<T> h, In<T> router_input) const {
    Context c;
    if constexpr (can_adapt)
      if (mixed) c.mixed.emplace(mixed->forward(h, router_input));
    return c;
  }
  /// The scaled activation: h itself when the slot is empty.
  static In<T> output(const Context& c, In<T> h) {
    if constexpr (can_adapt)
      if (c.mixed) return c.mixed->y;
    return h;
  }
  /// Returns dh; adds the router input's gradient into d_router (allocated on first use).
  Matrix<T> backward(const Context& c, In<T> h, In<T> router_input, Matrix<T>&& dy, Matrix<T>& d_router, GradMode mode) {
    if constexpr (can_adapt)
      if (mixed) {
        auto [dh, dr] = mixed->backward(*c.mixed, h, router_input, dy, mode);
        if (d_router.size() == 0) d_router = std::move(dr);
        else d_router += dr;
        return std::move(dh);
      }
    return std::move(dy);
  }

  BOOST_HANA_DEFINE_STRUCT(ScaleSlot, (std::optional<Mix>, mixed));
};

/// Where a block's tokens sit: the attention geometry, padding flags and positions.
template <class T>
struct BlockInputs {
  AttentionShape shape;
  const std::vector<unsigned char>* valid = nullptr;  // (batch * kv_seq)
  const std::vector<Index>* positions = nullptr;      // (batch * seq)
  const Rotary<T>* rope_q = nullptr;
  const Rotary<T>* rope_k = nullptr;
};

/// A decoding cache: the rotated, scaled keys and values of every position so far (batch 1).
/// Appends rows to a decoding cache (keys or values of the positions so far).
template <class T>
void append_rows(Matrix<T>& cache, In<T> rows) {
  Matrix<T> grown(cache.rows() + rows.rows(), rows.cols());
  grown.topRows(cache.rows()) = cache;
  grown.bottomRows(rows.rows()) = rows;
  cache.swap(grown);
}

template <class T>
struct KvCache {
  std::vector<Matrix<T>> k, v;  // per layer (length, kv_heads * head_dim)
  Index length = 0;
};

template <class Spec, class T>
class Block {
  using Arch = typename Spec::arch;
  static constexpr bool llama = Arch::llama;
  template <class S>
  using Lin = LinearSlot<typename Spec::template entry<S>, T>;
  template <class S>
  using Scale = ScaleSlot<typename Spec::template entry<S>, T>;

 public:
  using Norm = std::conditional_t<llama, RMSNorm<T>, LayerNorm<T>>;

  /// A frozen norm of width d_model at its initial values (weight one, bias zero).
  static Norm make_norm(const io::ModelConfig& c) {
    const RowVector<T> ones = RowVector<T>::Ones(c.d_model);
    if constexpr (llama) return Norm(ones, c.norm_eps);
    else return Norm(ones, RowVector<T>::Zero(c.d_model), c.norm_eps);
  }

  struct Context {
    typename Norm::Context n1, n2;
    typename Lin<slot::q>::Context q;
    typename Lin<slot::k>::Context k;
    typename Lin<slot::v>::Context v;
    typename Lin<slot::o>::Context o;
    typename Lin<slot::ffn_up>::Context up;
    typename Lin<slot::ffn_gate>::Context gate;
    typename Lin<slot::ffn_down>::Context down;
    typename Scale<slot::keys>::Context keys;
    typename Scale<slot::values>::Context values;
    typename Scale<slot::ffn_hidden>::Context hidden;
    Matrix<T> q_rot, k_rot;  // Llama: rotated q, k
    typename CausalAttention<T>::Context attn;
    Matrix<T> x1;   // residual after attention
    Matrix<T> act;  // gelu(up) or silu(gate) * up

    double aux_loss() const {
      return q.aux_loss() + k.aux_loss() + v.aux_loss() + o.aux_loss() + up.aux_loss() + gate.aux_loss() +
             down.aux_loss() + keys.aux_loss() + values.aux_loss() + hidden.aux_loss();
    }
  };

  /// Random frozen weights (normal(0, init_stddev), norms at one, biases zero), then adapters.
  Block(const io::ModelConfig& c, Index index, Rng& rng, const ModelOptions& o, double init_stddev)
      : norm1(make_norm(c)), norm2(make_norm(c)) {
    const Index d = c.d_model, kvw = c.kv_heads * c.head_dim(), f = c.d_ff;
    auto linear = [&](auto& s, Index in, Index out) {
      const Matrix<T> w = rng.normal_matrix<T>(in, out, 0.0, init_stddev);
      const Matrix<T> zero = Matrix<T>::Zero(1, out);
      if constexpr (llama) s.build(index, w, std::nullopt, rng, o, d);
      else s.build(index, w, std::optional<In<T>>(zero), rng, o, d);
    };
    linear(q, d, d);
    linear(k, d, kvw);
    linear(v, d, kvw);
    linear(o_proj, d, d);
    linear(up, d, f);
    if constexpr (llama) linear(gate, d, f);
    linear(down, f, d);
    keys.build(index, kvw, rng, o, d);
    values.build(index, kvw, rng, o, d);
    hidden.build(index, f, rng, o, d);
  }
  Block(Block&&) noexcept = default;

  /// Writes the block output into `out`. With a cache (decoding), this block's new keys and
  /// values are appended to it and attention reads the whole cache.
  Context forward(In<T> x, const BlockInputs<T>& in, Matrix<T>& out, KvCache<T>* cache = nullptr, Index layer = 0) const {
    Context c;
    c.n1 = norm1.forward(x);
    const Matrix<T>& a = c.n1.y;
    c.q = q.forward(a);
    c.k = k.forward(a);
    c.v = v.forward(a);
    c.keys = keys.forward(c.k.output(), a);
    c.values = values.forward(c.v.output(), a);
    if constexpr (llama) {
      c.q_rot = in.rope_q->forward(c.q.output(), *in.positions).y;
      c.k_rot = in.rope_k->forward(Scale<slot::keys>::output(c.keys, c.k.output()), *in.positions).y;
    }
    const CausalAttention<T> attention(in.shape, *in.valid);
    if (cache) {
      append_rows<T>(cache->k[std::size_t(layer)], k_in(c));
      append_rows<T>(cache->v[std::size_t(layer)], v_in(c));
      c.attn = attention.forward(q_in(c), cache->k[std::size_t(layer)], cache->v[std::size_t(layer)]);
    } else {
      c.attn = attention.forward(q_in(c), k_in(c), v_in(c));
    }
    c.o = o_proj.forward(c.attn.y);
    c.x1 = x + c.o.output();
    c.n2 = norm2.forward(c.x1);
    const Matrix<T>& b = c.n2.y;
    c.up = up.forward(b);
    if constexpr (llama) {
      c.gate = gate.forward(b);
      c.act = SwiGLU<T>{}.forward(c.gate.output(), c.up.output()).y;
    } else {
      c.act = GeluTanh<T>{}.forward(c.up.output()).y;
    }
    c.hidden = hidden.forward(c.act, b);
    c.down = down.forward(Scale<slot::ffn_hidden>::output(c.hidden, c.act));
    out = c.x1 + c.down.output();
    return c;
  }

  /// dy: gradient of the block output. Returns dx.
  Matrix<T> backward(const Context& c, In<T> x, In<T> dy, const BlockInputs<T>& in, GradMode mode) {
    const Matrix<T>& a = c.n1.y;
    const Matrix<T>& b = c.n2.y;
    // MLP
    Matrix<T> db_router;
    Matrix<T> d_act = hidden.backward(c.hidden, c.act, b,
                                      down.backward(c.down, Scale<slot::ffn_hidden>::output(c.hidden, c.act), dy, mode),
                                      db_router, mode);
    Matrix<T> db;
    if constexpr (llama) {
      auto [d_gate, d_up] = SwiGLU<T>{}.backward({}, c.gate.output(), c.up.output(), d_act, mode);
      db = up.backward(c.up, b, d_up, mode);
      db += gate.backward(c.gate, b, d_gate, mode);
    } else {
      db = up.backward(c.up, b, GeluTanh<T>{}.backward({}, c.up.output(), d_act, mode), mode);
    }
    if (db_router.size()) db += db_router;
    Matrix<T> dx1 = norm2.backward(c.n2, c.x1, db, mode);
    dx1 += dy;
    // attention
    const CausalAttention<T> attention(in.shape, *in.valid);
    auto [dq, dk, dv] = attention.backward(c.attn, q_in(c), k_in(c), v_in(c), o_proj.backward(c.o, c.attn.y, dx1, mode), mode);
    if constexpr (llama) {
      dq = in.rope_q->backward({}, c.q.output(), *in.positions, dq, mode);
      dk = in.rope_k->backward({}, c.k_rot, *in.positions, dk, mode);
    }
    Matrix<T> da_router;
    Matrix<T> dk_raw = keys.backward(c.keys, c.k.output(), a, std::move(dk), da_router, mode);
    Matrix<T> dv_raw = values.backward(c.values, c.v.output(), a, std::move(dv), da_router, mode);
    Matrix<T> da = q.backward(c.q, a, dq, mode);
    da += k.backward(c.k, a, dk_raw, mode);
    da += v.backward(c.v, a, dv_raw, mode);
    if (da_router.size()) da += da_router;
    Matrix<T> dx = norm1.backward(c.n1, x, da, mode);
    dx += dx1;
    return dx;
  }

 private:
  static In<T> q_in(const Context& c) {
    if constexpr (llama) return c.q_rot;
    else return c.q.output();
  }
  static In<T> k_in(const Context& c) {
    if constexpr (llama) return c.k_rot;
    else return Scale<slot::keys>::output(c.keys, c.k.output());
  }
  static In<T> v_in(const Context& c) { return Scale<slot::values>::output(c.values, c.v.output()); }

 public:
  BOOST_HANA_DEFINE_STRUCT(Block, (Norm, norm1), (Lin<slot::q>, q), (Lin<slot::k>, k), (Lin<slot::v>, v),
                           (Scale<slot::keys>, keys), (Scale<slot::values>, values), (Lin<slot::o>, o_proj), (Norm, norm2),
                           (Lin<slot::ffn_up>, up), (Lin<slot::ffn_gate>, gate), (Scale<slot::ffn_hidden>, hidden),
                           (Lin<slot::ffn_down>, down));
};

/// Greedy when temperature is 0; else softmax(logits / temperature) cut to the top-p nucleus.
template <class T>
int sample_token(const RowVector<T>& logits, const SamplingOptions& s, Rng& rng) {
  Index best = 0;
  logits.maxCoeff(&best);
  if (s.temperature == 0) return int(best);
  const Index V = logits.size();
  std::vector<double> p(static_cast<std::size_t>(V));
  const double m = double(logits(best));
  double sum = 0;
  for (Index i = 0; i < V; ++i) sum += p[std::size_t(i)] = std::exp((double(logits(i)) - m) / s.temperature);
  std::vector<Index> order(static_cast<std::size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](Index a, Index b) { return p[std::size_t(a)] > p[std::size_t(b)]; });
  double kept = 0;
  std::size_t n = 0;
  while (n < order.size() && kept < s.top_p * sum) kept += p[std::size_t(order[n++])];
  double u = rng.uniform() * kept;
  for (std::size_t i = 0; i < n; ++i) {
    u -= p[std::size_t(order[i])];
    if (u < 0) return int(order[i]);
  }
  return int(order[n - 1]);
}


/// The decoding loop shared by models: step(ids) feeds ids after what came before and returns
/// their logits; the last row picks the next token.
template <class T, class Step>
std::vector<int> sample_loop(const std::string& who, const std::vector<int>& prompt, const SamplingOptions& s, Step&& step) {
  if (prompt.empty()) throw value_error(who + ": generate needs a non-empty prompt");
  if (!(s.temperature >= 0) || !(s.top_p > 0 && s.top_p <= 1))
    throw value_error(detail::concat(who, ": sampling needs temperature >= 0 and 0 < top_p <= 1, got temperature=",
                                     s.temperature, " top_p=", s.top_p));
  Rng rng(s.seed);
  Matrix<T> logits = step(prompt);
  std::vector<int> out;
  for (int i = 0; i < s.max_new_tokens; ++i) {
    const int next = sample_token<T>(logits.row(logits.rows() - 1), s, rng);
    out.push_back(next);
    if (next == s.eos || i + 1 == s.max_new_tokens) break;
    logits = step(std::vector<int>{next});
  }
  return out;
}

/// The whole decoder: embeddings, blocks, final norm and the fused LM head + loss.
template <class Spec, class T>
class DecoderModel {
  using Arch = typename Spec::arch;
  static constexpr bool llama = Arch::llama;

 public:
  using Scalar = T;
  using BlockType = Block<Spec, T>;
  using Norm = typename BlockType::Norm;

  struct Context {
    std::vector<Matrix<T>> outputs;                              // block i's output (block i+1's input)
    std::vector<std::optional<typename BlockType::Context>> blocks;  // empty under recomputation
    typename Norm::Context final_norm;
    typename CrossEntropy<T>::Context loss;
    Matrix<T> d_final;  // d(loss)/d(final norm output) for d(loss) = 1, formed with the loss
    double aux = 0;

    const Matrix<T>& output() const { return loss.loss; }  // (1, 1)
    double aux_loss() const { return aux; }
  };

  static std::string name() { return Spec::name(); }

  /// A model with random frozen weights (load a checkpoint over them with moet::load_base).
  DecoderModel(const io::ModelConfig& config, Rng& rng, const ModelOptions& options = {}, double init_stddev = 0.02)
      : config_(checked(config)),
        options_(options),
        wte(rng.normal_matrix<T>(config.vocab, config.d_model, 0.0, init_stddev)),
        final_norm(BlockType::make_norm(config)) {
    if constexpr (llama) {
      rope_q_.emplace(config.heads, config.head_dim(), config.rope_theta);
      rope_k_.emplace(config.kv_heads, config.head_dim(), config.rope_theta);
    } else {
      wpe.emplace(rng.normal_matrix<T>(config.max_positions, config.d_model, 0.0, init_stddev));
    }
    blocks.reserve(std::size_t(config.layers));
    for (Index i = 0; i < config.layers; ++i) blocks.emplace_back(config, i, rng, options, init_stddev);
    if (!config.tied_embeddings) lm_head.emplace(make_frozen<T>(name(), "lm_head", rng.normal_matrix<T>(config.vocab, config.d_model, 0.0, init_stddev)));
  }
  DecoderModel(DecoderModel&&) noexcept = default;

  const io::ModelConfig& config() const { return config_; }
  const ModelOptions& options() const { return options_; }
  void set_recompute(bool on) { options_.recompute = on; }

  /// The (vocab, d_model) output embedding: the token table when tied, else lm_head.
  const MatrixView<T>& head_weight() const { return lm_head ? lm_head->value() : wte.table.value(); }

  // --- batches -------------------------------------------------------------------------------

  /// Checks a batch and makes it current: padding flags, positions, labels.
  void set_batch(const TokenBatch& b) {
    const std::string who = name();
    detail::expect_positive(who, "batch", b.batch);
    detail::expect_positive(who, "seq", b.seq);
    const std::size_t n = std::size_t(b.batch * b.seq);
    if (b.ids.size() != n)
      throw shape_error(detail::concat(who, ": batch has ", b.ids.size(), " token ids, expected batch*seq = ", n));
    if (!b.mask.empty() && b.mask.size() != n)
      throw shape_error(detail::concat(who, ": padding mask has ", b.mask.size(), " flags, expected batch*seq = ", n));
    if (!b.labels.empty() && b.labels.size() != n)
      throw shape_error(detail::concat(who, ": batch has ", b.labels.size(), " labels, expected batch*seq = ", n));
    for (std::size_t t = 0; t < n; ++t)
      if (b.ids[t] < 0 || b.ids[t] >= config_.vocab)
        throw value_error(detail::concat(who, ": token id ", b.ids[t], " at position ", t, " is outside the vocabulary [0, ",
                                         config_.vocab, ")"));
    for (std::size_t t = 0; t < b.mask.size(); ++t)
      if (b.mask[t] > 1)
        throw value_error(detail::concat(who, ": padding mask flag ", int(b.mask[t]), " at position ", t, " is not 0 or 1"));
    TokenBatch next = b;
    if (next.mask.empty()) next.mask.assign(n, 1);
    std::vector<Index> positions(n, 0);
    for (Index s = 0; s < b.batch; ++s) {
      Index seen = 0;
      for (Index t = 0; t < b.seq; ++t) {
        const std::size_t i = std::size_t(s * b.seq + t);
        positions[i] = std::max<Index>(0, seen + next.mask[i] - 1);
        seen += next.mask[i] ? 1 : 0;
      }
      if (!llama && seen > config_.max_positions)
        throw value_error(detail::concat(who, ": sequence ", s, " has ", seen, " tokens, more than the ", config_.max_positions,
                                         " learned positions"));
    }
    if (next.labels.empty()) next.labels = next_token_labels(next);
    CrossEntropy<T> loss(next.labels);
    loss.check(Index(n), config_.vocab);
    // checked: commit
    batch_ = std::move(next);
    positions_ = std::move(positions);
    loss_ = std::move(loss);
  }
  const TokenBatch& batch() const { return batch_; }
  /// Each token's position in its sequence (padding skipped), as the embeddings and rotary see it.
  const std::vector<Index>& positions() const { return positions_; }

  /// The current batch as the blocks see it (pointers into this model: made per pass).
  BlockInputs<T> batch_inputs() const {
    return {{batch_.batch, batch_.seq, config_.heads, config_.kv_heads, config_.head_dim(), batch_.seq},
            &batch_.mask, &positions_, opt_ptr(rope_q_), opt_ptr(rope_k_)};
  }

  /// Next-token labels: token t predicts token t+1; padding and the last token are ignored.
  static std::vector<int> next_token_labels(const TokenBatch& b) {
    std::vector<int> labels(b.ids.size(), CrossEntropy<T>::default_ignore);
    for (Index s = 0; s < b.batch; ++s)
      for (Index t = 0; t + 1 < b.seq; ++t) {
        const std::size_t i = std::size_t(s * b.seq + t);
        if (b.mask.empty() || (b.mask[i] && b.mask[i + 1])) labels[i] = b.ids[i + 1];
      }
    return labels;
  }

  /// The embedded current batch h0 (tokens, d_model): token rows (+ learned positions).
  Matrix<T> embed() const { return embed(batch_.ids, positions_); }

  // --- training passes -------------------------------------------------------------------------

  /// Forward from the embedded batch h0 to the mean token loss (set_batch first). Unless
  /// for_backward is false, the LM head's gradient is formed in the same pass (see
  /// lm_head_loss_forward).
  Context forward(In<T> h0, bool for_backward = true) const {
    detail::expect_shape(name(), "embedded batch h0", h0.rows(), h0.cols(), Index(batch_.ids.size()), config_.d_model,
                         "tokens x d_model (call set_batch first)");
    Context c;
    const BlockInputs<T> inputs = batch_inputs();
    const std::size_t L = blocks.size();
    c.outputs.resize(L);
    c.blocks.resize(L);
    for (std::size_t i = 0; i < L; ++i) {
      auto ctx = blocks[i].forward(i ? In<T>(c.outputs[i - 1]) : h0, inputs, c.outputs[i]);
      c.aux += ctx.aux_loss();
      if (!options_.recompute) c.blocks[i].emplace(std::move(ctx));
    }
    c.final_norm = final_norm.forward(c.outputs.back());
    c.loss = lm_head_loss_forward<T>(loss_, head_weight(), c.final_norm.y, for_backward ? &c.d_final : nullptr);
    return c;
  }

  /// d_loss: (1, 1). Returns d h0; adds (or writes) the adapters' gradients.
  Matrix<T> backward(const Context& c, In<T> h0, In<T> d_loss, GradMode mode) {
    const BlockInputs<T> inputs = batch_inputs();
    Matrix<T> dh;
    if (c.d_final.size()) {
      detail::expect_shape(name(), "loss gradient", d_loss.rows(), d_loss.cols(), 1, 1, "1 x 1");
      dh = d_loss(0, 0) * c.d_final;
    } else {
      dh = lm_head_loss_backward<T>(loss_, head_weight(), c.loss, c.final_norm.y, d_loss);
    }
    dh = final_norm.backward(c.final_norm, c.outputs.back(), dh, mode);
    for (std::size_t i = blocks.size(); i-- > 0;) {
      In<T> x = i ? In<T>(c.outputs[i - 1]) : h0;
      if (c.blocks[i]) {
        dh = blocks[i].backward(*c.blocks[i], x, dh, inputs, mode);
      } else {  // recompute this block's activations
        Matrix<T> out;
        const auto ctx = blocks[i].forward(x, inputs, out);
        dh = blocks[i].backward(ctx, x, dh, inputs, mode);
      }
    }
    return dh;
  }

  /// Forward of a batch (kept for backward(c, mode)).
  Context forward(const TokenBatch& b) {
    set_batch(b);
    h0_ = embed();
    return forward(h0_);
  }
  /// Backward of the last forward(batch), from d(loss) = 1.
  void backward(const Context& c, GradMode mode) { backward(c, h0_, Matrix<T>::Ones(1, 1), mode); }

  /// forward, backward, clip the global gradient norm to max_grad_norm (<= 0: no clipping), step.
  TrainStepResult train_step(const TokenBatch& b, AdamW<T>& optimizer, double max_grad_norm = 1.0) {
    const Context c = forward(b);
    backward(c, GradMode::overwrite);
    TrainStepResult r;
    r.loss = double(c.loss.loss(0, 0));
    r.aux_loss = c.aux;
    const ClipResult clip = clip_grad_norm(*this, max_grad_norm);
    r.grad_norm = clip.norm;
    r.clipped = clip.clipped;
    optimizer.step(*this);
    return r;
  }

  /// Mean loss of a batch without backward.
  double loss(const TokenBatch& b) {
    const bool saved = options_.recompute;
    options_.recompute = true;  // keep nothing but block outputs
    set_batch(b);
    const double l = double(forward(embed(), false).loss.loss(0, 0));
    options_.recompute = saved;
    return l;
  }

  // --- inference -------------------------------------------------------------------------------

  /// Logits of every position of a batch: (batch*seq, vocab).
  Matrix<T> logits(const TokenBatch& b) {
    TokenBatch unlabeled = b;
    unlabeled.labels.assign(b.ids.size(), CrossEntropy<T>::default_ignore);
    set_batch(unlabeled);
    const BlockInputs<T> inputs = batch_inputs();
    Matrix<T> h = embed(), out;
    for (const auto& block : blocks) {
      block.forward(h, inputs, out);
      h.swap(out);
    }
    return final_norm.forward(h).y * head_weight().transpose();
  }

  KvCache<T> start_cache() const {
    KvCache<T> cache;
    cache.k.assign(blocks.size(), Matrix<T>(0, config_.kv_heads * config_.head_dim()));
    cache.v = cache.k;
    return cache;
  }

  /// Feeds `ids` (one sequence) after the cached positions; returns their logits (ids.size(), vocab).
  Matrix<T> decode(KvCache<T>& cache, const std::vector<int>& ids) const {
    return head_logits(decode_hidden(cache, ids, [](Index, Matrix<T>&) {}));
  }

  /// decode without the head: the last block's output for `ids`. after_block(i, h) is called
  /// on the embeddings (i = -1) and after block i, and may change h (a composition hooks in here).
  template <class Hook>
  Matrix<T> decode_hidden(KvCache<T>& cache, const std::vector<int>& ids, Hook&& after_block) const {
    const Index n = Index(ids.size());
    detail::expect_positive(name(), "tokens to decode", n);
    if (Index(cache.k.size()) != Index(blocks.size()))
      throw value_error(detail::concat(name(), ": the cache has ", cache.k.size(), " layers, expected ", blocks.size(),
                                       " (use start_cache())"));
    for (std::size_t t = 0; t < ids.size(); ++t)
      if (ids[t] < 0 || ids[t] >= config_.vocab)
        throw value_error(detail::concat(name(), ": token id ", ids[t], " is outside the vocabulary [0, ", config_.vocab, ")"));
    std::vector<Index> positions(ids.size());
    std::iota(positions.begin(), positions.end(), cache.length);
    if (!llama && cache.length + n > config_.max_positions)
      throw value_error(detail::concat(name(), ": decoding past the ", config_.max_positions, " learned positions"));
    const Index K = cache.length + n;
    const std::vector<unsigned char> valid(std::size_t(K), 1);
    const BlockInputs<T> in{{1, n, config_.heads, config_.kv_heads, config_.head_dim(), K}, &valid, &positions, opt_ptr(rope_q_), opt_ptr(rope_k_)};
    Matrix<T> h = embed(ids, positions), out;
    after_block(Index(-1), h);
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      blocks[i].forward(h, in, out, &cache, Index(i));
      h.swap(out);
      after_block(Index(i), h);
    }
    cache.length = K;
    return h;
  }

  /// Logits of final hidden states h (before the final norm): (rows, vocab).
  Matrix<T> head_logits(In<T> h) const { return final_norm.forward(h).y * head_weight().transpose(); }

  /// The loss of the current batch (its labels).
  const CrossEntropy<T>& loss_function() const { return loss_; }

  /// Continues `prompt` by up to max_new_tokens tokens with a KV cache; returns the new tokens.
  std::vector<int> generate(const std::vector<int>& prompt, const SamplingOptions& s) const {
    KvCache<T> cache = start_cache();
    return sample_loop<T>(name(), prompt, s, [&](const std::vector<int>& ids) { return decode(cache, ids); });
  }

  // --- checkpoints -----------------------------------------------------------------------------

  /// One frozen tensor in Hugging Face naming: its parts in moet's (in, out) layout, joined along
  /// columns; transposed: stored (out, in) as nn.Linear does; vector: stored 1-D.
  struct BaseTensor {
    std::string name;
    std::vector<Frozen<T>*> parts;
    bool transposed = false;
    bool vector = false;
  };

  /// Every frozen tensor of the base model with its Hugging Face name.
  std::vector<BaseTensor> base_tensors(const std::string& gpt2_prefix = "transformer.") {
    std::vector<BaseTensor> out;
    auto add = [&](std::string n, std::vector<Frozen<T>*> parts, bool transposed = false, bool vector = false) {
      out.push_back({std::move(n), std::move(parts), transposed, vector});
    };
    if constexpr (llama) {
      add("model.embed_tokens.weight", {&wte.table});
      for (std::size_t i = 0; i < blocks.size(); ++i) {
        auto& b = blocks[i];
        const std::string p = "model.layers." + std::to_string(i) + ".";
        add(p + "input_layernorm.weight", {&b.norm1.weight}, false, true);
        add(p + "self_attn.q_proj.weight", {&b.q.weight()}, true);
        add(p + "self_attn.k_proj.weight", {&b.k.weight()}, true);
        add(p + "self_attn.v_proj.weight", {&b.v.weight()}, true);
        add(p + "self_attn.o_proj.weight", {&b.o_proj.weight()}, true);
        add(p + "post_attention_layernorm.weight", {&b.norm2.weight}, false, true);
        add(p + "mlp.gate_proj.weight", {&b.gate.weight()}, true);
        add(p + "mlp.up_proj.weight", {&b.up.weight()}, true);
        add(p + "mlp.down_proj.weight", {&b.down.weight()}, true);
      }
      add("model.norm.weight", {&final_norm.weight}, false, true);
      if (lm_head) add("lm_head.weight", {&*lm_head});
    } else {
      const std::string& t = gpt2_prefix;
      add(t + "wte.weight", {&wte.table});
      add(t + "wpe.weight", {&wpe->table});
      for (std::size_t i = 0; i < blocks.size(); ++i) {
        auto& b = blocks[i];
        const std::string p = t + "h." + std::to_string(i) + ".";
        add(p + "ln_1.weight", {&b.norm1.weight}, false, true);
        add(p + "ln_1.bias", {&b.norm1.bias}, false, true);
        add(p + "attn.c_attn.weight", {&b.q.weight(), &b.k.weight(), &b.v.weight()});
        add(p + "attn.c_attn.bias", {&b.q.bias(), &b.k.bias(), &b.v.bias()}, false, true);
        add(p + "attn.c_proj.weight", {&b.o_proj.weight()});
        add(p + "attn.c_proj.bias", {&b.o_proj.bias()}, false, true);
        add(p + "ln_2.weight", {&b.norm2.weight}, false, true);
        add(p + "ln_2.bias", {&b.norm2.bias}, false, true);
        add(p + "mlp.c_fc.weight", {&b.up.weight()});
        add(p + "mlp.c_fc.bias", {&b.up.bias()}, false, true);
        add(p + "mlp.c_proj.weight", {&b.down.weight()});
        add(p + "mlp.c_proj.bias", {&b.down.bias()}, false, true);
      }
      add(t + "ln_f.weight", {&final_norm.weight}, false, true);
      add(t + "ln_f.bias", {&final_norm.bias}, false, true);
    }
    return out;
  }

  /// Folds every plain-LoRA slot (LoRAAdapter<R>) into the frozen weights and restarts it
  /// (ReLoRA): the model's function is unchanged; returns how many slots were merged. Start a
  /// new optimizer afterwards, its moments belong to the old factors.
  int merge_lora_into_base(Rng& rng) {
    int merged = 0;
    for (auto& b : blocks)
      merged += b.q.merge_into_base(rng) + b.k.merge_into_base(rng) + b.v.merge_into_base(rng) + b.o_proj.merge_into_base(rng) +
                b.up.merge_into_base(rng) + b.gate.merge_into_base(rng) + b.down.merge_into_base(rng);
    return merged;
  }

  /// Every trainable tensor with a stable name: "layers.<i>.<slot>.<parameter>".
  template <class F>
  void for_each_named_param(F&& f) {
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      auto& b = blocks[i];
      const std::string p = "layers." + std::to_string(i) + ".";
      auto slot = [&](const char* slot_name, auto& s) {
        std::vector<std::string> seen;
        for_each_param(s, [&](Param<T>& param) {
          const auto repeats = std::count(seen.begin(), seen.end(), param.name());
          seen.push_back(param.name());
          f(p + slot_name + "." + param.name() + (repeats ? "." + std::to_string(repeats) : ""), param);
        });
      };
      slot("q", b.q), slot("k", b.k), slot("v", b.v), slot("keys", b.keys), slot("values", b.values), slot("o", b.o_proj);
      slot("ffn_up", b.up), slot("ffn_gate", b.gate), slot("ffn_hidden", b.hidden), slot("ffn_down", b.down);
    }
  }

  /// Which adapter sits where, e.g. {"layers.0.q": "Mixture<Router<Soft>, Expert<LoRA<4>>, 10>", ...}.
  std::map<std::string, std::string> adapter_layout() const {
    std::map<std::string, std::string> out;
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      const std::string p = "layers." + std::to_string(i) + ".";
      auto put = [&]<class S>(S, bool adapted) {
        if constexpr (!std::is_void_v<typename Spec::template entry<S>>)
          if (adapted) out[p + S::name] = Spec::template entry<S>::spec::name();
      };
      const auto& b = blocks[i];
      put(slot::q{}, b.q.adapted()), put(slot::k{}, b.k.adapted()), put(slot::v{}, b.v.adapted());
      put(slot::o{}, b.o_proj.adapted()), put(slot::ffn_up{}, b.up.adapted()), put(slot::ffn_gate{}, b.gate.adapted());
      put(slot::ffn_down{}, b.down.adapted()), put(slot::keys{}, b.keys.adapted()), put(slot::values{}, b.values.adapted());
      put(slot::ffn_hidden{}, b.hidden.adapted());
    }
    return out;
  }

 private:
  static const io::ModelConfig& checked(const io::ModelConfig& c) {
    if ((c.architecture == io::Architecture::llama) != llama)
      throw value_error(detail::concat(name(), ": the config describes a ", c.architecture == io::Architecture::llama ? "llama" : "gpt2",
                                       " model, expected ", Arch::name));
    for (auto [what, v] : {std::pair{"vocab", c.vocab}, {"d_model", c.d_model}, {"layers", c.layers}, {"heads", c.heads},
                           {"kv_heads", c.kv_heads}, {"d_ff", c.d_ff}, {"max_positions", c.max_positions}})
      detail::expect_positive(name(), what, v);
    if (c.d_model % c.heads || c.heads % c.kv_heads)
      throw value_error(detail::concat(name(), ": d_model ", c.d_model, ", heads ", c.heads, " and kv_heads ", c.kv_heads,
                                       " do not divide"));
    if constexpr (!llama)
      if (c.kv_heads != c.heads) throw value_error(name() + ": GPT-2 has as many key/value heads as heads");
    auto check_layers = [&]<class S>(S) {
      using E = typename Spec::template entry<S>;
      if constexpr (!std::is_void_v<E>)
        if constexpr (requires { E::where::max(); })
          if (E::where::max() >= c.layers)
            throw value_error(detail::concat(name(), ": slot ", S::name, " is placed on layer ", E::where::max(),
                                             " but the model has ", c.layers, " layers"));
    };
    check_layers(slot::q{}), check_layers(slot::k{}), check_layers(slot::v{}), check_layers(slot::o{});
    check_layers(slot::ffn_up{}), check_layers(slot::ffn_gate{}), check_layers(slot::ffn_down{});
    check_layers(slot::keys{}), check_layers(slot::values{}), check_layers(slot::ffn_hidden{});
    return c;
  }

  static const Rotary<T>* opt_ptr(const std::optional<Rotary<T>>& r) { return r ? &*r : nullptr; }


  Matrix<T> embed(const std::vector<int>& ids, const std::vector<Index>& positions) const {
    Matrix<T> h = wte.lookup(ids);
    if constexpr (!llama)
      for (std::size_t t = 0; t < ids.size(); ++t) h.row(Index(t)) += wpe->table.value().row(positions[t]);
    return h;
  }

  io::ModelConfig config_;
  ModelOptions options_;
  std::optional<Rotary<T>> rope_q_, rope_k_;  // Llama
  TokenBatch batch_;
  std::vector<Index> positions_;
  CrossEntropy<T> loss_;
  Matrix<T> h0_;

 public:
  BOOST_HANA_DEFINE_STRUCT(DecoderModel, (Embedding<T>, wte), (std::optional<Embedding<T>>, wpe), (std::vector<BlockType>, blocks),
                           (Norm, final_norm), (std::optional<Frozen<T>>, lm_head));
};

}  // namespace cpu_impl

template <class Arch, class SlotList, class T>
struct LayerFor<Decoder<Arch, SlotList>, T, cpu> {
  using type = cpu_impl::DecoderModel<Decoder<Arch, SlotList>, T>;
};

}  // namespace moet
