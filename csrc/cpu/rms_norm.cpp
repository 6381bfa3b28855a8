// rms_norm.cpp — RMSNorm forward (with the fused residual add) and backward on the CPU.
//
// What it computes: per row of (rows, n), y = x * rsqrt(mean(x^2) + eps) * weight; in the
// fused form h = x + residual is written and normalised. Backward gives dx and an fp32
// dweight.
//
// Why it is fast: the op is memory bound, so the goal is one read of each input and one
// write of each output at streaming speed. Rows are split over ATen's thread pool in
// contiguous chunks (one per thread: threads share at most the output line at a chunk edge). On AVX2/FMA/F16C tiers
// (x86-64-v3 and up) each row gets two sweeps, a sum of squares in four independent FMA
// chains with the 16-bit widening done in registers, then scale-and-store from L1/L2, and the
// sweeps are pipelined across rows: one loop does the next row's sum of squares (reading
// DRAM, software prefetch ahead) and the current row's scaling, so the read stream never
// pauses; outputs larger than the caches are written with non-temporal stores (no
// read-for-ownership), each 64-byte line whole before the other output's. With the residual,
// h = T(x + residual) is stored by the first sweep and kept in a row buffer (in T) for the
// second. On the baseline
// tier each row is converted once into an fp32 buffer, reduced with a vectorised sum (omp
// simd reduction), scaled and converted back. The weight is converted to fp32 once per call.
// dweight is reduced deterministically: a fixed number of row blocks (a function of the
// row count only) each write a partial sum, added in block order afterwards.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_types.h"
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#endif
#include "fastattn/api.h"
#include "fastattn/cpu_dispatch.h"
#include "fastattn/static_switch.h"

namespace fastattn {
namespace {

using cpu::load_row;
using cpu::store_row;

// Row sums (sum of squares, the backward's dot product) in two levels: a vectorised partial
// per block of kRowSumBlock values, the partials added in order. One simd reduction over the
// whole row leaves each lane's fp32 chain n / width terms long, whose error grows with n
// (several times torch's pairwise sum from n = 2^16 on).
constexpr int64_t kRowSumBlock = 2048;
template <typename F>
inline void for_blocks(int64_t n, F&& f) {
  for (int64_t i0 = 0; i0 < n; i0 += kRowSumBlock) f(i0, std::min(n, i0 + kRowSumBlock));
}

// Rows per parallel task: enough elements that scheduling overhead is noise.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

std::vector<float> weight_as_float(const void* weight, int64_t n, DType dtype) {
  std::vector<float> w;
  if (weight == nullptr) return w;
  w.resize(static_cast<size_t>(n));
  FASTATTN_CPU_DTYPE_SWITCH(dtype, T, [&] { load_row(static_cast<const T*>(weight), w.data(), n); });
  return w;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// ---- AVX2 forward: one streaming pass per row ----------------------------------------------
// Per row: pass 1 reads the row from memory, widening 16-bit values in registers (bf16: zero-
// extend to 32 bits and shift left by 16; fp16: vcvtph2ps), and accumulates the sum of squares
// in four independent FMA chains (one chain would be bound by FMA latency, not bandwidth).
// Pass 2 re-reads the row, which is still in L1 (a 4096-float row is 16 KiB), scales it and
// stores y. Large outputs are written with non-temporal stores: y is not re-read by this
// kernel, and a streaming store skips the read-for-ownership of the destination line, which
// otherwise makes every written byte cost a read as well.
namespace vec {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const cpu::bf16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
inline __m256 load8(const cpu::half_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// bf16 round to nearest even, as cpu::float_to_bf16, result kept in the high half of each
// 32-bit lane (so it is also the fp32 value of the rounded bf16). NaN -> 0x7fc0.
inline __m256i bf16_round_hi(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
  r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), nan));
}

// v rounded to T and widened back: what storing v as T and loading it again gives.
inline __m256 round_to(__m256 v, const float*) { return v; }
inline __m256 round_to(__m256 v, const cpu::bf16_t*) { return _mm256_castsi256_ps(bf16_round_hi(v)); }
inline __m256 round_to(__m256 v, const cpu::half_t*) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// Store 8 values. NT: non-temporal (the caller guarantees 32-byte (fp32) / 16-byte (16-bit)
// alignment). EXACT: v is already representable in T (from round_to), so bf16 needs no rounding.
template <bool NT>
inline void store8(float* p, __m256 v, bool) {
  if (NT) _mm256_stream_ps(p, v); else _mm256_storeu_ps(p, v);
}
template <bool NT>
inline void store16bit(void* p, __m128i v) {
  if (NT) _mm_stream_si128(static_cast<__m128i*>(p), v);
  else _mm_storeu_si128(static_cast<__m128i*>(p), v);
}
template <bool NT>
inline void store8(cpu::bf16_t* p, __m256 v, bool exact) {
  const __m256i hi = _mm256_srli_epi32(exact ? _mm256_castps_si256(v) : bf16_round_hi(v), 16);
  store16bit<NT>(p, _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)));
}
template <bool NT>
inline void store8(cpu::half_t* p, __m256 v, bool) {
  store16bit<NT>(p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

inline float to_float(float v) { return v; }
inline float to_float(cpu::bf16_t v) { return cpu::bf16_to_float(v.bits); }
inline float to_float(cpu::half_t v) {
  float f;
  _mm_store_ss(&f, _mm_cvtph_ps(_mm_cvtsi32_si128(v.bits)));
  return f;
}
inline void from_float(float v, float* p) { *p = v; }
inline void from_float(float v, cpu::bf16_t* p) { p->bits = cpu::float_to_bf16(v); }
inline void from_float(float v, cpu::half_t* p) {
  p->bits = static_cast<uint16_t>(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(v), _MM_FROUND_TO_NEAREST_INT), 0));
}
inline float round_scalar(float v, const float*) { return v; }
template <typename T>
inline float round_scalar(float v, const T*) {
  T t;
  vec::from_float(v, &t);
  return vec::to_float(t);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace vec

// bf16 in blocks of 16: one 256-bit load of 16 values is widened with two unpacks against
// zero (the bf16 bits land in the high half of each 32-bit lane: that is the fp32 value).
// The unpacks work within 128-bit lanes, so the two vectors hold elements
// {0-3, 8-11} and {4-7, 12-15}; the inverse (shift right by 16 and packus) restores the
// natural order, and the weight is stored permuted the same way (kernel_weight), so the
// block costs 3 shuffles instead of 4 widenings and 2 pack + extract pairs.
inline void load16_bf16(const cpu::bf16_t* p, __m256& a, __m256& b) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i z = _mm256_setzero_si256();
  a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
  b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
}
// a, b: values already rounded to bf16 (high halves), in load16_bf16's order.
template <bool NT>
inline void store16_bf16(cpu::bf16_t* p, __m256 a, __m256 b) {
  const __m256i v = _mm256_packus_epi32(_mm256_srli_epi32(_mm256_castps_si256(a), 16),
                                        _mm256_srli_epi32(_mm256_castps_si256(b), 16));
  if (NT) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
}
// bf16 bits of v (round to nearest even, NaN -> 0x7fc0) in the low half of each lane: as
// vec::bf16_round_hi followed by the shift, one mask fewer. NO_NAN: the caller knows v holds
// no NaN (the NaN select is then skipped; +-inf rounds to itself without it).
template <bool NO_NAN>
inline __m256i bf16_round_lo(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  if (NO_NAN) return r;
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)), nan));
}
// a, b: fp32 values, rounded here.
template <bool NT, bool NO_NAN>
inline void store16_bf16_round(cpu::bf16_t* p, __m256 a, __m256 b) {
  const __m256i v = _mm256_packus_epi32(bf16_round_lo<NO_NAN>(a), bf16_round_lo<NO_NAN>(b));
  if (NT) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
}
constexpr int64_t kBf16Block = 16;

template <typename T>
constexpr int64_t block16_end(int64_t n) {
  return std::is_same<T, cpu::bf16_t>::value ? n / kBf16Block * kBf16Block : 0;
}

// The fp32 weight in the order the kernel reads it (bf16: permuted within each full block of
// 16 as load16_bf16 orders x; the tail, and other dtypes, in natural order).
template <typename T>
std::vector<float> kernel_weight(const void* weight, int64_t n, DType dtype) {
  std::vector<float> w = weight_as_float(weight, n, dtype);
  if (w.empty()) return w;
  for (int64_t i = 0; i < block16_end<T>(n); i += kBf16Block) {
    float blk[kBf16Block];
    for (int k = 0; k < 4; ++k) {
      blk[k] = w[i + k];
      blk[4 + k] = w[i + 8 + k];
      blk[8 + k] = w[i + 4 + k];
      blk[12 + k] = w[i + 12 + k];
    }
    std::copy(blk, blk + kBf16Block, w.begin() + i);
  }
  return w;
}

// One sweep over the index range of a row doing up to two rows' work (software pipelining
// across rows, all rows have the same n):
//  SUM   (pass 1 of the NEXT row): sum of squares of xn; with the residual, hn = T(xn + resn)
//        is stored (to hn and to the fp32 row buffer hbn, which its pass 2 reads) and its
//        squares summed. Returns the sum (0 when !SUM).
//  SCALE (pass 2 of the CURRENT row): y = src * rstd * w (src: the current x, or its fp32 h
//        buffer, both in the order of w, see kernel_weight), in the order (src * rstd) * w.
//        NO_NAN: src, rstd and w are all finite, so no product is NaN.
// Fusing them keeps the DRAM read stream (the next row) running while the current row is
// scaled from L1/L2 and stored; done as two separate sweeps per row the reads stopped for
// the whole second sweep (bf16 without residual was at ~60% of copy bandwidth with the
// output preallocated). The first row of a thread's chunk gets SUM alone, its last row
// SCALE alone: both do exactly the per-element arithmetic and the accumulation order of the
// fused sweep (the loop structure below is the same for every combination), so a row's
// results do not depend on where chunk boundaries fall (on the thread count).
// Software prefetch of the input streams this many bytes ahead of the sweep (past the row's
// end that is the next row when rows are contiguous; a prefetch never faults). 1 KiB: on 1
// thread (CPU time, 8192 x 4096) bf16 with residual 14.4 -> 12.9 ms, bf16 7.6 -> 7.1 ms against
// none; 0.5 and 2 KiB were no better.
constexpr int64_t kPrefetchBytes = 1024;
// Iterations of 32 values per partial sum of squares (see row_pass).
constexpr int kSumFold = 64;
inline void prefetch_ahead(const void* a, const void* b) {
  if (kPrefetchBytes > 0) {
    _mm_prefetch(static_cast<const char*>(a) + kPrefetchBytes, _MM_HINT_T0);
    if (b) _mm_prefetch(static_cast<const char*>(b) + kPrefetchBytes, _MM_HINT_T0);
  }
}

template <typename T, bool RES, bool NT, bool SUM, bool SCALE, bool NO_NAN>
float row_pass(const T* xn, const T* resn, T* hn, T* hbn, const T* src, const float* w, float rstd, T* y,
               int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  // Two-level sum of squares: the four chains restart from zero every kSumFold iterations of
  // 32 values and are added into `total`, so no fp32 chain holds more than 64 terms (one
  // chain per lane over the whole row gave 19x torch's error at n = 2^20, 2x at 2^16).
  __m256 total = a0;
  int since_fold = 0;
  auto fold = [&] {
    if constexpr (SUM) {
      if (++since_fold == kSumFold) {
        total = _mm256_add_ps(total, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        a0 = a1 = a2 = a3 = _mm256_setzero_ps();
        since_fold = 0;
      }
    }
  };
  const __m256 rs = _mm256_set1_ps(rstd);
  // Pass 2 of [j, j + 8): any grouping gives the same values (each element on its own).
  auto scale8 = [&](int64_t j) {
    __m256 v = _mm256_mul_ps(vec::load8(src + j), rs);
    if (w) v = _mm256_mul_ps(v, _mm256_loadu_ps(w + j));
    vec::store8<NT>(y + j, v, false);
  };
  int64_t i = 0;
  if constexpr (std::is_same<T, cpu::bf16_t>::value) {
    auto sum_block = [&](int64_t j, __m256& acc_a, __m256& acc_b) {
      if constexpr (SUM) {
        __m256 va, vb;
        load16_bf16(xn + j, va, vb);
        if (RES) {
          __m256 ra, rb;
          load16_bf16(resn + j, ra, rb);
          va = vec::round_to(_mm256_add_ps(va, ra), xn);
          vb = vec::round_to(_mm256_add_ps(vb, rb), xn);
          store16_bf16<NT>(hn + j, va, vb);
          store16_bf16<false>(hbn + j, va, vb);
        }
        acc_a = _mm256_fmadd_ps(va, va, acc_a);
        acc_b = _mm256_fmadd_ps(vb, vb, acc_b);
      }
    };
    auto scale_block = [&](int64_t j) {
      if constexpr (SCALE) {
        __m256 a, b;
        load16_bf16(src + j, a, b);
        a = _mm256_mul_ps(a, rs);
        b = _mm256_mul_ps(b, rs);
        if (w) {
          a = _mm256_mul_ps(a, _mm256_loadu_ps(w + j));
          b = _mm256_mul_ps(b, _mm256_loadu_ps(w + j + 8));
        }
        store16_bf16_round<NT, NO_NAN>(y + j, a, b);
      }
    };
    const int64_t nb = block16_end<T>(n);
    // Each output's 64-byte line is written whole before the next output's: interleaving
    // 32-byte non-temporal stores to h and y made the write-combining buffers flush partial
    // lines (bf16 with residual ran at a third of the speed).
    for (; i + 2 * kBf16Block <= nb; i += 2 * kBf16Block) {
      if constexpr (SUM) prefetch_ahead(xn + i, RES ? resn + i : nullptr);
      sum_block(i, a0, a1);
      sum_block(i + kBf16Block, a2, a3);
      scale_block(i);
      scale_block(i + kBf16Block);
      fold();
    }
    for (; i < nb; i += kBf16Block) {
      sum_block(i, a0, a1);
      scale_block(i);
    }
  }
  auto step = [&](int64_t j, __m256& acc) {
    if constexpr (SUM) {
      __m256 v = vec::load8(xn + j);
      if (RES) {
        v = vec::round_to(_mm256_add_ps(v, vec::load8(resn + j)), xn);
        vec::store8<NT>(hn + j, v, true);
        vec::store8<false>(hbn + j, v, true);
      }
      acc = _mm256_fmadd_ps(v, v, acc);
    }
  };
  for (; i + 32 <= n; i += 32) {
    if constexpr (SUM) {
      for (int64_t k = 0; k < 32 * static_cast<int64_t>(sizeof(T)); k += 64)
        prefetch_ahead(reinterpret_cast<const char*>(xn + i) + k,
                       RES ? reinterpret_cast<const char*>(resn + i) + k : nullptr);
    }
    step(i, a0);
    step(i + 8, a1);
    step(i + 16, a2);
    step(i + 24, a3);
    if constexpr (SCALE) {
      scale8(i);
      scale8(i + 8);
      scale8(i + 16);
      scale8(i + 24);
    }
    fold();
  }
  for (; i + 8 <= n; i += 8) {
    step(i, a0);
    if constexpr (SCALE) scale8(i);
  }
  float ss = 0.f;
  if constexpr (SUM)
    ss = vec::hsum(_mm256_add_ps(total, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))));
  for (; i < n; ++i) {
    if constexpr (SUM) {
      float v = vec::to_float(xn[i]);
      if (RES) {
        v = vec::round_scalar(v + vec::to_float(resn[i]), xn);
        vec::from_float(v, hn + i);
        vec::from_float(v, hbn + i);
      }
      // An explicit fma: left to -ffp-contract, each instantiation of this function may
      // contract differently, and a row's rstd would depend on which one ran it.
      ss = std::fma(v, v, ss);
    }
    if constexpr (SCALE) {
      float v = vec::to_float(src[i]) * rstd;
      if (w) v *= w[i];
      vec::from_float(v, y + i);
    }
  }
  return ss;
}

template <typename T, bool RES, bool NT>
void rms_norm_fwd_rows(const RmsNormParams& p, const float* wf, bool w_finite, int64_t begin, int64_t end,
                       T* hb0, T* hb1) {
  const int64_t n = p.n;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* h = static_cast<T*>(p.h);
  auto xrow = [&](int64_t r) { return x + r * p.x_row_stride; };
  auto rrow = [&](int64_t r) { return RES ? res + r * p.residual_row_stride : nullptr; };
  auto hrow = [&](int64_t r) { return RES ? h + r * p.h_row_stride : nullptr; };
  // hb0: a copy of the current row's h, hb1: of the next row's (residual only; swapped per row).
  const T* none = nullptr;
  float ss = row_pass<T, RES, NT, true, false, true>(xrow(begin), rrow(begin), hrow(begin), hb0, none, nullptr,
                                                         0.f, nullptr, n);
  for (int64_t r = begin; r < end; ++r) {
    const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(n) + p.eps);
    p.rstd[r] = rstd;
    T* yr = y + r * p.y_row_stride;
    // A finite sum of squares means every value of the row is finite.
    const bool no_nan = w_finite && std::isfinite(ss) && std::isfinite(rstd);
    const bool last = r + 1 == end;
    const int64_t q = last ? r : r + 1;
    auto run = [&](auto sum, auto no_nan_c) {
      constexpr bool kSum = decltype(sum)::value, kNoNan = decltype(no_nan_c)::value;
      if constexpr (RES)
        return row_pass<T, RES, NT, kSum, true, kNoNan>(xrow(q), rrow(q), hrow(q), hb1, hb0, wf, rstd, yr, n);
      else
        return row_pass<T, RES, NT, kSum, true, kNoNan>(xrow(q), nullptr, nullptr, nullptr, xrow(r), wf, rstd, yr,
                                                           n);
    };
    using F = std::false_type;
    using Tr = std::true_type;
    if (last) {
      if (no_nan) run(F{}, Tr{});
      else run(F{}, F{});
    } else {
      ss = no_nan ? run(Tr{}, Tr{}) : run(Tr{}, F{});
    }
    std::swap(hb0, hb1);
  }
  if (NT) _mm_sfence();
}

// Non-temporal stores only pay off when the output is far larger than the caches (it would
// be evicted before anyone reads it anyway), and need every row to start aligned.
template <typename T>
bool use_streaming_stores(const RmsNormParams& p) {
  constexpr uintptr_t align = std::is_same<T, cpu::half_t>::value ? 16 : 32;
  const int64_t out_bytes = p.rows * p.n * static_cast<int64_t>(sizeof(T)) * (p.residual ? 2 : 1);
  if (out_bytes < (int64_t(16) << 20)) return false;
  auto aligned = [&](const void* ptr, int64_t stride) {
    return reinterpret_cast<uintptr_t>(ptr) % align == 0 &&
           (stride * static_cast<int64_t>(sizeof(T))) % static_cast<int64_t>(align) == 0;
  };
  return aligned(p.y, p.y_row_stride) && (!p.residual || aligned(p.h, p.h_row_stride));
}

template <typename T>
void rms_norm_fwd_impl(const RmsNormParams& p) {
  const int64_t n = p.n;
  const std::vector<float> w = kernel_weight<T>(p.weight, n, p.dtype);
  const float* wf = w.empty() ? nullptr : w.data();
  const bool nt = use_streaming_stores<T>(p);
  const bool res = p.residual != nullptr;
  bool w_finite = true;
  for (float v : w) w_finite = w_finite && std::isfinite(v);
  // Contiguous row chunks per thread (ATen splits [0, rows) into one chunk per thread), so
  // threads never write the same cache line of y or h.
  at::parallel_for(0, p.rows, row_grain(n), [&](int64_t begin, int64_t end) {
    // Two fp32 h row buffers (residual only), 2 KiB apart modulo 4 KiB: the fused sweep loads
    // one at the index it stores the other, and at a distance that is a multiple of 4 KiB
    // every such load would wait on the store (4K aliasing).
    const int64_t b1_off = ((n * static_cast<int64_t>(sizeof(T)) + 4095) / 4096 * 4096 + 2048) / sizeof(T);
    std::vector<T> hb(res ? static_cast<size_t>(b1_off + n) : 0);
    T* b0 = hb.data();
    T* b1 = res ? b0 + b1_off : nullptr;
    if (res) {
      if (nt) rms_norm_fwd_rows<T, true, true>(p, wf, w_finite, begin, end, b0, b1);
      else rms_norm_fwd_rows<T, true, false>(p, wf, w_finite, begin, end, b0, b1);
    } else {
      if (nt) rms_norm_fwd_rows<T, false, true>(p, wf, w_finite, begin, end, b0, b1);
      else rms_norm_fwd_rows<T, false, false>(p, wf, w_finite, begin, end, b0, b1);
    }
  });
}
#else
template <typename T>
void rms_norm_fwd_impl(const RmsNormParams& p) {
  const int64_t n = p.n;
  const std::vector<float> w = weight_as_float(p.weight, n, p.dtype);
  const float* wf = w.empty() ? nullptr : w.data();
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* h = static_cast<T*>(p.h);

  at::parallel_for(0, p.rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(n)), rbuf(res ? static_cast<size_t>(n) : 0);
    float* b = buf.data();
    for (int64_t r = begin; r < end; ++r) {
      load_row(x + r * p.x_row_stride, b, n);
      if (res) {
        float* rb = rbuf.data();
        load_row(res + r * p.residual_row_stride, rb, n);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) b[i] += rb[i];
        // h is stored in the input dtype and it is the rounded h that gets normalised, so
        // that y == rms_norm(h) exactly as the unfused composition would compute it.
        store_row(b, h + r * p.h_row_stride, n);
        if (!std::is_same<T, float>::value) load_row(h + r * p.h_row_stride, b, n);
      }
      float ss = 0.f;
      for_blocks(n, [&](int64_t i0, int64_t i1) {
        float part = 0.f;
#pragma omp simd reduction(+ : part)
        for (int64_t i = i0; i < i1; ++i) part += b[i] * b[i];
        ss += part;
      });
      const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(n) + p.eps);
      p.rstd[r] = rstd;
      if (wf) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) b[i] = b[i] * rstd * wf[i];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) b[i] = b[i] * rstd;
      }
      store_row(b, y + r * p.y_row_stride, n);
    }
  });
}
#endif  // AVX2 forward

constexpr int64_t kDweightFold = 64;

template <typename T>
void rms_norm_bwd_impl(const RmsNormBwdParams& p) {
  const int64_t n = p.n;
  const std::vector<float> w = weight_as_float(p.weight, n, p.dtype);
  const float* wf = w.empty() ? nullptr : w.data();
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const T* dh = static_cast<const T*>(p.dh);
  T* dx = static_cast<T*>(p.dx);
  const int64_t nblocks = p.num_row_blocks;
  const int64_t rows_per_block = (p.rows + nblocks - 1) / nblocks;

  at::parallel_for(0, nblocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    std::vector<float> xb(static_cast<size_t>(n)), gb(static_cast<size_t>(n)),
        hb(dh ? static_cast<size_t>(n) : 0), dw_run(wf ? static_cast<size_t>(n) : 0);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      float* dw_block = wf ? p.dweight_partial + blk * n : nullptr;
      // dweight in two levels within the block too: kDweightFold rows are summed into dw_run,
      // which is then added to the block's partial (one chain per column over a whole block,
      // 4096 rows at 262144 rows, gave 3x torch's error, 12x at 2^20 rows).
      float* dw = dw_run.data();
      if (wf) {
        std::fill(dw_block, dw_block + n, 0.f);
        std::fill(dw, dw + n, 0.f);
      }
      const int64_t r_begin = blk * rows_per_block;
      const int64_t r_end = std::min(p.rows, (blk + 1) * rows_per_block);
      auto flush_dw = [&] {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          dw_block[i] += dw[i];
          dw[i] = 0.f;
        }
      };
      for (int64_t r = r_begin; r < r_end; ++r) {
        if (wf && r > r_begin && (r - r_begin) % kDweightFold == 0) flush_dw();
        float* xr = xb.data();
        float* g = gb.data();
        load_row(x + r * p.x_row_stride, xr, n);
        load_row(dy + r * p.dy_row_stride, g, n);
        const float rstd = p.rstd[r];
        float dot = 0.f;
        for_blocks(n, [&](int64_t i0, int64_t i1) {
          float part = 0.f;
          if (wf) {
#pragma omp simd reduction(+ : part)
            for (int64_t i = i0; i < i1; ++i) {
              const float xhat = xr[i] * rstd;
              dw[i] += g[i] * xhat;  // dweight uses dy before it is scaled by weight
              g[i] *= wf[i];
              part += g[i] * xhat;
            }
          } else {
#pragma omp simd reduction(+ : part)
            for (int64_t i = i0; i < i1; ++i) part += g[i] * xr[i] * rstd;
          }
          dot += part;
        });
        const float c = dot / static_cast<float>(n);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) g[i] = rstd * (g[i] - xr[i] * rstd * c);
        if (dh) {
          float* hr = hb.data();
          load_row(dh + r * p.dh_row_stride, hr, n);
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) g[i] += hr[i];
        }
        store_row(g, dx + r * p.dx_row_stride, n);
      }
      if (wf && r_end > r_begin) flush_dw();
    }
  });

  if (wf) {
    // Column-parallel, block-ordered sum of the partials: the same bits on any thread count.
    at::parallel_for(0, n, 1024, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        float acc = 0.f;
        for (int64_t blk = 0; blk < nblocks; ++blk) acc += p.dweight_partial[blk * n + c];
        p.dweight[c] = acc;
      }
    });
  }
}

}  // namespace

void cpu::rms_norm_fwd_kernel(const RmsNormParams& params) {
  FASTATTN_CPU_DTYPE_SWITCH(params.dtype, T, [&] { rms_norm_fwd_impl<T>(params); });
}

void cpu::rms_norm_bwd_kernel(const RmsNormBwdParams& params) {
  FASTATTN_CPU_DTYPE_SWITCH(params.dtype, T, [&] { rms_norm_bwd_impl<T>(params); });
}

int64_t rms_norm_bwd_num_row_blocks_cpu(int64_t rows) {
  // At most 64 blocks: enough parallelism for any CPU this runs on, while the partial
  // buffer (64 x n fp32) stays small.
  return std::max<int64_t>(1, std::min<int64_t>(rows, 64));
}

}  // namespace fastattn
