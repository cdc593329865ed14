// Adapters in Hugging Face PEFT's format, which PEFT, vLLM and SGLang load:
//   save_peft(model, dir)   adapter_config.json + adapter_model.safetensors
//   load_peft(model, dir)   the same files, written by PEFT or by save_peft
//   save_merged(model, dir) the adapters folded into the weights: a plain Hugging Face checkpoint
//                           (config.json + model.safetensors) that any loader reads
//
// Which moet adapters have a PEFT form: one-expert mixtures, i.e. plain LoRA (LoRAAdapter<R>) and
// plain (IA)^3 (MoV<1>), one kind per file (PEFT's peft_type). MoLoRA and MoV with E > 1 have no
// PEFT form; save_adapters writes moet's own format for them (docs/models.md).
//
// The mapping (Hugging Face module names):
//   slot        Llama                      GPT-2
//   q k v       self_attn.{q,k,v}_proj     attn.c_attn (one fused module: q | k | v rows of its output)
//   o           self_attn.o_proj           attn.c_proj
//   ffn_gate    mlp.gate_proj              -
//   ffn_up      mlp.up_proj                mlp.c_fc
//   ffn_down    mlp.down_proj              mlp.c_proj
//   keys        self_attn.k_proj (ia3_l)   attn.c_attn's k rows
//   values      self_attn.v_proj (ia3_l)   attn.c_attn's v rows
//   ffn_hidden  mlp.down_proj (ia3_l, a feed-forward module: scales its input)
// LoRA: moet's lora_down A (d_in, R) and lora_up B (R, d_out) are PEFT's lora_A.weight = A^T
// (r, in) and lora_B.weight = B^T (out, r); moet scales by alpha / R, PEFT by lora_alpha / r (or
// / sqrt(r) with use_rslora). Loading folds any difference between the two scales into B (the
// function is exact; the parametrisation differs by that factor). GPT-2's fused c_attn: moet's q,
// k and v LoRAs are saved as one LoRA of rank R_q + R_k + R_v (A stacked, B block diagonal, scale
// 1), and a c_attn LoRA from PEFT (rank r, A shared) loads into q, k and v slots of rank r each
// (or less, when a block of B uses fewer directions).
// Everything is read and checked before anything is written: a bad file leaves the model as it
// was, and anything the files say that moet cannot honour is a moet::format_error naming it.
#pragma once

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model_io.hpp"

namespace moet {

struct PeftSaveOptions {
  std::string base_model_name_or_path;  ///< recorded in adapter_config.json (a hub id or a folder)
};

namespace detail_peft {

inline const std::string prefix = "base_model.model.";

/// Where a moet slot lives in a Hugging Face model: a module path and, for GPT-2's fused
/// c_attn, which third of its output (0 q, 1 k, 2 v; -1 the whole).
struct Site {
  std::string module;
  int part = -1;
  bool feedforward = false;  ///< (IA)^3 scales the module's input
};

inline Site site_of(io::Architecture arch, Index layer, const std::string& slot, const std::string& who) {
  const std::string l = std::to_string(layer);
  if (arch == io::Architecture::llama) {
    const std::string a = "model.layers." + l + ".self_attn.", m = "model.layers." + l + ".mlp.";
    if (slot == "q" || slot == "k" || slot == "v" || slot == "o") return {a + slot + "_proj"};
    if (slot == "ffn_gate") return {m + "gate_proj"};
    if (slot == "ffn_up") return {m + "up_proj"};
    if (slot == "ffn_down") return {m + "down_proj"};
    if (slot == "keys") return {a + "k_proj"};
    if (slot == "values") return {a + "v_proj"};
    if (slot == "ffn_hidden") return {m + "down_proj", -1, true};
  } else {
    const std::string a = "transformer.h." + l + ".attn.", m = "transformer.h." + l + ".mlp.";
    if (slot == "q") return {a + "c_attn", 0};
    if (slot == "k" || slot == "keys") return {a + "c_attn", 1};
    if (slot == "v" || slot == "values") return {a + "c_attn", 2};
    if (slot == "o") return {a + "c_proj"};
    if (slot == "ffn_up") return {m + "c_fc"};
    if (slot == "ffn_down") return {m + "c_proj"};
    if (slot == "ffn_hidden") return {m + "c_proj", -1, true};
  }
  throw format_error(who + ": the slot " + slot + " has no PEFT module in this architecture");
}

/// The module names (last part) an architecture has, for checking target_modules.
inline const std::set<std::string>& module_names(io::Architecture arch) {
  static const std::set<std::string> llama{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  static const std::set<std::string> gpt2{"c_attn", "c_proj", "c_fc"};
  return arch == io::Architecture::llama ? llama : gpt2;
}

/// One adapted slot of the model, as save/load see it.
template <class T>
struct Slot {
  std::string where;  ///< "layers.<i>.<slot>"
  std::string slot;
  Index layer = 0;
  std::string type;   ///< "lora" or "ia3"
  Index rank = 0;
  double scale = 1;   ///< alpha / rank (LoRA)
  Site site;
  std::map<std::string, Matrix<T>> tensors;  ///< by parameter name (router_kernel, lora_down, lora_up, ia3_scales)
};

template <class T, class Model>
std::vector<Slot<T>> slots_of(Model& model, const std::string& who, bool one_kind = true) {
  const nlohmann::ordered_json layout = adapter_layout_json(model);
  std::map<std::string, Slot<T>> by_where;
  const nlohmann::ordered_json& adapters = layout["adapters"];
  for (auto it = adapters.begin(); it != adapters.end(); ++it) {
    const std::string where = it.key();
    const nlohmann::ordered_json& a = it.value();
    Slot<T> s;
    s.where = where;
    const std::size_t d1 = where.find('.'), d2 = where.find('.', d1 + 1);
    s.layer = Index(std::stoll(where.substr(d1 + 1, d2 - d1 - 1)));
    s.slot = where.substr(d2 + 1);
    if (!a.contains("experts") || a["experts"].get<int>() != 1)
      throw format_error(who + ": the adapter at " + where + " (" + a.value("spec", std::string("?")) +
                         ") is a mixture of several experts, which PEFT cannot hold; save_adapters writes moet's format");
    s.type = a["expert"].value("type", std::string());
    if (s.type != "lora" && s.type != "ia3")
      throw format_error(who + ": the adapter at " + where + " is a " + s.type + " expert, which has no PEFT form");
    if (s.type == "lora") {
      s.rank = a["expert"]["rank"].get<Index>();
      s.scale = a["expert"]["scale"].get<double>();
    }
    s.site = site_of(model.config().architecture, s.layer, s.slot, who);
    by_where.emplace(where, std::move(s));
  }
  model.for_each_named_param([&](const std::string& name, auto& p) {
    std::size_t cut = 0;
    for (int parts = 0; parts < 3; ++parts) cut = name.find('.', cut) + 1;
    by_where.at(name.substr(0, cut - 1)).tensors[name.substr(cut)] = tensor_to_host(p).template cast<T>();
  });
  std::vector<Slot<T>> out;
  for (auto& [w, s] : by_where) out.push_back(std::move(s));
  if (out.empty()) throw format_error(who + ": the model has no adapters");
  const std::string type = out.front().type;
  for (const Slot<T>& s : out)
    if (one_kind && s.type != type)
      throw format_error(who + ": the model has LoRA and (IA)^3 adapters (" + out.front().where + ", " + s.where +
                         "); a PEFT file holds one kind");
  return out;
}

inline std::string leaf(const std::string& module) { return module.substr(module.rfind('.') + 1); }

/// PEFT's target_modules: a module's last name when every layer has it, else its full path.
template <class T>
nlohmann::json target_modules(const std::vector<Slot<T>>& slots, Index layers, std::vector<std::string>* feedforward) {
  std::map<std::string, std::set<std::string>> by_leaf;
  std::set<std::string> ff;
  for (const Slot<T>& s : slots) {
    by_leaf[leaf(s.site.module)].insert(s.site.module);
    if (s.site.feedforward) ff.insert(s.site.module);
  }
  nlohmann::json list = nlohmann::json::array();
  std::set<std::string> ff_names;
  for (const auto& [name, modules] : by_leaf) {
    const bool all = Index(modules.size()) == layers;
    if (all) list.push_back(name);
    else
      for (const std::string& m : modules) list.push_back(m);
    for (const std::string& m : modules)
      if (ff.count(m)) ff_names.insert(all ? name : m);
  }
  if (feedforward) feedforward->assign(ff_names.begin(), ff_names.end());
  return list;
}

/// PEFT's rule for rank_pattern / alpha_pattern keys: the key matches the module's path or its end.
inline std::optional<double> pattern_value(const nlohmann::json& patterns, const std::string& module) {
  if (!patterns.is_object()) return std::nullopt;
  for (const auto& [key, value] : patterns.items()) {
    if (!value.is_number()) continue;
    try {
      if (std::regex_match(module, std::regex("(.*\\.)?" + key))) return value.get<double>();
    } catch (const std::regex_error&) {
      if (module == key || (module.size() > key.size() && module.ends_with("." + key))) return value.get<double>();
    }
  }
  return std::nullopt;
}

}  // namespace detail_peft

/// Writes the model's one-expert LoRA or (IA)^3 adapters in PEFT's format (see the file comment).
template <class Model>
void save_peft(Model& model, const std::filesystem::path& dir, const PeftSaveOptions& options = {}) {
  using T = detail_io::host_scalar<typename Model::Scalar>;
  const std::string who = "save_peft";
  const auto& config = model.config();
  const bool gpt2 = config.architecture == io::Architecture::gpt2;
  const std::vector<detail_peft::Slot<T>> slots = detail_peft::slots_of<T>(model, who);
  const bool lora = slots.front().type == "lora";
  std::map<std::string, std::vector<const detail_peft::Slot<T>*>> by_module;
  for (const auto& s : slots) by_module[s.site.module].push_back(&s);

  // per module: its tensors, and (LoRA) its rank and alpha; the most common rank and alpha become
  // r and lora_alpha, the others rank_pattern and alpha_pattern entries
  struct Written {
    std::string module;
    Index r = 0;
    double alpha = 0;
  };
  std::vector<Written> written;
  std::vector<io::TensorToWrite> tensors;
  const Index d = config.d_model;
  for (const auto& [module, parts] : by_module) {
    const std::string key = detail_peft::prefix + module;
    if (lora) {
      Matrix<T> A, B;
      Written w{module};
      if (parts.front()->site.part < 0) {  // one moet slot, one module
        const auto& s = *parts.front();
        A = s.tensors.at("lora_down").transpose();
        B = s.tensors.at("lora_up").transpose();
        w.r = s.rank;
        w.alpha = s.scale * double(w.r);
      } else {  // GPT-2's c_attn: q, k, v stacked, B block diagonal, scale 1
        for (const auto* s : parts) w.r += s->rank;
        A = Matrix<T>::Zero(w.r, d);
        B = Matrix<T>::Zero(3 * d, w.r);
        Index c = 0;
        for (const auto* s : parts) {
          A.middleRows(c, s->rank) = s->tensors.at("lora_down").transpose();
          B.block(s->site.part * d, c, d, s->rank) = s->tensors.at("lora_up").transpose() * T(s->scale);
          c += s->rank;
        }
        w.alpha = double(w.r);
      }
      written.push_back(w);
      tensors.push_back(io::TensorToWrite::from(key + ".lora_A.weight", A, detail_io::native_dtype<T>()));
      tensors.push_back(io::TensorToWrite::from(key + ".lora_B.weight", B, detail_io::native_dtype<T>()));
    } else {
      const auto flat = [](const Matrix<T>& m) {
        Matrix<T> v(1, m.size());
        for (Index i = 0; i < m.rows(); ++i) v.middleCols(i * m.cols(), m.cols()) = m.row(i);
        return v;
      };
      Matrix<T> l;
      if (parts.front()->site.part < 0) {
        l = flat(parts.front()->tensors.at("ia3_scales"));
      } else {
        l = Matrix<T>::Ones(1, 3 * d);
        for (const auto* s : parts) l.middleCols(s->site.part * d, d) = flat(s->tensors.at("ia3_scales"));
      }
      // PEFT: (out, 1) for a module whose output is scaled, (1, in) for a feed-forward one
      auto w = io::TensorToWrite::from(key + ".ia3_l", l, detail_io::native_dtype<T>());
      if (!parts.front()->site.feedforward) w.shape = {l.cols(), 1};
      tensors.push_back(std::move(w));
    }
  }
  const auto most_common = [&](auto field) {
    std::map<decltype(field(written.front())), int> count;
    for (const Written& w : written) ++count[field(w)];
    return std::max_element(count.begin(), count.end(), [](const auto& a, const auto& b) { return a.second < b.second; })->first;
  };
  nlohmann::ordered_json rank_pattern = nlohmann::ordered_json::object(), alpha_pattern = nlohmann::ordered_json::object();
  Index r0 = 0;
  double alpha0 = 0;
  if (lora) {
    r0 = most_common([](const Written& w) { return w.r; });
    alpha0 = most_common([](const Written& w) { return w.alpha; });
    for (const Written& w : written) {
      if (w.r != r0) rank_pattern[w.module] = w.r;
      if (w.alpha != alpha0) alpha_pattern[w.module] = w.alpha;
    }
  }

  std::vector<std::string> feedforward;
  nlohmann::ordered_json c;
  c["peft_type"] = lora ? "LORA" : "IA3";
  c["task_type"] = "CAUSAL_LM";
  c["base_model_name_or_path"] = options.base_model_name_or_path;
  c["inference_mode"] = true;
  c["target_modules"] = detail_peft::target_modules(slots, config.layers, &feedforward);
  c["fan_in_fan_out"] = gpt2;  // GPT-2's Conv1D stores weights (in, out)
  if (lora) {
    c["r"] = r0;
    c["lora_alpha"] = alpha0;
    c["lora_dropout"] = 0.0;
    c["bias"] = "none";
    c["use_rslora"] = false;
    c["use_dora"] = false;
    c["rank_pattern"] = rank_pattern;
    c["alpha_pattern"] = alpha_pattern;
  } else {
    c["feedforward_modules"] = feedforward;
    c["init_ia3_weights"] = true;
  }
  c["modules_to_save"] = nullptr;
  io::make_directory(dir, who);
  io::write_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  io::write_text_file(dir / "adapter_config.json", c.dump(2) + "\n", who);
}

/// Loads PEFT LoRA or (IA)^3 adapters (PEFT's files, or save_peft's) into the model's matching
/// one-expert slots (see the file comment). Every adapted slot of the model must be in the file
/// and every tensor of the file must have a slot.
template <class Model>
void load_peft(Model& model, const std::filesystem::path& dir, const LoadOptions& load = {}) {
  using T = detail_io::host_scalar<typename Model::Scalar>;
  const std::string who = "load_peft (" + dir.string() + ")";
  const auto& config = model.config();
  const nlohmann::json c = io::parse_json(io::read_text_file(dir / "adapter_config.json", who), who + ": adapter_config.json");
  if (!c.is_object()) throw format_error(who + ": adapter_config.json is not a JSON object");
  const std::string type = c.value("peft_type", std::string());
  if (type != "LORA" && type != "IA3") throw format_error(who + ": peft_type " + (type.empty() ? "(missing)" : type) + " is not supported (LORA and IA3 are)");
  const bool lora = type == "LORA";
  if (c.value("use_dora", false)) throw format_error(who + ": DoRA (use_dora) is not supported");
  if (lora && c.contains("bias") && c["bias"].is_string() && c["bias"].get<std::string>() != "none")
    throw format_error(who + ": bias \"" + c["bias"].get<std::string>() + "\" is not supported (moet's LoRA trains no biases)");
  if (c.contains("modules_to_save") && !c["modules_to_save"].is_null() && !(c["modules_to_save"].is_array() && c["modules_to_save"].empty()))
    throw format_error(who + ": modules_to_save " + c["modules_to_save"].dump() + " is not supported (moet trains adapters only)");
  // target modules must exist in this architecture
  const auto& names = detail_peft::module_names(config.architecture);
  if (c.contains("target_modules") && c["target_modules"].is_array())
    for (const auto& t : c["target_modules"]) {
      const std::string name = t.get<std::string>();
      if (!names.count(detail_peft::leaf(name)))
        throw format_error(who + ": target module " + name + " does not exist in a " +
                           (config.architecture == io::Architecture::llama ? "Llama" : "GPT-2") + " model");
    }

  std::vector<detail_peft::Slot<T>> slots = detail_peft::slots_of<T>(model, who);
  if ((slots.front().type == "lora") != lora)
    throw format_error(who + ": the file holds " + type + " adapters but the model's are " + (lora ? "(IA)^3" : "LoRA"));
  std::map<std::string, std::vector<detail_peft::Slot<T>*>> by_module;
  for (auto& s : slots) by_module[s.site.module].push_back(&s);

  const io::SafetensorsFile file(dir / "adapter_model.safetensors");
  std::set<std::string> used;
  const auto tensor = [&](const std::string& name) -> Matrix<T> {
    if (!file.contains(name)) throw format_error(who + ": adapter_model.safetensors has no tensor " + name);
    const auto& shape = file.info(name).shape;
    if (shape.size() != 2) throw format_error(detail::concat(who, ": tensor ", name, " has ", shape.size(), " dimensions, expected 2"));
    Matrix<T> m = file.template matrix<T>(name, Index(shape[0]), Index(shape[1]));
    if (load.check_finite) io::require_finite(m, name, who);
    used.insert(name);
    return m;
  };
  const Index d = config.d_model;
  for (auto& [module, parts] : by_module) {
    // PEFT's keys carry the adapter's name when saved by some tools ("lora_A.default.weight"): accept both
    const std::string key = detail_peft::prefix + module;
    const auto pick = [&](const std::string& plain, const std::string& named) { return file.contains(key + named) ? key + named : key + plain; };
    if (lora) {
      const Matrix<T> A = tensor(pick(".lora_A.weight", ".lora_A.default.weight"));
      const Matrix<T> B = tensor(pick(".lora_B.weight", ".lora_B.default.weight"));
      const Index r = A.rows();
      if (B.cols() != r) throw format_error(detail::concat(who, ": ", module, ": lora_A has rank ", r, " but lora_B ", B.cols()));
      if (const auto pr = detail_peft::pattern_value(c.value("rank_pattern", nlohmann::json::object()), module);
          (pr && Index(*pr) != r) || (!pr && c.contains("r") && c["r"].get<Index>() != r))
        throw format_error(detail::concat(who, ": ", module, "'s tensors have rank ", r, " but adapter_config.json says ",
                                          pr ? Index(*pr) : c["r"].get<Index>()));
      const double alpha = detail_peft::pattern_value(c.value("alpha_pattern", nlohmann::json::object()), module)
                               .value_or(c.value("lora_alpha", double(r)));
      const double scale = c.value("use_rslora", false) ? alpha / std::sqrt(double(r)) : alpha / double(r);
      for (auto* s : parts) {
        const Index d_in = s->tensors.at("lora_down").rows(), d_out = s->tensors.at("lora_up").cols();
        if (A.cols() != d_in)
          throw format_error(detail::concat(who, ": ", module, ".lora_A is (", A.rows(), ", ", A.cols(), "), expected (r, ", d_in, ")"));
        const Index rows0 = s->site.part < 0 ? 0 : s->site.part * d;
        if (B.rows() != (s->site.part < 0 ? d_out : 3 * d))
          throw format_error(detail::concat(who, ": ", module, ".lora_B has ", B.rows(), " rows, expected ", s->site.part < 0 ? d_out : 3 * d));
        const Matrix<T> Bs = B.middleRows(rows0, d_out) * T(scale / s->scale);
        // the directions this slot uses: all of them, or for a fused module the columns of its block that are not zero
        std::vector<Index> cols;
        for (Index j = 0; j < r; ++j)
          if (s->site.part < 0 || !Bs.col(j).isZero(0)) cols.push_back(j);
        if (s->site.part < 0 && r != s->rank)
          throw format_error(detail::concat(who, ": ", module, " has a rank-", r, " LoRA in the file but ", s->where, " is LoRA<",
                                            s->rank, "> in this model"));
        if (Index(cols.size()) > s->rank)
          throw format_error(detail::concat(who, ": ", module, "'s LoRA uses ", cols.size(), " directions for ", s->slot, " but ", s->where,
                                            " is LoRA<", s->rank, "> in this model"));
        Matrix<T> down = Matrix<T>::Zero(d_in, s->rank), up = Matrix<T>::Zero(s->rank, d_out);
        for (std::size_t k = 0; k < cols.size(); ++k) {
          down.col(Index(k)) = A.row(cols[k]).transpose();
          up.row(Index(k)) = Bs.col(cols[k]).transpose();
        }
        s->tensors["lora_down"] = down;
        s->tensors["lora_up"] = up;
      }
      if (parts.front()->site.part >= 0)  // a fused block the model has no slot for must be zero
        for (int part = 0; part < 3; ++part)
          if (std::none_of(parts.begin(), parts.end(), [&](auto* s) { return s->site.part == part; }) && !B.middleRows(part * d, d).isZero(0))
            throw format_error(detail::concat(who, ": ", module, "'s LoRA changes the ", "qkv"[part], " projection, but this model has no adapter there"));
    } else {
      Matrix<T> l = tensor(pick(".ia3_l", ".ia3_l.default"));
      if (l.cols() == 1) l.transposeInPlace();
      for (auto* s : parts) {
        Matrix<T>& scales = s->tensors.at("ia3_scales");
        const Index offset = s->site.part < 0 ? 0 : s->site.part * d;
        if (l.cols() != (s->site.part < 0 ? scales.size() : 3 * d))
          throw format_error(detail::concat(who, ": ", module, ".ia3_l has ", l.cols(), " values, expected ", s->site.part < 0 ? scales.size() : 3 * d));
        for (Index i = 0; i < scales.rows(); ++i) scales.row(i) = l.middleCols(offset + i * scales.cols(), scales.cols());
      }
      if (parts.front()->site.part >= 0)
        for (int part = 0; part < 3; ++part)
          if (std::none_of(parts.begin(), parts.end(), [&](auto* s) { return s->site.part == part; }) &&
              !(l.middleCols(part * d, d).array() == T(1)).all())
            throw format_error(detail::concat(who, ": ", module, "'s (IA)^3 vector scales the ", "qkv"[part],
                                              " projection, which this model has no (IA)^3 slot for"));
    }
  }
  for (const auto& t : file.tensors())
    if (!used.count(t.name))
      throw format_error(who + ": the file's tensor " + t.name + " has no adapter in this model (no one-expert " + (lora ? "LoRA" : "(IA)^3") +
                         " slot there)");
  // staged and checked: now write, routers (which one expert ignores) zeroed
  std::map<std::string, const detail_peft::Slot<T>*> by_where;
  for (const auto& s : slots) by_where[s.where] = &s;
  model.for_each_named_param([&](const std::string& name, auto& p) {
    std::size_t cut = 0;
    for (int parts = 0; parts < 3; ++parts) cut = name.find('.', cut) + 1;
    const auto& s = *by_where.at(name.substr(0, cut - 1));
    const std::string param = name.substr(cut);
    if (param == "router_kernel") tensor_from_host(p, Matrix<T>::Zero(p.rows(), p.cols()));
    else tensor_from_host(p, s.tensors.at(param));
  });
}

/// Writes the model with its one-expert LoRA and (IA)^3 adapters folded into the frozen weights
/// as a plain Hugging Face checkpoint (config.json + model.safetensors; save_pretrained's options):
/// W + (alpha / R) A B for a LoRA slot; (IA)^3 on keys and values scales the k / v projection's
/// output columns (bias included), on ffn_hidden the down projection's input rows. The model is
/// not changed. A mixture of several experts depends on each token's routing and cannot be
/// folded: a moet::format_error naming it.
template <class Model>
void save_merged(Model& model, const std::filesystem::path& dir, const SaveOptions& options = {}) {
  using T = detail_io::host_scalar<typename Model::Scalar>;
  const std::string who = "save_merged";
  std::map<std::string, const detail_peft::Slot<T>*> by_where;
  const std::vector<detail_peft::Slot<T>> slots = detail_peft::slots_of<T>(model, who, false);
  for (const auto& s : slots) by_where[s.where] = &s;
  std::map<const void*, Matrix<T>> merged;  // frozen tensor -> its merged value
  const auto value = [&](auto& frozen) -> Matrix<T>& {
    auto it = merged.find(&frozen);
    if (it == merged.end()) it = merged.emplace(&frozen, tensor_to_host(frozen).template cast<T>()).first;
    return it->second;
  };
  // LoRA first, then (IA)^3, which scales the adapted projection: ((x (W + s A B) + b) * l)
  for (const bool scaling : {false, true}) {
    for (std::size_t i = 0; i < model.blocks.size(); ++i) {
      auto& b = model.blocks[i];
      const std::string layer = "layers." + std::to_string(i) + ".";
      b.for_each_slot([&]<class S>(S, auto& s) {
        const auto it = by_where.find(layer + S::name);
        if (it == by_where.end() || scaling == S::linear) return;
        const auto& a = *it->second;
        if constexpr (S::linear) {
          Matrix<T>& w = value(s.weight());
          w += T(a.scale) * (a.tensors.at("lora_down") * a.tensors.at("lora_up"));
        } else {
          // (heads, head_dim) -> one row of width heads * head_dim
          Eigen::Matrix<T, 1, Eigen::Dynamic> row(a.tensors.at("ia3_scales").size());
          const Matrix<T>& scales = a.tensors.at("ia3_scales");
          for (Index r = 0; r < scales.rows(); ++r) row.middleCols(r * scales.cols(), scales.cols()) = scales.row(r);
          const auto scale_output = [&](auto& target) {
            Matrix<T>& w = value(target.weight());
            w.array().rowwise() *= row.array();
            if (target.bias().size() > 0) {
              Matrix<T>& bias = value(target.bias());
              bias.array() *= row.array();
            }
          };
          if constexpr (std::is_same_v<S, slot::keys>) scale_output(b.template slot<slot::k>());
          else if constexpr (std::is_same_v<S, slot::values>) scale_output(b.template slot<slot::v>());
          else {  // ffn_hidden: the input of the down projection
            Matrix<T>& w = value(b.template slot<slot::ffn_down>().weight());
            w.array().colwise() *= row.transpose().array();
          }
        }
      });
    }
  }
  detail_io::save_base(model, dir, options, [&](const auto* frozen) -> Matrix<T> {
    const auto it = merged.find(frozen);
    return it != merged.end() ? it->second : Matrix<T>(tensor_to_host(*frozen).template cast<T>());
  });
}

}  // namespace moet
