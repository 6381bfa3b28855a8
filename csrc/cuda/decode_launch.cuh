// decode_launch.cuh — the launches of decode.cu's kernels: one decode_kernel instantiation
// (+ the split combine) and the head dim x dtype dispatch of decode_attention_cuda, shared by
// decode.cu (uncapped kernels) and decode_softcap.cu (the soft-capped twins) so the two files
// compile in parallel. decode.cu's uncapped launches at d 64 / 128 also choose the tensor-core
// decode_mma_kernel (decode_mma.cuh) for seqlen_q = 1, any group.
//
// One copy, also compiled by tests/decode_emulate.cpp (g++ over the CUDA runtime stand-ins of
// tests/fiber_emulate.h, FASTATTN_DECODE_EMULATE defined), which includes decode.cu and
// decode_softcap.cu themselves: the emulated tests run exactly the launchers the GPU runs
// (checks, softcap twin choice, dispatch, grids, shared-memory opt-in). The one line that
// differs is the launch statement: kernel<<<grid, threads, smem, stream>>>(args) on the GPU,
// ::emu::KernelLaunch(kernel, grid, threads, smem, stream)(args) under emulation (the same
// launch rules: block size, grid limits, dynamic shared memory against the
// cudaFuncSetAttribute limit).
#pragma once

#include <cstddef>
#include <cstdint>

#include "decode_kernels.cuh"
#include "decode_mma.cuh"
#include "fastattn/cuda_check.h"
#include "fastattn/params.h"

namespace fastattn {
namespace decode_kernels {

// Launch `kernel` on a (x, y, z) grid and report a bad configuration without synchronising.
template <typename Kernel, typename... Args>
inline cudaError_t launch_kernel(Kernel* kernel, const int64_t (&grid)[3], int threads, size_t smem,
                                 cudaStream_t stream, const Args&... args) {
#if defined(FASTATTN_DECODE_EMULATE)
  ::emu::KernelLaunch<Kernel>(kernel, grid, threads, smem, stream)(args...);
#else
  kernel<<<dim3(static_cast<unsigned>(grid[0]), static_cast<unsigned>(grid[1]), static_cast<unsigned>(grid[2])),
           threads, smem, stream>>>(args...);
#endif
  FASTATTN_CUDA_LAUNCH_CHECK();
  return cudaSuccess;
}

// The tensor-core kernel (decode_mma.cuh) on grid (num_splits, h_k * head slices, b), then
// the same combine as decode_kernel's. kMTiles: m16 tiles of a slice's query heads (<= 16: 1,
// <= 32: 2).
template <typename T, int kD, int kMTiles, int kStages = kMmaStages>
inline cudaError_t launch_decode_mma(const DecodeParams& p, cudaStream_t stream) {
  constexpr size_t kSmem = DecodeMmaSmem<kD, kStages>::kBytes;
  auto kernel = decode_mma_kernel<T, kD, kMTiles, kStages>;
  FASTATTN_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem)));
  const int64_t grid[3] = {p.num_splits, p.h_k * decode_mma_slices(p.h / p.h_k), p.b};
  FASTATTN_CUDA_TRY(launch_kernel(kernel, grid, kMmaThreads, kSmem, stream, p));
  if (p.num_splits > 1) {
    const int64_t rows[3] = {p.b * p.h * p.seqlen_q, 1, 1};
    FASTATTN_CUDA_TRY(launch_kernel(decode_combine_kernel<T, kD>, rows, kD, 0, stream, p));
  }
  return cudaSuccess;
}

template <typename T, int kD, bool kSoftcap>
inline cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  // Tensor cores for one query token, any group (head slices above 32), uncapped, d 64 / 128
  // (decode_mma_applies); everything else on the CUDA-core decode_kernel.
  if constexpr (!kSoftcap && (kD == 64 || kD == 128)) {
    if (decode_mma_applies(p)) {
      const bool one_tile = decode_mma_rows(p.h / p.h_k) <= 16;
      if constexpr (kD == 128) {
        if (decode_mma_compact(p))  // a 99 KiB part (see kMmaStagesCompact)
          return one_tile ? launch_decode_mma<T, kD, 1, kMmaStagesCompact>(p, stream)
                          : launch_decode_mma<T, kD, 2, kMmaStagesCompact>(p, stream);
      }
      return one_tile ? launch_decode_mma<T, kD, 1>(p, stream) : launch_decode_mma<T, kD, 2>(p, stream);
    }
  }
  constexpr size_t kSmem = DecodeSmem<kD>::kBytes;
  auto kernel = decode_kernel<T, kD, kSoftcap>;
  FASTATTN_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem)));
  int64_t grid[3];
  decode_grid(p, grid);
  FASTATTN_CUDA_TRY(launch_kernel(kernel, grid, threads_for(kD), kSmem, stream, p));
  if (p.num_splits > 1) {
    const int64_t rows[3] = {p.b * p.h * p.seqlen_q, 1, 1};
    FASTATTN_CUDA_TRY(launch_kernel(decode_combine_kernel<T, kD>, rows, kD, 0, stream, p));
  }
  return cudaSuccess;
}

// The closed list head dim {64, 96, 128, 256} x dtype {fp16, bf16}, for the uncapped kernels
// (decode.cu) or their soft-capped twins (decode_softcap.cu).
template <bool kSoftcap, int kD>
inline cudaError_t dispatch_dtype(const DecodeParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat16: return launch_decode<__half, kD, kSoftcap>(p, stream);
    case DType::kBFloat16: return launch_decode<__nv_bfloat16, kD, kSoftcap>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
template <bool kSoftcap>
inline cudaError_t dispatch_decode(const DecodeParams& p, cudaStream_t stream) {
  switch (p.d) {
    case 64: return dispatch_dtype<kSoftcap, 64>(p, stream);
    case 96: return dispatch_dtype<kSoftcap, 96>(p, stream);
    case 128: return dispatch_dtype<kSoftcap, 128>(p, stream);
    case 256: return dispatch_dtype<kSoftcap, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// The soft-capped entry (decode_softcap.cu): decode_attention_cuda's dispatch for softcap > 0,
// after its checks.
cudaError_t decode_attention_softcap_cuda(const DecodeParams& p, cudaStream_t stream);

}  // namespace decode_kernels
}  // namespace fastattn
