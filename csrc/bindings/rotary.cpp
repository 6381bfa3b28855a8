// rotary.cpp — tensors -> RotaryParams, validation, device dispatch for the rotary ops.
//
// Out-of-range positions: on the CPU they are always rejected here (a min/max over the
// positions, cheap next to the rotation, whatever check_positions says). On CUDA the same
// check needs one device-to-host copy, i.e. a host sync; it is made in eager use, and
// skipped when the caller passes check_positions=False (it guarantees the values: the
// model's decode step, the Hugging Face integration's arange, the autograd backward), while
// the current stream is being captured into a CUDA graph (where a sync is illegal), or when
// the environment sets FASTATTN_ROTARY_SKIP_POSITION_CHECK=1.
// When skipped, the kernel never reads outside the tables: a token with a bad position
// gets NaN in its rotated dims, so the error is visible rather than silent.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <utility>

#include "common.h"
#include "fastattn/api.h"
#include "ops.h"

namespace fastattn {
namespace {

void check_qk(const at::Tensor& t, const char* name) {
  check_device_supported(t, name);
  check_float_dtype(t, name);
  FA_CHECK_ARG(t.dim() == 4, "fastattn.apply_rotary: ", name, " must have 4 dims (B, S, heads, D), got shape ",
               t.sizes());
  check_last_dim_contiguous(t, name);
}

void check_rotary_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                         const at::Tensor& sin, const std::optional<at::Tensor>& positions) {
  check_qk(q, "q");
  check_qk(k, "k");
  check_same_device(k, q, "k", "q");
  check_same_dtype(k, q, "k", "q");
  FA_CHECK_ARG(k.size(0) == q.size(0) && k.size(1) == q.size(1),
               "fastattn.apply_rotary: k must have q's batch and sequence sizes (", q.size(0), ", ",
               q.size(1), "), got (", k.size(0), ", ", k.size(1), ")");
  FA_CHECK_ARG(k.size(3) == q.size(3), "fastattn.apply_rotary: k's head dim ", k.size(3),
               " must equal q's head dim ", q.size(3));
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{cos, "cos"}, {sin, "sin"}}) {
    check_same_device(t, q, name, "q");
    FA_CHECK_ARG(t.scalar_type() == at::kFloat, "fastattn.apply_rotary: ", name,
                 " must be float32 (the tables are kept in fp32 whatever q's dtype), got ", t.scalar_type());
    FA_CHECK_ARG(t.dim() == 2 && t.size(1) >= 1, "fastattn.apply_rotary: ", name,
                 " must have shape (max_pos, R/2) with R the rotary dim, got ", t.sizes());
  }
  FA_CHECK_ARG(sin.sizes() == cos.sizes(), "fastattn.apply_rotary: sin must have cos's shape ", cos.sizes(),
               ", got ", sin.sizes());
  const int64_t rotary_dim = 2 * cos.size(1);
  FA_CHECK_ARG(rotary_dim <= q.size(3), "fastattn.apply_rotary: the rotary dim R = 2 * cos.shape[1] = ",
               rotary_dim, " exceeds the head dim D = ", q.size(3),
               " (the tables hold one column per rotated pair; a full-width Hugging Face table "
               "cat(freqs, freqs) is passed as its first half)");
#ifdef FASTATTN_WITH_CUDA
  FA_CHECK_ARG(!q.is_cuda() || rotary_dim <= kRotaryMaxRotaryDimCuda, "fastattn.apply_rotary: the rotary dim R = ",
               rotary_dim, " exceeds the CUDA kernel's limit of ", kRotaryMaxRotaryDimCuda);
#endif
  if (positions.has_value()) {
    const at::Tensor& pos = *positions;
    check_same_device(pos, q, "positions", "q");
    FA_CHECK_ARG(pos.scalar_type() == at::kInt || pos.scalar_type() == at::kLong,
                 "fastattn.apply_rotary: positions must be int32 or int64, got ", pos.scalar_type());
    const bool ok = (pos.dim() == 1 && pos.size(0) == q.size(1)) ||
                    (pos.dim() == 2 && pos.size(0) == q.size(0) && pos.size(1) == q.size(1));
    FA_CHECK_ARG(ok, "fastattn.apply_rotary: positions must have shape (S,) = (", q.size(1), ",) or (B, S) = (",
                 q.size(0), ", ", q.size(1), "), got ", pos.sizes());
  } else {
    FA_CHECK_ARG(q.size(1) <= cos.size(0), "fastattn.apply_rotary: positions default to arange(S) with S = ",
                 q.size(1), " but the cos/sin tables only have ", cos.size(0), " positions");
  }
}

#ifdef FASTATTN_WITH_CUDA
bool position_check_disabled() {
  static const bool disabled = [] {
    const char* env = std::getenv("FASTATTN_ROTARY_SKIP_POSITION_CHECK");
    return env != nullptr && env[0] == '1';
  }();
  return disabled;
}
#endif

// (min, max) of a CPU positions tensor, (S,) or (B, S) with a unit last stride.
template <typename I>
std::pair<int64_t, int64_t> cpu_min_max(const at::Tensor& pos) {
  const I* data = pos.data_ptr<I>();
  const int64_t rows = pos.dim() == 2 ? pos.size(0) : 1, cols = pos.size(-1);
  const int64_t row_stride = pos.dim() == 2 ? pos.stride(0) : 0;
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  for (int64_t r = 0; r < rows; ++r) {
    const I* row = data + r * row_stride;
    for (int64_t c = 0; c < cols; ++c) {
      lo = std::min<int64_t>(lo, row[c]);
      hi = std::max<int64_t>(hi, row[c]);
    }
  }
  return {lo, hi};
}

void check_position_values(const at::Tensor& pos, int64_t max_pos, bool check_positions) {
  if (pos.numel() == 0) return;
#ifdef FASTATTN_WITH_CUDA
  if (pos.is_cuda()) {
    if (!check_positions || position_check_disabled()) return;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    // An error here means the stream is in a state where syncing is not safe either.
    if (cudaStreamIsCapturing(current_stream(pos), &capture) != cudaSuccess ||
        capture != cudaStreamCaptureStatusNone) {
      (void)cudaGetLastError();
      return;
    }
  }
#endif
  int64_t lo = 0, hi = 0;
  if (pos.is_cpu()) {
    // A loop over the values: the torch ops below cost ~5 dispatches, most of a decode step's
    // rotary call.
    const auto [l, h] = pos.scalar_type() == at::kLong ? cpu_min_max<int64_t>(pos) : cpu_min_max<int32_t>(pos);
    lo = l;
    hi = h;
  } else {
    const auto [lo_t, hi_t] = at::aminmax(pos);
    const at::Tensor both = at::stack({lo_t, hi_t}).to(at::kCPU, at::kLong);
    lo = both[0].item<int64_t>();
    hi = both[1].item<int64_t>();
  }
  FA_CHECK_ARG(lo >= 0 && hi < max_pos, "fastattn.apply_rotary: positions must lie in [0, ", max_pos,
               ") (the cos/sin tables' length), got values in [", lo, ", ", hi, "]");
}

// Fill everything but the output pointers and strides.
RotaryParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_c,
                         const at::Tensor& sin_c, const at::Tensor& pos_c, bool interleaved, bool conjugate) {
  RotaryParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  set_strides(q, &p.q_batch_stride, &p.q_row_stride, &p.q_head_stride);
  set_strides(k, &p.k_batch_stride, &p.k_row_stride, &p.k_head_stride);
  p.cos = cos_c.data_ptr<float>();
  p.sin = sin_c.data_ptr<float>();
  p.max_pos = cos_c.size(0);
  if (pos_c.defined()) {
    p.positions = pos_c.data_ptr();
    p.positions_int64 = pos_c.scalar_type() == at::kLong;
    p.positions_batch_stride = pos_c.dim() == 2 ? pos_c.stride(0) : 0;
  }
  p.b = q.size(0);
  p.seqlen = q.size(1);
  p.h = q.size(2);
  p.h_k = k.size(2);
  p.d = q.size(3);
  p.rotary_dim = 2 * cos_c.size(1);
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  p.dtype = to_dtype(q.scalar_type());
  return p;
}

void launch(const RotaryParams& p, const at::Tensor& q) {
  if (p.b * p.seqlen == 0 || (p.h == 0 && p.h_k == 0)) return;
  if (q.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    FA_CUDA_CHECK_LAUNCH(rotary_cuda(p, current_stream(q)), "rotary");
#endif
  } else {
    rotary_cpu(p);
  }
}

struct Prepared {
  at::Tensor cos, sin, positions;
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                 const std::optional<at::Tensor>& positions, bool check_positions) {
  check_rotary_inputs(q, k, cos, sin, positions);
  Prepared r;
  r.cos = cos.contiguous();
  r.sin = sin.contiguous();
  if (positions.has_value()) {
    r.positions = positions->stride(-1) == 1 ? *positions : positions->contiguous();
    check_position_values(r.positions, cos.size(0), check_positions);
  }
  return r;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                                          bool interleaved, bool conjugate, bool check_positions) {
  const Prepared in = prepare(q, k, cos, sin, positions, check_positions);
  at::Tensor q_out = empty_output(q.sizes(), q.options());
  at::Tensor k_out = empty_output(k.sizes(), k.options());
  RotaryParams p = make_params(q, k, in.cos, in.sin, in.positions, interleaved, conjugate);
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  set_strides(q_out, &p.q_out_batch_stride, &p.q_out_row_stride, &p.q_out_head_stride);
  set_strides(k_out, &p.k_out_batch_stride, &p.k_out_row_stride, &p.k_out_head_stride);
  launch(p, q);
  return {q_out, k_out};
}

void rotary_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
             const std::optional<at::Tensor>& positions, bool interleaved, bool conjugate,
             bool check_positions) {
  const Prepared in = prepare(q, k, cos, sin, positions, check_positions);
  // Writing through a tensor whose elements share memory (an expand), or into q and k that
  // share elements, would rotate some elements twice; writing q or k while the kernel reads
  // the tables or positions from the same memory would read rotated values. q and k are
  // compared exactly (views of one packed qkv buffer interleave but are disjoint, and stay
  // allowed); the tables and positions have no reason to share a buffer with q or k, so
  // any intersection of their byte ranges is refused.
  constexpr const char* op = "fastattn.apply_rotary(inplace=True)";
  check_writable(q, op, "q");
  check_writable(k, op, "k");
  check_no_internal_overlap(q, op, "q");
  check_no_internal_overlap(k, op, "k");
  check_no_overlap(q, "q", k, "k", op);
  for (const auto& [t, name] : {NamedTensor{q, "q"}, NamedTensor{k, "k"}}) {
    check_no_overlap(t, name, cos, "cos", op, /*exact=*/false);
    check_no_overlap(t, name, sin, "sin", op, /*exact=*/false);
    if (positions.has_value()) check_no_overlap(t, name, *positions, "positions", op, /*exact=*/false);
  }
  RotaryParams p = make_params(q, k, in.cos, in.sin, in.positions, interleaved, conjugate);
  p.q_out = q.data_ptr();
  p.k_out = k.data_ptr();
  p.q_out_batch_stride = p.q_batch_stride;
  p.q_out_row_stride = p.q_row_stride;
  p.q_out_head_stride = p.q_head_stride;
  p.k_out_batch_stride = p.k_batch_stride;
  p.k_out_row_stride = p.k_row_stride;
  p.k_out_head_stride = p.k_head_stride;
  launch(p, q);
}

namespace {

// The in-place op, above the kernels. It has no backward (register_autograd does not take
// mutating ops), so when autograd would need it the call is refused instead of silently
// dropping the rotation from the graph; fastattn.apply_rotary(inplace=True) routes such
// calls through the out-of-place op. The ADInplaceOrView kernel bumps q's and k's version
// counters, as every in-place torch op does, so a tensor saved for some other op's
// backward and then rotated in place is reported at backward time.
const c10::TypedOperatorHandle<decltype(rotary_)>& rotary_inplace_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastattn::rotary_", "").typed<decltype(rotary_)>();
  return op;
}

void rotary_inplace_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                             const std::optional<at::Tensor>& positions, bool interleaved, bool conjugate,
                             bool check_positions) {
  check_inplace_not_differentiable("fastattn::rotary_ (in place)", {{q, "q"}, {k, "k"}},
                                   "use fastattn.apply_rotary(..., inplace=True), which records the rotation "
                                   "for autograd, or no_grad");
  at::AutoDispatchBelowAutograd guard;
  rotary_inplace_op().call(q, k, cos, sin, positions, interleaved, conjugate, check_positions);
}

void rotary_inplace_or_view(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                            const std::optional<at::Tensor>& positions, bool interleaved, bool conjugate,
                            bool check_positions) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    rotary_inplace_op().call(q, k, cos, sin, positions, interleaved, conjugate, check_positions);
  }
  bump_versions(q, k);
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) { m.impl("rotary_", &fastattn::rotary_inplace_autograd); }
TORCH_LIBRARY_IMPL(fastattn, ADInplaceOrView, m) { m.impl("rotary_", &fastattn::rotary_inplace_or_view); }
