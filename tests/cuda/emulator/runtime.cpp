// The runtime half of the host emulation of the CUDA backend (the device half is
// include/moet/cuda/kernels/emulation.cuh): the cudart and cuBLASLt entry points moet calls,
// defined here on the CPU so that `test_cuda_layers_emulated` links against this instead of
// libcudart and libcublasLt, plus the scheduler that runs a kernel's threads as fibers.
//
// What it checks beyond running the kernels: launch configurations (threads per block, grid
// limits, dynamic shared memory), cuBLASLt problem shapes (op(A), op(B), C agree; leading
// dimensions at least the rows; types), device memory that is read before it is written (fresh
// allocations and dynamic shared memory are 0xff bytes: NaN in every storage type), writes past
// the end of an allocation (a guard zone checked when it is freed and at every synchronisation),
// frees of pointers that were never allocated, and block barriers that can never complete.
// Everything runs synchronously: a kernel has finished when its launch returns.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <moet/cuda/kernels/emulation.cuh>
#include <moet/cuda/matmul_cache.hpp>  // pointer_alignment: the largest power of two up to 256 dividing an address
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#error "the CUDA emulation's fibers switch stacks with x86-64 code"
#endif

// --- fibers: a stack switch that saves the callee-saved registers (System V x86-64) -----------
extern "C" void moet_emulation_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl moet_emulation_switch
  .type moet_emulation_switch, @function
moet_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size moet_emulation_switch, .-moet_emulation_switch
)");

namespace moet::cuda_emulation {
namespace {

constexpr std::size_t stack_bytes = std::size_t(256) << 10;
constexpr int max_threads_per_block = 1024;
constexpr std::size_t default_dynamic_shared = std::size_t(48) << 10;

/// A fiber's stack: reserved, not committed (pages appear as the fiber touches them), with a
/// no-access page below it so that an overflow faults instead of overwriting a neighbour.
struct Stack {
  unsigned char* base = nullptr;  // the no-access page; the stack is the stack_bytes above it
  Stack() = default;
  Stack(Stack&& other) noexcept : base(std::exchange(other.base, nullptr)) {}
  Stack& operator=(Stack&& other) noexcept {
    std::swap(base, other.base);
    return *this;
  }
  ~Stack() {
    if (base) munmap(base, stack_bytes + std::size_t(sysconf(_SC_PAGESIZE)));
  }
  unsigned char* top() {
    const std::size_t guard = std::size_t(sysconf(_SC_PAGESIZE));
    if (!base) {
      void* m = mmap(nullptr, stack_bytes + guard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (m == MAP_FAILED || mprotect(m, guard, PROT_NONE) != 0) {
        std::fprintf(stderr, "moet CUDA emulation: cannot map a fiber stack\n");
        std::abort();
      }
      base = static_cast<unsigned char*>(m);
    }
    return base + guard + stack_bytes;
  }
};

struct Fiber {
  void* sp = nullptr;
  Stack stack;
  Coordinates where;
  int warp = 0, lane = 0;
  bool done = false;
  unsigned char shuffle[8] = {};
};

struct Barrier {
  int arrived = 0;
  std::uint64_t generation = 0;
};

/// The block that runs now (blocks run one after another; launches are not reentrant).
struct Block {
  std::vector<Fiber> fibers;
  int threads = 0;
  int live = 0;
  Barrier barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<int> warp_live;
  std::vector<unsigned char> shared;
  std::vector<int> order;      ///< the order the scheduler runs the threads in, shuffled per block
  std::mt19937 rng{20261124};  ///< fixed seed: every run schedules alike
  const std::function<void()>* body = nullptr;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  std::uint64_t progress = 0;  ///< bumped by every arrival, barrier release and exit
  std::string fault;           ///< what went wrong inside the kernel, if anything
};

Block block;
const char* running_kernel = nullptr;    // the kernel running now, for the fault handler
cudaError_t last_error = cudaSuccess;    // what cudaGetLastError returns (and clears)
cudaError_t sticky_error = cudaSuccess;  // a fault: every later synchronising call reports it

void record(cudaError_t status) { last_error = status; }

void fault(cudaError_t status, const std::string& what) {
  std::fprintf(stderr, "moet CUDA emulation: %s\n", what.c_str());
  if (sticky_error == cudaSuccess) sticky_error = status;
  record(status);
}

void yield() { moet_emulation_switch(&block.current->sp, block.scheduler_sp); }

/// Waits until every live thread of the group has arrived (`live` is re-read: exits count).
void wait(Barrier& barrier, const int& live, int expected = 0) {
  const std::uint64_t generation = barrier.generation;
  ++barrier.arrived;
  ++block.progress;
  for (;;) {
    if (barrier.generation != generation) return;
    if (barrier.arrived >= live) {
      // Released by exits rather than arrivals: some of the `expected` threads left without it.
      if (barrier.arrived < expected && block.fault.empty())
        block.fault = "a full-mask warp operation that " + std::to_string(expected - barrier.arrived) +
                      " lane(s) of the warp never reach (they exited)";
      barrier.arrived = 0;
      ++barrier.generation;
      ++block.progress;
      return;
    }
    yield();
  }
}

extern "C" [[noreturn]] void moet_emulation_fiber_entry() {
  Fiber& self = *block.current;
  (*block.body)();
  self.done = true;
  --block.live;
  --block.warp_live[std::size_t(self.warp)];
  ++block.progress;
  moet_emulation_switch(&self.sp, block.scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

void start(Fiber& fiber) {
  auto top = reinterpret_cast<std::uintptr_t>(fiber.stack.top()) & ~std::uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                               // keeps the entry's stack 16-byte aligned
  *--sp = reinterpret_cast<void*>(&moet_emulation_fiber_entry);  // where the first switch "returns" to
  for (int i = 0; i < 6; ++i) *--sp = nullptr;                   // rbp rbx r12 r13 r14 r15
  fiber.sp = sp;
  fiber.done = false;
}

std::string dims(dim3 d) { return std::to_string(d.x) + " x " + std::to_string(d.y) + " x " + std::to_string(d.z); }

/// Runs one block to the end; false (with block.fault set) when its threads deadlock.
bool run_block() {
  for (;;) {
    bool any = false;
    const std::uint64_t before = block.progress;
    for (const int i : block.order) {
      Fiber& fiber = block.fibers[std::size_t(i)];
      if (fiber.done) continue;
      any = true;
      block.current = &fiber;
      moet_emulation_switch(&block.scheduler_sp, fiber.sp);
      if (!block.fault.empty()) return false;
    }
    if (!any) return true;
    if (block.progress == before) {
      block.fault = std::string("the threads of the block wait at barriers that can never complete ") +
                    "(a __syncthreads or warp operation that not every live thread reaches)";
      return false;
    }
  }
}

}  // namespace

// --- device memory ------------------------------------------------------------------------------
namespace {

// Each allocation is an anonymous mapping of its own, [no-access page | data | no-access page],
// placed so that it ends at most 255 bytes before the trailing page (cudaMalloc aligns to 256):
// a read or write further past either end faults, and the SIGSEGV handler names the kernel and
// the allocation; the accessible slack on either side is filled with guard bytes, checked at
// every free and synchronisation, so smaller overruns that write are reported too.
constexpr unsigned char guard_value = 0xa5;
const std::size_t page = std::size_t(sysconf(_SC_PAGESIZE));

struct Allocation {
  unsigned char* base = nullptr;  ///< the mapping (starts with the no-access page)
  std::size_t mapped = 0;
  std::size_t size = 0;  ///< bytes asked for
  unsigned char* first() const { return base + page; }
  unsigned char* last() const { return base + mapped - page; }
};

std::map<const void*, Allocation>& allocations() {
  static std::map<const void*, Allocation> live;
  return live;
}

bool slack_intact(const void* p, const Allocation& a) {
  const auto* begin = static_cast<const unsigned char*>(p);
  for (const unsigned char* q = a.first(); q < begin; ++q)
    if (*q != guard_value) return false;
  for (const unsigned char* q = begin + a.size; q < a.last(); ++q)
    if (*q != guard_value) return false;
  return true;
}

void fill_slack(void* p, const Allocation& a) {
  auto* begin = static_cast<unsigned char*>(p);
  std::memset(a.first(), guard_value, std::size_t(begin - a.first()));
  std::memset(begin + a.size, guard_value, std::size_t(a.last() - (begin + a.size)));
}

/// Every live allocation's guard bytes; a write past an end is reported once, as a fault.
void check_guards() {
  for (const auto& [p, a] : allocations())
    if (!slack_intact(p, a)) {
      fault(cudaErrorIllegalAddress,
            "a kernel or copy wrote outside a " + std::to_string(a.size) + "-byte device allocation");
      fill_slack(const_cast<void*>(p), a);  // so that the same write is reported once
    }
}

struct sigaction previous_segv_action {};  // whoever handled SIGSEGV before the kernel started

void on_segfault(int, siginfo_t* info, void*) {
  const auto* address = static_cast<const unsigned char*>(info->si_addr);
  for (const auto& [p, a] : allocations()) {
    const auto* begin = static_cast<const unsigned char*>(p);
    if (address >= a.base && address < a.first())
      std::fprintf(stderr, "moet CUDA emulation: kernel %s accessed %td bytes before a %zu-byte device allocation\n",
                   running_kernel, begin - address, a.size);
    else if (address >= a.last() && address < a.base + a.mapped)
      std::fprintf(stderr,
                   "moet CUDA emulation: kernel %s accessed %td bytes past the end of a %zu-byte device allocation\n",
                   running_kernel, address - (begin + a.size), a.size);
    else
      continue;
    break;
  }
  // Returning re-runs the access, which the previous handler (a test framework's, or the
  // default) then reports.
  sigaction(SIGSEGV, &previous_segv_action, nullptr);
}

/// Kernels run with on_segfault installed, so that a fault names the kernel and the allocation.
struct FaultHandlerScope {
  FaultHandlerScope() {
    struct sigaction action {};
    action.sa_sigaction = on_segfault;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous_segv_action);
  }
  ~FaultHandlerScope() { sigaction(SIGSEGV, &previous_segv_action, nullptr); }
  FaultHandlerScope(const FaultHandlerScope&) = delete;
  FaultHandlerScope& operator=(const FaultHandlerScope&) = delete;
};

cudaError_t allocate(void** p, std::size_t size) {
  if (p == nullptr) return cudaErrorInvalidValue;
  if (size > (std::size_t(1) << 36)) {  // more than the 64 GiB this emulated device pretends to have
    *p = nullptr;
    return cudaErrorMemoryAllocation;
  }
  const std::size_t data = (size + 255) / 256 * 256, span = (data + page - 1) / page * page;
  Allocation a;
  a.mapped = span + 2 * page;
  void* mapping = mmap(nullptr, a.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping == MAP_FAILED) return cudaErrorMemoryAllocation;
  a.base = static_cast<unsigned char*>(mapping);
  a.size = size;
  if (mprotect(a.base, page, PROT_NONE) != 0 || mprotect(a.last(), page, PROT_NONE) != 0) {
    munmap(mapping, a.mapped);
    return cudaErrorMemoryAllocation;
  }
  unsigned char* begin = a.last() - data;
  std::memset(begin, 0xff, size);
  fill_slack(begin, a);
  allocations()[begin] = a;
  *p = begin;
  return cudaSuccess;
}

cudaError_t release(void* p) {
  if (p == nullptr) return cudaSuccess;
  auto found = allocations().find(p);
  if (found == allocations().end()) {
    std::fprintf(stderr, "moet CUDA emulation: free of %p, which is not a device allocation\n", p);
    return cudaErrorInvalidValue;
  }
  const Allocation a = found->second;
  if (!slack_intact(p, a))
    fault(cudaErrorIllegalAddress, "a kernel or copy wrote outside a " + std::to_string(a.size) +
                                       "-byte device allocation (found when it was freed)");
  allocations().erase(found);
  munmap(a.base, a.mapped);
  return cudaSuccess;
}

struct StreamObject {
  int unused = 0;
};

}  // namespace

void clear_faults() {
  sticky_error = cudaSuccess;
  last_error = cudaSuccess;
}

const Coordinates& coordinates() { return block.current->where; }

void sync_block() { wait(block.barrier, block.live); }

void sync_warp() {
  const Fiber& self = *block.current;
  const auto w = std::size_t(self.warp);
  // moet's warp operations all use the full mask: every lane of the warp must take part.
  wait(block.warp_barriers[w], block.warp_live[w], std::min(32, block.threads - 32 * self.warp));
}

void exchange_xor(const void* value, void* out, std::size_t bytes, int lane_mask) {
  Fiber& self = *block.current;
  std::memcpy(self.shuffle, value, bytes);
  sync_warp();
  const int source = self.warp * 32 + ((self.lane ^ lane_mask) & 31);
  if (source >= block.threads || block.fibers[std::size_t(source)].done) {
    block.fault = "a warp shuffle reads lane " + std::to_string(source % 32) + ", which does not run (block of " +
                  std::to_string(block.threads) + " threads)";
    std::memcpy(out, self.shuffle, bytes);
  } else {
    std::memcpy(out, block.fibers[std::size_t(source)].shuffle, bytes);
  }
  sync_warp();
}

/// Aligned to 128 bytes, as a device's shared memory window is (wmma wants 32).
void* dynamic_shared() {
  const auto p = reinterpret_cast<std::uintptr_t>(block.shared.data());
  return reinterpret_cast<void*>((p + 127) & ~std::uintptr_t(127));
}

int lane() { return block.current->lane; }

void kernel_fault(const char* what) {
  if (block.fault.empty()) block.fault = what;
}

bool is_device_pointer(const void* p) {
  if (p == nullptr) return true;
  auto after = allocations().upper_bound(p);
  if (after == allocations().begin()) return false;
  const auto& [begin, a] = *std::prev(after);
  return static_cast<const unsigned char*>(p) <= static_cast<const unsigned char*>(begin) + a.size;
}

void host_pointer_argument(const char* kernel, int index) {
  fault(cudaErrorIllegalAddress, "kernel " + std::string(kernel) + ": argument " + std::to_string(index) +
                                     " is a pointer outside every device allocation (host memory?)");
}

cudaError_t run(const char* kernel, dim3 grid, dim3 threads, std::size_t shared_bytes, cudaStream_t /*stream*/,
                const std::function<void()>& body) {
  const std::uint64_t count = std::uint64_t(threads.x) * threads.y * threads.z;
  std::string invalid;
  if (count == 0 || count > max_threads_per_block || threads.z > 64)
    invalid = "block of " + dims(threads) + " threads (at most 1024, z at most 64)";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    invalid = "grid of " + dims(grid) + " blocks (x 1 .. 2^31 - 1, y and z 1 .. 65535)";
  if (!invalid.empty()) {
    std::fprintf(stderr, "moet CUDA emulation: launch of %s with a %s\n", kernel, invalid.c_str());
    record(cudaErrorInvalidConfiguration);
    return cudaErrorInvalidConfiguration;
  }
  if (shared_bytes > default_dynamic_shared) {
    std::fprintf(stderr,
                 "moet CUDA emulation: launch of %s asks for %zu bytes of dynamic shared memory (48 KiB without "
                 "cudaFuncSetAttribute)\n",
                 kernel, shared_bytes);
    record(cudaErrorInvalidValue);
    return cudaErrorInvalidValue;
  }
  const int n = int(count), warps = (n + 31) / 32;
  running_kernel = kernel;
  const FaultHandlerScope fault_handler;
  if (block.fibers.size() < std::size_t(n)) block.fibers.resize(std::size_t(n));
  block.threads = n;
  block.body = &body;
  block.fault.clear();
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block.shared.assign(shared_bytes + 16 + 128, 0xff);  // + the alignment
        block.barrier = Barrier{};
        block.live = n;
        block.warp_barriers.assign(std::size_t(warps), Barrier{});
        block.warp_live.assign(std::size_t(warps), 32);
        block.warp_live.back() = n - 32 * (warps - 1);
        for (int i = 0; i < n; ++i) {
          Fiber& fiber = block.fibers[std::size_t(i)];
          fiber.where.thread = uint3{unsigned(i) % threads.x, unsigned(i) / threads.x % threads.y,
                                     unsigned(i) / (threads.x * threads.y)};
          fiber.where.block = uint3{bx, by, bz};
          fiber.where.block_dim = threads;
          fiber.where.grid_dim = grid;
          fiber.warp = i / 32;
          fiber.lane = i % 32;
          start(fiber);
        }
        block.order.resize(std::size_t(n));
        std::iota(block.order.begin(), block.order.end(), 0);
        std::shuffle(block.order.begin(), block.order.end(), block.rng);
        if (!run_block()) {
          fault(cudaErrorLaunchFailure, "kernel " + std::string(kernel) + ", block (" + std::to_string(bx) + ", " +
                                            std::to_string(by) + ", " + std::to_string(bz) + "): " + block.fault);
          block.current = nullptr;
          running_kernel = nullptr;
          return cudaErrorLaunchFailure;
        }
      }
  block.current = nullptr;
  running_kernel = nullptr;
  return cudaSuccess;
}

}  // namespace moet::cuda_emulation

using namespace moet::cuda_emulation;

// --- cudart -------------------------------------------------------------------------------------
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof prop->name, "moet host emulation of a CUDA device");
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 1;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->sharedMemPerBlock = default_dynamic_shared;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  const cudaError_t status = last_error;
  last_error = sticky_error;
  return status;
}
cudaError_t cudaPeekAtLastError() { return last_error; }
const char* cudaGetErrorName(cudaError_t status) {
#define MOET_EMULATED_ERROR(name) \
  { name, #name }
  static const std::pair<cudaError_t, const char*> names[] = {MOET_EMULATED_ERROR(cudaSuccess),
                                                              MOET_EMULATED_ERROR(cudaErrorInvalidValue),
                                                              MOET_EMULATED_ERROR(cudaErrorMemoryAllocation),
                                                              MOET_EMULATED_ERROR(cudaErrorInvalidConfiguration),
                                                              MOET_EMULATED_ERROR(cudaErrorInvalidDevice),
                                                              MOET_EMULATED_ERROR(cudaErrorInvalidPitchValue),
                                                              MOET_EMULATED_ERROR(cudaErrorLaunchFailure),
                                                              MOET_EMULATED_ERROR(cudaErrorIllegalAddress)};
#undef MOET_EMULATED_ERROR
  for (const auto& [code, name] : names)
    if (code == status) return name;
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t status) {
  switch (status) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument (emulated)";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure (emulated; see the message above)";
    case cudaErrorIllegalAddress:
      return "an illegal memory access was encountered (emulated; see the message above)";
    default:
      return "error reported by the moet CUDA emulation";
  }
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int /*flags*/) {
  *stream = reinterpret_cast<cudaStream_t>(new StreamObject);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete reinterpret_cast<StreamObject*>(stream);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t /*stream*/) {
  check_guards();
  return sticky_error;
}
cudaError_t cudaDeviceSynchronize() {
  check_guards();
  return sticky_error;
}

// Events: host timestamps (everything has finished when a call returns).
namespace {
struct EventObject {
  std::chrono::steady_clock::time_point at = std::chrono::steady_clock::now();
};
}  // namespace
cudaError_t cudaEventCreate(cudaEvent_t* event) {
  *event = reinterpret_cast<cudaEvent_t>(new EventObject);
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete reinterpret_cast<EventObject*>(event);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t /*stream*/) {
  reinterpret_cast<EventObject*>(event)->at = std::chrono::steady_clock::now();
  return sticky_error;
}
cudaError_t cudaEventSynchronize(cudaEvent_t /*event*/) {
  check_guards();
  return sticky_error;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  *ms = std::chrono::duration<float, std::milli>(reinterpret_cast<EventObject*>(end)->at -
                                                 reinterpret_cast<EventObject*>(start)->at)
            .count();
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** p, std::size_t size) { return allocate(p, size); }
cudaError_t cudaMallocAsync(void** p, std::size_t size, cudaStream_t /*stream*/) { return allocate(p, size); }
cudaError_t cudaFree(void* p) { return release(p); }
cudaError_t cudaFreeAsync(void* p, cudaStream_t /*stream*/) { return release(p); }
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device) {
  static int the_pool;
  *pool = reinterpret_cast<cudaMemPool_t>(&the_pool);
  return device == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t /*pool*/, cudaMemPoolAttr /*attr*/, void* /*value*/) {
  return cudaSuccess;
}
cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t /*pool*/, cudaMemPoolAttr attr, void* value) {
  // The pool's statistics are not kept here: every size attribute reads 0.
  if (attr == cudaMemPoolReuseFollowEventDependencies || attr == cudaMemPoolReuseAllowOpportunistic ||
      attr == cudaMemPoolReuseAllowInternalDependencies)
    *static_cast<int*>(value) = 0;
  else
    *static_cast<std::uint64_t*>(value) = 0;
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind /*kind*/) {
  if (bytes) std::memmove(dst, src, bytes);
  return sticky_error;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t /*stream*/) {
  return cudaMemcpy(dst, src, bytes, kind);
}
cudaError_t cudaMemcpy2DAsync(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width,
                              std::size_t height, cudaMemcpyKind /*kind*/, cudaStream_t /*stream*/) {
  if (height > 1 && (width > dpitch || width > spitch)) return cudaErrorInvalidPitchValue;
  for (std::size_t r = 0; r < height; ++r)
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, std::size_t bytes) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t /*stream*/) {
  return cudaMemset(p, value, bytes);
}
cudaError_t cudaMemset2DAsync(void* p, std::size_t pitch, int value, std::size_t width, std::size_t height,
                              cudaStream_t /*stream*/) {
  if (height > 1 && width > pitch) return cudaErrorInvalidPitchValue;
  for (std::size_t r = 0; r < height; ++r) std::memset(static_cast<char*>(p) + r * pitch, value, width);
  return cudaSuccess;
}

// --- cuBLASLt: the matmul moet uses, computed in double on the CPU ------------------------------
struct cublasLtContext {
  int unused = 0;
};

namespace {

struct MatmulDesc {
  cublasComputeType_t compute;
  cudaDataType_t scale;
  cublasOperation_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_N;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
};

struct Layout {
  cudaDataType_t type;
  std::uint64_t rows, cols;
  std::int64_t ld;
  std::int32_t batch = 1;     // CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT
  std::int64_t stride = 0;    // CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, in elements
};

/// CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES (uint32_t, 256 unless set).
struct Preference {
  std::uint32_t align[4] = {256, 256, 256, 256};
};

/// What an emulated algorithm assumes, kept in cublasLtMatmulAlgo_t's opaque words: the
/// alignments (bytes) of A, B, C, D and the bias it was chosen for, after a marker. cublasLtMatmul
/// refuses operands less aligned than that, where the device would fault ("misaligned address").
constexpr std::uint64_t algo_marker = 0x6d6f6574616c676fULL;  // "moetalgo"


MatmulDesc& get(cublasLtMatmulDesc_t d) { return *reinterpret_cast<MatmulDesc*>(d); }
const Layout& get(cublasLtMatrixLayout_t l) { return *reinterpret_cast<const Layout*>(l); }

bool supported(cudaDataType_t t) { return t == CUDA_R_32F || t == CUDA_R_16BF || t == CUDA_R_16F; }

std::size_t element_bytes(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

/// Whether every element of every matrix of the batch lies in device memory: the first one and
/// one past the last one of the last matrix are inside a live allocation.
bool in_device_memory(const void* p, const Layout& l) {
  if (!is_device_pointer(p)) return false;
  const std::int64_t last = std::int64_t(l.batch - 1) * l.stride + std::int64_t(l.cols - 1) * l.ld + std::int64_t(l.rows);
  return is_device_pointer(static_cast<const char*>(p) + last * std::int64_t(element_bytes(l.type)));
}

double load(const void* p, cudaDataType_t t, std::int64_t i) {
  switch (t) {
    case CUDA_R_32F:
      return static_cast<const float*>(p)[i];
    case CUDA_R_16BF:
      return double(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    default:
      return double(__half2float(static_cast<const __half*>(p)[i]));
  }
}

void store(void* p, cudaDataType_t t, std::int64_t i, double v) {
  switch (t) {
    case CUDA_R_32F:
      static_cast<float*>(p)[i] = float(v);
      break;
    case CUDA_R_16BF:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(float(v));
      break;
    default:
      static_cast<__half*>(p)[i] = __float2half_rn(float(v));
      break;
  }
}

/// A descriptor attribute set from (buf, bytes), as cuBLASLt does: refused when buf is null or
/// its size is not the attribute's.
template <class Field>
cublasStatus_t set_attribute(Field& field, const void* buf, std::size_t bytes) {
  if (buf == nullptr || bytes != sizeof field) return CUBLAS_STATUS_INVALID_VALUE;
  std::memcpy(&field, buf, bytes);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t invalid(const std::string& why) {
  std::fprintf(stderr, "moet CUDA emulation: cublasLtMatmul: %s\n", why.c_str());
  return CUBLAS_STATUS_INVALID_VALUE;
}

/// The problem of desc and the layouts, checked: D (m x n) = op(A) (m x k) op(B) (k x n).
cublasStatus_t shape(const MatmulDesc& desc, const Layout& a, const Layout& b, const Layout& c, const Layout& d,
                     std::int64_t& m, std::int64_t& n, std::int64_t& k) {
  if (desc.compute != CUBLAS_COMPUTE_32F || desc.scale != CUDA_R_32F)
    return invalid("only CUBLAS_COMPUTE_32F with float scales is emulated");
  m = std::int64_t(desc.trans_a == CUBLAS_OP_N ? a.rows : a.cols);
  k = std::int64_t(desc.trans_a == CUBLAS_OP_N ? a.cols : a.rows);
  const auto kb = std::int64_t(desc.trans_b == CUBLAS_OP_N ? b.rows : b.cols);
  n = std::int64_t(desc.trans_b == CUBLAS_OP_N ? b.cols : b.rows);
  if (k != kb || std::int64_t(c.rows) != m || std::int64_t(c.cols) != n || d.rows != c.rows || d.cols != c.cols)
    return invalid("op(A) " + std::to_string(m) + " x " + std::to_string(k) + ", op(B) " + std::to_string(kb) + " x " +
                   std::to_string(n) + ", C " + std::to_string(c.rows) + " x " + std::to_string(c.cols));
  for (const Layout* l : {&a, &b, &c, &d})
    if (l->ld < std::int64_t(l->rows) || l->ld < 1 || !supported(l->type))
      return invalid("a layout with ld " + std::to_string(l->ld) + " < rows " + std::to_string(l->rows) +
                     " or an unsupported type");
  if (a.type != b.type || c.type != d.type) return invalid("A and B (or C and D) of different types");
  for (const Layout* l : {&a, &b, &c, &d}) {
    if (l->batch != d.batch) return invalid("operands with batch counts " + std::to_string(l->batch) + " and " + std::to_string(d.batch));
    if (l->batch < 1 || l->stride < 0) return invalid("a batch count below 1 or a negative batch stride");
  }
  // D's matrices must not overlap (a write would race on the device).
  if (d.batch > 1 && d.stride < std::int64_t(d.cols - 1) * d.ld + std::int64_t(d.rows))
    return invalid("D's batch stride " + std::to_string(d.stride) + " overlaps its matrices");
  if (desc.epilogue != CUBLASLT_EPILOGUE_DEFAULT && desc.epilogue != CUBLASLT_EPILOGUE_BIAS)
    return invalid("only the default and BIAS epilogues are emulated");
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
  *handle = new cublasLtContext;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}
const char* cublasLtGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    default:
      return "CUBLAS_STATUS_(emulated)";
  }
}
const char* cublasLtGetStatusString(cublasStatus_t status) {
  return status == CUBLAS_STATUS_SUCCESS ? "success" : "error reported by the moet CUDA emulation";
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t compute, cudaDataType_t scale) {
  *desc = reinterpret_cast<cublasLtMatmulDesc_t>(new MatmulDesc{compute, scale});
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  delete reinterpret_cast<MatmulDesc*>(desc);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                              const void* buf, std::size_t bytes) {
  MatmulDesc& d = get(desc);
  auto copy = [&](auto& field) { return set_attribute(field, buf, bytes); };
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
      return copy(d.trans_a);
    case CUBLASLT_MATMUL_DESC_TRANSB:
      return copy(d.trans_b);
    case CUBLASLT_MATMUL_DESC_EPILOGUE:
      return copy(d.epilogue);
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
      return copy(d.bias);
    default:
      return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType type, std::uint64_t rows,
                                          std::uint64_t cols, std::int64_t ld) {
  *layout = reinterpret_cast<cublasLtMatrixLayout_t>(new Layout{type, rows, cols, ld});
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout, cublasLtMatrixLayoutAttribute_t attr,
                                                const void* buf, std::size_t bytes) {
  Layout& l = *reinterpret_cast<Layout*>(layout);
  auto copy = [&](auto& field) { return set_attribute(field, buf, bytes); };
  switch (attr) {
    case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT:
      return copy(l.batch);
    case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET:
      return copy(l.stride);
    default:
      return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  delete reinterpret_cast<Layout*>(layout);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* preference) {
  *preference = reinterpret_cast<cublasLtMatmulPreference_t>(new Preference);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t preference) {
  delete reinterpret_cast<Preference*>(preference);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t preference,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
                                                    std::size_t bytes) {
  Preference& p = *reinterpret_cast<Preference*>(preference);
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: {
      std::uint64_t unused = 0;
      return set_attribute(unused, buf, bytes);
    }
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
      return set_attribute(p.align[0], buf, bytes);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
      return set_attribute(p.align[1], buf, bytes);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
      return set_attribute(p.align[2], buf, bytes);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES:
      return set_attribute(p.align[3], buf, bytes);
    default:
      return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                              cublasLtMatrixLayout_t d, cublasLtMatmulPreference_t preference,
                                              int requested, cublasLtMatmulHeuristicResult_t results[], int* returned) {
  std::int64_t m = 0, n = 0, k = 0;
  const cublasStatus_t status = shape(get(desc), get(a), get(b), get(c), get(d), m, n, k);
  if (status != CUBLAS_STATUS_SUCCESS) return status;
  if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
  const Preference& p = *reinterpret_cast<const Preference*>(preference);
  results[0] = cublasLtMatmulHeuristicResult_t{};
  results[0].workspaceSize = 0;
  results[0].state = CUBLAS_STATUS_SUCCESS;
  // The algorithm assumes the preference's alignments and the alignment of the bias pointer the
  // descriptor holds now (cublasLt.h: the heuristic depends on its value; null looks fully aligned).
  std::uint64_t* words = results[0].algo.data;
  words[0] = algo_marker;
  for (int i = 0; i < 4; ++i) words[1 + i] = p.align[i];
  words[5] = std::uint64_t(moet::cuda_impl::pointer_alignment(get(desc).bias));  // null: 256
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t desc_, const void* alpha_, const void* A,
                              cublasLtMatrixLayout_t a_, const void* B, cublasLtMatrixLayout_t b_, const void* beta_,
                              const void* C, cublasLtMatrixLayout_t c_, void* D, cublasLtMatrixLayout_t d_,
                              const cublasLtMatmulAlgo_t* algo, void*, std::size_t, cudaStream_t) {
  const MatmulDesc& desc = get(desc_);
  const Layout &a = get(a_), &b = get(b_), &c = get(c_), &d = get(d_);
  std::int64_t m = 0, n = 0, k = 0;
  const cublasStatus_t status = shape(desc, a, b, c, d, m, n, k);
  if (status != CUBLAS_STATUS_SUCCESS) return status;
  if (desc.epilogue == CUBLASLT_EPILOGUE_BIAS && desc.bias == nullptr)
    return invalid("BIAS epilogue without a bias pointer");
  // No algorithm: cuBLASLt runs the heuristic itself, on these pointers. Else one of ours.
  if (algo && algo->data[0] != algo_marker) return invalid("an algorithm that cublasLtMatmulAlgoGetHeuristic did not return");
  if (algo) {
    const char* names[] = {"A", "B", "C", "D"};
    const void* pointers[] = {A, B, C, D};
    const Layout* layouts[] = {&a, &b, &c, &d};
    for (int i = 0; i < 4; ++i) {
      const Layout& l = *layouts[i];
      const std::int64_t stride_bytes = l.batch > 1 ? l.stride * std::int64_t(element_bytes(l.type)) : 0;
      const std::uint64_t has = std::uint64_t(moet::cuda_impl::pointer_alignment(pointers[i], stride_bytes));
      if (has < algo->data[1 + i])
        return invalid(std::string("operand ") + names[i] + " is " + std::to_string(has) + "-byte aligned, the algorithm assumes " +
                       std::to_string(algo->data[1 + i]) + " (the device would fault: misaligned address)");
    }
    const std::uint64_t bias_alignment = std::uint64_t(moet::cuda_impl::pointer_alignment(desc.bias));
    if (bias_alignment < algo->data[5])
      return invalid("the bias is " + std::to_string(bias_alignment) + "-byte aligned, the algorithm was chosen for " +
                     std::to_string(algo->data[5]) + " (the device would fault: misaligned address)");
  }
  for (auto [p, l] : {std::pair{A, &a}, {B, &b}, {C, &c}, {static_cast<const void*>(D), &d}})
    if (!in_device_memory(p, *l)) return invalid("an operand is not (wholly) in device memory");
  if (desc.bias && !is_device_pointer(desc.bias)) return invalid("the bias is not in device memory");
  const double alpha = *static_cast<const float*>(alpha_), beta = *static_cast<const float*>(beta_);
  // op(A) column-major (m x k) and op(B) (k x n), in double.
  std::vector<double> op_a(static_cast<std::size_t>(m * k)), op_b(static_cast<std::size_t>(k * n)),
      column(static_cast<std::size_t>(m));
  for (std::int32_t batch = 0; batch < d.batch; ++batch) {
    auto at = [&](const void* p, const Layout& l) {
      return static_cast<const char*>(p) + std::int64_t(batch) * l.stride * std::int64_t(element_bytes(l.type));
    };
    const void *Ab = at(A, a), *Bb = at(B, b), *Cb = at(C, c);
    void* Db = const_cast<char*>(at(D, d));
    for (std::int64_t kk = 0; kk < k; ++kk)
      for (std::int64_t i = 0; i < m; ++i)
        op_a[std::size_t(i + kk * m)] = load(Ab, a.type, desc.trans_a == CUBLAS_OP_N ? i + kk * a.ld : kk + i * a.ld);
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t kk = 0; kk < k; ++kk)
        op_b[std::size_t(kk + j * k)] = load(Bb, b.type, desc.trans_b == CUBLAS_OP_N ? kk + j * b.ld : j + kk * b.ld);
    for (std::int64_t j = 0; j < n; ++j) {
      std::fill(column.begin(), column.end(), 0.0);
      for (std::int64_t kk = 0; kk < k; ++kk) {
        const double bv = op_b[std::size_t(kk + j * k)];
        const double* ac = op_a.data() + kk * m;
        for (std::int64_t i = 0; i < m; ++i) column[std::size_t(i)] += ac[i] * bv;
      }
      for (std::int64_t i = 0; i < m; ++i) {
        double v = alpha * column[std::size_t(i)];
        if (beta != 0.0) v += beta * load(Cb, c.type, i + j * c.ld);
        if (desc.epilogue == CUBLASLT_EPILOGUE_BIAS) v += load(desc.bias, d.type, i);
        store(Db, d.type, i + j * d.ld, v);
      }
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}
