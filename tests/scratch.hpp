// A scratch folder per test program and process under the temporary directory, removed when the
// program ends; the tests that write files make their folders in it.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <string>
#include <system_error>

namespace moet::testing {

inline std::filesystem::path scratch_root() {
  return std::filesystem::temp_directory_path() / ("moet_test_" + std::to_string(::getpid()));
}

struct ScratchCleanup {
  ~ScratchCleanup() {
    std::error_code ignored;
    std::filesystem::remove_all(scratch_root(), ignored);
  }
};
inline ScratchCleanup scratch_cleanup;  // one per program

/// The folder `name` in this program's scratch root, made if missing.
inline std::filesystem::path scratch_folder(const std::string& name) {
  const std::filesystem::path p = scratch_root() / name;
  std::filesystem::create_directories(p);
  return p;
}

}  // namespace moet::testing
