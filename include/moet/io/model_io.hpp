// Pretrained decoders and their adapters on disk, in Hugging Face layout:
//   load_pretrained<Spec, T>(dir, rng)   config.json + model.safetensors (or sharded with
//                                        model.safetensors.index.json); F32, F16, BF16, F64
//   save_pretrained(model, dir)          the same layout (optionally sharded)
//   save_adapters(model, dir)            adapter_model.safetensors (trainable tensors only) +
//   load_adapters(model, dir)            adapter_config.json (the slot layout); loading into a
//                                        different layout is refused, naming the difference
// Every load is staged: all tensors are read and checked before any is written into the
// model, so a bad file leaves the model as it was.
#pragma once

#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "../core/param.hpp"
#include "../core/random.hpp"
#include "../model.hpp"
#include "config.hpp"
#include "safetensors.hpp"

namespace moet {

namespace detail_io {
template <class T>
constexpr io::DType native_dtype() {
  return std::is_same_v<T, double> ? io::DType::F64 : io::DType::F32;
}

template <class T>
Matrix<T> join_columns(const std::vector<Frozen<T>*>& parts) {
  Index cols = 0;
  for (auto* p : parts) cols += p->cols();
  Matrix<T> m(parts[0]->rows(), cols);
  Index c = 0;
  for (auto* p : parts) {
    m.middleCols(c, p->cols()) = p->value();
    c += p->cols();
  }
  return m;
}
}  // namespace detail_io

/// config.json text for a model configuration, in Hugging Face naming.
inline std::string model_config_json(const io::ModelConfig& c) {
  nlohmann::ordered_json j;
  if (c.architecture == io::Architecture::gpt2) {
    static const char* const activations[] = {"gelu_new", "gelu", "relu", "silu"};
    j = {{"model_type", "gpt2"},        {"architectures", {"GPT2LMHeadModel"}}, {"vocab_size", c.vocab},
         {"n_embd", c.d_model},         {"n_layer", c.layers},                  {"n_head", c.heads},
         {"n_inner", c.d_ff},           {"n_positions", c.max_positions},       {"layer_norm_epsilon", c.norm_eps},
         {"activation_function", activations[int(c.activation)]}, {"tie_word_embeddings", c.tied_embeddings}};
  } else {
    j = {{"model_type", "llama"},
         {"architectures", {"LlamaForCausalLM"}},
         {"vocab_size", c.vocab},
         {"hidden_size", c.d_model},
         {"num_hidden_layers", c.layers},
         {"num_attention_heads", c.heads},
         {"num_key_value_heads", c.kv_heads},
         {"intermediate_size", c.d_ff},
         {"max_position_embeddings", c.max_positions},
         {"rms_norm_eps", c.norm_eps},
         {"rope_theta", c.rope_theta},
         {"tie_word_embeddings", c.tied_embeddings},
         {"attention_bias", c.attention_bias},
         {"mlp_bias", c.mlp_bias},
         {"hidden_act", "silu"}};
    if (c.explicit_head_dim > 0) j["head_dim"] = c.explicit_head_dim;
    const RopeScaling& r = c.rope_scaling;
    if (r.type == RopeScaling::Type::linear || r.type == RopeScaling::Type::dynamic)
      j["rope_scaling"] = {{"rope_type", r.type == RopeScaling::Type::linear ? "linear" : "dynamic"}, {"factor", r.factor}};
    else if (r.type == RopeScaling::Type::llama3)
      j["rope_scaling"] = {{"rope_type", "llama3"},
                           {"factor", r.factor},
                           {"low_freq_factor", r.low_freq_factor},
                           {"high_freq_factor", r.high_freq_factor},
                           {"original_max_position_embeddings", r.original_max_positions}};
  }
  return j.dump(2) + "\n";
}

/// Copies a checkpoint's frozen tensors into `model` (Hugging Face names; GPT-2 with or
/// without the "transformer." prefix). Tensors the model does not use are ignored.
template <class Model>
void load_base(Model& model, const io::Checkpoint& checkpoint) {
  using T = typename Model::Scalar;
  const std::string prefix = checkpoint.contains("wte.weight") && !checkpoint.contains("transformer.wte.weight") ? "" : "transformer.";
  auto tensors = model.base_tensors(prefix);
  std::vector<Matrix<T>> staged;
  staged.reserve(tensors.size());
  for (const auto& t : tensors) {
    Index cols = 0;
    for (auto* p : t.parts) cols += p->cols();
    const Index rows = t.parts[0]->rows();
    if (t.transposed) staged.push_back(checkpoint.template matrix<T>(t.name, cols, rows).transpose());
    else staged.push_back(checkpoint.template matrix<T>(t.name, rows, cols));
  }
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    Index c = 0;
    for (auto* p : tensors[i].parts) {
      p->mutable_value() = staged[i].middleCols(c, p->cols());
      c += p->cols();
    }
  }
}

/// A model of type Spec::model<T> from a Hugging Face folder (config.json + weights).
template <class Spec, class T>
typename Spec::template model<T> load_pretrained(const std::filesystem::path& dir, Rng& rng, const ModelOptions& options = {}) {
  const io::ModelConfig config = io::load_model_config(dir / "config.json");
  const io::Checkpoint checkpoint(dir);  // opened (and validated) before the model is built
  typename Spec::template model<T> model(config, rng, options);
  load_base(model, checkpoint);
  return model;
}

struct SaveOptions {
  io::DType dtype = io::DType::F32;
  std::size_t max_shard_bytes = 0;  ///< > 0: shards of at most about this size plus an index
};

/// Writes config.json and the frozen weights in Hugging Face layout.
template <class Model>
void save_pretrained(Model& model, const std::filesystem::path& dir, const SaveOptions& options = {}) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  {
    std::ofstream out(dir / "config.json");
    out << model_config_json(model.config());
    if (!out) throw format_error("cannot write " + (dir / "config.json").string());
  }
  std::vector<std::vector<io::TensorToWrite>> shards(1);
  std::size_t bytes = 0;
  for (const auto& t : model.base_tensors()) {
    Matrix<typename Model::Scalar> m = detail_io::join_columns(t.parts);
    if (t.transposed) m.transposeInPlace();
    auto w = io::TensorToWrite::from(t.name, m, options.dtype);
    if (t.vector) w.shape = {m.cols()};
    const std::size_t size = w.values.size() * io::dtype_size(options.dtype);
    if (options.max_shard_bytes && bytes && bytes + size > options.max_shard_bytes) {
      shards.emplace_back();
      bytes = 0;
    }
    bytes += size;
    shards.back().push_back(std::move(w));
  }
  const std::map<std::string, std::string> metadata{{"format", "pt"}};
  if (shards.size() == 1) {
    io::write_safetensors(dir / "model.safetensors", shards[0], metadata);
    return;
  }
  nlohmann::ordered_json index;
  index["metadata"] = nlohmann::ordered_json::object();
  index["weight_map"] = nlohmann::ordered_json::object();
  char name[64];
  for (std::size_t s = 0; s < shards.size(); ++s) {
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    io::write_safetensors(dir / name, shards[s], metadata);
    for (const auto& t : shards[s]) index["weight_map"][t.name] = name;
  }
  std::ofstream(dir / "model.safetensors.index.json") << index.dump(2) << "\n";
}

namespace detail_io {

/// What rebuilds one adapter's function: its spec, router, expert options and dispatch (the
/// options that change the function are compared when a file is loaded: function_fields).
template <class Layer>
nlohmann::ordered_json describe_adapter(const Layer& layer) {
  using Spec = typename Layer::spec;
  using Policy = typename Spec::router::policy;
  using S = typename Spec::expert_spec;
  const auto& o = layer.options();
  nlohmann::ordered_json j;
  j["spec"] = Spec::name();
  j["experts"] = Spec::experts;
  j["router"] = {{"policy", Policy::k ? "top_k" : "soft"},
                 {"k", Policy::k},
                 {"renormalize", Policy::renorm == Renorm::on},
                 {"fp32_softmax", o.router.fp32_softmax},
                 {"load_balance_weight", o.router.load_balance_weight},
                 {"z_loss_weight", o.router.z_loss_weight}};
  if constexpr (detail::is_lora<S>::value)
    j["expert"] = {{"type", "lora"}, {"rank", S::rank}, {"alpha", o.expert.alpha}, {"scale", o.expert.alpha / S::rank}};
  else if constexpr (detail::is_scaling_expert<S>)
    j["expert"] = {{"type", "ia3"}, {"heads", o.expert.heads}, {"router_width", o.expert.router_width}};
  else
    j["expert"] = {{"type", S::name()}};
  static const char* const dispatch[] = {"automatic", "dense", "grouped"};
  j["dispatch"] = dispatch[int(o.dispatch)];
  return j;
}

/// The fields of an adapter description that change its function (the rest are recorded for
/// information: aux-loss weights train, dispatch chooses an equal computation).
inline const std::vector<std::string>& function_fields() {
  static const std::vector<std::string> fields{"/spec", "/experts", "/router/k", "/router/renormalize", "/expert/type",
                                               "/expert/rank", "/expert/alpha", "/expert/heads", "/expert/router_width"};
  return fields;
}

}  // namespace detail_io

/// What an adapter file records (adapter_config.json): the base's architecture and sizes, which
/// mixture sits in which slot of which layer ("slots"), and per adapted slot everything that
/// rebuilds its function and the shapes of its tensors ("adapters"); docs/models.md describes it.
template <class Model>
nlohmann::ordered_json adapter_layout_json(Model& model) {
  using T = typename Model::Scalar;
  const auto& c = model.config();
  nlohmann::ordered_json j;
  j["format"] = "moet-adapters";
  j["version"] = 2;
  j["architecture"] = c.architecture == io::Architecture::gpt2 ? "gpt2" : "llama";
  j["d_model"] = c.d_model;
  j["layers"] = c.layers;
  j["d_ff"] = c.d_ff;
  j["heads"] = c.heads;
  j["kv_heads"] = c.kv_heads;
  j["slots"] = model.adapter_layout();
  nlohmann::ordered_json adapters = nlohmann::ordered_json::object();
  for (std::size_t i = 0; i < model.blocks.size(); ++i)
    model.blocks[i].for_each_slot([&]<class S>(S, auto& slot) {
      if (!slot.adapted()) return;
      const std::string where = "layers." + std::to_string(i) + "." + S::name;
      std::visit(
          [&](const auto& layer) {
            if constexpr (requires { layer.options(); typename std::remove_cvref_t<decltype(layer)>::spec; })
              adapters[where] = detail_io::describe_adapter(layer);
          },
          slot.layer_);
    });
  model.for_each_named_param([&](const std::string& name, Param<T>& p) {
    // "layers.<i>.<slot>.<param>[.<n>]": the slot is the first three parts
    std::size_t cut = 0;
    for (int parts = 0; parts < 3; ++parts) cut = name.find('.', cut) + 1;
    const std::string where = name.substr(0, cut - 1);
    adapters[where]["tensors"][name.substr(cut)] = {p.rows(), p.cols()};
  });
  j["adapters"] = adapters;
  return j;
}

/// Writes the trainable tensors (adapter_model.safetensors) and their layout (adapter_config.json).
template <class Model>
void save_adapters(Model& model, const std::filesystem::path& dir) {
  using T = typename Model::Scalar;
  std::filesystem::create_directories(dir);
  std::vector<io::TensorToWrite> tensors;
  model.for_each_named_param([&](const std::string& name, Param<T>& p) {
    tensors.push_back(io::TensorToWrite::from(name, p.value(), detail_io::native_dtype<T>()));
  });
  const auto layout = adapter_layout_json(model);
  io::write_safetensors(dir / "adapter_model.safetensors", tensors, {{"moet_layout", layout.dump()}});
  std::ofstream out(dir / "adapter_config.json");
  out << layout.dump(2) << "\n";
  if (!out) throw format_error("cannot write " + (dir / "adapter_config.json").string());
}

/// Loads adapters saved by save_adapters into a model with the same layout.
template <class Model>
void load_adapters(Model& model, const std::filesystem::path& dir) {
  using T = typename Model::Scalar;
  const std::string where = "adapter folder " + dir.string();
  const auto config_path = dir / "adapter_config.json";
  std::ifstream in(config_path);
  if (!in) throw format_error(where + ": cannot open adapter_config.json");
  nlohmann::ordered_json saved;
  try {
    saved = nlohmann::ordered_json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw format_error(where + ": adapter_config.json is malformed JSON: " + e.what());
  }
  const auto expected = adapter_layout_json(model);
  // Version 1 files (before the adapters' options were recorded) carry no "version" and no
  // "adapters": their layout is compared, their options cannot be.
  auto layout_only = [](nlohmann::ordered_json j) {
    j.erase("version");
    j.erase("adapters");
    return j;
  };
  const auto expected_layout = layout_only(expected);
  if (layout_only(saved) != expected_layout) {
    std::string difference;
    for (const auto& [key, value] : expected_layout.items())
      if (key != "slots" && (!saved.contains(key) || saved[key] != value)) {
        difference = key + " is " + (saved.contains(key) ? saved[key].dump() : "absent") + " in the file but " + value.dump() +
                     " in this model";
        break;
      }
    if (difference.empty()) {
      const auto& file_slots = saved.contains("slots") && saved["slots"].is_object() ? saved["slots"] : nlohmann::ordered_json::object();
      for (const auto& [slot, spec] : expected["slots"].items())
        if (!file_slots.contains(slot) || file_slots[slot] != spec) {
          difference = "slot " + slot + " holds " + (file_slots.contains(slot) ? file_slots[slot].dump() : "no adapter") +
                       " in the file but " + spec.dump() + " in this model";
          break;
        }
      if (difference.empty())
        for (const auto& [slot, spec] : file_slots.items())
          if (!expected["slots"].contains(slot)) {
            difference = "slot " + slot + " holds " + spec.dump() + " in the file but no adapter in this model";
            break;
          }
    }
    throw format_error(where + ": saved for a different adapter layout: " + difference);
  }
  if (saved.contains("adapters") && saved["adapters"].is_object())
    for (const auto& [slot, described] : expected["adapters"].items()) {
      if (!saved["adapters"].contains(slot)) continue;  // the layouts agree: only a malformed file lacks it
      const auto& file = saved["adapters"][slot];
      for (const std::string& field : detail_io::function_fields()) {
        const nlohmann::ordered_json::json_pointer ptr(field);
        if (!described.contains(ptr)) continue;
        if (!file.contains(ptr) || file[ptr] != described[ptr])
          throw format_error(where + ": saved for a different adapter: " + slot + field + " is " +
                             (file.contains(ptr) ? file[ptr].dump() : "absent") + " in the file but " + described[ptr].dump() +
                             " in this model (the adapters would compute another function)");
      }
    }
  const io::SafetensorsFile file(dir / "adapter_model.safetensors");
  std::vector<std::pair<Param<T>*, Matrix<T>>> staged;
  model.for_each_named_param([&](const std::string& name, Param<T>& p) {
    staged.emplace_back(&p, file.template matrix<T>(name, p.rows(), p.cols()));
  });
  if (staged.size() != file.tensors().size())
    throw format_error(detail::concat(where, ": adapter_model.safetensors has ", file.tensors().size(), " tensors, expected ",
                                          staged.size()));
  for (auto& [p, m] : staged) p->value() = m;
}

}  // namespace moet
