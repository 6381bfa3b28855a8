// cpu_dispatch.h — run-time ISA dispatch of the CPU kernels (torch-free).
//
// The CPU kernels (csrc/cpu) are compiled more than once: for a plain x86-64 baseline into
// fastattn._C, and with higher -march levels into separate shared libraries, one per tier
// (fastattn/_cpu_avx2*.so: -march=x86-64-v3, fastattn/_cpu_avx512*.so: -march=x86-64-v4).
// Each tier library exports exactly one symbol, fastattn_cpu_kernel_table_v1, returning the
// table below. The api.h *_cpu functions in _C are thin dispatchers (csrc/cpu/dispatch.cpp):
// on first use they pick the best tier this CPU supports, dlopen its library RTLD_LOCAL and
// call through the table; without a usable library they use the baseline kernels in _C.
//
// Why separate libraries and not one .so with the same sources compiled per -march: every
// inline function and template the kernels pull in (std::, ATen's parallel_for, ...) is
// emitted as a COMDAT in each object, and the linker keeps ONE copy per library — possibly
// the AVX-512 one, which baseline callers would then run (SIGILL on an older CPU). Separate
// libraries built with -fvisibility=hidden and loaded RTLD_LOCAL keep each tier's code to
// itself, and a tier the CPU lacks is never loaded, so not even its static initialisers run.
#pragma once

#include <cstdint>

#include "fastattn/params.h"

namespace fastattn {

// Bump when the table layout or a kernel's contract changes.
constexpr uint32_t kCpuKernelTableVersion = 3;  // 2: paged / multi-query DecodeParams; 3: moe_experts

// Tiers, lowest first. A later avx512bf16 / amx tier (issue 17) goes after kAvx512: add its
// kernels, a row to the table in dispatch.cpp and an extension in setup.py.
enum class CpuTier : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumCpuTiers = 3;

// The CPU entry points of api.h that depend on the instruction set (the pure shape helpers,
// decode_num_splits_cpu and rms_norm_bwd_num_row_blocks_cpu, must give the same answer on
// every tier and so live in _C only).
struct CpuKernelTable {
  uint32_t version;      // kCpuKernelTableVersion
  uint32_t table_size;   // sizeof(CpuKernelTable)
  // sizeof of each params struct as the library was compiled: a library left over from a
  // build with other headers is rejected instead of reading fields at the wrong offsets.
  uint32_t params_sizes[8];
  int tier;              // CpuTier the library was compiled for
  void (*rms_norm_fwd)(const RmsNormParams&);
  void (*rms_norm_bwd)(const RmsNormBwdParams&);
  void (*rotary)(const RotaryParams&);
  void (*flash_fwd)(const FlashFwdParams&);
  void (*flash_bwd)(const FlashBwdParams&);
  void (*decode_attention)(const DecodeParams&);
  void (*append_kv)(const AppendKvParams&);
  void (*moe_experts)(const MoeParams&);
};

#define FASTATTN_CPU_PARAMS_SIZES                                                             \
  {                                                                                           \
    sizeof(::fastattn::RmsNormParams), sizeof(::fastattn::RmsNormBwdParams),                  \
        sizeof(::fastattn::RotaryParams), sizeof(::fastattn::FlashFwdParams),                 \
        sizeof(::fastattn::FlashBwdParams), sizeof(::fastattn::DecodeParams),                 \
        sizeof(::fastattn::AppendKvParams), sizeof(::fastattn::MoeParams)                    \
  }

namespace cpu {
// The kernels, defined in csrc/cpu/*.cpp and compiled once per tier.
void rms_norm_fwd_kernel(const RmsNormParams& params);
void rms_norm_bwd_kernel(const RmsNormBwdParams& params);
void rotary_kernel(const RotaryParams& params);
void flash_fwd_kernel(const FlashFwdParams& params);
void flash_bwd_kernel(const FlashBwdParams& params);
void decode_attention_kernel(const DecodeParams& params);
void append_kv_kernel(const AppendKvParams& params);
void moe_experts_kernel(const MoeParams& params);

// This compilation's table (csrc/cpu/kernel_table.cpp): in _C the baseline (or -march=native)
// kernels, in a tier library that tier's.
const CpuKernelTable* builtin_kernel_table();
}  // namespace cpu

// The tier in use, chosen on first call (thread-safe): "baseline", "avx2" or "avx512" in a
// portable build; "native" (FASTATTN_CPU_MARCH=native) or "custom" (another -march value)
// in a single-tier build.
const char* cpu_isa();

}  // namespace fastattn

// Exported by each tier library (and only there).
extern "C" const fastattn::CpuKernelTable* fastattn_cpu_kernel_table_v1(void);
