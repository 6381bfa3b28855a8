// decode_mma.cuh — tensor-core (mma.sync.m16n8k16) decode for grouped-KV heads:
// seqlen_q == 1, any group G = h / h_k (above 32 in head slices of <= 32 heads), no
// soft-capping, head dims 64 and 128,
// fp16 / bf16, contiguous or paged caches, split-KV with the same partial / lse outputs as
// decode_kernel (decode_kernels.cuh), merged by the same decode_combine_kernel. Everything
// else stays on decode_kernel (decode_launch.cuh chooses).
//
// What it computes: for one (batch b, kv head, split) block, the G query heads sharing the kv
// head form a tiny GEMM pair, S[G x N] = Q[G x D] K^T and O += P[G x N] V, with the online
// softmax in between (log2 domain, as decode_kernel). G is padded to kMTiles m16 tiles (one
// for G <= 16, two for G <= 32; padding rows are zero queries whose results are never
// stored), so the math runs on mma.m16n8k16 with fp32 accumulation:
//   * Q K^T: A = Q (16-bit, unscaled, in shared memory, ldmatrix non-trans), B = K via a
//     non-transposed ldmatrix of [key][dim] rows (flash_fwd_kernel.cuh's K lane roles: one
//     x4 gives both n8 key tiles of a k16 dim slice as adjacent register pairs).
//   * P V: the S accumulators of the two n8 key tiles ARE the A fragment of one k16 key
//     slice after packing to 16 bit in registers (no shared-memory round trip), and V comes
//     through ldmatrix.trans of [key][dim] rows, exactly as in the flash forward kernel.
//   The fragment layouts are the ones written out in flash_fwd_kernel.cuh's header.
//
// Why it is fast. decode_kernel does G * D fp32 FMAs per key for each of Q K^T and P V on
// CUDA cores; at G = 4 on H200 it reached 22% of copy bandwidth, at G = 32 8% (FMA and
// shared-memory-read bound). Here one warp-wide HMMA does 16 x 8 x 16 MACs, so per 16-key
// step a warp issues D / 8 HMMA for Q K^T and D / 8 for P V per m-tile (d128: 32 HMMA and
// 16 LDSM) instead of 16 * G * D / 32 FMAs a lane: the math stops being the bound even with
// the 4x padding waste at G = 4, and the kernel is left to stream K/V at full width.
// Groups 1..3 (multi-head attention and small GQA groups) run here too: their math is 16x /
// 5x padding, still far below the tensor cores' rate at memory speed, and they get this
// kernel's streaming (8 warps per SM, no loop barriers), which on the H200 reached 52-71% of
// copy where decode_kernel, before its restructuring, sat at 8-22% (whether the restructured
// decode_kernel would do better at G < 4 was never measured). Groups above 32 (MQA with
// many heads: StarCoder's 48, Falcon-7B's 71) are cut into decode_mma_slices(G) blocks per kv
// head of at most 32 heads, each streaming the kv head's keys (K/V read once per slice, as
// decode_kernel's 32-row slices do).
//   * Work split: 4 warps per block, each warp an independent flash-decoding stream over
//     16-key steps (warp w takes steps w, w + 4, w + 8, ... of the block's key range) with
//     its OWN 3-stage cp.async ring of 16-row K and V slabs: a warp loads exactly the rows it
//     consumes, so the main loop has no __syncthreads at all (wait_group + __syncwarp), and
//     two stages per warp (16 KiB at d128) are always in flight: 8 warps per SM (two blocks
//     fit: 104 KiB of shared memory at d128, 52 KiB at d64) keep ~128 KiB of loads in flight,
//     several times the bandwidth-latency product of an SM. On parts with 99 KiB of shared
//     memory per block (sm_86 / sm_89 / sm_120) the d128 kernel runs a 2-stage ring instead
//     (kStages = kMmaStagesCompact, 72 KiB: one slab in flight per warp while it reads the
//     other; chosen from DecodeParams::smem_per_block_optin). The warps' (max, sum, O) are
//     merged through shared memory at the end, like decode_kernel's warp merge.
//   * Shared-memory rows are XOR-swizzled exactly as decode_kernel's (swz: chunk c of row r at
//     c ^ (r & 7)), so every ldmatrix phase (8 rows at one logical chunk) and every 8-chunk
//     cp.async run is conflict free.
//   * Slab copies: 8 lanes per 128-byte line, so every cp.async instruction reads 4 whole
//     lines (lane L: rows (L >> 3) + 4 j, chunks 8 h + (L & 7)); a lane computes 4 row
//     addresses per step, contiguous or paged (one page-table read and 32-bit division per
//     row serve K and V). The shared-memory offsets of the copies (two per lane) and of every
//     ldmatrix (four per lane) are per-lane registers plus immediates (the flash forward
//     kernel's trick). Main loop, d128 one m-tile: SASS counts per 16-key step of a warp in
//     scripts/sass_baseline.json (32 HMMA, 16 LDSM with Q held in registers, 16 LDGSTS).
//   * Windows: with seqlen_q = 1 only the left side cuts (kbeg, the same rule as
//     decode_kernel): the key range is [kbeg, len), split by the same decode::split_range.
// Registers: O is kMTiles x D / 8 x 4 fp32 per lane (128 at d128 with two m-tiles), under
// __launch_bounds__(128, 2)'s 255.
#pragma once

#include <cstdint>
#include <cstdlib>

#include "decode_kernels.cuh"

namespace fastattn {
namespace decode_kernels {

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kMmaWarpN = 16;  // keys per warp step (one k16 slice of P V)
constexpr int kMmaStages = 3;  // per-warp K/V slab ring
// At d128 three stages take 104 KiB of shared memory, more than the 99 KiB per block of
// sm_86 / sm_89 / sm_120 parts (RTX 30xx / 40xx / 50xx, A10, A40, L4, L40S): there the kernel
// runs with two (72 KiB; the next slab still streams in under each slab's math).
constexpr int kMmaStagesCompact = 2;

// Is (p) a call the tensor-core kernel takes? (The launcher also needs !softcap, kD in {64, 128}.)
// Off switch, for A/B timing on a GPU (scripts/gpu_ab_decode.py): FASTATTN_DECODE_MMA=0 in the
// environment (read once) sends these shapes to decode_kernel, splits sized for it; the
// emulator has its own switch.
#if defined(FASTATTN_DECODE_EMULATE)
bool emu_decode_mma_enabled();  // tests/decode_emulate.cpp: off runs decode_kernel on these shapes too
inline bool decode_mma_enabled() { return emu_decode_mma_enabled(); }
#else
inline bool decode_mma_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("FASTATTN_DECODE_MMA");
    return env == nullptr || env[0] != '0';
  }();
  return enabled;
}
#endif
inline bool decode_mma_applies(const DecodeParams& p) {
  if (!decode_mma_enabled()) return false;
  if (p.seqlen_q != 1 || p.h_k < 1 || p.softcap > 0.f) return false;
  return p.h % p.h_k == 0 && p.h >= p.h_k && (p.d == 64 || p.d == 128);
}

// Head slices: a group of more than 32 query heads per kv head (MQA with many heads, e.g. 48
// or 71) is cut into decode_mma_slices(G) blocks per kv head of decode_mma_rows(G) <= 32
// heads each (evenly: 71 = 24 + 24 + 23), each streaming the kv head's keys; G <= 32 is one.
__host__ __device__ inline int decode_mma_slices(int64_t group) { return static_cast<int>((group + 31) / 32); }
__host__ __device__ inline int decode_mma_rows(int64_t group) {
  const int slices = decode_mma_slices(group);
  return static_cast<int>((group + slices - 1) / slices);
}

template <int kD, int kStages = kMmaStages>
struct DecodeMmaSmem {
  static constexpr int kSlabElems = kMmaWarpN * kD;  // one warp's K (or V) slab
  static constexpr size_t kKV = size_t(kMmaWarps) * kStages * 2 * kSlabElems * 2;
  static constexpr size_t kQ = size_t(32) * kD * 2;  // up to two m16 tiles of 16-bit Q rows
  static constexpr size_t kBytes = kKV + kQ;
  // End-of-block merge, over the K/V and Q areas (both done with by then): per warp 32 rows x
  // (kD + 8) fp32 (padded so the float2 stores of a quad's 8 rows fall in distinct banks), then
  // per warp 32 maxima and sums.
  static constexpr int kAccStride = kD + 8;
  static_assert(size_t(kMmaWarps) * 32 * (kAccStride + 2) * 4 <= kBytes, "merge area must fit");
};

// The stage count the launcher picks for p: kMmaStages, or kMmaStagesCompact at d128 when the
// device's opt-in limit (p.smem_per_block_optin, 0 = not known) is below the 3-stage block.
inline bool decode_mma_compact(const DecodeParams& p) {
  return p.d == 128 && p.smem_per_block_optin > 0 &&
         p.smem_per_block_optin < int64_t(DecodeMmaSmem<128>::kBytes);
}
inline int64_t decode_mma_smem_bytes(const DecodeParams& p) {
  if (p.d <= 64) return int64_t(DecodeMmaSmem<64>::kBytes);
  return int64_t(decode_mma_compact(p) ? DecodeMmaSmem<128, kMmaStagesCompact>::kBytes : DecodeMmaSmem<128>::kBytes);
}

#ifndef FASTATTN_DECODE_EMULATE
__device__ __forceinline__ void dmma_ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void dmma_ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
template <typename T>
struct DmmaOps;
template <>
struct DmmaOps<__half> {
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <>
struct DmmaOps<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
#endif  // FASTATTN_DECODE_EMULATE

// grid (num_splits, h_k * slices, b), kMmaThreads threads, DecodeMmaSmem<kD, kStages>::kBytes
// bytes.
// Rows of the block: heads kvh * G + slice * decode_mma_rows(G) + r, r < its slice's rows
// <= 16 * kMTiles.
// Blocks per SM the registers must allow (decode_num_splits_cuda counts on them): 4 at d64
// with one m-tile (<= 128 registers), 3 with two (<= 168), 2 at d128 (<= 255).
template <int kD, int kMTiles>
constexpr int kMmaMinBlocks = kD == 64 ? (kMTiles == 1 ? 4 : 3) : 2;

template <typename T, int kD, int kMTiles, int kStages = kMmaStages>
__global__ void __launch_bounds__(kMmaThreads, kMmaMinBlocks<kD, kMTiles>) decode_mma_kernel(const DecodeParams p) {
  using Ops = DmmaOps<T>;
  using Smem = DecodeMmaSmem<kD, kStages>;
  constexpr int kChunks = kD / 8;
  constexpr int kNTilesO = kD / 8;
  constexpr int kSlab = Smem::kSlabElems;
  static_assert(kD % 64 == 0, "swz: chunk c ^ (r & 7)");
  static_assert(kStages >= 2, "one slab in flight while the current one is read");
  FASTATTN_DECODE_SMEM(smem);
  T* sKV = reinterpret_cast<T*>(smem);  // [warp][stage][K, V][16 rows][kD]
  T* sQ = reinterpret_cast<T*>(smem + Smem::kKV);

  const int split = blockIdx.x;
  // (32-bit: head counts fit; the grid limits cap h_k * slices at 65535)
  const int group = static_cast<int>(p.h / p.h_k);
  const int slices = decode_mma_slices(group), rows_per_slice = decode_mma_rows(group);
  const int kvh = static_cast<int>(blockIdx.y) / slices;
  const int slice = static_cast<int>(blockIdx.y) - kvh * slices;
  const int rows = min(rows_per_slice, group - slice * rows_per_slice);  // heads of this block
  const int head0 = kvh * group + slice * rows_per_slice;                 // its first head
  const int64_t b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  // Key range: [kbeg, len) cut by split_range, as decode_kernel (seqlen_q = 1: pos = len - 1).
  const int64_t len = min(max(static_cast<int64_t>(p.cache_seqlens[b]) + p.seqlens_k_add, int64_t(0)), p.seqlen_k_max);
  const int64_t pos0 = len - 1;
  const int64_t kbeg = p.window_left >= 0 && p.window_left < pos0 ? pos0 - p.window_left : int64_t(0);
  int64_t begin, end;
  decode::split_range(len - kbeg, p.num_splits, split, kMmaWarps * kMmaWarpN, &begin, &end);
  begin += kbeg;
  end += kbeg;
  const int n_steps = static_cast<int>((end - begin + kMmaWarpN - 1) / kMmaWarpN);
  const int n_mine = n_steps > warp ? (n_steps - warp + kMmaWarps - 1) / kMmaWarps : 0;

  const T* k_base = static_cast<const T*>(p.k_cache) + kvh * p.k_head_stride;
  const T* v_base = static_cast<const T*>(p.v_cache) + kvh * p.v_head_stride;
  const uint32_t my_kv = smem_u32(sKV + warp * kStages * 2 * kSlab);
  constexpr uint32_t kSlabBytes = kSlab * 2;
  constexpr uint32_t kRowBytes = kD * 2;

  // Per-lane shared-memory offsets (flash_fwd_kernel.cuh's trick). Lane roles: Q and V
  // ldmatrix and the slab copies: row lane & 15, chunk 2 i + (lane >> 4); K ldmatrix: row
  // (lane & 7) + 8 (lane >> 4), chunk 2 i + ((lane >> 3) & 1). Every such row is (a multiple
  // of 8) + (lane & 7), so its swizzle key is lane & 7, and for i = 4 i_hi + i_lo
  //   swz offset of chunk 2 i + h = i_hi * 128 + ((2 i_lo) ^ (h ^ (lane & 7))) * 16 bytes:
  // four per-lane offsets plus immediates address every ldmatrix and cp.async of the loop.
  uint32_t ld_off[4], ldk_off[4];
  {
    const int z = (lane >> 4) ^ (lane & 7);
    const int zk = ((lane >> 3) & 1) ^ (lane & 7);
    const int rk = (lane & 7) + ((lane >> 4) << 3);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      ld_off[i] = static_cast<uint32_t>((lane & 15) * kRowBytes + (((2 * i) ^ z) << 4));
      ldk_off[i] = static_cast<uint32_t>(rk * kRowBytes + (((2 * i) ^ zk) << 4));
    }
  }

  // Slab load of the warp's i-th step (keys begin + (i * kMmaWarps + warp) * 16 + [0, 16)):
  // 8 lanes per 128-byte line, so each cp.async instruction of the warp reads 4 whole lines:
  // lane L copies chunks 8 h + (L & 7), h < kD / 64, of rows (L >> 3) + 4 j, j < 4. (The
  // row-per-lane copy before it read 16 rows x 32 bytes per instruction, 4x the L2 requests
  // per byte; on the H200 it streamed at 68% of DRAM bandwidth with the L2 88% busy, ncu.)
  // The four rows' offsets, K and V, are all computed before the first copy is issued.
  // Shared memory: chunk c of row r sits at c ^ (r & 7) (swz), and r & 7 = (L >> 3) +
  // 4 (j & 1), so a destination is cp_off[j & 1] plus immediates; an 8-lane phase writes one
  // row's 128 bytes, all 8 bank groups. Rows past `end` are
  // zero-filled (their scores are masked to -inf, and zero V rows times p = 0 add nothing);
  // their source is the tensor base (nothing is read).
  uint32_t cp_off[2];
#pragma unroll
  for (int jj = 0; jj < 2; ++jj)
    cp_off[jj] = static_cast<uint32_t>((lane >> 3) * kRowBytes + (((lane & 7) ^ ((lane >> 3) + 4 * jj)) << 4));
  auto load_slab = [&](int i, int stage) {
    const int64_t key0 = begin + (int64_t(i) * kMmaWarps + warp) * kMmaWarpN + (lane >> 3);
    int64_t koff[4], voff[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t key = key0 + 4 * j;
      // (page, row in page) of the key, or (b, key) for a contiguous cache: one table read
      // and one 32-bit division serve K and V (keys and page sizes are < 2^30:
      // decode_cuda_supports_layout).
      const bool ok = key < end;
      int64_t page = b, row = key;
      if (ok && p.block_table != nullptr) {  // (a key past `end` may lie past the table's row)
        const uint32_t t = static_cast<uint32_t>(key), ps = static_cast<uint32_t>(p.page_size);
        const int32_t pg = p.block_table[b * p.block_table_batch_stride + t / ps];
        page = pg < 0 ? 0 : (pg >= p.num_pages ? p.num_pages - 1 : pg);
        row = t % ps;
      }
      koff[j] = ok ? page * p.k_batch_stride + row * p.k_row_stride + (lane & 7) * 8 : -1;
      voff[j] = ok ? page * p.v_batch_stride + row * p.v_row_stride + (lane & 7) * 8 : -1;
    }
    const uint32_t dk = my_kv + stage * 2 * kSlabBytes;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const bool ok = koff[j] >= 0;
#pragma unroll
      for (int h = 0; h < kD / 64; ++h) {
        const uint32_t off = cp_off[j & 1] + j * 4 * kRowBytes + h * 128;
        cp_async16(dk + off, ok ? k_base + koff[j] + h * 64 : k_base, ok);
        cp_async16(dk + kSlabBytes + off, ok ? v_base + voff[j] + h * 64 : v_base, ok);
      }
    }
  };

  // Prologue: the first kStages - 1 slabs of this warp in flight, one group each.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_mine) load_slab(s, s);
    cp_async_commit();
  }

  // Q rows of the block, 16-bit, unscaled, swizzled; padding rows (>= rows) are zero.
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + int64_t(head0) * p.q_head_stride;
    for (int i = tid; i < 16 * kMTiles * kChunks; i += kMmaThreads) {
      const int r = i / kChunks, c = i % kChunks;
      uint32_t w[4] = {0u, 0u, 0u, 0u};
      if (r < rows) {
        const T* src = q + r * p.q_head_stride + c * 8;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          T lo = src[2 * e], hi = src[2 * e + 1];
          uint16_t l16, h16;
          memcpy(&l16, &lo, 2);
          memcpy(&h16, &hi, 2);
          w[e] = uint32_t(l16) | (uint32_t(h16) << 16);
        }
      }
      sts<uint4>(sQ + swz<kD>(r, c * 8), uint4{w[0], w[1], w[2], w[3]});
    }
  }
  __syncthreads();  // sQ visible to every warp

  const float qscale = p.softmax_scale * kLog2e;
  const int g = lane >> 2, t = lane & 3;
  const uint32_t sQa = smem_u32(sQ);

  // One m-tile: the Q fragments of every k16 slice stay in registers (4 kD / 16 of them);
  // with two, each step re-reads them from sQ (registers: O alone is 128 at d128).
  constexpr bool kQInRegs = kMTiles == 1;
  uint32_t qreg[kQInRegs ? kD / 16 : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) dmma_ldsm_x4(qreg[ks], sQa + ld_off[ks & 3] + (ks >> 2) * 128);
  }

  float o[kMTiles][kNTilesO][4];
  float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int j = 0; j < kNTilesO; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][j][e] = 0.f;
    }
    row_max[mi][0] = row_max[mi][1] = -INFINITY;
    row_sum[mi][0] = row_sum[mi][1] = 0.f;
  }

  for (int i = 0; i < n_mine; ++i) {
    cp_async_wait<kStages - 2>();
    __syncwarp();  // slab i visible to the whole warp; every lane is done with slab i - 1
    if (i + kStages - 1 < n_mine) load_slab(i + kStages - 1, (i + kStages - 1) % kStages);
    cp_async_commit();
    const uint32_t sK = my_kv + (i % kStages) * 2 * kSlabBytes, sV = sK + kSlabBytes;

    // S = Q K^T over the 16 keys of the slab: two n8 key tiles per m-tile.
    float s[kMTiles][2][4];
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mi][0][e] = s[mi][1][e] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      uint32_t kb[4];
      // == sK + 2 swz(rk, (2 ks + ck) * 8): keys of n8 tiles 0 and 1 -> b0, b1 of each
      dmma_ldsm_x4(kb, sK + ldk_off[ks & 3] + (ks >> 2) * 128);
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        if constexpr (kQInRegs) {
          Ops::mma(s[mi][0], qreg[ks], kb[0], kb[1]);
          Ops::mma(s[mi][1], qreg[ks], kb[2], kb[3]);
        } else {
          uint32_t qa[4];
          // == sQ + 2 swz(16 mi + (lane & 15), (2 ks + (lane >> 4)) * 8)
          dmma_ldsm_x4(qa, sQa + ld_off[ks & 3] + (ks >> 2) * 128 + mi * 16 * kRowBytes);
          Ops::mma(s[mi][0], qa, kb[0], kb[1]);
          Ops::mma(s[mi][1], qa, kb[2], kb[3]);
        }
      }
    }

    // Online softmax (log2 domain). Accumulator (j, 2 hf + e) is row g + 8 hf, key
    // key0 + 8 j + 2 t + e; keys at or past `end` (zero-filled rows) score -inf.
    const int64_t key0 = begin + (int64_t(i) * kMmaWarps + warp) * kMmaWarpN;
    const int n_valid = static_cast<int>(min(end - key0, int64_t(kMmaWarpN)));  // >= 1
    uint32_t pa[kMTiles][4];
    float alpha[kMTiles][2];
    bool grew = false;  // did any of this lane's row maxima change on this step
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = row_max[mi][hf];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = s[mi][j][2 * hf + e] * qscale;
            s[mi][j][2 * hf + e] = 8 * j + 2 * t + e < n_valid ? x : -INFINITY;
            mx = fmaxf(mx, s[mi][j][2 * hf + e]);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_use = mx == -INFINITY ? 0.f : mx;
        alpha[mi][hf] = exp2f(row_max[mi][hf] - m_use);  // 0 while the old max is -inf
        grew |= mx != row_max[mi][hf];
        row_max[mi][hf] = mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float p0 = exp2f(s[mi][j][2 * hf] - m_use);
          const float p1 = exp2f(s[mi][j][2 * hf + 1] - m_use);
          sum += p0 + p1;
          pa[mi][2 * j + hf] = Ops::pack(p0, p1);
        }
        row_sum[mi][hf] = row_sum[mi][hf] * alpha[mi][hf] + sum;
      }
    }

    // O = alpha O + P V: V via ldmatrix.trans, two n8 dim tiles per x4. The rescale only when
    // some row max of the warp grew (a warp-uniform vote; exact: an unchanged finite max has
    // alpha = 1, and a row whose max is still -inf has O = 0).
    if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
        for (int j = 0; j < kNTilesO; ++j) {
          o[mi][j][0] *= alpha[mi][0];
          o[mi][j][1] *= alpha[mi][0];
          o[mi][j][2] *= alpha[mi][1];
          o[mi][j][3] *= alpha[mi][1];
        }
      }
    }
#pragma unroll
    for (int jp = 0; jp < kNTilesO / 2; ++jp) {
      uint32_t vb[4];
      // == sV + 2 swz(lane & 15, (2 jp + (lane >> 4)) * 8): b0, b1 of dim tiles 2 jp, 2 jp + 1
      dmma_ldsm_x4_trans(vb, sV + ld_off[jp & 3] + (jp >> 2) * 128);
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        Ops::mma(o[mi][2 * jp], pa[mi], vb[0], vb[1]);
        Ops::mma(o[mi][2 * jp + 1], pa[mi], vb[2], vb[3]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with its slabs and sQ (copies landed): reuse as merge area

  // Merge the 4 warps: each stores its unnormalised O rows, and (quad lane 0) the row max and
  // the quad-reduced row sum; then every thread finishes elements of the output.
  constexpr int kAS = Smem::kAccStride;
  float* sAcc = reinterpret_cast<float*>(smem);       // [warp][32][kAS]
  float* sM = sAcc + kMmaWarps * 32 * kAS;             // [warp][32]
  float* sL = sM + kMmaWarps * 32;                     // [warp][32]
  // (O rows first, then the maxima and sums: the quad-lane-0 stores come last.)
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = mi * 16 + g + 8 * hf;
      if (row < rows) {
        float* dst = sAcc + (warp * 32 + row) * kAS + 2 * t;
#pragma unroll
        for (int j = 0; j < kNTilesO; ++j) sts<float2>(dst + 8 * j, make_float2(o[mi][j][2 * hf], o[mi][j][2 * hf + 1]));
      }
    }
  }
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float l = row_sum[mi][hf];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int row = mi * 16 + g + 8 * hf;
      if (row < rows && t == 0) {
        sts<float>(sM + warp * 32 + row, row_max[mi][hf]);
        sts<float>(sL + warp * 32 + row, l);
      }
    }
  }
  __syncthreads();

  for (int idx = tid; idx < rows * kD; idx += kMmaThreads) {
    const int row = idx / kD, dd = idx % kD;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) mx = fmaxf(mx, lds<float>(sM + w * 32 + row));
    // As decode_kernel's merge: a warp that saw a NaN score has l NaN and is merged through
    // (only warps that saw no key, l = 0, are skipped), so the row comes out NaN.
    const float m_use = mx == -INFINITY ? 0.f : mx;
    float lsum = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) {
      const float lw = lds<float>(sL + w * 32 + row);
      if (lw == 0.f) continue;
      const float wgt = exp2f(lds<float>(sM + w * 32 + row) - m_use);
      lsum += wgt * lw;
      acc += wgt * lds<float>(sAcc + (w * 32 + row) * kAS + dd);
    }
    const bool any = lsum != 0.f;  // (NaN included)
    const float out = any ? acc / lsum : 0.f;
    const float lse = any ? (m_use + __log2f(lsum)) * kLn2 : -INFINITY;
    const int64_t head = int64_t(head0) + row;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[b * p.out_batch_stride + head * p.out_head_stride + dd] = from_float<T>(out);
      if (dd == 0) p.lse[b * p.h + head] = lse;
    } else {
      const int64_t pr = (int64_t(split) * p.b + b) * p.h + head;
      p.out_partial[pr * kD + dd] = out;
      if (dd == 0) p.lse_partial[pr] = lse;
    }
  }
}

}  // namespace decode_kernels
}  // namespace fastattn
