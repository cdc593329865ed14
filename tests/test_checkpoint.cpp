// Pretrained decoders on disk in Hugging Face layout: a tiny random checkpoint is written and
// loaded back with bit-identical logits (GPT-2 single file, Llama sharded, F16/BF16 storage),
// adapters round-trip and refuse a different layout, and broken checkpoints (a tensor missing, a
// shape that does not match config.json) give a clear moet error and leave the model as it was.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <moet/models.hpp>

#include "scratch.hpp"

using namespace moet;
using namespace moet::slot;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

fs::path scratch(const std::string& name) { return testing::scratch_folder(name); }

io::ModelConfig gpt2_config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 17, c.d_model = 12, c.layers = 2, c.heads = 3, c.kv_heads = 3, c.d_ff = 20, c.max_positions = 16;
  return c;
}
io::ModelConfig llama_config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::llama;
  c.vocab = 19, c.d_model = 16, c.layers = 3, c.heads = 4, c.kv_heads = 2, c.d_ff = 24, c.max_positions = 64;
  c.rope_theta = 10000.0, c.norm_eps = 1e-6, c.tied_embeddings = false;
  return c;
}

/// Every frozen tensor random (norm weights and biases included), so a mix-up shows.
template <class Model>
void randomize_base(Model& model, Rng& rng) {
  for_each_frozen(model, [&](auto& f) { rng.fill_normal(f.mutable_value(), 0.0, 0.3); });
}

const TokenBatch batch{2, 6, {1, 5, 3, 9, 2, 0, 4, 4, 8, 1, 7, 6}, {1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1}, {}};

using Gpt2MoLoRA = Decoder<GPT2, Slots<at<q, MoLoRA<3, 2>>, at<v, MoLoRA<3, 2>>, at<keys, MoV<2>, layers<1>>>>;
using Gpt2Other = Decoder<GPT2, Slots<at<q, MoLoRA<3, 4>>, at<v, MoLoRA<3, 2>>, at<keys, MoV<2>, layers<1>>>>;

}  // namespace

TEST_CASE("A GPT-2 checkpoint in HF layout loads back with bit-identical logits", "[io][model]") {
  Rng rng(1);
  Decoder<GPT2>::model<float> original(gpt2_config(), rng);
  randomize_base(original, rng);
  const fs::path dir = scratch("gpt2");
  save_pretrained(original, dir);
  REQUIRE(fs::exists(dir / "config.json"));
  const io::SafetensorsFile file(dir / "model.safetensors");
  REQUIRE(file.info("transformer.h.1.attn.c_attn.weight").shape == std::vector<std::int64_t>{12, 36});  // Conv1D (in, out)
  REQUIRE(file.info("transformer.h.0.mlp.c_fc.bias").shape == std::vector<std::int64_t>{20});

  auto loaded = load_pretrained<Decoder<GPT2>, float>(dir, rng);
  REQUIRE(loaded.config().d_ff == 20);
  REQUIRE(loaded.logits(batch) == original.logits(batch));
  REQUIRE(count_parameters(loaded).total == count_parameters(original).total);
}

TEST_CASE("A sharded Llama checkpoint loads back with bit-identical logits; F16 and BF16 storage load", "[io][model]") {
  Rng rng(2);
  Decoder<Llama>::model<float> original(llama_config(), rng);
  randomize_base(original, rng);
  const fs::path dir = scratch("llama");
  save_pretrained(original, dir, {.max_shard_bytes = 4096});
  REQUIRE(fs::exists(dir / "model.safetensors.index.json"));
  REQUIRE(fs::exists(dir / "model-00001-of-00002.safetensors") == false);  // 4 KiB shards: many of them
  const io::Checkpoint checkpoint(dir);
  REQUIRE(checkpoint.file_of("model.layers.2.self_attn.k_proj.weight").info("model.layers.2.self_attn.k_proj.weight").shape ==
          std::vector<std::int64_t>{8, 16});  // nn.Linear (out, in)
  auto loaded = load_pretrained<Decoder<Llama>, float>(dir, rng);
  REQUIRE(loaded.logits(batch) == original.logits(batch));

  for (auto dtype : {io::DType::F16, io::DType::BF16}) {
    const fs::path half = scratch(std::string("llama_") + io::dtype_name(dtype));
    save_pretrained(original, half, {.dtype = dtype});
    auto rounded = load_pretrained<Decoder<Llama>, float>(half, rng);
    const Matrix<float> a = rounded.logits(batch), b = original.logits(batch);
    INFO(io::dtype_name(dtype) << " max difference " << (a - b).cwiseAbs().maxCoeff());
    REQUIRE(a != b);  // rounded ...
    REQUIRE((a - b).cwiseAbs().maxCoeff() < (dtype == io::DType::F16 ? 1e-2 : 5e-2));  // ... but close
  }
}

TEST_CASE("Rng::skip_normals advances the stream as the draws it skips", "[io][random]") {
  for (std::uint64_t spent : {0, 1}) {  // with and without a spare value pending
    for (std::uint64_t n : {0, 1, 2, 3, 4, 7, 1000, 1001}) {
      Rng drawn(11), skipped(11);
      for (std::uint64_t i = 0; i < spent; ++i) (void)drawn.normal(), (void)skipped.normal();
      for (std::uint64_t i = 0; i < n; ++i) (void)drawn.normal();
      skipped.skip_normals(n);
      INFO("spent " << spent << ", skipped " << n);
      for (int i = 0; i < 3; ++i) REQUIRE(skipped.normal() == drawn.normal());
      REQUIRE(skipped.next() == drawn.next());
    }
  }
}

TEST_CASE("load_pretrained draws no frozen weights, and its adapters are those of a random model", "[io][model]") {
  Rng rng(4);
  Gpt2MoLoRA::model<float> original(gpt2_config(), rng);
  randomize_base(original, rng);
  const fs::path base = scratch("placeholder");
  save_pretrained(original, base);

  // Before: a random model (every frozen weight drawn) with the checkpoint loaded over it.
  Rng r1(5), r2(5);
  Gpt2MoLoRA::model<float> drawn(gpt2_config(), r1);
  load_base(drawn, io::Checkpoint(base));
  auto loaded = load_pretrained<Gpt2MoLoRA, float>(base, r2);
  REQUIRE(r1.next() == r2.next());  // the Rng advanced alike
  std::vector<Matrix<float>> a, b;
  for_each_param(drawn, [&](auto& p) { a.push_back(p.value()); });
  for_each_param(loaded, [&](auto& p) { b.push_back(p.value()); });
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(a[i] == b[i]);
  REQUIRE(loaded.logits(batch) == drawn.logits(batch));

  // The placeholder itself: zeros, and the same adapters.
  Rng r3(5);
  Gpt2MoLoRA::model<float> placeholder(gpt2_config(), r3, {}, FrozenInit::placeholder());
  for_each_frozen(placeholder, [&](auto& f) {
    if (f.name() != "weight" || f.rows() != 1) REQUIRE(f.value().isZero());  // norms start at one
  });
  std::vector<Matrix<float>> c;
  for_each_param(placeholder, [&](auto& p) { c.push_back(p.value()); });
  for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(c[i] == a[i]);

  // A stddev that is negative or not finite is refused by name.
  REQUIRE_THROWS_AS((Gpt2MoLoRA::model<float>(gpt2_config(), r3, {}, -0.1)), value_error);
  REQUIRE_THROWS_WITH((Gpt2MoLoRA::model<float>(gpt2_config(), r3, {}, -0.1)),
                      Contains("FrozenInit: the frozen weights' stddev must be finite and >= 0, got -0.1"));
  REQUIRE_THROWS_WITH((Gpt2MoLoRA::model<float>(gpt2_config(), r3, {}, std::nan(""))), Contains("got nan"));
}

TEST_CASE("Adapters save and load alone, and refuse a different layout", "[io][model]") {
  Rng rng(3);
  Gpt2MoLoRA::model<float> trained(gpt2_config(), rng);
  randomize_base(trained, rng);
  for_each_param(trained, [&](auto& p) { rng.fill_normal(p.value(), 0.0, 0.2); });
  const fs::path base = scratch("base"), adapters = scratch("adapters");
  save_pretrained(trained, base);
  save_adapters(trained, adapters);
  const io::SafetensorsFile file(adapters / "adapter_model.safetensors");
  Index stored = 0;
  for (const auto& t : file.tensors()) stored += t.elements();
  REQUIRE(stored == count_parameters(trained).trainable);  // only the trainable tensors
  REQUIRE(file.contains("layers.1.keys.ia3_scales"));
  REQUIRE(file.contains("layers.0.q.lora_down"));

  auto fresh = load_pretrained<Gpt2MoLoRA, float>(base, rng);
  REQUIRE(fresh.logits(batch) != trained.logits(batch));
  load_adapters(fresh, adapters);
  REQUIRE(fresh.logits(batch) == trained.logits(batch));

  auto other = load_pretrained<Gpt2Other, float>(base, rng);
  const Matrix<float> before = other.logits(batch);
  REQUIRE_THROWS_AS(load_adapters(other, adapters), format_error);
  REQUIRE_THROWS_WITH(load_adapters(other, adapters),
                      Contains("saved for a different adapter layout: slot layers.0.q holds \"Mixture<Router<Soft>, "
                               "Expert<LoRA<2>>, 3>\" in the file but \"Mixture<Router<Soft>, Expert<LoRA<4>>, 3>\" in this model"));
  REQUIRE(other.logits(batch) == before);

  using NoKeys = Decoder<GPT2, Slots<at<q, MoLoRA<3, 2>>, at<v, MoLoRA<3, 2>>>>;
  auto fewer = load_pretrained<NoKeys, float>(base, rng);
  REQUIRE_THROWS_WITH(load_adapters(fewer, adapters), Contains("slot layers.1.keys holds \"Mixture<Router<Soft>, Expert<IA3>, 2>\" "
                                                               "in the file but no adapter in this model"));
  REQUIRE_THROWS_WITH(load_adapters(fewer, scratch("empty")), Contains("cannot open") && Contains("adapter_config.json: no such file"));
}

TEST_CASE("Broken checkpoints give a clear error and leave the model as it was", "[io][model][errors]") {
  Rng rng(4);
  Decoder<GPT2>::model<float> model(gpt2_config(), rng);
  randomize_base(model, rng);
  const Matrix<float> before = model.logits(batch);
  const fs::path dir = scratch("broken");
  save_pretrained(model, dir);

  // A tensor missing: rewrite the file without one.
  {
    const io::SafetensorsFile full(dir / "model.safetensors");
    std::vector<io::TensorToWrite> kept;
    for (const auto& t : full.tensors())
      if (t.name != "transformer.h.1.ln_2.bias") {
        const Index rows = t.shape.size() == 2 ? t.shape[0] : 1, cols = t.shape.back();
        auto w = io::TensorToWrite::from(t.name, full.matrix<float>(t.name, rows, cols));
        w.shape = t.shape;
        kept.push_back(std::move(w));
      }
    const fs::path missing = scratch("missing");
    fs::copy_file(dir / "config.json", missing / "config.json");
    io::write_safetensors(missing / "model.safetensors", kept);
    REQUIRE_THROWS_AS(load_base(model, io::Checkpoint(missing)), format_error);
    REQUIRE_THROWS_WITH(load_base(model, io::Checkpoint(missing)), Contains("tensor 'transformer.h.1.ln_2.bias' is missing"));
    REQUIRE_THROWS_WITH((load_pretrained<Decoder<GPT2>, float>(missing, rng)), Contains("transformer.h.1.ln_2.bias"));
  }
  // A config that does not match the weights: d_ff 24 in config.json, 20 in the file.
  {
    const fs::path wrong = scratch("wrong_shape");
    fs::copy_file(dir / "model.safetensors", wrong / "model.safetensors");
    io::ModelConfig c = gpt2_config();
    c.d_ff = 24;
    std::ofstream(wrong / "config.json") << model_config_json(c);
    REQUIRE_THROWS_WITH((load_pretrained<Decoder<GPT2>, float>(wrong, rng)),
                        Contains("tensor 'transformer.h.0.mlp.c_fc.weight' has shape (12, 20), expected (12, 24)"));
    Decoder<GPT2>::model<float> wide(c, rng);
    REQUIRE_THROWS_AS(load_base(wide, io::Checkpoint(wrong)), format_error);
  }
  // A config naming another architecture.
  REQUIRE_THROWS_WITH((load_pretrained<Decoder<Llama>, float>(dir, rng)), Contains("describes a gpt2 model, expected llama"));
  REQUIRE(model.logits(batch) == before);
  // A checkpoint without the "transformer." prefix (the original GPT-2 files) loads too.
  {
    const io::SafetensorsFile full(dir / "model.safetensors");
    std::vector<io::TensorToWrite> renamed;
    for (const auto& t : full.tensors()) {
      const Index rows = t.shape.size() == 2 ? t.shape[0] : 1, cols = t.shape.back();
      auto w = io::TensorToWrite::from(t.name.substr(std::string("transformer.").size()), full.matrix<float>(t.name, rows, cols));
      w.shape = t.shape;
      renamed.push_back(std::move(w));
    }
    const fs::path bare = scratch("bare");
    io::write_safetensors(bare / "model.safetensors", renamed);
    Decoder<GPT2>::model<float> again(gpt2_config(), rng);
    load_base(again, io::Checkpoint(bare));
    REQUIRE(again.logits(batch) == before);
  }
}

TEST_CASE("adapter_config.json records what rebuilds each adapter's function, and a different alpha is refused", "[io][model]") {
  Rng rng(4);
  Gpt2MoLoRA::model<float> trained(gpt2_config(), rng, {.lora_alpha = 16});
  for_each_param(trained, [&](auto& p) { rng.fill_normal(p.value(), 0.0, 0.2); });
  const fs::path dir = scratch("described");
  save_adapters(trained, dir);
  std::ifstream in(dir / "adapter_config.json");
  const auto j = nlohmann::json::parse(in);
  REQUIRE(j["version"] == 2);
  const auto& q = j["adapters"]["layers.0.q"];
  REQUIRE(q["spec"] == "Mixture<Router<Soft>, Expert<LoRA<2>>, 3>");
  REQUIRE(q["experts"] == 3);
  REQUIRE(q["router"]["policy"] == "soft");
  REQUIRE(q["router"]["fp32_softmax"] == true);
  REQUIRE(q["expert"]["type"] == "lora");
  REQUIRE(q["expert"]["rank"] == 2);
  REQUIRE(q["expert"]["alpha"] == 16.0);
  REQUIRE(q["expert"]["scale"] == 8.0);
  REQUIRE(q["tensors"]["lora_down"] == nlohmann::json::array({12, 6}));
  const auto& keys = j["adapters"]["layers.1.keys"];
  REQUIRE(keys["expert"]["type"] == "ia3");
  REQUIRE(keys["expert"]["router_width"] == 12);

  Gpt2MoLoRA::model<float> default_alpha(gpt2_config(), rng);  // alpha = R: another function
  REQUIRE_THROWS_WITH(load_adapters(default_alpha, dir),
                      Contains("layers.0.q/expert/alpha is 16.0 in the file but 2.0 in this model"));
  Gpt2MoLoRA::model<float> same(gpt2_config(), rng, {.lora_alpha = 16});
  REQUIRE_NOTHROW(load_adapters(same, dir));

  // A file from before the options were recorded (version 1) still loads by its layout.
  nlohmann::ordered_json v1 = nlohmann::ordered_json::parse(std::ifstream(dir / "adapter_config.json"));
  v1.erase("version"), v1.erase("adapters");
  std::ofstream(dir / "adapter_config.json") << v1.dump(2);
  REQUIRE_NOTHROW(load_adapters(default_alpha, dir));
}
