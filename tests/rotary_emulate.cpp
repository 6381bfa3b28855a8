// rotary_emulate.cpp — run the CUDA rotary kernel on the CPU, to test its indexing.
//
// Compiles csrc/cuda/rotary_kernel.cuh (the exact kernel, launch geometry and dispatch that
// rotary.cu launches) with a host C++ compiler, supplying host versions of the CUDA names it
// uses: each thread of a block is a std::thread with its own threadIdx, __syncthreads is a
// std::barrier over the block, dynamic shared memory is a per-block buffer filled with NaN
// (reading anything the block did not write poisons the result), __half / __nv_bfloat16 are
// 16-bit storage with round-to-nearest-even conversions, and every 16-byte vector access is
// checked for alignment (a misaligned one aborts, as it would fault on the GPU).
//
// Built as a shared library by tests/test_rotary_emulated.py and called through ctypes.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#define FASTATTN_ROTARY_EMULATE 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
thread_local std::barrier<>* g_block_barrier = nullptr;
thread_local float* g_block_smem = nullptr;

inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

#include "cuda_fp16_emulate.h"  // __half, __nv_bfloat16 and their conversions

#define FASTATTN_ROTARY_SMEM(name) float* name = g_block_smem
#define FASTATTN_ROTARY_CHECK_ALIGNED(ptr)                                                   \
  do {                                                                                       \
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {                                        \
      std::fprintf(stderr, "rotary_emulate: misaligned 16-byte access at %p\n", (const void*)(ptr)); \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)

#include "../csrc/cuda/rotary_kernel.cuh"

namespace {

using fastattn::RotaryParams;

template <typename Kernel>
void run_grid(Kernel kernel, const fastattn::rotary_detail::LaunchShape& s, const RotaryParams& p) {
  const int nthreads = static_cast<int>(s.bdx * s.bdy);
  for (int64_t block = 0; block < s.grid; ++block) {
    std::barrier<> barrier(nthreads);
    std::vector<float> smem(s.smem_bytes / sizeof(float) + 4, std::numeric_limits<float>::quiet_NaN());
    std::vector<std::thread> threads;
    threads.reserve(static_cast<size_t>(nthreads));
    for (int ty = 0; ty < s.bdy; ++ty) {
      for (int tx = 0; tx < s.bdx; ++tx) {
        threads.emplace_back([&, tx, ty] {
          threadIdx = dim3{static_cast<unsigned>(tx), static_cast<unsigned>(ty), 0};
          blockIdx = dim3{static_cast<unsigned>(block), 0, 0};
          blockDim = dim3{static_cast<unsigned>(s.bdx), static_cast<unsigned>(s.bdy), 1};
          gridDim = dim3{static_cast<unsigned>(s.grid), 1, 1};
          g_block_barrier = &barrier;
          g_block_smem = smem.data();
          kernel(p);
        });
      }
    }
    for (auto& t : threads) t.join();
  }
}

}  // namespace

// strides: q (batch, row, head), k (...), q_out (...), k_out (...). dtype: 0 fp32, 1 fp16,
// 2 bf16. max_grid caps the grid (to exercise the kernel's grid-stride loop). Returns the
// path taken: 1 vector, 0 scalar.
extern "C" int rotary_emulate(const void* q, const void* k, void* q_out, void* k_out, const int64_t* strides,
                              const float* cos, const float* sin, int64_t max_pos, const void* positions,
                              int positions_int64, int64_t positions_batch_stride, int64_t b, int64_t seqlen,
                              int64_t h, int64_t h_k, int64_t d, int64_t rotary_dim, int interleaved,
                              int conjugate, int dtype, int64_t max_grid) {
  RotaryParams p;
  p.q = q;
  p.k = k;
  p.q_out = q_out;
  p.k_out = k_out;
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
  p.cos = cos;
  p.sin = sin;
  p.max_pos = max_pos;
  p.positions = positions;
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
  FASTATTN_DTYPE_SWITCH(p.dtype, T, __half, __nv_bfloat16, [&] {
    vec = fastattn::rotary_detail::can_vectorize<T>(p) ? 1 : 0;
    fastattn::rotary_detail::dispatch<T>(p, max_grid, [&](auto kernel, const fastattn::rotary_detail::LaunchShape& s) {
      run_grid(kernel, s, p);
      return 0;
    });
  });
  return vec;
}
