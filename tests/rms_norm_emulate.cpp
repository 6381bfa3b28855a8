// rms_norm_emulate.cpp — run csrc/cuda/rms_norm.cu (the RMSNorm kernels AND their launchers:
// rms_norm_fwd_cuda / rms_norm_bwd_cuda / rms_norm_bwd_num_row_blocks_cuda, what
// csrc/bindings/rms_norm.cpp calls) on the CPU, as a shared library driven by
// tests/test_rms_norm_emulated.py.
//
// The test copies rms_norm.cu into its build folder as rms_norm_rewritten.cu with four
// mechanical rewrites only (see fiber_emulate.h, "CUDA runtime API stand-ins"): a <<<...>>>
// launch becomes ::emu::KernelLaunch(...)(...), `extern __shared__` becomes the block's
// dynamic shared memory, `__shared__ T name[DIM]` its static shared memory, and the global
// Pack pointer casts of ldg_pack / stg_pack go through emu::aligned_ptr; it also puts
// empty <cuda_runtime.h> / <cuda_runtime_api.h> / <cuda_fp16.h> / <cuda_bf16.h> on the include
// path, since everything they would declare is defined here or in fiber_emulate.h.
//
// Host versions of what the file uses from CUDA:
//   * every thread of a block is a fiber (fiber_emulate.h); __syncthreads and __shfl_xor_sync
//     are barriers between fibers; mode bit 1 schedules the fibers in reverse order;
//   * the launchers' runtime calls (cudaFuncGetAttributes, cudaFuncSetAttribute, cudaGetDevice,
//     cudaDeviceGetAttribute, cudaGetLastError) against an emulated device whose opt-in
//     shared-memory limit per block is set per call; a launch asking for more dynamic shared
//     memory than the kernel's attribute allows is refused, as the runtime refuses it;
//   * __half / __nv_bfloat16: 16-bit storage, round-to-nearest-even conversions; rsqrtf is
//     1 / sqrtf (the GPU's is within 2 ulp of it);
//   * every 16-byte (vector) and scalar global access goes through Pack, or for 16-byte
//     stores float_convert.cuh's store16 (FASTATTN_STORE16 -> emu::store16_words), whose
//     alignment is checked here (a misaligned vector access faults on the GPU).
// Sanitizers (fiber_emulate.h, "sanitizer analogues"), on for every run:
//   * memcheck: every buffer (x, residual, weight, y, h, rstd; dy, x, weight, rstd, dh, dx,
//     dweight, dweight_partial; sizes from the caller) is a guarded copy, so a raw
//     out-of-bounds access faults and is reported with the kernel, buffer and offset; every
//     Pack access to global memory is bounds-checked byte-exactly against the buffers;
//   * racecheck / initcheck / bank conflicts: at every shared-memory access. The kernels
//     reach shared memory only through float_convert.cuh's lds / sts (the row cache, the
//     block_sum scratch, the backward's fp32 dweight accumulator, the reduce kernel's tree),
//     which FASTATTN_EMU_TRACK_SMEM routes to emu::smem_load / smem_store.
// Shared memory (static and dynamic) is filled with NaN bytes at every block start.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#define FASTATTN_RMS_NORM_EMULATE 1
#define FASTATTN_WITH_CUDA 1
#include "fiber_emulate.h"  // fibers, barriers, shuffles, runtime API stand-ins

#include "cuda_fp16_emulate.h"  // __half, __nv_bfloat16 and their conversions
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

namespace emu {

inline const char* g_error = nullptr;

// Errors are recorded (the first one wins) and the entry point returns -1 after printing it.
void fail(const char* what) {
  if (!g_error) g_error = what;
}

// Every global access of the kernels is a Pack (16 bytes on the vector path, one element on
// the scalar path); the rewrite routes its pointer cast through here.
// A misaligned one is reported and redirected to a NaN scratch pack, so that the run ends
// with the error rather than with whatever the host does on a misaligned vector access.
// A shared-memory Pack is a tracked access (racecheck / initcheck / banks); a global one is
// bounds-checked against the guarded buffers, and redirected to the scratch pack when outside.
template <typename P, typename Src>
P* aligned_ptr(Src* src) {
  alignas(64) static unsigned char scratch[64];
  const bool write = !std::is_const<Src>::value;
  const unsigned char* a = reinterpret_cast<const unsigned char*>(src);
  if (reinterpret_cast<uintptr_t>(src) % alignof(P) != 0) {
    fail("misaligned vector access");
  } else if (a >= smem_base() && a < smem_base() + g_block->smem.size()) {
    smem_track(smem_offset(a), sizeof(P), write, write ? "st.shared" : "ld.shared");
    return reinterpret_cast<P*>(src);
  } else if (check_global(src, sizeof(P), write, "Pack")) {
    return reinterpret_cast<P*>(src);
  }
  std::memset(scratch, 0xff, sizeof(scratch));
  return reinterpret_cast<P*>(scratch);
}

// float_convert.cuh's store16: one 16-byte store of four 32-bit words, checked as a Pack.
struct alignas(16) Words16 {
  uint32_t w[4];
};
inline void store16_words(void* ptr, uint32_t x, uint32_t y, uint32_t z, uint32_t w) {
  *aligned_ptr<Words16>(ptr) = Words16{{x, y, z, w}};
}

}  // namespace emu

#define FASTATTN_STORE16(ptr, x, y, z, w) ::emu::store16_words(ptr, x, y, z, w)
#define FASTATTN_EMU_TRACK_SMEM 1

#include "rms_norm_rewritten.cu"

namespace {

using namespace fastattn;

// What nvcc reports as each kernel's static shared memory: the block_sum scratch (one float
// per warp of the largest block) in the row kernels, the tree's sums in the reduce kernel. Every
// block checks that the kernel's declarations use exactly this.
template <typename T, int kN>
void state_row_kernels(const char* tname) {
  const std::size_t scratch = sizeof(float[kMaxThreads / kWarp]);
  const std::string s = std::string("<") + tname + "," + std::to_string(kN);
  emu::set_static_smem(rms_norm_fwd_kernel<T, kN, false>, scratch, "fwd" + s + ",0>");
  emu::set_static_smem(rms_norm_fwd_kernel<T, kN, true>, scratch, "fwd" + s + ",1>");
  emu::set_static_smem(rms_norm_bwd_kernel<T, kN>, scratch, "bwd" + s + ">");
}

void setup(int mode, int smem_optin, int num_sms) {
  emu::g_mode = mode;
  emu::g_error = nullptr;
  emu::g_sanitize = true;
  emu::g_stack_bytes = 64 * 1024;
  emu::reset_runtime();
  emu::g_device.smem_optin = smem_optin;
  emu::g_device.num_sms = num_sms;
  // Stated on every call: emu's inline globals are GNU-unique symbols, shared with the other
  // emulators a test process has loaded, so the map may already hold their kernels (never
  // test it for emptiness).
  {
    state_row_kernels<float, 1>("float");
    state_row_kernels<float, 4>("float");
    state_row_kernels<__half, 1>("half");
    state_row_kernels<__half, 8>("half");
    state_row_kernels<__nv_bfloat16, 1>("bf16");
    state_row_kernels<__nv_bfloat16, 8>("bf16");
    emu::set_static_smem(rms_norm_dweight_reduce_kernel, sizeof(float[kReduceCols * kReduceRows]), "reduce");
  }
}

// The launch log, one "kernel grid threads dynamic_smem" line per launch, into `log`.
int finish(int err, char* log, int log_len) {
  emu::unguard_all();
  std::string s;
  for (const auto& l : emu::g_launch_log) s += l + "\n";
  if (log_len > 0) {
    std::snprintf(log, static_cast<std::size_t>(log_len), "%s", s.c_str());
  }
  if (emu::g_error) {
    std::fprintf(stderr, "rms_norm_emulate: %s\n", emu::g_error);
    return -1;
  }
  return err;
}

}  // namespace

// ptrs: x, residual, weight, y, h, rstd (residual, weight, h may be null).
// ints: x, residual, y, h row strides, rows, n, dtype (0 fp32, 1 fp16, 2 bf16).
// nbytes: each buffer's extent in bytes from its pointer (memcheck: guarded copies).
// Returns the launcher's cudaError_t (0), or -1 with the first emulation error printed.
extern "C" int rms_norm_fwd_emulate(void** host, const int64_t* nbytes, const int64_t* ints, float eps, int mode,
                                    int smem_optin, char* log, int log_len) {
  setup(mode, smem_optin, 132);
  static const char* const names[6] = {"x", "residual", "weight", "y", "h", "rstd"};
  void* ptrs[6];
  for (int i = 0; i < 6; ++i) ptrs[i] = emu::guard(host[i], nbytes[i], names[i]);
  RmsNormParams p;
  p.x = ptrs[0], p.residual = ptrs[1], p.weight = ptrs[2];
  p.y = ptrs[3], p.h = ptrs[4], p.rstd = static_cast<float*>(ptrs[5]);
  p.x_row_stride = ints[0], p.residual_row_stride = ints[1], p.y_row_stride = ints[2], p.h_row_stride = ints[3];
  p.rows = ints[4], p.n = ints[5];
  p.dtype = static_cast<DType>(ints[6]);
  p.eps = eps;
  const cudaError_t err = rms_norm_fwd_cuda(p, nullptr);
  return finish(static_cast<int>(err), log, log_len);
}

// As the binding: the number of row blocks (rows of dweight_partial) for this device.
extern "C" int64_t rms_norm_bwd_num_row_blocks_emulate(int64_t rows, int64_t n, int num_sms) {
  return rms_norm_bwd_num_row_blocks_cuda(rows, n, num_sms);
}

// ptrs: dy, x, weight, rstd, dh, dx, dweight, dweight_partial (weight, dh and, without a
// weight, dweight / dweight_partial may be null).
// ints: dy, x, dh, dx row strides, rows, n, dtype, num_row_blocks.
// nbytes: as for rms_norm_fwd_emulate.
extern "C" int rms_norm_bwd_emulate(void** host, const int64_t* nbytes, const int64_t* ints, int mode,
                                    int smem_optin, char* log, int log_len) {
  setup(mode, smem_optin, 132);
  static const char* const names[8] = {"dy", "x", "weight", "rstd", "dh", "dx", "dweight", "dweight_partial"};
  void* ptrs[8];
  for (int i = 0; i < 8; ++i) ptrs[i] = emu::guard(host[i], nbytes[i], names[i]);
  RmsNormBwdParams p;
  p.dy = ptrs[0], p.x = ptrs[1], p.weight = ptrs[2], p.rstd = static_cast<const float*>(ptrs[3]);
  p.dh = ptrs[4], p.dx = ptrs[5], p.dweight = static_cast<float*>(ptrs[6]);
  p.dweight_partial = static_cast<float*>(ptrs[7]);
  p.dy_row_stride = ints[0], p.x_row_stride = ints[1], p.dh_row_stride = ints[2], p.dx_row_stride = ints[3];
  p.rows = ints[4], p.n = ints[5];
  p.dtype = static_cast<DType>(ints[6]);
  p.num_row_blocks = ints[7];
  const cudaError_t err = rms_norm_bwd_cuda(p, nullptr);
  return finish(static_cast<int>(err), log, log_len);
}
