// decode_kernels.cuh — the decode attention, split combine and append_kv kernels that
// decode.cu launches (see decode.cu for what they compute and why they are fast). Kept in a
// header, CUDA headers only, so tests/decode_emulate.cpp can run this exact code on the CPU.
#pragma once

#include <cstdint>

#include "fastattn/decode_split.h"
#include "fastattn/kv_cache_layout.h"
#include "fastattn/params.h"
#include "softcap.cuh"

#ifndef FASTATTN_DECODE_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define FASTATTN_DECODE_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fastattn {
namespace decode_kernels {


// Warps per block: 4 at D = 64 (two blocks fit an SM's shared memory: 8 warps per SM), 8 from
// D = 96 on, where one block per SM is all the shared memory allows (4 warps would leave one
// warp per scheduler, nothing to hide a shared-memory or FMA latency with). The 255-register
// budget of __launch_bounds__(256, 1) is the one 128 threads had.
__host__ __device__ constexpr int warps_for(int d) { return d <= 64 ? 4 : 8; }
__host__ __device__ constexpr int threads_for(int d) { return warps_for(d) * 32; }
constexpr int kStages = 2;              // tiles in shared memory (double buffering)
constexpr int kHeadsPerWarp = 8;        // fixed register arrays; runtime count <= 8

// Per head dim: keys per tile and query heads per block, sized so that the double-buffered
// K/V tiles plus the fp32 query rows fit A100's 163 KiB of shared memory per block:
// 128 keys x 32 heads (= 4 * kHeadsPerWarp) up to D = 128, 64 keys x 16 heads at D = 256.
__host__ __device__ constexpr int block_n_for(int d) { return d <= 128 ? 128 : 64; }
__host__ __device__ constexpr int heads_per_block_for(int d) { return d <= 128 ? 32 : 16; }
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Hardware surface: PTX wrappers, shared-memory accessors and 16-bit conversions.
// tests/decode_emulate.cpp compiles this header with a host compiler and supplies its own
// host versions of these instead.
#ifndef FASTATTN_DECODE_EMULATE
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Every load and store of shared memory in these kernels (besides the cp.async copies) goes
// through lds / sts: a plain dereference here (the same ld.shared / st.shared the raw access
// compiles to), a tracked access under the emulator (racecheck, initcheck, bank conflicts).
// V is the access width: float, int, float4, uint4, uint2, uint32_t.
template <typename V>
__device__ __forceinline__ V lds(const void* p) {
  return *reinterpret_cast<const V*>(p);
}
template <typename V>
__device__ __forceinline__ void sts(void* p, const V& v) {
  *reinterpret_cast<V*>(p) = v;
}

// 16-byte global -> shared copy; !pred zero-fills the 16 bytes and reads nothing (src must
// still be a valid address: callers pass the tensor base then).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ float2 to_float2(uint32_t bits, __half) {
  __half2 h;
  memcpy(&h, &bits, 4);
  return __half22float2(h);
}
__device__ __forceinline__ float2 to_float2(uint32_t bits, __nv_bfloat16) {
  __nv_bfloat162 h;
  memcpy(&h, &bits, 4);
  return __bfloat1622float2(h);
}
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

#endif  // FASTATTN_DECODE_EMULATE

// Element offset of (row, col) in a swizzled [rows][kD] 16-bit tile: chunk c = col / 8 of
// row r lives at chunk c ^ (r & 7). Every reader and writer goes through this function.
// D = 96 (12 chunks, a 192-byte row): chunk c of row r lives at c ^ ((r >> 1) & 3), which
// keeps chunks 0..7 and 8..11 within their own groups (c ^ (r & 7) would send 8..11 past the
// row). The 16-byte bank group of (r, chunk) is (12 r + chunk) mod 8 = 4 (r & 1) + chunk mod 8,
// so it is conflict free for the three access patterns: Q K^T's row-per-lane reads (8 lanes
// of a phase read rows 8p + j, j = 0..7), P V's row-per-warp reads (whole 128-byte spans of a
// row) and the tile loads' cp.async writes (8 consecutive chunks of a two-row run of 24).
template <int kD>
__device__ __forceinline__ int swz(int row, int col) {
  const int c = col >> 3;
  int cs;
  if constexpr (kD % 64 == 0) {
    cs = c ^ (row & 7);
  } else {
    static_assert(kD == 96, "swz: head dim 96 is the one dim that is not a multiple of 64");
    cs = c ^ ((row >> 1) & 3);
  }
  return row * kD + ((cs << 3) | (col & 7));
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Query rows of one kv head: the group's G query heads times seqlen_q query tokens, row
// i * G + g = (query i, head kvh * G + g). A block takes a slice of heads_per_block_for(d)
// consecutive rows; the rows of a slice all share the kv head, so every K/V row a block loads
// serves all of them (for seqlen_q = 1 the rows are exactly the group's heads, as before).
inline int64_t decode_slices(const DecodeParams& p) {
  const int64_t hpb = heads_per_block_for(static_cast<int>(p.d));
  return ((p.h / p.h_k) * p.seqlen_q + hpb - 1) / hpb;
}

// Launch geometry of decode_kernel: (num_splits, h_k * row slices, b), kThreads threads; the
// combine kernel (when num_splits > 1) runs b * h * seqlen_q blocks of kD threads. Host code;
// shared by decode.cu and the emulator so both launch the same grid.
inline void decode_grid(const DecodeParams& p, int64_t (&grid)[3]) {
  grid[0] = p.num_splits;
  grid[1] = p.h_k * decode_slices(p);
  grid[2] = p.b;
}

template <int kD>
struct DecodeSmem {
  static constexpr int kTileElems = block_n_for(kD) * kD;               // one K or V tile
  static constexpr size_t kKV = size_t(2) * kStages * kTileElems * 2;   // bytes, 16-bit
  static constexpr size_t kQ = size_t(heads_per_block_for(kD)) * kD * 4;  // fp32 query rows
  static constexpr size_t kP = size_t(warps_for(kD)) * kHeadsPerWarp * 32 * 4;  // per-warp probabilities
  // Per row: visible keys [lo, hi) relative to the block's first key, int32 (masking only).
  static constexpr size_t kMask = (size_t(2) * heads_per_block_for(kD) * 4 + 15) / 16 * 16;
  static constexpr size_t kBytes = kKV + kQ + kP + kMask;
  // The end-of-block merge reuses the K/V area: per warp, 8 heads x (kD outputs + m + l).
  static_assert(size_t(warps_for(kD)) * kHeadsPerWarp * (kD + 2) * 4 <= kKV, "merge area must fit");
};

// grid (num_splits, h_k * row slices, b), kThreads threads, DecodeSmem<kD>::kBytes bytes.
// The spec (paged cache, seqlen_q query tokens, key lengths, window masks) is the comment
// above DecodeParams in params.h. kSoftcap (set by the launcher on p.softcap > 0): scores are
// soft-capped (softcap.cuh): the query rows are pre-scaled by softmax_scale / softcap * 2 log2 e
// instead of softmax_scale * log2 e, and each q.k becomes softcap_tanh(q.k) * softcap * log2 e
// before masking.
template <typename T, int kD, bool kSoftcap = false>
__global__ void __launch_bounds__(threads_for(kD), 1) decode_kernel(const DecodeParams p) {
  constexpr int kWarps = warps_for(kD);
  constexpr int kThreads = kWarps * 32;
  constexpr int kBlockN = block_n_for(kD);
  constexpr int kStepsPerTile = kBlockN / 32;
  constexpr int kHeadsPerBlock = heads_per_block_for(kD);
  constexpr int kChunks = kD / 8;        // 16-byte chunks per row
  // K chunks per Q K^T iteration (kChunks is a multiple of 4). 1: the smallest loop; 2 or 4
  // trade ~110 / ~330 more instructions in the tile loop for fewer executed branches and
  // independent per-chunk FMA chains (a GPU A/B decides; the arithmetic is the same).
  constexpr int kQkChunks = 1;
  static_assert(kChunks % kQkChunks == 0, "Q K^T chunk groups");
  // P V: output dims per lane (2, 4 or 8); at D = 96, 4 dims on lanes 0..23 (kPvLanes) and
  // lanes 24..31 idle in P V (3 dims a lane would be 6-byte, unaligned reads).
  constexpr int kDimsPerLane = kD % 64 == 0 ? kD / 32 : 4;
  constexpr int kPvLanes = kD / kDimsPerLane;
  static_assert(kPvLanes <= 32 && 32 - kPvLanes <= kPvLanes - 16 && kPvLanes * kDimsPerLane == kD, "P V lane split");
  FASTATTN_DECODE_SMEM(smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kStages * DecodeSmem<kD>::kTileElems;
  float* sQ = reinterpret_cast<float*>(smem + DecodeSmem<kD>::kKV);
  float* sP = sQ + kHeadsPerBlock * kD;
  int* sLo = reinterpret_cast<int*>(sP + kWarps * kHeadsPerWarp * 32);
  int* sHi = sLo + kHeadsPerBlock;

  const int split = blockIdx.x;
  const int64_t b = blockIdx.z;
  const int group = static_cast<int>(p.h / p.h_k);
  const int rows = group * static_cast<int>(p.seqlen_q);  // query rows of a kv head (decode_slices)
  const int slices = (rows + kHeadsPerBlock - 1) / kHeadsPerBlock;
  const int kvh = blockIdx.y / slices;
  const int slice = blockIdx.y % slices;
  const int row0 = slice * kHeadsPerBlock;  // first row (query i * group + head g) of this block
  const int nhb = min(kHeadsPerBlock, rows - row0);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  // Warp roles: hs head slices of <= 8 heads, ks = kWarps / hs warps per head slice, at most
  // one warp per 32-key step of a tile (kWarps / kStepsPerTile slices at least: with 8 warps,
  // 2 at D = 96 / 128 and 4 at D = 256, each warp's heads fewer rather than warps idle).
  constexpr int kMinSlices = kWarps / kStepsPerTile > 1 ? kWarps / kStepsPerTile : 1;
  const int hs = max(kMinSlices, nhb <= kHeadsPerWarp ? 1 : (nhb <= 2 * kHeadsPerWarp ? 2 : 4));
  const int ks = kWarps / hs;
  const int hsl = warp % hs, ksl = warp / hs;
  const int nh = (nhb - hsl + hs - 1) / hs;  // heads of this warp: hsl + hs * i, i < nh

  // Keys [0, len) exist; query i sits at pos_i = len - seqlen_q + i. With a left window no
  // row sees a key before kbeg = pos_0 - window_left, so the splits cut [kbeg, len) and the
  // dead keys are never loaded (for seqlen_q = 1 that is exactly the one row's window).
  const int64_t len = min(max(static_cast<int64_t>(p.cache_seqlens[b]) + p.seqlens_k_add, int64_t(0)), p.seqlen_k_max);
  // (Window sides may be as large as int64 allows: compare before subtracting or adding.)
  const int64_t pos0 = len - p.seqlen_q;
  const int64_t kbeg = p.window_left >= 0 && p.window_left < pos0 ? pos0 - p.window_left : int64_t(0);
  int64_t begin, end;
  decode::split_range(len - kbeg, p.num_splits, split, kBlockN, &begin, &end);
  begin += kbeg;
  end += kbeg;
  const int n_tiles = static_cast<int>((end - begin + kBlockN - 1) / kBlockN);

  // Per-row masks, needed only with several query rows and a window: for one row (seqlen_q =
  // 1) the right side never cuts (pos = len - 1) and kbeg is the left side. Row r sees the
  // keys begin + [sLo[r], sHi[r]) (int32: decode_cuda_supports_layout bounds seqlen_k_max).
  // A 32-key step inside [edge_lo, edge_hi) is visible to every row of the block and skips
  // the per-row test: bounds grow with the query index, so that is [lo of the last row, hi of
  // the first row). Without masking the range is everything and no step is an edge step.
  int edge_lo = 0, edge_hi = 0x7fffffff;
  if (p.seqlen_q > 1 && (p.window_left >= 0 || p.window_right >= 0)) {
    const int64_t span = end - begin;
    auto rel = [&](int64_t key) { return static_cast<int>(min(max(key - begin, int64_t(0)), span)); };
    auto lo_of = [&](int r) {  // pos - window_left, or 0 when that is <= 0
      const int64_t pos = pos0 + r / group;
      return rel(p.window_left >= 0 && p.window_left < pos ? pos - p.window_left : int64_t(0));
    };
    auto hi_of = [&](int r) {  // pos + window_right + 1, or len when that is >= len
      const int64_t pos = pos0 + r / group;
      return rel(p.window_right >= 0 && p.window_right < len - pos - 1 ? pos + p.window_right + 1 : len);
    };
    for (int r = tid; r < nhb; r += kThreads) {
      sts<int>(sLo + r, lo_of(row0 + r));
      sts<int>(sHi + r, hi_of(row0 + r));
    }
    edge_lo = lo_of(row0 + nhb - 1);
    edge_hi = hi_of(row0);
  }

  // Every cache row address comes from KvLayout (contiguous or paged; page indices clamped).
  // K and V share the page table but not their strides. A 16-byte chunk never crosses a row,
  // so any page size works.
  const KvLayout k_layout{p.k_batch_stride, p.k_row_stride, p.block_table, p.block_table_batch_stride,
                          p.page_size, p.num_pages};
  const KvLayout v_layout{p.v_batch_stride, p.v_row_stride, p.block_table, p.block_table_batch_stride,
                          p.page_size, p.num_pages};
  const T* k_base = static_cast<const T*>(p.k_cache) + kvh * p.k_head_stride;
  const T* v_base = static_cast<const T*>(p.v_cache) + kvh * p.v_head_stride;

  // Tile loads: kLanesPerRow lanes share a row (kChunks of them, or 4 at D = 96, whose 12
  // chunks do not tile a warp), each copying kChunkReps chunks (lane % kLanesPerRow + m *
  // kLanesPerRow) of it; in iteration k thread tid copies tile row tid / kLanesPerRow + k *
  // kRowsPerIter. kRowsPerIter is a multiple of 8, so a thread's row % 8, and with it every
  // swizzled shared-memory offset, is the same in every iteration (only a k * row stride
  // apart). A warp copies whole 16-byte-chunk runs of rows: coalesced. A paged row
  // address costs a page-table read and a 64-bit division, and kLanesPerRow threads share each row,
  // so there each lane of a warp looks up ONE of the <= 32 rows its warp copies in the tile
  // and the others fetch it by shuffle (warp-uniform branch; the contiguous path is as before).
  constexpr int kLanesPerRow = kChunks % 8 == 0 ? kChunks : 4;
  constexpr int kChunkReps = kChunks / kLanesPerRow;
  constexpr int kRowsPerIter = kThreads / kLanesPerRow;
  constexpr int kWarpRows = 32 / kLanesPerRow;  // rows per warp per iteration
  constexpr int kIters = kBlockN / kRowsPerIter;
  static_assert(kLanesPerRow * kChunkReps == kChunks && 32 % kLanesPerRow == 0 && kBlockN % kRowsPerIter == 0 &&
                kIters * kWarpRows <= 32, "row lookup per lane");
  static_assert(kD % 64 == 0 || kRowsPerIter % 8 == 0, "D = 96: a thread's row % 8 fixed over the iterations");
  auto load_tile = [&](int tile, int stage) {
    const int64_t key0 = begin + int64_t(tile) * kBlockN;
    T* dk = sK + stage * DecodeSmem<kD>::kTileElems;
    T* dv = sV + stage * DecodeSmem<kD>::kTileElems;
    const int c0 = tid % kLanesPerRow;
    if (p.block_table == nullptr) {
      // The contiguous layouts spelled with a null table, so that row_offset is the plain
      // b * batch_stride + t * row_stride here (the compiler does not carry the branch's
      // block_table == nullptr into k_layout and kept the paged path, divisions included).
      const KvLayout k_rows{p.k_batch_stride, p.k_row_stride, nullptr, 0, 1, 1};
      const KvLayout v_rows{p.v_batch_stride, p.v_row_stride, nullptr, 0, 1, 1};
#pragma unroll 1
      for (int k = 0; k < kIters; ++k) {
        const int r = tid / kLanesPerRow + k * kRowsPerIter;
        const bool ok = key0 + r < end;
#pragma unroll
        for (int m = 0; m < kChunkReps; ++m) {
          const int c = c0 + m * kLanesPerRow;
          const T* sk = ok ? k_base + k_rows.row_offset(b, key0 + r) + c * 8 : k_base;
          const T* sv = ok ? v_base + v_rows.row_offset(b, key0 + r) + c * 8 : v_base;
          cp_async16(smem_u32(dk + swz<kD>(r, c * 8)), sk, ok);
          cp_async16(smem_u32(dv + swz<kD>(r, c * 8)), sv, ok);
        }
      }
    } else {
      // Lane L: row of iteration L / kWarpRows, sub-row L % kWarpRows of this warp.
      const int64_t lkey = key0 + (lane / kWarpRows) * kRowsPerIter + warp * kWarpRows + lane % kWarpRows;
      const bool lok = lane / kWarpRows < kIters && lkey < end;  // only then is the table read
      const int64_t koff = lok ? k_layout.row_offset(b, lkey) : 0;
      const int64_t voff = lok ? v_layout.row_offset(b, lkey) : 0;
#pragma unroll 1
      for (int k = 0; k < kIters; ++k) {
        const int r = tid / kLanesPerRow + k * kRowsPerIter;
        const int src = k * kWarpRows + lane / kLanesPerRow;  // the lane that looked row r up
        const long long ko = __shfl_sync(0xffffffffu, static_cast<long long>(koff), src);
        const long long vo = __shfl_sync(0xffffffffu, static_cast<long long>(voff), src);
        const bool ok = key0 + r < end;  // and then key0 + r < len: inside the page table
#pragma unroll
        for (int m = 0; m < kChunkReps; ++m) {
          const int c = c0 + m * kLanesPerRow;
          const T* sk = ok ? k_base + ko + c * 8 : k_base;
          const T* sv = ok ? v_base + vo + c * 8 : v_base;
          cp_async16(smem_u32(dk + swz<kD>(r, c * 8)), sk, ok);
          cp_async16(smem_u32(dv + swz<kD>(r, c * 8)), sv, ok);
        }
      }
    }
  };

  if (n_tiles > 0) load_tile(0, 0);
  cp_async_commit();

  // Query rows of the block, fp32, pre-scaled so the softmax runs on exp2. Row r is query
  // r / group of head kvh * group + r % group.
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride;
    const float qscale = kSoftcap ? p.softmax_scale / p.softcap * kSoftcapTwoLog2e : p.softmax_scale * kLog2e;
    for (int i = tid; i < nhb * kD; i += kThreads) {
      const int hb = i / kD, dd = i % kD;
      const int r = row0 + hb;
      const int64_t qi = r / group, head = int64_t(kvh) * group + r % group;
      sts<float>(sQ + hb * kD + dd, to_float(q[qi * p.q_row_stride + head * p.q_head_stride + dd]) * qscale);
    }
  }

  float m[kHeadsPerWarp], l[kHeadsPerWarp], acc[kHeadsPerWarp][kDimsPerLane];
#pragma unroll
  for (int i = 0; i < kHeadsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int e = 0; e < kDimsPerLane; ++e) acc[i][e] = 0.f;
  }
  float* myP = sP + warp * kHeadsPerWarp * 32;

  // Code size: the tile loop is streamed by every warp once per tile, so it is kept small
  // enough for the SM's instruction caches. Only loops over register arrays are unrolled
  // (the kHeadsPerWarp heads, a chunk's 8 dims, a lane's P V dims, the 4 keys of a p4 load);
  // the loops over the chunks of a K row, the 32-key P V step and the tile-load iterations are
  // rolled (#pragma unroll 1). Fully unrolled, the kChunks x kHeadsPerWarp QK^T nest, the PV
  // loop and the two inlined tile loads made the loop 3700-7600 instructions (60-120 KB) long.
  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) {
      load_tile(t + 1, (t + 1) % kStages);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile t (and, the first time, sQ) visible to every warp
    const T* tK = sK + (t % kStages) * DecodeSmem<kD>::kTileElems;
    const T* tV = sV + (t % kStages) * DecodeSmem<kD>::kTileElems;
    const int64_t tile_row0 = begin + int64_t(t) * kBlockN;

    for (int st = ksl; st < kStepsPerTile; st += ks) {
      if (tile_row0 + st * 32 >= end) break;  // warp-uniform: the rest of the tile is empty
      // Q K^T: lane owns key row st * 32 + lane of the tile.
      const int row = st * 32 + lane;
      const bool valid = tile_row0 + row < end;
      float s[kHeadsPerWarp];
#pragma unroll
      for (int i = 0; i < kHeadsPerWarp; ++i) s[i] = 0.f;
      // kQkChunks chunks of the row per iteration, one branch per head over all of them
      // (each head still sums its chunks in order c = 0, 1, ...).
#pragma unroll 1
      for (int c0 = 0; c0 < kChunks; c0 += kQkChunks) {
        float kf[kQkChunks][8];
#pragma unroll
        for (int g = 0; g < kQkChunks; ++g) {
          const int c = c0 + g;
          const uint4 kraw = lds<uint4>(tK + swz<kD>(row, c * 8));
          const float2 k01 = to_float2(kraw.x, T()), k23 = to_float2(kraw.y, T());
          const float2 k45 = to_float2(kraw.z, T()), k67 = to_float2(kraw.w, T());
          kf[g][0] = k01.x; kf[g][1] = k01.y; kf[g][2] = k23.x; kf[g][3] = k23.y;
          kf[g][4] = k45.x; kf[g][5] = k45.y; kf[g][6] = k67.x; kf[g][7] = k67.y;
        }
#pragma unroll
        for (int i = 0; i < kHeadsPerWarp; ++i) {
          if (i < nh) {
            const float* qr = sQ + (hsl + hs * i) * kD + c0 * 8;
#pragma unroll
            for (int g = 0; g < kQkChunks; ++g) {
              const float4 qa = lds<float4>(qr + g * 8);
              const float4 qb = lds<float4>(qr + g * 8 + 4);
              s[i] += qa.x * kf[g][0] + qa.y * kf[g][1] + qa.z * kf[g][2] + qa.w * kf[g][3] +
                      qb.x * kf[g][4] + qb.y * kf[g][5] + qb.z * kf[g][6] + qb.w * kf[g][7];
            }
          }
        }
      }
      if constexpr (kSoftcap) {  // cap before the mask, as the spec says (a masked key is -inf either way)
        const float post = p.softcap * kLog2e;
#pragma unroll
        for (int i = 0; i < kHeadsPerWarp; ++i) {
          if (i < nh) s[i] = softcap_tanh(s[i]) * post;
        }
      }
      // Masked keys (edge steps only; `edge` is warp-uniform) score -inf like keys past `end`.
      const int rel0 = t * kBlockN + st * 32;
      if (rel0 < edge_lo || rel0 + 32 > edge_hi) {
        const int j = rel0 + lane;
#pragma unroll
        for (int i = 0; i < kHeadsPerWarp; ++i) {
          if (i < nh) {
            const int hb = hsl + hs * i;
            const int lo = lds<int>(sLo + hb), hi = lds<int>(sHi + hb);
            if (j < lo || j >= hi) s[i] = -INFINITY;
          }
        }
      }
      // Online softmax (log2 domain), per head; the running max is warp-uniform.
#pragma unroll
      for (int i = 0; i < kHeadsPerWarp; ++i) {
        if (i < nh) {
          const float si = valid ? s[i] : -INFINITY;
          const float m_new = fmaxf(m[i], warp_max(si));
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          const float alpha = exp2f(m[i] - m_use);  // 0 while m[i] is still -inf
          const float pr = exp2f(si - m_use);
          l[i] = l[i] * alpha + pr;
          m[i] = m_new;
#pragma unroll
          for (int e = 0; e < kDimsPerLane; ++e) acc[i][e] *= alpha;
          sts<float>(myP + i * 32 + lane, pr);
        }
      }
      __syncwarp();
      // P V: lane owns output dims [lane * kDimsPerLane, +kDimsPerLane); one warp load
      // reads a whole V row (zero-filled past `end`, where p is 0 too). At D = 96 lanes
      // 24..31 own no dims: they repeat lanes 16..23's reads (the same words in the same
      // 8-byte phase: no extra wavefront, no divergence) and their sums are never stored.
      const int col = (lane < kPvLanes ? lane : lane - (32 - kPvLanes)) * kDimsPerLane;
      // Four keys per iteration: their V rows first, then one branch per head that applies
      // all four (each acc[i][e] still adds keys in order j4, j4 + 1, j4 + 2, j4 + 3).
#pragma unroll 1
      for (int j4 = 0; j4 < 32; j4 += 4) {
        float vf[4][kDimsPerLane];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const T* vp = tV + swz<kD>(st * 32 + j4 + u, col);
          if constexpr (kDimsPerLane == 8) {
            const uint4 raw = lds<uint4>(vp);
            const float2 a = to_float2(raw.x, T()), c2 = to_float2(raw.y, T());
            const float2 e = to_float2(raw.z, T()), f = to_float2(raw.w, T());
            vf[u][0] = a.x; vf[u][1] = a.y; vf[u][2] = c2.x; vf[u][3] = c2.y;
            vf[u][4] = e.x; vf[u][5] = e.y; vf[u][6] = f.x; vf[u][7] = f.y;
          } else if constexpr (kDimsPerLane == 4) {
            const uint2 raw = lds<uint2>(vp);
            const float2 a = to_float2(raw.x, T()), c2 = to_float2(raw.y, T());
            vf[u][0] = a.x; vf[u][1] = a.y; vf[u][2] = c2.x; vf[u][3] = c2.y;
          } else {
            const float2 a = to_float2(lds<uint32_t>(vp), T());
            vf[u][0] = a.x; vf[u][1] = a.y;
          }
        }
#pragma unroll
        for (int i = 0; i < kHeadsPerWarp; ++i) {
          if (i < nh) {
            const float4 p4 = lds<float4>(myP + i * 32 + j4);
            const float pu[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
#pragma unroll
              for (int e = 0; e < kDimsPerLane; ++e) acc[i][e] += pu[u] * vf[u][e];
            }
          }
        }
      }
      __syncwarp();  // myP is rewritten by the next step
    }
    __syncthreads();  // every warp is done with stage t % kStages before it is refilled
  }
  cp_async_wait<0>();

  // Merge the ks warps of each head slice: the K/V area is free now.
  float* sAcc = reinterpret_cast<float*>(smem);                 // [warp][8][kD]
  float* sM = sAcc + kWarps * kHeadsPerWarp * kD;                // [warp][8]
  float* sL = sM + kWarps * kHeadsPerWarp;                       // [warp][8]
  // Each lane stores its kDimsPerLane outputs of a head as one 8- or 16-byte vector (two at
  // D = 256); then lane 0 the warp-uniform running max and sum of every head.
#pragma unroll
  for (int i = 0; i < kHeadsPerWarp; ++i) {
    if (i < nh) {
      l[i] = warp_sum(l[i]);
      if (kPvLanes < 32 && lane >= kPvLanes) continue;  // (D = 96: no dims on this lane)
      float* dst = sAcc + (warp * kHeadsPerWarp + i) * kD + lane * kDimsPerLane;
      if constexpr (kDimsPerLane == 2) {
        sts<float2>(dst, make_float2(acc[i][0], acc[i][1]));
      } else {
#pragma unroll
        for (int e = 0; e < kDimsPerLane; e += 4)
          sts<float4>(dst + e, make_float4(acc[i][e], acc[i][e + 1], acc[i][e + 2], acc[i][e + 3]));
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kHeadsPerWarp; ++i) {
      if (i < nh) {
        sts<float>(sM + warp * kHeadsPerWarp + i, m[i]);
        sts<float>(sL + warp * kHeadsPerWarp + i, l[i]);
      }
    }
  }
  __syncthreads();

  for (int idx = tid; idx < nhb * kD; idx += kThreads) {
    const int hb = idx / kD, dd = idx % kD;
    const int hslice = hb % hs, i = hb / hs;
    float mx = -INFINITY;
    for (int w = hslice; w < kWarps; w += hs) mx = fmaxf(mx, lds<float>(sM + w * kHeadsPerWarp + i));
    // A NaN score (a NaN in q, or in a key the row sees) leaves the warp's max alone (fmaxf)
    // but makes its l NaN: merged through here (a warp is skipped only when it saw no key,
    // l = 0), so the row comes out NaN, out and lse, as torch's attention does, not 0 / -inf.
    const float m_use = mx == -INFINITY ? 0.f : mx;
    float lsum = 0.f, o = 0.f;
    for (int w = hslice; w < kWarps; w += hs) {
      const float lw = lds<float>(sL + w * kHeadsPerWarp + i);
      if (lw == 0.f) continue;
      const float wgt = exp2f(lds<float>(sM + w * kHeadsPerWarp + i) - m_use);
      lsum += wgt * lw;
      o += wgt * lds<float>(sAcc + (w * kHeadsPerWarp + i) * kD + dd);
    }
    const bool any = lsum != 0.f;  // (NaN included)
    o = any ? o / lsum : 0.f;
    const float lse = any ? (m_use + __log2f(lsum)) * kLn2 : -INFINITY;
    const int r = row0 + hb;
    const int64_t qi = r / group, head = int64_t(kvh) * group + r % group;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[b * p.out_batch_stride + qi * p.out_row_stride + head * p.out_head_stride + dd] =
          from_float<T>(o);
      if (dd == 0) p.lse[(b * p.h + head) * p.seqlen_q + qi] = lse;
    } else {
      const int64_t pr = ((int64_t(split) * p.b + b) * p.h + head) * p.seqlen_q + qi;
      p.out_partial[pr * kD + dd] = o;
      if (dd == 0) p.lse_partial[pr] = lse;
    }
  }
}

// Exact merge of the split partials: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s -
// lse) out_s. One block of kD threads per (b, head, query i) row, splits in order; rows are
// numbered as lse: r = (b * h + head) * seqlen_q + i.
template <typename T, int kD>
__global__ void __launch_bounds__(kD) decode_combine_kernel(const DecodeParams p) {
  const int64_t r = blockIdx.x;
  const int64_t qi = r % p.seqlen_q, bh = r / p.seqlen_q;
  const int64_t b = bh / p.h, head = bh % p.h;
  const int dd = threadIdx.x;
  const int64_t rows = p.b * p.h * p.seqlen_q;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.lse_partial[s * rows + r]);
  // A split whose row is NaN (lse NaN, see the merge above) is merged through, not skipped:
  // the row comes out NaN. Only empty splits (lse -inf) are skipped.
  const float m_use = mx == -INFINITY ? 0.f : mx;
  float sum = 0.f, o = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    const float ls = p.lse_partial[s * rows + r];
    if (ls == -INFINITY) continue;
    const float w = __expf(ls - m_use);
    sum += w;
    o += w * p.out_partial[(s * rows + r) * kD + dd];
  }
  const bool any = sum != 0.f;  // (NaN included)
  static_cast<T*>(p.out)[b * p.out_batch_stride + qi * p.out_row_stride + head * p.out_head_stride + dd] =
      from_float<T>(any ? o / sum : 0.f);
  if (dd == 0) p.lse[r] = any ? m_use + __logf(sum) : -INFINITY;
}

// append_kv: one VecT (16 bytes, or one element) per thread iteration, grid-stride. The
// destination row comes from KvLayout (contiguous or paged, page indices clamped).
template <typename VecT>
__global__ void append_kv_kernel(const AppendKvParams p, const int64_t elem_bytes) {
  const KvLayout kc{p.k_cache_batch_stride, p.k_cache_row_stride, p.block_table, p.block_table_batch_stride,
                    p.page_size, p.num_pages};
  const KvLayout vc{p.v_cache_batch_stride, p.v_cache_row_stride, p.block_table, p.block_table_batch_stride,
                    p.page_size, p.num_pages};
  const int64_t vec_elems = int64_t(sizeof(VecT)) / elem_bytes;
  const int64_t row_vecs = p.d / vec_elems;
  const int64_t total = p.b * p.seqlen_new * p.h_k * row_vecs;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % row_vecs;
    int64_t rest = idx / row_vecs;
    const int64_t hk = rest % p.h_k;
    rest /= p.h_k;
    const int64_t i = rest % p.seqlen_new;
    const int64_t b = rest / p.seqlen_new;
    const int64_t pos = int64_t(p.cache_seqlens[b]) + i;
    if (pos < 0 || pos >= p.seqlen_k_max) continue;  // never write outside the cache
    const int64_t col = c * vec_elems;
    const char* ks = static_cast<const char*>(p.k) +
                     elem_bytes * (b * p.k_batch_stride + i * p.k_row_stride + hk * p.k_head_stride + col);
    const char* vs = static_cast<const char*>(p.v) +
                     elem_bytes * (b * p.v_batch_stride + i * p.v_row_stride + hk * p.v_head_stride + col);
    char* kd = static_cast<char*>(p.k_cache) + elem_bytes * (kc.row_offset(b, pos) + hk * p.k_cache_head_stride + col);
    char* vd = static_cast<char*>(p.v_cache) + elem_bytes * (vc.row_offset(b, pos) + hk * p.v_cache_head_stride + col);
    *reinterpret_cast<VecT*>(kd) = *reinterpret_cast<const VecT*>(ks);
    *reinterpret_cast<VecT*>(vd) = *reinterpret_cast<const VecT*>(vs);
  }
}

}  // namespace decode_kernels
}  // namespace fastattn
