// flash_fwd.cu — FlashAttention forward on CUDA (sm_80+), FlashAttention-2 class.
//
// What it computes. For every batch b, query head h and query row i:
//   out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, kvh]) v[b, j, kvh]
//   lse[b, h, i] = log sum_j exp(scale * q . k)          (natural log, fp32)
// with kvh = h / (h / h_k) (GQA/MQA without copying K/V), over the keys j row i may see:
// j in [i + Sk - Sq - left, i + Sk - Sq + right] (bottom-right aligned; -1 = unbounded;
// causal = right 0). A row that sees no key writes 0 and lse = -inf. fp16/bf16 in and out,
// fp32 accumulation, head dims 32, 64, 96, 128, 192 and 256, any Sq/Sk, arbitrary batch/row/head strides
// (last dim contiguous, 16-byte aligned rows).
//
// Why it is fast. The S = QK^T score matrix never touches global memory. A thread block
// owns a 128-row query tile and streams the keys and values of its (b, kv head) through
// shared memory tile by tile; each warp keeps its 32 query rows' output accumulators and
// softmax statistics in registers for the whole sweep (online softmax: running row max
// and row sum, the accumulator rescaled by 2^(old max - new max) when the max grows), so
// every K/V byte read from global memory serves 128 queries. Both matmuls run on the tensor
// cores with mma.sync m16n8k16 (fp32 accumulate), fed by ldmatrix from an XOR-swizzled
// shared layout (16-byte chunk c of row r stored at c ^ (r & 7); at d 32 / 96, whose rows are
// an odd number of half bank lines, at c ^ ((r >> 1) & 3), inside aligned 4-chunk groups:
// flash_fwd_kernel.cuh) that makes every ldmatrix and every cp.async write bank-conflict free
// without padding. The probabilities P never
// go back to shared memory: the m16n8k16 accumulator layout of two adjacent n8 score tiles
// is exactly the A-operand layout of a k16 slice, so P is packed to 16 bit in registers and
// fed straight into the PV mma. K and V tiles are fetched with cp.async (asynchronous,
// bypassing registers and L1) as separate groups, FlashAttention-2 style: V(n) streams in
// under QK^T(n) and the softmax, K(n + 1) under the softmax and PV(n) (one buffer each,
// three barriers per key tile; flash_fwd_kernel.cuh, the main loop). The softmax works in the log2 domain (one FMUL folds scale * log2 e, then
// ex2.approx), the row sums are kept per thread and reduced across the quad only once, and
// the output is divided by the row sum once, at the end (staged through shared memory so
// the global stores are full 16-byte, row-contiguous writes). Under a causal or window
// mask, key tiles wholly outside the band are never loaded (the loop bounds skip them),
// tiles wholly inside run the unmasked path, and only tiles crossing a band edge (or the
// ragged end of the keys) pay for per-element masking. Query blocks are issued heaviest
// first (reverse order) so causal launches do not end on a long tail of big blocks.
//
// Tuning rationale. With mma.sync the limiter on A100/H100 is shared-memory bandwidth, not
// the tensor cores: every B fragment an ldmatrix delivers should feed as many mma's as
// possible. So each of the 4 warps owns two m16 row tiles (32 query rows): every K and V
// fragment feeds two mma's, halving the shared traffic per flop compared with one m16 tile
// per warp (the FlashAttention-2 layout for these GPUs). The price is registers: the O
// accumulator is 2 x D/2 fp32 per thread. Both head dims use 64-key tiles, FlashAttention-2's
// 128 x 64 (O 128 + S 64 fp32 registers at D = 128): P is packed to 16 bit as soon as each
// probability pair is computed, so the fp32 scores die before the O rescale and the V wait,
// which is what keeps D = 128 at ~240-246 registers without spilling (with P packed after
// the softmax it spilled 8-68 bytes). 128 x 128 at D = 64 spilled 4-24 bytes, so D = 64
// stays 128 x 64. Q is re-read from shared memory by ldmatrix for every key tile rather
// than pinned in registers, again for register room. Shared memory is Q (128 x D) plus one
// K and one V tile: 32 KB at D = 64 and 64 KB at D = 128 (opt-in above 48 KB), so with
// <= 255 registers x 128 threads two blocks (8 warps) share an SM on both A100 and H100. The masked/unmasked split is a
// template flag so the common unmasked kernel carries no window arithmetic; everything else
// (lengths, strides, window sizes, GQA ratio) is a runtime value, which keeps the build at 8
// kernels (2 dtypes x 2 head dims x masked or not), in two files compiled in parallel.
//
// The other head dims (Phi-3's 96, Gemma's 256, small models' 32, and 192) reuse the same
// kernel template; only the tile changes, chosen for registers and shared memory (0 spills on
// sm_80 and sm_90a):
//   d 32, d 96: 128 x 64, 4 warps of two m16 tiles, as d 64 / 128 (O 2 x 16 / 2 x 48 fp32 per
//     thread). Smem 16 KB / 48 KB (no opt-in), two blocks (8 warps) per SM on A100 and H100.
//   d 192: 128 x 64, 8 warps of ONE m16 tile (O 96 fp32): two m16 tiles per warp would need
//     O 192 + S 64 fp32 registers, past the 255 limit. 8 warps keep 128 queries per K/V tile
//     (half the K/V traffic of 64 x 64). Smem Q 48 + K 24 + V 24 = 96 KB: one block (8 warps,
//     the register file's limit at ~255 registers x 256 threads) per SM.
//   d 256: 64 x 64, 4 warps of one m16 tile (O 128 fp32). Smem Q 32 + K 32 + V 32 = 96 KB, which
//     still fits the 99 KB opt-in limit of sm_86 / sm_89 parts (128 x 64 would need 128 KB);
//     two blocks (8 warps) per SM on H100 (227 KB), one (4 warps) on A100 (164 KB).
// They exist only as the masked kernel (which runs unmasked problems too, paying the window
// arithmetic, as the softcap twins do) plus its soft-capped twin: 4 kernels per head dim
// (2 dtypes x capped or not), one file per head dim (flash_fwd_hdim{32,96,192,256}.cu), so the
// whole forward is 28 kernels in 8 files that a parallel build compiles side by side.
//
// Logit soft-capping (FlashFwdParams::softcap > 0, Gemma 2): the score becomes
// softcap * tanh(score / softcap) before masking and softmax, folded as softcap.cuh explains
// (one multiply by softmax_scale / softcap * 2 log2 e on the accumulator, a tanh from ex2 and
// rcp, and the log2 multiplier becomes softcap * log2 e; lse stays the natural-log lse of the capped scores). It
// is a template flag so the uncapped kernels do not change, and only the masked kernel gets a
// capped twin (it also runs unmasked problems, at the cost of the window arithmetic): 4 more
// kernels (12 in all), in two more files (flash_fwd_hdim{64,128}_softcap.cu) that a parallel
// build compiles beside the others, so the build's wall time does not grow.
//
// Variable-length (packed) batches, flash-attn 2 style (FlashFwdParams::cu_seqlens_q non-null):
// no padding and no copies. The grid is (ceil(max_seqlen_q / kBlockM), h, number of sequences);
// each block reads its sequence's row ranges from cu_seqlens_q / cu_seqlens_k once, clamps
// them to the packed tensors (any cu_seqlens content stays in bounds, see varlen_bounds),
// exits at once when its query block lies past the sequence's end, and otherwise runs the
// dense code unchanged with the sequence's own lengths (masking, tails) and row-0 pointers.
// This is a runtime branch in the per-block prologue, not a template flag: the instantiation
// count is unchanged by varlen and the main loop is the same code for both layouts.
//
// Requirements checked here (cudaErrorInvalidValue otherwise, nothing launched): fp16 or
// bf16; d in {32, 64, 96, 128, 192, 256}; h % h_k == 0; q/k/v/out 16-byte aligned and every batch/row/head
// stride a multiple of 8 elements (16-byte cp.async and stores); seqlen_q, seqlen_k <= 2^28;
// b, h <= 65535 (grid z / y). flash_fwd_cuda_supports_layout() tells a caller up front; one
// with another layout passes contiguous copies instead.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastattn/api.h"
#include "fastattn/params.h"
#include "flash_fwd_kernel.cuh"

namespace fastattn {

bool flash_fwd_cuda_supports_head_dim(int64_t d) {
  return d == 32 || d == 64 || d == 96 || d == 128 || d == 192 || d == 256;
}

namespace {
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
}  // namespace

// Everything the kernel needs beyond the dtype / head dim: 16-byte cp.async and uint4
// stores need 16-byte aligned base pointers and row/head/batch strides multiple of 8
// elements; index math is int32, so lengths are capped at 2^28.
// Varlen (cu_seqlens_q non-null): cu_seqlens_k must be given too, both 4-byte aligned (they
// are int32 arrays); total_q / total_k in [0, 2^31) (cu_seqlens are int32); seqlen_q /
// seqlen_k are the max bounds, capped as above; the batch strides are not read.
bool flash_fwd_cuda_supports_layout(const FlashFwdParams& p) {
  constexpr int64_t kMaxLen = int64_t(1) << 28;
  if (p.b < 0 || p.h <= 0 || p.h_k <= 0 || p.h % p.h_k != 0) return false;
  if (p.cu_seqlens_q != nullptr) {
    constexpr int64_t kMaxTotal = (int64_t(1) << 31) - 1;
    if (p.cu_seqlens_k == nullptr) return false;
    if ((reinterpret_cast<uintptr_t>(p.cu_seqlens_q) & 3u) != 0 ||
        (reinterpret_cast<uintptr_t>(p.cu_seqlens_k) & 3u) != 0)
      return false;
    if (p.total_q < 0 || p.total_k < 0 || p.total_q > kMaxTotal || p.total_k > kMaxTotal)
      return false;
  }
  if (p.seqlen_q < 0 || p.seqlen_k < 0 || p.seqlen_q > kMaxLen || p.seqlen_k > kMaxLen) return false;
  if (p.h > 65535 || p.b > 65535) return false;  // grid y / z limits
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out)) return false;
  const int64_t strides[] = {p.q_batch_stride,   p.q_row_stride,   p.q_head_stride,
                             p.k_batch_stride,   p.k_row_stride,   p.k_head_stride,
                             p.v_batch_stride,   p.v_row_stride,   p.v_head_stride,
                             p.out_batch_stride, p.out_row_stride, p.out_head_stride};
  for (int64_t s : strides) {
    if (s % 8 != 0) return false;
  }
  return true;
}

cudaError_t flash_fwd_cuda(const FlashFwdParams& p, cudaStream_t stream) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  if (!flash_fwd_cuda_supports_head_dim(p.d)) return cudaErrorInvalidValue;
  if (!flash_fwd_cuda_supports_layout(p)) return cudaErrorInvalidValue;
  if (p.b == 0 || p.seqlen_q == 0) return cudaSuccess;  // nothing to write
  if (p.cu_seqlens_q != nullptr && p.total_q == 0) return cudaSuccess;  // no query row at all

  // Normalise the mask: causal is right = 0; a bound at least Sq + Sk wide can never cut a
  // row's band, so it is dropped (this also keeps every index sum inside int32).
  const int64_t span = p.seqlen_q + p.seqlen_k;
  int64_t left = p.window_left < 0 ? -1 : p.window_left;
  int64_t right = p.window_right < 0 ? -1 : p.window_right;
  if (p.is_causal) right = 0;  // causal AND any right bound >= 0 is right = 0
  if (left >= span) left = -1;
  if (right >= span) right = -1;
  // A row whose band lies entirely off the key range outputs 0 through the same path
  // (the kernel's loop bounds come out empty and the row sum stays 0).

  flash::FwdArgs args;
  args.q = p.q;
  args.k = p.k;
  args.v = p.v;
  args.out = p.out;
  args.lse = p.lse;
  args.q_batch_stride = p.q_batch_stride;
  args.q_row_stride = p.q_row_stride;
  args.q_head_stride = p.q_head_stride;
  args.k_batch_stride = p.k_batch_stride;
  args.k_row_stride = p.k_row_stride;
  args.k_head_stride = p.k_head_stride;
  args.v_batch_stride = p.v_batch_stride;
  args.v_row_stride = p.v_row_stride;
  args.v_head_stride = p.v_head_stride;
  args.out_batch_stride = p.out_batch_stride;
  args.out_row_stride = p.out_row_stride;
  args.out_head_stride = p.out_head_stride;
  args.seqlen_q = static_cast<int>(p.seqlen_q);
  args.seqlen_k = static_cast<int>(p.seqlen_k);
  args.h = static_cast<int>(p.h);
  args.h_per_kv = static_cast<int>(p.h / p.h_k);
  args.window_left = static_cast<int>(left);
  args.window_right = static_cast<int>(right);
  // Soft-capping (softcap.cuh): x = tanh(q.k * softmax_scale / softcap) * softcap * log2 e.
  const bool softcap = p.softcap > 0.f;
  args.scale_log2 = (softcap ? p.softcap : p.softmax_scale) * 1.4426950408889634f;
  args.softcap_pre = softcap ? p.softmax_scale / p.softcap * kSoftcapTwoLog2e : 0.f;
  args.cu_seqlens_q = p.cu_seqlens_q;
  args.cu_seqlens_k = p.cu_seqlens_q != nullptr ? p.cu_seqlens_k : nullptr;
  args.total_q = p.total_q;
  args.total_k = p.total_k;
  const bool masked = left >= 0 || right >= 0;
  // Block order (block_order.cuh): with a right bound (causal) later query blocks see more
  // keys, so (head, batch) pairs run in sections, the heaviest blocks of a whole section first;
  // a section is as many pairs as share FASTATTN_SCHED_L2_BYTES of K/V (the GQA heads of a kv
  // head are adjacent pairs and read the same K/V). No right bound: the plain order.
  args.sched_section = 1;
  if (right >= 0)
    args.sched_section = block_order_section((p.seqlen_q + 63) / 64, p.h * p.b,
                                             p.seqlen_k * p.d * 4 / (p.h / p.h_k), FASTATTN_SCHED_L2_BYTES);

  switch (p.d) {  // the masked-only head dims: masked kernel or its capped twin
    case 32: return flash::run_flash_fwd_hdim32(args, p.b, p.dtype, softcap, stream);
    case 96: return flash::run_flash_fwd_hdim96(args, p.b, p.dtype, softcap, stream);
    case 192: return flash::run_flash_fwd_hdim192(args, p.b, p.dtype, softcap, stream);
    case 256: return flash::run_flash_fwd_hdim256(args, p.b, p.dtype, softcap, stream);
    default: break;
  }
  if (softcap) {
    switch (p.d) {
      case 64: return flash::run_flash_fwd_hdim64_softcap(args, p.b, p.dtype, stream);
      case 128: return flash::run_flash_fwd_hdim128_softcap(args, p.b, p.dtype, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  switch (p.d) {
    case 64: return flash::run_flash_fwd_hdim64(args, p.b, p.dtype, masked, stream);
    case 128: return flash::run_flash_fwd_hdim128(args, p.b, p.dtype, masked, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastattn
