// libFuzzer harness: tokenizer files and the text they encode. The input's sections
// (fuzz_common.hpp) are [0] a tokenizer file and [1] a text; the first byte of the input picks
// what [0] (after that byte) is:
//   0  a SentencePiece tokenizer.model (parsed in memory)
//   1  a tokenizer.json
//   2  nothing: [1] is encoded with GPT-2's real tokenizer (tests/data/gpt2)
//   3  nothing: [1] is encoded with Llama 2's real tokenizer.model (tests/data/llama2)
// Whatever parses must encode the text (valid UTF-8 or not: an error is fine, a crash is not) and
// decode what it gave, and decode ids made from the text's bytes. For GPT-2 and Llama 2 (byte
// fallback), decode(encode(s)) == s must hold for every valid UTF-8 text (Llama 2: without
// U+2581, which it decodes as a space, as libsentencepiece does).
#include "fuzz_common.hpp"

#include <moet/text/tokenizer.hpp>

namespace {

const std::filesystem::path data = MOET_FUZZ_DATA_DIR;

void exercise(const moet::text::Tokenizer& t, const std::string& text) {
  for (const bool split : {false, true}) {
    std::vector<int> ids;
    try {
      ids = t.encode(text, {.add_special_tokens = !split, .split_special_tokens = split});
    } catch (const moet::error&) {
      return;  // not valid UTF-8, or a character the vocabulary cannot spell
    }
    for (const int id : ids)
      if (id < 0 || id >= t.vocab_size()) __builtin_trap();
    try {
      (void)t.decode(ids, split);
    } catch (const moet::error&) {
    }
  }
  std::vector<int> ids;  // any ids: decode takes them or refuses them
  for (const char c : text) ids.push_back(static_cast<unsigned char>(c) * 131 % (t.vocab_size() + 2));
  try {
    (void)t.decode(ids);
  } catch (const moet::error&) {
  }
}

void round_trip(const moet::text::Tokenizer& t, const std::string& text, bool sentencepiece) {
  if (moet::text::valid_utf8(text) != text) return;
  if (sentencepiece && text.find("\u2581") != std::string::npos) return;
  const std::vector<int> ids = t.encode(text, {.add_special_tokens = false, .split_special_tokens = sentencepiece});
  if (t.decode(ids) != text) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
  if (size == 0) return 0;
  const int kind = bytes[0] % 4;
  const std::vector<std::string> s = moet::fuzz::sections(bytes + 1, size - 1);
  const std::string text = s.size() > 1 ? s[1] : std::string();
  if (kind == 2 || kind == 3) {
    static const moet::text::Tokenizer gpt2 = moet::text::Tokenizer::from_folder(data / "gpt2");
    static const moet::text::Tokenizer llama2 = moet::text::Tokenizer::from_sentencepiece(data / "llama2" / "tokenizer.model");
    const std::string& t = s.size() > 1 ? text : s[0];
    round_trip(kind == 2 ? gpt2 : llama2, t, kind == 3);
    exercise(kind == 2 ? gpt2 : llama2, t);
    return 0;
  }
  moet::text::Tokenizer t;
  try {
    if (kind == 0) {
      t = moet::text::Tokenizer::from_sentencepiece(moet::text::parse_sentencepiece_model(s[0], "fuzz"), "fuzz");
    } else {
      const auto dir = moet::fuzz::fresh_folder("tokenizer");
      moet::fuzz::write_file(dir / "tokenizer.json", s[0]);
      t = moet::text::Tokenizer::from_tokenizer_json(dir / "tokenizer.json");
    }
  } catch (const moet::error&) {
    return 0;
  }
  exercise(t, text);
  return 0;
}
