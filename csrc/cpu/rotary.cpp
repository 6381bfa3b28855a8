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
// token. fp32 rows are rotated straight from input to output in a loop the compiler
// vectorises (omp simd; for GPT-J the stride-2 pairs become in-register shuffles). 16-bit
// rows are widened into an fp32 buffer with the vectorised converters of cpu_types.h,
// rotated there and narrowed on store, so bf16/fp16 cost no more memory traffic than fp32.
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
    std::vector<float> row(std::is_same<T, float>::value ? 0 : static_cast<size_t>(rot));
    float* c = angles.data();
    float* s = angles.data() + half;
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

      for (const HeadRows<T>& x : tensors) {
        const T* in_tok = x.in + bi * x.batch_stride + si * x.row_stride;
        T* out_tok = x.out + bi * x.out_batch_stride + si * x.out_row_stride;
        for (int64_t hd = 0; hd < x.heads; ++hd) {
          const T* in = in_tok + hd * x.head_stride;
          T* out = out_tok + hd * x.out_head_stride;
          if constexpr (std::is_same<T, float>::value) {
            if (interleaved) rotate_pairs(in, out, c, s, half);
            else rotate_halves(in, out, c, s, half);
          } else {
            float* r = row.data();
            load_row(in, r, rot);
            if (interleaved) rotate_pairs(r, r, c, s, half);
            else rotate_halves(r, r, c, s, half);
            store_row(r, out, rot);
          }
          if (tail > 0 && out != in) std::memcpy(out + rot, in + rot, static_cast<size_t>(tail) * sizeof(T));
        }
      }
    }
  });
}

}  // namespace

void rotary_cpu(const RotaryParams& params) {
  if (params.b * params.seqlen <= 0) return;
  FASTATTN_CPU_DTYPE_SWITCH(params.dtype, T, [&] { rotary_impl<T>(params); });
}

}  // namespace fastattn
