// Writes the fuzzers' seed corpora from files moet itself writes: config.json of GPT-2 and
// Llama models (plain, biased, rope-scaled, tied and untied), their checkpoints (F32, F16, BF16,
// sharded), adapter folders of fuzz_common.hpp's model, tokenizer files (the committed small
// SentencePiece model, two tiny tokenizer.json) with texts, and JSONL lines of each form.
// Usage: make_seeds <out dir>; it makes <out>/{safetensors,config,adapters,checkpoint,tokenizer,jsonl}/.
#include <iostream>

#include "fuzz_common.hpp"

using namespace moet;
namespace fs = std::filesystem;

namespace {

io::ModelConfig gpt2(bool tied) {
  io::ModelConfig c = fuzz::adapter_model_config();
  c.tied_embeddings = tied;
  return c;
}
io::ModelConfig llama(int variant) {
  io::ModelConfig c;
  c.architecture = io::Architecture::llama;
  c.vocab = 9, c.d_model = 8, c.layers = 1, c.heads = 2, c.kv_heads = 1, c.d_ff = 6, c.max_positions = 32;
  c.tied_embeddings = variant == 1;
  c.attention_bias = variant == 2;
  c.mlp_bias = variant == 2;
  if (variant == 3) c.rope_scaling = {RopeScaling::Type::llama3, 8.0, 1.0, 4.0, 16};
  if (variant == 4) c.rope_scaling = {RopeScaling::Type::linear, 2.0};
  if (variant == 5) c.explicit_head_dim = 6;
  return c;
}

int counter = 0;
void seed(const fs::path& out, const std::string& target, const std::string& bytes) {
  fs::create_directories(out / target);
  fuzz::write_file(out / target / ("seed_" + std::to_string(counter++)), bytes);
}

template <class Model>
void checkpoint_seeds(const fs::path& out, Model& model, const std::string& name) {
  for (auto dtype : {io::DType::F32, io::DType::F16, io::DType::BF16}) {
    const fs::path dir = fuzz::fresh_folder(name.c_str());
    save_pretrained(model, dir, {.dtype = dtype});
    const std::string config = fuzz::read_file(dir / "config.json"), weights = fuzz::read_file(dir / "model.safetensors");
    seed(out, "config", config);
    seed(out, "safetensors", weights);
    seed(out, "checkpoint", fuzz::join({config, weights}));
  }
  const fs::path sharded = fuzz::fresh_folder((name + "_sharded").c_str());
  save_pretrained(model, sharded, {.max_shard_bytes = 256});
  for (const auto& entry : fs::directory_iterator(sharded))
    if (entry.path().filename().string().starts_with("model-00001-of-")) seed(out, "safetensors", fuzz::read_file(entry.path()));
  // An index that points every tensor at model.safetensors (the harness writes one file).
  const fs::path whole = fuzz::fresh_folder((name + "_whole").c_str());
  save_pretrained(model, whole);
  nlohmann::json index = {{"metadata", nlohmann::json::object()}, {"weight_map", nlohmann::json::object()}};
  for (const auto& t : model.base_tensors()) index["weight_map"][t.name] = "model.safetensors";
  seed(out, "checkpoint", fuzz::join({fuzz::read_file(whole / "config.json"), fuzz::read_file(whole / "model.safetensors"), index.dump()}));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: make_seeds <out dir>\n";
    return 2;
  }
  const fs::path out = argv[1];
  Rng rng(3);
  for (bool tied : {true, false}) {
    Decoder<GPT2>::model<float> m(gpt2(tied), rng);
    checkpoint_seeds(out, m, "gpt2");
  }
  for (int variant = 0; variant < 6; ++variant) {
    Decoder<Llama>::model<float> m(llama(variant), rng);
    checkpoint_seeds(out, m, "llama");
  }
  // Adapter folders of the adapter harness's model: as saved, and with trained-looking values.
  fuzz::AdapterModel::model<float> model(fuzz::adapter_model_config(), rng);
  for (int i = 0; i < 2; ++i) {
    if (i) for_each_param(model, [&](Param<float>& p) { rng.fill_normal(p.value(), 0.0, 0.3); });
    const fs::path dir = fuzz::fresh_folder("adapter_seed");
    save_adapters(model, dir);
    seed(out, "adapters", fuzz::join({fuzz::read_file(dir / "adapter_config.json"), fuzz::read_file(dir / "adapter_model.safetensors")}));
  }
  // Tokenizer files (kind byte first, fuzz_tokenizer.cpp) with a text, and texts for GPT-2 and Llama 2.
  const fs::path data = MOET_FUZZ_DATA_DIR;
  const std::string text = "Hello  world\n\t<s> caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC 12345 <sep>[MASK] \xF0\x9F\x91\x8D";
  seed(out, "tokenizer", std::string(1, '\0') + fuzz::join({fuzz::read_file(data / "sentencepiece" / "small.model"), text}));
  seed(out, "tokenizer",
       std::string(1, '\1') +
           fuzz::join({R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "\u0120": 3, "\u0120a": 4}, "merges": ["a b", "\u0120 a"]},)"
                       R"( "pre_tokenizer": {"type": "ByteLevel"}, "added_tokens": [{"id": 5, "content": "<x>", "special": true}]})",
                       "ab a<x>b"}));
  seed(out, "tokenizer",
       std::string(1, '\1') +
           fuzz::join({R"({"model": {"type": "BPE", "vocab": {"<unk>": 0, "\u2581": 1, "a": 2, "\u2581a": 3, "<0x62>": 4}, "merges": ["\u2581 a"],)"
                       R"( "byte_fallback": true, "unk_token": "<unk>"}, "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",)"
                       R"( "prepend_scheme": "first"}, "decoder": {"type": "Metaspace"}})",
                       "a ab"}));
  seed(out, "tokenizer", std::string(1, '\2') + text);
  seed(out, "tokenizer", std::string(1, '\3') + text);
  // JSONL: the three line forms, a bad line; options byte first (fuzz_jsonl.cpp)
  const std::string lines = R"({"text": "one two three"})" "\n" R"({"prompt": "Q: 2+2?", "completion": " 4"})" "\n"
                            R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})" "\n"
                            "not json\n";
  for (const char o : {'\x20', '\x47', '\xE5'}) seed(out, "jsonl", std::string(1, o) + lines);
  std::cout << "make_seeds: " << counter << " seeds in " << out << "\n";
  return 0;
}
