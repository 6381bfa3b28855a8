// cpu_gemm.h — the small fp32 GEMM the CPU attention kernels use for their block products
// (flash forward's S = Q K^T and O += P V; the KV-cache kernel's with many query rows).
// ATen's cpublas::brgemm runs oneDNN's JIT brgemm micro-kernels (or its BLAS sgemm), near
// the machine's fp32 FMA rate on the small blocks these kernels multiply.
#pragma once

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastattn {
namespace cpu {

// oneDNN's brgemm (behind cpublas::brgemm) cannot build a kernel for an operand whose rows
// span 2 GiB or more (it throws std::bad_alloc): the flash forward's K^T scratch at 4M keys x
// d128 (its leading dimension is the key count), or an fp32 Q / V read in place at a row
// stride of a sequence-first activation. Such an operand is first packed densely into a
// per-thread buffer: one copy of the block (m x k, k x n or m x n floats) per product, small
// next to the product's m * n * k multiply-adds.
constexpr int64_t kBrgemmMaxSpan = (int64_t(1) << 31) / int64_t(sizeof(float));  // elements

inline bool brgemm_span_ok(int64_t rows, int64_t ld) { return rows * ld < kBrgemmMaxSpan; }

// Rows x cols of src (leading dim ld) into buf, densely (leading dim cols).
inline const float* pack_rows(const float* src, int64_t rows, int64_t cols, int64_t ld, std::vector<float>& buf) {
  buf.resize(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) std::copy(src + r * ld, src + r * ld + cols, buf.data() + r * cols);
  return buf.data();
}

// C (m, n) = A (m, k) @ B (k, n) [+ C], row-major with leading dims lda, ldb, ldc, fp32.
inline void gemm_f32(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
                     const float* a, const float* b, float* c) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (!brgemm_span_ok(m, lda) || !brgemm_span_ok(k, ldb) || !brgemm_span_ok(m, ldc)) {
    thread_local std::vector<float> a_buf, b_buf, c_buf;
    if (!brgemm_span_ok(m, lda)) a = pack_rows(a, m, k, lda, a_buf), lda = k;
    if (!brgemm_span_ok(k, ldb)) b = pack_rows(b, k, n, ldb, b_buf), ldb = n;
    if (brgemm_span_ok(m, ldc)) {
      at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add_c, a, b, c);
    } else {
      float* cp = add_c ? const_cast<float*>(pack_rows(c, m, n, ldc, c_buf)) : (c_buf.resize(size_t(m * n)), c_buf.data());
      at::native::cpublas::brgemm(m, n, k, lda, ldb, n, add_c, a, b, cp);
      for (int64_t r = 0; r < m; ++r) std::copy(cp + r * n, cp + (r + 1) * n, c + r * ldc);
    }
    return;
  }
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add_c, a, b, c);
#else
  // A torch without the fp32 brgemm (older than the ones this was built against): correct,
  // compiler-vectorised over n, and much slower.
  for (int64_t i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    if (!add_c) std::fill(ci, ci + n, 0.0f);
    for (int64_t kk = 0; kk < k; ++kk) {
      const float aik = a[i * lda + kk];
      const float* bk = b + kk * ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += aik * bk[j];
    }
  }
#endif
}

// Releases whatever per-thread state the GEMM backend keeps between calls.
inline void gemm_release() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm_release(false);
#endif
}

}  // namespace cpu
}  // namespace fastattn
