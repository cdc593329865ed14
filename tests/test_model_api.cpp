// The model level's contracts: forward contexts own their batch (two forwards in flight, their
// backwards in either order); per-layer mixtures (one slot, several specs on disjoint layers)
// and a user's expert with its own options in a slot pass the gradient harness in double; the
// two label conventions; auxiliary losses see real tokens only; sampling refuses NaN logits;
// the KV cache appends without copying itself.
#include <catch2/catch.hpp>

#include <moet/models.hpp>

#include <cmath>
#include <set>

#include "../examples/bottleneck_expert.hpp"
#include "model_harness.hpp"
#include "reference_sampling.hpp"

using namespace moet;
using namespace moet::slot;
using Catch::Matchers::Contains;

namespace {

io::ModelConfig gpt2_config(Index layers = 2) {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 11, c.d_model = 8, c.layers = layers, c.heads = 2, c.kv_heads = 2, c.d_ff = 12, c.max_positions = 16;
  return c;
}
io::ModelConfig llama_config(Index layers = 4) {
  io::ModelConfig c;
  c.architecture = io::Architecture::llama;
  c.vocab = 13, c.d_model = 8, c.layers = layers, c.heads = 4, c.kv_heads = 2, c.d_ff = 10, c.max_positions = 32;
  c.rope_theta = 500.0, c.tied_embeddings = false;
  return c;
}

ModelOptions double_options() { return testing::double_model_options(); }

TokenBatch batch_of(Index batch, Index seq, int vocab, int salt, std::vector<unsigned char> mask = {}) {
  TokenBatch b{batch, seq, {}, std::move(mask), {}};
  for (Index i = 0; i < batch * seq; ++i) b.ids.push_back(int((5 * i + salt) % vocab));
  return b;
}

template <class Model>
std::vector<Matrix<double>> gradients(Model& model) {
  std::vector<Matrix<double>> g;
  for_each_param(model, [&](auto& p) { g.emplace_back(p.grad()); });
  return g;
}

// Per-layer mixtures as in MoLA: few experts low, more experts high, and top-2 on the MLP.
using MoLA = Decoder<Llama, Slots<at<q, MoLoRA<2, 2>, layers<0, 1>>, at<q, MoLoRA<4, 2>, layers<2, 3>>,
                                  at<v, LoRAAdapter<2>, layers<0>>, at<v, MoLoRA<3, 1>, layers<3>>,
                                  at<ffn_down, Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 4>, layers<1, 3>>,
                                  at<ffn_hidden, MoV<2>, layers<0>>, at<ffn_hidden, MoV<3>, layers<2>>>>;

/// A user's expert whose options change its function: delta(x) = gain * x A (d_in, d_out).
struct Gained {
  struct Options {
    double gain = 1.0;
    double init_stddev = 0.1;
  };
  static std::string name() { return "Gained"; }
  template <class T>
  struct instance {
    struct Context {
      Matrix<T> out;
      const Matrix<T>& output() const { return out; }
    };
    BOOST_HANA_DEFINE_STRUCT(instance, (Param<T>, a));
    T gain;
    instance(ExpertShape shape, const Options& o, Rng& rng) : a("a", shape.d_in, shape.d_out), gain(T(o.gain)) {
      rng.fill_normal(a.value(), 0.0, o.init_stddev);
    }
    Context forward(In<T> x) const { return {Matrix<T>(gain * (x * a.value()))}; }
    Matrix<T> backward(const Context&, In<T> x, In<T> dy, GradMode mode) {
      detail::assign_grad(a.grad(), gain * (x.transpose() * dy), mode);
      return gain * (dy * a.value().transpose());
    }
  };
};
struct Gain3 {
  static void apply(MixtureOptions<Gained>& o) { o.expert.gain = 3.0; }
};
struct WideBottleneck {
  static void apply(MixtureOptions<Bottleneck<3>>& o) { o.expert.init_stddev = 0.5; }
};
using UserExperts = Decoder<GPT2, Slots<at<q, Mixture<Router<Soft>, Expert<Gained>, 2>, all_layers, Gain3>,
                                        at<ffn_up, Mixture<Router<TopK<1>>, Expert<Bottleneck<3>>, 2>, layers<1>, WideBottleneck>>>;

}  // namespace

TEST_CASE("Two forwards in flight: backwards in reverse order give each batch's own gradients", "[model]") {
  using Model = Decoder<GPT2, Slots<at<q, MoLoRA<3, 2>>, at<keys, MoV<2>>, at<ffn_down, LoRAAdapter<2>>>>;
  Rng rng(21);
  Model::model<double> model(gpt2_config(), rng, double_options(), 0.3);
  for_each_param(model, [&](auto& p) { rng.fill_normal(p.value(), 0.0, 0.3); });
  const TokenBatch a = batch_of(2, 5, 11, 1, {0, 1, 1, 1, 1, 1, 1, 1, 1, 0}), b = batch_of(1, 7, 11, 4);

  model.backward(model.forward(a), overwrite);
  const auto alone_a = gradients(model);
  model.backward(model.forward(b), overwrite);
  const auto alone_b = gradients(model);

  const auto ca = model.forward(a);
  const auto cb = model.forward(b);
  (void)model.loss(a), (void)model.logits(b);  // other calls in between change nothing either
  model.backward(cb, overwrite);
  REQUIRE(gradients(model) == alone_b);
  model.backward(ca, overwrite);
  REQUIRE(gradients(model) == alone_a);
  REQUIRE(alone_a != alone_b);
}

TEST_CASE("Per-layer mixtures (several specs in one slot) pass the gradient check", "[grad][model]") {
  Rng rng(22);
  MoLA::model<double> model(llama_config(), rng, double_options(), 0.3);
  const auto report = testing::check_model_gradients(model, rng, batch_of(2, 5, 13, 3, {0, 0, 1, 1, 1, 1, 1, 1, 1, 0}),
                                                     rng.normal_matrix<double>(10, 8));
  INFO(report.summary());
  REQUIRE(report.ok);
  REQUIRE(report.checked > 500);

  // The layout, the parameter count and the adapter names carry each layer's own spec.
  const auto layout = model.adapter_layout();
  REQUIRE(layout.at("layers.0.q") == MoLoRA<2, 2>::name());
  REQUIRE(layout.at("layers.3.q") == MoLoRA<4, 2>::name());
  REQUIRE(layout.at("layers.0.v") == LoRAAdapter<2>::name());
  REQUIRE(layout.at("layers.3.v") == MoLoRA<3, 1>::name());
  REQUIRE(layout.count("layers.1.v") == 0);
  REQUIRE(layout.at("layers.2.ffn_hidden") == MoV<3>::name());
  const Index d = 8, kv = 4, f = 10;
  auto lora = [](Index in, Index out, Index E, Index R) { return in * E + E * R * (in + out); };
  const Index expected = 2 * lora(d, d, 2, 2) + 2 * lora(d, d, 4, 2) + lora(d, kv, 1, 2) + lora(d, kv, 3, 1) +
                         2 * lora(f, d, 4, 2) + (d * 2 + 2 * f) + (d * 3 + 3 * f);
  REQUIRE(count_parameters(model).trainable == expected);
  const std::string per_slot = model.adapter_report();
  INFO(per_slot);
  REQUIRE_THAT(per_slot, Contains("layers.1.q  " + MoLoRA<2, 2>::name() + "  trainable " + std::to_string(lora(d, d, 2, 2))));
  REQUIRE_THAT(per_slot, Contains("layers.2.q  " + MoLoRA<4, 2>::name() + "  trainable " + std::to_string(lora(d, d, 4, 2))));
  REQUIRE_THAT(per_slot, Contains(parameter_report(model)));
  std::set<std::string> names;
  model.for_each_named_param([&](const std::string& n, auto&) { names.insert(n); });
  REQUIRE(names.count("layers.2.q.lora_down") == 1);
  REQUIRE(names.count("layers.2.v.lora_down") == 0);
}

TEST_CASE("A user's expert in a slot gets the options its entry names", "[grad][model][custom]") {
  Rng rng(23);
  UserExperts::model<double> model(gpt2_config(), rng, double_options(), 0.3);
  // Gain3 reached the expert instances: every q expert of every layer has gain 3.
  int gains = 0;
  for (auto& block : model.blocks)
    std::visit(
        [&](auto& l) {
          if constexpr (requires { l.experts; })
            for (auto& e : l.experts) gains += e.gain == 3.0;
        },
        block.slot<q>().layer_);
  REQUIRE(gains == 4);
  // WideBottleneck's init_stddev: the down projections were drawn at 0.5, not the default 0.02.
  double sq = 0;
  Index n = 0;
  std::visit(
      [&](auto& l) {
        if constexpr (requires { l.experts; })
          for (auto& e : l.experts) sq += e.down.value().squaredNorm(), n += e.down.size();
      },
      model.blocks[1].slot<ffn_up>().layer_);
  REQUIRE(n > 0);
  REQUIRE(std::sqrt(sq / double(n)) > 0.3);

  const auto report = testing::check_model_gradients(model, rng, batch_of(2, 4, 11, 2), rng.normal_matrix<double>(8, 8));
  INFO(report.summary());
  REQUIRE(report.ok);
}

TEST_CASE("Labels follow Hugging Face's convention; targets are already shifted", "[model][labels]") {
  Rng rng(24);
  Decoder<GPT2, Slots<at<q, LoRAAdapter<2>>>>::model<double> model(gpt2_config(), rng, {}, 0.3);
  TokenBatch plain = batch_of(2, 6, 11, 5, {1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1});
  const double next_token = model.loss(plain);

  TokenBatch hf = plain;  // labels = input_ids with -100 on padding, as transformers' collators make them
  hf.labels = hf.ids;
  for (std::size_t t = 0; t < 12; ++t)
    if (!plain.mask[t]) hf.labels[t] = ignore_label;
  REQUIRE(model.loss(hf) == next_token);
  TokenBatch unmasked = plain;  // as in Hugging Face, a label on a padding token is a target like any other
  unmasked.labels = plain.ids;
  REQUIRE(model.geometry(unmasked)->targets[3] == plain.ids[4]);

  TokenBatch shifted = plain;  // targets[t] = ids[t + 1] where both are real
  shifted.targets.assign(12, ignore_label);
  for (std::size_t t = 0; t + 1 < 12; ++t)
    if (t % 6 != 5 && plain.mask[t] && plain.mask[t + 1]) shifted.targets[t] = plain.ids[t + 1];
  REQUIRE(model.loss(shifted) == next_token);

  // Unshifted labels passed as targets train the model to copy its input: a different loss.
  TokenBatch copying = plain;
  copying.targets = plain.ids;
  REQUIRE(model.loss(copying) != next_token);

  // -100 in labels hides the token it is on: the position before it is not scored.
  TokenBatch prompt = hf;
  prompt.labels[1] = prompt.labels[2] = ignore_label;
  const auto g = model.geometry(prompt);
  REQUIRE(g->targets[0] == ignore_label);
  REQUIRE(g->targets[1] == ignore_label);
  REQUIRE(g->targets[2] == prompt.ids[3]);
  REQUIRE(g->targets[5] == ignore_label);  // the last position has no next label
  REQUIRE(g->targets[6] == ignore_label);  // padded positions are never scored
  REQUIRE(g->targets[7] == prompt.ids[8]);

  TokenBatch both = hf;
  both.targets = shifted.targets;
  REQUIRE_THROWS_WITH(model.loss(both), Contains("both labels") && Contains("give one of them"));
  TokenBatch short_targets = plain;
  short_targets.targets.assign(5, 1);
  REQUIRE_THROWS_WITH(model.loss(short_targets), Contains("batch has 5 targets, expected batch*seq = 12"));
  TokenBatch bad_target = plain;
  bad_target.targets.assign(12, 11);
  REQUIRE_THROWS_WITH(model.loss(bad_target), Contains("target 11 of token 0 is outside the vocabulary [0, 11)"));
}

TEST_CASE("Router auxiliary losses count real tokens only", "[model][router]") {
  using Routed = Decoder<GPT2, Slots<at<q, Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 4>>, at<keys, MoV<3>>>>;
  Rng rng(25);
  Routed::model<double> model(gpt2_config(), rng, double_options(), 0.3);
  for_each_param(model, [&](auto& p) { rng.fill_normal(p.value(), 0.0, 0.5); });
  TokenBatch b = batch_of(2, 5, 11, 7, {0, 0, 1, 1, 1, 1, 1, 1, 0, 0});
  const auto c = model.forward(b);
  REQUIRE(c.aux_loss() > 0);
  TokenBatch other_pads = b;  // the same real tokens, other ids under the padding
  for (int i : {0, 1, 8, 9}) other_pads.ids[std::size_t(i)] = (other_pads.ids[std::size_t(i)] + 3) % 11;
  const auto d = model.forward(other_pads);
  REQUIRE(d.aux_loss() == Approx(c.aux_loss()).epsilon(1e-12));
  REQUIRE(d.output()(0, 0) == Approx(c.output()(0, 0)).epsilon(1e-12));
  model.backward(c, overwrite);
  const auto grads = gradients(model);
  model.backward(d, overwrite);
  const auto other = gradients(model);
  for (std::size_t i = 0; i < grads.size(); ++i) REQUIRE(grads[i].isApprox(other[i], 1e-10));

  // A router's aux losses over the flagged rows equal those of the flagged rows alone.
  cpu_impl::Ia3Mixture<Soft, 3, double> mov(4, rng, {.router = {.load_balance_weight = 1, .z_loss_weight = 1}});
  const Matrix<double> h = rng.normal_matrix<double>(6, 4);
  const std::vector<unsigned char> flags{1, 0, 1, 1, 0, 1};
  Matrix<double> kept(4, 4);
  kept << h.row(0), h.row(2), h.row(3), h.row(5);
  const auto masked = mov.forward(h, RowMask{flags.data(), 6});
  const auto alone = mov.forward(kept);
  REQUIRE(masked.aux().load_balance == Approx(alone.aux().load_balance).epsilon(1e-12));
  REQUIRE(masked.aux().z_loss == Approx(alone.aux().z_loss).epsilon(1e-12));
  REQUIRE(masked.aux().load_balance != Approx(mov.forward(h).aux().load_balance).epsilon(1e-6));
  REQUIRE_THROWS_WITH(mov.forward(h, RowMask{flags.data(), 5}), Contains("the row mask has 5 flags for 6 tokens"));
}

TEST_CASE("Aux losses with padding pass the gradient check", "[grad][model][router]") {
  using Routed = Decoder<GPT2, Slots<at<q, Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 4>>, at<values, MoV<3>>>>;
  Rng rng(26);
  Routed::model<double> model(gpt2_config(), rng, {.router = {.load_balance_weight = 0.5, .z_loss_weight = 0.1, .fp32_softmax = false}}, 0.3);
  const auto report = testing::check_model_gradients(model, rng, batch_of(2, 5, 11, 9, {0, 0, 1, 1, 1, 1, 1, 1, 0, 0}),
                                                     rng.normal_matrix<double>(10, 8));
  INFO(report.summary());
  REQUIRE(report.ok);
}

namespace {
/// An optimizer that only counts its steps (apply_step calls step(model)).
struct CountingOptimizer {
  int steps = 0;
  template <class Model>
  void step(Model&) {
    ++steps;
  }
};
}  // namespace

TEST_CASE("Gradient accumulation averages its parts' whole objectives, aux losses included", "[model][training]") {
  using Routed = Decoder<GPT2, Slots<at<q, Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 4>>, at<values, MoV<3>>>>;
  Rng rng(27);
  Routed::model<double> model(gpt2_config(), rng, {.router = {.load_balance_weight = 0.5, .z_loss_weight = 0.1}}, 0.3);
  for_each_param(model, [&](auto& p) { rng.fill_normal(p.value(), 0.0, 0.5); });
  const TokenBatch a = batch_of(2, 5, 11, 3), b = batch_of(3, 4, 11, 8, {0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1});

  // each part's own objective (loss + aux losses) and gradient, averaged
  double loss = 0, aux = 0;
  std::vector<Matrix<double>> mean;
  for (const TokenBatch* part : {&a, &b}) {
    const auto c = model.forward(*part);
    model.backward(c, overwrite);
    loss += c.output()(0, 0) / 2;
    aux += c.aux_loss() / 2;
    const auto g = gradients(model);
    for (std::size_t i = 0; i < g.size(); ++i) {
      if (mean.size() <= i) mean.emplace_back(Matrix<double>::Zero(g[i].rows(), g[i].cols()));
      mean[i] += g[i] / 2;
    }
  }
  REQUIRE(aux > 0);
  double norm = 0;
  for (const auto& m : mean) norm += m.squaredNorm();
  norm = std::sqrt(norm);

  CountingOptimizer opt;
  model.accumulate_gradients(a, 0, 2);
  // a step with a part missing is refused and loses nothing: the second part still completes it
  REQUIRE_THROWS_WITH(model.apply_gradients(opt), Contains("apply_gradients needs every part of a step") && Contains("1 of 2 parts have run"));
  model.accumulate_gradients(b, 1, 2);
  const TrainStepResult r = model.apply_gradients(opt, 0.0);
  CHECK(opt.steps == 1);
  CHECK(r.loss == Approx(loss).epsilon(1e-12));
  CHECK(r.aux_loss == Approx(aux).epsilon(1e-12));
  CHECK(r.grad_norm == Approx(norm).epsilon(1e-12));
  CHECK_FALSE(r.clipped);
  const auto g = gradients(model);
  for (std::size_t i = 0; i < g.size(); ++i) CHECK(g[i].isApprox(mean[i], 1e-12));

  // clipping applies to the mean gradient's norm
  model.accumulate_gradients(a, 0, 2);
  model.accumulate_gradients(b, 1, 2);
  const TrainStepResult clipped = model.apply_gradients(opt, norm / 4);
  CHECK(clipped.clipped);
  CHECK(clipped.grad_norm == Approx(norm).epsilon(1e-12));
  const auto gc = gradients(model);
  for (std::size_t i = 0; i < gc.size(); ++i) CHECK(gc[i].isApprox(mean[i] * (norm / 4 / (norm + 1e-6)), 1e-12));
  CHECK(opt.steps == 2);

  // a step is applied once; parts run in order from 0 and agree on their number
  REQUIRE_THROWS_WITH(model.apply_gradients(opt), Contains("0 of 0 parts have run"));
  REQUIRE_THROWS_WITH(model.accumulate_gradients(b, 1, 2), Contains("accumulate_gradients(part 1 of 2) came after 0 of 0 parts"));
  model.accumulate_gradients(a, 0, 2);
  REQUIRE_THROWS_WITH(model.accumulate_gradients(b, 1, 3), Contains("came after 1 of 2 parts"));
  REQUIRE_THROWS_WITH(model.accumulate_gradients(b, 2, 2), Contains("out of range"));
  // a part that fails abandons the step
  TokenBatch bad = b;
  bad.ids[3] = 11;
  REQUIRE_THROWS_WITH(model.accumulate_gradients(bad, 1, 2), Contains("11"));
  REQUIRE_THROWS_WITH(model.accumulate_gradients(b, 1, 2), Contains("came after 0 of 0 parts"));
  CHECK(opt.steps == 2);

  // one part is train_step, to the bit
  model.accumulate_gradients(b, 0, 1);
  const TrainStepResult one = model.apply_gradients(opt, 0.5);
  const auto g_one = gradients(model);
  const TrainStepResult whole = model.train_step(b, opt, 0.5);
  CHECK(one.loss == whole.loss);
  CHECK(one.aux_loss == whole.aux_loss);
  CHECK(one.grad_norm == whole.grad_norm);
  CHECK(gradients(model) == g_one);
}

TEST_CASE("Sampling refuses NaN logits by name", "[model][generate][errors]") {
  Rng rng(27);
  SamplingOptions greedy, hot{4, 1.0, 0.9, 3, -1};
  std::vector<double> logits{0.1, std::nan(""), 0.3};
  REQUIRE_THROWS_WITH(sample_token(logits, greedy, rng), Contains("logit 1 of 3 is NaN"));
  REQUIRE_THROWS_WITH(sample_token(logits, hot, rng), Contains("logit 1 of 3 is NaN"));
  REQUIRE(sample_token({0.1, INFINITY, 0.3}, hot, rng) == 1);
  REQUIRE(sample_token({-INFINITY, 0.0, -INFINITY}, hot, rng) == 1);
  REQUIRE_THROWS_WITH(sample_token({}, greedy, rng), Contains("no logits"));

  Decoder<GPT2>::model<float> model(gpt2_config(), rng);
  model.wte.table.mutable_value()(3, 2) = std::nanf("");
  REQUIRE_THROWS_WITH(model.generate({3, 1}, {.max_new_tokens = 2}), Contains("is NaN"));
}

TEST_CASE("Top-p sampling sorts only the nucleus, and picks what a sort of the whole vocabulary picks", "[model][generate]") {
  // The reference sorts every token (falling probability, equal ones by rising id) and walks
  // the nucleus; sample_token partially sorts 256, 512, ... tokens. Logits on a 0.25 grid tie
  // often; flat rows make nuclei of thousands of tokens (several doublings), peaked rows of few.
  const auto reference = moet::testing::whole_sort_sample;
  Rng values(31);
  int draws = 0;
  for (const std::size_t V : {std::size_t(7), std::size_t(3000)})
    for (const double spread : {0.5, 8.0})
      for (const double top_p : {0.3, 0.9, 0.999}) {
        std::vector<double> logits(V);
        for (double& l : logits) l = std::round(values.normal() * spread * 4) / 4;
        const SamplingOptions s{.temperature = 0.7, .top_p = top_p};
        Rng a(5), b(5);
        for (int i = 0; i < 40; ++i, ++draws) {
          INFO("V " << V << " spread " << spread << " top_p " << top_p << " draw " << i);
          REQUIRE(sample_token(logits, s, a) == reference(logits, s, b));
        }
      }
  REQUIRE(draws == 480);

  // top_p = 1 walks the tokens in id order without sorting: the frequencies are the softmax's.
  const std::vector<double> logits{0.0, std::log(2.0), -INFINITY, std::log(5.0)};  // p = 1/8, 2/8, 0, 5/8
  Rng rng(6);
  std::vector<int> counts(4, 0);
  const int n = 40000;
  for (int i = 0; i < n; ++i) ++counts[std::size_t(sample_token(logits, {.temperature = 1.0}, rng))];
  REQUIRE(counts[2] == 0);
  for (auto [token, p] : {std::pair{0, 0.125}, {1, 0.25}, {3, 0.625}})
    CHECK(std::abs(counts[std::size_t(token)] / double(n) - p) < 4 * std::sqrt(p * (1 - p) / n));
}

TEST_CASE("The KV cache appends in place", "[model][generate]") {
  Rng rng(28);
  Decoder<Llama>::model<double> model(llama_config(2), rng);
  auto cache = model.start_cache(16);
  const double* k0 = cache.layers[0].k.data();
  model.decode(cache, {1, 2, 3});
  for (int t = 0; t < 13; ++t) model.decode(cache, {t % 13});
  REQUIRE(cache.length == 16);
  REQUIRE(cache.layers[0].k.data() == k0);  // within its capacity nothing was copied
  REQUIRE(cache.layers[1].v.rows() == 16);
  model.decode(cache, {4});  // past it the storage grows (doubling)
  REQUIRE(cache.layers[0].k.capacity() >= 32);
  REQUIRE(cache.layers[0].k.rows() == 17);
}

TEST_CASE("Several prompts generate as one batch, each as it would alone", "[model][generate]") {
  const std::vector<std::vector<int>> prompts{{1, 2, 3}, {4, 5, 6, 7, 8}, {9}};
  auto check = [&](auto& model) {
    for (const SamplingOptions& s : {SamplingOptions{.max_new_tokens = 5},
                                     SamplingOptions{.max_new_tokens = 4, .temperature = 0.9, .top_p = 0.8, .seed = 7},
                                     SamplingOptions{.max_new_tokens = 6, .eos = 3}}) {
      const auto together = model.generate_batch(prompts, s);
      REQUIRE(together.size() == prompts.size());
      for (std::size_t b = 0; b < prompts.size(); ++b) CHECK(together[b] == model.generate(prompts[b], s));
    }
    // the batched logits of a left-padded prefill equal each sequence's own
    auto cache = model.start_cache(0, 2);
    const auto both = model.decode(cache, {0, 0, 1, 2, 3, 4, 5, 6}, {0, 0, 1, 1, 1, 1, 1, 1});
    auto one = model.start_cache();
    const auto first = model.decode(one, {1, 2});
    CHECK((both.middleRows(2, 2) - first).cwiseAbs().maxCoeff() < 1e-12);
    CHECK(cache.seen == std::vector<Index>{2, 4});
    // bad input leaves the cache as it was
    CHECK_THROWS_WITH(model.decode(cache, {1, 2, 3}), Contains("give each sequence the same number of new tokens"));
    CHECK_THROWS_WITH(model.decode(cache, {1, 2}, {1}), Contains("padding mask has 1 flags for 2 ids"));
    CHECK(cache.length == 4);
    CHECK(cache.layers[0].k.rows() == 4);
  };
  Rng r1(40), r2(41);
  Decoder<GPT2, Slots<at<q, MoLoRA<2, 2>>>>::model<double> gpt2(gpt2_config(), r1, {}, 0.3);
  check(gpt2);
  Decoder<Llama, Slots<at<ffn_hidden, MoV<2>>>>::model<double> llama(llama_config(2), r2, {}, 0.3);
  check(llama);
  CHECK_THROWS_WITH(gpt2.generate_batch({{1, 2}, std::vector<int>(14, 1)}, {.max_new_tokens = 4}), Contains("ask for at most 2"));
  CHECK_THROWS_AS(gpt2.generate_batch({}, {}), value_error);
}
