// rms_norm.cu — RMSNorm forward (optionally fused with the residual add) and backward.
//
// What it computes, per row of (rows, n):
//   forward:  h = x + residual (fused form only, written out), y = h * rstd * weight with
//             rstd = 1 / sqrt(mean(h^2) + eps); rstd (fp32) is kept for the backward.
//   backward: dx = rstd * (g - xhat * mean(g * xhat)) + dh with xhat = x * rstd and
//             g = dy * weight; dweight = sum over rows of dy * xhat, in fp32.
//
// Why it is fast: RMSNorm is purely memory bound (a few flops per byte), so the kernel is
// built to move each byte once at full width:
//   * one thread block per row, every access a 16-byte vector (8 x fp16/bf16 or 4 x fp32)
//     whenever pointers, row strides and n allow it (a scalar instantiation handles the
//     rest correctly), so a warp issues 512-byte fully coalesced transactions;
//   * the row is staged in shared memory in its storage type on the first pass (the sum of
//     squares), so the second pass (scale and store) never re-reads global memory;
//   * the sum of squares is reduced with warp shuffles and one shared-memory exchange
//     between warps — no atomics;
//   * dweight is reduced deterministically: a fixed grid of row blocks (a function of the
//     shape and SM count) accumulate their rows' contributions in fp32 shared memory, write
//     one partial row each, and a second tiny kernel adds the partials in block order.
// Accumulation is always fp32 whatever the storage type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fastattn/api.h"
#include "fastattn/cuda_check.h"
#include "fastattn/params.h"
#include "fastattn/static_switch.h"
#include "float_convert.cuh"

namespace fastattn {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kWarp = 32;

using cuda_convert::from_float;
using cuda_convert::Pack;
using cuda_convert::to_float;

template <typename T, int kN>
__device__ __forceinline__ void load_pack(const T* src, float (&dst)[kN]) {
  const Pack<T, kN> p = *reinterpret_cast<const Pack<T, kN>*>(src);
#pragma unroll
  for (int i = 0; i < kN; ++i) dst[i] = to_float(p.v[i]);
}

template <typename T, int kN>
__device__ __forceinline__ void store_pack(T* dst, const float (&src)[kN]) {
  Pack<T, kN> p;
#pragma unroll
  for (int i = 0; i < kN; ++i) p.v[i] = from_float<T>(src[i]);
  *reinterpret_cast<Pack<T, kN>*>(dst) = p;
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
  __syncthreads();  // scratch may still be read from the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < nwarps; ++w) total += scratch[w];  // same order in every thread
  return total;
}

// One block per row (grid-stride over rows). Dynamic shared memory: the row in T when
// cache_row is set, else nothing (the second pass then re-reads from global/L2).
template <typename T, int kN, bool kResidual>
__global__ void __launch_bounds__(kMaxThreads)
rms_norm_fwd_kernel(const RmsNormParams p, const bool cache_row) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* row_cache = reinterpret_cast<T*>(smem_raw);
  __shared__ float scratch[kMaxThreads / kWarp];

  const int64_t npacks = p.n / kN;
  const T* __restrict__ wgt = static_cast<const T*>(p.weight);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* __restrict__ x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    const T* __restrict__ res = kResidual ? static_cast<const T*>(p.residual) + row * p.residual_row_stride : nullptr;
    T* __restrict__ h = kResidual ? static_cast<T*>(p.h) + row * p.h_row_stride : nullptr;
    T* __restrict__ y = static_cast<T*>(p.y) + row * p.y_row_stride;

    // Pass 1: load (and add the residual), keep the row, accumulate the sum of squares.
    float ss = 0.f;
    for (int64_t i = threadIdx.x; i < npacks; i += blockDim.x) {
      float v[kN];
      load_pack<T, kN>(x + i * kN, v);
      if constexpr (kResidual) {
        float r[kN];
        load_pack<T, kN>(res + i * kN, r);
#pragma unroll
        for (int j = 0; j < kN; ++j) v[j] += r[j];
        store_pack<T, kN>(h + i * kN, v);
        // Normalise the rounded h, exactly as the unfused x + r -> rms_norm would.
#pragma unroll
        for (int j = 0; j < kN; ++j) v[j] = to_float(from_float<T>(v[j]));
      }
      if (cache_row) store_pack<T, kN>(row_cache + i * kN, v);
#pragma unroll
      for (int j = 0; j < kN; ++j) ss += v[j] * v[j];
    }
    const float total = block_sum(ss, scratch);
    const float rstd = rsqrtf(total / static_cast<float>(p.n) + p.eps);
    if (threadIdx.x == 0) p.rstd[row] = rstd;

    // Pass 2: scale and store. Each thread revisits exactly the packs it wrote, so the
    // cached row needs no barrier.
    for (int64_t i = threadIdx.x; i < npacks; i += blockDim.x) {
      float v[kN];
      if (cache_row) {
        load_pack<T, kN>(row_cache + i * kN, v);
      } else {
        load_pack<T, kN>((kResidual ? h : x) + i * kN, v);
      }
      if (wgt != nullptr) {
        float w[kN];
        load_pack<T, kN>(wgt + i * kN, w);
#pragma unroll
        for (int j = 0; j < kN; ++j) v[j] = v[j] * rstd * w[j];
      } else {
#pragma unroll
        for (int j = 0; j < kN; ++j) v[j] *= rstd;
      }
      store_pack<T, kN>(y + i * kN, v);
    }
  }
}

// Block b handles rows b, b + gridDim.x, ... in increasing order and accumulates its
// dweight contribution in `acc` (fp32 shared memory when it fits, else its own row of
// dweight_partial); each thread only ever touches its own columns, so no atomics.
template <typename T, int kN>
__global__ void __launch_bounds__(kMaxThreads)
rms_norm_bwd_kernel(const RmsNormBwdParams p, const bool acc_in_smem) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float scratch[kMaxThreads / kWarp];
  const int64_t npacks = p.n / kN;
  const T* __restrict__ wgt = static_cast<const T*>(p.weight);
  const bool has_weight = wgt != nullptr;
  float* acc = nullptr;
  if (has_weight) {
    acc = acc_in_smem ? reinterpret_cast<float*>(smem_raw) : p.dweight_partial + blockIdx.x * p.n;
    for (int64_t i = threadIdx.x; i < npacks; i += blockDim.x) {
#pragma unroll
      for (int j = 0; j < kN; ++j) acc[i * kN + j] = 0.f;
    }
  }

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* __restrict__ x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    const T* __restrict__ dy = static_cast<const T*>(p.dy) + row * p.dy_row_stride;
    const T* __restrict__ dh = p.dh ? static_cast<const T*>(p.dh) + row * p.dh_row_stride : nullptr;
    T* __restrict__ dx = static_cast<T*>(p.dx) + row * p.dx_row_stride;
    const float rstd = p.rstd[row];

    float dot = 0.f;
    for (int64_t i = threadIdx.x; i < npacks; i += blockDim.x) {
      float xv[kN], g[kN];
      load_pack<T, kN>(x + i * kN, xv);
      load_pack<T, kN>(dy + i * kN, g);
      if (has_weight) {
        float w[kN];
        load_pack<T, kN>(wgt + i * kN, w);
#pragma unroll
        for (int j = 0; j < kN; ++j) {
          const float xhat = xv[j] * rstd;
          acc[i * kN + j] += g[j] * xhat;
          dot += g[j] * w[j] * xhat;
        }
      } else {
#pragma unroll
        for (int j = 0; j < kN; ++j) dot += g[j] * xv[j] * rstd;
      }
    }
    const float c = block_sum(dot, scratch) / static_cast<float>(p.n);

    // Second pass re-reads x and dy; they were just read by this block and hit in L1/L2.
    for (int64_t i = threadIdx.x; i < npacks; i += blockDim.x) {
      float xv[kN], g[kN];
      load_pack<T, kN>(x + i * kN, xv);
      load_pack<T, kN>(dy + i * kN, g);
      if (has_weight) {
        float w[kN];
        load_pack<T, kN>(wgt + i * kN, w);
#pragma unroll
        for (int j = 0; j < kN; ++j) g[j] *= w[j];
      }
#pragma unroll
      for (int j = 0; j < kN; ++j) g[j] = rstd * (g[j] - xv[j] * rstd * c);
      if (dh != nullptr) {
        float e[kN];
        load_pack<T, kN>(dh + i * kN, e);
#pragma unroll
        for (int j = 0; j < kN; ++j) g[j] += e[j];
      }
      store_pack<T, kN>(dx + i * kN, g);
    }
  }

  if (has_weight && acc_in_smem) {
    float* out = p.dweight_partial + blockIdx.x * p.n;
    for (int64_t i = threadIdx.x; i < npacks; i += blockDim.x) {
#pragma unroll
      for (int j = 0; j < kN; ++j) out[i * kN + j] = acc[i * kN + j];
    }
  }
}

// dweight[c] = sum over blocks (in block order) of dweight_partial[b][c].
__global__ void rms_norm_dweight_reduce_kernel(const float* __restrict__ partial, float* __restrict__ dweight,
                                               int64_t num_blocks, int64_t n) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= n) return;
  float s = 0.f;
  for (int64_t b = 0; b < num_blocks; ++b) s += partial[b * n + c];
  dweight[c] = s;
}

bool aligned16(const void* ptr) { return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % 16) == 0; }

int threads_for(int64_t npacks) {
  const int64_t t = ((npacks + kWarp - 1) / kWarp) * kWarp;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(t, kWarp), kMaxThreads));
}

// Ask for `bytes` of dynamic shared memory for `kernel`; *ok = false if the device cannot
// give it. The limits apply to static + dynamic shared memory together: without the opt-in a
// block gets 48 KiB in all, so dynamic memory just under 48 KiB plus the kernels' static
// scratch already needs it (N = 12288 in fp32 is exactly 48 KiB of dynamic memory).
template <typename Kernel>
cudaError_t request_smem(Kernel kernel, size_t bytes, bool* ok) {
  *ok = true;
  if (bytes == 0) return cudaSuccess;
  cudaFuncAttributes attr;
  FASTATTN_CUDA_TRY(cudaFuncGetAttributes(&attr, kernel));
  const size_t total = bytes + attr.sharedSizeBytes;
  if (total <= 48 * 1024) return cudaSuccess;
  int device = 0, optin = 0;
  FASTATTN_CUDA_TRY(cudaGetDevice(&device));
  FASTATTN_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (total > static_cast<size_t>(optin)) {
    *ok = false;
    return cudaSuccess;
  }
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int kN, bool kResidual>
cudaError_t launch_fwd(const RmsNormParams& p, cudaStream_t stream) {
  auto kernel = rms_norm_fwd_kernel<T, kN, kResidual>;
  const int64_t npacks = p.n / kN;
  size_t smem = static_cast<size_t>(p.n) * sizeof(T);
  bool cache = true;
  FASTATTN_CUDA_TRY(request_smem(kernel, smem, &cache));
  if (!cache) smem = 0;
  // Rows beyond the grid limit are covered by the grid-stride loop.
  const int64_t grid = std::min<int64_t>(p.rows, 2147483647);
  kernel<<<static_cast<unsigned>(grid), threads_for(npacks), smem, stream>>>(p, cache);
  FASTATTN_CUDA_LAUNCH_CHECK();
  return cudaSuccess;
}

template <typename T>
cudaError_t dispatch_fwd(const RmsNormParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.n % kVec == 0 && aligned16(p.x) && aligned16(p.y) && aligned16(p.weight) &&
                   aligned16(p.residual) && aligned16(p.h) && p.x_row_stride % kVec == 0 &&
                   p.y_row_stride % kVec == 0 && (p.residual == nullptr || (p.residual_row_stride % kVec == 0 &&
                                                                          p.h_row_stride % kVec == 0));
  return BOOL_SWITCH(p.residual != nullptr, kResidual, [&] {
    return vec ? launch_fwd<T, kVec, kResidual>(p, stream) : launch_fwd<T, 1, kResidual>(p, stream);
  });
}

template <typename T, int kN>
cudaError_t launch_bwd(const RmsNormBwdParams& p, cudaStream_t stream) {
  auto kernel = rms_norm_bwd_kernel<T, kN>;
  const int64_t npacks = p.n / kN;
  bool acc_in_smem = false;
  size_t smem = 0;
  if (p.weight != nullptr) {
    smem = static_cast<size_t>(p.n) * sizeof(float);
    FASTATTN_CUDA_TRY(request_smem(kernel, smem, &acc_in_smem));
    if (!acc_in_smem) smem = 0;
  }
  kernel<<<static_cast<unsigned>(p.num_row_blocks), threads_for(npacks), smem, stream>>>(p, acc_in_smem);
  FASTATTN_CUDA_LAUNCH_CHECK();
  if (p.weight != nullptr) {
    const int threads = 256;
    const int64_t blocks = (p.n + threads - 1) / threads;
    rms_norm_dweight_reduce_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        p.dweight_partial, p.dweight, p.num_row_blocks, p.n);
    FASTATTN_CUDA_LAUNCH_CHECK();
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t dispatch_bwd(const RmsNormBwdParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.n % kVec == 0 && aligned16(p.x) && aligned16(p.dy) && aligned16(p.dx) &&
                   aligned16(p.weight) && aligned16(p.dh) && p.x_row_stride % kVec == 0 &&
                   p.dy_row_stride % kVec == 0 && p.dx_row_stride % kVec == 0 &&
                   (p.dh == nullptr || p.dh_row_stride % kVec == 0);
  return vec ? launch_bwd<T, kVec>(p, stream) : launch_bwd<T, 1>(p, stream);
}

}  // namespace

cudaError_t rms_norm_fwd_cuda(const RmsNormParams& params, cudaStream_t stream) {
  if (params.rows <= 0 || params.n <= 0) return cudaSuccess;
  return FASTATTN_DTYPE_SWITCH(params.dtype, T, __half, __nv_bfloat16, [&] { return dispatch_fwd<T>(params, stream); });
}

cudaError_t rms_norm_bwd_cuda(const RmsNormBwdParams& params, cudaStream_t stream) {
  if (params.rows <= 0 || params.n <= 0) return cudaSuccess;
  if (params.weight != nullptr && (params.dweight_partial == nullptr || params.dweight == nullptr ||
                                   params.num_row_blocks <= 0))
    return cudaErrorInvalidValue;
  return FASTATTN_DTYPE_SWITCH(params.dtype, T, __half, __nv_bfloat16, [&] { return dispatch_bwd<T>(params, stream); });
}

int64_t rms_norm_bwd_num_row_blocks_cuda(int64_t rows, int64_t n, int num_sms) {
  (void)n;
  // Two resident blocks per SM keep every SM streaming; more only multiplies the partials.
  return std::max<int64_t>(1, std::min<int64_t>(rows, 2 * static_cast<int64_t>(std::max(num_sms, 1))));
}

}  // namespace fastattn
