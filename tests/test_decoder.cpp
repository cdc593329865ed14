// Whole decoders: 2-layer GPT-2 and Llama models with adapters in every slot kind pass the
// generic gradient harness in double (from the loss back to the embedded tokens and into every
// adapter), recomputation changes nothing, cached decoding matches a full forward, and the
// parameter count matches the closed form of each architecture.
#include <catch2/catch.hpp>

#include <moet/models.hpp>

#include <set>

#include "model_harness.hpp"

using namespace moet;
using namespace moet::slot;

namespace {

io::ModelConfig tiny_gpt2() {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 11, c.d_model = 8, c.layers = 2, c.heads = 2, c.kv_heads = 2, c.d_ff = 12, c.max_positions = 10;
  c.tied_embeddings = true;
  return c;
}

io::ModelConfig tiny_llama() {
  io::ModelConfig c;
  c.architecture = io::Architecture::llama;
  c.vocab = 13, c.d_model = 8, c.layers = 2, c.heads = 4, c.kv_heads = 2, c.d_ff = 10, c.max_positions = 32;
  c.rope_theta = 500.0, c.norm_eps = 1e-5, c.tied_embeddings = false;
  return c;
}

using Top2 = Mixture<Router<TopK<2>>, Expert<LoRA<2>>, 3>;
using Gpt2All = Decoder<GPT2, Slots<at<q, MoLoRA<3, 2>>, at<k, LoRAAdapter<2>, layers<1>>, at<v, MoLoRA<2, 1>>, at<o, Top2>,
                                    at<ffn_up, MoLoRA<2, 2>>, at<ffn_down, LoRAAdapter<3>, layers<0>>, at<keys, MoV<3>>,
                                    at<values, MoV<2>>, at<ffn_hidden, MoV<3>>>>;
using LlamaAll = Decoder<Llama, Slots<at<q, MoLoRA<2, 2>>, at<k, MoLoRA<2, 1>>, at<v, LoRAAdapter<2>>, at<o, MoLoRA<3, 1>>,
                                      at<ffn_gate, MoLoRA<2, 2>, layers<1>>, at<ffn_up, Top2>, at<ffn_down, MoLoRA<2, 2>>,
                                      at<keys, MoV<2>>, at<values, MoV<3>, layers<0>>, at<ffn_hidden, MoV<2>>>>;

/// Two sequences of 5: the first left-padded by 2, the second right-padded by 1.
TokenBatch padded_batch(int vocab) {
  TokenBatch b;
  b.batch = 2, b.seq = 5;
  for (int i = 0; i < 10; ++i) b.ids.push_back((3 * i + 1) % vocab);
  b.mask = {0, 0, 1, 1, 1, 1, 1, 1, 1, 0};
  return b;
}

ModelOptions double_options() { return testing::double_model_options(); }

template <class Spec>
void check_model_gradients(const io::ModelConfig& config, std::uint64_t seed) {
  Rng rng(seed);
  typename Spec::template model<double> model(config, rng, double_options(), 0.3);
  const auto report =
      testing::check_model_gradients(model, rng, padded_batch(int(config.vocab)), rng.normal_matrix<double>(10, config.d_model), 40);
  INFO(report.summary());
  REQUIRE(report.ok);
  REQUIRE(report.checked > 500);
}

}  // namespace

TEST_CASE("2-layer GPT-2 with adapters in every slot kind passes the gradient check", "[grad][model]") {
  check_model_gradients<Gpt2All>(tiny_gpt2(), 7);
}

TEST_CASE("2-layer Llama (GQA, rotary, SwiGLU) with adapters in every slot kind passes the gradient check", "[grad][model]") {
  check_model_gradients<LlamaAll>(tiny_llama(), 8);
}

TEST_CASE("Activation recomputation gives the same loss and gradients", "[model]") {
  Rng rng(3);
  Gpt2All::model<double> model(tiny_gpt2(), rng, double_options(), 0.3);
  for_each_param(model, [&](auto& p) { rng.fill_normal(p.value(), 0.0, 0.3); });
  const TokenBatch batch = padded_batch(11);
  auto run = [&](bool recompute) {
    model.set_recompute(recompute);
    const auto c = model.forward(batch);
    REQUIRE(c.run.blocks[0].has_value() == !recompute);
    model.backward(c, overwrite);
    std::vector<Matrix<double>> grads;
    for_each_param(model, [&](auto& p) { grads.emplace_back(p.grad()); });
    return std::pair{c.output()(0, 0), grads};
  };
  const auto [loss_kept, grads_kept] = run(false);
  const auto [loss_recomputed, grads_recomputed] = run(true);
  REQUIRE(loss_kept == loss_recomputed);
  REQUIRE(grads_kept.size() == grads_recomputed.size());
  for (std::size_t i = 0; i < grads_kept.size(); ++i) REQUIRE(grads_kept[i].isApprox(grads_recomputed[i], 1e-12));
}

template <class Spec>
void check_cache(const io::ModelConfig& config) {
  Rng rng(5);
  typename Spec::template model<double> model(config, rng, double_options(), 0.3);
  for_each_param(model, [&](auto& p) { rng.fill_normal(p.value(), 0.0, 0.3); });
  const std::vector<int> tokens{1, 4, 2, 7, 3, 0, 5};
  TokenBatch full{1, 7, tokens, {}, {}};
  const Matrix<double> expected = model.logits(full);
  auto cache = model.start_cache();
  Matrix<double> got(7, config.vocab);
  got.topRows(4) = model.decode(cache, {1, 4, 2, 7});  // the prompt at once, then one token at a time
  for (int t = 4; t < 7; ++t) got.row(t) = model.decode(cache, {tokens[std::size_t(t)]});
  REQUIRE(cache.length == 7);
  INFO("max difference " << (got - expected).cwiseAbs().maxCoeff());
  REQUIRE(got.isApprox(expected, 1e-12));

  SamplingOptions greedy;
  greedy.max_new_tokens = 5;
  const std::vector<int> prompt{1, 4, 2};
  const auto out = model.generate(prompt, greedy);
  REQUIRE(out.size() == 5);
  std::vector<int> seq = prompt;  // greedy decoding = argmax of full forwards
  for (int next : out) {
    const Matrix<double> l = model.logits(TokenBatch{1, Index(seq.size()), seq, {}, {}});
    Index best;
    l.row(l.rows() - 1).maxCoeff(&best);
    REQUIRE(next == int(best));
    seq.push_back(next);
  }
  SamplingOptions hot{5, 1.5, 0.9, 11, -1};
  REQUIRE(model.generate(prompt, hot) == model.generate(prompt, hot));  // seeded
  hot.top_p = 1e-9;                                                     // the nucleus is the top token
  REQUIRE(model.generate(prompt, hot) == out);
  std::set<std::vector<int>> seen;
  for (std::uint64_t seed = 0; seed < 8; ++seed) seen.insert(model.generate(prompt, {5, 2.0, 1.0, seed, -1}));
  REQUIRE(seen.size() > 1);  // sampling samples
}

TEST_CASE("Decoding with a KV cache equals a full forward; greedy and top-p sampling", "[model][generate]") {
  check_cache<Gpt2All>(tiny_gpt2());
  check_cache<LlamaAll>(tiny_llama());
}

TEST_CASE("Parameter counts match the closed form of each architecture", "[model]") {
  Rng rng(1);
  {
    io::ModelConfig c = tiny_gpt2();
    Decoder<GPT2>::model<float> plain(c, rng);
    const Index d = c.d_model, f = c.d_ff, V = c.vocab, P = c.max_positions, L = c.layers;
    const Index per_layer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d);
    REQUIRE(count_parameters(plain).total == V * d + P * d + L * per_layer + 2 * d);
    REQUIRE(count_parameters(plain).trainable == 0);

    using MoLoRA6 = Decoder<GPT2, Slots<at<q, MoLoRA<10, 4>>, at<k, MoLoRA<10, 4>>, at<v, MoLoRA<10, 4>>, at<o, MoLoRA<10, 4>>,
                                        at<ffn_up, MoLoRA<10, 4>>, at<ffn_down, MoLoRA<10, 4>>>>;
    MoLoRA6::model<float> molora(c, rng);
    auto lora = [](Index in, Index out) { return in * 10 + in * 40 + 40 * out; };
    const Index adapters = L * (4 * lora(d, d) + lora(d, f) + lora(f, d));
    REQUIRE(count_parameters(molora).trainable == adapters);
    REQUIRE(count_parameters(molora).total == count_parameters(plain).total + adapters);

    using MoVModel = Decoder<GPT2, Slots<at<keys, MoV<10>>, at<values, MoV<10>>, at<ffn_hidden, MoV<10>, layers<1>>>>;
    MoVModel::model<float> mov(c, rng);
    REQUIRE(count_parameters(mov).trainable == L * 2 * (d * 10 + 10 * d) + (d * 10 + 10 * f));
  }
  {
    io::ModelConfig c = tiny_llama();
    Decoder<Llama>::model<float> plain(c, rng);
    const Index d = c.d_model, f = c.d_ff, V = c.vocab, L = c.layers, kv = c.kv_heads * c.head_dim();
    REQUIRE(count_parameters(plain).total == 2 * V * d + L * (2 * d + 2 * d * d + 2 * d * kv + 3 * d * f) + d);
    c.tied_embeddings = true;
    Decoder<Llama>::model<float> tied(c, rng);
    REQUIRE(count_parameters(tied).total == count_parameters(plain).total - V * d);
  }
}

TEST_CASE("Bad batches are rejected with a clear message and change nothing", "[model][errors]") {
  Rng rng(2);
  Gpt2All::model<double> model(tiny_gpt2(), rng, double_options());
  const TokenBatch good = padded_batch(11);
  const double before = model.loss(good);
  auto rejects = [&](TokenBatch b, const std::string& message) {
    REQUIRE_THROWS_AS(model.geometry(b), moet::error);
    REQUIRE_THROWS_WITH(model.geometry(b), Catch::Contains(message));
    REQUIRE_THROWS_WITH(model.forward(b), Catch::Contains(message));
  };
  TokenBatch b = good;
  b.ids[3] = 11;
  rejects(b, "token id 11 at position 3 is outside the vocabulary [0, 11)");
  b = good;
  b.ids.pop_back();
  rejects(b, "batch has 9 token ids, expected batch*seq = 10");
  b = good;
  b.mask.resize(4);
  rejects(b, "padding mask has 4 flags, expected batch*seq = 10");
  b = good;
  b.labels.assign(10, 12);
  rejects(b, "label 12 of token 0 is outside the vocabulary [0, 11)");
  b = TokenBatch{1, 11, std::vector<int>(11, 1), {}, {}};
  rejects(b, "sequence 0 has 11 tokens, more than the 10 learned positions");
  REQUIRE(model.loss(good) == before);
  REQUIRE_THROWS_WITH(model.generate({}, {}), Catch::Contains("non-empty prompt"));
  REQUIRE_THROWS_WITH(model.generate({1}, {4, 1.0, 0.0, 0, -1}), Catch::Contains("0 < top_p <= 1"));
  auto cache = model.start_cache();
  REQUIRE_THROWS_WITH(model.decode(cache, std::vector<int>(11, 1)), Catch::Contains("decoding 11 tokens after 0 runs past the 10 learned positions"));
  REQUIRE(cache.length == 0);
  using Misplaced = Decoder<GPT2, Slots<at<q, MoLoRA<2, 2>, layers<2>>>>;
  REQUIRE_THROWS_WITH(Misplaced::model<float>(tiny_gpt2(), rng), Catch::Contains("slot q is placed on layer 2 but the model has 2 layers"));
  REQUIRE_THROWS_WITH(Decoder<Llama>::model<float>(tiny_gpt2(), rng), Catch::Contains("describes a gpt2 model, expected llama"));
}

TEST_CASE("The LM head gradient formed in forward equals the one recomputed in backward", "[model]") {
  Rng rng(9);
  LlamaAll::model<double> model(tiny_llama(), rng, double_options(), 0.3);
  const auto g = model.geometry(padded_batch(13));
  const Matrix<double> h0 = rng.normal_matrix<double>(10, 8), d_loss = Matrix<double>::Constant(1, 1, 0.7);
  const auto fused = model.forward(g, h0);
  const auto plain = model.forward(g, h0, false);
  REQUIRE(fused.d_final.size() > 0);
  REQUIRE(plain.d_final.size() == 0);
  REQUIRE(fused.output() == plain.output());
  const Matrix<double> a = model.backward(fused, h0, d_loss, overwrite), b = model.backward(plain, h0, d_loss, overwrite);
  REQUIRE(a.isApprox(b, 1e-12));
}
