// common.h — shared helpers for the binding files: tensor -> params plumbing and input
// validation with messages that name the argument. Only csrc/bindings includes torch.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "fastattn/params.h"

#ifdef FASTATTN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "fastattn/api.h"
#endif

namespace fastattn {

// Errors for bad arguments surface in Python as ValueError (c10::ValueError).
#define FA_CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK_VALUE(false, "fastattn: unsupported dtype ", t);
}

// Floating dtypes an op accepts on the tensor's device: fp32/fp16/bf16 on the CPU; CUDA
// kernels that only exist for 16-bit types pass allow_fp32_cuda = false.
inline void check_float_dtype(const at::Tensor& t, const char* name, bool allow_fp32_cuda = true) {
  const auto st = t.scalar_type();
  const bool ok16 = st == at::kHalf || st == at::kBFloat16;
  const bool ok32 = st == at::kFloat && (allow_fp32_cuda || !t.is_cuda());
  FA_CHECK_ARG(ok16 || ok32, "fastattn: ", name, " must be ",
               (t.is_cuda() && !allow_fp32_cuda) ? "float16 or bfloat16 on CUDA"
                                                 : "float32, float16 or bfloat16",
               ", got ", st);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  FA_CHECK_ARG(t.device() == ref.device(), "fastattn: ", name, " is on ", t.device(),
               " but ", ref_name, " is on ", ref.device(), "; all tensors must be on the same device");
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  FA_CHECK_ARG(t.scalar_type() == ref.scalar_type(), "fastattn: ", name, " has dtype ",
               t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
               "; they must match");
}

// An empty tensor has nothing to address (autograd hands an empty gradient over with all
// strides 0 under torch.compile's dynamic shapes; torch calls it contiguous), so it passes.
inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  FA_CHECK_ARG(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1 || t.numel() == 0, "fastattn: ", name,
               " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

inline void check_device_supported(const at::Tensor& t, const char* name) {
#ifdef FASTATTN_WITH_CUDA
  FA_CHECK_ARG(t.is_cpu() || t.is_cuda(), "fastattn: ", name, " must be a CPU or CUDA tensor, got ",
               t.device());
#else
  FA_CHECK_ARG(t.is_cpu(), "fastattn: ", name, " is on ", t.device(),
               " but this build of fastattn has only CPU kernels (rebuild with a CUDA torch and nvcc)");
#endif
}

// softcap: 0 (off) or a positive number finite in float32, the kernels' type. A NaN,
// infinite or negative cap would silently give NaN or a wrong softmax.
inline void check_softcap(double softcap, const char* op) {
  FA_CHECK_ARG(std::isfinite(softcap) && softcap >= 0.0 && softcap <= std::numeric_limits<float>::max(), op,
               "softcap must be 0 (off) or a positive number finite in float32, got ", softcap);
}

// The (batch, row, head) strides of a 4-D (B, S, H, D) tensor, in elements, into the params
// fields `<name>_batch_stride`, `<name>_row_stride`, `<name>_head_stride`.
inline void set_strides(const at::Tensor& t, int64_t* batch, int64_t* row, int64_t* head) {
  *batch = t.stride(0);
  *row = t.stride(1);
  *head = t.stride(2);
}

// View t as (rows, n) with stride 1 along n and one row stride, copying only when the
// leading dims cannot be flattened into a single stride.
inline at::Tensor as_rows(const at::Tensor& t, int64_t n) {
  at::Tensor r = t.reshape({-1, n});
  if (n > 1 && r.stride(1) != 1) r = r.contiguous();
  return r;
}

// at::empty for an op's output. On Linux CPU, a large output is first-touched by our kernel
// and every 4 KiB page fault costs more than the kernel's own memory traffic (torch's
// allocator hands back fresh mmap'ed memory for big tensors each call). Asking for
// transparent huge pages on the buffer before it is touched cuts the faults 512x; it is
// only advice, so where THP is off nothing changes.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t nbytes = t.nbytes();
  if (t.is_cpu() && nbytes >= 4 * kHuge) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t hi = (begin + nbytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// A dense copy of t in fresh memory, for kernels whose 16-byte vector loads need aligned rows.
// Not Tensor::contiguous(): that returns t itself when t is already contiguous, even when
// its storage offset leaves the data pointer unaligned (a view starting mid-buffer).
inline at::Tensor dense_aligned_copy(const at::Tensor& t) {
  return t.clone(at::MemoryFormat::Contiguous);
}

// ---- in-place ops: autograd, version counters, aliasing ------------------------------------
// An op that writes into its arguments behaves like torch's own in-place ops: an Autograd
// kernel refuses the call when the graph would need a backward the op does not have, an
// ADInplaceOrView kernel bumps the version counters of what it wrote (so a tensor saved for
// another op's backward and then overwritten is reported at backward time), and the kernel
// refuses destinations whose elements share memory with each other or with an input.

struct NamedTensor {
  const at::Tensor& t;
  const char* name;
};

// For an in-place op with no backward: with grad mode on, an argument that requires grad
// would either lose the mutation from its graph (a written tensor) or have its values
// copied without a graph edge (a read one). Either way the gradient would be silently
// wrong, so the call is refused with `hint` saying what to do instead.
inline void check_inplace_not_differentiable(const char* op, std::initializer_list<NamedTensor> args,
                                             const char* hint) {
  if (!c10::GradMode::is_enabled()) return;
  for (const NamedTensor& a : args) {
    TORCH_CHECK(!a.t.requires_grad(), op, " is not differentiable but ", a.name, " requires grad; ", hint);
  }
}

// An in-place op writes its outputs before its ADInplaceOrView kernel bumps their versions,
// where torch refuses an inference tensor outside torch.inference_mode(): checked first, so
// that the refused call leaves the tensor unchanged (and the error names the argument).
inline void check_writable(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), op, ": ", name,
              " is an inference tensor (made under torch.inference_mode()) and cannot be written in place outside "
              "inference mode; call under torch.inference_mode() too, or pass a normal tensor (e.g. ", name,
              ".clone() made outside it)");
}

template <class... Ts>
void bump_versions(const Ts&... ts) {
  (ts.unsafeGetTensorImpl()->bump_version(), ...);
}

enum class Overlap { kNo, kYes, kUnknown };

namespace overlap_detail {

struct Term {
  int64_t coef, lo, hi;  // coef * z with lo <= z <= hi
};

inline int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// Is there an integer z_i in [lo_i, hi_i] for every term i >= first with
// sum coef_i z_i == r? Terms are sorted by coef, largest first; rest_lo/rest_hi[i] bound the
// sum of terms i.. (rest_*[n] = 0). A depth-first search that tries, for each term, only
// the values that leave r reachable by the smaller terms: for real tensor layouts (each
// stride larger than the span of the smaller ones) that is one or two values per level.
// `budget` caps the visited values; running out answers kUnknown.
inline Overlap solve(const std::vector<Term>& terms, const std::vector<int64_t>& rest_lo,
                     const std::vector<int64_t>& rest_hi, size_t first, int64_t r, int64_t& budget) {
  if (r < rest_lo[first] || r > rest_hi[first]) return Overlap::kNo;
  if (first == terms.size()) return r == 0 ? Overlap::kYes : Overlap::kNo;
  const Term& t = terms[first];
  const int64_t z_lo = std::max(t.lo, ceil_div(r - rest_hi[first + 1], t.coef));
  const int64_t z_hi = std::min(t.hi, floor_div(r - rest_lo[first + 1], t.coef));
  bool unknown = false;
  for (int64_t z = z_lo; z <= z_hi; ++z) {
    if (--budget < 0) return Overlap::kUnknown;
    const Overlap o = solve(terms, rest_lo, rest_hi, first + 1, r - t.coef * z, budget);
    if (o == Overlap::kYes) return o;
    unknown = unknown || o == Overlap::kUnknown;
  }
  return unknown ? Overlap::kUnknown : Overlap::kNo;
}

// Offset in elements of t's last element from its first (strides >= 0).
inline int64_t span_elems(const at::Tensor& t) {
  int64_t span = 0;
  for (int64_t i = 0; i < t.dim(); ++i) span += t.stride(i) * (t.size(i) - 1);
  return span;
}

inline bool has_negative_stride(const at::Tensor& t) {
  for (int64_t i = 0; i < t.dim(); ++i)
    if (t.stride(i) < 0) return true;
  return false;
}

}  // namespace overlap_detail

// [first, last] byte addresses t's elements occupy (t.numel() > 0, strides >= 0).
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const int64_t elem = static_cast<int64_t>(t.element_size());
  return {begin, begin + static_cast<uintptr_t>((overlap_detail::span_elems(t) + 1) * elem) - 1};
}

// Whether two distinct indices of t address the same memory. kNo is proven from the sizes
// and strides (sorted by stride, every stride exceeds the span of the smaller dims: true of
// any slice, transpose or padded view of a dense buffer); a stride-0 dim of size > 1 (an
// expand) is kYes; anything else (an as_strided with interleaved rows) is kUnknown.
inline Overlap internal_overlap(const at::Tensor& t) {
  if (t.numel() <= 1) return Overlap::kNo;
  if (overlap_detail::has_negative_stride(t)) return Overlap::kUnknown;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of dims with size > 1
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (t.size(i) <= 1) continue;
    if (t.stride(i) == 0) return Overlap::kYes;
    dims.emplace_back(t.stride(i), t.size(i));
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return Overlap::kUnknown;
    span += stride * (size - 1);
  }
  return Overlap::kNo;
}

// Whether a and b (both on one device) have an element in common, exactly: kNo when their
// byte ranges are apart, else an integer solve of addr_a + sum_i sa_i x_i == addr_b +
// sum_j sb_j y_j over the index boxes. Disjoint interleaved views (q and k heads of one
// packed qkv projection, k and v caches of one (B, S, 2, Hk, D) buffer) are kNo; views
// sharing an element are kYes. kUnknown only for different element sizes, element
// addresses that are not a whole number of elements apart, or an exhausted search budget.
inline Overlap elements_overlap(const at::Tensor& a, const at::Tensor& b) {
  using namespace overlap_detail;
  if (a.numel() == 0 || b.numel() == 0) return Overlap::kNo;
  if (has_negative_stride(a) || has_negative_stride(b)) return Overlap::kUnknown;
  const auto [a_lo, a_hi] = byte_span(a);
  const auto [b_lo, b_hi] = byte_span(b);
  if (a_hi < b_lo || b_hi < a_lo) return Overlap::kNo;
  const int64_t elem = static_cast<int64_t>(a.element_size());
  if (static_cast<int64_t>(b.element_size()) != elem) return Overlap::kUnknown;
  const int64_t delta_bytes = static_cast<int64_t>(b_lo - a_lo);  // wraps to the signed difference
  if (delta_bytes % elem != 0) return Overlap::kUnknown;
  // a[x] == b[y]  <=>  sum sa_i x_i - sum sb_j y_j == delta, 0 <= x_i < na_i, 0 <= y_j < nb_j.
  // Terms with one stride merge into one (their ranges add), so identical layouts reduce to
  // one unknown per dim, the index difference.
  std::vector<Term> terms;
  auto add = [&terms](int64_t coef, int64_t lo, int64_t hi) {
    if (coef == 0 || (lo == 0 && hi == 0)) return;
    for (Term& t : terms) {
      if (t.coef == coef) {
        t.lo += lo;
        t.hi += hi;
        return;
      }
    }
    terms.push_back({coef, lo, hi});
  };
  for (int64_t i = 0; i < a.dim(); ++i) add(a.stride(i), 0, a.size(i) - 1);
  for (int64_t j = 0; j < b.dim(); ++j) add(b.stride(j), -(b.size(j) - 1), 0);
  std::sort(terms.begin(), terms.end(), [](const Term& x, const Term& y) { return x.coef > y.coef; });
  std::vector<int64_t> rest_lo(terms.size() + 1, 0), rest_hi(terms.size() + 1, 0);
  for (size_t i = terms.size(); i-- > 0;) {
    rest_lo[i] = rest_lo[i + 1] + terms[i].coef * terms[i].lo;
    rest_hi[i] = rest_hi[i + 1] + terms[i].coef * terms[i].hi;
  }
  int64_t budget = 1 << 16;
  return solve(terms, rest_lo, rest_hi, 0, delta_bytes / elem, budget);
}

// An in-place op's destination must not have elements sharing memory: each would be
// written more than once (an expand, or strides that cannot rule it out).
inline void check_no_internal_overlap(const at::Tensor& t, const char* op, const char* name) {
  FA_CHECK_ARG(internal_overlap(t) == Overlap::kNo, op, ": ", name,
               " has elements sharing memory (e.g. an expand), or strides that cannot rule it out; "
               "it is written in place, so pass a tensor with distinct elements");
}

// a and b, at least one of them written in place (the other another destination, or an
// input read while the op writes), must not share an element. exact = false refuses as
// soon as their byte ranges intersect (for arguments with no reason to share a buffer).
inline void check_no_overlap(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                             const char* op, bool exact = true) {
  Overlap o = Overlap::kNo;
  if (a.numel() > 0 && b.numel() > 0) {
    if (exact) {
      o = elements_overlap(a, b);
    } else {
      const auto [a_lo, a_hi] = byte_span(a);
      const auto [b_lo, b_hi] = byte_span(b);
      o = (a_hi < b_lo || b_hi < a_lo) ? Overlap::kNo : Overlap::kYes;
    }
  }
  FA_CHECK_ARG(o == Overlap::kNo, op, ": ", a_name, " and ", b_name, " overlap in memory",
               o == Overlap::kUnknown ? " (or their strides cannot rule it out)" : "",
               "; the op writes in place, so they must not share elements");
}

#ifdef FASTATTN_WITH_CUDA
inline cudaStream_t current_stream(const at::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
// On failure the runtime's last error is cleared first when it is this call's (as torch's own
// check does): left set, the next unrelated launch check (torch's or ours) would report it. An
// error our launchers return from their own argument checks leaves another pending error alone.
#define FA_CUDA_CHECK_LAUNCH(expr, what)                                               \
  do {                                                                                 \
    cudaError_t fa_err_ = (expr);                                                      \
    if (fa_err_ != cudaSuccess && cudaPeekAtLastError() == fa_err_) (void)cudaGetLastError(); \
    TORCH_CHECK(fa_err_ == cudaSuccess, "fastattn: CUDA ", what, " failed: ",           \
                cudaGetErrorString(fa_err_));                                          \
  } while (0)

// Whether t's current stream is capturing a CUDA graph (host reads of device values, which
// synchronise, are not allowed then: the checks that need one are skipped).
inline bool is_capturing(const at::Tensor& t) {
  if (!t.is_cuda()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  FA_CUDA_CHECK_LAUNCH(cudaStreamIsCapturing(current_stream(t), &status), "capture query");
  return status != cudaStreamCaptureStatusNone;
}

// The dynamic shared memory one block may opt into on t's device (bytes): 227 KiB on sm_90,
// 163 KiB on sm_80, 99 KiB on sm_86 / sm_89 / sm_120.
inline int64_t cuda_smem_optin(const at::Tensor& t) {
  int bytes = 0;
  FA_CUDA_CHECK_LAUNCH(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, t.device().index()),
                       "device query");
  return bytes;
}

// A clear error, before anything runs, when the flash backward's blocks at head dim d need more
// shared memory than t's device allows (d = 256 on 99 KiB parts); `op` names the caller.
inline void check_flash_bwd_smem(const at::Tensor& t, int64_t d, const char* op) {
  const int64_t need = flash_bwd_cuda_smem_bytes(d), have = cuda_smem_optin(t);
  TORCH_CHECK(need <= have, "fastattn.", op, ": the CUDA backward at head dim ", d, " needs ", need,
              " bytes of shared memory per block, this GPU allows ", have);
}
#else
inline bool is_capturing(const at::Tensor&) { return false; }  // (no CUDA tensors in this build)
#endif

}  // namespace fastattn
