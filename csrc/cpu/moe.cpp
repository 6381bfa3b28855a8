// moe.cpp — the routed SwiGLU experts of a mixture-of-experts layer, with their top-k
// combine, on the CPU (MoeParams in params.h; used by fastattn.models.moe for inference).
//
// What it computes: every (token, choice) slot is assigned to its expert; for each expert e
// with slots, gate/up = x W13_e^T for those slots' token rows, act = silu(gate) * up stored in
// the model's dtype, y = act W2_e^T, and out[token] += routing_weight * y (fp32, experts in
// ascending order). All products accumulate in fp32.
//
// Why it is fast: a decode step gives each selected expert one to a few token rows, so the
// work is a handful of matrix-vector products over weights far larger than the caches: it
// is bound by reading the weights from memory. torch's small-M GEMM reads them at a fraction
// of the machine's bandwidth (and the Python loop around it adds its own cost). Here each
// weight row is read from memory exactly once per call and applied to all of its expert's
// token rows while it is in L1 (register blocks of up to 4 token rows x 4 weight rows, fp32
// FMAs over 8 lanes, 16-bit weights widened in registers as they are loaded, never copied),
// with software prefetch a fixed distance ahead in every weight row being read. The token
// rows are converted to fp32 once, into a small buffer that stays in cache.
//
// Fusion and threading: gate row i and up row i of an expert are multiplied together, so
// silu(gate) * up is formed right after the dots, in cache, by the thread that owns column
// i; nothing of width 2 * inter is written out. Two parallel passes per call (ATen's pool):
// the first splits the inter columns of every expert across threads (each thread streams
// its own contiguous rows of every W13_e), the second splits the hidden columns of the
// output (each thread streams its rows of every W2_e, adds into its own columns of out, so
// no two threads write one cache line and no atomics are needed). Every output element is
// computed by one thread in a fixed order, so the bits do not depend on the thread count.
//
// bf16 on CPUs with AVX512-BF16 (the avx512 tier library, checked at run time): widening each
// weight in registers costs ~5 instructions per 8 weights, which made bf16 compute-bound at
// about half the memory bandwidth. There the token rows are kept in bf16 (they are bf16
// inputs, exact) and so is the activation (it is rounded to bf16 anyway), and the dots run
// on vdpbf16ps: one 64-byte weight load and one instruction per 32 weights and token row,
// products exact in fp32, sums in fp32 (pairwise within the instruction; its denormal inputs
// and results flush to zero, values below 1.2e-38 that no trained weight has).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__FMA__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu_math.h"
#include "cpu_types.h"
#include "fastattn/api.h"
#include "fastattn/cpu_dispatch.h"
#include "fastattn/static_switch.h"

namespace fastattn {
namespace {

// 8 fp32 lanes whatever the tier: one AVX register on the avx2 / avx512 tiers (the kernel is
// bound by memory, not by vector width), two SSE registers on the baseline.
typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));

// How far ahead of the current position each 16-bit weight row is prefetched, in bytes. fp32
// rows are not prefetched by software: the hardware prefetchers keep up with them (measured on
// the 2-core AVX2 EPYC, one thread: fp32 ~19 GB/s with or without; bf16 12-13 GB/s without,
// 15-17 GB/s at 2 KiB ahead, less at 0.5-1 KiB or 4-8 KiB).
template <typename W>
constexpr int64_t kPrefetchBytes = sizeof(W) == 4 ? 0 : 2048;
// Columns a thread takes at a time: 16 floats = one cache line of the fp32 buffers.
constexpr int64_t kColumnGroup = 16;
// Token rows per register block.
constexpr int kMaxRows = 4;

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline v8f load8(const cpu::bf16_t* p) {
#if defined(__AVX2__)
  // One widening load and a shift (GCC lowers the generic form below to two half-width
  // widenings and an insert).
  const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  v8f f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#else
  v8h h;
  std::memcpy(&h, p, sizeof(h));
  const v8u u = __builtin_convertvector(h, v8u) << 16;  // bf16 is the top half of an fp32
  v8f f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

inline v8f load8(const cpu::half_t* p) {
#if defined(__F16C__)
  const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  v8f f;
  std::memcpy(&f, &v, sizeof(f));
  return f;
#else
  float t[8];
  for (int i = 0; i < 8; ++i) t[i] = cpu::half_to_float(p[i].bits);
  return load8(t);
#endif
}

// acc + a * b, fused where the tier has FMA.
inline v8f fma8(v8f a, v8f b, v8f acc) {
#if defined(__FMA__)
  return _mm256_fmadd_ps(a, b, acc);
#else
  return acc + a * b;
#endif
}

inline float hsum(v8f v) {
  float t[8];
  std::memcpy(t, &v, sizeof(t));
  return ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
}

// out[n * R + r] = dot(w[n][0:K], x[r][0:K]) for NW weight rows and R fp32 token rows. The
// loop steps one cache line of weights (16 fp32 / 32 bf16 values) per row at a time (16-bit
// rows prefetched kPrefetchBytes ahead); with few accumulators (NW * R <= 4) the line's
// 8-lane halves go to two sets of accumulators so the FMA latency is hidden.
template <typename W, int NW, int R>
void dot_block(const W* const* w, const float* const* x, int64_t K, float* out) {
  constexpr int64_t kLine = 64 / sizeof(W);
  constexpr int kSub = static_cast<int>(kLine / 8);
  constexpr int kSets = NW * R <= 4 ? 2 : 1;
  constexpr int64_t kAhead = kPrefetchBytes<W> / static_cast<int64_t>(sizeof(W));
  v8f acc[kSets][NW][R];
  for (int s = 0; s < kSets; ++s)
    for (int n = 0; n < NW; ++n)
      for (int r = 0; r < R; ++r) acc[s][n][r] = v8f{};
  int64_t k = 0;
  for (; k + kLine <= K; k += kLine) {
    if constexpr (kAhead > 0)
      for (int n = 0; n < NW; ++n) __builtin_prefetch(w[n] + k + kAhead, 0, 3);
    for (int s = 0; s < kSub; ++s) {
      const int64_t kk = k + 8 * s;
      v8f xv[R];
      for (int r = 0; r < R; ++r) xv[r] = load8(x[r] + kk);
      for (int n = 0; n < NW; ++n) {
        const v8f wv = load8(w[n] + kk);
        for (int r = 0; r < R; ++r) acc[s % kSets][n][r] = fma8(wv, xv[r], acc[s % kSets][n][r]);
      }
    }
  }
  for (; k + 8 <= K; k += 8) {
    v8f xv[R];
    for (int r = 0; r < R; ++r) xv[r] = load8(x[r] + k);
    for (int n = 0; n < NW; ++n) {
      const v8f wv = load8(w[n] + k);
      for (int r = 0; r < R; ++r) acc[0][n][r] = fma8(wv, xv[r], acc[0][n][r]);
    }
  }
  for (int n = 0; n < NW; ++n) {
    for (int r = 0; r < R; ++r) {
      v8f a = acc[0][n][r];
      if (kSets == 2) a += acc[kSets - 1][n][r];
      float sum = hsum(a);
      for (int64_t kt = k; kt < K; ++kt) sum += cpu::to_float(w[n][kt]) * x[r][kt];
      out[n * R + r] = sum;
    }
  }
}

// res[q][r] = dot(w[q], x[r]) for nw <= 4 weight rows and R token rows: blocks of 4 weight
// rows for one or two token rows, of 2 for three or four (at most 8 accumulators + the
// token vectors in 16 registers), single rows for the remainder.
template <class Dot, typename W, int R>
void rows_dots(const W* const* w, int nw, const typename Dot::X* const* x, int64_t K, float (*res)[kMaxRows]) {
  float tmp[4 * R];
  int q = 0;
  if constexpr (R <= 2) {
    if (nw == 4) {
      Dot::template block<4, R>(w, x, K, tmp);
      for (int n = 0; n < 4; ++n)
        for (int r = 0; r < R; ++r) res[n][r] = tmp[n * R + r];
      q = 4;
    }
  }
  for (; q + 2 <= nw; q += 2) {
    Dot::template block<2, R>(w + q, x, K, tmp);
    for (int n = 0; n < 2; ++n)
      for (int r = 0; r < R; ++r) res[q + n][r] = tmp[n * R + r];
  }
  if (q < nw) {
    Dot::template block<1, R>(w + q, x, K, tmp);
    for (int r = 0; r < R; ++r) res[q][r] = tmp[r];
  }
}

#if defined(FASTATTN_HAVE_DPBF16)
// bf16 dots on vdpbf16ps (AVX512-BF16; cpu_types.h: avx512 tier only, checked at run time).
namespace dpbf16 {

// acc[n][r] += w[n][k:k+32] . x[r][k:k+32] (16 lanes, each a pair of products); the masked
// form reads only the first bits of the 32 values (tails: nothing past a row is touched).
template <int NW, int R, bool kMasked>
FASTATTN_DPBF16 __attribute__((always_inline)) inline void dp_step(__m512 (&acc)[NW][R], const uint16_t* const* w,
                                                                   const uint16_t* const* x, int64_t k,
                                                                   __mmask32 mask) {
  __m512i xv[R];
  for (int r = 0; r < R; ++r)
    xv[r] = kMasked ? _mm512_maskz_loadu_epi16(mask, x[r] + k) : _mm512_loadu_si512(x[r] + k);
  for (int n = 0; n < NW; ++n) {
    const __m512i wv = kMasked ? _mm512_maskz_loadu_epi16(mask, w[n] + k) : _mm512_loadu_si512(w[n] + k);
    for (int r = 0; r < R; ++r) acc[n][r] = _mm512_dpbf16_ps(acc[n][r], (__m512bh)wv, (__m512bh)xv[r]);
  }
}

// out[n * R + r] = dot(w[n][0:K], x[r][0:K]) for NW bf16 weight rows and R bf16 token rows:
// one cache line (32 values) of every weight row per step, prefetched kPrefetchBytes ahead;
// with few accumulators (NW * R <= 4) alternate lines go to two sets (latency hiding).
template <int NW, int R>
FASTATTN_DPBF16 void dot_block(const uint16_t* const* w, const uint16_t* const* x, int64_t K, float* out) {
  constexpr bool kTwoSets = NW * R <= 4;
  constexpr int64_t kAhead = kPrefetchBytes<uint16_t> / 2;
  __m512 a0[NW][R], a1[NW][R];
  for (int n = 0; n < NW; ++n)
    for (int r = 0; r < R; ++r) a0[n][r] = a1[n][r] = _mm512_setzero_ps();
  int64_t k = 0;
  if constexpr (kTwoSets) {
    for (; k + 64 <= K; k += 64) {
      for (int n = 0; n < NW; ++n) {
        __builtin_prefetch(w[n] + k + kAhead, 0, 3);
        __builtin_prefetch(w[n] + k + kAhead + 32, 0, 3);
      }
      dp_step<NW, R, false>(a0, w, x, k, 0);
      dp_step<NW, R, false>(a1, w, x, k + 32, 0);
    }
  }
  for (; k + 32 <= K; k += 32) {
    for (int n = 0; n < NW; ++n) __builtin_prefetch(w[n] + k + kAhead, 0, 3);
    dp_step<NW, R, false>(a0, w, x, k, 0);
  }
  if (k < K) dp_step<NW, R, true>(a1, w, x, k, static_cast<__mmask32>((1u << (K - k)) - 1u));
  // (through memory: GCC 12's _mm512_reduce_add_ps trips -Wuninitialized in its own header)
  alignas(64) float lanes[16];
  for (int n = 0; n < NW; ++n)
    for (int r = 0; r < R; ++r) {
      _mm512_store_ps(lanes, _mm512_add_ps(a0[n][r], a1[n][r]));
      float sum = 0.0f;
      for (int l = 0; l < 8; ++l) sum += lanes[l] + lanes[l + 8];
      out[n * R + r] = sum;
    }
}
}  // namespace dpbf16
#endif

// The dot products of one call, by how token and activation rows are held: Widen keeps them
// in fp32 and widens 16-bit weights in registers (every dtype, every tier); DpBf16 keeps them
// in bf16 for vdpbf16ps (bf16 weights, AVX512-BF16 only).
template <typename T>
struct Widen {
  using X = float;
  static constexpr int64_t kRowPad = kColumnGroup;  // 16 floats: rows start on cache lines
  template <int NW, int R>
  static void block(const T* const* w, const X* const* x, int64_t K, float* out) {
    dot_block<T, NW, R>(w, x, K, out);
  }
};
#if defined(FASTATTN_HAVE_DPBF16)
struct DpBf16 {
  using X = uint16_t;
  static constexpr int64_t kRowPad = 32;  // 32 bf16: one cache line
  template <int NW, int R>
  static void block(const cpu::bf16_t* const* w, const X* const* x, int64_t K, float* out) {
    dpbf16::dot_block<NW, R>(reinterpret_cast<const uint16_t* const*>(w), x, K, out);
  }
};
#endif

template <class Dot, typename W>
void rows_dots_any(const W* const* w, int nw, const typename Dot::X* const* x, int rows, int64_t K,
                   float (*res)[kMaxRows]) {
  switch (rows) {
    case 1: rows_dots<Dot, W, 1>(w, nw, x, K, res); break;
    case 2: rows_dots<Dot, W, 2>(w, nw, x, K, res); break;
    case 3: rows_dots<Dot, W, 3>(w, nw, x, K, res); break;
    default: rows_dots<Dot, W, 4>(w, nw, x, K, res); break;
  }
}

// dst[i] = T(silu(g[i]) * u[i]) widened back to fp32 (rounding only, a no-op for fp32);
// silu(g) = g / (1 + e^-g) with cpu_math.h's exp2.
template <typename T>
void silu_mul_round(float* g, const float* u, int64_t n) {
  using namespace cpu::vmath;
  constexpr float kLog2e = 1.4426950408889634f;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf gv = load(g + i);
    store(g + i, gv * load(u + i) / (splat(1.0f) + exp2(gv * -kLog2e)));
  }
  if (i < n) {  // the tail through one padded vector
    float gt[kLanes] = {}, ut[kLanes] = {};
    std::memcpy(gt, g + i, static_cast<size_t>(n - i) * sizeof(float));
    std::memcpy(ut, u + i, static_cast<size_t>(n - i) * sizeof(float));
    const vf gv = load(gt);
    store(gt, gv * load(ut) / (splat(1.0f) + exp2(gv * -kLog2e)));
    std::memcpy(g + i, gt, static_cast<size_t>(n - i) * sizeof(float));
  }
  if constexpr (std::is_same<T, cpu::bf16_t>::value) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] = cpu::bf16_to_float(cpu::float_to_bf16(g[j]));
  } else if constexpr (std::is_same<T, cpu::half_t>::value) {
    for (int64_t j = 0; j < n; ++j) g[j] = cpu::half_to_float(cpu::float_to_half(g[j]));
  }
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// A 64-byte aligned scratch buffer of n elements.
template <typename E>
std::unique_ptr<E, FreeDeleter> scratch(int64_t n) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(E) + 63) & ~size_t(63);
  return std::unique_ptr<E, FreeDeleter>(static_cast<E*>(std::aligned_alloc(64, bytes)));
}

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// A token row into the dot products' form, zero padded from n to `padded` values.
template <typename T>
void load_x(const T* src, float* dst, int64_t n, int64_t padded) {
  cpu::load_row(src, dst, n);
  std::fill(dst + n, dst + padded, 0.0f);
}
inline void load_x(const cpu::bf16_t* src, uint16_t* dst, int64_t n, int64_t padded) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(uint16_t));
  std::fill(dst + n, dst + padded, uint16_t{0});
}

template <typename T, class Dot>
void moe_impl(const MoeParams& p) {
  using X = typename Dot::X;
  constexpr bool kPackedAct = !std::is_same<X, float>::value;  // the activation kept as bf16 bits
  const int64_t N = p.n_tokens, k = p.top_k, E = p.num_experts, H = p.hidden, I = p.inter;
  const int64_t Hp = round_up(std::max<int64_t>(H, 1), Dot::kRowPad);
  const int64_t Ip = round_up(std::max<int64_t>(I, 1), kColumnGroup);
  const int64_t Ia = kPackedAct ? round_up(std::max<int64_t>(I, 1), Dot::kRowPad) : Ip;

  // Slots grouped by expert (a counting sort, token order kept within an expert).
  std::vector<int64_t> begin(static_cast<size_t>(E) + 1, 0);
  for (int64_t t = 0; t < N; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = p.expert_ids[t * p.expert_ids_row_stride + j];
      if (e >= 0 && e < E) ++begin[static_cast<size_t>(e) + 1];
    }
  for (int64_t e = 0; e < E; ++e) begin[e + 1] += begin[e];
  const int64_t used = begin[E];
  std::vector<int64_t> token(static_cast<size_t>(std::max<int64_t>(used, 1)));
  std::vector<float> weight(static_cast<size_t>(std::max<int64_t>(used, 1)));
  {
    std::vector<int64_t> next(begin.begin(), begin.end() - 1);
    for (int64_t t = 0; t < N; ++t)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = p.expert_ids[t * p.expert_ids_row_stride + j];
        if (e < 0 || e >= E) continue;
        const int64_t s = next[e]++;
        token[s] = t;
        weight[s] = p.routing_weights[t * p.routing_weights_row_stride + j];
      }
  }

  // The slots' token rows (zero padded to Hp), gate (then act) and up per slot in fp32, and
  // with packed activations the act rows in bf16 (zero padded to Ia).
  auto xbuf = scratch<X>(used * Hp);
  auto gbuf = scratch<float>(used * Ip);
  auto ubuf = scratch<float>(used * Ip);
  auto abuf = scratch<X>(kPackedAct ? used * Ia : 0);
  X* xs = xbuf.get();
  float* gs = gbuf.get();
  float* us = ubuf.get();
  const T* x = static_cast<const T*>(p.x);
  at::parallel_for(0, used, std::max<int64_t>(1, 65536 / Hp), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      load_x(x + token[s] * p.x_row_stride, xs + s * Hp, H, Hp);
      if constexpr (kPackedAct) std::fill(abuf.get() + s * Ia + I, abuf.get() + (s + 1) * Ia, X{0});
    }
  });
  // What pass 2 multiplies: the act rows, fp32 in gs or bf16 in abuf.
  const X* acts;
  if constexpr (kPackedAct) acts = abuf.get();
  else acts = gs;

  const T* w13 = static_cast<const T*>(p.w13);
  const T* w2 = static_cast<const T*>(p.w2);

  // Pass 1: act[s][i] = T(silu(x_s . G_e[i]) * (x_s . U_e[i])), columns i split across threads.
  const int64_t col_groups = (I + kColumnGroup - 1) / kColumnGroup;
  at::parallel_for(0, col_groups, 1, [&](int64_t g0, int64_t g1) {
    const int64_t i0 = g0 * kColumnGroup, i1 = std::min(I, g1 * kColumnGroup);
    float res[4][kMaxRows];
    for (int64_t e = 0; e < E; ++e) {
      const int64_t sb = begin[e], se = begin[e + 1];
      if (sb == se) continue;
      const T* we = w13 + e * p.w13_expert_stride;
      for (int64_t i = i0; i < i1; i += 2) {
        const int pairs = static_cast<int>(std::min<int64_t>(2, i1 - i));
        const T* rows[4];
        for (int q = 0; q < pairs; ++q) {
          rows[2 * q] = we + (i + q) * p.w13_row_stride;            // gate row i + q
          rows[2 * q + 1] = we + (I + i + q) * p.w13_row_stride;    // up row i + q
        }
        for (int64_t s = sb; s < se; s += kMaxRows) {
          const int nr = static_cast<int>(std::min<int64_t>(kMaxRows, se - s));
          const X* xr[kMaxRows];
          for (int r = 0; r < nr; ++r) xr[r] = xs + (s + r) * Hp;
          rows_dots_any<Dot>(rows, 2 * pairs, xr, nr, H, res);
          for (int q = 0; q < pairs; ++q)
            for (int r = 0; r < nr; ++r) {
              gs[(s + r) * Ip + i + q] = res[2 * q][r];
              us[(s + r) * Ip + i + q] = res[2 * q + 1][r];
            }
        }
      }
      for (int64_t s = sb; s < se; ++s) {
        silu_mul_round<T>(gs + s * Ip + i0, us + s * Ip + i0, i1 - i0);
        if constexpr (kPackedAct)  // exact: the values are bf16 already, these are their bits
          for (int64_t i = i0; i < i1; ++i) abuf.get()[s * Ia + i] = cpu::float_to_bf16(gs[s * Ip + i]);
      }
    }
  });

  // Pass 2: out[t][j] = sum over t's slots s of weight_s * (act_s . W2_e[j]), columns j of
  // out split across threads.
  const int64_t act_stride = kPackedAct ? Ia : Ip;
  const int64_t out_groups = (H + kColumnGroup - 1) / kColumnGroup;
  at::parallel_for(0, out_groups, 1, [&](int64_t g0, int64_t g1) {
    const int64_t j0 = g0 * kColumnGroup, j1 = std::min(H, g1 * kColumnGroup);
    for (int64_t t = 0; t < N; ++t) std::fill(p.out + t * p.out_row_stride + j0, p.out + t * p.out_row_stride + j1, 0.0f);
    float res[4][kMaxRows];
    for (int64_t e = 0; e < E; ++e) {
      const int64_t sb = begin[e], se = begin[e + 1];
      if (sb == se) continue;
      const T* we = w2 + e * p.w2_expert_stride;
      for (int64_t j = j0; j < j1; j += 4) {
        const int nw = static_cast<int>(std::min<int64_t>(4, j1 - j));
        const T* rows[4];
        for (int q = 0; q < nw; ++q) rows[q] = we + (j + q) * p.w2_row_stride;
        for (int64_t s = sb; s < se; s += kMaxRows) {
          const int nr = static_cast<int>(std::min<int64_t>(kMaxRows, se - s));
          const X* ar[kMaxRows];
          for (int r = 0; r < nr; ++r) ar[r] = acts + (s + r) * act_stride;
          rows_dots_any<Dot>(rows, nw, ar, nr, I, res);
          for (int r = 0; r < nr; ++r) {
            float* o = p.out + token[s + r] * p.out_row_stride + j;
            const float wt = weight[s + r];
            for (int q = 0; q < nw; ++q) o[q] += wt * res[q][r];
          }
        }
      }
    }
  });
}

template <typename T>
void moe_dispatch(const MoeParams& p) {
#if defined(FASTATTN_HAVE_DPBF16)
  if constexpr (std::is_same<T, cpu::bf16_t>::value) {
    if (cpu::has_dpbf16()) return moe_impl<T, DpBf16>(p);
  }
#endif
  moe_impl<T, Widen<T>>(p);
}

}  // namespace

void cpu::moe_experts_kernel(const MoeParams& params) {
  if (params.n_tokens <= 0 || params.hidden <= 0) return;
  FASTATTN_CPU_DTYPE_SWITCH(params.dtype, T, [&] { moe_dispatch<T>(params); });
}

}  // namespace fastattn
