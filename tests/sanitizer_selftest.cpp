// sanitizer_selftest.cpp — deliberately bad tiny kernels, run by the fiber emulator with the
// sanitizer analogues of tests/fiber_emulate.h on, to prove each checker fires (and stays
// quiet on the corrected kernel). Built as a shared library by tests/test_emulator_sanitizers.py.
//
// Every entry point runs one kernel and returns 0 (clean) or 1 (an error was reported; its
// text via selftest_error). The global buffer is 100 floats, guarded like the real emulators'.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "fiber_emulate.h"

namespace emu {
inline const char* g_error = nullptr;
void fail(const char* what) {
  if (!g_error) g_error = what;
}
}  // namespace emu

namespace {

constexpr int kN = 100;  // floats in the global buffer

// As the real emulators' cp.async: the source is bounds-checked, the copy queued.
void cp_async16(uint32_t dst, const void* src) {
  emu::check_global(src, 16, false, "cp.async source");
  emu::queue_copy(emu::Copy{dst, src, 16, true});
}

int run(const char* name, int threads, std::size_t smem, float* host, const std::function<void(float*)>& kernel) {
  emu::g_error = nullptr;
  emu::g_mode = 0;
  emu::g_sanitize = true;
  emu::g_stack_bytes = 64 * 1024;
  emu::g_kernel = name;
  float* buf = static_cast<float*>(emu::guard(host, kN * sizeof(float), "buf"));
  const int64_t grid[3] = {1, 1, 1};
  emu::launch(grid, threads, smem, [&] { kernel(buf); });
  emu::unguard_all();
  return emu::g_error ? 1 : 0;
}

}  // namespace

extern "C" const char* selftest_error() { return emu::g_error ? emu::g_error : ""; }

// memcheck. kind 0: thread t reads buf[t + off] (raw load); 1: writes it (raw store); 2: a
// cp.async whose 16-byte source starts at buf + off (bounds-checked, not a guard-page hit).
extern "C" int selftest_global(float* host, int kind, int off) {
  return run(kind == 0 ? "oob_read" : kind == 1 ? "oob_write" : "oob_cp_async", 32, 64, host, [&](float* buf) {
    const int t = static_cast<int>(threadIdx.x);
    if (kind == 0) {
      volatile float x = buf[t + off];
      (void)x;
    } else if (kind == 1) {
      buf[t + off] = 1.0f;
    } else if (t == 0) {
      cp_async16(0, buf + off);
      emu::my_fiber().open.clear();
    }
  });
}

// racecheck / initcheck, two warps, tracked st / ld.shared. kind
//   0: warp 0 writes word 0, warp 1 reads it       (read after write)
//   1: warps 0 and 1 both write word 0             (write after write)
//   2: every warp writes its word, barrier, warp 0 reads word 1 while warp 1 rewrites it
//      (write after read)
//   3: lane 0 of warp 1 reads word 5, never written (initcheck)
// barrier: a __syncthreads between the two conflicting accesses (the corrected kernel; for
// kind 3 it changes nothing).
extern "C" int selftest_smem(float* host, int kind, int barrier) {
  return run("smem_hazard", 64, 64, host, [&](float*) {
    const int t = static_cast<int>(threadIdx.x), warp = t / 32, lane = t % 32;
    if (kind == 0) {
      if (t == 0) emu::smem_store<float>(0, 1.0f);
      if (barrier) __syncthreads();
      if (warp == 1 && lane == 0) (void)emu::smem_load<float>(0);
    } else if (kind == 1) {
      if (lane == 0 && warp == 0) emu::smem_store<float>(0, 1.0f);
      if (barrier) __syncthreads();
      if (lane == 0 && warp == 1) emu::smem_store<float>(0, 2.0f);
    } else if (kind == 2) {
      if (lane == 0) emu::smem_store<float>(4 * warp, 1.0f);
      __syncthreads();
      if (lane == 0 && warp == 0) (void)emu::smem_load<float>(4);
      if (barrier) __syncthreads();
      if (lane == 0 && warp == 1) emu::smem_store<float>(4, 2.0f);
    } else {
      if (lane == 0) emu::smem_store<float>(4 * warp, 1.0f);
      if (barrier) __syncthreads();
      if (lane == 0 && warp == 1) (void)emu::smem_load<float>(barrier ? 4 : 20);
    }
  });
}

// Bank conflicts: one warp, 4-byte tracked stores at lane * stride_words * 4, then 16-byte
// cp.async destinations at lane * 16 (conflict-free); the counts go to emu_bank_report
// under the kernel name given.
extern "C" int selftest_bank(float* host, int stride_words, const char* name) {
  static std::string n;
  n = name;
  return run(n.c_str(), 32, 32 * 32 * 4 + 64, host, [&](float* buf) {
    const int lane = static_cast<int>(threadIdx.x);
    emu::smem_store<float>(uint32_t(lane * stride_words * 4), 1.0f);
    cp_async16(uint32_t(lane * 16), buf + (lane % 24) * 4);
    __syncthreads();
  });
}
