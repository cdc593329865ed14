// JSONL data: the three line forms tokenised with GPT-2's real tokenizer and labelled as Hugging
// Face would (prompts and chat turns other than the assistant's not trained), chat templates,
// bad lines (raised with file and line, or skipped and counted), truncation, seeded splits and
// batches (every example exactly once, padding never trained, length buckets, packing).
#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <moet/data/jsonl.hpp>

#include "error_of.hpp"
#include "scratch.hpp"

using namespace moet;
using moet::testing::error_of;
using namespace moet::data;
using nlohmann::json;
using Catch::Matchers::Contains;

namespace {

const std::filesystem::path gpt2_dir = std::filesystem::path(MOET_TEST_DATA_DIR) / "gpt2";

void write(const std::filesystem::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

/// GPT-2 plus ChatML's two tokens and a chat template, EOS <|endoftext|>.
const text::Tokenizer& chat_tokenizer() {
  static const text::Tokenizer t = [] {
    const auto dir = moet::testing::scratch_folder("chatml");
    std::ifstream v(gpt2_dir / "vocab.json"), m(gpt2_dir / "merges.txt");
    json merges = json::array();
    std::string line;
    std::getline(m, line);
    while (std::getline(m, line))
      if (!line.empty()) merges.push_back(line);
    json j{{"added_tokens", json::array({json{{"id", 50256}, {"content", "<|endoftext|>"}, {"special", true}},
                                         json{{"id", 50257}, {"content", "<|im_start|>"}, {"special", true}},
                                         json{{"id", 50258}, {"content", "<|im_end|>"}, {"special", true}}})},
           {"normalizer", nullptr},
           {"pre_tokenizer", json{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
           {"decoder", json{{"type", "ByteLevel"}}},
           {"model", json{{"type", "BPE"}, {"vocab", json::parse(v)}, {"merges", merges}}}};
    write(dir / "tokenizer.json", j.dump());
    write(dir / "tokenizer_config.json",
          R"({"eos_token": "<|endoftext|>", "chat_template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"})");
    return text::Tokenizer::from_folder(dir);
  }();
  return t;
}

std::filesystem::path jsonl(const std::string& name, const std::vector<std::string>& lines) {
  const auto p = moet::testing::scratch_folder("jsonl") / name;
  std::string text;
  for (const std::string& l : lines) text += l + "\n";
  write(p, text);
  return p;
}

}  // namespace

TEST_CASE("JSONL lines become examples labelled as Hugging Face trains them", "[data]") {
  const text::Tokenizer& tok = chat_tokenizer();
  const int eos = 50256;
  const Dataset d = read_jsonl(jsonl("forms.jsonl", {R"({"text": "Hello world"})", "",
                                                     R"({"prompt": "Q: 2+2?", "completion": " A: 4"})",
                                                     R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})"}),
                               tok);
  REQUIRE(d.examples.size() == 3);
  CHECK(d.lines == 3);
  // text: every token and EOS trained
  CHECK(d.examples[0].ids == std::vector<int>{15496, 995, eos});
  CHECK(d.examples[0].labels == d.examples[0].ids);
  // prompt / completion: the prompt not trained
  const std::vector<int> prompt = tok.encode("Q: 2+2?"), completion = tok.encode(" A: 4");
  const Example& pc = d.examples[1];
  REQUIRE(pc.size() == prompt.size() + completion.size() + 1);
  for (std::size_t t = 0; t < prompt.size(); ++t) CHECK(pc.labels[t] == ignore_label);
  for (std::size_t t = prompt.size(); t < pc.size(); ++t) CHECK(pc.labels[t] == pc.ids[t]);
  CHECK(pc.ids.back() == eos);
  // chat: ChatML, only the assistant's reply and its <|im_end|> trained
  const Example& chat = d.examples[2];
  CHECK(tok.decode(chat.ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n");
  std::vector<int> trained;
  for (std::size_t t = 0; t < chat.size(); ++t)
    if (chat.labels[t] != ignore_label) trained.push_back(chat.ids[t]);
  CHECK(tok.decode(trained) == "Hello!<|im_end|>");
  CHECK(tok.apply_chat_template({{"user", "Hi"}}, true) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

TEST_CASE("Bad JSONL lines are refused with file and line, or skipped and counted", "[data][errors]") {
  const text::Tokenizer& tok = chat_tokenizer();
  const std::vector<std::string> lines{R"({"text": "fine"})",  R"({"text": 42})",          "not json",
                                       R"(["text"])",          R"({"prompt": "only"})",    R"({"other": 1})",
                                       R"({"text": ""})",      R"({"messages": []})",      R"({"messages": [{"role": "user"}]})",
                                       R"({"text": "ok \u00e9"})"};
  const auto p = jsonl("bad.jsonl", lines);
  const std::string e = error_of([&] { read_jsonl(p, tok); });
  CHECK_THAT(e, Contains("bad.jsonl:2: expected \"text\" to be a string"));
  const Dataset d = read_jsonl(p, tok, {.skip_bad_lines = true});
  CHECK(d.examples.size() == 2);
  CHECK(d.skipped == 8);
  REQUIRE(d.skipped_reasons.size() == 8);
  CHECK_THAT(d.skipped_reasons[1], Contains("bad.jsonl:3"));
  CHECK_THAT(d.skipped_reasons[2], Contains("bad.jsonl:4: expected a JSON object, got array"));
  CHECK_THAT(d.skipped_reasons[3], Contains("bad.jsonl:5: expected \"completion\" to be a string (missing)"));
  CHECK_THAT(d.skipped_reasons[4], Contains("bad.jsonl:6: expected one of \"text\""));
  CHECK_THAT(d.skipped_reasons[5], Contains("bad.jsonl:7: the example has no trained tokens"));
  CHECK_THAT(d.skipped_reasons[6], Contains("bad.jsonl:8: expected \"messages\" to be a non-empty array"));
  CHECK_THAT(d.skipped_reasons[7], Contains("bad.jsonl:9, message 0: expected \"content\" to be a string"));
  // invalid UTF-8 inside a JSON string, and a tokenizer without a chat template
  write(moet::testing::scratch_folder("jsonl") / "utf8.jsonl", "{\"text\": \"a\xC3(\"}\n");
  CHECK_THAT(error_of([&] { read_jsonl(moet::testing::scratch_folder("jsonl") / "utf8.jsonl", tok); }), Contains("utf8.jsonl:1"));
  const text::Tokenizer plain = text::Tokenizer::from_folder(gpt2_dir);
  CHECK_THAT(error_of([&] { read_jsonl(jsonl("chat.jsonl", {R"({"messages": [{"role": "user", "content": "x"}]})"}), plain); }),
             Contains("chat.jsonl:1: Tokenizer (") && Contains("has no chat_template"));
  CHECK_THAT(error_of([&] { read_jsonl(jsonl("none.jsonl", {"", "  "}), tok); }), Contains("has no usable example (0 lines"));
  CHECK_THAT(error_of([&] { read_jsonl(moet::testing::scratch_folder("jsonl") / "missing.jsonl", tok); }), Contains("cannot open"));
}

TEST_CASE("Truncation, seeded splits and batches", "[data]") {
  const text::Tokenizer& tok = chat_tokenizer();
  std::vector<std::string> lines;
  for (int i = 0; i < 37; ++i) lines.push_back(json{{"text", std::string(std::size_t(1 + i % 7), 'a') + " example " + std::to_string(i)}}.dump());
  const Dataset d = read_jsonl(jsonl("many.jsonl", lines), tok, {.max_length = 4});
  REQUIRE(d.examples.size() == 37);
  for (const Example& e : d.examples) CHECK(e.size() <= 4);
  CHECK(d.truncated > 0);

  const auto [train, held] = split(d.examples, 0.1, 3);
  CHECK(held.size() == 4);
  CHECK(train.size() == 33);
  const auto again = split(d.examples, 0.1, 3);
  CHECK(again.second.front().ids == held.front().ids);
  CHECK_THAT(error_of([&] { split(d.examples, 1.0, 3); }), Contains("fraction must be in [0, 1), got 1"));

  SECTION("every example once, padding not trained, same seed same batches") {
    const std::vector<TokenBatch> a = batches(train, {.batch_size = 5, .seed = 7, .pad_id = 50256});
    CHECK(a.size() == 7);
    std::multiset<std::vector<int>> seen, want;
    for (const Example& e : train) want.insert(e.ids);
    for (const TokenBatch& b : a) {
      REQUIRE(b.ids.size() == std::size_t(b.batch * b.seq));
      for (Index r = 0; r < b.batch; ++r) {
        std::vector<int> row;
        for (Index t = 0; t < b.seq; ++t) {
          const std::size_t k = std::size_t(r * b.seq + t);
          if (b.mask[k]) row.push_back(b.ids[k]);
          else CHECK((b.labels[k] == ignore_label && b.ids[k] == 50256));
        }
        seen.insert(row);
      }
    }
    CHECK(seen == want);
    const std::vector<TokenBatch> same = batches(train, {.batch_size = 5, .seed = 7, .pad_id = 50256});
    const std::vector<TokenBatch> other = batches(train, {.batch_size = 5, .seed = 8, .pad_id = 50256});
    CHECK(same.front().ids == a.front().ids);
    bool differs = false;
    for (std::size_t i = 0; i < a.size(); ++i) differs = differs || a[i].ids != other[i].ids;
    CHECK(differs);
    CHECK(batches(train, {.batch_size = 5, .drop_last = true}).size() == 6);
  }
  SECTION("left padding puts the tokens at the end of each row") {
    const std::vector<TokenBatch> b = batches(train, {.batch_size = 33, .shuffle = false, .bucket_by_length = false, .left_pad = true});
    REQUIRE(b.size() == 1);
    for (Index r = 0; r < b[0].batch; ++r) CHECK(b[0].mask[std::size_t(r * b[0].seq + b[0].seq - 1)] == 1);
  }
  SECTION("packing cuts full rows from the concatenated examples") {
    std::size_t total = 0;
    for (const Example& e : train) total += e.size();
    const std::vector<TokenBatch> p = batches(train, {.batch_size = 4, .seed = 1, .pack = true, .pack_length = 8});
    std::size_t rows = 0;
    for (const TokenBatch& b : p) {
      CHECK(b.seq == 8);
      CHECK(std::count(b.mask.begin(), b.mask.end(), 1) == b.batch * 8);
      rows += std::size_t(b.batch);
    }
    CHECK(rows == total / 8);
    CHECK_THAT(error_of([&] { batches(train, {.pack = true}); }), Contains("pack_length"));
  }
}

TEST_CASE("Chats and completions are encoded whole, as Hugging Face encodes them (Llama 2)", "[data]") {
  const auto dir = moet::testing::scratch_folder("llama2_chat_data");
  std::filesystem::copy_file(std::filesystem::path(MOET_TEST_DATA_DIR) / "llama2" / "tokenizer.model", dir / "tokenizer.model",
                             std::filesystem::copy_options::overwrite_existing);
  write(dir / "tokenizer_config.json",
        json{{"chat_template",
              "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
              "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
              "message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' "
              "%}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
              "{% endif %}{% endfor %}"}}
            .dump());
  const text::Tokenizer tok = text::Tokenizer::from_folder(dir);
  REQUIRE(tok.chat_format() == text::ChatFormat::mistral);
  const Dataset d = read_jsonl(jsonl("llama2.jsonl", {R"({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})",
                                                      R"({"prompt": "Say hi:", "completion": " hi"})"}),
                               tok, {.add_eos = false});
  REQUIRE(d.examples.size() == 2);
  // the ids are the whole rendered text's; only the reply and its </s> trained
  const Example& chat = d.examples[0];
  const std::string rendered = "<s>[INST] 2+2? [/INST]4</s>";
  CHECK(chat.ids == tok.encode(rendered, {.add_special_tokens = false}));
  std::vector<int> trained;
  for (std::size_t t = 0; t < chat.size(); ++t)
    if (chat.labels[t] != ignore_label) trained.push_back(chat.ids[t]);
  CHECK(tok.decode(trained) == "4</s>");
  // prompt + completion: BOS, then one text; encoding " hi" apart would have given "▁▁hi"
  const Example& pc = d.examples[1];
  CHECK(pc.ids == tok.encode("Say hi: hi"));
  REQUIRE(pc.labels.back() != ignore_label);
  CHECK(tok.id_to_token(pc.ids.back()) == "\u2581hi");
  CHECK(std::count_if(pc.labels.begin(), pc.labels.end(), [](int l) { return l != ignore_label; }) == 1);
}
