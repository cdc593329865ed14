// Tokenizers from a Hugging Face model folder, behind one interface:
//
//   moet::text::Tokenizer tok = moet::text::Tokenizer::from_folder("gpt2/");
//   std::vector<int> ids = tok.encode("Hello world");      // special tokens split out, BOS per the template
//   std::string text = tok.decode(ids);
//
// What it reads, in this order of preference:
//   tokenizer.json             Hugging Face tokenizers' file: a byte-level BPE model (GPT-2, Llama 3
//                              style), or a SentencePiece-style BPE over characters with byte
//                              fallback and "▁" for spaces (Llama 2, Mistral, as Hugging Face
//                              converts them), with its added tokens and post-processor template
//   vocab.json + merges.txt    GPT-2's original pair (byte-level BPE, GPT-2's pre-tokenizer)
//   tokenizer.model            SentencePiece's own file (Llama 2, Mistral): BPE with the identity
//                              normalizer, read by moet itself (sentencepiece.hpp); it encodes
//                              as libsentencepiece does, with control tokens (<s>, </s>) and
//                              <unk> split out of the text as Hugging Face's LlamaTokenizer does
// plus tokenizer_config.json / special_tokens_map.json for which tokens are BOS, EOS and padding.
// Anything these files say that moet does not implement (another model type, a normalizer or
// decoder it does not know, a pre-tokenizer pattern it does not know) is a moet::value_error naming it: a
// tokenizer that silently splits text differently from the one the model was trained with would
// be worse than none.
#pragma once

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "../io/files.hpp"
#include "bpe.hpp"
#include "pretokenize.hpp"
#include "sentencepiece.hpp"
#include "unicode.hpp"

namespace moet::text {

/// A token the tokenizer matches in the text before pre-tokenization (Hugging Face's added tokens).
struct AddedToken {
  int id = -1;
  std::string content;
  bool special = false;  ///< skipped by decode(ids, skip_special)
  bool lstrip = false;   ///< swallows the white space on its left
  bool rstrip = false;   ///< ... and on its right
  bool single_word = false;  ///< matches only when no letter or number touches it
};

/// One message of a chat (role: "system", "user", "assistant", ...).
struct ChatMessage {
  std::string role, content;
};

/// A piece of a rendered chat: its text and whether training scores it (the assistant's replies
/// and the tokens that close them).
struct ChatSegment {
  std::string text;
  bool trained = false;
};

/// The chat formats moet renders itself, recognised from tokenizer_config.json's chat_template.
enum class ChatFormat {
  none,    ///< no chat_template in the folder
  chatml,  ///< <|im_start|>role\ncontent<|im_end|>\n (Qwen, SmolLM, many fine-tunes)
  llama3,  ///< <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
  llama2,  ///< <s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] reply </s> (Llama 2 chat)
  mistral, ///< <s>[INST] user [/INST]reply</s> (Mistral Instruct v0.1, v0.2)
};

struct EncodeOptions {
  bool add_special_tokens = true;  ///< the post-processor's template (Llama 3's BOS, for one)
  bool split_special_tokens = false;  ///< true: added tokens in the text are plain text
};

class Tokenizer {
 public:
  Tokenizer() = default;

  /// From a model folder (see the file comment).
  static Tokenizer from_folder(const std::filesystem::path& dir) {
    const std::string who = "Tokenizer (" + dir.string() + ")";
    if (!std::filesystem::is_directory(dir)) throw format_error(who + ": not a directory");
    Tokenizer t;
    if (std::filesystem::exists(dir / "tokenizer.json")) {
      t = from_tokenizer_json(dir / "tokenizer.json");
    } else if (std::filesystem::exists(dir / "vocab.json") && std::filesystem::exists(dir / "merges.txt")) {
      t = from_vocab_and_merges(dir / "vocab.json", dir / "merges.txt");
    } else if (std::filesystem::exists(dir / "tokenizer.model")) {
      t = from_sentencepiece(dir / "tokenizer.model");
    } else {
      throw format_error(who + ": has no tokenizer.json, vocab.json and merges.txt, or tokenizer.model");
    }
    t.read_special_tokens(dir);
    return t;
  }

  /// Hugging Face tokenizers' tokenizer.json.
  static Tokenizer from_tokenizer_json(const std::filesystem::path& file) {
    const std::string who = "Tokenizer (" + file.string() + ")";
    const nlohmann::json j = io::parse_json(io::read_text_file(file, who), who);
    if (!j.is_object()) throw format_error(who + ": expected a JSON object");
    return json_checked(who, [&] { return from_tokenizer_json(j, who); });
  }

  /// A parsed tokenizer.json; `who` starts every error.
  static Tokenizer from_tokenizer_json(const nlohmann::json& j, const std::string& who) {
    Tokenizer t;
    t.who_ = who;
    const nlohmann::json& model = member(j, "model", who);
    const std::string type = model.value("type", std::string("BPE"));
    if (type != "BPE") throw value_error(who + ": the model type " + type + " is not supported (moet reads BPE)");
    for (const char* field : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (model.contains(field) && !model[field].is_null() && !(model[field].is_string() && model[field].get<std::string>().empty()))
        throw value_error(who + ": the BPE model's " + field + " is not supported");
    if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"].get<double>() != 0.0)
      throw value_error(who + ": BPE dropout is not supported (a trained model's tokenizer has none)");
    // SentencePiece-style (Llama 2, Mistral): "▁" for spaces from the normalizer or a Metaspace
    // pre-tokenizer, characters with byte fallback; else byte-level
    t.read_metaspace(j.contains("normalizer") ? j["normalizer"] : nlohmann::json(),
                     j.contains("pre_tokenizer") ? j["pre_tokenizer"] : nlohmann::json());
    if (!t.metaspace_) {
      if (model.value("byte_fallback", false))
        throw value_error(who + ": byte_fallback with a byte-level pre-tokenizer is not supported (SentencePiece-style models "
                                "have a Metaspace pre-tokenizer or a Prepend/Replace normalizer)");
      if (j.contains("normalizer") && !j["normalizer"].is_null())
        throw value_error(who + ": the normalizer " + j["normalizer"].value("type", std::string("?")) +
                          " is not supported (byte-level BPE models have none)");
      t.read_pre_tokenizer(j.contains("pre_tokenizer") ? j["pre_tokenizer"] : nlohmann::json());
      if (j.contains("decoder") && !j["decoder"].is_null() && j["decoder"].value("type", std::string()) != "ByteLevel")
        throw value_error(who + ": the decoder " + j["decoder"].value("type", std::string("?")) + " is not supported (ByteLevel is)");
    } else {
      t.read_metaspace_decoder(j.contains("decoder") ? j["decoder"] : nlohmann::json());
    }

    std::unordered_map<std::string, int> vocab;
    const nlohmann::json& v = member(model, "vocab", who);
    if (!v.is_object()) throw format_error(who + ": model.vocab must be an object of token: id");
    for (const auto& [token, id] : v.items()) {
      if (!id.is_number_integer()) throw format_error(who + ": the id of token " + token + " is not an integer");
      vocab.emplace(token, token_id(id, who));
    }
    std::vector<std::pair<std::string, std::string>> merges;
    const nlohmann::json& m = member(model, "merges", who);
    if (!m.is_array()) throw format_error(who + ": model.merges must be an array");
    for (std::size_t r = 0; r < m.size(); ++r) {
      if (m[r].is_string()) {
        merges.push_back(split_merge(m[r].get<std::string>(), who, r));
      } else if (m[r].is_array() && m[r].size() == 2 && m[r][0].is_string() && m[r][1].is_string()) {
        merges.emplace_back(m[r][0].get<std::string>(), m[r][1].get<std::string>());
      } else {
        throw format_error(moet::detail::concat(who, ": merge ", r, " is neither \"a b\" nor [\"a\", \"b\"]"));
      }
    }
    BytePairModel::Options mo{.ignore_merges = model.value("ignore_merges", false)};
    if (t.metaspace_) {
      mo.chars = true;
      mo.byte_fallback = model.value("byte_fallback", false);
      mo.fuse_unk = model.value("fuse_unk", false);
      if (model.contains("unk_token") && model["unk_token"].is_string()) {
        const auto it = vocab.find(model["unk_token"].get<std::string>());
        if (it == vocab.end()) throw value_error(who + ": the unk_token " + model["unk_token"].get<std::string>() + " is not in the vocabulary");
        mo.unk = it->second;
      }
    }
    t.model_ = std::make_shared<BytePairModel>(vocab, merges, mo, who);

    if (j.contains("added_tokens") && j["added_tokens"].is_array())
      for (const nlohmann::json& a : j["added_tokens"]) {
        AddedToken tok;
        tok.id = token_id(a.at("id"), who);
        tok.content = a.at("content").get<std::string>();
        tok.special = a.value("special", false);
        tok.lstrip = a.value("lstrip", false);
        tok.rstrip = a.value("rstrip", false);
        tok.single_word = a.value("single_word", false);
        t.add_token(tok);
      }
    t.read_post_processor(j.contains("post_processor") ? j["post_processor"] : nlohmann::json());
    return t;
  }

  /// SentencePiece's tokenizer.model. moet runs BPE models with the identity normalizer (Llama 2,
  /// Mistral, and models trained with --normalization_rule_name=identity); any other model type,
  /// normalizer, a denormalizer or treat_whitespace_as_suffix is a moet::value_error naming it.
  /// Encoding gives libsentencepiece's ids (tested against it) for text without special tokens.
  /// As Hugging Face's LlamaTokenizer: BOS is added in front, and text between special tokens
  /// gets SentencePiece's dummy "▁" prefix each (its "legacy" mode, also what Llama 2's
  /// tokenizer.json does); through from_folder, tokenizer_config.json's add_bos_token,
  /// add_eos_token and "legacy": false (a prefix only at the start of the text) change that.
  static Tokenizer from_sentencepiece(const std::filesystem::path& file) {
    const std::string who = "Tokenizer (" + file.string() + ")";
    return from_sentencepiece(read_sentencepiece_model(file, who), who);
  }

  static Tokenizer from_sentencepiece(const SentencePieceModel& m, const std::string& who) {
    using Type = SentencePieceModel::PieceType;
    if (m.model_type != SentencePieceModel::ModelType::bpe)
      throw value_error(who + ": the SentencePiece model type " + to_string(m.model_type) +
                        " is not supported (moet reads BPE models: Llama 2, Mistral)");
    if (m.charsmap_bytes > 0 || !(m.normalizer.empty() || m.normalizer == "identity"))
      throw value_error(moet::detail::concat(who, ": the normalizer ", m.normalizer.empty() ? "(unnamed)" : m.normalizer, " with ",
                                             m.charsmap_bytes, " bytes of precompiled rules is not supported (moet runs the identity "
                                             "normalizer, which Llama 2 and Mistral have)"));
    if (m.denormalizer_charsmap_bytes > 0) throw value_error(who + ": a denormalizer with rules is not supported");
    if (m.treat_whitespace_as_suffix) throw value_error(who + ": treat_whitespace_as_suffix is not supported");
    const int n = int(m.pieces.size());
    const auto check_id = [&](int id, const char* what, bool optional) {
      if ((optional && id == -1) || (id >= 0 && id < n)) return;  // -1: the model has none
      throw format_error(moet::detail::concat(who, ": ", what, " is ", id, ", outside the ", n, " pieces"));
    };
    check_id(m.unk_id, "unk_id", false);
    check_id(m.bos_id, "bos_id", true);
    check_id(m.eos_id, "eos_id", true);
    check_id(m.pad_id, "pad_id", true);
    if (m.pieces[std::size_t(m.unk_id)].type != Type::unknown)
      throw format_error(moet::detail::concat(who, ": unk_id ", m.unk_id, " is the piece ", m.pieces[std::size_t(m.unk_id)].text,
                                              ", which is not of type UNKNOWN"));

    Tokenizer t;
    t.who_ = who;
    std::unordered_map<std::string, int> vocab;
    BytePairModel::Options mo{.chars = true, .byte_fallback = m.byte_fallback, .unk = m.unk_id, .fuse_unk = true};
    for (int id = 0; id < n; ++id) {
      const SentencePieceModel::Piece& p = m.pieces[std::size_t(id)];
      if (p.text.empty()) throw format_error(moet::detail::concat(who, ": piece ", id, " is empty"));
      if (const auto [it, fresh] = vocab.emplace(p.text, id); !fresh)
        throw format_error(moet::detail::concat(who, ": pieces ", it->second, " and ", id, " are both ", p.text));
      if (p.type == Type::user_defined) mo.frozen.push_back(id);
      if (p.type == Type::unused) mo.unused.push_back(id);
      if (p.type == Type::control || p.type == Type::unknown) t.add_token({id, p.text, true, false, false, false});
    }
    // SentencePiece's BPE merges any two adjacent symbols whose concatenation is a piece (normal
    // or unused), the highest-scoring first, the leftmost among equals: every split of such a
    // piece into two such pieces is a merge, ranked by the piece's score
    const auto mergeable = [&](const std::string& text) {
      const auto it = vocab.find(text);
      if (it == vocab.end()) return false;
      const Type type = m.pieces[std::size_t(it->second)].type;
      return type == Type::normal || type == Type::unused;
    };
    std::vector<std::pair<std::string, std::string>> merges;
    std::vector<float> scores;
    for (const SentencePieceModel::Piece& p : m.pieces) {
      if (p.type != Type::normal && p.type != Type::unused) continue;
      for (const CodePoint& c : decode_utf8(p.text, who)) {
        if (c.offset == 0) continue;
        std::string a = p.text.substr(0, c.offset), b = p.text.substr(c.offset);
        if (!mergeable(a) || !mergeable(b)) continue;
        merges.emplace_back(std::move(a), std::move(b));
        scores.push_back(p.score);
      }
    }
    std::vector<float> distinct = scores;
    std::sort(distinct.begin(), distinct.end(), std::greater<>());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    std::vector<int> ranks(scores.size());
    for (std::size_t r = 0; r < scores.size(); ++r)
      ranks[r] = int(std::lower_bound(distinct.begin(), distinct.end(), scores[r], std::greater<>()) - distinct.begin());
    t.model_ = std::make_shared<BytePairModel>(vocab, merges, std::move(mo), who, ranks);

    t.metaspace_ = true;
    t.sentencepiece_ = true;
    t.prepend_ = m.add_dummy_prefix ? Prepend::always : Prepend::never;
    t.strip_ = m.add_dummy_prefix ? 1 : 0;
    t.escape_spaces_ = m.escape_whitespaces;
    t.collapse_spaces_ = m.remove_extra_whitespaces;
    if (m.bos_id >= 0) t.bos_ = m.bos_id;
    if (m.eos_id >= 0) t.eos_ = m.eos_id;
    if (m.pad_id >= 0) t.pad_ = m.pad_id;
    if (t.bos_) t.prefix_ = {*t.bos_};
    return t;
  }

  /// GPT-2's vocab.json (token: id) and merges.txt ("#version" line, then "a b" per line).
  static Tokenizer from_vocab_and_merges(const std::filesystem::path& vocab_file, const std::filesystem::path& merges_file) {
    Tokenizer t;
    t.who_ = "Tokenizer (" + vocab_file.parent_path().string() + ")";
    const nlohmann::json v = io::parse_json(io::read_text_file(vocab_file, t.who_), t.who_ + " vocab.json");
    if (!v.is_object()) throw format_error(t.who_ + ": vocab.json must be an object of token: id");
    std::unordered_map<std::string, int> vocab;
    for (const auto& [token, id] : v.items()) {
      if (!id.is_number_integer()) throw format_error(t.who_ + ": the id of token " + token + " in vocab.json is not an integer");
      vocab.emplace(token, token_id(id, t.who_));
    }
    const std::string text = io::read_text_file(merges_file, t.who_);
    std::vector<std::pair<std::string, std::string>> merges;
    std::size_t start = 0, line = 0;
    while (start < text.size()) {
      std::size_t end = text.find('\n', start);
      if (end == std::string::npos) end = text.size();
      std::string_view l(text.data() + start, end - start);
      if (!l.empty() && l.back() == '\r') l.remove_suffix(1);
      if (!l.empty() && !(line == 0 && l.starts_with("#version"))) merges.push_back(split_merge(std::string(l), t.who_ + " merges.txt", line));
      start = end + 1;
      ++line;
    }
    t.model_ = std::make_shared<BytePairModel>(vocab, merges, BytePairModel::Options{}, t.who_);
    t.pre_ = PreTokenizer::gpt2;
    return t;
  }

  // --- encoding and decoding ---------------------------------------------------------------------

  /// The ids of `text` (valid UTF-8, else a moet::value_error naming the byte offset).
  std::vector<int> encode(std::string_view text, const EncodeOptions& options = {}) const {
    require_model();
    std::vector<int> ids;
    if (options.add_special_tokens) ids.insert(ids.end(), prefix_.begin(), prefix_.end());
    encode_body(text, 0, options, ids, nullptr);
    if (options.add_special_tokens) ids.insert(ids.end(), suffix_.begin(), suffix_.end());
    return ids;
  }

  /// The ids of the segments' concatenated text, encoded whole (as Hugging Face encodes a rendered
  /// chat or a prompt + completion), with each id's segment's `trained` flag. An id belongs to
  /// the segment it starts in: the ids the text up to a segment's end encodes to, where they agree
  /// with the whole's, belong to it and those before; a token a merge carried across the boundary
  /// goes to the later segment. The template's prefix (BOS) is not trained, its suffix is
  /// trained as the last segment is.
  ///
  /// Linear in the text unless an added token is single_word: the text up to a segment's end
  /// encodes as the whole does up to the last added token that ends within it (both find the
  /// same matches there, white space stripped alike), so only the text after that token is
  /// encoded again. A single_word token may match at the cut text's end where the whole has a
  /// letter after it, and turn an earlier match into its own; with one, each segment's boundary
  /// encodes the text up to it from the start.
  std::pair<std::vector<int>, std::vector<bool>> encode_segments(const std::vector<ChatSegment>& segments,
                                                                 const EncodeOptions& options = {}) const {
    require_model();
    EncodeOptions body = options;
    body.add_special_tokens = false;
    std::string text;
    for (const ChatSegment& s : segments) text += s.text;
    std::vector<int> whole;
    std::vector<Resume> resumes;
    encode_body(text, 0, body, whole, literal_added_ ? &resumes : nullptr);
    std::vector<int> ids;
    std::vector<bool> trained;
    if (options.add_special_tokens) {
      ids = prefix_;
      trained.assign(prefix_.size(), false);
    }
    std::size_t end = 0, done = 0;
    for (std::size_t k = 0; k < segments.size(); ++k) {
      end += segments[k].text.size();
      std::size_t cut = whole.size();
      if (k + 1 < segments.size()) {
        // the last added token ending within the text up to `end`: its ids are the whole's
        const auto after = std::upper_bound(resumes.begin(), resumes.end(), end, [](std::size_t e, const Resume& r) { return e < r.pos; });
        const Resume from = after == resumes.begin() ? Resume{} : *(after - 1);
        std::vector<int> tail;
        encode_body(std::string_view(text).substr(0, end), from.pos, body, tail, nullptr);
        const auto rest = whole.begin() + std::ptrdiff_t(from.ids);
        cut = from.ids + std::size_t(std::mismatch(tail.begin(), tail.end(), rest, whole.end()).first - tail.begin());
      }
      cut = std::max(cut, done);
      ids.insert(ids.end(), whole.begin() + std::ptrdiff_t(done), whole.begin() + std::ptrdiff_t(cut));
      trained.insert(trained.end(), cut - done, segments[k].trained);
      done = cut;
    }
    if (options.add_special_tokens) {
      ids.insert(ids.end(), suffix_.begin(), suffix_.end());
      trained.insert(trained.end(), suffix_.size(), !segments.empty() && segments.back().trained);
    }
    return {std::move(ids), std::move(trained)};
  }

  /// The text of `ids` (added tokens as written; invalid UTF-8 where a sequence ends inside a
  /// character becomes U+FFFD). An id outside the vocabulary is a moet::value_error.
  std::string decode(std::span<const int> ids, bool skip_special_tokens = false) const {
    require_model();
    static const std::string bar = "\u2581";
    std::string bytes;
    for_each_token(ids, skip_special_tokens, bytes, [&](int id, const std::string& token) {
      if (!metaspace_) {  // byte-level: every code point of a token stands for one byte
        for (const CodePoint& c : decode_utf8(token, who_)) {
          const int b = char_to_byte(c.value);
          if (b < 0) throw value_error(moet::detail::concat(who_, ": token ", id, " (", token, ") is not byte-level"));
          bytes += char(b);
        }
        return;
      }
      unsigned byte = 0;  // SentencePiece-style: <0xXX> byte tokens, "▁" for spaces
      if (token.size() == 6 && token.starts_with("<0x") && token.back() == '>' && std::sscanf(token.c_str() + 3, "%2X", &byte) == 1) {
        bytes += char(byte);
        return;
      }
      for (std::size_t k = 0; k < token.size();) {
        if (token.compare(k, bar.size(), bar) == 0) {
          bytes += ' ';
          k += bar.size();
        } else {
          bytes += token[k++];
        }
      }
    });
    std::string text = valid_utf8(bytes);
    for (int k = 0; k < strip_ && !text.empty() && text.front() == ' '; ++k) text.erase(0, 1);
    return text;
  }
  std::string decode(const std::vector<int>& ids, bool skip_special_tokens = false) const {
    return decode(std::span<const int>(ids), skip_special_tokens);
  }

  // --- chats -------------------------------------------------------------------------------------

  ChatFormat chat_format() const { return chat_; }

  /// The chat as its template lays it out, in segments (the assistant's content and end marker
  /// trained); with add_generation_prompt, ends with the header of an assistant turn (Llama 2's
  /// and Mistral's formats have none: the prompt ends with [/INST]). A folder whose
  /// chat_template moet does not recognise (or has none) is a moet::value_error that quotes the
  /// template's start: moet renders ChatML, Llama 3's, Llama 2's and Mistral's formats, not
  /// arbitrary Jinja. Llama 2 and Mistral want user and assistant turns alternating (Llama 2: after
  /// an optional system message; Mistral: no system message), as their templates raise otherwise.
  std::vector<ChatSegment> chat_segments(const std::vector<ChatMessage>& messages, bool add_generation_prompt = false) const {
    if (chat_ == ChatFormat::llama2 || chat_ == ChatFormat::mistral) return inst_segments(messages);
    std::vector<ChatSegment> out;
    const auto header = [&](const std::string& role) {
      return chat_ == ChatFormat::chatml ? "<|im_start|>" + role + "\n" : "<|start_header_id|>" + role + "<|end_header_id|>\n\n";
    };
    const std::string end = chat_ == ChatFormat::chatml ? "<|im_end|>" : "<|eot_id|>";
    switch (chat_) {
      case ChatFormat::none:
        throw value_error(who_ + ": " + (chat_template_.empty() ? std::string("has no chat_template (tokenizer_config.json)")
                                                                   : "the chat_template is not one moet renders (ChatML, Llama 3, Llama 2, "
                                                                     "Mistral): " + chat_template_.substr(0, 120)));
      case ChatFormat::llama2:
      case ChatFormat::mistral:
      case ChatFormat::llama3:
        out.push_back({"<|begin_of_text|>", false});
        break;
      case ChatFormat::chatml:
        break;
    }
    for (std::size_t i = 0; i < messages.size(); ++i) {
      const ChatMessage& m = messages[i];
      if (m.role.empty()) throw value_error(moet::detail::concat(who_, ": chat message ", i, " has no role"));
      const bool assistant = m.role == "assistant";
      std::string content = m.content;
      if (chat_ == ChatFormat::llama3) content = py_strip(content);  // Llama 3's template trims
      out.push_back({header(m.role), false});
      out.push_back({content + end, assistant});
      if (chat_ == ChatFormat::chatml) out.push_back({"\n", false});
    }
    if (add_generation_prompt) out.push_back({header("assistant"), false});
    return out;
  }

  /// The chat as one string (chat_segments joined).
  std::string apply_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt = false) const {
    std::string text;
    for (const ChatSegment& s : chat_segments(messages, add_generation_prompt)) text += s.text;
    return text;
  }

  // --- the vocabulary ----------------------------------------------------------------------------

  /// One past the largest id (the embedding table needs at least this many rows).
  int vocab_size() const {
    int n = model_ ? model_->size() : 0;
    for (const AddedToken& a : added_) n = std::max(n, a.id + 1);
    return n;
  }
  std::optional<int> token_to_id(const std::string& token) const {
    for (const AddedToken& a : added_)
      if (a.content == token) return a.id;
    const int id = model_ ? model_->id(token) : -1;
    return id >= 0 ? std::optional<int>(id) : std::nullopt;
  }
  /// The token of an id as the vocabulary spells it ("" when no token has it).
  std::string id_to_token(int id) const {
    if (const auto it = added_by_id_.find(id); it != added_by_id_.end()) return added_[it->second].content;
    return model_ ? model_->token(id) : std::string();
  }
  std::optional<int> bos_id() const { return bos_; }
  std::optional<int> eos_id() const { return eos_; }
  std::optional<int> pad_id() const { return pad_; }
  const std::vector<AddedToken>& added_tokens() const { return added_; }
  PreTokenizer pre_tokenizer() const { return pre_; }

 private:
  struct Match {
    const AddedToken* token = nullptr;
    std::size_t begin = 0, end = 0;  // the bytes it replaces, stripped white space included
  };
  /// Where encoding may resume: the text position after an added token and the ids before it.
  struct Resume {
    std::size_t pos = 0, ids = 0;
  };

  /// encode()'s loop without the template's prefix and suffix, from text position `pos` (0, or
  /// the end of an added token), appending to ids; with `resumes`, records each added token's end.
  void encode_body(std::string_view text, std::size_t pos, const EncodeOptions& options, std::vector<int>& ids,
                   std::vector<Resume>* resumes) const {
    while (pos <= text.size()) {
      const Match m = options.split_special_tokens ? Match{} : find_added(text, pos);
      const std::size_t stop = m.token ? m.begin : text.size();
      encode_text(text.substr(pos, stop - pos), ids, pos == 0);
      if (!m.token) break;
      ids.push_back(m.token->id);
      pos = m.end;
      if (resumes) resumes->push_back({pos, ids.size()});
    }
  }

  /// Runs f, turning a JSON access that found the wrong type or no such key (nlohmann's
  /// exceptions) into a moet::format_error starting with `who`.
  template <class F>
  static auto json_checked(const std::string& who, F&& f) -> decltype(f()) {
    try {
      return f();
    } catch (const nlohmann::json::exception& e) {
      throw format_error(who + ": an entry is missing or of the wrong type: " + e.what());
    }
  }

  /// A token id: an integer in [0, 2^31).
  static int token_id(const nlohmann::json& id, const std::string& who) {
    if (!id.is_number_integer() || id.get<std::int64_t>() < 0 || id.get<std::int64_t>() > INT32_MAX)
      throw format_error(who + ": the token id " + id.dump() + " is not an integer in [0, 2^31)");
    return int(id.get<std::int64_t>());
  }

  static const nlohmann::json& member(const nlohmann::json& j, const char* key, const std::string& who) {
    if (!j.is_object() || !j.contains(key)) throw format_error(who + ": expected a \"" + key + "\" entry");
    return j[key];
  }

  static std::pair<std::string, std::string> split_merge(const std::string& line, const std::string& who, std::size_t index) {
    const std::size_t sp = line.find(' ');
    if (sp == std::string::npos || sp == 0 || sp + 1 >= line.size() || line.find(' ', sp + 1) != std::string::npos)
      throw format_error(moet::detail::concat(who, ": merge ", index, " (\"", line, "\") is not two tokens separated by one space"));
    return {line.substr(0, sp), line.substr(sp + 1)};
  }

  void require_model() const {
    if (!model_) throw value_error("Tokenizer: this tokenizer is empty (load one with Tokenizer::from_folder)");
  }

  void add_token(const AddedToken& t) {
    if (t.content.empty()) throw format_error(who_ + ": an added token has empty content");
    if (t.id < 0) throw format_error(who_ + ": the added token " + t.content + " has a negative id");
    if (const auto it = added_by_id_.find(t.id); it != added_by_id_.end()) {
      added_[it->second] = t;
      index_added();
      return;
    }
    added_by_id_[t.id] = added_.size();
    added_.push_back(t);
    index_added();
  }

  /// find_added's index of the added tokens, and whether none of them wants a whole word.
  void index_added() {
    added_index_ = {};
    literal_added_ = true;
    for (std::size_t i = 0; i < added_.size(); ++i) {
      const AddedToken& a = added_[i];
      added_index_.by_content.emplace(a.content, i);  // the first of equal contents wins
      added_index_.first[static_cast<unsigned char>(a.content[0])] = true;
      if (std::find(added_index_.lengths.begin(), added_index_.lengths.end(), a.content.size()) == added_index_.lengths.end())
        added_index_.lengths.push_back(a.content.size());
      literal_added_ = literal_added_ && !a.single_word;
    }
    std::sort(added_index_.lengths.begin(), added_index_.lengths.end(), std::greater<>());
  }

  void read_pre_tokenizer(const nlohmann::json& p) {
    if (p.is_null()) throw value_error(who_ + ": no pre_tokenizer (moet reads byte-level BPE, which has one)");
    const std::string type = p.value("type", std::string());
    if (type == "ByteLevel") {
      if (!p.value("use_regex", true))
        throw value_error(who_ + ": a ByteLevel pre-tokenizer without its regex (and no Split before it) is not supported");
      pre_ = PreTokenizer::gpt2;
      prefix_space_ = p.value("add_prefix_space", false);
      return;
    }
    if (type == "Sequence" && p.contains("pretokenizers") && p["pretokenizers"].is_array() && p["pretokenizers"].size() == 2) {
      const nlohmann::json& split = p["pretokenizers"][0];
      const nlohmann::json& bytes = p["pretokenizers"][1];
      if (split.value("type", std::string()) == "Split" && bytes.value("type", std::string()) == "ByteLevel" &&
          !bytes.value("use_regex", true) && split.contains("pattern") && split["pattern"].contains("Regex") &&
          split.value("behavior", std::string()) == "Isolated" && !split.value("invert", false)) {
        pre_ = pre_tokenizer_of(split["pattern"]["Regex"].get<std::string>(), who_);
        prefix_space_ = bytes.value("add_prefix_space", false);
        return;
      }
    }
    throw value_error(who_ + ": the pre-tokenizer " + p.dump().substr(0, 300) +
                      " is not supported (moet runs ByteLevel, or Split(Regex, Isolated) + ByteLevel without regex)");
  }

  void read_post_processor(const nlohmann::json& p) {
    if (p.is_null()) return;
    const std::string type = p.value("type", std::string());
    if (type == "ByteLevel") return;  // offsets only
    if (type == "Sequence" && p.contains("processors")) {
      for (const nlohmann::json& q : p["processors"]) read_post_processor(q);
      return;
    }
    if (type != "TemplateProcessing")
      throw value_error(who_ + ": the post-processor " + type + " is not supported (ByteLevel and TemplateProcessing are)");
    bool before = true;
    for (const nlohmann::json& piece : member(p, "single", who_)) {
      if (piece.contains("Sequence")) {
        before = false;
        continue;
      }
      const std::string name = piece.at("SpecialToken").at("id").get<std::string>();
      const nlohmann::json& st = member(member(p, "special_tokens", who_), name.c_str(), who_);
      for (const nlohmann::json& id : st.at("ids")) (before ? prefix_ : suffix_).push_back(token_id(id, who_));
    }
  }

  /// BOS, EOS and padding from tokenizer_config.json, else special_tokens_map.json.
  void read_special_tokens(const std::filesystem::path& dir) {
    json_checked(who_, [&] { read_special_tokens_unchecked(dir); });
  }
  void read_special_tokens_unchecked(const std::filesystem::path& dir) {
    for (const char* name : {"tokenizer_config.json", "special_tokens_map.json"}) {
      if (!std::filesystem::exists(dir / name)) continue;
      const nlohmann::json j = io::parse_json(io::read_text_file(dir / name, who_), who_ + " " + name);
      const auto token = [&](const char* key) -> std::optional<int> {
        if (!j.contains(key) || j[key].is_null()) return std::nullopt;
        const std::string s = j[key].is_object() ? j[key].value("content", std::string()) : j[key].get<std::string>();
        const std::optional<int> id = token_to_id(s);
        if (!id) throw value_error(who_ + ": " + name + " names " + key + " \"" + s + "\", which is not a token");
        if (!added_by_id_.contains(*id)) add_token({*id, s, true, false, false, false});  // GPT-2's <|endoftext|>
        return id;
      };
      for (const auto& [key, slot] : {std::pair{"bos_token", &bos_}, std::pair{"eos_token", &eos_}, std::pair{"pad_token", &pad_}})
        if (j.contains(key)) *slot = token(key);
      if (j.contains("chat_template") && j["chat_template"].is_string()) {
        chat_template_ = j["chat_template"].get<std::string>();
        const bool chatml = chat_template_.find("<|im_start|>") != std::string::npos && token_to_id("<|im_start|>") &&
                            token_to_id("<|im_end|>");
        const bool llama3 = chat_template_.find("<|start_header_id|>") != std::string::npos && token_to_id("<|start_header_id|>") &&
                            token_to_id("<|end_header_id|>") && token_to_id("<|eot_id|>") && token_to_id("<|begin_of_text|>");
        // Llama 2 chat and Mistral Instruct (v0.1, v0.2): their templates' telling expressions,
        // compared without white space; [INST] with its spaces as written
        std::string squeezed;
        for (const char c : chat_template_)
          if (c != ' ' && c != '\t' && c != '\n' && c != '\r') squeezed += c;
        const bool inst = chat_template_.find("'[INST] '") != std::string::npos && chat_template_.find("' [/INST]'") != std::string::npos &&
                          bos_ && eos_;
        const bool llama2 = inst && squeezed.find("'<<SYS>>\\n'+system_message+'\\n<</SYS>>\\n\\n'+message['content']") != std::string::npos &&
                            squeezed.find("bos_token+'[INST]'+content.strip()+'[/INST]'") != std::string::npos &&
                            squeezed.find("''+content.strip()+''+eos_token") != std::string::npos;
        const bool mistral = inst && squeezed.starts_with("{{bos_token}}") && squeezed.find("<<SYS>>") == std::string::npos &&
                             squeezed.find("{{'[INST]'+message['content']+'[/INST]'}}") != std::string::npos &&
                             squeezed.find("{{message['content']+eos_token}}") != std::string::npos;
        chat_ = chatml ? ChatFormat::chatml : llama3 ? ChatFormat::llama3 : llama2 ? ChatFormat::llama2 : mistral ? ChatFormat::mistral : ChatFormat::none;
      }
      if (sentencepiece_) {  // Hugging Face's LlamaTokenizer: add_bos_token (true) and add_eos_token (false)
        const auto flag = [&](const char* key, bool fallback) {
          if (!j.contains(key) || j[key].is_null()) return fallback;
          if (!j[key].is_boolean()) throw format_error(who_ + ": " + name + "'s " + key + " is not true or false");
          return j[key].get<bool>();
        };
        prefix_.clear();
        suffix_.clear();
        if (prepend_ != Prepend::never && !flag("legacy", true)) prepend_ = Prepend::first;
        if (flag("add_bos_token", true) && bos_) prefix_.push_back(*bos_);
        if (flag("add_eos_token", false) && eos_) suffix_.push_back(*eos_);
      }
      return;
    }
  }

  /// Llama 2's and Mistral's [INST] layouts, as their Hugging Face templates render them.
  std::vector<ChatSegment> inst_segments(const std::vector<ChatMessage>& messages) const {
    const bool llama2 = chat_ == ChatFormat::llama2;
    const std::string name = llama2 ? "Llama 2" : "Mistral";
    const std::string bos = id_to_token(*bos_), eos = id_to_token(*eos_);
    std::size_t first = 0;
    std::string system;
    if (!messages.empty() && messages[0].role == "system") {
      if (!llama2) throw value_error(who_ + ": Mistral's chat template takes only user and assistant messages, message 0 is system");
      system = messages[0].content;
      first = 1;
    }
    std::vector<ChatSegment> out;
    if (!llama2) out.push_back({bos, false});
    for (std::size_t i = first; i < messages.size(); ++i) {
      const ChatMessage& m = messages[i];
      const char* want = (i - first) % 2 == 0 ? "user" : "assistant";
      if (m.role != want)
        throw value_error(moet::detail::concat(who_, ": ", name, "'s chat template wants user and assistant turns alternating, "
                                               "starting with user; message ", i, " is ", m.role.empty() ? "(no role)" : m.role,
                                               ", expected ", want));
      if (!llama2) {
        out.push_back(m.role == "user" ? ChatSegment{"[INST] " + m.content + " [/INST]", false} : ChatSegment{m.content + eos, true});
        continue;
      }
      std::string content = m.content;
      if (i == first && first == 1) content = std::string("<<SYS>>\n").append(system).append("\n<</SYS>>\n\n").append(m.content);
      const bool user = m.role == "user";
      out.push_back({(user ? bos + "[INST] " : std::string(" ")).append(py_strip(content)).append(user ? " [/INST]" : " " + eos), !user});
    }
    return out;
  }

  /// The leftmost added token at or after pos (the longest of those starting there).
  Match find_added(std::string_view text, std::size_t pos) const {
    Match best;
    // the first position with an added token, its longest there (the first listed of equal
    // contents); one pass over the text, a lookup per distinct length where a token could start
    for (std::size_t at = pos; at < text.size() && !best.token; ++at) {
      if (!added_index_.first[static_cast<unsigned char>(text[at])]) continue;
      for (const std::size_t n : added_index_.lengths) {
        if (n > text.size() - at) continue;
        const auto it = added_index_.by_content.find(text.substr(at, n));
        if (it == added_index_.by_content.end()) continue;
        const AddedToken& a = added_[it->second];
        if (a.single_word && !alone(text, at, at + n)) continue;
        best = {&a, at, at + n};
        break;
      }
    }
    if (!best.token) return best;
    if (best.token->lstrip)
      while (best.begin > pos) {  // whole white-space characters, never a byte inside one (à ends in 0xA0)
        std::size_t start = best.begin - 1;
        while (start > pos && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
        char32_t cp = 0;
        if (utf8_at(text, start, cp) != best.begin - start || !is_space(cp)) break;
        best.begin = start;
      }
    if (best.token->rstrip)
      for (char32_t cp = 0; best.end < text.size();) {
        const std::size_t n = utf8_at(text, best.end, cp);
        if (n == 0 || !is_space(cp)) break;
        best.end += n;
      }
    return best;
  }

  /// Python's str.strip() (what the templates' strip() and Jinja's trim run): white space in
  /// Unicode's sense, and U+001C..U+001F, off both ends.
  static std::string py_strip(const std::string& s) {
    const std::vector<CodePoint> cps = decode_utf8(s);
    const auto blank = [](char32_t c) { return is_space(c) || (c >= 0x1C && c <= 0x1F); };
    std::size_t b = 0, e = cps.size();
    while (b < e && blank(cps[b].value)) ++b;
    while (e > b && blank(cps[e - 1].value)) --e;
    if (b == e) return {};
    const std::size_t end = e < cps.size() ? cps[e].offset : s.size();
    return s.substr(cps[b].offset, end - cps[b].offset);
  }

  /// No letter or number (ASCII) right before `begin` or right after `end`.
  static bool alone(std::string_view text, std::size_t begin, std::size_t end) {
    const auto word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_'; };
    return (begin == 0 || !word(text[begin - 1])) && (end >= text.size() || !word(text[end]));
  }

  /// Recognises the SentencePiece-style layouts Hugging Face writes: a normalizer that prepends
  /// "▁" and replaces spaces by it (legacy: a "▁" in front of every segment between added tokens),
  /// or a Metaspace pre-tokenizer (prepend_scheme always / first / never, split false).
  void read_metaspace(const nlohmann::json& normalizer, const nlohmann::json& pre) {
    static const std::string bar = "\u2581";
    if (!normalizer.is_null() && normalizer.value("type", std::string()) == "Sequence" && normalizer.contains("normalizers")) {
      bool prepend = false, replace = false;
      for (const nlohmann::json& n : normalizer["normalizers"]) {
        const std::string type = n.value("type", std::string());
        if (type == "Prepend" && n.value("prepend", std::string()) == bar) prepend = true;
        else if (type == "Replace" && n.contains("pattern") && n["pattern"].value("String", std::string()) == " " &&
                 n.value("content", std::string()) == bar)
          replace = true;
        else
          throw value_error(who_ + ": the normalizer " + n.dump().substr(0, 200) + " is not supported (moet reads Prepend(\"\u2581\") "
                                   "and Replace(\" \", \"\u2581\"), SentencePiece's space handling)");
      }
      if (!replace) throw value_error(who_ + ": a normalizer without Replace(\" \", \"\u2581\") is not supported");
      if (!pre.is_null()) throw value_error(who_ + ": a pre-tokenizer after a Prepend/Replace normalizer is not supported");
      metaspace_ = true;
      prepend_ = prepend ? Prepend::always : Prepend::never;
      return;
    }
    if (!pre.is_null() && pre.value("type", std::string()) == "Metaspace") {
      if (!normalizer.is_null()) throw value_error(who_ + ": a normalizer before a Metaspace pre-tokenizer is not supported");
      if (pre.value("replacement", bar) != bar) throw value_error(who_ + ": a Metaspace replacement other than \u2581 is not supported");
      if (pre.value("split", false)) throw value_error(who_ + ": a Metaspace pre-tokenizer with split true is not supported");
      const std::string scheme = pre.value("prepend_scheme", pre.value("add_prefix_space", true) ? std::string("always") : std::string("never"));
      if (scheme != "always" && scheme != "first" && scheme != "never")
        throw value_error(who_ + ": the Metaspace prepend_scheme " + scheme + " is not supported");
      metaspace_ = true;
      prepend_ = scheme == "always" ? Prepend::always : scheme == "first" ? Prepend::first : Prepend::never;
    }
  }

  /// SentencePiece-style decoding: Replace("▁", " "), ByteFallback, Fuse, Strip(one leading space), or Metaspace.
  void read_metaspace_decoder(const nlohmann::json& d) {
    if (d.is_null()) throw value_error(who_ + ": a SentencePiece-style tokenizer needs its decoder (Replace, ByteFallback, Fuse, Strip or Metaspace)");
    const std::string type = d.value("type", std::string());
    if (type == "Metaspace") {
      strip_ = d.value("prepend_scheme", std::string("always")) != "never" && d.value("add_prefix_space", true) ? 1 : 0;
      return;
    }
    if (type != "Sequence" || !d.contains("decoders")) throw value_error(who_ + ": the decoder " + type + " is not supported here");
    for (const nlohmann::json& x : d["decoders"]) {
      const std::string t = x.value("type", std::string());
      if (t == "Replace" || t == "ByteFallback" || t == "Fuse") continue;
      if (t == "Strip" && x.value("content", std::string()) == " " && x.value("stop", 0) == 0) {
        strip_ = x.value("start", 0);
        continue;
      }
      throw value_error(who_ + ": the decoder step " + x.dump().substr(0, 200) + " is not supported");
    }
  }

  /// decode's walk: an added token's content goes to `out` as written (a special one skipped when
  /// asked), a vocabulary token to piece(id, token); an id outside the vocabulary is an error.
  template <class Piece>
  void for_each_token(std::span<const int> ids, bool skip_special_tokens, std::string& out, Piece&& piece) const {
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const int id = ids[i];
      if (const auto it = added_by_id_.find(id); it != added_by_id_.end()) {
        if (!(skip_special_tokens && added_[it->second].special)) out += added_[it->second].content;
        continue;
      }
      const std::string& token = model_->token(id);
      if (token.empty())
        throw value_error(moet::detail::concat(who_, ": decode got id ", id, " at position ", i, ", outside the vocabulary of ", vocab_size()));
      piece(id, token);
    }
  }

  void encode_text(std::string_view text, std::vector<int>& ids, bool at_start = true) const {
    if (text.empty()) return;
    if (metaspace_) {  // the whole segment is one word: "▁" for every space, and one in front
      std::string collapsed;
      if (collapse_spaces_) {  // SentencePiece's remove_extra_whitespaces: spaces (only ' ') trimmed, runs made one
        for (const char c : text)
          if (c != ' ' || (!collapsed.empty() && collapsed.back() != ' ')) collapsed += c;
        if (!collapsed.empty() && collapsed.back() == ' ') collapsed.pop_back();
        if (collapsed.empty()) return;
        text = collapsed;
      }
      const char* space = escape_spaces_ ? "\u2581" : " ";
      std::string word;
      word.reserve(text.size() + 8);
      if (prepend_ == Prepend::always || (prepend_ == Prepend::first && at_start)) word += space;
      for (const char c : text) {
        if (c == ' ') word += space;
        else word += c;
      }
      model_->encode_word(word, ids, who_);
      return;
    }
    std::string prefixed;
    if (prefix_space_ && text.front() != ' ') {
      prefixed.reserve(text.size() + 1);
      prefixed.push_back(' ');
      prefixed.append(text);
      text = prefixed;
    }
    for (const Piece& p : pre_tokenize(pre_, text)) model_->encode_word(text.substr(p.begin, p.end - p.begin), ids, who_);
  }

  std::string who_ = "Tokenizer";
  std::shared_ptr<const BytePairModel> model_;
  PreTokenizer pre_ = PreTokenizer::gpt2;
  bool prefix_space_ = false;
  std::vector<AddedToken> added_;
  std::unordered_map<int, std::size_t> added_by_id_;
  struct StringHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  struct AddedIndex {
    std::unordered_map<std::string, std::size_t, StringHash, std::equal_to<>> by_content;  ///< content -> index in added_
    std::vector<std::size_t> lengths;                                                      ///< distinct, longest first
    std::array<bool, 256> first{};                                                         ///< bytes a token starts with
  } added_index_;
  bool literal_added_ = true;  ///< no added token is single_word (encode_segments' linear path)
  std::vector<int> prefix_, suffix_;
  std::optional<int> bos_, eos_, pad_;
  std::string chat_template_;
  ChatFormat chat_ = ChatFormat::none;
  // SentencePiece-style tokenizers (Llama 2, Mistral)
  enum class Prepend { always, first, never };
  bool metaspace_ = false;
  Prepend prepend_ = Prepend::always;
  int strip_ = 0;  // leading spaces the decoder strips
  // SentencePiece's own tokenizer.model
  bool sentencepiece_ = false;
  bool escape_spaces_ = true;     // spaces become "▁"
  bool collapse_spaces_ = false;  // remove_extra_whitespaces
};

}  // namespace moet::text
