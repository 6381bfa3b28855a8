// flash_bwd_emulate.cpp — run the CUDA FlashAttention backward kernels on the CPU.
//
// Compiles csrc/cuda/flash_bwd_kernels.cuh (the exact kernel code flash_bwd.cu launches) with
// a host C++ compiler, supplying host versions of what the kernels use from CUDA:
//   * every thread of a block is a fiber (ucontext); __syncthreads and the warp-collective
//     instructions are barriers between fibers, so the kernels' own control flow, indexing,
//     double buffering and epilogues run as written;
//   * ldmatrix(.trans).x4, mma.sync.m16n8k16 (f16/bf16 in, f32 accumulate): tests/ptx_emulate.h
//     (shared with flash_fwd_emulate.cpp, tested on its own by tests/test_ptx_emulate.py);
//     cp.async (with zero-fill), __shfl_xor_sync: fiber_emulate.h; all implemented from the
//     PTX ISA's definitions, independently of the kernels;
//   * __half / __nv_bfloat16: 16-bit storage with round-to-nearest-even conversion.
// Shared memory is filled with NaN bytes at every block start, so reading anything the block
// did not write poisons the result.
//
// Usage: flash_bwd_emulate DIR  — DIR/meta.txt holds
//   dtype(16|bf) d b sq sk h hk wl wr causal scale use_workspace pad [softcap]
// and DIR/{q,k,v,out,dout}.bin (16-bit, contiguous (b, s, heads, d)), DIR/lse.bin (fp32,
// (b, h, sq)). Tensors are copied into buffers whose head stride is d + pad (strided
// inputs and outputs). Writes DIR/{dq,dk,dv}.f32 (contiguous) and prints "ok".
//
// Variable-length (packed) batches: when DIR/varlen.txt exists it holds "total_q total_k"
// and meta.txt's b, sq, sk are the number of sequences and the max_seqlen bounds;
// DIR/cu_q.bin, DIR/cu_k.bin hold the (b + 1) int32 cu_seqlens (any content: the kernels
// must stay in bounds even for malformed ones), q/out/dout.bin are (total_q, h, d), k/v.bin
// (total_k, hk, d), lse.bin (h, total_q). Every buffer of that run (tensors, lse, delta,
// workspace, cu_seqlens) is placed against a PROT_NONE guard page, at its end or (with
// FASTATTN_EMU_GUARD=start) at its start, so any access past either edge kills the process.
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// ---- CUDA surface used by the kernels ------------------------------------------------------
#define FASTATTN_BWD_EMULATE 1
#include "fiber_emulate.h"  // fibers, barriers, shuffles, the cp.async queues
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
  operator float() const {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return static_cast<float>(h);
  }
};
struct __nv_bfloat16 {
  uint16_t bits;
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
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
  std::exit(1);
}

// FASTATTN_EMU_MODE, read once: emu::g_mode (fiber_emulate.h) — bit 0 performs cp.async
// copies at cp.async.wait_group (latest legal moment; catches reads that do not wait) instead
// of at issue (earliest; catches writes into a buffer other warps still read), bit 1
// schedules the fibers of a block in reverse order.
inline int mode_from_env() {
  const char* e = std::getenv("FASTATTN_EMU_MODE");
  return e ? std::atoi(e) : 0;
}

}  // namespace emu

#define FASTATTN_BWD_SMEM(name) unsigned char* name = ::emu::smem_base()

// ---- PTX instructions (semantics from the PTX ISA) ------------------------------------------

inline uint32_t smem_addr(const void* p) { return emu::smem_offset(p); }
inline void cp_async(uint32_t dst, const void* src, int bytes, bool pred) {
  if (dst % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0) emu::fail("misaligned cp.async");
  emu::queue_copy(emu::Copy{dst, src, bytes, pred});
}
inline void cp_async16(uint32_t dst, const void* src, bool pred) { cp_async(dst, src, 16, pred); }
inline void cp_async4(uint32_t dst, const void* src, bool pred) { cp_async(dst, src, 4, pred); }
// The kernels only ever wait for everything, so groups are not tracked: every copy stays on
// the open list until cp_async_wait_all performs it.
inline void cp_async_commit() {}
inline void cp_async_wait_all() {
  auto& q = emu::my_fiber().open;
  for (const auto& c : q) emu::do_copy(c);
  q.clear();
}

inline uint16_t smem_u16(uint32_t byte_addr) {
  uint16_t v;
  std::memcpy(&v, emu::smem_base() + byte_addr, 2);
  return v;
}

// ldmatrix.x4 (.trans): tests/ptx_emulate.h, after the row-alignment check.
inline void ldsm_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  if (addr % 16 != 0) emu::fail("ldmatrix row address not 16-byte aligned");
  ptx::ldmatrix(r, addr, trans, smem_u16);
}
inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr) { ldsm_impl(r, addr, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldsm_impl(r, addr, true); }

template <typename T>
inline float half_to_float(uint16_t b) {
  T h;
  h.bits = b;
  return static_cast<float>(h);
}

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

#include "flash_bwd_kernels.cuh"

// ---- driver --------------------------------------------------------------------------------

using namespace fastattn;

static std::vector<uint16_t> read_u16(const std::string& path, size_t n) {
  std::vector<uint16_t> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), 2, n, f) != n) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::exit(1);
  }
  std::fclose(f);
  return v;
}

// (b, s, heads, d) contiguous -> buffer with head stride d + pad (16-byte aligned rows).
struct Strided {
  std::vector<uint16_t> buf;
  int64_t bs, rs, hs;
};
static Strided make_strided(const std::vector<uint16_t>& src, int64_t b, int64_t s, int64_t h,
                            int64_t d, int64_t pad) {
  Strided t;
  t.hs = d + pad;
  t.rs = h * t.hs;
  t.bs = s * t.rs;
  t.buf.assign(static_cast<size_t>(b * t.bs + 8), 0x7e00);  // fp16/bf16-ish NaN fill
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < s; ++j)
      for (int64_t k = 0; k < h; ++k)
        std::memcpy(&t.buf[i * t.bs + j * t.rs + k * t.hs], &src[((i * s + j) * h + k) * d],
                    static_cast<size_t>(d) * 2);
  return t;
}

// As flash_bwd.cu's launch_bwd (kSoftcap: the launcher's choice on softcap > 0).
template <typename T, int D, bool kSoftcap>
static void run_all_impl(const BwdArgs& args) {
  const BwdGrids g = bwd_grids<D>(args);
  const int64_t g1[3] = {g.delta, 1, 1};
  if (g.delta > 0) emu::launch(g1, 256, 0, [&] { flash_bwd_delta_kernel<T, D>(args); });
  if (g.dkdv[0] > 0) {
    emu::launch(g.dkdv, DkdvCfg<D>::kThreads, DkdvCfg<D>::kSmemBytes,
                [&] { flash_bwd_dkdv_kernel<T, D, kSoftcap>(args); });
    const int64_t gr[3] = {g.reduce, 1, 1};
    if (g.reduce > 0) emu::launch(gr, 256, 0, [&] { flash_bwd_dkdv_reduce_kernel<T, D>(args); });
  }
  if (g.dq[0] > 0)
    emu::launch(g.dq, DqCfg<D>::kThreads, DqCfg<D>::kSmemBytes,
                [&] { flash_bwd_dq_kernel<T, D, kSoftcap>(args); });
}
template <typename T, int D>
static void run_all(const BwdArgs& args) {
  if (args.p.fwd.softcap > 0.f)
    run_all_impl<T, D, true>(args);
  else
    run_all_impl<T, D, false>(args);
}

// ---- guarded buffers (the memcheck analogue of the varlen runs) ---------------------------

// `bytes` of storage between two PROT_NONE pages, flush against the upper one (or the lower
// one with FASTATTN_EMU_GUARD=start), `align`-byte aligned: an access past the buffer's end
// (or before its start) faults. Never freed (the process is short-lived).
static void* guarded_alloc(size_t bytes, size_t align) {
  static const bool at_start = [] {
    const char* e = std::getenv("FASTATTN_EMU_GUARD");
    return e != nullptr && std::string(e) == "start";
  }();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t body = (bytes + align + page - 1) / page * page;
  void* m = mmap(nullptr, body + 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                 -1, 0);
  if (m == MAP_FAILED) emu::fail("mmap failed");
  unsigned char* base = static_cast<unsigned char*>(m);
  if (mprotect(base, page, PROT_NONE) != 0 || mprotect(base + page + body, page, PROT_NONE) != 0)
    emu::fail("mprotect failed");
  if (at_start || bytes == 0) return base + page;
  const uintptr_t end = reinterpret_cast<uintptr_t>(base + page + body);
  return reinterpret_cast<void*>((end - bytes) / align * align);
}

template <typename E>
static E* guarded_copy(const std::vector<E>& v, size_t align) {
  E* p = static_cast<E*>(guarded_alloc(v.size() * sizeof(E), align));
  if (!v.empty()) std::memcpy(p, v.data(), v.size() * sizeof(E));
  return p;
}

static std::vector<float> read_f32(const std::string& path, size_t n) {
  std::vector<float> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), 4, n, f) != n) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::exit(1);
  }
  std::fclose(f);
  return v;
}

// Packed (rows, heads, d) -> guarded buffer with head stride d + pad (rows of heads * (d + pad)).
struct Packed {
  uint16_t* buf;
  int64_t rows, heads, d, rs, hs;
};
static Packed make_packed(const std::vector<uint16_t>& src, int64_t rows, int64_t heads,
                          int64_t d, int64_t pad) {
  Packed t{nullptr, rows, heads, d, heads * (d + pad), d + pad};
  std::vector<uint16_t> tmp(static_cast<size_t>(rows * t.rs), 0x7e00);  // NaN-ish fill
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t k = 0; k < heads; ++k)
      std::memcpy(&tmp[j * t.rs + k * t.hs], &src[(j * heads + k) * d], static_cast<size_t>(d) * 2);
  t.buf = guarded_copy(tmp, 16);
  return t;
}

static float g_softcap = 0.f;  // FlashFwdParams::softcap, meta.txt's optional last field

static int run_varlen(const std::string& dir, bool bf, long long d, long long b, long long sq,
                      long long sk, long long h, long long hk, long long wl, long long wr,
                      long long causal, float scale, long long use_ws, long long pad) {
  long long total_q, total_k;
  FILE* m = std::fopen((dir + "/varlen.txt").c_str(), "r");
  if (!m || std::fscanf(m, "%lld %lld", &total_q, &total_k) != 2) return 3;
  std::fclose(m);
  auto read_i32 = [&](const char* name) {
    std::vector<int32_t> v(b + 1);
    FILE* f = std::fopen((dir + "/" + name).c_str(), "rb");
    if (!f || std::fread(v.data(), 4, v.size(), f) != v.size()) {
      std::fprintf(stderr, "cannot read %s\n", name);
      std::exit(1);
    }
    std::fclose(f);
    return v;
  };
  const int32_t* cu_q = guarded_copy(read_i32("cu_q.bin"), 4);
  const int32_t* cu_k = guarded_copy(read_i32("cu_k.bin"), 4);
  Packed q = make_packed(read_u16(dir + "/q.bin", total_q * h * d), total_q, h, d, pad);
  Packed k = make_packed(read_u16(dir + "/k.bin", total_k * hk * d), total_k, hk, d, pad);
  Packed v = make_packed(read_u16(dir + "/v.bin", total_k * hk * d), total_k, hk, d, pad);
  Packed o = make_packed(read_u16(dir + "/out.bin", total_q * h * d), total_q, h, d, pad);
  Packed go = make_packed(read_u16(dir + "/dout.bin", total_q * h * d), total_q, h, d, pad);
  float* lse = guarded_copy(read_f32(dir + "/lse.bin", h * total_q), 4);
  Packed dq = make_packed(std::vector<uint16_t>(total_q * h * d, 0x7e00), total_q, h, d, pad);
  Packed dk = make_packed(std::vector<uint16_t>(total_k * hk * d, 0x7e00), total_k, hk, d, pad);
  Packed dv = make_packed(std::vector<uint16_t>(total_k * hk * d, 0x7e00), total_k, hk, d, pad);
  float* delta = guarded_copy(std::vector<float>(h * total_q, NAN), 4);

  FlashBwdParams p;
  FlashFwdParams& f = p.fwd;
  f.q = q.buf, f.k = k.buf, f.v = v.buf, f.out = o.buf, f.lse = lse;
  f.q_row_stride = q.rs, f.q_head_stride = q.hs;  // batch strides stay 0 (unused)
  f.k_row_stride = k.rs, f.k_head_stride = k.hs;
  f.v_row_stride = v.rs, f.v_head_stride = v.hs;
  f.out_row_stride = o.rs, f.out_head_stride = o.hs;
  f.b = b, f.seqlen_q = sq, f.seqlen_k = sk, f.h = h, f.h_k = hk, f.d = d;
  f.softmax_scale = scale;
  f.softcap = g_softcap;
  f.window_left = wl, f.window_right = wr, f.is_causal = causal != 0;
  f.dtype = bf ? DType::kBFloat16 : DType::kFloat16;
  f.cu_seqlens_q = cu_q, f.cu_seqlens_k = cu_k, f.total_q = total_q, f.total_k = total_k;
  p.dout = go.buf;
  p.dout_row_stride = go.rs, p.dout_head_stride = go.hs;
  p.dq = dq.buf, p.dk = dk.buf, p.dv = dv.buf;
  p.dq_row_stride = dq.rs, p.dq_head_stride = dq.hs;
  p.dk_row_stride = dk.rs, p.dk_head_stride = dk.hs;
  p.dv_row_stride = dv.rs, p.dv_head_stride = dv.hs;
  p.delta = delta;
  // flash_bwd_cuda_workspace_floats' formula (b sequences x max_seqlen_k rows per split).
  int hps = 0;
  const int splits = bwd_layout::dkdv_num_splits(b, h, hk, sk, static_cast<int>(d), &hps);
  if (use_ws && splits > 1)
    p.workspace = guarded_copy(std::vector<float>(2 * splits * b * hk * sk * d, NAN), 16);

  BwdArgs args;
  const BwdPrep prep = prepare_bwd(p, &args);
  if (prep == kBwdInvalid) {
    std::fprintf(stderr, "prepare_bwd rejected the problem\n");
    return 5;
  }
  if (prep == kBwdLaunch) {
    if (bf)
      d == 64 ? run_all<__nv_bfloat16, 64>(args) : run_all<__nv_bfloat16, 128>(args);
    else
      d == 64 ? run_all<__half, 64>(args) : run_all<__half, 128>(args);
  }
  auto dump = [&](const Packed& t, const char* name) {
    std::vector<float> outv(t.rows * t.heads * t.d);
    for (int64_t j = 0; j < t.rows; ++j)
      for (int64_t kk = 0; kk < t.heads; ++kk)
        for (int64_t e = 0; e < t.d; ++e) {
          const uint16_t bits = t.buf[j * t.rs + kk * t.hs + e];
          outv[(j * t.heads + kk) * t.d + e] =
              bf ? half_to_float<__nv_bfloat16>(bits) : half_to_float<__half>(bits);
        }
    FILE* fo = std::fopen((dir + "/" + name + ".f32").c_str(), "wb");
    std::fwrite(outv.data(), 4, outv.size(), fo);
    std::fclose(fo);
  };
  dump(dq, "dq");
  dump(dk, "dk");
  dump(dv, "dv");
  {
    FILE* fo = std::fopen((dir + "/delta.f32").c_str(), "wb");
    std::fwrite(delta, 4, static_cast<size_t>(h * total_q), fo);
    std::fclose(fo);
  }
  std::printf("ok splits=%d hps=%d used_splits=%d\n", splits, hps, args.num_splits);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  emu::g_mode = emu::mode_from_env();
  emu::g_stack_bytes = 128 * 1024;
  const std::string dir = argv[1];
  char dt[8];
  long long d, b, sq, sk, h, hk, wl, wr, causal, use_ws, pad;
  float scale;
  FILE* m = std::fopen((dir + "/meta.txt").c_str(), "r");
  if (!m || std::fscanf(m, "%7s %lld %lld %lld %lld %lld %lld %lld %lld %lld %f %lld %lld", dt,
                        &d, &b, &sq, &sk, &h, &hk, &wl, &wr, &causal, &scale, &use_ws,
                        &pad) != 13)
    return 3;
  if (std::fscanf(m, "%f", &g_softcap) != 1) g_softcap = 0.f;  // optional 14th field
  std::fclose(m);
  const bool bf = std::string(dt) == "bf";
  if (FILE* vl = std::fopen((dir + "/varlen.txt").c_str(), "r")) {
    std::fclose(vl);
    return run_varlen(dir, bf, d, b, sq, sk, h, hk, wl, wr, causal, scale, use_ws, pad);
  }

  Strided q = make_strided(read_u16(dir + "/q.bin", b * sq * h * d), b, sq, h, d, pad);
  Strided k = make_strided(read_u16(dir + "/k.bin", b * sk * hk * d), b, sk, hk, d, pad);
  Strided v = make_strided(read_u16(dir + "/v.bin", b * sk * hk * d), b, sk, hk, d, pad);
  Strided o = make_strided(read_u16(dir + "/out.bin", b * sq * h * d), b, sq, h, d, pad);
  Strided go = make_strided(read_u16(dir + "/dout.bin", b * sq * h * d), b, sq, h, d, pad);
  std::vector<float> lse(b * h * sq);
  {
    FILE* f = std::fopen((dir + "/lse.bin").c_str(), "rb");
    if (!f || std::fread(lse.data(), 4, lse.size(), f) != lse.size()) return 4;
    std::fclose(f);
  }
  Strided dq = make_strided(std::vector<uint16_t>(b * sq * h * d, 0x7e00), b, sq, h, d, pad);
  Strided dk = make_strided(std::vector<uint16_t>(b * sk * hk * d, 0x7e00), b, sk, hk, d, pad);
  Strided dv = make_strided(std::vector<uint16_t>(b * sk * hk * d, 0x7e00), b, sk, hk, d, pad);
  std::vector<float> delta(b * h * sq, NAN);

  FlashBwdParams p;
  FlashFwdParams& f = p.fwd;
  f.q = q.buf.data();
  f.k = k.buf.data();
  f.v = v.buf.data();
  f.out = o.buf.data();
  f.lse = lse.data();
  f.q_batch_stride = q.bs, f.q_row_stride = q.rs, f.q_head_stride = q.hs;
  f.k_batch_stride = k.bs, f.k_row_stride = k.rs, f.k_head_stride = k.hs;
  f.v_batch_stride = v.bs, f.v_row_stride = v.rs, f.v_head_stride = v.hs;
  f.out_batch_stride = o.bs, f.out_row_stride = o.rs, f.out_head_stride = o.hs;
  f.b = b, f.seqlen_q = sq, f.seqlen_k = sk, f.h = h, f.h_k = hk, f.d = d;
  f.softmax_scale = scale;
  f.softcap = g_softcap;
  f.window_left = wl, f.window_right = wr, f.is_causal = causal != 0;
  f.dtype = bf ? DType::kBFloat16 : DType::kFloat16;
  p.dout = go.buf.data();
  p.dout_batch_stride = go.bs, p.dout_row_stride = go.rs, p.dout_head_stride = go.hs;
  p.dq = dq.buf.data(), p.dk = dk.buf.data(), p.dv = dv.buf.data();
  p.dq_batch_stride = dq.bs, p.dq_row_stride = dq.rs, p.dq_head_stride = dq.hs;
  p.dk_batch_stride = dk.bs, p.dk_row_stride = dk.rs, p.dk_head_stride = dk.hs;
  p.dv_batch_stride = dv.bs, p.dv_row_stride = dv.rs, p.dv_head_stride = dv.hs;
  p.delta = delta.data();

  // The workspace size the binding would allocate (same formula as
  // flash_bwd_cuda_workspace_floats, which lives in flash_bwd.cu).
  int hps = 0;
  const int splits = bwd_layout::dkdv_num_splits(b, h, hk, sk, static_cast<int>(d), &hps);
  std::vector<float> ws;
  if (use_ws && splits > 1) {
    ws.assign(static_cast<size_t>(2 * splits * b * hk * sk * d), NAN);  // must be overwritten
    p.workspace = ws.data();
  }
  // Host vectors of uint16 are only 2-byte aligned in principle; the launcher's alignment
  // checks would reject them, so check what the kernels actually need here instead.
  BwdArgs args;
  const BwdPrep prep = prepare_bwd(p, &args);
  if (prep == kBwdInvalid) {
    std::fprintf(stderr, "prepare_bwd rejected the problem\n");
    return 5;
  }
  if (prep == kBwdLaunch) {
    if (bf)
      d == 64 ? run_all<__nv_bfloat16, 64>(args) : run_all<__nv_bfloat16, 128>(args);
    else
      d == 64 ? run_all<__half, 64>(args) : run_all<__half, 128>(args);
  }

  auto dump = [&](const Strided& t, int64_t s, int64_t heads, const char* name) {
    std::vector<float> outv(b * s * heads * d);
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = 0; j < s; ++j)
        for (int64_t kk = 0; kk < heads; ++kk)
          for (int64_t e = 0; e < d; ++e) {
            const uint16_t bits = t.buf[i * t.bs + j * t.rs + kk * t.hs + e];
            outv[((i * s + j) * heads + kk) * d + e] =
                bf ? half_to_float<__nv_bfloat16>(bits) : half_to_float<__half>(bits);
          }
    FILE* fo = std::fopen((dir + "/" + name + ".f32").c_str(), "wb");
    std::fwrite(outv.data(), 4, outv.size(), fo);
    std::fclose(fo);
  };
  dump(dq, sq, h, "dq");
  dump(dk, sk, hk, "dk");
  dump(dv, sk, hk, "dv");
  std::printf("ok splits=%d hps=%d used_splits=%d\n", splits, hps, args.num_splits);
  return 0;
}
