// flash_bwd.cu — FlashAttention backward (FlashAttention-2 class, recompute), fp16/bf16,
// head dims 64 and 128, causal (bottom-right) / sliding window / GQA / MQA, any Sq, Sk.
//
// What it computes (all in fp32, gradients stored in the input dtype):
//   delta_i = sum_d dO[i][d] * O[i][d]                                (flash_bwd_delta_kernel)
//   P = exp(scale * Q K^T - lse)   recomputed from the forward's lse, masked as the forward
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dK = scale * dS^T Q,  dQ = scale * dS K
//
// Three kernels (four with a GQA split), one stream, no atomics:
//   1. flash_bwd_delta_kernel: one row of (b, h, seqlen_q) per D/8 lanes, 16-byte loads of O
//      and dO, shuffle reduction; writes params.delta.
//   2. flash_bwd_dkdv_kernel: one thread block per (key tile of kBlockN = 128 rows, kv head,
//      batch), 8 warps, warp w owning key rows [16w, 16w + 16). K and V tiles stay in shared
//      memory; the block loops over every query head of the kv head's group (GQA/MQA: the
//      group's gradients are summed in registers, K/V are never repeated) and, per head, over
//      the query tiles of kBlockM rows that can see the key tile (tiles wholly masked by
//      causal / window are never visited). When that grid is too small to fill the GPU (few
//      kv heads, small batch, short keys; see dkdv_num_splits, a function of the shape only)
//      the group's heads are split over several blocks that write fp32 partial dK/dV to
//      params.workspace, and flash_bwd_dkdv_reduce_kernel adds them in split order and
//      converts (flash_bwd_cuda_workspace_floats is 0 whenever no split is needed; with no
//      workspace passed the launcher falls back to one block per group). Q and dO tiles
//      (plus their lse and delta) are double-buffered with cp.async, so the next tile's load
//      overlaps this tile's math.
//      Per query tile each warp computes, on tensor cores (mma.sync m16n8k16, fp32 acc):
//        S^T = K_w Q^T -> P^T = exp2(S^T * scale*log2e - lse*log2e)  (masked only on tiles
//        that need it) -> dV_w += P^T dO -> dP^T = V_w dO^T -> dS^T = P^T (dP^T - delta)
//        -> dK_w += dS^T Q.
//      Computing the transposed scores directly (rows = keys) makes P^T and dS^T land in
//      the accumulator layout of the warp's own key rows, which is exactly the A-operand
//      layout of the dV / dK mmas (see flash_bwd_layout.cuh): no shared-memory round trip,
//      no transpose. Q and dO are read as B operands with ldmatrix (S^T, dP^T) and
//      ldmatrix.trans (dV, dK) from the same swizzled tiles.
//   3. flash_bwd_dq_kernel: one thread block per (query tile of 64 rows, head, batch), 4 warps,
//      looping over the visible key tiles (K, V double-buffered with cp.async), recomputing
//      S = Q K^T, P, dP = dO V^T and dS, and accumulating dQ += dS K in registers (dS feeds
//      the mma straight from its accumulators; K is the B operand via ldmatrix.trans).
//
// Determinism and its cost: dQ is reduced over key tiles inside one thread block in a fixed
// order, dK/dV over query heads and query tiles likewise (and over GQA splits in split
// order; the split count depends on the shape only, never on the device), so every gradient
// is bitwise reproducible run to run. params.deterministic is honoured trivially: there is
// no non-deterministic path. The price is the separate dQ pass, which recomputes S = Q K^T and
// dP = dO V^T: 7 tile GEMMs instead of the 5 of an atomic-add dQ, i.e. ~1.4x the backward's
// tensor-core FLOPs, in exchange for no fp32 dQ workspace, no atomics and no convert pass.
//
// Why it is fast: all five GEMM shapes run on mma.sync with ldmatrix-fed operands from an
// XOR-swizzled (bank-conflict free) shared-memory layout; every global load of Q/K/V/dO is a
// 16-byte cp.async issued one tile ahead; P and dS are never written to memory; softmax uses
// exp2 with scale * log2(e) folded into one FMA; masking code only runs on tiles that
// straddle a mask boundary or a sequence tail. Tile sizes keep the fp32 accumulators of a
// warp (dK + dV: 2 x 16 x D, S^T and dP^T: 2 x 16 x kBlockM) in registers without spills.
//
// Verification (no GPU was available while writing this): tests/test_flash_bwd_layout.py
// checks every index function (flash_bwd_layout.cuh) against the PTX ISA's fragment layouts
// and a numpy model of the tile loops; tests/test_flash_bwd_emulated.py compiles the kernels
// themselves (flash_bwd_kernels.cuh) and this file's launcher (flash_bwd_launch.cuh) for the
// CPU with emulated ldmatrix / mma.sync / cp.async / barriers, under the memcheck / racecheck /
// initcheck analogues of tests/fiber_emulate.h, and compares dq, dk, dv with float64 gradients.
//
// Variable-length (packed) batches (FlashFwdParams::cu_seqlens_q non-null), flash-attn 2
// style with no padding copies: the dK/dV grid spans ceil(max_seqlen_k / kBlockN) key tiles x
// kv heads x sequences and the dQ grid ceil(max_seqlen_q / kBlockM) query tiles x heads x
// sequences; each block reads its sequence's row ranges from cu_seqlens once (block_seq,
// clamped so any cu_seqlens content stays in bounds), leaves at once if its tile lies past
// the sequence's end, and otherwise runs the dense code with the sequence's own lengths
// (masking, tile ranges, row tails) and row-0 pointers. delta and lse are (h, total_q); the
// delta kernel needs no sequence boundaries at all. A runtime branch in the block prologue,
// not a template flag: no new instantiations, and the inner loops are shared code.
//
// Logit soft-capping (FlashFwdParams::softcap > 0): the forward's capped scores
// c = softcap * tanh(s / softcap) are recomputed (softcap.cuh: the same tanh, so P
// matches the forward's lse), and dS = P * (dP - delta) * (1 - tanh^2) is the gradient of the
// uncapped score s, from which dQ, dK follow as before. Template twins of the dK/dV and dQ
// kernels (8 more kernels; delta and the split reduce do not depend on the scores).
//
// Requirements (checked, cudaErrorInvalidValue otherwise): q, k, v, out, dout 16-byte
// aligned with batch/row/head strides multiple of 8 elements; dq, dk, dv 4-byte aligned with
// even strides; lse (b, h, seqlen_q) and delta (b, h, seqlen_q) contiguous fp32 (varlen: both
// (h, total_q); cu_seqlens 4-byte aligned, totals below 2^31).
#include <cuda_runtime.h>

#include <cstdint>

#include "fastattn/api.h"
#include "fastattn/params.h"
#include "flash_bwd_launch.cuh"  // the launcher (kSoftcap / dtype / head-dim dispatch, grids, smem)

namespace fastattn {

bool flash_bwd_cuda_supports_head_dim(int64_t d) { return flash_bwd_head_dim_ok(d); }

int64_t flash_bwd_cuda_workspace_floats(const FlashBwdParams& params) {
  return bwd_workspace_floats(params);
}

cudaError_t flash_bwd_cuda(const FlashBwdParams& params, cudaStream_t stream) {
  return bwd_run(params, stream);
}

}  // namespace fastattn
