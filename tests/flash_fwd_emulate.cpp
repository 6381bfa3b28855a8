// flash_fwd_emulate.cpp — run the CUDA FlashAttention forward (csrc/cuda/flash_fwd.cu: the
// launcher flash_fwd_cuda, its layout checks and mask normalisation, the per-head-dim dispatch
// of flash_fwd_hdim{32,64,96,128,192,256}*.cu and the kernel of flash_fwd_kernel.cuh) on the CPU.
//
// The .cu files are #included as they are, compiled by g++ with FASTATTN_FWD_EMULATE defined
// and an include directory of empty <cuda_*.h> stubs (the test builds it); this file supplies
// what flash_fwd_kernel.cuh leaves out under that macro, from the PTX ISA:
//   * every thread of a block is a fiber (fiber_emulate.h); __syncthreads / __syncwarp and the
//     warp collectives are barriers between fibers;
//   * ldmatrix(.trans).x4, mma.sync.m16n8k16 (f16/bf16 in, f32 accumulate), cp.async.cg with
//     zero-fill, commit / wait_group, st.shared.b32 / ld.shared.v4.b32, st.global.v4.b32,
//     ex2.approx.ftz (the ldmatrix / mma / ex2 stand-ins are tests/ptx_emulate.h, shared with
//     tests/flash_bwd_emulate.cpp and tested on its own by tests/test_ptx_emulate.py); every
//     shared-memory access is bounds-checked against the launch's dynamic shared memory, which
//     is born NaN at every block start;
//   * FASTATTN_EMU_SCHED_L2_BYTES: see emu_sched_l2_bytes below;
//   * FASTATTN_EMU_MODE bit 0: cp.async copies land when a wait_group retires their group
//     (latest), else at issue (earliest); bit 1: fibers scheduled in reverse order.
// Every global buffer (q, k, v, out, lse, cu_seqlens) sits against a PROT_NONE guard page, at
// its end or (FASTATTN_EMU_GUARD=start) at its start: an out-of-bounds access kills the run.
// racecheck / initcheck / bank conflicts (fiber_emulate.h, "sanitizer analogues"; off with
// FASTATTN_EMU_SANITIZE=0): every shared-memory access of this kernel goes through the
// wrappers below, and each is tracked: cp.async destinations (when the copy lands),
// ldmatrix rows (16 bytes per lane), st.shared.b32 and ld.shared.v4. A hazard between two
// warps with no __syncthreads between them, or a read of never-written shared memory, fails
// the run. With FASTATTN_EMU_BANK_REPORT=FILE the bank-conflict totals go to FILE.
//
// Usage: flash_fwd_emulate DIR — DIR/meta.txt: "dtype(16|bf) d b sq sk h hk wl wr causal scale
// pad [softcap]" (softcap optional, 0 = off); DIR/{q,k,v}.bin 16-bit contiguous (b, s, heads, d). With DIR/varlen.txt ("total_q
// total_k"): b is the number of sequences, sq / sk the max_seqlen bounds, DIR/cu_q.bin,
// DIR/cu_k.bin the int32 cu_seqlens, q.bin (total_q, h, d), k/v.bin (total_k, hk, d).
// Tensors get head stride d + pad. Writes DIR/out.f32 (contiguous), DIR/lse.f32 ((b, h, sq)
// or (h, total_q)) and prints "ok"; "rc=N" and exit 6 when flash_fwd_cuda returns an error.
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define FASTATTN_FWD_EMULATE 1
#define FASTATTN_WITH_CUDA 1  // api.h declares the CUDA launchers (types from fiber_emulate.h)
#include "fiber_emulate.h"
#include "ptx_emulate.h"  // ldmatrix, mma.sync, ex2, rcp from the PTX ISA

struct uint4 {
  uint32_t x, y, z, w;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
template <typename T>
inline T min(T a, T b) { return a < b ? a : b; }
template <typename T>
inline T max(T a, T b) { return a > b ? a : b; }
inline float __fmul_rn(float a, float b) { return a * b; }  // g++ -ffp-contract=off (the test)
// vote.any.sync (PTX ISA "vote.sync"): the full-warp mask only (the kernel's one use).
inline int __any_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) std::fprintf(stderr, "__any_sync: only the full-warp mask is emulated\n"), std::exit(1);
  emu::my_slot()[0] = pred != 0;
  emu::warp_barrier();
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= static_cast<int>(emu::slot_of(l)[0]);
  emu::warp_barrier();
  return any;
}

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float bits_to_float(uint16_t b, bool bf) {
  if (bf) {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
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
void fail(const char* what) {
  std::fprintf(stderr, "%s\n", what);
  std::exit(1);
}
inline std::size_t g_smem_bytes = 0;  // the running launch's dynamic shared memory
inline unsigned char* smem_at(uint32_t addr, uint32_t bytes) {
  if (addr + bytes > g_smem_bytes) fail("shared-memory access past the dynamic allocation");
  if (addr % bytes != 0) fail("misaligned shared-memory access");
  return smem_base() + addr;
}
}  // namespace emu

// ---- the PTX wrappers flash_fwd_kernel.cuh expects (namespace fastattn::flash) -------------
namespace fastattn {
// ex2.approx.ftz / rcp.approx.ftz, softcap.cuh's wrappers (soft-capping): tests/ptx_emulate.h.
inline float softcap_ex2(float x) { return ptx::ex2_approx_ftz(x); }
inline float softcap_rcp(float x) { return ptx::rcp_approx_ftz(x); }
namespace flash {

#define FASTATTN_FWD_SMEM(name) unsigned char* name = ::emu::smem_base()

inline uint32_t smem_u32(const void* p) { return emu::smem_offset(p); }

inline void cp_async_16(uint32_t smem, const void* gmem, bool pred) {
  emu::smem_at(smem, 16);
  if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0) emu::fail("misaligned cp.async source");
  emu::queue_copy(emu::Copy{smem, gmem, 16, pred});
}
// commit_group / wait_group N (fiber_emulate.h): in late mode (bit 0) a group's copies land
// only when a wait retires it, so reading a tile whose group was not waited for sees the
// NaN-born (or the previous tile's) shared memory, and the sanitizers flag it.
inline void cp_async_commit() { emu::commit_group(); }
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "wait_group N >= 0");
  emu::wait_group(N);
}

inline uint16_t smem_u16(uint32_t addr) {
  uint16_t v;
  std::memcpy(&v, emu::smem_at(addr, 2), 2);
  return v;
}
// ldmatrix.x4 (.trans): tests/ptx_emulate.h; here each lane's row is checked (16 bytes, 16-byte
// aligned, inside the launch's shared memory) and tracked for the sanitizers first.
inline void ldsm_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  emu::smem_at(addr, 16);  // a 16-byte row, 16-byte aligned
  emu::smem_track(addr, 16, false, "ldmatrix");
  ptx::ldmatrix(r, addr, trans, smem_u16);
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldsm_impl(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldsm_impl(r, addr, true); }

// ex2.approx.ftz.f32 and mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: tests/ptx_emulate.h.
inline float ex2(float x) { return ptx::ex2_approx_ftz(x); }

template <typename T>
struct ElemOps;
template <>
struct ElemOps<__half> {
  static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16<false>(d, a, b0, b1);
  }
  static uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(f32_to_f16_bits(lo)) | (static_cast<uint32_t>(f32_to_f16_bits(hi)) << 16);
  }
};
template <>
struct ElemOps<__nv_bfloat16> {
  static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16<true>(d, a, b0, b1);
  }
  static uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(f32_to_bf16_bits(lo)) | (static_cast<uint32_t>(f32_to_bf16_bits(hi)) << 16);
  }
};

inline void st_shared_b32(uint32_t addr, uint32_t v) {
  emu::smem_track(addr, 4, true, "st.shared");
  std::memcpy(emu::smem_at(addr, 4), &v, 4);
}
// st.global.v4.b32: 16 bytes to a 16-byte aligned global address (the guard pages catch the
// out-of-bounds ones).
inline void st_global_v4(void* addr, const uint4& v) {
  if (reinterpret_cast<uintptr_t>(addr) % 16 != 0) emu::fail("misaligned st.global.v4");
  std::memcpy(addr, &v, 16);
}
inline uint4 ld_shared_v4(uint32_t addr) {
  emu::smem_track(addr, 16, false, "ld.shared");
  uint4 v;
  std::memcpy(&v, emu::smem_at(addr, 16), 16);
  return v;
}

// kernel<<<grid, threads, smem, stream>>>(args), with the runtime's dynamic shared-memory rule
// (above 48 KiB only after cudaFuncSetAttribute raised the kernel's limit).
template <typename F, typename A>
cudaError_t emulate_launch(F* kernel, const dim3& grid, int threads, int smem, const A& args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (smem > emu::max_dyn_smem_of(reinterpret_cast<const void*>(kernel))) return cudaErrorInvalidValue;
  const int64_t g[3] = {grid.x, grid.y, grid.z};
  emu::g_kernel = "flash_fwd_kernel";
  emu::g_smem_bytes = static_cast<std::size_t>(smem);
  emu::launch(g, threads, smem, [&] { kernel(args); });
  return cudaSuccess;
}
#define FASTATTN_FWD_EMULATE_LAUNCH(kernel, grid, threads, smem, stream, args) \
  emulate_launch(kernel, grid, threads, smem, args)

}  // namespace flash
}  // namespace fastattn

// FASTATTN_EMU_SCHED_L2_BYTES: the K/V budget of a causal scheduling section (block_order.cuh),
// small in the tests so that small problems run several sections, the last one partial.
static int64_t emu_sched_l2_bytes() {
  const char* e = std::getenv("FASTATTN_EMU_SCHED_L2_BYTES");
  return e != nullptr ? std::atoll(e) : (int64_t{16} << 20);
}
#define FASTATTN_SCHED_L2_BYTES emu_sched_l2_bytes()

#include "flash_fwd.cu"
#include "flash_fwd_hdim128.cu"
#include "flash_fwd_hdim64.cu"
#include "flash_fwd_hdim128_softcap.cu"
#include "flash_fwd_hdim64_softcap.cu"
#include "flash_fwd_hdim32.cu"
#include "flash_fwd_hdim96.cu"
#include "flash_fwd_hdim192.cu"
#include "flash_fwd_hdim256.cu"

// ---- driver --------------------------------------------------------------------------------
using namespace fastattn;

static void* guarded_alloc(size_t bytes, size_t align) {
  static const bool at_start = [] {
    const char* e = std::getenv("FASTATTN_EMU_GUARD");
    return e != nullptr && std::string(e) == "start";
  }();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t body = (bytes + align + page - 1) / page * page;
  void* m = mmap(nullptr, body + 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) emu::fail("mmap failed");
  unsigned char* base = static_cast<unsigned char*>(m);
  if (mprotect(base, page, PROT_NONE) != 0 || mprotect(base + page + body, page, PROT_NONE) != 0)
    emu::fail("mprotect failed");
  if (at_start || bytes == 0) return base + page;
  const uintptr_t end = reinterpret_cast<uintptr_t>(base + page + body);
  return reinterpret_cast<void*>((end - bytes) / align * align);
}

template <typename E>
static std::vector<E> read_vec(const std::string& path, size_t n) {
  std::vector<E> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(E), n, f) != n) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::exit(1);
  }
  std::fclose(f);
  return v;
}

// (nb, rows, heads, d) contiguous -> guarded buffer with head stride d + pad.
struct Buf {
  uint16_t* p;
  int64_t nb, rows, heads, d, bs, rs, hs;
};
static Buf make_buf(const std::vector<uint16_t>& src, int64_t nb, int64_t rows, int64_t heads,
                    int64_t d, int64_t pad) {
  Buf t{nullptr, nb, rows, heads, d, 0, heads * (d + pad), d + pad};
  t.bs = rows * t.rs;
  const size_t n = static_cast<size_t>(nb * t.bs);
  t.p = static_cast<uint16_t*>(guarded_alloc(n * 2, 16));
  for (size_t i = 0; i < n; ++i) t.p[i] = 0x7e00;  // NaN-ish fill
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t k = 0; k < heads; ++k)
        std::memcpy(&t.p[i * t.bs + j * t.rs + k * t.hs], &src[((i * rows + j) * heads + k) * d],
                    static_cast<size_t>(d) * 2);
  return t;
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  emu::g_mode = std::getenv("FASTATTN_EMU_MODE") ? std::atoi(std::getenv("FASTATTN_EMU_MODE")) : 0;
  emu::g_stack_bytes = 256 * 1024;
  emu::g_sanitize = !(std::getenv("FASTATTN_EMU_SANITIZE") && std::string(std::getenv("FASTATTN_EMU_SANITIZE")) == "0");
  const std::string dir = argv[1];
  char dt[8];
  long long d, b, sq, sk, h, hk, wl, wr, causal, pad;
  float scale, softcap = 0.f;
  FILE* m = std::fopen((dir + "/meta.txt").c_str(), "r");
  if (!m || std::fscanf(m, "%7s %lld %lld %lld %lld %lld %lld %lld %lld %lld %f %lld", dt, &d, &b,
                        &sq, &sk, &h, &hk, &wl, &wr, &causal, &scale, &pad) != 12)
    return 3;
  if (std::fscanf(m, "%f", &softcap) != 1) softcap = 0.f;
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
  // Dense: (b, sq, ...) tensors; varlen: one "batch" of total_q / total_k packed rows.
  const int64_t nb = varlen ? 1 : b, rq = varlen ? total_q : sq, rk = varlen ? total_k : sk;
  Buf q = make_buf(read_vec<uint16_t>(dir + "/q.bin", nb * rq * h * d), nb, rq, h, d, pad);
  Buf k = make_buf(read_vec<uint16_t>(dir + "/k.bin", nb * rk * hk * d), nb, rk, hk, d, pad);
  Buf v = make_buf(read_vec<uint16_t>(dir + "/v.bin", nb * rk * hk * d), nb, rk, hk, d, pad);
  Buf o = make_buf(std::vector<uint16_t>(nb * rq * h * d, 0x7e00), nb, rq, h, d, pad);
  const size_t n_lse = static_cast<size_t>(nb * h * rq);
  float* lse = static_cast<float*>(guarded_alloc(n_lse * 4, 4));
  for (size_t i = 0; i < n_lse; ++i) lse[i] = NAN;

  FlashFwdParams p;
  p.q = q.p, p.k = k.p, p.v = v.p, p.out = o.p, p.lse = lse;
  if (!varlen) {
    p.q_batch_stride = q.bs, p.k_batch_stride = k.bs, p.v_batch_stride = v.bs;
    p.out_batch_stride = o.bs;
  }
  p.q_row_stride = q.rs, p.q_head_stride = q.hs;
  p.k_row_stride = k.rs, p.k_head_stride = k.hs;
  p.v_row_stride = v.rs, p.v_head_stride = v.hs;
  p.out_row_stride = o.rs, p.out_head_stride = o.hs;
  p.b = b, p.seqlen_q = sq, p.seqlen_k = sk, p.h = h, p.h_k = hk, p.d = d;
  p.softmax_scale = scale;
  p.softcap = softcap;
  p.window_left = wl, p.window_right = wr, p.is_causal = causal != 0;
  p.dtype = bf ? DType::kBFloat16 : DType::kFloat16;
  if (varlen) {
    auto cu = [&](const char* name) {
      const std::vector<int32_t> src = read_vec<int32_t>(dir + "/" + name, b + 1);
      int32_t* g = static_cast<int32_t*>(guarded_alloc(src.size() * 4, 4));
      std::memcpy(g, src.data(), src.size() * 4);
      return g;
    };
    p.cu_seqlens_q = cu("cu_q.bin");
    p.cu_seqlens_k = cu("cu_k.bin");
    p.total_q = total_q, p.total_k = total_k;
  }
  // The 28 instantiations' static shared memory (none: all of it is dynamic), which the
  // runtime stand-ins (cudaFuncSetAttribute) need to know.
  using K64 = flash::FwdTraitsHdim64;
  using K128 = flash::FwdTraitsHdim128;
  emu::set_static_smem(&flash::flash_fwd_kernel<K64, __half, true, true>, 0);
  emu::set_static_smem(&flash::flash_fwd_kernel<K64, __nv_bfloat16, true, true>, 0);
  emu::set_static_smem(&flash::flash_fwd_kernel<K128, __half, true, true>, 0);
  emu::set_static_smem(&flash::flash_fwd_kernel<K128, __nv_bfloat16, true, true>, 0);
  emu::set_static_smem(&flash::flash_fwd_kernel<K64, __half, false>, 0);
  emu::set_static_smem(&flash::flash_fwd_kernel<K64, __half, true>, 0);
  emu::set_static_smem(&flash::flash_fwd_kernel<K64, __nv_bfloat16, false>, 0);
  emu::set_static_smem(&flash::flash_fwd_kernel<K64, __nv_bfloat16, true>, 0);
  emu::set_static_smem(&flash::flash_fwd_kernel<K128, __half, false>, 0);
  emu::set_static_smem(&flash::flash_fwd_kernel<K128, __half, true>, 0);
  emu::set_static_smem(&flash::flash_fwd_kernel<K128, __nv_bfloat16, false>, 0);
  emu::set_static_smem(&flash::flash_fwd_kernel<K128, __nv_bfloat16, true>, 0);
  // head dims 32, 96, 192, 256: the masked kernel and its capped twin only
  auto masked_only = [](auto traits) {
    using Kt = decltype(traits);
    emu::set_static_smem(&flash::flash_fwd_kernel<Kt, __half, true, false>, 0);
    emu::set_static_smem(&flash::flash_fwd_kernel<Kt, __half, true, true>, 0);
    emu::set_static_smem(&flash::flash_fwd_kernel<Kt, __nv_bfloat16, true, false>, 0);
    emu::set_static_smem(&flash::flash_fwd_kernel<Kt, __nv_bfloat16, true, true>, 0);
  };
  masked_only(flash::FwdTraitsHdim32{});
  masked_only(flash::FwdTraitsHdim96{});
  masked_only(flash::FwdTraitsHdim192{});
  masked_only(flash::FwdTraitsHdim256{});
  emu::reset_runtime();

  const cudaError_t rc = flash_fwd_cuda(p, nullptr);
  if (rc != cudaSuccess) {
    std::printf("rc=%d\n", static_cast<int>(rc));
    return 6;
  }
  std::vector<float> outv(static_cast<size_t>(nb * rq * h * d));
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t j = 0; j < rq; ++j)
      for (int64_t kk = 0; kk < h; ++kk)
        for (int64_t e = 0; e < d; ++e)
          outv[((i * rq + j) * h + kk) * d + e] = bits_to_float(o.p[i * o.bs + j * o.rs + kk * o.hs + e], bf);
  FILE* fo = std::fopen((dir + "/out.f32").c_str(), "wb");
  std::fwrite(outv.data(), 4, outv.size(), fo);
  std::fclose(fo);
  fo = std::fopen((dir + "/lse.f32").c_str(), "wb");
  std::fwrite(lse, 4, n_lse, fo);
  std::fclose(fo);
  if (const char* bank = std::getenv("FASTATTN_EMU_BANK_REPORT")) {
    std::vector<char> text(static_cast<std::size_t>(emu_bank_report(nullptr, 0, 0)));
    emu_bank_report(text.data(), static_cast<int>(text.size()), 0);
    if (FILE* fb = std::fopen(bank, "w")) {
      std::fputs(text.data(), fb);
      std::fclose(fb);
    }
  }
  std::printf("ok\n");
  return 0;
}
