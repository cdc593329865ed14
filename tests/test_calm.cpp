// CALM: the composition layer and a whole composed pair of 2-layer decoders pass the gradient
// harness in double; a fresh composition is exactly the anchor; training changes nothing but the
// composition layers; pairs may read or write the embeddings (layer -1); cached decoding equals
// full forwards; bad pairs and batches are rejected.
#include <catch2/catch.hpp>

#include <moet/models.hpp>
#include <moet/train/fit.hpp>

#include "error_of.hpp"
#include "model_harness.hpp"
#include "scratch.hpp"

using namespace moet;
using Catch::Matchers::Contains;

namespace {

io::ModelConfig llama_config(Index layers) {
  io::ModelConfig c;
  c.architecture = io::Architecture::llama;
  c.vocab = 13, c.d_model = 8, c.layers = layers, c.heads = 2, c.kv_heads = 1, c.d_ff = 12, c.max_positions = 32;
  c.rope_theta = 1000.0, c.tied_embeddings = false;
  return c;
}
io::ModelConfig gpt2_config(Index layers) {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 13, c.d_model = 6, c.layers = layers, c.heads = 2, c.kv_heads = 2, c.d_ff = 10, c.max_positions = 16;
  return c;
}

/// Two sequences of 5: the first left-padded by 1, the second right-padded by 2.
TokenBatch batch() {
  TokenBatch b{2, 5, {}, {0, 1, 1, 1, 1, 1, 1, 1, 0, 0}, {}};
  for (int i = 0; i < 10; ++i) b.ids.push_back((5 * i + 2) % 13);
  return b;
}

using Pair = Compose<Decoder<Llama>, Decoder<GPT2>, CrossAttention<>, Every<1>>;

/// The generic harness on a composed pair with two composition layers: inputs are the anchor's
/// embeddings (10 tokens x 8) and both pairs' augmenting states, stacked (20 x 6).
template <class Model>
void check_pair_gradients(Model& pair, Rng& rng) {
  const auto report = testing::check_model_gradients(
      pair, rng, batch(), std::make_tuple(rng.normal_matrix<double>(10, 8), rng.normal_matrix<double>(20, 6)));
  INFO(report.summary());
  REQUIRE(report.ok);
  REQUIRE(report.checked > 300);
}

/// A composition layer with one batch geometry, as the harness calls layers.
struct LayerWithGeometry {
  BOOST_HANA_DEFINE_STRUCT(LayerWithGeometry, (std::reference_wrapper<cpu_impl::CompositionLayer<double>>, layer),
                           (std::shared_ptr<const CrossAttentionGeometry>, geometry));
  auto forward(const Matrix<double>& h, const Matrix<double>& a) const { return layer.get().forward(h, a, geometry); }
  template <class C>
  auto backward(const C& c, const Matrix<double>& h, const Matrix<double>& a, const Matrix<double>& dy, GradMode mode) {
    return layer.get().backward(c, h, a, dy, mode);
  }
};

}  // namespace

TEST_CASE("The composition layer passes the gradient check (cross-causal, padded augmenting keys)", "[grad][calm]") {
  const double theta = GENERATE(0.0, 10.0);
  INFO("rotary_theta " << theta);
  Rng rng(1);
  cpu_impl::CompositionLayer<double> layer(8, 6, 2, rng, 0.3, theta);
  REQUIRE(layer.rotary() == (theta > 0));
  // With rotary positions: the anchor's first sequence left-padded (its positions start late).
  LayerWithGeometry bound{std::ref(layer), CrossAttentionGeometry::make(2, 5, 5, {1, 1, 0, 1, 1, 1, 1, 1, 1, 0},
                                                                          {0, 0, 1, 2, 3, 0, 1, 2, 3, 4}, {0, 1, 2, 2, 3, 0, 1, 2, 3, 4})};
  const auto report = testing::check_gradients(
      bound, rng, std::make_tuple(rng.normal_matrix<double>(10, 8), rng.normal_matrix<double>(10, 6)));
  INFO(report.summary());
  REQUIRE(report.ok);
  REQUIRE(report.checked > 300);
}

TEST_CASE("Rotary cross-attention scores depend on the distance between positions only", "[calm]") {
  Rng rng(12);
  cpu_impl::CompositionLayer<double> plain(8, 6, 2, rng, 0.5);
  Rng same(12);
  cpu_impl::CompositionLayer<double> rotary(8, 6, 2, same, 0.5, 10.0);
  for (auto* l : {&plain, &rotary}) l->wo.value() = Rng(13).normal_matrix<double>(8, 8);
  const Matrix<double> h = rng.normal_matrix<double>(4, 8), a = rng.normal_matrix<double>(4, 6);
  auto output = [&](cpu_impl::CompositionLayer<double>& l, Index shift) {
    std::vector<Index> pos{shift, shift + 1, shift + 2, shift + 3};
    return l.forward(h, a, CrossAttentionGeometry::make(1, 4, 4, {}, pos, pos)).y;
  };
  const Matrix<double> without = plain.forward(h, a, CrossAttentionGeometry::make(1, 4, 4)).y, with = output(rotary, 0);
  REQUIRE((with - without).cwiseAbs().maxCoeff() > 1e-3);                    // the positions matter
  REQUIRE((output(rotary, 7) - with).cwiseAbs().maxCoeff() < 1e-12);        // a common shift does not
  REQUIRE(with.topRows(1).isApprox(without.topRows(1), 1e-12));             // position 0 reads only position 0: distance 0
}

TEST_CASE("A composed pair of 2-layer models passes the gradient check", "[grad][calm]") {
  const double theta = GENERATE(0.0, 10.0);
  INFO("rotary_theta " << theta);
  Rng rng(2);
  Pair::model<double> pair(llama_config(2), gpt2_config(2), rng, {.init_stddev = 0.3, .rotary_theta = theta});
  REQUIRE(pair.pairs() == std::vector<std::pair<Index, Index>>{{0, 0}, {1, 1}});
  check_pair_gradients(pair, rng);
}

TEST_CASE("Layer -1 pairs (embeddings) pass the gradient check, train, and decode like full forwards", "[grad][calm]") {
  using Listed = Compose<Decoder<Llama>, Decoder<GPT2>, CrossAttention<>, FromOptions>;
  Rng rng(6);
  // m_A's embeddings into m_B's embedding stream, and m_A's layer 1 after m_B's block 0.
  Listed::model<double> pair(llama_config(2), gpt2_config(2), rng, {.pairs = {{1, 0}, {-1, -1}}, .init_stddev = 0.3});
  REQUIRE(pair.pairs() == std::vector<std::pair<Index, Index>>{{-1, -1}, {1, 0}});
  check_pair_gradients(pair, rng);

  // Training from the loss reaches the composition below m_B's first block.
  const Matrix<double> wo_before = pair.composition[0].wo.value();
  AdamW<double> optimizer({.lr = 1e-2});
  pair.train_step(batch(), optimizer);
  REQUIRE(pair.composition[0].wo.value() != wo_before);

  for_each_param(pair, [&](auto& p) { rng.fill_normal(p.value(), 0.0, 0.3); });
  const std::vector<int> tokens{1, 4, 2, 7, 3};
  const Matrix<double> expected = pair.logits(TokenBatch{1, 5, tokens, {}, {}});
  REQUIRE(!expected.isApprox(pair.anchor.logits(TokenBatch{1, 5, tokens, {}, {}}), 1e-6));  // the compositions act
  auto cache = pair.start_cache();
  Matrix<double> got(5, 13);
  got.topRows(2) = pair.decode(cache, {1, 4});
  for (int t = 2; t < 5; ++t) got.row(t) = pair.decode(cache, {tokens[std::size_t(t)]});
  INFO("max difference " << (got - expected).cwiseAbs().maxCoeff());
  REQUIRE(got.isApprox(expected, 1e-12));
}

TEST_CASE("A fresh composition is exactly the anchor; training touches only the composition", "[calm]") {
  Rng rng(3);
  using Every2 = Compose<Decoder<Llama>, Decoder<GPT2>, CrossAttention<4>, Every<2>>;
  Every2::model<float> pair(llama_config(4), gpt2_config(2), rng);
  REQUIRE(pair.pairs() == std::vector<std::pair<Index, Index>>{{0, 1}, {1, 3}});
  REQUIRE(pair.composition[0].heads() == 4);
  const TokenBatch b = batch();
  REQUIRE(pair.logits(b) == pair.anchor.logits(b));  // W_O = 0

  std::vector<Matrix<float>> frozen_before;
  for_each_frozen(pair, [&](const auto& f) { frozen_before.emplace_back(f.value()); });
  AdamW<float> optimizer({.lr = 1e-2});
  double first = 0, last = 0;
  for (int step = 0; step < 20; ++step) {
    const auto r = pair.train_step(b, optimizer);
    (step == 0 ? first : last) = r.loss;
  }
  REQUIRE(last < first);  // it learns
  std::size_t i = 0;
  for_each_frozen(pair, [&](const auto& f) { REQUIRE(Matrix<float>(f.value()) == frozen_before[i++]); });
  REQUIRE(i == frozen_before.size());
  REQUIRE(pair.logits(b) != pair.anchor.logits(b));
  // m_A keeps no gradient buffers and no context: its parameters are all frozen.
  REQUIRE(count_parameters(pair.augment()).trainable == 0);
  REQUIRE(count_parameters(pair).trainable == count_parameters(pair.composition).trainable);
}

TEST_CASE("A composed pair accumulates gradients over micro-batches as a decoder does", "[calm]") {
  Rng rng(7);
  Pair::model<double> pair(llama_config(2), gpt2_config(2), rng, {.init_stddev = 0.3});
  for_each_param(pair, [&](auto& p) { rng.fill_normal(p.value(), 0.0, 0.3); });  // W_O too
  const TokenBatch a = batch();
  const TokenBatch b{1, 6, {1, 4, 7, 10, 0, 3}, {}, {}};
  // each part's loss and gradient, averaged
  double loss = 0;
  std::vector<Matrix<double>> mean;
  for (const TokenBatch* part : {&a, &b}) {
    const auto c = pair.forward(*part);
    pair.backward(c, overwrite);
    loss += c.output()(0, 0) / 2;
    std::size_t i = 0;
    for_each_param(pair, [&](auto& p) {
      if (mean.size() <= i) mean.emplace_back(Matrix<double>::Zero(p.rows(), p.cols()));
      mean[i++] += p.grad() / 2;
    });
  }
  AdamW<double> optimizer({.lr = 1e-2});
  pair.accumulate_gradients(a, 0, 2);
  REQUIRE_THROWS_WITH(pair.accumulate_gradients(b, 1, 3), Contains("came after 1 of 2 parts"));
  REQUIRE_THROWS_WITH(pair.apply_gradients(optimizer), Contains("1 of 2 parts have run"));
  pair.accumulate_gradients(b, 1, 2);
  const Matrix<double> wo_before = pair.composition[0].wo.value();
  const TrainStepResult r = pair.apply_gradients(optimizer, 0.0);
  CHECK(r.applied);
  CHECK(r.loss == Approx(loss).epsilon(1e-12));
  std::size_t i = 0;
  for_each_param(pair, [&](auto& p) { CHECK(p.grad().isApprox(mean[i++], 1e-12)); });
  CHECK(pair.composition[0].wo.value() != wo_before);
  REQUIRE_THROWS_WITH(pair.apply_gradients(optimizer), Contains("0 of 0 parts have run"));
}

TEST_CASE("fit trains a composed pair's composition layers, with accumulation and checkpoints, and resumes it", "[calm][fit]") {
  std::vector<data::Example> examples;
  for (int i = 0; i < 24; ++i) {
    data::Example e;
    for (int t = 0; t < 4 + i % 3; ++t) {
      e.ids.push_back((3 * i + 5 * t + 1) % 13);
      e.labels.push_back(t == 0 ? ignore_label : e.ids.back());  // the first token is a prompt
    }
    examples.push_back(std::move(e));
  }
  const auto options = [](const std::filesystem::path& dir) {
    return FitOptions{.steps = 12, .batch_size = 4, .grad_accumulation = 2, .lr = 2e-2, .save_every = 6, .output_dir = dir,
                      .progress = Progress::none};
  };
  const auto values = [](auto& model) {
    std::vector<Matrix<double>> v;
    for_each_param(model, [&](auto& p) { v.emplace_back(p.value()); });
    return v;
  };
  Rng a(8);
  Pair::model<double> pair(llama_config(2), gpt2_config(2), a, {.init_stddev = 0.3});
  const auto start = values(pair);
  std::vector<Matrix<double>> frozen;
  for_each_frozen(pair, [&](const auto& f) { frozen.emplace_back(f.value()); });
  std::vector<double> losses;
  AdamW<double> opt;
  FitOptions o = options(moet::testing::scratch_folder("calm_fit_whole"));
  o.on_step = [&](long, const TrainStepResult& r) { losses.push_back(r.loss); };
  const std::vector<data::Example> eval(examples.begin(), examples.begin() + 4);
  const FitResult r = fit(pair, opt, examples, eval, o);
  REQUIRE(losses.size() == 12);
  CHECK(r.steps == 12);
  CHECK(std::isfinite(r.eval_loss));
  CHECK(losses.back() < losses.front());  // it learns
  std::size_t i = 0;
  for_each_frozen(pair, [&](const auto& f) { CHECK(Matrix<double>(f.value()) == frozen[i++]); });
  CHECK(values(pair) != start);

  // interrupted after its first checkpoint and resumed from it: the bits of the whole run
  const auto dir = moet::testing::scratch_folder("calm_fit_resumed");
  {
    Rng b(8);
    Pair::model<double> interrupted(llama_config(2), gpt2_config(2), b, {.init_stddev = 0.3});
    AdamW<double> first;
    FitOptions stop = options(dir);
    stop.on_step = [](long step, const TrainStepResult&) {
      if (step == 8) throw std::runtime_error("interrupted");
    };
    CHECK_THROWS_WITH(fit(interrupted, first, examples, {}, stop), "interrupted");
  }
  REQUIRE(std::filesystem::exists(dir / "checkpoint-6"));
  Rng c(8);
  Pair::model<double> resumed(llama_config(2), gpt2_config(2), c, {.init_stddev = 0.3});
  AdamW<double> second;
  const FitResult rr = fit(resumed, second, examples, {}, options(dir));
  CHECK(rr.resumed_from == 6);
  CHECK(values(resumed) == values(pair));
}

TEST_CASE("A composed pair's adapters save and load; a different composition is refused by name", "[calm][io]") {
  Rng a(9);
  Pair::model<double> pair(llama_config(2), gpt2_config(2), a, {.init_stddev = 0.3, .rotary_theta = 10.0});
  for_each_param(pair, [&](auto& p) { a.fill_normal(p.value(), 0.0, 0.3); });  // W_O too
  std::vector<std::string> names;
  pair.for_each_named_param([&](const std::string& n, auto&) { names.push_back(n); });
  CHECK(names == std::vector<std::string>{"composition.0.proj", "composition.0.proj_bias", "composition.0.wq", "composition.0.wk",
                                          "composition.0.wv", "composition.0.wo", "composition.1.proj", "composition.1.proj_bias",
                                          "composition.1.wq", "composition.1.wk", "composition.1.wv", "composition.1.wo"});
  const auto dir = moet::testing::scratch_folder("calm_adapters");
  save_adapters(pair, dir);
  const auto values = [](auto& model) {
    std::vector<Matrix<double>> v;
    for_each_param(model, [&](auto& p) { v.emplace_back(p.value()); });
    return v;
  };

  Rng b(10);  // other frozen weights do not matter here: only the trained tensors travel
  Pair::model<double> loaded(llama_config(2), gpt2_config(2), b, {.init_stddev = 0.3, .rotary_theta = 10.0});
  load_adapters(loaded, dir);
  CHECK(values(loaded) == values(pair));

  // another rotary theta, other sites, another anchor, a decoder's loader: refused by name, nothing loaded
  Pair::model<double> plain(llama_config(2), gpt2_config(2), b, {.init_stddev = 0.3});
  const auto before = values(plain);
  CHECK_THAT(moet::testing::error_of([&] { load_adapters(plain, dir); }),
             Contains("saved for a different composition: rotary_theta is 10.0 in the file but 0.0 in this model"));
  CHECK(values(plain) == before);
  using Every2 = Compose<Decoder<Llama>, Decoder<GPT2>, CrossAttention<>, Every<2>>;
  Every2::model<double> sparse(llama_config(2), gpt2_config(2), b, {.init_stddev = 0.3, .rotary_theta = 10.0});
  CHECK_THAT(moet::testing::error_of([&] { load_adapters(sparse, dir); }), Contains("sites is [[0,0,0],[0,1,1]] in the file"));
  using Gpt2Anchor = Compose<Decoder<GPT2>, Decoder<GPT2>, CrossAttention<>, Every<1>>;
  io::ModelConfig wide = gpt2_config(2);
  wide.d_model = 8;  // the Llama anchor's width: the composition layers' shapes agree
  Gpt2Anchor::model<double> other(wide, gpt2_config(2), b, {.init_stddev = 0.3, .rotary_theta = 10.0});
  CHECK_THAT(moet::testing::error_of([&] { load_adapters(other, dir); }),
             Contains("(the anchor's layout): saved for a different adapter layout: architecture is \"llama\" in the file but \"gpt2\""));
  CHECK_THAT(moet::testing::error_of([&] { load_adapters(loaded.anchor, dir); }), Contains("has format \"moet-composition\", expected \"moet-adapters\""));
}

TEST_CASE("Composed decoding with both KV caches equals full forwards", "[calm][generate]") {
  const double theta = GENERATE(0.0, 10.0);
  INFO("rotary_theta " << theta);
  Rng rng(4);
  Pair::model<double> pair(llama_config(2), gpt2_config(2), rng, {.init_stddev = 0.3, .rotary_theta = theta});
  for_each_param(pair, [&](auto& p) { rng.fill_normal(p.value(), 0.0, 0.3); });
  const std::vector<int> tokens{1, 4, 2, 7, 3, 0};
  const Matrix<double> expected = pair.logits(TokenBatch{1, 6, tokens, {}, {}});
  auto cache = pair.start_cache();
  Matrix<double> got(6, 13);
  got.topRows(3) = pair.decode(cache, {1, 4, 2});
  for (int t = 3; t < 6; ++t) got.row(t) = pair.decode(cache, {tokens[std::size_t(t)]});
  INFO("max difference " << (got - expected).cwiseAbs().maxCoeff());
  REQUIRE(got.isApprox(expected, 1e-12));
  const auto out = pair.generate({1, 4}, {.max_new_tokens = 3});
  REQUIRE(out.size() == 3);
  // Two vocabularies: the augmenting model reads its own prompt and a mapping of each new token.
  REQUIRE(pair.generate({1, 4}, {1, 4}, {.max_new_tokens = 3}, [](int id) { return id; }) == out);
  auto shifted = [](int id) { return (id + 5) % 13; };
  const auto mapped = pair.generate({1, 4}, {6, 9}, {.max_new_tokens = 3}, shifted);
  auto manual = pair.start_cache();
  Matrix<double> logits = pair.decode(manual, {1, 4}, {6, 9});
  for (std::size_t t = 0; t < 3; ++t) {
    Index next;
    logits.row(logits.rows() - 1).maxCoeff(&next);
    REQUIRE(mapped[t] == int(next));
    logits = pair.decode(manual, {int(next)}, {shifted(int(next))});
  }
}

TEST_CASE("Bad compositions and batches are rejected with a clear message", "[calm][errors]") {
  Rng rng(5);
  using Every3 = Compose<Decoder<Llama>, Decoder<GPT2>, CrossAttention<>, Every<3>>;
  REQUIRE_THROWS_WITH(Every3::model<float>(llama_config(4), gpt2_config(2), rng),
                      Contains("Every<3> needs the anchor's layer count to be a multiple of 3, got 4 layers"));
  using Every1 = Compose<Decoder<Llama>, Decoder<GPT2>, CrossAttention<>, Every<1>>;
  REQUIRE_THROWS_WITH(Every1::model<float>(llama_config(4), gpt2_config(3), rng),
                      Contains("4 composition layers need the augmenting model's layer count to be a multiple of 4, got 3"));
  using Listed = Compose<Decoder<Llama>, Decoder<GPT2>, CrossAttention<>, FromOptions>;
  REQUIRE_THROWS_WITH(Listed::model<float>(llama_config(2), gpt2_config(2), rng, {.pairs = {{0, 1}, {2, 1}}}),
                      Contains("composition pair (2, 1) names a layer that does not exist: the augmenting model has "
                               "layers -1..1, the anchor -1..1 (-1: the embeddings)"));
  REQUIRE_THROWS_WITH(Listed::model<float>(llama_config(2), gpt2_config(2), rng, {.pairs = {{0, -2}}}),
                      Contains("composition pair (0, -2) names a layer that does not exist"));
  REQUIRE_THROWS_AS(Listed::model<float>(llama_config(2), gpt2_config(2), rng, {.pairs = {}}), value_error);
  REQUIRE_THROWS_WITH(Listed::model<float>(llama_config(2), gpt2_config(2), rng, {.pairs = {{0, 0}}, .rotary_theta = -1}),
                      Contains("rope theta must be > 1, got -1"));
  using EightHeads = Compose<Decoder<Llama>, Decoder<GPT2>, CrossAttention<8>, FromOptions>;
  const ComposeOptions odd_heads{.pairs = {{0, 0}}, .rotary_theta = 100};
  REQUIRE_THROWS_WITH(EightHeads::model<float>(llama_config(2), gpt2_config(2), rng, odd_heads),
                      Contains("head_dim must be even, got 1"));
  REQUIRE_THROWS_WITH(CrossAttentionGeometry::make(1, 3, 3, {}, {0, 1}, {}), Contains("2 anchor positions for 1 x 3 tokens"));
  {
    cpu_impl::CompositionLayer<float> layer(8, 6, 2, rng, 0.1, 100.0);
    const Matrix<float> h = Matrix<float>::Zero(3, 8), a = Matrix<float>::Zero(3, 6);
    REQUIRE_THROWS_WITH(layer.forward(h, a, CrossAttentionGeometry::make(1, 4, 3)),
                        Contains("anchor states h has shape (3, 8), expected (4, 8)"));
  }

  Listed::model<float> pair(llama_config(2), gpt2_config(2), rng, {.pairs = {{1, 0}}});
  TokenBatch shorter = batch();
  shorter.seq = 4, shorter.batch = 2;
  shorter.ids.resize(8), shorter.mask.resize(8);
  REQUIRE_THROWS_AS(pair.geometry(ComposedBatch{batch(), shorter}), shape_error);
  REQUIRE_THROWS_WITH(pair.forward(ComposedBatch{batch(), shorter}),
                      Contains("the augmenting model's batch is 2 x 4 tokens but the anchor's is 2 x 5"));
  REQUIRE_THROWS_WITH(pair.decode(*std::make_unique<ComposedCache<float>>(pair.start_cache()), {1, 2}, {1}),
                      Contains("1 augmenting ids for 2 anchor ids"));
  // Different vocabularies: each model reads its own ids.
  TokenBatch other = batch();
  for (int& id : other.ids) id = (id + 3) % 13;
  REQUIRE_NOTHROW(pair.loss(ComposedBatch{batch(), other}));
}
