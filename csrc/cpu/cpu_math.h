// cpu_math.h — vectorised math for the CPU attention kernels: exp2 for the softmax (decode)
// and tanh for logit soft-capping (Gemma 2, Grok: scores s become cap * tanh(s / cap)
// before the softmax).
//
// Written with GCC/Clang vector extensions, one native register per value (16 floats with
// AVX-512, 8 with AVX2, 4 with SSE): one source for every ISA tier, and it vectorises
// whatever the floating-point flags. A scalar loop with selects does not: under
// the default -ftrapping-math GCC will not if-convert the float -> int conversion an
// exponential needs, and the loop stays scalar.
//
// Only the soft-capped kernel variants call tanh; the uncapped paths never see it.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastattn {
namespace cpu {

namespace vmath {
// One native register per value: GCC lowers a select (?:) on a wider-than-native vector type
// to scalar code lane by lane, which made this loop ~10x slower on AVX2 with 16 lanes.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf splat(float x) { return vf{} + x; }
inline vi as_int(vf x) {
  vi r;
  std::memcpy(&r, &x, sizeof(r));
  return r;
}
inline vf as_float(vi x) {
  vf r;
  std::memcpy(&r, &x, sizeof(r));
  return r;
}
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// 2^x of kLanes floats: x = n + r with n = round(x) (half away from zero), |r| <= 1/2; 2^r
// by its degree-6 Taylor polynomial (relative error < 2e-7, below fp32 accumulation noise),
// 2^n by adding n to the exponent. Lanes below -126 (including -inf, masked keys) give
// exactly 0; lanes above 127 give 2^127 times the polynomial. Every lane on its own: the
// result does not depend on kLanes.
inline vf exp2(vf x) {
  const vi tiny = x < -126.f;
  x = x < -126.f ? splat(-126.f) : x;
  x = x > 127.f ? splat(127.f) : x;
  const vi ni = __builtin_convertvector(x + (x >= 0.f ? splat(0.5f) : splat(-0.5f)), vi);
  const vf n = __builtin_convertvector(ni, vf);
  const vf r = x - n;
  vf p = splat(1.54035304e-04f);
  p = p * r + 1.33335581e-03f;
  p = p * r + 9.61812911e-03f;
  p = p * r + 5.55041087e-02f;
  p = p * r + 2.40226507e-01f;
  p = p * r + 6.93147181e-01f;
  p = p * r + 1.00000000e+00f;
  const vf out = p * as_float((ni + 127) << 23);
  return tiny ? splat(0.f) : out;
}

// tanh of kLanes floats, within ~2.2e-7 relative (1e-7 absolute) of the exact value. Two
// formulas, each where it is accurate:
//  * |x| < 0.4: the odd Taylor series to x^13 (the first dropped term is < 4e-9 of the
//    value); this is where the exponential form cancels (tanh x ~ x is small).
//  * |x| >= 0.4: tanh|x| = 1 - 2e / (1 + e) with e = exp(-2|x|) in (0, 0.45], so nothing
//    overflows for any x (e bottoms out at 2^-126 and the result rounds to exactly 1).
// The sign is copied back from x. NaN propagates; +-inf give +-1.
inline vf tanh(vf x) {
  const vi bits = as_int(x);
  const vi sign = bits & static_cast<int32_t>(0x80000000u);
  const vf a = as_float(bits & 0x7fffffff);
  const vf x2 = x * x;
  vf p = splat(3.5921280e-3f);  // 21844 / 6081075
  p = p * x2 - 8.8632355e-3f;   // 1382 / 155925
  p = p * x2 + 2.1869489e-2f;   // 62 / 2835
  p = p * x2 - 5.3968254e-2f;   // 17 / 315
  p = p * x2 + 1.3333334e-1f;   // 2 / 15
  p = p * x2 - 3.3333334e-1f;   // 1 / 3
  const vf small = x + x * x2 * p;

  // e = 2^t, t = -2 log2(e) |x| <= 0: t = n + r, n = round(t), |r| <= 1/2; 2^r by its
  // degree-7 Taylor polynomial (< 1e-8 relative), 2^n through the exponent bits.
  vf t = a * -2.8853900817779268f;
  t = t < -126.0f ? splat(-126.0f) : t;
  const vi n = __builtin_convertvector(t - 0.5f, vi);  // truncation of t - 1/2: round(t)
  const vf r = t - __builtin_convertvector(n, vf);
  vf q = splat(1.5252733804059841e-05f);
  q = q * r + 1.5403530393381608e-04f;
  q = q * r + 1.3333558146428443e-03f;
  q = q * r + 9.6181291076284772e-03f;
  q = q * r + 5.5504108664821580e-02f;
  q = q * r + 2.4022650695910071e-01f;
  q = q * r + 6.9314718055994531e-01f;
  q = q * r + 1.0f;
  const vf e = q * as_float((n + 127) << 23);
  const vf big = as_float(as_int(1.0f - 2.0f * e / (1.0f + e)) | sign);
  // NaN fails the comparison and takes the series, which keeps it NaN.
  return a >= 0.4f ? big : small;
}
}  // namespace vmath

// The largest (kLargest) or smallest value of x[0, n): -inf / +inf when n == 0; NaNs are
// skipped (a softmax that uses this still sees a NaN score through its exponential). Four
// vector accumulators, so the compares are not one serial chain. An `omp simd
// reduction(max)` over std::max stayed scalar under GCC (it will not reorder that
// NaN-sensitive select): one dependent vmaxss per score, slower than the exponentials.
template <bool kLargest>
inline float row_extreme(const float* x, int64_t n) {
  using namespace vmath;
  auto pick = [](vf a, vf v) {
    if constexpr (kLargest) return v > a ? v : a;
    else return v < a ? v : a;
  };
  const vf init = splat(kLargest ? -__builtin_inff() : __builtin_inff());
  vf a0 = init, a1 = init, a2 = init, a3 = init;
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes) {
    a0 = pick(a0, load(x + j));
    a1 = pick(a1, load(x + j + kLanes));
    a2 = pick(a2, load(x + j + 2 * kLanes));
    a3 = pick(a3, load(x + j + 3 * kLanes));
  }
  for (; j + kLanes <= n; j += kLanes) a0 = pick(a0, load(x + j));
  a0 = pick(pick(a0, a1), pick(a2, a3));
  float r = a0[0];
  for (int64_t i = 1; i < kLanes; ++i) r = kLargest ? (a0[i] > r ? a0[i] : r) : (a0[i] < r ? a0[i] : r);
  for (; j < n; ++j) r = kLargest ? (x[j] > r ? x[j] : r) : (x[j] < r ? x[j] : r);
  return r;
}

// in_scale / cap, the factor that takes a stored value to the tanh argument, clamped to the
// finite floats: a denormal cap would make it inf, and inf * 0 (a zero score) NaN.
inline float softcap_multiplier(float in_scale, float cap) {
  constexpr float kMax = 3.4028234663852886e+38f;
  const float m = in_scale / cap;
  return m > kMax ? kMax : (m < -kMax ? -kMax : m);
}

// t[j] = tanh(x[j] * mul) for j in [0, n). x and t may be the same array.
inline void tanh_row(const float* x, float mul, float* t, int64_t n) {
  using namespace vmath;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) store(t + j, vmath::tanh(load(x + j) * mul));
  if (j < n) {  // the tail through a zero-padded block: the same arithmetic as full blocks
    float buf[kLanes] = {};
    std::memcpy(buf, x + j, static_cast<size_t>(n - j) * sizeof(float));
    store(buf, vmath::tanh(load(buf) * mul));
    std::memcpy(t + j, buf, static_cast<size_t>(n - j) * sizeof(float));
  }
}

// Logit soft-capping in place: s[j] = (cap * tanh(s[j] * in_scale / cap)) * out_scale.
// in_scale turns the stored value into the score the cap applies to (softmax_scale when s
// holds raw q.k products); out_scale multiplies the capped score (log2(e) when an exp2
// softmax follows). Multiplying by cap before out_scale keeps any finite fp32 cap finite.
inline void softcap_row(float* s, int64_t n, float cap, float in_scale, float out_scale) {
  using namespace vmath;
  const float in_mul = softcap_multiplier(in_scale, cap);
  auto cap_block = [&](const float* src, float* dst) {
    store(dst, (vmath::tanh(load(src) * in_mul) * cap) * out_scale);
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) cap_block(s + j, s + j);
  if (j < n) {  // the tail through a zero-padded block: the same arithmetic as full blocks
    float buf[kLanes] = {};
    std::memcpy(buf, s + j, static_cast<size_t>(n - j) * sizeof(float));
    cap_block(buf, buf);
    std::memcpy(s + j, buf, static_cast<size_t>(n - j) * sizeof(float));
  }
}

}  // namespace cpu
}  // namespace fastattn
