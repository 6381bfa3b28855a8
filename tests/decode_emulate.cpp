// decode_emulate.cpp — run the CUDA decode kernels (csrc/cuda/decode_kernels.cuh, the exact
// code decode.cu launches) on the CPU, as a shared library driven by tests/test_decode_emulated.py.
//
// Host versions of what the kernels use from CUDA:
//   * every thread of a block is a fiber (ucontext); __syncthreads / __syncwarp and
//     __shfl_xor_sync are barriers between fibers, so the kernels' own control flow, warp
//     roles, indexing, double buffering and merges run as written;
//   * cp.async.cg (16 bytes, zero-fill when src-size is 0) with commit / wait_group: in
//     "late" mode (mode bit 0) a copy lands only when a wait_group retires its group, the
//     latest moment the PTX ISA allows, so a read of a tile that was not waited for sees
//     stale data; otherwise at issue, the earliest, so a refill of a stage that other warps
//     still read shows up. Mode bit 1 schedules the fibers in reverse order.
//   * __half / __nv_bfloat16: 16-bit storage, round-to-nearest-even conversions.
// Shared memory is filled with NaN bytes at every block start: reading anything the block
// did not write poisons the result. The grid comes from decode_grid(), as in decode.cu.
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define FASTATTN_DECODE_EMULATE 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3_ {
  unsigned x = 0, y = 0, z = 0;
};
struct uint4 {
  uint32_t x, y, z, w;
};
struct alignas(8) uint2 {
  uint32_t x, y;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
template <typename T>
inline T min(T a, T b) { return a < b ? a : b; }
template <typename T>
inline T max(T a, T b) { return a > b ? a : b; }
inline float __log2f(float x) { return std::log2(x); }
inline float __logf(float x) { return std::log(x); }
inline float __expf(float x) { return std::exp(x); }

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float to_float(__half x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return static_cast<float>(h);
}
inline float to_float(__nv_bfloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float2 to_float2(uint32_t bits, __half) {
  return float2{to_float(__half{static_cast<uint16_t>(bits & 0xffff)}), to_float(__half{static_cast<uint16_t>(bits >> 16)})};
}
inline float2 to_float2(uint32_t bits, __nv_bfloat16) {
  return float2{to_float(__nv_bfloat16{static_cast<uint16_t>(bits & 0xffff)}),
                to_float(__nv_bfloat16{static_cast<uint16_t>(bits >> 16)})};
}
template <typename T> inline T from_float(float x);
template <> inline __half from_float<__half>(float x) {
  const _Float16 h = static_cast<_Float16>(x);  // round to nearest even
  __half r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

namespace emu {

struct Copy {
  uint32_t dst;
  const void* src;
  bool pred;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  std::vector<Copy> open;                  // issued since the last commit
  std::vector<std::vector<Copy>> groups;   // committed, not yet retired (late mode)
};

inline int g_mode = 0;

struct Warp {
  int count = 0;
  long gen = 0;
  uint32_t slot[32];
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
inline const char* g_error = nullptr;

inline void fail(const char* what) {
  if (!g_error) g_error = what;
}
inline void yield() { swapcontext(&g_block->fibers[g_block->cur].ctx, &g_block->sched); }
inline int tid() { return g_block->cur; }
inline int lane() { return tid() % 32; }

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

inline void do_copy(const Copy& c) {
  if (c.pred)
    std::memcpy(g_block->smem.data() + c.dst, c.src, 16);
  else
    std::memset(g_block->smem.data() + c.dst, 0, 16);
}

inline void trampoline() {
  (*g_block->body)();
  Fiber& f = g_block->fibers[g_block->cur];
  if (!f.open.empty() || !f.groups.empty()) fail("thread exited with cp.async copies never waited for");
  f.done = true;
}

// Run `body` on grid[0] x grid[1] x grid[2] blocks of `threads` fibers, block after block.
inline void launch(const int64_t (&grid)[3], int threads, size_t smem_bytes, const std::function<void()>& body) {
  static std::vector<std::vector<char>> stacks;
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
          if (stacks[t].empty()) stacks[t].resize(256 * 1024);
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
#define FASTATTN_DECODE_SMEM(name) unsigned char* name = ::emu::g_block->smem.data()

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp() { emu::warp_barrier(); }
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int off) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  emu::g_block->warps[emu::tid() / 32].slot[emu::lane()] = u;
  emu::warp_barrier();
  const uint32_t r = emu::g_block->warps[emu::tid() / 32].slot[emu::lane() ^ off];
  emu::warp_barrier();
  float out;
  std::memcpy(&out, &r, 4);
  return out;
}

inline uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - emu::g_block->smem.data());
}
inline void cp_async16(uint32_t dst, const void* src, bool pred) {
  if (dst % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::fail("misaligned cp.async");
  if (dst + 16 > emu::g_block->smem.size() - 16) emu::fail("cp.async past the shared memory");
  const emu::Copy c{dst, src, pred};
  if (emu::g_mode & 1)
    emu::g_block->fibers[emu::tid()].open.push_back(c);
  else
    emu::do_copy(c);
}
inline void cp_async_commit() {
  emu::Fiber& f = emu::g_block->fibers[emu::tid()];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int kPending>
inline void cp_async_wait() {
  emu::Fiber& f = emu::g_block->fibers[emu::tid()];
  while (int(f.groups.size()) > kPending) {
    for (const auto& c : f.groups.front()) emu::do_copy(c);
    f.groups.erase(f.groups.begin());
  }
}

#include "decode_kernels.cuh"

using namespace fastattn;
using namespace fastattn::decode_kernels;
namespace decode = fastattn::decode;

namespace {

template <typename T, int kD>
void run_decode(const DecodeParams& p) {
  int64_t grid[3];
  decode_grid(p, grid);
  emu::launch(grid, kThreads, DecodeSmem<kD>::kBytes, [&] { decode_kernel<T, kD>(p); });
  if (p.num_splits > 1) {
    const int64_t g2[3] = {p.b * p.h, 1, 1};
    emu::launch(g2, kD, 0, [&] { decode_combine_kernel<T, kD>(p); });
  }
}

}  // namespace

// ptrs: q, k_cache, v_cache, cache_seqlens, out, lse, out_partial, lse_partial.
// ints: q_batch, q_head, k_batch, k_row, k_head, v_batch, v_row, v_head, out_batch, out_head
//       strides, then b, seqlen_k_max, h, h_k, d, num_splits, bf16 (0/1).
// Returns 0, or 1 with the first emulation error printed.
extern "C" int decode_emulate(void** ptrs, const int64_t* ints, float softmax_scale, int mode) {
  emu::g_mode = mode;
  emu::g_error = nullptr;
  DecodeParams p;
  p.q = ptrs[0], p.k_cache = ptrs[1], p.v_cache = ptrs[2];
  p.cache_seqlens = static_cast<const int32_t*>(ptrs[3]);
  p.out = ptrs[4], p.lse = static_cast<float*>(ptrs[5]);
  p.out_partial = static_cast<float*>(ptrs[6]), p.lse_partial = static_cast<float*>(ptrs[7]);
  p.q_batch_stride = ints[0], p.q_head_stride = ints[1];
  p.k_batch_stride = ints[2], p.k_row_stride = ints[3], p.k_head_stride = ints[4];
  p.v_batch_stride = ints[5], p.v_row_stride = ints[6], p.v_head_stride = ints[7];
  p.out_batch_stride = ints[8], p.out_head_stride = ints[9];
  p.b = ints[10], p.seqlen_k_max = ints[11], p.h = ints[12], p.h_k = ints[13], p.d = ints[14];
  p.num_splits = ints[15];
  const bool bf16 = ints[16] != 0;
  p.dtype = bf16 ? DType::kBFloat16 : DType::kFloat16;
  p.softmax_scale = softmax_scale;
  if (p.d == 64)
    bf16 ? run_decode<__nv_bfloat16, 64>(p) : run_decode<__half, 64>(p);
  else if (p.d == 128)
    bf16 ? run_decode<__nv_bfloat16, 128>(p) : run_decode<__half, 128>(p);
  else if (p.d == 256)
    bf16 ? run_decode<__nv_bfloat16, 256>(p) : run_decode<__half, 256>(p);
  else
    emu::fail("unsupported head dim");
  if (emu::g_error) std::fprintf(stderr, "decode_emulate: %s\n", emu::g_error);
  return emu::g_error ? 1 : 0;
}

// ptrs: k_cache, v_cache, k, v, cache_seqlens. ints: the 12 strides in AppendKvParams order
// (k_cache b/row/head, v_cache ..., k ..., v ...), then b, seqlen_new, seqlen_k_max, h_k, d,
// element bytes, vector copies (0/1), blocks. Runs append_kv_kernel with 256 threads.
extern "C" int append_kv_emulate(void** ptrs, const int64_t* ints) {
  emu::g_mode = 0;
  emu::g_error = nullptr;
  AppendKvParams p;
  p.k_cache = ptrs[0], p.v_cache = ptrs[1], p.k = ptrs[2], p.v = ptrs[3];
  p.cache_seqlens = static_cast<const int32_t*>(ptrs[4]);
  p.k_cache_batch_stride = ints[0], p.k_cache_row_stride = ints[1], p.k_cache_head_stride = ints[2];
  p.v_cache_batch_stride = ints[3], p.v_cache_row_stride = ints[4], p.v_cache_head_stride = ints[5];
  p.k_batch_stride = ints[6], p.k_row_stride = ints[7], p.k_head_stride = ints[8];
  p.v_batch_stride = ints[9], p.v_row_stride = ints[10], p.v_head_stride = ints[11];
  p.b = ints[12], p.seqlen_new = ints[13], p.seqlen_k_max = ints[14], p.h_k = ints[15], p.d = ints[16];
  const int64_t es = ints[17];
  const bool vec = ints[18] != 0;
  const int64_t grid[3] = {ints[19], 1, 1};
  if (vec)
    emu::launch(grid, 256, 0, [&] { append_kv_kernel<uint4>(p, es); });
  else if (es == 4)
    emu::launch(grid, 256, 0, [&] { append_kv_kernel<uint32_t>(p, es); });
  else
    emu::launch(grid, 256, 0, [&] { append_kv_kernel<uint16_t>(p, es); });
  if (emu::g_error) std::fprintf(stderr, "append_kv_emulate: %s\n", emu::g_error);
  return emu::g_error ? 1 : 0;
}

// The split heuristic decode_num_splits_cuda applies (decode_split.h), at D = 128, for tests.
extern "C" int64_t decode_num_splits_for_slots(int64_t blocks, int64_t slots, int64_t seqlen_k_max) {
  return decode::num_splits_for_slots(blocks, slots, seqlen_k_max, block_n_for(128));
}
