// rotary.cpp — rotary position embedding of q and k in one pass on the CPU.
//
// What it computes: for every token (b, s) with position p = positions[b, s] (default s),
// every head row x of q (b, s, :, :) and k (b, s, :, :) is rotated pairwise by the angles
// whose cos/sin are table[p][i], i < R/2:
//   NeoX/LLaMA halves  (i, i + R/2):  x1' = x1 c - x2 s,  x2' = x2 c + x1 s
//   GPT-J pairs        (2i, 2i + 1):  same formula on adjacent elements.
// conjugate = true uses -s (the inverse rotation, i.e. the backward pass). Dims R..D pass
// through: copied by the out-of-place form, untouched by the in-place form.
//
// Why it is fast: the op is memory bound (6 flops per pair), so the aim is one streaming
// read and one write of q and k and nothing else. Tokens are split over ATen's thread pool
// in chunks of ~16K elements; a token's cos/sin row is fetched once into a small L1-resident
// buffer (sign-flipped there for the conjugate) and reused for all H + Hk heads of that
// token. fp32 and bf16 rows are rotated straight from input to output in loops the
// compiler vectorises (omp simd; bf16 widening/narrowing is integer arithmetic in the same
// loop; for GPT-J the stride-2 pairs become in-register shuffles). fp16 NeoX rows use the
// AVX-512 half converts directly; other fp16 rows are widened into an L1-resident fp32
// buffer with the vectorised converters of cpu_types.h, rotated there and narrowed back.
// Strided q/k (views into a packed qkv projection) are read in place: only the last dim has
// to be contiguous.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_types.h"
#include "fastattn/api.h"
#include "fastattn/cpu_dispatch.h"
#include "fastattn/static_switch.h"

namespace fastattn {
namespace {

using cpu::load_row;
using cpu::store_row;

// Pairs (i, i + half). `in` may equal `out`: each iteration reads and writes only its own
// two elements, so there is no loop-carried dependence.
inline void rotate_halves(const float* in, float* out, const float* c, const float* s, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = in[i], x2 = in[i + half];
    out[i] = x1 * c[i] - x2 * s[i];
    out[i + half] = x2 * c[i] + x1 * s[i];
  }
}

// Pairs (2i, 2i + 1); `in` may equal `out` as above.
inline void rotate_pairs(const float* in, float* out, const float* c, const float* s, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = in[2 * i], x2 = in[2 * i + 1];
    out[2 * i] = x1 * c[i] - x2 * s[i];
    out[2 * i + 1] = x2 * c[i] + x1 * s[i];
  }
}

// bf16 rows rotated straight from input to output: the widening is a shift and the
// narrowing (round to nearest even, NaN kept quiet; cpu_types.h) is integer arithmetic, all
// of which the compiler vectorises inside the same loop, so no staging buffer is needed.
inline void rotate_halves_bf16(const uint16_t* in, uint16_t* out, const float* c, const float* s, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = cpu::bf16_to_float(in[i]), x2 = cpu::bf16_to_float(in[i + half]);
    out[i] = cpu::float_to_bf16(x1 * c[i] - x2 * s[i]);
    out[i + half] = cpu::float_to_bf16(x2 * c[i] + x1 * s[i]);
  }
}

inline void rotate_pairs_bf16(const uint16_t* in, uint16_t* out, const float* c, const float* s, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = cpu::bf16_to_float(in[2 * i]), x2 = cpu::bf16_to_float(in[2 * i + 1]);
    out[2 * i] = cpu::float_to_bf16(x1 * c[i] - x2 * s[i]);
    out[2 * i + 1] = cpu::float_to_bf16(x2 * c[i] + x1 * s[i]);
  }
}

// One head row, rotated in fp32 and stored in T. `row` is an fp32 scratch of R floats for
// fp16 rows without an AVX-512 path; c2/s2 are the pair-expanded angles of fp16 GPT-J
// rows (null when not built).
template <typename T>
inline void rotate_row(const T* in, T* out, const float* c, const float* s, const float* c2, const float* s2,
                       int64_t half, bool interleaved, float* row) {
  (void)c2;
  (void)s2;
  if constexpr (std::is_same<T, float>::value) {
    (void)row;
    if (interleaved) rotate_pairs(in, out, c, s, half);
    else rotate_halves(in, out, c, s, half);
  } else if constexpr (std::is_same<T, cpu::bf16_t>::value) {
    (void)row;
    const uint16_t* i16 = reinterpret_cast<const uint16_t*>(in);
    uint16_t* o16 = reinterpret_cast<uint16_t*>(out);
    if (interleaved) rotate_pairs_bf16(i16, o16, c, s, half);
    else rotate_halves_bf16(i16, o16, c, s, half);
  } else {
#if defined(__AVX512F__)
    if (!interleaved) {
      // fp16 NeoX: 16 pairs per step with the hardware converts; x1 and x2 are both loaded
      // before either half is stored, so in == out is safe.
      const uint16_t* i16 = reinterpret_cast<const uint16_t*>(in);
      uint16_t* o16 = reinterpret_cast<uint16_t*>(out);
      int64_t i = 0;
      for (; i + 16 <= half; i += 16) {
        const __m512 x1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(i16 + i)));
        const __m512 x2 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(i16 + half + i)));
        const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
        const __m512 o1 = _mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv));
        const __m512 o2 = _mm512_add_ps(_mm512_mul_ps(x2, cv), _mm512_mul_ps(x1, sv));
        constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o16 + i), _mm512_cvtps_ph(o1, kRound));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o16 + half + i), _mm512_cvtps_ph(o2, kRound));
      }
      for (; i < half; ++i) {
        const float x1 = cpu::half_to_float(i16[i]), x2 = cpu::half_to_float(i16[i + half]);
        o16[i] = cpu::float_to_half(x1 * c[i] - x2 * s[i]);
        o16[i + half] = cpu::float_to_half(x2 * c[i] + x1 * s[i]);
      }
      return;
    }
    if (interleaved && c2 != nullptr) {
      // fp16 GPT-J: out[j] = x[j] c2[j] + x[j ^ 1] s2[j] with the per-token tables
      // c2 = (c0, c0, c1, c1, ...), s2 = (-s0, s0, -s1, s1, ...); x[j ^ 1] is an in-lane
      // swap of neighbours, so 8 pairs go per step without any deinterleaving.
      const uint16_t* i16 = reinterpret_cast<const uint16_t*>(in);
      uint16_t* o16 = reinterpret_cast<uint16_t*>(out);
      const int64_t rot = 2 * half;
      int64_t j = 0;
      for (; j + 16 <= rot; j += 16) {
        const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(i16 + j)));
        const __m512 swapped = _mm512_permute_ps(x, 0xB1);
        const __m512 o = _mm512_add_ps(_mm512_mul_ps(x, _mm512_loadu_ps(c2 + j)),
                                       _mm512_mul_ps(swapped, _mm512_loadu_ps(s2 + j)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o16 + j),
                            _mm512_cvtps_ph(o, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
      for (int64_t i = j / 2; i < half; ++i) {
        const float x1 = cpu::half_to_float(i16[2 * i]), x2 = cpu::half_to_float(i16[2 * i + 1]);
        o16[2 * i] = cpu::float_to_half(x1 * c[i] - x2 * s[i]);
        o16[2 * i + 1] = cpu::float_to_half(x2 * c[i] + x1 * s[i]);
      }
      return;
    }
#endif
    const int64_t rot = 2 * half;
    load_row(in, row, rot);
    if (interleaved) rotate_pairs(row, row, c, s, half);
    else rotate_halves(row, row, c, s, half);
    store_row(row, out, rot);
  }
}

template <typename T>
struct HeadRows {
  const T* in;
  T* out;
  int64_t batch_stride, row_stride, head_stride;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  int64_t heads;
};

template <typename T>
void rotary_impl(const RotaryParams& p) {
  const int64_t half = p.rotary_dim / 2;
  const int64_t rot = p.rotary_dim;
  const int64_t tail = p.d - rot;
  const bool interleaved = p.interleaved;
  const float sign = p.conjugate ? -1.0f : 1.0f;
  const HeadRows<T> tensors[2] = {
      {static_cast<const T*>(p.q), static_cast<T*>(p.q_out), p.q_batch_stride, p.q_row_stride, p.q_head_stride,
       p.q_out_batch_stride, p.q_out_row_stride, p.q_out_head_stride, p.h},
      {static_cast<const T*>(p.k), static_cast<T*>(p.k_out), p.k_batch_stride, p.k_row_stride, p.k_head_stride,
       p.k_out_batch_stride, p.k_out_row_stride, p.k_out_head_stride, p.h_k},
  };
  const int64_t tokens = p.b * p.seqlen;
  const int64_t per_token = std::max<int64_t>(1, (p.h + p.h_k) * p.d);
  const int64_t grain = std::max<int64_t>(1, 16384 / per_token);

  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> angles(static_cast<size_t>(2 * half));
    constexpr bool kHalf = std::is_same<T, cpu::half_t>::value;
    std::vector<float> row(kHalf ? static_cast<size_t>(rot) : 0);
#if defined(__AVX512F__)
    const bool expand = kHalf && interleaved;
#else
    const bool expand = false;
#endif
    std::vector<float> expanded(expand ? static_cast<size_t>(2 * rot) : 0);
    float* c = angles.data();
    float* s = angles.data() + half;
    float* c2 = expand ? expanded.data() : nullptr;
    float* s2 = expand ? expanded.data() + rot : nullptr;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bi = t / p.seqlen, si = t % p.seqlen;
      int64_t pos = si;
      if (p.positions != nullptr) {
        const int64_t idx = bi * p.positions_batch_stride + si;
        pos = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[idx]
                                : static_cast<const int32_t*>(p.positions)[idx];
      }
      if (pos >= 0 && pos < p.max_pos) {
        const float* ct = p.cos + pos * half;
        const float* st = p.sin + pos * half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          c[i] = ct[i];
          s[i] = sign * st[i];
        }
      } else {  // never read outside the tables; poison the token instead
        std::fill(angles.begin(), angles.end(), std::numeric_limits<float>::quiet_NaN());
      }
      if (expand) {
        for (int64_t i = 0; i < half; ++i) {
          c2[2 * i] = c2[2 * i + 1] = c[i];
          s2[2 * i] = -s[i];
          s2[2 * i + 1] = s[i];
        }
      }

      for (const HeadRows<T>& x : tensors) {
        const T* in_tok = x.in + bi * x.batch_stride + si * x.row_stride;
        T* out_tok = x.out + bi * x.out_batch_stride + si * x.out_row_stride;
        for (int64_t hd = 0; hd < x.heads; ++hd) {
          const T* in = in_tok + hd * x.head_stride;
          T* out = out_tok + hd * x.out_head_stride;
          rotate_row(in, out, c, s, c2, s2, half, interleaved, row.data());
          if (tail > 0 && out != in) std::memcpy(out + rot, in + rot, static_cast<size_t>(tail) * sizeof(T));
        }
      }
    }
  });
}

}  // namespace

void cpu::rotary_kernel(const RotaryParams& params) {
  if (params.b * params.seqlen <= 0) return;
  FASTATTN_CPU_DTYPE_SWITCH(params.dtype, T, [&] { rotary_impl<T>(params); });
}

}  // namespace fastattn
