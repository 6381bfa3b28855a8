// flash_attn_bwd.cpp — tensors -> FlashBwdParams for the FlashAttention backward, validation,
// scratch allocation (delta, and the CUDA kernels' workspace) and device dispatch.
#include "common.h"
#include "fastattn/api.h"
#include "flash_params.h"
#include "ops.h"

namespace fastattn {
namespace {

constexpr const char* kOp = "fastattn.flash_attn_bwd: ";

void check_4d(const at::Tensor& t, const char* name, const char* layout) {
  FA_CHECK_ARG(t.dim() == 4, kOp, name, " must be 4-D ", layout, ", got shape ", t.sizes());
}

void check_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                  int64_t window_left, int64_t window_right) {
  check_device_supported(q, "q");
  check_float_dtype(q, "q", /*allow_fp32_cuda=*/false);
  const std::pair<const at::Tensor*, const char*> same[] = {
      {&k, "k"}, {&v, "v"}, {&out, "out"}, {&dout, "dout"}};
  for (const auto& [t, name] : same) {
    check_same_device(*t, q, name, "q");
    check_same_dtype(*t, q, name, "q");
  }
  check_same_device(lse, q, "lse", "q");
  check_4d(q, "q", "(batch, seqlen_q, heads, head_dim)");
  check_4d(k, "k", "(batch, seqlen_k, kv_heads, head_dim)");
  check_4d(v, "v", "(batch, seqlen_k, kv_heads, head_dim)");
  check_4d(out, "out", "(batch, seqlen_q, heads, head_dim)");
  check_4d(dout, "dout", "(batch, seqlen_q, heads, head_dim)");
  const int64_t b = q.size(0), sq = q.size(1), h = q.size(2), d = q.size(3);
  FA_CHECK_ARG(d >= 1, kOp, "head_dim must be >= 1, got q of shape ", q.sizes());
  FA_CHECK_ARG(k.size(0) == b && k.size(3) == d, kOp, "k must have q's batch ", b,
               " and head_dim ", d, ", got shape ", k.sizes());
  FA_CHECK_ARG(v.sizes() == k.sizes(), kOp, "v must have k's shape ", k.sizes(), ", got ",
               v.sizes());
  const int64_t hk = k.size(2);
  FA_CHECK_ARG(hk >= 1 && h % hk == 0, kOp, "q's heads (", h,
               ") must be a multiple of k/v's heads (", hk, ")");
  FA_CHECK_ARG(out.sizes() == q.sizes(), kOp, "out must have q's shape ", q.sizes(), ", got ",
               out.sizes());
  FA_CHECK_ARG(dout.sizes() == q.sizes(), kOp, "dout must have q's shape ", q.sizes(),
               ", got ", dout.sizes());
  FA_CHECK_ARG(lse.scalar_type() == at::kFloat, kOp, "lse must be float32, got ",
               lse.scalar_type());
  FA_CHECK_ARG(lse.dim() == 3 && lse.size(0) == b && lse.size(1) == h && lse.size(2) == sq, kOp,
               "lse must have shape (", b, ", ", h, ", ", sq, ") = (batch, heads, seqlen_q), got ",
               lse.sizes());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  check_last_dim_contiguous(out, "out");
  check_last_dim_contiguous(dout, "dout");
  FA_CHECK_ARG(window_left >= -1 && window_right >= -1, kOp,
               "window_left and window_right must be >= -1 (-1 = unbounded), got (", window_left,
               ", ", window_right, ")");
#ifdef FASTATTN_WITH_CUDA
  if (q.is_cuda()) {
    FA_CHECK_ARG(flash_bwd_cuda_supports_head_dim(d), kOp, "head_dim ", d,
                 " has no CUDA backward kernel (supported: 64, 128)");
  }
#endif
}

#ifdef FASTATTN_WITH_CUDA
// The CUDA kernels read q, k, v, out and dout with 16-byte vector loads: base 16-byte aligned
// and every batch / row / head stride a multiple of 8 elements. Anything else is copied.
at::Tensor cuda_layout(const at::Tensor& t) {
  const bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 &&
                  t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  return ok ? t : dense_aligned_copy(t);
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    double softmax_scale, int64_t window_left, int64_t window_right, bool deterministic) {
  check_inputs(dout_in, q_in, k_in, v_in, out_in, lse_in, window_left, window_right);
  at::Tensor dq = empty_output(q_in.sizes(), q_in.options());
  at::Tensor dk = empty_output(k_in.sizes(), k_in.options());
  at::Tensor dv = empty_output(v_in.sizes(), v_in.options());
  const int64_t b = q_in.size(0), sq = q_in.size(1), h = q_in.size(2), sk = k_in.size(1);
  if (b == 0 || h == 0 || sq == 0 || sk == 0) {  // nothing attends: every gradient is 0
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }

  at::Tensor dout = dout_in, q = q_in, k = k_in, v = v_in, out = out_in;
#ifdef FASTATTN_WITH_CUDA
  if (q.is_cuda()) {
    dout = cuda_layout(dout);
    q = cuda_layout(q);
    k = cuda_layout(k);
    v = cuda_layout(v);
    out = cuda_layout(out);
  }
#endif
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty({b, h, sq}, q.options().dtype(at::kFloat));

  FlashBwdParams p;
  p.fwd = flash_fwd_params(q, k, v, out, lse, softmax_scale, window_left, window_right);
  p.dout = dout.data_ptr();
  set_strides(dout, &p.dout_batch_stride, &p.dout_row_stride, &p.dout_head_stride);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  set_strides(dq, &p.dq_batch_stride, &p.dq_row_stride, &p.dq_head_stride);
  set_strides(dk, &p.dk_batch_stride, &p.dk_row_stride, &p.dk_head_stride);
  set_strides(dv, &p.dv_batch_stride, &p.dv_row_stride, &p.dv_head_stride);
  p.delta = delta.data_ptr<float>();
  p.deterministic = deterministic;

  if (q.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t ws_floats = flash_bwd_cuda_workspace_floats(p);
    at::Tensor workspace;
    if (ws_floats > 0) {
      workspace = at::empty({ws_floats}, q.options().dtype(at::kFloat));
      p.workspace = workspace.data_ptr<float>();
    }
    FA_CUDA_CHECK_LAUNCH(flash_bwd_cuda(p, current_stream(q)), "flash attention backward");
#endif
  } else {
    flash_bwd_cpu(p);
  }
  return {dq, dk, dv};
}

}  // namespace fastattn
