// flash_bwd_kernels.cuh — the kernels of flash_bwd.cu (see its header comment for the
// design), plus the host-side argument preparation and grid sizes the launcher uses.
//
// Kept in a header so that tests/flash_bwd_emulate.cpp can compile exactly this code for the
// CPU with FASTATTN_BWD_EMULATE defined: it supplies host versions of the few PTX
// instructions (ldmatrix, mma.sync, cp.async, shfl, barriers) written from the PTX ISA, runs
// every thread of a block as a fiber, and checks dq/dk/dv against float64 attention
// gradients. Included by flash_bwd_launch.cuh (the launcher, shared by flash_bwd.cu and the
// emulator). Every shared-memory access goes through a wrapper the emulator replaces with a
// tracked one (racecheck / initcheck / bank conflicts): cp.async destinations, ldmatrix rows
// and the fp32 lse / delta reads (lds_f32); no raw C++ access to shared memory is left.
#pragma once

#if !defined(FASTATTN_BWD_EMULATE)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "block_order.cuh"
#include "fastattn/params.h"
#include "flash_bwd_layout.cuh"
#include "softcap.cuh"

namespace fastattn {
namespace {

using bwd_layout::a_col;
using bwd_layout::a_row;
using bwd_layout::bkn_col;
using bwd_layout::bkn_row;
using bwd_layout::bnk_col;
using bwd_layout::bnk_row;
using bwd_layout::MaskInfo;
using bwd_layout::swz;

constexpr float kLog2e = 1.4426950408889634f;

// ---- PTX wrappers ------------------------------------------------------------------------
// Under FASTATTN_BWD_EMULATE (tests/flash_bwd_emulate.cpp) these come from a host emulation
// of the PTX semantics instead, so the kernels below run unchanged on the CPU.
#if !defined(FASTATTN_BWD_EMULATE)
#define FASTATTN_BWD_SMEM(name) extern __shared__ __align__(16) unsigned char name[]


__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when !pred the 16 bytes are zero-filled (src-size 0) and
// nothing is read (src must still be a valid address, the caller passes the tensor base).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_size));
}
// 4-byte variant (lse / delta rows), zero-filled when !pred.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool pred) {
  const int src_size = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_size));
}
// ld.shared.f32: a plain load on the GPU (the emulator substitutes a tracked one).
__device__ __forceinline__ float lds_f32(const float* p) { return *p; }
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T> struct MmaOp;
template <> struct MmaOp<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<uint32_t*>(&h);
  }
  // Explicit: torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__.
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
};
template <> struct MmaOp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) {
    return __bfloat162float(x);
  }
};

#endif  // !FASTATTN_BWD_EMULATE

// ---- warp-level tile products ------------------------------------------------------------

// ldmatrix addresses along the rows of a swizzled [*][D] tile. swz puts chunk c of row r at
// c ^ key(r): an XOR inside aligned groups of kGroup chunks (8 when D % 64 == 0, else 4) with a
// key that depends on r mod 8 only. At k16 step s a lane reads chunk chunk0 + 2 s of rows with
// one fixed key, and (x + kGroup m) ^ key == (x ^ key) + kGroup m, so only s mod kPer changes
// the XOR: those kPer byte addresses are made once per product, and every other (step, row
// block) is one of them plus an immediate. (swz per ldmatrix compiled to ~3 integer
// instructions each, ~140 per query tile in the d128 dK/dV kernel's main loop.)
template <int D>
struct SwzRow {
  static constexpr int kGroup = D % 64 == 0 ? 8 : 4;
  static constexpr int kPer = kGroup / 2;  // k16 steps per chunk group
  uint32_t addr[kPer];
  // tile: shared address of element (0, 0); row: the lane's row at row block 0; chunk0: its
  // chunk at step 0.
  __device__ __forceinline__ SwzRow(uint32_t tile, int row, int chunk0) {
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      addr[j] = tile + 2u * static_cast<uint32_t>(swz<D>(row, (chunk0 + 2 * j) * 8));
  }
  // Step s, rows further down by extra_rows (a multiple of 8, so the key is unchanged).
  __device__ __forceinline__ uint32_t at(int s, int extra_rows) const {
    return addr[s % kPer] + static_cast<uint32_t>((s / kPer) * kGroup * 16 + extra_rows * D * 2);
  }
};

// acc[NT][4] (16 x 8*NT, rows = the warp's 16 rows of sA) += A (16 x D) * B^T where A is rows
// [a_row0, a_row0 + 16) of the [*][D] tile sA and B^T is rows [0, 8*NT) of the [*][D] tile sB
// (B[k][n] = sB[n][k], the "[n][k]" case: no transpose). a_row0: a multiple of 8.
// kRowAddr = false: each address from swz itself (the d128 dK/dV kernels, where the row
// addresses' live registers tipped ptxas into 24-52 B of spills on sm_90a).
template <typename T, int D, int NT, bool kRowAddr = true>
__device__ __forceinline__ void warp_gemm_abt(float (&acc)[NT][4], const T* sA, int a_row0,
                                              const T* sB, int lane) {
  static_assert(NT % 2 == 0, "pairs of n8 tiles");
  const SwzRow<D> ra(smem_addr(sA), a_row0 + a_row(lane), a_col(lane) / 8);
  const SwzRow<D> rb(smem_addr(sB), bnk_row(lane), bnk_col(lane) / 8);
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    ldsm_x4(a, kRowAddr ? ra.at(ks, 0)
                        : smem_addr(sA + swz<D>(a_row0 + a_row(lane), ks * 16 + a_col(lane))));
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldsm_x4(b, kRowAddr ? rb.at(ks, np * 16)
                          : smem_addr(sB + swz<D>(np * 16 + bnk_row(lane), ks * 16 + bnk_col(lane))));
      MmaOp<T>::run(acc[2 * np], a, b[0], b[1]);
      MmaOp<T>::run(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[DN/8][4] (16 x DN) += X (16 x 16*KS, fp32 accumulators of the previous product, converted
// to 16 bits and reused as the A operand) * sB (rows [0, 16*KS), columns [col0, col0 + DN) of
// the [*][D] tile sB, the "[k][n]" case: ldmatrix.trans). DN = D, col0 = 0 but for the dK/dV
// kernel's column-split warps (d192 / d256).
template <typename T, int D, int KS, int DN = D, bool kRowAddr = true>
__device__ __forceinline__ void warp_gemm_xb(float (&acc)[DN / 8][4], const float (&x)[2 * KS][4],
                                             const T* sB, int lane, int col0 = 0) {
  const SwzRow<D> rb(smem_addr(sB), bkn_row(lane), (col0 + bkn_col(lane)) / 8);
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t a[4];
    a[0] = MmaOp<T>::pack(x[2 * ks][0], x[2 * ks][1]);
    a[1] = MmaOp<T>::pack(x[2 * ks][2], x[2 * ks][3]);
    a[2] = MmaOp<T>::pack(x[2 * ks + 1][0], x[2 * ks + 1][1]);
    a[3] = MmaOp<T>::pack(x[2 * ks + 1][2], x[2 * ks + 1][3]);
#pragma unroll
    for (int dp = 0; dp < DN / 16; ++dp) {
      uint32_t b[4];
      // == smem_addr(sB + swz<D>(ks * 16 + bkn_row(lane), col0 + dp * 16 + bkn_col(lane)))
      ldsm_x4_trans(b, kRowAddr ? rb.at(dp, ks * 16)
                                : smem_addr(sB + swz<D>(ks * 16 + bkn_row(lane),
                                                        col0 + dp * 16 + bkn_col(lane))));
      MmaOp<T>::run(acc[2 * dp], a, b[0], b[1]);
      MmaOp<T>::run(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// Copy rows [row0, row0 + kRows) of a (seqlen, D) strided tensor into a swizzled [kRows][D]
// tile with cp.async; rows at or past `seqlen` are zero-filled.
// Thread layout: kTpr threads per row (the largest of 16, 8, 4 dividing the D / 8 chunks),
// each copying chunks c, c + kTpr, ... of it, kThreads / kTpr rows per sweep. That sweep is a
// multiple of the swizzle's 8-row period, so every row a thread copies has the same swizzle
// key (the key is < kTpr, so the XOR stays inside the thread's chunk group) and its shared
// offsets are one register plus immediates; the source pointer advances by a fixed step.
// Fully unrolled, no division: the generic strided loop this replaces compiled to a runtime
// trip count with a remainder loop, ~60 SASS instructions per tile row sweep (the d128 dK/dV
// kernel's main loop spent ~45% of its static instructions there).
template <typename T, int D, int kRows, int kThreads>
__device__ __forceinline__ void load_tile(T* s, const T* base, int64_t row_stride, int row0,
                                          int seqlen, int tid) {
  constexpr int kChunks = D / 8;
  constexpr int kTpr = kChunks % 16 == 0 ? 16 : kChunks % 8 == 0 ? 8 : 4;
  constexpr int kRowsPerSweep = kThreads / kTpr;
  static_assert(kThreads % kTpr == 0 && kRowsPerSweep % 8 == 0, "one swizzle key per thread");
  // d96's 32-row dK/dV query tiles are half a 64-row sweep: the upper half of the block idles.
  static_assert(kRows % kRowsPerSweep == 0 || kRowsPerSweep % kRows == 0, "whole sweeps");
  constexpr int kSweeps = kRows >= kRowsPerSweep ? kRows / kRowsPerSweep : 1;
  const int r0 = tid / kTpr, c = tid % kTpr;
  if (kRows < kRowsPerSweep && r0 >= kRows) return;  // warp-uniform (kTpr divides 32)
  // swz(r0 + i * sweep, (c + g * kTpr) * 8) == swz(r0, c * 8) + i * sweep * D + g * kTpr * 8.
  T* dst = s + swz<D>(r0, c * 8);
  const T* src = base + static_cast<int64_t>(row0 + r0) * row_stride + c * 8;
  const int64_t step = static_cast<int64_t>(kRowsPerSweep) * row_stride;
#pragma unroll
  for (int i = 0; i < kSweeps; ++i) {
    const bool ok = row0 + r0 + i * kRowsPerSweep < seqlen;
#pragma unroll
    for (int g = 0; g < kChunks / kTpr; ++g)
      cp_async16(smem_addr(dst + i * kRowsPerSweep * D + g * kTpr * 8),
                 ok ? src + g * kTpr * 8 : base, ok);
    src += step;
  }
}

// Store a warp's 16 x D fp32 accumulator (rows row0 + c_row) as 16-bit pairs.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* base, int64_t row_stride, int row0, int seqlen,
                                           const float (&acc)[D / 8][4], float scale, int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + bwd_layout::c_row(lane, 2 * half);
    if (row >= seqlen) continue;
    T* dst = base + static_cast<int64_t>(row) * row_stride;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      const int col = nt * 8 + bwd_layout::c_col(lane, 0);
      *reinterpret_cast<uint32_t*>(dst + col) =
          MmaOp<T>::pack(acc[nt][2 * half] * scale, acc[nt][2 * half + 1] * scale);
    }
  }
}

// Same, as fp32 into a contiguous [seqlen][D] buffer (the dK/dV split partials): DN columns
// from `base` (a column-split warp passes its first column's address).
template <int D, int DN = D>
__device__ __forceinline__ void store_rows_f32(float* base, int row0, int seqlen,
                                               const float (&acc)[DN / 8][4], float scale,
                                               int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + bwd_layout::c_row(lane, 2 * half);
    if (row >= seqlen) continue;
    float* dst = base + static_cast<int64_t>(row) * D;
#pragma unroll
    for (int nt = 0; nt < DN / 8; ++nt)
      *reinterpret_cast<float2*>(dst + nt * 8 + bwd_layout::c_col(lane, 0)) =
          make_float2(acc[nt][2 * half] * scale, acc[nt][2 * half + 1] * scale);
  }
}

// lse in the log2 domain, written once per row by the delta kernel (params.lse_log2) so the
// dK/dV and dQ loops compute P = exp2(fma(S, scale * log2e, -lse2)): one FFMA per score. A row
// that sees no key has lse = -inf: +inf here, so its P is 0 even before the mask pass zeroes it.
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

struct BwdArgs {
  FlashBwdParams p;
  MaskInfo mask;
  float scale_log2;     // softmax_scale * log2(e); soft-capped: softcap * log2(e)
  float softcap_pre;    // soft-capped: softmax_scale / softcap * 2 log2(e) (softcap.cuh)
  float inv_scale_log2;  // soft-capped: 1 / (softcap * log2(e))
  int num_splits;       // dK/dV kernel: blocks per (key tile, kv head), see dkdv_num_splits
  int heads_per_split;  // query heads each of those blocks loops over
  // Block order of the dK/dV and dQ kernels (block_order.cuh): pairs per section, 1 = the
  // plain grid order. Above 1 only under a causal (right) bound, where tile costs differ.
  int64_t dkdv_section, dq_section;
};

// Where a block's sequence lives. Dense: batch b of (b, seqlen, heads, d) tensors, lse and
// delta (b, h, seqlen_q). Varlen (cu_seqlens_q non-null): rows [q_start, q_start + len_q) of
// the packed q / out / dout / dq and [k_start, k_start + len_k) of k / v / dk / dv (clamped,
// see bwd_layout::varlen_bounds), lse and delta (h, total_q); the batch strides are not read.
// Worked out once per block; `mask` carries the sequence's own lengths, so the masking, the
// tile ranges and the row tails below are the dense code unchanged.
struct BlockSeq {
  MaskInfo mask;
  bool varlen;
  int64_t b, q_start, k_start;
  int64_t lse_row0, lse_head_stride;  // lse / delta index of (head, row) = row0 + head*stride + row
  // Element offset of the sequence's row 0 in a q-side (q_off) or k-side (k_off) tensor.
  __device__ __forceinline__ int64_t q_off(int64_t batch_stride, int64_t row_stride) const {
    return varlen ? q_start * row_stride : b * batch_stride;
  }
  __device__ __forceinline__ int64_t k_off(int64_t batch_stride, int64_t row_stride) const {
    return varlen ? k_start * row_stride : b * batch_stride;
  }
};

__device__ __forceinline__ BlockSeq block_seq(const BwdArgs& args, int64_t b) {
  const FlashFwdParams& f = args.p.fwd;
  BlockSeq s;
  s.mask = args.mask;
  s.b = b;
  s.varlen = f.cu_seqlens_q != nullptr;
  s.q_start = s.k_start = 0;
  s.lse_row0 = b * f.h * f.seqlen_q;
  s.lse_head_stride = f.seqlen_q;
  if (s.varlen) {
    bwd_layout::varlen_bounds(f.cu_seqlens_q, b, f.total_q, f.seqlen_q, &s.q_start,
                              &s.mask.seqlen_q);
    bwd_layout::varlen_bounds(f.cu_seqlens_k, b, f.total_k, f.seqlen_k, &s.k_start,
                              &s.mask.seqlen_k);
    s.lse_row0 = s.q_start;
    s.lse_head_stride = f.total_q;
  }
  return s;
}

// ---- kernel 1: delta = rowsum(dO * O) ------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(256) flash_bwd_delta_kernel(const BwdArgs args) {
  // kLanes lanes per row (a power of two), kPerLane 16-byte chunks of 8 elements each: 1 up
  // to d128 and at d256, 3 at d96 (4 lanes) and d192 (8 lanes).
  constexpr int kLanes = bwd_layout::delta_lanes(D);
  constexpr int kPerLane = D / 8 / kLanes;
  constexpr int kRowsPerBlock = 256 / kLanes;
  const FlashBwdParams& p = args.p;
  // Dense: rows (b, h, seqlen_q). Varlen: rows (h, total_q) of the packed out / dout, one
  // "batch" (sequence boundaries do not matter for a row sum; rows outside every sequence
  // get a delta nobody reads).
  const bool varlen = p.fwd.cu_seqlens_q != nullptr;
  const int64_t seq_rows = varlen ? p.fwd.total_q : p.fwd.seqlen_q;
  const int64_t rows = (varlen ? 1 : p.fwd.b) * p.fwd.h * seq_rows;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kLanes;
  const int part = threadIdx.x % kLanes;
  float sum = 0.f;
  if (r < rows) {
    const int64_t i = r % seq_rows;
    const int64_t hb = r / seq_rows;
    const int64_t h = hb % p.fwd.h, b = hb / p.fwd.h;
    const T* o = static_cast<const T*>(p.fwd.out) + b * p.fwd.out_batch_stride +
                 i * p.fwd.out_row_stride + h * p.fwd.out_head_stride + part * 8;
    const T* g = static_cast<const T*>(p.dout) + b * p.dout_batch_stride +
                 i * p.dout_row_stride + h * p.dout_head_stride + part * 8;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const uint4 ov = *reinterpret_cast<const uint4*>(o + c * kLanes * 8);
      const uint4 gv = *reinterpret_cast<const uint4*>(g + c * kLanes * 8);
      const T* oe = reinterpret_cast<const T*>(&ov);
      const T* ge = reinterpret_cast<const T*>(&gv);
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += MmaOp<T>::to_float(oe[e]) * MmaOp<T>::to_float(ge[e]);
    }
  }
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (r < rows && part == 0) {  // delta, lse2: (b, h, seqlen_q) / (h, total_q), like lse
    p.delta[r] = sum;
    p.lse_log2[r] = lse_log2(p.fwd.lse[r]);
  }
}

// ---- kernel 2: dK, dV ----------------------------------------------------------------------

template <int D> struct DkdvCfg {
  static constexpr int kBlockN = bwd_layout::dkdv_block_n(D);  // key rows: kRowWarps x 16
  // Query rows per inner tile. Registers per thread: dK + dV accumulators kDn/2 floats each,
  // S^T and dP^T kBlockM/2 each: 32 + 64 at D = 32, 64 + 64 at 64, 96 + 64 at 96, 128 + 32 at
  // 128, 96 + 64 at 192, 128 + 32 at 256 (no spills; flash_bwd.cu).
  static constexpr int kBlockM = bwd_layout::dkdv_block_m(D);
  // Warps sharing a 16-key-row slice; each accumulates dK / dV columns [col0, col0 + kDn).
  static constexpr int kDSplit = bwd_layout::dkdv_d_split(D);
  static constexpr int kDn = D / kDSplit;
  static constexpr int kRowWarps = kBlockN / 16;
  static constexpr int kWarps = kRowWarps * kDSplit;
  static constexpr int kThreads = kWarps * 32;
  // sK, sV [kBlockN][D]; sQ, sdO [2][kBlockM][D]; sLse, sDelta [2][kBlockM] fp32.
  static constexpr int kSmemBytes =
      (2 * kBlockN * D + 4 * kBlockM * D) * 2 + 4 * kBlockM * static_cast<int>(sizeof(float));
  static_assert(kBlockN % 16 == 0 && kBlockM % 16 == 0, "16-row mma tiles");
  static_assert(kBlockM <= kThreads, "one thread per lse / delta row");
  static_assert(kSmemBytes <= 163 * 1024, "fits an sm_80 SM");
};

// kSoftcap: the forward's soft-capped scores (softcap.cuh), P recomputed from them and dS
// multiplied by the cap's derivative 1 - t^2 (see the P^T step below).
template <typename T, int D, bool kSoftcap = false>
__global__ void __launch_bounds__(DkdvCfg<D>::kThreads, 1)
    flash_bwd_dkdv_kernel(const BwdArgs args) {
  using Cfg = DkdvCfg<D>;
  constexpr int kBlockN = Cfg::kBlockN, kBlockM = Cfg::kBlockM, kThreads = Cfg::kThreads;
  FASTATTN_BWD_SMEM(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * D;
  T* sQ = sV + kBlockN * D;        // [2][kBlockM][D]
  T* sdO = sQ + 2 * kBlockM * D;   // [2][kBlockM][D]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kBlockM * D);  // [2][kBlockM]
  float* sDelta = sLse + 2 * kBlockM;                             // [2][kBlockM]

  const FlashBwdParams& p = args.p;
  const FlashFwdParams& f = p.fwd;
  constexpr int kDn = Cfg::kDn;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // This warp's 16 key rows (wrow) and its dK / dV columns [col0, col0 + kDn).
  const int wrow = Cfg::kDSplit == 1 ? warp : warp % Cfg::kRowWarps;
  const int col0 = Cfg::kDSplit == 1 ? 0 : (warp / Cfg::kRowWarps) * kDn;
  // Lowest key tile first: under a causal mask it is seen by the most query tiles. With
  // sections (block_order.cuh) that order holds across several (kv head, split, batch) pairs.
  int n_block = static_cast<int>(blockIdx.x), pair_y = static_cast<int>(blockIdx.y);
  int64_t b = blockIdx.z;
  if (args.dkdv_section > 1) {
    const BlockOrder bo = block_order(FASTATTN_LINEAR_BLOCK(), gridDim.x, gridDim.y * gridDim.z,
                                      static_cast<uint32_t>(args.dkdv_section));
    n_block = bo.rank;
    pair_y = bo.pair % static_cast<int>(gridDim.y);
    b = bo.pair / static_cast<int>(gridDim.y);
  }
  const int n0 = n_block * kBlockN;
  const int hk = pair_y / args.num_splits;
  const int split = pair_y % args.num_splits;
  const BlockSeq seq = block_seq(args, b);
  const MaskInfo& mask = seq.mask;
  // Varlen: the grid covers max_seqlen_k; a key tile past this sequence's end has no rows to
  // write (its workspace rows are never read either: the reduce skips them). Dense: never.
  if (n0 >= mask.seqlen_k) return;  // block-uniform, before any cp.async or barrier
  const int group = static_cast<int>(f.h / f.h_k);
  // This block's query heads: [h_first, h_first + n_heads) of the kv head's group.
  const int h_first = hk * group + split * args.heads_per_split;
  const int n_heads = min(args.heads_per_split, group - split * args.heads_per_split);

  int mb_begin, mb_end;
  bwd_layout::m_block_range(mask, n0, kBlockN, kBlockM, &mb_begin, &mb_end);
  const int n_mblocks = mb_end - mb_begin;
  const int total = n_mblocks * n_heads;  // (query head, query tile) pairs, head-major

  const T* q = static_cast<const T*>(f.q) + seq.q_off(f.q_batch_stride, f.q_row_stride);
  const T* dout =
      static_cast<const T*>(p.dout) + seq.q_off(p.dout_batch_stride, p.dout_row_stride);

  // Stage iteration `it`'s Q / dO tiles and lse / delta rows into `buf`, all with cp.async
  // (so no thread waits on a global load here). Rows past seqlen_q are zero-filled: lse 0 and
  // delta 0 there are harmless because such a tile always runs masked (tile_needs_mask) and
  // the masked P is exactly 0.
  // (h, m0) of an iteration: head h_first + it / n_mblocks, tile mb_begin + it % n_mblocks,
  // stepped by next_tile() instead of divided out per tile.
  auto load_q_tile = [&](int h, int m0, int buf) {
    load_tile<T, D, kBlockM, kThreads>(sQ + buf * kBlockM * D, q + h * f.q_head_stride,
                                       f.q_row_stride, m0, mask.seqlen_q, tid);
    load_tile<T, D, kBlockM, kThreads>(sdO + buf * kBlockM * D, dout + h * p.dout_head_stride,
                                       p.dout_row_stride, m0, mask.seqlen_q, tid);
    if (tid < kBlockM) {
      const bool ok = m0 + tid < mask.seqlen_q;
      const int64_t idx = seq.lse_row0 + h * seq.lse_head_stride + (ok ? m0 + tid : 0);
      cp_async4(smem_addr(sLse + buf * kBlockM + tid), p.lse_log2 + idx, ok);
      cp_async4(smem_addr(sDelta + buf * kBlockM + tid), p.delta + idx, ok);
    }
  };

  // A key tile no query sees (total == 0) loads nothing: a block must not exit with cp.async
  // copies in flight, and its dK = dV = 0 needs no data.
  if (total > 0) {
    load_tile<T, D, kBlockN, kThreads>(sK, static_cast<const T*>(f.k) +
                                               seq.k_off(f.k_batch_stride, f.k_row_stride) +
                                               hk * f.k_head_stride,
                                       f.k_row_stride, n0, mask.seqlen_k, tid);
    load_tile<T, D, kBlockN, kThreads>(sV, static_cast<const T*>(f.v) +
                                               seq.k_off(f.v_batch_stride, f.v_row_stride) +
                                               hk * f.v_head_stride,
                                       f.v_row_stride, n0, mask.seqlen_k, tid);
    load_q_tile(h_first, mb_begin * kBlockM, 0);
  }
  cp_async_commit();
  // The tile being computed (m0) and the one being loaded (next_h, next_m0).
  int m0 = mb_begin * kBlockM;
  int next_h = h_first, next_m0 = m0;
  const int m_end = mb_end * kBlockM;
  auto next_tile = [&](int* h, int* m) {
    *m += kBlockM;
    if (*m == m_end) {
      *m = mb_begin * kBlockM;
      ++*h;
    }
  };

  float acc_dk[kDn / 8][4], acc_dv[kDn / 8][4];
#pragma unroll
  for (int i = 0; i < kDn / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

  const int key_row0 = n0 + wrow * 16;  // this warp's first key row
  constexpr bool kRowAddr = D != 128;    // see warp_gemm_abt
  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    // Tile `it` has landed, and every warp is done with tile it-1 (whose buffer we refill).
    cp_async_wait_all();
    __syncthreads();
    next_tile(&next_h, &next_m0);  // now the tile of iteration it + 1
    if (it + 1 < total) load_q_tile(next_h, next_m0, buf ^ 1);
    cp_async_commit();

    const T* q_s = sQ + buf * kBlockM * D;
    const T* do_s = sdO + buf * kBlockM * D;
    const float* lse_s = sLse + buf * kBlockM;
    const float* delta_s = sDelta + buf * kBlockM;

    // S^T (16 keys x kBlockM queries) = K_w Q^T.
    float s[kBlockM / 8][4];
#pragma unroll
    for (int i = 0; i < kBlockM / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = 0.f;
    warp_gemm_abt<T, D, kBlockM / 8, kRowAddr>(s, sK, wrow * 16, q_s, lane);

    // P^T = exp2(fma(S^T, scale * log2e, -lse2)) (lse2 = lse * log2e from the delta kernel);
    // element (key c_row, query c_col). Soft-capped: t = tanh(S^T * scale / softcap) and
    // P^T = exp2(fma(t, softcap * log2e, -lse2)); the cap's derivative 1 - t^2 is folded into P
    // once dV has consumed it (below). The mask pass sets -inf after the FFMA (so no -inf is
    // ever scaled, whatever the sign of softmax_scale) and runs only on tiles that straddle a
    // mask boundary or a sequence tail: one branch per tile, not a test per element.
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float lse2 = lds_f32(lse_s + nt * 8 + bwd_layout::c_col(lane, e));
        const float x = kSoftcap ? softcap_tanh(s[nt][e] * args.softcap_pre) : s[nt][e];
        s[nt][e] = fmaf(x, args.scale_log2, -lse2);
      }
    if (bwd_layout::tile_needs_mask(mask, m0, kBlockM, n0, kBlockN)) {
#pragma unroll
      for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!bwd_layout::visible(mask, m0 + nt * 8 + bwd_layout::c_col(lane, e),
                                   key_row0 + bwd_layout::c_row(lane, e)))
            s[nt][e] = -INFINITY;
    }
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = exp2f(s[nt][e]);

    // dV_w += P^T dO.
    warp_gemm_xb<T, D, kBlockM / 16, kDn, kRowAddr>(acc_dv, s, do_s, lane, col0);
    // Soft-capped: P^T *= 1 - t^2, so dS^T below is the gradient of the uncapped score. t is
    // recovered from P itself, t = (log2 P + lse log2e) / (softcap log2e) (one lg2.approx;
    // absolute error ~2^-22, far below the 16-bit rounding dS^T gets for the dK mma), rather
    // than kept from above: holding 1 - t^2 (even as fp16 pairs) across the dV product spilled
    // the d128 kernel (255 registers, sm_80 and sm_90a). P = 0 (masked, underflowed, or a row
    // with no key: lse -inf) has dS = 0 whatever t is.
    if constexpr (kSoftcap) {
#pragma unroll
      for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pe = s[nt][e];
          const float lse2 = lds_f32(lse_s + nt * 8 + bwd_layout::c_col(lane, e));
          const float t = (__log2f(pe) + lse2) * args.inv_scale_log2;
          s[nt][e] = pe > 0.f ? pe * (1.f - t * t) : 0.f;
        }
      }
    }

    // dP^T = V_w dO^T, then dS^T = P^T * (dP^T - delta) in place.
    float dp[kBlockM / 8][4];
#pragma unroll
    for (int i = 0; i < kBlockM / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[i][e] = 0.f;
    warp_gemm_abt<T, D, kBlockM / 8, kRowAddr>(dp, sV, wrow * 16, do_s, lane);
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        dp[nt][e] = s[nt][e] * (dp[nt][e] - lds_f32(delta_s + nt * 8 + bwd_layout::c_col(lane, e)));

    // dK_w += dS^T Q (softmax_scale applied once, at the store).
    warp_gemm_xb<T, D, kBlockM / 16, kDn, kRowAddr>(acc_dk, dp, q_s, lane, col0);
    m0 = next_m0;
  }

  if (args.num_splits == 1) {
    store_rows<T, kDn>(static_cast<T*>(p.dk) + seq.k_off(p.dk_batch_stride, p.dk_row_stride) +
                           hk * p.dk_head_stride + col0,
                       p.dk_row_stride, key_row0, mask.seqlen_k, acc_dk, f.softmax_scale, lane);
    store_rows<T, kDn>(static_cast<T*>(p.dv) + seq.k_off(p.dv_batch_stride, p.dv_row_stride) +
                           hk * p.dv_head_stride + col0,
                       p.dv_row_stride, key_row0, mask.seqlen_k, acc_dv, 1.f, lane);
  } else {
    // fp32 partials: workspace = dK [splits][b][h_k][seqlen_k][D], then dV likewise (varlen:
    // seqlen_k is the max bound and rows past the sequence's own length stay unwritten).
    const int64_t plane = f.b * f.h_k * f.seqlen_k * D;
    float* ws = p.workspace + split * plane + (b * f.h_k + hk) * f.seqlen_k * D + col0;
    store_rows_f32<D, kDn>(ws, key_row0, mask.seqlen_k, acc_dk, f.softmax_scale, lane);
    store_rows_f32<D, kDn>(ws + args.num_splits * plane, key_row0, mask.seqlen_k, acc_dv, 1.f,
                           lane);
  }
}

// dK/dV = sum over splits (in split order) of the fp32 partials; D/8 threads per key row.
template <typename T, int D>
__global__ void __launch_bounds__(256) flash_bwd_dkdv_reduce_kernel(const BwdArgs args) {
  const FlashBwdParams& p = args.p;
  const FlashFwdParams& f = p.fwd;
  const int64_t rows = f.b * f.h_k * f.seqlen_k;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * (D / 8)) return;
  const int c = static_cast<int>(idx % (D / 8)) * 8;
  const int64_t row = idx / (D / 8);  // (b, h_k, seqlen_k) flattened, the workspace order
  const int64_t j = row % f.seqlen_k, bh = row / f.seqlen_k;
  const int64_t hk = bh % f.h_k, b = bh / f.h_k;
  const int64_t plane = rows * D;
  // Destination row: dense (b, j); varlen packed row k_start + j, only for j < the sequence's
  // own key length (the dK/dV blocks wrote nothing past it).
  int64_t dk_off = b * p.dk_batch_stride + j * p.dk_row_stride;
  int64_t dv_off = b * p.dv_batch_stride + j * p.dv_row_stride;
  if (f.cu_seqlens_q != nullptr) {
    int64_t k_start;
    int len_k;
    bwd_layout::varlen_bounds(f.cu_seqlens_k, b, f.total_k, f.seqlen_k, &k_start, &len_k);
    if (j >= len_k) return;
    dk_off = (k_start + j) * p.dk_row_stride;
    dv_off = (k_start + j) * p.dv_row_stride;
  }
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    const float* ws = p.workspace + which * args.num_splits * plane + row * D + c;
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;
    for (int sp = 0; sp < args.num_splits; ++sp) {
      const float4 lo = *reinterpret_cast<const float4*>(ws + sp * plane);
      const float4 hi = *reinterpret_cast<const float4*>(ws + sp * plane + 4);
      acc[0] += lo.x; acc[1] += lo.y; acc[2] += lo.z; acc[3] += lo.w;
      acc[4] += hi.x; acc[5] += hi.y; acc[6] += hi.z; acc[7] += hi.w;
    }
    T* dst = which == 0 ? static_cast<T*>(p.dk) + dk_off + hk * p.dk_head_stride + c
                        : static_cast<T*>(p.dv) + dv_off + hk * p.dv_head_stride + c;
#pragma unroll
    for (int e = 0; e < 8; e += 2)
      *reinterpret_cast<uint32_t*>(dst + e) = MmaOp<T>::pack(acc[e], acc[e + 1]);
  }
}

// ---- kernel 3: dQ --------------------------------------------------------------------------

template <int D> struct DqCfg {
  static constexpr int kBlockM = bwd_layout::dq_block_m(D);  // query rows: kRowWarps x 16
  static constexpr int kBlockN = bwd_layout::dq_block_n(D);  // key rows per inner tile
  // Warps sharing 16 query rows; each accumulates dQ columns [col0, col0 + kDn).
  static constexpr int kDSplit = bwd_layout::dq_d_split(D);
  static constexpr int kDn = D / kDSplit;
  static constexpr int kRowWarps = kBlockM / 16;
  static constexpr int kWarps = kRowWarps * kDSplit;
  static constexpr int kThreads = kWarps * 32;
  // sQ, sdO [kBlockM][D]; sK, sV [2][kBlockN][D].
  static constexpr int kSmemBytes = (2 * kBlockM * D + 4 * kBlockN * D) * 2;
  static_assert(kBlockN % 16 == 0 && kBlockM % 16 == 0, "16-row mma tiles");
  static_assert(kSmemBytes <= 163 * 1024, "fits an sm_80 SM");
};

// kSoftcap: as flash_bwd_dkdv_kernel (P folded with 1 - t^2 at once: dQ needs no bare P).
template <typename T, int D, bool kSoftcap = false>
__global__ void __launch_bounds__(DqCfg<D>::kThreads, 1) flash_bwd_dq_kernel(const BwdArgs args) {
  using Cfg = DqCfg<D>;
  constexpr int kBlockN = Cfg::kBlockN, kBlockM = Cfg::kBlockM, kThreads = Cfg::kThreads;
  FASTATTN_BWD_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * D;
  T* sK = sdO + kBlockM * D;    // [2][kBlockN][D]
  T* sV = sK + 2 * kBlockN * D;  // [2][kBlockN][D]

  const FlashBwdParams& p = args.p;
  const FlashFwdParams& f = p.fwd;
  constexpr int kDn = Cfg::kDn;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // This warp's 16 query rows (wrow) and its dQ columns [col0, col0 + kDn).
  const int wrow = Cfg::kDSplit == 1 ? warp : warp % Cfg::kRowWarps;
  const int col0 = Cfg::kDSplit == 1 ? 0 : (warp / Cfg::kRowWarps) * kDn;
  // Highest query tile first: under causal masking it sees the most key tiles, so the longest
  // blocks start in the first wave instead of forming the tail; with sections
  // (block_order.cuh) that order holds across several (head, batch) pairs.
  int m_rank = static_cast<int>(blockIdx.x), h = static_cast<int>(blockIdx.y);
  int64_t b = blockIdx.z;
  // d128 soft-capped: the section arithmetic tipped ptxas into 12 B of spills (sm_90a); that
  // kernel keeps the plain order.
  constexpr bool kSections = !(D == 128 && kSoftcap);
  if (kSections && args.dq_section > 1) {
    const BlockOrder bo = block_order(FASTATTN_LINEAR_BLOCK(), gridDim.x, gridDim.y * gridDim.z,
                                      static_cast<uint32_t>(args.dq_section));
    m_rank = bo.rank;
    h = bo.pair % static_cast<int>(gridDim.y);
    b = bo.pair / static_cast<int>(gridDim.y);
  }
  const int m0 = (static_cast<int>(gridDim.x) - 1 - m_rank) * kBlockM;
  const int64_t hk = h / (f.h / f.h_k);
  const BlockSeq seq = block_seq(args, b);
  const MaskInfo& mask = seq.mask;
  // Varlen: the grid covers max_seqlen_q; a query tile past this sequence's end has no rows.
  if (m0 >= mask.seqlen_q) return;  // block-uniform, before any cp.async or barrier

  int nb_begin, nb_end;
  bwd_layout::n_block_range(mask, m0, kBlockM, kBlockN, &nb_begin, &nb_end);
  const int total = nb_end - nb_begin;

  const T* k = static_cast<const T*>(f.k) + seq.k_off(f.k_batch_stride, f.k_row_stride) +
               hk * f.k_head_stride;
  const T* v = static_cast<const T*>(f.v) + seq.k_off(f.v_batch_stride, f.v_row_stride) +
               hk * f.v_head_stride;
  auto load_kv_tile = [&](int it, int buf) {
    const int n0 = (nb_begin + it) * kBlockN;
    load_tile<T, D, kBlockN, kThreads>(sK + buf * kBlockN * D, k, f.k_row_stride, n0,
                                       mask.seqlen_k, tid);
    load_tile<T, D, kBlockN, kThreads>(sV + buf * kBlockN * D, v, f.v_row_stride, n0,
                                       mask.seqlen_k, tid);
  };

  if (total > 0) {  // no visible key tile: nothing to load, dQ = 0 (and no copy in flight)
    load_tile<T, D, kBlockM, kThreads>(
        sQ,
        static_cast<const T*>(f.q) + seq.q_off(f.q_batch_stride, f.q_row_stride) +
            h * f.q_head_stride,
        f.q_row_stride, m0, mask.seqlen_q, tid);
    load_tile<T, D, kBlockM, kThreads>(
        sdO,
        static_cast<const T*>(p.dout) + seq.q_off(p.dout_batch_stride, p.dout_row_stride) +
            h * p.dout_head_stride,
        p.dout_row_stride, m0, mask.seqlen_q, tid);
    load_kv_tile(0, 0);
  }
  cp_async_commit();

  // lse2 (lse * log2e, the delta kernel's) and delta of this thread's two query rows
  // (c_row(lane, 0) and +8).
  const int q_row0 = m0 + wrow * 16;
  float lse_r[2], delta_r[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = q_row0 + bwd_layout::c_row(lane, 2 * half);
    lse_r[half] = INFINITY;
    delta_r[half] = 0.f;
    if (row < mask.seqlen_q) {
      const int64_t idx = seq.lse_row0 + h * seq.lse_head_stride + row;
      lse_r[half] = p.lse_log2[idx];
      delta_r[half] = p.delta[idx];
    }
  }

  float acc_dq[kDn / 8][4];
#pragma unroll
  for (int i = 0; i < kDn / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dq[i][e] = 0.f;

  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    cp_async_wait_all();
    __syncthreads();
    if (it + 1 < total) load_kv_tile(it + 1, buf ^ 1);
    cp_async_commit();

    const T* k_s = sK + buf * kBlockN * D;
    const T* v_s = sV + buf * kBlockN * D;
    const int n0 = (nb_begin + it) * kBlockN;

    // S (16 queries x kBlockN keys) = Q_w K^T, then P.
    float s[kBlockN / 8][4];
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = 0.f;
    warp_gemm_abt<T, D, kBlockN / 8>(s, sQ, wrow * 16, k_s, lane);
    const bool need_mask = bwd_layout::tile_needs_mask(mask, m0, kBlockM, n0, kBlockN);
    if constexpr (kSoftcap) {
      // P * (1 - t^2) (see flash_bwd_dkdv_kernel), 1 - t^2 used as soon as it is made: holding
      // it across a separate mask pass spilled 16 B at d128 (sm_90a).
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float t = softcap_tanh(s[nt][e] * args.softcap_pre);
          float x = fmaf(t, args.scale_log2, -lse_r[e >> 1]);
          if (need_mask && !bwd_layout::visible(mask, q_row0 + bwd_layout::c_row(lane, e),
                                                n0 + nt * 8 + bwd_layout::c_col(lane, e)))
            x = -INFINITY;
          s[nt][e] = exp2f(x) * (1.f - t * t);
        }
    } else {
      // P = exp2(fma(S, scale * log2e, -lse2)), then the mask pass on straddling tiles only
      // (one branch per tile, as in dK/dV), zeroing P after the exp2.
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = exp2f(fmaf(s[nt][e], args.scale_log2, -lse_r[e >> 1]));
      if (need_mask) {
#pragma unroll
        for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (!bwd_layout::visible(mask, q_row0 + bwd_layout::c_row(lane, e),
                                     n0 + nt * 8 + bwd_layout::c_col(lane, e)))
              s[nt][e] = 0.f;
      }
    }

    // dP = dO_w V^T; dS = P * (dP - delta) (soft-capped: P already carries 1 - t^2).
    float dp[kBlockN / 8][4];
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[i][e] = 0.f;
    warp_gemm_abt<T, D, kBlockN / 8>(dp, sdO, wrow * 16, v_s, lane);
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - delta_r[e >> 1]);

    // dQ_w += dS K.
    warp_gemm_xb<T, D, kBlockN / 16, kDn>(acc_dq, dp, k_s, lane, col0);
  }

  store_rows<T, kDn>(static_cast<T*>(p.dq) + seq.q_off(p.dq_batch_stride, p.dq_row_stride) +
                       h * p.dq_head_stride + col0,
                   p.dq_row_stride, q_row0, mask.seqlen_q, acc_dq, f.softmax_scale, lane);
}

// ---- host-side preparation ---------------------------------------------------------------

inline bool aligned(const void* ptr, int bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}
inline bool strides_multiple(int64_t a, int64_t b, int64_t c, int64_t m) {
  return a % m == 0 && b % m == 0 && c % m == 0;
}

inline int64_t clamp_window(int64_t w, int64_t limit) {
  if (w < 0) return -1;
  return w > limit ? limit : w;
}


// Validate params and build the kernels' arguments. Returns kBwdInvalid (the launcher
// reports cudaErrorInvalidValue), kBwdNothing (empty problem) or kBwdLaunch.
enum BwdPrep { kBwdInvalid, kBwdNothing, kBwdLaunch };

inline bool flash_bwd_head_dim_ok(int64_t d) { return bwd_layout::head_dim_supported(d); }

inline BwdPrep prepare_bwd(const FlashBwdParams& params, BwdArgs* out_args) {
  const FlashFwdParams& f = params.fwd;
  if (f.dtype != DType::kFloat16 && f.dtype != DType::kBFloat16) return kBwdInvalid;
  if (!flash_bwd_head_dim_ok(f.d)) return kBwdInvalid;
  if (f.b < 0 || f.h <= 0 || f.h_k <= 0 || f.h % f.h_k != 0 || f.seqlen_q < 0 ||
      f.seqlen_k < 0)
    return kBwdInvalid;
  const bool varlen = f.cu_seqlens_q != nullptr;
  if (varlen) {
    // Packed rows: cu_seqlens int32 (so totals below 2^31), both arrays given and aligned.
    if (f.cu_seqlens_k == nullptr || !aligned(f.cu_seqlens_q, 4) || !aligned(f.cu_seqlens_k, 4) ||
        f.total_q < 0 || f.total_k < 0 || f.total_q >= (int64_t{1} << 31) ||
        f.total_k >= (int64_t{1} << 31) || f.h * f.total_q >= (int64_t{1} << 35))
      return kBwdInvalid;
  }
  if (f.b == 0 || (f.seqlen_q == 0 && f.seqlen_k == 0)) return kBwdNothing;
  if (varlen && f.total_q == 0 && f.total_k == 0) return kBwdNothing;
  // Grid limits (y, z <= 65535) and the int index math of the kernels (seqlens < 2^29).
  if (f.h > 65535 || f.b > 65535 || f.seqlen_q >= (int64_t{1} << 29) ||
      f.seqlen_k >= (int64_t{1} << 29))
    return kBwdInvalid;
  // 1D grids of the delta and reduce kernels (< 2^31 blocks of 16+ rows).
  if (f.b * f.h * f.seqlen_q >= (int64_t{1} << 35) ||
      f.b * f.h_k * f.seqlen_k >= (int64_t{1} << 35))
    return kBwdInvalid;
  // Varlen with no query (or no key) row at all: those tensors are empty, their data
  // pointers may be null, and the kernels never dereference them.
  const bool need_q = !varlen || f.total_q > 0, need_k = !varlen || f.total_k > 0;
  if ((need_q && (!f.q || !f.out || !f.lse || !params.dout || !params.dq || !params.delta ||
                 !params.lse_log2)) ||
      (need_k && (!f.k || !f.v || !params.dk || !params.dv)))
    return kBwdInvalid;
  // 16-byte cp.async / vector loads on the inputs, 4-byte stores on the gradients.
  if (!aligned(f.q, 16) || !aligned(f.k, 16) || !aligned(f.v, 16) || !aligned(f.out, 16) ||
      !aligned(params.dout, 16) ||
      !strides_multiple(f.q_batch_stride, f.q_row_stride, f.q_head_stride, 8) ||
      !strides_multiple(f.k_batch_stride, f.k_row_stride, f.k_head_stride, 8) ||
      !strides_multiple(f.v_batch_stride, f.v_row_stride, f.v_head_stride, 8) ||
      !strides_multiple(f.out_batch_stride, f.out_row_stride, f.out_head_stride, 8) ||
      !strides_multiple(params.dout_batch_stride, params.dout_row_stride,
                        params.dout_head_stride, 8))
    return kBwdInvalid;
  if (!aligned(params.dq, 4) || !aligned(params.dk, 4) || !aligned(params.dv, 4) ||
      !strides_multiple(params.dq_batch_stride, params.dq_row_stride, params.dq_head_stride, 2) ||
      !strides_multiple(params.dk_batch_stride, params.dk_row_stride, params.dk_head_stride, 2) ||
      !strides_multiple(params.dv_batch_stride, params.dv_row_stride, params.dv_head_stride, 2))
    return kBwdInvalid;

  BwdArgs& args = *out_args;
  args.p = params;
  const int64_t limit = f.seqlen_q + f.seqlen_k;
  int64_t wl = clamp_window(f.window_left, limit);
  int64_t wr = clamp_window(f.window_right, limit);
  if (f.is_causal) wr = 0;
  args.mask.seqlen_q = static_cast<int>(f.seqlen_q);
  args.mask.seqlen_k = static_cast<int>(f.seqlen_k);
  args.mask.wl = static_cast<int>(wl);
  args.mask.wr = static_cast<int>(wr);
  // Soft-capping (softcap.cuh): the kernels' log2 multiplier becomes softcap * log2(e) and
  // the raw q.k is first multiplied by softmax_scale / softcap * 2 log2(e), as in the forward.
  const bool softcap = f.softcap > 0.f;
  args.scale_log2 = (softcap ? f.softcap : f.softmax_scale) * kLog2e;
  args.softcap_pre = softcap ? f.softmax_scale / f.softcap * kSoftcapTwoLog2e : 0.f;
  args.inv_scale_log2 = softcap ? 1.f / args.scale_log2 : 0.f;
  args.num_splits = bwd_layout::dkdv_num_splits(f.b, f.h, f.h_k, f.seqlen_k,
                                                static_cast<int>(f.d), &args.heads_per_split);
  // Without the workspace the binding asked for, fall back to one block per group (correct,
  // just less parallel). The workspace must be 16-byte aligned (float4 reads).
  if (args.num_splits > 1 && (params.workspace == nullptr || !aligned(params.workspace, 16))) {
    args.num_splits = 1;
    args.heads_per_split = static_cast<int>(f.h / f.h_k);
  }
  // Block order (block_order.cuh): under a right bound (causal) tile costs differ, so the
  // heaviest tiles of a section of pairs run first. What a section's blocks share: dK/dV
  // blocks the Q and dO rows of their heads, dQ blocks the K and V rows of their kv head.
  args.dkdv_section = args.dq_section = 1;
  if (wr >= 0) {
    // (tile counts bounded with 16-row tiles, the smallest: only the 2^31-block limit reads them)
    args.dkdv_section = block_order_section((f.seqlen_k + 15) / 16, f.b * f.h_k * args.num_splits,
                                            f.seqlen_q * f.d * 4 * args.heads_per_split,
                                            FASTATTN_SCHED_L2_BYTES);
    args.dq_section = block_order_section((f.seqlen_q + 15) / 16, f.b * f.h,
                                          f.seqlen_k * f.d * 4 / (f.h / f.h_k), FASTATTN_SCHED_L2_BYTES);
  }

  return kBwdLaunch;
}

// Grids of the four kernels (x, y, z), shared by the launcher and the host emulation.
struct BwdGrids {
  int64_t delta;         // 1D, 256 threads
  int64_t dkdv[3];       // kThreads = DkdvCfg<D>::kThreads
  int64_t reduce;        // 1D, 256 threads; 0 when there is no GQA split
  int64_t dq[3];         // kThreads = DqCfg<D>::kThreads
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int D>
inline BwdGrids bwd_grids(const BwdArgs& args) {
  const FlashFwdParams& f = args.p.fwd;
  BwdGrids g{};
  const int64_t delta_rows =
      f.cu_seqlens_q != nullptr ? f.h * f.total_q : f.b * f.h * f.seqlen_q;
  g.delta = ceil_div(delta_rows, 256 / bwd_layout::delta_lanes(D));
  // seqlen_q == 0 still runs the dK/dV kernel (it writes dK = dV = 0), and seqlen_k == 0
  // still runs the dQ kernel (dQ = 0).
  g.dkdv[0] = ceil_div(f.seqlen_k, DkdvCfg<D>::kBlockN);
  g.dkdv[1] = f.h_k * args.num_splits;
  g.dkdv[2] = f.b;
  g.reduce = args.num_splits > 1 ? ceil_div(f.b * f.h_k * f.seqlen_k * (D / 8), 256) : 0;
  g.dq[0] = ceil_div(f.seqlen_q, DqCfg<D>::kBlockM);
  g.dq[1] = f.h;
  g.dq[2] = f.b;
  return g;
}

}  // namespace
}  // namespace fastattn
