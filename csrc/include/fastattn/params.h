// fastattn/params.h — one plain struct per op, shared by the CPU and CUDA kernels.
//
// These structs are the whole interface between the torch bindings (csrc/bindings) and the
// kernels (csrc/cpu, csrc/cuda): raw pointers, a dtype tag, int64 strides in ELEMENTS and
// plain dims. No torch, no CUDA headers: this file compiles with a bare C++17 compiler and
// with plain `nvcc -c`, which is how CI checks every kernel without a GPU or a CUDA torch.
//
// Naming follows FlashAttention's flash.h: `<tensor>_<dim>_stride`, dims `b, seqlen_q,
// seqlen_k, h, h_k, d`. The last dimension of every tensor is contiguous (stride 1).
#pragma once

#include <cstdint>

namespace fastattn {

// Element type of the 16/32-bit floating tensors an op reads and writes. Accumulation is
// always fp32 whatever this says.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

// ---------------------------------------------------------------------------------------
// RMSNorm forward: y = x / sqrt(mean(x^2) + eps) * weight, over the last dim, per row.
// Fused residual form: h = x + residual is written out and normalised instead of x.
// ---------------------------------------------------------------------------------------
struct RmsNormParams {
  // Inputs, (rows, n) each with its own row stride. residual and weight may be null.
  const void* x = nullptr;
  const void* residual = nullptr;
  const void* weight = nullptr;  // (n), same dtype as x
  int64_t x_row_stride = 0;
  int64_t residual_row_stride = 0;

  // Outputs. y (rows, n); h (rows, n) only when residual != null; rstd (rows) fp32, kept
  // for the backward pass.
  void* y = nullptr;
  void* h = nullptr;
  float* rstd = nullptr;
  int64_t y_row_stride = 0;
  int64_t h_row_stride = 0;

  // Problem size.
  int64_t rows = 0;
  int64_t n = 0;
  float eps = 1e-6f;
  DType dtype = DType::kFloat32;
};

// RMSNorm backward. With xhat = x * rstd and g = dy * weight:
//   dx = rstd * (g - xhat * mean(g * xhat)) + dh        (dh: gradient flowing into the
//                                                         fused form's h output, may be null)
//   dweight = sum over rows of dy * xhat                 (fp32, reduced deterministically)
struct RmsNormBwdParams {
  // Inputs. x is what was normalised (h in the fused residual form).
  const void* dy = nullptr;
  const void* x = nullptr;
  const void* weight = nullptr;  // may be null
  const float* rstd = nullptr;   // (rows)
  const void* dh = nullptr;      // may be null
  int64_t dy_row_stride = 0;
  int64_t x_row_stride = 0;
  int64_t dh_row_stride = 0;

  // Outputs. dx (rows, n). dweight (n) fp32, only when weight != null.
  void* dx = nullptr;
  float* dweight = nullptr;
  int64_t dx_row_stride = 0;

  // Scratch for the deterministic dweight reduction: (num_row_blocks, n) fp32, each row
  // block writes its own partial sum and a second pass adds them in a fixed order.
  float* dweight_partial = nullptr;
  int64_t num_row_blocks = 0;

  int64_t rows = 0;
  int64_t n = 0;
  DType dtype = DType::kFloat32;
};

// ---------------------------------------------------------------------------------------
// Rotary position embedding applied to q and k in one pass.
//   NeoX/LLaMA (interleaved = false): pairs (i, i + R/2) for i < R/2.
//   GPT-J      (interleaved = true):  pairs (2i, 2i + 1).
//   out_a = a * cos - b * sin ; out_b = b * cos + a * sin, with cos/sin = table[pos][i].
//   conjugate = true rotates by -angle (the backward pass). Dims R..d pass through.
// ---------------------------------------------------------------------------------------
struct RotaryParams {
  // q (b, seqlen, h, d) and k (b, seqlen, h_k, d), read from q/k and written to
  // q_out/k_out (which may alias q/k for the in-place form).
  const void* q = nullptr;
  const void* k = nullptr;
  void* q_out = nullptr;
  void* k_out = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t q_out_batch_stride = 0, q_out_row_stride = 0, q_out_head_stride = 0;
  int64_t k_out_batch_stride = 0, k_out_row_stride = 0, k_out_head_stride = 0;

  // cos/sin tables (max_pos, rotary_dim / 2) fp32, contiguous.
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t max_pos = 0;

  // positions: null means arange(seqlen); otherwise (b, seqlen) int32 or int64 with the
  // given batch stride (0 broadcasts one (seqlen,) row over the batch).
  const void* positions = nullptr;
  bool positions_int64 = false;
  int64_t positions_batch_stride = 0;

  int64_t b = 0, seqlen = 0, h = 0, h_k = 0, d = 0;
  int64_t rotary_dim = 0;
  bool interleaved = false;
  bool conjugate = false;
  DType dtype = DType::kFloat32;
};

// ---------------------------------------------------------------------------------------
// FlashAttention (tiled, online softmax). q (b, seqlen_q, h, d), k/v (b, seqlen_k, h_k, d),
// out (b, seqlen_q, h, d), lse (b, h, seqlen_q) fp32. Query head i reads kv head
// i / (h / h_k). Query row i sees key j iff
//   j >= i + seqlen_k - seqlen_q - window_left   (when window_left >= 0)
//   j <= i + seqlen_k - seqlen_q + window_right  (when window_right >= 0)
// causal is window_right = 0. A row that sees no key outputs 0 and lse = -inf.
// ---------------------------------------------------------------------------------------
struct FlashFwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // (b, h, seqlen_q), contiguous
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;

  int64_t b = 0, seqlen_q = 0, seqlen_k = 0, h = 0, h_k = 0, d = 0;
  float softmax_scale = 1.0f;
  int64_t window_left = -1;   // -1: unbounded
  int64_t window_right = -1;  // -1: unbounded; 0 with window_left = -1 is causal
  bool is_causal = false;     // window_right == 0 and window_left == -1
  // Logit soft-capping (Gemma 2, Grok): when softcap > 0 the score s = softmax_scale * q.k
  // becomes softcap * tanh(s / softcap) before masking and softmax; 0 = off. Kernels select
  // a compile-time variant on softcap > 0 so the uncapped path pays nothing.
  float softcap = 0.0f;
  DType dtype = DType::kFloat16;

  // Variable-length (packed) batches, as flash-attn's varlen API. When cu_seqlens_q is
  // non-null (then cu_seqlens_k is too), q/out are (total_q, h, d) and k/v (total_k, h_k, d):
  // sequence i owns query rows [cu_seqlens_q[i], cu_seqlens_q[i+1]) and key rows
  // [cu_seqlens_k[i], cu_seqlens_k[i+1]); the batch strides are unused (0); b is the number
  // of sequences; seqlen_q / seqlen_k hold max_seqlen_q / max_seqlen_k, upper bounds used
  // only to size the launch; lse is (h, total_q). Masking is per sequence with that
  // sequence's own lengths (bottom-right causal / window as above). Kernels must stay in
  // bounds for any cu_seqlens content: each sequence's rows are clamped to
  // [0, total_q) / [0, total_k) and its lengths to the max_seqlen bounds.
  const int32_t* cu_seqlens_q = nullptr;  // (b + 1) int32, on the kernel's device
  const int32_t* cu_seqlens_k = nullptr;  // (b + 1) int32
  int64_t total_q = 0;
  int64_t total_k = 0;
};

// FlashAttention backward (recompute). Gradients dq/dk/dv have q/k/v's shapes.
struct FlashBwdParams {
  FlashFwdParams fwd;  // q, k, v, out, lse and the masking of the forward call
  const void* dout = nullptr;
  int64_t dout_batch_stride = 0, dout_row_stride = 0, dout_head_stride = 0;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  // Scratch: delta = rowsum(dout * out) (b, h, seqlen_q) fp32, and fp32 accumulators the
  // kernels may use (sizes chosen by the launcher's workspace query).
  float* delta = nullptr;
  // CUDA only (the CPU kernels ignore it): lse * log2(e) per row, +inf where lse = -inf, laid
  // out like lse; written by the delta kernel next to delta, read by the dK/dV and dQ loops.
  float* lse_log2 = nullptr;
  float* workspace = nullptr;
  bool deterministic = true;
};

// ---------------------------------------------------------------------------------------
// Attention over a KV cache: decode_attention (one query token per sequence) and
// attention_with_kvcache (seqlen_q new query tokens per sequence: chunked prefill,
// speculative decoding), on a contiguous or a paged cache. One kernel serves both.
//
// q (b, seqlen_q, h, d); out (b, seqlen_q, h, d); lse (b, h, seqlen_q) fp32 (for
// seqlen_q = 1 that is decode's (b, h)). cache_seqlens (b) int32 on the device.
//
// Key length of sequence b: len_b = clamp(cache_seqlens[b] + seqlens_k_add, 0, seqlen_k_max)
// (seqlens_k_add = seqlen_q when the new keys were appended just before, else 0). Query i
// sits at key position pos_i = len_b - seqlen_q + i (bottom-right alignment) and sees the
// keys j in [0, len_b) with pos_i - window_left <= j <= pos_i + window_right (-1 =
// unbounded on that side; causal = window_right 0). A row that sees no key: out 0, lse -inf.
//
// Cache layout (see kv_cache_layout.h for the one address function every kernel uses):
//  * contiguous (block_table == nullptr): k_cache (b, seqlen_k_max, h_k, d); k_batch_stride
//    is the stride of dim 0.
//  * paged: k_cache is a pool (num_pages, page_size, h_k, d) and k_batch_stride the stride of
//    its dim 0 (one page); block_table (b, max_pages_per_seq) int32, row stride
//    block_table_batch_stride; token t of sequence b lives at
//    pool[block_table[b][t / page_size], t % page_size]; seqlen_k_max = max_pages_per_seq *
//    page_size. Page indices are clamped to [0, num_pages) by the kernels (memory safety on
//    CUDA, where the host never reads the table; the CPU binding rejects bad indices).
//
// Split-KV: num_splits chunks of each sequence's keys each write a partial (out_partial,
// lse_partial) merged by a combine pass.
// ---------------------------------------------------------------------------------------
struct DecodeParams {
  const void* q = nullptr;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  const int32_t* cache_seqlens = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // (b, h, seqlen_q)
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;

  int64_t b = 0, seqlen_q = 1, seqlen_k_max = 0, h = 0, h_k = 0, d = 0;
  int64_t seqlens_k_add = 0;
  int64_t window_left = -1, window_right = -1;
  float softmax_scale = 1.0f;
  float softcap = 0.0f;  // > 0: scores softcap * tanh(s / softcap), as FlashFwdParams

  // Paged cache (nullptr: contiguous).
  const int32_t* block_table = nullptr;
  int64_t block_table_batch_stride = 0;
  int64_t page_size = 0;
  int64_t num_pages = 0;

  int64_t num_splits = 1;
  // Scratch for split-KV: out_partial (num_splits, b, h, seqlen_q, d) and lse_partial
  // (num_splits, b, h, seqlen_q), fp32.
  float* out_partial = nullptr;
  float* lse_partial = nullptr;
  DType dtype = DType::kFloat16;
  // The device's opt-in shared memory per block in bytes (0: not known, taken as enough): the
  // launcher picks the tensor-core kernel's smaller d128 variant below its usual size.
  int64_t smem_per_block_optin = 0;
};

// append_kv: row cache_seqlens[b] + i of sequence b's cache = k[b, i] (same for v), for
// i < seqlen_new; the cache is contiguous or paged exactly as in DecodeParams (k_cache_batch_
// stride is then the page stride and seqlen_k_max = max_pages_per_seq * page_size). Rows
// that would land outside [0, seqlen_k_max) are dropped (the binding rejects them first
// wherever it may read cache_seqlens on the host).
struct AppendKvParams {
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const int32_t* cache_seqlens = nullptr;
  int64_t k_cache_batch_stride = 0, k_cache_row_stride = 0, k_cache_head_stride = 0;
  int64_t v_cache_batch_stride = 0, v_cache_row_stride = 0, v_cache_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t b = 0, seqlen_new = 0, seqlen_k_max = 0, h_k = 0, d = 0;
  const int32_t* block_table = nullptr;
  int64_t block_table_batch_stride = 0;
  int64_t page_size = 0;
  int64_t num_pages = 0;
  DType dtype = DType::kFloat16;
};

// ---------------------------------------------------------------------------------------
// Mixture-of-experts SwiGLU experts with their top-k combine (CPU; fastattn.models.moe):
//   out[t] = sum_j routing_weights[t, j] * expert_{expert_ids[t, j]}(x[t])
//   expert_e(x) = W2_e (round(silu(x G_e^T) * (x U_e^T)))
// with G_e the first `inter` rows of w13[e] and U_e the next `inter` (Hugging Face's
// gate_up_proj layout). round() stores the activation in `dtype` (a no-op in fp32); the
// matmuls accumulate in fp32 and out is fp32.
//
// x (n_tokens, hidden); routing_weights (n_tokens, top_k) fp32; expert_ids (n_tokens, top_k)
// int64, values in [0, num_experts) (slots with other values are skipped; the binding rejects
// them); w13 (num_experts, 2 * inter, hidden); w2 (num_experts, hidden, inter); out
// (n_tokens, hidden) fp32, fully written. Last dims contiguous, the other strides free.
// ---------------------------------------------------------------------------------------
struct MoeParams {
  const void* x = nullptr;
  const float* routing_weights = nullptr;
  const int64_t* expert_ids = nullptr;
  const void* w13 = nullptr;
  const void* w2 = nullptr;
  float* out = nullptr;
  int64_t x_row_stride = 0;
  int64_t routing_weights_row_stride = 0;
  int64_t expert_ids_row_stride = 0;
  int64_t w13_expert_stride = 0, w13_row_stride = 0;
  int64_t w2_expert_stride = 0, w2_row_stride = 0;
  int64_t out_row_stride = 0;

  int64_t n_tokens = 0, top_k = 0, num_experts = 0, hidden = 0, inter = 0;
  DType dtype = DType::kFloat32;  // of x, w13, w2 (and of the stored activation)
};

}  // namespace fastattn
