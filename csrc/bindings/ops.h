// ops.h — the device-generic op implementations registered for CPU and CUDA in
// register_cpu.cpp / register_cuda.cpp. Each validates its arguments, fills the op's params
// struct and calls the CPU or CUDA launcher by the tensors' device. One section per op.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastattn {

// ---- rms_norm (rms_norm.cpp) -----------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight,
                                                double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_add_fwd(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight,
                                                const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& dh);

// ---- rotary (rotary.cpp) ---------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& cos, const at::Tensor& sin,
                                          const std::optional<at::Tensor>& positions,
                                          bool interleaved, bool conjugate, bool check_positions);
void rotary_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
             const at::Tensor& sin, const std::optional<at::Tensor>& positions, bool interleaved,
             bool conjugate, bool check_positions);

// ---- flash attention (flash_attn.cpp) --------------------------------------------------
std::tuple<at::Tensor, at::Tensor> flash_attn_fwd(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, double softmax_scale,
                                                  int64_t window_left, int64_t window_right, double softcap,
                                                  bool allow_short_query);
// flash_attn_bwd.cpp: dq, dk, dv (q/k/v's shapes and dtype) from the forward's out and lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double softmax_scale, int64_t window_left,
    int64_t window_right, bool deterministic, double softcap);

// ---- variable-length (packed) flash attention (flash_attn_varlen.cpp) --------------------
// q (total_q, H, D), k/v (total_k, Hk, D), cu_seqlens (B + 1) int32: out (total_q, H, D) and
// lse (H, total_q) fp32; the backward gives dq, dk, dv with q/k/v's shapes and dtype.
std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_fwd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                         int64_t max_seqlen_k, double softmax_scale,
                                                         int64_t window_left, int64_t window_right, double softcap);
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_varlen_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, int64_t window_left, int64_t window_right,
    bool deterministic, double softcap);

// ---- decode attention and append_kv (decode.cpp) ---------------------------------------
std::tuple<at::Tensor, at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache,
                                                    const at::Tensor& cache_seqlens,
                                                    std::optional<double> softmax_scale,
                                                    int64_t num_splits,
                                                    const std::optional<at::Tensor>& block_table, double softcap);
std::tuple<at::Tensor, at::Tensor> attention_with_kvcache(const at::Tensor& q, const at::Tensor& k_cache,
                                                          const at::Tensor& v_cache,
                                                          const at::Tensor& cache_seqlens,
                                                          const std::optional<at::Tensor>& block_table,
                                                          std::optional<double> softmax_scale, int64_t window_left,
                                                          int64_t window_right, int64_t seqlens_k_add,
                                                          int64_t num_splits, double softcap);
void append_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
               bool check_capacity);
// flash_attn_fwd for a few queries over many keys: the KV-cache kernels (CPU or CUDA), reading
// k/v in place (flash_attn.cpp decides when). Returns out (B, Sq, H, D) and lse (B, H, Sq).
std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_short_query(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, double softmax_scale,
                                                              int64_t window_left, int64_t window_right,
                                                              double softcap);

// ---- mixture-of-experts experts (moe.cpp; CPU only) ----------------------------------------
// x (N, hidden), routing_weights (N, k) fp32, expert_ids (N, k) int64, w13 (E, 2 * inter, hidden),
// w2 (E, hidden, inter): out (N, hidden) fp32 = the routed SwiGLU experts combined.
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& routing_weights, const at::Tensor& expert_ids,
                       const at::Tensor& w13, const at::Tensor& w2);

}  // namespace fastattn
