// cpu_dpbf16.h — bf16 block products on vdpbf16ps (AVX512-BF16) for the CPU attention
// kernels: S = Q K^T (dp_scores) and O += P V (dp_pv) from bf16 operands laid out by pairs,
// and the fp32 -> bf16 pair conversion of P (to_bf16_pairs).
//
// Why: on a CPU with AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids) one vdpbf16ps adds
// 32 exact bf16 products into 16 fp32 sums, twice the work of an fp32 FMA in the same slot,
// and the operands are half the bytes of the widened fp32 copies the fp32 GEMMs need. Only
// the avx512 tier compiles this (cpu_types.h: FASTATTN_HAVE_DPBF16); callers check
// cpu::has_dpbf16() at run time.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_types.h"

namespace fastattn {
namespace cpu {

// The operand layouts (plain C++, every tier): dst[t * stride] = the word of dims (2t, 2t + 1)
// of a bf16 row of d values (the dim past an odd d is 0), for t < ceil(d / 2).
// With stride 1 the words are the row's own bytes (little-endian: dim 2t in the low half), so
// that case is a copy (the scalar loop was ~2% of a multi-query decode step, staging q).
inline void pack_dim_pairs(const uint16_t* row, int64_t d, uint32_t* dst, int64_t stride) {
#if defined(__BYTE_ORDER__)
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the stride-1 copy below assumes little-endian words");
#endif
  if (stride == 1) {
    std::memcpy(dst, row, static_cast<size_t>(d / 2) * sizeof(uint32_t));
    if (d % 2 != 0) dst[d / 2] = row[d - 1];
    return;
  }
  for (int64_t t = 0; 2 * t < d; ++t)
    dst[t * stride] = row[2 * t] | (2 * t + 1 < d ? uint32_t(row[2 * t + 1]) << 16 : 0u);
}
// pack_dim_pairs of rows[0, n) (n <= 16) into columns 0..n-1: dst[t * stride + r] = the word
// of dims (2t, 2t + 1) of rows[r]. With AVX-512 and n = 16, each 32 dims of the 16 rows are
// 16 loads, a 16 x 16 transpose of 32-bit words (64 shuffles) and 16 stores, where the
// scalar loop spends a load, a shift, an or and a store per word (~5% of a causal bf16 flash
// forward, ~10% of a chunked-prefill step, in the staging of K).
inline void pack_dim_pairs_x16(const uint16_t* const* rows, int64_t n, int64_t d, uint32_t* dst, int64_t stride) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (n == 16) {
    const int64_t pairs = (d + 1) / 2;
    for (int64_t t0 = 0; t0 < pairs; t0 += 16) {
      const int64_t left = d - 2 * t0;  // dims from 2 * t0 on; the dim past an odd d loads as 0
      const __mmask32 m = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1u;
      __m512i r[16], u[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_epi16(m, rows[i] + 2 * t0);
      // Within each 128-bit lane L: 4 x 4 blocks. u[4k + c] lane L = word 4L + c of rows 4k..4k+3.
      for (int k = 0; k < 4; ++k) {
        const __m512i a0 = _mm512_unpacklo_epi32(r[4 * k], r[4 * k + 1]), a1 = _mm512_unpackhi_epi32(r[4 * k], r[4 * k + 1]);
        const __m512i b0 = _mm512_unpacklo_epi32(r[4 * k + 2], r[4 * k + 3]),
                      b1 = _mm512_unpackhi_epi32(r[4 * k + 2], r[4 * k + 3]);
        u[4 * k] = _mm512_unpacklo_epi64(a0, b0);
        u[4 * k + 1] = _mm512_unpackhi_epi64(a0, b0);
        u[4 * k + 2] = _mm512_unpacklo_epi64(a1, b1);
        u[4 * k + 3] = _mm512_unpackhi_epi64(a1, b1);
      }
      // Across lanes: word 4L + c of all 16 rows = lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
      for (int c = 0; c < 4; ++c) {
        const __m512i lo01 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), hi01 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
        const __m512i lo23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44),
                      hi23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
        const __m512i w[4] = {_mm512_shuffle_i32x4(lo01, lo23, 0x88), _mm512_shuffle_i32x4(lo01, lo23, 0xDD),
                              _mm512_shuffle_i32x4(hi01, hi23, 0x88), _mm512_shuffle_i32x4(hi01, hi23, 0xDD)};
        for (int l = 0; l < 4; ++l) {
          const int64_t t = t0 + 4 * l + c;
          if (t < pairs) _mm512_storeu_si512(dst + t * stride, w[l]);
        }
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < n; ++r) pack_dim_pairs(rows[r], d, dst + r, stride);
}

// dst[c] = the word of two bf16 rows' dim c (lo, hi): a pair of keys (or of query rows); hi
// null = a zero row. With AVX-512, 16 dims per step (two zero-extending loads, a shift, an or).
inline void pack_row_pairs(const uint16_t* lo, const uint16_t* hi, int64_t d, uint32_t* dst) {
  int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; c < d; c += 16) {
    const __mmask16 m = d - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (d - c)) - 1u);
    const __m512i l = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo + c));
    const __m512i h = hi != nullptr ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi + c)) : _mm512_setzero_si512();
    _mm512_mask_storeu_epi32(dst + c, m, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
  }
#endif
  for (; c < d; ++c) dst[c] = lo[c] | (hi != nullptr ? uint32_t(hi[c]) << 16 : 0u);
}

#if defined(FASTATTN_HAVE_DPBF16)
// C (R rows, ncols <= 32 of its columns) = or += A B on vdpbf16ps, twice the fp32 FMA rate:
// each 32-bit lane of the instruction adds two exact bf16 products to an fp32 sum. A and B
// hold bf16 PAIRS along the reduction: a[i * a_ld + t] = (A[i][2t], A[i][2t + 1]) and
// b[t * b_ld + j] = (B[2t][j], B[2t + 1][j]), so the 16 lanes of a load of b are 16 columns.
// For S = Q K^T the pairs are pairs of dims (q's bf16 row as is; K by pairs of dims); for
// O += P V pairs of keys (P rounded to pairs; V by pairs of keys). 2R accumulators and two
// B vectors in registers, one broadcast of A per row and pair. kTransA: A's pairs are laid
// out the other way, a[t * a_ld + i] (the backward's P^T and dS^T: pairs of query rows, each
// pair a row of the buffer), read by the same broadcasts from consecutive addresses. With
// kAccumulate, C's values are the sums' starting values (each pair then added in order).
template <int R, bool kAccumulate, bool kTransA = false>
FASTATTN_DPBF16 void dp_tile(const uint32_t* a, int64_t a_ld, const uint32_t* b, int64_t b_ld, int64_t pairs,
                             int64_t ncols, float* c, int64_t c_ld) {
  const __mmask16 m0 = ncols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ncols) - 1u);
  const __mmask16 m1 = ncols >= 32 ? __mmask16(0xFFFF) : ncols <= 16 ? __mmask16(0) : __mmask16((1u << (ncols - 16)) - 1u);
  __m512 acc0[R], acc1[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    acc0[i] = kAccumulate ? _mm512_maskz_loadu_ps(m0, c + i * c_ld) : _mm512_setzero_ps();
    acc1[i] = kAccumulate ? _mm512_maskz_loadu_ps(m1, c + i * c_ld + 16) : _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < pairs; ++t) {
    const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, b + t * b_ld);
    const __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, b + t * b_ld + 16);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(kTransA ? a[t * a_ld + i] : a[i * a_ld + t]));
      acc0[i] = _mm512_dpbf16_ps(acc0[i], av, b0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], av, b1);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    _mm512_mask_storeu_ps(c + i * c_ld, m0, acc0[i]);
    _mm512_mask_storeu_ps(c + i * c_ld + 16, m1, acc1[i]);
  }
}

// C (rows, cols) = or += A (rows, 2 pairs) B (2 pairs, cols) by dp_tile: 32-column tiles, 8-row
// tiles inside each (the tile's B pairs stay in L1 while the rows pass).
template <bool kAccumulate, bool kTransA = false>
inline void dp_gemm(int64_t rows, int64_t cols, int64_t pairs, const uint32_t* a, int64_t a_ld, const uint32_t* b,
                    int64_t b_ld, float* c, int64_t c_ld) {
  for (int64_t c0 = 0; c0 < cols; c0 += 32) {
    const int64_t nc = std::min<int64_t>(32, cols - c0);
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      const uint32_t* ar = kTransA ? a + r0 : a + r0 * a_ld;
      float* cr = c + r0 * c_ld + c0;
      switch (std::min<int64_t>(8, rows - r0)) {
        case 1: dp_tile<1, kAccumulate, kTransA>(ar, a_ld, b + c0, b_ld, pairs, nc, cr, c_ld); break;
        case 2: dp_tile<2, kAccumulate, kTransA>(ar, a_ld, b + c0, b_ld, pairs, nc, cr, c_ld); break;
        case 3: dp_tile<3, kAccumulate, kTransA>(ar, a_ld, b + c0, b_ld, pairs, nc, cr, c_ld); break;
        case 4: dp_tile<4, kAccumulate, kTransA>(ar, a_ld, b + c0, b_ld, pairs, nc, cr, c_ld); break;
        case 5: dp_tile<5, kAccumulate, kTransA>(ar, a_ld, b + c0, b_ld, pairs, nc, cr, c_ld); break;
        case 6: dp_tile<6, kAccumulate, kTransA>(ar, a_ld, b + c0, b_ld, pairs, nc, cr, c_ld); break;
        case 7: dp_tile<7, kAccumulate, kTransA>(ar, a_ld, b + c0, b_ld, pairs, nc, cr, c_ld); break;
        default: dp_tile<8, kAccumulate, kTransA>(ar, a_ld, b + c0, b_ld, pairs, nc, cr, c_ld); break;
      }
    }
  }
}

// S (rows, cols) = Q K^T: q rows of `pairs` words (pairs of dims), kp (pairs, kp_ld).
inline void dp_scores(int64_t rows, int64_t cols, int64_t pairs, const uint32_t* q, int64_t q_ld, const uint32_t* kp,
                      int64_t kp_ld, float* s, int64_t s_ld) {
  dp_gemm<false>(rows, cols, pairs, q, q_ld, kp, kp_ld, s, s_ld);
}

// O (rows, d) += P V: p rows of `pairs` words (pairs of keys), vp (pairs, vp_ld).
inline void dp_pv(int64_t rows, int64_t d, int64_t pairs, const uint32_t* p, int64_t p_ld, const uint32_t* vp,
                  int64_t vp_ld, float* o, int64_t o_ld) {
  dp_gemm<true>(rows, d, pairs, p, p_ld, vp, vp_ld, o, o_ld);
}

// dst[u] = the pair (src[2u], src[2u + 1]) rounded to bf16 (nearest even), u < pairs.
FASTATTN_DPBF16 inline void to_bf16_pairs(const float* src, int64_t pairs, uint32_t* dst) {
  int64_t u = 0;
  for (; u + 16 <= pairs; u += 16) {
    const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 2 * u + 16), _mm512_loadu_ps(src + 2 * u));
    _mm512_storeu_si512(dst + u, (__m512i)b);
  }
  if (u < pairs) {
    const int64_t n = 2 * (pairs - u);  // < 32 values
    const __mmask16 lo = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
    const __mmask16 hi = n <= 16 ? __mmask16(0) : __mmask16((1u << (n - 16)) - 1u);
    const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + 2 * u + 16), _mm512_maskz_loadu_ps(lo, src + 2 * u));
    _mm512_mask_storeu_epi32(dst + u, __mmask16((1u << (pairs - u)) - 1u), (__m512i)b);
  }
}

// dst[c] = (lo[c], hi[c]) rounded to bf16 (nearest even), c < n, n a multiple of 16: two fp32
// rows interleaved into the pair layout along rows (the backward's P^T / dS^T pairs of query
// rows, dS^T's pairs of keys). One conversion of both rows and one word permutation per 16.
FASTATTN_DPBF16 inline void to_bf16_row_pairs(const float* lo, const float* hi, int64_t n, uint32_t* dst) {
  // cvtne2ps puts lo[0..15] in words 0..15 and hi[0..15] in words 16..31; word 2c <- c, 2c+1 <- 16+c.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                              21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t c = 0; c < n; c += 16) {
    const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(hi + c), _mm512_loadu_ps(lo + c));
    _mm512_storeu_si512(dst + c, _mm512_permutexvar_epi16(interleave, (__m512i)b));
  }
}
#else
// Builds without the instruction (the AVX2 and baseline tiers): has_dpbf16() is false there,
// so callers never reach these; they exist so the callers need no #if of their own.
[[noreturn]] inline void dp_unavailable() { __builtin_trap(); }
inline void dp_scores(int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t, float*, int64_t) {
  dp_unavailable();
}
inline void dp_pv(int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t, float*, int64_t) {
  dp_unavailable();
}
inline void to_bf16_pairs(const float*, int64_t, uint32_t*) { dp_unavailable(); }
inline void to_bf16_row_pairs(const float*, const float*, int64_t, uint32_t*) { dp_unavailable(); }
template <bool kAccumulate, bool kTransA = false>
inline void dp_gemm(int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t, float*, int64_t) {
  dp_unavailable();
}
#endif

}  // namespace cpu
}  // namespace fastattn
