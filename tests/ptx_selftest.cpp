// ptx_selftest.cpp — runs the PTX stand-ins of tests/ptx_emulate.h alone, one warp of 32 fibers
// per call, on operands given per lane by tests/test_ptx_emulate.py (which distributes matrices
// to lanes with the PTX ISA's fragment tables written out in Python and checks the results
// against numpy). Built as a shared library; nothing else of the emulators is compiled in.
//
// Entry points return 0, or 1 when the emulator reported an error (text: ptx_selftest_error).
#include <cstdint>
#include <cstring>
#include <vector>

#include "ptx_emulate.h"

namespace emu {
inline const char* g_error = nullptr;
void fail(const char* what) {
  if (!g_error) g_error = what;
}
}  // namespace emu

namespace {

int run_warp(std::size_t smem, const std::function<void()>& body) {
  emu::g_error = nullptr;
  emu::g_mode = 0;
  emu::g_stack_bytes = 64 * 1024;
  emu::g_kernel = "ptx_selftest";
  const int64_t grid[3] = {1, 1, 1};
  emu::launch(grid, 32, smem, body);
  return emu::g_error ? 1 : 0;
}

}  // namespace

extern "C" const char* ptx_selftest_error() { return emu::g_error ? emu::g_error : ""; }

// ldmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16: shared memory starts as `smem`
// (`smem_bytes` bytes), lane l gives row address addr[l]; out[4 * l + j] = register j of lane l
// (j < num; the rest stay as given).
extern "C" int ptx_ldmatrix(const uint8_t* smem, int smem_bytes, const uint32_t* addr, int num,
                            int trans, uint32_t* out) {
  return run_warp(static_cast<std::size_t>(smem_bytes), [&] {
    const int l = emu::lane();
    if (l == 0) std::memcpy(emu::smem_base(), smem, static_cast<std::size_t>(smem_bytes));
    emu::warp_barrier();
    auto read16 = [&](uint32_t a) {
      if (a + 2 > static_cast<uint32_t>(smem_bytes)) {
        emu::fail("ldmatrix read past the shared memory");
        return uint16_t{0};
      }
      uint16_t v;
      std::memcpy(&v, emu::smem_base() + a, 2);
      return v;
    };
    if (num == 1) {
      uint32_t r[1];
      ptx::ldmatrix(r, addr[l], trans != 0, read16);
      out[4 * l] = r[0];
    } else if (num == 2) {
      uint32_t r[2];
      ptx::ldmatrix(r, addr[l], trans != 0, read16);
      for (int j = 0; j < 2; ++j) out[4 * l + j] = r[j];
    } else {
      uint32_t r[4];
      ptx::ldmatrix(r, addr[l], trans != 0, read16);
      for (int j = 0; j < 4; ++j) out[4 * l + j] = r[j];
    }
  });
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: lane l holds a[4l..4l+3],
// b[2l], b[2l+1], c[4l..4l+3]; d[4l..4l+3] = its result registers.
extern "C" int ptx_mma(int bf, const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  return run_warp(0, [&] {
    const int l = emu::lane();
    const uint32_t ra[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
    float rc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
    if (bf)
      ptx::mma_m16n8k16<true>(rc, ra, b[2 * l], b[2 * l + 1]);
    else
      ptx::mma_m16n8k16<false>(rc, ra, b[2 * l], b[2 * l + 1]);
    for (int e = 0; e < 4; ++e) d[4 * l + e] = rc[e];
  });
}

// ex2.approx.ftz.f32 on n inputs (a plain function: no warp needed).
extern "C" void ptx_ex2(const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] = ptx::ex2_approx_ftz(x[i]);
}

// rcp.approx.ftz.f32 on n inputs (a plain function: no warp needed).
extern "C" void ptx_rcp(const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] = ptx::rcp_approx_ftz(x[i]);
}
