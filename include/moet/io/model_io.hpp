// Pretrained decoders and their adapters on disk, in Hugging Face layout:
//   load_pretrained<Spec, T>(dir, rng)   config.json + model.safetensors (or sharded with
//                                        model.safetensors.index.json); F32, F16, BF16, F64
//   save_pretrained(model, dir)          the same layout (optionally sharded)
//   save_adapters(model, dir)            adapter_model.safetensors (trainable tensors only) +
//   load_adapters(model, dir)            adapter_config.json (the slot layout); loading into a
//                                        different layout is refused, naming the difference
// Every load is staged: all tensors are read and checked before any is written into the
// model, so a bad file leaves the model as it was. Before a pretrained model is built, its
// config's size is checked against LoadOptions::max_parameters and against what the checkpoint
// holds (a 100-byte config cannot make moet allocate gigabytes next to a one-tensor file);
// values that are not finite are refused by default, naming the tensor and the first bad index.
#pragma once

#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/backend.hpp"
#include "../core/error.hpp"
#include "../core/param.hpp"
#include "../core/random.hpp"
#include "../model.hpp"
#include "config.hpp"
#include "files.hpp"
#include "safetensors.hpp"

namespace moet {

/// How checkpoints and adapters are loaded.
struct LoadOptions {
  /// Refuse NaN and infinite values (also those a narrower type overflows to), naming the tensor
  /// and the first bad index: one pass over the values.
  bool check_finite = true;
  /// Refuse a config whose frozen model has more values than this (2^40 by default: 1.1e12).
  std::uint64_t max_parameters = std::uint64_t(1) << 40;
};

namespace io {

/// The number of frozen values a config's model holds (every base tensor, the tied embedding
/// once): what its checkpoint must provide. Computed without overflow; above `limit` it is a
/// moet::format_error naming both numbers.
inline std::uint64_t base_parameter_count(const ModelConfig& c, std::uint64_t limit, const std::string& who) {
  // Sizes are at most 2^31 (config.hpp) and a head count times a head width at most 2^62: in 128
  // bits no sum or product below can wrap.
  using Wide = unsigned __int128;
  const Wide d = Wide(c.d_model), V = Wide(c.vocab), L = Wide(c.layers), ff = Wide(c.d_ff),
             q = Wide(c.heads) * Wide(c.head_dim()), kv = Wide(c.kv_heads) * Wide(c.head_dim());
  Wide total = V * d * (c.tied_embeddings ? 1 : 2);
  if (c.architecture == Architecture::gpt2) {
    total += Wide(c.max_positions) * d;
    total += L * (d * (q + 2 * kv + d + 2 * ff)     // c_attn (q, k, v), c_proj, c_fc, the MLP's c_proj
                  + (q + 2 * kv + d + ff + d + 4 * d));  // their biases, ln_1 and ln_2
    total += 2 * d;                                      // ln_f
  } else {
    total += L * (d * (q + 2 * kv + 2 * ff) + q * d + ff * d  // q, k, v, gate, up; o; down
                  + (c.attention_bias ? q + 2 * kv + d : 0) + (c.mlp_bias ? 2 * ff + d : 0) + 2 * d);  // biases, norms
    total += d;                                                                                       // model.norm
  }
  if (total > Wide(limit))
    throw format_error(detail::concat(who, ": the config describes a model of more than ", limit,
                                      " frozen values (LoadOptions::max_parameters)"));
  return std::uint64_t(total);
}

/// Throws a moet::format_error naming `name` and the first value of m (row-major, as stored)
/// that is NaN or infinite.
template <class T>
void require_finite(const Matrix<T>& m, const std::string& name, const std::string& who) {
  if (m.allFinite()) return;
  for (Index r = 0; r < m.rows(); ++r)
    for (Index c = 0; c < m.cols(); ++c)
      if (!std::isfinite(double(m(r, c))))
        throw format_error(detail::concat(who, ": tensor '", name, "' holds ", m(r, c), " at index ", r * m.cols() + c, " (row ", r,
                                          ", column ", c, "); moet refuses non-finite values (LoadOptions::check_finite)"));
}

}  // namespace io

/// A tensor's values on the host, and a host matrix written into a tensor: the CPU's tensors
/// here, device tensors in cuda/ops.hpp (the checkpoint and adapter files are the same for both).
template <class T>
Matrix<T> tensor_to_host(const Param<T>& p) {
  return p.value();
}
template <class T>
Matrix<T> tensor_to_host(const Frozen<T>& f) {
  return f.value();
}
template <class T, class M>
void tensor_from_host(Param<T>& p, const M& m) {
  p.value() = m;
}
template <class T, class M>
void tensor_from_host(Frozen<T>& f, const M& m) {
  f.mutable_value() = m;
}

namespace detail_io {
template <class T>
constexpr io::DType native_dtype() {
  return std::is_same_v<T, double> ? io::DType::F64 : io::DType::F32;
}

/// The scalar a model's tensors are read and written in on the host: its own when that is a
/// host floating-point type, else float (the CUDA backend's bf16 and fp16 are converted on upload).
template <class T>
using host_scalar = std::conditional_t<std::is_floating_point_v<T>, T, float>;

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

namespace detail_io {
/// Reads the checkpoint's tensors into `model` one at a time; with `staged`, every tensor is read
/// (and checked) first and the model is written only after all of them passed.
template <class Model>
void load_base_tensors(Model& model, const io::Checkpoint& checkpoint, const LoadOptions& load, bool staged) {
  using T = host_scalar<typename Model::Scalar>;
  const std::string prefix = checkpoint.contains("wte.weight") && !checkpoint.contains("transformer.wte.weight") ? "" : "transformer.";
  auto tensors = model.base_tensors(prefix);
  auto read = [&](const auto& t) {
    Index cols = 0;
    for (auto* p : t.parts) cols += p->cols();
    const Index rows = t.parts[0]->rows();
    Matrix<T> m = t.transposed ? checkpoint.template matrix<T>(t.name, cols, rows) : checkpoint.template matrix<T>(t.name, rows, cols);
    if (load.check_finite) io::require_finite(m, t.name, "checkpoint " + checkpoint.file_of(t.name).path());
    if (t.transposed) return Matrix<T>(m.transpose());
    return m;
  };
  auto write = [](const auto& t, const Matrix<T>& m) {
    Index c = 0;
    for (auto* p : t.parts) {
      tensor_from_host(*p, m.middleCols(c, p->cols()));
      c += p->cols();
    }
  };
  if (!staged) {
    for (const auto& t : tensors) write(t, read(t));
    return;
  }
  std::vector<Matrix<T>> all;
  all.reserve(tensors.size());
  for (const auto& t : tensors) all.push_back(read(t));
  for (std::size_t i = 0; i < tensors.size(); ++i) write(tensors[i], all[i]);
}
}  // namespace detail_io

/// Copies a checkpoint's frozen tensors into `model` (Hugging Face names; GPT-2 with or
/// without the "transformer." prefix). Tensors the model does not use are ignored. All or
/// nothing: every tensor is read and checked before the model changes, so this holds a copy of
/// the frozen weights on the host meanwhile (load_pretrained, whose model is new, reads one
/// tensor at a time).
template <class Model>
void load_base(Model& model, const io::Checkpoint& checkpoint, const LoadOptions& load = {}) {
  detail_io::load_base_tensors(model, checkpoint, load, true);
}

/// A model of type Spec::model<T, Backend> on `device` from a Hugging Face folder (config.json +
/// weights): load_pretrained<M, bf16, cuda>(ctx, dir, rng) for the GPU. The config's size and the
/// checkpoint's contents are checked before the model is built. The frozen weights are not drawn
/// (FrozenInit::placeholder: the adapters get the values of a random model of the same seed)
/// and are read one tensor at a time, so the host holds at most one checkpoint tensor besides
/// the model (on the GPU, none of the model).
template <class Spec, class T, class Backend, class Device>
typename Spec::template model<T, Backend> load_pretrained(Device&& device, const std::filesystem::path& dir, Rng& rng,
                                                          const ModelOptions& options = {}, const LoadOptions& load = {}) {
  const io::ModelConfig config = io::load_model_config(dir / "config.json");
  const io::Checkpoint checkpoint(dir);  // opened (and validated) before the model is built
  const std::string who = "load_pretrained " + dir.string();
  // A model far larger than its checkpoint is refused before it is built (allocation stays in
  // proportion to the files); one that is near names the tensor that is missing when loading.
  const std::uint64_t needed = io::base_parameter_count(config, load.max_parameters, who), held = checkpoint.values();
  if (needed / 2 > held + (std::uint64_t(1) << 20))
    throw format_error(detail::concat(who, ": config.json describes a model of ", needed, " frozen values but the checkpoint holds ",
                                      held, " (a config for another checkpoint?)"));
  typename Spec::template model<T, Backend> model(std::forward<Device>(device), config, rng, options, FrozenInit::placeholder());
  detail_io::load_base_tensors(model, checkpoint, load, false);  // a failure discards the new model: nothing is lost
  return model;
}

/// The CPU model of type Spec::model<T> from a Hugging Face folder.
template <class Spec, class T>
typename Spec::template model<T> load_pretrained(const std::filesystem::path& dir, Rng& rng, const ModelOptions& options = {},
                                                 const LoadOptions& load = {}) {
  return load_pretrained<Spec, T, cpu>(CpuDevice{}, dir, rng, options, load);
}

struct SaveOptions {
  io::DType dtype = io::DType::F32;
  std::size_t max_shard_bytes = 0;  ///< > 0: shards of at most about this size plus an index
};

namespace detail_io {
/// save_pretrained with each frozen tensor's value from value_of(const Frozen*) (save_merged
/// passes the adapters folded in).
template <class Model, class ValueOf>
void save_base(Model& model, const std::filesystem::path& dir, const SaveOptions& options, const ValueOf& value_of) {
  io::make_directory(dir, "save_pretrained");
  io::write_text_file(dir / "config.json", model_config_json(model.config()), "save_pretrained");
  std::vector<std::vector<io::TensorToWrite>> shards(1);
  std::size_t bytes = 0;
  for (const auto& t : model.base_tensors()) {
    Index cols = 0;
    for (const auto* part : t.parts) cols += part->cols();
    Matrix<host_scalar<typename Model::Scalar>> m(t.parts.front()->rows(), cols);
    cols = 0;
    for (const auto* part : t.parts) {
      m.middleCols(cols, part->cols()) = value_of(part);
      cols += part->cols();
    }
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
  io::write_text_file(dir / "model.safetensors.index.json", index.dump(2) + "\n", "save_pretrained");
}
}  // namespace detail_io

/// Writes config.json and the frozen weights in Hugging Face layout.
template <class Model>
void save_pretrained(Model& model, const std::filesystem::path& dir, const SaveOptions& options = {}) {
  detail_io::save_base(model, dir, options, [](const auto* frozen) { return tensor_to_host(*frozen); });
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

/// A composed model (Compose<...>::model): composition layers between an anchor and augmenting models.
template <class Model>
concept composed_model = requires(Model& m) {
  m.sites();
  m.anchor;
  m.augments;
  m.composition;
};

/// A decoder's file: the base's architecture and sizes, which mixture sits in which slot of
/// which layer ("slots"), and per adapted slot everything that rebuilds its function and the
/// shapes of its tensors ("adapters").
template <class Model>
nlohmann::ordered_json decoder_layout_json(Model& model) {
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
  model.for_each_named_param([&](const std::string& name, auto& p) {
    // "layers.<i>.<slot>.<param>[.<n>]": the slot is the first three parts
    std::size_t cut = 0;
    for (int parts = 0; parts < 3; ++parts) cut = name.find('.', cut) + 1;
    const std::string where = name.substr(0, cut - 1);
    adapters[where]["tensors"][name.substr(cut)] = {p.rows(), p.cols()};
  });
  j["adapters"] = adapters;
  return j;
}
}  // namespace detail_io

template <class Model>
nlohmann::ordered_json adapter_layout_json(Model& model);

/// A composed model's file: its sites, the composition layers' heads, rotary theta and tensors'
/// shapes, and the anchor's and each augmenting model's layouts (architecture and sizes).
template <detail_io::composed_model Model>
nlohmann::ordered_json composed_layout_json(Model& model) {
  nlohmann::ordered_json j;
  j["format"] = "moet-composition";
  j["version"] = 1;
  j["sites"] = nlohmann::ordered_json::array();
  for (const auto& s : model.sites()) j["sites"].push_back({s.augment, s.i, s.j});
  j["heads"] = model.composition.empty() ? Index(0) : model.composition[0].heads();
  j["rotary_theta"] = model.rotary_theta();
  nlohmann::ordered_json tensors = nlohmann::ordered_json::object();
  model.for_each_named_param([&](const std::string& name, auto& p) { tensors[name] = {p.rows(), p.cols()}; });
  j["composition"] = tensors;
  j["anchor"] = adapter_layout_json(model.anchor);
  j["augments"] = nlohmann::ordered_json::array();
  std::apply([&](auto&... a) { (j["augments"].push_back(adapter_layout_json(a)), ...); }, model.augments);
  return j;
}

/// What an adapter file records (adapter_config.json): for a decoder, its layout
/// (detail_io::decoder_layout_json), for a composed model its composition and its models'
/// layouts (composed_layout_json); docs/models.md and docs/calm.md describe them.
template <class Model>
nlohmann::ordered_json adapter_layout_json(Model& model) {
  if constexpr (detail_io::composed_model<Model>) return composed_layout_json(model);
  else return detail_io::decoder_layout_json(model);
}

/// Writes the trainable tensors (adapter_model.safetensors) and their layout (adapter_config.json).
template <class Model>
void save_adapters(Model& model, const std::filesystem::path& dir) {
  using T = detail_io::host_scalar<typename Model::Scalar>;
  io::make_directory(dir, "save_adapters");
  std::vector<io::TensorToWrite> tensors;
  model.for_each_named_param([&](const std::string& name, auto& p) {
    tensors.push_back(io::TensorToWrite::from(name, tensor_to_host(p), detail_io::native_dtype<T>()));
  });
  const auto layout = adapter_layout_json(model);
  io::write_safetensors(dir / "adapter_model.safetensors", tensors, {{"moet_layout", layout.dump()}});
  io::write_text_file(dir / "adapter_config.json", layout.dump(2) + "\n", "save_adapters");
}

namespace detail_io {
/// The file's format version (`absent` when it names none), refused unless from 1 to this moet's.
inline nlohmann::json checked_version(const nlohmann::json& saved, const nlohmann::json& expected, const nlohmann::json& absent,
                                      const std::string& where) {
  const nlohmann::json version = saved.contains("version") ? saved["version"] : absent;
  if (!version.is_number_integer() || version.get<long long>() < 1 || version.get<long long>() > expected["version"].get<long long>())
    throw format_error(where + ": adapter_config.json has version " + (saved.contains("version") ? version.dump() : "absent") +
                       ", this moet reads versions 1 to " + expected["version"].dump());
  return version;
}

/// Refuses a decoder's adapter_config.json `saved` whose layout differs from `expected` (this
/// model's) in anything that changes the adapters' function.
inline void check_decoder_layout(const nlohmann::json& saved, const nlohmann::json& expected, const std::string& where) {
  if (!saved.is_object()) throw format_error(where + ": the layout is " + saved.dump() + ", expected a JSON object");
  if (saved.contains("format") && saved["format"] != expected["format"])
    throw format_error(where + ": adapter_config.json has format " + saved["format"].dump() + ", expected " + expected["format"].dump() +
                       (saved["format"] == "moet-composition" ? " (a composed model's adapters load into the composed model)" : ""));
  // Version 1 files (before the adapters' options were recorded) carry no "version" and no
  // "adapters": their layout is compared, their options cannot be.
  const nlohmann::json version = checked_version(saved, expected, nlohmann::json(1), where);
  auto differ = [&](const std::string& what) {
    throw format_error(where + ": saved for a different adapter layout: " + what);
  };
  for (const auto& [key, value] : expected.items()) {
    if (key == "version" || key == "adapters" || key == "slots") continue;
    if (!saved.contains(key) || saved[key] != value)
      differ(key + " is " + (saved.contains(key) ? saved[key].dump() : "absent") + " in the file but " + value.dump() + " in this model");
  }
  const nlohmann::json no_slots = nlohmann::json::object();
  const auto& file_slots = saved.contains("slots") && saved["slots"].is_object() ? saved["slots"] : no_slots;
  if (saved.contains("slots") && !saved["slots"].is_object()) differ("slots is " + saved["slots"].dump() + ", expected an object");
  for (const auto& [slot, spec] : expected["slots"].items())
    if (!file_slots.contains(slot) || file_slots[slot] != spec)
      differ("slot " + slot + " holds " + (file_slots.contains(slot) ? file_slots[slot].dump() : "no adapter") + " in the file but " +
             spec.dump() + " in this model");
  for (const auto& [slot, spec] : file_slots.items())
    if (!expected["slots"].contains(slot)) differ("slot " + slot + " holds " + spec.dump() + " in the file but no adapter in this model");
  if (version.get<long long>() >= 2) {
    if (!saved.contains("adapters") || !saved["adapters"].is_object())
      throw format_error(where + ": adapter_config.json (version " + version.dump() + ") needs an \"adapters\" object");
    for (const auto& [slot, described] : expected["adapters"].items()) {
      if (!saved["adapters"].contains(slot)) throw format_error(where + ": adapter_config.json does not describe the adapter " + slot);
      const auto& file = saved["adapters"][slot];
      for (const std::string& field : detail_io::function_fields()) {
        const nlohmann::json::json_pointer ptr(field);
        if (!described.contains(ptr)) continue;
        if (!file.is_object() || !file.contains(ptr) || file[ptr] != described[ptr])
          throw format_error(where + ": saved for a different adapter: " + slot + field + " is " +
                             (file.is_object() && file.contains(ptr) ? file[ptr].dump() : "absent") + " in the file but " +
                             described[ptr].dump() + " in this model (the adapters would compute another function)");
      }
    }
  }
}

/// Refuses a composed model's adapter_config.json `saved` whose sites, composition layers or
/// models' layouts differ from `expected` (this model's).
inline void check_composed_layout(const nlohmann::json& saved, const nlohmann::json& expected, const std::string& where) {
  const auto field = [&](const char* key) { return saved.contains(key) ? saved[key].dump() : std::string("absent"); };
  if (!saved.contains("format") || saved["format"] != expected["format"])
    throw format_error(where + ": adapter_config.json has format " + field("format") + ", expected " + expected["format"].dump() +
                       " (a composed model's adapters; save_adapters on the composed model writes it)");
  checked_version(saved, expected, nlohmann::json(), where);
  for (const char* key : {"sites", "heads", "rotary_theta", "composition"})
    if (!saved.contains(key) || saved[key] != expected[key])
      throw format_error(where + ": saved for a different composition: " + key + " is " + field(key) + " in the file but " +
                         expected[key].dump() + " in this model");
  if (!saved.contains("anchor")) throw format_error(where + ": adapter_config.json has no \"anchor\" layout");
  check_decoder_layout(saved["anchor"], expected["anchor"], where + " (the anchor's layout)");
  const std::size_t augments = expected["augments"].size();
  if (!saved.contains("augments") || !saved["augments"].is_array() || saved["augments"].size() != augments)
    throw format_error(detail::concat(where, ": adapter_config.json has ", field("augments").substr(0, 40), " as \"augments\", expected ",
                                      augments, " augmenting models' layouts"));
  for (std::size_t m = 0; m < augments; ++m)
    check_decoder_layout(saved["augments"][m], expected["augments"][m], detail::concat(where, " (augmenting model ", m, "'s layout)"));
}
}  // namespace detail_io

/// Loads adapters saved by save_adapters into a model with the same layout. The order of the
/// keys in adapter_config.json does not matter, and fields moet does not write are ignored; a
/// file from a newer format version is refused.
template <class Model>
void load_adapters(Model& model, const std::filesystem::path& dir, const LoadOptions& load = {}) {
  using T = detail_io::host_scalar<typename Model::Scalar>;
  const std::string where = "adapter folder " + dir.string();
  const nlohmann::json saved = io::parse_json(io::read_text_file(dir / "adapter_config.json", where), where + ": adapter_config.json");
  if (!saved.is_object()) throw format_error(where + ": adapter_config.json is not a JSON object");
  // Compared as unordered JSON: a file whose keys were sorted (jq -S) is the same file.
  const nlohmann::json expected = nlohmann::json::parse(adapter_layout_json(model).dump());
  if constexpr (detail_io::composed_model<Model>) detail_io::check_composed_layout(saved, expected, where);
  else detail_io::check_decoder_layout(saved, expected, where);
  const io::SafetensorsFile file(dir / "adapter_model.safetensors");
  std::vector<Matrix<T>> staged;  // every tensor read and checked before any is written
  model.for_each_named_param([&](const std::string& name, auto& p) {
    staged.push_back(file.template matrix<T>(name, p.rows(), p.cols()));
    if (load.check_finite) io::require_finite(staged.back(), name, where + ": adapter_model.safetensors");
  });
  if (staged.size() != file.tensors().size())
    throw format_error(detail::concat(where, ": adapter_model.safetensors has ", file.tensors().size(), " tensors, expected ",
                                          staged.size()));
  std::size_t i = 0;
  model.for_each_named_param([&](const std::string&, auto& p) { tensor_from_host(p, staged[i++]); });
}

}  // namespace moet
