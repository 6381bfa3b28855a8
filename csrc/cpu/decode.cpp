// decode.cpp — grouped-KV decode attention over a KV cache, and the in-place cache append,
// on the CPU.
//
// What it computes: for every sequence b and query head h (one query token each),
//   out[b, h] = softmax(scale * q[b, h] . K[b, :len_b, h / G]) V[b, :len_b, h / G]
// with G = h / h_k query heads per kv head and len_b = cache_seqlens[b]; lse[b, h] is the
// natural-log sum of the exponentiated scores (-inf, with out = 0, when len_b == 0).
// append_kv copies new rows into the caches at rows cache_seqlens[b] + i.
//
// Why it is fast: decode is bound by reading the cache, so every K/V row is read from memory
// exactly once per kv head and used by all G query heads of its group. Work is split over
// ATen's thread pool by (batch, kv head, split): each item walks its keys in blocks of
// kKeyBlock rows; a block of K (converted to fp32 for 16-bit caches, so it sits in L1) is
// dotted with the G pre-scaled query rows (vectorised over the head dim), an online softmax
// updates each head's running max and sum once per block, and each V row is converted once
// and accumulated into all G fp32 output rows. Split-KV items write a normalised partial
// output and its lse; a second pass merges them in split order, so the result does not
// depend on the thread count. The number of splits chosen for num_splits = 0 depends on
// the shapes only, for the same reason.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_types.h"
#include "fastattn/api.h"
#include "fastattn/decode_split.h"
#include "fastattn/static_switch.h"

namespace fastattn {
namespace {

using cpu::load_row;

// Keys per block: a block of fp32 K rows (32 x 128 x 4 = 16 KiB at D = 128) stays in L1
// while all G heads are dotted with it, and the online softmax is rescaled once per block.
constexpr int64_t kKeyBlock = 32;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Per-thread buffers of one work item.
struct Workspace {
  std::vector<float> q, k, v, scores, acc, m, l;
  Workspace(int64_t g, int64_t d)
      : q(static_cast<size_t>(g * d)),
        k(static_cast<size_t>(kKeyBlock * d)),
        v(static_cast<size_t>(d)),
        scores(static_cast<size_t>(g * kKeyBlock)),
        acc(static_cast<size_t>(g * d)),
        m(static_cast<size_t>(g)),
        l(static_cast<size_t>(g)) {}
};

// One (batch b, kv head kvh, split s) work item: keys [begin, end) of sequence b against the
// G query heads of kv head kvh. Writes the normalised output and lse of this split to
// (out_row(g), lse_out(g)) for each group head g.
template <typename T, typename OutRow, typename LseOut>
void decode_item(const DecodeParams& p, int64_t b, int64_t kvh, int64_t begin, int64_t end,
                 Workspace& ws, OutRow out_row, LseOut lse_out) {
  const int64_t d = p.d, group = p.h / p.h_k;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + kvh * group * p.q_head_stride;
  const T* kc = static_cast<const T*>(p.k_cache) + b * p.k_batch_stride + kvh * p.k_head_stride;
  const T* vc = static_cast<const T*>(p.v_cache) + b * p.v_batch_stride + kvh * p.v_head_stride;

  float* qf = ws.q.data();
  for (int64_t g = 0; g < group; ++g) {
    float* qg = qf + g * d;
    load_row(q + g * p.q_head_stride, qg, d);
    const float scale = p.softmax_scale;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) qg[i] *= scale;
  }
  std::fill(ws.acc.begin(), ws.acc.end(), 0.f);
  std::fill(ws.m.begin(), ws.m.end(), kNegInf);
  std::fill(ws.l.begin(), ws.l.end(), 0.f);
  float* acc = ws.acc.data();
  float* sc = ws.scores.data();

  for (int64_t k0 = begin; k0 < end; k0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, end - k0);
    // Scores of the block: each K row is read from the cache once (converted once for
    // 16-bit caches) and dotted with all G query rows while it is in L1.
    for (int64_t j = 0; j < n; ++j) {
      const T* src = kc + (k0 + j) * p.k_row_stride;
      const float* krow;
      if constexpr (std::is_same<T, float>::value) {
        krow = src;
      } else {
        load_row(src, ws.k.data() + j * d, d);
        krow = ws.k.data() + j * d;
      }
      for (int64_t g = 0; g < group; ++g) sc[g * kKeyBlock + j] = dot(qf + g * d, krow, d);
    }
    // Online softmax, once per block and head: new running max, rescale of the running
    // sum and output, probabilities in place of the scores.
    for (int64_t g = 0; g < group; ++g) {
      float* s = sc + g * kKeyBlock;
      float bmax = kNegInf;
      for (int64_t j = 0; j < n; ++j) bmax = std::max(bmax, s[j]);
      const float m_new = std::max(ws.m[g], bmax);
      const float alpha = ws.m[g] == kNegInf ? 0.f : std::exp(ws.m[g] - m_new);
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        s[j] = std::exp(s[j] - m_new);
        sum += s[j];
      }
      ws.l[g] = ws.l[g] * alpha + sum;
      ws.m[g] = m_new;
      if (alpha != 1.f) {
        float* a = acc + g * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) a[i] *= alpha;
      }
    }
    // P V: each V row is read once and accumulated into all G output rows.
    for (int64_t j = 0; j < n; ++j) {
      const T* src = vc + (k0 + j) * p.v_row_stride;
      const float* vrow;
      if constexpr (std::is_same<T, float>::value) {
        vrow = src;
      } else {
        load_row(src, ws.v.data(), d);
        vrow = ws.v.data();
      }
      for (int64_t g = 0; g < group; ++g) {
        const float pj = sc[g * kKeyBlock + j];
        float* a = acc + g * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) a[i] += pj * vrow[i];
      }
    }
  }

  for (int64_t g = 0; g < group; ++g) {
    const float l = ws.l[g];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float* a = acc + g * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) a[i] *= inv;
    out_row(g, a);
    lse_out(g, l > 0.f ? ws.m[g] + std::log(l) : kNegInf);
  }
}

template <typename T>
void decode_impl(const DecodeParams& p) {
  const int64_t group = p.h / p.h_k, d = p.d, splits = p.num_splits;
  const int64_t items = p.b * p.h_k * splits;
  at::parallel_for(0, items, 1, [&](int64_t it0, int64_t it1) {
    Workspace ws(group, d);
    for (int64_t it = it0; it < it1; ++it) {
      const int64_t s = it % splits;
      const int64_t kvh = (it / splits) % p.h_k;
      const int64_t b = it / (splits * p.h_k);
      const int64_t len = std::min<int64_t>(std::max<int32_t>(p.cache_seqlens[b], 0), p.seqlen_k_max);
      int64_t begin, end;
      decode::split_range(len, splits, s, kKeyBlock, &begin, &end);
      const int64_t h0 = kvh * group;
      if (splits == 1) {
        T* out = static_cast<T*>(p.out) + b * p.out_batch_stride;
        decode_item<T>(
            p, b, kvh, begin, end, ws,
            [&](int64_t g, const float* row) { cpu::store_row(row, out + (h0 + g) * p.out_head_stride, d); },
            [&](int64_t g, float lse) { p.lse[b * p.h + h0 + g] = lse; });
      } else {
        // Partials: out_partial (splits, b, h, d), lse_partial (splits, b, h).
        const int64_t row0 = (s * p.b + b) * p.h + h0;
        decode_item<T>(
            p, b, kvh, begin, end, ws,
            [&](int64_t g, const float* row) {
              std::memcpy(p.out_partial + (row0 + g) * d, row, static_cast<size_t>(d) * sizeof(float));
            },
            [&](int64_t g, float lse) { p.lse_partial[row0 + g] = lse; });
      }
    }
  });
  if (splits == 1) return;

  // Exact merge of the splits, in split order: lse = log sum_s exp(lse_s) and
  // out = sum_s exp(lse_s - lse) out_s.
  at::parallel_for(0, p.b * p.h, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> o(static_cast<size_t>(d));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / p.h, h = r % p.h;
      float m = kNegInf;
      for (int64_t s = 0; s < splits; ++s) m = std::max(m, p.lse_partial[s * p.b * p.h + r]);
      std::fill(o.begin(), o.end(), 0.f);
      float lse = kNegInf;
      if (m != kNegInf) {
        float sum = 0.f;
        for (int64_t s = 0; s < splits; ++s) {
          const float ls = p.lse_partial[s * p.b * p.h + r];
          if (ls == kNegInf) continue;
          const float w = std::exp(ls - m);
          sum += w;
          const float* src = p.out_partial + (s * p.b * p.h + r) * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) o[i] += w * src[i];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) o[i] *= inv;
        lse = m + std::log(sum);
      }
      cpu::store_row(o.data(), static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride, d);
      p.lse[r] = lse;
    }
  });
}

size_t element_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace

int64_t decode_num_splits_cpu(int64_t b, int64_t h_k, int64_t seqlen_k_max) {
  // Enough (batch, kv head, split) items to keep any CPU's threads busy, but splits of at
  // least 512 keys so the merge stays negligible. Shapes only: the same split (and so the
  // same bits) on any machine and thread count.
  constexpr int64_t kTargetItems = 128, kMinKeysPerSplit = 512;
  const int64_t base = std::max<int64_t>(1, b * h_k);
  const int64_t want = (kTargetItems + base - 1) / base;
  const int64_t cap = std::max<int64_t>(1, seqlen_k_max / kMinKeysPerSplit);
  return std::max<int64_t>(1, std::min({want, cap, decode::kMaxSplits}));
}

void decode_attention_cpu(const DecodeParams& params) {
  FASTATTN_CPU_DTYPE_SWITCH(params.dtype, T, [&] { decode_impl<T>(params); });
}

void append_kv_cpu(const AppendKvParams& p) {
  const size_t row_bytes = static_cast<size_t>(p.d) * element_size(p.dtype);
  const int64_t es = static_cast<int64_t>(element_size(p.dtype));
  const int64_t rows = p.b * p.seqlen_new * p.h_k;
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t hk = r % p.h_k;
      const int64_t i = (r / p.h_k) % p.seqlen_new;
      const int64_t b = r / (p.h_k * p.seqlen_new);
      const int64_t pos = static_cast<int64_t>(p.cache_seqlens[b]) + i;
      if (pos < 0 || pos >= p.seqlen_k_max) continue;  // the binding has rejected these
      char* kd = static_cast<char*>(p.k_cache) +
                 es * (b * p.k_cache_batch_stride + pos * p.k_cache_row_stride + hk * p.k_cache_head_stride);
      char* vd = static_cast<char*>(p.v_cache) +
                 es * (b * p.v_cache_batch_stride + pos * p.v_cache_row_stride + hk * p.v_cache_head_stride);
      const char* ks = static_cast<const char*>(p.k) + es * (b * p.k_batch_stride + i * p.k_row_stride + hk * p.k_head_stride);
      const char* vs = static_cast<const char*>(p.v) + es * (b * p.v_batch_stride + i * p.v_row_stride + hk * p.v_head_stride);
      std::memcpy(kd, ks, row_bytes);
      std::memcpy(vd, vs, row_bytes);
    }
  });
}

}  // namespace fastattn
