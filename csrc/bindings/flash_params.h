// flash_params.h — tensors -> FlashFwdParams, shared by the forward binding (flash_attn.cpp)
// and the backward binding (flash_attn_bwd.cpp, whose FlashBwdParams embeds the forward's).
// q (B, Sq, H, D), k/v (B, Sk, Hk, D), out (B, Sq, H, D), lse (B, H, Sq) fp32; inputs are
// validated by the caller.
#pragma once

#include "common.h"

namespace fastattn {

inline FlashFwdParams flash_fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& out, const at::Tensor& lse, double softmax_scale,
                                        int64_t window_left, int64_t window_right) {
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
  p.dtype = to_dtype(q.scalar_type());
  return p;
}


}  // namespace fastattn
