// flash_attn_varlen.cpp — the variable-length (packed) FlashAttention forward and backward:
// validation, tensors -> FlashFwdParams / FlashBwdParams with the varlen fields set
// (params.h), scratch and device dispatch to the same kernels as the dense op
// (flash_fwd_cpu / flash_fwd_cuda, flash_bwd_cpu / flash_bwd_cuda).
//
// q (total_q, H, D), k/v (total_k, Hk, D) packed along tokens, last dim contiguous, other
// strides free; cu_seqlens_q / cu_seqlens_k (B + 1) int32 on the tensors' device; sequence
// i owns query rows [cu_seqlens_q[i], cu_seqlens_q[i+1]) and key rows [cu_seqlens_k[i],
// cu_seqlens_k[i+1]) and is masked with its own lengths exactly as flash_attn_fwd masks a
// (1, Sq_i, H, D) x (1, Sk_i, Hk, D) problem. out (total_q, H, D), lse (H, total_q) fp32.
//
// Host synchronisation: on the CPU the values of cu_seqlens are validated (start at 0,
// non-decreasing, end at or before total_q / total_k, every length <= max_seqlen). Rows past
// the last sequence (spare rows of a preallocated buffer, which flash-attn accepts too) are
// not read; on the CPU their out / dq / dk / dv rows are 0 and their lse -inf, on CUDA they
// are left unwritten (as flash-attn leaves them). On CUDA the values are
// never read on the host (that would synchronise and break graph capture): max_seqlen_q /
// _k size the launch and the kernels clamp every sequence to the tensors, so malformed
// cu_seqlens are memory-safe but give unspecified results.
#include <cmath>
#include <limits>

#include "common.h"
#include "fastattn/api.h"
#include "flash_params.h"
#include "ops.h"

namespace fastattn {
namespace {

constexpr int64_t kMaxHeadDimCpu = 512;

void check_3d(const at::Tensor& t, const char* op, const char* name, const char* layout) {
  FA_CHECK_ARG(t.dim() == 3, op, name, " must have 3 dimensions ", layout, ", got shape ", t.sizes());
}

// Metadata checks of cu_seqlens_q / cu_seqlens_k (never their values).
void check_cu_seqlens(const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Tensor& q, const char* op) {
  const std::pair<const at::Tensor*, const char*> cus[] = {{&cu_q, "cu_seqlens_q"}, {&cu_k, "cu_seqlens_k"}};
  for (const auto& [t, name] : cus) {
    FA_CHECK_ARG(t->scalar_type() == at::kInt, op, name, " must be int32, got ", t->scalar_type());
    FA_CHECK_ARG(t->dim() == 1 && t->size(0) >= 1, op, name,
                 " must be 1-D of length B + 1 (cumulative sequence lengths from 0), got shape ", t->sizes());
    FA_CHECK_ARG(t->device() == q.device(), op, name, " is on ", t->device(), " but must be on ", q.device(),
                 " with q, k and v");
  }
  FA_CHECK_ARG(cu_q.size(0) == cu_k.size(0), op,
               "cu_seqlens_q and cu_seqlens_k must have the same length B + 1 (one entry per sequence, plus one), "
               "got ", cu_q.size(0), " and ", cu_k.size(0));
}

// CPU only: the values of one cu_seqlens tensor (a few host reads of a (B + 1) tensor).
void check_cu_values(const at::Tensor& cu, int64_t total, int64_t max_seqlen, const char* name, const char* total_name,
                     const char* max_name, const char* op) {
  const at::Tensor c = cu.contiguous();
  const int32_t* v = c.data_ptr<int32_t>();
  const int64_t n = c.size(0);
  FA_CHECK_ARG(v[0] == 0, op, name, " must start at 0, got ", v[0]);
  for (int64_t i = 0; i + 1 < n; ++i) {
    const int64_t len = static_cast<int64_t>(v[i + 1]) - v[i];
    FA_CHECK_ARG(len >= 0, op, name, " must be non-decreasing, got ", name, "[", i + 1, "] = ", v[i + 1], " < ",
                 name, "[", i, "] = ", v[i]);
    FA_CHECK_ARG(len <= max_seqlen, op, "sequence ", i, " has length ", len, " (", name, ") but ", max_name,
                 " is ", max_seqlen, "; ", max_name, " must be at least the longest sequence");
  }
  FA_CHECK_ARG(v[n - 1] <= total, op, name, " must end at or before ", total_name, " = ", total, ", got ",
               v[n - 1]);
}

void check_varlen_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                         const at::Tensor& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                         int64_t window_left, int64_t window_right, const char* op) {
  check_device_supported(q, "q");
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");
  check_float_dtype(q, "q", /*allow_fp32_cuda=*/false);
  check_same_dtype(k, q, "k", "q");
  check_same_dtype(v, q, "v", "q");
  check_3d(q, op, "q", "(total_q, H, D)");
  check_3d(k, op, "k", "(total_k, Hk, D)");
  check_3d(v, op, "v", "(total_k, Hk, D)");
  FA_CHECK_ARG(k.sizes() == v.sizes(), op, "k and v must have the same shape, got k ", k.sizes(), " and v ",
               v.sizes());
  FA_CHECK_ARG(k.size(2) == q.size(2), op, "k must have q's head dim ", q.size(2), ", got ", k.size(2));
  const int64_t h = q.size(1), h_k = k.size(1), d = q.size(2);
  FA_CHECK_ARG(h_k >= 1 && h % h_k == 0, op, "the number of query heads (", h,
               ") must be a multiple of the number of key/value heads (", h_k, ")");
  if (q.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    FA_CHECK_ARG(flash_fwd_cuda_supports_head_dim(d), op, "head dim ", d,
                 " is not supported on CUDA (supported: 32, 64, 96, 128, 192, 256)");
#endif
  } else {
    FA_CHECK_ARG(d >= 1 && d <= kMaxHeadDimCpu, op, "head dim must be in [1, ", kMaxHeadDimCpu,
                 "] on the CPU, got ", d);
  }
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  check_cu_seqlens(cu_q, cu_k, q, op);
  FA_CHECK_ARG(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, "max_seqlen_q and max_seqlen_k must be >= 0, got ",
               max_seqlen_q, " and ", max_seqlen_k);
  FA_CHECK_ARG(max_seqlen_q <= std::numeric_limits<int32_t>::max() &&
                   max_seqlen_k <= std::numeric_limits<int32_t>::max(),
               op, "max_seqlen_q and max_seqlen_k must fit in int32 (as cu_seqlens), got ", max_seqlen_q, " and ",
               max_seqlen_k);
  FA_CHECK_ARG(window_left >= -1 && window_right >= -1, op,
               "window sizes must be >= 0 or -1 (unbounded), got (", window_left, ", ", window_right, ")");
  FA_CHECK_ARG(std::isfinite(static_cast<float>(softmax_scale)), op,
               "softmax_scale must be finite in float32, got ", softmax_scale);
  if (q.is_cpu()) {
    check_cu_values(cu_q, q.size(0), max_seqlen_q, "cu_seqlens_q", "total_q (q.shape[0])", "max_seqlen_q", op);
    check_cu_values(cu_k, k.size(0), max_seqlen_k, "cu_seqlens_k", "total_k (k.shape[0])", "max_seqlen_k", op);
  }
}

#ifdef FASTATTN_WITH_CUDA
// The CUDA kernels' 16-byte loads: base aligned, row and head strides multiples of 8.
at::Tensor cuda_layout3(const at::Tensor& t) {
  const bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 &&
                  t.stride(1) % 8 == 0;
  return ok ? t : dense_aligned_copy(t);
}
#endif

constexpr const char* kFwdOp = "fastattn.flash_attention_varlen: ";
constexpr const char* kBwdOp = "fastattn.flash_attn_varlen_bwd: ";

// CPU: the last entry of a cu_seqlens tensor (validated by check_cu_values); rows from it on
// belong to no sequence.
int64_t cu_end(const at::Tensor& cu) { return cu[-1].item<int32_t>(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                         int64_t max_seqlen_k, double softmax_scale,
                                                         int64_t window_left, int64_t window_right, double softcap) {
  check_varlen_inputs(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                      window_left, window_right, kFwdOp);
  check_softcap(softcap, kFwdOp);
  const int64_t total_q = q_in.size(0), h = q_in.size(1), d = q_in.size(2), total_k = k_in.size(0);
  const int64_t b = cu_seqlens_q.size(0) - 1;
  at::Tensor out = empty_output({total_q, h, d}, q_in.options());
  at::Tensor lse = at::empty({h, total_q}, q_in.options().dtype(at::kFloat));
  if (total_q == 0 || h == 0) return {out, lse};
  if (b == 0 || max_seqlen_q == 0 || total_k == 0 || max_seqlen_k == 0) {  // no row sees a key
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  at::Tensor q = q_in, k = k_in, v = v_in;
  if (q.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    q = cuda_layout3(q);
    k = cuda_layout3(k);
    v = cuda_layout3(v);
    const FlashFwdParams p = flash_varlen_fwd_params(q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                                     softmax_scale, window_left, window_right, softcap);
    FA_CHECK_ARG(flash_fwd_cuda_supports_layout(p), kFwdOp,
                 "problem size outside the CUDA kernel's limits (seqlens <= 2^28, batch and heads <= 65535)");
    FA_CUDA_CHECK_LAUNCH(flash_fwd_cuda(p, current_stream(q)), "flash_attn varlen forward");
#endif
  } else {
    const FlashFwdParams p = flash_varlen_fwd_params(q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                                     softmax_scale, window_left, window_right, softcap);
    flash_fwd_cpu(p);
    const int64_t end_q = cu_end(cu_q);  // spare rows past the last sequence see no key
    out.slice(0, end_q).zero_();
    lse.slice(1, end_q).fill_(-std::numeric_limits<float>::infinity());
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_varlen_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    int64_t window_left, int64_t window_right, bool deterministic, double softcap) {
  check_varlen_inputs(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                      window_left, window_right, kBwdOp);
  check_softcap(softcap, kBwdOp);
  const std::pair<const at::Tensor*, const char*> same[] = {{&out_in, "out"}, {&dout_in, "dout"}};
  for (const auto& [t, name] : same) {
    check_same_device(*t, q_in, name, "q");
    check_same_dtype(*t, q_in, name, "q");
    FA_CHECK_ARG(t->sizes() == q_in.sizes(), kBwdOp, name, " must have q's shape ", q_in.sizes(), ", got ",
                 t->sizes());
    check_last_dim_contiguous(*t, name);
  }
  check_same_device(lse_in, q_in, "lse", "q");
  const int64_t total_q = q_in.size(0), h = q_in.size(1), total_k = k_in.size(0);
  FA_CHECK_ARG(lse_in.scalar_type() == at::kFloat, kBwdOp, "lse must be float32, got ", lse_in.scalar_type());
  FA_CHECK_ARG(lse_in.dim() == 2 && lse_in.size(0) == h && lse_in.size(1) == total_q, kBwdOp,
               "lse must have shape (", h, ", ", total_q, ") = (heads, total_q), got ", lse_in.sizes());
#ifdef FASTATTN_WITH_CUDA
  if (q_in.is_cuda()) {
    FA_CHECK_ARG(flash_bwd_cuda_supports_head_dim(q_in.size(2)), kBwdOp, "head_dim ", q_in.size(2),
                 " has no CUDA backward kernel (supported: 32, 64, 96, 128, 192, 256)");
  }
#endif
  at::Tensor dq = empty_output(q_in.sizes(), q_in.options());
  at::Tensor dk = empty_output(k_in.sizes(), k_in.options());
  at::Tensor dv = empty_output(v_in.sizes(), v_in.options());
  const int64_t b = cu_seqlens_q.size(0) - 1;
  if (b == 0 || h == 0 || total_q == 0 || total_k == 0 || max_seqlen_q == 0 || max_seqlen_k == 0) {
    dq.zero_();  // nothing attends: every gradient is 0
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  at::Tensor dout = dout_in, q = q_in, k = k_in, v = v_in, out = out_in;
#ifdef FASTATTN_WITH_CUDA
  if (q.is_cuda()) {
    dout = cuda_layout3(dout);
    q = cuda_layout3(q);
    k = cuda_layout3(k);
    v = cuda_layout3(v);
    out = cuda_layout3(out);
  }
#endif
  const at::Tensor lse = lse_in.contiguous();
  // delta (and on CUDA, lse * log2 e: FlashBwdParams::lse_log2) in one scratch allocation.
  at::Tensor delta = at::empty({q.is_cuda() ? 2 : 1, h, total_q}, q.options().dtype(at::kFloat));

  FlashBwdParams p;
  p.fwd = flash_varlen_fwd_params(q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                  window_left, window_right, softcap);
  p.dout = dout.data_ptr();
  set_packed_strides(dout, &p.dout_batch_stride, &p.dout_row_stride, &p.dout_head_stride);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  set_packed_strides(dq, &p.dq_batch_stride, &p.dq_row_stride, &p.dq_head_stride);
  set_packed_strides(dk, &p.dk_batch_stride, &p.dk_row_stride, &p.dk_head_stride);
  set_packed_strides(dv, &p.dv_batch_stride, &p.dv_row_stride, &p.dv_head_stride);
  p.delta = delta.data_ptr<float>();
  if (q.is_cuda()) p.lse_log2 = delta[1].data_ptr<float>();
  p.deterministic = deterministic;

  if (needs_exact_backward(lse, softmax_scale)) {
    // Scores scaled far beyond any model's: the exact fp32 path of the dense op, one
    // sequence at a time (reads cu_seqlens on the host; on CUDA only when |scale| > 1).
    dq.zero_();
    dk.zero_();
    dv.zero_();
    const at::Tensor cq = cu_q.cpu(), ck = cu_k.cpu();
    const int32_t* vq = cq.data_ptr<int32_t>();
    const int32_t* vk = ck.data_ptr<int32_t>();
    for (int64_t i = 0; i < b; ++i) {
      const int64_t q0 = std::clamp<int64_t>(vq[i], 0, total_q), q1 = std::clamp<int64_t>(vq[i + 1], q0, total_q);
      const int64_t k0 = std::clamp<int64_t>(vk[i], 0, total_k), k1 = std::clamp<int64_t>(vk[i + 1], k0, total_k);
      if (q1 == q0 || k1 == k0) continue;
      auto seq = [](const at::Tensor& t, int64_t a, int64_t e) { return t.slice(0, a, e).unsqueeze(0); };
      at::Tensor dq_i = seq(dq, q0, q1), dk_i = seq(dk, k0, k1), dv_i = seq(dv, k0, k1);
      exact_backward(seq(dout, q0, q1), seq(q, q0, q1), seq(k, k0, k1), seq(v, k0, k1), softmax_scale,
                     p.fwd.window_left, p.fwd.window_right, softcap, dq_i, dk_i, dv_i);
    }
    return {dq, dk, dv};
  }

  if (q.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t ws_floats = flash_bwd_cuda_workspace_floats(p);
    at::Tensor workspace;
    if (ws_floats > 0) {
      workspace = at::empty({ws_floats}, q.options().dtype(at::kFloat));
      p.workspace = workspace.data_ptr<float>();
    }
    check_flash_bwd_smem(q, q.size(2), "flash_attention_varlen (backward)");
    FA_CUDA_CHECK_LAUNCH(flash_bwd_cuda(p, current_stream(q)), "flash attention varlen backward");
#endif
  } else {
    flash_bwd_cpu(p);
    dq.slice(0, cu_end(cu_q)).zero_();  // spare rows past the last sequence: no gradient
    const int64_t end_k = cu_end(cu_k);
    dk.slice(0, end_k).zero_();
    dv.slice(0, end_k).zero_();
  }
  return {dq, dk, dv};
}

}  // namespace fastattn
