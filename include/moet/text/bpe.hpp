// Byte-level byte-pair encoding (GPT-2's scheme, as Hugging Face's tokenizers run it): a word's
// UTF-8 bytes become printable code points (bytes_to_unicode below), one symbol each, and adjacent
// symbols merge, lowest merge rank first and leftmost first among equal ranks, until no listed
// merge applies. The merges run over token ids with a heap, O(n log n) per word; words already
// seen come from a cache.
#pragma once

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <queue>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "unicode.hpp"

namespace moet::text {

/// GPT-2's map from bytes to printable code points: the printable Latin-1 bytes map to
/// themselves, the other 68 to U+0100 onwards in byte order.
inline const std::array<char32_t, 256>& byte_to_char() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    const auto kept = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF); };
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) t[std::size_t(b)] = kept(b) ? char32_t(b) : next++;
    return t;
  }();
  return table;
}

/// The byte a code point of byte_to_char stands for, or -1.
inline int char_to_byte(char32_t c) {
  static const std::unordered_map<char32_t, int> inverse = [] {
    std::unordered_map<char32_t, int> m;
    for (int b = 0; b < 256; ++b) m[byte_to_char()[std::size_t(b)]] = b;
    return m;
  }();
  const auto it = inverse.find(c);
  return it == inverse.end() ? -1 : it->second;
}

/// `bytes` as byte_to_char's code points, in UTF-8 (the form tokens take in a vocabulary).
inline std::string bytes_as_symbols(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const char b : bytes) append_utf8(out, byte_to_char()[static_cast<unsigned char>(b)]);
  return out;
}

/// A vocabulary and its merge list.
class BytePairModel {
 public:
  struct Options {
    bool ignore_merges = false;  ///< a word that is a token as a whole is that token (Llama 3)
    bool chars = false;          ///< SentencePiece-style symbols (characters) instead of bytes
    bool byte_fallback = false;  ///< chars: a character without a token becomes <0xXX> tokens
    int unk = -1;                ///< chars: the unknown token, or -1
    bool fuse_unk = false;       ///< chars: a run of unknown characters is one unk
    /// chars: tokens matched whole in a word before it is cut into characters, longest first,
    /// never merged with a neighbour (SentencePiece's user-defined symbols)
    std::vector<int> frozen = {};
    /// chars: tokens that must not come out of the merges (SentencePiece's unused pieces, which
    /// it re-splits; moet refuses instead of guessing the split): a word that yields one is an error
    std::vector<int> unused = {};
  };

  BytePairModel() = default;

  /// vocab: token (in byte_to_char's symbols) -> id; merges in rank order, or with their ranks
  /// in `ranks` (equal ranks: leftmost first; SentencePiece ranks merges by the merged piece's
  /// score). Every merge's two parts and their concatenation must be tokens, and every byte's
  /// symbol must be one: else a moet::value_error naming the merge or the byte (`who` names the file).
  BytePairModel(const std::unordered_map<std::string, int>& vocab, const std::vector<std::pair<std::string, std::string>>& merges,
                Options options, const std::string& who, const std::vector<int>& ranks = {})
      : options_(std::move(options)) {
    if (!ranks.empty() && ranks.size() != merges.size())
      throw value_error(moet::detail::concat(who, ": ", ranks.size(), " merge ranks for ", merges.size(), " merges"));
    int max_id = -1;
    for (const auto& [token, id] : vocab) {
      if (id < 0) throw value_error(moet::detail::concat(who, ": token ", token, " has the negative id ", id));
      max_id = std::max(max_id, id);
    }
    // ids index a table: a vocabulary with far larger ids than tokens is a broken file, not a reason to allocate gigabytes
    if (std::size_t(max_id) >= 2 * vocab.size() + 1024)
      throw value_error(moet::detail::concat(who, ": a token has the id ", max_id, ", far beyond the vocabulary's ", vocab.size(), " tokens"));
    tokens_.assign(std::size_t(max_id + 1), std::string());
    for (const auto& [token, id] : vocab) {
      if (!tokens_[std::size_t(id)].empty())
        throw value_error(moet::detail::concat(who, ": tokens ", tokens_[std::size_t(id)], " and ", token, " share the id ", id));
      tokens_[std::size_t(id)] = token;
    }
    ids_ = vocab;
    for (std::size_t r = 0; r < merges.size(); ++r) {
      const auto& [a, b] = merges[r];
      const int ia = id(a), ib = id(b), im = id(a + b);
      if (ia < 0 || ib < 0 || im < 0)
        throw value_error(moet::detail::concat(who, ": merge ", r, " (\"", a, "\" \"", b, "\") names a token the vocabulary lacks (",
                                         ia < 0 ? a : ib < 0 ? b : a + b, ")"));
      merges_.try_emplace(key(ia, ib), Merge{ranks.empty() ? int(r) : ranks[r], im});  // a repeated pair keeps its first rank
    }
    for (const int f : options_.frozen) {
      if (token(f).empty()) throw value_error(moet::detail::concat(who, ": the user-defined symbol id ", f, " is not in the vocabulary"));
      frozen_.emplace_back(token(f), f);
    }
    std::stable_sort(frozen_.begin(), frozen_.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    unused_.assign(tokens_.size(), false);
    for (const int u : options_.unused)
      if (u >= 0 && std::size_t(u) < unused_.size()) unused_[std::size_t(u)] = true;
    // Both are held as frozen_ / unused_ from here on.
    options_.frozen = {};
    options_.unused = {};
    for (int byte = 0; byte < 256; ++byte) {
      std::string sym;
      append_utf8(sym, byte_to_char()[std::size_t(byte)]);
      byte_ids_[std::size_t(byte)] = id(sym);
    }
    if (options_.unk >= 0 && token(options_.unk).empty())
      throw value_error(moet::detail::concat(who, ": the unknown token's id ", options_.unk, " is not in the vocabulary"));
  }

  BytePairModel(BytePairModel&& o) noexcept
      : options_(std::move(o.options_)),
        ids_(std::move(o.ids_)),
        tokens_(std::move(o.tokens_)),
        merges_(std::move(o.merges_)),
        byte_ids_(o.byte_ids_),
        frozen_(std::move(o.frozen_)),
        unused_(std::move(o.unused_)) {}
  BytePairModel& operator=(BytePairModel&& o) noexcept {
    options_ = std::move(o.options_);
    ids_ = std::move(o.ids_);
    tokens_ = std::move(o.tokens_);
    merges_ = std::move(o.merges_);
    byte_ids_ = o.byte_ids_;
    frozen_ = std::move(o.frozen_);
    unused_ = std::move(o.unused_);
    std::scoped_lock lock(cache_mutex_);
    cache_.clear();
    return *this;
  }

  /// The id of a token, or -1.
  int id(const std::string& token) const {
    const auto it = ids_.find(token);
    return it == ids_.end() ? -1 : it->second;
  }
  /// The token of an id ("" for an id nothing has).
  const std::string& token(int id) const {
    static const std::string none;
    return id >= 0 && std::size_t(id) < tokens_.size() ? tokens_[std::size_t(id)] : none;
  }
  /// One past the largest id.
  int size() const { return int(tokens_.size()); }
  std::size_t merges() const { return merges_.size(); }

  /// Appends the ids of one word (UTF-8 text) to out.
  void encode_word(std::string_view word, std::vector<int>& out, const std::string& who) const {
    if (word.empty()) return;
    {
      std::scoped_lock lock(cache_mutex_);
      const auto it = cache_.find(std::string(word));
      if (it != cache_.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int> ids = options_.chars ? merge_chars(word, who) : merge(word, who);
    out.insert(out.end(), ids.begin(), ids.end());
    std::scoped_lock lock(cache_mutex_);
    if (cache_.size() >= max_cached) cache_.clear();
    cache_.emplace(std::string(word), std::move(ids));
  }

 private:
  struct Merge {
    int rank, result;
  };
  static constexpr std::size_t max_cached = 1 << 16;
  static std::uint64_t key(int a, int b) { return (std::uint64_t(std::uint32_t(a)) << 32) | std::uint32_t(b); }

  std::vector<int> merge(std::string_view word, const std::string& who) const {
    if (options_.ignore_merges) {
      if (const int whole = id(bytes_as_symbols(word)); whole >= 0) return {whole};
    }
    std::vector<int> sym(word.size());
    for (std::size_t i = 0; i < word.size(); ++i) {
      const auto byte = static_cast<unsigned char>(word[i]);
      sym[i] = byte_ids_[byte];
      if (sym[i] < 0) throw value_error(moet::detail::concat(who, ": the vocabulary has no token for byte ", int(byte)));
    }
    return merge_symbols(std::move(sym));
  }

  /// SentencePiece-style symbols: one per character (its UTF-8 text a token), a character without
  /// a token as its bytes' <0xXX> tokens (byte fallback) or as unk (runs fused), else an error.
  std::vector<int> merge_chars(std::string_view word, const std::string& who) const {
    if (options_.ignore_merges) {
      if (const int whole = id(std::string(word)); whole >= 0) return {whole};
    }
    std::vector<int> sym;
    sym.reserve(word.size());
    std::vector<std::size_t> frozen_at;  // positions in sym of frozen symbols
    std::size_t skip_to = 0;             // bytes before this belong to a frozen symbol
    for (const CodePoint& c : decode_utf8(word, who)) {
      if (c.offset < skip_to) continue;
      if (const auto f = frozen_at_offset(word, c.offset)) {
        frozen_at.push_back(sym.size());
        sym.push_back(f->second);
        skip_to = c.offset + f->first.size();
        continue;
      }
      const char32_t cp = c.value;
      std::string ch;
      append_utf8(ch, cp);
      if (const int t = id(ch); t >= 0) {
        sym.push_back(t);
      } else if (options_.byte_fallback) {
        for (const char b : ch) {
          char name[8];
          std::snprintf(name, sizeof name, "<0x%02X>", unsigned(static_cast<unsigned char>(b)));
          const int t2 = id(name);
          if (t2 < 0) throw value_error(moet::detail::concat(who, ": byte fallback needs the token ", name, ", which the vocabulary lacks"));
          sym.push_back(t2);
        }
      } else if (options_.unk >= 0) {
        if (!(options_.fuse_unk && !sym.empty() && sym.back() == options_.unk)) sym.push_back(options_.unk);
      } else {
        char code[16];
        std::snprintf(code, sizeof code, "U+%04X", unsigned(cp));
        throw value_error(moet::detail::concat(who, ": the vocabulary has no token for the character ", code,
                                               " and the model has neither byte fallback nor an unknown token"));
      }
    }
    if (frozen_at.empty()) return check_unused(merge_symbols(std::move(sym)), word, who);
    // merge the runs between frozen symbols on their own
    std::vector<int> ids;
    std::size_t begin = 0;
    frozen_at.push_back(sym.size());
    for (const std::size_t f : frozen_at) {
      const std::vector<int> run = merge_symbols(std::vector<int>(sym.begin() + std::ptrdiff_t(begin), sym.begin() + std::ptrdiff_t(f)));
      ids.insert(ids.end(), run.begin(), run.end());
      if (f < sym.size()) ids.push_back(sym[f]);
      begin = f + 1;
    }
    return check_unused(std::move(ids), word, who);
  }

  /// The longest frozen symbol starting at byte `at` of `word`, or null.
  const std::pair<std::string, int>* frozen_at_offset(std::string_view word, std::size_t at) const {
    for (const auto& f : frozen_)
      if (word.compare(at, f.first.size(), f.first) == 0) return &f;
    return nullptr;
  }

  std::vector<int> check_unused(std::vector<int> ids, std::string_view word, const std::string& who) const {
    for (const int id : ids)
      if (id >= 0 && std::size_t(id) < unused_.size() && unused_[std::size_t(id)])
        throw value_error(moet::detail::concat(who, ": the word \"", word, "\" merges into the piece ", token(id), " (id ", id,
                                               "), which the model marks unused; moet does not re-split unused pieces"));
    return ids;
  }

  /// The merges over a word's symbols (token ids), lowest rank first, leftmost first among equals.
  std::vector<int> merge_symbols(std::vector<int> sym) const {
    const std::size_t n = sym.size();
    if (n < 2) return sym;
    std::vector<int> prev(n), next(n);
    for (std::size_t i = 0; i < n; ++i) {
      prev[i] = int(i) - 1;
      next[i] = i + 1 < n ? int(i) + 1 : -1;
    }
    // candidates (rank, left position, left id, right id), lowest rank then leftmost first
    using Candidate = std::tuple<int, int, int, int>;
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
    const auto push = [&](int left) {
      if (left < 0 || next[std::size_t(left)] < 0) return;
      const int right = next[std::size_t(left)];
      const auto it = merges_.find(key(sym[std::size_t(left)], sym[std::size_t(right)]));
      if (it != merges_.end()) heap.emplace(it->second.rank, left, sym[std::size_t(left)], sym[std::size_t(right)]);
    };
    for (std::size_t i = 0; i + 1 < n; ++i) push(int(i));
    while (!heap.empty()) {
      const auto [rank, left, a, b] = heap.top();
      heap.pop();
      const int right = next[std::size_t(left)];
      if (sym[std::size_t(left)] != a || right < 0 || sym[std::size_t(right)] != b) continue;  // stale
      sym[std::size_t(left)] = merges_.at(key(a, b)).result;
      sym[std::size_t(right)] = -1;
      next[std::size_t(left)] = next[std::size_t(right)];
      if (next[std::size_t(right)] >= 0) prev[std::size_t(next[std::size_t(right)])] = left;
      push(prev[std::size_t(left)]);
      push(left);
    }
    std::vector<int> ids;
    for (int i = 0; i >= 0; i = next[std::size_t(i)]) ids.push_back(sym[std::size_t(i)]);
    return ids;
  }

  Options options_;
  std::unordered_map<std::string, int> ids_;
  std::vector<std::string> tokens_;
  std::unordered_map<std::uint64_t, Merge> merges_;
  std::array<int, 256> byte_ids_{};
  std::vector<std::pair<std::string, int>> frozen_;  // longest first
  std::vector<bool> unused_;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int>> cache_;
};

}  // namespace moet::text
