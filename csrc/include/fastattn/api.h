// api.h — the kernels' entry points. The bindings fill a params struct and call these.
//
// CPU launchers run on the calling thread and parallelise with ATen's thread pool.
// CUDA launchers enqueue on `stream` and return cudaError_t; they never exit, synchronise
// or allocate (scratch buffers are part of the params, sized by the *_workspace helpers).
#pragma once

#include <cstdint>

#include "fastattn/params.h"

namespace fastattn {

// ---- CPU (csrc/cpu) --------------------------------------------------------------------
void rms_norm_fwd_cpu(const RmsNormParams& params);
void rms_norm_bwd_cpu(const RmsNormBwdParams& params);
// Rows per dweight partial on the CPU: fixed by shape so the reduction order (and hence
// the bits of dweight) does not depend on the number of threads.
int64_t rms_norm_bwd_num_row_blocks_cpu(int64_t rows);

// ---- rotary (cpu) ----
// Rotates q and k (out of place, or in place when q_out == q and k_out == k). A token
// whose position is outside [0, max_pos) gets NaN in its rotated dims (the binding rejects
// such positions before calling; this is the kernel's own memory-safe answer).
void rotary_cpu(const RotaryParams& params);

// ---- flash attention (cpu) ----
// Forward for fp32/fp16/bf16 and any head dim; same masking semantics as the CUDA kernel.
void flash_fwd_cpu(const FlashFwdParams& params);
// Backward (recompute): delta, then dq, dk, dv. params.delta must hold b * h * seqlen_q fp32
// values; no workspace. Bitwise deterministic for any thread count.
void flash_bwd_cpu(const FlashBwdParams& params);

// ---- decode attention and append_kv (cpu) ----
// params.num_splits >= 1; with num_splits > 1, out_partial/lse_partial hold
// (num_splits, b, h, d) / (num_splits, b, h) fp32. Any head dim; fp32, fp16, bf16.
void decode_attention_cpu(const DecodeParams& params);
// num_splits for num_splits = 0: a function of the batch size and the longest sequence's key
// count only (deterministic bits: never of the machine or the thread count).
int64_t decode_num_splits_cpu(int64_t b, int64_t h_k, int64_t max_keys);
// Rows whose destination cache_seqlens[b] + i is outside [0, seqlen_k_max) are skipped (the
// binding rejects such calls before launching).
void append_kv_cpu(const AppendKvParams& params);

// ---- mixture-of-experts experts (cpu) ----
// The routed SwiGLU experts and their top-k combine (MoeParams); fp32, fp16, bf16 weights,
// out fp32. No CUDA kernel: on CUDA the model runs the experts with torch.
void moe_experts_cpu(const MoeParams& params);

}  // namespace fastattn

#if defined(FASTATTN_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace fastattn {

// ---- CUDA (csrc/cuda) ------------------------------------------------------------------
cudaError_t rms_norm_fwd_cuda(const RmsNormParams& params, cudaStream_t stream);
cudaError_t rms_norm_bwd_cuda(const RmsNormBwdParams& params, cudaStream_t stream);
// Number of row blocks the backward uses (and so rows of params.dweight_partial), a pure
// function of the shape and the SM count: the reduction order is fixed per device.
int64_t rms_norm_bwd_num_row_blocks_cuda(int64_t rows, int64_t n, int num_sms);

// ---- rotary (cuda) ----
// Same contract as rotary_cpu, one launch for q and k; dtypes fp32, fp16, bf16. The token's
// angles are staged in shared memory, which bounds the rotary dim (cudaErrorInvalidValue
// beyond it).
constexpr int64_t kRotaryMaxRotaryDimCuda = 12288;
cudaError_t rotary_cuda(const RotaryParams& params, cudaStream_t stream);

// ---- flash attention (cuda) ----
// Forward over the closed list dtype {fp16, bf16} x head dim {64, 128, ...} x causal/window;
// returns cudaErrorInvalidValue for anything outside it (the binding reports it).
cudaError_t flash_fwd_cuda(const FlashFwdParams& params, cudaStream_t stream);
// True when flash_fwd_cuda has a kernel for this head dim.
bool flash_fwd_cuda_supports_head_dim(int64_t d);
// True when the pointers, strides and sizes of `params` suit the kernel: q/k/v/out 16-byte
// aligned, every batch/row/head stride a multiple of 8 elements, h % h_k == 0, seqlens
// <= 2^28, b and h <= 65535. flash_fwd_cuda returns cudaErrorInvalidValue otherwise; a
// binding can test this first and pass contiguous copies instead.
bool flash_fwd_cuda_supports_layout(const FlashFwdParams& params);
// Backward (recompute): computes params.delta = rowsum(dout * out) and params.lse_log2 = lse *
// log2(e) itself (both scratch laid out like lse), then dq, dk, dv.
// params.workspace must hold flash_bwd_cuda_workspace_floats(params) fp32 values (0: none).
cudaError_t flash_bwd_cuda(const FlashBwdParams& params, cudaStream_t stream);
int64_t flash_bwd_cuda_workspace_floats(const FlashBwdParams& params);
bool flash_bwd_cuda_supports_head_dim(int64_t d);
// Dynamic shared memory the backward's largest block needs at head dim d (dK/dV or dQ kernel):
// 128 KiB at d = 256, more than the 99 KiB opt-in limit of sm_86 / sm_89 / sm_120 parts.
int64_t flash_bwd_cuda_smem_bytes(int64_t d);

// ---- decode attention and append_kv (cuda) ----
// Grouped-KV split-KV decode over the closed list dtype {fp16, bf16} x head dim {64, 128, 256};
// any group size h / h_k. num_splits >= 1 (the scratch of DecodeParams holds num_splits
// partials when > 1). cache_seqlens values are clamped to [0, seqlen_k_max] on the device.
// Returns cudaErrorInvalidValue outside the supported list (see the supports_* helpers).
cudaError_t decode_attention_cuda(const DecodeParams& params, cudaStream_t stream);
bool decode_cuda_supports_head_dim(int64_t d);
// Dynamic shared memory one CUDA-core decode block needs (152 KiB at d = 128 and 256, 116 KiB
// at d = 96, 76 KiB at d = 64): more than the 99 KiB opt-in limit of sm_86 / sm_89 at d >= 96.
int64_t decode_cuda_smem_bytes(int64_t d);
// Dynamic shared memory of the decode kernel the launcher picks for params (the tensor-core
// kernel, 104 KiB at d = 128, 72 KiB in its 2-stage variant when params.smem_per_block_optin is
// below that, and 52 KiB at d = 64, for one query per sequence without softcap; else
// decode_cuda_smem_bytes(d)): what the device's opt-in limit must allow.
int64_t decode_cuda_launch_smem_bytes(const DecodeParams& params);
// True when k/v caches are 16-byte aligned with every stride a multiple of 8 elements, and
// the grid fits (b <= 65535, h_k * head slices <= 65535).
bool decode_cuda_supports_layout(const DecodeParams& params);
// num_splits for num_splits = 0, from the shapes (params: everything but num_splits and the
// scratch pointers), the SM count and the shared memory per SM only: no host read of
// cache_seqlens, so a decode step can be captured in a CUDA graph. Sized for the kernel the
// launcher will pick (tensor-core or CUDA-core), whose blocks per SM differ.
int64_t decode_num_splits_cuda(const DecodeParams& params, int num_sms, int64_t smem_per_sm);
// Writes rows in place; rows whose destination cache_seqlens[b] + i falls outside
// [0, seqlen_k_max) are dropped on the device (the binding rejects them on the host when it
// may synchronise, i.e. outside graph capture).
cudaError_t append_kv_cuda(const AppendKvParams& params, cudaStream_t stream);

}  // namespace fastattn
#endif
