// common.h — shared helpers for the binding files: tensor -> params plumbing and input
// validation with messages that name the argument. Only csrc/bindings includes torch.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "fastattn/params.h"

#ifdef FASTATTN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
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

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  FA_CHECK_ARG(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "fastattn: ", name,
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

#ifdef FASTATTN_WITH_CUDA
inline cudaStream_t current_stream(const at::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
#define FA_CUDA_CHECK_LAUNCH(expr, what)                                               \
  do {                                                                                 \
    cudaError_t fa_err_ = (expr);                                                      \
    TORCH_CHECK(fa_err_ == cudaSuccess, "fastattn: CUDA ", what, " failed: ",           \
                cudaGetErrorString(fa_err_));                                          \
  } while (0)
#endif

}  // namespace fastattn
