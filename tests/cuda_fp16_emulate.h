// cuda_fp16_emulate.h — host stand-ins for the 16-bit storage types of cuda_fp16.h /
// cuda_bf16.h and their fp32 conversions, for the emulated kernels (rotary, rms_norm).
// Both conversions to 16 bit round to nearest even, as the CUDA _rn intrinsics; a NaN
// becomes the canonical bf16 quiet NaN 0x7fc0.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return static_cast<float>(h);
}
inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // round to nearest even
  __half r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}
inline float __bfloat162float(__nv_bfloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fc0};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                      // round to nearest even
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
