// decode_launch.cuh — the launch of one decode_kernel instantiation (+ the split combine),
// shared by decode.cu (uncapped kernels) and decode_softcap.cu (the soft-capped twins), so the
// two files compile in parallel. Device build only (the emulator launches the kernels itself).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "decode_kernels.cuh"
#include "fastattn/cuda_check.h"
#include "fastattn/params.h"

namespace fastattn {
namespace decode_kernels {

template <typename T, int kD, bool kSoftcap>
inline cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  constexpr size_t kSmem = DecodeSmem<kD>::kBytes;
  auto kernel = decode_kernel<T, kD, kSoftcap>;
  FASTATTN_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem)));
  int64_t g[3];
  decode_grid(p, g);
  const dim3 grid(static_cast<unsigned>(g[0]), static_cast<unsigned>(g[1]), static_cast<unsigned>(g[2]));
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  FASTATTN_CUDA_LAUNCH_CHECK();
  if (p.num_splits > 1) {
    decode_combine_kernel<T, kD><<<static_cast<unsigned>(p.b * p.h * p.seqlen_q), kD, 0, stream>>>(p);
    FASTATTN_CUDA_LAUNCH_CHECK();
  }
  return cudaSuccess;
}

// The soft-capped entry (decode_softcap.cu): decode_attention_cuda's dispatch for softcap > 0,
// after its checks.
cudaError_t decode_attention_softcap_cuda(const DecodeParams& p, cudaStream_t stream);

}  // namespace decode_kernels
}  // namespace fastattn
