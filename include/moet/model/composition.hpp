// CALM, written once over a backend's ops: frozen decoders (an anchor and one or more augmenting
// models) joined by trained composition layers (the backend's ops::Composition). The anchor's and
// the augmenting models' blocks run through the decoder's own block loop (run_blocks and
// backward_blocks); this class only orders the runs around the composition points.
//
// Training: each augmenting model runs forward only, up to the deepest layer a composition reads,
// keeping nothing but the states the compositions read. The anchor keeps what backward needs
// above its lowest composition; backward stops there (nothing below is trained).
#pragma once

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <boost/hana/define_struct.hpp>

#include "../calm.hpp"
#include "../core/error.hpp"
#include "../core/random.hpp"
#include "../core/visit.hpp"
#include "batch.hpp"
#include "decoder.hpp"

namespace moet {

/// The models' inputs: the same ids for all, or (different vocabularies) one batch per model.
struct ComposedBatch {
  TokenBatch anchor;
  TokenBatch augment;                 ///< empty ids: the anchor's batch
  std::vector<TokenBatch> augments;   ///< per augmenting model (several); an empty one or a missing one: `augment`
};

/// A composed batch checked against every model: each one's geometry and each augmenting model's
/// cross-attention geometry.
struct ComposedGeometry {
  std::shared_ptr<const BatchGeometry> anchor;
  std::vector<std::shared_ptr<const BatchGeometry>> augments;
  std::vector<std::shared_ptr<const CrossAttentionGeometry>> cross;  // per augmenting model
};

namespace model_impl {

/// Decoding state of a composed model: every model's cache and each composition layer's keys
/// and values.
template <class Ops>
struct ComposedCache {
  KvCache<Ops> anchor;
  std::vector<KvCache<Ops>> augments;
  std::vector<KvLayer<Ops>> composition;
};

/// Where a composition layer sits: it reads layer i of augmenting model m and writes after the
/// anchor's layer j (-1: the embeddings).
struct Site {
  Index augment = 0, i = 0, j = 0;
};

template <class Spec, class T, class Backend>
class ComposedModel {
  using Ops = ops<Backend, T>;
  using Tensor = typename Ops::Tensor;
  using View = typename Ops::View;
  using Entries = typename Spec::augments;
  using Composition = typename Ops::Composition;
  template <class E>
  using model_of = typename E::model::template model<T, Backend>;
  template <class L>
  struct models_of;
  template <class... E>
  struct models_of<type_list<E...>> {
    using type = std::tuple<model_of<E>...>;
    using placements = type_list<typename E::placement...>;
  };

 public:
  using Scalar = T;
  using Device = typename Ops::Device;
  using AnchorModel = typename Spec::anchor::template model<T, Backend>;
  using AugmentModels = typename models_of<Entries>::type;
  static constexpr std::size_t augment_count = Entries::size;
  using Geometry = std::shared_ptr<const ComposedGeometry>;
  using Cache = ComposedCache<Ops>;

  struct Context {
    Geometry geometry;
    Tensor h0;                                     // the anchor's embedded batch, when forward embedded it
    std::vector<Tensor> augment_states;            // per site: m_A's output at layer i
    std::vector<Tensor> composed_in;               // per site: the anchor state the composition read
    std::vector<std::optional<typename Composition::Context>> composition;  // per site
    /// The anchor's block runs between composition points; run r starts on the output of site
    /// run_input[r] (-1: the embedded batch).
    std::vector<typename AnchorModel::BlockRun> runs;
    std::vector<Index> run_input;
    Tensor top;  // the last block's output (composed)
    typename AnchorModel::Context head;  // final norm, loss (and its gradient)
    bool to_input = false;               // kept everything down to h0 (the harness's view)

    auto output() const { return head.output(); }
    double aux_loss() const { return head.aux_loss(); }
  };

  static std::string name() { return Spec::name(); }

  /// From configs: random frozen models (load checkpoints into anchor and augment<m>()).
  ComposedModel(Device device, const io::ModelConfig& anchor_config, const std::vector<io::ModelConfig>& augment_configs, Rng& rng,
                const ComposeOptions& options = {})
      : ComposedModel(device, AnchorModel(device, anchor_config, rng),
                      make_augments(device, augment_configs, rng, std::make_index_sequence<augment_count>{}), rng, options) {}
  ComposedModel(Device device, const io::ModelConfig& anchor_config, const io::ModelConfig& augment_config, Rng& rng,
                const ComposeOptions& options = {})
    requires(augment_count == 1)
      : ComposedModel(device, anchor_config, std::vector<io::ModelConfig>{augment_config}, rng, options) {}

  /// From (pretrained) models, moved in.
  ComposedModel(Device device, AnchorModel&& anchor_model, AugmentModels&& augment_models, Rng& rng,
                const ComposeOptions& options = {})
      : device_(device), anchor(std::move(anchor_model)), augments(std::move(augment_models)) {
    sites_ = make_sites(options);
    rotary_theta_ = options.rotary_theta;
    const Index heads = Spec::cross_attention::heads ? Spec::cross_attention::heads : anchor.config().heads;
    for (const Site& s : sites_)
      composition.emplace_back(device, anchor.config().d_model, augment_config(s.augment).d_model, heads, rng,
                               options.init_stddev, options.rotary_theta);
    arena_ = typename Ops::GradientArena(*this);
  }
  ComposedModel(Device device, AnchorModel&& anchor_model, typename std::tuple_element_t<0, AugmentModels>&& augment_model, Rng& rng,
                const ComposeOptions& options = {})
    requires(augment_count == 1)
      : ComposedModel(device, std::move(anchor_model), AugmentModels(std::move(augment_model)), rng, options) {}

  // The CPU shorthands: no device handle.
  ComposedModel(const io::ModelConfig& anchor_config, const std::vector<io::ModelConfig>& augment_configs, Rng& rng,
                const ComposeOptions& options = {})
    requires std::is_same_v<Device, CpuDevice>
      : ComposedModel(CpuDevice{}, anchor_config, augment_configs, rng, options) {}
  ComposedModel(const io::ModelConfig& anchor_config, const io::ModelConfig& augment_config, Rng& rng,
                const ComposeOptions& options = {})
    requires(std::is_same_v<Device, CpuDevice> && augment_count == 1)
      : ComposedModel(CpuDevice{}, anchor_config, augment_config, rng, options) {}
  ComposedModel(AnchorModel&& anchor_model, AugmentModels&& augment_models, Rng& rng, const ComposeOptions& options = {})
    requires std::is_same_v<Device, CpuDevice>
      : ComposedModel(CpuDevice{}, std::move(anchor_model), std::move(augment_models), rng, options) {}
  ComposedModel(AnchorModel&& anchor_model, typename std::tuple_element_t<0, AugmentModels>&& augment_model, Rng& rng,
                const ComposeOptions& options = {})
    requires(std::is_same_v<Device, CpuDevice> && augment_count == 1)
      : ComposedModel(CpuDevice{}, std::move(anchor_model), std::move(augment_model), rng, options) {}
  ComposedModel(ComposedModel&&) noexcept = default;

  /// The composition layers' gradients in one buffer.
  typename Ops::GradientArena& gradient_arena() { return arena_; }

  /// Augmenting model m.
  template <std::size_t M = 0>
  auto& augment() {
    return std::get<M>(augments);
  }
  template <std::size_t M = 0>
  const auto& augment() const {
    return std::get<M>(augments);
  }

  /// Every composition layer's (augment, i, j), ordered by j (then by augment): composition[k]'s site is sites()[k].
  const std::vector<Site>& sites() const { return sites_; }
  /// ComposeOptions::rotary_theta the composition layers were built with.
  double rotary_theta() const { return rotary_theta_; }

  /// Every trainable tensor with a stable name (save_adapters, load_adapters): composition
  /// layer k's as "composition.<k>.<parameter>" (the models it joins are frozen).
  template <class F>
  void for_each_named_param(F&& f) {
    for (std::size_t k = 0; k < composition.size(); ++k)
      for_each_param(composition[k], [&](auto& p) { f(detail::concat("composition.", k, ".", p.name()), p); });
  }

  /// (augment layer i, anchor layer j) of each composition layer, in the order of sites().
  std::vector<std::pair<Index, Index>> pairs() const {
    std::vector<std::pair<Index, Index>> out;
    for (const Site& s : sites_) out.emplace_back(s.i, s.j);
    return out;
  }

  // --- batches -----------------------------------------------------------------------------------

  /// Checks every model's batch (the augmenting models' without targets) and their agreement.
  Geometry geometry(const ComposedBatch& b) const {
    auto g = std::make_shared<ComposedGeometry>();
    for (std::size_t m = 0; m < augment_count; ++m) {
      const TokenBatch& aug = m < b.augments.size() && !b.augments[m].ids.empty() ? b.augments[m]
                              : b.augment.ids.empty()                               ? b.anchor
                                                                                    : b.augment;
      if (aug.batch != b.anchor.batch || aug.seq != b.anchor.seq)
        throw shape_error(detail::concat(name(), ": the augmenting model's batch", augment_count > 1 ? detail::concat(" ", m) : "",
                                         " is ", aug.batch, " x ", aug.seq, " tokens but the anchor's is ", b.anchor.batch,
                                         " x ", b.anchor.seq, " (both read the same positions)"));
      g->augments.push_back(with_augment(m, [&](const auto& model) { return model.geometry(without_targets(aug)); }));
    }
    g->anchor = anchor.geometry(b.anchor);
    for (std::size_t m = 0; m < augment_count; ++m)
      g->cross.push_back(CrossAttentionGeometry::make(b.anchor.batch, b.anchor.seq, b.anchor.seq, g->augments[m]->mask,
                                                      g->anchor->positions, g->augments[m]->positions));
    return g;
  }
  Geometry geometry(const TokenBatch& b) const { return geometry(ComposedBatch{b, {}, {}}); }

  // --- training ---------------------------------------------------------------------------------

  /// Forward of a batch; the augmenting models run forward only.
  Context forward(const ComposedBatch& b, bool for_backward = true) const {
    Geometry g = geometry(b);
    Context c;
    c.h0 = anchor.embed(*g->anchor);
    c.geometry = std::move(g);
    c.augment_states = augment_states(*c.geometry);
    forward_anchor(c, c.h0, for_backward, false);
    return c;
  }
  Context forward(const TokenBatch& b, bool for_backward = true) const { return forward(ComposedBatch{b, {}, {}}, for_backward); }

  /// Forward from given anchor embeddings h0 (tokens, D_B) and the states each augmenting model
  /// hands its compositions: for augment m, its sites' states stacked in site order
  /// (sites of m * tokens, D_A of m). The gradient harness's view: everything is kept down to h0.
  Context forward(Geometry g, View h0, const std::vector<View>& stacked_states) const {
    check_geometry(g);
    if (stacked_states.size() != augment_count)
      throw shape_error(detail::concat(name(), ": ", stacked_states.size(), " stacked state tensors for ", augment_count,
                                       " augmenting models"));
    const Index n = g->anchor->tokens();
    const auto [h0_rows, h0_cols] = Ops::shape(h0);
    detail::expect_shape(name(), "anchor embeddings h0", h0_rows, h0_cols, n, anchor.config().d_model, "tokens x d_model");
    Context c;
    c.geometry = std::move(g);
    std::vector<Index> seen(augment_count, 0);
    for (const Site& s : sites_) {
      const View states = stacked_states[std::size_t(s.augment)];
      const Index width = augment_config(s.augment).d_model, sites_of_m = sites_of(s.augment);
      const auto [states_rows, states_cols] = Ops::shape(states);
      detail::expect_shape(name(), "stacked augmenting states", states_rows, states_cols, sites_of_m * n, width,
                           "(sites of the augmenting model * tokens) x its d_model");
      c.augment_states.emplace_back(Ops::rows(states, seen[std::size_t(s.augment)]++ * n, n));
    }
    forward_anchor(c, h0, true, true);
    return c;
  }

  /// Returns {d h0, d stacked states of each augmenting model} for forward(g, h0, states).
  std::pair<Tensor, std::vector<Tensor>> backward(const Context& c, View h0, View d_loss, GradMode mode) {
    if (!c.to_input) throw value_error(name() + ": backward to the inputs needs forward(geometry, h0, states)");
    const Index n = c.geometry->anchor->tokens();
    std::vector<Tensor> d_states;
    for (std::size_t m = 0; m < augment_count; ++m)
      d_states.push_back(Ops::zeros(sites_of(Index(m)) * n, augment_config(Index(m)).d_model));
    Tensor dh = backward_anchor(c, h0, d_loss, mode, &d_states);
    return {std::move(dh), std::move(d_states)};
  }

  /// Backward of forward(batch) from d(loss) = 1, down to the lowest composition layer.
  void backward(const Context& c, GradMode mode) {
    if (Ops::empty(c.h0)) throw value_error(name() + ": this context comes from forward(geometry, h0, states); call backward(c, h0, d_loss, mode)");
    backward_anchor(c, c.h0, Ops::scalar_one(), mode, nullptr);
  }

  /// forward, backward, clip, step; a non-finite loss or gradient norm is handled as
  /// on_non_finite says (NonFinite, model/decoder.hpp).
  template <class Optimizer>
  TrainStepResult train_step(const ComposedBatch& b, Optimizer& optimizer, double max_grad_norm = 1.0,
                             NonFinite on_non_finite = NonFinite::raise) {
    accumulate_gradients(b, 0, 1);  // the composition layers' gradients (nothing else trains)
    return apply_gradients(optimizer, max_grad_norm, on_non_finite);
  }
  template <class Optimizer>
  TrainStepResult train_step(const TokenBatch& b, Optimizer& optimizer, double max_grad_norm = 1.0,
                             NonFinite on_non_finite = NonFinite::raise) {
    return train_step(ComposedBatch{b, {}, {}}, optimizer, max_grad_norm, on_non_finite);
  }

  /// Gradient accumulation, as the decoder's (model/decoder.hpp): part `part` of `parts`, in
  /// order from 0; apply_gradients ends the step with the mean over the parts.
  void accumulate_gradients(const ComposedBatch& b, int part, int parts) {
    accumulated_.run(name(), part, parts, [&](typename Ops::StepSum& sum, bool first) {
      const Context c = forward(b);
      backward(c, first ? GradMode::overwrite : GradMode::accumulate);
      Ops::add_to_step(sum, c.output(), &c.head.aux, first);
    });
  }
  void accumulate_gradients(const TokenBatch& b, int part, int parts) { accumulate_gradients(ComposedBatch{b, {}, {}}, part, parts); }
  template <class Optimizer>
  TrainStepResult apply_gradients(Optimizer& optimizer, double max_grad_norm = 1.0, NonFinite on_non_finite = NonFinite::raise) {
    return accumulated_.apply(name(), *this, optimizer, max_grad_norm, on_non_finite, skipped_steps_);
  }

  /// Training steps skipped for a non-finite loss or gradient (NonFinite::skip).
  long skipped_steps() const { return skipped_steps_; }

  double loss(const ComposedBatch& b) const { return Ops::scalar(forward(b, false).output()); }
  double loss(const TokenBatch& b) const { return loss(ComposedBatch{b, {}, {}}); }

  /// Logits of every position: (batch*seq, anchor vocab).
  Tensor logits(const ComposedBatch& b) const {
    ComposedBatch unlabelled = b;
    unlabelled.anchor = without_targets(b.anchor);
    const Context c = forward(unlabelled, false);
    return Ops::head_logits(c.head.final_norm.output(), anchor.head_weight());
  }
  Tensor logits(const TokenBatch& b) const { return logits(ComposedBatch{b, {}, {}}); }

  // --- generation -------------------------------------------------------------------------------

  Cache start_cache(Index capacity = 0) const {
    Cache cache{anchor.start_cache(capacity), {}, {}};
    for (std::size_t m = 0; m < augment_count; ++m)
      cache.augments.push_back(with_augment(m, [&](const auto& model) { return model.start_cache(capacity); }));
    for (std::size_t k = 0; k < sites_.size(); ++k)
      cache.composition.push_back({KvBuffer<Ops>(anchor.config().d_model, capacity), KvBuffer<Ops>(anchor.config().d_model, capacity)});
    return cache;
  }

  /// Feeds ids to every model (augment_ids: the augmenting models' ids when their vocabulary
  /// differs; decode_each: one list per augmenting model).
  Tensor decode(Cache& cache, const std::vector<int>& ids, const std::vector<int>& augment_ids = {}) const {
    return decode_each(cache, ids, std::vector<std::vector<int>>(augment_count, augment_ids.empty() ? ids : augment_ids));
  }
  Tensor decode_each(Cache& cache, const std::vector<int>& ids, const std::vector<std::vector<int>>& per_augment) const {
    if (per_augment.size() != augment_count)
      throw shape_error(detail::concat(name(), ": ids for ", per_augment.size(), " augmenting models, expected ", augment_count));
    for (const auto& aug_ids : per_augment)
      if (aug_ids.size() != ids.size())
        throw shape_error(detail::concat(name(), ": ", aug_ids.size(), " augmenting ids for ", ids.size(), " anchor ids"));
    if (cache.augments.size() != augment_count || cache.composition.size() != sites_.size())
      throw value_error(name() + ": the cache was not made by this model's start_cache()");
    // Every model checks its ids before any cache moves; a failure past this point (out of
    // memory) rewinds them all: a rejected call leaves the caches as they were.
    for (std::size_t m = 0; m < augment_count; ++m)
      with_augment(m, [&](const auto& model) {
        model.check_decode(cache.augments[m], per_augment[m]);
        return 0;
      });
    anchor.check_decode(cache.anchor, ids);
    const auto anchor_mark = cache.anchor.mark();
    const KvMark composition_mark = kv_mark(cache.composition);
    std::vector<typename KvCache<Ops>::Mark> augment_marks;
    for (const auto& a : cache.augments) augment_marks.push_back(a.mark());
    try {
      return decode_unchecked(cache, ids, per_augment);
    } catch (...) {
      cache.anchor.rewind(anchor_mark);
      kv_rewind(cache.composition, composition_mark);
      for (std::size_t m = 0; m < cache.augments.size(); ++m) cache.augments[m].rewind(augment_marks[m]);
      throw;
    }
  }

  std::vector<int> generate(const std::vector<int>& prompt, const SamplingOptions& s) const {
    check_generate(prompt, std::vector<std::vector<int>>(augment_count, prompt), s);
    Cache cache = start_cache(anchor.cache_reserve(prompt, s));
    return sample_loop<Ops>(name(), prompt, s, [&](const std::vector<int>& ids) { return decode(cache, ids); });
  }

  /// Different vocabularies: each model reads its own prompt (the same length), and each token
  /// the anchor emits is fed to the augmenting models as to_augment(token).
  template <class ToAugment>
  std::vector<int> generate(const std::vector<int>& prompt, const std::vector<int>& augment_prompt, const SamplingOptions& s,
                            ToAugment&& to_augment) const {
    check_generate(prompt, std::vector<std::vector<int>>(augment_count, augment_prompt), s);
    Cache cache = start_cache(anchor.cache_reserve(prompt, s));
    bool first = true;
    return sample_loop<Ops>(name(), prompt, s, [&](const std::vector<int>& ids) {
      if (std::exchange(first, false)) return decode(cache, ids, augment_prompt);
      std::vector<int> aug(ids.size());
      std::transform(ids.begin(), ids.end(), aug.begin(), [&](int id) { return int(to_augment(id)); });
      return decode(cache, ids, aug);
    });
  }

 private:
  /// What generate checks before it starts: every model's prompt and positions.
  void check_generate(const std::vector<int>& prompt, const std::vector<std::vector<int>>& augment_prompts,
                      const SamplingOptions& s) const {
    anchor.check_generate(prompt, s);
    for (std::size_t m = 0; m < augment_count; ++m)
      with_augment(m, [&](const auto& model) {
        model.check_generate(augment_prompts[m], s);
        return 0;
      });
  }

  Tensor decode_unchecked(Cache& cache, const std::vector<int>& ids, const std::vector<std::vector<int>>& per_augment) const {
    std::vector<Tensor> states(sites_.size());
    for (std::size_t m = 0; m < augment_count; ++m)
      with_augment(m, [&](const auto& model) {
        model.decode_hidden(cache.augments[m], per_augment[m], [&](Index i, Tensor& h) {
          for (std::size_t k = 0; k < sites_.size(); ++k)
            if (sites_[k].augment == Index(m) && sites_[k].i == i) states[k] = Ops::copy(h);
        });
        return 0;
      });
    const Index anchor_start = cache.anchor.length;
    const Tensor top = anchor.decode_hidden(cache.anchor, ids, [&](Index j, Tensor& h) {
      for (std::size_t k = 0; k < sites_.size(); ++k)
        if (sites_[k].j == j)
          h = composition[k].forward_cached(h, states[k], cache.composition[k].k, cache.composition[k].v, anchor_start);
    });
    return anchor.head_logits(top);
  }

  template <std::size_t... M>
  static AugmentModels make_augments(Device device, const std::vector<io::ModelConfig>& configs, Rng& rng,
                                     std::index_sequence<M...>) {
    if (configs.size() != augment_count)
      throw value_error(detail::concat(name(), ": ", configs.size(), " augmenting configs for ", augment_count,
                                       " augmenting models"));
    // Built in order (a braced list is evaluated left to right): the random draws are reproducible.
    return AugmentModels{std::tuple_element_t<M, AugmentModels>(device, configs[M], rng)...};
  }

  /// f(augment model m), for a runtime m.
  template <class F>
  decltype(auto) with_augment(std::size_t m, F&& f) const {
    return with_index<augment_count>(m, [&](auto i) { return f(std::get<i()>(augments)); });
  }

  const io::ModelConfig& augment_config(Index m) const {
    return *with_augment(std::size_t(m), [](const auto& model) { return &model.config(); });
  }

  Index sites_of(Index m) const {
    return Index(std::count_if(sites_.begin(), sites_.end(), [&](const Site& s) { return s.augment == m; }));
  }

  void check_geometry(const Geometry& g) const {
    if (!g || !g->anchor || g->augments.size() != augment_count || g->cross.size() != augment_count)
      throw value_error(name() + ": no composed batch geometry (make one with geometry(batch))");
  }

  std::vector<Site> make_sites(const ComposeOptions& options) const {
    const Index NB = anchor.config().layers;
    std::vector<Site> sites;
    [&]<class... P>(type_list<P...>) {
      Index m = 0;
      (add_sites<P>(sites, m++, NB, options), ...);
    }(typename models_of<Entries>::placements{});
    std::stable_sort(sites.begin(), sites.end(), [](const Site& x, const Site& y) { return x.j < y.j; });
    return sites;
  }

  template <class Placement>
  void add_sites(std::vector<Site>& sites, Index m, Index NB, const ComposeOptions& options) const {
    const Index NA = augment_config(m).layers;
    const std::string which = augment_count > 1 ? detail::concat(" ", m) : "";
    std::vector<std::pair<Index, Index>> pairs;
    if constexpr (std::is_same_v<Placement, FromOptions>) {
      pairs = std::size_t(m) < options.augment_pairs.size() && !options.augment_pairs[std::size_t(m)].empty()
                  ? options.augment_pairs[std::size_t(m)]
                  : options.pairs;
      if (pairs.empty()) throw value_error(name() + ": FromOptions placement needs ComposeOptions::pairs");
    } else {
      const Index K = Placement::spacing;
      if (NB % K)
        throw value_error(detail::concat(name(), ": Every<", K, "> needs the anchor's layer count to be a multiple of ", K,
                                         ", got ", NB, " layers"));
      const Index n = NB / K;
      if (NA % n)
        throw value_error(detail::concat(name(), ": ", n, " composition layers need the augmenting model", which,
                                         "'s layer count to be a multiple of ", n, ", got ", NA, " layers"));
      for (Index k = 0; k < n; ++k) pairs.emplace_back((k + 1) * (NA / n) - 1, (k + 1) * K - 1);
    }
    for (const auto& [i, j] : pairs) {
      if (i < -1 || i >= NA || j < -1 || j >= NB)
        throw value_error(detail::concat(name(), ": composition pair (", i, ", ", j, ") names a layer that does not exist: the "
                                                 "augmenting model", which, " has layers -1..", NA - 1, ", the anchor -1..", NB - 1,
                                         " (-1: the embeddings)"));
      sites.push_back({m, i, j});
    }
  }

  /// Each site's state: its augmenting model's output at layer i (forward only, nothing else kept).
  std::vector<Tensor> augment_states(const ComposedGeometry& g) const {
    std::vector<Tensor> states(sites_.size());
    for (std::size_t m = 0; m < augment_count; ++m)
      with_augment(m, [&](const auto& model) {
        const BatchGeometry& ag = *g.augments[m];
        const auto in = model.inputs(ag);
        std::vector<Index> layers_read;
        for (const Site& s : sites_)
          if (s.augment == Index(m)) layers_read.push_back(s.i);
        std::sort(layers_read.begin(), layers_read.end());
        Tensor h = model.embed(ag);
        Index done = 0;  // blocks [0, done) have run
        for (Index i : layers_read) {
          if (i + 1 > done) {
            h = model.run_blocks(h, done, i + 1, in, Keep::nothing, nullptr, nullptr);
            done = i + 1;
          }
          for (std::size_t k = 0; k < sites_.size(); ++k)
            if (sites_[k].augment == Index(m) && sites_[k].i == i && Ops::empty(states[k])) states[k] = Ops::copy(h);
        }
        return 0;
      });
    return states;
  }

  /// Runs the anchor from h0 with the compositions in place; to_input: keep everything down to h0.
  void forward_anchor(Context& c, View h0, bool for_backward, bool to_input) const {
    const auto& g = *c.geometry;
    const auto in = anchor.inputs(*g.anchor);
    const Index NB = Index(anchor.blocks.size()), lowest = sites_.front().j;
    const Keep above = anchor.options().recompute ? Keep::inputs : Keep::everything;
    c.to_input = to_input;
    c.composed_in.resize(sites_.size());
    c.composition.resize(sites_.size());
    Tensor h;
    Index input_site = -1, start = 0;
    auto current = [&]() -> View { return input_site < 0 && Ops::empty(h) ? h0 : View(h); };
    auto compose_at = [&](Index j) {
      for (std::size_t k = 0; k < sites_.size(); ++k)
        if (sites_[k].j == j) {
          const Site& s = sites_[k];
          c.composed_in[k] = Ops::copy(current());
          c.composition[k].emplace(composition[k].forward(c.composed_in[k], c.augment_states[k], g.cross[std::size_t(s.augment)]));
          h = Ops::copy(c.composition[k]->output());
          input_site = Index(k);
        }
    };
    compose_at(-1);
    for (Index j = 0; j < NB; ++j) {
      const bool last_block = j + 1 == NB;
      bool composes = false;
      for (const Site& s : sites_) composes |= s.j == j;
      if (!composes && !last_block) continue;
      typename AnchorModel::BlockRun run;
      const Keep keep = to_input || start > lowest ? above : Keep::nothing;
      Tensor out = anchor.run_blocks(current(), start, j + 1, in, keep, &run, &c.head.aux);
      c.runs.push_back(std::move(run));
      c.run_input.push_back(input_site);
      h = std::move(out);
      input_site = -2;  // a run's output (not a composition's): only a later composition reads it
      start = j + 1;
      compose_at(j);
    }
    c.top = std::move(h);
    c.head.batch = g.anchor;
    anchor.finish(c.head, c.top, for_backward);
  }

  /// Returns d(h0) when the context kept everything (else an empty tensor: backward stops at the
  /// lowest composition layer).
  Tensor backward_anchor(const Context& c, View h0, View d_loss, GradMode mode, std::vector<Tensor>* d_states) {
    const auto& g = *c.geometry;
    const auto in = anchor.inputs(*g.anchor);
    Tensor dh = Ops::empty(c.head.d_final)
                    ? Ops::head_loss_backward(c.head.loss_function, anchor.head_weight(), c.head.loss, c.head.final_norm.output(), d_loss)
                    : Ops::scaled(c.head.d_final, d_loss);
    dh = anchor.final_norm.backward(c.head.final_norm, c.top, dh, mode);
    std::vector<Index> seen(augment_count, 0);
    for (const Site& s : sites_) ++seen[std::size_t(s.augment)];  // counts; walked back below
    auto backward_compositions_at = [&](Index j) {
      for (std::size_t k = sites_.size(); k-- > 0;)
        if (sites_[k].j == j) {
          const Site& s = sites_[k];
          auto [d_in, d_a] = composition[k].backward(*c.composition[k], c.composed_in[k], c.augment_states[k], dh, mode);
          dh = std::move(d_in);
          const Index slot = --seen[std::size_t(s.augment)];
          if (d_states) Ops::copy_rows((*d_states)[std::size_t(s.augment)], slot * dh.rows(), d_a);
        }
    };
    for (std::size_t r = c.runs.size(); r-- > 0;) {
      const auto& run = c.runs[r];
      backward_compositions_at(run.last - 1);
      if (run.kept == Keep::nothing) return Tensor();  // below the lowest composition: nothing to train
      const Index input = c.run_input[r];
      const View x = input >= 0 ? View(c.composition[std::size_t(input)]->output()) : h0;
      dh = anchor.backward_blocks(run, x, std::move(dh), in, mode);
    }
    backward_compositions_at(-1);
    return dh;
  }

  [[no_unique_address]] Device device_;
  std::vector<Site> sites_;
  double rotary_theta_ = 0.0;
  typename Ops::GradientArena arena_;
  long skipped_steps_ = 0;  // train_step with NonFinite::skip
  detail::AccumulatedStep<Ops> accumulated_;  // accumulate_gradients' step so far

 public:
  BOOST_HANA_DEFINE_STRUCT(ComposedModel, (AnchorModel, anchor), (AugmentModels, augments), (std::vector<Composition>, composition));
};

}  // namespace model_impl

template <class Anchor, class Augment, class X, class P, class T, class Backend>
struct LayerFor<Compose<Anchor, Augment, X, P>, T, Backend> {
  using type = model_impl::ComposedModel<Compose<Anchor, Augment, X, P>, T, Backend>;
};

}  // namespace moet
