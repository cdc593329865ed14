// libFuzzer harness: one .safetensors file, read as load_pretrained reads it (header, every
// tensor's bytes converted to float). A finding is a crash, a sanitizer report, a hang, an
// exception that is not a moet::error, or an allocation far beyond the input's size.
#include <sys/mman.h>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // An in-memory file (memfd): the reader maps it as it maps a checkpoint on disk.
  static const int fd = ::memfd_create("moet_fuzz_safetensors", 0);
  if (fd < 0 || ::ftruncate(fd, 0) != 0 || ::pwrite(fd, data, size, 0) != ssize_t(size)) __builtin_trap();
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  try {
    const moet::io::SafetensorsFile file(path);
    for (const auto& t : file.tensors()) {
      // Read whole tensors as the model does: 2-D as (rows, cols), others as one row.
      const moet::Index rows = t.shape.size() == 2 ? moet::Index(t.shape[0]) : 1;
      const moet::Index cols = t.shape.size() == 2 ? moet::Index(t.shape[1]) : moet::Index(t.elements());
      const auto m = file.matrix<float>(t.name, rows, cols);
      if (m.size() != t.elements()) __builtin_trap();
      (void)moet::io::require_finite<float>;  // linked in; checked by the checkpoint harness
    }
    (void)file.metadata();
  } catch (const moet::error&) {
  }
  return 0;
}
