// rotary.cu — rotary position embedding of q and k in one launch, in place or out of place.
//
// What it computes: for every token (b, s) with position p = positions[b, s] (default s),
// every head row x of q (b, s, :, :) and of k (b, s, :, :) is rotated pairwise by the
// angles whose cos/sin are table[p][i], i < R/2, in fp32:
//   NeoX/LLaMA halves (i, i + R/2) or GPT-J pairs (2i, 2i + 1):
//   x1' = x1 c - x2 s,  x2' = x2 c + x1 s      (s negated when conjugate: the backward)
// Dims R..D pass through (copied when out of place). A token whose position is outside the
// tables gets NaN in its rotated dims; the kernel never reads outside the tables.
//
// Why it is fast: RoPE is a pure stream (6 flops per pair), so the kernel is shaped to read
// and write every byte of q and k exactly once, at full width, and nothing else:
//   * one thread block per token (grid-stride beyond the grid limit), covering q's H and
//     k's Hk heads together, so q and k cost one launch;
//   * the token's cos/sin row (fp32, R/2 each, from L2-resident tables) is read once into
//     shared memory by the block, sign-flipped there for the conjugate, and reused for all
//     H + Hk heads; threadIdx.x walks groups of pairs along the rotary dim, threadIdx.y
//     walks heads;
//   * every access to q/k is a 16-byte vector (8 x fp16/bf16 or 4 x fp32) whenever the
//     pointers, strides and R, D allow it: for NeoX a thread's x1 and x2 are two such
//     vectors R/2 apart, for GPT-J one vector holds whole pairs; every vector store is one
//     STG.E.128 (float_convert.cuh's FASTATTN_STORE16, st.global.v4.b32 — a plain 16-byte
//     C++ store of `out + half + i0` compiled to 8 x STG.E.U16). A scalar instantiation with
//     the same arithmetic handles every other layout correctly;
//   * each thread issues the loads of two heads (four for GPT-J vectors) before converting
//     or storing any, and keeps each 16-byte vector as the four 32-bit words the load wrote
//     until the rotation reads them (an array of 16-bit elements was unpacked right after
//     each load, which made the second head's loads wait for the first head's data), so a
//     thread has 64 bytes in flight at <= 64 registers (__launch_bounds__(256, 4));
//   * on the vector path those loads are issued before the token's position and angles are
//     read and before the block's barriers (a barrier does not wait for them), so the DRAM
//     round trip of q/k overlaps the position -> cos/sin -> barrier chain: one DRAM latency
//     a block instead of the angles' L2 round trip plus one DRAM round trip per head and
//     round of heads;
//   * strided q/k (views into a packed qkv projection) are read where they lie; only the
//     last dim must be contiguous.
// Blocks are at most 256 threads, one token each, enough for all of a token's heads in one
// round up to 64 q + k heads for fp16 / bf16 NeoX at D = 128 (32 + 8 heads: 160 threads, the
// token's 10 KB of q/k in flight at once; 6 such blocks on an sm_90 SM by registers, 60 KB,
// above the ~36 KB Little's law asks of an SM at H200 bandwidth). A 16k-token problem is
// ~16k blocks, ~20 waves over the SMs.
// The kernel itself lives in rotary_kernel.cuh, shared with the host emulation that tests
// its indexing on the CPU (tests/rotary_emulate.cpp).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fastattn/api.h"
#include "fastattn/cuda_check.h"
#include "fastattn/params.h"
#include "fastattn/static_switch.h"
#include "rotary_kernel.cuh"

namespace fastattn {

cudaError_t rotary_cuda(const RotaryParams& params, cudaStream_t stream) {
  if (params.b * params.seqlen <= 0 || params.h + params.h_k <= 0) return cudaSuccess;
  if (params.rotary_dim <= 0 || params.rotary_dim % 2 != 0 || params.rotary_dim > params.d ||
      params.rotary_dim > kRotaryMaxRotaryDimCuda || params.max_pos <= 0 || params.cos == nullptr ||
      params.sin == nullptr)
    return cudaErrorInvalidValue;
  return FASTATTN_DTYPE_SWITCH(params.dtype, T, __half, __nv_bfloat16, [&] {
    return rotary_detail::dispatch<T>(params, 2147483647, [&](auto kernel, const rotary_detail::LaunchShape& s) {
      kernel<<<static_cast<unsigned>(s.grid), dim3(static_cast<unsigned>(s.bdx), static_cast<unsigned>(s.bdy)),
               s.smem_bytes, stream>>>(params);
      FASTATTN_CUDA_LAUNCH_CHECK();
      return cudaSuccess;
    });
  });
}

}  // namespace fastattn
