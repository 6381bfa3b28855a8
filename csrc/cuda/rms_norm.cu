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
//     rest correctly), so a warp issues 512-byte fully coalesced transactions; every
//     vector store is one STG.E.128 (float_convert.cuh, store16);
//   * a thread issues all the loads of its slice of the row (2 vectors, with the residual 4)
//     back to back before it uses any, and for rows up to 8192 elements keeps the slice in
//     registers across the reduction, so the store pass reads only the weight; longer rows
//     go in rounds of the same width and are staged in shared memory (the row cache, in
//     their storage type), so the store pass never re-reads global memory when it fits;
//   * the forward's block is sized so that every thread has that full slice (threads_fwd:
//     N = 4096 bf16 is 256 threads of 2 x 16 bytes, not 512 of one), and bf16 packs are
//     widened from their 32-bit words (unpack), so a held pack costs 4 registers: 38-40
//     registers, 1536 resident threads per SM on sm_90, 48 KiB of loads in flight per SM
//     (96 KiB with the residual) at N = 4096;
//   * the sum of squares is reduced with warp shuffles and one shared-memory exchange
//     between warps — no atomics;
//   * dweight is reduced deterministically: a fixed grid of row blocks (a function of the
//     shape and SM count) accumulate their rows' contributions in fp32 shared memory, write
//     one partial row each, and a reduce kernel adds the partials in parallel in a fixed
//     order (per column 16 strided running sums, then a shared-memory tree);
//   * every shared-memory access goes through float_convert.cuh's lds / sts (plain
//     ld / st.shared here; tracked by the emulator's racecheck / initcheck).
// Accumulation is always fp32 whatever the storage type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

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
using cuda_convert::lds;
using cuda_convert::Pack;
using cuda_convert::sts;
using cuda_convert::to_float;

// Packs a thread loads before it uses any (its loads in flight): 2 x 16 bytes on the vector
// path, 4 elements on the scalar one. A row of up to kUnrollOf * blockDim.x packs (8192
// elements of any type at 512 threads) is held in registers between the sum of squares and
// the scaled store, so it is read from global memory once and needs no shared-memory row
// cache. (4 vectors per thread took the bf16 kernels to 100-121 registers on sm_90a, and
// spilled when held to 64.)
template <int kN>
constexpr int kUnrollOf = kN == 1 ? 4 : 2;

// Global memory: one Pack per access (16 bytes on the vector path); every 16-byte store is
// one STG.E.128 (float_convert.cuh, store16). Shared memory: lds / sts (tracked under
// emulation). The emulator rewrites the two `reinterpret_cast<...Pack...>(g...)` casts.
template <typename T, int kN>
__device__ __forceinline__ Pack<T, kN> ldg_pack(const T* gsrc) {
  return *reinterpret_cast<const Pack<T, kN>*>(gsrc);
}
template <typename T, int kN>
__device__ __forceinline__ void stg_pack(T* gdst, const Pack<T, kN>& v) {
  if constexpr (sizeof(T) * kN == 16) {
    cuda_convert::store16(gdst, v);
  } else {
    *reinterpret_cast<Pack<T, kN>*>(gdst) = v;
  }
}
// bf16 pairs are widened straight from the 32-bit words of the pack (low element: word << 16,
// high: word & 0xffff0000), so a loaded pack stays 4 registers until it is used. Element by
// element (__bfloat162float) nvcc first split every 16-byte bf16 pack into 8 registers of one
// element each (PRMT), right at the load: the forward held 16 of them across the block
// reduction and took 58 registers (fp16: 38), i.e. 2 resident 512-thread blocks per SM, not 3.
template <typename T, int kN>
__device__ __forceinline__ void unpack(const Pack<T, kN>& p, float (&dst)[kN]) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value && kN % 2 == 0) {
    uint32_t w[kN / 2];
    memcpy(w, &p, sizeof(w));
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) {
      const uint32_t lo = w[i] << 16, hi = w[i] & 0xffff0000u;
      memcpy(&dst[2 * i], &lo, 4);
      memcpy(&dst[2 * i + 1], &hi, 4);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) dst[i] = to_float(p.v[i]);
  }
}
template <typename T, int kN>
__device__ __forceinline__ Pack<T, kN> pack(const float (&src)[kN]) {
  Pack<T, kN> p;
#pragma unroll
  for (int i = 0; i < kN; ++i) p.v[i] = from_float<T>(src[i]);
  return p;
}
template <typename T, int kN>
__device__ __forceinline__ void load_pack(const T* gsrc, float (&dst)[kN]) {
  unpack<T, kN>(ldg_pack<T, kN>(gsrc), dst);
}
template <typename T, int kN>
__device__ __forceinline__ void store_pack(T* gdst, const float (&src)[kN]) {
  stg_pack<T, kN>(gdst, pack<T, kN>(src));
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
  __syncthreads();  // scratch may still be read from the previous call
  if (lane == 0) sts(scratch + warp, v);
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < nwarps; ++w) total += lds(scratch + w);  // same order in every thread
  return total;
}

// The rows a launch keeps in registers: npacks <= kUnrollOf * threads (the launcher and the
// kernel decide it the same way).
template <int kN>
__host__ __device__ __forceinline__ bool row_in_registers(int64_t npacks, int64_t threads) {
  return npacks <= kUnrollOf<kN> * threads;
}

// One row of the fused x (+ residual) load: y_or_h_src is x, or h after the residual add.
// Returns the thread's packs in storage form (h rounded to T for the fused residual) and
// adds their squares to ss. Pack u is column pack i0 + u * nt; only u < count are touched.
template <typename T, int kN, bool kResidual>
__device__ __forceinline__ void load_round(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ h,
                                           int64_t i0, int64_t nt, int count, Pack<T, kN> (&xs)[kUnrollOf<kN>],
                                           float& ss) {
  Pack<T, kN> rs[kUnrollOf<kN>];
  // Every load of the round is issued before any is used.
#pragma unroll
  for (int u = 0; u < kUnrollOf<kN>; ++u) {
    if (u < count) {
      xs[u] = ldg_pack<T, kN>(x + (i0 + u * nt) * kN);
      if constexpr (kResidual) rs[u] = ldg_pack<T, kN>(res + (i0 + u * nt) * kN);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnrollOf<kN>; ++u) {
    if (u < count) {
      float v[kN];
      unpack<T, kN>(xs[u], v);
      if constexpr (kResidual) {
        float r[kN];
        unpack<T, kN>(rs[u], r);
#pragma unroll
        for (int j = 0; j < kN; ++j) v[j] += r[j];
        // Normalise the rounded h, exactly as the unfused x + r -> rms_norm would.
        xs[u] = pack<T, kN>(v);
        stg_pack<T, kN>(h + (i0 + u * nt) * kN, xs[u]);
        unpack<T, kN>(xs[u], v);
      }
#pragma unroll
      for (int j = 0; j < kN; ++j) ss += v[j] * v[j];
    }
  }
}

// y = xs * rstd * weight for the packs of one round (weight loads issued first).
template <typename T, int kN>
__device__ __forceinline__ void store_round(const T* __restrict__ wgt, T* __restrict__ y, int64_t i0, int64_t nt,
                                            int count, const Pack<T, kN> (&xs)[kUnrollOf<kN>], float rstd) {
  Pack<T, kN> ws[kUnrollOf<kN>];
  if (wgt != nullptr) {
#pragma unroll
    for (int u = 0; u < kUnrollOf<kN>; ++u) {
      if (u < count) ws[u] = ldg_pack<T, kN>(wgt + (i0 + u * nt) * kN);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnrollOf<kN>; ++u) {
    if (u < count) {
      float v[kN];
      unpack<T, kN>(xs[u], v);
      if (wgt != nullptr) {
        float w[kN];
        unpack<T, kN>(ws[u], w);
#pragma unroll
        for (int j = 0; j < kN; ++j) v[j] = v[j] * rstd * w[j];
      } else {
#pragma unroll
        for (int j = 0; j < kN; ++j) v[j] *= rstd;
      }
      store_pack<T, kN>(y + (i0 + u * nt) * kN, v);
    }
  }
}

// One block per row (grid-stride over rows). Thread t owns packs t, t + blockDim.x, ...
//   * a row of at most kUnrollOf * blockDim.x packs (the launcher's row_in_registers: N up to
//     8192) is loaded in one round, all of the thread's loads issued
//     back to back before the first use, and kept in registers across the reduction; the
//     store pass reads only the weight;
//   * a longer row is walked in rounds of kUnrollOf packs (the same loads in flight); its
//     packs are kept in the dynamic shared-memory row cache when cache_row is set (each
//     thread revisits exactly the packs it wrote: no barrier), else the store pass re-reads
//     them from global memory (L2).
template <typename T, int kN, bool kResidual>
__global__ void __launch_bounds__(kMaxThreads)
rms_norm_fwd_kernel(const RmsNormParams p, const bool cache_row) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* row_cache = reinterpret_cast<T*>(smem_raw);
  __shared__ float scratch[kMaxThreads / kWarp];

  const int64_t npacks = p.n / kN;
  const int64_t nt = blockDim.x;
  const int64_t t = threadIdx.x;
  const bool in_regs = row_in_registers<kN>(npacks, nt);
  const T* __restrict__ wgt = static_cast<const T*>(p.weight);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* __restrict__ x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    const T* __restrict__ res = kResidual ? static_cast<const T*>(p.residual) + row * p.residual_row_stride : nullptr;
    T* __restrict__ h = kResidual ? static_cast<T*>(p.h) + row * p.h_row_stride : nullptr;
    T* __restrict__ y = static_cast<T*>(p.y) + row * p.y_row_stride;

    Pack<T, kN> xs[kUnrollOf<kN>];
    float ss = 0.f;
    if (in_regs) {
      const int count = t < npacks ? static_cast<int>((npacks - 1 - t) / nt) + 1 : 0;
      load_round<T, kN, kResidual>(x, res, h, t, nt, count, xs, ss);
      const float rstd = rsqrtf(block_sum(ss, scratch) / static_cast<float>(p.n) + p.eps);
      if (t == 0) p.rstd[row] = rstd;
      store_round<T, kN>(wgt, y, t, nt, count, xs, rstd);
    } else {
      for (int64_t i0 = t; i0 < npacks; i0 += kUnrollOf<kN> * nt) {
        const int count = static_cast<int>(std::min<int64_t>(kUnrollOf<kN>, (npacks - 1 - i0) / nt + 1));
        load_round<T, kN, kResidual>(x, res, h, i0, nt, count, xs, ss);
        if (cache_row) {
#pragma unroll
          for (int u = 0; u < kUnrollOf<kN>; ++u) {
            if (u < count) sts(reinterpret_cast<Pack<T, kN>*>(row_cache + (i0 + u * nt) * kN), xs[u]);
          }
        }
      }
      const float rstd = rsqrtf(block_sum(ss, scratch) / static_cast<float>(p.n) + p.eps);
      if (t == 0) p.rstd[row] = rstd;
      for (int64_t i0 = t; i0 < npacks; i0 += kUnrollOf<kN> * nt) {
        const int count = static_cast<int>(std::min<int64_t>(kUnrollOf<kN>, (npacks - 1 - i0) / nt + 1));
#pragma unroll
        for (int u = 0; u < kUnrollOf<kN>; ++u) {
          if (u < count) {
            const int64_t i = i0 + u * nt;
            xs[u] = cache_row ? lds(reinterpret_cast<const Pack<T, kN>*>(row_cache + i * kN))
                              : ldg_pack<T, kN>((kResidual ? h : x) + i * kN);
          }
        }
        store_round<T, kN>(wgt, y, i0, nt, count, xs, rstd);
      }
    }
  }
}

// The dweight accumulator of a row block: columns [i * kN, i * kN + kN) of pack i, in chunks
// of kAccChunk floats (one 16-byte access when kN is a multiple of 4). In global memory (this
// block's row of dweight_partial) chunk k of pack i lies at its columns; in shared memory at
// (k * npacks + i) * kAccChunk, so the lanes of one access touch consecutive 16-byte slots
// (a pack of 8 columns in column order would put them 32 bytes apart: 2-way bank conflicts).
template <int kN>
constexpr int kAccChunk = kN % 4 == 0 ? 4 : 1;
template <int kN>
__device__ __forceinline__ float* acc_smem_slot(float* acc, int64_t i, int k, int64_t npacks) {
  return acc + (k * npacks + i) * kAccChunk<kN>;
}

// Pack i's columns of the accumulator += d (set to d when `first`: the zero start). The
// shared (acc_s) and global (acc_g) bases stay separate pointers so that the compiler emits
// LDS / STS and LDG / STG rather than generic accesses.
template <int kN>
__device__ __forceinline__ void acc_add(float* acc_s, float* acc_g, bool in_smem, int64_t i, int64_t npacks,
                                        const float (&d)[kN], bool first) {
  constexpr int kC = kAccChunk<kN>;
#pragma unroll
  for (int k = 0; k < kN / kC; ++k) {
    Pack<float, kC> a;
#pragma unroll
    for (int j = 0; j < kC; ++j) a.v[j] = 0.f;
    if (in_smem) {
      float* slot = acc_smem_slot<kN>(acc_s, i, k, npacks);
      if (!first) a = lds(reinterpret_cast<const Pack<float, kC>*>(slot));
#pragma unroll
      for (int j = 0; j < kC; ++j) a.v[j] += d[k * kC + j];
      sts(reinterpret_cast<Pack<float, kC>*>(slot), a);
    } else {
      float* slot = acc_g + i * kN + k * kC;
      if (!first) a = ldg_pack<float, kC>(slot);
#pragma unroll
      for (int j = 0; j < kC; ++j) a.v[j] += d[k * kC + j];
      stg_pack<float, kC>(slot, a);
    }
  }
}

// Block b handles rows b, b + gridDim.x, ... in increasing order and accumulates its
// dweight contribution in `acc` (fp32 shared memory when it fits, else its own row of
// dweight_partial); each thread only ever touches its own columns, so no atomics and no
// barrier.
template <typename T, int kN>
__global__ void __launch_bounds__(kMaxThreads)
rms_norm_bwd_kernel(const RmsNormBwdParams p, const bool acc_in_smem) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float scratch[kMaxThreads / kWarp];
  const int64_t npacks = p.n / kN;
  const T* __restrict__ wgt = static_cast<const T*>(p.weight);
  const bool has_weight = wgt != nullptr;
  float* const acc_s = reinterpret_cast<float*>(smem_raw);
  float* const acc_g = has_weight ? p.dweight_partial + blockIdx.x * p.n : nullptr;
  if (has_weight && blockIdx.x >= p.rows) {  // a block without rows still owes its zero partial row
    const float z[kN] = {};
    for (int64_t i = threadIdx.x; i < npacks; i += blockDim.x) acc_add<kN>(acc_s, acc_g, acc_in_smem, i, npacks, z, true);
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
        float w[kN], d[kN];
        load_pack<T, kN>(wgt + i * kN, w);
#pragma unroll
        for (int j = 0; j < kN; ++j) {
          const float xhat = xv[j] * rstd;
          d[j] = g[j] * xhat;
          dot += g[j] * w[j] * xhat;
        }
        acc_add<kN>(acc_s, acc_g, acc_in_smem, i, npacks, d, row == blockIdx.x);  // the first row starts it
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
    for (int64_t i = threadIdx.x; i < npacks; i += blockDim.x) {
      constexpr int kC = kAccChunk<kN>;
#pragma unroll
      for (int k = 0; k < kN / kC; ++k) {
        stg_pack<float, kC>(acc_g + i * kN + k * kC,
                            lds(reinterpret_cast<const Pack<float, kC>*>(acc_smem_slot<kN>(acc_s, i, k, npacks))));
      }
    }
  }
}

// dweight[c] = sum over row blocks b of dweight_partial[b][c], in a fixed order whatever
// the device: a block of kReduceCols x kReduceRows threads owns kReduceCols columns; thread
// (x, y) sums rows y, y + kReduceRows, ... of its column in increasing order (a warp reads
// 32 consecutive floats of a row), then the kReduceRows sums are added as a fixed tree in
// shared memory. One block per 32 columns: N = 4096 is 128 blocks of 512 threads, each
// thread adding num_row_blocks / 16 partials (was: 16 blocks of 256 threads, each thread
// adding all num_row_blocks partials of its column one after the other).
constexpr int kReduceCols = kWarp, kReduceRows = 16;
__global__ void __launch_bounds__(kReduceCols * kReduceRows)
rms_norm_dweight_reduce_kernel(const float* __restrict__ partial, float* __restrict__ dweight, int64_t num_blocks,
                               int64_t n) {
  __shared__ float sums[kReduceCols * kReduceRows];
  const int tx = threadIdx.x % kReduceCols, ty = threadIdx.x / kReduceCols;
  const int64_t c = blockIdx.x * static_cast<int64_t>(kReduceCols) + tx;
  float s = 0.f;
  if (c < n) {
#pragma unroll 4
    for (int64_t b = ty; b < num_blocks; b += kReduceRows) s += partial[b * n + c];
  }
  sts(sums + threadIdx.x, s);
#pragma unroll
  for (int half = kReduceRows / 2; half > 0; half /= 2) {
    __syncthreads();
    if (ty < half) sts(sums + threadIdx.x, lds(sums + threadIdx.x) + lds(sums + threadIdx.x + half * kReduceCols));
  }
  if (ty == 0 && c < n) dweight[c] = lds(sums + tx);
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

// Forward block size: the fewest whole warps that hold the row at kUnrollOf packs per thread,
// 32..512 threads. So every thread of a row up to kUnrollOf * 512 packs has its full kUnrollOf
// loads in flight (2 x 16 bytes on the vector path; 2 + 2 with the residual), and a short row
// is a small block (more resident blocks per SM) rather than a big block of half-idle threads.
// (Was threads_for, one thread per pack: at N = 4096 bf16/fp16 512 threads of ONE 16-byte
// load each for the plain forward -- half the bytes in flight of the residual forward.)
template <int kN>
int threads_fwd(int64_t npacks) {
  return threads_for((npacks + kUnrollOf<kN> - 1) / kUnrollOf<kN>);
}

template <typename T, int kN, bool kResidual>
cudaError_t launch_fwd(const RmsNormParams& p, cudaStream_t stream) {
  auto kernel = rms_norm_fwd_kernel<T, kN, kResidual>;
  const int64_t npacks = p.n / kN;
  const int threads = threads_fwd<kN>(npacks);
  // A row held in registers needs no row cache (and no shared memory limits occupancy).
  bool cache = !row_in_registers<kN>(npacks, threads);
  size_t smem = cache ? static_cast<size_t>(p.n) * sizeof(T) : 0;
  if (cache) FASTATTN_CUDA_TRY(request_smem(kernel, smem, &cache));
  if (!cache) smem = 0;
  // Rows beyond the grid limit are covered by the grid-stride loop.
  const int64_t grid = std::min<int64_t>(p.rows, 2147483647);
  kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(p, cache);
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
    const int64_t blocks = (p.n + kReduceCols - 1) / kReduceCols;
    rms_norm_dweight_reduce_kernel<<<static_cast<unsigned>(blocks), kReduceCols * kReduceRows, 0, stream>>>(
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
