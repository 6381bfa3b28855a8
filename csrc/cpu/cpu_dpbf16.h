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

#include "cpu_types.h"

namespace fastattn {
namespace cpu {

#if defined(FASTATTN_HAVE_DPBF16)
// S = Q K^T for bf16 inputs on vdpbf16ps (AVX512-BF16), twice the fp32 FMA rate: each 32-bit
// lane of the instruction adds two exact bf16 products to an fp32 sum. Q is one row of
// `pairs` 32-bit words per query (q[2t], q[2t+1]: its bf16 row as is, zero-padded to an even
// length); K is laid out by pairs of dims, kp[t * kp_ld + j] = (k[j][2t], k[j][2t+1]), so
// the 16 lanes of a load are 16 keys. R query rows x 32 keys per tile: 2R accumulators and
// two key vectors in registers, one broadcast per row and pair.
template <int R>
FASTATTN_DPBF16 void dp_score_tile(const uint32_t* q, int64_t q_ld, const uint32_t* kp, int64_t kp_ld,
                                   int64_t pairs, int64_t ncols, float* s, int64_t s_ld) {
  const __mmask16 m0 = ncols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ncols) - 1u);
  const __mmask16 m1 = ncols >= 32 ? __mmask16(0xFFFF) : ncols <= 16 ? __mmask16(0) : __mmask16((1u << (ncols - 16)) - 1u);
  __m512 acc0[R], acc1[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < pairs; ++t) {
    const __m512bh k0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, kp + t * kp_ld);
    const __m512bh k1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, kp + t * kp_ld + 16);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[i * q_ld + t]));
      acc0[i] = _mm512_dpbf16_ps(acc0[i], qv, k0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], qv, k1);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    _mm512_mask_storeu_ps(s + i * s_ld, m0, acc0[i]);
    _mm512_mask_storeu_ps(s + i * s_ld + 16, m1, acc1[i]);
  }
}

// S (rows, cols) = Q K^T by dp_score_tile: 32-key column tiles, 8-row tiles inside each (the
// tile's K pairs stay in L1 while the rows pass).
inline void dp_scores(int64_t rows, int64_t cols, int64_t pairs, const uint32_t* q, int64_t q_ld, const uint32_t* kp,
               int64_t kp_ld, float* s, int64_t s_ld) {
  for (int64_t c0 = 0; c0 < cols; c0 += 32) {
    const int64_t nc = std::min<int64_t>(32, cols - c0);
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      const uint32_t* qr = q + r0 * q_ld;
      float* sr = s + r0 * s_ld + c0;
      switch (std::min<int64_t>(8, rows - r0)) {
        case 1: dp_score_tile<1>(qr, q_ld, kp + c0, kp_ld, pairs, nc, sr, s_ld); break;
        case 2: dp_score_tile<2>(qr, q_ld, kp + c0, kp_ld, pairs, nc, sr, s_ld); break;
        case 3: dp_score_tile<3>(qr, q_ld, kp + c0, kp_ld, pairs, nc, sr, s_ld); break;
        case 4: dp_score_tile<4>(qr, q_ld, kp + c0, kp_ld, pairs, nc, sr, s_ld); break;
        case 5: dp_score_tile<5>(qr, q_ld, kp + c0, kp_ld, pairs, nc, sr, s_ld); break;
        case 6: dp_score_tile<6>(qr, q_ld, kp + c0, kp_ld, pairs, nc, sr, s_ld); break;
        case 7: dp_score_tile<7>(qr, q_ld, kp + c0, kp_ld, pairs, nc, sr, s_ld); break;
        default: dp_score_tile<8>(qr, q_ld, kp + c0, kp_ld, pairs, nc, sr, s_ld); break;
      }
    }
  }
}

// O (R rows, ncols <= 32 of its columns) += P V on vdpbf16ps: p holds each row's probabilities
// as bf16 pairs of consecutive keys (word u = keys 2u, 2u + 1), vp the V rows by the same
// pairs, vp[u * vp_ld + c] = (v[2u][c], v[2u + 1][c]).
template <int R>
FASTATTN_DPBF16 void dp_pv_tile(const uint32_t* p, int64_t p_ld, const uint32_t* vp, int64_t vp_ld, int64_t pairs,
                                int64_t ncols, float* o, int64_t o_ld) {
  const __mmask16 m0 = ncols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ncols) - 1u);
  const __mmask16 m1 = ncols >= 32 ? __mmask16(0xFFFF) : ncols <= 16 ? __mmask16(0) : __mmask16((1u << (ncols - 16)) - 1u);
  __m512 acc0[R], acc1[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    acc0[i] = _mm512_maskz_loadu_ps(m0, o + i * o_ld);
    acc1[i] = _mm512_maskz_loadu_ps(m1, o + i * o_ld + 16);
  }
  for (int64_t u = 0; u < pairs; ++u) {
    const __m512bh v0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, vp + u * vp_ld);
    const __m512bh v1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, vp + u * vp_ld + 16);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512bh pv = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[i * p_ld + u]));
      acc0[i] = _mm512_dpbf16_ps(acc0[i], pv, v0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], pv, v1);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    _mm512_mask_storeu_ps(o + i * o_ld, m0, acc0[i]);
    _mm512_mask_storeu_ps(o + i * o_ld + 16, m1, acc1[i]);
  }
}

// O (rows, d) += P V by dp_pv_tile: 32-column tiles of O, 8-row tiles inside each.
inline void dp_pv(int64_t rows, int64_t d, int64_t pairs, const uint32_t* p, int64_t p_ld, const uint32_t* vp,
           int64_t vp_ld, float* o, int64_t o_ld) {
  for (int64_t c0 = 0; c0 < d; c0 += 32) {
    const int64_t nc = std::min<int64_t>(32, d - c0);
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      const uint32_t* pr = p + r0 * p_ld;
      float* orow = o + r0 * o_ld + c0;
      switch (std::min<int64_t>(8, rows - r0)) {
        case 1: dp_pv_tile<1>(pr, p_ld, vp + c0, vp_ld, pairs, nc, orow, o_ld); break;
        case 2: dp_pv_tile<2>(pr, p_ld, vp + c0, vp_ld, pairs, nc, orow, o_ld); break;
        case 3: dp_pv_tile<3>(pr, p_ld, vp + c0, vp_ld, pairs, nc, orow, o_ld); break;
        case 4: dp_pv_tile<4>(pr, p_ld, vp + c0, vp_ld, pairs, nc, orow, o_ld); break;
        case 5: dp_pv_tile<5>(pr, p_ld, vp + c0, vp_ld, pairs, nc, orow, o_ld); break;
        case 6: dp_pv_tile<6>(pr, p_ld, vp + c0, vp_ld, pairs, nc, orow, o_ld); break;
        case 7: dp_pv_tile<7>(pr, p_ld, vp + c0, vp_ld, pairs, nc, orow, o_ld); break;
        default: dp_pv_tile<8>(pr, p_ld, vp + c0, vp_ld, pairs, nc, orow, o_ld); break;
      }
    }
  }
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
#endif

}  // namespace cpu
}  // namespace fastattn
