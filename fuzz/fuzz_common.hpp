// What the fuzz harnesses share: splitting one input into the files of a folder, writing them
// where moet reads them, and the small model the adapter harness loads into (the seed maker
// saves from the same model, so the seeds are files moet itself writes).
//
// An input of several files is their contents joined by the separator line below; a harness
// takes the first sections it needs and ignores the rest. The dictionary (moet.dict) holds the
// separator, so the fuzzer can make and remove sections.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include <moet/models.hpp>

namespace moet::fuzz {

inline constexpr std::string_view separator = "\n@@moet-file@@\n";

inline std::vector<std::string> sections(const std::uint8_t* data, std::size_t size) {
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> out;
  std::size_t at = 0;
  while (true) {
    const std::size_t next = all.find(separator, at);
    out.emplace_back(all.substr(at, next == std::string_view::npos ? std::string_view::npos : next - at));
    if (next == std::string_view::npos) return out;
    at = next + separator.size();
  }
}

inline std::string join(const std::vector<std::string>& files) {
  std::string out;
  for (std::size_t i = 0; i < files.size(); ++i) out += (i ? std::string(separator) : std::string()) + files[i];
  return out;
}

inline std::filesystem::path process_folder() {
  return std::filesystem::temp_directory_path() / ("moet_fuzz_" + std::to_string(::getpid()));
}
struct FolderCleanup {
  ~FolderCleanup() {
    std::error_code ignored;
    std::filesystem::remove_all(process_folder(), ignored);
  }
};
inline FolderCleanup folder_cleanup;  // removes this process's folders when it ends normally

/// A folder of this process's own (removed and made again for every input).
inline std::filesystem::path fresh_folder(const char* name) {
  namespace fs = std::filesystem;
  const fs::path dir = process_folder() / name;
  std::error_code ec;
  fs::remove_all(dir, ec);
  fs::create_directories(dir);
  return dir;
}

inline void write_file(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// --- the adapter harness's model ------------------------------------------------------------

using AdapterModel = Decoder<GPT2, Slots<at<slot::q, MoLoRA<3, 2>>, at<slot::keys, MoV<2>, layers<1>>,
                                         at<slot::ffn_up, Mixture<Router<TopK<1>>, Expert<LoRA<2>>, 2>, layers<0>>>>;

inline io::ModelConfig adapter_model_config() {
  io::ModelConfig c;
  c.architecture = io::Architecture::gpt2;
  c.vocab = 11, c.d_model = 8, c.layers = 2, c.heads = 2, c.kv_heads = 2, c.d_ff = 12, c.max_positions = 8;
  return c;
}

inline const TokenBatch& probe_batch() {
  static const TokenBatch b{1, 4, {1, 5, 2, 9}, {}, {}};
  return b;
}

}  // namespace moet::fuzz
