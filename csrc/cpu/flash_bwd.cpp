// flash_bwd.cpp — FlashAttention backward on the CPU (recompute, FlashAttention-2 algorithm),
// fp32 / bf16 / fp16 inputs, any head dim, causal (bottom-right) / sliding window, GQA / MQA,
// any seqlen_q and seqlen_k, strided q / k / v / out / dout / dq / dk / dv.
//
// What it computes (fp32 throughout, gradients stored in the input dtype):
//   delta_i = sum_d dO[i][d] * O[i][d]
//   P = exp(scale * Q K^T - lse)      recomputed from the forward's (natural-log) lse, masked
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dK = scale * dS^T Q,  dQ = scale * dS K
// A query row whose lse is -inf saw no key in the forward: its P row is 0, so it contributes
// nothing (and its dq row is 0).
// Soft-capped (params.fwd.softcap = c > 0): with t = tanh(scale * q.k / c) the forward's
// score was c * t, so P = exp(c * t - lse) and the chain rule through the cap multiplies dS
// by dcap/ds = 1 - t^2 before the two GEMMs that use it (dK, dQ keep their scale factor).
// A template flag (kCap), so the uncapped tasks are the code they were without it.
//
// Work decomposition: one pass computes delta (parallel over rows); a second runs one of two
// task layouts, both deterministic and bitwise identical to each other (for finite k; a
// non-finite key times a zero dS can reach dQ rows of the block it shares in one layout only):
//   * fused (when there are at least two (batch, kv head) units per thread, none heavier than
//     half a thread's share, and a unit's dQ fits a 16 MiB per-thread buffer): a task per
//     (batch, kv head) sweeps its key blocks of kOuter keys; per block it keeps K^T and V^T in
//     the thread's buffers and loops over the group's query heads and, per head, over the
//     query blocks of kInner rows that can see the key block. Per block pair: S = Q K^T, P,
//     dP = dO V^T, dS, dV += P^T dO, dK += dS^T Q and dQ += dS K into the task's own dQ rows:
//     5 block GEMMs per pair, FlashAttention-2's count, with no atomics (the task owns the
//     rows) and no scratch beyond the thread's buffer.
//   * split (fewer, larger units: few heads, one long sequence, many threads): a dK/dV task per
//     (batch, kv head, key block of kOuter keys), the same code as above without dQ, and a dQ
//     task per (batch, query head, query block of kOuter rows) looping over the visible key
//     blocks of kInner keys: S^T = K Q^T, P^T, dP^T = V dO^T, dS^T, dQ += dS K. The dQ task
//     recomputes S and dP: 7 block GEMMs per pair, ~1.4x the fused FLOPs, in exchange for
//     parallelism over blocks where units are too few.
// Blocks wholly outside the causal / window band are skipped, and masking code runs only on
// blocks that cross the band's edge or a sequence tail. GQA / MQA gradients are summed over
// the group's heads inside a task (K / V are never repeated). Every gradient element is
// produced by exactly one task, which reduces it in a fixed order (heads, then query blocks
// for dK / dV; key blocks of kInner for dQ, which the fused task reproduces by one GEMM per
// kInner-key half of its key block, over the key blocks the dQ task would visit). Which thread
// runs a task, and which layout runs, never changes the arithmetic, so the result is bitwise
// the same for any thread count and run to run: the kernel is always deterministic and
// params.deterministic has nothing to switch. Tasks are handed out heaviest first from a
// shared counter (causal makes the split tasks' costs very unequal).
//
// Why it is fast: every block GEMM runs on a register-blocked microkernel (with AVX-512,
// 8 rows x 32 columns of fp32 accumulators in 16 zmm registers; per k step two B vector
// loads, eight broadcast A elements, sixteen FMAs; AVX2: 6 rows x 16 columns in 12 ymm)
// over per-thread fp32 buffers that stay in L1/L2. The buffers are laid out so that each of
// the five GEMM shapes reads B row-major with contiguous columns and A either row-major or
// transposed (a transposed A is just a different broadcast stride), so no
// GEMM ever needs a packing step: K^T and V^T are transposed once per key block in the dK/dV
// task, Q^T and dO^T once per query block in the dQ task. Buffers are padded with zeros to
// whole microkernel tiles, so odd head dims and sequence tails run the same code; the fp32
// GEMMs of a block cover its rows and keys only up to whole tiles, not the whole block (a
// 16-token sequence's backward cost 64 x 128 blocks: 1 x 16 x 8 x 128 fp32, causal, forward
// + backward 1.56 -> 0.54 ms, 1 thread, AVX2; the same bits). The
// exponential is a vectorised exp2 of S * (scale * log2(e)) - lse * log2(e).
// fp16 inputs are converted to fp32 when a block is loaded, once per block; so are bf16 inputs
// on CPUs without AVX512-BF16.
//
// bf16 operands (kDp: bf16 inputs, head dim >= kDpMinHeadDim, on an AVX512-BF16 CPU, e.g.
// Zen 4, Sapphire Rapids): the five block GEMMs run on vdpbf16ps (cpu_dpbf16.h), 32 bf16
// products per instruction where the fp32 FMA does 16, from bf16 operands staged in pair
// layouts (no widening; see "bf16 operand staging" below). P and dS are rounded to bf16 for
// the GEMMs that take them (dV += P^T dO, dK += dS^T Q, dQ += dS K), as a GPU's tensor cores
// take them in FlashAttention-2; S, dP, the softmax and every accumulator stay fp32. Measured
// on a 2-core Zen 4 VM (1 x 2048 x 16 x 128, 2 threads): the backward ~1.75x faster causal,
// ~1.9x non-causal; over five test shapes the gradients' max error against float64 went from
// 0.23-0.91x to 0.26-1.0x of the reference's run in bf16, and is 0.26-1.0x that of torch's own
// bf16 SDPA backward. The fused and split layouts still give the same bits (the dp products of
// S and S^T, and of dS by rows and by columns, are the same sums), but not the same bits as
// the fp32 path of the other CPU tiers.
//
// Variable-length batches (params.fwd.cu_seqlens_q set, see params.h): every task belongs to
// one sequence, reads its rows at that sequence's packed offsets and masks with its own
// lengths; lse / delta are (h, total_q). The task list is the same flat list over (sequence,
// head, block) with each sequence's own block counts, so balance does not depend on how the
// lengths are distributed.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu_dpbf16.h"
#include "cpu_math.h"
#include "cpu_types.h"
#include "flash_varlen.h"
#include "fastattn/api.h"
#include "fastattn/cpu_dispatch.h"
#include "fastattn/static_switch.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace fastattn {
namespace {

using cpu::load_row;
using cpu::store_row;

// Block sizes. A task owns an outer block of kOuter keys (dK/dV task) or query rows (dQ
// task) and loops over inner blocks of kInner query rows / keys. The outer block's operands
// and accumulators stay in the thread's buffers for the whole task while every inner block
// is re-read from memory, so a large outer block halves those re-reads; for a 128-wide head
// the buffers total ~450 KiB (L2), with the current GEMM's B panel in L1.
constexpr int64_t kOuter = 128;
constexpr int64_t kInner = 64;
// The fused task's per-thread dQ buffer (group heads x seqlen_q x padded head dim, fp32) at
// most this large, else the split tasks run (e.g. 8 heads per kv head x 4096 rows x 128).
constexpr int64_t kFusedDqBytes = int64_t(16) << 20;

constexpr float kLog2e = 1.4426950408889634f;

// The bf16 pair GEMMs (kDp) from cpu::kDpMinHeadDim on (cpu_types.h).
using cpu::kDpMinHeadDim;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- SIMD primitives ---------------------------------------------------------------------
// Microkernel tile: kMR rows x kColTile columns of accumulators, sized to the register file
// (AVX-512: 16 of 32 zmm; AVX2: 8 of 16 ymm; otherwise 8 vectors), leaving room for the B
// vectors and the broadcast A element. Every buffer's row length is a multiple of kColTile,
// and kInner / kOuter are multiples of kMR and kColTile.
#if defined(__AVX512F__)
constexpr int64_t kMR = 8;
constexpr int64_t kColTile = 32;
using vreg = __m512;
constexpr int kW = 16;
inline vreg vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vreg v) { _mm512_storeu_ps(p, v); }
inline vreg vset1(float x) { return _mm512_set1_ps(x); }
inline vreg vzero() { return _mm512_setzero_ps(); }
inline vreg vadd(vreg a, vreg b) { return _mm512_add_ps(a, b); }
inline vreg vfma(vreg a, vreg b, vreg c) { return _mm512_fmadd_ps(a, b, c); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kMR = 4;
constexpr int64_t kColTile = 16;
using vreg = __m256;
constexpr int kW = 8;
inline vreg vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vreg v) { _mm256_storeu_ps(p, v); }
inline vreg vset1(float x) { return _mm256_set1_ps(x); }
inline vreg vzero() { return _mm256_setzero_ps(); }
inline vreg vadd(vreg a, vreg b) { return _mm256_add_ps(a, b); }
inline vreg vfma(vreg a, vreg b, vreg c) { return _mm256_fmadd_ps(a, b, c); }
#else
constexpr int64_t kMR = 4;
constexpr int64_t kColTile = 8;
typedef float vreg __attribute__((vector_size(16)));
constexpr int kW = 4;
inline vreg vload(const float* p) { vreg v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
inline void vstore(float* p, vreg v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline vreg vset1(float x) { return vreg{} + x; }
inline vreg vzero() { return vreg{}; }
inline vreg vadd(vreg a, vreg b) { return a + b; }
inline vreg vfma(vreg a, vreg b, vreg c) { return a * b + c; }
#endif
constexpr int kNV = static_cast<int>(kColTile) / kW;  // vectors per microkernel row
static_assert(kInner % kMR == 0 && kOuter % kMR == 0 && kInner % kColTile == 0 &&
                  kOuter % kColTile == 0,
              "block sizes must be whole microkernel tiles");

// x[0:kN] = 2^x[0:kN]; values below -126 (including -inf) give exactly 0. The SIMD paths are
// range reduction to r in [-0.5, 0.5] plus a degree-7 Taylor polynomial of 2^r (relative
// error < 1e-8 before rounding), scaled by 2^e (vscalefps, or the exponent bits on AVX2).
// n is a whole number of vectors (a block row's used columns: a multiple of kColTile), so
// there is no scalar tail on the SIMD tiers.
inline void exp2_row(float* x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 lo = _mm512_set1_ps(-126.0f), hi = _mm512_set1_ps(127.0f);
  const __m512 c1 = _mm512_set1_ps(0.6931471805599453f), c2 = _mm512_set1_ps(0.2402265069591007f),
               c3 = _mm512_set1_ps(0.05550410866482158f), c4 = _mm512_set1_ps(0.009618129107628477f),
               c5 = _mm512_set1_ps(0.0013333558146428443f), c6 = _mm512_set1_ps(0.00015403530393381608f),
               c7 = _mm512_set1_ps(1.525273380405984e-05f), one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, lo, _CMP_GE_OQ);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    const __m512 e = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(v, e);
    __m512 p = _mm512_fmadd_ps(c7, r, c6);
    p = _mm512_fmadd_ps(p, r, c5);
    p = _mm512_fmadd_ps(p, r, c4);
    p = _mm512_fmadd_ps(p, r, c3);
    p = _mm512_fmadd_ps(p, r, c2);
    p = _mm512_fmadd_ps(p, r, c1);
    p = _mm512_fmadd_ps(p, r, one);
    _mm512_storeu_ps(x + i, _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, e)));
  }
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 lo = _mm256_set1_ps(-126.0f), hi = _mm256_set1_ps(127.0f);
  const __m256 c1 = _mm256_set1_ps(0.6931471805599453f), c2 = _mm256_set1_ps(0.2402265069591007f),
               c3 = _mm256_set1_ps(0.05550410866482158f), c4 = _mm256_set1_ps(0.009618129107628477f),
               c5 = _mm256_set1_ps(0.0013333558146428443f), c6 = _mm256_set1_ps(0.00015403530393381608f),
               c7 = _mm256_set1_ps(1.525273380405984e-05f), one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    const __m256 keep = _mm256_cmp_ps(v, lo, _CMP_GE_OQ);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    const __m256 e = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_sub_ps(v, e);
    __m256 p = _mm256_fmadd_ps(c7, r, c6);
    p = _mm256_fmadd_ps(p, r, c5);
    p = _mm256_fmadd_ps(p, r, c4);
    p = _mm256_fmadd_ps(p, r, c3);
    p = _mm256_fmadd_ps(p, r, c2);
    p = _mm256_fmadd_ps(p, r, c1);
    p = _mm256_fmadd_ps(p, r, one);
    // 2^e for integer e in [-126, 127]: the exponent field e + 127.
    const __m256 scale = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(e), _mm256_set1_epi32(127)), 23));
    _mm256_storeu_ps(x + i, _mm256_and_ps(keep, _mm256_mul_ps(p, scale)));
  }
#else
  for (; i < n; ++i) x[i] = x[i] >= -126.0f ? std::exp2(x[i]) : 0.0f;
#endif
}

// ---- block GEMM --------------------------------------------------------------------------
// C[0:R, 0:kColTile] (+)= sum_k A(i, k) * B[k][0:kColTile], with A(i, k) = A[i * lda + k]
// (kTransA = false) or A[k * lda + i] (kTransA = true: the A operand is a transposed view,
// read by broadcasting from consecutive addresses). Each output is one sum in k order,
// whatever R: the row tiling never changes the bits.
template <int R, bool kTransA>
inline void microkernel(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                        float* C, int64_t ldc, bool accumulate) {
  vreg acc[R][kNV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < kNV; ++v) acc[i][v] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    vreg b[kNV];
    for (int v = 0; v < kNV; ++v) b[v] = vload(B + k * ldb + v * kW);
    for (int i = 0; i < R; ++i) {
      const vreg a = vset1(kTransA ? A[k * lda + i] : A[i * lda + k]);
      for (int v = 0; v < kNV; ++v) acc[i][v] = vfma(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < kNV; ++v) {
      float* c = C + i * ldc + v * kW;
      vstore(c, accumulate ? vadd(vload(c), acc[i][v]) : acc[i][v]);
    }
}

// Rows per microkernel tile in the GEMMs: kMR, or on the 16-register tiers 6 (12 accumulators
// of the 16 registers instead of 8: two FMA pipes of 4-cycle latency need 8 chains in flight
// just to keep up, so 8 left every load or loop hiccup exposed). AVX2 tier, 2-core Zen 3 VM,
// 1 thread, fp32 backward, best of 6 alternating processes: 1 x 2048 x 8 x 128 638 -> 546 ms,
// causal 335 -> 323 ms, 2 x 1024 x 8 (2 kv) x 64 141 -> 137 ms; the same bits (each output
// is still one sum in k order). M is a multiple of kMR, not of 6: its last rows run kMR-row
// tiles.
#if defined(__AVX512F__)
constexpr int64_t kTileRows = kMR;
#else
constexpr int64_t kTileRows = 6;
#endif

// C[M x N] (+)= A[M x K] B[K x N]; M a multiple of kMR, N of kColTile. B row-major (ldb),
// C row-major (ldc), A row-major or transposed (see microkernel). Column panels outermost so
// one K x kColTile panel of B stays in L1 across all row tiles.
template <bool kTransA>
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  // kTileRows-row tiles, then the rest (a multiple of kMR) in kMR-row tiles.
  int64_t wide = M / kTileRows * kTileRows;
  while ((M - wide) % kMR != 0) wide -= kTileRows;
  for (int64_t j = 0; j < N; j += kColTile) {
    int64_t i = 0;
    for (; i < wide; i += kTileRows)
      microkernel<kTileRows, kTransA>(K, kTransA ? A + i : A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc,
                                      accumulate);
    for (; i < M; i += kMR)
      microkernel<kMR, kTransA>(K, kTransA ? A + i : A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc,
                                accumulate);
  }
}

// ---- masking -----------------------------------------------------------------------------
// Query row i sees key j iff j < seqlen_k, and j >= i + off - window_left (window_left >= 0),
// and j <= i + off + window_right (window_right >= 0), off = seqlen_k - seqlen_q.
struct Band {
  int64_t seqlen_q, seqlen_k, off, wl, wr;

  bool visible(int64_t i, int64_t j) const {
    return j < seqlen_k && (wl < 0 || j >= i + off - wl) && (wr < 0 || j <= i + off + wr);
  }
  // Query rows that see at least one key of [j0, j1): [*lo, *hi), possibly empty.
  void rows_seeing(int64_t j0, int64_t j1, int64_t* lo, int64_t* hi) const {
    j1 = std::min(j1, seqlen_k);
    *lo = wr < 0 ? 0 : std::max<int64_t>(0, j0 - off - wr);
    *hi = wl < 0 ? seqlen_q : std::min<int64_t>(seqlen_q, j1 - 1 - off + wl + 1);
  }
  // Keys seen by at least one row of [i0, i1): [*lo, *hi), possibly empty.
  void keys_seen(int64_t i0, int64_t i1, int64_t* lo, int64_t* hi) const {
    *lo = wl < 0 ? 0 : std::max<int64_t>(0, i0 + off - wl);
    *hi = wr < 0 ? seqlen_k : std::min<int64_t>(seqlen_k, i1 - 1 + off + wr + 1);
  }
  // True when every (i, j) of the block with i < seqlen_q is visible (rows past seqlen_q are
  // zeroed through their lse instead), so the block needs no mask.
  bool block_full(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    i1 = std::min(i1, seqlen_q);
    return j1 <= seqlen_k && (wr < 0 || j1 - 1 <= i0 + off + wr) && (wl < 0 || j0 >= i1 - 1 + off - wl);
  }
};

// Block index range [*b0, *b1) of blocks of size bs covering [lo, hi).
void block_range(int64_t lo, int64_t hi, int64_t bs, int64_t* b0, int64_t* b1) {
  if (hi <= lo) {
    *b0 = *b1 = 0;
    return;
  }
  *b0 = lo / bs;
  *b1 = (hi - 1) / bs + 1;
}

// ---- block loads / stores ----------------------------------------------------------------
// rows [r0, r0 + n) of a (seq, d) slice with row stride rs -> dst (kBlock x ld), rows past n
// zeroed. Columns d..ld were zeroed when the buffer was made and are never written.
template <typename T>
void load_rows(const T* src, int64_t rs, int64_t n, int64_t d, float* dst, int64_t ld,
               int64_t block) {
  for (int64_t r = 0; r < n; ++r) load_row(src + r * rs, dst + r * ld, d);
  for (int64_t r = n; r < block; ++r) std::fill(dst + r * ld, dst + r * ld + d, 0.0f);
}

// Same slice, transposed: dst[c][r] (d x ld_t, ld_t >= block), columns past n zeroed.
template <typename T>
void load_rows_transposed(const T* src, int64_t rs, int64_t n, int64_t d, float* dst,
                          int64_t ld_t, int64_t block, float* row_tmp) {
  for (int64_t r = 0; r < n; ++r) {
    load_row(src + r * rs, row_tmp, d);
    for (int64_t c = 0; c < d; ++c) dst[c * ld_t + r] = row_tmp[c];
  }
  if (n < block)
    for (int64_t c = 0; c < d; ++c) std::fill(dst + c * ld_t + n, dst + c * ld_t + block, 0.0f);
}

template <typename T>
void store_rows(const float* src, int64_t ld, int64_t n, int64_t d, float scale, T* dst,
                int64_t rs, float* row_tmp) {
  for (int64_t r = 0; r < n; ++r) {
    const float* s = src + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) row_tmp[c] = s[c] * scale;
    store_row(row_tmp, dst + r * rs, d);
  }
}

// ---- bf16 operand staging for the vdpbf16ps GEMMs (kDp) -----------------------------------
// The pair layouts of cpu_dpbf16.h. Every GEMM reduces over pairs: S = Q K^T and dP = dO V^T
// over pairs of dims (Q / dO rows as they are, K / V by dim pairs in columns); dV += P^T dO
// and dK += dS^T Q over pairs of query rows (P^T / dS^T rounded and interleaved row pair by
// row pair, dO / Q by row pairs); dQ += dS K over pairs of keys (dS rounded by pairs along its
// rows, or dS^T row pair by row pair in the dQ task; K by row pairs). Padding rows / columns
// are zero words, so tails and odd head dims run the full tiles.

// Rows [0, n) of a bf16 (seq, d) slice (row stride rs) as words of dim pairs: dst (block x ld),
// ld >= ceil(d / 2); an odd d's last dim pairs with 0; rows n..block zeroed.
[[maybe_unused]] void stage_rows_dp(
    const cpu::bf16_t* src, int64_t rs, int64_t n, int64_t d, uint32_t* dst, int64_t ld, int64_t block) {
  const int64_t pd = (d + 1) / 2;
  for (int64_t r = 0; r < n; ++r)
    cpu::pack_dim_pairs(reinterpret_cast<const uint16_t*>(src + r * rs), d, dst + r * ld, 1);
  for (int64_t r = n; r < block; ++r) std::fill(dst + r * ld, dst + r * ld + pd, 0u);
}

// The same rows by dim pairs in columns: dst[t * ld + r] (ceil(d / 2) x ld), columns n..block
// zeroed.
[[maybe_unused]] void stage_dim_pairs_dp(
    const cpu::bf16_t* src, int64_t rs, int64_t n, int64_t d, uint32_t* dst, int64_t ld, int64_t block) {
  const int64_t pd = (d + 1) / 2;
  const uint16_t* rows[16];
  for (int64_t r0 = 0; r0 < n; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, n - r0);
    for (int64_t i = 0; i < nr; ++i) rows[i] = reinterpret_cast<const uint16_t*>(src + (r0 + i) * rs);
    cpu::pack_dim_pairs_x16(rows, nr, d, dst + r0, ld);
  }
  if (n < block)
    for (int64_t t = 0; t < pd; ++t) std::fill(dst + t * ld + n, dst + t * ld + block, 0u);
}

// The same rows by row pairs: dst[u * ld + c] = (row 2u, row 2u + 1) at dim c, u < block / 2;
// rows n..block are zero.
[[maybe_unused]] void stage_row_pairs_dp(
    const cpu::bf16_t* src, int64_t rs, int64_t n, int64_t d, uint32_t* dst, int64_t ld, int64_t block) {
  for (int64_t u = 0; 2 * u < block; ++u) {
    uint32_t* o = dst + u * ld;
    if (2 * u >= n) {
      std::fill(o, o + d, 0u);
      continue;
    }
    const uint16_t* lo = reinterpret_cast<const uint16_t*>(src + 2 * u * rs);
    const uint16_t* hi = 2 * u + 1 < n ? reinterpret_cast<const uint16_t*>(src + (2 * u + 1) * rs) : nullptr;
    cpu::pack_row_pairs(lo, hi, d, o);
  }
}

// ---- the two task kinds ------------------------------------------------------------------
struct Shape {
  int64_t d, dp;  // head dim and its padded row length
  int64_t group;  // query heads per kv head
  float scale_log2;  // softmax_scale * log2(e)
  float scale;       // softmax_scale
  float cap;         // softcap (> 0 in the kCap tasks only)
};

// Per-thread scratch, zero-initialised (the padding columns rely on it). kDp tasks stage their
// operands as bf16 words (the *_w buffers) instead of the fp32 a_t / b_t / a / b / k_rows.
struct Scratch {
  std::vector<float> a_t, b_t;     // K^T, V^T (dK/dV task) or Q^T, dO^T (dQ task): dp x kOuter
  std::vector<float> a, b;         // Q, dO (dK/dV task) or K, V (dQ task): kInner x dp
  std::vector<float> s, dp_buf;    // S / P and dP / dS (or transposed): kInner x kOuter
  std::vector<float> acc0, acc1;   // dK, dV accumulators or dQ: kOuter x dp
  std::vector<float> lse2, delta;  // per query row of the current query block
  std::vector<float> row;          // one row of d, conversions
  std::vector<float> tanh_row;     // soft-capping: tanh of one row of S (kOuter)
  std::vector<float> k_rows;       // fused task: K of the key block, kOuter x dp
  std::vector<float> dq;           // fused task: dQ of its group's heads, (group, rows, dp)
  // kDp, dK/dV task (dQ task):
  std::vector<uint32_t> at_w, bt_w;  // K, V (Q, dO) by dim pairs: (dp / 2) x kOuter
  std::vector<uint32_t> a_w, b_w;    // Q, dO (K, V) rows as dim-pair words: kInner x (dp / 2)
  std::vector<uint32_t> ar_w, br_w;  // Q, dO (K, -) by row pairs: (kInner / 2) x dp
  std::vector<uint32_t> p_w, ds_w;   // P^T, dS^T (-, dS^T) by query-row (key) pairs: (kInner / 2) x kOuter
  std::vector<uint32_t> kr_w;        // fused: K by row pairs, (kOuter / 2) x dp
  std::vector<uint32_t> dsr_w;       // fused: dS rows by key pairs, kInner x (kOuter / 2)
  Scratch(int64_t dp, bool dp_words)
      : a_t(dp_words ? 0 : dp * kOuter), b_t(dp_words ? 0 : dp * kOuter), a(dp_words ? 0 : kInner * dp),
        b(dp_words ? 0 : kInner * dp), s(kInner * kOuter), dp_buf(kInner * kOuter), acc0(kOuter * dp),
        acc1(kOuter * dp), lse2(kOuter), delta(kOuter), row(dp), tanh_row(kOuter),
        k_rows(dp_words ? 0 : kOuter * dp) {
    if (!dp_words) return;
    at_w.resize(dp / 2 * kOuter);
    bt_w.resize(dp / 2 * kOuter);
    a_w.resize(kInner * dp / 2);
    b_w.resize(kInner * dp / 2);
    ar_w.resize(kInner / 2 * dp);
    br_w.resize(kInner / 2 * dp);
    p_w.resize(kInner / 2 * kOuter);
    ds_w.resize(kInner / 2 * kOuter);
    kr_w.resize(kOuter / 2 * dp);
    dsr_w.resize(kInner * kOuter / 2);
  }
};

// lse (natural log) -> lse * log2(e) for rows [i0, i0 + n); rows past n and rows that saw no
// key (lse = -inf) get +inf, which makes their P row exactly 0.
void load_lse(const float* lse, const float* delta, int64_t i0, int64_t n, int64_t block,
              float* lse2, float* delta_out) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < block; ++r) {
    if (r < n && lse[i0 + r] != -inf) {
      lse2[r] = lse[i0 + r] * kLog2e;
      delta_out[r] = delta[i0 + r];
    } else {
      lse2[r] = inf;
      delta_out[r] = 0.0f;
    }
  }
}

// Offset of (batch or sequence bi, query head h)'s first row in lse / delta: (b, h, seqlen_q)
// dense, (h, total_q) varlen (the sequence's rows start at seq.q_start).
inline int64_t lse_offset(const FlashFwdParams& f, int64_t bi, int64_t h, const cpu::VarlenSeq& seq) {
  return f.cu_seqlens_q != nullptr ? h * f.total_q + seq.q_start : (bi * f.h + h) * f.seqlen_q;
}

// Rows and keys below are indices inside sequence `seq` (dense: the batch entry bi, whose
// batch strides place it; varlen: the batch strides are 0 and seq.q_start / seq.k_start
// place it in the packed tensors).
// dq_acc (the fused task, else nullptr): also dQ += dS K into dq_acc, (group, dq_rows, dp)
// fp32, as the dQ task would compute it (see fused_task).
template <typename T, bool kCap, bool kDp>
void dkdv_task(const FlashBwdParams& p, const Shape& sh, const Band& band, int64_t bi,
               const cpu::VarlenSeq& seq, int64_t hk, int64_t kb, Scratch& w,
               float* dq_acc = nullptr, int64_t dq_rows = 0) {
  const FlashFwdParams& f = p.fwd;
  const int64_t d = sh.d, dp = sh.dp, pd = (d + 1) / 2, wl = dp / 2;  // wl: row length in words
  const int64_t j0 = kb * kOuter, nk = std::min(kOuter, seq.seqlen_k - j0);
  const int64_t kr = seq.k_start + j0, qr = seq.q_start;  // packed row of key j0 / query 0
  const T* k = static_cast<const T*>(f.k) + bi * f.k_batch_stride + hk * f.k_head_stride + kr * f.k_row_stride;
  const T* v = static_cast<const T*>(f.v) + bi * f.v_batch_stride + hk * f.v_head_stride + kr * f.v_row_stride;
  float *k_t = w.a_t.data(), *v_t = w.b_t.data(), *q = w.a.data(), *dout = w.b.data();
  float *s = w.s.data(), *ds = w.dp_buf.data(), *dk = w.acc0.data(), *dv = w.acc1.data();
  // The block's keys the fp32 GEMMs cover: nk rounded up to whole tiles (a short sequence
  // costs its size, not a whole block; the keys past nk are zero rows of K^T / V^T, masked,
  // and the dropped ones were only exact zero terms at the end of each sum for finite
  // inputs: the same bits; with an inf in q and softcap they gave NaN, now 0).
  // The bf16 pair GEMMs keep whole blocks.
  const int64_t nkp = kDp ? kOuter : round_up(nk, kColTile);
  std::fill(dk, dk + nkp * dp, 0.0f);
  std::fill(dv, dv + nkp * dp, 0.0f);

  int64_t ilo, ihi, qb0, qb1;
  band.rows_seeing(j0, j0 + nk, &ilo, &ihi);
  block_range(ilo, ihi, kInner, &qb0, &qb1);
  if (qb0 < qb1) {
    if constexpr (kDp) {
      stage_dim_pairs_dp(k, f.k_row_stride, nk, d, w.at_w.data(), kOuter, kOuter);
      stage_dim_pairs_dp(v, f.v_row_stride, nk, d, w.bt_w.data(), kOuter, kOuter);
      if (dq_acc != nullptr) stage_row_pairs_dp(k, f.k_row_stride, nk, d, w.kr_w.data(), dp, kOuter);
    } else {
      load_rows_transposed(k, f.k_row_stride, nk, d, k_t, kOuter, nkp, w.row.data());
      load_rows_transposed(v, f.v_row_stride, nk, d, v_t, kOuter, nkp, w.row.data());
      if (dq_acc != nullptr) load_rows(k, f.k_row_stride, nk, d, w.k_rows.data(), dp, nkp);
    }
  }
  for (int64_t hq = hk * sh.group; hq < (hk + 1) * sh.group && qb0 < qb1; ++hq) {
    const float* lse = f.lse + lse_offset(f, bi, hq, seq);
    const float* delta = p.delta + lse_offset(f, bi, hq, seq);
    for (int64_t qb = qb0; qb < qb1; ++qb) {
      const int64_t i0 = qb * kInner, nq = std::min(kInner, seq.seqlen_q - i0);
      const int64_t nqp = kDp ? kInner : round_up(nq, kMR);  // the rows the fp32 GEMMs cover
      const T* qs = static_cast<const T*>(f.q) + bi * f.q_batch_stride + hq * f.q_head_stride + (qr + i0) * f.q_row_stride;
      const T* dos = static_cast<const T*>(p.dout) + bi * p.dout_batch_stride + hq * p.dout_head_stride + (qr + i0) * p.dout_row_stride;
      load_lse(lse, delta, i0, nq, kInner, w.lse2.data(), w.delta.data());
      if constexpr (kDp) {
        stage_rows_dp(qs, f.q_row_stride, nq, d, w.a_w.data(), wl, kInner);
        stage_rows_dp(dos, p.dout_row_stride, nq, d, w.b_w.data(), wl, kInner);
        stage_row_pairs_dp(qs, f.q_row_stride, nq, d, w.ar_w.data(), dp, kInner);
        stage_row_pairs_dp(dos, p.dout_row_stride, nq, d, w.br_w.data(), dp, kInner);
        cpu::dp_gemm<false>(kInner, kOuter, pd, w.a_w.data(), wl, w.at_w.data(), kOuter, s, kOuter);   // S = Q K^T
        cpu::dp_gemm<false>(kInner, kOuter, pd, w.b_w.data(), wl, w.bt_w.data(), kOuter, ds, kOuter);  // dP = dO V^T
      } else {
        load_rows(qs, f.q_row_stride, nq, d, q, dp, nqp);
        load_rows(dos, p.dout_row_stride, nq, d, dout, dp, nqp);
        gemm<false>(nqp, nkp, dp, q, dp, k_t, kOuter, s, kOuter, false);     // S = Q K^T
        gemm<false>(nqp, nkp, dp, dout, dp, v_t, kOuter, ds, kOuter, false); // dP = dO V^T
      }
      const bool full = band.block_full(i0, i0 + kInner, j0, j0 + kOuter);
      for (int64_t r = 0; r < nqp; ++r) {
        float* sr = s + r * kOuter;
        const float l2 = w.lse2[r];
        float* tr = w.tanh_row.data();
        if constexpr (kCap) {  // P = 2^(c * t * log2(e) - lse2), t = tanh(scale * S / c)
          cpu::tanh_row(sr, cpu::softcap_multiplier(sh.scale, sh.cap), tr, nkp);
#pragma omp simd
          for (int64_t c = 0; c < nkp; ++c) sr[c] = (tr[c] * sh.cap) * kLog2e - l2;
        } else {
#pragma omp simd
          for (int64_t c = 0; c < nkp; ++c) sr[c] = sr[c] * sh.scale_log2 - l2;
        }
        if (!full)
          for (int64_t c = 0; c < nkp; ++c)
            if (!band.visible(i0 + r, j0 + c)) sr[c] = -std::numeric_limits<float>::infinity();
        exp2_row(sr, nkp);  // P
        // lse NaN: the forward saw a NaN in this row (in q, or in a key it sees), and exp2_row
        // maps NaN to 0. The row's P is NaN wherever it sees a key, as in the reference's
        // softmax, so dV of those keys is NaN too (dQ and dK already are, through delta),
        // instead of that row's terms silently missing from dV.
        if (std::isnan(l2))
          for (int64_t c = 0; c < nkp; ++c)
            if (full || band.visible(i0 + r, j0 + c)) sr[c] = std::numeric_limits<float>::quiet_NaN();
        float* dr = ds + r * kOuter;
        const float dl = w.delta[r];
        if constexpr (kCap) {
#pragma omp simd
          for (int64_t c = 0; c < nkp; ++c) dr[c] = sr[c] * (dr[c] - dl) * (1.0f - tr[c] * tr[c]);  // dS
        } else {
#pragma omp simd
          for (int64_t c = 0; c < nkp; ++c) dr[c] = sr[c] * (dr[c] - dl);  // dS
        }
      }
      if constexpr (kDp) {
        for (int64_t u = 0; u < kInner / 2; ++u) {  // P^T, dS^T by pairs of query rows
          cpu::to_bf16_row_pairs(s + 2 * u * kOuter, s + (2 * u + 1) * kOuter, kOuter, w.p_w.data() + u * kOuter);
          cpu::to_bf16_row_pairs(ds + 2 * u * kOuter, ds + (2 * u + 1) * kOuter, kOuter, w.ds_w.data() + u * kOuter);
        }
        cpu::dp_gemm<true, true>(kOuter, d, kInner / 2, w.p_w.data(), kOuter, w.br_w.data(), dp, dv, dp);   // dV += P^T dO
        cpu::dp_gemm<true, true>(kOuter, d, kInner / 2, w.ds_w.data(), kOuter, w.ar_w.data(), dp, dk, dp);  // dK += dS^T Q
      } else {
        gemm<true>(nkp, dp, nqp, s, kOuter, dout, dp, dv, dp, true);  // dV += P^T dO
        gemm<true>(nkp, dp, nqp, ds, kOuter, q, dp, dk, dp, true);    // dK += dS^T Q
      }
      if (dq_acc != nullptr) {
        // dQ += dS K, one GEMM per half of the key block: the dQ task's key blocks are kInner
        // wide, each summed on its own and then added (the microkernel's order; kDp: each
        // pair of keys added in order onto the running dQ, as dp_tile does there), and it
        // visits those its kOuter-row query block sees; doing the same gives the same bits.
        float* dq = dq_acc + ((hq - hk * sh.group) * dq_rows + i0) * dp;
        const int64_t o0 = i0 / kOuter * kOuter;
        int64_t jlo, jhi, kb0, kb1;
        band.keys_seen(o0, std::min(o0 + kOuter, seq.seqlen_q), &jlo, &jhi);
        block_range(jlo, jhi, kInner, &kb0, &kb1);
        if constexpr (kDp)
          for (int64_t r = 0; r < kInner; ++r) cpu::to_bf16_pairs(ds + r * kOuter, kOuter / 2, w.dsr_w.data() + r * (kOuter / 2));
        for (int64_t half = 0; half < kOuter / kInner; ++half) {
          const int64_t kbi = j0 / kInner + half;
          if (kbi < kb0 || kbi >= kb1) continue;
          if constexpr (kDp) {
            cpu::dp_gemm<true>(kInner, d, kInner / 2, w.dsr_w.data() + half * (kInner / 2), kOuter / 2,
                               w.kr_w.data() + half * (kInner / 2) * dp, dp, dq, dp);
          } else {
            // the half's keys rounded up to kMR, exactly the keys the dQ task's sum over this
            // key block covers: past them the terms are zeros for finite inputs only (an inf
            // in q with softcap makes a padding key's dS NaN through tanh), so the two layouts
            // must stop at the same key (review)
            const int64_t kh = nk > half * kInner ? round_up(std::min(kInner, nk - half * kInner), kMR) : 0;
            if (kh > 0)
              gemm<false>(nqp, dp, kh, ds + half * kInner, kOuter, w.k_rows.data() + half * kInner * dp, dp, dq,
                          dp, true);
          }
        }
      }
    }
  }
  T* dks = static_cast<T*>(p.dk) + bi * p.dk_batch_stride + hk * p.dk_head_stride + kr * p.dk_row_stride;
  T* dvs = static_cast<T*>(p.dv) + bi * p.dv_batch_stride + hk * p.dv_head_stride + kr * p.dv_row_stride;
  store_rows(dk, dp, nk, d, f.softmax_scale, dks, p.dk_row_stride, w.row.data());
  store_rows(dv, dp, nk, d, 1.0f, dvs, p.dv_row_stride, w.row.data());
}

template <typename T, bool kCap, bool kDp>
void dq_task(const FlashBwdParams& p, const Shape& sh, const Band& band, int64_t bi,
             const cpu::VarlenSeq& seq, int64_t hq, int64_t qb, Scratch& w) {
  const FlashFwdParams& f = p.fwd;
  const int64_t d = sh.d, dp = sh.dp, pd = (d + 1) / 2, wl = dp / 2;
  const int64_t hk = hq / sh.group;
  const int64_t i0 = qb * kOuter, nq = std::min(kOuter, seq.seqlen_q - i0);
  const int64_t qr = seq.q_start + i0, kr = seq.k_start;  // packed row of query i0 / key 0
  float *q_t = w.a_t.data(), *do_t = w.b_t.data(), *k = w.a.data(), *v = w.b.data();
  float *s_t = w.s.data(), *ds_t = w.dp_buf.data(), *dq = w.acc0.data();
  // The block's query rows the fp32 GEMMs cover (as nkp in dkdv_task; whole blocks for kDp).
  const int64_t nqp = kDp ? kOuter : round_up(nq, kColTile);
  std::fill(dq, dq + nqp * dp, 0.0f);

  int64_t jlo, jhi, kb0, kb1;
  band.keys_seen(i0, i0 + nq, &jlo, &jhi);
  block_range(jlo, jhi, kInner, &kb0, &kb1);
  if (kb0 < kb1) {
    const T* qs = static_cast<const T*>(f.q) + bi * f.q_batch_stride + hq * f.q_head_stride + qr * f.q_row_stride;
    const T* dos = static_cast<const T*>(p.dout) + bi * p.dout_batch_stride + hq * p.dout_head_stride + qr * p.dout_row_stride;
    if constexpr (kDp) {
      stage_dim_pairs_dp(qs, f.q_row_stride, nq, d, w.at_w.data(), kOuter, kOuter);
      stage_dim_pairs_dp(dos, p.dout_row_stride, nq, d, w.bt_w.data(), kOuter, kOuter);
    } else {
      load_rows_transposed(qs, f.q_row_stride, nq, d, q_t, kOuter, nqp, w.row.data());
      load_rows_transposed(dos, p.dout_row_stride, nq, d, do_t, kOuter, nqp, w.row.data());
    }
    load_lse(f.lse + lse_offset(f, bi, hq, seq), p.delta + lse_offset(f, bi, hq, seq), i0, nq,
             kOuter, w.lse2.data(), w.delta.data());
  }
  const float* lse2 = w.lse2.data();
  const float* delta = w.delta.data();
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t j0 = kb * kInner, nk = std::min(kInner, seq.seqlen_k - j0);
    const int64_t nkp = kDp ? kInner : round_up(nk, kMR);
    const T* ks = static_cast<const T*>(f.k) + bi * f.k_batch_stride + hk * f.k_head_stride + (kr + j0) * f.k_row_stride;
    const T* vs = static_cast<const T*>(f.v) + bi * f.v_batch_stride + hk * f.v_head_stride + (kr + j0) * f.v_row_stride;
    if constexpr (kDp) {
      stage_rows_dp(ks, f.k_row_stride, nk, d, w.a_w.data(), wl, kInner);
      stage_rows_dp(vs, f.v_row_stride, nk, d, w.b_w.data(), wl, kInner);
      stage_row_pairs_dp(ks, f.k_row_stride, nk, d, w.ar_w.data(), dp, kInner);
      cpu::dp_gemm<false>(kInner, kOuter, pd, w.a_w.data(), wl, w.at_w.data(), kOuter, s_t, kOuter);   // S^T = K Q^T
      cpu::dp_gemm<false>(kInner, kOuter, pd, w.b_w.data(), wl, w.bt_w.data(), kOuter, ds_t, kOuter);  // dP^T = V dO^T
    } else {
      load_rows(ks, f.k_row_stride, nk, d, k, dp, nkp);
      load_rows(vs, f.v_row_stride, nk, d, v, dp, nkp);
      gemm<false>(nkp, nqp, dp, k, dp, q_t, kOuter, s_t, kOuter, false);    // S^T = K Q^T
      gemm<false>(nkp, nqp, dp, v, dp, do_t, kOuter, ds_t, kOuter, false);  // dP^T = V dO^T
    }
    const bool full = band.block_full(i0, i0 + kOuter, j0, j0 + kInner);
    for (int64_t c = 0; c < nkp; ++c) {  // c: key, r: query
      float* sr = s_t + c * kOuter;
      float* tr = w.tanh_row.data();
      if constexpr (kCap) {  // as in dkdv_task, along a column of S
        cpu::tanh_row(sr, cpu::softcap_multiplier(sh.scale, sh.cap), tr, nqp);
#pragma omp simd
        for (int64_t r = 0; r < nqp; ++r) sr[r] = (tr[r] * sh.cap) * kLog2e - lse2[r];
      } else {
#pragma omp simd
        for (int64_t r = 0; r < nqp; ++r) sr[r] = sr[r] * sh.scale_log2 - lse2[r];
      }
      if (!full)
        for (int64_t r = 0; r < nqp; ++r)
          if (!band.visible(i0 + r, j0 + c)) sr[r] = -std::numeric_limits<float>::infinity();
      exp2_row(sr, nqp);  // P^T
      float* dr = ds_t + c * kOuter;
      if constexpr (kCap) {
#pragma omp simd
        for (int64_t r = 0; r < nqp; ++r) dr[r] = sr[r] * (dr[r] - delta[r]) * (1.0f - tr[r] * tr[r]);  // dS^T
      } else {
#pragma omp simd
        for (int64_t r = 0; r < nqp; ++r) dr[r] = sr[r] * (dr[r] - delta[r]);  // dS^T
      }
    }
    if constexpr (kDp) {
      for (int64_t u = 0; u < kInner / 2; ++u)  // dS by pairs of keys: rows 2u, 2u + 1 of dS^T
        cpu::to_bf16_row_pairs(ds_t + 2 * u * kOuter, ds_t + (2 * u + 1) * kOuter, kOuter, w.ds_w.data() + u * kOuter);
      cpu::dp_gemm<true, true>(kOuter, d, kInner / 2, w.ds_w.data(), kOuter, w.ar_w.data(), dp, dq, dp);  // dQ += dS K
    } else {
      gemm<true>(nqp, dp, nkp, ds_t, kOuter, k, dp, dq, dp, true);  // dQ += dS K
    }
  }
  T* dqs = static_cast<T*>(p.dq) + bi * p.dq_batch_stride + hq * p.dq_head_stride + qr * p.dq_row_stride;
  store_rows(dq, dp, nq, d, f.softmax_scale, dqs, p.dq_row_stride, w.row.data());
}

// The fused task: every key block of one (batch or sequence, kv head), dK / dV as the dK/dV
// task computes them and dQ of the group's heads accumulated beside them in w.dq (5 block
// GEMMs per block pair instead of 7: no dQ task recomputing S and dP). It owns all of its
// heads' dQ rows, so nothing is shared and no atomics are needed; it is used when there are
// enough such units to keep every thread busy (flash_bwd_impl). Every dQ element is the same
// sum in the same order as the dQ task's, so the gradients are bitwise those of the split
// tasks and the choice (which depends on the thread count) never shows in the result.
template <typename T, bool kCap, bool kDp>
void fused_task(const FlashBwdParams& p, const Shape& sh, const Band& band, int64_t bi,
                const cpu::VarlenSeq& seq, int64_t hk, Scratch& w) {
  const FlashFwdParams& f = p.fwd;
  // kDp: whole kInner blocks are written; fp32: each block's rows up to a multiple of kMR
  const int64_t dq_rows = round_up(seq.seqlen_q, kDp ? kOuter : kMR);
  w.dq.assign(static_cast<size_t>(sh.group * dq_rows * sh.dp), 0.0f);
  for (int64_t kb = 0; kb * kOuter < seq.seqlen_k; ++kb)
    dkdv_task<T, kCap, kDp>(p, sh, band, bi, seq, hk, kb, w, w.dq.data(), dq_rows);
  for (int64_t g = 0; g < sh.group; ++g) {
    const int64_t hq = hk * sh.group + g;
    T* dqs = static_cast<T*>(p.dq) + bi * p.dq_batch_stride + hq * p.dq_head_stride + seq.q_start * p.dq_row_stride;
    store_rows(w.dq.data() + g * dq_rows * sh.dp, sh.dp, seq.seqlen_q, sh.d, f.softmax_scale, dqs, p.dq_row_stride,
               w.row.data());
  }
}

// delta = rowsum(dout * out), (b, h, seqlen_q) contiguous; varlen (h, total_q), every packed
// row (a row no sequence owns gets a value no task reads).
template <typename T>
void compute_delta(const FlashBwdParams& p) {
  const FlashFwdParams& f = p.fwd;
  const bool varlen = f.cu_seqlens_q != nullptr;
  const int64_t nb = varlen ? 1 : f.b, sq = varlen ? f.total_q : f.seqlen_q;
  const int64_t d = f.d, rows = nb * f.h * sq;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> o(d), g(d);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % sq, bh = r / sq, h = bh % f.h, bi = bh / f.h;
      load_row(static_cast<const T*>(f.out) + bi * f.out_batch_stride + h * f.out_head_stride + i * f.out_row_stride, o.data(), d);
      load_row(static_cast<const T*>(p.dout) + bi * p.dout_batch_stride + h * p.dout_head_stride + i * p.dout_row_stride, g.data(), d);
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < d; ++c) acc += o[c] * g[c];
      p.delta[r] = acc;
    }
  });
}

template <typename T, bool kCap, bool kDp>
void flash_bwd_impl(const FlashBwdParams& p) {
  const FlashFwdParams& f = p.fwd;
  compute_delta<T>(p);

  // The sequences: dense, every batch entry is {0, seqlen_q, 0, seqlen_k}; varlen, each
  // sequence's own (clamped) offsets and lengths from cu_seqlens.
  const bool varlen = f.cu_seqlens_q != nullptr;
  std::vector<cpu::VarlenSeq> seqs(static_cast<size_t>(varlen ? f.b : 1));
  std::vector<Band> bands(seqs.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    seqs[i] = varlen ? cpu::varlen_seq(f, static_cast<int64_t>(i)) : cpu::VarlenSeq{0, f.seqlen_q, 0, f.seqlen_k};
    const cpu::VarlenSeq& s = seqs[i];
    bands[i] = Band{s.seqlen_q, s.seqlen_k, s.seqlen_k - s.seqlen_q, f.window_left, f.window_right};
  }
  auto seq_of = [&](int64_t bi) -> int64_t { return varlen ? bi : 0; };
  const Shape sh{f.d, round_up(f.d, kColTile), f.h / f.h_k, f.softmax_scale * kLog2e, f.softmax_scale, f.softcap};

  // One list of independent tasks, heaviest first. Fused: one task per (b, h_k) (fused_task)
  // when there are enough of them, of even enough cost, for every thread: at least two per
  // thread, none more than half a thread's share, and their dQ buffer small. Otherwise dK/dV
  // tasks (b, h_k, key block) and dQ tasks (b, h, query block), each batch entry / sequence
  // with its own number of blocks; cost = visible block pairs x GEMMs per pair. The flat list
  // over (sequence, head, block) keeps the threads busy when one sequence is much longer
  // than the rest, or there are few heads.
  struct Task {
    int64_t bi, head, block;
    bool dq, fused;
  };
  std::vector<Task> tasks;
  std::vector<int64_t> cost;
  const int64_t n_threads = std::max<int64_t>(1, at::get_num_threads());
  // A fused unit's cost, per batch entry / sequence (all its kv heads alike).
  std::vector<int64_t> unit_cost(static_cast<size_t>(f.b));
  int64_t unit_total = 0, unit_max = 0, rows_max = 0;
  for (int64_t bi = 0; bi < f.b; ++bi) {
    const cpu::VarlenSeq& s = seqs[seq_of(bi)];
    unit_cost[bi] = (s.seqlen_q + 1) * (s.seqlen_k + 1);
    unit_total += unit_cost[bi] * f.h_k;
    unit_max = std::max(unit_max, unit_cost[bi]);
    rows_max = std::max(rows_max, s.seqlen_q);
  }
  const bool fused = unit_max * 2 * n_threads <= unit_total &&
                     sh.group * round_up(rows_max, kOuter) * sh.dp * int64_t(sizeof(float)) <= kFusedDqBytes;
  for (int64_t bi = 0; fused && bi < f.b; ++bi) {
    for (int64_t hk = 0; hk < f.h_k; ++hk) {
      tasks.push_back({bi, hk, 0, false, true});
      cost.push_back(unit_cost[bi]);
    }
  }
  for (int pass = 0; pass < 2 && !fused; ++pass) {
    const bool dq = pass == 1;
    for (int64_t bi = 0; bi < f.b; ++bi) {
      const cpu::VarlenSeq& s = seqs[seq_of(bi)];
      const Band& band = bands[seq_of(bi)];
      const int64_t nblk = ((dq ? s.seqlen_q : s.seqlen_k) + kOuter - 1) / kOuter;
      std::vector<int64_t> blk_cost(static_cast<size_t>(nblk));
      for (int64_t blk = 0; blk < nblk; ++blk) {
        int64_t lo, hi, b0, b1;
        if (dq) {
          band.keys_seen(blk * kOuter, std::min((blk + 1) * kOuter, s.seqlen_q), &lo, &hi);
          block_range(lo, hi, kInner, &b0, &b1);
          blk_cost[blk] = 3 * (b1 - b0) + 1;
        } else {
          band.rows_seeing(blk * kOuter, (blk + 1) * kOuter, &lo, &hi);
          block_range(lo, hi, kInner, &b0, &b1);
          blk_cost[blk] = 4 * sh.group * (b1 - b0) + 1;
        }
      }
      for (int64_t head = 0; head < (dq ? f.h : f.h_k); ++head) {
        for (int64_t blk = 0; blk < nblk; ++blk) {
          tasks.push_back({bi, head, blk, dq, false});
          cost.push_back(blk_cost[blk]);
        }
      }
    }
  }
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });

  std::atomic<int64_t> next{0};
  const int64_t n_tasks = static_cast<int64_t>(order.size());
  if (n_tasks == 0) return;
  const int64_t n_workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks));
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    Scratch w(sh.dp, kDp);
    for (int64_t t = next.fetch_add(1); t < n_tasks; t = next.fetch_add(1)) {
      const Task& task = tasks[order[t]];
      // Varlen: the batch strides are 0, so the batch index in the pointer arithmetic is 0.
      const int64_t bi = varlen ? 0 : task.bi;
      const int64_t si = seq_of(task.bi);
      if (task.fused) {
        fused_task<T, kCap, kDp>(p, sh, bands[si], bi, seqs[si], task.head, w);
      } else if (!task.dq) {
        dkdv_task<T, kCap, kDp>(p, sh, bands[si], bi, seqs[si], task.head, task.block, w);
      } else {
        dq_task<T, kCap, kDp>(p, sh, bands[si], bi, seqs[si], task.head, task.block, w);
      }
    }
  });
}

}  // namespace

void cpu::flash_bwd_kernel(const FlashBwdParams& params) {
  const FlashFwdParams& f = params.fwd;
  if (f.b == 0 || f.h == 0 || f.seqlen_q == 0 || f.seqlen_k == 0) return;
  if (f.cu_seqlens_q != nullptr && (f.total_q == 0 || f.total_k == 0)) return;
  FASTATTN_CPU_DTYPE_SWITCH(f.dtype, T, [&] {
    BOOL_SWITCH(f.softcap > 0.0f, kCap, [&] {
#if defined(FASTATTN_HAVE_DPBF16)
      // bf16 on an AVX512-BF16 CPU: the block GEMMs on vdpbf16ps (see the header comment).
      if constexpr (std::is_same<T, cpu::bf16_t>::value) {
        if (cpu::has_dpbf16() && f.d >= kDpMinHeadDim) return flash_bwd_impl<T, kCap, true>(params);
      }
#endif
      flash_bwd_impl<T, kCap, false>(params);
    });
  });
}

}  // namespace fastattn
