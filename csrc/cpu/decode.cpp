// decode.cpp — grouped-KV attention over a KV cache (decode_attention, and
// attention_with_kvcache's few new queries per sequence), contiguous or paged, and the
// in-place cache append, on the CPU.
//
// What it computes: for every sequence b, query row i < seqlen_q and query head h,
//   out[b, i, h] = softmax(scale * q[b, i, h] . K[b, keys, h / G]) V[b, keys, h / G]
// with G = h / h_k query heads per kv head, len_b = cache_seqlens[b] + seqlens_k_add and
// keys the band of [0, len_b) that query i (at position len_b - seqlen_q + i) sees under
// the causal / window limits (params.h); decode is seqlen_q = 1 with every key visible.
// lse[b, h, i] is the natural-log sum of the exponentiated scores (-inf, with out = 0, when
// the row sees no key). A paged cache is read through kv_cache_layout.h's row address, one
// lookup per key row of a block; append_kv copies new rows to cache_seqlens[b] + i the same
// way.
//
// Why it is fast: decode reads the whole cache at every step, so every K/V row is read from memory
// exactly once and used by all G query heads of its group. Work is split over ATen's thread
// pool by (batch, split), and by slices of the kv heads too when that leaves threads idle
// (one short sequence). Each item walks its keys in blocks of kKeyBlock rows and, inside a
// block, kv head by kv head. A head's K rows are read in place from the cache (fp32 loaded,
// bf16 widened by a zero-extension and a 16-bit shift, fp16 by F16C, all in registers: no
// staging copy) and dotted with the G pre-scaled query rows in register tiles (16-lane sums
// in native registers: each key vector widened once for 4 query rows); an online softmax
// (vectorised exp2) updates each row once per block; then the head's V rows, read in place
// the same way, are accumulated into 4 output rows held in registers across the block
// (2 * G * D FMAs per key and kv head in all). Meanwhile the rows of the next kv head (or of
// the first head of the next block) are software-prefetched into L2, a few lines at a time
// between the FMAs: a per-head walk hops by the Hk * D row stride, which the hardware
// prefetchers do not follow on their own. (Prefetched into L1 instead, the fp32 kernel read
// ~15 GB/s on a 2-core Zen 4 whose plain read runs at ~30; into L2, ~28.)
// Split-KV items write a normalised partial output and its lse; a second pass
// merges them in split order, so the result does not depend on the thread count, and
// num_splits = 0 is chosen from the batch and the longest length only (decode_num_splits_cpu;
// never the thread count). Several queries per sequence are just more
// rows per kv head (seqlen_q * G instead of G, each with its own key band), so K/V are still
// read once per item for all of them; long query blocks are cut into chunks
// (decode::cpu_query_chunk) so each item's query and output rows stay in L2. From
// kGemmMinRows rows per kv head on, the block's rows of all heads are staged in fp32 for
// the fp32 GEMM (cpu_gemm.h) instead. A bf16 cache on a CPU with AVX512-BF16 multiplies in bf16 on
// vdpbf16ps (32 exact products into 16 fp32 sums per instruction; P rounded to bf16, as on a
// GPU's tensor cores): register tiles fed straight from the cache (qk_tile_dp / pv_tile_dp;
// no widening, half the instructions of the fp32 tiles), and from kDpMinRows rows on the
// block's rows staged as bf16 pairs for the block products of cpu_dpbf16.h. Elsewhere (fp32,
// fp16, other CPUs) the AVX2 and AVX-512 tiers compute the same bits while both run the register
// tiles, i.e. below 16 rows per kv head (decode proper); from 16 to kGemmMinRows - 1 rows the
// AVX2 tier already takes the GEMM, whose sums differ by fp32 rounding. The baseline tier (no
// FMA: a separate multiply and add round twice) differs in the last bits.
//
// Logit soft-capping (params.softcap = c > 0): the scores here are in log2 units (the
// queries carry scale * log2(e)), so each block's valid scores are taken back to natural
// units, capped (c * tanh(s / c)) and returned to log2 units in place, before the band mask
// and the running max. A template flag (kCap): the uncapped items are the code they were
// without it.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_dpbf16.h"
#include "cpu_gemm.h"
#include "cpu_math.h"
#include "cpu_scratch.h"
#include "cpu_types.h"
#include "fastattn/api.h"
#include "fastattn/cpu_dispatch.h"
#include "fastattn/decode_split.h"
#include "fastattn/kv_cache_layout.h"
#include "fastattn/static_switch.h"

namespace fastattn {
namespace {

using cpu::load_row;

// Keys per block: a block of fp32 K or V rows (32 x 128 x 4 = 16 KiB at D = 128) stays in
// L1 while all G heads use it, and the online softmax is rescaled once per block.
constexpr int64_t kKeyBlock = 32;
// Query heads processed together: the dot products of one K chunk with 4 query rows, and
// the P V update of 4 output rows from one V chunk, are 4 independent FMA chains in
// registers. The group is padded to a multiple of 4 with zero query rows and probabilities.
constexpr int64_t kHeadTile = 4;
// From this many query rows per kv head on (several queries per sequence: speculative or
// chunked-prefill steps), the block products are small GEMMs (cpu_gemm.h; measured with ATen's
// brgemm, which it replaced at about the same speed): they beat the 4 x 4 register tiles
// there, and K is transposed once per block for them. With 16-lane tiles the register path
// holds out longer (B8 L4096 H32/8 D128 on a 2-core Zen 4: 16 rows 20 ms against the GEMM's
// 29, 32 rows 37 against 43 fp32 and even bf16, 64 rows 71 against 65; fp32 on a 2-core Zen 5,
// one thread, one split, B2 L4096: 16 rows 6.6-6.8 against 8.9-9.4, 32 rows 11.7-11.8 against
// 12.2-12.7, 36 rows 13.0-13.3 against 12.5); the AVX2 / SSE tiles are half as wide and stop
// at 16 as before.
constexpr int64_t kGemmMinRows = cpu::vmath::kLanes == 16 ? 40 : 16;
// The same for a bf16 cache on a CPU with AVX512-BF16, where both paths run on vdpbf16ps: the
// pair register tiles (qk_tile_dp / pv_tile_dp) against the staged pair GEMMs (cpu_dpbf16.h).
// Measured at one thread, H32/8 D128, one split, tiles against GEMM: on a 2-core Zen 5, B1 over
// 2048 keys 32 rows 1.55-1.61 ms against 1.16-1.24, 48 rows 2.27-2.31 against 1.63-1.65, 64
// rows 2.99-3.08 against 2.15-2.23; B2 over 4096 keys (out of cache) 32 rows 6.3-7.2 against
// 6.5-6.9, 48 rows 9.4-9.9 against 8.5-8.7, 64 rows 11.9-13.5 against 10.4-11.0. An older
// measurement on a 2-core Zen 4, before the GEMM path's K staging became a 16 x 16 transpose
// (pack_dim_pairs_x16), had the tiles ahead up to ~80 rows (B8 L4096: 32 rows 45 ms against
// 62, 64 rows 87 against 93); the GEMM now starts where the fp32 one does on this tier.
constexpr int64_t kDpMinRows = kGemmMinRows;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Vectors: one native register per value (cpu_math.h's vmath: 16 floats with AVX-512, 8 with
// AVX2, 4 with SSE), no intrinsics and so no ISA #ifdefs here. GCC lowers a wider-than-native
// vector type badly: its selects lane by lane in scalar code, and 64-byte accumulators of a
// loop through the stack and general registers (on AVX2 that made decode compute-bound).
using cpu::vmath::kLanes;
using cpu::vmath::vf;
typedef float vfloat4 __attribute__((vector_size(4 * sizeof(float))));

// The dot products sum in 16 lanes, whatever the ISA: a score is the same bits on every tier
// with FMA (not the baseline tier).
// kSub native vectors hold those 16 lanes (lane l of vector v is lane v * kLanes + l).
constexpr int64_t kW = 16;
constexpr int kSub = static_cast<int>(kW / kLanes);
static_assert(kSub * kLanes == kW, "16 must be a multiple of the native width");

inline vf loadv(const float* p) { return cpu::vmath::load(p); }
inline void storev(float* p, vf v) { cpu::vmath::store(p, v); }

// kLanes consecutive cache elements widened to fp32 in registers: fp32 is a load, bf16 a
// zero-extension and a 16-bit shift (vpmovzxwd + vpslld on AVX2), fp16 the F16C / AVX-512
// convert where the tier has it. The same values as cpu::load_row.
inline vf loadT(const float* p) { return loadv(p); }
inline vf loadT(const cpu::bf16_t* p) {
#if defined(__AVX512F__)
  static_assert(kLanes == 16, "");
  return vf(_mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16)));
#elif defined(__AVX2__)
  static_assert(kLanes == 8, "");
  return vf(_mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16)));
#else
  typedef uint16_t vu16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
  typedef uint32_t vu32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  vu16 h;
  std::memcpy(&h, p, sizeof(h));
  const vu32 w = __builtin_convertvector(h, vu32) << 16;
  vf r;
  std::memcpy(&r, &w, sizeof(r));
  return r;
#endif
}
inline vf loadT(const cpu::half_t* p) {
#if defined(__AVX512F__)
  static_assert(kLanes == 16, "");
  return cpu::vmath::vf(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
  static_assert(kLanes == 8, "");
  return cpu::vmath::vf(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  vf r;
  for (int64_t i = 0; i < kLanes; ++i) r[i] = cpu::half_to_float(p[i].bits);
  return r;
#endif
}
inline float loadT1(const float* p) { return *p; }
inline float loadT1(const cpu::bf16_t* p) { return cpu::to_float(*p); }
inline float loadT1(const cpu::half_t* p) { return cpu::to_float(*p); }

// Software prefetch of the bytes [p, p + bytes) (one per cache line).
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

// The 16 lanes a[0..kSub) folded to 4: lane i + 8 onto lane i, then lane i + 4 onto lane i.
template <int S = kSub>
inline vfloat4 fold16to4(const vf* a) {
  vfloat4 r;
  if constexpr (S == 1) {
#if defined(__AVX512F__)
    // Register extracts: halving a[0] through memory (memcpy of its halves) kept every
    // accumulator of qk_micro on the stack, a load and a store around each FMA.
    const __m512 z = a[0];
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(z),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
    r = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
#endif
  } else if constexpr (S == 2) {
    const vf s8 = a[0] + a[1];
    vfloat4 c, d;
    std::memcpy(&c, &s8, sizeof(c));
    std::memcpy(&d, reinterpret_cast<const char*>(&s8) + sizeof(c), sizeof(d));
    r = c + d;
  } else {
    static_assert(S == 4, "16 lanes in 1, 2 or 4 vectors");
    const vf lo = a[0] + a[2], hi = a[1] + a[3];
    std::memcpy(&r, &lo, sizeof(r));
    vfloat4 h;
    std::memcpy(&h, &hi, sizeof(h));
    r = r + h;
  }
  return r;
}

// Sum of the 32 probabilities of a block row, always in the same order (16 lanes folded to
// 8, 4, then pairs): the row sum is the same bits on every tier.
inline float sum32(const float* s) {
  float t[kW];
  for (int64_t i = 0; i < kW; i += kLanes) storev(t + i, loadv(s + i) + loadv(s + kW + i));
  float u[8], w[4];
  for (int i = 0; i < 8; ++i) u[i] = t[i] + t[i + 8];
  for (int i = 0; i < 4; ++i) w[i] = u[i] + u[i + 4];
  return (w[0] + w[2]) + (w[1] + w[3]);
}
static_assert(kKeyBlock == 2 * kW, "sum32 sums one block row");

// Largest of the n <= kKeyBlock values at s (-inf when n == 0); NaNs are skipped. Reads
// the whole block row: the caller has filled s[n:kKeyBlock) with -inf.
inline float block_max(const float* s) {
  vf m = cpu::vmath::splat(kNegInf);
  for (int64_t j = 0; j < kKeyBlock; j += kLanes) {
    const vf v = loadv(s + j);
    m = v > m ? v : m;
  }
  float r = kNegInf;
  for (int64_t i = 0; i < kLanes; ++i) r = std::max(r, m[i]);
  return r;
}

// Per-thread buffers of one work item, for its h_k kv heads (all, or a slice's): q, acc
// (h_k, rows padded to kHeadTile, d) with rows = query chunk * G; scores (rows padded,
// kKeyBlock); m, l (h_k, rows padded); GEMM path only (rows >= kGemmMinRows, kDpMinRows on
// the pair path): kt, and kst, vst: one key block of K and V rows of every kv head in fp32,
// (h_k, kKeyBlock, d) each; or, on the bf16 pair path
// (dp: bf16 on a CPU with AVX512-BF16, cpu_dpbf16.h), qp: the query rows as bf16 pairs of
// dims (h_k, rows padded, pairs), kps: the block's K by pairs of dims (h_k, pairs,
// kKeyBlock), vps: its V by pairs of keys (h_k, kKeyBlock / 2, d), pp: one head's
// probabilities as bf16 pairs (rows padded, kKeyBlock / 2). The register tiles of a bf16
// cache on such a CPU (qk_tile_dp / pv_tile_dp) use qp and pp too. qp rows are qp_ld words
// apart (pairs rounded up to a 512-bit load, zero past d). Nothing proportional to the
// cache length.
struct Workspace {
  int64_t gp;  // padded rows per kv head
  bool gemm;   // block products as GEMMs (staged blocks) instead of register tiles
  bool pairs_ok;  // bf16 on vdpbf16ps: the GEMM pair path, or the pair register tiles
  bool dp;     // block products as GEMMs on vdpbf16ps
  int64_t pairs, qp_ld;
  std::vector<float> q, kt, scores, acc, m, l, kst, vst;
  std::vector<uint32_t> qp, kps, vps, pp;
  Workspace(int64_t h_k, int64_t rows, int64_t d, bool bf16_pairs)
      : gp((rows + kHeadTile - 1) / kHeadTile * kHeadTile),
        gemm(rows >= (bf16_pairs ? kDpMinRows : kGemmMinRows)),
        pairs_ok(bf16_pairs),
        dp(bf16_pairs && gemm),
        pairs((d + 1) / 2),
        qp_ld((pairs + 15) / 16 * 16),
        q(static_cast<size_t>(h_k * gp * d)),
        kt(gemm && !dp ? static_cast<size_t>(d * kKeyBlock) : 0),
        scores(static_cast<size_t>(gp * kKeyBlock)),
        acc(static_cast<size_t>(h_k * gp * d)),
        m(static_cast<size_t>(h_k * gp)),
        l(static_cast<size_t>(h_k * gp)),
        kst(gemm && !dp ? static_cast<size_t>(h_k * kKeyBlock * d) : 0),
        vst(gemm && !dp ? static_cast<size_t>(h_k * kKeyBlock * d) : 0),
        qp(bf16_pairs ? static_cast<size_t>(h_k * gp * qp_ld) : 0),
        kps(dp ? static_cast<size_t>(h_k * pairs * kKeyBlock) : 0),
        vps(dp ? static_cast<size_t>(h_k * (kKeyBlock / 2) * d) : 0),
        pp(bf16_pairs ? static_cast<size_t>(gp * (kKeyBlock / 2)) : 0) {}
};

// The scores of the kHeadTile heads at q (rows d apart) x NK keys as 4-lane partial sums,
// out[g][t0 + t]: the 16-lane sums over the 16-float chunks below dv of q[g] * k[t], folded
// by fold16to4. The kSub native vectors of the 16 lanes are summed one after the other (a
// pass over the chunks per vector), so each pass holds only kHeadTile x NK accumulators of
// one register next to NK key vectors: 4 x 4 with AVX-512 (32 registers), 4 x 2 with AVX2
// and SSE (16). Each key vector is widened once and used for the 4 heads. Lane l of the 16
// still sums its products over the chunks in order: the same bits on every tier with FMA.
constexpr int kQkKeys = kSub == 1 ? 4 : 2;
//
// kPacked (MHA decode: one query row per kv head): the kHeadTile rows are kHeadTile kv heads,
// row g reading its own key rows k[t] + g * hs (hs = the cache's head stride), so no FMA is
// spent on padding rows; each row's sums are the same as alone.
template <int NK, bool kPacked, typename T>
inline void qk_micro(const float* q, int64_t d, const T* const* k, int64_t hs, int64_t dv, vfloat4 (*out)[4],
                     int t0, const T* const* pf) {
  constexpr int64_t kSize = sizeof(T);
  vf a[kHeadTile][NK][kSub];
  for (int v = 0; v < kSub; ++v) {
    vf acc[kHeadTile][NK] = {};
    for (int64_t c = v * kLanes; c < dv; c += kW) {
      if (pf != nullptr && v == 0) {  // the lines of the pf rows that start in this chunk
        const int64_t to = (c + kW < dv ? c + kW : d) * kSize;
        for (int g = 0; g < (kPacked ? kHeadTile : 1); ++g)
          for (int t = 0; t < NK; ++t)
            for (int64_t o = (c * kSize + 63) / 64 * 64; o < to; o += 64)
              __builtin_prefetch(reinterpret_cast<const char*>(pf[t] + g * hs) + o, 0, 2);
      }
      if constexpr (kPacked) {
        for (int g = 0; g < kHeadTile; ++g) {
          const vf qv = loadv(q + g * d + c);
          for (int t = 0; t < NK; ++t) acc[g][t] += qv * loadT(k[t] + g * hs + c);
        }
      } else {
        vf kv[NK];
        for (int t = 0; t < NK; ++t) kv[t] = loadT(k[t] + c);
        for (int g = 0; g < kHeadTile; ++g) {
          const vf qv = loadv(q + g * d + c);
          for (int t = 0; t < NK; ++t) acc[g][t] += qv * kv[t];
        }
      }
    }
    for (int g = 0; g < kHeadTile; ++g)
      for (int t = 0; t < NK; ++t) a[g][t][v] = acc[g][t];
  }
  for (int g = 0; g < kHeadTile; ++g)
    for (int t = 0; t < NK; ++t) out[g][t0 + t] = fold16to4(a[g][t]);
}

// scores[g][j] = q[g] . K[j] for the kHeadTile heads starting at q (rows d apart), the key
// rows read in place from the cache (widened in registers): the 4-lane partial sums of 4
// keys (qk_micro), then per head one 4 x 4 transpose-and-add for the 4 scores, and the
// d % 16 tail. When pf is given, the rows pf[0, n) (row_bytes each: the next rows this item
// reads) are prefetched along the way, each 16-element chunk's lines of the 4 rows next to
// that chunk's FMAs.
template <bool kPacked, typename T>
inline void qk_tile(const float* q, const T* const* krows, int64_t hs, int64_t n, int64_t d, float* scores,
                    const T* const* pf, int64_t row_bytes) {
  const int64_t dv = d / kW * kW;
  const int64_t row_hs = kPacked ? hs : 0;  // row g's key rows are g * row_hs further
  int64_t j = 0;
  vfloat4 b[kHeadTile][4];
  for (; j + 4 <= n; j += 4) {
    for (int t0 = 0; t0 < 4; t0 += kQkKeys)
      qk_micro<kQkKeys, kPacked>(q, d, krows + j + t0, hs, dv, b, t0, pf != nullptr ? pf + j + t0 : nullptr);
    for (int g = 0; g < 4; ++g) {
      const T* k0 = krows[j] + g * row_hs;
      const T* k1 = krows[j + 1] + g * row_hs;
      const T* k2 = krows[j + 2] + g * row_hs;
      const T* k3 = krows[j + 3] + g * row_hs;
      // 4x4 transpose-and-add of b[g][0..3]: lane t = (b_t[0] + b_t[1]) + (b_t[2] + b_t[3]).
      const vfloat4 b0 = b[g][0], b1 = b[g][1], b2 = b[g][2], b3 = b[g][3];
      const vfloat4 t0 = {b0[0], b1[0], b2[0], b3[0]}, t1 = {b0[1], b1[1], b2[1], b3[1]};
      const vfloat4 t2 = {b0[2], b1[2], b2[2], b3[2]}, t3 = {b0[3], b1[3], b2[3], b3[3]};
      vfloat4 s = (t0 + t1) + (t2 + t3);
      // (explicit fmas in the tails: how the compiler contracts a scalar a * b + c depends on
      // the surrounding code, and a head's scores must not depend on the tile it is in)
      for (int64_t c = dv; c < d; ++c) {
        const float qc = q[g * d + c];
        s[0] = std::fma(qc, loadT1(k0 + c), s[0]);
        s[1] = std::fma(qc, loadT1(k1 + c), s[1]);
        s[2] = std::fma(qc, loadT1(k2 + c), s[2]);
        s[3] = std::fma(qc, loadT1(k3 + c), s[3]);
      }
      std::memcpy(scores + g * kKeyBlock + j, &s, sizeof(s));
    }
  }
  for (; j < n; ++j) {
    if (pf != nullptr)
      for (int g = 0; g < (kPacked ? kHeadTile : 1); ++g) prefetch_row(pf[j] + g * hs, row_bytes);
    const T* k = krows[j];
    qk_micro<1, kPacked, T>(q, d, krows + j, hs, dv, b, 0, nullptr);
    const vfloat4 b0 = b[0][0], b1 = b[1][0], b2 = b[2][0], b3 = b[3][0];
    const vfloat4 t0 = {b0[0], b1[0], b2[0], b3[0]}, t1 = {b0[1], b1[1], b2[1], b3[1]};
    const vfloat4 t2 = {b0[2], b1[2], b2[2], b3[2]}, t3 = {b0[3], b1[3], b2[3], b3[3]};
    vfloat4 s = (t0 + t1) + (t2 + t3);
    for (int64_t c = dv; c < d; ++c)
      for (int g = 0; g < 4; ++g) s[g] = std::fma(q[g * d + c], loadT1(k + g * row_hs + c), s[g]);
    for (int g = 0; g < 4; ++g) scores[g * kKeyBlock + j] = s[g];
  }
}

// acc[g] += sum_j p[g][j] V[j] for the kHeadTile output rows at acc, the value rows read in
// place from the cache (widened in registers): chunk-outer, two native vectors per row at a
// time, so the 8 accumulators of a chunk pair stay in registers across the whole block (8
// independent FMA chains). Every element sums over j in order, from zero, and that block sum
// is then added to acc: the same bits at any vector width, and a blocked sum (one FMA chain
// into the running output over every key of a 64k cache was ~12x torch's fp32 error). When pf is given, the rows pf[0, n) are prefetched along the way (the chunk pair's
// bytes of each row as the chunk pair is read).
//
// kPacked: the 4 output rows are 4 kv heads, row g reading its own value rows vrows[j] + g * hs.
template <bool kPacked, typename T>
inline void pv_tile(const float* p, const T* const* vrows, int64_t hs, int64_t n, int64_t d, float* acc,
                    const T* const* pf) {
  const int64_t h1 = kPacked ? hs : 0, h2 = 2 * h1, h3 = 3 * h1;  // row g's value rows, g * hs further
  float* a0p = acc;
  float* a1p = acc + d;
  float* a2p = acc + 2 * d;
  float* a3p = acc + 3 * d;
  constexpr int64_t kSize = sizeof(T);
  int64_t c = 0;
  for (; c + 2 * kLanes <= d; c += 2 * kLanes) {
    vf a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
    // The cache lines that start inside this chunk pair's bytes (two with fp32 on AVX-512,
    // none for every other pair with fp32 on SSE): each line of a row prefetched once.
    const int64_t pf_from = (c * kSize + 63) / 64 * 64, pf_to = pf != nullptr ? (c + 2 * kLanes) * kSize : 0;
    for (int64_t j = 0; j < n; ++j) {
      for (int g = 0; g < (kPacked ? kHeadTile : 1); ++g)
        for (int64_t o = pf_from; o < pf_to; o += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(pf[j] + g * hs) + o, 0, 2);
      const T* v = vrows[j] + c;
      const float p0 = p[j], p1 = p[kKeyBlock + j], p2 = p[2 * kKeyBlock + j], p3 = p[3 * kKeyBlock + j];
      if constexpr (kPacked) {
        a0 += p0 * loadT(v);
        b0 += p0 * loadT(v + kLanes);
        a1 += p1 * loadT(v + h1);
        b1 += p1 * loadT(v + h1 + kLanes);
        a2 += p2 * loadT(v + h2);
        b2 += p2 * loadT(v + h2 + kLanes);
        a3 += p3 * loadT(v + h3);
        b3 += p3 * loadT(v + h3 + kLanes);
      } else {
        const vf v0 = loadT(v), v1 = loadT(v + kLanes);
        a0 += p0 * v0;
        b0 += p0 * v1;
        a1 += p1 * v0;
        b1 += p1 * v1;
        a2 += p2 * v0;
        b2 += p2 * v1;
        a3 += p3 * v0;
        b3 += p3 * v1;
      }
    }
    storev(a0p + c, loadv(a0p + c) + a0);
    storev(a1p + c, loadv(a1p + c) + a1);
    storev(a2p + c, loadv(a2p + c) + a2);
    storev(a3p + c, loadv(a3p + c) + a3);
    storev(a0p + c + kLanes, loadv(a0p + c + kLanes) + b0);
    storev(a1p + c + kLanes, loadv(a1p + c + kLanes) + b1);
    storev(a2p + c + kLanes, loadv(a2p + c + kLanes) + b2);
    storev(a3p + c + kLanes, loadv(a3p + c + kLanes) + b3);
  }
  for (; c + kLanes <= d; c += kLanes) {
    vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t j = 0; j < n; ++j) {
      if (pf != nullptr)
        for (int g = 0; g < (kPacked ? kHeadTile : 1); ++g) __builtin_prefetch(pf[j] + g * hs + c, 0, 2);
      const T* v = vrows[j] + c;
      const vf v0 = loadT(v);
      a0 += p[j] * v0;
      a1 += p[kKeyBlock + j] * (kPacked ? loadT(v + h1) : v0);
      a2 += p[2 * kKeyBlock + j] * (kPacked ? loadT(v + h2) : v0);
      a3 += p[3 * kKeyBlock + j] * (kPacked ? loadT(v + h3) : v0);
    }
    storev(a0p + c, loadv(a0p + c) + a0);
    storev(a1p + c, loadv(a1p + c) + a1);
    storev(a2p + c, loadv(a2p + c) + a2);
    storev(a3p + c, loadv(a3p + c) + a3);
  }
  for (; c < d; ++c) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      const T* v = vrows[j] + c;
      a0 = std::fma(p[j], loadT1(v), a0);
      a1 = std::fma(p[kKeyBlock + j], loadT1(v + h1), a1);
      a2 = std::fma(p[2 * kKeyBlock + j], loadT1(v + h2), a2);
      a3 = std::fma(p[3 * kKeyBlock + j], loadT1(v + h3), a3);
    }
    a0p[c] += a0;
    a1p[c] += a1;
    a2p[c] += a2;
    a3p[c] += a3;
  }
}

// ---- bf16 register tiles on vdpbf16ps (AVX512-BF16; the avx512 tier only) ----------------
// The same tiles as qk_tile / pv_tile for a bf16 cache on a CPU with AVX512-BF16, fed with
// bf16 operands straight from the cache: one vdpbf16ps adds 32 exact bf16 products into 16
// fp32 sums, where the fp32 tiles spend two widenings (4 instructions) and two FMAs per row
// on the same 32 values. Scores: a 512-bit load of a K row is 32 dims = 16 pairs of dims, and
// the query rows are kept as bf16 pairs of dims (unscaled; the scale goes onto the scores);
// lane l of the 16 sums dims (2l, 2l + 1) of every 32-dim chunk, and the 16-lane sums of 4
// rows x 4 keys are reduced together (reduce16x16). P V: pairs of keys; the two V rows of a pair are interleaved in registers
// (vpunpckl/hwd), which puts dims {0-3, 8-11, 16-19, 24-27} of a 32-dim chunk in one
// accumulator and {4-7, 12-15, ...} in the other: a block's chunk sums, started from zero, are
// permuted back (kFrom0 / kFrom1) as they are added to acc, so ws.acc stays in natural order for the softmax rescale and the output. P is rounded to bf16
// (as on a GPU's tensor cores, and as the GEMM pair path does). Tails of d (d % 32) are
// masked loads: dims past d are zero in both operands, nothing past a row is read.
#if defined(FASTATTN_HAVE_DPBF16)
constexpr int64_t kDpDims = 32;  // dims per 512-bit bf16 load

inline __mmask32 dims_mask(int64_t left) {
  return left >= kDpDims ? ~__mmask32(0) : (__mmask32(1) << left) - 1u;
}

// The 16-lane sums over d of q[g] . k[t] for the kHeadTile rows at qp (qp_ld words apart) and
// NK keys (row g's key t at k[t] + g * hs when kPacked, k[t] otherwise), into acc[g][t].
template <int NK, bool kPacked>
FASTATTN_DPBF16 inline void qk_sums_dp(const uint32_t* qp, int64_t qp_ld, const uint16_t* const* k, int64_t hs,
                                       int64_t d, __m512 (*acc)[NK], const uint16_t* const* pf) {
  for (int g = 0; g < kHeadTile; ++g)
    for (int t = 0; t < NK; ++t) acc[g][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += kDpDims) {
    const __mmask32 m = dims_mask(d - c);
    if (pf != nullptr) {  // the lines of the pf rows that start in this chunk
      const int64_t to = std::min(c + kDpDims, d) * 2;
      for (int g = 0; g < (kPacked ? kHeadTile : 1); ++g)
        for (int t = 0; t < NK; ++t)
          for (int64_t o = (c * 2 + 63) / 64 * 64; o < to; o += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(pf[t] + g * hs) + o, 0, 2);
    }
    if constexpr (kPacked) {
      for (int g = 0; g < kHeadTile; ++g) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(qp + g * qp_ld + c / 2);
        for (int t = 0; t < NK; ++t)
          acc[g][t] = _mm512_dpbf16_ps(acc[g][t], qv, (__m512bh)_mm512_maskz_loadu_epi16(m, k[t] + g * hs + c));
      }
    } else {
      __m512bh kv[NK];
      for (int t = 0; t < NK; ++t) kv[t] = (__m512bh)_mm512_maskz_loadu_epi16(m, k[t] + c);
      for (int g = 0; g < kHeadTile; ++g) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(qp + g * qp_ld + c / 2);
        for (int t = 0; t < NK; ++t) acc[g][t] = _mm512_dpbf16_ps(acc[g][t], qv, kv[t]);
      }
    }
  }
}

// The 16 sums of x[0..16) (16 lanes each) in one vector: lane 4i + j = the sum of x[4j + i]'s
// lanes. Four halving steps, each pairing two vectors with two shuffles and one add (45
// instructions for 16 sums, where folding each to 4 lanes and transposing took ~120).
FASTATTN_DPBF16 inline __m512 reduce16x16(const __m512* x) {
  __m512 c[8], e[4], f[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: x[2i]'s halves added, 8-15: x[2i + 1]'s
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // 128-bit lane k: x[4i + k] folded to 4
    e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)  // lane k: x[8i + k] folded to 2 (lanes 0, 1), x[8i + 4 + k] (2, 3)
    f[i] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * i], e[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(e[2 * i], e[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_ps(f[0], f[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(f[0], f[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// scores[g][j] = qscale * q[g] . K[j] for the kHeadTile rows of bf16 pairs at qp (qp_ld words
// apart; zero past d), as qk_tile: 4 keys x 4 rows of 16-lane sums at a time, reduced
// together (reduce16x16, ordered so that 128-bit lane g holds row g's 4 scores); a block's
// last n % 4 keys one at a time (each sum folded alone).
template <bool kPacked>
FASTATTN_DPBF16 inline void qk_tile_dp(const uint32_t* qp, int64_t qp_ld, const uint16_t* const* krows, int64_t hs,
                                       int64_t n, int64_t d, float qscale, float* scores, const uint16_t* const* pf,
                                       int64_t row_bytes) {
  static_assert(kHeadTile == 4, "reduce16x16 takes 4 rows x 4 keys");
  const __m512 scale = _mm512_set1_ps(qscale);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    __m512 acc[kHeadTile][4];
    qk_sums_dp<4, kPacked>(qp, qp_ld, krows + j, hs, d, acc, pf != nullptr ? pf + j : nullptr);
    __m512 x[16];
    for (int g = 0; g < kHeadTile; ++g)
      for (int t = 0; t < 4; ++t) x[4 * t + g] = acc[g][t];
    const __m512 s = _mm512_mul_ps(reduce16x16(x), scale);
    _mm_storeu_ps(scores + j, _mm512_castps512_ps128(s));
    _mm_storeu_ps(scores + kKeyBlock + j, _mm512_extractf32x4_ps(s, 1));
    _mm_storeu_ps(scores + 2 * kKeyBlock + j, _mm512_extractf32x4_ps(s, 2));
    _mm_storeu_ps(scores + 3 * kKeyBlock + j, _mm512_extractf32x4_ps(s, 3));
  }
  for (; j < n; ++j) {
    if (pf != nullptr)
      for (int g = 0; g < (kPacked ? kHeadTile : 1); ++g) prefetch_row(pf[j] + g * hs, row_bytes);
    __m512 acc[kHeadTile][1];
    qk_sums_dp<1, kPacked>(qp, qp_ld, krows + j, hs, d, acc, nullptr);
    for (int g = 0; g < kHeadTile; ++g) scores[g * kKeyBlock + j] = _mm512_reduce_add_ps(acc[g][0]) * qscale;
  }
}

// acc[g] += sum_j P[g][j] V[j] for the kHeadTile output rows at acc (d apart, natural order),
// pp: row g's probabilities as bf16 pairs of keys (pp_ld words apart; 0 past n). Chunk-outer
// as pv_tile: a 32-dim chunk's 8 accumulators stay in registers across the block.
template <bool kPacked>
FASTATTN_DPBF16 inline void pv_tile_dp(const uint32_t* pp, int64_t pp_ld, const uint16_t* const* vrows, int64_t hs,
                                       int64_t n, int64_t d, float* acc, const uint16_t* const* pf) {
  // (lo, hi) accumulators -> natural order (dims 0-15, 16-31); see the section comment.
  const __m512i kFrom0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i kFrom1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t c = 0; c < d; c += kDpDims) {
    const int64_t left = d - c;
    const __mmask32 m = dims_mask(left);
    const __mmask16 m0 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    const __mmask16 m1 = left >= 32 ? __mmask16(0xFFFF) : left <= 16 ? __mmask16(0) : __mmask16((1u << (left - 16)) - 1u);
    __m512 lo[kHeadTile], hi[kHeadTile];  // the block's sum from zero, added to acc at the end (as pv_tile)
    for (int g = 0; g < kHeadTile; ++g) lo[g] = hi[g] = _mm512_setzero_ps();
    const int64_t pf_from = (c * 2 + 63) / 64 * 64, pf_to = pf != nullptr ? std::min(c + kDpDims, d) * 2 : 0;
    for (int64_t j = 0; j < n; j += 2) {
      const bool pair = j + 1 < n;  // an odd block's last key pairs with a zero row (its P is 0)
      for (int jj = 0; jj < (pair ? 2 : 1); ++jj)
        for (int g = 0; g < (kPacked ? kHeadTile : 1); ++g)
          for (int64_t o = pf_from; o < pf_to; o += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(pf[j + jj] + g * hs) + o, 0, 2);
      if constexpr (kPacked) {
        for (int g = 0; g < kHeadTile; ++g) {
          const __m512i v0 = _mm512_maskz_loadu_epi16(m, vrows[j] + g * hs + c);
          const __m512i v1 = pair ? _mm512_maskz_loadu_epi16(m, vrows[j + 1] + g * hs + c) : _mm512_setzero_si512();
          const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[g * pp_ld + j / 2]));
          lo[g] = _mm512_dpbf16_ps(lo[g], w, (__m512bh)_mm512_unpacklo_epi16(v0, v1));
          hi[g] = _mm512_dpbf16_ps(hi[g], w, (__m512bh)_mm512_unpackhi_epi16(v0, v1));
        }
      } else {
        const __m512i v0 = _mm512_maskz_loadu_epi16(m, vrows[j] + c);
        const __m512i v1 = pair ? _mm512_maskz_loadu_epi16(m, vrows[j + 1] + c) : _mm512_setzero_si512();
        const __m512bh vl = (__m512bh)_mm512_unpacklo_epi16(v0, v1), vh = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
        for (int g = 0; g < kHeadTile; ++g) {
          const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[g * pp_ld + j / 2]));
          lo[g] = _mm512_dpbf16_ps(lo[g], w, vl);
          hi[g] = _mm512_dpbf16_ps(hi[g], w, vh);
        }
      }
    }
    for (int g = 0; g < kHeadTile; ++g) {
      float* a = acc + g * d + c;
      _mm512_mask_storeu_ps(a, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, a), _mm512_permutex2var_ps(lo[g], kFrom0, hi[g])));
      _mm512_mask_storeu_ps(a + 16, m1,
                            _mm512_add_ps(_mm512_maskz_loadu_ps(m1, a + 16), _mm512_permutex2var_ps(lo[g], kFrom1, hi[g])));
    }
  }
}
#else
// Tiers without the instruction never take the pair tiles (has_dpbf16() is false there).
template <bool kPacked>
inline void qk_tile_dp(const uint32_t*, int64_t, const uint16_t* const*, int64_t, int64_t, int64_t, float, float*,
                       const uint16_t* const*, int64_t) {
  __builtin_trap();
}
template <bool kPacked>
inline void pv_tile_dp(const uint32_t*, int64_t, const uint16_t* const*, int64_t, int64_t, int64_t, float*,
                       const uint16_t* const*) {
  __builtin_trap();
}
#endif

// Query rows [i0, i0 + nq) of sequence b whose key length is len: the key band of each row
// (inclusive [lo, hi]; everything outside is masked) and the key range the rows need at all.
struct QueryBand {
  int64_t pos0;  // key position of query row i0 (bottom-right alignment)
  int64_t wl, wr;  // window sides, -1 = unbounded
  int64_t len;
  int64_t lo(int64_t qi) const { return wl >= 0 ? pos0 + qi - wl : 0; }
  int64_t hi(int64_t qi) const { return wr >= 0 ? std::min(pos0 + qi + wr, len - 1) : len - 1; }
};

// One (batch b, query chunk, split, kv-head slice) work item over keys [begin, end), for the
// nh kv heads from h0 on (all h_k of them unless there are fewer (batch, chunk, split) items
// than threads: decode_impl) and the nq query rows of the chunk times its G query heads (row
// r = query qi * G + head g). The kv heads are walked inside each key block, so the block's
// rows of all heads, which are adjacent in the usual (B, S, Hk, D) layout (and in a page),
// are consumed together: the item streams through contiguous cache memory (hardware
// prefetchers and the TLB then work) instead of hopping by the Hk * D row stride once per
// head. Every kv head's arithmetic is the same whichever slice runs it (the packed tiles sum
// each head's row as alone), so the slicing never changes a bit. Writes the normalised output
// and natural-log lse of these keys through out_row(head, qi, row) and lse_out(head, qi, lse).
// Below, kvh counts the slice's heads (its workspace rows); the cache head is h0 + kvh.
template <typename T, bool kCap, typename OutRow, typename LseOut>
void decode_item(const DecodeParams& p, int64_t b, int64_t i0, int64_t nq, const QueryBand& band,
                 int64_t begin, int64_t end, int64_t h0, int64_t nh, Workspace& ws, OutRow out_row,
                 LseOut lse_out) {
  const int64_t d = p.d, group = p.h / p.h_k, gp = ws.gp, rows = nq * group;
  const bool use_gemm = ws.gemm && rows >= (ws.dp ? kDpMinRows : kGemmMinRows);
  const bool use_dp = use_gemm && ws.dp;  // bf16 pairs on vdpbf16ps (T is bf16)
  const bool tile_dp = !use_gemm && ws.pairs_ok;  // the register tiles on vdpbf16ps (T is bf16)
  const int64_t pairs = ws.pairs, qp_ld = ws.qp_ld;
  // MHA decode (one query row per kv head): the register tiles take kHeadTile kv heads at a
  // time (qk_tile / pv_tile's kPacked), 4 useful rows instead of one head and three zero rows:
  // the first packed_heads heads in units of kHeadTile, any others one by one. The kv-head
  // loop walks units: unit u's first head, its ws row (wrow) and how many heads it holds.
  const int64_t packed_heads = !use_gemm && rows == 1 ? nh / kHeadTile * kHeadTile : 0;
  const int64_t packed_units = packed_heads / kHeadTile, units = packed_units + (nh - packed_heads);
  auto wrow = [&](int64_t kvh, int64_t r) {  // ws row of query row r of kv head kvh
    return kvh < packed_heads ? kvh : packed_heads + (kvh - packed_heads) * gp + r;
  };
  auto unit_head = [&](int64_t u) { return u < packed_units ? u * kHeadTile : packed_heads + (u - packed_units); };
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + i0 * p.q_row_stride;
  const T* kc = static_cast<const T*>(p.k_cache) + h0 * p.k_head_stride;  // the slice's first head
  const T* vc = static_cast<const T*>(p.v_cache) + h0 * p.v_head_stride;
  const KvLayout k_layout{p.k_batch_stride, p.k_row_stride, p.block_table, p.block_table_batch_stride,
                          p.page_size, p.num_pages};
  const KvLayout v_layout{p.v_batch_stride, p.v_row_stride, p.block_table, p.block_table_batch_stride,
                          p.page_size, p.num_pages};

  // Query rows pre-scaled by softmax_scale * log2(e): the softmax then runs on exp2.
  std::fill(ws.q.begin(), ws.q.end(), 0.f);
  std::fill(ws.qp.begin(), ws.qp.end(), 0u);
  const float qscale = p.softmax_scale * kLog2e;
  for (int64_t kvh = 0; kvh < nh; ++kvh) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* src = q + (r / group) * p.q_row_stride + ((h0 + kvh) * group + r % group) * p.q_head_stride;
      if (use_dp || tile_dp) {  // the bf16 row as pairs, unscaled: the scale goes onto the scores
        cpu::pack_dim_pairs(reinterpret_cast<const uint16_t*>(src), d,
                            ws.qp.data() + (use_dp ? kvh * gp + r : wrow(kvh, r)) * qp_ld, 1);
        continue;
      }
      float* qr = ws.q.data() + wrow(kvh, r) * d;
      load_row(src, qr, d);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) qr[i] *= qscale;
    }
  }
  std::fill(ws.acc.begin(), ws.acc.end(), 0.f);
  std::fill(ws.m.begin(), ws.m.end(), kNegInf);
  std::fill(ws.l.begin(), ws.l.end(), 0.f);
  std::fill(ws.scores.begin(), ws.scores.end(), 0.f);
  float* sc = ws.scores.data();
  const float* krows[kKeyBlock];
  // Register-tile path: the rows of the current kv head in the cache, and the rows to
  // prefetch meanwhile (the next kv head's of this block, or the first head's of the next).
  const T* kin[kKeyBlock];
  const T* vin[kKeyBlock];
  const T* kpf[kKeyBlock];
  const T* vpf[kKeyBlock];
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  // Cache row offsets (batch/page + row; the head is added per head) of this block and the next.
  int64_t koff[2][kKeyBlock], voff[2][kKeyBlock];
  auto fill_offsets = [&](int64_t k0, int64_t n, int slot) {
    if (p.block_table == nullptr) {
      for (int64_t j = 0; j < n; ++j) {
        koff[slot][j] = k_layout.row_offset(b, k0 + j);
        voff[slot][j] = v_layout.row_offset(b, k0 + j);
      }
      return;
    }
    // Paged: kv_cache_layout.h's row_offset for consecutive rows, stepping through the pages
    // instead of a 64-bit division (and a table read) per row and cache.
    int64_t page_idx = k0 / p.page_size, in_page = k0 % p.page_size;
    int64_t page = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (j == 0 || in_page == 0) {
        page = p.block_table[b * p.block_table_batch_stride + page_idx];
        page = page < 0 ? 0 : (page >= p.num_pages ? p.num_pages - 1 : page);
      }
      koff[slot][j] = page * k_layout.batch_stride + in_page * k_layout.row_stride;
      voff[slot][j] = page * v_layout.batch_stride + in_page * v_layout.row_stride;
      if (++in_page == p.page_size) {
        in_page = 0;
        ++page_idx;
      }
    }
  };
  if (begin < end) fill_offsets(begin, std::min(kKeyBlock, end - begin), 0);

  int slot = 0;
  for (int64_t k0 = begin; k0 < end; k0 += kKeyBlock, slot ^= 1) {
    const int64_t n = std::min(kKeyBlock, end - k0);
    const int64_t n_next = std::min(kKeyBlock, end - k0 - n);
    if (n_next > 0) fill_offsets(k0 + n, n_next, slot ^ 1);
    // GEMM path (many query rows): the block's K and V rows of every kv head converted
    // (16-bit) or copied (fp32) to fp32 staging buffers in memory order, for the GEMM.
    if (use_dp) {  // bf16 pairs: K by pairs of dims, V by pairs of the block's keys
      for (int64_t kvh = 0; kvh < nh; ++kvh) {
        uint32_t* kp = ws.kps.data() + kvh * pairs * kKeyBlock;
        uint32_t* vp = ws.vps.data() + kvh * (kKeyBlock / 2) * d;
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
          const uint16_t* rows16[16];
          const int64_t nr = std::min<int64_t>(16, n - j0);
          for (int64_t j = 0; j < nr; ++j)
            rows16[j] = reinterpret_cast<const uint16_t*>(kc + koff[slot][j0 + j] + kvh * p.k_head_stride);
          cpu::pack_dim_pairs_x16(rows16, nr, d, kp + j0, kKeyBlock);
        }
        for (int64_t j = 0; j < n; j += 2) {  // an odd block's last pair: the key after it is 0
          const uint16_t* lo = reinterpret_cast<const uint16_t*>(vc + voff[slot][j] + kvh * p.v_head_stride);
          const uint16_t* hi =
              j + 1 < n ? reinterpret_cast<const uint16_t*>(vc + voff[slot][j + 1] + kvh * p.v_head_stride) : nullptr;
          cpu::pack_row_pairs(lo, hi, d, vp + (j / 2) * d);
        }
      }
    } else if (use_gemm) {
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t kvh = 0; kvh < nh; ++kvh) {
          load_row(kc + koff[slot][j] + kvh * p.k_head_stride, ws.kst.data() + (kvh * kKeyBlock + j) * d, d);
          load_row(vc + voff[slot][j] + kvh * p.v_head_stride, ws.vst.data() + (kvh * kKeyBlock + j) * d, d);
        }
      }
    }
    for (int64_t u = 0; u < units; ++u) {
      const int64_t kvh = unit_head(u), w0 = wrow(kvh, 0);
      const bool packed = u < packed_units;  // kHeadTile heads, one query row each
      const int64_t unit_rows = packed ? kHeadTile : rows;
      const float* qf = ws.q.data() + w0 * d;
      float* acc = ws.acc.data() + w0 * d;
      float* m = ws.m.data() + w0;
      float* l = ws.l.data() + w0;
      if (use_dp) {
        cpu::dp_scores(rows, n, pairs, ws.qp.data() + kvh * gp * qp_ld, qp_ld, ws.kps.data() + kvh * pairs * kKeyBlock,
                       kKeyBlock, sc, kKeyBlock);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < n; ++j) sc[r * kKeyBlock + j] *= qscale;
      } else if (use_gemm) {
        for (int64_t j = 0; j < n; ++j) krows[j] = ws.kst.data() + (kvh * kKeyBlock + j) * d;
        float* kt = ws.kt.data();  // K^T of the block: (d, n), leading dim kKeyBlock
        for (int64_t j = 0; j < n; ++j)
          for (int64_t c = 0; c < d; ++c) kt[c * kKeyBlock + j] = krows[j][c];
        cpu::gemm_f32(rows, n, d, d, kKeyBlock, kKeyBlock, /*add_c=*/false, qf, kt, sc);
      } else {
        // Scores straight from the cache rows of this unit's heads, the next rows prefetched.
        const bool last = u + 1 == units;
        const int ps = last ? slot ^ 1 : slot;
        const int64_t pn = last ? n_next : n, ph = last ? 0 : unit_head(u + 1);
        for (int64_t j = 0; j < n; ++j) {
          kin[j] = kc + koff[slot][j] + kvh * p.k_head_stride;
          vin[j] = vc + voff[slot][j] + kvh * p.v_head_stride;
          const int64_t jj = std::min(j, pn - 1);
          kpf[j] = jj < 0 ? kin[j] : kc + koff[ps][jj] + ph * p.k_head_stride;
          vpf[j] = jj < 0 ? vin[j] : vc + voff[ps][jj] + ph * p.v_head_stride;
        }
        const auto* kin16 = reinterpret_cast<const uint16_t* const*>(kin);
        const auto* kpf16 = reinterpret_cast<const uint16_t* const*>(kpf);
        const uint32_t* qp = ws.qp.data() + w0 * qp_ld;
        if (tile_dp && packed) {
          qk_tile_dp<true>(qp, qp_ld, kin16, p.k_head_stride, n, d, qscale, sc, kpf16, row_bytes);
        } else if (tile_dp) {
          for (int64_t g0 = 0; g0 < gp; g0 += kHeadTile)
            qk_tile_dp<false>(qp + g0 * qp_ld, qp_ld, kin16, 0, n, d, qscale, sc + g0 * kKeyBlock,
                              g0 == 0 ? kpf16 : nullptr, row_bytes);
        } else if (packed) {
          qk_tile<true, T>(qf, kin, p.k_head_stride, n, d, sc, kpf, row_bytes);
        } else {
          for (int64_t g0 = 0; g0 < gp; g0 += kHeadTile)
            qk_tile<false, T>(qf + g0 * d, kin, 0, n, d, sc + g0 * kKeyBlock, g0 == 0 ? kpf : nullptr, row_bytes);
        }
      }
      // Online softmax once per block and row: keys outside the row's band masked, running
      // max, rescale of the running sum and output, probabilities in place of the scores
      // (0 past n, and for a row that has seen no visible key yet).
      for (int64_t r = 0; r < unit_rows; ++r) {
        float* s = sc + r * kKeyBlock;
        // Before the -inf fills below: the cap would turn a masked -inf into -softcap.
        if constexpr (kCap) cpu::softcap_row(s, n, p.softcap, 1.0f / kLog2e, kLog2e);
        for (int64_t j = n; j < kKeyBlock; ++j) s[j] = kNegInf;
        const int64_t qi = packed ? 0 : r / group;  // (a packed unit's rows are heads of one query)
        const int64_t lo = band.lo(qi), hi = band.hi(qi);
        if (k0 < lo || k0 + n - 1 > hi) {
          for (int64_t j = 0; j < n; ++j)
            if (k0 + j < lo || k0 + j > hi) s[j] = kNegInf;
        }
        const float m_new = std::max(m[r], block_max(s));
        if (m_new == kNegInf) {  // nothing visible yet: no probability mass, acc stays 0
          // ...unless visible scores are NaN (block_max skips NaNs): a NaN in q or in a key
          // the row sees makes the row NaN (l, sticky: l * alpha + sum stays NaN), as in
          // torch's math, instead of passing for a row that sees no key (0, lse -inf).
          // Only rows with nothing visible yet take this branch.
          for (int64_t j = 0; j < n; ++j)
            if (std::isnan(s[j])) l[r] = s[j];
          std::fill(s, s + kKeyBlock, 0.f);
          continue;
        }
        const float alpha = m[r] == kNegInf ? 0.f : std::exp2(m[r] - m_new);
        for (int64_t j = 0; j < kKeyBlock; j += kLanes) storev(s + j, cpu::vmath::exp2(loadv(s + j) - m_new));
        l[r] = l[r] * alpha + sum32(s);
        m[r] = m_new;
        if (alpha != 1.f) {
          float* a = acc + r * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] *= alpha;
        }
      }
      // P V: each V row is used once for all output rows.
      if (use_dp) {  // P rounded to bf16 pairs (P past n is 0, as is the V row after an odd n)
        const int64_t np = (n + 1) / 2;
        for (int64_t r = 0; r < rows; ++r)
          cpu::to_bf16_pairs(sc + r * kKeyBlock, np, ws.pp.data() + r * (kKeyBlock / 2));
        cpu::dp_pv(rows, d, np, ws.pp.data(), kKeyBlock / 2, ws.vps.data() + kvh * (kKeyBlock / 2) * d, d, acc, d);
      } else if (use_gemm) {  // the staged rows are contiguous: V block (n, d)
        cpu::gemm_f32(rows, d, n, kKeyBlock, d, d, /*add_c=*/true, sc, ws.vst.data() + kvh * kKeyBlock * d, acc);
      } else if (tile_dp) {  // P rounded to bf16 pairs, as on the GEMM pair path
        const int64_t np = (n + 1) / 2, tile_rows = packed ? kHeadTile : gp;
        const auto* vin16 = reinterpret_cast<const uint16_t* const*>(vin);
        const auto* vpf16 = reinterpret_cast<const uint16_t* const*>(vpf);
        uint32_t* pp = ws.pp.data();
        for (int64_t r = 0; r < tile_rows; ++r) {
          if (r < unit_rows) {
            cpu::to_bf16_pairs(sc + r * kKeyBlock, np, pp + r * (kKeyBlock / 2));
          } else {  // padding rows: no probability (their scores were never exponentiated)
            std::fill(pp + r * (kKeyBlock / 2), pp + (r + 1) * (kKeyBlock / 2), 0u);
          }
        }
        if (packed) {
          pv_tile_dp<true>(pp, kKeyBlock / 2, vin16, p.v_head_stride, n, d, acc, vpf16);
        } else {
          for (int64_t g0 = 0; g0 < gp; g0 += kHeadTile)
            pv_tile_dp<false>(pp + g0 * (kKeyBlock / 2), kKeyBlock / 2, vin16, 0, n, d, acc + g0 * d,
                              g0 == 0 ? vpf16 : nullptr);
        }
      } else if (packed) {
        pv_tile<true, T>(sc, vin, p.v_head_stride, n, d, acc, vpf);
      } else {
        for (int64_t g0 = 0; g0 < gp; g0 += kHeadTile)
          pv_tile<false, T>(sc + g0 * kKeyBlock, vin, 0, n, d, acc + g0 * d, g0 == 0 ? vpf : nullptr);
      }
    }
  }

  for (int64_t kvh = 0; kvh < nh; ++kvh) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t w = wrow(kvh, r);
      const float l = ws.l[w];
      // l = 0: no visible key (out 0, lse -inf); l = NaN: a NaN reached the row (all NaN).
      // (no visible key: set to 0, not scaled by 0, which would keep a 0 * inf NaN)
      const float inv = l > 0.f ? 1.f / l : (l == 0.f ? 0.f : l);
      float* a = ws.acc.data() + w * d;
      if (l == 0.f) {
        std::fill(a, a + d, 0.f);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) a[i] *= inv;
      }
      const int64_t head = (h0 + kvh) * group + r % group, qi = i0 + r / group;
      out_row(head, qi, a);
      lse_out(head, qi, l > 0.f ? (ws.m[w] + std::log2(l)) * kLn2 : (l == 0.f ? kNegInf : l));
    }
  }
}

template <typename T, bool kCap>
void decode_impl(const DecodeParams& p) {
  const int64_t group = p.h / p.h_k, d = p.d, splits = p.num_splits, sq = p.seqlen_q;
  const int64_t chunk = decode::cpu_query_chunk(group, p.h_k, d, sq);
  const int64_t chunks = (sq + chunk - 1) / chunk;
  // Few (batch, chunk, split) items (one sequence whose keys are too few to split: a few
  // queries through flash_attention's short-query route, a small decode) would leave threads
  // idle, as each item runs every kv head: then the kv heads are cut into slices too, about
  // two items per thread (B1 H32/8 D128, 4-16 queries over 64 keys, 2 threads: 1.3-1.5x the
  // tiled flash forward's time before, 0.8-1.0x after). Slices of whole kHeadTile units where MHA
  // decode packs that many heads into one tile. Unlike the splits this may follow the thread
  // count: no bit depends on which slice runs a head (decode_item). Not below ~2^17 QK^T
  // multiply-adds per slice: a smaller item costs about as much to hand to a thread as to run
  // (B1 H32/8 D128 decode over 4 keys: ~3 us lost when sliced; over 64 keys, 2 slices, and B1
  // H12/12 D64 with 9-16 queries over 64 keys gain).
  const int64_t items = p.b * chunks * splits, rows = std::min(chunk, sq) * group;
  const int64_t head_unit = rows == 1 ? kHeadTile : 1;
  const int64_t want_items = 2 * static_cast<int64_t>(at::get_num_threads());
  int64_t max_len = 0;  // the longest sequence's keys (not the capacity, as for the splits)
  for (int64_t b = 0; b < p.b; ++b)
    max_len = std::max<int64_t>(max_len, static_cast<int64_t>(p.cache_seqlens[b]) + p.seqlens_k_add);
  const int64_t split_keys = (std::min(max_len, p.seqlen_k_max) + splits - 1) / splits;
  const int64_t max_slices = std::max<int64_t>(1, rows * p.h_k * d * split_keys >> 17);
  int64_t slices = 1;
  if (items < want_items)
    slices = std::min({(want_items + items - 1) / items, (p.h_k + head_unit - 1) / head_unit, max_slices});
  const int64_t slice_heads =
      std::min(p.h_k, ((p.h_k + slices - 1) / slices + head_unit - 1) / head_unit * head_unit);
  slices = (p.h_k + slice_heads - 1) / slice_heads;
  at::parallel_for(0, items * slices, 1, [&](int64_t it0, int64_t it1) {
    Workspace ws(slice_heads, rows, d,
                 std::is_same<T, cpu::bf16_t>::value && cpu::has_dpbf16() && d >= cpu::kDpMinHeadDim);
    for (int64_t it_sliced = it0; it_sliced < it1; ++it_sliced) {
      const int64_t h0 = (it_sliced % slices) * slice_heads, nh = std::min(slice_heads, p.h_k - h0);
      const int64_t it = it_sliced / slices;
      const int64_t s = it % splits, c = (it / splits) % chunks, b = it / (splits * chunks);
      const int64_t i0 = c * chunk, nq = std::min(chunk, sq - i0);
      const int64_t len = std::min<int64_t>(
          std::max<int64_t>(static_cast<int64_t>(p.cache_seqlens[b]) + p.seqlens_k_add, 0), p.seqlen_k_max);
      const QueryBand band{len - sq + i0, p.window_left, p.window_right, len};
      // Keys any row of the chunk sees: [lo of its first row, hi of its last row] in [0, len).
      const int64_t kbeg = std::max<int64_t>(band.lo(0), 0);
      const int64_t kend = std::max(kbeg, band.hi(nq - 1) + 1);
      int64_t begin, end;
      decode::split_range(kend - kbeg, splits, s, kKeyBlock, &begin, &end);
      begin += kbeg;
      end += kbeg;
      if (splits == 1) {
        T* out = static_cast<T*>(p.out) + b * p.out_batch_stride;
        decode_item<T, kCap>(
            p, b, i0, nq, band, begin, end, h0, nh, ws,
            [&](int64_t h, int64_t qi, const float* row) {
              cpu::store_row(row, out + qi * p.out_row_stride + h * p.out_head_stride, d);
            },
            [&](int64_t h, int64_t qi, float lse) { p.lse[(b * p.h + h) * sq + qi] = lse; });
      } else {
        // Partials: out_partial (splits, b, h, seqlen_q, d), lse_partial (splits, b, h, seqlen_q).
        const int64_t row0 = (s * p.b + b) * p.h * sq;
        decode_item<T, kCap>(
            p, b, i0, nq, band, begin, end, h0, nh, ws,
            [&](int64_t h, int64_t qi, const float* row) {
              std::memcpy(p.out_partial + (row0 + h * sq + qi) * d, row, static_cast<size_t>(d) * sizeof(float));
            },
            [&](int64_t h, int64_t qi, float lse) { p.lse_partial[row0 + h * sq + qi] = lse; });
      }
    }
  });
  if (splits == 1) return;
  // Exact merge of the splits, in split order: lse = log sum_s exp(lse_s) and
  // out = sum_s exp(lse_s - lse) out_s. Row r = (b * h + head) * seqlen_q + qi.
  const int64_t total = p.b * p.h * sq;
  at::parallel_for(0, total, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> o(static_cast<size_t>(d));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t qi = r % sq, h = (r / sq) % p.h, b = r / (sq * p.h);
      float m = kNegInf;
      bool nan = false;  // a split whose row is NaN makes the row NaN (not skipped as empty)
      for (int64_t s = 0; s < splits; ++s) {
        const float ls = p.lse_partial[s * total + r];
        nan = nan || std::isnan(ls);
        m = std::max(m, ls);
      }
      std::fill(o.begin(), o.end(), nan ? std::numeric_limits<float>::quiet_NaN() : 0.f);
      float lse = nan ? std::numeric_limits<float>::quiet_NaN() : kNegInf;
      if (!nan && m != kNegInf) {
        float sum = 0.f;
        for (int64_t s = 0; s < splits; ++s) {
          const float ls = p.lse_partial[s * total + r];
          if (ls == kNegInf) continue;
          const float w = std::exp(ls - m);
          sum += w;
          const float* src = p.out_partial + (s * total + r) * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) o[i] += w * src[i];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) o[i] *= inv;
        lse = m + std::log(sum);
      }
      cpu::store_row(o.data(),
                     static_cast<T*>(p.out) + b * p.out_batch_stride + qi * p.out_row_stride + h * p.out_head_stride, d);
      p.lse[r] = lse;
    }
  });
}

size_t element_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace

int64_t decode_num_splits_cpu(int64_t b, int64_t h_k, int64_t max_keys) {
  // Enough (batch, split) items to keep any CPU's threads busy, but splits of at least 128
  // keys (4 blocks) of the longest sequence, so the partial writes and the merge stay small
  // next to the key work. Never of the machine or the thread count: the same split (and so
  // the same bits) everywhere. h_k does not matter: an item runs all kv heads (or, when the
  // items are fewer than the threads, a slice of them: decode_impl; the bits are the same).
  constexpr int64_t kTargetItems = 64, kMinKeysPerSplit = 128;
  (void)h_k;
  const int64_t base = std::max<int64_t>(1, b);
  const int64_t want = (kTargetItems + base - 1) / base;
  const int64_t cap = std::max<int64_t>(1, max_keys / kMinKeysPerSplit);
  return std::max<int64_t>(1, std::min({want, cap, decode::kMaxSplits}));
}

void cpu::decode_attention_kernel(const DecodeParams& params) {
  // Split partials (fp32 out and lse rows, splits x b x h x seqlen_q) from the scratch kept
  // between calls when the caller passes none: a fresh buffer of several MiB is first-touched
  // page by page every call, and with many query rows that cost more than the splits gain (2
  // threads, B2 x 4096 keys, Sq 32, 32 / 8 heads, bf16: 32 MB of partials, 37.4 ms at the
  // automatic 32 splits against 20.0 ms at 2, before this).
  DecodeParams p = params;
  cpu::ScratchBuffer partials;
  if (p.num_splits > 1 && p.out_partial == nullptr) {
    const int64_t rows = p.num_splits * p.b * p.h * p.seqlen_q;
    partials.allocate(static_cast<size_t>(rows * (p.d + 1)));
    p.out_partial = partials.get();
    p.lse_partial = p.out_partial + rows * p.d;
  }
  FASTATTN_CPU_DTYPE_SWITCH(p.dtype, T, [&] {
    BOOL_SWITCH(p.softcap > 0.0f, kCap, [&] { decode_impl<T, kCap>(p); });
  });
}

void cpu::append_kv_kernel(const AppendKvParams& p) {
  const size_t row_bytes = static_cast<size_t>(p.d) * element_size(p.dtype);
  const int64_t es = static_cast<int64_t>(element_size(p.dtype));
  const int64_t rows = p.b * p.seqlen_new * p.h_k;
  const KvLayout k_layout{p.k_cache_batch_stride, p.k_cache_row_stride, p.block_table, p.block_table_batch_stride,
                          p.page_size, p.num_pages};
  const KvLayout v_layout{p.v_cache_batch_stride, p.v_cache_row_stride, p.block_table, p.block_table_batch_stride,
                          p.page_size, p.num_pages};
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t hk = r % p.h_k;
      const int64_t i = (r / p.h_k) % p.seqlen_new;
      const int64_t b = r / (p.h_k * p.seqlen_new);
      const int64_t pos = static_cast<int64_t>(p.cache_seqlens[b]) + i;
      if (pos < 0 || pos >= p.seqlen_k_max) continue;  // the binding has rejected these
      char* kd = static_cast<char*>(p.k_cache) + es * (k_layout.row_offset(b, pos) + hk * p.k_cache_head_stride);
      char* vd = static_cast<char*>(p.v_cache) + es * (v_layout.row_offset(b, pos) + hk * p.v_cache_head_stride);
      const char* ks = static_cast<const char*>(p.k) + es * (b * p.k_batch_stride + i * p.k_row_stride + hk * p.k_head_stride);
      const char* vs = static_cast<const char*>(p.v) + es * (b * p.v_batch_stride + i * p.v_row_stride + hk * p.v_head_stride);
      std::memcpy(kd, ks, row_bytes);
      std::memcpy(vd, vs, row_bytes);
    }
  });
}

}  // namespace fastattn
