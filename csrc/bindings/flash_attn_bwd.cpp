// flash_attn_bwd.cpp — tensors -> FlashBwdParams for the FlashAttention backward, validation,
// scratch allocation (delta, and the CUDA kernels' workspace) and device dispatch.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

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
                 " has no CUDA backward kernel (supported: 32, 64, 96, 128, 192, 256)");
  }
#endif
}

// The kernels recompute P = exp(scale * s - lse) from ONE fp32 lse per row. That is exact to
// a few ulps while |lse| is moderate, but the fp32 spacing of lse grows with it (2^-14 at
// 512, about 1e11 at softmax_scale = 1e9), and a saturated softmax, whose P row must be
// one-hot at the row maximum, then comes out as inf or 0. Past this bound the gradients are
// computed by exact_backward instead. Ordinary attention (|scale * s| in the tens) never
// gets near it.
constexpr double kLseExactLimit = 512.0;

}  // namespace

bool needs_exact_backward(const at::Tensor& lse, double softmax_scale) {
  // On CUDA the test reads lse on the host (one synchronisation); scales of magnitude <= 1,
  // the scale of every real model, skip it, and so does a backward being captured into a CUDA
  // graph (a host read would invalidate the capture: there the kernels run whatever the lse).
  if (lse.is_cuda() && (std::abs(softmax_scale) <= 1.0 || is_capturing(lse))) return false;
  const at::Tensor finite_abs = at::where(at::isfinite(lse), lse.abs(), at::zeros({}, lse.options()));
  return finite_abs.max().item<double>() > kLseExactLimit;
}

// a (m, k) times b (n, k)^T, fp32. On the CPU by a plain loop in which every output element
// sums its k products in a fixed order, rows split over threads: the CPU gemm splits its sums
// by the thread count (the same matmul gave other bits on 1 and 3 threads), and the backward
// promises the same bits on any thread count. The order is two-level: kChunk products summed
// into a partial, the partials summed in turn. One serial chain over k (a row sum over 4k keys,
// dQ = dS K with dS summing to ~0 against a K with a large common part) lost up to 30x the
// accuracy of a blocked sum; two levels keep the error at O(k / kChunk + kChunk) roundings.
// Four rows share each row of b^T (a few GFLOP/s: only exact_backward's rare inputs come here).
at::Tensor matmul_nt(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_cpu()) return at::matmul(a, b.t());
  const at::Tensor a32 = a.to(at::kFloat).contiguous();     // (m, k)
  const at::Tensor bt = b.to(at::kFloat).t().contiguous();  // (k, n)
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  at::Tensor out = at::zeros({m, n}, a.options().dtype(at::kFloat));
  const float* ap = a32.data_ptr<float>();
  const float* bp = bt.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kRows = 4, kChunk = 64;
  const int64_t blocks = (m + kRows - 1) / kRows;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, n * k)), [&](int64_t b0, int64_t b1) {
    std::vector<float> partial(static_cast<size_t>(kRows * n));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kRows, rows = std::min(kRows, m - i0);
      float* o[kRows];
      for (int64_t r = 0; r < kRows; ++r) o[r] = partial.data() + std::min(r, rows - 1) * n;
      for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
        std::fill(partial.begin(), partial.end(), 0.0f);
        for (int64_t kk = k0; kk < std::min(k, k0 + kChunk); ++kk) {
          const float* br = bp + kk * n;
          if (rows == kRows) {
            const float x0 = ap[i0 * k + kk], x1 = ap[(i0 + 1) * k + kk], x2 = ap[(i0 + 2) * k + kk],
                        x3 = ap[(i0 + 3) * k + kk];
            float *o0 = o[0], *o1 = o[1], *o2 = o[2], *o3 = o[3];
            for (int64_t j = 0; j < n; ++j) {
              o0[j] += x0 * br[j];
              o1[j] += x1 * br[j];
              o2[j] += x2 * br[j];
              o3[j] += x3 * br[j];
            }
          } else {
            for (int64_t r = 0; r < rows; ++r) {
              const float x = ap[(i0 + r) * k + kk];
              float* orow = o[r];
              for (int64_t j = 0; j < n; ++j) orow[j] += x * br[j];
            }
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* orow = op + (i0 + r) * n;
          for (int64_t j = 0; j < n; ++j) orow[j] += o[r][j];
        }
      }
    }
  });
  return out;
}

// The same gradients with fp32 ATen ops, one (batch, query head) at a time (O(Sq * Sk)
// memory for that head only), the softmax taken around each row's RAW maximum score so the
// maximum gets exponent exactly 0 for any finite scale: P = exp(|scale| * (a - max a)) / l
// with a = sign(scale) * s. window_left/right are the normalised ones of FlashFwdParams.
// Soft-capped (softcap > 0): the scores are c * tanh(scale * s / c), bounded by c, taken as
// they are (no raw-max trick needed), and dS gets the cap's derivative 1 - tanh^2.
void exact_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
                    at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t b = q.size(0), sq = q.size(1), h = q.size(2), sk = k.size(1), h_k = k.size(2);
  const int64_t group = h / h_k;
  // Every sum below is taken in a fixed order (matmul_nt, also for the row sums: an ATen
  // reduction may split its sums by the thread count too); the rest is elementwise or a max.
  const auto idx = q.options().dtype(at::kLong);
  const at::Tensor pos = at::arange(sq, idx).unsqueeze(1) + (sk - sq);  // bottom-right diagonal
  const at::Tensor j = at::arange(sk, idx).unsqueeze(0);
  at::Tensor visible = at::ones({sq, sk}, q.options().dtype(at::kBool));
  if (window_left >= 0) visible = visible.logical_and(j >= pos - window_left);
  if (window_right >= 0) visible = visible.logical_and(j <= pos + window_right);
  const double sign = softmax_scale < 0 ? -1.0 : 1.0, magnitude = std::abs(softmax_scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::Tensor dk32 = at::zeros(k.sizes(), k.options().dtype(at::kFloat));
  at::Tensor dv32 = at::zeros(v.sizes(), v.options().dtype(at::kFloat));
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t hi = 0; hi < h; ++hi) {
      const int64_t hk = hi / group;
      const at::Tensor qh = q[bi].select(1, hi).to(at::kFloat);  // (Sq, D)
      const at::Tensor kh = k[bi].select(1, hk).to(at::kFloat);  // (Sk, D)
      const at::Tensor vh = v[bi].select(1, hk).to(at::kFloat);
      const at::Tensor doh = dout[bi].select(1, hi).to(at::kFloat);
      const at::Tensor raw = matmul_nt(qh, kh);
      at::Tensor t;  // tanh(scale * s / c) when capped
      at::Tensor a;
      double exp_scale = magnitude;
      if (softcap > 0) {
        t = at::tanh(raw * (softmax_scale / softcap));
        a = (t * softcap).masked_fill(visible.logical_not(), neg_inf);
        exp_scale = 1.0;
      } else {
        a = (raw * sign).masked_fill(visible.logical_not(), neg_inf);
      }
      at::Tensor row_max = std::get<0>(a.max(-1, /*keepdim=*/true));
      row_max = at::where(at::isinf(row_max), at::zeros({}, row_max.options()), row_max);  // rows with no key
      const at::Tensor e = at::exp((a - row_max) * exp_scale);
      const at::Tensor ones = at::ones({1, sk}, e.options());
      const at::Tensor p = at::nan_to_num(e / matmul_nt(e, ones), 0.0);  // P (Sq, Sk)
      const at::Tensor dp = matmul_nt(doh, vh);
      at::Tensor ds = p * (dp - matmul_nt(p * dp, ones));
      if (softcap > 0) ds = ds * (1 - t * t);
      dq[bi].select(1, hi).copy_(matmul_nt(ds, kh.t()) * softmax_scale);
      dk32[bi].select(1, hk).add_(matmul_nt(ds.t(), qh.t()) * softmax_scale);
      dv32[bi].select(1, hk).add_(matmul_nt(p.t(), doh.t()));
    }
  }
  dk.copy_(dk32);
  dv.copy_(dv32);
}

namespace {

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
    double softmax_scale, int64_t window_left, int64_t window_right, bool deterministic, double softcap) {
  check_inputs(dout_in, q_in, k_in, v_in, out_in, lse_in, window_left, window_right);
  check_softcap(softcap, kOp);
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
  // delta (and on CUDA, lse * log2 e: FlashBwdParams::lse_log2) in one scratch allocation.
  at::Tensor delta = at::empty({q.is_cuda() ? 2 : 1, b, h, sq}, q.options().dtype(at::kFloat));

  FlashBwdParams p;
  FA_CHECK_ARG(std::isfinite(static_cast<float>(softmax_scale)), kOp,
               "softmax_scale must be finite in float32, got ", softmax_scale);
  p.fwd = flash_fwd_params(q, k, v, out, lse, softmax_scale, window_left, window_right, softcap);
  p.dout = dout.data_ptr();
  set_strides(dout, &p.dout_batch_stride, &p.dout_row_stride, &p.dout_head_stride);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  set_strides(dq, &p.dq_batch_stride, &p.dq_row_stride, &p.dq_head_stride);
  set_strides(dk, &p.dk_batch_stride, &p.dk_row_stride, &p.dk_head_stride);
  set_strides(dv, &p.dv_batch_stride, &p.dv_row_stride, &p.dv_head_stride);
  p.delta = delta.data_ptr<float>();
  if (q.is_cuda()) p.lse_log2 = delta[1].data_ptr<float>();
  p.deterministic = deterministic;

  if (needs_exact_backward(lse, softmax_scale)) {
    exact_backward(dout, q, k, v, softmax_scale, p.fwd.window_left, p.fwd.window_right, softcap, dq, dk, dv);
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
    check_flash_bwd_smem(q, q.size(3), "flash_attention (backward)");
    FA_CUDA_CHECK_LAUNCH(flash_bwd_cuda(p, current_stream(q)), "flash attention backward");
#endif
  } else {
    flash_bwd_cpu(p);
  }
  return {dq, dk, dv};
}

}  // namespace fastattn
