// flash_bwd_emulate.cpp — run the CUDA FlashAttention backward on the CPU: the launcher of
// flash_bwd.cu (csrc/cuda/flash_bwd_launch.cuh: prepare_bwd's validation and split choice, the
// kSoftcap / dtype / head-dim dispatch, the grids, the shared-memory opt-in) and the kernels of
// flash_bwd_kernels.cuh (delta, dK/dV, the split reduce, dQ; plain and soft-capped), compiled
// by g++ with FASTATTN_BWD_EMULATE defined and an include directory of empty <cuda_*.h> stubs
// (the test builds it). What the code takes from CUDA comes from the host stand-ins:
//   * every thread of a block is a fiber (tests/fiber_emulate.h); __syncthreads and the warp
//     collectives are barriers between fibers, so the kernels' own control flow, indexing,
//     double buffering and epilogues run as written; the launches go through the CUDA runtime
//     stand-ins there (emu::KernelLaunch: block size, grid limits, dynamic shared memory against
//     the cudaFuncSetAttribute limit, which the launcher must raise above 48 KiB);
//   * ldmatrix(.trans).x4, mma.sync.m16n8k16 (f16/bf16 in, f32 accumulate), ex2 / rcp:
//     tests/ptx_emulate.h (shared with the forward's emulator, tested on its own by
//     tests/test_ptx_emulate.py); cp.async (with zero-fill), __shfl_xor_sync: fiber_emulate.h;
//   * __half / __nv_bfloat16: 16-bit storage with round-to-nearest-even conversion.
// Sanitizer analogues (fiber_emulate.h, "sanitizer analogues"; off with FASTATTN_EMU_SANITIZE=0):
//   * memcheck: every global buffer (q, k, v, out, dout, lse, delta, lse_log2, dq, dk, dv, the split
//     workspace, cu_seqlens) is a guarded copy ending at a PROT_NONE page (or starting at one,
//     FASTATTN_EMU_GUARD=start), its extent exactly the tensor's (a strided tensor ends at its
//     last element, not at the padding after it); raw loads / stores that leave it are reported
//     with kernel, buffer and offset; every cp.async source is bounds-checked byte-exactly;
//   * racecheck / initcheck: every shared-memory access of these kernels goes through a wrapper
//     here and is tracked: cp.async destinations (when the copy lands), ldmatrix rows (16 bytes
//     per lane) and the fp32 lse / delta reads (lds_f32). Shared memory is born NaN;
//   * bank conflicts per kernel: FASTATTN_EMU_BANK_REPORT=FILE writes the totals to FILE.
// FASTATTN_EMU_MODE: bit 0 lands cp.async copies at the wait (latest) instead of at issue,
// bit 1 schedules the fibers of a block in reverse order.
//
// Usage: flash_bwd_emulate DIR  — DIR/meta.txt holds
//   dtype(16|bf) d b sq sk h hk wl wr causal scale use_workspace pad [softcap]
// and DIR/{q,k,v,out,dout}.bin (16-bit, contiguous (b, s, heads, d)), DIR/lse.bin (fp32,
// (b, h, sq)). Tensors are copied into buffers whose head stride is d + pad (strided inputs
// and outputs). Writes DIR/{dq,dk,dv}.f32 (contiguous) and DIR/delta.f32, prints
// "ok splits=S hps=H used_splits=U" (S, H: bwd_layout::dkdv_num_splits; U: the splits the
// launched dK/dV grid has, 0 without a dK/dV launch) and then one line per launch
// ("kernel grid threads smem"); "rc=N" and exit 6 when the launcher returns an error.
//
// Variable-length (packed) batches: when DIR/varlen.txt exists it holds "total_q total_k"
// and meta.txt's b, sq, sk are the number of sequences and the max_seqlen bounds;
// DIR/cu_q.bin, DIR/cu_k.bin hold the (b + 1) int32 cu_seqlens (any content: the kernels
// must stay in bounds even for malformed ones), q/out/dout.bin are (total_q, h, d), k/v.bin
// (total_k, hk, d), lse.bin (h, total_q).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// ---- CUDA surface used by the kernels ------------------------------------------------------
#define FASTATTN_BWD_EMULATE 1
#include "fiber_emulate.h"  // fibers, barriers, shuffles, the cp.async queues, runtime, sanitizers
#include "ptx_emulate.h"    // ldmatrix, mma.sync, ex2, rcp from the PTX ISA

struct uint4 {
  uint32_t x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline int min(int a, int b) { return a < b ? a : b; }

struct __half {
  uint16_t bits;
  operator float() const { return ptx::f16_bits_to_float(bits); }
};
struct __nv_bfloat16 {
  uint16_t bits;
  operator float() const { return ptx::bf16_bits_to_float(bits); }
};
inline uint16_t f32_to_f16_bits(float x) {
  const _Float16 h = static_cast<_Float16>(x);  // round to nearest even
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline uint16_t f32_to_bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                     // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

namespace emu {

// Any emulation error ends the run: the test sees a non-zero exit and the message.
void fail(const char* what) {
  std::fprintf(stderr, "%s\n", what);
  std::fflush(stderr);
  std::_Exit(1);
}

inline bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::string(e) == value;
}

// The running launch's shared memory (dynamic only: the kernels declare no static __shared__).
inline void check_smem(uint32_t addr, uint32_t bytes, const char* what) {
  if (addr + bytes > g_block->smem.size() - 16) failf("memcheck: %s: %s of shared bytes [%u, %u) past the %zu "
                                                     "bytes of the launch", g_kernel, what, addr, addr + bytes,
                                                     g_block->smem.size() - 16);
  if (addr % bytes != 0) failf("%s: misaligned %s at shared byte %u", g_kernel, what, addr);
}

}  // namespace emu

#define FASTATTN_BWD_SMEM(name) unsigned char* name = ::emu::dynamic_smem()

// ---- PTX instructions (semantics from the PTX ISA) ------------------------------------------

inline uint32_t smem_addr(const void* p) { return emu::smem_offset(p); }
// cp.async.{cg,ca}.shared.global [dst], [src], bytes, src-size (src-size 0 when !pred: zero
// fill, nothing read). The source of a predicated copy is bounds-checked against the guarded
// buffers; the destination is tracked when the copy lands (fiber_emulate.h, emu::do_copy).
inline void cp_async(uint32_t dst, const void* src, int bytes, bool pred) {
  emu::check_smem(dst, uint32_t(bytes), "cp.async destination");
  if (reinterpret_cast<uintptr_t>(src) % bytes != 0) emu::failf("%s: misaligned cp.async source", emu::g_kernel);
  if (pred) emu::check_global(src, std::size_t(bytes), false, "cp.async source");
  emu::queue_copy(emu::Copy{dst, src, bytes, pred});
}
inline void cp_async16(uint32_t dst, const void* src, bool pred) { cp_async(dst, src, 16, pred); }
inline void cp_async4(uint32_t dst, const void* src, bool pred) { cp_async(dst, src, 4, pred); }
// The kernels only ever wait for everything, so groups are not tracked: every copy stays on
// the open list (mode bit 0) until cp_async_wait_all performs it.
inline void cp_async_commit() {}
inline void cp_async_wait_all() {
  auto& q = emu::my_fiber().open;
  for (const auto& c : q) emu::do_copy(c);
  q.clear();
}

// ld.shared.f32 of the lse / delta rows: tracked.
inline float lds_f32(const float* p) {
  const uint32_t off = emu::smem_offset(p);
  emu::check_smem(off, 4, "ld.shared");
  return emu::smem_load<float>(off);
}

inline uint16_t smem_u16(uint32_t byte_addr) {
  uint16_t v;
  std::memcpy(&v, emu::smem_base() + byte_addr, 2);
  return v;
}

// ldmatrix.x4 (.trans): tests/ptx_emulate.h, after each lane's row (16 bytes, 16-byte aligned,
// inside the launch's shared memory) is checked and tracked.
inline void ldsm_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  emu::check_smem(addr, 16, "ldmatrix row");
  emu::smem_track(addr, 16, false, "ldmatrix");
  ptx::ldmatrix(r, addr, trans, smem_u16);
}
inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr) { ldsm_impl(r, addr, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldsm_impl(r, addr, true); }

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: tests/ptx_emulate.h.
template <typename T> struct MmaOp;
template <> struct MmaOp<__half> {
  static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16<false>(c, a, b0, b1);
  }
  static uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(f32_to_f16_bits(lo)) |
           (static_cast<uint32_t>(f32_to_f16_bits(hi)) << 16);
  }
  static float to_float(__half x) { return static_cast<float>(x); }
};
template <> struct MmaOp<__nv_bfloat16> {
  static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16<true>(c, a, b0, b1);
  }
  static uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(f32_to_bf16_bits(lo)) |
           (static_cast<uint32_t>(f32_to_bf16_bits(hi)) << 16);
  }
  static float to_float(__nv_bfloat16 x) { return static_cast<float>(x); }
};

// __log2f (lg2.approx.f32; the soft-capped dK/dV kernel recovers tanh from P with it): exact.
inline float __log2f(float x) { return std::log2(x); }

namespace fastattn {  // softcap.cuh's ex2.approx.ftz / rcp.approx.ftz wrappers (soft-capping)
inline float softcap_ex2(float x) { return ptx::ex2_approx_ftz(x); }
inline float softcap_rcp(float x) { return ptx::rcp_approx_ftz(x); }
}  // namespace fastattn

// FASTATTN_EMU_SCHED_L2_BYTES: the shared-bytes budget of a causal scheduling section
// (block_order.cuh), small in the tests so that small problems run several sections.
static int64_t emu_sched_l2_bytes() {
  const char* e = std::getenv("FASTATTN_EMU_SCHED_L2_BYTES");
  return e != nullptr ? std::atoll(e) : (int64_t{16} << 20);
}
#define FASTATTN_SCHED_L2_BYTES emu_sched_l2_bytes()

// The CUDA sources themselves, unmodified: flash_bwd.cu (the head-dim switch flash_bwd_cuda,
// the workspace size) and one flash_bwd_hdim<D>.cu per head dim (the launcher and kernels).
#include "flash_bwd.cu"
#include "flash_bwd_hdim32.cu"
#include "flash_bwd_hdim64.cu"
#include "flash_bwd_hdim96.cu"
#include "flash_bwd_hdim128.cu"
#include "flash_bwd_hdim192.cu"
#include "flash_bwd_hdim256.cu"

// ---- driver --------------------------------------------------------------------------------

using namespace fastattn;

template <typename E>
static std::vector<E> read_vec(const std::string& path, std::size_t n) {
  std::vector<E> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(E), n, f) != n) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::exit(1);
  }
  std::fclose(f);
  return v;
}

// A (nb, rows, heads, d) tensor with head stride d + pad, NaN-ish between the heads; `dev` is
// its guarded copy (memcheck), whose extent ends at the last element (no trailing padding).
struct Tensor {
  std::vector<uint16_t> host;
  uint16_t* dev = nullptr;
  int64_t nb, rows, heads, d, bs, rs, hs;
};
static Tensor make_tensor(const std::vector<uint16_t>& src, int64_t nb, int64_t rows,
                          int64_t heads, int64_t d, int64_t pad, const char* name) {
  Tensor t;
  t.nb = nb, t.rows = rows, t.heads = heads, t.d = d;
  t.hs = d + pad;
  t.rs = heads * t.hs;
  t.bs = rows * t.rs;
  const int64_t n = nb * t.bs;
  t.host.assign(static_cast<std::size_t>(n), 0x7e00);
  for (int64_t i = 0; i < nb * rows; ++i)
    for (int64_t k = 0; k < heads; ++k)
      std::memcpy(&t.host[i * t.rs + k * t.hs], &src[(i * heads + k) * d], static_cast<std::size_t>(d) * 2);
  t.dev = static_cast<uint16_t*>(emu::guard(n > 0 ? t.host.data() : nullptr, (n - pad) * 2, name));
  return t;
}
template <typename E>
static E* guard_vec(std::vector<E>& v, const char* name) {
  return static_cast<E*>(emu::guard(v.empty() ? nullptr : v.data(), int64_t(v.size() * sizeof(E)), name));
}

static void write_f32(const std::string& path, const float* p, std::size_t n) {
  FILE* fo = std::fopen(path.c_str(), "wb");
  if (fo == nullptr || std::fwrite(p, 4, n, fo) != n) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
  std::fclose(fo);
}

// Every instantiation the launcher can pick, with its static shared memory (none: the kernels'
// shared memory is all dynamic) and its name for the launch log and the sanitizer reports.
template <typename T, int D>
static void register_kernels_t(const char* type) {
  auto name = [&](const char* k, bool cap) {
    return std::string(k) + "<" + type + ",d" + std::to_string(D) + (cap ? ",softcap>" : ">");
  };
  emu::set_static_smem(&flash_bwd_delta_kernel<T, D>, 0, name("flash_bwd_delta_kernel", false));
  emu::set_static_smem(&flash_bwd_dkdv_reduce_kernel<T, D>, 0, name("flash_bwd_dkdv_reduce_kernel", false));
  emu::set_static_smem(&flash_bwd_dkdv_kernel<T, D, false>, 0, name("flash_bwd_dkdv_kernel", false));
  emu::set_static_smem(&flash_bwd_dkdv_kernel<T, D, true>, 0, name("flash_bwd_dkdv_kernel", true));
  emu::set_static_smem(&flash_bwd_dq_kernel<T, D, false>, 0, name("flash_bwd_dq_kernel", false));
  emu::set_static_smem(&flash_bwd_dq_kernel<T, D, true>, 0, name("flash_bwd_dq_kernel", true));
}
template <int D>
static void register_kernels() {
  register_kernels_t<__half, D>("f16");
  register_kernels_t<__nv_bfloat16, D>("bf16");
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  emu::g_mode = std::getenv("FASTATTN_EMU_MODE") ? std::atoi(std::getenv("FASTATTN_EMU_MODE")) : 0;
  emu::g_stack_bytes = 128 * 1024;
  emu::g_sanitize = !emu::env_is("FASTATTN_EMU_SANITIZE", "0");
  const std::string dir = argv[1];
  char dt[8];
  long long d, b, sq, sk, h, hk, wl, wr, causal, use_ws, pad;
  float scale, softcap = 0.f;
  FILE* m = std::fopen((dir + "/meta.txt").c_str(), "r");
  if (!m || std::fscanf(m, "%7s %lld %lld %lld %lld %lld %lld %lld %lld %lld %f %lld %lld", dt,
                        &d, &b, &sq, &sk, &h, &hk, &wl, &wr, &causal, &scale, &use_ws,
                        &pad) != 13)
    return 3;
  if (std::fscanf(m, "%f", &softcap) != 1) softcap = 0.f;  // optional 14th field
  std::fclose(m);
  const bool bf = std::string(dt) == "bf";
  long long total_q = 0, total_k = 0;
  const bool varlen = [&] {
    FILE* v = std::fopen((dir + "/varlen.txt").c_str(), "r");
    if (!v) return false;
    const bool ok = std::fscanf(v, "%lld %lld", &total_q, &total_k) == 2;
    std::fclose(v);
    if (!ok) std::exit(3);
    return true;
  }();
  // Dense: (b, s, heads, d) tensors, lse / delta (b, h, sq); varlen: one "batch" of total_q /
  // total_k packed rows, lse / delta (h, total_q).
  const int64_t nb = varlen ? 1 : b, rq = varlen ? total_q : sq, rk = varlen ? total_k : sk;
  const auto nq = static_cast<std::size_t>(nb * rq * h * d), nk = static_cast<std::size_t>(nb * rk * hk * d);
  const std::vector<uint16_t> nan_q(nq, 0x7e00), nan_k(nk, 0x7e00);  // outputs start NaN
  Tensor q = make_tensor(read_vec<uint16_t>(dir + "/q.bin", nq), nb, rq, h, d, pad, "q");
  Tensor k = make_tensor(read_vec<uint16_t>(dir + "/k.bin", nk), nb, rk, hk, d, pad, "k");
  Tensor v = make_tensor(read_vec<uint16_t>(dir + "/v.bin", nk), nb, rk, hk, d, pad, "v");
  Tensor o = make_tensor(read_vec<uint16_t>(dir + "/out.bin", nq), nb, rq, h, d, pad, "out");
  Tensor go = make_tensor(read_vec<uint16_t>(dir + "/dout.bin", nq), nb, rq, h, d, pad, "dout");
  Tensor dq = make_tensor(nan_q, nb, rq, h, d, pad, "dq");
  Tensor dk = make_tensor(nan_k, nb, rk, hk, d, pad, "dk");
  Tensor dv = make_tensor(nan_k, nb, rk, hk, d, pad, "dv");
  const auto n_lse = static_cast<std::size_t>(nb * h * rq);
  std::vector<float> lse = read_vec<float>(dir + "/lse.bin", n_lse), delta(n_lse, NAN), lse_log2(n_lse, NAN);
  std::vector<int32_t> cu_q, cu_k;
  if (varlen) {
    cu_q = read_vec<int32_t>(dir + "/cu_q.bin", static_cast<std::size_t>(b + 1));
    cu_k = read_vec<int32_t>(dir + "/cu_k.bin", static_cast<std::size_t>(b + 1));
  }

  FlashBwdParams p;
  FlashFwdParams& f = p.fwd;
  f.q = q.dev, f.k = k.dev, f.v = v.dev, f.out = o.dev;
  f.lse = guard_vec(lse, "lse");
  if (!varlen) {  // varlen: the batch strides stay 0 (unused)
    f.q_batch_stride = q.bs, f.k_batch_stride = k.bs, f.v_batch_stride = v.bs, f.out_batch_stride = o.bs;
    p.dout_batch_stride = go.bs, p.dq_batch_stride = dq.bs, p.dk_batch_stride = dk.bs, p.dv_batch_stride = dv.bs;
  }
  f.q_row_stride = q.rs, f.q_head_stride = q.hs;
  f.k_row_stride = k.rs, f.k_head_stride = k.hs;
  f.v_row_stride = v.rs, f.v_head_stride = v.hs;
  f.out_row_stride = o.rs, f.out_head_stride = o.hs;
  f.b = b, f.seqlen_q = sq, f.seqlen_k = sk, f.h = h, f.h_k = hk, f.d = d;
  f.softmax_scale = scale;
  f.softcap = softcap;
  f.window_left = wl, f.window_right = wr, f.is_causal = causal != 0;
  f.dtype = bf ? DType::kBFloat16 : DType::kFloat16;
  if (varlen) {
    f.cu_seqlens_q = guard_vec(cu_q, "cu_seqlens_q");
    f.cu_seqlens_k = guard_vec(cu_k, "cu_seqlens_k");
    f.total_q = total_q, f.total_k = total_k;
  }
  p.dout = go.dev;
  p.dout_row_stride = go.rs, p.dout_head_stride = go.hs;
  p.dq = dq.dev, p.dk = dk.dev, p.dv = dv.dev;
  p.dq_row_stride = dq.rs, p.dq_head_stride = dq.hs;
  p.dk_row_stride = dk.rs, p.dk_head_stride = dk.hs;
  p.dv_row_stride = dv.rs, p.dv_head_stride = dv.hs;
  p.delta = guard_vec(delta, "delta");
  p.lse_log2 = guard_vec(lse_log2, "lse_log2");  // NaN-born: every row read must be written
  // The workspace the binding allocates: flash_bwd_cuda_workspace_floats (the launcher's own
  // formula), NaN so that every partial the reduce reads must have been written.
  std::vector<float> ws;
  if (use_ws) ws.assign(static_cast<std::size_t>(bwd_workspace_floats(p)), NAN);
  p.workspace = guard_vec(ws, "workspace");

  register_kernels<32>();
  register_kernels<64>();
  register_kernels<96>();
  register_kernels<128>();
  register_kernels<192>();
  register_kernels<256>();
  emu::reset_runtime();
  const cudaError_t rc = flash_bwd_cuda(p, nullptr);
  emu::unguard_all();  // the gradients, delta and workspace changes back into the host copies
  if (rc != cudaSuccess) {
    std::printf("rc=%d\n", static_cast<int>(rc));
    return 6;
  }

  auto dump = [&](const Tensor& t, const char* name) {
    std::vector<float> outv(static_cast<std::size_t>(t.nb * t.rows * t.heads * t.d));
    for (int64_t i = 0; i < t.nb * t.rows; ++i)
      for (int64_t kk = 0; kk < t.heads; ++kk)
        for (int64_t e = 0; e < t.d; ++e) {
          const uint16_t bits = t.host[i * t.rs + kk * t.hs + e];
          outv[(i * t.heads + kk) * t.d + e] = bf ? ptx::bf16_bits_to_float(bits) : ptx::f16_bits_to_float(bits);
        }
    write_f32(dir + "/" + name + ".f32", outv.data(), outv.size());
  };
  dump(dq, "dq");
  dump(dk, "dk");
  dump(dv, "dv");
  write_f32(dir + "/delta.f32", delta.data(), delta.size());
  if (const char* bank = std::getenv("FASTATTN_EMU_BANK_REPORT")) {
    std::vector<char> text(static_cast<std::size_t>(emu_bank_report(nullptr, 0, 0)));
    emu_bank_report(text.data(), static_cast<int>(text.size()), 0);
    if (FILE* fb = std::fopen(bank, "w")) {
      std::fputs(text.data(), fb);
      std::fclose(fb);
    }
  }
  int hps = 0;
  const int splits = bwd_layout::dkdv_num_splits(b, h, hk, sk, static_cast<int>(d), &hps);
  long long used = 0;  // the launched dK/dV grid's y extent / h_k (the log's grid: "x" or "xXyXz")
  for (const auto& l : emu::g_launch_log) {
    long long gx = 0, gy = 1, gz = 1;
    if (l.rfind("flash_bwd_dkdv_kernel<", 0) == 0 &&
        std::sscanf(l.c_str() + l.find(' '), " %lldx%lldx%lld", &gx, &gy, &gz) >= 1)
      used = gy / hk;
  }
  std::printf("ok splits=%d hps=%d used_splits=%lld\n", splits, hps, used);
  for (const auto& l : emu::g_launch_log) std::printf("%s\n", l.c_str());
  return 0;
}
