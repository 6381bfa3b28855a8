// dispatch.cpp — the api.h *_cpu entry points as run-time ISA dispatchers (fastattn._C only).
//
// A portable build (FASTATTN_CPU_MODE 0, setup.py's default) compiles the kernels three times:
// the baseline into _C (plain x86-64, runs anywhere) and two tier libraries next to it,
// _cpu_avx2<EXT_SUFFIX> (-march=x86-64-v3) and _cpu_avx512<EXT_SUFFIX> (-march=x86-64-v4).
// On the first kernel call (thread-safe static init) select() picks the best tier the CPU
// supports, or the one FASTATTN_CPU_ISA asks for (capped at what the CPU supports), dlopens
// its library from _C's own directory with RTLD_NOW | RTLD_LOCAL and keeps its table. A tier
// the CPU lacks is never loaded (its static initialisers may already use the ISA). A missing
// or unusable library means the next lower tier, with a one-line warning on stderr; nothing
// here can crash the process. See fastattn/cpu_dispatch.h for why the tiers are separate
// libraries.
//
// FASTATTN_CPU_ISA = auto (or unset) | baseline | avx2 | avx512. A tier the CPU does not
// support is capped at the best one it does (warning); any other value is ignored with a
// warning (auto selection). Read once, at the first kernel call.
//
// A single-tier build (FASTATTN_CPU_MARCH=native or another -march: FASTATTN_CPU_MODE 1 / 2)
// has no tier libraries: the kernels in _C are used as they are, and cpu_isa() says
// "native" / "custom".
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && defined(__linux__)
#include <dlfcn.h>
#define FASTATTN_CPU_TIERS_SUPPORTED 1
#else
#define FASTATTN_CPU_TIERS_SUPPORTED 0
#endif

#include "fastattn/api.h"
#include "fastattn/cpu_dispatch.h"

#ifndef FASTATTN_CPU_MODE
#define FASTATTN_CPU_MODE 0
#endif

namespace fastattn {
namespace {

constexpr const char* kTierNames[kNumCpuTiers] = {"baseline", "avx2", "avx512"};

struct Selection {
  const CpuKernelTable* table;
  const char* name;
};

void warn(const std::string& msg) { std::fprintf(stderr, "fastattn: %s\n", msg.c_str()); }

#if FASTATTN_CPU_TIERS_SUPPORTED
// True when the CPU (and the OS, which must save the wider registers: libgcc's / compiler-rt's
// cpu model checks XCR0) runs code built with the tier's -march.
bool cpu_supports(int tier) {
  __builtin_cpu_init();
  switch (tier) {
    case 0:
      return true;
    case 1:  // -march=x86-64-v3: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE (+ the v2 set)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("lzcnt") &&
             __builtin_cpu_supports("movbe") && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("sse4.2");
    case 2:  // -march=x86-64-v4: the v3 set + AVX-512 F/BW/CD/DQ/VL
      return cpu_supports(1) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
    default:
      return false;
  }
}

// An address inside _C, for dladdr.
void anchor() {}

// _C's directory and its extension suffix ("/.../fastattn", ".cpython-311-x86_64-linux-gnu.so").
bool self_location(std::string* dir, std::string* suffix) {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&anchor), &info) == 0 || info.dli_fname == nullptr) return false;
  const std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  *dir = slash == std::string::npos ? "." : path.substr(0, slash);
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  *suffix = base.rfind("_C", 0) == 0 ? base.substr(2) : ".so";
  return true;
}

const CpuKernelTable* load_tier(int tier) {
  std::string dir, suffix;
  if (!self_location(&dir, &suffix)) {
    warn(std::string("cannot locate the fastattn._C library; using the baseline CPU kernels instead of ") +
         kTierNames[tier]);
    return nullptr;
  }
  const std::string path = dir + "/_cpu_" + kTierNames[tier] + suffix;
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* err = dlerror();
    warn(std::string("cannot load the ") + kTierNames[tier] + " CPU kernels (" + (err ? err : path) +
         "); falling back to a lower tier");
    return nullptr;
  }
  using Fn = const CpuKernelTable* (*)();
  auto fn = reinterpret_cast<Fn>(dlsym(handle, "fastattn_cpu_kernel_table_v1"));
  const CpuKernelTable* t = fn ? fn() : nullptr;
  const uint32_t sizes[8] = FASTATTN_CPU_PARAMS_SIZES;
  if (t == nullptr || t->version != kCpuKernelTableVersion || t->table_size != sizeof(CpuKernelTable) ||
      std::memcmp(t->params_sizes, sizes, sizeof(sizes)) != 0 || t->tier != tier) {
    warn(path + " is not a kernel library of this build of fastattn (stale file?); falling back to a lower tier");
    return nullptr;  // left loaded: unloading buys nothing and its code never runs
  }
  return t;
}

int requested_tier(int best) {
  const char* env = std::getenv("FASTATTN_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best;
  for (int t = 0; t < kNumCpuTiers; ++t) {
    if (std::strcmp(env, kTierNames[t]) == 0) {
      if (t > best) {
        warn(std::string("FASTATTN_CPU_ISA=") + env + " is not supported by this CPU; using " + kTierNames[best]);
        return best;
      }
      return t;
    }
  }
  warn(std::string("ignoring FASTATTN_CPU_ISA=") + env + " (expected auto, baseline, avx2 or avx512); using " +
       kTierNames[best]);
  return best;
}
#endif  // FASTATTN_CPU_TIERS_SUPPORTED

Selection select() {
#if FASTATTN_CPU_MODE == 1
  return {cpu::builtin_kernel_table(), "native"};
#elif FASTATTN_CPU_MODE == 2
  return {cpu::builtin_kernel_table(), "custom"};
#elif FASTATTN_CPU_TIERS_SUPPORTED
  int best = 0;
  while (best + 1 < kNumCpuTiers && cpu_supports(best + 1)) ++best;
  for (int t = requested_tier(best); t > 0; --t) {
    if (const CpuKernelTable* table = load_tier(t)) return {table, kTierNames[t]};
  }
  return {cpu::builtin_kernel_table(), kTierNames[0]};
#else
  return {cpu::builtin_kernel_table(), "baseline"};
#endif
}

const Selection& selection() {
  static const Selection s = select();
  return s;
}

}  // namespace

const char* cpu_isa() { return selection().name; }

void rms_norm_fwd_cpu(const RmsNormParams& params) { selection().table->rms_norm_fwd(params); }
void rms_norm_bwd_cpu(const RmsNormBwdParams& params) { selection().table->rms_norm_bwd(params); }
void rotary_cpu(const RotaryParams& params) { selection().table->rotary(params); }
void flash_fwd_cpu(const FlashFwdParams& params) { selection().table->flash_fwd(params); }
void flash_bwd_cpu(const FlashBwdParams& params) { selection().table->flash_bwd(params); }
void decode_attention_cpu(const DecodeParams& params) { selection().table->decode_attention(params); }
void append_kv_cpu(const AppendKvParams& params) { selection().table->append_kv(params); }
void moe_experts_cpu(const MoeParams& params) { selection().table->moe_experts(params); }

}  // namespace fastattn
