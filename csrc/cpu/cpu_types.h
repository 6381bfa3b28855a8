// cpu_types.h — 16-bit float storage types for the CPU kernels and fast row conversions.
//
// Every CPU kernel works the same way: convert a row (or block) of the input to fp32 in a
// small per-thread buffer that stays in L1, do the math in fp32, convert back on store. The
// conversions below are written so the compiler vectorises them (bf16 is a shift; fp16 uses
// the F16C / AVX-512 converts when the build targets them), which is what makes the 16-bit
// paths run at memory speed instead of being bound by scalar conversions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastattn {
namespace cpu {

// bf16 dot products on vdpbf16ps (AVX512-BF16): only the avx512 tier library compiles code
// for them (the instruction needs AVX-512 registers), in functions marked FASTATTN_DPBF16;
// whether the CPU has the instruction is asked at run time (has_dpbf16), so the tier itself
// still runs on every AVX-512 CPU.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__x86_64__) && defined(__GNUC__)
#define FASTATTN_HAVE_DPBF16 1
#define FASTATTN_DPBF16 __attribute__((target("avx512bf16")))
inline bool has_dpbf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}
#else
inline bool has_dpbf16() { return false; }
#endif

// The bf16 pair paths (vdpbf16ps, P rounded to bf16) from this head dim on, in every kernel.
// Below it a score is a sum of a few products, so P's bf16 rounding (the row sum is taken
// before it) outweighs the rest of the error: random sweeps found the backward's dq / dk / dv
// at 2.1-2.6x the bf16 reference's error at d 1..4, and the forward / decode outputs up to
// 1.6x / 8.9x at d 1..8 (the fp32 paths: within the 2x rule there), none at 16 and above.
// Tiny heads gain nothing from the pairs anyway.
constexpr int64_t kDpMinHeadDim = 16;

struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  // Round to nearest even; NaN stays a (quiet) NaN.
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(rounded);
}

// Portable IEEE half <-> float, used only where the hardware converts are unavailable.
inline float half_to_float_portable(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      float f = std::ldexp(static_cast<float>(man), -24);
      std::memcpy(&u, &f, 4);
      u |= sign;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half_portable(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t absu = u & 0x7fffffffu;
  if (absu >= 0x7f800000u) return sign | (absu > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (absu >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
  if (absu < 0x38800000u) {                        // below the smallest normal half
    const float a = std::fabs(f) * 16777216.0f;    // in units of 2^-24
    return sign | static_cast<uint16_t>(std::nearbyint(a));
  }
  const uint32_t rounded = absu + 0x0fffu + ((absu >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return half_to_float_portable(h);
#endif
}

inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  return float_to_half_portable(f);
#endif
}

inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) { return bf16_to_float(x.bits); }
inline float to_float(half_t x) { return half_to_float(x.bits); }

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline bf16_t from_float<bf16_t>(float f) { return bf16_t{float_to_bf16(f)}; }
template <> inline half_t from_float<half_t>(float f) { return half_t{float_to_half(f)}; }

// dst[0:n] = float(src[0:n])
inline void load_row(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}
inline void load_row(const bf16_t* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(s[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    dst[i] = f;
  }
}
inline void load_row(const half_t* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) dst[i] = half_to_float(s[i]);
}

// dst[0:n] = T(src[0:n]), round to nearest even
inline void store_row(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}
inline void store_row(const float* src, bf16_t* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &src[i], 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
    d[i] = static_cast<uint16_t>(is_nan ? 0x7fc0u : rounded);
  }
}
inline void store_row(const float* src, half_t* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) d[i] = float_to_half(src[i]);
}

}  // namespace cpu
}  // namespace fastattn

// Dispatch a fastattn::DType to the CPU storage type.
#define FASTATTN_CPU_DTYPE_SWITCH(DTYPE, ELEM_T, ...) \
  FASTATTN_DTYPE_SWITCH(DTYPE, ELEM_T, ::fastattn::cpu::half_t, ::fastattn::cpu::bf16_t, __VA_ARGS__)
