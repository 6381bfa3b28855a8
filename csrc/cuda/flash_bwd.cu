// flash_bwd.cu — FlashAttention backward (FlashAttention-2 class, recompute), fp16/bf16,
// head dims 32, 64, 96, 128, 192, 256, causal (bottom-right) / sliding window / GQA / MQA, any
// Sq, Sk. This file is the head-dim switch; the kernels of head dim D are instantiated in
// flash_bwd_hdim<D>.cu (12 each: delta, dK/dV and dQ plain + soft-capped, split reduce, x fp16 /
// bf16; 72 per arch), so a parallel build compiles the six files side by side.
//
// What it computes (all in fp32, gradients stored in the input dtype):
//   delta_i = sum_d dO[i][d] * O[i][d]                                (flash_bwd_delta_kernel)
//   P = exp(scale * Q K^T - lse)   recomputed from the forward's lse, masked as the forward
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dK = scale * dS^T Q,  dQ = scale * dS K
//
// Three kernels (four with a GQA split), one stream, no atomics:
//   1. flash_bwd_delta_kernel: one row of (b, h, seqlen_q) per D/8 lanes, 16-byte loads of O
//      and dO, shuffle reduction; writes params.delta.
//   2. flash_bwd_dkdv_kernel: one thread block per (key tile of kBlockN rows, kv head, batch),
//      8 warps, each owning 16 key rows (and at d192 / d256 half of their dK / dV columns, see
//      "Tiles" below). K and V tiles stay in shared
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
//   3. flash_bwd_dq_kernel: one thread block per (query tile of 64 rows, head, batch), 4 warps
//      (8 at d256: two per 16 query rows, each owning half of the dQ columns),
//      looping over the visible key tiles (K, V double-buffered with cp.async), recomputing
//      S = Q K^T, P, dP = dO V^T and dS, and accumulating dQ += dS K in registers (dS feeds
//      the mma straight from its accumulators; K is the B operand via ldmatrix.trans).
//
// dQ accumulation and determinism: dQ of a query tile is owned by ONE thread block (the dQ
// kernel), which accumulates dS K over the visible key tiles in registers, in ascending key-
// tile order, and stores it once (scaled, converted): no atomics, no fp32 dQ workspace, no
// convert pass. dK/dV are reduced over query heads and query tiles inside one block likewise
// (and over GQA splits in split order by the reduce kernel; the split count depends on the
// shape only, never on the device). Every sum therefore has a fixed order, and every gradient
// is bitwise reproducible run to run (nothing here depends on scheduling: no atomics, no
// shared-memory reductions across warps, cp.async only moves inputs). params.deterministic is
// honoured trivially: there is no non-deterministic path.
//
// Why not FlashAttention-2's single-pass 5-GEMM structure (S, dP, dV, dK and dQ in the dK/dV
// kernel, dQ added with fp32 atomics)? It saves the dQ pass's recompute of S and dP: 2 of our
// 7 tile GEMMs (d128 SASS, sm_90a: the dQ kernel's main loop has, per warp and 64-key tile,
// 192 HMMA, 64 each for S, dP and dQ, and 112 LDSM), i.e. the 5-GEMM backward does ~0.71x our
// tensor-core FLOPs. What it costs in this design: dQ = dS K needs dS of all 128 keys of a
// block (it is split over 8 warps' registers here), so dS goes through shared memory (d128,
// 32-query tiles: 8 KB stored + 8 KB read back by ldmatrix per query tile, on top of today's
// 16 KB of Q + dO ldmatrix per warp) and a block-wide barrier; then 32 x 128 fp32 partial dQ
// = 16 KB of red.global.add per (key block, query tile), 4096 atomics (16 per thread), whose
// summation order depends on which key block arrives first: dQ is no longer reproducible
// (FlashAttention-2's deterministic mode serialises the blocks of a query tile with a
// semaphore instead, giving back much of the gain), plus the fp32 dQ workspace and a convert
// kernel. Our dQ blocks exchange nothing with other blocks, and at d192 / d256 the register
// budget is the binding limit (below): a dQ product and its operand staging in the dK/dV
// kernel would force still smaller tiles there.
// With no GPU to measure whether L2 atomic throughput or the 2 recomputed GEMMs dominate, and
// with determinism a contract of the API, the split design stays; the single pass is a GPU-
// measured follow-up, not a clear win on paper.
//
// Tiles (registers are the limit: a warp keeps fp32 accumulators for 16 rows x its columns;
// 0 spills on sm_80 and sm_90a is required and checked by scripts/cuda_check.sh). Per thread:
// dK + dV kDn/2 floats each (kDn = D / column split), S^T and dP^T kBlockM/2 each; dQ kDn/2,
// S and dP kBlockN/2 each. Shared memory per block (dK/dV: K, V [kBlockN][D] + double-buffered
// Q, dO [kBlockM][D] + lse / delta; dQ: Q, dO [64][D] + double-buffered K, V [kBlockN][D]):
//     D   dK/dV kBlockN x kBlockM, split  smem       dQ 64 x kBlockN, split  smem
//    32       128 x 64, 1                33 KiB      64 x 64, 1              24 KiB
//    64       128 x 64, 1                65 KiB      64 x 64, 1              48 KiB
//    96       128 x 32, 1                72.5 KiB    64 x 64, 1              72 KiB
//   128       128 x 32, 1                96.5 KiB    64 x 64, 1              96 KiB
//   192        64 x 32, 2                96.5 KiB    64 x 16, 1              72 KiB
//   256        64 x 16, 2                96.25 KiB   64 x 32, 2              128 KiB
// (all above 48 KiB take the cudaFuncSetAttribute opt-in; all fit an sm_80 SM's 163 KiB).
// d32 / d64 have registers to spare (fewer k-steps) and take the longer query tiles. d96 at
// 128 x 64 needed 160 accumulator floats and spilled 4-8 B in the soft-capped kernel, so it
// uses d128's 32-query tiles (128 floats). At d192 / d256 a full 16 x D dK + dV is D floats
// per thread (192 / 256: cannot fit 255 registers), so two warps share each 16 key rows and
// each accumulates half of the columns (kDn = D/2): both recompute the same S^T and dP^T (the
// price: the dK/dV kernel does 6 instead of 4 tile products per 16 key rows, 1.5x its FLOPs)
// but nothing goes through shared memory and the dV / dK products stay register-fed; 16 x 64
// key rows x 2 halves = 8 warps, 64-key blocks. Even so 64-query tiles spilled 12-64 B at d192
// (so 32: 96 + 32 floats, 236-246 regs) and 32-query tiles 16-84 B at d256, which takes
// 16-query tiles (128 + 16 floats, 246-252 regs). The dQ kernel at d192 spilled 8-12 B with
// 32-key tiles (96 + 32 floats) and runs 16-key tiles (233-234 regs); at d256 16 x 256 fp32
// is 128 floats, which spilled 28-36 B even with 16-key tiles, so d256 splits the dQ columns over two warps as well (64 + 32 floats, 8 warps,
// 228-231 regs; S and dP recomputed by both: the dQ kernel does 5 instead of 3 tile products
// per 16 query rows). FlashAttention-2 avoids these duplicate products by staging P and dS in
// shared memory, at the cost of the round trips the register-fed design avoids; at the large
// head dims that trade probably favours FA2 (compute-bound there), a GPU-measured follow-up.
// The swizzle keeps each 16-byte chunk in its row at every head dim (flash_bwd_layout.cuh:
// c ^ (r & 7) when D % 64 == 0, c ^ ((r >> 1) & 3) at d32 / d96); the emulator's bank counts
// (tests/test_flash_bwd_emulated.py::test_bank_conflict_report) show 1.00 wavefronts per ideal
// for every ldmatrix at all six head dims, and for every cp.async and ld.shared except in
// d256's dK/dV kernel: 1.01 (cp.async) and 1.02 (ld.shared) in aggregate, not yet attributed.
//
// Why it is fast: all five GEMM shapes run on mma.sync with ldmatrix-fed operands from an
// XOR-swizzled (bank-conflict free) shared-memory layout; every global load of Q/K/V/dO is a
// 16-byte cp.async issued one tile ahead; P and dS are never written to memory; softmax uses
// exp2 with scale * log2(e) folded into one FMA; masking code only runs on tiles that
// straddle a mask boundary or a sequence tail. Tile sizes keep the fp32 accumulators of a
// warp in registers without spills (see "Tiles" above).
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
// kernels (4 more kernels per head dim; delta and the split reduce do not depend on the scores).
//
// Requirements (checked, cudaErrorInvalidValue otherwise): q, k, v, out, dout 16-byte
// aligned with batch/row/head strides multiple of 8 elements; dq, dk, dv 4-byte aligned with
// even strides; lse (b, h, seqlen_q) and delta (b, h, seqlen_q) contiguous fp32 (varlen: both
// (h, total_q); cu_seqlens 4-byte aligned, totals below 2^31).
#include <cuda_runtime.h>

#include <cstdint>

#include "fastattn/api.h"
#include "fastattn/params.h"
#include "flash_bwd_launch.cuh"  // the per-head-dim entry points, the workspace size

namespace fastattn {

bool flash_bwd_cuda_supports_head_dim(int64_t d) { return flash_bwd_head_dim_ok(d); }

namespace {
template <int D>
constexpr int64_t bwd_smem_bytes() {
  return DkdvCfg<D>::kSmemBytes > DqCfg<D>::kSmemBytes ? DkdvCfg<D>::kSmemBytes : DqCfg<D>::kSmemBytes;
}
}  // namespace

int64_t flash_bwd_cuda_smem_bytes(int64_t d) {
  switch (d) {
    case 32: return bwd_smem_bytes<32>();
    case 64: return bwd_smem_bytes<64>();
    case 96: return bwd_smem_bytes<96>();
    case 128: return bwd_smem_bytes<128>();
    case 192: return bwd_smem_bytes<192>();
    case 256: return bwd_smem_bytes<256>();
    default: return 0;
  }
}

int64_t flash_bwd_cuda_workspace_floats(const FlashBwdParams& params) {
  return bwd_workspace_floats(params);
}

// The head-dim switch; each case is one flash_bwd_hdim<D>.cu (bwd_run_dim<D>).
cudaError_t flash_bwd_cuda(const FlashBwdParams& params, cudaStream_t stream) {
  switch (params.fwd.d) {
    case 32: return flash_bwd_cuda_hdim32(params, stream);
    case 64: return flash_bwd_cuda_hdim64(params, stream);
    case 96: return flash_bwd_cuda_hdim96(params, stream);
    case 128: return flash_bwd_cuda_hdim128(params, stream);
    case 192: return flash_bwd_cuda_hdim192(params, stream);
    case 256: return flash_bwd_cuda_hdim256(params, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastattn
