// LoRA adapters as llama.cpp loads them (`llama-cli -m base.gguf --lora adapter.gguf`): one GGUF
// file, written from the GGUF specification (version 3, little-endian):
//
//   "GGUF", version u32, tensor count u64, metadata count u64
//   metadata: key (u64 length + bytes), value type u32, value   (STRING 8, FLOAT32 6, UINT32 4)
//   tensor infos: name, n_dims u32, ne u64[n_dims] (fastest first), ggml type u32 (F32 0), offset u64
//   padding to general.alignment (32), then the tensors' data, each at a multiple of 32
//
// with llama.cpp's adapter keys (general.architecture, general.type = "adapter", adapter.type =
// "lora", adapter.lora.alpha) and tensor names (blk.<i>.attn_q.weight.lora_a / .lora_b, attn_k,
// attn_v, attn_output, ffn_gate, ffn_up, ffn_down). lora_a holds A^T (ne = [in, r]: PEFT's
// lora_A), lora_b holds B^T (ne = [r, out]: PEFT's lora_B); llama.cpp scales each pair by
// alpha / r with r read from lora_a. moet's per-slot scales that differ from the file's one alpha
// are folded into lora_b (the same function). llama.cpp stores Llama's q and k weights with their
// rotary halves interleaved (its converter permutes the rows of q_proj and k_proj per head), so
// the rows of q's and k's lora_b are permuted the same way.
//
// Llama-architecture models only (Llama 2 / 3, Mistral folders): GPT-2's fused attention in
// llama.cpp has no such mapping here, and mixtures (MoLoRA, MoV) or (IA)^3 have no llama.cpp form;
// each is a moet::format_error naming the slot.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "peft.hpp"

namespace moet {

namespace detail_gguf {

/// llama.cpp's tensor name of a moet slot of a Llama model.
inline std::string tensor_name(Index layer, const std::string& slot, const std::string& who) {
  static const std::map<std::string, std::string> names{{"q", "attn_q"},         {"k", "attn_k"},   {"v", "attn_v"},
                                                        {"o", "attn_output"},    {"ffn_gate", "ffn_gate"}, {"ffn_up", "ffn_up"},
                                                        {"ffn_down", "ffn_down"}};
  const auto it = names.find(slot);
  if (it == names.end()) throw format_error(who + ": the slot " + slot + " has no LoRA tensor in llama.cpp");
  return "blk." + std::to_string(layer) + "." + it->second + ".weight";
}

/// The rows of a (heads * head_dim, cols) matrix from Hugging Face's rotary layout (each head's
/// first half, then its second) to llama.cpp's (the halves interleaved): row h*hd + s*hd/2 + i
/// goes to h*hd + 2*i + s.
template <class T>
Matrix<T> interleave_rotary_rows(const Matrix<T>& m, Index heads) {
  const Index hd = m.rows() / heads, half = hd / 2;
  Matrix<T> out(m.rows(), m.cols());
  for (Index h = 0; h < heads; ++h)
    for (Index s = 0; s < 2; ++s)
      for (Index i = 0; i < half; ++i) out.row(h * hd + 2 * i + s) = m.row(h * hd + s * half + i);
  return out;
}

class Writer {
 public:
  void u32(std::uint32_t v) { raw(&v, 4); }
  void u64(std::uint64_t v) { raw(&v, 8); }
  void f32(float v) { raw(&v, 4); }
  void str(const std::string& s) {
    u64(s.size());
    bytes_.append(s);
  }
  void kv_string(const std::string& key, const std::string& value) {
    str(key);
    u32(8);
    str(value);
  }
  void kv_f32(const std::string& key, float value) {
    str(key);
    u32(6);
    f32(value);
  }
  void kv_u32(const std::string& key, std::uint32_t value) {
    str(key);
    u32(4);
    u32(value);
  }
  void pad(std::size_t alignment) { bytes_.append((alignment - bytes_.size() % alignment) % alignment, '\0'); }
  void raw(const void* p, std::size_t n) { bytes_.append(static_cast<const char*>(p), n); }
  std::string& bytes() { return bytes_; }

 private:
  std::string bytes_;
};

}  // namespace detail_gguf

/// Writes the model's one-expert LoRA slots (LoRAAdapter<R>) as a llama.cpp LoRA adapter (see
/// the file comment). The model must be a Llama-architecture one.
template <class Model>
void save_gguf_lora(Model& model, const std::filesystem::path& file) {
  using T = detail_io::host_scalar<typename Model::Scalar>;
  const std::string who = "save_gguf_lora";
  const auto& config = model.config();
  if (config.architecture != io::Architecture::llama)
    throw format_error(who + ": llama.cpp LoRA files are written for Llama-architecture models (Llama 2 / 3, Mistral); this is " +
                       std::string(config.architecture == io::Architecture::gpt2 ? "GPT-2" : "another architecture"));
  const std::vector<detail_peft::Slot<T>> slots = detail_peft::slots_of<T>(model, who);
  if (slots.front().type != "lora") throw format_error(who + ": llama.cpp adapters are LoRA; the model's are (IA)^3");
  // the file's one alpha: the most common alpha = scale * r; other slots fold the ratio into B
  std::map<double, int> count;
  for (const auto& s : slots) ++count[s.scale * double(s.rank)];
  const double alpha = std::max_element(count.begin(), count.end(), [](const auto& a, const auto& b) { return a.second < b.second; })->first;

  struct Tensor {
    std::string name;
    Matrix<float> value;  // (rows, cols) row-major as written: ne = [cols, rows]
  };
  std::vector<Tensor> tensors;
  for (const auto& s : slots) {
    const std::string base = detail_gguf::tensor_name(s.layer, s.slot, who);
    Matrix<T> a = s.tensors.at("lora_down").transpose();                                     // (r, in)
    Matrix<T> b = s.tensors.at("lora_up").transpose() * T(s.scale * double(s.rank) / alpha);  // (out, r)
    if (s.slot == "q") b = detail_gguf::interleave_rotary_rows(b, config.heads);
    if (s.slot == "k") b = detail_gguf::interleave_rotary_rows(b, config.kv_heads);
    tensors.push_back({base + ".lora_a", a.template cast<float>()});
    tensors.push_back({base + ".lora_b", b.template cast<float>()});
  }

  constexpr std::size_t alignment = 32;
  detail_gguf::Writer w;
  w.raw("GGUF", 4);
  w.u32(3);
  w.u64(tensors.size());
  w.u64(4);
  w.kv_string("general.architecture", "llama");
  w.kv_string("general.type", "adapter");
  w.kv_string("adapter.type", "lora");
  w.kv_f32("adapter.lora.alpha", float(alpha));
  std::uint64_t offset = 0;
  for (const Tensor& t : tensors) {
    w.str(t.name);
    w.u32(2);
    w.u64(std::uint64_t(t.value.cols()));
    w.u64(std::uint64_t(t.value.rows()));
    w.u32(0);  // GGML_TYPE_F32
    w.u64(offset);
    offset += (std::uint64_t(t.value.size()) * 4 + alignment - 1) / alignment * alignment;
  }
  w.pad(alignment);
  for (const Tensor& t : tensors) {
    for (Index r = 0; r < t.value.rows(); ++r)
      for (Index c = 0; c < t.value.cols(); ++c) w.f32(t.value(r, c));
    w.pad(alignment);
  }
  io::make_directory(file.parent_path().empty() ? std::filesystem::path(".") : file.parent_path(), who);
  io::write_text_file(file, w.bytes(), who);  // binary; errors name the file
}

}  // namespace moet
