// Training data from JSONL files: one example per line, tokenised with the model's tokenizer,
// then split, shuffled and batched into the TokenBatch a model trains on.
//
//   moet::data::Dataset d = moet::data::read_jsonl("train.jsonl", tokenizer, {.max_length = 512});
//   auto [train, eval] = moet::data::split(d.examples, 0.05, /*seed*/ 1);
//   for (const moet::TokenBatch& b : moet::data::batches(train, {.batch_size = 8, .seed = epoch}))
//     model.train_step(b, opt);
//
// A line is a JSON object in one of three forms (the first field found decides):
//   {"text": "..."}                                  every token trained
//   {"prompt": "...", "completion": "..."}           only the completion's tokens trained
//   {"messages": [{"role": ..., "content": ...}]}    only the assistant's replies trained, laid out
//                                                    by the tokenizer's chat template (ChatML, Llama 3,
//                                                    Llama 2, Mistral)
// A prompt + completion and a rendered chat are encoded as one text, as Hugging Face encodes them
// (TRL's prompt-completion and chat data), and each token is trained or not by the part it starts
// in (Tokenizer::encode_segments): encoding the parts apart would differ for SentencePiece-style
// tokenizers, which put a "▁" in front of every text they encode.
// Labels follow Hugging Face's convention (one per token, -100 where not trained; the model shifts).
// A line that is not one of these (not JSON, a missing or mistyped field, an empty example) is a
// moet::format_error naming the file and line, or, with skip_bad_lines, skipped and counted.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "../core/random.hpp"
#include "../io/files.hpp"
#include "../model/batch.hpp"
#include "../text/tokenizer.hpp"

namespace moet::data {

/// One tokenised example: ids and Hugging Face labels (ids where trained, ignore_label elsewhere).
struct Example {
  std::vector<int> ids;
  std::vector<int> labels;

  std::size_t size() const { return ids.size(); }
  /// Tokens that training scores.
  std::size_t trained() const {
    return std::size_t(std::count_if(labels.begin(), labels.end(), [](int l) { return l != ignore_label; }));
  }
};

struct ReadOptions {
  std::size_t max_length = 0;   ///< > 0: longer examples are cut to this many tokens (counted in truncated)
  bool add_eos = true;          ///< end text and completions with the tokenizer's EOS (trained), when it has one
  bool skip_bad_lines = false;  ///< count bad lines instead of raising on the first
};

struct Dataset {
  std::vector<Example> examples;
  std::size_t lines = 0;      ///< non-blank lines read
  std::size_t skipped = 0;    ///< bad lines skipped (skip_bad_lines)
  std::size_t truncated = 0;  ///< examples cut to max_length
  std::vector<std::string> skipped_reasons;  ///< the first few skipped lines' errors
};

namespace detail {

inline const std::string& string_field(const nlohmann::json& j, const char* key, const std::string& where) {
  const auto it = j.find(key);
  if (it == j.end() || !it->is_string())
    throw format_error(where + ": expected \"" + key + "\" to be a string" + (it == j.end() ? " (missing)" : ""));
  return it->get_ref<const std::string&>();
}

inline void append(Example& e, const std::vector<int>& ids, bool trained) {
  e.ids.insert(e.ids.end(), ids.begin(), ids.end());
  e.labels.insert(e.labels.end(), ids.size(), ignore_label);
  if (trained) std::copy(ids.begin(), ids.end(), e.labels.end() - std::ptrdiff_t(ids.size()));
}

/// Segments encoded whole (Tokenizer::encode_segments), labelled by their trained flags.
inline void append(Example& e, const text::Tokenizer& tok, const std::vector<text::ChatSegment>& segments, const text::EncodeOptions& options) {
  const auto [ids, trained] = tok.encode_segments(segments, options);
  for (std::size_t i = 0; i < ids.size(); ++i) append(e, {ids[i]}, trained[i]);
}

/// One line's example (see the file comment); `where` names the file and line.
inline Example parse_example(const nlohmann::json& j, const text::Tokenizer& tok, const ReadOptions& o, const std::string& where) {
  if (!j.is_object()) throw format_error(where + ": expected a JSON object, got " + std::string(j.type_name()));
  Example e;
  const text::EncodeOptions plain{.add_special_tokens = false};
  const auto eos = [&](bool trained) {
    if (o.add_eos && tok.eos_id()) append(e, {*tok.eos_id()}, trained);
  };
  // an example whose own text trains nothing is an error, whatever EOS would add
  const auto nothing_trained = [&] { return format_error(where + ": the example has no trained tokens"); };
  if (j.contains("text")) {
    append(e, tok.encode(string_field(j, "text", where)), true);
    if (e.trained() == 0) throw nothing_trained();
    eos(true);
  } else if (j.contains("prompt") || j.contains("completion")) {
    append(e, tok, {{string_field(j, "prompt", where), false}, {string_field(j, "completion", where), true}}, {});
    if (e.trained() == 0) throw nothing_trained();
    eos(true);
  } else if (j.contains("messages")) {
    const nlohmann::json& m = j["messages"];
    if (!m.is_array() || m.empty()) throw format_error(where + ": expected \"messages\" to be a non-empty array");
    std::vector<text::ChatMessage> chat;
    for (std::size_t i = 0; i < m.size(); ++i) {
      const std::string at = moet::detail::concat(where, ", message ", i);
      if (!m[i].is_object()) throw format_error(at + ": expected an object with \"role\" and \"content\"");
      chat.push_back({string_field(m[i], "role", at), string_field(m[i], "content", at)});
    }
    append(e, tok, tok.chat_segments(chat), plain);
  } else {
    throw format_error(where + ": expected one of \"text\", \"prompt\"/\"completion\" or \"messages\"");
  }
  if (e.trained() == 0) throw nothing_trained();
  return e;
}

}  // namespace detail

/// Reads and tokenises a JSONL file (see the file comment).
inline Dataset read_jsonl(const std::filesystem::path& file, const text::Tokenizer& tok, const ReadOptions& options = {}) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw format_error("read_jsonl: cannot open " + file.string());
  Dataset d;
  std::string line;
  std::size_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    ++d.lines;
    const std::string where = moet::detail::concat(file.string(), ":", number);
    try {
      Example e = detail::parse_example(io::parse_json(line, where), tok, options, where);
      if (options.max_length > 0 && e.size() > options.max_length) {
        e.ids.resize(options.max_length);
        e.labels.resize(options.max_length);
        ++d.truncated;
        if (e.trained() == 0) throw format_error(where + ": nothing trained is left within max_length " + std::to_string(options.max_length));
      }
      d.examples.push_back(std::move(e));
    } catch (const moet::error& err) {
      if (!options.skip_bad_lines) {
        const std::string what = err.what();
        if (what.find(where) != std::string::npos) throw;
        throw format_error(where + ": " + what);  // a tokenizer's error (invalid UTF-8, an unsupported chat template)
      }
      ++d.skipped;
      if (d.skipped_reasons.size() < 10) d.skipped_reasons.push_back(err.what());
    }
  }
  if (d.examples.empty())
    throw format_error(moet::detail::concat("read_jsonl: ", file.string(), " has no usable example (", d.lines, " lines, ",
                                            d.skipped, " skipped)"));
  return d;
}

/// A seeded permutation of 0 .. n-1 (Fisher-Yates over moet's Rng: the same on every platform).
inline std::vector<std::size_t> permutation(std::size_t n, std::uint64_t seed) {
  std::vector<std::size_t> p(n);
  std::iota(p.begin(), p.end(), std::size_t(0));
  Rng rng(seed);
  for (std::size_t i = n; i > 1; --i) std::swap(p[i - 1], p[std::size_t(rng.next() % i)]);
  return p;
}

/// {train, held out}: a seeded `fraction` of the examples (at least one when fraction > 0 and
/// there are two or more) held out for evaluation.
inline std::pair<std::vector<Example>, std::vector<Example>> split(const std::vector<Example>& examples, double fraction,
                                                                   std::uint64_t seed) {
  if (!(fraction >= 0.0 && fraction < 1.0))
    throw value_error(moet::detail::concat("split: the held-out fraction must be in [0, 1), got ", fraction));
  std::size_t held = std::size_t(fraction * double(examples.size()) + 0.5);
  if (fraction > 0 && held == 0 && examples.size() >= 2) held = 1;
  const std::vector<std::size_t> p = permutation(examples.size(), seed);
  std::pair<std::vector<Example>, std::vector<Example>> out;
  for (std::size_t i = 0; i < p.size(); ++i) (i < held ? out.second : out.first).push_back(examples[p[i]]);
  return out;
}

struct BatchOptions {
  Index batch_size = 8;
  std::uint64_t seed = 0;      ///< shuffling (use the epoch for a new order each epoch)
  bool shuffle = true;
  bool bucket_by_length = true;  ///< batch examples of similar length (less padding): sort within windows of 50 batches
  bool pack = false;           ///< concatenate examples and cut rows of exactly pack_length tokens (no padding)
  Index pack_length = 0;       ///< the row length when packing
  int pad_id = 0;              ///< the id padding positions carry (never scored, never attended to)
  bool left_pad = false;       ///< pad on the left (generation); training pads on the right
  bool drop_last = false;      ///< drop a final batch smaller than batch_size
};

namespace detail {
inline TokenBatch make_batch(const std::vector<const Example*>& rows, const BatchOptions& o) {
  std::size_t longest = 0;
  for (const Example* e : rows) longest = std::max(longest, e->size());
  TokenBatch b;
  b.batch = Index(rows.size());
  b.seq = Index(longest);
  b.ids.assign(rows.size() * longest, o.pad_id);
  b.labels.assign(rows.size() * longest, ignore_label);
  b.mask.assign(rows.size() * longest, 0);
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const std::size_t start = r * longest + (o.left_pad ? longest - rows[r]->size() : 0);
    std::copy(rows[r]->ids.begin(), rows[r]->ids.end(), b.ids.begin() + std::ptrdiff_t(start));
    std::copy(rows[r]->labels.begin(), rows[r]->labels.end(), b.labels.begin() + std::ptrdiff_t(start));
    std::fill_n(b.mask.begin() + std::ptrdiff_t(start), rows[r]->size(), 1);
  }
  return b;
}
}  // namespace detail

/// One epoch of batches over `examples` (each example in exactly one batch; with pack, each
/// token in exactly one row except a last partial row, which is dropped).
inline std::vector<TokenBatch> batches(const std::vector<Example>& examples, const BatchOptions& o) {
  moet::detail::expect_positive("batches", "batch_size", o.batch_size);
  std::vector<std::size_t> order = o.shuffle ? permutation(examples.size(), o.seed) : std::vector<std::size_t>(examples.size());
  if (!o.shuffle) std::iota(order.begin(), order.end(), std::size_t(0));
  const std::size_t B = std::size_t(o.batch_size);
  std::vector<TokenBatch> out;
  if (o.pack) {
    moet::detail::expect_positive("batches", "pack_length", o.pack_length);
    const std::size_t L = std::size_t(o.pack_length);
    std::vector<Example> rows;
    Example row;
    for (const std::size_t i : order) {
      const Example& e = examples[i];
      for (std::size_t t = 0; t < e.size(); ++t) {
        row.ids.push_back(e.ids[t]);
        row.labels.push_back(e.labels[t]);
        if (row.size() == L) rows.push_back(std::exchange(row, Example{}));
      }
    }
    for (std::size_t r = 0; r < rows.size(); r += B) {
      if (o.drop_last && r + B > rows.size()) break;
      std::vector<const Example*> batch;
      for (std::size_t k = r; k < std::min(rows.size(), r + B); ++k) batch.push_back(&rows[k]);
      out.push_back(detail::make_batch(batch, o));
    }
    return out;
  }
  if (o.bucket_by_length) {
    const std::size_t window = 50 * B;  // sort by length within windows, so batches stay random
    for (std::size_t w = 0; w < order.size(); w += window)
      std::stable_sort(order.begin() + std::ptrdiff_t(w), order.begin() + std::ptrdiff_t(std::min(order.size(), w + window)),
                       [&](std::size_t a, std::size_t b) { return examples[a].size() < examples[b].size(); });
  }
  for (std::size_t r = 0; r < order.size(); r += B) {
    if (o.drop_last && r + B > order.size()) break;
    std::vector<const Example*> batch;
    for (std::size_t k = r; k < std::min(order.size(), r + B); ++k) batch.push_back(&examples[order[k]]);
    out.push_back(detail::make_batch(batch, o));
  }
  if (o.bucket_by_length && o.shuffle) {  // the batches' order, shuffled again
    const std::vector<std::size_t> p = permutation(out.size(), o.seed ^ 0x9E3779B97F4A7C15ull);
    std::vector<TokenBatch> shuffled;
    shuffled.reserve(out.size());
    for (const std::size_t i : p) shuffled.push_back(std::move(out[i]));
    out = std::move(shuffled);
  }
  return out;
}

}  // namespace moet::data
