// decode.cu — grouped-KV split-KV attention over a KV cache (decode_attention and
// attention_with_kvcache), its split combine, and the in-place cache append (append_kv).
//
// What it computes (the full spec is the comment above DecodeParams in params.h): for every
// sequence b, query token i < seqlen_q and query head h,
//   out[b, i, h] = softmax(scale * q[b, i, h] . K[b, keys(i), h / G]) V[b, keys(i), h / G]
// with G = h / h_k, len_b = clamp(cache_seqlens[b] + seqlens_k_add, 0, seqlen_k_max) (read on
// the device), query i at key position pos_i = len_b - seqlen_q + i and keys(i) = the j in
// [0, len_b) with pos_i - window_left <= j <= pos_i + window_right (-1: unbounded; causal is
// window_right = 0); lse[b, h, i] in natural log, -inf (with out = 0) for a row with no key.
// decode_attention is seqlen_q = 1 with no window: one query token over the whole cache.
// The cache is contiguous (b, seqlen_k_max, h_k, d) or a paged pool (num_pages, page_size,
// h_k, d) with a block table; every cache row address, read or written, comes from
// KvLayout::row_offset (kv_cache_layout.h), which clamps page indices into the pool.
//
// What changed with paging and multi-query (issue 18):
//   * Paged: the K/V tile loads and append_kv address rows through KvLayout; a 16-byte
//     cp.async chunk lies within one row, so any page_size >= 1 works. A paged row address
//     costs a page-table read and a 64-bit division, so each row of a tile is looked up by one
//     lane of the warp that copies it and shared by shuffle (contiguous loads as before).
//   * Multi-query: per kv head a block serves "rows" r = i * G + g (query i, head kv * G + g),
//     up to 32 (16 at D = 256) of them, so all seqlen_q tokens of a group share each K/V row
//     load; ceil(G * seqlen_q / 32) blocks per kv head. For seqlen_q = 1 rows are heads.
//   * Masking: with a left window no row sees a key before kbeg = pos_0 - window_left, so the
//     key range (and the split-KV cut) is [kbeg, len), and for seqlen_q = 1 that is the whole
//     mask. With seqlen_q > 1 and a window the rows' visible ranges are kept in shared memory
//     and applied per (row, key) as -inf scores, only in 32-key steps that straddle some row's
//     bound (a warp-uniform test), so unmasked steps run the unchanged loop.
//
// Why it is fast. Decode reads the whole cache once per step and does ~2 * G flops per byte,
// so it is bound by HBM bandwidth whenever the group is small enough, and everything is
// arranged to stream the cache once at full width:
//   * One block per (batch, kv head, split): 4 warps at D = 64 (two blocks per SM), 8 warps
//     at D = 96, 128 and 256, where shared memory allows one block per SM (4 warps there
//     left a single warp per scheduler to hide every shared-memory and FMA latency; 8 give
//     each scheduler two, within the same 255-register budget). Every K/V row is loaded ONCE into
//     shared memory and used by all G query heads of the group (up to 32 per block; a group
//     of more than 32 heads, i.e. MQA with > 32 heads, takes ceil(G / 32) blocks per kv head,
//     each re-reading the rows). G is a runtime value, any 1..32: nothing is instantiated
//     per group size.
//   * Loads are 16-byte cp.async copies of 128-key tiles (64 KiB of K + V per tile at
//     D = 128; 64-key tiles at D = 256, where a block holds 16 query heads), double buffered: while a tile is consumed the next one is in flight, which
//     is more than the bandwidth-latency product of an SM (~25-40 KB) on A100/H100.
//     Shared-memory rows are XOR-swizzled (16-byte chunk c of row r at c ^ (r & 7); at
//     D = 96, 12 chunks a row, c ^ ((r >> 1) & 3), see swz), so the row-per-lane reads of
//     Q K^T, the row-per-warp reads of P V and the cp.async writes are conflict free.
//   * CUDA cores, not tensor cores. Math per key is G * D FMAs for Q K^T and the same for
//     P V: at G <= 8 (every LLaMA/Qwen/Mistral GQA config: 4, 7, 8) that is well below the
//     FMA rate that an SM's share of HBM bandwidth can feed, so fp32 FMAs cost no bandwidth
//     and need no padding of the group to the 16 rows of an mma tile (a 4x waste at G = 4).
//     At G = 32 the kernel is FMA bound (roughly 40-50% of bandwidth on H100 by the
//     instruction count); a tensor-core path for large groups is the next step.
//   * Work split inside a block: the group's heads are dealt round-robin to hs = 1, 2 or 4
//     head slices of at most 8 heads (so per-thread state is a fixed 8-head array in
//     registers; hs >= warps / 32-key steps per tile, so no warp is left without a step),
//     and the warps / hs warps sharing a head slice take alternate 32-key steps of each tile. In a step, lane i owns key i for Q K^T (the query rows, pre-scaled by
//     scale * log2 e, are broadcast from shared memory), a warp max gives the new running
//     max per head, p goes to shared memory, and for P V lane i owns D / 32 output dims
//     (4 dims on lanes 0..23 at D = 96), reading one V row per key with a single
//     conflict-free warp load. The warps' partial (max, sum, output) are merged through shared
//     memory at the end. (At D = 256 a tile has two 32-key steps: the 8 warps form 4 head
//     slices of 2 warps, so with G <= 8 every warp computes, on <= 2 heads.)
//   * Split-KV (flash-decoding): when b * h_k blocks cannot fill the GPU, every sequence's
//     keys are cut into num_splits chunks (decode_split.h; sized from each sequence's own
//     length on the device), each block writes a normalised fp32 partial and its lse, and
//     decode_combine_kernel merges them exactly. num_splits = 0 is resolved by
//     decode_num_splits_cuda from the shapes and SM count only, so no host ever reads
//     cache_seqlens: a decode step is CUDA-graph capturable.
//   * append_kv: one thread per 16-byte chunk of the new rows, grid-stride, rows landing
//     outside [0, seqlen_k_max) dropped on the device.
//
// Logit soft-capping (DecodeParams::softcap > 0): a compile-time twin of decode_kernel (the
// uncapped kernels are unchanged; 8 more kernels, in decode_softcap.cu so that a parallel build
// compiles them beside these instead of doubling this file's compile time), see softcap.cuh: the pre-scaled query rows
// carry softmax_scale / softcap * 2 log2 e, and each lane's q.k becomes tanh (from ex2 and rcp)
// times softcap * log2 e before the mask. Two MUFU ops per (key, head) on a bandwidth-bound
// kernel: free in practice.
// The split combine works on lse and is unchanged.
//
// The kernels live in decode_kernels.cuh and their launches in decode_launch.cuh; this file
// holds the entry points (checks, softcap twin choice, append_kv) and the split heuristic.
//
// NOTE: written and compile-checked (sm_80, sm_90a) without access to a GPU; it has never
// run on one -- neither the original decode kernel nor the paged / multi-query / masking
// changes. tests/test_decode_emulated.py compiles THIS file (and decode_softcap.cu) with g++
// and runs its entry points on the CPU (fibers for threads, host cp.async / shuffles /
// barriers, the CUDA runtime stand-ins of tests/fiber_emulate.h) against the reference, with
// every shared-memory access tracked (racecheck / initcheck / bank conflicts) and the global
// buffers guarded (memcheck). That checks the launchers, indexing, warp roles, pipelining
// order, barriers, masking and merges, but not the CUDA compiler, real asynchrony or speed.
// The tile size, stage count and split heuristic are first guesses to tune on a GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "decode_kernels.cuh"
#include "decode_launch.cuh"
#include "fastattn/api.h"
#include "fastattn/cuda_check.h"
#include "fastattn/decode_split.h"
#include "fastattn/params.h"

namespace fastattn {
namespace {

using namespace decode_kernels;

bool aligned16(const void* ptr, int64_t byte_stride_a, int64_t byte_stride_b, int64_t byte_stride_c) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && byte_stride_a % 16 == 0 && byte_stride_b % 16 == 0 &&
         byte_stride_c % 16 == 0;
}

}  // namespace

bool decode_cuda_supports_head_dim(int64_t d) { return d == 64 || d == 96 || d == 128 || d == 256; }

int64_t decode_cuda_smem_bytes(int64_t d) {
  switch (d) {
    case 64: return int64_t(DecodeSmem<64>::kBytes);
    case 96: return int64_t(DecodeSmem<96>::kBytes);
    case 128: return int64_t(DecodeSmem<128>::kBytes);
    case 256: return int64_t(DecodeSmem<256>::kBytes);
    default: return 0;
  }
}

int64_t decode_cuda_launch_smem_bytes(const DecodeParams& p) {
  // launch_decode's choice (decode_launch.cuh): decode_mma_applies already excludes softcap and
  // head dims other than 64 / 128.
  if (decode_mma_applies(p)) return decode_mma_smem_bytes(p);  // (the 2-stage d128 kernel on 99 KiB parts)
  return decode_cuda_smem_bytes(p.d);
}

bool decode_cuda_supports_layout(const DecodeParams& p) {
  if (p.h_k < 1 || p.seqlen_q < 1 || p.h % p.h_k != 0) return false;
  // cp.async copies 16 bytes: the cache bases and every stride (the batch stride is the page
  // stride of a paged pool) must be 16-byte multiples.
  if (!aligned16(p.k_cache, p.k_batch_stride * 2, p.k_row_stride * 2, p.k_head_stride * 2) ||
      !aligned16(p.v_cache, p.v_batch_stride * 2, p.v_row_stride * 2, p.v_head_stride * 2))
    return false;
  // Grid limits: grid[1] = h_k * ceil(group * seqlen_q / rows per block) and grid[2] = b are
  // capped at 65535; the combine runs b * h * seqlen_q blocks in grid x (2^31 - 1). Checked
  // whatever num_splits is: the binding asks before it picks the split count.
  int64_t grid[3];
  decode_grid(p, grid);
  if (grid[2] > 65535 || grid[1] > 65535 || p.b * p.h * p.seqlen_q > int64_t(0x7fffffff)) return false;
  // The kernel keeps key offsets within a block's range and the per-row masks in int32.
  if (p.seqlen_k_max > (int64_t(1) << 30)) return false;
  // Paged: a table and a non-empty pool (page indices are clamped into [0, num_pages)).
  if (p.block_table != nullptr && (p.page_size < 1 || p.num_pages < 1)) return false;
  return true;
}

int64_t decode_num_splits_cuda(const DecodeParams& p, int num_sms, int64_t smem_per_sm) {
  // Shapes, SM count and shared memory only (never cache_seqlens): a CUDA graph replays the
  // same split. The query rows per sequence (seqlen_q * h) take the place of the heads, so
  // h / h_k = group * seqlen_q rows per kv head and `slices` is decode_slices(), the
  // CUDA-core kernel's blocks per (batch, kv head); the tensor-core kernel runs
  // decode_mma_slices(G) blocks per (batch, kv head): one up to 32 heads.
  const int64_t d = p.d, h_k = std::max<int64_t>(p.h_k, 1);
  const int64_t sms = std::max(num_sms, 1);
  if (decode_mma_applies(p)) {
    // Blocks per SM: registers allow 4 at d64 with one m16 tile, 3 with two, 2 at d128
    // (kMmaMinBlocks, the kernel's __launch_bounds__); shared memory (plus
    // the 1 KiB the driver reserves per block) allows 2 at d128 on sm_90 (228 KiB per SM)
    // but 1 on sm_80 (164 KiB). On the H200 one block per SM at batch 64 x 4k MQA ran at 52%
    // of copy with 6% achieved occupancy (128 blocks for 264 slots).
    const int64_t group = p.h / h_k;
    const int64_t by_regs = d <= 64 ? (decode_mma_rows(group) <= 16 ? kMmaMinBlocks<64, 1> : kMmaMinBlocks<64, 2>)
                                    : kMmaMinBlocks<128, 1>;
    const int64_t block_smem = decode_mma_smem_bytes(p) + 1024;
    const int64_t by_smem = std::max<int64_t>(smem_per_sm / block_smem, 1);
    return decode::num_splits_for_slots(p.b * h_k * decode_mma_slices(group), sms * std::min(by_regs, by_smem),
                                        p.seqlen_k_max, kMmaWarps * kMmaWarpN);
  }
  // Blocks per SM by shared memory (plus the 1 KiB the driver reserves per block): one at D = 96,
  // 128 and 256; two at D = 64 on sm_80 / sm_90, one on the 100 KiB SMs of sm_86 / sm_89.
  const int64_t hpb = heads_per_block_for(static_cast<int>(d));
  const int64_t slices = (p.h * p.seqlen_q / h_k + hpb - 1) / hpb;
  const int64_t slots = sms * std::max<int64_t>(smem_per_sm / (decode_cuda_smem_bytes(d) + 1024), 1);
  return decode::num_splits_for_slots(p.b * h_k * slices, slots, p.seqlen_k_max, block_n_for(static_cast<int>(d)));
}

cudaError_t decode_attention_cuda(const DecodeParams& p, cudaStream_t stream) {
  if (p.num_splits < 1 || p.num_splits > decode::kMaxSplits || p.h_k < 1 || p.h % p.h_k != 0 ||
      !decode_cuda_supports_layout(p) || (p.num_splits > 1 && (p.out_partial == nullptr || p.lse_partial == nullptr)))
    return cudaErrorInvalidValue;
  if (p.b == 0 || p.h == 0 || p.seqlen_q == 0) return cudaSuccess;
  if (p.softcap > 0.f) return decode_attention_softcap_cuda(p, stream);  // decode_softcap.cu
  return dispatch_decode<false>(p, stream);
}

cudaError_t append_kv_cuda(const AppendKvParams& p, cudaStream_t stream) {
  if (p.block_table != nullptr && (p.page_size < 1 || p.num_pages < 1)) return cudaErrorInvalidValue;
  if (p.b == 0 || p.seqlen_new == 0 || p.h_k == 0 || p.d == 0) return cudaSuccess;
  const int64_t es = p.dtype == DType::kFloat32 ? 4 : 2;
  const bool vec = aligned16(p.k_cache, es * p.k_cache_batch_stride, es * p.k_cache_row_stride, es * p.k_cache_head_stride) &&
                   aligned16(p.v_cache, es * p.v_cache_batch_stride, es * p.v_cache_row_stride, es * p.v_cache_head_stride) &&
                   aligned16(p.k, es * p.k_batch_stride, es * p.k_row_stride, es * p.k_head_stride) &&
                   aligned16(p.v, es * p.v_batch_stride, es * p.v_row_stride, es * p.v_head_stride) &&
                   (es * p.d) % 16 == 0;
  // 16-byte copies when everything is aligned; otherwise one element per copy.
  const int64_t unit_bytes = vec ? 16 : es;
  const int64_t units = p.b * p.seqlen_new * p.h_k * (es * p.d / unit_bytes);
  const int threads = 256;
  const int64_t grid[3] = {std::min<int64_t>((units + threads - 1) / threads, int64_t(1) << 16), 1, 1};
  if (vec) return launch_kernel(append_kv_kernel<uint4>, grid, threads, 0, stream, p, es);
  if (es == 4) return launch_kernel(append_kv_kernel<uint32_t>, grid, threads, 0, stream, p, es);
  return launch_kernel(append_kv_kernel<uint16_t>, grid, threads, 0, stream, p, es);
}

}  // namespace fastattn
