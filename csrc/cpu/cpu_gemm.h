// cpu_gemm.h — the small fp32 GEMM the CPU attention kernels use for their block products
// (flash forward's S = Q K^T and O += P V; the KV-cache kernel's with many query rows).
// ATen's cpublas::brgemm runs oneDNN's JIT brgemm micro-kernels (or its BLAS sgemm), near
// the machine's fp32 FMA rate on the small blocks these kernels multiply.
#pragma once

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>

namespace fastattn {
namespace cpu {

// C (m, n) = A (m, k) @ B (k, n) [+ C], row-major with leading dims lda, ldb, ldc, fp32.
inline void gemm_f32(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
                     const float* a, const float* b, float* c) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
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
