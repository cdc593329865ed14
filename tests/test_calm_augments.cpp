// CALM with several augmenting models, each of its own width, depth and placement: the composed
// model passes the gradient harness in double, starts as the anchor, decodes like full forwards,
// trains only its composition layers, and rejects mismatched inputs by name.
#include <catch2/catch.hpp>

#include <moet/models.hpp>

#include "model_harness.hpp"

using namespace moet;
using Catch::Matchers::Contains;

namespace {

io::ModelConfig llama_config(Index layers, Index d_model, Index heads, Index kv_heads) {
  io::ModelConfig c;
  c.architecture = io::Architecture::llama;
  c.vocab = 13, c.d_model = d_model, c.layers = layers, c.heads = heads, c.kv_heads = kv_heads, c.d_ff = 12;
  c.max_positions = 32, c.rope_theta = 1000.0, c.tied_embeddings = false;
  return c;
}
io::ModelConfig gpt2_config(Index layers) {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 13, c.d_model = 6, c.layers = layers, c.heads = 2, c.kv_heads = 2, c.d_ff = 10, c.max_positions = 16;
  return c;
}

TokenBatch batch() {
  TokenBatch b{2, 5, {}, {0, 1, 1, 1, 1, 1, 1, 1, 0, 0}, {}};
  for (int i = 0; i < 10; ++i) b.ids.push_back((5 * i + 2) % 13);
  return b;
}

// Anchor: Llama, 2 layers, width 8. Augment 0: GPT-2 (width 6) on the Compose's Every<1>: pairs
// (0, 0) and (1, 1). Augment 1: Llama (width 12, 4 layers) Placed on Every<2>: one pair (3, 1).
using Three = Compose<Decoder<Llama>, Augments<Decoder<GPT2>, Placed<Decoder<Llama>, Every<2>>>, CrossAttention<>, Every<1>>;

Three::model<double> make(Rng& rng, double stddev = 0.3) {
  return Three::model<double>(llama_config(2, 8, 2, 1), {gpt2_config(2), llama_config(4, 12, 2, 2)}, rng,
                              {.init_stddev = stddev, .rotary_theta = 10.0});
}

}  // namespace

TEST_CASE("Three composed models: sites, and the gradient check through every composition", "[grad][calm]") {
  Rng rng(31);
  auto model = make(rng);
  REQUIRE(Three::model<double>::augment_count == 2);
  const auto& s = model.sites();
  REQUIRE(s.size() == 3);
  REQUIRE((s[0].augment == 0 && s[0].i == 0 && s[0].j == 0));
  REQUIRE((s[1].augment == 0 && s[1].i == 1 && s[1].j == 1));
  REQUIRE((s[2].augment == 1 && s[2].i == 3 && s[2].j == 1));
  REQUIRE(model.composition[2].d_augment() == 12);
  REQUIRE(model.composition[0].d_augment() == 6);
  REQUIRE(Three::name() == "Compose<Decoder<llama>, Decoder<gpt2>, Decoder<llama>>");

  const auto report = testing::check_model_gradients(
      model, rng, batch(),
      std::make_tuple(rng.normal_matrix<double>(10, 8), rng.normal_matrix<double>(20, 6), rng.normal_matrix<double>(10, 12)), 25);
  INFO(report.summary());
  REQUIRE(report.ok);
  REQUIRE(report.checked > 400);
}

TEST_CASE("Three composed models start as the anchor, decode like full forwards, and train", "[calm][generate]") {
  Rng rng(32);
  auto model = make(rng, 0.02);
  const TokenBatch b = batch();
  REQUIRE(model.logits(b) == model.anchor.logits(b));  // every W_O starts at zero

  AdamW<double> optimizer({.lr = 1e-2});
  const double first = model.train_step(b, optimizer).loss;
  double last = first;
  for (int step = 0; step < 15; ++step) last = model.train_step(b, optimizer).loss;
  REQUIRE(last < first);
  REQUIRE(count_parameters(model).trainable == count_parameters(model.composition).trainable);
  REQUIRE(count_parameters(model.augment<1>()).trainable == 0);

  for_each_param(model, [&](auto& p) { rng.fill_normal(p.value(), 0.0, 0.3); });
  const std::vector<int> tokens{1, 4, 2, 7, 3, 0};
  const Matrix<double> expected = model.logits(TokenBatch{1, 6, tokens, {}, {}});
  REQUIRE(!expected.isApprox(model.anchor.logits(TokenBatch{1, 6, tokens, {}, {}}), 1e-6));
  auto cache = model.start_cache();
  Matrix<double> got(6, 13);
  got.topRows(3) = model.decode(cache, {1, 4, 2});
  for (int t = 3; t < 6; ++t) got.row(t) = model.decode(cache, {tokens[std::size_t(t)]});
  INFO("max difference " << (got - expected).cwiseAbs().maxCoeff());
  REQUIRE(got.isApprox(expected, 1e-12));

  // Each augmenting model may read its own ids.
  ComposedBatch own{b, {}, {b, b}};
  for (int& id : own.augments[1].ids) id = (id + 2) % 13;
  REQUIRE(model.loss(own) != model.loss(b));
  auto per_model = model.start_cache();
  REQUIRE(model.decode_each(per_model, {1, 4}, {{1, 4}, {1, 4}}).isApprox(expected.topRows(2), 1e-12));
}

TEST_CASE("Several augmenting models: pairs from options, and bad inputs named", "[calm][errors]") {
  Rng rng(33);
  using Listed = Compose<Decoder<Llama>, Augments<Decoder<GPT2>, Decoder<GPT2>>, CrossAttention<>, FromOptions>;
  Listed::model<float> listed(llama_config(2, 8, 2, 1), {gpt2_config(2), gpt2_config(3)}, rng,
                              {.pairs = {{0, 1}}, .augment_pairs = {{}, {{2, 0}, {-1, -1}}}});
  REQUIRE(listed.pairs() == std::vector<std::pair<Index, Index>>{{-1, -1}, {2, 0}, {0, 1}});
  REQUIRE(listed.sites()[0].augment == 1);
  REQUIRE(listed.sites()[2].augment == 0);
  REQUIRE_THROWS_WITH(Listed::model<float>(llama_config(2, 8, 2, 1), {gpt2_config(2), gpt2_config(2)}, rng,
                                            {.pairs = {{0, 1}}, .augment_pairs = {{}, {{2, 0}}}}),
                      Contains("composition pair (2, 0) names a layer that does not exist: the augmenting model 1 has layers -1..1"));
  REQUIRE_THROWS_WITH(Listed::model<float>(llama_config(2, 8, 2, 1), {gpt2_config(2)}, rng, {.pairs = {{0, 1}}}),
                      Contains("1 augmenting configs for 2 augmenting models"));
  auto model = make(rng);
  TokenBatch shorter = batch();
  shorter.seq = 4;
  shorter.ids.resize(8), shorter.mask.resize(8);
  REQUIRE_THROWS_WITH(model.loss(ComposedBatch{batch(), {}, {{}, shorter}}),
                      Contains("the augmenting model's batch 1 is 2 x 4 tokens but the anchor's is 2 x 5"));
  auto cache = model.start_cache();
  REQUIRE_THROWS_WITH(model.decode_each(cache, {1, 2}, {{1, 2}}), Contains("ids for 1 augmenting models, expected 2"));
  REQUIRE(cache.anchor.length == 0);
}
