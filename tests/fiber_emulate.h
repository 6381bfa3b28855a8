// fiber_emulate.h — the host runtime shared by the CPU emulators of the CUDA kernels
// (tests/decode_emulate.cpp, tests/flash_bwd_emulate.cpp, tests/rms_norm_emulate.cpp; the
// last one also uses the CUDA runtime API stand-ins at the end of this file).
//
// Why it exists: both emulators compile real kernel code (csrc/cuda/*.cuh) with g++ and run
// every CUDA thread of a block as a fiber (ucontext), so that the kernels' own control flow,
// barriers and warp collectives run as written. The fiber scheduler, the block / warp
// barriers, the per-lane exchange slots behind the warp collectives and the cp.async copy
// queues were two copies of the same code; they live here once. What differs between the
// emulators stays in each one: the 16-bit types, the kernel-facing cp.async / commit / wait
// functions and their checks, ldmatrix / mma, the shared-memory macro and the driver.
//
// Torch-free host C++17. An emulator includes this header first, defines the CUDA surface
// its kernels need on top of it, then includes its kernel header, and must define
//   void emu::fail(const char* what);
// which is how it reports an emulation error (record it and carry on, or print and exit).
//
// emu::g_mode, set by the emulator before it launches anything:
//   bit 0: a cp.async copy lands only when the kernel waits for it (the latest moment the PTX
//          ISA allows, so a read of data that was not waited for sees stale bytes); otherwise
//          it lands at issue (the earliest, so a refill of a buffer other warps still read
//          shows up). The copies themselves are queued here (emu::queue_copy); when a wait
//          retires them is up to the emulator's cp.async functions.
//   bit 1: the fibers of a block are scheduled in reverse order.
// Shared memory is filled with NaN bytes (0xff) at every block start, plus 16 bytes of slack.
#pragma once

#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3_ {
  unsigned x = 0, y = 0, z = 0;
};

namespace emu {

void fail(const char* what);  // defined by each emulator

// One cp.async: `bytes` from `src` to shared-memory offset `dst`, or zeros when !pred.
struct Copy {
  uint32_t dst;
  const void* src;
  int bytes;
  bool pred;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  std::vector<Copy> open;                 // issued, not yet performed or committed (mode bit 0)
  std::vector<std::vector<Copy>> groups;  // committed, not yet retired (mode bit 0)
};

inline int g_mode = 0;
inline std::size_t g_stack_bytes = 128 * 1024;  // per fiber; set before the first launch

struct Warp {
  int count = 0;
  long gen = 0;
  uint32_t slot[32][12];  // per lane: the registers a warp collective exchanges
};

struct Block {
  dim3_ block_idx, grid_dim, block_dim;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  int cur = -1;
  ucontext_t sched;
  int bar_count = 0;
  long bar_gen = 0;
  Warp warps[32];
  std::vector<unsigned char> smem;
  const std::function<void()>* body = nullptr;
};

inline Block* g_block = nullptr;

inline void yield() {
  Block& b = *g_block;
  swapcontext(&b.fibers[b.cur].ctx, &b.sched);
}
inline int tid() { return g_block->cur; }
inline int lane() { return tid() % 32; }
inline Fiber& my_fiber() { return g_block->fibers[tid()]; }
inline unsigned char* smem_base() { return g_block->smem.data(); }
inline uint32_t smem_offset(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - smem_base());
}

inline void block_barrier() {
  Block& b = *g_block;
  const long gen = b.bar_gen;
  if (++b.bar_count == b.nthreads) {
    b.bar_count = 0;
    ++b.bar_gen;
    return;
  }
  while (b.bar_gen == gen) yield();
}
inline void warp_barrier() {
  Warp& w = g_block->warps[tid() / 32];
  const long gen = w.gen;
  if (++w.count == 32) {
    w.count = 0;
    ++w.gen;
    return;
  }
  while (w.gen == gen) yield();
}
inline uint32_t (&my_slot())[12] { return g_block->warps[tid() / 32].slot[lane()]; }
inline const uint32_t (&slot_of(int l))[12] { return g_block->warps[tid() / 32].slot[l]; }

inline void do_copy(const Copy& c) {
  if (c.pred)
    std::memcpy(smem_base() + c.dst, c.src, c.bytes);
  else
    std::memset(smem_base() + c.dst, 0, c.bytes);
}
// A checked cp.async: performed now, or (mode bit 0) queued on this fiber's open group.
inline void queue_copy(const Copy& c) {
  if (g_mode & 1)
    my_fiber().open.push_back(c);
  else
    do_copy(c);
}

inline void trampoline() {
  (*g_block->body)();
  Fiber& f = g_block->fibers[g_block->cur];
  if (!f.open.empty() || !f.groups.empty()) fail("thread exited with cp.async copies never waited for");
  f.done = true;
}

// Run `body` on grid[0] x grid[1] x grid[2] blocks of `threads` fibers, block after block.
inline void launch(const int64_t (&grid)[3], int threads, std::size_t smem_bytes,
                   const std::function<void()>& body) {
  static std::vector<std::vector<char>> stacks;  // reused across blocks and launches
  for (int64_t z = 0; z < grid[2]; ++z)
    for (int64_t y = 0; y < grid[1]; ++y)
      for (int64_t x = 0; x < grid[0]; ++x) {
        Block b;
        b.block_idx = {unsigned(x), unsigned(y), unsigned(z)};
        b.grid_dim = {unsigned(grid[0]), unsigned(grid[1]), unsigned(grid[2])};
        b.block_dim = {unsigned(threads), 1, 1};
        b.nthreads = threads;
        b.smem.assign(smem_bytes + 16, 0xff);  // NaN poison
        b.body = &body;
        b.fibers.resize(threads);
        g_block = &b;
        if (int(stacks.size()) < threads) stacks.resize(threads);
        for (int t = 0; t < threads; ++t) {
          Fiber& f = b.fibers[t];
          if (stacks[t].empty()) stacks[t].resize(g_stack_bytes);
          f.stack.swap(stacks[t]);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &b.sched;
          makecontext(&f.ctx, trampoline, 0);
        }
        for (bool any = true; any;) {
          any = false;
          for (int i = 0; i < threads; ++i) {
            const int t = (g_mode & 2) ? threads - 1 - i : i;
            if (b.fibers[t].done) continue;
            any = true;
            b.cur = t;
            swapcontext(&b.sched, &b.fibers[t].ctx);
          }
        }
        for (int t = 0; t < threads; ++t) stacks[t].swap(b.fibers[t].stack);
        if (b.bar_count != 0) fail("block ended inside a barrier");
        g_block = nullptr;
      }
}

}  // namespace emu

#define threadIdx (dim3_{static_cast<unsigned>(::emu::tid()), 0, 0})
#define blockIdx (::emu::g_block->block_idx)
#define gridDim (::emu::g_block->grid_dim)
#define blockDim (::emu::g_block->block_dim)

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp() { emu::warp_barrier(); }
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int off) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  emu::my_slot()[0] = u;
  emu::warp_barrier();
  const uint32_t r = emu::slot_of(emu::lane() ^ off)[0];
  emu::warp_barrier();
  float out;
  std::memcpy(&out, &r, 4);
  return out;
}

// ---- CUDA runtime API stand-ins (used by emulators that run a .cu file's own launchers) ----
// An emulator that compiles a whole .cu (launchers included) rewrites, before compiling it,
//   kernel<<<grid, threads, smem, stream>>>(args)  ->  ::emu::KernelLaunch(kernel, grid, threads, smem, stream)(args)
//   extern __shared__ ... name[];                    ->  unsigned char* name = ::emu::dynamic_smem();  (cast to its type)
//   __shared__ T name[DIM];                          ->  EMU_STATIC_SHARED(T, name, [DIM]);
// and gets the runtime calls the launchers make from here. The emulated device: emu::g_device
// (opt-in shared-memory limit per block, SM count), set by the emulator per call, together
// with emu::reset_runtime(). Each kernel's static shared-memory size (what nvcc would report
// in cudaFuncAttributes::sharedSizeBytes) is stated by the emulator (emu::set_static_smem);
// every block checks that the kernel's __shared__ declarations use exactly that much.
// Launch rules enforced (as the CUDA runtime does): 1..1024 threads, a non-empty grid, and
// dynamic shared memory within the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize
// (48 KiB - static by default; cudaFuncSetAttribute may raise it to opt-in limit - static).
// A bad launch is not run; it leaves its error for cudaGetLastError.
#include <map>
#include <string>

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9,
                   cudaErrorInvalidDeviceFunction = 98 };
using cudaStream_t = struct emu_stream_*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
struct cudaFuncAttributes {
  std::size_t sharedSizeBytes = 0;
  int maxDynamicSharedSizeBytes = 0;
  int maxThreadsPerBlock = 1024;
};
#define __align__(n) alignas(n)

namespace emu {

struct Device {
  int smem_optin = 227 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int num_sms = 132;
};
inline Device g_device;
inline cudaError_t g_last_error = cudaSuccess;
inline std::map<const void*, std::size_t> g_static_smem;  // kernel -> static __shared__ bytes
inline std::map<const void*, int> g_max_dyn_smem;         // kernel -> cudaFuncSetAttribute value
inline std::map<const void*, std::string> g_kernel_name;  // kernel -> name for the launch log
inline std::vector<std::string> g_launch_log;             // "name grid threads smem", one per launch
constexpr std::size_t kDefaultSmem = 48 * 1024;

inline void reset_runtime() {
  g_last_error = cudaSuccess;
  g_max_dyn_smem.clear();
  g_launch_log.clear();
}
template <typename F>
inline void set_static_smem(F* kernel, std::size_t bytes, const std::string& name = "") {
  g_static_smem[reinterpret_cast<const void*>(kernel)] = bytes;
  g_kernel_name[reinterpret_cast<const void*>(kernel)] = name;
}

// The running launch's static shared-memory layout: static first, dynamic after (16-aligned).
struct SmemLayout {
  std::size_t static_bytes = 0, dynamic_offset = 0, used = 0;
  long block_key = -1;
  std::map<const void*, std::size_t> sites;  // __shared__ declaration -> offset, this block
};
inline SmemLayout g_layout;
inline long g_block_counter = 0;
inline long g_current_block = -1;

inline unsigned char* dynamic_smem() { return smem_base() + g_layout.dynamic_offset; }
inline void close_block_layout() {
  if (g_layout.block_key >= 0 && g_layout.used != g_layout.static_bytes)
    fail("a kernel's __shared__ declarations differ from its stated static shared memory");
  g_layout.block_key = -1;
}
inline void* static_shared(const void* site, std::size_t bytes, std::size_t align) {
  if (g_layout.block_key != g_current_block) {
    close_block_layout();
    g_layout.block_key = g_current_block;
    g_layout.used = 0;
    g_layout.sites.clear();
  }
  auto it = g_layout.sites.find(site);
  if (it == g_layout.sites.end()) {
    const std::size_t off = (g_layout.used + align - 1) / align * align;
    if (off + bytes > g_layout.static_bytes) fail("static __shared__ past the stated static shared memory");
    it = g_layout.sites.emplace(site, off).first;
    g_layout.used = off + bytes;
  }
  return smem_base() + it->second;
}

inline std::size_t static_smem_of(const void* kernel) {
  auto it = g_static_smem.find(kernel);
  if (it == g_static_smem.end()) fail("kernel without a stated static shared-memory size");
  return it == g_static_smem.end() ? 0 : it->second;
}
inline int max_dyn_smem_of(const void* kernel) {
  auto it = g_max_dyn_smem.find(kernel);
  return it != g_max_dyn_smem.end() ? it->second : int(kDefaultSmem - static_smem_of(kernel));
}

template <typename F>
struct KernelLaunch {
  F* kernel;
  int64_t grid;
  int64_t threads;
  std::size_t smem;
  KernelLaunch(F* k, int64_t g, int64_t t, std::size_t s, cudaStream_t) : kernel(k), grid(g), threads(t), smem(s) {}
  template <typename... Args>
  void operator()(const Args&... args) const {
    const void* key = reinterpret_cast<const void*>(kernel);
    const std::size_t st = static_smem_of(key);
    if (grid < 1 || threads < 1 || threads > 1024) {
      if (g_last_error == cudaSuccess) g_last_error = cudaErrorInvalidConfiguration;
      return;
    }
    if (smem > std::size_t(max_dyn_smem_of(key)) || st + smem > std::size_t(g_device.smem_optin)) {
      if (g_last_error == cudaSuccess) g_last_error = cudaErrorInvalidValue;
      return;
    }
    g_launch_log.push_back(g_kernel_name[key] + " " + std::to_string(grid) + " " +
                           std::to_string(threads) + " " + std::to_string(smem));
    g_layout = SmemLayout{};
    g_layout.static_bytes = st;
    g_layout.dynamic_offset = (st + 15) / 16 * 16;
    const int64_t g[3] = {grid, 1, 1};
    const long first = g_block_counter;
    g_block_counter += grid;
    launch(g, int(threads), g_layout.dynamic_offset + smem, [&] {
      g_current_block = first + g_block->block_idx.x;
      kernel(args...);
    });
    close_block_layout();
  }
};

}  // namespace emu

#define EMU_STATIC_SHARED(T, name, dim)                                                         \
  static char emu_site_##name = 0;                                                              \
  T(&name) dim = *reinterpret_cast<T(*) dim>(                                                   \
      ::emu::static_shared(&emu_site_##name, sizeof(T dim), alignof(T)))

template <typename F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F* kernel) {
  const void* key = reinterpret_cast<const void*>(kernel);
  if (!emu::g_static_smem.count(key)) return cudaErrorInvalidDeviceFunction;
  attr->sharedSizeBytes = emu::static_smem_of(key);
  attr->maxDynamicSharedSizeBytes = emu::max_dyn_smem_of(key);
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  const void* key = reinterpret_cast<const void*>(kernel);
  if (!emu::g_static_smem.count(key)) return cudaErrorInvalidDeviceFunction;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || std::size_t(value) + emu::static_smem_of(key) > std::size_t(emu::g_device.smem_optin))
    return cudaErrorInvalidValue;
  emu::g_max_dyn_smem[key] = value;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::g_device.smem_optin; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = emu::g_device.num_sms; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}
