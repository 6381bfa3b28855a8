// flash_fwd.cpp — FlashAttention forward on the CPU (fp32 / fp16 / bf16, any head dim).
//
// What it computes. For every batch b, query head h and query row i:
//   out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, kvh]) v[b, j, kvh]
//   lse[b, h, i] = log sum_j exp(scale * q . k)          (natural log, fp32)
// with kvh = h / (h / h_k), over the keys row i may see: j in [i + Sk - Sq - left,
// i + Sk - Sq + right] (bottom-right aligned, -1 = unbounded, causal = right 0). A row that
// sees no key writes 0 and lse = -inf. The same algorithm and semantics as the CUDA kernel.
//
// Variable-length batches (params.cu_seqlens_q set, see params.h): q/out (total_q, h, d), k/v
// (total_k, h_k, d) packed, lse (h, total_q); each sequence is exactly the dense problem of
// its own lengths (its own bottom-right band). The same code runs them: the K^T / V pre-pass
// lays out all total_k packed keys once (the same work per key as dense, no padding), a
// sequence is a column offset into it, and the tasks are a flat list of (sequence, query
// block) items times heads, heaviest first, so one long sequence among short ones is spread
// over every thread by its blocks and heads.
//
// Why it is fast. It is the FlashAttention loop with the two block products done by a real
// GEMM: a task owns a block of up to 128 query rows of one (b, h) and sweeps the visible keys
// in blocks of kKBlock, keeping the fp32 output accumulator and the online-softmax running
// max / sum for its rows in per-thread buffers that stay in L2; the (Sq, Sk) score matrix
// never exists. S = Q K^T and O += P V are fp32 register-tiled FMA GEMMs (cpu_gemm.h, ~90%
// of torch.mm's fp32 rate; they replaced ATen's cpublas::brgemm, whose per-shape JIT cache grew
// with every new sequence length), the rest is O(Sq * Sk) vectorised work (max, exp2, sum)
// next to the 4 * D flops per score (perf at B1 H16 S2048 D128 causal: about three quarters of
// the kernel's time is in the GEMMs, a quarter in this file's softmax, widening and masking).
//
// K is transposed and V copied (16-bit ones widened to fp32) once per (batch, kv head) slice,
// in a parallel pre-pass over a few MiB of slices at a time (FlashFwdCpu::run), into the
// panels the GEMM's tiles read as contiguous streams (gemm_f32_bpanels), so every block
// product reads GEMM-ready operands and the layout is paid once per key, not once per query
// block; fp32 Q is read in place when its rows are adjacent. On the AVX-512 machine (bf16 dot
// products, no AMX) this was tuned on, ATen's brgemm on fp32 operands ran 2-4x faster than on
// bf16 ones at these block shapes, so 16-bit inputs are widened rather than multiplied in 16
// bit. The exception: bf16 on a CPU with AVX512-BF16
// runs both block products on our own vdpbf16ps micro-kernels (cpu_dpbf16.h: exact bf16 products
// summed in fp32, at twice the fp32 FMA rate): S = Q K^T (dp_scores) from K laid out by pairs
// of dims, and O += P V (dp_pv) from V laid out by pairs of keys, with P rounded to bf16 as
// the GPU kernels round it (the output error against float64 moved from 7.8e-3 to 8.2e-3 at
// most on the shapes checked; torch's bf16 math is at 4e-2 to 9e-2 there). The bf16 forward
// at B1 H16 S2048 D128 on a 2-core Zen 4: 180 ms widened, 103 ms so. The price is scratch
// memory for one chunk of slices (~4 MiB, or one slice where a slice is larger): an fp32 K^T
// and an fp32 V per slice, each padded to whole panels (K^T: keys to a tile's width; V: dims to
// whole vectors), or the bf16 K and V pairs, in huge pages where the OS offers them.
//
// The softmax runs in the log2 domain (scale * log2 e folded into one multiply, a
// polynomial exp2 that the compiler vectorises), and O is divided by the row sum once, at
// the end. Under a causal or window mask only the key blocks that intersect a task's band
// are visited, blocks wholly inside the band take the unmasked path, and in blocks crossing
// a band edge each row's visible range is clipped arithmetically (no -inf fill). Tasks are
// handed out heaviest first from an atomic counter (dynamic scheduling), so causal launches
// end without a long tail.
//
// Logit soft-capping (params.softcap > 0, Gemma 2 / Grok): each visible score becomes
// cap * tanh(scale * q.k / cap), in natural-log units, right after its block product and
// before the running max; the softmax then runs with scale 1 on the capped scores (so m and
// lse are in capped units too). It is a template flag (kCap): the uncapped kernel is the same
// code as without the feature, and the capped one pays one vectorised tanh per visible score.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_gemm.h"
#include "cpu_math.h"
#include "cpu_dpbf16.h"
#include "cpu_scratch.h"
#include "cpu_types.h"
#include "flash_varlen.h"
#include "fastattn/api.h"
#include "fastattn/cpu_dispatch.h"
#include "fastattn/static_switch.h"

namespace fastattn {
namespace {

using cpu::load_row;
using cpu::store_row;

// Query rows per task: 128 amortises each K/V block over more rows (faster than 32 or 64 at
// S = 2048, D = 128); problems with fewer than kMinTasks such tasks use 64-row tasks so
// that more threads have work. Keys per block product: 256 keeps the S block (128 x 256
// fp32, 128 KB) and the output accumulator in L2 (128 and 512 were no faster; noisy machine).
constexpr int64_t kQBlockMax = 128;
constexpr int64_t kQBlockSmall = 64;
constexpr int64_t kKBlock = 256;
constexpr int64_t kMinTasks = 32;
// GEMM operands prepared at a time (FlashFwdCpu::run / slices_per_chunk).
constexpr int64_t kChunkBytes = int64_t(4) << 20;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 2^x for x <= 0 (the softmax only evaluates exp of non-positive numbers), on
// cpu::vmath::kLanes lanes at once, each on its own: x = n + f with n = round(x) (the magic
// constant's rounding), |f| <= 1/2, and 2^f from its degree-7 Taylor polynomial (relative
// error < 1e-8 on that range); 2^n is added into the exponent bits. Anything below 2^-126
// returns 0; NaN stays NaN. Each step is defined for every x <= 0 and NaN (the callers pass 0
// in the lanes they discard, whose scores may be anything): the integer part is converted only
// where it is a number >= -126 (0 elsewhere: a NaN's p keeps its NaN bits), and the exponent
// add is unsigned (its signed form overflowed in discarded lanes: UBSan, fuzzing). A scalar
// form of it in an `omp simd` loop did NOT vectorise under GCC 12 (the select on x < -126 and
// the float -> int conversion stayed scalar, one vcomiss + branch per score: perf put ~25% of
// the fp32 forward at S = 2048, D = 128 in that loop on the AVX2 tier; the AVX-512 tier had it
// vectorised, its mask registers if-convert the select); written with the vector types it
// compiles to packed FMAs on every tier (cpu_math.h says why).
inline cpu::vmath::vf exp2_nonpositive(cpu::vmath::vf x) {
  using namespace cpu::vmath;
  const vi below = x < -126.0f;
  const vf xc = below ? splat(-126.0f) : x;
  const vf magic = splat(12582912.0f);
  const vf n = (xc + magic) - magic;
  const vf f = xc - n;
  vf p = splat(1.5252733804059841e-05f);
  p = p * f + 1.5403530393381608e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  typedef uint32_t vu __attribute__((vector_size(sizeof(vi))));
  const vu n_bits = (vu)__builtin_convertvector(x >= -126.0f ? n : splat(0.0f), vi) << 23;
  const vf r = as_float((vi)((vu)as_int(p) + n_bits));
  return below ? splat(0.0f) : r;
}

// One value: lane 0 of the vector form (the same bits as a lane of a vector call).
inline float exp2_nonpositive(float x) { return exp2_nonpositive(cpu::vmath::splat(x))[0]; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

using cpu::gemm_f32_bpanels;
using cpu::kGemmPanel;

using cpu::ScratchBuffer;

struct Band {
  // Row i sees keys [i + lo_off, i + hi_off] (before clipping to [0, seqlen_k)).
  bool has_lo = false, has_hi = false;
  int64_t lo_off = 0, hi_off = 0;
  int64_t lo(int64_t i) const { return has_lo ? i + lo_off : std::numeric_limits<int64_t>::min() / 4; }
  int64_t hi(int64_t i) const { return has_hi ? i + hi_off : std::numeric_limits<int64_t>::max() / 4; }
};

template <typename T, bool kCap>
class FlashFwdCpu {
 public:
  explicit FlashFwdCpu(const FlashFwdParams& p) : p_(p) {
    varlen_ = p.cu_seqlens_q != nullptr;
    // K/V rows as the pre-pass lays them out: dense, (b, h_k) slices of seqlen_k keys each;
    // varlen, one (h_k) slice of all total_k packed keys (each sequence a column range of it).
    kv_batches_ = varlen_ ? 1 : p.b;
    kv_rows_ = varlen_ ? p.total_k : p.seqlen_k;
    // use_dp_'s K pairs: rows of whole vectors (the words past kv_rows stay unwritten, and no
    // block reads them).
    kt_ld_ = ceil_div(kv_rows_, 16) * 16;
    // fp32 GEMM operands: K^T in panels of kGemmPanel keys, V in panels of v_pw_ dims (one
    // tile's width, or d rounded up to whole vectors when smaller).
    kt_panels_ = ceil_div(kv_rows_, kGemmPanel);
    v_pw_ = cpu::gemm_panel_width(p.d);
    v_panels_ = ceil_div(p.d, v_pw_);
    int64_t q_blocks_max = p.b * ceil_div(p.seqlen_q, kQBlockMax);
    if (varlen_) {
      seqs_.resize(static_cast<size_t>(p.b));
      q_blocks_max = 0;
      for (int64_t i = 0; i < p.b; ++i) {
        seqs_[i] = cpu::varlen_seq(p, i);
        q_blocks_max += ceil_div(seqs_[i].seqlen_q, kQBlockMax);
      }
      // use_dp_: each sequence's V key pairs start at its own first key (see pv_block_dp).
      v_pairs_.resize(static_cast<size_t>(p.b) + 1, 0);
      for (int64_t i = 0; i < p.b; ++i) v_pairs_[i + 1] = v_pairs_[i] + ceil_div(seqs_[i].seqlen_k, 2);
    }
    // A function of the shape only (not of the thread count), so the block boundaries, and
    // with them the summation order and the output bits, are the same on any thread count.
    q_block_ = p.h * q_blocks_max >= kMinTasks ? kQBlockMax : kQBlockSmall;
    // Capped: the block scores are turned into capped scores (the scale applied inside the
    // tanh) before the softmax, which then runs at scale 1.
    scale_log2_ = kCap ? kLog2e : p.softmax_scale * kLog2e;
    // fp32 Q is the A operand in place only when its rows are adjacent (one head, or
    // (B, H, S, D) memory): the micro-kernel broadcasts from kGemmR rows of A at once, and at
    // the (B, S, H, D) row stride H * D those rows sit 4 KiB or more apart and share L1 sets
    // (AVX2, 1 thread, S = Q K^T at 128 x 256 x 128 from a compact copy: ~7% faster; the copy
    // is once per query block and head).
    q_in_place_ = std::is_same<T, float>::value && p.q_row_stride == p.d;
    // bf16 on a CPU with AVX512-BF16: S = Q K^T and O += P V on vdpbf16ps from bf16 operands
    // (K by pairs of dims, V by pairs of keys, P rounded to bf16) instead of fp32 GEMMs.
    use_dp_ = std::is_same<T, cpu::bf16_t>::value && cpu::has_dpbf16() && p.d >= cpu::kDpMinHeadDim;
    pairs_ = (p.d + 1) / 2;
  }

  // The (kv batch, kv head) slices are laid out and attended in chunks of slices_per_chunk():
  // one chunk's GEMM operands are prepared (prepare_kv), then all its query blocks and heads
  // run, then the next chunk. Preparing every slice first wrote operands the size of K and V
  // (or twice that, widened) before any was read back, out of cache for large calls: 1 thread,
  // B4 x 1024 keys H32/8 D128, 20 queries, one call took 6.4 ms (bf16) / 11.1 ms (fp32)
  // against 5.3 / 9.2 for its 32 slices called one by one. Each task is the same computation
  // whatever the chunks: the bits do not depend on them.
  void run() {
    const int64_t nslices = kv_batches_ * p_.h_k, per_chunk = slices_per_chunk();
    scratch_.allocate(static_cast<size_t>(slice_floats_for(per_chunk)));
    kt_ = scratch_.get();
    v32_ = use_dp_ ? nullptr : kt_ + k_region(per_chunk);
    vp_ = use_dp_ ? reinterpret_cast<uint32_t*>(kt_ + k_region(per_chunk)) : nullptr;
    for (int64_t s0 = 0; s0 < nslices; s0 += per_chunk) {
      const int64_t s1 = std::min(nslices, s0 + per_chunk);
      prepare_kv(s0, s1);
      if (varlen_)
        run_varlen(s0, s1);
      else
        run_dense(s0, s1);
    }
  }

  void run_dense(int64_t s0, int64_t s1) {
    const int64_t nqb = ceil_div(p_.seqlen_q, q_block_);
    const int64_t group = p_.h / p_.h_k;
    const int64_t heads = (s1 - s0) * group;  // (batch, head) pairs of the chunk's slices
    const int64_t ntasks = heads * nqb;
    const cpu::VarlenSeq dense{0, p_.seqlen_q, 0, p_.seqlen_k};
    const Band band = make_band(dense);
    std::atomic<int64_t> next{0};
    const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
    at::parallel_for(0, nthreads, 1, [&](int64_t t_begin, int64_t t_end) {
      Workspace ws(q_block_, p_.d, use_dp_ ? pairs_ : 0);
      for (int64_t t = t_begin; t < t_end; ++t) {
        for (int64_t task = next.fetch_add(1); task < ntasks; task = next.fetch_add(1)) {
          // Heaviest first: under a causal mask the last query blocks see the most keys.
          const int64_t qb = nqb - 1 - task / heads;
          const int64_t bh = s0 * group + task % heads;  // = b * h + head (slice s = b * h_k + hk)
          run_task(bh / p_.h, bh % p_.h, qb, dense, band, ws);
        }
      }
    });
  }

  // Varlen: one flat list of (sequence, query block) items, each run for every head, sorted
  // by the keys the block sees (heaviest first), so one long sequence is spread over all
  // threads by its query blocks and heads instead of landing on one thread.
  void run_varlen(int64_t s0, int64_t s1) {  // (slices are kv heads here)
    struct Item {
      int64_t seq, qb, cost;
    };
    std::vector<Item> items;
    std::vector<Band> bands(seqs_.size());
    for (int64_t i = 0; i < p_.b; ++i) {
      const cpu::VarlenSeq& s = seqs_[i];
      bands[i] = make_band(s);
      for (int64_t qb = 0; qb < ceil_div(s.seqlen_q, q_block_); ++qb) {
        const int64_t q0 = qb * q_block_, rows = std::min(q_block_, s.seqlen_q - q0);
        const int64_t k_lo = std::max<int64_t>(0, bands[i].lo(q0));
        const int64_t k_hi = std::min<int64_t>(s.seqlen_k, bands[i].hi(q0 + rows - 1) + 1);
        items.push_back({i, qb, rows * (std::max<int64_t>(k_hi - k_lo, 0) + 16)});
      }
    }
    std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
    const int64_t group = p_.h / p_.h_k, heads = (s1 - s0) * group;  // the chunk's heads
    const int64_t ntasks = static_cast<int64_t>(items.size()) * heads;
    if (ntasks == 0) return;
    std::atomic<int64_t> next{0};
    const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
    at::parallel_for(0, nthreads, 1, [&](int64_t t_begin, int64_t t_end) {
      Workspace ws(q_block_, p_.d, use_dp_ ? pairs_ : 0);
      for (int64_t t = t_begin; t < t_end; ++t) {
        for (int64_t task = next.fetch_add(1); task < ntasks; task = next.fetch_add(1)) {
          const Item& it = items[task / heads];
          run_task(it.seq, s0 * group + task % heads, it.qb, seqs_[it.seq], bands[it.seq], ws);
        }
      }
    });
  }

 private:
  struct Workspace {
    Workspace(int64_t q_block, int64_t d, int64_t pairs)
        : q(static_cast<size_t>(q_block * d)),
          qp(static_cast<size_t>(q_block * pairs)),
          pp(pairs > 0 ? static_cast<size_t>(q_block * (kKBlock / 2)) : 0),
          s(static_cast<size_t>(q_block * kKBlock)),
          o(static_cast<size_t>(q_block * d)),
          m(static_cast<size_t>(q_block)),
          l(static_cast<size_t>(q_block)) {}
    std::vector<float> q;
    std::vector<uint32_t> qp;  // bf16 Q rows as pairs (use_dp_)
    std::vector<uint32_t> pp;  // a block's P rows as bf16 pairs (use_dp_)
    std::vector<float> s, o, m, l;
  };

  // Band of one sequence (dense: the whole problem): bottom-right aligned to its own lengths.
  Band make_band(const cpu::VarlenSeq& s) const {
    const int64_t shift = s.seqlen_k - s.seqlen_q;
    int64_t right = p_.window_right;
    if (p_.is_causal) right = 0;
    Band band;
    band.has_lo = p_.window_left >= 0;
    band.lo_off = shift - p_.window_left;
    band.has_hi = right >= 0;
    band.hi_off = shift + right;
    return band;
  }

  // The GEMM operands, once per slice (fp32 panels, cpu_gemm.h's gemm_f32_bpanels), for the
  // slices [s0, s1) of one chunk (see run), slice s0 first: K^T as (slices, kt_panels, d, P)
  // (panel q: keys [q P, q P + P), dim-major) for P = kGemmPanel, and V as (slices, v_panels,
  // kv_rows, v_pw) (panel q: dims [q v_pw, q v_pw + v_pw), key-major); the padding (keys past
  // kv_rows, dims past d) zeroed. Each block product then reads its B tile by tile as
  // contiguous streams, where K^T at the key count's row stride and V in place had each tile
  // row a page apart (~25% of the GEMMs' time went to packing them, AVX2 perf). use_dp_ (bf16
  // with AVX512-BF16): K by pairs of dims, (slices, pairs, kt_ld) 32-bit words of two bf16,
  // and V by pairs of keys, (slices, vpairs(), d) words. A slice is one (kv batch, kv head);
  // varlen: kv_batches = 1 and kv_rows = total_k, the packed keys of all sequences side by side
  // (the same work per key as the dense layout).
  //
  // Floats of one slice's K^T (or K pairs) and of its V (or V pairs) in the scratch.
  int64_t slice_k_floats() const { return use_dp_ ? pairs_ * kt_ld_ : kt_panels_ * p_.d * kGemmPanel; }
  int64_t slice_v_floats() const { return use_dp_ ? vpairs() * p_.d : v_panels_ * kv_rows_ * v_pw_; }
  // One buffer for a chunk of n slices (the retained one holds one): K^T first, V from a
  // 64-byte boundary.
  int64_t k_region(int64_t n) const { return ceil_div(n * slice_k_floats(), 16) * 16; }
  int64_t slice_floats_for(int64_t n) const { return k_region(n) + n * slice_v_floats(); }
  // Where slice (kvb, hk) sits in this chunk's scratch.
  int64_t scratch_slice(int64_t kvb, int64_t hk) const { return kvb * p_.h_k + hk - slice0_; }

  // Slices per chunk (see run): operands of about kChunkBytes (~4 MiB: each slice's stay in
  // cache from being written to being read), but at least 8 tasks per thread in a chunk (each
  // chunk ends with threads waiting for its last task), all slices when they fit anyway.
  int64_t slices_per_chunk() const {
    const int64_t nslices = kv_batches_ * p_.h_k;
    int64_t q_blocks = 0;
    if (varlen_) {
      for (const cpu::VarlenSeq& s : seqs_) q_blocks += ceil_div(s.seqlen_q, q_block_);
    } else {
      q_blocks = ceil_div(p_.seqlen_q, q_block_);
    }
    const int64_t tasks_per_slice = std::max<int64_t>(1, (p_.h / p_.h_k) * q_blocks);
    const int64_t bytes = (slice_k_floats() + slice_v_floats()) * static_cast<int64_t>(sizeof(float));
    int64_t n = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(bytes, 1));
    n = std::max(n, ceil_div(8 * static_cast<int64_t>(at::get_num_threads()), tasks_per_slice));
    return std::min(n, nslices);
  }

  void prepare_kv(int64_t s0, int64_t s1) {
    constexpr int64_t P = kGemmPanel;
    const int64_t d = p_.d, sk = kv_rows_;
    const int64_t nbh = s1 - s0;  // slices of this chunk; scratch slice bh is slice s0 + bh
    slice0_ = s0;
    constexpr int64_t kKeyChunk = 64;  // a multiple of P (8, 16 or 64): whole K^T panels
    static_assert(kKeyChunk % P == 0, "a chunk of keys must hold whole K^T panels");
    const int64_t key_chunks = ceil_div(sk, kKeyChunk);
    const T* k = static_cast<const T*>(p_.k);
    const T* v = static_cast<const T*>(p_.v);
    at::parallel_for(0, nbh * key_chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> rows(use_dp_ ? 0 : static_cast<size_t>(kKeyChunk * v_panels_ * v_pw_), 0.0f);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / key_chunks, j0 = (task % key_chunks) * kKeyChunk;
        const int64_t b = (s0 + bh) / p_.h_k, hk = (s0 + bh) % p_.h_k;
        const int64_t n = std::min(kKeyChunk, sk - j0);
        const T* kbase = k + b * p_.k_batch_stride + hk * p_.k_head_stride;
        const T* vbase = v + b * p_.v_batch_stride + hk * p_.v_head_stride;
        if (use_dp_) {
          uint32_t* kp = reinterpret_cast<uint32_t*>(kt_) + bh * pairs_ * kt_ld_ + j0;
          for (int64_t r0 = 0; r0 < n; r0 += 16) {
            const uint16_t* rows16[16];
            const int64_t nr = std::min<int64_t>(16, n - r0);
            for (int64_t j = 0; j < nr; ++j)
              rows16[j] = reinterpret_cast<const uint16_t*>(kbase + (j0 + r0 + j) * p_.k_row_stride);
            cpu::pack_dim_pairs_x16(rows16, nr, d, kp + r0, kt_ld_);
          }
          if (!varlen_) {  // kKeyChunk is even: a chunk holds whole pairs (the last one may be half)
            uint32_t* dst = vp_ + (bh * vpairs() + j0 / 2) * d;
            for (int64_t j = 0; j < n; j += 2) {
              const uint16_t* lo = reinterpret_cast<const uint16_t*>(vbase + (j0 + j) * p_.v_row_stride);
              const uint16_t* hi =
                  j + 1 < n ? reinterpret_cast<const uint16_t*>(vbase + (j0 + j + 1) * p_.v_row_stride) : nullptr;
              cpu::pack_row_pairs(lo, hi, d, dst + (j / 2) * d);
            }
          }
          continue;
        }
        // K^T panels: the chunk's keys (rows of d floats, widened) transposed panel by panel;
        // a last panel's keys past n are zero.
        const int64_t row_ld = v_panels_ * v_pw_;  // (the rows buffer's stride; its dims past d stay 0)
        for (int64_t j = 0; j < n; ++j) load_row(kbase + (j0 + j) * p_.k_row_stride, rows.data() + j * row_ld, d);
        for (int64_t q0 = 0; q0 < n; q0 += P) {
          float* panel = kt_ + (bh * kt_panels_ + (j0 + q0) / P) * d * P;
          const int64_t nq = std::min(P, n - q0);
          for (int64_t c = 0; c < d; ++c) {
            float* dst = panel + c * P;
            for (int64_t j = 0; j < nq; ++j) dst[j] = rows[(q0 + j) * row_ld + c];
            for (int64_t j = nq; j < P; ++j) dst[j] = 0.0f;
          }
        }
        // V panels: each key's row split into its panels (dims past d zero: the rows buffer's).
        for (int64_t j = 0; j < n; ++j) {
          float* row = rows.data() + j * row_ld;
          load_row(vbase + (j0 + j) * p_.v_row_stride, row, d);
          for (int64_t q = 0; q < v_panels_; ++q)
            std::memcpy(v32_ + ((bh * v_panels_ + q) * sk + j0 + j) * v_pw_, row + q * v_pw_, v_pw_ * sizeof(float));
        }
      }
    });
    if (use_dp_ && varlen_) {
      // Varlen V by pairs of each sequence's own keys (0-1, 2-3, ... from its first key; an
      // odd length's last pair is half), sequence i's at pair v_pairs_[i]: the pairs a
      // sequence's blocks read are then the ones flash_attention forms on its slice alone,
      // whatever the sequence's offset in the packed batch (pairs of the packed rows made a
      // sequence at an odd offset round its P V differently: ~1 bf16 ulp).
      const int64_t nseq = static_cast<int64_t>(seqs_.size());
      at::parallel_for(0, nbh * nseq, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t bh = task / nseq, i = task % nseq, hk = s0 + bh;  // (varlen slices: kv heads)
          const cpu::VarlenSeq& seq = seqs_[i];
          const T* vbase = v + hk * p_.v_head_stride + seq.k_start * p_.v_row_stride;
          uint32_t* dst = vp_ + (bh * vpairs() + v_pairs_[i]) * d;
          for (int64_t j = 0; j < seq.seqlen_k; j += 2) {
            const uint16_t* lo = reinterpret_cast<const uint16_t*>(vbase + j * p_.v_row_stride);
            const uint16_t* hi =
                j + 1 < seq.seqlen_k ? reinterpret_cast<const uint16_t*>(vbase + (j + 1) * p_.v_row_stride) : nullptr;
            cpu::pack_row_pairs(lo, hi, d, dst + (j / 2) * d);
          }
        }
      });
    }
  }

  // Query block qb of sequence b (dense: batch b), head h. Rows and keys are indices inside
  // the sequence; s.q_start / s.k_start place them in the packed tensors (0 when dense,
  // where the batch strides do it).
  void run_task(int64_t b, int64_t h, int64_t qb, const cpu::VarlenSeq& seq, const Band& band, Workspace& ws) {
    const int64_t d = p_.d, sk = seq.seqlen_k;
    const int64_t hk = h / (p_.h / p_.h_k);
    const int64_t q0 = qb * q_block_;
    const int64_t rows = std::min(q_block_, seq.seqlen_q - q0);
    const int64_t kvb = varlen_ ? 0 : b;

    // Keys any row of this block may see, clipped to [0, sk).
    const int64_t k_lo = std::max<int64_t>(0, band.lo(q0));
    const int64_t k_hi = std::min<int64_t>(sk, band.hi(q0 + rows - 1) + 1);

    float* m = ws.m.data();
    float* l = ws.l.data();
    float* o = ws.o.data();
    std::fill(m, m + rows, kNegInf);
    std::fill(l, l + rows, 0.0f);
    std::fill(o, o + rows * d, 0.0f);

    if (k_hi > k_lo) {
      // Q operand: fp32 in place when its rows are adjacent, else copied (fp32) or widened
      // (16-bit) once per task.
      const T* qsrc = static_cast<const T*>(p_.q) + b * p_.q_batch_stride + h * p_.q_head_stride +
                      (seq.q_start + q0) * p_.q_row_stride;
      const float* qa;
      int64_t q_ld;
      if (q_in_place_) {
        qa = reinterpret_cast<const float*>(qsrc);
        q_ld = p_.q_row_stride;
      } else if (use_dp_) {
        qa = nullptr;
        q_ld = 0;
        for (int64_t r = 0; r < rows; ++r)
          cpu::pack_dim_pairs(reinterpret_cast<const uint16_t*>(qsrc + r * p_.q_row_stride), d, ws.qp.data() + r * pairs_, 1);
      } else {
        for (int64_t r = 0; r < rows; ++r) load_row(qsrc + r * p_.q_row_stride, ws.q.data() + r * d, d);
        qa = ws.q.data();
        q_ld = d;
      }
      const int64_t kvbh = scratch_slice(kvb, hk);
      // fp32 panels of this (kv batch, kv head) (use_dp_: K pairs, and V pairs in pv_block_dp)
      const float* kt = use_dp_ ? nullptr : kt_ + kvbh * kt_panels_ * d * kGemmPanel;
      const uint32_t* kp = use_dp_ ? reinterpret_cast<const uint32_t*>(kt_) + kvbh * pairs_ * kt_ld_ + seq.k_start : nullptr;
      const float* vb = use_dp_ ? nullptr : v32_ + kvbh * v_panels_ * kv_rows_ * v_pw_;

      for (int64_t k0 = k_lo; k0 < k_hi; k0 += kKBlock) {
        const int64_t cols = std::min(kKBlock, k_hi - k0);
        float* s = ws.s.data();
        // S (rows, cols) = Q (rows, d) @ K^T (d, cols)
        if (use_dp_)
          cpu::dp_scores(rows, cols, pairs_, ws.qp.data(), pairs_, kp + k0, kt_ld_, s, kKBlock);
        else
          gemm_f32_bpanels(rows, cols, d, q_ld, kKBlock, /*add_c=*/false, qa, kt, kGemmPanel, d * kGemmPanel,
                           seq.k_start + k0, s);
        // Blocks wholly inside every row's band skip the per-row clipping.
        const bool masked = band.lo(q0 + rows - 1) > k0 || band.hi(q0) < k0 + cols - 1;
        softmax_block(s, rows, cols, q0, k0, masked, band, ws);
        // O (rows, d) = alpha * O + P (rows, cols) @ V (cols, d); alpha was applied in softmax.
        if (use_dp_)
          pv_block_dp(b, hk, kvb, seq, k0, rows, cols, ws);
        else
          gemm_f32_bpanels(rows, d, cols, kKBlock, d, /*add_c=*/true, s, vb + (seq.k_start + k0) * v_pw_, v_pw_,
                           kv_rows_ * v_pw_, 0, o);
      }
    }
    write_output(b, h, seq.q_start + q0, rows, ws);
  }

  // use_dp_: O += P V for the block's keys [k0, k0 + cols) of the sequence, P (ws.s) rounded
  // to bf16 pairs for dp_pv. The V pairs are pairs of the sequence's keys (0-1, 2-3, ...; see
  // prepare_kv): a block starting at an odd key (a window's edge) leaves its first key outside
  // any whole pair of the block, and an odd count its last; those take an fp32 row update
  // from V itself, so no key outside the block (a masked or another sequence's key) enters
  // the sum, not even times 0.
  void pv_block_dp(int64_t b, int64_t hk, int64_t kvb, const cpu::VarlenSeq& seq, int64_t k0, int64_t rows,
                   int64_t cols, Workspace& ws) const {
    const int64_t d = p_.d;
    const int64_t first = k0 & 1, np = (cols - first) / 2;
    const bool last = (cols - first) % 2 != 0;
    const float* s = ws.s.data();
    float* o = ws.o.data();
    if (np > 0) {
      for (int64_t r = 0; r < rows; ++r) cpu::to_bf16_pairs(s + r * kKBlock + first, np, ws.pp.data() + r * (kKBlock / 2));
      // the sequence's first pair: dense, 0 (its own (b, h_k) slice); varlen, found by its start
      const int64_t seq_pairs = varlen_ ? v_pair_start(seq) : 0;
      const uint32_t* vp = vp_ + (scratch_slice(kvb, hk) * vpairs() + seq_pairs + (k0 + first) / 2) * d;
      cpu::dp_pv(rows, d, np, ws.pp.data(), kKBlock / 2, vp, d, o, d);
    }
    const T* vsrc = static_cast<const T*>(p_.v) + b * p_.v_batch_stride + hk * p_.v_head_stride +
                    (seq.k_start + k0) * p_.v_row_stride;
    for (int64_t j : {first != 0 ? int64_t(0) : int64_t(-1), last ? cols - 1 : int64_t(-1)}) {
      if (j < 0) continue;
      float* vrow = ws.q.data();  // d floats, unused on this path (Q is in ws.qp)
      load_row(vsrc + j * p_.v_row_stride, vrow, d);
      for (int64_t r = 0; r < rows; ++r) {
        const float pj = s[r * kKBlock + j];
        float* orow = o + r * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) orow[c] += pj * vrow[c];
      }
    }
  }
  // V key pairs per (kv batch, kv head): dense, ceil(seqlen_k / 2); varlen, every sequence's
  // ceil(seqlen_k / 2) side by side.
  int64_t vpairs() const { return varlen_ ? v_pairs_.back() : (kv_rows_ + 1) / 2; }
  int64_t v_pair_start(const cpu::VarlenSeq& seq) const {
    return v_pairs_[static_cast<size_t>(&seq - seqs_.data())];  // (seq is an element of seqs_)
  }

  // Online softmax of one score block in place: S becomes P = 2^(scale_log2 * (S - m_new)),
  // the running max and sum are updated and the accumulator rows rescaled by
  // 2^(scale_log2 * (m_old - m_new)). m is kept in RAW score units (the score whose scaled
  // value is largest: the max, or the min for a negative scale) and the scale is applied to
  // the difference: at the row maximum the exponent is exactly 0 whatever the scale. The
  // usual 2^(S * scale_log2 - max_scaled) is one FMA whose rounding error grows with
  // |scale * S| (about 1e11 at scale 1e9), turning a hard argmax into inf or 0.
  void softmax_block(float* s, int64_t rows, int64_t cols, int64_t q0, int64_t k0, bool masked,
                     const Band& band, Workspace& ws) {
    const int64_t d = p_.d;
    const float sl2 = scale_log2_;
    float* m = ws.m.data();
    float* l = ws.l.data();
    float* o = ws.o.data();
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = s + r * kKBlock;
      int64_t jlo = 0, jhi = cols;
      if (masked) {
        const int64_t i = q0 + r;
        jlo = std::clamp<int64_t>(band.lo(i) - k0, 0, cols);
        jhi = std::clamp<int64_t>(band.hi(i) - k0 + 1, 0, cols);
        if (jhi < jlo) jhi = jlo;
        std::fill(sr, sr + jlo, 0.0f);
        std::fill(sr + jhi, sr + cols, 0.0f);
        if (jhi == jlo) continue;  // this row sees no key of the block: P row 0, O unchanged
      }
      if constexpr (kCap) cpu::softcap_row(sr + jlo, jhi - jlo, p_.softcap, p_.softmax_scale, 1.0f);
      // A negative scale: the largest scaled score is the smallest raw one.
      const float mx = sl2 >= 0.0f ? cpu::row_extreme<true>(sr + jlo, jhi - jlo)
                                   : cpu::row_extreme<false>(sr + jlo, jhi - jlo);
      const bool first = l[r] == 0.0f;  // no key seen yet (after one, the max contributes 1)
      const float m_new = first ? mx : (sl2 >= 0.0f ? std::max(m[r], mx) : std::min(m[r], mx));
      const float alpha = first ? 0.0f : exp2_nonpositive((m[r] - m_new) * sl2);
      // Every visible score so far -inf once scaled (an infinite key, a q . k that overflowed
      // fp32): no probability mass yet, so subtract 0 rather than m_new; each such score gives
      // 2^-inf = 0 instead of 2^(-inf - -inf) = NaN, l stays 0 and the row, if nothing else
      // comes, writes 0 and lse -inf, as the CUDA kernel and torch's attention do. A NaN score
      // still gives NaN (row_extreme skips NaNs; exp2 keeps them).
      const float m_sub = m_new * sl2 == kNegInf ? 0.0f : m_new;
      // P = 2^(scale_log2 * (S - m_sub)) and its row sum: whole vectors, then the tail as one
      // vector whose lanes past jhi keep their values and add nothing (when the row's kKBlock
      // floats hold all its lanes; else, near a window's far edge, one score at a time).
      float sum = 0.0f;
      {
        using namespace cpu::vmath;
        const vf vm = splat(m_sub), vsl2 = splat(sl2);
        vf vsum = vf{};
        int64_t j = jlo;
        for (; j + kLanes <= jhi; j += kLanes) {
          const vf pj = exp2_nonpositive((load(sr + j) - vm) * vsl2);
          store(sr + j, pj);
          vsum += pj;
        }
        if (j < jhi && j + kLanes <= kKBlock) {
          vi lane;
          for (int64_t i = 0; i < kLanes; ++i) lane[i] = static_cast<int32_t>(i);
          const vi live = lane < static_cast<int32_t>(jhi - j);
          const vf x = load(sr + j);  // (lanes past jhi: masked zeros or stale scores, kept)
          const vf pj = exp2_nonpositive(live ? (x - vm) * vsl2 : vf{});  // (2^0 there, discarded)
          store(sr + j, live ? pj : x);
          vsum += live ? pj : vf{};
          j = jhi;
        }
        for (int64_t i = 0; i < kLanes; ++i) sum += vsum[i];
        for (; j < jhi; ++j) {
          const float pj = exp2_nonpositive((sr[j] - m_sub) * sl2);
          sr[j] = pj;
          sum += pj;
        }
      }
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
      if (alpha != 1.0f) {
        float* orow = o + r * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) orow[c] *= alpha;
      }
    }
  }

  // q0: the first row in the (packed) tensor, i.e. including the sequence's q_start.
  void write_output(int64_t b, int64_t h, int64_t q0, int64_t rows, Workspace& ws) {
    const int64_t d = p_.d;
    T* out = static_cast<T*>(p_.out) + b * p_.out_batch_stride + h * p_.out_head_stride;
    // lse (b, h, seqlen_q) dense; (h, total_q) varlen.
    float* lse = varlen_ ? p_.lse + h * p_.total_q : p_.lse + (b * p_.h + h) * p_.seqlen_q;
    for (int64_t r = 0; r < rows; ++r) {
      float* orow = ws.o.data() + r * d;
      const float lr = ws.l[r];
      // l = 0: the row saw no key (out 0, lse -inf). l = NaN: a NaN reached a visible score
      // (a NaN in q or in a key the row sees): the whole row and its lse are NaN, as in
      // torch's math, rather than lse = -inf beside a NaN output.
      // (a row that saw no key is set to 0, not scaled by 0: its accumulator may hold a NaN
      // from 0 * inf, a masked key's zero probability times an inf value in the same tile)
      const float inv = lr > 0.0f ? 1.0f / lr : (lr == 0.0f ? 0.0f : lr);
      if (lr == 0.0f) {
        std::fill(orow, orow + d, 0.0f);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) orow[c] *= inv;
      }
      store_row(orow, out + (q0 + r) * p_.out_row_stride, d);
      lse[q0 + r] = lr > 0.0f ? (ws.m[r] * scale_log2_ + std::log2(lr)) * kLn2 : (lr == 0.0f ? kNegInf : lr);
    }
  }

  const FlashFwdParams& p_;
  bool varlen_ = false;
  std::vector<cpu::VarlenSeq> seqs_;  // varlen: each sequence's clamped offsets and lengths
  std::vector<int64_t> v_pairs_;      // varlen, use_dp_: sequence i's V pairs start at v_pairs_[i]
  int64_t kv_batches_ = 0, kv_rows_ = 0;
  int64_t kt_ld_ = 0;                     // use_dp_: K pairs' row stride
  int64_t kt_panels_ = 0, v_panels_ = 0;  // fp32: panels of kGemmPanel keys (K^T) and v_pw_ dims (V)
  int64_t v_pw_ = 0;
  int64_t q_block_ = kQBlockMax;
  bool q_in_place_ = false;
  bool use_dp_ = false;
  int64_t pairs_ = 0;  // ceil(d / 2)
  float scale_log2_ = 0.0f;
  ScratchBuffer scratch_;
  int64_t slice0_ = 0;  // the chunk's first slice, the first in the scratch (prepare_kv)
  float* kt_ = nullptr;   // K^T panels (slices, kt_panels, d, P) in scratch_ (use_dp_: K pairs)
  float* v32_ = nullptr;  // V panels (slices, v_panels, kv_rows, v_pw) in scratch_ (use_dp_: unused)
  uint32_t* vp_ = nullptr;  // use_dp_: V by pairs of keys (slices, vpairs(), d)
};

}  // namespace

void cpu::flash_fwd_kernel(const FlashFwdParams& params) {
  if (params.b == 0 || params.seqlen_q == 0 || params.h == 0) return;
  if (params.cu_seqlens_q != nullptr && params.total_q == 0) return;
  FASTATTN_CPU_DTYPE_SWITCH(params.dtype, T, [&] {
    BOOL_SWITCH(params.softcap > 0.0f, kCap, [&] { FlashFwdCpu<T, kCap>(params).run(); });
  });
}

}  // namespace fastattn
