// rms_norm.cpp — RMSNorm forward (with the fused residual add) and backward on the CPU.
//
// What it computes: per row of (rows, n), y = x * rsqrt(mean(x^2) + eps) * weight; in the
// fused form h = x + residual is written and normalised. Backward gives dx and an fp32
// dweight.
//
// Why it is fast: the op is memory bound, so the goal is one read of each input and one
// write of each output at streaming speed. Rows are split over ATen's thread pool in
// chunks of ~32K elements; each row is converted once into an fp32 buffer that stays in L1,
// reduced with a vectorised sum (omp simd reduction), scaled and converted back, so the
// 16-bit paths cost no more than fp32. The weight is converted to fp32 once per call.
// dweight is reduced deterministically: a fixed number of row blocks (a function of the
// row count only) each write a partial sum, added in block order afterwards.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
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

// Rows per parallel task: enough elements that scheduling overhead is noise.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

std::vector<float> weight_as_float(const void* weight, int64_t n, DType dtype) {
  std::vector<float> w;
  if (weight == nullptr) return w;
  w.resize(static_cast<size_t>(n));
  FASTATTN_CPU_DTYPE_SWITCH(dtype, T, [&] { load_row(static_cast<const T*>(weight), w.data(), n); });
  return w;
}

template <typename T>
void rms_norm_fwd_impl(const RmsNormParams& p) {
  const int64_t n = p.n;
  const std::vector<float> w = weight_as_float(p.weight, n, p.dtype);
  const float* wf = w.empty() ? nullptr : w.data();
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* h = static_cast<T*>(p.h);

  at::parallel_for(0, p.rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(n)), rbuf(res ? static_cast<size_t>(n) : 0);
    float* b = buf.data();
    for (int64_t r = begin; r < end; ++r) {
      load_row(x + r * p.x_row_stride, b, n);
      if (res) {
        float* rb = rbuf.data();
        load_row(res + r * p.residual_row_stride, rb, n);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) b[i] += rb[i];
        // h is stored in the input dtype and it is the rounded h that gets normalised, so
        // that y == rms_norm(h) exactly as the unfused composition would compute it.
        store_row(b, h + r * p.h_row_stride, n);
        if (!std::is_same<T, float>::value) load_row(h + r * p.h_row_stride, b, n);
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) ss += b[i] * b[i];
      const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(n) + p.eps);
      p.rstd[r] = rstd;
      if (wf) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) b[i] = b[i] * rstd * wf[i];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) b[i] = b[i] * rstd;
      }
      store_row(b, y + r * p.y_row_stride, n);
    }
  });
}

template <typename T>
void rms_norm_bwd_impl(const RmsNormBwdParams& p) {
  const int64_t n = p.n;
  const std::vector<float> w = weight_as_float(p.weight, n, p.dtype);
  const float* wf = w.empty() ? nullptr : w.data();
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const T* dh = static_cast<const T*>(p.dh);
  T* dx = static_cast<T*>(p.dx);
  const int64_t nblocks = p.num_row_blocks;
  const int64_t rows_per_block = (p.rows + nblocks - 1) / nblocks;

  at::parallel_for(0, nblocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    std::vector<float> xb(static_cast<size_t>(n)), gb(static_cast<size_t>(n)),
        hb(dh ? static_cast<size_t>(n) : 0);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      float* dw = wf ? p.dweight_partial + blk * n : nullptr;
      if (dw) std::fill(dw, dw + n, 0.f);
      const int64_t r_end = std::min(p.rows, (blk + 1) * rows_per_block);
      for (int64_t r = blk * rows_per_block; r < r_end; ++r) {
        float* xr = xb.data();
        float* g = gb.data();
        load_row(x + r * p.x_row_stride, xr, n);
        load_row(dy + r * p.dy_row_stride, g, n);
        const float rstd = p.rstd[r];
        float dot = 0.f;
        if (wf) {
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < n; ++i) {
            const float xhat = xr[i] * rstd;
            dw[i] += g[i] * xhat;  // dweight uses dy before it is scaled by weight
            g[i] *= wf[i];
            dot += g[i] * xhat;
          }
        } else {
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < n; ++i) dot += g[i] * xr[i] * rstd;
        }
        const float c = dot / static_cast<float>(n);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) g[i] = rstd * (g[i] - xr[i] * rstd * c);
        if (dh) {
          float* hr = hb.data();
          load_row(dh + r * p.dh_row_stride, hr, n);
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) g[i] += hr[i];
        }
        store_row(g, dx + r * p.dx_row_stride, n);
      }
    }
  });

  if (wf) {
    // Column-parallel, block-ordered sum of the partials: the same bits on any thread count.
    at::parallel_for(0, n, 1024, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        float acc = 0.f;
        for (int64_t blk = 0; blk < nblocks; ++blk) acc += p.dweight_partial[blk * n + c];
        p.dweight[c] = acc;
      }
    });
  }
}

}  // namespace

void cpu::rms_norm_fwd_kernel(const RmsNormParams& params) {
  FASTATTN_CPU_DTYPE_SWITCH(params.dtype, T, [&] { rms_norm_fwd_impl<T>(params); });
}

void cpu::rms_norm_bwd_kernel(const RmsNormBwdParams& params) {
  FASTATTN_CPU_DTYPE_SWITCH(params.dtype, T, [&] { rms_norm_bwd_impl<T>(params); });
}

int64_t rms_norm_bwd_num_row_blocks_cpu(int64_t rows) {
  // At most 64 blocks: enough parallelism for any CPU this runs on, while the partial
  // buffer (64 x n fp32) stays small.
  return std::max<int64_t>(1, std::min<int64_t>(rows, 64));
}

}  // namespace fastattn
