// rotary_emulate.cpp — run the CUDA rotary kernel on the CPU, to test its indexing.
//
// Compiles csrc/cuda/rotary_kernel.cuh (the exact kernel, launch geometry and dispatch that
// rotary.cu launches) with a host C++ compiler, supplying host versions of the CUDA names it
// uses: every thread of a block is a fiber of the shared runtime (fiber_emulate.h; a 2-D
// block of bdx x bdy threads, warps of 32 consecutive linear thread ids), __syncthreads is a
// barrier between fibers, dynamic shared memory is the block's buffer filled with NaN bytes
// at every block start (reading anything the block did not write poisons the result),
// __half / __nv_bfloat16 are 16-bit storage with round-to-nearest-even conversions, and
// every 16-byte vector access is checked for alignment (a misaligned one is reported, as it
// would fault on the GPU).
//
// Sanitizers (fiber_emulate.h, "sanitizer analogues"), on for every run:
//   * memcheck: every buffer (q, k, q_out, k_out, cos, sin, positions; sizes from the caller)
//     is a guarded copy (an in-place output shares its input's copy), so a raw out-of-bounds
//     access faults and is reported with the kernel, buffer and offset; every 16-byte vector
//     access (FASTATTN_ROTARY_CHECK_ALIGNED) and every __ldg of the cos / sin tables is
//     bounds-checked byte-exactly against the buffers;
//   * racecheck / initcheck / bank conflicts: the kernel's only shared memory, the token's
//     cos / sin, is written and read through float_convert.cuh's lds / sts, which
//     FASTATTN_EMU_TRACK_SMEM routes to emu::smem_store / smem_load here: a read of a word no
//     thread wrote, or a refill of the angles while another warp may still read the previous
//     token's (no __syncthreads between), fails the run;
//   * every 128-bit store (float_convert.cuh's store16, st.global.v4.b32 on the GPU) is
//     alignment- and bounds-checked (FASTATTN_STORE16 -> emu::store16_words).
//
// Built as a shared library by tests/test_rotary_emulated.py and called through ctypes.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#define FASTATTN_ROTARY_EMULATE 1
#include "fiber_emulate.h"  // fibers, barriers, the sanitizers

namespace emu {

inline const char* g_error = nullptr;

// Errors are recorded (the first one wins) and the entry point returns -1 after printing it.
void fail(const char* what) {
  if (!g_error) g_error = what;
}

// A 16-byte vector access: aligned, and inside one of the guarded buffers.
template <typename T>
inline void check_vector(T* ptr) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) fail("rotary_emulate: misaligned 16-byte access");
  check_global(ptr, 16, !std::is_const<T>::value, "16-byte vector");
}

// float_convert.cuh's store16: one 16-byte global store of four 32-bit words.
inline void store16_words(void* ptr, uint32_t x, uint32_t y, uint32_t z, uint32_t w) {
  check_vector(ptr);
  const uint32_t words[4] = {x, y, z, w};
  std::memcpy(ptr, words, 16);
}

}  // namespace emu

#define FASTATTN_STORE16(ptr, x, y, z, w) ::emu::store16_words(ptr, x, y, z, w)
#define FASTATTN_EMU_TRACK_SMEM 1

template <typename T>
inline T __ldg(const T* p) {
  emu::check_global(p, sizeof(T), false, "__ldg");
  return *p;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

#include "cuda_fp16_emulate.h"  // __half, __nv_bfloat16 and their conversions

#define FASTATTN_ROTARY_SMEM(name) float* name = reinterpret_cast<float*>(::emu::smem_base())
#define FASTATTN_ROTARY_CHECK_ALIGNED(ptr) ::emu::check_vector(ptr)

#include "../csrc/cuda/rotary_kernel.cuh"

namespace {

using fastattn::RotaryParams;

template <typename Kernel>
void run_grid(Kernel kernel, const fastattn::rotary_detail::LaunchShape& s, const RotaryParams& p) {
  const int nthreads = static_cast<int>(s.bdx * s.bdy);
  const int64_t grid[3] = {s.grid, 1, 1};
  emu::launch(grid, nthreads, s.smem_bytes, [&] { kernel(p); }, static_cast<int>(s.bdx));
}

}  // namespace

// emu::g_mode for the following rotary_emulate calls (bit 1: reverse fiber schedule; the
// kernel has no cp.async, so bit 0 changes nothing).
static int g_rotary_mode = 0;
extern "C" void rotary_emulate_set_mode(int mode) { g_rotary_mode = mode; }

// strides: q (batch, row, head), k (...), q_out (...), k_out (...). dtype: 0 fp32, 1 fp16,
// 2 bf16. max_grid caps the grid (to exercise the kernel's grid-stride loop). nbytes: the
// extents in bytes of q, k, q_out, k_out, cos, sin, positions (memcheck: guarded copies).
// Returns the path taken: 1 vector, 0 scalar; -1 with the first emulation error printed.
extern "C" int rotary_emulate(const void* q, const void* k, void* q_out, void* k_out, const int64_t* strides,
                              const float* cos, const float* sin, int64_t max_pos, const void* positions,
                              int positions_int64, int64_t positions_batch_stride, int64_t b, int64_t seqlen,
                              int64_t h, int64_t h_k, int64_t d, int64_t rotary_dim, int interleaved,
                              int conjugate, int dtype, int64_t max_grid, const int64_t* nbytes) {
  emu::g_error = nullptr;
  emu::g_mode = g_rotary_mode;
  emu::g_sanitize = true;
  emu::g_stack_bytes = 64 * 1024;
  RotaryParams p;
  p.q = emu::guard(const_cast<void*>(q), nbytes[0], "q");
  p.k = emu::guard(const_cast<void*>(k), nbytes[1], "k");
  p.q_out = emu::guard(q_out, nbytes[2], "q_out");
  p.k_out = emu::guard(k_out, nbytes[3], "k_out");
  p.q_batch_stride = strides[0];
  p.q_row_stride = strides[1];
  p.q_head_stride = strides[2];
  p.k_batch_stride = strides[3];
  p.k_row_stride = strides[4];
  p.k_head_stride = strides[5];
  p.q_out_batch_stride = strides[6];
  p.q_out_row_stride = strides[7];
  p.q_out_head_stride = strides[8];
  p.k_out_batch_stride = strides[9];
  p.k_out_row_stride = strides[10];
  p.k_out_head_stride = strides[11];
  p.cos = static_cast<const float*>(emu::guard(const_cast<float*>(cos), nbytes[4], "cos"));
  p.sin = static_cast<const float*>(emu::guard(const_cast<float*>(sin), nbytes[5], "sin"));
  p.max_pos = max_pos;
  p.positions = emu::guard(const_cast<void*>(positions), nbytes[6], "positions");
  p.positions_int64 = positions_int64 != 0;
  p.positions_batch_stride = positions_batch_stride;
  p.b = b;
  p.seqlen = seqlen;
  p.h = h;
  p.h_k = h_k;
  p.d = d;
  p.rotary_dim = rotary_dim;
  p.interleaved = interleaved != 0;
  p.conjugate = conjugate != 0;
  p.dtype = static_cast<fastattn::DType>(dtype);
  int vec = -1;
  static std::string name;
  FASTATTN_DTYPE_SWITCH(p.dtype, T, __half, __nv_bfloat16, [&] {
    vec = fastattn::rotary_detail::can_vectorize<T>(p) ? 1 : 0;
    name = std::string("rotary_kernel<") + (dtype == 0 ? "float" : dtype == 1 ? "half" : "bf16") + "," +
           (p.interleaved ? "1" : "0") + "," + std::to_string(vec) + ">";
    emu::g_kernel = name.c_str();
    fastattn::rotary_detail::dispatch<T>(p, max_grid, [&](auto kernel, const fastattn::rotary_detail::LaunchShape& s) {
      run_grid(kernel, s, p);
      return 0;
    });
  });
  emu::unguard_all();
  if (emu::g_error) {
    std::fprintf(stderr, "rotary_emulate: %s\n", emu::g_error);
    return -1;
  }
  return vec;
}
