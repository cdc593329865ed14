// Safetensors checkpoints: read by memory map (single files and sharded checkpoints with a
// model.safetensors.index.json), write (adapters, tests). Every byte of a file is validated
// before it is used, so a corrupt or hostile file gives a moet::format_error naming the file and
// what is wrong, never a crash or a read out of bounds:
//   - the 8-byte header length must leave room for the header inside the file;
//   - the header must be a JSON object of tensors {dtype, shape, data_offsets} (plus an optional
//     "__metadata__" object of strings);
//   - dtypes must be known (F32, F64, F16, BF16), shapes non-negative, offsets ordered, inside the
//     data section, of exactly shape x dtype bytes, and not overlapping; the shape's product is
//     computed without overflow (a dimension of 2^62 cannot wrap to a small byte count);
//   - the header nests at most io::max_json_depth deep.
// Format: https://github.com/huggingface/safetensors (little-endian, row-major).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "files.hpp"

namespace moet {
namespace io {

static_assert(std::endian::native == std::endian::little, "moet::io reads little-endian safetensors in place");

enum class DType { F32, F64, F16, BF16 };

inline std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::F64: return 8;
    case DType::F32: return 4;
    default: return 2;
  }
}
inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::F16: return "F16";
    default: return "BF16";
  }
}

/// IEEE half <-> float, with subnormals, infinities and NaN; float -> half rounds to nearest even.
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ffu;
  std::uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: value = mantissa * 2^-24
      const float v = std::ldexp(float(mantissa), -24);
      return sign ? -v : v;
    }
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  return std::bit_cast<float>(bits);
}

inline std::uint16_t float_to_half(float f) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = std::uint16_t((x >> 16) & 0x8000u);
  const std::uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return sign | (abs > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN / inf
  if (abs >= 0x477ff000u) return sign | 0x7c00u;                                    // rounds to inf
  if (abs < 0x38800000u) {  // subnormal half (or zero): round mantissa * 2^24
    const float scaled = std::bit_cast<float>(abs) * 16777216.0f;  // exact: times 2^24
    return sign | std::uint16_t(std::nearbyint(scaled));
  }
  const std::uint32_t rounded = abs + 0x0fffu + ((abs >> 13) & 1u);  // round to nearest even
  return sign | std::uint16_t((rounded - 0x38000000u) >> 13);
}

inline float bf16_to_float(std::uint16_t b) { return std::bit_cast<float>(std::uint32_t(b) << 16); }
inline std::uint16_t float_to_bf16(float f) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((x >> 16) | 0x40u);  // quiet NaN
  return std::uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::size_t begin = 0, end = 0;  // byte offsets in the data section
  std::int64_t count = 0;          // values: the shape's product (checked against the file's size)

  std::int64_t elements() const { return count; }
};

/// One memory-mapped .safetensors file.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path) : path_(path.string()) {
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(std::string("cannot open: ") + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      fail(std::string("cannot stat: ") + std::strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      fail(S_ISDIR(st.st_mode) ? "is a directory, expected a file" : "is not a regular file");
    }
    size_ = std::size_t(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        fail(std::string("cannot map: ") + std::strerror(errno));
      }
      data_ = static_cast<const unsigned char*>(p);
    }
    ::close(fd);
    try {
      parse();
    } catch (...) {
      unmap();
      throw;
    }
  }
  ~SafetensorsFile() { unmap(); }
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return index_.count(name) > 0; }

  const TensorInfo& info(const std::string& name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) fail("tensor '" + name + "' is missing");
    return tensors_[it->second];
  }

  /// The tensor as a (rows, cols) matrix of T; a 1-D tensor of n values is (1, n). Checks the shape.
  template <class T>
  Matrix<T> matrix(const std::string& name, Index rows, Index cols) const {
    const TensorInfo& t = info(name);
    const bool matches = (t.shape.size() == 2 && t.shape[0] == rows && t.shape[1] == cols) ||
                         (t.shape.size() == 1 && rows == 1 && t.shape[0] == cols);
    if (!matches) fail(detail::concat("tensor '", name, "' has shape ", shape_text(t.shape), ", expected (", rows, ", ", cols, ")"));
    Matrix<T> m(rows, cols);
    const unsigned char* src = data_ + data_start_ + t.begin;
    T* dst = m.data();
    const std::size_t n = std::size_t(rows * cols);
    for (std::size_t i = 0; i < n; ++i) dst[i] = T(read(t.dtype, src, i));
    return m;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw format_error("safetensors file " + path_ + ": " + what); }

  static std::string shape_text(const std::vector<std::int64_t>& shape) {
    std::string s = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + ")";
  }

  static double read(DType d, const unsigned char* base, std::size_t i) {
    switch (d) {
      case DType::F32: { float v; std::memcpy(&v, base + 4 * i, 4); return v; }
      case DType::F64: { double v; std::memcpy(&v, base + 8 * i, 8); return v; }
      case DType::F16: { std::uint16_t v; std::memcpy(&v, base + 2 * i, 2); return half_to_float(v); }
      default: { std::uint16_t v; std::memcpy(&v, base + 2 * i, 2); return bf16_to_float(v); }
    }
  }

  void parse() {
    if (size_ < 8) fail(detail::concat("is ", size_, " bytes, smaller than the 8-byte header length"));
    std::uint64_t header_len;
    std::memcpy(&header_len, data_, 8);
    if (header_len > size_ - 8)
      fail(detail::concat("header length ", header_len, " exceeds the ", size_ - 8, " bytes after the length field"));
    data_start_ = 8 + std::size_t(header_len);
    const std::size_t data_size = size_ - data_start_;
    const nlohmann::json header = parse_json(data_ + 8, data_ + data_start_, "safetensors file " + path_ + ": header");
    if (!header.is_object()) fail("the JSON header is not an object");
    for (auto it = header.begin(); it != header.end(); ++it) {
      if (it.key() == "__metadata__") {
        if (!it.value().is_object()) fail("__metadata__ is not an object");
        for (auto m = it.value().begin(); m != it.value().end(); ++m) {
          if (!m.value().is_string()) fail("__metadata__ value '" + m.key() + "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      tensors_.push_back(parse_tensor(it.key(), it.value(), data_size));
    }
    std::vector<const TensorInfo*> by_offset;
    for (const auto& t : tensors_) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](auto a, auto b) { return a->begin < b->begin; });
    for (std::size_t i = 1; i < by_offset.size(); ++i)
      if (by_offset[i]->begin < by_offset[i - 1]->end)
        fail("tensors '" + by_offset[i - 1]->name + "' and '" + by_offset[i]->name + "' overlap");
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
  }

  TensorInfo parse_tensor(const std::string& name, const nlohmann::json& j, std::size_t data_size) const {
    TensorInfo t;
    t.name = name;
    if (!j.is_object() || !j.contains("dtype") || !j.contains("shape") || !j.contains("data_offsets"))
      fail("tensor '" + name + "' needs dtype, shape and data_offsets");
    const auto& dtype = j["dtype"];
    if (!dtype.is_string()) fail("tensor '" + name + "': dtype is not a string");
    const std::string d = dtype.get<std::string>();
    if (d == "F32") t.dtype = DType::F32;
    else if (d == "F64") t.dtype = DType::F64;
    else if (d == "F16") t.dtype = DType::F16;
    else if (d == "BF16") t.dtype = DType::BF16;
    else fail("tensor '" + name + "' has dtype '" + d + "', expected one of F32, F64, F16, BF16");
    const auto& shape = j["shape"];
    if (!shape.is_array()) fail("tensor '" + name + "': shape is not an array");
    std::vector<std::uint64_t> dims;
    for (const auto& s : shape) {
      if (!s.is_number_unsigned()) fail("tensor '" + name + "': shape entries must be non-negative integers");
      dims.push_back(s.get<std::uint64_t>());
    }
    const auto& offsets = j["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned())
      fail("tensor '" + name + "': data_offsets must be two non-negative integers");
    const std::uint64_t begin = offsets[0].get<std::uint64_t>(), end = offsets[1].get<std::uint64_t>();
    if (begin > end || end > data_size)
      fail(detail::concat("tensor '", name, "' has data_offsets [", begin, ", ", end, "] outside the ", data_size,
                          "-byte data section"));
    // The product is bounded before it is formed, so neither it nor its byte count can wrap (a
    // dimension of 2^62 with F32 wrapped to 0 bytes); a zero anywhere makes an empty tensor.
    const std::uint64_t most = std::numeric_limits<std::uint64_t>::max() / dtype_size(t.dtype);
    const bool empty = std::find(dims.begin(), dims.end(), std::uint64_t(0)) != dims.end();
    std::uint64_t elements = empty ? 0 : 1;
    for (const std::uint64_t v : dims) {
      t.shape.push_back(std::int64_t(std::min<std::uint64_t>(v, std::uint64_t(std::numeric_limits<std::int64_t>::max()))));
      if (empty) continue;
      if (elements > most / v) {
        std::string text = "(";
        for (std::size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
        fail(detail::concat("tensor '", name, "' has ", end - begin, " bytes, but shape ", text, ") of ", d,
                            " needs 2^64 or more"));
      }
      elements *= v;
    }
    if (end - begin != elements * dtype_size(t.dtype))
      fail(detail::concat("tensor '", name, "' has ", end - begin, " bytes, expected ", elements * dtype_size(t.dtype),
                          " for shape ", shape_text(t.shape), " of ", d));
    t.begin = std::size_t(begin);
    t.end = std::size_t(end);
    t.count = std::int64_t(elements);
    return t;
  }

  void unmap() {
    if (data_) ::munmap(const_cast<unsigned char*>(data_), size_);
    data_ = nullptr;
  }

  std::string path_;
  const unsigned char* data_ = nullptr;
  std::size_t size_ = 0, data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// A checkpoint: one .safetensors file, or a folder with model.safetensors or with shards
/// listed in model.safetensors.index.json ({"weight_map": {tensor: shard file}}).
class Checkpoint {
 public:
  explicit Checkpoint(const std::filesystem::path& path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (!fs::is_directory(path, ec)) {
      add(path);
      return;
    }
    const fs::path index = path / "model.safetensors.index.json";
    if (!fs::exists(index, ec)) {
      add(path / "model.safetensors");
      return;
    }
    const std::string who = "checkpoint index " + index.string();
    const nlohmann::json j = parse_json(read_text_file(index, who), who);
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      throw format_error("checkpoint index " + index.string() + ": needs a \"weight_map\" object");
    std::map<std::string, std::size_t> shard_of_file;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string()) throw format_error("checkpoint index " + index.string() + ": shard of '" + it.key() + "' is not a string");
      const std::string file = it.value().get<std::string>();
      if (file.find('/') != std::string::npos || file == ".." || file.empty())
        throw format_error("checkpoint index " + index.string() + ": shard name '" + file + "' must be a file in the folder");
      if (!shard_of_file.count(file)) {
        shard_of_file[file] = shards_.size();
        add(path / file, /*register_tensors=*/false);
      }
      const std::size_t shard = shard_of_file[file];
      if (!shards_[shard]->contains(it.key()))
        throw format_error("checkpoint index " + index.string() + ": tensor '" + it.key() + "' is not in " + file);
      where_[it.key()] = shard;
    }
  }

  bool contains(const std::string& name) const { return where_.count(name) > 0; }
  /// How many values its tensors hold together.
  std::uint64_t values() const {
    std::uint64_t n = 0;
    for (const auto& [name, shard] : where_) n += std::uint64_t(shards_[shard]->info(name).elements());
    return n;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [name, shard] : where_) out.push_back(name);
    return out;
  }
  const SafetensorsFile& file_of(const std::string& name) const {
    const auto it = where_.find(name);
    if (it == where_.end()) throw format_error("checkpoint: tensor '" + name + "' is missing");
    return *shards_[it->second];
  }
  template <class T>
  Matrix<T> matrix(const std::string& name, Index rows, Index cols) const {
    return file_of(name).template matrix<T>(name, rows, cols);
  }

 private:
  void add(const std::filesystem::path& file, bool register_tensors = true) {
    shards_.push_back(std::make_unique<SafetensorsFile>(file));
    if (register_tensors)
      for (const auto& t : shards_.back()->tensors()) where_[t.name] = shards_.size() - 1;
  }

  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, std::size_t> where_;
};

/// A tensor to write: values in row-major order, its shape, and the dtype to store it in.
struct TensorToWrite {
  std::string name;
  std::vector<std::int64_t> shape;
  std::vector<double> values;
  DType dtype = DType::F32;

  template <class Derived>
  static TensorToWrite from(std::string name, const Eigen::MatrixBase<Derived>& m, DType dtype = DType::F32) {
    TensorToWrite t{std::move(name), {m.rows(), m.cols()}, {}, dtype};
    t.values.reserve(std::size_t(m.size()));
    for (Index r = 0; r < m.rows(); ++r)
      for (Index c = 0; c < m.cols(); ++c) t.values.push_back(double(m(r, c)));
    return t;
  }
};

/// Writes a .safetensors file (tensors in the given order, header padded to 8 bytes).
inline void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<unsigned char> data;
  for (const auto& t : tensors) {
    std::uint64_t elements = 1;  // bounded by the values given before it is formed: it cannot wrap
    for (auto d : t.shape) {
      if (d < 0 || (d > 0 && elements > t.values.size() / std::uint64_t(d))) {
        elements = t.values.size() + 1;
        break;
      }
      elements *= std::uint64_t(d);
    }
    if (elements != t.values.size())
      throw value_error(detail::concat("write_safetensors: tensor '", t.name, "' has ", t.values.size(),
                                       " values for ", elements, " elements"));
    const std::size_t begin = data.size();
    for (double v : t.values) {
      unsigned char bytes[8];
      switch (t.dtype) {
        case DType::F32: { const float f = float(v); std::memcpy(bytes, &f, 4); break; }
        case DType::F64: std::memcpy(bytes, &v, 8); break;
        case DType::F16: { const std::uint16_t h = float_to_half(float(v)); std::memcpy(bytes, &h, 2); break; }
        case DType::BF16: { const std::uint16_t h = float_to_bf16(float(v)); std::memcpy(bytes, &h, 2); break; }
      }
      data.insert(data.end(), bytes, bytes + dtype_size(t.dtype));
    }
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {begin, data.size()}}};
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw format_error("cannot write " + path.string());
  const std::uint64_t length = text.size();
  out.write(reinterpret_cast<const char*>(&length), 8);
  out.write(text.data(), std::streamsize(text.size()));
  out.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size()));
  if (!out) throw format_error("failed writing " + path.string());
}

}  // namespace io
}  // namespace moet
