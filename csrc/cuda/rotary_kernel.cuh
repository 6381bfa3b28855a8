// rotary_kernel.cuh — the rotary kernel, its launch geometry and its dispatch, shared by
// the launcher (rotary.cu) and by the host emulation that tests the kernel's indexing on the
// CPU (tests/rotary_emulate.cpp, which defines FASTATTN_ROTARY_EMULATE and supplies host
// versions of the few CUDA names used here). See rotary.cu for what the kernel computes and
// why it is shaped this way.
#pragma once

#if !defined(FASTATTN_ROTARY_EMULATE)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// Dynamic shared memory of the kernel, as an array of float.
#define FASTATTN_ROTARY_SMEM(name) extern __shared__ __align__(16) float name[]
// The emulation checks that every vector access is 16-byte aligned; on the GPU a
// misaligned one would fault, which the launcher's can_vectorize rules out.
#define FASTATTN_ROTARY_CHECK_ALIGNED(ptr) ((void)0)
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fastattn/params.h"
#include "fastattn/static_switch.h"
#include "float_convert.cuh"

namespace fastattn {
namespace rotary_detail {

constexpr int kBlockThreads = 256;
constexpr int kMinBlocks = 4;  // ptxas keeps <= 64 registers a thread (74 on sm_80 without it)

using cuda_convert::bits_of;
using cuda_convert::from_float;
using cuda_convert::to_float;

// kN consecutive elements as loaded. The vector path keeps the 16 bytes as the four 32-bit
// words the LDG.E.128 wrote, untouched until the rotation reads them: nothing consumes a load
// before every load of the thread's heads has been issued (an array of kN 16-bit elements
// was split into one register per element right after each load, and that unpacking waited
// for the load, so the second head's loads only went out once the first head's had come
// back). The scalar path holds fp32 (sub-word arrays would go to local memory).
template <typename T, int kN, bool kVec>
struct Raw {
  float v[kN];
  __device__ __forceinline__ float get(int i) const { return v[i]; }
};

template <typename T, int kN>
struct Raw<T, kN, true> {
  static_assert(sizeof(T) * kN == 16, "a vector is 16 bytes");
  uint32_t w[4];
  __device__ __forceinline__ float get(int i) const {
    if constexpr (sizeof(T) == 4) {
      float f;
      memcpy(&f, &w[i], 4);
      return f;
    } else {
      const uint16_t u = static_cast<uint16_t>(w[i / 2] >> (16 * (i % 2)));
      T x;
      memcpy(&x, &u, 2);
      return to_float(x);
    }
  }
};

struct alignas(16) Words16 {
  uint32_t w[4];
};

// One aligned vector access when kVec, else kN scalar accesses (the launcher picks kVec
// only when every address is 16-byte aligned).
template <typename T, int kN, bool kVec>
__device__ __forceinline__ void load_raw(const T* src, Raw<T, kN, kVec>& dst) {
  if constexpr (kVec) {
    FASTATTN_ROTARY_CHECK_ALIGNED(src);
    const Words16 p = *reinterpret_cast<const Words16*>(src);
#pragma unroll
    for (int i = 0; i < 4; ++i) dst.w[i] = p.w[i];
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) dst.v[i] = to_float(src[i]);
  }
}

// The raw elements back out unchanged (the tail copy).
template <typename T, int kN, bool kVec>
__device__ __forceinline__ void store_raw(T* dst, const Raw<T, kN, kVec>& src) {
  if constexpr (kVec) {
    // One STG.E.128 of four 32-bit words (float_convert.cuh's FASTATTN_STORE16); a 16-byte
    // C++ store of `out + half + i0` compiled to 8 x STG.E.U16 for fp16 / bf16.
    FASTATTN_ROTARY_CHECK_ALIGNED(dst);
    FASTATTN_STORE16(dst, src.w[0], src.w[1], src.w[2], src.w[3]);
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) dst[i] = from_float<T>(src.v[i]);
  }
}

// kN fp32 results rounded to T and stored: one STG.E.128 when kVec (two 16-bit elements per
// word, the lower address in the low half), else kN scalar stores.
template <typename T, int kN, bool kVec>
__device__ __forceinline__ void store_floats(T* dst, const float (&y)[kN]) {
  if constexpr (kVec) {
    static_assert(sizeof(T) * kN == 16, "a vector is 16 bytes");
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (sizeof(T) == 4) {
        w[i] = bits_of(y[i]);
      } else {
        w[i] = bits_of(from_float<T>(y[2 * i])) | (bits_of(from_float<T>(y[2 * i + 1])) << 16);
      }
    }
    FASTATTN_ROTARY_CHECK_ALIGNED(dst);
    FASTATTN_STORE16(dst, w[0], w[1], w[2], w[3]);
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) dst[i] = from_float<T>(y[i]);
  }
}

// Elements per access: a 16-byte vector, or for the scalar path the smallest unit that
// holds whole pairs of the layout (1 element for NeoX, whose pair partner is R/2 away; 2
// for GPT-J).
template <typename T, bool kInterleaved, bool kVec>
struct Shape {
  static constexpr int kElems = kVec ? static_cast<int>(16 / sizeof(T)) : (kInterleaved ? 2 : 1);
  static constexpr int kPairs = kInterleaved ? kElems / 2 : kElems;  // pairs per access
  // Heads of an item: one thread loads them all before it converts and stores any. On the
  // vector path 64 bytes in flight a thread: NeoX's x1 and x2 vectors of 2 heads, GPT-J's one
  // vector of 4 heads.
  static constexpr int kHeads = kVec && kInterleaved ? 4 : 2;
};

// Head row `hd` of token (bi, si): q's heads first, then k's. Recomputed from the params
// (constant memory) rather than kept live across the loop, which keeps registers low.
template <typename T>
__device__ __forceinline__ void head_rows(const RotaryParams& p, int64_t bi, int64_t si, int64_t hd,
                                          const T*& in, T*& out) {
  if (hd < p.h) {
    in = static_cast<const T*>(p.q) + bi * p.q_batch_stride + si * p.q_row_stride + hd * p.q_head_stride;
    out = static_cast<T*>(p.q_out) + bi * p.q_out_batch_stride + si * p.q_out_row_stride + hd * p.q_out_head_stride;
  } else {
    hd -= p.h;
    in = static_cast<const T*>(p.k) + bi * p.k_batch_stride + si * p.k_row_stride + hd * p.k_head_stride;
    out = static_cast<T*>(p.k_out) + bi * p.k_out_batch_stride + si * p.k_out_row_stride + hd * p.k_out_head_stride;
  }
}

// One work item of a thread: pair group i0 of heads hd0 .. hd0 + kHeads - 1, as loaded.
template <typename T, bool kInterleaved, bool kVec>
struct Item {
  using S = Shape<T, kInterleaved, kVec>;
  Raw<T, S::kElems, kVec> a[S::kHeads], b[kInterleaved ? 1 : S::kHeads];  // b: NeoX's x2
  T* out[S::kHeads];
};

// Issues every load of an item back to back, with no branch between them: a head index past
// the last head re-reads the last head's row (in bounds; never stored).
template <typename T, bool kInterleaved, bool kVec>
__device__ __forceinline__ void load_item(const RotaryParams& p, int64_t bi, int64_t si, int64_t hd0, int64_t heads,
                                          int64_t i0, int64_t half, Item<T, kInterleaved, kVec>& it) {
  using S = Shape<T, kInterleaved, kVec>;
  constexpr int kElems = S::kElems;
#pragma unroll
  for (int u = 0; u < S::kHeads; ++u) {
    const int64_t hd = hd0 + u < heads ? hd0 + u : heads - 1;
    const T* in;
    head_rows<T>(p, bi, si, hd, in, it.out[u]);
    if constexpr (kInterleaved) {
      load_raw<T, kElems, kVec>(in + 2 * i0, it.a[u]);
    } else {
      load_raw<T, kElems, kVec>(in + i0, it.a[u]);
      load_raw<T, kElems, kVec>(in + half + i0, it.b[u]);
    }
  }
}

// Rotates the item's heads by the angles of pairs i0 .. i0 + kPairs - 1 (shared memory) and
// stores them.
template <typename T, bool kInterleaved, bool kVec>
__device__ __forceinline__ void rotate_store(const Item<T, kInterleaved, kVec>& it, int64_t hd0, int64_t heads,
                                             int64_t i0, int64_t half, const float* cos_s, const float* sin_s) {
  using S = Shape<T, kInterleaved, kVec>;
  constexpr int kElems = S::kElems;
  constexpr int kPairs = S::kPairs;
#pragma unroll
  for (int u = 0; u < S::kHeads; ++u) {
    if (hd0 + u >= heads) continue;
    float ya[kElems], yb[kElems];  // yb unused for GPT-J
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const float c = cuda_convert::lds(cos_s + i0 + j), s = cuda_convert::lds(sin_s + i0 + j);
      if constexpr (kInterleaved) {
        const float x1 = it.a[u].get(2 * j), x2 = it.a[u].get(2 * j + 1);
        ya[2 * j] = x1 * c - x2 * s;
        ya[2 * j + 1] = x2 * c + x1 * s;
      } else {
        const float x1 = it.a[u].get(j), x2 = it.b[u].get(j);
        ya[j] = x1 * c - x2 * s;
        yb[j] = x2 * c + x1 * s;
      }
    }
    if constexpr (kInterleaved) {
      store_floats<T, kElems, kVec>(it.out[u] + 2 * i0, ya);
    } else {
      store_floats<T, kElems, kVec>(it.out[u] + i0, ya);
      store_floats<T, kElems, kVec>(it.out[u] + half + i0, yb);
    }
  }
}

// Dynamic shared memory: the token's cos (R/2 floats) then sin (R/2 floats, negated for
// the conjugate; NaN for an out-of-range position).
//
// Per token, on the vector path, a thread first issues the q/k loads of its first item (with
// the launch shape's block, its only item unless the heads need more than one round), and
// only then reads the position and the token's angles and waits at the barriers: the DRAM
// round trip of q/k and the position -> cos/sin -> barrier chain overlap (a barrier does not
// wait for a thread's outstanding global loads; nothing before the second barrier waits on
// the q/k loads' scoreboard, checked in the SASS), so a block costs one DRAM latency, not two
// or more in a row. The scalar path, the fallback for layouts no 16-byte vector fits, loads
// after the barriers (one copy of its load code).
template <typename T, bool kInterleaved, bool kVec>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocks) rotary_kernel(const RotaryParams p) {
  using S = Shape<T, kInterleaved, kVec>;
  constexpr int kElems = S::kElems;
  constexpr int kPairs = S::kPairs;
  FASTATTN_ROTARY_SMEM(angles);
  const int64_t half = p.rotary_dim / 2;
  float* cos_s = angles;
  float* sin_s = angles + half;
  const int64_t groups = half / kPairs;  // exact: the launcher checks divisibility
  const int64_t heads = p.h + p.h_k;
  const int64_t tokens = p.b * p.seqlen;
  const float sign = p.conjugate ? -1.0f : 1.0f;
  const int lane = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  const bool copy_tail = p.d > p.rotary_dim && (p.q_out != p.q || p.k_out != p.k);
  const int64_t g_first = threadIdx.x, hd_first = threadIdx.y * S::kHeads;
  constexpr bool kPrefetch = kVec;
  const bool prefetch = kPrefetch && g_first < groups && hd_first < heads;

  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t bi = t / p.seqlen, si = t - bi * p.seqlen;

    // This thread's first item: its loads go out before anything below waits.
    Item<T, kInterleaved, kVec> it;
    if (prefetch) load_item<T, kInterleaved, kVec>(p, bi, si, hd_first, heads, g_first * kPairs, half, it);

    // The position. `valid` is computed in each branch: with one int64 `pos` merged from both
    // loads and checked after the merge, ptxas put the int64 load on the q/k loads' scoreboard,
    // and the check waited for the q/k data.
    int64_t pos = si;
    bool valid = si < p.max_pos;
    if (p.positions != nullptr) {
      const int64_t idx = bi * p.positions_batch_stride + si;
      if (p.positions_int64) {
        pos = __ldg(static_cast<const int64_t*>(p.positions) + idx);
        valid = pos >= 0 && pos < p.max_pos;
      } else {
        pos = __ldg(static_cast<const int32_t*>(p.positions) + idx);
        valid = pos >= 0 && pos < p.max_pos;
      }
    }

    // The token's angles, read once from the (L2-resident) tables for all its heads.
    __syncthreads();  // the previous token's readers are done
    for (int64_t i = lane; i < half; i += nthreads) {
      cuda_convert::sts(cos_s + i, valid ? __ldg(p.cos + pos * half + i) : __int_as_float(0x7fc00000));
      cuda_convert::sts(sin_s + i, valid ? sign * __ldg(p.sin + pos * half + i) : __int_as_float(0x7fc00000));
    }
    __syncthreads();

    // The prefetched first item, then any further ones (heads beyond one round, or more pair
    // groups than threads along x), each loaded and rotated in turn.
    const int64_t hd_step = blockDim.y * S::kHeads;
    if (prefetch) rotate_store<T, kInterleaved, kVec>(it, hd_first, heads, g_first * kPairs, half, cos_s, sin_s);
    for (int64_t g = g_first; g < groups; g += blockDim.x) {
      for (int64_t hd0 = kPrefetch && g == g_first ? hd_first + hd_step : hd_first; hd0 < heads; hd0 += hd_step) {
        load_item<T, kInterleaved, kVec>(p, bi, si, hd0, heads, g * kPairs, half, it);
        rotate_store<T, kInterleaved, kVec>(it, hd0, heads, g * kPairs, half, cos_s, sin_s);
      }
    }

    if (copy_tail) {
      // Dims R..D of every head: 16-byte vectors on the vector path (R and D are multiples
      // of the vector width there), single elements otherwise.
      constexpr int kTailElems = kVec ? kElems : 1;
      const int64_t tail_units = (p.d - p.rotary_dim) / kTailElems;
      for (int64_t u = lane; u < heads * tail_units; u += nthreads) {
        const int64_t hd = u / tail_units;
        const int64_t off = p.rotary_dim + (u - hd * tail_units) * kTailElems;
        const T* in;
        T* out;
        head_rows<T>(p, bi, si, hd, in, out);
        Raw<T, kTailElems, kVec> v;
        load_raw<T, kTailElems, kVec>(in + off, v);
        store_raw<T, kTailElems, kVec>(out + off, v);
      }
    }
  }
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) % 16) == 0; }

// True when every q/k access of the kernel can be a 16-byte vector.
template <typename T>
bool can_vectorize(const RotaryParams& p) {
  constexpr int64_t kVecElems = 16 / sizeof(T);
  const int64_t half = p.rotary_dim / 2;
  const bool dims_ok = (p.interleaved ? p.rotary_dim % kVecElems == 0 : half % kVecElems == 0) &&
                       p.d % kVecElems == 0;
  const int64_t strides[] = {p.q_batch_stride,     p.q_row_stride,     p.q_head_stride,
                             p.k_batch_stride,     p.k_row_stride,     p.k_head_stride,
                             p.q_out_batch_stride, p.q_out_row_stride, p.q_out_head_stride,
                             p.k_out_batch_stride, p.k_out_row_stride, p.k_out_head_stride};
  bool strides_ok = true;
  for (int64_t s : strides) strides_ok = strides_ok && s % kVecElems == 0;
  return dims_ok && strides_ok && aligned16(p.q) && aligned16(p.k) && aligned16(p.q_out) && aligned16(p.k_out);
}

// Block and grid of a launch: x walks pair groups of one head row (a warp at most), y walks
// items of kHeads heads, as many as fill the block (256 threads: one round up to 64 q + k
// heads for fp16 / bf16 at D = 128, so every q/k load of a token is a prefetch), evened out
// so the last round over the heads is not mostly idle, in whole warps; one block per token
// up to max_grid (the kernel grid-strides beyond it). E.g. bf16 NeoX, D = 128, 32 + 8 heads:
// 8 x 20 threads, one round, the token's 10 KB of q/k in flight at once (64 registers:
// 6 blocks, 60 KB a SM, on an sm_90); GPT-J: 16 x 10 threads.
struct LaunchShape {
  int64_t bdx, bdy, grid;
  size_t smem_bytes;
};

template <typename T, bool kInterleaved, bool kVec>
LaunchShape launch_shape(const RotaryParams& p, int64_t max_grid) {
  using S = Shape<T, kInterleaved, kVec>;
  const int64_t groups = (p.rotary_dim / 2) / S::kPairs;
  const int64_t head_units = (p.h + p.h_k + S::kHeads - 1) / S::kHeads;
  LaunchShape r;
  r.bdx = std::max<int64_t>(1, std::min<int64_t>(groups, 32));
  const int64_t max_bdy = std::max<int64_t>(1, kBlockThreads / r.bdx);
  const int64_t rounds = (head_units + max_bdy - 1) / max_bdy;
  r.bdy = std::max<int64_t>(1, (head_units + rounds - 1) / rounds);
  // Whole warps (when bdx divides 32): 80 threads would take 3 warps of slots for 2.5.
  const int64_t warp_rows = std::max<int64_t>(1, 32 / r.bdx);
  r.bdy = std::min<int64_t>(max_bdy, (r.bdy + warp_rows - 1) / warp_rows * warp_rows);
  r.grid = std::max<int64_t>(1, std::min<int64_t>(p.b * p.seqlen, max_grid));
  r.smem_bytes = static_cast<size_t>(p.rotary_dim) * sizeof(float);
  return r;
}

// The one place that maps a problem to a kernel instantiation: launch(kernel, shape) is
// called with the kernel for (T, layout, vector or scalar path) and its geometry.
template <typename T, typename Launch>
auto dispatch(const RotaryParams& p, int64_t max_grid, Launch&& launch) {
  const bool vec = can_vectorize<T>(p);
  return BOOL_SWITCH(p.interleaved, kInterleaved, [&] {
    return vec ? launch(rotary_kernel<T, kInterleaved, true>, launch_shape<T, kInterleaved, true>(p, max_grid))
               : launch(rotary_kernel<T, kInterleaved, false>, launch_shape<T, kInterleaved, false>(p, max_grid));
  });
}

}  // namespace rotary_detail
}  // namespace fastattn
