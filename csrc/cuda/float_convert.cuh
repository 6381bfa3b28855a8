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

}  // namespace cuda_convert
}  // namespace fastattn
