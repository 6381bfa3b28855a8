// fiber_emulate.h — the host runtime shared by the CPU emulators of the CUDA kernels
// (tests/decode_emulate.cpp, tests/rms_norm_emulate.cpp, tests/rotary_emulate.cpp,
// tests/flash_fwd_emulate.cpp, tests/flash_bwd_emulate.cpp; rms_norm and flash_fwd also use
// the CUDA runtime API stand-ins at the end of this file), and the sanitizer analogues
// (memcheck / racecheck / initcheck / bank-conflict counting, "sanitizer analogues" below;
// proven on deliberately bad kernels by tests/sanitizer_selftest.cpp).
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
  uint32_t bank_seq = 0;                  // this thread's tracked shared accesses since the last barrier
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
inline long g_block_serial = 0;  // counts blocks run by this process (the shadow's owner)
inline void bank_flush();  // sanitizers, below

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
    bank_flush();
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

inline void smem_track(uint32_t off, uint32_t bytes, bool write, const char* what);  // sanitizers, below
inline void do_copy(const Copy& c) {
  smem_track(c.dst, uint32_t(c.bytes), true, "cp.async");
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

// cp.async.commit_group / cp.async.wait_group N on this fiber's queues (PTX ISA, "cp.async.
// wait_group"): a commit closes the open group (an empty one too); a wait retires the oldest
// committed groups until at most `pending` remain, performing their copies in late mode (mode
// bit 0; otherwise they landed at issue). Shared by the emulators that wait for N > 0.
inline void commit_group() {
  Fiber& f = my_fiber();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
inline void wait_group(int pending) {
  Fiber& f = my_fiber();
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const auto& c : f.groups.front()) do_copy(c);
    f.groups.erase(f.groups.begin());
  }
}

inline void trampoline() {
  (*g_block->body)();
  Fiber& f = g_block->fibers[g_block->cur];
  if (!f.open.empty() || !f.groups.empty()) fail("thread exited with cp.async copies never waited for");
  f.done = true;
}

// Run `body` on grid[0] x grid[1] x grid[2] blocks of `threads` fibers, block after block.
// block_x > 0: a 2-D block of block_x x (threads / block_x) threads (threadIdx.x fastest).
inline void launch(const int64_t (&grid)[3], int threads, std::size_t smem_bytes,
                   const std::function<void()>& body, int block_x = 0) {
  static std::vector<std::vector<char>> stacks;  // reused across blocks and launches
  for (int64_t z = 0; z < grid[2]; ++z)
    for (int64_t y = 0; y < grid[1]; ++y)
      for (int64_t x = 0; x < grid[0]; ++x) {
        Block b;
        b.block_idx = {unsigned(x), unsigned(y), unsigned(z)};
        b.grid_dim = {unsigned(grid[0]), unsigned(grid[1]), unsigned(grid[2])};
        b.block_dim = block_x > 0 ? dim3_{unsigned(block_x), unsigned(threads / block_x), 1}
                                  : dim3_{unsigned(threads), 1, 1};
        ++g_block_serial;
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
        bank_flush();
        if (b.bar_count != 0) fail("block ended inside a barrier");
        g_block = nullptr;
      }
}


// ---- sanitizer analogues (compute-sanitizer's memcheck / racecheck / initcheck, and a
// bank-conflict count), shared by the emulators that turn them on (g_sanitize) ------------
//
// memcheck: every global buffer a kernel sees is a copy (emu::guard) between two PROT_NONE
//   guard pages, placed flush against the upper guard (default) or, with
//   FASTATTN_EMU_GUARD=start, against the lower one; the original keeps its alignment
//   modulo 16, so a buffer whose size is not a multiple of 16 leaves up to 15 bytes of slack
//   before the guard. A raw load / store that walks onto a guard page raises SIGSEGV; the
//   handler here turns it into a reported failure ("memcheck: KERNEL: out-of-bounds
//   read|write at byte offset N of buffer NAME (B bytes)"), opens the page so the kernel can
//   finish, and the run returns its error. In addition, the global accesses the emulator
//   sees (cp.async sources, and whatever an emulator passes to emu::check_global) are
//   bounds-checked byte-exactly against the registered buffers, on either side. After the
//   run, emu::unguard_all copies back the bytes the kernel changed and unmaps.
// racecheck / initcheck: a shadow of the block's shared memory, one entry per 4-byte word:
//   the last writer's warp and barrier interval, and the interval's reader warp (or "many").
//   An interval is the time between two __syncthreads of the block. At the access points
//   the emulator sees (emu::smem_track: cp.async destinations when the copy lands, and the
//   emulator's tracked ld / st.shared accessors, e.g. rms_norm's Pack loads / stores), it
//   fails on
//     * write after write / read after write / write after read of the same word by two
//       different warps in the same interval (no __syncthreads between them); accesses by
//       the same warp are ordered by __syncwarp / program order and are not checked;
//     * a read of a word no tracked write has written since the block started (shared
//       memory still starts as NaN bytes, so an untracked read of unwritten memory shows up
//       as NaN in the result instead).
//   Raw C++ pointer accesses to shared memory are invisible to the emulator and not tracked.
// bank conflicts: every tracked access is also recorded per warp, the k-th tracked access of
//   each lane since the last barrier forming the warp's k-th instruction; at each barrier
//   the instructions are priced in wavefronts (16-byte accesses in 4 phases of 8 lanes,
//   8-byte in 2 of 16, smaller in 1 of 32; per phase, the most distinct 4-byte words any of
//   the 32 banks must serve), against the ideal (one per active phase). Totals per kernel
//   and access kind: emu_bank_report. A count, never a failure.
}  // namespace emu

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <string>

namespace emu {

inline bool g_sanitize = false;            // the emulator turns the checkers on
inline const char* g_kernel = "kernel";    // the running kernel's name, for the reports

// fail() with a formatted message (kept alive for emulators that store the pointer).
inline void failf(const char* fmt, ...) {
  static std::deque<std::string> msgs;
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  if (msgs.size() > 256) msgs.pop_front();
  msgs.emplace_back(buf);
  fail(msgs.back().c_str());
}

// ---- memcheck ----
struct Guarded {
  unsigned char* host;
  unsigned char* dev;
  std::size_t bytes;
  unsigned char* map;
  std::size_t map_bytes;
  std::size_t page;
  std::vector<unsigned char> snap;  // the bytes copied in: only what changed is copied back
  std::string name;
};
inline std::vector<Guarded> g_guarded;
inline struct sigaction g_old_segv;
inline bool g_segv_installed = false;
inline char g_segv_msg[512];

inline void segv_handler(int sig, siginfo_t* si, void* uctx) {
  unsigned char* a = static_cast<unsigned char*>(si->si_addr);
  for (auto& g : g_guarded) {
    unsigned char* lo = g.map;                        // lower guard page
    unsigned char* hi = g.map + g.map_bytes - g.page;  // upper guard page
    const bool in_lo = a >= lo && a < lo + g.page, in_hi = a >= hi && a < hi + g.page;
    if (!in_lo && !in_hi) continue;
    bool write = false;
#if defined(__x86_64__) && defined(REG_ERR)
    write = (static_cast<ucontext_t*>(uctx)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
    (void)uctx;
#endif
    std::snprintf(g_segv_msg, sizeof(g_segv_msg),
                  "memcheck: %s: out-of-bounds %s at byte offset %lld of buffer %s (%zu bytes)", g_kernel,
                  write ? "write" : "read", static_cast<long long>(a - g.dev), g.name.c_str(), g.bytes);
    fail(g_segv_msg);
    mprotect(in_lo ? lo : hi, g.page, PROT_READ | PROT_WRITE);  // let the kernel finish
    return;
  }
  sigaction(SIGSEGV, &g_old_segv, nullptr);  // not ours: fault again, as before
  (void)sig;
}

// A guarded copy of host[0, bytes) (null stays null). The same host range twice gets the
// same copy (an in-place kernel's input and output).
inline void* guard(void* host, int64_t bytes, const char* name) {
  if (host == nullptr) return nullptr;
  if (bytes < 0) bytes = 0;
  for (auto& g : g_guarded)
    if (g.host == host && g.bytes == std::size_t(bytes)) return g.dev;
  const char* env = std::getenv("FASTATTN_EMU_GUARD");
  const bool at_start = env != nullptr && std::string(env) == "start";
  Guarded g;
  g.page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  g.host = static_cast<unsigned char*>(host);
  g.bytes = std::size_t(bytes);
  g.name = name;
  const std::size_t body = (g.bytes + 16 + g.page - 1) / g.page * g.page;
  g.map_bytes = body + 2 * g.page;
  void* m = mmap(nullptr, g.map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    fail("memcheck: mmap failed");
    return host;
  }
  g.map = static_cast<unsigned char*>(m);
  mprotect(g.map, g.page, PROT_NONE);
  mprotect(g.map + g.page + body, g.page, PROT_NONE);
  const uintptr_t mis = reinterpret_cast<uintptr_t>(host) % 16;
  if (at_start) {
    g.dev = g.map + g.page + mis;
  } else {
    const uintptr_t end = reinterpret_cast<uintptr_t>(g.map + g.page + body);
    uintptr_t d = end - g.bytes;
    d -= ((d % 16) + 16 - mis) % 16;  // same alignment modulo 16 as the original
    g.dev = reinterpret_cast<unsigned char*>(d);
  }
  std::memcpy(g.dev, host, g.bytes);
  g.snap.assign(g.dev, g.dev + g.bytes);
  if (!g_segv_installed) {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = segv_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    g_segv_installed = true;
  }
  g_guarded.push_back(std::move(g));
  return g_guarded.back().dev;
}

// Copy back what the kernel changed, unmap, restore the previous SIGSEGV handler.
inline void unguard_all() {
  for (auto& g : g_guarded) {
    for (std::size_t i = 0; i < g.bytes; ++i)
      if (g.dev[i] != g.snap[i]) g.host[i] = g.dev[i];
    munmap(g.map, g.map_bytes);
  }
  g_guarded.clear();
  if (g_segv_installed) sigaction(SIGSEGV, &g_old_segv, nullptr);
  g_segv_installed = false;
}

// A global access the emulator sees: [p, p + bytes) must lie inside one registered buffer
// (no check when none is registered). Returns false (after failing) when it does not.
inline bool check_global(const void* p, std::size_t bytes, bool write, const char* what) {
  if (g_guarded.empty()) return true;
  const unsigned char* a = static_cast<const unsigned char*>(p);
  const Guarded* near = nullptr;
  long long best = 0;
  for (const auto& g : g_guarded) {
    if (a >= g.dev && a + bytes <= g.dev + g.bytes) return true;
    const long long d = a < g.dev ? g.dev - a : a - (g.dev + g.bytes);
    if (!near || d < best) near = &g, best = d;
  }
  failf("memcheck: %s: out-of-bounds %s (%s, %zu bytes) at byte offset %lld of buffer %s (%zu bytes)", g_kernel,
        write ? "write" : "read", what, bytes, static_cast<long long>(a - near->dev), near->name.c_str(),
        near->bytes);
  return false;
}

// ---- racecheck / initcheck ----
struct ShadowWord {
  uint32_t w_epoch = 0, r_epoch = 0;  // 0: never
  int16_t w_warp = -1, r_warp = -1;   // r_warp -2: several warps read in r_epoch
};
inline std::vector<ShadowWord> g_shadow;
inline long g_shadow_block = -1;

// ---- bank conflicts ----
struct BankInst {
  int bytes = 0;
  const char* kind = "";
  uint32_t mask = 0;
  uint32_t addr[32];
};
struct BankStats {
  long long instructions = 0, wavefronts = 0, ideal = 0;
};
inline std::map<std::string, std::map<std::string, BankStats>> g_bank;  // kernel -> kind -> totals
inline std::vector<std::vector<BankInst>> g_bank_insts;                   // per warp, this interval

inline void bank_record(uint32_t off, uint32_t bytes, const char* kind) {
  Block& b = *g_block;
  const int w = tid() / 32;
  if (int(g_bank_insts.size()) <= w) g_bank_insts.resize(w + 1);
  auto& v = g_bank_insts[w];
  const uint32_t k = my_fiber().bank_seq++;
  if (v.size() <= k) v.resize(k + 1);
  BankInst& in = v[k];
  if (in.mask == 0) in.bytes = int(bytes), in.kind = kind;
  in.mask |= 1u << lane();
  in.addr[lane()] = off;
  (void)b;
}

inline void bank_flush() {
  if (!g_sanitize) return;
  Block& b = *g_block;
  for (auto& f : b.fibers) f.bank_seq = 0;
  for (auto& v : g_bank_insts) {
    for (auto& in : v) {
      if (in.mask == 0) continue;
      const int phases = in.bytes >= 16 ? 4 : in.bytes == 8 ? 2 : 1, per = 32 / phases;
      BankStats& st = g_bank[g_kernel][in.kind];
      ++st.instructions;
      for (int ph = 0; ph < phases; ++ph) {
        uint32_t words[32][32];  // per bank, the distinct words (a phase touches at most 32)
        int nw[32] = {0};
        bool any = false;
        for (int l = ph * per; l < (ph + 1) * per; ++l) {
          if (!(in.mask >> l & 1)) continue;
          any = true;
          const uint32_t first = in.addr[l] / 4, last = (in.addr[l] + uint32_t(in.bytes) - 1) / 4;
          for (uint32_t wd = first; wd <= last; ++wd) {
            const int bank = int(wd % 32);
            bool seen = false;
            for (int i = 0; i < nw[bank]; ++i) seen |= words[bank][i] == wd;
            if (!seen && nw[bank] < 32) words[bank][nw[bank]++] = wd;
          }
        }
        if (!any) continue;
        int worst = 1;
        for (int i = 0; i < 32; ++i) worst = nw[i] > worst ? nw[i] : worst;
        st.wavefronts += worst;
        ++st.ideal;
      }
      in.mask = 0;
    }
    v.clear();
  }
}

// A tracked shared-memory access of [off, off + bytes) by the running thread.
inline void smem_track(uint32_t off, uint32_t bytes, bool write, const char* what) {
  if (!g_sanitize || g_block == nullptr) return;
  Block& b = *g_block;
  if (off + bytes > b.smem.size()) {
    failf("memcheck: %s: %s of shared bytes [%u, %u) past the block's %zu bytes", g_kernel, what, off, off + bytes,
          b.smem.size() - 16);
    return;
  }
  if (g_shadow_block != g_block_serial) {
    g_shadow.assign(b.smem.size() / 4 + 1, ShadowWord{});
    g_shadow_block = g_block_serial;
  }
  bank_record(off, bytes, what);
  const uint32_t epoch = uint32_t(b.bar_gen) + 1;
  const int16_t warp = int16_t(tid() / 32);
  for (uint32_t wd = off / 4; wd < (off + bytes + 3) / 4; ++wd) {
    ShadowWord& s = g_shadow[wd];
    if (write) {
      if (s.w_epoch == epoch && s.w_warp != warp)
        failf("racecheck: %s: write-after-write hazard: warps %d and %d write shared bytes [%u, %u) (%s) with no "
              "__syncthreads between them (block %u)", g_kernel, s.w_warp, warp, wd * 4, wd * 4 + 4, what,
              b.block_idx.x);
      else if (s.r_epoch == epoch && s.r_warp != warp)
        failf("racecheck: %s: write-after-read hazard: warp %d writes shared bytes [%u, %u) (%s) that warp %d read "
              "with no __syncthreads between them (block %u)", g_kernel, warp, wd * 4, wd * 4 + 4, what,
              s.r_warp == -2 ? -1 : s.r_warp, b.block_idx.x);
      s.w_epoch = epoch;
      s.w_warp = warp;
    } else {
      if (s.w_epoch == 0)
        failf("initcheck: %s: warp %d reads shared bytes [%u, %u) (%s) that were never written (block %u)", g_kernel,
              warp, wd * 4, wd * 4 + 4, what, b.block_idx.x);
      else if (s.w_epoch == epoch && s.w_warp != warp)
        failf("racecheck: %s: read-after-write hazard: warp %d reads shared bytes [%u, %u) (%s) that warp %d wrote "
              "with no __syncthreads between them (block %u)", g_kernel, warp, wd * 4, wd * 4 + 4, what, s.w_warp,
              b.block_idx.x);
      if (s.r_epoch != epoch) s.r_epoch = epoch, s.r_warp = warp;
      else if (s.r_warp != warp) s.r_warp = -2;
    }
  }
}

// Tracked ld / st.shared for emulators and self-tests (by byte offset into shared memory).
template <typename V>
inline void smem_store(uint32_t off, const V& v) {
  smem_track(off, sizeof(V), true, "st.shared");
  std::memcpy(smem_base() + off, &v, sizeof(V));
}
template <typename V>
inline V smem_load(uint32_t off) {
  smem_track(off, sizeof(V), false, "ld.shared");
  V v;
  std::memcpy(&v, smem_base() + off, sizeof(V));
  return v;
}

}  // namespace emu

#define threadIdx                                                                   \
  (dim3_{static_cast<unsigned>(::emu::tid()) % ::emu::g_block->block_dim.x,          \
         static_cast<unsigned>(::emu::tid()) / ::emu::g_block->block_dim.x, 0})
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
  int64_t grid_y = 1, grid_z = 1;  // a 3-D grid (x, y, z): the constructor below
  KernelLaunch(F* k, int64_t g, int64_t t, std::size_t s, cudaStream_t) : kernel(k), grid(g), threads(t), smem(s) {}
  KernelLaunch(F* k, const int64_t (&g)[3], int64_t t, std::size_t s, cudaStream_t)
      : kernel(k), grid(g[0]), threads(t), smem(s), grid_y(g[1]), grid_z(g[2]) {}
  template <typename... Args>
  void operator()(const Args&... args) const {
    const void* key = reinterpret_cast<const void*>(kernel);
    const std::size_t st = static_smem_of(key);
    if (grid < 1 || threads < 1 || threads > 1024 || grid >= (int64_t{1} << 31) || grid_y < 1 || grid_y > 65535 ||
        grid_z < 1 || grid_z > 65535) {
      if (g_last_error == cudaSuccess) g_last_error = cudaErrorInvalidConfiguration;
      return;
    }
    if (smem > std::size_t(max_dyn_smem_of(key)) || st + smem > std::size_t(g_device.smem_optin)) {
      if (g_last_error == cudaSuccess) g_last_error = cudaErrorInvalidValue;
      return;
    }
    g_kernel = g_kernel_name[key].c_str();  // the sanitizers' reports name it
    const std::string dims = grid_y == 1 && grid_z == 1 ? std::to_string(grid)  // "x" or "xXyXz"
                                                        : std::to_string(grid) + "x" + std::to_string(grid_y) +
                                                              "x" + std::to_string(grid_z);
    g_launch_log.push_back(g_kernel_name[key] + " " + dims + " " + std::to_string(threads) + " " +
                           std::to_string(smem));
    g_layout = SmemLayout{};
    g_layout.static_bytes = st;
    g_layout.dynamic_offset = (st + 15) / 16 * 16;
    const int64_t g[3] = {grid, grid_y, grid_z};
    const long first = g_block_counter;
    g_block_counter += grid * grid_y * grid_z;
    launch(g, int(threads), g_layout.dynamic_offset + smem, [&] {
      g_current_block = first + g_block->block_idx.x + grid * (g_block->block_idx.y + grid_y * g_block->block_idx.z);
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

// The bank-conflict totals as text, one "kernel<TAB>kind<TAB>instructions<TAB>wavefronts<TAB>ideal"
// line per kernel and access kind; reset = 1 clears them. Returns the length needed.
extern "C" int emu_bank_report(char* buf, int len, int reset) {
  std::string s;
  for (const auto& k : emu::g_bank)
    for (const auto& a : k.second)
      s += k.first + "\t" + a.first + "\t" + std::to_string(a.second.instructions) + "\t" +
           std::to_string(a.second.wavefronts) + "\t" + std::to_string(a.second.ideal) + "\n";
  if (buf != nullptr && len > 0) std::snprintf(buf, static_cast<std::size_t>(len), "%s", s.c_str());
  if (reset) emu::g_bank.clear();
  return static_cast<int>(s.size()) + 1;
}
