// float_convert.cuh — fp32 <-> storage-type conversions and the aligned element pack shared
// by the elementwise CUDA kernels (RMSNorm, RoPE). Torch-free: plain CUDA headers only.
//
// Every kernel here computes in fp32 and stores the tensor's own type; to_float/from_float
// are the one place that conversion (round to nearest even) is spelled out.
#pragma once

// Under nvcc the real types; a host emulation of a kernel (tests/*_emulate.cpp) defines
// __half, __nv_bfloat16, their conversions and __device__/__forceinline__ itself.
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#include <cstdint>
#include <cstring>

namespace fastattn {
namespace cuda_convert {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// kN consecutive elements moved as one access: 16 bytes for a vector path, one element for
// a scalar path.
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Pack {
  T v[kN];
};

// ---- 128-bit global stores ----
// A 16-byte store written in C++ (a Pack, even a uint4) is split by the compiler into 8 x
// STG.E.U16 or 4 x STG.E when it cannot prove the address 16-byte aligned (seen in the RoPE
// kernel's SASS for `out + half + i0`). Stores that must be one STG.E.128 go through store16:
// the elements are packed into four 32-bit words in registers and written by one
// st.global.v4.b32 (the launchers only pick a vector path when every such address is
// aligned). A host emulation (tests/*_emulate.cpp) defines FASTATTN_STORE16(ptr, x, y, z, w)
// to a checked store (alignment, bounds).
#ifndef FASTATTN_STORE16
#define FASTATTN_STORE16(ptr, x, y, z, w)                                                              \
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(x), "r"(y), "r"(z), "r"(w) \
               : "memory")
#endif

template <typename T>
__device__ __forceinline__ uint32_t bits_of(T v) {  // the storage bits, zero-extended
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "16- or 32-bit elements");
  if constexpr (sizeof(T) == 4) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  } else {
    uint16_t u;
    memcpy(&u, &v, 2);
    return u;
  }
}

// Word i of a 16-byte pack: one fp32, or two 16-bit elements (the lower address in the low half).
template <typename T, int kN>
__device__ __forceinline__ uint32_t word_of(const Pack<T, kN>& p, int i) {
  if constexpr (sizeof(T) == 4) {
    return bits_of(p.v[i]);
  } else {
    return bits_of(p.v[2 * i]) | (bits_of(p.v[2 * i + 1]) << 16);
  }
}

template <typename T, int kN>
__device__ __forceinline__ void store16(T* dst, const Pack<T, kN>& p) {
  static_assert(sizeof(T) * kN == 16, "store16 writes exactly 16 bytes");
  FASTATTN_STORE16(dst, word_of(p, 0), word_of(p, 1), word_of(p, 2), word_of(p, 3));
}

// ---- shared-memory accessors ----
// Every shared-memory access of the RMSNorm and RoPE kernels goes through lds / sts: on the
// GPU a plain ld / st.shared; under emulation (FASTATTN_EMU_TRACK_SMEM, defined by the
// emulator after tests/fiber_emulate.h) the tracked emu::smem_load / smem_store, so the
// racecheck / initcheck analogues see them.
template <typename V>
__device__ __forceinline__ V lds(const V* p) {
#ifdef FASTATTN_EMU_TRACK_SMEM
  return ::emu::smem_load<V>(::emu::smem_offset(p));
#else
  return *p;
#endif
}
template <typename V>
__device__ __forceinline__ void sts(V* p, const V& v) {
#ifdef FASTATTN_EMU_TRACK_SMEM
  ::emu::smem_store<V>(::emu::smem_offset(p), v);
#else
  *p = v;
#endif
}

}  // namespace cuda_convert
}  // namespace fastattn
