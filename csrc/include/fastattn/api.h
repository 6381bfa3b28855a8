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

// ---- flash attention (cpu) ----
// Forward for fp32/fp16/bf16 and any head dim; same masking semantics as the CUDA kernel.
void flash_fwd_cpu(const FlashFwdParams& params);
// Backward (recompute): delta, then dq, dk, dv. params.delta must hold b * h * seqlen_q fp32
// values; no workspace. Bitwise deterministic for any thread count.
void flash_bwd_cpu(const FlashBwdParams& params);

// ---- decode attention and append_kv (cpu) ----

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
// Backward (recompute): computes params.delta = rowsum(dout * out) itself, then dq, dk, dv.
// params.workspace must hold flash_bwd_cuda_workspace_floats(params) fp32 values (0: none).
cudaError_t flash_bwd_cuda(const FlashBwdParams& params, cudaStream_t stream);
int64_t flash_bwd_cuda_workspace_floats(const FlashBwdParams& params);
bool flash_bwd_cuda_supports_head_dim(int64_t d);

// ---- decode attention and append_kv (cuda) ----

}  // namespace fastattn
#endif
