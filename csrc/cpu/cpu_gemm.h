// cpu_gemm.h — the small fp32 GEMM the CPU attention kernels use for their block products
// (flash forward's S = Q K^T and O += P V, on B laid out in panels: gemm_f32_bpanels below;
// the KV-cache kernel's with many query rows, on row-major B: gemm_f32).
//
// Register-tiled FMA micro-kernel, written for this use instead of ATen's cpublas::brgemm
// (oneDNN's JIT brgemm), which this replaced because of two properties of that one:
//  * it JIT-compiles and keeps one kernel per distinct (m, n, k, lda, ldb, ldc) in a
//    per-thread cache that is never evicted, and our shapes vary with the sequence lengths
//    (the K^T scratch's leading dimension is the key count; the row and key-block tails
//    follow Sq and Sk): a server or a training loop with varying lengths grew by ~40-90 KiB
//    per distinct length and thread, without bound (outside audit, 1,000 lengths: +39 MiB
//    fp32, +88 MiB fp16 on one thread);
//  * it cannot build a kernel for an operand whose rows span 2 GiB or more (std::bad_alloc):
//    the K^T scratch past 2^29 keys x head dims, or an fp32 Q / V read in place at a large
//    row stride.
// This kernel compiles nothing at run time and takes any leading dimensions. Speed against
// brgemm, 2-core Zen 4 VM, alternating processes: AVX-512 tier, fp32 flash forward
// 1 x 2048 x 16 x 128 and the fp32 chunked-prefill KV-cache row 3-5% slower (~90% of
// torch.mm's fp32 rate), causal / fp16 / d64 within noise; AVX2 tier (forced on the same
// machine), 1 thread, fp32 flash forward 1 x 2048 x 8 x 128: ~10-15% slower; the baseline
// (SSE) tier ~2x slower (brgemm JIT-compiled for the machine whatever the tier: that tier only
// runs on CPUs without AVX2).
//
// Why it is fast: C is computed in tiles of kGemmR rows x kGemmNV vectors (AVX-512: 6 x 64,
// 24 zmm accumulators; AVX2: 6 x 16 in ymm; SSE / NEON: 4 x 8), kept in registers over the
// whole reduction: per reduction step kGemmNV vector loads of B and one broadcast of A per row
// feed kGemmR x kGemmNV FMAs. Column tiles outer, row tiles inner, so a tile's B columns
// (k x 64 floats: 32 KiB at k = 128 on AVX-512) stay in L1/L2 while every row tile passes over
// them. The last columns (n not a multiple of the tile) run with as many vectors as they need,
// on a zero-padded copy of B's columns (a per-thread buffer of at most k x kGemmNV vectors),
// and their C through a small buffer: gemm_f32 reads and writes nothing past n (the panel
// variant below reads B's panels whole, by design). Each output is summed in a fixed order
// (blocks of kGemmKc steps, see gemm_tile): the same bits on any thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastattn {
namespace cpu {

#if defined(__AVX512F__)
constexpr int kGemmW = 16;  // floats per vector
constexpr int kGemmR = 6;   // rows per tile
constexpr int kGemmNV = 4;  // vectors per tile row
#elif defined(__AVX__)
constexpr int kGemmW = 8;
constexpr int kGemmR = 6;
constexpr int kGemmNV = 2;
#else
constexpr int kGemmW = 4;
constexpr int kGemmR = 4;
constexpr int kGemmNV = 2;
#endif
typedef float GemmVec __attribute__((vector_size(kGemmW * sizeof(float))));

inline GemmVec gemm_load(const float* p) {
  GemmVec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void gemm_store(float* p, const GemmVec& v) { std::memcpy(p, &v, sizeof(v)); }

// C (R rows, NV vectors of columns) = or += A (R x k, lda) B (k x NV vectors, ldb). The
// reduction runs in blocks of kGemmKc steps, each summed from zero in registers and then added
// to C (or stored, for the first block when !add_c): a blocked sum, whose rounding error grows
// with kGemmKc + k / kGemmKc instead of k (BLAS kernels do the same; one chain from C was ~2x
// torch's fp32 attention error at head dim 256, ~4x at 512, and made the flash forward's
// O += P V one chain over every key of the sequence).
constexpr int64_t kGemmKc = 128;
template <int R, int NV>
inline void gemm_tile(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                      bool add_c) {
  int64_t t0 = 0;
  do {  // at least once: k == 0 with !add_c stores zeros
    const int64_t t1 = std::min(k, t0 + kGemmKc);
    GemmVec acc[R][NV];
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = GemmVec{};
    }
    for (int64_t t = t0; t < t1; ++t) {
      GemmVec bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = gemm_load(b + t * ldb + v * kGemmW);
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        const float ai = a[i * lda + t];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
      }
    }
    const bool add = add_c || t0 > 0;
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        float* p = c + i * ldc + v * kGemmW;
        gemm_store(p, add ? gemm_load(p) + acc[i][v] : acc[i][v]);
      }
    }
    t0 = t1;
  } while (t0 < k);
}

// A row tile of `rows` <= kGemmR rows (the last tile of m may be shorter).
template <int NV, int R = kGemmR>
inline void gemm_rows(int64_t rows, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                      int64_t ldc, bool add_c) {
  if constexpr (R > 1) {
    if (rows < R) return gemm_rows<NV, R - 1>(rows, k, a, lda, b, ldb, c, ldc, add_c);
  }
  gemm_tile<R, NV>(k, a, lda, b, ldb, c, ldc, add_c);
}

// A tile of `vecs` <= kGemmNV vectors of columns.
template <int NV = kGemmNV>
inline void gemm_cols(int vecs, int64_t rows, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                      float* c, int64_t ldc, bool add_c) {
  if constexpr (NV > 1) {
    if (vecs < NV) return gemm_cols<NV - 1>(vecs, rows, k, a, lda, b, ldb, c, ldc, add_c);
  }
  gemm_rows<NV>(rows, k, a, lda, b, ldb, c, ldc, add_c);
}

// C (m, n) = A (m, k) @ B (k, n) [+ C], row-major with leading dims lda, ldb, ldc, fp32.
inline void gemm_f32(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
                     const float* a, const float* b, float* c) {
  constexpr int64_t kTileCols = kGemmNV * kGemmW;
  thread_local std::vector<float> b_pack;
  float c_tile[kGemmR * kTileCols];
  for (int64_t c0 = 0; c0 < n; c0 += kTileCols) {
    const int64_t nc = std::min<int64_t>(kTileCols, n - c0);
    const int vecs = static_cast<int>((nc + kGemmW - 1) / kGemmW);
    const int64_t width = vecs * kGemmW;
    const bool full = nc == width;
    // B's columns packed (k x width, zero-padded past nc) for a partial tile, so that the vector
    // loads never read past n. (B with far-apart rows, which a per-call pack served badly, is
    // the panel variant's case: gemm_f32_bpanels.)
    const float* bt = b + c0;
    int64_t bt_ld = ldb;
    if (!full) {
      b_pack.resize(static_cast<size_t>(k * width));
      float* dst = b_pack.data();
      for (int64_t t = 0; t < k; ++t) {
        const float* src = b + t * ldb + c0;
        float* d = dst + t * width;
        for (int64_t j = 0; j < nc; ++j) d[j] = src[j];
        for (int64_t j = nc; j < width; ++j) d[j] = 0.0f;
      }
      bt = dst;
      bt_ld = width;
    }
    for (int64_t r0 = 0; r0 < m; r0 += kGemmR) {
      const int64_t rows = std::min<int64_t>(kGemmR, m - r0);
      float* cr = c + r0 * ldc + c0;
      float* ct = full ? cr : c_tile;  // a partial tile's C through a buffer of whole vectors
      const int64_t ct_ld = full ? ldc : width;
      if (!full && add_c)
        for (int64_t i = 0; i < rows; ++i) std::memcpy(c_tile + i * width, cr + i * ldc, nc * sizeof(float));
      gemm_cols(vecs, rows, k, a + r0 * lda, lda, bt, bt_ld, ct, ct_ld, add_c);
      if (!full)
        for (int64_t i = 0; i < rows; ++i) std::memcpy(cr + i * ldc, c_tile + i * width, nc * sizeof(float));
    }
  }
}

// B in column panels, the layout the flash forward's pre-pass writes K^T and V in: panels of
// pw columns (at most one tile's width kGemmPanel, a multiple of kGemmW), each a contiguous
// (rows x pw) block, panel q at bp + q * pstride: B(t, j) = bp[(j / pw) * pstride + t * pw +
// j % pw]. Every tile then reads its B as one contiguous stream (ld pw): no per-call pack. The
// packs of far-apart rows that gemm_f32 made took ~25% of its time in the flash forward (AVX2,
// perf: each K^T / V row of a tile a page apart, so each load a TLB and cache miss).
constexpr int64_t kGemmPanel = kGemmNV * kGemmW;

// The panel width for n columns: one tile's, or fewer whole vectors when n is smaller (a head
// dim below 64 on AVX-512), so a panel pads at most kGemmW - 1 columns.
inline int64_t gemm_panel_width(int64_t n) {
  return std::min<int64_t>(kGemmPanel, std::max<int64_t>(1, (n + kGemmW - 1) / kGemmW) * kGemmW);
}

// C (m, n) = or += A (m, k) @ B[:, col0 : col0 + n], B in panels as above. col0 need not be a
// panel boundary (a window's first key, a packed sequence's start): the tiles follow the
// panels, and a tile that covers columns outside [col0, col0 + n) (the first and last, at
// most) is computed in a buffer of whole tiles and only its columns inside are written. Those
// outside columns must be readable panel memory (other keys, or padding) and are discarded.
// Each output's sum runs in gemm_tile's order: the same bits as gemm_f32 on the same values.
inline void gemm_f32_bpanels(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldc, bool add_c, const float* a,
                             const float* bp, int64_t pw, int64_t pstride, int64_t col0, float* c) {
  constexpr int64_t P = kGemmPanel;
  float c_tile[kGemmR * P] = {};  // (columns outside the range: computed, never written out)
  for (int64_t g = col0 - col0 % pw; g < col0 + n; g += pw) {
    const float* bt = bp + (g / pw) * pstride;
    const int64_t lo = std::max(g, col0), hi = std::min(g + pw, col0 + n);  // columns of C, as B's
    const bool whole = lo == g && hi == g + pw;
    const int vecs = static_cast<int>((hi - g + kGemmW - 1) / kGemmW);
    const int64_t off = lo - g, nc = hi - lo;
    for (int64_t r0 = 0; r0 < m; r0 += kGemmR) {
      const int64_t rows = std::min<int64_t>(kGemmR, m - r0);
      float* cr = c + r0 * ldc + (lo - col0);
      if (whole) {
        gemm_cols(static_cast<int>(pw / kGemmW), rows, k, a + r0 * lda, lda, bt, pw, cr, ldc, add_c);
        continue;
      }
      if (add_c)
        for (int64_t i = 0; i < rows; ++i) std::memcpy(c_tile + i * P + off, cr + i * ldc, nc * sizeof(float));
      gemm_cols(vecs, rows, k, a + r0 * lda, lda, bt, pw, c_tile, P, add_c);
      for (int64_t i = 0; i < rows; ++i) std::memcpy(cr + i * ldc, c_tile + i * P + off, nc * sizeof(float));
    }
  }
}

}  // namespace cpu
}  // namespace fastattn
