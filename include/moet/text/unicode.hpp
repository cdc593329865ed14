// UTF-8 and the three Unicode classes the tokenizers' pre-tokenizers ask about: letters (\p{L}),
// numbers (\p{N}) and white space (\s, the White_Space property), from the tables that
// scripts/gen_unicode_tables.py generates out of the Unicode Character Database (15.0).
#pragma once

#include <algorithm>
#include <cstddef>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#include "../core/error.hpp"
#include "unicode_data.hpp"

namespace moet::text {

/// One code point of a UTF-8 text and where its bytes start.
struct CodePoint {
  char32_t value;
  std::size_t offset;
};

/// The length of the valid UTF-8 sequence at s[i] (its value in cp), or 0 when the bytes there
/// are not one: a stray continuation byte, a sequence cut short, an overlong form, a surrogate or
/// a value past U+10FFFF.
inline std::size_t utf8_at(std::string_view s, std::size_t i, char32_t& cp) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    cp = b0;
    return 1;
  }
  std::size_t extra = 0;
  char32_t min = 0;
  if ((b0 & 0xE0) == 0xC0) extra = 1, cp = b0 & 0x1F, min = 0x80;
  else if ((b0 & 0xF0) == 0xE0) extra = 2, cp = b0 & 0x0F, min = 0x800;
  else if ((b0 & 0xF8) == 0xF0) extra = 3, cp = b0 & 0x07, min = 0x10000;
  else return 0;
  if (i + extra >= s.size()) return 0;
  for (std::size_t k = 1; k <= extra; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return extra + 1;
}

/// The code points of `s`, each with its byte offset. Text that is not valid UTF-8 is a
/// moet::value_error naming the byte offset: a tokenizer never guesses what such bytes meant.
inline std::vector<CodePoint> decode_utf8(std::string_view s, const std::string& who = "Tokenizer") {
  std::vector<CodePoint> out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    char32_t cp = 0;
    const std::size_t n = utf8_at(s, i, cp);
    if (n == 0)
      throw value_error(moet::detail::concat(who, ": the text is not valid UTF-8 at byte offset ", i, " (byte ",
                                       int(static_cast<unsigned char>(s[i])), ")"));
    out.push_back({cp, i});
    i += n;
  }
  return out;
}

/// Appends the UTF-8 bytes of `cp` to `out`.
inline void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

/// `bytes` with every byte that does not start a valid UTF-8 sequence replaced by U+FFFD (as
/// Hugging Face's decode does when a token sequence ends inside a character).
inline std::string valid_utf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (std::size_t i = 0; i < bytes.size();) {
    char32_t cp = 0;
    const std::size_t n = utf8_at(bytes, i, cp);
    if (n) out.append(bytes.substr(i, n));
    else append_utf8(out, 0xFFFD);
    i += n ? n : 1;
  }
  return out;
}

namespace detail {
template <std::size_t N>
bool in_ranges(const unicode_data::CodeRange (&table)[N], char32_t cp) {
  const auto* it = std::upper_bound(std::begin(table), std::end(table), cp,
                                    [](char32_t v, const unicode_data::CodeRange& r) { return v < r.first; });
  return it != std::begin(table) && cp <= std::prev(it)->last;
}
}  // namespace detail

/// \p{L}: general category L (Lu, Ll, Lt, Lm, Lo).
inline bool is_letter(char32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return detail::in_ranges(unicode_data::letters, cp);
}
/// \p{N}: general category N (Nd, Nl, No).
inline bool is_number(char32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return detail::in_ranges(unicode_data::numbers, cp);
}
/// \s: the White_Space property.
inline bool is_space(char32_t cp) {
  if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
  return detail::in_ranges(unicode_data::white_space, cp);
}

}  // namespace moet::text
