// Hugging Face config fields that change the math, applied: Llama rope_scaling (linear, dynamic,
// llama3) against the formulas of transformers' modeling_rope_utils written out here, attention
// and MLP biases and an explicit head_dim (gradient check in double, checkpoint round trip under
// the Hugging Face tensor names), GPT-2's other activation functions (values and gradients) and
// an untied GPT-2 head.
#include <catch2/catch.hpp>

#include <moet/models.hpp>

#include <cmath>
#include <filesystem>
#include <numbers>

#include "model_harness.hpp"

using namespace moet;
using namespace moet::slot;
using Catch::Matchers::Contains;

namespace {

/// Rotates one token's head (x1 | x2 halves) by angles p * inv_freq, as Hugging Face's
/// apply_rotary_pos_emb with rotate_half does.
Matrix<double> rotate_reference(const Matrix<double>& x, double p, const std::vector<double>& inv_freq) {
  const Index half = x.cols() / 2;
  Matrix<double> y(1, x.cols());
  for (Index i = 0; i < half; ++i) {
    const double c = std::cos(p * inv_freq[std::size_t(i)]), s = std::sin(p * inv_freq[std::size_t(i)]);
    y(0, i) = x(0, i) * c - x(0, i + half) * s;
    y(0, i + half) = x(0, i + half) * c + x(0, i) * s;
  }
  return y;
}

std::vector<double> default_inv_freq(Index dim, double base) {
  std::vector<double> f;
  for (Index i = 0; i < dim; i += 2) f.push_back(1.0 / std::pow(base, double(i) / double(dim)));
  return f;
}

io::ModelConfig llama_config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::llama;
  c.vocab = 13, c.d_model = 8, c.layers = 2, c.heads = 2, c.kv_heads = 1, c.d_ff = 10, c.max_positions = 8;
  c.rope_theta = 100.0, c.tied_embeddings = false;
  return c;
}
io::ModelConfig gpt2_config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 11, c.d_model = 8, c.layers = 2, c.heads = 2, c.kv_heads = 2, c.d_ff = 12, c.max_positions = 10;
  return c;
}

TokenBatch batch_of(Index batch, Index seq, int vocab) {
  TokenBatch b{batch, seq, {}, {}, {}};
  for (Index i = 0; i < batch * seq; ++i) b.ids.push_back(int((3 * i + 1) % vocab));
  return b;
}

template <class Model>
void check_gradients_of(Model& model, Rng& rng, Index vocab) {
  const auto report =
      testing::check_model_gradients(model, rng, batch_of(2, 4, int(vocab)), rng.normal_matrix<double>(8, model.config().d_model));
  INFO(report.summary());
  REQUIRE(report.ok);
}

}  // namespace

TEST_CASE("rope_scaling: linear, dynamic and llama3 frequencies as Hugging Face defines them", "[hf][rope]") {
  Rng rng(41);
  const Index hd = 16;
  const double theta = 10000.0;
  const Matrix<double> x = rng.normal_matrix<double>(1, hd);
  const std::vector<double> plain = default_inv_freq(hd, theta);
  auto rotated = [&](const RopeScaling& s, Index p) { return cpu_impl::Rotary<double>(1, hd, theta, s).forward(x, {p}).y; };

  // linear: every frequency divided by the factor.
  RopeScaling linear{RopeScaling::Type::linear, 4.0};
  std::vector<double> f = plain;
  for (double& v : f) v /= 4.0;
  for (Index p : {0, 3, 100}) REQUIRE((rotated(linear, p) - rotate_reference(x, double(p), f)).cwiseAbs().maxCoeff() < 1e-12);

  // dynamic (NTK): unchanged up to the original context, a larger base beyond it.
  RopeScaling dynamic{RopeScaling::Type::dynamic, 2.0};
  dynamic.original_max_positions = 64;
  REQUIRE((rotated(dynamic, 63) - rotate_reference(x, 63.0, plain)).cwiseAbs().maxCoeff() < 1e-12);
  const double length = 200.0, base = theta * std::pow(2.0 * length / 64.0 - 1.0, double(hd) / double(hd - 2));
  REQUIRE((rotated(dynamic, 199) - rotate_reference(x, 199.0, default_inv_freq(hd, base))).cwiseAbs().maxCoeff() < 1e-12);
  REQUIRE((rotated(dynamic, 199) - rotate_reference(x, 199.0, plain)).cwiseAbs().maxCoeff() > 1e-3);

  // llama3: low frequencies divided by the factor, high ones kept, the band between smoothed.
  RopeScaling llama3{RopeScaling::Type::llama3, 8.0, 1.0, 4.0, 256};
  std::vector<double> g;
  int low = 0, high = 0, band = 0;
  for (double inv : plain) {
    const double wavelen = 2 * std::numbers::pi / inv, old = 256.0;
    if (wavelen < old / 4.0) {
      g.push_back(inv), ++high;
    } else if (wavelen > old / 1.0) {
      g.push_back(inv / 8.0), ++low;
    } else {
      const double smooth = (old / wavelen - 1.0) / (4.0 - 1.0);
      g.push_back((1 - smooth) * inv / 8.0 + smooth * inv), ++band;
    }
  }
  REQUIRE((low > 0 && high > 0 && band > 0));  // the case covers all three regimes
  for (Index p : {1, 17, 1000}) REQUIRE((rotated(llama3, p) - rotate_reference(x, double(p), g)).cwiseAbs().maxCoeff() < 1e-12);

  REQUIRE_THROWS_WITH(cpu_impl::Rotary<double>(1, hd, theta, RopeScaling{RopeScaling::Type::llama3, 8.0, 4.0, 1.0, 256}),
                      Contains("high_freq_factor > low_freq_factor"));
  REQUIRE_THROWS_WITH(cpu_impl::Rotary<double>(1, hd, theta, RopeScaling{RopeScaling::Type::dynamic, 2.0}),
                      Contains("need the original context length"));
}

TEST_CASE("rope_scaling from config.json reaches the model's logits", "[hf][rope][model]") {
  Rng rng(42);
  const std::string base = R"({"model_type":"llama","vocab_size":13,"hidden_size":8,"num_hidden_layers":2,"num_attention_heads":2,
      "num_key_value_heads":1,"intermediate_size":10,"rope_theta":100.0,"max_position_embeddings":8)";
  const io::ModelConfig plain_config = io::parse_model_config(base + "}");
  const io::ModelConfig dynamic_config = io::parse_model_config(base + R"(,"rope_scaling":{"rope_type":"dynamic","factor":2.0}})");
  const io::ModelConfig linear_config = io::parse_model_config(base + R"(,"rope_scaling":{"rope_type":"linear","factor":2.0}})");
  Rng a(7), b(7), c(7);
  Decoder<Llama>::model<double> plain(plain_config, a, {}, 0.3), dynamic(dynamic_config, b, {}, 0.3), linear(linear_config, c, {}, 0.3);
  const TokenBatch shorter = batch_of(1, 6, 13), longer = batch_of(1, 12, 13);
  REQUIRE(dynamic.logits(shorter) == plain.logits(shorter));  // within the original context: unchanged
  REQUIRE(!dynamic.logits(longer).isApprox(plain.logits(longer), 1e-6));
  REQUIRE(!linear.logits(shorter).isApprox(plain.logits(shorter), 1e-6));
  // Cached decoding with dynamic scaling: each call's frequencies follow its last position (as
  // in Hugging Face), so within the original context it equals the full forward.
  auto cache = dynamic.start_cache();
  const Matrix<double> step = dynamic.decode(cache, std::vector<int>(shorter.ids.begin(), shorter.ids.end()));
  REQUIRE(step.isApprox(dynamic.logits(shorter), 1e-12));
  check_gradients_of(linear, rng, 13);
}

TEST_CASE("Llama attention and MLP biases and an explicit head_dim", "[hf][model][grad]") {
  Rng rng(43);
  io::ModelConfig c = llama_config();
  c.explicit_head_dim = 6;  // q: 8 -> 12, k and v: 8 -> 6, o: 12 -> 8
  c.attention_bias = true, c.mlp_bias = true;
  using Adapted = Decoder<Llama, Slots<at<q, MoLoRA<2, 2>>, at<o, LoRAAdapter<2>>, at<ffn_gate, MoLoRA<2, 1>>, at<keys, MoV<2>>>>;
  Adapted::model<double> model(c, rng, {.router = {.fp32_softmax = false}}, 0.3);
  std::vector<std::string> names;
  for (const auto& t : model.base_tensors()) names.push_back(t.name);
  for (const char* n : {"model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.o_proj.bias", "model.layers.0.mlp.gate_proj.bias",
                        "model.layers.1.mlp.down_proj.bias"})
    REQUIRE(std::find(names.begin(), names.end(), n) != names.end());
  REQUIRE(model.blocks[0].slot<q>().weight().cols() == 12);
  REQUIRE(model.blocks[0].slot<o>().weight().rows() == 12);

  // The biases act: nonzero biases change the logits.
  const TokenBatch b = batch_of(1, 5, 13);
  const Matrix<double> zero_bias = model.logits(b);
  for (auto& t : model.base_tensors())
    if (t.name.ends_with(".bias")) rng.fill_normal(t.parts[0]->mutable_value(), 0.0, 0.5);
  const Matrix<double> with_bias = model.logits(b);
  REQUIRE(!with_bias.isApprox(zero_bias, 1e-6));

  // A checkpoint round trip under the Hugging Face names keeps them.
  const auto dir = std::filesystem::temp_directory_path() / "moet_test_llama_bias";
  std::filesystem::remove_all(dir);
  save_pretrained(model, dir, {.dtype = io::DType::F64});
  Rng other(5);
  auto loaded = load_pretrained<Decoder<Llama>, double>(dir, other);
  REQUIRE(loaded.config().explicit_head_dim == 6);
  REQUIRE(loaded.config().attention_bias);
  REQUIRE(loaded.logits(b).isApprox(with_bias, 1e-12));  // the adapters are at init: the base alone
  std::filesystem::remove_all(dir);

  check_gradients_of(model, rng, 13);
}

TEST_CASE("GPT-2 activation functions: values, gradients, and an untied head", "[hf][model][grad]") {
  for (auto [kind, x, y] : {std::tuple{Activation::gelu, 1.0, 0.8413447460685429}, {Activation::gelu, -0.5, -0.15426876936299347},
                            {Activation::silu, 1.0, 0.7310585786300049}, {Activation::relu, -2.0, 0.0}, {Activation::relu, 3.0, 3.0}}) {
    Matrix<double> in(1, 1);
    in(0, 0) = x;
    REQUIRE(cpu_impl::Elementwise<double>{kind}.forward(in)(0, 0) == Approx(y).epsilon(1e-14));
  }
  for (Activation kind : {Activation::gelu, Activation::silu, Activation::relu}) {
    INFO("activation " << int(kind));
    Rng rng(44);
    io::ModelConfig c = gpt2_config();
    c.activation = kind;
    c.tied_embeddings = false;
    Decoder<GPT2, Slots<at<ffn_up, LoRAAdapter<2>>, at<ffn_hidden, MoV<2>>>>::model<double> model(c, rng, {.router = {.fp32_softmax = false}}, 0.3);
    // The round trip keeps the activation and the untied head (the adapters are at init).
    const auto dir = std::filesystem::temp_directory_path() / "moet_test_gpt2_activation";
    std::filesystem::remove_all(dir);
    save_pretrained(model, dir, {.dtype = io::DType::F64});
    auto loaded = load_pretrained<Decoder<GPT2>, double>(dir, rng);
    REQUIRE(loaded.config().activation == kind);
    REQUIRE_FALSE(loaded.config().tied_embeddings);
    const TokenBatch b = batch_of(1, 4, 11);
    REQUIRE(loaded.logits(b).isApprox(model.logits(b), 1e-12));
    std::filesystem::remove_all(dir);
    check_gradients_of(model, rng, 11);
  }
}
