// flash_attn.cpp — tensors -> FlashFwdParams, validation, device dispatch of the
// FlashAttention forward (flash_fwd_cpu / flash_fwd_cuda).
//
// q (B, Sq, H, D), k/v (B, Sk, Hk, D) with the last dim contiguous and any other strides;
// out (B, Sq, H, D) contiguous in q's dtype; lse (B, H, Sq) fp32 contiguous. Masking is a
// (window_left, window_right) band around the bottom-right aligned diagonal, -1 unbounded;
// causal is (-1, 0).
#include <cmath>
#include <limits>

#include "common.h"
#include "fastattn/api.h"
#include "flash_params.h"
#include "ops.h"

namespace fastattn {
namespace {

// The CPU kernel handles any head dim; this cap only bounds its per-thread buffers.
constexpr int64_t kMaxHeadDimCpu = 512;

// A few queries over many keys (a decode step through flash_attention, as Hugging Face's
// cached generation does). On the CPU the tiled kernel would re-lay out and widen all of K and
// V for them; on CUDA it would run one 128-row query tile per (batch, query head) for <= 16
// rows, each tile streaming its kv head's whole K and V (group times over), with no split over
// the keys. The KV-cache kernels read k/v in place instead, each key row once per kv head for
// all its query rows, split over the keys to fill the machine (on CUDA the decode kernels,
// tensor cores for one query: decode_mma.cuh). Up to 16 queries, and only when the keys are
// at least 4x as many; on CUDA for the decode kernels' head dims (64, 96, 128, 256).
constexpr int64_t kShortQueryMax = 16;
bool use_short_query_path(const at::Tensor& q, const at::Tensor& k, int64_t sq, int64_t sk, double softcap) {
  // (empty problems stay below: the KV-cache entry refuses zero kv heads)
  if (sq < 1 || sq > kShortQueryMax || sk < 4 * sq || q.size(0) == 0 || q.size(2) == 0 || k.size(2) == 0)
    return false;
  // The KV-cache kernels count keys in int32 (cache_seqlens).
  if (sk > std::numeric_limits<int32_t>::max()) return false;
  if (!q.is_cuda()) return true;
#ifdef FASTATTN_WITH_CUDA
  if (!decode_cuda_supports_head_dim(q.size(3))) return false;
  // Only where the decode kernel this call would run fits the device's shared memory: on parts
  // with 99 KiB per block (sm_86 / sm_89 / sm_120) only head dim 64 and the tensor-core kernel
  // at 128 (one query, no softcap) do, while the flash forward always fits.
  DecodeParams p;
  p.b = q.size(0);
  p.seqlen_q = sq;
  p.h = q.size(2);
  p.h_k = k.size(2);
  p.d = q.size(3);
  p.softcap = static_cast<float>(softcap);
  const c10::cuda::CUDAGuard guard(q.device());
  p.smem_per_block_optin = cuda_smem_optin(q);
  return decode_cuda_launch_smem_bytes(p) <= p.smem_per_block_optin;
#else
  return false;
#endif
}

void check_flash_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        double softmax_scale, int64_t window_left, int64_t window_right, double softcap) {
  check_device_supported(q, "q");
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");
  check_float_dtype(q, "q", /*allow_fp32_cuda=*/false);
  check_same_dtype(k, q, "k", "q");
  check_same_dtype(v, q, "v", "q");
  FA_CHECK_ARG(q.dim() == 4, "fastattn.flash_attention: q must have 4 dimensions (B, Sq, H, D), got ",
               q.dim());
  FA_CHECK_ARG(k.dim() == 4, "fastattn.flash_attention: k must have 4 dimensions (B, Sk, Hk, D), got ",
               k.dim());
  FA_CHECK_ARG(v.dim() == 4, "fastattn.flash_attention: v must have 4 dimensions (B, Sk, Hk, D), got ",
               v.dim());
  FA_CHECK_ARG(k.sizes() == v.sizes(), "fastattn.flash_attention: k and v must have the same shape, got k ",
               k.sizes(), " and v ", v.sizes());
  FA_CHECK_ARG(k.size(0) == q.size(0), "fastattn.flash_attention: k must have q's batch size ", q.size(0),
               ", got ", k.size(0));
  FA_CHECK_ARG(k.size(3) == q.size(3), "fastattn.flash_attention: k must have q's head dim ", q.size(3),
               ", got ", k.size(3));
  const int64_t h = q.size(2), h_k = k.size(2), d = q.size(3);
  FA_CHECK_ARG(h_k >= 1 && h % h_k == 0,
               "fastattn.flash_attention: the number of query heads (", h,
               ") must be a multiple of the number of key/value heads (", h_k, ")");
  if (q.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    FA_CHECK_ARG(flash_fwd_cuda_supports_head_dim(d),
                 "fastattn.flash_attention: head dim ", d, " is not supported on CUDA (supported: 32, 64, 96, 128, 192, 256)");
#endif
  } else {
    FA_CHECK_ARG(d >= 1 && d <= kMaxHeadDimCpu, "fastattn.flash_attention: head dim must be in [1, ",
                 kMaxHeadDimCpu, "] on the CPU, got ", d);
    // Sequence lengths are int32 everywhere else (cu_seqlens, cache_seqlens, flash-attn's); the
    // tiled kernel's K^T scratch for more keys would take tens of GiB per kv head anyway.
    FA_CHECK_ARG(k.size(1) <= std::numeric_limits<int32_t>::max() && q.size(1) <= std::numeric_limits<int32_t>::max(),
                 "fastattn.flash_attention: sequence lengths must be below 2^31 on the CPU, got Sq = ", q.size(1),
                 ", Sk = ", k.size(1));
  }
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  FA_CHECK_ARG(window_left >= -1 && window_right >= -1,
               "fastattn.flash_attention: window sizes must be >= 0 or -1 (unbounded), got (", window_left,
               ", ", window_right, ")");
  FA_CHECK_ARG(std::isfinite(static_cast<float>(softmax_scale)),
               "fastattn.flash_attention: softmax_scale must be finite in float32, got ", softmax_scale);
  check_softcap(softcap, "fastattn.flash_attention: ");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, double softmax_scale,
                                                  int64_t window_left, int64_t window_right, double softcap,
                                                  bool allow_short_query) {
  check_flash_inputs(q, k, v, softmax_scale, window_left, window_right, softcap);
  const int64_t b = q.size(0), sq = q.size(1), h = q.size(2), d = q.size(3), sk = k.size(1);
  if (allow_short_query && use_short_query_path(q, k, sq, sk, softcap)) {
    return flash_attn_fwd_short_query(q, k, v, softmax_scale, window_left, window_right, softcap);
  }
  at::Tensor out = empty_output({b, sq, h, d}, q.options());
  at::Tensor lse = at::empty({b, h, sq}, q.options().dtype(at::kFloat));
  if (b == 0 || sq == 0 || h == 0) return {out, lse};
  if (sk == 0) {  // no keys: every row sees nothing
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  if (q.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    FA_CHECK_ARG(q.size(0) <= 65535 && q.size(2) <= 65535, "fastattn.flash_attention: batch ", q.size(0),
                 " and heads ", q.size(2), " must be <= 65535 on CUDA (the kernel's grid limits)");
    // (before any copy below: a length the kernel cannot take is refused, not copied first)
    FA_CHECK_ARG(sq <= (int64_t(1) << 28) && sk <= (int64_t(1) << 28),
                 "fastattn.flash_attention: problem size outside the CUDA kernel's limits (seqlens <= 2^28), got "
                 "seqlen_q = ", sq, ", seqlen_k = ", sk);
    FlashFwdParams p = flash_fwd_params(q, k, v, out, lse, softmax_scale, window_left, window_right, softcap);
    if (!flash_fwd_cuda_supports_layout(p)) {
      // Unaligned base pointers or strides that are not multiples of 8 elements (e.g. a
      // sliced view): the kernel's 16-byte copies need aligned rows, so hand it dense copies.
      const at::Tensor qc = dense_aligned_copy(q), kc = dense_aligned_copy(k), vc = dense_aligned_copy(v);
      p = flash_fwd_params(qc, kc, vc, out, lse, softmax_scale, window_left, window_right, softcap);
      FA_CHECK_ARG(flash_fwd_cuda_supports_layout(p),
                   "fastattn.flash_attention: problem size outside the CUDA kernel's limits "
                   "(seqlens <= 2^28, batch and heads <= 65535)");
      FA_CUDA_CHECK_LAUNCH(flash_fwd_cuda(p, current_stream(q)), "flash_attn forward");
      return {out, lse};
    }
    FA_CUDA_CHECK_LAUNCH(flash_fwd_cuda(p, current_stream(q)), "flash_attn forward");
#endif
  } else {
    const FlashFwdParams p = flash_fwd_params(q, k, v, out, lse, softmax_scale, window_left, window_right, softcap);
    flash_fwd_cpu(p);
  }
  return {out, lse};
}

}  // namespace fastattn
