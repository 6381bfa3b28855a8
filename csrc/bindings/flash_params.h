// flash_params.h — tensors -> FlashFwdParams, shared by the forward binding (flash_attn.cpp)
// and the backward binding (flash_attn_bwd.cpp, whose FlashBwdParams embeds the forward's).
// q (B, Sq, H, D), k/v (B, Sk, Hk, D), out (B, Sq, H, D), lse (B, H, Sq) fp32; inputs are
// validated by the caller.
#pragma once

#include "common.h"

namespace fastattn {

inline FlashFwdParams flash_fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& out, const at::Tensor& lse, double softmax_scale,
                                        int64_t window_left, int64_t window_right, double softcap) {
  FlashFwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_strides(q, &p.q_batch_stride, &p.q_row_stride, &p.q_head_stride);
  set_strides(k, &p.k_batch_stride, &p.k_row_stride, &p.k_head_stride);
  set_strides(v, &p.v_batch_stride, &p.v_row_stride, &p.v_head_stride);
  set_strides(out, &p.out_batch_stride, &p.out_row_stride, &p.out_head_stride);
  p.b = q.size(0);
  p.seqlen_q = q.size(1);
  p.seqlen_k = k.size(1);
  p.h = q.size(2);
  p.h_k = k.size(2);
  p.d = q.size(3);
  p.softmax_scale = static_cast<float>(softmax_scale);
  // A side of the band at least seqlen_q + seqlen_k wide excludes no key: it is unbounded.
  // Normalising here keeps huge values (users write sys.maxsize for "unbounded") out of the
  // kernels' band arithmetic, where i + seqlen_k - seqlen_q + window would overflow.
  const int64_t no_bound = p.seqlen_q + p.seqlen_k;
  p.window_left = window_left >= no_bound ? -1 : window_left;
  p.window_right = window_right >= no_bound ? -1 : window_right;
  p.is_causal = p.window_left < 0 && p.window_right == 0;
  p.softcap = static_cast<float>(softcap);
  p.dtype = to_dtype(q.scalar_type());
  return p;
}

// The (row, head) strides of a 3-D packed (total, H, D) tensor; its batch stride is 0.
inline void set_packed_strides(const at::Tensor& t, int64_t* batch, int64_t* row, int64_t* head) {
  *batch = 0;
  *row = t.stride(0);
  *head = t.stride(1);
}

// Varlen (packed) form: q/out (total_q, H, D), k/v (total_k, Hk, D), lse (H, total_q) fp32,
// cu_seqlens_q/_k (B + 1) int32 contiguous on the tensors' device (params.h documents the
// fields). seqlen_q / seqlen_k hold the max_seqlen bounds; a window side at least
// max_seqlen_q + max_seqlen_k wide is unbounded for every sequence.
inline FlashFwdParams flash_varlen_fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& out, const at::Tensor& lse,
                                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                              int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                              int64_t window_left, int64_t window_right, double softcap) {
  FlashFwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_packed_strides(q, &p.q_batch_stride, &p.q_row_stride, &p.q_head_stride);
  set_packed_strides(k, &p.k_batch_stride, &p.k_row_stride, &p.k_head_stride);
  set_packed_strides(v, &p.v_batch_stride, &p.v_row_stride, &p.v_head_stride);
  set_packed_strides(out, &p.out_batch_stride, &p.out_row_stride, &p.out_head_stride);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.b = cu_seqlens_q.size(0) - 1;
  p.seqlen_q = max_seqlen_q;
  p.seqlen_k = max_seqlen_k;
  p.h = q.size(1);
  p.h_k = k.size(1);
  p.d = q.size(2);
  p.softmax_scale = static_cast<float>(softmax_scale);
  const int64_t no_bound = p.seqlen_q + p.seqlen_k;
  p.window_left = window_left >= no_bound ? -1 : window_left;
  p.window_right = window_right >= no_bound ? -1 : window_right;
  p.is_causal = p.window_left < 0 && p.window_right == 0;
  p.softcap = static_cast<float>(softcap);
  p.dtype = to_dtype(q.scalar_type());
  return p;
}

// flash_attn_bwd.cpp: the exact fp32 backward for |lse| beyond what one fp32 lse per row
// resolves (shared with the varlen backward, which runs it per sequence). q/k/v/dout
// (B, S, H, D); window sides already normalised.
bool needs_exact_backward(const at::Tensor& lse, double softmax_scale);
void exact_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
                    at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

}  // namespace fastattn
