// flash_bwd_launch.cuh — the host side of the FlashAttention backward (flash_bwd.cu): the
// workspace size, the kSoftcap / dtype dispatch of one head dim (bwd_run_dim<D>, called by
// that head dim's flash_bwd_hdim<D>.cu), and the four launches with their grids (bwd_grids),
// block sizes and shared-memory opt-in. Argument validation and the split decision are
// prepare_bwd in flash_bwd_kernels.cuh; the head-dim switch is flash_bwd_cuda in flash_bwd.cu.
//
// One copy, included by flash_bwd.cu and flash_bwd_hdim*.cu (nvcc) and, through those very
// files, by tests/flash_bwd_emulate.cpp (g++ over the CUDA runtime stand-ins of
// tests/fiber_emulate.h, FASTATTN_BWD_EMULATE defined), so the emulated tests run exactly the
// launcher the GPU runs. The one line that differs is the launch
// statement itself: kernel<<<grid, threads, smem, stream>>>(args) on the GPU,
// ::emu::KernelLaunch(kernel, grid, threads, smem, stream)(args) under emulation (same launch
// rules: block size, grid, dynamic shared memory against the cudaFuncSetAttribute limit).
#pragma once

#include <cstdint>

#include "fastattn/cuda_check.h"
#include "fastattn/params.h"
#include "flash_bwd_kernels.cuh"

namespace fastattn {

// flash_bwd_hdim<D>.cu: the backward for one head dim (validation, then the plain or
// soft-capped kernels for the dtype). One file per head dim, so a parallel build compiles
// the six sets of kernels side by side; flash_bwd_cuda (flash_bwd.cu) switches on params.fwd.d.
cudaError_t flash_bwd_cuda_hdim32(const FlashBwdParams& params, cudaStream_t stream);
cudaError_t flash_bwd_cuda_hdim64(const FlashBwdParams& params, cudaStream_t stream);
cudaError_t flash_bwd_cuda_hdim96(const FlashBwdParams& params, cudaStream_t stream);
cudaError_t flash_bwd_cuda_hdim128(const FlashBwdParams& params, cudaStream_t stream);
cudaError_t flash_bwd_cuda_hdim192(const FlashBwdParams& params, cudaStream_t stream);
cudaError_t flash_bwd_cuda_hdim256(const FlashBwdParams& params, cudaStream_t stream);

namespace {

// Raise the kernel's dynamic shared-memory limit when it needs more than the default 48 KiB,
// launch it on a (x, y, z) grid, report a bad configuration without synchronising.
template <typename Kernel>
cudaError_t bwd_launch_kernel(Kernel* kernel, const int64_t (&grid)[3], int threads, int smem,
                              cudaStream_t stream, const BwdArgs& args) {
  if (smem > 48 * 1024)
    FASTATTN_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
#if defined(FASTATTN_BWD_EMULATE)
  ::emu::KernelLaunch<Kernel>(kernel, grid, threads, smem, stream)(args);
#else
  kernel<<<dim3(static_cast<unsigned>(grid[0]), static_cast<unsigned>(grid[1]),
                static_cast<unsigned>(grid[2])),
           threads, smem, stream>>>(args);
#endif
  FASTATTN_CUDA_LAUNCH_CHECK();
  return cudaSuccess;
}

template <typename T, int D, bool kSoftcap>
cudaError_t launch_bwd(const BwdArgs& args, cudaStream_t stream) {
  const BwdGrids g = bwd_grids<D>(args);
  if (g.delta > 0) {
    const int64_t grid[3] = {g.delta, 1, 1};
    FASTATTN_CUDA_TRY(bwd_launch_kernel(flash_bwd_delta_kernel<T, D>, grid, 256, 0, stream, args));
  }
  if (g.dkdv[0] > 0) {
    using Cfg = DkdvCfg<D>;
    FASTATTN_CUDA_TRY(bwd_launch_kernel(flash_bwd_dkdv_kernel<T, D, kSoftcap>, g.dkdv,
                                        Cfg::kThreads, Cfg::kSmemBytes, stream, args));
    if (g.reduce > 0) {
      const int64_t grid[3] = {g.reduce, 1, 1};
      FASTATTN_CUDA_TRY(
          bwd_launch_kernel(flash_bwd_dkdv_reduce_kernel<T, D>, grid, 256, 0, stream, args));
    }
  }
  if (g.dq[0] > 0) {
    using Cfg = DqCfg<D>;
    FASTATTN_CUDA_TRY(bwd_launch_kernel(flash_bwd_dq_kernel<T, D, kSoftcap>, g.dq, Cfg::kThreads,
                                        Cfg::kSmemBytes, stream, args));
  }
  return cudaSuccess;
}

// flash_bwd_cuda_workspace_floats (api.h): fp32 partial dK and dV per split of a GQA/MQA
// group (0 for MHA and for grids that already fill the GPU): 2 * splits * b * h_k * seqlen_k
// * d. Varlen: the same formula with b the number of sequences and seqlen_k = max_seqlen_k,
// i.e. b * max_seqlen_k rows per (split, kv head), laid out as the dK/dV grid is (one
// max-length slot per sequence, rows past a sequence's own length unused): the split decision
// is taken on that grid, and it only splits small grids, so the slack over total_k stays small.
inline int64_t bwd_workspace_floats(const FlashBwdParams& params) {
  const FlashFwdParams& f = params.fwd;
  if (!flash_bwd_head_dim_ok(f.d) || f.h_k <= 0 || f.b <= 0 || f.seqlen_k <= 0) return 0;
  int hps = 0;
  const int splits = bwd_layout::dkdv_num_splits(f.b, f.h, f.h_k, f.seqlen_k,
                                                 static_cast<int>(f.d), &hps);
  return splits > 1 ? 2 * splits * f.b * f.h_k * f.seqlen_k * f.d : 0;
}

// flash_bwd_cuda_hdim<D>: validate, then the soft-capped (softcap.cuh) or plain dK/dV and dQ
// kernels for the dtype, at head dim D (params.fwd.d == D: flash_bwd_cuda's switch).
template <int D>
inline cudaError_t bwd_run_dim(const FlashBwdParams& params, cudaStream_t stream) {
  const FlashFwdParams& f = params.fwd;
  if (f.d != D) return cudaErrorInvalidValue;
  BwdArgs args;
  const BwdPrep prep = prepare_bwd(params, &args);
  if (prep == kBwdInvalid) return cudaErrorInvalidValue;
  if (prep == kBwdNothing) return cudaSuccess;
  const bool h16 = f.dtype == DType::kFloat16;
  if (f.softcap > 0.f)
    return h16 ? launch_bwd<__half, D, true>(args, stream)
               : launch_bwd<__nv_bfloat16, D, true>(args, stream);
  return h16 ? launch_bwd<__half, D, false>(args, stream)
             : launch_bwd<__nv_bfloat16, D, false>(args, stream);
}

}  // namespace
}  // namespace fastattn
