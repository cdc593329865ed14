// GPT-2's real vocabulary and merges (tests/data/gpt2) as one Hugging Face tokenizer.json, for
// the tests and benchmarks that add tokens to it or change a field of it.
#pragma once

#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace moet::testing {

/// GPT-2's files (the folder `gpt2`) as one tokenizer.json, merges as "a b" or as pairs.
inline nlohmann::json gpt2_tokenizer_json(const std::filesystem::path& gpt2, bool merges_as_pairs = false) {
  using json = nlohmann::json;
  std::ifstream v(gpt2 / "vocab.json");
  json vocab = json::parse(v);
  std::ifstream m(gpt2 / "merges.txt");
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

}  // namespace moet::testing
