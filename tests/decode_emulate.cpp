// decode_emulate.cpp — run csrc/cuda/decode.cu and decode_softcap.cu on the CPU: their entry
// points (decode_attention_cuda with its checks and softcap twin choice, append_kv_cuda with
// its 16-byte / element path choice, decode_num_splits_cuda, decode_cuda_supports_layout), the
// launches of decode_launch.cuh (dispatch, grids, shared-memory opt-in) and the kernels of
// decode_kernels.cuh, as a shared library driven by tests/test_decode_emulated.py. Both .cu
// files are #included here unmodified, with FASTATTN_DECODE_EMULATE defined and an include
// directory of empty <cuda_runtime.h> / <cuda_runtime_api.h> stubs (the test builds it).
//
// Host versions of what the code uses from CUDA:
//   * every thread of a block is a fiber (ucontext); __syncthreads / __syncwarp and
//     __shfl_xor_sync / __shfl_sync are barriers between fibers, so the kernels' own control
//     flow, warp roles, indexing, double buffering and merges run as written;
//   * the launchers' runtime calls and launches: the CUDA runtime stand-ins of fiber_emulate.h
//     (emu::KernelLaunch: block size, grid limits, dynamic shared memory against the
//     cudaFuncSetAttribute limit) on an emulated device whose SM count and opt-in shared
//     memory per block are set per call (emu_set_device); decode_launch_log lists the launches;
//   * cp.async.cg (16 bytes, zero-fill when src-size is 0) with commit / wait_group: in
//     "late" mode (mode bit 0) a copy lands only when a wait_group retires its group, the
//     latest moment the PTX ISA allows, so a read of a tile that was not waited for sees
//     stale data; otherwise at issue, the earliest, so a refill of a stage that other warps
//     still read shows up. Mode bit 1 schedules the fibers in reverse order.
//   * __half / __nv_bfloat16: 16-bit storage, round-to-nearest-even conversions.
// Shared memory is filled with NaN bytes at every block start.
//
// Sanitizers (fiber_emulate.h, "sanitizer analogues"), on for every run:
//   * memcheck: every buffer (q, caches, seqlens, out, lse, partials, block table; k / v of
//     append_kv; sizes from the caller) is a guarded copy, so a raw out-of-bounds load / store
//     faults and is reported with the kernel, buffer and offset; every cp.async source (when
//     it reads) is bounds-checked against the buffers byte-exactly;
//   * racecheck / initcheck / bank conflicts: at EVERY shared-memory access of the kernels:
//     the cp.async destinations (when the copy lands) and all loads / stores, which the
//     kernels make through lds<V> / sts<V> (decode_kernels.cuh; tracked here, a plain
//     dereference on the GPU). The combine and append kernels use no shared memory.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#define FASTATTN_DECODE_EMULATE 1
#include "fiber_emulate.h"  // fibers, barriers, shuffles, the cp.async queues, runtime, sanitizers
#include "ptx_emulate.h"    // ex2.approx / rcp.approx (soft-capping), ldmatrix / mma (decode_mma.cuh)

namespace fastattn {  // softcap.cuh's ex2.approx.ftz / rcp.approx.ftz wrappers (soft-capping)
inline float softcap_ex2(float x) { return ptx::ex2_approx_ftz(x); }
inline float softcap_rcp(float x) { return ptx::rcp_approx_ftz(x); }
}  // namespace fastattn

struct uint4 {
  uint32_t x, y, z, w;
};
struct alignas(8) uint2 {
  uint32_t x, y;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
template <typename T>
inline T min(T a, T b) { return a < b ? a : b; }
template <typename T>
inline T max(T a, T b) { return a > b ? a : b; }
inline float __log2f(float x) { return std::log2(x); }
inline float __logf(float x) { return std::log(x); }
inline float __expf(float x) { return std::exp(x); }

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float to_float(__half x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return static_cast<float>(h);
}
inline float to_float(__nv_bfloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float2 to_float2(uint32_t bits, __half) {
  return float2{to_float(__half{static_cast<uint16_t>(bits & 0xffff)}), to_float(__half{static_cast<uint16_t>(bits >> 16)})};
}
inline float2 to_float2(uint32_t bits, __nv_bfloat16) {
  return float2{to_float(__nv_bfloat16{static_cast<uint16_t>(bits & 0xffff)}),
                to_float(__nv_bfloat16{static_cast<uint16_t>(bits >> 16)})};
}
template <typename T> inline T from_float(float x);
template <> inline __half from_float<__half>(float x) {
  const _Float16 h = static_cast<_Float16>(x);  // round to nearest even
  __half r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

namespace emu {

inline const char* g_error = nullptr;
inline std::string g_error_text;

// Errors are recorded (the first one wins, copied: failf keeps only its latest 256 messages)
// and the entry point returns 1 after printing it.
void fail(const char* what) {
  if (!g_error) {
    g_error_text = what;
    g_error = g_error_text.c_str();
  }
}

}  // namespace emu

#define FASTATTN_DECODE_SMEM(name) unsigned char* name = ::emu::dynamic_smem()

inline uint32_t smem_u32(const void* p) { return emu::smem_offset(p); }

// The kernels' shared-memory loads and stores (decode_kernels.cuh): tracked accesses.
template <typename V>
inline V lds(const void* p) {
  return emu::smem_load<V>(emu::smem_offset(p));
}
template <typename V>
inline void sts(void* p, const V& v) {
  emu::smem_store<V>(emu::smem_offset(p), v);
}

inline void cp_async16(uint32_t dst, const void* src, bool pred) {
  if (dst % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::fail("misaligned cp.async");
  if (dst + 16 > emu::g_block->smem.size() - 16) emu::fail("cp.async past the shared memory");
  if (pred) emu::check_global(src, 16, false, "cp.async source");
  emu::queue_copy(emu::Copy{dst, src, 16, pred});
}
// commit / wait_group: a commit closes the open group; a wait retires (performs, in late
// mode) the oldest committed groups until at most kPending remain.
inline void cp_async_commit() {
  emu::Fiber& f = emu::my_fiber();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int kPending>
inline void cp_async_wait() {
  emu::Fiber& f = emu::my_fiber();
  while (int(f.groups.size()) > kPending) {
    for (const auto& c : f.groups.front()) emu::do_copy(c);
    f.groups.erase(f.groups.begin());
  }
}

// Indexed shuffle of a 64-bit value (the paged tile loader shares row addresses this way).
inline long long __shfl_sync(unsigned /*mask*/, long long v, int src) {
  uint32_t w[2];
  std::memcpy(w, &v, 8);
  emu::my_slot()[0] = w[0];
  emu::my_slot()[1] = w[1];
  emu::warp_barrier();
  if (src < 0 || src >= 32) emu::fail("shuffle source lane out of range");
  const uint32_t* s = emu::slot_of(src & 31);
  w[0] = s[0];
  w[1] = s[1];
  emu::warp_barrier();
  long long out;
  std::memcpy(&out, w, 8);
  return out;
}

// __any_sync (decode_mma.cuh's rescale vote): true if any lane's predicate is.
inline bool __any_sync(unsigned /*mask*/, bool pred) {
  emu::my_slot()[0] = pred ? 1u : 0u;
  emu::warp_barrier();
  bool any = false;
  for (int l = 0; l < 32; ++l) any |= emu::slot_of(l)[0] != 0;
  emu::warp_barrier();
  return any;
}

// decode_mma.cuh's tensor-core operations: ldmatrix.x4 (.trans) and mma.m16n8k16 from
// tests/ptx_emulate.h (the stand-ins the flash emulators use); each lane's ldmatrix row is
// checked (16 bytes, 16-byte aligned, inside shared memory) and tracked for the sanitizers.
inline void dmma_ldsm_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  if (addr % 16 != 0 || addr + 16 > emu::g_block->smem.size() - 16) emu::fail("ldmatrix row misaligned or past the shared memory");
  emu::smem_track(addr, 16, false, "ldmatrix");
  ptx::ldmatrix(r, addr, trans, [](uint32_t a) {
    uint16_t v;
    std::memcpy(&v, emu::smem_base() + a, 2);
    return v;
  });
}
inline void dmma_ldsm_x4(uint32_t (&r)[4], uint32_t addr) { dmma_ldsm_impl(r, addr, false); }
inline void dmma_ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) { dmma_ldsm_impl(r, addr, true); }
template <typename T>
struct DmmaOps {
  static constexpr bool kBf = std::is_same<T, __nv_bfloat16>::value;
  static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16<kBf>(d, a, b0, b1);
  }
  static uint32_t pack(float lo, float hi) {  // round to nearest even, lo in the low half
    return uint32_t(from_float<T>(lo).bits) | (uint32_t(from_float<T>(hi).bits) << 16);
  }
};

// Whether the launcher may pick decode_mma_kernel (emu_set_decode_mma; on by default): the
// decode_kernel tests switch it off so that they keep running the CUDA-core kernel on every
// group size (and the mutation tests that name them keep catching its bugs).
namespace fastattn {
namespace decode_kernels {
inline bool g_decode_mma_enabled = true;
bool emu_decode_mma_enabled() { return g_decode_mma_enabled; }
}  // namespace decode_kernels
}  // namespace fastattn

// The real launchers and kernels, unmodified.
#include "decode.cu"
#include "decode_softcap.cu"

using namespace fastattn;
using namespace fastattn::decode_kernels;

namespace {

constexpr std::size_t kStackBytes = 256 * 1024;  // per fiber

// Every kernel the launchers may start, with the name the reports use. None declares static
// __shared__ memory (decode_kernel's is all dynamic).
template <typename T, int kD>
void state_kernels(const char* tname) {
  const std::string s = std::string("<") + tname + "," + std::to_string(kD);
  emu::set_static_smem(decode_kernel<T, kD, false>, 0, "decode_kernel" + s + ">");
  emu::set_static_smem(decode_kernel<T, kD, true>, 0, "decode_kernel" + s + ",softcap>");
  emu::set_static_smem(decode_combine_kernel<T, kD>, 0, "decode_combine_kernel" + s + ">");
  if constexpr (kD == 64 || kD == 128) {
    emu::set_static_smem(decode_mma_kernel<T, kD, 1>, 0, "decode_mma_kernel" + s + ",1>");
    emu::set_static_smem(decode_mma_kernel<T, kD, 2>, 0, "decode_mma_kernel" + s + ",2>");
  }
  if constexpr (kD == 128) {  // the 2-stage variant for 99 KiB parts
    emu::set_static_smem(decode_mma_kernel<T, kD, 1, kMmaStagesCompact>, 0, "decode_mma_kernel" + s + ",1,2stages>");
    emu::set_static_smem(decode_mma_kernel<T, kD, 2, kMmaStagesCompact>, 0, "decode_mma_kernel" + s + ",2,2stages>");
  }
}

int g_smem_optin = 227 * 1024, g_num_sms = 132;  // the emulated device (emu_set_device)

void setup(int mode) {
  emu::g_mode = mode;
  emu::g_stack_bytes = kStackBytes;
  emu::g_error = nullptr;
  emu::g_sanitize = true;
  emu::reset_runtime();
  emu::g_device.smem_optin = g_smem_optin;
  emu::g_device.num_sms = g_num_sms;
  if (emu::g_static_smem.empty()) {
    for (const char* t : {"half", "bf16"}) {
      const bool h = std::string(t) == "half";
      h ? state_kernels<__half, 64>(t) : state_kernels<__nv_bfloat16, 64>(t);
      h ? state_kernels<__half, 96>(t) : state_kernels<__nv_bfloat16, 96>(t);
      h ? state_kernels<__half, 128>(t) : state_kernels<__nv_bfloat16, 128>(t);
      h ? state_kernels<__half, 256>(t) : state_kernels<__nv_bfloat16, 256>(t);
    }
    emu::set_static_smem(append_kv_kernel<uint4>, 0, "append_kv_kernel<uint4>");
    emu::set_static_smem(append_kv_kernel<uint32_t>, 0, "append_kv_kernel<uint32_t>");
    emu::set_static_smem(append_kv_kernel<uint16_t>, 0, "append_kv_kernel<uint16_t>");
  }
}

// The first error of the run (emulation or launcher), or null.
std::string g_last;
int finish(cudaError_t rc, const char* who) {
  emu::unguard_all();
  if (emu::g_error == nullptr && rc != cudaSuccess) {
    static std::string msg;
    msg = std::string(who) + " returned cudaError_t " + std::to_string(int(rc));
    emu::g_error = msg.c_str();
  }
  g_last = emu::g_error ? emu::g_error : "";
  if (emu::g_error) std::fprintf(stderr, "decode_emulate: %s\n", emu::g_error);
  return emu::g_error ? 1 : 0;
}

}  // namespace

// The emulated device for the following calls: opt-in shared memory per block (bytes) and SM count.
extern "C" void emu_set_device(int smem_optin, int num_sms) {
  g_smem_optin = smem_optin;
  g_num_sms = num_sms;
}

// decode_mma_kernel allowed (1, the default) or not (0: decode_kernel runs every shape).
extern "C" void emu_set_decode_mma(int on) { fastattn::decode_kernels::g_decode_mma_enabled = on != 0; }

// The last run's first error ("" when clean) and its launches, one "kernel grid threads smem"
// line each (grid "x" or "xXyXz").
extern "C" const char* decode_last_error() { return g_last.c_str(); }
extern "C" int decode_launch_log(char* buf, int len) {
  std::string s;
  for (const auto& l : emu::g_launch_log) s += l + "\n";
  if (buf != nullptr && len > 0) std::snprintf(buf, static_cast<std::size_t>(len), "%s", s.c_str());
  return static_cast<int>(s.size()) + 1;
}

// decode_attention_cuda (decode.cu) on the emulated device.
// ptrs: q, k_cache, v_cache, cache_seqlens, out, lse, out_partial, lse_partial, block_table
//       (null: contiguous cache).
// ints: q batch/row/head, k batch/row/head, v batch/row/head, out batch/row/head strides
//       (k/v batch = page stride when paged), then b, seqlen_q, seqlen_k_max, h, h_k, d,
//       num_splits, bf16 (0/1), seqlens_k_add, window_left, window_right,
//       block_table_batch_stride, page_size, num_pages.
// nbytes: each buffer's extent in bytes from its pointer (what the kernels may touch; each is
//         run on a guarded copy of it, see the sanitizers above).
// softcap: DecodeParams::softcap (0 = off). Returns 0, or 1 with the first error (emulation,
// or the launcher's cudaError_t) printed and kept for decode_last_error.
extern "C" int decode_emulate(void** ptrs, const int64_t* nbytes, const int64_t* ints, float softmax_scale,
                              int mode, float softcap) {
  setup(mode);
  static const char* const names[9] = {"q", "k_cache", "v_cache", "cache_seqlens", "out", "lse",
                                       "out_partial", "lse_partial", "block_table"};
  void* g[9];
  for (int i = 0; i < 9; ++i) g[i] = emu::guard(ptrs[i], nbytes[i], names[i]);
  DecodeParams p;
  p.q = g[0], p.k_cache = g[1], p.v_cache = g[2];
  p.cache_seqlens = static_cast<const int32_t*>(g[3]);
  p.out = g[4], p.lse = static_cast<float*>(g[5]);
  p.out_partial = static_cast<float*>(g[6]), p.lse_partial = static_cast<float*>(g[7]);
  p.block_table = static_cast<const int32_t*>(g[8]);
  p.q_batch_stride = ints[0], p.q_row_stride = ints[1], p.q_head_stride = ints[2];
  p.k_batch_stride = ints[3], p.k_row_stride = ints[4], p.k_head_stride = ints[5];
  p.v_batch_stride = ints[6], p.v_row_stride = ints[7], p.v_head_stride = ints[8];
  p.out_batch_stride = ints[9], p.out_row_stride = ints[10], p.out_head_stride = ints[11];
  p.b = ints[12], p.seqlen_q = ints[13], p.seqlen_k_max = ints[14], p.h = ints[15], p.h_k = ints[16];
  p.d = ints[17], p.num_splits = ints[18];
  p.dtype = ints[19] != 0 ? DType::kBFloat16 : DType::kFloat16;
  p.seqlens_k_add = ints[20], p.window_left = ints[21], p.window_right = ints[22];
  p.block_table_batch_stride = ints[23], p.page_size = ints[24], p.num_pages = ints[25];
  p.softmax_scale = softmax_scale;
  p.softcap = softcap;
  p.smem_per_block_optin = g_smem_optin;  // as the binding: the emulated device's limit
  return finish(decode_attention_cuda(p, nullptr), "decode_attention_cuda");
}

// append_kv_cuda (decode.cu), which picks 16-byte or element copies from the alignment.
// ptrs: k_cache, v_cache, k, v, cache_seqlens, block_table (null: contiguous). ints: the 12
// strides in AppendKvParams order (k_cache b/row/head, v_cache ..., k ..., v ...), then b,
// seqlen_new, seqlen_k_max, h_k, d, element bytes (4: fp32, 2: fp16), block_table_batch_stride,
// page_size, num_pages. nbytes: as for decode_emulate (memcheck: guarded copies).
extern "C" int append_kv_emulate(void** ptrs, const int64_t* nbytes, const int64_t* ints) {
  setup(0);
  static const char* const names[6] = {"k_cache", "v_cache", "k", "v", "cache_seqlens", "block_table"};
  void* g[6];
  for (int i = 0; i < 6; ++i) g[i] = emu::guard(ptrs[i], nbytes[i], names[i]);
  AppendKvParams p;
  p.k_cache = g[0], p.v_cache = g[1], p.k = g[2], p.v = g[3];
  p.cache_seqlens = static_cast<const int32_t*>(g[4]);
  p.k_cache_batch_stride = ints[0], p.k_cache_row_stride = ints[1], p.k_cache_head_stride = ints[2];
  p.v_cache_batch_stride = ints[3], p.v_cache_row_stride = ints[4], p.v_cache_head_stride = ints[5];
  p.k_batch_stride = ints[6], p.k_row_stride = ints[7], p.k_head_stride = ints[8];
  p.v_batch_stride = ints[9], p.v_row_stride = ints[10], p.v_head_stride = ints[11];
  p.b = ints[12], p.seqlen_new = ints[13], p.seqlen_k_max = ints[14], p.h_k = ints[15], p.d = ints[16];
  p.dtype = ints[17] == 4 ? DType::kFloat32 : DType::kFloat16;
  p.block_table = static_cast<const int32_t*>(g[5]);
  p.block_table_batch_stride = ints[18], p.page_size = ints[19], p.num_pages = ints[20];
  return finish(append_kv_cuda(p, nullptr), "append_kv_cuda");
}

// decode_num_splits_cuda (decode.cu): the split count num_splits = 0 resolves to, for the
// kernel the launcher will pick (the tensor-core switch above included).
extern "C" int64_t decode_num_splits_emulate(int64_t b, int64_t seqlen_q, int64_t h, int64_t h_k,
                                             int64_t seqlen_k_max, int64_t d, int num_sms, int64_t smem_per_sm,
                                             float softcap) {
  DecodeParams p;
  p.b = b, p.seqlen_q = seqlen_q, p.h = h, p.h_k = h_k, p.seqlen_k_max = seqlen_k_max, p.d = d;
  p.softcap = softcap;
  p.smem_per_block_optin = g_smem_optin;  // the emulated device (emu_set_device), as the binding
  return decode_num_splits_cuda(p, num_sms, smem_per_sm);
}

// decode_cuda_launch_smem_bytes (decode.cu): the dynamic shared memory of the kernel the launcher
// picks for this shape, which the bindings compare with the device's opt-in limit.
extern "C" int64_t decode_launch_smem_emulate(int64_t seqlen_q, int64_t h, int64_t h_k, int64_t d, float softcap) {
  DecodeParams p;
  p.b = 1, p.seqlen_q = seqlen_q, p.h = h, p.h_k = h_k, p.d = d;
  p.softcap = softcap;
  p.smem_per_block_optin = g_smem_optin;  // the emulated device (emu_set_device), as the binding
  return decode_cuda_launch_smem_bytes(p);
}

// The split heuristic decode_num_splits_cuda applies (decode_split.h), at D = 128, for tests.
extern "C" int64_t decode_num_splits_for_slots(int64_t blocks, int64_t slots, int64_t seqlen_k_max) {
  return decode::num_splits_for_slots(blocks, slots, seqlen_k_max, block_n_for(128));
}
