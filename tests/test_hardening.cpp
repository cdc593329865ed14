// Bad input found by sanitizers and fuzzing (issue 15), one case per class of bug, each failing
// before its fix: sizes that wrap, JSON nested deep enough to overflow the stack, a tiny config
// that demands gigabytes, a failed CALM decode that moved the caches, non-finite values loaded or
// trained on, adapter_config.json with its keys reordered, paths of the wrong kind, a NaN
// learning rate, a generation that would run past GPT-2's positions.
#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include <moet/models.hpp>

#include "scratch.hpp"

using namespace moet;
using namespace moet::slot;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

fs::path scratch(const std::string& name) { return testing::scratch_folder(name); }

void write(const fs::path& p, const std::string& text) { std::ofstream(p, std::ios::binary) << text; }

/// A .safetensors file from a header text and `data` zero bytes.
fs::path raw_safetensors(const fs::path& p, const std::string& header, std::size_t data) {
  std::ofstream out(p, std::ios::binary);
  const std::uint64_t n = header.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << header << std::string(data, '\0');
  return p;
}

io::ModelConfig gpt2_config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 13, c.d_model = 8, c.layers = 2, c.heads = 2, c.kv_heads = 2, c.d_ff = 12, c.max_positions = 16;
  return c;
}
io::ModelConfig llama_config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::llama;
  c.vocab = 11, c.d_model = 8, c.layers = 2, c.heads = 4, c.kv_heads = 2, c.d_ff = 12, c.max_positions = 64;
  c.rope_theta = 1000.0, c.tied_embeddings = false;
  return c;
}

std::string nested(std::size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

using Gpt2MoLoRA = Decoder<GPT2, Slots<at<q, MoLoRA<3, 2>>, at<keys, MoV<2>, layers<1>>>>;

}  // namespace

TEST_CASE("Sizes that would wrap are refused", "[hardening][io]") {
  // A dimension of 2^62 with F32 wrapped the byte count to 0 and passed with data_offsets [0, 0].
  const fs::path wraps = raw_safetensors(scratch("wrap") / "w.safetensors",
                                         R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0);
  REQUIRE_THROWS_AS(io::SafetensorsFile(wraps), format_error);
  REQUIRE_THROWS_WITH(io::SafetensorsFile(wraps), Contains("tensor 'w' has 0 bytes, but shape (4611686018427387904) of F32 needs 2^64 or more"));
  const fs::path two = raw_safetensors(scratch("wrap") / "two.safetensors",
                                       R"({"w":{"dtype":"BF16","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0);
  REQUIRE_THROWS_WITH(io::SafetensorsFile(two), Contains("but shape (4294967296, 4294967296) of BF16 needs 2^64 or more"));
  // A zero anywhere is an empty tensor, whatever the other dimensions are.
  const fs::path empty = raw_safetensors(scratch("wrap") / "empty.safetensors",
                                         R"({"w":{"dtype":"F32","shape":[4611686018427387904,0],"data_offsets":[0,0]}})", 0);
  REQUIRE(io::SafetensorsFile(empty).info("w").elements() == 0);

  // Config sizes: n_embd 2^62 overflowed 4 * n_embd (and every product after it).
  REQUIRE_THROWS_WITH(io::parse_model_config(R"({"model_type":"gpt2","vocab_size":10,"n_embd":4611686018427387904,)"
                                             R"("n_layer":1,"n_head":1,"n_positions":8})"),
                      Contains("field 'n_embd' must be a positive integer of at most 2147483647, got 4611686018427387904"));
  REQUIRE_THROWS_WITH(io::parse_model_config(R"({"model_type":"gpt2","vocab_size":18446744073709551615,"n_embd":4,)"
                                             R"("n_layer":1,"n_head":1,"n_positions":8})"),
                      Contains("field 'vocab_size' must be a positive integer of at most"));

  // A number too large for a double is a format error, not an infinity (that would be written back as null).
  REQUIRE_THROWS_AS(io::parse_model_config(R"({"model_type":"llama","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,)"
                                           R"("num_attention_heads":2,"intermediate_size":16,"rope_theta":1e999})"),
                    format_error);

  // A batch whose batch x seq wraps.
  Rng rng(1);
  Decoder<GPT2>::model<float> model(gpt2_config(), rng);
  const Index huge = Index(1) << 32;
  REQUIRE_THROWS_WITH(model.loss(TokenBatch{huge, huge, {1, 2}, {}, {}}), Contains("overflow a 64-bit count"));
}

TEST_CASE("JSON nested deeper than moet's bound is refused, not a stack overflow", "[hardening][io]") {
  const std::string deep = nested(200000);  // 400 KB: overflowed the stack before the bound
  REQUIRE_THROWS_AS(io::parse_model_config(deep, "deep/config.json"), format_error);
  REQUIRE_THROWS_WITH(io::parse_model_config(deep, "deep/config.json"), Contains("deep/config.json: JSON nested deeper than 64 levels"));
  REQUIRE_THROWS_WITH(io::parse_model_config(R"({"model_type":"gpt2","x":)" + nested(100) + "}"), Contains("nested deeper than 64"));
  REQUIRE_THROWS_WITH(io::parse_json(nested(65), "t"), Contains("nested deeper"));
  REQUIRE_NOTHROW(io::parse_json(nested(64), "t"));

  const fs::path header = raw_safetensors(scratch("deep") / "h.safetensors", R"({"__metadata__":)" + nested(5000) + "}", 0);
  REQUIRE_THROWS_WITH(io::SafetensorsFile(header), Contains("header: JSON nested deeper than 64 levels"));

  const fs::path folder = scratch("deep_index");
  write(folder / "model.safetensors.index.json", R"({"weight_map":)" + nested(100000) + "}");
  REQUIRE_THROWS_WITH(io::Checkpoint(folder), Contains("model.safetensors.index.json: JSON nested deeper"));

  Rng rng(2);
  Gpt2MoLoRA::model<float> model(gpt2_config(), rng);
  const fs::path adapters = scratch("deep_adapters");
  save_adapters(model, adapters);
  write(adapters / "adapter_config.json", R"({"format":)" + nested(100000) + "}");
  REQUIRE_THROWS_WITH(load_adapters(model, adapters), Contains("adapter_config.json: JSON nested deeper than 64 levels"));
}

TEST_CASE("A tiny config cannot make load_pretrained allocate what the checkpoint does not hold", "[hardening][io]") {
  // One 4-value tensor next to a config of 2000 layers (or a vocabulary of 1e8): refused before
  // the model is built, in well under a second, naming both sizes.
  const fs::path dir = scratch("tiny");
  raw_safetensors(dir / "model.safetensors", R"({"wte.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})", 16);
  for (const std::string fields : {R"("vocab_size":50257,"n_embd":768,"n_layer":2000,"n_head":12,"n_positions":1024)",
                                   R"("vocab_size":100000000,"n_embd":64,"n_layer":1,"n_head":1,"n_positions":8)"}) {
    write(dir / "config.json", R"({"model_type":"gpt2",)" + fields + "}");
    Rng rng(3);
    const auto start = std::chrono::steady_clock::now();
    REQUIRE_THROWS_AS((load_pretrained<Decoder<GPT2>, float>(dir, rng)), format_error);
    REQUIRE_THROWS_WITH((load_pretrained<Decoder<GPT2>, float>(dir, rng)),
                        Contains("frozen values but the checkpoint holds 4 (a config for another checkpoint?)"));
    REQUIRE(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
  }
  write(dir / "config.json", R"({"model_type":"llama","vocab_size":2147483647,"hidden_size":2147483644,"num_hidden_layers":2147483647,)"
                             R"("num_attention_heads":2,"intermediate_size":2147483647})");
  Rng rng(4);
  REQUIRE_THROWS_WITH((load_pretrained<Decoder<Llama>, float>(dir, rng)),
                      Contains("the config describes a model of more than 1099511627776 frozen values (LoadOptions::max_parameters)"));
}

TEST_CASE("The frozen-value count load_pretrained checks equals the model's", "[hardening][io]") {
  // base_parameter_count is the bound a checkpoint must meet; it must be exact for every
  // architecture option, or a valid checkpoint would be refused.
  auto frozen_values = [](auto& model) {
    std::uint64_t n = 0;
    for (const auto& t : model.base_tensors())
      for (const auto* p : t.parts) n += std::uint64_t(p->rows() * p->cols());
    return n;
  };
  Rng rng(5);
  for (bool tied : {true, false}) {
    io::ModelConfig g = gpt2_config();
    g.tied_embeddings = tied;
    Decoder<GPT2>::model<float> gpt2(g, rng);
    REQUIRE(io::base_parameter_count(g, std::uint64_t(1) << 40, "t") == frozen_values(gpt2));
  }
  for (int variant = 0; variant < 4; ++variant) {
    io::ModelConfig l = llama_config();
    l.attention_bias = variant & 1;
    l.mlp_bias = variant & 2;
    l.tied_embeddings = variant == 3;
    if (variant == 2) l.explicit_head_dim = 6;
    Decoder<Llama>::model<float> llama(l, rng);
    INFO("variant " << variant);
    REQUIRE(io::base_parameter_count(l, std::uint64_t(1) << 40, "t") == frozen_values(llama));
  }
}

TEST_CASE("A rejected decode call leaves every cache as it was", "[hardening][calm][generate]") {
  using Pair = Compose<Decoder<Llama>, Decoder<GPT2>, CrossAttention<>, Every<1>>;
  Rng rng(6);
  Pair::model<double> pair(llama_config(), gpt2_config(), rng, {.init_stddev = 0.3});
  auto clean = pair.start_cache(), dirty = pair.start_cache();
  pair.decode(clean, {1, 4});
  pair.decode(dirty, {1, 4});
  // One bad id for the anchor (vocabulary 11) but a good one for the augmenting model (13): the
  // augmenting model's cache moved on before the anchor refused, and stayed one token ahead.
  REQUIRE_THROWS_WITH(pair.decode(dirty, {3, 12}), Contains("token id 12 is outside the vocabulary [0, 11)"));
  REQUIRE_THROWS_WITH(pair.decode(dirty, {3, 5}, {3, 99}), Contains("token id 99"));
  REQUIRE(dirty.augments[0].length == clean.augments[0].length);
  REQUIRE(dirty.anchor.length == clean.anchor.length);
  REQUIRE(pair.decode(dirty, {7}) == pair.decode(clean, {7}));

  // The decoder on its own, past GPT-2's 16 positions.
  Decoder<GPT2>::model<double> gpt2(gpt2_config(), rng);
  auto cache = gpt2.start_cache();
  gpt2.decode(cache, std::vector<int>(15, 2));
  REQUIRE_THROWS_WITH(gpt2.decode(cache, {1, 2}), Contains("decoding 2 tokens after 15 runs past the 16 learned positions"));
  REQUIRE(cache.length == 15);
  REQUIRE(cache.layers[1].k.rows() == 15);
}

TEST_CASE("generate refuses up front a run past GPT-2's positions, and bad settings", "[hardening][generate]") {
  Rng rng(7);
  Decoder<GPT2>::model<float> model(gpt2_config(), rng);
  // Before: 12 tokens were generated, then decoding the 13th threw and they were lost.
  REQUIRE_THROWS_WITH(model.generate({1, 2, 3, 4}, {.max_new_tokens = 20}),
                      Contains("a prompt of 4 tokens and max_new_tokens 20 pass the 16 learned positions; ask for at most 12 new tokens"));
  REQUIRE(model.generate({1, 2, 3, 4}, {.max_new_tokens = 12}).size() == 12);
  REQUIRE_THROWS_WITH(model.generate({1}, {.max_new_tokens = -1}), Contains("max_new_tokens must be >= 0, got -1"));
  // Llama has no position limit; a huge max_new_tokens must not reserve a huge cache up front.
  Decoder<Llama>::model<float> llama(llama_config(), rng);
  REQUIRE(llama.generate({1, 2}, {.max_new_tokens = 3, .eos = -1}).size() == 3);
  REQUIRE(Decoder<Llama>::model<float>::cache_reserve({1, 2}, {.max_new_tokens = std::numeric_limits<int>::max()}) == 4096);
}

TEST_CASE("Non-finite values are refused when loading, naming the tensor and the index", "[hardening][io]") {
  Rng rng(8);
  Gpt2MoLoRA::model<float> model(gpt2_config(), rng);
  const fs::path base = scratch("nan_base"), adapters = scratch("nan_adapters");
  model.blocks[1].norm2.weight.mutable_value()(0, 5) = std::nanf("");
  save_pretrained(model, base);
  REQUIRE_THROWS_AS((load_pretrained<Gpt2MoLoRA, float>(base, rng)), format_error);
  REQUIRE_THROWS_WITH((load_pretrained<Gpt2MoLoRA, float>(base, rng)),
                      Contains("tensor 'transformer.h.1.ln_2.weight' holds ") && Contains("nan at index 5 (row 0, column 5)"));
  REQUIRE_NOTHROW((load_pretrained<Gpt2MoLoRA, float>(base, rng, {}, {.check_finite = false})));

  // A double value that a float overflows to infinity.
  Decoder<GPT2>::model<double> wide(gpt2_config(), rng);
  wide.wte.table.mutable_value()(2, 1) = 1e300;
  const fs::path f64 = scratch("f64");
  save_pretrained(wide, f64, {.dtype = io::DType::F64});
  REQUIRE_THROWS_WITH((load_pretrained<Decoder<GPT2>, float>(f64, rng)), Contains("tensor 'transformer.wte.weight' holds inf at index 17"));
  REQUIRE_NOTHROW((load_pretrained<Decoder<GPT2>, double>(f64, rng)));

  Gpt2MoLoRA::model<float> fresh(gpt2_config(), rng);
  model.blocks[1].norm2.weight.mutable_value()(0, 5) = 1;
  for_each_param(model, [&](auto& p) { p.value()(0, 0) = -INFINITY; });
  save_adapters(model, adapters);
  const Matrix<float> before = fresh.logits(TokenBatch{1, 3, {1, 2, 3}, {}, {}});
  REQUIRE_THROWS_WITH(load_adapters(fresh, adapters), Contains("adapter_model.safetensors: tensor 'layers.0.q.") && Contains("holds -inf at index 0 (row 0, column 0)"));
  REQUIRE(fresh.logits(TokenBatch{1, 3, {1, 2, 3}, {}, {}}) == before);  // nothing loaded
}

TEST_CASE("train_step refuses or skips a non-finite loss or gradient, and updates nothing", "[hardening][training]") {
  Rng rng(9);
  Gpt2MoLoRA::model<double> model(gpt2_config(), rng);
  const TokenBatch batch{2, 4, {1, 2, 3, 4, 5, 6, 7, 8}, {}, {}};
  AdamW<double> optimizer({.lr = 1e-2});
  model.train_step(batch, optimizer);
  model.wte.table.mutable_value()(3, 0) = std::nan("");  // token 3 poisons the loss and gradients
  std::vector<Matrix<double>> before;
  for_each_param(model, [&](auto& p) { before.push_back(p.value()); });
  auto unchanged = [&] {
    std::size_t i = 0;
    bool same = true;
    for_each_param(model, [&](auto& p) { same = same && p.value() == before[i++]; });
    return same;
  };
  REQUIRE_THROWS_AS(model.train_step(batch, optimizer), numeric_error);
  REQUIRE_THROWS_WITH(model.train_step(batch, optimizer), Contains("train_step got loss ") && Contains("nan") && Contains("nothing was updated"));
  REQUIRE(unchanged());
  REQUIRE(optimizer.steps() == 1);

  const TrainStepResult r = model.train_step(batch, optimizer, 1.0, NonFinite::skip);
  REQUIRE_FALSE(r.applied);
  REQUIRE(std::isnan(r.loss));
  REQUIRE(model.skipped_steps() == 1);
  REQUIRE(unchanged());
  REQUIRE(optimizer.steps() == 1);

  model.wte.table.mutable_value()(3, 0) = 0.1;  // healthy again: steps apply
  REQUIRE(model.train_step(batch, optimizer, 1.0, NonFinite::skip).applied);
  REQUIRE_FALSE(unchanged());
  REQUIRE(optimizer.steps() == 2);
}

TEST_CASE("adapter_config.json: key order and extra fields do not matter, newer versions are refused", "[hardening][io]") {
  Rng rng(10);
  Gpt2MoLoRA::model<float> model(gpt2_config(), rng);
  for_each_param(model, [&](auto& p) { rng.fill_normal(p.value(), 0.0, 0.2); });
  const fs::path dir = scratch("sorted"), base = scratch("sorted_base");
  save_adapters(model, dir);
  save_pretrained(model, base);
  const TokenBatch batch{1, 3, {1, 2, 3}, {}, {}};
  auto fresh = load_pretrained<Gpt2MoLoRA, float>(base, rng);  // the same frozen weights, other adapters
  REQUIRE(fresh.logits(batch) != model.logits(batch));
  // Sorted keys (as jq -S writes them) and one field moet does not write.
  nlohmann::json sorted = nlohmann::json::parse(io::read_text_file(dir / "adapter_config.json", "t"));
  sorted["comment"] = "trained on Tuesday";
  write(dir / "adapter_config.json", sorted.dump(1));  // nlohmann::json sorts its keys
  REQUIRE_NOTHROW(load_adapters(fresh, dir));
  REQUIRE(fresh.logits(batch) == model.logits(batch));

  sorted["version"] = 3;
  write(dir / "adapter_config.json", sorted.dump());
  REQUIRE_THROWS_WITH(load_adapters(fresh, dir), Contains("adapter_config.json has version 3, this moet reads versions 1 to 2"));
  sorted["version"] = 2;
  sorted["adapters"].erase("layers.0.q");
  write(dir / "adapter_config.json", sorted.dump());
  REQUIRE_THROWS_WITH(load_adapters(fresh, dir), Contains("adapter_config.json does not describe the adapter layers.0.q"));
}

TEST_CASE("Paths of the wrong kind give a moet error, not a std::filesystem or iostream one", "[hardening][io]") {
  Rng rng(11);
  Gpt2MoLoRA::model<float> model(gpt2_config(), rng);
  const fs::path file = scratch("kinds") / "a_file";
  write(file, "x");
  REQUIRE_THROWS_AS(save_adapters(model, file), format_error);
  REQUIRE_THROWS_WITH(save_adapters(model, file), Contains("cannot save into") && Contains("it exists and is not a directory"));
  REQUIRE_THROWS_AS(save_pretrained(model, file / "below"), format_error);

  const fs::path dir = scratch("config_is_a_directory");
  fs::create_directories(dir / "config.json");
  REQUIRE_THROWS_AS(io::load_model_config(dir / "config.json"), format_error);
  REQUIRE_THROWS_WITH(io::load_model_config(dir / "config.json"), Contains("is a directory, expected a file"));
  REQUIRE_THROWS_WITH(io::SafetensorsFile(dir / "config.json"), Contains("is a directory, expected a file"));
  fs::create_directories(dir / "adapters" / "adapter_config.json");
  REQUIRE_THROWS_AS(load_adapters(model, dir / "adapters"), format_error);
}

TEST_CASE("AdamW::set_lr checks as the constructor does, keeping the old rate on error", "[hardening][training]") {
  AdamW<float> optimizer({.lr = 1e-3});
  REQUIRE_THROWS_AS(optimizer.set_lr(std::nan("")), value_error);
  REQUIRE_THROWS_WITH(optimizer.set_lr(-1), Contains("AdamW: expected lr >= 0"));
  REQUIRE_THROWS_AS(optimizer.set_lr(INFINITY), value_error);
  REQUIRE(optimizer.options().lr == 1e-3);
  optimizer.set_lr(2e-3);
  REQUIRE(optimizer.options().lr == 2e-3);
}
