// Safetensors: round trips in every dtype, sharded checkpoints, and every kind of broken file
// rejected with a moet::format_error that says what is wrong (never a crash or a bad read).
#include <catch2/catch.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>

#include <moet/io/safetensors.hpp>
#include <moet/moet.hpp>

#include "scratch.hpp"

using namespace moet;
using namespace moet::io;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

/// A file (or folder) name in this program's scratch folder (removed when the program ends).
fs::path scratch(const std::string& name) { return testing::scratch_folder("files") / name; }

/// A file made of an 8-byte length, the given header text, and `data_bytes` zero bytes.
fs::path raw_file(const std::string& name, const std::string& header, std::size_t data_bytes, std::uint64_t length_field) {
  const fs::path p = scratch(name);
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&length_field), 8);
  out << header;
  out << std::string(data_bytes, '\0');
  return p;
}
fs::path raw_file(const std::string& name, const std::string& header, std::size_t data_bytes) {
  return raw_file(name, header, data_bytes, header.size());
}

}  // namespace

TEST_CASE("Half and bfloat16 conversions round to nearest even and keep specials", "[io]") {
  for (float v : {0.0f, -0.0f, 1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 5.960464477539063e-08f, 0.333251953125f})
    REQUIRE(half_to_float(float_to_half(v)) == v);
  REQUIRE(float_to_half(1.0f + 1.0f / 2048) == float_to_half(1.0f));  // tie goes to even
  REQUIRE(std::isinf(half_to_float(float_to_half(1e6f))));
  REQUIRE(std::isnan(half_to_float(float_to_half(NAN))));
  for (float v : {0.0f, 1.0f, -3.0f, 1.5f, std::ldexp(1.0f, 127)}) REQUIRE(bf16_to_float(float_to_bf16(v)) == v);
  REQUIRE(bf16_to_float(float_to_bf16(1.0f + 1.0f / 256)) == 1.0f);
}

TEST_CASE("Write and read back F32, F64, F16 and BF16 tensors with metadata", "[io]") {
  Rng rng(1);
  const Matrix<double> a = rng.normal_matrix<double>(3, 4);
  Matrix<double> exact(2, 3);
  exact << 1, -2, 0.5, 0.25, 8, -0.125;  // representable in every dtype
  const fs::path p = scratch("roundtrip.safetensors");
  write_safetensors(p,
                    {TensorToWrite::from("a.f64", a, DType::F64), TensorToWrite::from("a.f32", a, DType::F32),
                     TensorToWrite::from("e.f16", exact, DType::F16), TensorToWrite::from("e.bf16", exact, DType::BF16),
                     TensorToWrite{"bias", {3}, {1, 2, 3}, DType::F32}},
                    {{"format", "pt"}});
  SafetensorsFile f(p);
  REQUIRE(f.tensors().size() == 5);
  REQUIRE(f.metadata().at("format") == "pt");
  REQUIRE(f.matrix<double>("a.f64", 3, 4) == a);
  REQUIRE(f.matrix<float>("a.f32", 3, 4) == a.cast<float>());
  REQUIRE(f.matrix<double>("e.f16", 2, 3) == exact);
  REQUIRE(f.matrix<double>("e.bf16", 2, 3) == exact);
  REQUIRE(f.matrix<float>("bias", 1, 3) == (Matrix<float>(1, 3) << 1, 2, 3).finished());
  REQUIRE_THROWS_WITH(f.matrix<float>("a.f32", 4, 3), Contains("tensor 'a.f32' has shape (3, 4), expected (4, 3)"));
  REQUIRE_THROWS_AS(f.matrix<float>("nope", 1, 1), format_error);
  REQUIRE_THROWS_WITH(f.matrix<float>("nope", 1, 1), Contains("tensor 'nope' is missing"));
}

TEST_CASE("Sharded checkpoints are found through the index", "[io]") {
  const fs::path dir = scratch("sharded");
  fs::create_directories(dir);
  write_safetensors(dir / "model-00001-of-00002.safetensors", {TensorToWrite{"w1", {2, 2}, {1, 2, 3, 4}}});
  write_safetensors(dir / "model-00002-of-00002.safetensors", {TensorToWrite{"w2", {1, 2}, {5, 6}}});
  std::ofstream(dir / "model.safetensors.index.json")
      << R"({"metadata": {}, "weight_map": {"w1": "model-00001-of-00002.safetensors", "w2": "model-00002-of-00002.safetensors"}})";
  Checkpoint ckpt(dir);
  REQUIRE(ckpt.contains("w1"));
  REQUIRE(ckpt.matrix<float>("w2", 1, 2) == (Matrix<float>(1, 2) << 5, 6).finished());
  REQUIRE(ckpt.matrix<double>("w1", 2, 2)(1, 0) == 3.0);
  REQUIRE_THROWS_WITH(ckpt.matrix<float>("w3", 1, 1), Contains("tensor 'w3' is missing"));

  std::ofstream(dir / "model.safetensors.index.json") << R"({"weight_map": {"w9": "model-00001-of-00002.safetensors"}})";
  REQUIRE_THROWS_WITH(Checkpoint(dir), Contains("tensor 'w9' is not in model-00001-of-00002.safetensors"));
  std::ofstream(dir / "model.safetensors.index.json") << R"({"weight_map": {"w1": "../escape.safetensors"}})";
  REQUIRE_THROWS_WITH(Checkpoint(dir), Contains("must be a file in the folder"));
  std::ofstream(dir / "model.safetensors.index.json") << R"({"weight_map": )";
  REQUIRE_THROWS_WITH(Checkpoint(dir), Contains("malformed JSON"));
}

TEST_CASE("Broken files are rejected with a clear message", "[io][errors]") {
  const std::string ok = R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  REQUIRE_NOTHROW(SafetensorsFile(raw_file("ok.safetensors", ok, 16)));

  auto rejects = [](const fs::path& p, const std::string& message) {
    INFO(p.string());
    REQUIRE_THROWS_AS(SafetensorsFile(p), format_error);
    REQUIRE_THROWS_WITH(SafetensorsFile(p), Contains(message) && Contains(p.string()));
  };
  rejects(scratch("missing.safetensors"), "cannot open");
  rejects(raw_file("tiny.safetensors", "", 0, 0).replace_extension(".safetensors"), "header");
  {
    const fs::path p = scratch("short.safetensors");
    std::ofstream(p, std::ios::binary) << "abc";
    rejects(p, "is 3 bytes, smaller than the 8-byte header length");
  }
  rejects(raw_file("long_header.safetensors", ok, 16, 1 << 20), "header length 1048576 exceeds the");
  rejects(raw_file("bad_json.safetensors", R"({"w":{"dtype":"F32",)", 16), "header: malformed JSON");
  rejects(raw_file("not_object.safetensors", "[1,2]", 0), "not an object");
  rejects(raw_file("out_of_range.safetensors", R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})", 8),
          "data_offsets [0, 16] outside the 8-byte data section");
  rejects(raw_file("reversed.safetensors", R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8), "outside");
  rejects(raw_file("overlap.safetensors",
                   R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 16),
          "overlap");
  rejects(raw_file("dtype.safetensors", R"({"w":{"dtype":"I4","shape":[2],"data_offsets":[0,1]}})", 8),
          "has dtype 'I4', expected one of F32, F64, F16, BF16");
  rejects(raw_file("size.safetensors", R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
          "has 8 bytes, expected 12 for shape (3) of F32");
  rejects(raw_file("negative.safetensors", R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})", 0),
          "non-negative integers");
  rejects(raw_file("fields.safetensors", R"({"w":{"dtype":"F32"}})", 0), "needs dtype, shape and data_offsets");
  rejects(raw_file("huge.safetensors", R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0),
          "needs 2^64 or more");
  rejects(raw_file("meta.safetensors", R"({"__metadata__":{"a":1}})", 0), "is not a string");
}
