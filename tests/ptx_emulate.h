// ptx_emulate.h — the host stand-ins of the tensor-core PTX the CUDA FlashAttention kernels use
// (one copy, shared by tests/flash_fwd_emulate.cpp and tests/flash_bwd_emulate.cpp), each written
// from the PTX ISA (section numbers of the PTX ISA 8.x manual, "Parallel Thread Execution ISA";
// checked against the ISA text on 2026-12-04. The titles are stable, the numbers shift between
// versions: the mma fragment section is 9.7.13.4.8 in 7.x, 9.7.14.5.8 in 8.x, 9.7.16.5.8 in 9.4):
//   * ptx::ldmatrix<N>        ldmatrix.sync.aligned.m8n8.x{1,2,4}{,.trans}.shared.b16
//   * ptx::mma_m16n8k16<kBf>  mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//   * ptx::ex2_approx_ftz     ex2.approx.ftz.f32
//   * ptx::rcp_approx_ftz     rcp.approx.ftz.f32
// Warp-level instructions run on the fibers of tests/fiber_emulate.h: each lane publishes its
// operands in its warp slot (emu::my_slot), a warp barrier makes all 32 lanes' operands visible,
// every lane computes its own result registers from them, a second barrier ends the exchange.
// cp.async, the shuffles and the barriers are in fiber_emulate.h (the emulators wrap cp.async
// with their own checks). The per-emulator checks of an access (bounds, alignment, sanitizer
// tracking) stay in the emulators; they pass the 16-bit shared-memory read to ptx::ldmatrix.
//
// Tested on their own against fragment tables written out from the ISA text by
// tests/test_ptx_emulate.py (via tests/ptx_selftest.cpp), independent of this code.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fiber_emulate.h"

namespace ptx {

// 16-bit element -> f32 (exact): IEEE binary16 or bfloat16 (the top half of a binary32).
inline float f16_bits_to_float(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <bool kBf>
inline float elem_to_float(uint16_t b) {
  return kBf ? bf16_bits_to_float(b) : f16_bits_to_float(b);
}

// ---- ldmatrix ----------------------------------------------------------------------------------
// PTX ISA 9.7.14.5.15 "Warp-level Matrix Load Instruction: ldmatrix", .shape .m8n8, .type .b16:
// .num = .x1 / .x2 / .x4 loads N = 1 / 2 / 4 8x8 matrices of 16-bit elements. Threads 8j..8j+7
// give the addresses of rows 0..7 of matrix j (for .x1 only threads 0-7 matter, for .x2 0-15);
// each row is 16 contiguous bytes, its address naturally aligned (16 bytes). Destination register
// r[j] of thread t holds row t/4, columns 2(t%4) (low half) and 2(t%4)+1 (high half) of matrix j
// (the ISA: each thread loads fragments of a row, thread 0 receiving the first; a group of four
// threads loads an entire row, its figure for .m8n8 .b16; the .x2 / .x4 matrices go to the next
// registers). .trans (each matrix read in column-major order): r[j] of thread t holds
// M_j[2(t%4)][t/4] (low) and M_j[2(t%4)+1][t/4] (high), i.e. column t/4 read from the rows
// 2(t%4), 2(t%4)+1.
// `read16(byte_addr)` reads one 16-bit element of shared memory (the emulator's checked read).
template <int N, typename Read16>
inline void ldmatrix(uint32_t (&r)[N], uint32_t row_addr, bool trans, Read16 read16) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix .num is .x1, .x2 or .x4");
  emu::my_slot()[0] = row_addr;
  emu::warp_barrier();
  const int l = emu::lane(), g = l / 4, t = l % 4;
  for (int i = 0; i < N; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint32_t row = emu::slot_of(8 * i + g)[0];
      lo = read16(row + 2 * (2 * t));
      hi = read16(row + 2 * (2 * t + 1));
    } else {
      lo = read16(emu::slot_of(8 * i + 2 * t)[0] + 2 * g);
      hi = read16(emu::slot_of(8 * i + 2 * t + 1)[0] + 2 * g);
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  emu::warp_barrier();
}

// ---- mma.sync m16n8k16 -------------------------------------------------------------------------
// PTX ISA 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type"
// (.atype = .btype = .f16 or .bf16, .ctype = .dtype = .f32), D = A (16x16, .row) * B (16x8,
// .col) + C. groupID = %laneid >> 2, threadID_in_group = %laneid % 4. Each 32-bit register holds
// two 16-bit elements, the lower-numbered one in the low half.
//   A: a0..a7 in 4 registers (a_i in register i/2, half i&1):
//        row = groupID for a0,a1,a4,a5, groupID + 8 for a2,a3,a6,a7
//        col = threadID_in_group * 2 + (i & 1), + 8 for a4..a7
//   B: b0..b3 in 2 registers (b_i in register i/2, half i&1):
//        row (k) = threadID_in_group * 2 + (i & 1), + 8 for b2,b3;  col (n) = groupID
//   C, D: c0..c3 / d0..d3 (f32):
//        row = groupID for c0,c1, groupID + 8 for c2,c3;  col = threadID_in_group * 2 + (i & 1)
// The inverse maps (which lane / register holds an element) are used to gather A and B. The
// products are summed in f32 in k order 0..15 onto c (the hardware's internal order and
// precision are not specified by the ISA).
template <bool kBf>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t(&s)[12] = emu::my_slot();
  for (int i = 0; i < 4; ++i) s[i] = a[i];
  s[4] = b0;
  s[5] = b1;
  emu::warp_barrier();
  auto elem = [](uint32_t reg, int k) {
    return elem_to_float<kBf>(static_cast<uint16_t>(k & 1 ? reg >> 16 : reg & 0xffff));
  };
  auto A = [&](int row, int k) {  // lane 4*(row%8) + (k%8)/2, register (row >= 8) + 2*(k >= 8)
    const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return elem(emu::slot_of(4 * (row % 8) + (k % 8) / 2)[reg], k);
  };
  auto B = [&](int k, int n) {  // lane 4n + (k%8)/2, register k >= 8
    return elem(emu::slot_of(4 * n + (k % 8) / 2)[4 + (k >= 8 ? 1 : 0)], k);
  };
  const int l = emu::lane(), g = l / 4, t = l % 4;
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[e] = acc;
  }
  emu::warp_barrier();
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

// ---- ex2 ---------------------------------------------------------------------------------------
// PTX ISA 9.7.3.21 "Floating Point Instructions: ex2": ex2.approx.ftz.f32 d, a computes an
// approximation of 2^a, at most 2 ulp from the correctly rounded result over the full range;
// ex2(-Inf) = +0, ex2(+-0) = +1, ex2(+Inf) = +Inf, NaN -> NaN; .ftz flushes subnormal inputs
// (2^+-0 = 1: no effect) and subnormal results to sign-preserving zero (+0 here). Emulated by
// std::exp2 (the ISA's approximation error is not modelled) with the .ftz flush of the result.
inline float ex2_approx_ftz(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

// ---- rcp ---------------------------------------------------------------------------------------
// PTX ISA 9.7.3.13 "Floating Point Instructions: rcp": rcp.approx.ftz.f32 d, a computes a fast
// approximation of 1/a, maximum error 1 ulp over the full range; rcp(+-0) = +-Inf,
// rcp(+-Inf) = +-0, NaN -> NaN; .ftz flushes subnormal inputs and results to sign-preserving 0.
// Emulated by the correctly rounded quotient (within the 1 ulp) with the .ftz flushing.
inline float rcp_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = std::copysign(0.0f, x);
  const float y = 1.0f / x;
  return std::fpclassify(y) == FP_SUBNORMAL ? std::copysign(0.0f, y) : y;
}

}  // namespace ptx
