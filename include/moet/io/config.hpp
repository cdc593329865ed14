// Model configurations from Hugging Face config.json files: the sizes of a pretrained decoder
// are runtime values (the architecture and the adapter slots are compile-time). GPT-2 and Llama
// naming are read; every field is checked and a bad one gives a moet::format_error that names
// the file, the field, what was expected and what came.
#pragma once

#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "../core/rope.hpp"
#include "../core/shapes.hpp"
#include "safetensors.hpp"

namespace moet::io {

enum class Architecture { gpt2, llama };

using moet::Activation;

struct ModelConfig {
  Architecture architecture = Architecture::gpt2;
  Index vocab = 0;          // vocab_size
  Index d_model = 0;        // n_embd / hidden_size
  Index layers = 0;         // n_layer / num_hidden_layers
  Index heads = 0;          // n_head / num_attention_heads
  Index kv_heads = 0;       // = heads for GPT-2; num_key_value_heads (default heads) for Llama
  Index d_ff = 0;           // n_inner (default 4 d_model) / intermediate_size
  Index max_positions = 0;  // n_positions / max_position_embeddings
  double norm_eps = 1e-5;   // layer_norm_epsilon / rms_norm_eps
  double rope_theta = 10000.0;
  bool tied_embeddings = true;  // GPT-2: tie_word_embeddings (default true); Llama: (default false)
  Index explicit_head_dim = 0;  // Llama head_dim when given (0: d_model / heads)
  bool attention_bias = false;  // Llama attention_bias: q, k, v, o have biases (GPT-2's always do)
  bool mlp_bias = false;        // Llama mlp_bias: gate, up, down have biases (GPT-2's always do)
  Activation activation = Activation::gelu_tanh;  // GPT-2 activation_function (Llama gates with silu)
  RopeScaling rope_scaling;     // Llama rope_scaling (core/rope.hpp)

  Index head_dim() const { return explicit_head_dim > 0 ? explicit_head_dim : d_model / heads; }
  /// Whether the attention projections (q, k, v, o) and the MLP's carry biases.
  bool has_attention_bias() const { return architecture == Architecture::gpt2 || attention_bias; }
  bool has_mlp_bias() const { return architecture == Architecture::gpt2 || mlp_bias; }
};

namespace detail_config {

class Reader {
 public:
  Reader(const nlohmann::json& j, std::string source) : j_(j), source_(std::move(source)) {}

  [[noreturn]] void fail(const std::string& what) const { throw format_error("model config " + source_ + ": " + what); }

  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }

  Index positive(const char* key) const {
    if (!has(key)) fail(std::string("field '") + key + "' is missing");
    const auto& v = j_[key];
    if (!v.is_number_integer() || v.get<long long>() <= 0) fail(std::string("field '") + key + "' must be a positive integer, got " + v.dump());
    return Index(v.get<long long>());
  }
  Index positive_or(const char* key, Index fallback) const { return has(key) ? positive(key) : fallback; }

  double number_or(const char* key, double fallback, bool must_be_positive = true) const {
    if (!has(key)) return fallback;
    const auto& v = j_[key];
    if (!v.is_number() || (must_be_positive && !(v.get<double>() > 0)))
      fail(std::string("field '") + key + "' must be a positive number, got " + v.dump());
    return v.get<double>();
  }
  bool flag_or(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!j_[key].is_boolean()) fail(std::string("field '") + key + "' must be true or false, got " + j_[key].dump());
    return j_[key].get<bool>();
  }

 private:
  const nlohmann::json& j_;
  std::string source_;
};

}  // namespace detail_config

/// Parses a config.json text; `source` names it in messages.
inline ModelConfig parse_model_config(const std::string& text, const std::string& source = "config.json") {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw format_error("model config " + source + ": malformed JSON: " + e.what());
  }
  if (!j.is_object()) throw format_error("model config " + source + ": not a JSON object");
  detail_config::Reader r(j, source);
  if (!r.has("model_type") || !j["model_type"].is_string()) r.fail("field 'model_type' is missing");
  const std::string type = j["model_type"].get<std::string>();
  ModelConfig c;
  if (type == "gpt2") {
    c.architecture = Architecture::gpt2;
    c.vocab = r.positive("vocab_size");
    c.d_model = r.positive("n_embd");
    c.layers = r.positive("n_layer");
    c.heads = r.positive("n_head");
    c.kv_heads = c.heads;
    c.d_ff = r.positive_or("n_inner", 4 * c.d_model);
    c.max_positions = r.positive("n_positions");
    c.norm_eps = r.number_or("layer_norm_epsilon", 1e-5);
    c.tied_embeddings = true;
  } else if (type == "llama") {
    c.architecture = Architecture::llama;
    c.vocab = r.positive("vocab_size");
    c.d_model = r.positive("hidden_size");
    c.layers = r.positive("num_hidden_layers");
    c.heads = r.positive("num_attention_heads");
    c.kv_heads = r.positive_or("num_key_value_heads", c.heads);
    c.d_ff = r.positive("intermediate_size");
    c.max_positions = r.positive_or("max_position_embeddings", 2048);
    c.norm_eps = r.number_or("rms_norm_eps", 1e-6);
    c.rope_theta = r.number_or("rope_theta", 10000.0);
    c.tied_embeddings = r.flag_or("tie_word_embeddings", false);
    if (c.rope_theta <= 1) r.fail("field 'rope_theta' must be > 1");
  } else {
    r.fail("model_type '" + type + "' is not supported, expected 'gpt2' or 'llama'");
  }
  if (c.d_model % c.heads)
    r.fail(moet::detail::concat("hidden size ", c.d_model, " is not a multiple of the ", c.heads, " attention heads"));
  if (c.heads % c.kv_heads)
    r.fail(moet::detail::concat(c.heads, " attention heads are not a multiple of the ", c.kv_heads, " key/value heads"));
  if (c.architecture == Architecture::llama && c.head_dim() % 2)
    r.fail(moet::detail::concat("head dim ", c.head_dim(), " must be even for rotary embeddings"));
  return c;
}

inline ModelConfig load_model_config(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw format_error("model config " + path.string() + ": cannot open");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return parse_model_config(text, path.string());
}

}  // namespace moet::io
