// PEFT's format: one-expert LoRA and (IA)^3 adapters of GPT-2 and Llama saved with save_peft give
// the same logits in an independent reference (tests/peft_reference.py: numpy, written from the
// formats' specifications) that applies them to the checkpoint save_pretrained wrote; load_peft
// brings them back (bit for bit for moet's own files), loads a PEFT-style fused c_attn LoRA into
// GPT-2's q, k, v slots, and refuses what it cannot honour.
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <moet/io/gguf.hpp>
#include <moet/io/peft.hpp>
#include <moet/models.hpp>

#include "error_of.hpp"
#include "scratch.hpp"

using namespace moet;
using moet::testing::error_of;
using namespace moet::slot;
using nlohmann::json;
using Catch::Matchers::Contains;

namespace {

io::ModelConfig gpt2_config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 31, c.d_model = 16, c.layers = 2, c.heads = 4, c.kv_heads = 4, c.d_ff = 24, c.max_positions = 32;
  return c;
}
io::ModelConfig llama_config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::llama;
  c.vocab = 29, c.d_model = 16, c.layers = 2, c.heads = 4, c.kv_heads = 2, c.d_ff = 24, c.max_positions = 32;
  c.tied_embeddings = false;
  return c;
}

const std::vector<int> ids{3, 1, 4, 1, 5, 9, 2, 6};

/// Trained-looking adapters: every tensor random (LoRA's B and (IA)^3's vectors start at 0 and 1).
template <class Model>
void randomize_adapters(Model& m, std::uint64_t seed) {
  Rng rng(seed);
  for_each_param(m, [&](auto& p) { p.value() = rng.normal_matrix<double>(p.rows(), p.cols(), 0.0, 0.3); });
  m.for_each_named_param([&](const std::string& name, auto& p) {
    if (name.find("ia3_scales") != std::string::npos) p.value().array() += 1.0;
  });
}

template <class Model>
Matrix<double> logits(Model& m) {
  return m.logits(TokenBatch{1, Index(ids.size()), ids, {}, {}, {}});
}

/// The reference's logits for a base folder and an adapter folder; empty when python3 or numpy is missing.
Matrix<double> reference_logits(const std::filesystem::path& base, const std::filesystem::path& adapter) {  // adapter "-": none
  std::string list;
  for (int id : ids) list += (list.empty() ? "" : ",") + std::to_string(id);
  const auto out = moet::testing::scratch_folder("reference") / "logits.json";
  const std::string cmd = "/usr/bin/python3 " MOET_TEST_SOURCE_DIR "/peft_reference.py " + base.string() + " " + adapter.string() + " " +
                          list + " > " + out.string();
  if (std::system("/usr/bin/python3 -c 'import numpy' 2> /dev/null") != 0) return {};
  REQUIRE(std::system(cmd.c_str()) == 0);
  std::ifstream in(out);
  const json j = json::parse(in);
  Matrix<double> m(Index(j.size()), Index(j[0].size()));
  for (Index r = 0; r < m.rows(); ++r)
    for (Index c = 0; c < m.cols(); ++c) m(r, c) = j[std::size_t(r)][std::size_t(c)].get<double>();
  return m;
}

/// save_pretrained + save_peft, the reference on them, load_peft into a second model.
template <class M>
void round_trip(const io::ModelConfig& config, const ModelOptions& options, const std::string& name) {
  Rng a(5), b(5);
  typename M::template model<double> m(config, a, options, 0.3);
  randomize_adapters(m, 17);
  const auto base = moet::testing::scratch_folder(name + "_base"), adapter = moet::testing::scratch_folder(name + "_peft");
  save_pretrained(m, base, {.dtype = io::DType::F64});
  save_peft(m, adapter, {.base_model_name_or_path = "moet-test"});
  const Matrix<double> moet_logits = logits(m);

  const Matrix<double> ref = reference_logits(base, adapter);
  if (ref.size() == 0) WARN("python3 with numpy not found: the PEFT reference did not run");
  else CHECK((ref - moet_logits).cwiseAbs().maxCoeff() <= 1e-10 * moet_logits.cwiseAbs().maxCoeff());

  typename M::template model<double> fresh(config, b, options, 0.3);  // same frozen weights, untrained adapters
  CHECK((logits(fresh) - moet_logits).cwiseAbs().maxCoeff() > 1e-3);
  load_peft(fresh, adapter);
  CHECK((logits(fresh) - moet_logits).cwiseAbs().maxCoeff() <= 1e-12 * moet_logits.cwiseAbs().maxCoeff());
}

/// save_merged, then the plain checkpoint loaded without adapters (and in the reference) computes
/// what the adapted model computes.
template <class M, class Arch>
void check_merged(const io::ModelConfig& config, const std::string& name) {
  Rng a(5);
  typename M::template model<double> m(config, a, {.lora_alpha = 6}, 0.3);
  randomize_adapters(m, 23);
  const Matrix<double> adapted = logits(m);
  const auto dir = moet::testing::scratch_folder(name);
  save_merged(m, dir, {.dtype = io::DType::F64});
  CHECK(logits(m) == adapted);  // the model is not changed
  Rng b(1);
  auto plain = load_pretrained<Decoder<Arch>, double>(dir, b);
  CHECK((logits(plain) - adapted).cwiseAbs().maxCoeff() <= 1e-12 * adapted.cwiseAbs().maxCoeff());
  const Matrix<double> ref = reference_logits(dir, "-");
  if (ref.size()) CHECK((ref - adapted).cwiseAbs().maxCoeff() <= 1e-10 * adapted.cwiseAbs().maxCoeff());
}

}  // namespace

TEST_CASE("Llama LoRA adapters in PEFT's format match the reference and load back", "[peft]") {
  using M = Decoder<Llama, Slots<at<q, LoRAAdapter<2>>, at<v, LoRAAdapter<3>>, at<o, LoRAAdapter<2>, layers<1>>,
                                 at<ffn_gate, LoRAAdapter<2>>, at<ffn_down, LoRAAdapter<4>>>>;
  round_trip<M>(llama_config(), {.lora_alpha = 8}, "llama_lora");
  // what a PEFT user sees in adapter_config.json
  std::ifstream in(moet::testing::scratch_folder("llama_lora_peft") / "adapter_config.json");
  const json c = json::parse(in);
  CHECK(c["peft_type"] == "LORA");
  CHECK(c["r"] == 2);
  CHECK(c["lora_alpha"] == 8.0);
  CHECK(c["fan_in_fan_out"] == false);
  CHECK(c["rank_pattern"]["model.layers.0.self_attn.v_proj"] == 3);
  CHECK(c["rank_pattern"]["model.layers.0.mlp.down_proj"] == 4);
  const std::vector<std::string> targets = c["target_modules"];
  CHECK(targets == std::vector<std::string>{"down_proj", "gate_proj", "model.layers.1.self_attn.o_proj", "q_proj", "v_proj"});
  const io::SafetensorsFile file(moet::testing::scratch_folder("llama_lora_peft") / "adapter_model.safetensors");
  CHECK(file.info("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape == std::vector<std::int64_t>{2, 16});
  CHECK(file.info("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight").shape == std::vector<std::int64_t>{8, 3});
  CHECK(file.tensors().size() == 18);
}

TEST_CASE("GPT-2 LoRA on q, k, v is one fused c_attn LoRA in PEFT's format", "[peft]") {
  using M = Decoder<GPT2, Slots<at<q, LoRAAdapter<2>>, at<k, LoRAAdapter<2>>, at<v, LoRAAdapter<3>>, at<o, LoRAAdapter<2>>,
                                at<ffn_up, LoRAAdapter<2>>>>;
  round_trip<M>(gpt2_config(), {.lora_alpha = 4}, "gpt2_lora");
  std::ifstream in(moet::testing::scratch_folder("gpt2_lora_peft") / "adapter_config.json");
  const json c = json::parse(in);
  CHECK(c["fan_in_fan_out"] == true);
  CHECK(c["rank_pattern"]["transformer.h.0.attn.c_attn"] == 7);

  SECTION("a c_attn LoRA as PEFT trains it (one A for q, k and v) loads into q, k, v slots of its rank") {
    using Q = Decoder<GPT2, Slots<at<q, LoRAAdapter<3>>, at<k, LoRAAdapter<3>>, at<v, LoRAAdapter<3>>>>;
    Rng a(5);
    Q::model<double> m(gpt2_config(), a, {}, 0.3);
    const auto base = moet::testing::scratch_folder("fused_base"), adapter = moet::testing::scratch_folder("fused_peft");
    save_pretrained(m, base, {.dtype = io::DType::F64});
    Rng rng(9);
    std::vector<io::TensorToWrite> t;
    for (int l = 0; l < 2; ++l) {
      const std::string p = "base_model.model.transformer.h." + std::to_string(l) + ".attn.c_attn.";
      t.push_back(io::TensorToWrite::from(p + "lora_A.weight", rng.normal_matrix<double>(3, 16, 0, 0.3), io::DType::F32));
      t.push_back(io::TensorToWrite::from(p + "lora_B.weight", rng.normal_matrix<double>(48, 3, 0, 0.3), io::DType::F32));
    }
    io::write_safetensors(adapter / "adapter_model.safetensors", t);
    std::ofstream(adapter / "adapter_config.json")
        << R"({"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": ["c_attn"], "fan_in_fan_out": true, "bias": "none"})";
    load_peft(m, adapter);
    const Matrix<double> ref = reference_logits(base, adapter);
    if (ref.size()) CHECK((ref - logits(m)).cwiseAbs().maxCoeff() <= 1e-6 * logits(m).cwiseAbs().maxCoeff());
    // and a model whose q slot is too small for it
    using Small = Decoder<GPT2, Slots<at<q, LoRAAdapter<2>>, at<k, LoRAAdapter<3>>, at<v, LoRAAdapter<3>>>>;
    Rng s(5);
    Small::model<double> small(gpt2_config(), s, {}, 0.3);
    CHECK_THAT(error_of([&] { load_peft(small, adapter); }), Contains("uses 3 directions for q but layers.0.q is LoRA<2>"));
    // a model without a v slot cannot hold the file's v block
    using NoV = Decoder<GPT2, Slots<at<q, LoRAAdapter<3>>, at<k, LoRAAdapter<3>>>>;
    Rng n(5);
    NoV::model<double> nov(gpt2_config(), n, {}, 0.3);
    CHECK_THAT(error_of([&] { load_peft(nov, adapter); }), Contains("changes the v projection, but this model has no adapter there"));
  }
}

TEST_CASE("(IA)^3 adapters (MoV with one expert) in PEFT's format, Llama and GPT-2", "[peft]") {
  using L = Decoder<Llama, Slots<at<keys, MoV<1>>, at<values, MoV<1>>, at<ffn_hidden, MoV<1>>>>;
  round_trip<L>(llama_config(), {}, "llama_ia3");
  std::ifstream in(moet::testing::scratch_folder("llama_ia3_peft") / "adapter_config.json");
  const json c = json::parse(in);
  CHECK(c["peft_type"] == "IA3");
  CHECK(c["feedforward_modules"] == json::array({"down_proj"}));
  const io::SafetensorsFile file(moet::testing::scratch_folder("llama_ia3_peft") / "adapter_model.safetensors");
  CHECK(file.info("base_model.model.model.layers.0.self_attn.k_proj.ia3_l").shape == std::vector<std::int64_t>{8, 1});
  CHECK(file.info("base_model.model.model.layers.0.mlp.down_proj.ia3_l").shape == std::vector<std::int64_t>{1, 24});

  using G = Decoder<GPT2, Slots<at<keys, MoV<1>>, at<values, MoV<1>>, at<ffn_hidden, MoV<1>>>>;
  round_trip<G>(gpt2_config(), {}, "gpt2_ia3");
}

TEST_CASE("save_merged folds LoRA and (IA)^3 into a plain checkpoint with the adapted model's function", "[peft][merged]") {
  using G = Decoder<GPT2, Slots<at<q, LoRAAdapter<2>>, at<v, LoRAAdapter<3>>, at<keys, MoV<1>>, at<values, MoV<1>>,
                                at<ffn_down, LoRAAdapter<2>>, at<ffn_hidden, MoV<1>>>>;
  using L = Decoder<Llama, Slots<at<k, LoRAAdapter<2>>, at<keys, MoV<1>>, at<values, MoV<1>>, at<ffn_up, LoRAAdapter<3>>,
                                 at<ffn_hidden, MoV<1>>>>;
  check_merged<G, GPT2>(gpt2_config(), "merged_gpt2");
  check_merged<L, Llama>(llama_config(), "merged_llama");
  using Mixed = Decoder<Llama, Slots<at<q, MoLoRA<4, 2>>>>;
  Rng e(5);
  Mixed::model<double> mixed(llama_config(), e, {}, 0.3);
  CHECK_THAT(error_of([&] { save_merged(mixed, moet::testing::scratch_folder("merged_mixed")); }), Contains("a mixture of several experts"));
}

TEST_CASE("Llama LoRA as a llama.cpp GGUF adapter gives the reference's logits", "[peft][gguf]") {
  // alpha = R per slot (lora_alpha 0): ranks 2, 3, 4 give alphas 2, 3, 4, so the file's one alpha
  // (2, the most common) is folded into the others' lora_b; q and k (GQA: 4 and 2 heads) have
  // their lora_b rows in llama.cpp's interleaved rotary layout, which the reference undoes
  using M = Decoder<Llama, Slots<at<q, LoRAAdapter<2>>, at<k, LoRAAdapter<2>>, at<v, LoRAAdapter<3>>, at<o, LoRAAdapter<2>, layers<1>>,
                                 at<ffn_gate, LoRAAdapter<2>>, at<ffn_up, LoRAAdapter<4>>, at<ffn_down, LoRAAdapter<2>>>>;
  Rng a(5);
  M::model<double> m(llama_config(), a, {}, 0.3);
  randomize_adapters(m, 29);
  const auto base = moet::testing::scratch_folder("gguf_base");
  const auto file = moet::testing::scratch_folder("gguf") / "adapter.gguf";
  save_pretrained(m, base, {.dtype = io::DType::F64});
  save_gguf_lora(m, file);
  std::ifstream in(file, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE(bytes.size() > 24);
  std::uint32_t version = 0;
  std::uint64_t tensors = 0;
  std::memcpy(&version, bytes.data() + 4, 4);
  std::memcpy(&tensors, bytes.data() + 8, 8);
  CHECK(bytes.substr(0, 4) == "GGUF");
  CHECK(version == 3);
  CHECK(tensors == 2 * (6 * 2 + 1));  // q k v gate up down in both layers, o in one
  CHECK(bytes.find("blk.1.attn_output.weight.lora_a") != std::string::npos);
  CHECK(bytes.find("blk.0.attn_output.weight.lora_a") == std::string::npos);
  const Matrix<double> moet_logits = logits(m);
  const Matrix<double> ref = reference_logits(base, file);
  if (ref.size() == 0) WARN("python3 with numpy not found: the GGUF reference did not run");
  else CHECK((ref - moet_logits).cwiseAbs().maxCoeff() <= 1e-5 * moet_logits.cwiseAbs().maxCoeff());  // float32 tensors

  using Gpt2Lora = Decoder<GPT2, Slots<at<q, LoRAAdapter<2>>>>;
  Rng b(5);
  Gpt2Lora::model<double> g(gpt2_config(), b, {}, 0.3);
  CHECK_THAT(error_of([&] { save_gguf_lora(g, file); }), Contains("Llama-architecture models") && Contains("this is GPT-2"));
  using LlamaMoV = Decoder<Llama, Slots<at<values, MoV<1>>>>;
  Rng c(5);
  LlamaMoV::model<double> v(llama_config(), c, {}, 0.3);
  CHECK_THAT(error_of([&] { save_gguf_lora(v, file); }), Contains("llama.cpp adapters are LoRA"));
}

TEST_CASE("PEFT files moet cannot honour are refused, naming what is wrong", "[peft][errors]") {
  using M = Decoder<Llama, Slots<at<q, LoRAAdapter<2>>, at<v, LoRAAdapter<2>>>>;
  Rng a(5);
  M::model<double> m(llama_config(), a, {}, 0.3);
  randomize_adapters(m, 3);
  const Matrix<double> before = logits(m);
  const auto good = moet::testing::scratch_folder("good");
  save_peft(m, good);
  const auto variant = [&](const std::string& name, auto&& edit) {
    const auto dir = moet::testing::scratch_folder(name);
    std::filesystem::copy_file(good / "adapter_model.safetensors", dir / "adapter_model.safetensors",
                               std::filesystem::copy_options::overwrite_existing);
    std::ifstream in(good / "adapter_config.json");
    json c = json::parse(in);
    edit(c);
    std::ofstream(dir / "adapter_config.json") << c.dump();
    return dir;
  };
  CHECK_THAT(error_of([&] { load_peft(m, variant("type", [](json& c) { c["peft_type"] = "PREFIX_TUNING"; })); }),
             Contains("peft_type PREFIX_TUNING is not supported"));
  CHECK_THAT(error_of([&] { load_peft(m, variant("targets", [](json& c) { c["target_modules"] = {"q_proj", "c_attn"}; })); }),
             Contains("target module c_attn does not exist in a Llama model"));
  CHECK_THAT(error_of([&] { load_peft(m, variant("rank", [](json& c) { c["r"] = 4; })); }),
             Contains("tensors have rank 2 but adapter_config.json says 4"));
  CHECK_THAT(error_of([&] { load_peft(m, variant("dora", [](json& c) { c["use_dora"] = true; })); }), Contains("DoRA"));
  CHECK_THAT(error_of([&] { load_peft(m, variant("save", [](json& c) { c["modules_to_save"] = {"lm_head"}; })); }),
             Contains("modules_to_save [\"lm_head\"] is not supported"));
  CHECK_THAT(error_of([&] { load_peft(m, variant("bias", [](json& c) { c["bias"] = "all"; })); }), Contains("bias \"all\""));
  // a model with an adapter the file lacks, and one missing an adapter the file has
  using More = Decoder<Llama, Slots<at<q, LoRAAdapter<2>>, at<v, LoRAAdapter<2>>, at<o, LoRAAdapter<2>>>>;
  Rng b(5);
  More::model<double> more(llama_config(), b, {}, 0.3);
  CHECK_THAT(error_of([&] { load_peft(more, good); }), Contains("has no tensor base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"));
  using Less = Decoder<Llama, Slots<at<q, LoRAAdapter<2>>>>;
  Rng c(5);
  Less::model<double> less(llama_config(), c, {}, 0.3);
  CHECK_THAT(error_of([&] { load_peft(less, good); }), Contains("v_proj.lora_A.weight has no adapter in this model"));
  using Rank = Decoder<Llama, Slots<at<q, LoRAAdapter<3>>, at<v, LoRAAdapter<2>>>>;
  Rng d(5);
  Rank::model<double> rank(llama_config(), d, {}, 0.3);
  CHECK_THAT(error_of([&] { load_peft(rank, good); }), Contains("rank-2 LoRA in the file but layers.0.q is LoRA<3>"));
  // what has no PEFT form
  using Mixed = Decoder<Llama, Slots<at<q, MoLoRA<4, 2>>>>;
  Rng e(5);
  Mixed::model<double> mixed(llama_config(), e, {}, 0.3);
  CHECK_THAT(error_of([&] { save_peft(mixed, moet::testing::scratch_folder("mixed")); }), Contains("a mixture of several experts"));
  using Both = Decoder<Llama, Slots<at<q, LoRAAdapter<2>>, at<values, MoV<1>>>>;
  Rng f(5);
  Both::model<double> both(llama_config(), f, {}, 0.3);
  CHECK_THAT(error_of([&] { save_peft(both, moet::testing::scratch_folder("both")); }), Contains("LoRA and (IA)^3 adapters"));
  // nothing of a refused file reached the model
  CHECK(logits(m) == before);
}
