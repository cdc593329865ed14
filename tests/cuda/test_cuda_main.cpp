// Catch's main for the CUDA tests that need a device: without one (no driver, no GPU) the
// program says why and exits with 77, which ctest reports as "Skipped" (SKIP_RETURN_CODE).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

#include <moet/cuda/context.hpp>

int main(int argc, char** argv) {
  if (const auto reason = moet::cuda_unavailable_reason()) {
    std::printf("SKIPPED: these tests need a CUDA device: %s\n", reason->c_str());
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
