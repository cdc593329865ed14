// Model configurations from Hugging Face config.json files: the sizes of a pretrained decoder
// are runtime values (the architecture and the adapter slots are compile-time). GPT-2 and Llama
// naming are read; every field is checked and a bad one gives a moet::format_error that names
// the file, the field, what was expected and what came.
#pragma once

#include <cmath>
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

/// The largest size a config.json may give (vocabulary, widths, layers, heads, positions): 2^31 - 1.
inline constexpr long long max_config_size = 2147483647;

namespace detail_config {

class Reader {
 public:
  Reader(const nlohmann::json& j, std::string source) : j_(j), source_(std::move(source)) {}

  [[noreturn]] void fail(const std::string& what) const { throw format_error("model config " + source_ + ": " + what); }

  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }

  /// A size: a positive integer of at most max_config_size (so that products of two sizes, and
  /// token ids, cannot overflow; a larger one is no real model).
  Index positive(const char* key) const {
    if (!has(key)) fail(std::string("field '") + key + "' is missing");
    const auto& v = j_[key];
    const bool integer = v.is_number_integer();
    const bool in_range = integer && (v.is_number_unsigned() ? v.get<unsigned long long>() - 1 < (unsigned long long)max_config_size
                                                              : v.get<long long>() > 0 && v.get<long long>() <= max_config_size);
    if (!in_range)
      fail(moet::detail::concat("field '", key, "' must be a positive integer of at most ", max_config_size, ", got ", v.dump()));
    return Index(v.get<long long>());
  }
  Index positive_or(const char* key, Index fallback) const { return has(key) ? positive(key) : fallback; }

  double number_or(const char* key, double fallback, bool must_be_positive = true) const {
    if (!has(key)) return fallback;
    const auto& v = j_[key];
    // Finite: JSON has no infinity, but 1e999 parses as one (and would be written back as null).
    if (!v.is_number() || !std::isfinite(v.get<double>()) || (must_be_positive && !(v.get<double>() > 0)))
      fail(std::string("field '") + key + "' must be a positive finite number, got " + v.dump());
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

namespace detail_config {

/// GPT-2's activation_function values and what each computes.
inline Activation gpt2_activation(const Reader& r, const nlohmann::json& j) {
  if (!r.has("activation_function")) return Activation::gelu_tanh;
  const auto& v = j["activation_function"];
  const std::string name = v.is_string() ? v.get<std::string>() : v.dump();
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_fast") return Activation::gelu_tanh;
  if (name == "gelu") return Activation::gelu;
  if (name == "relu") return Activation::relu;
  if (name == "silu" || name == "swish") return Activation::silu;
  r.fail("field 'activation_function' is '" + name +
         "', which moet does not implement (supported: gelu_new, gelu_pytorch_tanh, gelu_fast, gelu, relu, silu, swish)");
}

/// Llama's rope_scaling: null, or an object whose "rope_type" (or older "type") is default,
/// linear, dynamic or llama3; anything else is refused by name.
inline RopeScaling llama_rope_scaling(const Reader& r, const nlohmann::json& j, Index max_positions) {
  RopeScaling s;
  if (!r.has("rope_scaling")) return s;
  const auto& o = j["rope_scaling"];
  if (!o.is_object()) r.fail("field 'rope_scaling' must be an object or null, got " + o.dump());
  const Reader inner(o, "");
  const char* type_key = inner.has("rope_type") ? "rope_type" : "type";
  if (!inner.has(type_key) || !o[type_key].is_string()) r.fail("field 'rope_scaling' has no 'rope_type' (or 'type')");
  const std::string type = o[type_key].get<std::string>();
  auto number = [&](const char* key, bool required, double fallback) {
    if (!inner.has(key)) {
      if (required) r.fail("field 'rope_scaling' of type '" + type + "' needs '" + key + "'");
      return fallback;
    }
    if (!o[key].is_number() || !std::isfinite(o[key].get<double>()))
      r.fail(std::string("field 'rope_scaling.") + key + "' must be a finite number, got " + o[key].dump());
    return o[key].get<double>();
  };
  if (type == "default") return s;
  if (type == "linear" || type == "dynamic" || type == "llama3") {
    s.factor = number("factor", true, 1.0);
    if (!(s.factor >= 1.0)) r.fail(moet::detail::concat("field 'rope_scaling.factor' must be >= 1, got ", s.factor));
  }
  if (type == "linear") {
    s.type = RopeScaling::Type::linear;
  } else if (type == "dynamic") {
    s.type = RopeScaling::Type::dynamic;
    s.original_max_positions = max_positions;
  } else if (type == "llama3") {
    s.type = RopeScaling::Type::llama3;
    s.low_freq_factor = number("low_freq_factor", true, 1.0);
    s.high_freq_factor = number("high_freq_factor", true, 4.0);
    const double original = number("original_max_position_embeddings", true, 0.0);
    if (!(original >= 1.0) || original != std::floor(original))
      r.fail(moet::detail::concat("field 'rope_scaling.original_max_position_embeddings' must be a positive integer, got ", original));
    s.original_max_positions = Index(original);
    if (!(s.low_freq_factor > 0) || !(s.high_freq_factor > s.low_freq_factor))
      r.fail(moet::detail::concat("field 'rope_scaling' needs 0 < low_freq_factor < high_freq_factor, got ", s.low_freq_factor,
                                  " and ", s.high_freq_factor));
  } else {
    r.fail("field 'rope_scaling' has type '" + type +
           "', which moet does not implement (supported: default, linear, dynamic, llama3); its logits would be wrong");
  }
  return s;
}

/// Fields that change the math when they differ from the neutral value given: refused by name
/// (moet would compute something else silently otherwise).
inline void refuse_unless(const Reader& r, const nlohmann::json& j, const char* key, const nlohmann::json& neutral,
                          const char* meaning) {
  if (!r.has(key) || j[key] == neutral) return;
  r.fail(std::string("field '") + key + "' is " + j[key].dump() + ": " + meaning + ", which moet does not implement (only " +
         neutral.dump() + " is supported)");
}

}  // namespace detail_config

/// Parses a config.json text; `source` names it in messages. Every field that changes the
/// model's function is either applied or refused by name; fields that do not (dropout rates,
/// token ids, initializer ranges, dtypes) are ignored (docs/models.md lists both).
inline ModelConfig parse_model_config(const std::string& text, const std::string& source = "config.json") {
  const nlohmann::json j = parse_json(text, "model config " + source);
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
    c.tied_embeddings = r.flag_or("tie_word_embeddings", true);
    c.activation = detail_config::gpt2_activation(r, j);
    detail_config::refuse_unless(r, j, "scale_attn_weights", true, "unscaled attention scores");
    detail_config::refuse_unless(r, j, "scale_attn_by_inverse_layer_idx", false, "attention scores scaled by 1 / (layer + 1)");
    detail_config::refuse_unless(r, j, "add_cross_attention", false, "cross-attention blocks (an encoder-decoder GPT-2)");
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
    c.explicit_head_dim = r.positive_or("head_dim", 0);
    c.attention_bias = r.flag_or("attention_bias", false);
    c.mlp_bias = r.flag_or("mlp_bias", false);
    c.activation = Activation::silu;
    c.rope_scaling = detail_config::llama_rope_scaling(r, j, c.max_positions);
    if (c.rope_theta <= 1) r.fail("field 'rope_theta' must be > 1");
    detail_config::refuse_unless(r, j, "hidden_act", "silu", "a gated MLP with another activation");
    detail_config::refuse_unless(r, j, "partial_rotary_factor", 1.0, "rotary embeddings on part of each head");
    detail_config::refuse_unless(r, j, "sliding_window", nullptr, "sliding-window attention");
    detail_config::refuse_unless(r, j, "attn_logit_softcapping", nullptr, "soft-capped attention scores");
    detail_config::refuse_unless(r, j, "final_logit_softcapping", nullptr, "soft-capped logits");
  } else {
    r.fail("model_type '" + type + "' is not supported, expected 'gpt2' or 'llama'");
  }
  if (c.explicit_head_dim == 0 && c.d_model % c.heads)
    r.fail(moet::detail::concat("hidden size ", c.d_model, " is not a multiple of the ", c.heads, " attention heads"));
  if (c.heads % c.kv_heads)
    r.fail(moet::detail::concat(c.heads, " attention heads are not a multiple of the ", c.kv_heads, " key/value heads"));
  if (c.architecture == Architecture::llama && c.head_dim() % 2)
    r.fail(moet::detail::concat("head dim ", c.head_dim(), " must be even for rotary embeddings"));
  return c;
}

inline ModelConfig load_model_config(const std::filesystem::path& path) {
  return parse_model_config(read_text_file(path, "model config"), path.string());
}

}  // namespace moet::io
