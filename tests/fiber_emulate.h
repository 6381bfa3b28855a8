// fiber_emulate.h — the host runtime shared by the CPU emulators of the CUDA kernels
// (tests/decode_emulate.cpp, tests/flash_bwd_emulate.cpp).
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
