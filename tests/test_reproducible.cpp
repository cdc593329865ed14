// Bit-reproducibility whatever the heap's layout. Eigen's vectorised loops fuse multiply-adds in
// their body but not in the elements they peel before the first aligned address, so a buffer
// that only malloc aligns (16 bytes) rounds differently when it lands elsewhere: the same
// training run gave different losses from one process to the next. This program replaces the
// global operator new to put every plain allocation at a chosen offset from a 64-byte boundary;
// training must give identical bits at every offset.
#include <catch2/catch.hpp>

#include <moet/moet.hpp>

#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

namespace {
std::size_t g_offset = 0;  // bytes past a 64-byte boundary where the next allocation starts (a multiple of 16)

void* shifted_alloc(std::size_t size) {
  // room for the boundary, the offset and the header that remembers malloc's pointer
  auto* raw = static_cast<unsigned char*>(std::malloc(size + 64 + 64 + sizeof(void*)));
  if (!raw) throw std::bad_alloc();
  const auto base = (reinterpret_cast<std::uintptr_t>(raw) + sizeof(void*) + 63) & ~std::uintptr_t(63);
  auto* user = reinterpret_cast<unsigned char*>(base + g_offset);
  reinterpret_cast<void**>(user)[-1] = raw;
  return user;
}
void shifted_free(void* p) noexcept {
  if (p) std::free(static_cast<void**>(p)[-1]);
}
}  // namespace

void* operator new(std::size_t size) { return shifted_alloc(size); }
void* operator new[](std::size_t size) { return shifted_alloc(size); }
void operator delete(void* p) noexcept { shifted_free(p); }
void operator delete[](void* p) noexcept { shifted_free(p); }
void operator delete(void* p, std::size_t) noexcept { shifted_free(p); }
void operator delete[](void* p, std::size_t) noexcept { shifted_free(p); }
// The no-throw forms too: a library (or a sanitizer's runtime) that allocates with new(nothrow)
// and frees with plain delete must get both from the same allocator.
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return shifted_alloc(size);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, const std::nothrow_t& tag) noexcept { return operator new(size, tag); }
void operator delete(void* p, const std::nothrow_t&) noexcept { shifted_free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { shifted_free(p); }

using namespace moet;

TEST_CASE("Training gives the same bits wherever the heap puts the buffers", "[training]") {
  using Mix = Mixture<Router<Soft>, Expert<LoRA<4>>, 3>;
  auto train = [](std::size_t offset) {
    g_offset = offset;
    Rng rng(11);
    const Matrix<float> w0 = rng.normal_matrix<float>(64, 48, 0.0, 0.2);
    const Matrix<float> x = rng.normal_matrix<float>(40, 64), target = rng.normal_matrix<float>(40, 48);
    Mix::layer<float> layer(w0, rng, {});
    AdamW<float> optimizer({.lr = 1e-2, .weight_decay = 0.1});
    for (int step = 0; step < 3; ++step) {
      auto c = layer.forward(x);
      layer.backward(c, x, Matrix<float>(c.output() - target), overwrite);
      optimizer.step(layer);
    }
    std::vector<float> values;
    for_each_param(layer, [&](auto& p) {
      const Matrix<float> v = p.value();  // a view may be strided
      values.insert(values.end(), v.data(), v.data() + v.size());
    });
    g_offset = 0;
    return values;
  };
  const std::vector<float> aligned = train(0);
  for (std::size_t offset : {16, 32, 48}) {  // malloc promises 16
    const std::vector<float> shifted = train(offset);
    REQUIRE(shifted.size() == aligned.size());
    std::size_t differ = 0;
    for (std::size_t i = 0; i < aligned.size(); ++i) differ += shifted[i] != aligned[i];
    INFO("every allocation " << offset << " bytes past a 64-byte boundary: " << differ << " of " << aligned.size()
                             << " parameter values differ");
    REQUIRE(differ == 0);
  }
}
