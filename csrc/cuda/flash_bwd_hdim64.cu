// flash_bwd_hdim64.cu — the FlashAttention backward kernels for head dim 64: delta, dK/dV
// (plain and soft-capped), the GQA split reduce, dQ (plain and soft-capped), fp16 and bf16:
// 12 kernels. One file per head dim so a parallel build compiles them side by side; design,
// tiles and shared memory: flash_bwd.cu.
#include <cuda_runtime.h>

#include "fastattn/params.h"
#include "flash_bwd_launch.cuh"

namespace fastattn {

cudaError_t flash_bwd_cuda_hdim64(const FlashBwdParams& params, cudaStream_t stream) {
  return bwd_run_dim<64>(params, stream);
}

}  // namespace fastattn
