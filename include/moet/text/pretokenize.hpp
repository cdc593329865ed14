// Pre-tokenizers: how a byte-level BPE tokenizer cuts text into words before merging. Hugging
// Face's tokenizer.json gives them as regular expressions; moet recognises the two that byte-level
// models ship with and runs each as a hand-written scanner (no regex engine, Unicode classes from
// unicode.hpp), so a pattern it does not know is an error, not a silent misreading:
//
//   gpt2    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//           (GPT-2, GPT-J, GPT-NeoX, RoBERTa, BART, ...: ByteLevel with use_regex true)
//   llama3  (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//           \s*[\r\n]+|\s+(?!\S)|\s+
//           (Llama 3, and tiktoken's cl100k_base)
//
// Each scanner follows the regex's leftmost, first-alternative-wins semantics, including what
// backtracking does to `\s+(?!\S)` (a run of spaces before a word leaves its last space to the word).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "unicode.hpp"

namespace moet::text {

enum class PreTokenizer {
  gpt2,    ///< GPT-2's pattern
  llama3,  ///< Llama 3's (cl100k_base) pattern
};

inline constexpr std::string_view gpt2_pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view llama3_pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

/// A word of the text: bytes [begin, end).
struct Piece {
  std::size_t begin, end;
};

namespace detail {

/// The scanners work on code points; `at(i)` is 0 past the end (no class contains it).
class Scanner {
 public:
  explicit Scanner(std::string_view text) : text_(text), cps_(decode_utf8(text)) {}

  std::size_t size() const { return cps_.size(); }
  char32_t at(std::size_t i) const { return i < cps_.size() ? cps_[i].value : 0; }
  std::size_t offset(std::size_t i) const { return i < cps_.size() ? cps_[i].offset : text_.size(); }

  bool letter(std::size_t i) const { return i < cps_.size() && is_letter(at(i)); }
  bool number(std::size_t i) const { return i < cps_.size() && is_number(at(i)); }
  bool space(std::size_t i) const { return i < cps_.size() && is_space(at(i)); }
  /// [^\s\p{L}\p{N}]
  bool other(std::size_t i) const { return i < cps_.size() && !is_space(at(i)) && !is_letter(at(i)) && !is_number(at(i)); }
  bool newline(std::size_t i) const { return at(i) == '\r' || at(i) == '\n'; }

  template <class Pred>
  std::size_t run(std::size_t i, Pred&& pred) const {
    while (i < cps_.size() && pred(i)) ++i;
    return i;
  }

  /// The contraction at i ('s 't 're 've 'm 'll 'd), its end or i; ASCII case folded when asked.
  std::size_t contraction(std::size_t i, bool any_case) const {
    if (at(i) != '\'') return i;
    const auto lower = [&](std::size_t k) -> char32_t {
      const char32_t c = at(k);
      return any_case && c >= 'A' && c <= 'Z' ? c + 32 : c;
    };
    const char32_t a = lower(i + 1), b = lower(i + 2);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    return i;
  }

  /// \s+(?!\S) then \s+ at a space: the whole run when it ends the text or one space is all there
  /// is; otherwise all but its last code point (which the next word may take).
  std::size_t spaces(std::size_t i) const {
    const std::size_t j = run(i, [&](std::size_t k) { return space(k); });
    return j == cps_.size() || j - i == 1 ? j : j - 1;
  }

 private:
  std::string_view text_;
  std::vector<CodePoint> cps_;
};

inline std::size_t gpt2_next(const Scanner& s, std::size_t i) {
  if (const std::size_t e = s.contraction(i, false); e != i) return e;
  const std::size_t w = s.at(i) == ' ' ? i + 1 : i;  // " ?"
  if (s.letter(w)) return s.run(w, [&](std::size_t k) { return s.letter(k); });
  if (s.number(w)) return s.run(w, [&](std::size_t k) { return s.number(k); });
  if (s.other(w)) return s.run(w, [&](std::size_t k) { return s.other(k); });
  return s.spaces(i);  // i is a space here
}

inline std::size_t llama3_next(const Scanner& s, std::size_t i) {
  if (const std::size_t e = s.contraction(i, true); e != i) return e;
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (s.letter(i)) return s.run(i, [&](std::size_t k) { return s.letter(k); });
  if (!s.newline(i) && !s.number(i) && s.letter(i + 1)) return s.run(i + 1, [&](std::size_t k) { return s.letter(k); });
  // \p{N}{1,3}
  if (s.number(i)) {
    std::size_t j = i;
    while (j < i + 3 && s.number(j)) ++j;
    return j;
  }
  // " ?[^\s\p{L}\p{N}]+[\r\n]*"
  const std::size_t w = s.at(i) == ' ' ? i + 1 : i;
  if (s.other(w)) {
    const std::size_t j = s.run(w, [&](std::size_t k) { return s.other(k); });
    return s.run(j, [&](std::size_t k) { return s.newline(k); });
  }
  // \s*[\r\n]+: up to the last newline of the run of spaces, when it has one
  const std::size_t j = s.run(i, [&](std::size_t k) { return s.space(k); });
  for (std::size_t k = j; k > i; --k)
    if (s.newline(k - 1)) return k;
  return s.spaces(i);
}

}  // namespace detail

/// The words of `text`, in order; together they cover every byte of it.
inline std::vector<Piece> pre_tokenize(PreTokenizer kind, std::string_view text) {
  const detail::Scanner s(text);
  std::vector<Piece> out;
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t j = kind == PreTokenizer::gpt2 ? detail::gpt2_next(s, i) : detail::llama3_next(s, i);
    out.push_back({s.offset(i), s.offset(j)});
    i = j;
  }
  return out;
}

/// The pre-tokenizer of a regular expression found in a tokenizer.json; anything else is a
/// moet::value_error that quotes the pattern.
inline PreTokenizer pre_tokenizer_of(std::string_view pattern, const std::string& who) {
  if (pattern == gpt2_pattern) return PreTokenizer::gpt2;
  if (pattern == llama3_pattern) return PreTokenizer::llama3;
  throw value_error(moet::detail::concat(who, ": the pre-tokenizer pattern ", std::string(pattern),
                                   " is not one moet knows (it runs GPT-2's and Llama 3's byte-level patterns)"));
}

}  // namespace moet::text
