// cuda_check.h — error plumbing for launchers. Launchers never exit, sync or allocate:
// they return the first cudaError_t they meet and the bindings turn it into a TORCH_CHECK.
#pragma once

#include <cuda_runtime_api.h>

// Return from the enclosing function (which returns cudaError_t) on the first error.
#define FASTATTN_CUDA_TRY(expr)                 \
  do {                                          \
    cudaError_t fastattn_err_ = (expr);         \
    if (fastattn_err_ != cudaSuccess) return fastattn_err_; \
  } while (0)

// After a <<<...>>> launch: report a bad configuration without synchronising.
#define FASTATTN_CUDA_LAUNCH_CHECK() FASTATTN_CUDA_TRY(cudaGetLastError())
