// moe.cpp — tensors -> MoeParams, validation and the CPU call for moe_experts.
//
// CPU only: there is no CUDA kernel (fastattn.models.moe runs the experts with torch there).
// The op is registered for CUDA too, so that every fastattn op has a kernel per device
// (scripts/cuda_build_check.sh), and there it refuses the tensors with a ValueError.
#include "common.h"
#include "fastattn/api.h"
#include "ops.h"

namespace fastattn {

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& routing_weights, const at::Tensor& expert_ids,
                       const at::Tensor& w13, const at::Tensor& w2) {
  constexpr const char* op = "fastattn.moe_experts: ";
  FA_CHECK_ARG(x.is_cpu(), op, "x is on ", x.device(),
               "; this op has only a CPU kernel (on other devices run the experts with torch)");
  check_float_dtype(x, "x");
  FA_CHECK_ARG(x.dim() == 2, op, "x must have 2 dims (tokens, hidden), got shape ", x.sizes());
  check_last_dim_contiguous(x, "x");
  const int64_t n = x.size(0), hidden = x.size(1);

  FA_CHECK_ARG(w13.dim() == 3, op, "w13 must have 3 dims (experts, 2 * inter, hidden), got shape ", w13.sizes());
  FA_CHECK_ARG(w2.dim() == 3, op, "w2 must have 3 dims (experts, hidden, inter), got shape ", w2.sizes());
  check_same_device(w13, x, "w13", "x");
  check_same_device(w2, x, "w2", "x");
  check_same_dtype(w13, x, "w13", "x");
  check_same_dtype(w2, x, "w2", "x");
  check_last_dim_contiguous(w13, "w13");
  check_last_dim_contiguous(w2, "w2");
  const int64_t experts = w13.size(0);
  FA_CHECK_ARG(w13.size(2) == hidden && w13.size(1) % 2 == 0, op,
               "w13 must have shape (experts, 2 * inter, hidden = ", hidden, "), got ", w13.sizes());
  const int64_t inter = w13.size(1) / 2;
  FA_CHECK_ARG(w2.size(0) == experts && w2.size(1) == hidden && w2.size(2) == inter, op,
               "w2 must have shape (experts, hidden, inter) = (", experts, ", ", hidden, ", ", inter,
               ") to match w13 ", w13.sizes(), ", got ", w2.sizes());

  check_same_device(routing_weights, x, "routing_weights", "x");
  check_same_device(expert_ids, x, "expert_ids", "x");
  FA_CHECK_ARG(routing_weights.scalar_type() == at::kFloat, op, "routing_weights must be float32, got ",
               routing_weights.scalar_type());
  FA_CHECK_ARG(expert_ids.scalar_type() == at::kLong, op, "expert_ids must be int64, got ",
               expert_ids.scalar_type());
  FA_CHECK_ARG(expert_ids.dim() == 2 && expert_ids.size(0) == n, op,
               "expert_ids must have shape (tokens = ", n, ", top_k), got ", expert_ids.sizes());
  const int64_t top_k = expert_ids.size(1);
  FA_CHECK_ARG(routing_weights.sizes() == expert_ids.sizes(), op, "routing_weights must have expert_ids' shape ",
               expert_ids.sizes(), ", got ", routing_weights.sizes());
  check_last_dim_contiguous(routing_weights, "routing_weights");
  check_last_dim_contiguous(expert_ids, "expert_ids");
  if (expert_ids.numel() > 0) {
    FA_CHECK_ARG(experts > 0, op, "w13 has no experts but expert_ids is not empty");
    const auto [lo_t, hi_t] = at::aminmax(expert_ids);
    const int64_t lo = lo_t.item<int64_t>(), hi = hi_t.item<int64_t>();
    FA_CHECK_ARG(lo >= 0 && hi < experts, op, "expert_ids must lie in [0, ", experts,
                 ") (w13's expert count), got values in [", lo, ", ", hi, "]");
  }

  at::Tensor out = at::empty({n, hidden}, x.options().dtype(at::kFloat));
  if (n == 0 || hidden == 0) return out;
  if (top_k == 0 || inter == 0 || experts == 0) return out.zero_();

  MoeParams p;
  p.x = x.data_ptr();
  p.x_row_stride = x.stride(0);
  p.routing_weights = routing_weights.data_ptr<float>();
  p.routing_weights_row_stride = routing_weights.stride(0);
  p.expert_ids = expert_ids.data_ptr<int64_t>();
  p.expert_ids_row_stride = expert_ids.stride(0);
  p.w13 = w13.data_ptr();
  p.w13_expert_stride = w13.stride(0);
  p.w13_row_stride = w13.stride(1);
  p.w2 = w2.data_ptr();
  p.w2_expert_stride = w2.stride(0);
  p.w2_row_stride = w2.stride(1);
  p.out = out.data_ptr<float>();
  p.out_row_stride = out.stride(0);
  p.n_tokens = n;
  p.top_k = top_k;
  p.num_experts = experts;
  p.hidden = hidden;
  p.inter = inter;
  p.dtype = to_dtype(x.scalar_type());
  moe_experts_cpu(p);
  return out;
}

}  // namespace fastattn
