// SentencePiece's model file (`tokenizer.model`, Llama 2, Mistral, Gemma), read without
// libsentencepiece or protobuf: the file is one serialized `sentencepiece.ModelProto`
// (sentencepiece_model.proto), and moet reads the few fields that decide how text is encoded.
//
//   ModelProto       1 pieces (repeated SentencePiece)   2 trainer_spec   3 normalizer_spec
//                    5 denormalizer_spec
//   SentencePiece    1 piece (string)   2 score (float)   3 type (NORMAL 1, UNKNOWN 2, CONTROL 3,
//                    USER_DEFINED 4, UNUSED 5, BYTE 6; default NORMAL)
//   TrainerSpec      3 model_type (UNIGRAM 1 default, BPE 2, WORD 3, CHAR 4)   24 treat_whitespace_as_suffix
//                    35 byte_fallback   40 unk_id (0)   41 bos_id (1)   42 eos_id (2)   43 pad_id (-1)
//   NormalizerSpec   1 name   2 precompiled_charsmap   3 add_dummy_prefix (true)
//                    4 remove_extra_whitespaces (true)   5 escape_whitespaces (true)
//
// Every other field is skipped by its wire type. A file that is not a well-formed message (a
// truncated varint or string, a field running past its message, a group or unknown wire type) is
// a moet::format_error naming the byte offset; Tokenizer::from_sentencepiece decides what of the
// content moet can run (BPE with the identity normalizer) and refuses the rest by name.
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../io/files.hpp"

namespace moet::text {

/// What a SentencePiece model file says, in the fields moet reads (defaults as in the .proto).
struct SentencePieceModel {
  enum class PieceType { normal = 1, unknown = 2, control = 3, user_defined = 4, unused = 5, byte = 6 };
  enum class ModelType { unigram = 1, bpe = 2, word = 3, chr = 4 };
  struct Piece {
    std::string text;
    float score = 0.0f;
    PieceType type = PieceType::normal;
  };

  std::vector<Piece> pieces;  ///< id = index
  // trainer_spec
  ModelType model_type = ModelType::unigram;
  bool byte_fallback = false;
  bool treat_whitespace_as_suffix = false;
  int unk_id = 0, bos_id = 1, eos_id = 2, pad_id = -1;
  // normalizer_spec
  std::string normalizer;                ///< the rule's name ("identity", "nmt_nfkc", ...)
  std::size_t charsmap_bytes = 0;        ///< size of its precompiled rules (0: none)
  bool add_dummy_prefix = true;          ///< a space in front of the text
  bool remove_extra_whitespaces = true;  ///< spaces trimmed at both ends, runs of them collapsed
  bool escape_whitespaces = true;        ///< spaces become U+2581
  std::size_t denormalizer_charsmap_bytes = 0;
};

inline const char* to_string(SentencePieceModel::ModelType t) {
  switch (t) {
    case SentencePieceModel::ModelType::unigram: return "UNIGRAM";
    case SentencePieceModel::ModelType::bpe: return "BPE";
    case SentencePieceModel::ModelType::word: return "WORD";
    case SentencePieceModel::ModelType::chr: return "CHAR";
  }
  return "?";
}

namespace detail_spm {

/// A reader over one protobuf message's bytes; every read is bounds-checked.
class Wire {
 public:
  Wire(std::string_view bytes, std::size_t base, const std::string& who) : bytes_(bytes), base_(base), who_(who) {}

  bool done() const { return pos_ >= bytes_.size(); }

  std::uint64_t varint() {
    std::uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= bytes_.size()) fail("a varint runs past the end");
      const auto b = static_cast<unsigned char>(bytes_[pos_++]);
      v |= std::uint64_t(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    fail("a varint is longer than 10 bytes");
  }

  /// The next field's number and wire type.
  std::pair<std::uint64_t, int> tag() {
    const std::uint64_t t = varint();
    if ((t >> 3) == 0) fail("a field has number 0");
    return {t >> 3, int(t & 7)};
  }

  /// A length-delimited field's bytes, with the offset they start at in the file.
  std::pair<std::string_view, std::size_t> bytes() {
    const std::uint64_t n = varint();
    if (n > bytes_.size() - pos_) fail(moet::detail::concat("a field of ", n, " bytes runs past its message"));
    const std::size_t at = pos_;
    pos_ += std::size_t(n);
    return {bytes_.substr(at, std::size_t(n)), base_ + at};
  }

  float fixed32_float() {
    if (bytes_.size() - pos_ < 4) fail("a 32-bit field runs past the end");
    std::uint32_t u = 0;
    for (int i = 0; i < 4; ++i) u |= std::uint32_t(static_cast<unsigned char>(bytes_[pos_ + std::size_t(i)])) << (8 * i);
    pos_ += 4;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }

  void skip(int wire_type) {
    switch (wire_type) {
      case 0: varint(); return;
      case 1:
        if (bytes_.size() - pos_ < 8) fail("a 64-bit field runs past the end");
        pos_ += 8;
        return;
      case 2: bytes(); return;
      case 5:
        if (bytes_.size() - pos_ < 4) fail("a 32-bit field runs past the end");
        pos_ += 4;
        return;
      default: fail(moet::detail::concat("wire type ", wire_type, " (groups or unknown) is not a SentencePiece model's"));
    }
  }

  /// A field that must have wire type `want`.
  void expect(int wire_type, int want, const char* field) {
    if (wire_type != want) fail(moet::detail::concat(field, " has wire type ", wire_type, ", expected ", want));
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw format_error(moet::detail::concat(who_, ": not a SentencePiece model: ", what, " (byte ", base_ + pos_, ")"));
  }

 private:
  std::string_view bytes_;
  std::size_t base_ = 0, pos_ = 0;
  const std::string& who_;
};

inline bool read_bool(Wire& w, int wire_type, const char* field) {
  w.expect(wire_type, 0, field);
  return w.varint() != 0;
}

/// An int32 field (negative values come as 10-byte varints).
inline int read_int32(Wire& w, int wire_type, const char* field) {
  w.expect(wire_type, 0, field);
  const auto v = static_cast<std::int64_t>(w.varint());
  if (v < INT32_MIN || v > INT32_MAX) w.fail(moet::detail::concat(field, " = ", v, " is not an int32"));
  return int(v);
}

inline SentencePieceModel::Piece read_piece(std::string_view bytes, std::size_t base, const std::string& who) {
  SentencePieceModel::Piece p;
  Wire w(bytes, base, who);
  while (!w.done()) {
    const auto [field, type] = w.tag();
    if (field == 1) {
      w.expect(type, 2, "piece");
      p.text = std::string(w.bytes().first);
    } else if (field == 2) {
      w.expect(type, 5, "score");
      p.score = w.fixed32_float();
    } else if (field == 3) {
      const int t = read_int32(w, type, "type");
      if (t < 1 || t > 6) w.fail(moet::detail::concat("a piece has type ", t, ", expected 1..6"));
      p.type = SentencePieceModel::PieceType(t);
    } else {
      w.skip(type);
    }
  }
  return p;
}

inline void read_trainer_spec(SentencePieceModel& m, std::string_view bytes, std::size_t base, const std::string& who) {
  Wire w(bytes, base, who);
  while (!w.done()) {
    const auto [field, type] = w.tag();
    switch (field) {
      case 3: {
        const int t = read_int32(w, type, "model_type");
        if (t < 1 || t > 4) w.fail(moet::detail::concat("model_type ", t, ", expected 1..4"));
        m.model_type = SentencePieceModel::ModelType(t);
        break;
      }
      case 24: m.treat_whitespace_as_suffix = read_bool(w, type, "treat_whitespace_as_suffix"); break;
      case 35: m.byte_fallback = read_bool(w, type, "byte_fallback"); break;
      case 40: m.unk_id = read_int32(w, type, "unk_id"); break;
      case 41: m.bos_id = read_int32(w, type, "bos_id"); break;
      case 42: m.eos_id = read_int32(w, type, "eos_id"); break;
      case 43: m.pad_id = read_int32(w, type, "pad_id"); break;
      default: w.skip(type);
    }
  }
}

/// Fills the normalizer's fields; `denormalizer` reads only its rules' size.
inline void read_normalizer_spec(SentencePieceModel& m, std::string_view bytes, std::size_t base, const std::string& who, bool denormalizer) {
  Wire w(bytes, base, who);
  while (!w.done()) {
    const auto [field, type] = w.tag();
    if (field == 2) {
      w.expect(type, 2, "precompiled_charsmap");
      (denormalizer ? m.denormalizer_charsmap_bytes : m.charsmap_bytes) = w.bytes().first.size();
    } else if (denormalizer) {
      w.skip(type);
    } else if (field == 1) {
      w.expect(type, 2, "name");
      m.normalizer = std::string(w.bytes().first);
    } else if (field == 3) {
      m.add_dummy_prefix = read_bool(w, type, "add_dummy_prefix");
    } else if (field == 4) {
      m.remove_extra_whitespaces = read_bool(w, type, "remove_extra_whitespaces");
    } else if (field == 5) {
      m.escape_whitespaces = read_bool(w, type, "escape_whitespaces");
    } else {
      w.skip(type);
    }
  }
}

}  // namespace detail_spm

/// Parses a serialized ModelProto (the bytes of a tokenizer.model). `who` starts every error.
inline SentencePieceModel parse_sentencepiece_model(std::string_view bytes, const std::string& who) {
  SentencePieceModel m;
  detail_spm::Wire w(bytes, 0, who);
  while (!w.done()) {
    const auto [field, type] = w.tag();
    if (field == 1 || field == 2 || field == 3 || field == 5) {
      w.expect(type, 2, field == 1 ? "pieces" : field == 2 ? "trainer_spec" : "normalizer_spec");
      const auto [sub, at] = w.bytes();
      if (field == 1) m.pieces.push_back(detail_spm::read_piece(sub, at, who));
      else if (field == 2) detail_spm::read_trainer_spec(m, sub, at, who);
      else detail_spm::read_normalizer_spec(m, sub, at, who, field == 5);
    } else {
      w.skip(type);
    }
  }
  if (m.pieces.empty()) throw format_error(who + ": not a SentencePiece model: it has no pieces");
  return m;
}

/// Reads and parses a tokenizer.model file.
inline SentencePieceModel read_sentencepiece_model(const std::filesystem::path& file, const std::string& who) {
  return parse_sentencepiece_model(io::read_text_file(file, who), who);
}

}  // namespace moet::text
