// flash_fwd_selftest.cu — standalone GPU check of the CUDA FlashAttention forward (no torch).
//
// Runs fastattn::flash_fwd_cuda on random fp16/bf16 data over a list of shapes (odd
// lengths, Sq != Sk both ways, MHA/GQA/MQA, causal, windows, strided views of a packed qkv
// buffer, empty rows) and compares out and lse with an fp64 CPU reference computed from
// the same 16-bit inputs; then times the FlashAttention benchmark shapes (batch = 16k / S,
// 2048 = heads x head dim) and prints TFLOP/s. Build and run on a GPU machine:
//
//   nvcc -std=c++17 -O3 --use_fast_math -Icsrc/include -DFASTATTN_WITH_CUDA
//     -gencode arch=compute_90a,code=sm_90a scripts/flash_fwd_selftest.cu
//     csrc/cuda/flash_fwd.cu csrc/cuda/flash_fwd_hdim64.cu csrc/cuda/flash_fwd_hdim128.cu
//     -o /tmp/flash_fwd_selftest && /tmp/flash_fwd_selftest [--no-bench]
// (one command line)
//
// (compute_80 / sm_80 for A100). Exit status 0 iff every correctness case passes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "fastattn/api.h"

using fastattn::DType;
using fastattn::FlashFwdParams;

#define CK(x)                                                                       \
  do {                                                                              \
    cudaError_t e_ = (x);                                                           \
    if (e_ != cudaSuccess) {                                                        \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(2);                                                                 \
    }                                                                               \
  } while (0)

static uint16_t to16(float x, DType t) {
  uint16_t r;
  if (t == DType::kFloat16) {
    r = static_cast<__half_raw>(__float2half_rn(x)).x;
  } else {
    r = static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(x)).x;
  }
  return r;
}
static float from16(uint16_t x, DType t) {
  if (t == DType::kFloat16) {
    __half_raw r;
    r.x = x;
    return __half2float(__half(r));
  }
  __nv_bfloat16_raw r;
  r.x = x;
  return __bfloat162float(__nv_bfloat16(r));
}

struct Case {
  int b, sq, sk, h, hk, d;
  int left, right;
  bool causal, packed;
};

// One case: returns true when it passes.
static bool run_case(const Case& c, DType dt, std::mt19937& rng) {
  const int rows_per_tok_q = c.packed ? (c.h + 2 * c.hk) : c.h;
  // Packed: one buffer (b, s, h + 2 hk, d) holding q | k | v heads (requires sq == sk).
  // Otherwise three contiguous buffers.
  const int64_t q_row = int64_t(rows_per_tok_q) * c.d;
  const int64_t kv_row = c.packed ? q_row : int64_t(c.hk) * c.d;
  size_t n_q = size_t(c.b) * c.sq * q_row, n_kv = size_t(c.b) * c.sk * kv_row;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> hq(n_q), hk(c.packed ? 0 : n_kv), hv(c.packed ? 0 : n_kv);
  for (auto& x : hq) x = to16(nd(rng), dt);
  for (auto& x : hk) x = to16(nd(rng), dt);
  for (auto& x : hv) x = to16(nd(rng), dt);
  uint16_t *dq, *dk, *dv, *dout;
  float* dlse;
  CK(cudaMalloc(&dq, n_q * 2));
  if (!c.packed) {
    CK(cudaMalloc(&dk, n_kv * 2));
    CK(cudaMalloc(&dv, n_kv * 2));
  }
  const size_t n_out = size_t(c.b) * c.sq * c.h * c.d;
  CK(cudaMalloc(&dout, n_out * 2));
  CK(cudaMalloc(&dlse, size_t(c.b) * c.h * c.sq * 4));
  CK(cudaMemcpy(dq, hq.data(), n_q * 2, cudaMemcpyHostToDevice));
  if (!c.packed) {
    CK(cudaMemcpy(dk, hk.data(), n_kv * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dv, hv.data(), n_kv * 2, cudaMemcpyHostToDevice));
  }
  CK(cudaMemset(dout, 0xff, n_out * 2));  // NaN pattern: every element must be written
  CK(cudaMemset(dlse, 0xff, size_t(c.b) * c.h * c.sq * 4));

  FlashFwdParams p;
  p.q = dq;
  p.k = c.packed ? dq + int64_t(c.h) * c.d : dk;
  p.v = c.packed ? dq + int64_t(c.h + c.hk) * c.d : dv;
  p.out = dout;
  p.lse = dlse;
  p.q_batch_stride = int64_t(c.sq) * q_row, p.q_row_stride = q_row, p.q_head_stride = c.d;
  p.k_batch_stride = int64_t(c.sk) * kv_row, p.k_row_stride = kv_row, p.k_head_stride = c.d;
  p.v_batch_stride = p.k_batch_stride, p.v_row_stride = kv_row, p.v_head_stride = c.d;
  p.out_batch_stride = int64_t(c.sq) * c.h * c.d, p.out_row_stride = int64_t(c.h) * c.d;
  p.out_head_stride = c.d;
  p.b = c.b, p.seqlen_q = c.sq, p.seqlen_k = c.sk, p.h = c.h, p.h_k = c.hk, p.d = c.d;
  p.softmax_scale = 1.f / std::sqrt(float(c.d));
  p.window_left = c.left, p.window_right = c.causal ? 0 : c.right;
  p.is_causal = c.causal;
  p.dtype = dt;
  CK(fastattn::flash_fwd_cuda(p, 0));
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(n_out);
  std::vector<float> lse(size_t(c.b) * c.h * c.sq);
  CK(cudaMemcpy(out.data(), dout, n_out * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(lse.data(), dlse, lse.size() * 4, cudaMemcpyDeviceToHost));

  // fp64 reference on the same 16-bit inputs.
  const uint16_t* Q = hq.data();
  const uint16_t* K = c.packed ? hq.data() + int64_t(c.h) * c.d : hk.data();
  const uint16_t* V = c.packed ? hq.data() + int64_t(c.h + c.hk) * c.d : hv.data();
  const int right = c.causal ? 0 : c.right;
  double max_err = 0, max_lse_err = 0;
  bool ok = true;
  std::vector<double> s(c.sk), acc(c.d);
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < c.h; ++h) {
      const int kvh = h / (c.h / c.hk);
      for (int i = 0; i < c.sq; ++i) {
        double mx = -INFINITY;
        for (int j = 0; j < c.sk; ++j) {
          bool vis = true;
          if (c.left >= 0 && j < i + c.sk - c.sq - c.left) vis = false;
          if (right >= 0 && j > i + c.sk - c.sq + right) vis = false;
          double dot = 0;
          if (vis)
            for (int e = 0; e < c.d; ++e)
              dot += double(from16(Q[b * p.q_batch_stride + i * q_row + h * c.d + e], dt)) *
                     from16(K[b * p.k_batch_stride + j * kv_row + kvh * c.d + e], dt);
          s[j] = vis ? dot * p.softmax_scale : -INFINITY;
          mx = std::max(mx, s[j]);
        }
        double l = 0;
        std::fill(acc.begin(), acc.end(), 0.0);
        if (mx > -INFINITY)
          for (int j = 0; j < c.sk; ++j) {
            const double w = std::exp(s[j] - mx);
            l += w;
            if (w != 0)
              for (int e = 0; e < c.d; ++e)
                acc[e] += w * from16(V[b * p.v_batch_stride + j * kv_row + kvh * c.d + e], dt);
          }
        for (int e = 0; e < c.d; ++e) {
          const double ref = l > 0 ? acc[e] / l : 0.0;
          const float got = from16(out[b * p.out_batch_stride + i * p.out_row_stride + h * c.d + e], dt);
          const double err = std::isnan(got) ? INFINITY : std::fabs(got - ref);
          max_err = std::max(max_err, err);
        }
        const float gl = lse[(size_t(b) * c.h + h) * c.sq + i];
        if (l > 0) {
          const double err = std::isnan(gl) ? INFINITY : std::fabs(gl - (mx + std::log(l)));
          max_lse_err = std::max(max_lse_err, err);
        } else if (!(std::isinf(gl) && gl < 0)) {
          ok = false;
        }
      }
    }
  const double tol = dt == DType::kBFloat16 ? 2e-2 : 3e-3;
  ok = ok && max_err <= tol && max_lse_err <= 1e-3;
  std::printf("%s %-5s b%d sq%-5d sk%-5d h%-2d hk%-2d d%-3d win(%d,%d)%s%s  max|dout| %.2e  max|dlse| %.2e\n",
              ok ? "PASS" : "FAIL", dt == DType::kFloat16 ? "fp16" : "bf16", c.b, c.sq, c.sk, c.h, c.hk,
              c.d, c.left, right, c.causal ? " causal" : "", c.packed ? " packed" : "", max_err,
              max_lse_err);
  CK(cudaFree(dq));
  if (!c.packed) {
    CK(cudaFree(dk));
    CK(cudaFree(dv));
  }
  CK(cudaFree(dout));
  CK(cudaFree(dlse));
  return ok;
}

static void bench(DType dt, int d, bool causal, int seqlen) {
  const int h = 2048 / d, b = std::max(1, 16384 / seqlen);
  const size_t n = size_t(b) * seqlen * h * d;
  void *q, *k, *v, *o;
  float* lse;
  CK(cudaMalloc(&q, n * 2));
  CK(cudaMalloc(&k, n * 2));
  CK(cudaMalloc(&v, n * 2));
  CK(cudaMalloc(&o, n * 2));
  CK(cudaMalloc(&lse, size_t(b) * h * seqlen * 4));
  CK(cudaMemset(q, 0x3c, n * 2));  // small finite values
  CK(cudaMemset(k, 0x3c, n * 2));
  CK(cudaMemset(v, 0x3c, n * 2));
  FlashFwdParams p;
  p.q = q, p.k = k, p.v = v, p.out = o, p.lse = lse;
  const int64_t row = int64_t(h) * d, bs = row * seqlen;
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.out_batch_stride = bs;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.out_row_stride = row;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.out_head_stride = d;
  p.b = b, p.seqlen_q = p.seqlen_k = seqlen, p.h = p.h_k = h, p.d = d;
  p.softmax_scale = 1.f / std::sqrt(float(d));
  p.window_right = causal ? 0 : -1, p.is_causal = causal, p.dtype = dt;
  for (int i = 0; i < 3; ++i) CK(fastattn::flash_fwd_cuda(p, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  const int reps = 20;
  CK(cudaEventRecord(e0));
  for (int i = 0; i < reps; ++i) CK(fastattn::flash_fwd_cuda(p, 0));
  CK(cudaEventRecord(e1));
  CK(cudaEventSynchronize(e1));
  float ms;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  ms /= reps;
  const double flops = 4.0 * b * h * double(seqlen) * seqlen * d / (causal ? 2 : 1);
  std::printf("bench %s d%-3d %-9s S%-5d b%-2d h%-2d: %8.3f ms  %6.1f TFLOP/s\n",
              dt == DType::kFloat16 ? "fp16" : "bf16", d, causal ? "causal" : "noncausal", seqlen, b,
              h, ms, flops / ms / 1e9);
  CK(cudaFree(q));
  CK(cudaFree(k));
  CK(cudaFree(v));
  CK(cudaFree(o));
  CK(cudaFree(lse));
}

int main(int argc, char** argv) {
  bool do_bench = !(argc > 1 && std::strcmp(argv[1], "--no-bench") == 0);
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  std::mt19937 rng(1234);
  const Case cases[] = {
      // b, sq, sk, h, hk, d, left, right, causal, packed
      {1, 1, 1, 1, 1, 64, -1, -1, false, false},
      {2, 17, 17, 4, 2, 64, -1, -1, false, true},
      {2, 17, 17, 4, 2, 128, -1, -1, true, true},
      {1, 97, 97, 2, 1, 64, -1, -1, true, true},
      {1, 97, 1025, 4, 1, 128, -1, -1, true, false},
      {1, 1025, 97, 4, 4, 64, -1, -1, true, false},  // Sq > Sk: leading rows see nothing
      {1, 1025, 1025, 2, 2, 128, -1, -1, false, true},
      {1, 1025, 1025, 2, 1, 64, 100, 7, false, true},
      {1, 300, 700, 2, 2, 128, 33, -1, false, false},
      {1, 700, 300, 2, 2, 128, 5, 0, false, false},
      {1, 128, 64, 2, 2, 64, -1, -1, false, false},
      {3, 200, 200, 8, 1, 128, -1, -1, true, true},  // MQA
  };
  int fails = 0;
  for (DType dt : {DType::kFloat16, DType::kBFloat16})
    for (const Case& c : cases) fails += !run_case(c, dt, rng);
  std::printf("%s: %d failing case(s)\n", fails ? "FAILED" : "ALL PASS", fails);
  if (do_bench) {
    for (int d : {64, 128})
      for (bool causal : {false, true})
        for (int s : {512, 2048, 8192, 16384}) bench(DType::kBFloat16, d, causal, s);
    bench(DType::kFloat16, 128, true, 8192);
  }
  return fails ? 1 : 0;
}
