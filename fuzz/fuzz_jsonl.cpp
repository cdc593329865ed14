// libFuzzer harness: JSONL training data. The input's first byte sets the options (max_length,
// skip_bad_lines, add_eos, batch size, packing, padding side); the rest is the file, read with a
// SentencePiece tokenizer (tests/data/sentencepiece/small.model) whose folder has Mistral's chat
// template, so `messages` lines render and encode too. Whatever read_jsonl returns must batch:
// every example's labels as long as its ids, every id in the vocabulary, every batch's rows as
// long as their mask. Errors must be moet::errors.
#include "fuzz_common.hpp"

#include <moet/data/jsonl.hpp>

namespace {

const moet::text::Tokenizer& tokenizer() {
  static const moet::text::Tokenizer t = [] {
    const auto dir = moet::fuzz::process_folder() / "jsonl_tokenizer";
    std::filesystem::create_directories(dir);
    std::filesystem::copy_file(std::filesystem::path(MOET_FUZZ_DATA_DIR) / "sentencepiece" / "small.model", dir / "tokenizer.model",
                               std::filesystem::copy_options::overwrite_existing);
    moet::fuzz::write_file(dir / "tokenizer_config.json",
                           R"({"chat_template": "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %})"
                           R"({{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %})"
                           R"({{ message['content'] + eos_token}}{% endif %}{% endfor %}"})");
    return moet::text::Tokenizer::from_folder(dir);
  }();
  return t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
  if (size == 0) return 0;
  const moet::text::Tokenizer& tok = tokenizer();
  const std::uint8_t o = bytes[0];
  const auto dir = moet::fuzz::fresh_folder("jsonl");
  moet::fuzz::write_file(dir / "data.jsonl", std::string(reinterpret_cast<const char*>(bytes + 1), size - 1));
  moet::data::Dataset d;
  try {
    d = moet::data::read_jsonl(dir / "data.jsonl", tok,
                               {.max_length = std::size_t(1 + (o & 31)), .add_eos = (o & 64) != 0, .skip_bad_lines = (o & 32) != 0});
  } catch (const moet::error&) {
    return 0;
  }
  for (const moet::data::Example& e : d.examples) {
    if (e.labels.size() != e.ids.size() || e.ids.empty()) __builtin_trap();
    for (const int id : e.ids)
      if (id < 0 || id >= tok.vocab_size()) __builtin_trap();
  }
  const bool pack = (o & 128) != 0;
  try {
    for (const moet::TokenBatch& b : moet::data::batches(d.examples, {.batch_size = 1 + (o & 3), .pack = pack, .pack_length = 1 + (o & 7),
                                                                      .left_pad = (o & 8) != 0}))
      if (b.ids.size() != std::size_t(b.batch) * std::size_t(b.seq) || (!b.mask.empty() && b.mask.size() != b.ids.size()))
        __builtin_trap();
  } catch (const moet::error&) {
  }
  return 0;
}
