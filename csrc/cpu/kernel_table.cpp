// kernel_table.cpp — the table of this compilation's CPU kernels (see fastattn/cpu_dispatch.h).
//
// Compiled into fastattn._C (the baseline kernels, FASTATTN_CPU_TIER_ID undefined) and into
// every tier library (-DFASTATTN_CPU_TIER_ID=<CpuTier> -DFASTATTN_CPU_TIER_LIBRARY), where it
// also defines the one exported symbol. The table is constant-initialised: loading a library
// runs none of its code until a kernel is called.
#include "fastattn/cpu_dispatch.h"

#ifndef FASTATTN_CPU_TIER_ID
#define FASTATTN_CPU_TIER_ID 0
#endif

namespace fastattn {
namespace cpu {
namespace {

constexpr CpuKernelTable kTable = {
    kCpuKernelTableVersion,
    static_cast<uint32_t>(sizeof(CpuKernelTable)),
    FASTATTN_CPU_PARAMS_SIZES,
    FASTATTN_CPU_TIER_ID,
    &rms_norm_fwd_kernel,
    &rms_norm_bwd_kernel,
    &rotary_kernel,
    &flash_fwd_kernel,
    &flash_bwd_kernel,
    &decode_attention_kernel,
    &append_kv_kernel,
    &moe_experts_kernel,
};

}  // namespace

const CpuKernelTable* builtin_kernel_table() { return &kTable; }

}  // namespace cpu
}  // namespace fastattn

#ifdef FASTATTN_CPU_TIER_LIBRARY
extern "C" __attribute__((visibility("default"))) const fastattn::CpuKernelTable* fastattn_cpu_kernel_table_v1(void) {
  return fastattn::cpu::builtin_kernel_table();
}
#endif
