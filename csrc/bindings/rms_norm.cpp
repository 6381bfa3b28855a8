// rms_norm.cpp — tensors -> RmsNormParams / RmsNormBwdParams, validation, device dispatch.
#include "common.h"
#include "fastattn/api.h"
#include "ops.h"

namespace fastattn {
namespace {

// eps may be any value, as in torch: negative or zero eps gives NaN/inf on rows whose mean
// square + eps <= 0, exactly where torch's does. The weight may have any floating dtype and
// any strides (see weight_for_kernel).
void check_rms_inputs(const at::Tensor& x, const std::optional<at::Tensor>& weight) {
  check_device_supported(x, "x");
  check_float_dtype(x, "x");
  FA_CHECK_ARG(x.dim() >= 1, "fastattn.rms_norm: x must have at least 1 dimension, got a scalar");
  check_last_dim_contiguous(x, "x");
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    check_same_device(w, x, "weight", "x");
    FA_CHECK_ARG(at::isFloatingType(w.scalar_type()),
                 "fastattn.rms_norm: weight must be a floating-point tensor, got ", w.scalar_type());
    FA_CHECK_ARG(w.dim() == 1 && w.size(0) == x.size(-1),
                 "fastattn.rms_norm: weight must have shape (", x.size(-1),
                 ",) to match x's last dimension, got ", w.sizes());
  }
}

// The kernels read the weight densely in x's dtype. A weight of another dtype (the fp32
// master weight of a 16-bit model: torch accepts it) is converted here, once per call; it is
// n elements, negligible next to the rows. dweight is fp32 whatever the weight's dtype.
at::Tensor weight_for_kernel(const std::optional<at::Tensor>& weight, const at::Tensor& x) {
  if (!weight.has_value()) return at::Tensor();
  return weight->to(x.scalar_type()).contiguous();
}

void launch_fwd(const RmsNormParams& p, const at::Tensor& x) {
  if (x.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    FA_CUDA_CHECK_LAUNCH(rms_norm_fwd_cuda(p, current_stream(x)), "rms_norm forward");
#endif
  } else {
    rms_norm_fwd_cpu(p);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight,
                                                double eps) {
  check_rms_inputs(x, weight);
  const int64_t n = x.size(-1);
  at::Tensor y = empty_output(x.sizes(), x.options());
  auto rstd_sizes = x.sizes().vec();
  rstd_sizes.pop_back();
  at::Tensor rstd = at::empty(rstd_sizes, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {y, rstd};

  const at::Tensor x2 = as_rows(x, n);
  const at::Tensor w = weight_for_kernel(weight, x);
  RmsNormParams p;
  p.x = x2.data_ptr();
  p.x_row_stride = x2.stride(0);
  p.weight = w.defined() ? w.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.y_row_stride = n;
  p.rstd = rstd.data_ptr<float>();
  p.rows = x2.size(0);
  p.n = n;
  p.eps = static_cast<float>(eps);
  p.dtype = to_dtype(x.scalar_type());
  launch_fwd(p, x);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_add_fwd(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    double eps) {
  check_rms_inputs(x, weight);
  check_same_device(residual, x, "residual", "x");
  check_same_dtype(residual, x, "residual", "x");
  FA_CHECK_ARG(residual.sizes() == x.sizes(), "fastattn.rms_norm: residual must have x's shape ",
               x.sizes(), ", got ", residual.sizes());
  check_last_dim_contiguous(residual, "residual");
  const int64_t n = x.size(-1);
  at::Tensor y = empty_output(x.sizes(), x.options());
  at::Tensor h = empty_output(x.sizes(), x.options());
  auto rstd_sizes = x.sizes().vec();
  rstd_sizes.pop_back();
  at::Tensor rstd = at::empty(rstd_sizes, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {y, h, rstd};

  const at::Tensor x2 = as_rows(x, n);
  const at::Tensor r2 = as_rows(residual, n);
  const at::Tensor w = weight_for_kernel(weight, x);
  RmsNormParams p;
  p.x = x2.data_ptr();
  p.x_row_stride = x2.stride(0);
  p.residual = r2.data_ptr();
  p.residual_row_stride = r2.stride(0);
  p.weight = w.defined() ? w.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.y_row_stride = n;
  p.h = h.data_ptr();
  p.h_row_stride = n;
  p.rstd = rstd.data_ptr<float>();
  p.rows = x2.size(0);
  p.n = n;
  p.eps = static_cast<float>(eps);
  p.dtype = to_dtype(x.scalar_type());
  launch_fwd(p, x);
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight,
                                                const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& dh) {
  check_rms_inputs(x, weight);
  check_same_device(dy, x, "dy", "x");
  check_same_dtype(dy, x, "dy", "x");
  FA_CHECK_ARG(dy.sizes() == x.sizes(), "fastattn.rms_norm backward: dy must have x's shape ",
               x.sizes(), ", got ", dy.sizes());
  check_same_device(rstd, x, "rstd", "x");
  FA_CHECK_ARG(rstd.scalar_type() == at::kFloat && rstd.numel() * x.size(-1) == x.numel(),
               "fastattn.rms_norm backward: rstd must be float32 with one value per row of x");
  if (dh.has_value()) {
    check_same_device(*dh, x, "dh", "x");
    check_same_dtype(*dh, x, "dh", "x");
    FA_CHECK_ARG(dh->sizes() == x.sizes(), "fastattn.rms_norm backward: dh must have x's shape ",
                 x.sizes(), ", got ", dh->sizes());
  }
  const int64_t n = x.size(-1);
  at::Tensor dx = empty_output(x.sizes(), x.options());
  at::Tensor dweight = at::zeros({weight.has_value() ? n : 0}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {dx, dweight};

  const at::Tensor dy2 = as_rows(dy.stride(-1) == 1 ? dy : dy.contiguous(), n);
  const at::Tensor x2 = as_rows(x, n);
  const at::Tensor rstd_c = rstd.contiguous();
  const at::Tensor w = weight_for_kernel(weight, x);
  at::Tensor dh2;
  if (dh.has_value()) dh2 = as_rows(dh->stride(-1) == 1 ? *dh : dh->contiguous(), n);

  RmsNormBwdParams p;
  p.dy = dy2.data_ptr();
  p.dy_row_stride = dy2.stride(0);
  p.x = x2.data_ptr();
  p.x_row_stride = x2.stride(0);
  p.weight = w.defined() ? w.data_ptr() : nullptr;
  p.rstd = rstd_c.data_ptr<float>();
  p.dh = dh2.defined() ? dh2.data_ptr() : nullptr;
  p.dh_row_stride = dh2.defined() ? dh2.stride(0) : 0;
  p.dx = dx.data_ptr();
  p.dx_row_stride = n;
  p.dweight = w.defined() ? dweight.data_ptr<float>() : nullptr;
  p.rows = x2.size(0);
  p.n = n;
  p.dtype = to_dtype(x.scalar_type());

  if (x.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    int device = x.device().index();
    int num_sms = 0;
    FA_CUDA_CHECK_LAUNCH(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device),
                         "device query");
    p.num_row_blocks = rms_norm_bwd_num_row_blocks_cuda(p.rows, n, num_sms);
    at::Tensor partial;
    if (w.defined()) {
      partial = at::empty({p.num_row_blocks, n}, x.options().dtype(at::kFloat));
      p.dweight_partial = partial.data_ptr<float>();
    }
    FA_CUDA_CHECK_LAUNCH(rms_norm_bwd_cuda(p, current_stream(x)), "rms_norm backward");
#endif
  } else {
    p.num_row_blocks = rms_norm_bwd_num_row_blocks_cpu(p.rows);
    at::Tensor partial;
    if (w.defined()) {
      partial = at::empty({p.num_row_blocks, n}, x.options().dtype(at::kFloat));
      p.dweight_partial = partial.data_ptr<float>();
    }
    rms_norm_bwd_cpu(p);
  }
  return {dx, dweight};
}

}  // namespace fastattn
