// flash_fwd_kernel.cuh — the FlashAttention-2 class forward kernel (see flash_fwd.cu for the
// overview and the tuning rationale). This header holds the kernel template, its tile
// traits, the PTX wrappers it is built from and the per-head-dim launch entry points that
// flash_fwd_hdim*.cu instantiate. It includes CUDA headers only (no torch).
//
// ---------------------------------------------------------------------------------------
// Fragment layouts relied on (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating
// point type" and "ldmatrix"). lane = 0..31, g = lane >> 2 (groupID), t = lane & 3
// (threadID_in_group). A 32-bit register holds two 16-bit values; the LOWER column index
// lives in the LOWER 16 bits.
//
//   A (16x16, row-major), regs a0..a3:
//     a0 = A[g    ][2t, 2t+1]      a1 = A[g + 8][2t, 2t+1]
//     a2 = A[g    ][2t+8, 2t+9]    a3 = A[g + 8][2t+8, 2t+9]
//   B (16x8, "col": B[k][n]), regs b0, b1:
//     b0 = B[2t, 2t+1][g]          b1 = B[2t+8, 2t+9][g]
//   C/D (16x8, fp32), regs c0..c3:
//     c0, c1 = C[g][2t, 2t+1]      c2, c3 = C[g + 8][2t, 2t+1]
//
//   ldmatrix.m8n8.x4.b16: lane 8*i + r supplies the shared address of row r of matrix i
//   (16 contiguous bytes = 8 elements). Result register i of lane l holds matrix i's
//   M[l >> 2][2(l & 3), 2(l & 3) + 1]; with .trans it holds M[2(l & 3), 2(l & 3) + 1][l >> 2]
//   (the transposed matrix), i.e. element (row 2t, col g) in the low half.
//
// How each operand is fed (derivations in the comments at each ldmatrix below):
//   S = Q K^T : A = Q tile (rows = queries, cols = head dim), ldmatrix (no trans) from sQ.
//               B[k][n] = K[n][k]: K is stored [key][dim], so a non-transposed ldmatrix of
//               an 8x8 block (rows = keys, cols = dims) gives lane l K[g][2t..2t+1] = b0.
//   O += P V  : A = P straight from the S accumulators: for key slice ks, the C fragments of
//               n8 tiles 2ks and 2ks+1 are exactly a0,a1 (tile 2ks) and a2,a3 (tile 2ks+1)
//               after packing (c0,c1) and (c2,c3) to 16 bit.
//               B[k][n] = V[k][n]: V is stored [key][dim]; ldmatrix .trans of an 8x8 block
//               (rows = keys, cols = dims) gives lane l V[2t..2t+1][g] = b0.
//
// Shared-memory layout: every tile (Q, K, V, and the O staging) is row-major with rows of
// kHeadDim 16-bit elements = kChunks = kHeadDim / 8 chunks of 16 bytes, and chunk c of row r
// is stored at chunk position c ^ key(r) of its row (no padding). A 16-byte access at byte
// address A uses bank group (A / 16) mod 8 (8 groups of 4 banks = one 128-byte line); a phase
// of 8 lanes is conflict free iff its 8 addresses hit 8 distinct groups.
//   kChunks % 8 == 0 (d 64, 128, 192, 256): key(r) = r & 7. Rows are whole bank lines, so the
//     group of (r, c) is (c ^ (r & 7)) mod 8: the 8 rows r0..r0+7 (r0 a multiple of 8) of an
//     ldmatrix phase at one logical chunk hit 8 distinct groups, and so do 8 consecutive
//     chunks of one row (the cp.async fills and the O store).
//   kChunks % 8 == 4 (d 32: 4 chunks, d 96: 12): a row is an odd number of half bank lines,
//     so the group of (r, c) is 4 (r & 1) + (c ^ key(r)) mod 8, and key(r) = (r >> 1) & 3 only
//     permutes the chunks inside each aligned 4-chunk group (the XOR never leaves the row).
//     Rows r0..r0+7 at one chunk: (r & 1, key) takes all 8 values: 8 distinct groups. Four
//     chunks of rows 2k and 2k + 1 (the cp.async fills, 4 lanes per row): one key, two halves.
//     The same holds for any 8 consecutive row-major chunks (the O store), which always form
//     two aligned 4-chunk groups. So every phase stays conflict free (emulated bank report:
//     tests/test_flash_fwd_emulated.py::test_bank_conflict_report).
// Both sides use the one function smem_offset() below, so reader and writer agree by
// construction.
// ---------------------------------------------------------------------------------------
//
// Emulation: tests/flash_fwd_emulate.cpp compiles this header and the launchers
// (flash_fwd.cu, flash_fwd_hdim*.cu) with g++ and FASTATTN_FWD_EMULATE defined; it then
// supplies host versions of the PTX wrappers below (written from the PTX ISA), the dynamic
// shared-memory declaration and the launch, and runs every thread as a fiber.
#pragma once

#if !defined(FASTATTN_FWD_EMULATE)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

#include "block_order.cuh"
#include "fastattn/params.h"
#include "softcap.cuh"

namespace fastattn {
namespace flash {

// Kernel arguments: the params struct flattened, with the masking already normalised by the
// launcher (causal folded into window_right, windows clamped so all index math fits int32).
struct FwdArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  int seqlen_q, seqlen_k, h, h_per_kv;  // varlen: seqlen_q / seqlen_k are the max bounds
  int window_left, window_right;  // -1: unbounded; both in [-1, seqlen_q + seqlen_k]
  float scale_log2;               // softmax_scale * log2(e); with softcap: softcap * log2(e)
  float softcap_pre;              // softmax_scale / softcap * 2 log2(e) (softcap kernels only)
  // Varlen (packed) batches, see FlashFwdParams: null for the dense layout. Otherwise the
  // batch strides are unused, sequence `batch` owns rows [cu[batch], cu[batch + 1]) of the
  // packed q/out and k/v (clamped on the device, see varlen_bounds) and lse is (h, total_q).
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int64_t total_q, total_k;
  // Block order (block_order.cuh): (head, batch) pairs run in sections of this many pairs; 1 is
  // the plain (query block, head, batch) order. Set by the host (flash_fwd.cu).
  int64_t sched_section;
};

// Rows [*start, *start + *len) of sequence i of a packed tensor of `total` rows, from its
// cu_seqlens, made memory-safe for ANY content (nothing validates cu_seqlens on the device
// side, and the host must not synchronise to look): start is clamped to [0, total], the end
// to [start, total], and the length to the launch bound max_len (the grid was sized from it).
// Well-formed cu_seqlens (0 = cu[0] <= cu[1] <= ... <= cu[b] <= total, lengths <= max_len)
// pass through unchanged.
__device__ __forceinline__ void varlen_bounds(const int32_t* cu, int i, int64_t total, int max_len,
                                              int64_t* start, int* len) {
  const int64_t s = min(max(static_cast<int64_t>(cu[i]), int64_t{0}), total);
  const int64_t e = min(max(static_cast<int64_t>(cu[i + 1]), s), total);
  *start = s;
  *len = static_cast<int>(min(e - s, static_cast<int64_t>(max_len)));
}

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMTiles = kBlockM / (16 * kNWarps);  // m16 tiles owned by one warp
  static constexpr int kRowsPerWarp = 16 * kMTiles;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per smem row
  // load_tile: threads that share one row, each copying one chunk of a kLoadTpr-chunk column
  // group (the largest of 16, 8, 4 dividing kChunks): kNThreads / kLoadTpr rows per sweep, a
  // multiple of 8, so a thread's swizzle key is the same for every row it copies.
  static constexpr int kLoadTpr = kChunks % 16 == 0 ? 16 : kChunks % 8 == 0 ? 8 : 4;
  static constexpr int kRowBytes = kHeadDim * 2;
  static constexpr int kNTilesS = kBlockN / 8;   // n8 tiles of S per m16 tile
  static constexpr int kNTilesO = kHeadDim / 8;  // n8 tiles of O per m16 tile
  static constexpr int kSmemQ = kBlockM * kRowBytes;
  static constexpr int kSmemKV = kBlockN * kRowBytes;  // one K (or V) buffer
  // Q + one K and one V buffer: K and V are separate cp.async groups, so V(n) lands under
  // QK^T(n) + softmax(n) and K(n + 1) under softmax(n) + PV(n) (see the main loop).
  static constexpr int kSmemBytes = kSmemQ + 2 * kSmemKV;
  // Blocks per SM the register budget is sized for (__launch_bounds__): two 4-warp blocks
  // give 255 registers per thread and 8 warps per SM.
  static constexpr int kMinBlocksPerSm = kNWarps <= 4 ? 2 : 1;
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole m16 tiles");
  static_assert(kHeadDim % 32 == 0, "swizzle works on groups of 4 or 8 chunks per row");
  static_assert((kNThreads / kLoadTpr) % 8 == 0, "load_tile: one swizzle key per thread");
  static_assert(kBlockN % 16 == 0, "P is consumed in k16 slices");
  static_assert((kBlockM * kChunks) % kNThreads == 0, "Q tile load divides evenly");
  static_assert((kBlockN * kChunks) % kNThreads == 0, "K/V tile load divides evenly");
  static_assert((kRowsPerWarp * kChunks) % 32 == 0, "O store divides evenly");
};

// The swizzle key of a row: chunk c of row r is stored at chunk position c ^ key(r). Rows of a
// multiple of 8 chunks (d 64, 128, 192, 256): key = r & 7. Rows of an odd multiple of 4 chunks
// (d 32, 96: 64 or 192 bytes, so rows r and r + 1 start half a 128-byte bank line apart):
// key = (r >> 1) & 3, an XOR inside each aligned 4-chunk group (see the header comment).
template <int kChunks>
__device__ __forceinline__ int swizzle_key(int row) {
  static_assert(kChunks % 4 == 0, "rows of whole 4-chunk groups");
  if constexpr (kChunks % 8 == 0) {
    return row & 7;
  } else {
    return (row >> 1) & 3;
  }
}

// Byte offset of (row, 16-byte chunk) in a swizzled tile. The ONLY place the layout is
// defined: cp.async writers, ldmatrix readers and the O staging all call it.
template <int kChunks>
__device__ __forceinline__ uint32_t smem_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * (kChunks * 16) + ((chunk ^ swizzle_key<kChunks>(row)) << 4));
}

// ---- PTX wrappers ----------------------------------------------------------------------
#if !defined(FASTATTN_FWD_EMULATE)
#define FASTATTN_FWD_SMEM(name) extern __shared__ __align__(128) unsigned char name[]

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy. pred == false writes 16 zero bytes (src-size 0: nothing is
// read from gmem, which must still be a valid address; callers pass the tensor's first row).
__device__ __forceinline__ void cp_async_16(uint32_t smem, const void* gmem, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Per element type: the mma flavour and the fp32 -> packed 16-bit conversion.
template <typename T>
struct ElemOps;

template <>
struct ElemOps<__half> {
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct ElemOps<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// Shared-memory stores / loads of the epilogue's O staging (addresses from smem_offset).
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}
// One 16-byte global store, st.global.v4.b32 (addr 16-byte aligned: the launcher's layout
// rule). The plain C++ `*reinterpret_cast<uint4*>(p) = v` of the O store compiled to one
// STG.E.128 at d 96 / 192 but to 4 x STG.E (32-bit) at d 32 / 64 / 128 / 256: NVVM split it
// where it could not prove the alignment (the same trap as float_convert.cuh's store16).
__device__ __forceinline__ void st_global_v4(void* addr, const uint4& v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(addr), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}
#endif  // !FASTATTN_FWD_EMULATE

// Load rows [row0, row0 + kRows) of one head of a (b, seqlen, heads, d) tensor into a
// swizzled smem tile; rows >= seqlen are zero-filled (so no garbage, NaN included, can reach
// the mma). kTpr = Kt::kLoadTpr threads share a row: thread tid copies chunks
// c + g * kTpr (c = tid % kTpr, every column group g < kChunks / kTpr) of rows
// r0 + i * kRowsPerIter with r0 = tid / kTpr. When kTpr == kChunks (d 32, 64, 128) that is
// chunks tid, tid + kNThreads, ... of the row-major tile. Consecutive threads cover kTpr
// consecutive chunks of one row, 64 to 256 contiguous global bytes (whole 32-byte sectors,
// coalesced), and every 8-lane phase writes 8 distinct bank-line chunk positions (conflict
// free: kTpr >= 8 gives 8 chunks of one row, XORed with one key < 8 inside an aligned 8-chunk
// group; kTpr = 4 gives 4 chunks of rows 2k and 2k + 1, which share the key and start half a
// bank line apart). kRowsPerIter is a multiple of 8, so every row a thread writes has the same
// swizzle key and its smem offsets are one register plus immediates (the key < kTpr, so the XOR
// never leaves the column group); the global pointer advances by a fixed step.
template <typename Kt, int kRows, typename T>
__device__ __forceinline__ void load_tile(uint32_t smem_tile, const T* head_base, int64_t row_stride,
                                          int row0, int seqlen, int tid) {
  constexpr int kTpr = Kt::kLoadTpr;
  constexpr int kRowsPerIter = Kt::kNThreads / kTpr;
  static_assert(Kt::kNThreads % kTpr == 0 && kRowsPerIter % 8 == 0, "swizzle key per thread");
  static_assert(kRows % kRowsPerIter == 0, "tile rows divide evenly");
  const int r0 = tid / kTpr;
  const int c = tid % kTpr;
  const uint32_t dst = smem_tile + smem_offset<Kt::kChunks>(r0, c);
  const T* src = head_base + static_cast<int64_t>(row0 + r0) * row_stride + c * 8;
  const int64_t step = static_cast<int64_t>(kRowsPerIter) * row_stride;
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerIter; ++i) {
    const bool valid = row0 + r0 + i * kRowsPerIter < seqlen;
#pragma unroll
    for (int g = 0; g < Kt::kChunks / kTpr; ++g) {
      // == smem_offset(r0 + i * kRowsPerIter, c + g * kTpr): same swizzle key, rows further
      // down, chunks further right
      cp_async_16(dst + i * kRowsPerIter * Kt::kRowBytes + g * kTpr * 16,
                  valid ? src + g * kTpr * 8 : head_base, valid);
    }
    src += step;
  }
}

// ---------------------------------------------------------------------------------------
// The kernel. Grid (ceil(seqlen_q / kBlockM), h, b) (varlen: ceil(max_seqlen_q / kBlockM),
// h, number of sequences; blocks past their sequence's end exit at once); block kNThreads. Warp w owns query rows
// [w * kRowsPerWarp, (w + 1) * kRowsPerWarp) of the block's tile, as kMTiles m16 tiles.
// kMasked: a window / causal bound exists (the key-tail mask is always available).
// kSoftcap: scores are soft-capped (softcap.cuh); instantiated only with kMasked (see
// flash_fwd.cu), so the uncapped kernels are the code they were.
// ---------------------------------------------------------------------------------------
template <typename Kt, typename T, bool kMasked, bool kSoftcap = false>
__global__ void __launch_bounds__(Kt::kNThreads, Kt::kMinBlocksPerSm) flash_fwd_kernel(const FwdArgs a) {
  using Ops = ElemOps<T>;
  constexpr int kBlockM = Kt::kBlockM;
  constexpr int kBlockN = Kt::kBlockN;
  constexpr int kMTiles = Kt::kMTiles;
  constexpr int kNTilesS = Kt::kNTilesS;
  constexpr int kNTilesO = Kt::kNTilesO;
  constexpr int kChunks = Kt::kChunks;
  constexpr float kNegInf = -__builtin_huge_valf();

  FASTATTN_FWD_SMEM(smem);
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK = sQ + Kt::kSmemQ;  // the K tile
  const uint32_t sV = sK + Kt::kSmemKV;  // the V tile

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  // Heaviest query blocks (most keys under a causal mask) first, across a section of (head,
  // batch) pairs (block_order.cuh). Only a masked problem has sections (sched_section > 1); the
  // unmasked kernel keeps the plain order without the 64-bit index arithmetic (at d128 on
  // sm_80 that cost it spills).
  int m_block = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);
  int head = static_cast<int>(blockIdx.y);
  int batch = static_cast<int>(blockIdx.z);
  // d96: the section arithmetic tipped ptxas into 32 B of spills (sm_90a); it keeps the plain order.
  constexpr bool kSections = kMasked && Kt::kHeadDim != 96;
  if (kSections && a.sched_section > 1) {
    const BlockOrder bo = block_order(FASTATTN_LINEAR_BLOCK(), gridDim.x, gridDim.y * gridDim.z,
                                      static_cast<uint32_t>(a.sched_section));
    m_block = static_cast<int>(gridDim.x) - 1 - bo.rank;
    head = bo.pair % static_cast<int>(gridDim.y);
    batch = bo.pair / static_cast<int>(gridDim.y);
  }
  const int kv_head = head / a.h_per_kv;
  const int m0 = m_block * kBlockM;

  // Where this block's sequence lives: dense, batch `batch` of (b, seqlen, heads, d) tensors;
  // varlen, a row range of the packed tensors with the sequence's own lengths (the grid is
  // sized by the max bounds, so a query block past this sequence's end has nothing to do and
  // leaves before touching memory). Worked out once per block; the main loop below only
  // sees seqlen_q / seqlen_k and the row-0 pointers, whichever layout it is.
  int seqlen_q = a.seqlen_q;
  int seqlen_k = a.seqlen_k;
  int64_t q_off = batch * a.q_batch_stride, k_off = batch * a.k_batch_stride;
  int64_t v_off = batch * a.v_batch_stride, o_off = batch * a.out_batch_stride;
  int64_t lse_off = (static_cast<int64_t>(batch) * a.h + head) * seqlen_q;
  if (a.cu_seqlens_q != nullptr) {
    int64_t q_start, k_start;
    varlen_bounds(a.cu_seqlens_q, batch, a.total_q, a.seqlen_q, &q_start, &seqlen_q);
    varlen_bounds(a.cu_seqlens_k, batch, a.total_k, a.seqlen_k, &k_start, &seqlen_k);
    if (m0 >= seqlen_q) return;  // block-uniform, before any cp.async or barrier
    q_off = q_start * a.q_row_stride;
    o_off = q_start * a.out_row_stride;
    k_off = k_start * a.k_row_stride;
    v_off = k_start * a.v_row_stride;
    lse_off = head * a.total_q + q_start;  // lse (h, total_q)
  }
  const int diag = seqlen_k - seqlen_q;  // bottom-right alignment: row i sits at key i + diag

  const T* q_head = static_cast<const T*>(a.q) + q_off + head * a.q_head_stride;
  const T* k_head = static_cast<const T*>(a.k) + k_off + kv_head * a.k_head_stride;
  const T* v_head = static_cast<const T*>(a.v) + v_off + kv_head * a.v_head_stride;

  // ---- key-tile range [n_min, n_max) that intersects the band of any row of this block ---
  // Row i sees keys [lo(i), hi(i)] with lo(i) = i + diag - left (0 if unbounded) and
  // hi(i) = min(i + diag + right, seqlen_k - 1). The block's rows span [m0, m_last].
  int n_min = 0;
  int n_max = (seqlen_k + kBlockN - 1) / kBlockN;
  // Tiles that lie wholly inside every row's band need no mask: keys of tile n are
  // [n * kBlockN, n * kBlockN + kBlockN - 1]; they are all visible to every row of the
  // block iff n * kBlockN >= lo(m0 + kBlockM - 1) and n * kBlockN + kBlockN - 1 <= hi(m0).
  int mask_lo = 0;                 // max over the block's rows of lo(i)
  int mask_hi = seqlen_k - 1;      // min over the block's rows of hi(i)
  if (kMasked) {
    if (a.window_right >= 0) {
      const int m_last = min(seqlen_q, m0 + kBlockM) - 1;
      const int hi_last = m_last + diag + a.window_right;  // largest key any row here sees
      n_max = hi_last < 0 ? 0 : min(n_max, hi_last / kBlockN + 1);
      mask_hi = min(mask_hi, m0 + diag + a.window_right);
    }
    if (a.window_left >= 0) {
      const int lo_first = m0 + diag - a.window_left;  // smallest key any row here sees
      n_min = max(lo_first, 0) / kBlockN;
      mask_lo = m0 + kBlockM - 1 + diag - a.window_left;
    }
  }

  // Per-thread accumulator rows: element (mi, half) is local row
  // warp * kRowsPerWarp + mi * 16 + (lane >> 2) + 8 * half of the block.
  float o[kMTiles][kNTilesO][4];
  float row_max[kMTiles][2];  // running max of the scaled (log2-domain) scores
  float row_sum[kMTiles][2];  // this thread's partial running sum (quad-reduced at the end)
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int j = 0; j < kNTilesO; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][j][e] = 0.f;
    }
    row_max[mi][0] = row_max[mi][1] = kNegInf;
    row_sum[mi][0] = row_sum[mi][1] = 0.f;
  }

  const int warp_row0 = warp * Kt::kRowsPerWarp;  // first local row of this warp
  // ldmatrix lane roles (see the header comment):
  //   Q (A operand, no trans), matrices {rows 0-7, k 0-7}, {rows 8-15, k 0-7},
  //     {rows 0-7, k 8-15}, {rows 8-15, k 8-15} -> a0..a3: lane supplies row (lane & 15),
  //     chunk 2ks + (lane >> 4).
  //   K (B operand, no trans) for n8 tiles 2jp, 2jp+1: matrices {keys of tile 2jp, k 0-7},
  //     {keys of tile 2jp, k 8-15}, {keys of tile 2jp+1, k 0-7}, {keys of tile 2jp+1, k 8-15}
  //     -> r0, r1 = b0, b1 of tile 2jp and r2, r3 = b0, b1 of tile 2jp+1, i.e. each mma's B
  //     operand is an adjacent register pair straight from ldmatrix (with the Q/V lane roles
  //     below it would be r0, r2 / r1, r3, and ptxas pays ~120 register moves per d128 key
  //     tile to build the pairs): lane supplies key 16jp + (lane & 7) + 8 (lane >> 4), chunk
  //     2ks + ((lane >> 3) & 1).
  //   V (B operand, trans) for key slice ks, dim tiles 2jp, 2jp+1: matrices {keys 0-7, dims
  //     of tile 2jp}, {keys 8-15, same dims}, {keys 0-7, tile 2jp+1}, {keys 8-15, tile 2jp+1}
  //     -> b0,b1 of dim tile 2jp and b0,b1 of 2jp+1: lane supplies key 16ks + (lane & 15),
  //     chunk 2jp + (lane >> 4).
  //
  // Every such row is (multiple of 8) + (lane & 7), so its swizzle key is key(lane & 7) (< 8),
  // and every chunk is 2 * i + (0 or 1), i.e. (2 * i) ^ (0 or 1). Hence
  //   smem_offset(R + r, 2 * i + c) = (R + r) * kRowBytes + ((2 * i) ^ (c ^ key(lane & 7))) * 16
  // and for i = 4 * i_hi + i_lo the XOR only touches the low three bits:
  //   ((2 * i) ^ z) * 16 = i_hi * 128 + ((2 * i_lo) ^ z) * 16          (z < 8).
  // So four per-lane offsets (i_lo = 0..3) plus compile-time immediates address every
  // ldmatrix of the main loop, instead of one live register per unrolled address.
  // ld_off[i_lo] serves Q and V: row (lane & 15), chunk bit (lane >> 4); ldk_off[i_lo] serves
  // K: row (lane & 7) + 8 (lane >> 4), chunk bit (lane >> 3) & 1.
  uint32_t ld_off[4], ldk_off[4];
  {
    const int key = swizzle_key<kChunks>(lane & 7);
    const int z = (lane >> 4) ^ key;
    const int zk = ((lane >> 3) & 1) ^ key;
    const int rk = (lane & 7) + ((lane >> 4) << 3);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      ld_off[i] = static_cast<uint32_t>((lane & 15) * Kt::kRowBytes + (((2 * i) ^ z) << 4));
      ldk_off[i] = static_cast<uint32_t>(rk * Kt::kRowBytes + (((2 * i) ^ zk) << 4));
    }
  }
  const uint32_t sQ_warp = sQ + warp_row0 * Kt::kRowBytes;

  if (n_min < n_max) {
    // Pipeline (FlashAttention-2's, with the V wait moved past the softmax). K and V of a key
    // tile are separate cp.async groups in one buffer each; per key tile n:
    //   wait K(n) (wait_group 0: it is the only pending group); barrier  [K(n) visible to all;
    //     every warp is done with PV(n - 1), so sV is free]
    //   issue V(n)                         -> lands under QK^T(n) and the softmax
    //   S = Q K(n)^T; barrier               [every warp is done with sK]
    //   issue K(n + 1)                     -> lands under the softmax and PV(n)
    //   softmax(n)
    //   wait V(n) (wait_group 1: K(n + 1) may stay in flight); barrier  [V(n) visible]
    //   O += P V(n)
    // Every iteration commits exactly two groups (an empty one when there is no K(n + 1)), so
    // the wait counts hold on every tile. Q travels in the group of the first K tile.
    load_tile<Kt, kBlockM>(sQ, q_head, a.q_row_stride, m0, seqlen_q, tid);
    load_tile<Kt, kBlockN>(sK, k_head, a.k_row_stride, n_min * kBlockN, seqlen_k, tid);
    cp_async_commit();

    for (int n = n_min; n < n_max; ++n) {
      cp_async_wait<0>();
      __syncthreads();
      load_tile<Kt, kBlockN>(sV, v_head, a.v_row_stride, n * kBlockN, seqlen_k, tid);
      cp_async_commit();

      // ---- S = Q K^T (fp32 accumulators) ------------------------------------------------
      float s[kMTiles][kNTilesS][4];
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
        for (int j = 0; j < kNTilesS; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mi][j][e] = 0.f;
        }
      }
#pragma unroll
      for (int ks = 0; ks < Kt::kHeadDim / 16; ++ks) {
        uint32_t qa[kMTiles][4];
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
          // == sQ + smem_offset(warp_row0 + mi * 16 + (lane & 15), 2 * ks + (lane >> 4))
          ldmatrix_x4(qa[mi], sQ_warp + ld_off[ks & 3] + (ks >> 2) * 128 + mi * 16 * Kt::kRowBytes);
        }
#pragma unroll
        for (int jp = 0; jp < kNTilesS / 2; ++jp) {
          uint32_t kb[4];
          // == sK + smem_offset(16 * jp + (lane & 7) + 8 * (lane >> 4), 2 * ks + ((lane >> 3) & 1))
          ldmatrix_x4(kb, sK + ldk_off[ks & 3] + (ks >> 2) * 128 + jp * 16 * Kt::kRowBytes);
#pragma unroll
          for (int mi = 0; mi < kMTiles; ++mi) {
            Ops::mma(s[mi][2 * jp], qa[mi], kb[0], kb[1]);
            Ops::mma(s[mi][2 * jp + 1], qa[mi], kb[2], kb[3]);
          }
        }
      }

      // Every warp has read its last K(n) fragment: refill sK with K(n + 1).
      __syncthreads();
      if (n + 1 < n_max) {
        load_tile<Kt, kBlockN>(sK, k_head, a.k_row_stride, (n + 1) * kBlockN, seqlen_k, tid);
      }
      cp_async_commit();

      // ---- scale into the log2 domain, mask, online softmax ------------------------------
      // __fmul_rn: the scaled score is rounded once and the max is taken over those rounded
      // values, so ex2(x - max) is exactly ex2(0) at the row maximum for any scale. A plain
      // multiply may be contracted into ex2(fma(s, scale, -max)), whose rounding error grows
      // with |scale * s| (a hard argmax at softmax_scale 1e9 would come out inf or 0).
      // Soft-capped: x = tanh(s * softmax_scale / softcap) * (softcap * log2 e) (softcap.cuh),
      // the same single rounding of the last product.
      auto log2_score = [&](float acc) {
        if constexpr (kSoftcap) return __fmul_rn(softcap_tanh(acc * a.softcap_pre), a.scale_log2);
        return __fmul_rn(acc, a.scale_log2);
      };
      // P packed to 16 bit as soon as it is computed (the fp32 scores die here): the C
      // fragments of n8 tiles 2ks, 2ks + 1 are the A fragment of key slice ks, so probability
      // pair (j, hf) goes to register 2 (j & 1) + hf of pa[j / 2][mi].
      uint32_t pa[kBlockN / 16][kMTiles][4];
      // m0 + warp_row0 + g + diag - 2t: row (mi, hf) + diag - (col0 + 2t) is this plus
      // mi * 16 + 8 hf - col0.
      const int thread_diag = m0 + warp_row0 + (lane >> 2) + diag - 2 * (lane & 3);
      float alpha[kMTiles][2];  // per row: 2^(old max - new max), the rescale of O
      bool grew = false;        // did any of this thread's row maxima change on this tile
      const int col0 = n * kBlockN;
      const bool need_mask =
          col0 + kBlockN > seqlen_k || (kMasked && (col0 < mask_lo || col0 + kBlockN - 1 > mask_hi));
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          // Accumulator (j, 2*hf + e) is S[row][col0 + 8j + 2t + e].
          // row + diag - col0 - 2t of this thread's row (the mask bounds below, relative)
          const int rel = thread_diag - col0 + mi * 16 + 8 * hf;
          float mx = row_max[mi][hf];
          if (need_mask) {
            // Bounds relative to this thread's first column col0 + 2t, so each test is
            // against an immediate 8j + e (fewer live registers in the unrolled loop).
            int lo = -col0 - 2 * (lane & 3), hi = seqlen_k - 1 - col0 - 2 * (lane & 3);
            if (kMasked) {
              if (a.window_left >= 0) lo = rel - a.window_left;
              if (a.window_right >= 0) hi = min(hi, rel + a.window_right);
            }
#pragma unroll
            for (int j = 0; j < kNTilesS; ++j) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int col = 8 * j + e;  // key col0 + 2t + 8j + e
                const float x = log2_score(s[mi][j][2 * hf + e]);
                s[mi][j][2 * hf + e] = (col < lo || col > hi) ? kNegInf : x;
                mx = fmaxf(mx, s[mi][j][2 * hf + e]);
              }
            }
          } else {
#pragma unroll
            for (int j = 0; j < kNTilesS; ++j) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                s[mi][j][2 * hf + e] = log2_score(s[mi][j][2 * hf + e]);
                mx = fmaxf(mx, s[mi][j][2 * hf + e]);
              }
            }
          }
          // The 4 threads of a quad (lanes 4g..4g+3) hold the same row: reduce across them.
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          // A row with nothing visible yet keeps max -inf; subtract 0 instead so that
          // exp2(-inf - (-inf)) = NaN never happens (every p and the rescale become 0).
          const float m_use = mx == kNegInf ? 0.f : mx;
          alpha[mi][hf] = ex2(row_max[mi][hf] - m_use);
          grew |= mx != row_max[mi][hf];
          row_max[mi][hf] = mx;
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < kNTilesS; ++j) {
            const float p0 = ex2(s[mi][j][2 * hf] - m_use);
            const float p1 = ex2(s[mi][j][2 * hf + 1] - m_use);
            sum += p0;
            sum += p1;
            pa[j / 2][mi][2 * (j & 1) + hf] = Ops::pack(p0, p1);
          }
          row_sum[mi][hf] = row_sum[mi][hf] * alpha[mi][hf] + sum;
        }
      }
      // Rescale O only if some row max of this warp grew (a warp-uniform vote: no divergence).
      // Skipping is exact: an unchanged finite max gives alpha = ex2(0) = 1, and a row whose
      // max is still -inf has O = 0. Once the running max has settled (after the first tiles
      // of a row, the common case) this saves kMTiles * kHeadDim / 2 FMULs per key tile.
      if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
#pragma unroll
            for (int j = 0; j < kNTilesO; ++j) {
              o[mi][j][2 * hf] *= alpha[mi][hf];
              o[mi][j][2 * hf + 1] *= alpha[mi][hf];
            }
          }
        }
      }

      // V(n) is the older of the two pending groups; the barrier makes every thread's part
      // of it visible.
      cp_async_wait<1>();
      __syncthreads();

      // ---- O += P V: P (pa, above) is the A operand, V the B operand via ldmatrix.trans.
#pragma unroll
      for (int ks = 0; ks < kBlockN / 16; ++ks) {
#pragma unroll
        for (int jp = 0; jp < kNTilesO / 2; ++jp) {
          uint32_t vb[4];
          // == sV + smem_offset(16 * ks + (lane & 15), 2 * jp + (lane >> 4))
          ldmatrix_x4_trans(vb, sV + ld_off[jp & 3] + (jp >> 2) * 128 + ks * 16 * Kt::kRowBytes);
#pragma unroll
          for (int mi = 0; mi < kMTiles; ++mi) {
            Ops::mma(o[mi][2 * jp], pa[ks][mi], vb[0], vb[1]);
            Ops::mma(o[mi][2 * jp + 1], pa[ks][mi], vb[2], vb[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // nothing may still be landing in sQ when it is reused below

  // ---- epilogue: normalise, stage O through this warp's own rows of sQ, store ------------
  // Only this warp ever read those rows of sQ, so a warp barrier is enough.
  __syncwarp();
  float* lse_head = a.lse == nullptr ? nullptr : a.lse + lse_off;
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float l = row_sum[mi][hf];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      // No visible key: out 0, lse -inf. A NaN score (in q, or in a key the row sees) makes l
      // NaN, not 0: the row comes out NaN, out and lse, as torch's attention does.
      const bool empty = l == 0.f;
      const float inv = empty ? 0.f : 1.f / l;
      const int lrow = warp_row0 + mi * 16 + (lane >> 2) + 8 * hf;
#pragma unroll
      for (int j = 0; j < kNTilesO; ++j) {
        // (an empty row is set to 0, not scaled by 0: its accumulator may hold a 0 * inf NaN
        // from a masked key's value in the same tile)
        const uint32_t packed = Ops::pack(empty ? 0.f : o[mi][j][2 * hf] * inv,
                                          empty ? 0.f : o[mi][j][2 * hf + 1] * inv);
        // Element (lrow, 8j + 2t): chunk j, byte 4t within it.
        const uint32_t addr = sQ + smem_offset<kChunks>(lrow, j) + 4 * (lane & 3);
        st_shared_b32(addr, packed);
      }
      const int row = m0 + lrow;
      if (lse_head != nullptr && (lane & 3) == 0 && row < seqlen_q) {
        // natural log: sum_j e^(x_j * scale) = 2^max * l  =>  lse = max * ln 2 + ln l
        lse_head[row] = empty ? kNegInf : row_max[mi][hf] * 0.6931471805599453f + logf(l);
      }
    }
  }
  __syncwarp();
  T* out_head = static_cast<T*>(a.out) + o_off + head * a.out_head_stride;
  constexpr int kStoreIters = Kt::kRowsPerWarp * kChunks / 32;
#pragma unroll
  for (int i = 0; i < kStoreIters; ++i) {
    const int idx = lane + 32 * i;
    const int lrow = warp_row0 + idx / kChunks;
    const int c = idx % kChunks;
    const uint4 val = ld_shared_v4(sQ + smem_offset<kChunks>(lrow, c));
    const int row = m0 + lrow;
    if (row < seqlen_q) {
      st_global_v4(out_head + static_cast<int64_t>(row) * a.out_row_stride + c * 8, val);
    }
  }
}

// Launch one instantiation: grid (m blocks, h, b), dynamic smem (opt-in above 48 KB).
template <typename Kt, typename T, bool kMasked, bool kSoftcap>
cudaError_t launch_flash_fwd(const FwdArgs& args, int64_t batch, cudaStream_t stream) {
  auto kernel = &flash_fwd_kernel<Kt, T, kMasked, kSoftcap>;
  constexpr int kSmem = Kt::kSmemBytes;
  if (kSmem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>((args.seqlen_q + Kt::kBlockM - 1) / Kt::kBlockM),
                  static_cast<unsigned>(args.h), static_cast<unsigned>(batch));
#if defined(FASTATTN_FWD_EMULATE)
  return FASTATTN_FWD_EMULATE_LAUNCH(kernel, grid, Kt::kNThreads, kSmem, stream, args);
#else
  kernel<<<grid, Kt::kNThreads, kSmem, stream>>>(args);
  return cudaGetLastError();
#endif
}

// The tile configuration per head dim (rationale: the tuning notes in flash_fwd.cu), shared by
// the plain and the soft-capped instantiation files.
using FwdTraitsHdim64 = FwdTraits</*kHeadDim=*/64, /*kBlockM=*/128, /*kBlockN=*/64, /*kNWarps=*/4>;
using FwdTraitsHdim128 = FwdTraits</*kHeadDim=*/128, /*kBlockM=*/128, /*kBlockN=*/64, /*kNWarps=*/4>;
using FwdTraitsHdim32 = FwdTraits</*kHeadDim=*/32, /*kBlockM=*/128, /*kBlockN=*/64, /*kNWarps=*/4>;
using FwdTraitsHdim96 = FwdTraits</*kHeadDim=*/96, /*kBlockM=*/128, /*kBlockN=*/64, /*kNWarps=*/4>;
using FwdTraitsHdim192 = FwdTraits</*kHeadDim=*/192, /*kBlockM=*/128, /*kBlockN=*/64, /*kNWarps=*/8>;
using FwdTraitsHdim256 = FwdTraits</*kHeadDim=*/256, /*kBlockM=*/64, /*kBlockN=*/64, /*kNWarps=*/4>;

// Entry points per head dim (flash_fwd_hdim<D>.cu), dispatching dtype x masked, and the
// soft-capped ones (flash_fwd_hdim<D>_softcap.cu), dispatching dtype.
cudaError_t run_flash_fwd_hdim64(const FwdArgs& args, int64_t batch, DType dtype, bool masked,
                                 cudaStream_t stream);
cudaError_t run_flash_fwd_hdim128(const FwdArgs& args, int64_t batch, DType dtype, bool masked,
                                  cudaStream_t stream);
cudaError_t run_flash_fwd_hdim64_softcap(const FwdArgs& args, int64_t batch, DType dtype,
                                         cudaStream_t stream);
cudaError_t run_flash_fwd_hdim128_softcap(const FwdArgs& args, int64_t batch, DType dtype,
                                          cudaStream_t stream);
// Head dims 32, 96, 192, 256 (flash_fwd_hdim<D>.cu): the masked kernel only (it serves
// unmasked problems too) and its soft-capped twin, dispatching dtype x softcap.
cudaError_t run_flash_fwd_hdim32(const FwdArgs& args, int64_t batch, DType dtype, bool softcap,
                                 cudaStream_t stream);
cudaError_t run_flash_fwd_hdim96(const FwdArgs& args, int64_t batch, DType dtype, bool softcap,
                                 cudaStream_t stream);
cudaError_t run_flash_fwd_hdim192(const FwdArgs& args, int64_t batch, DType dtype, bool softcap,
                                  cudaStream_t stream);
cudaError_t run_flash_fwd_hdim256(const FwdArgs& args, int64_t batch, DType dtype, bool softcap,
                                  cudaStream_t stream);

// Dispatch helpers used by those files.
template <typename Kt>
cudaError_t run_flash_fwd_dispatch(const FwdArgs& args, int64_t batch, DType dtype, bool masked,
                                   cudaStream_t stream) {
  if (dtype == DType::kFloat16) {
    return masked ? launch_flash_fwd<Kt, __half, true, false>(args, batch, stream)
                  : launch_flash_fwd<Kt, __half, false, false>(args, batch, stream);
  }
  if (dtype == DType::kBFloat16) {
    return masked ? launch_flash_fwd<Kt, __nv_bfloat16, true, false>(args, batch, stream)
                  : launch_flash_fwd<Kt, __nv_bfloat16, false, false>(args, batch, stream);
  }
  return cudaErrorInvalidValue;
}
// Soft-capped: the masked kernel serves masked and unmasked problems alike (with no window its
// band test is the key-tail test), so capping adds 2 kernels per head dim, not 4.
template <typename Kt>
cudaError_t run_flash_fwd_softcap_dispatch(const FwdArgs& args, int64_t batch, DType dtype,
                                           cudaStream_t stream) {
  if (dtype == DType::kFloat16) return launch_flash_fwd<Kt, __half, true, true>(args, batch, stream);
  if (dtype == DType::kBFloat16) return launch_flash_fwd<Kt, __nv_bfloat16, true, true>(args, batch, stream);
  return cudaErrorInvalidValue;
}
// Masked-only head dims: the masked kernel for every mask (and none), capped or not: 4 kernels
// per head dim.
template <typename Kt>
cudaError_t run_flash_fwd_masked_dispatch(const FwdArgs& args, int64_t batch, DType dtype,
                                          bool softcap, cudaStream_t stream) {
  if (softcap) return run_flash_fwd_softcap_dispatch<Kt>(args, batch, dtype, stream);
  if (dtype == DType::kFloat16) return launch_flash_fwd<Kt, __half, true, false>(args, batch, stream);
  if (dtype == DType::kBFloat16) return launch_flash_fwd<Kt, __nv_bfloat16, true, false>(args, batch, stream);
  return cudaErrorInvalidValue;
}

}  // namespace flash
}  // namespace fastattn
