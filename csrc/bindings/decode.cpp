// decode.cpp — tensors -> DecodeParams / AppendKvParams, validation, split-KV scratch and
// device dispatch for decode_attention and append_kv.
//
// Graph safety: decode never reads cache_seqlens on the host on CUDA (num_splits = 0 is
// chosen from the shapes and the SM count; the kernel clamps the lengths to [0, S_max]).
// append_kv's capacity check needs the values of cache_seqlens: on the CPU it is always
// done; on CUDA it is done (one device-to-host read) only when the current stream is not
// capturing a graph. Inside a capture the kernel drops rows that would land outside the
// cache, so memory is never corrupted, but no error can be raised there.
//
// append_kv is an in-place op like torch's: it refuses arguments that require grad while
// grad mode is on (it has no backward, so the graph would silently miss the write), bumps
// the caches' version counters, and refuses caches whose elements share memory or that
// share elements with each other, with k/v or with cache_seqlens. k and v may alias each
// other (both are only read). These checks use sizes, strides and addresses only: no sync,
// so they hold inside CUDA graph capture too.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common.h"
#include "fastattn/api.h"
#include "fastattn/decode_split.h"
#include "ops.h"

namespace fastattn {
namespace {

void check_seqlens(const at::Tensor& cache_seqlens, const at::Tensor& ref, int64_t b, const char* op) {
  FA_CHECK_ARG(cache_seqlens.scalar_type() == at::kInt, "fastattn.", op,
               ": cache_seqlens must be int32, got ", cache_seqlens.scalar_type());
  FA_CHECK_ARG(cache_seqlens.device() == ref.device(), "fastattn.", op, ": cache_seqlens is on ",
               cache_seqlens.device(), " but must be on ", ref.device(), " with the caches");
  FA_CHECK_ARG(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == b, "fastattn.", op,
               ": cache_seqlens must have shape (", b, ",) (one length per sequence), got ",
               cache_seqlens.sizes());
}

// Both caches (B, S_max, Hk, D), same shape, dtype and device, last dim contiguous.
void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, const char* op) {
  check_device_supported(k_cache, "k_cache");
  check_float_dtype(k_cache, "k_cache");
  check_same_device(v_cache, k_cache, "v_cache", "k_cache");
  check_same_dtype(v_cache, k_cache, "v_cache", "k_cache");
  FA_CHECK_ARG(k_cache.dim() == 4, "fastattn.", op, ": k_cache must be 4-D (B, S_max, Hk, D), got shape ",
               k_cache.sizes());
  FA_CHECK_ARG(v_cache.sizes() == k_cache.sizes(), "fastattn.", op, ": v_cache must have k_cache's shape ",
               k_cache.sizes(), ", got ", v_cache.sizes());
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(v_cache, "v_cache");
  FA_CHECK_ARG(k_cache.size(2) > 0 && k_cache.size(3) > 0, "fastattn.", op,
               ": k_cache must have Hk > 0 and D > 0, got shape ", k_cache.sizes());
}

bool is_capturing(const at::Tensor& t) {
#ifdef FASTATTN_WITH_CUDA
  if (t.is_cuda()) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    FA_CUDA_CHECK_LAUNCH(cudaStreamIsCapturing(current_stream(t), &status), "capture query");
    return status != cudaStreamCaptureStatusNone;
  }
#endif
  (void)t;
  return false;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache,
                                                    const at::Tensor& cache_seqlens,
                                                    std::optional<double> softmax_scale,
                                                    int64_t num_splits) {
  check_caches(k_cache, v_cache, "decode_attention");
  check_device_supported(q, "q");
  check_same_device(q, k_cache, "q", "k_cache");
  check_float_dtype(q, "q", /*allow_fp32_cuda=*/false);
  check_same_dtype(k_cache, q, "k_cache", "q");
  FA_CHECK_ARG(q.dim() == 3 || (q.dim() == 4 && q.size(1) == 1),
               "fastattn.decode_attention: q must be (B, H, D) or (B, 1, H, D), got shape ", q.sizes());
  check_last_dim_contiguous(q, "q");
  const at::Tensor q3 = q.dim() == 4 ? q.select(1, 0) : q;
  const int64_t b = q3.size(0), h = q3.size(1), d = q3.size(2);
  const int64_t s_max = k_cache.size(1), h_k = k_cache.size(2);
  FA_CHECK_ARG(k_cache.size(0) == b, "fastattn.decode_attention: k_cache has batch ", k_cache.size(0),
               " but q has batch ", b);
  FA_CHECK_ARG(k_cache.size(3) == d, "fastattn.decode_attention: k_cache has head dim ", k_cache.size(3),
               " but q has head dim ", d);
  FA_CHECK_ARG(h % h_k == 0, "fastattn.decode_attention: the number of query heads (", h,
               ") must be a multiple of the number of kv heads (", h_k, ")");
  check_seqlens(cache_seqlens, q, b, "decode_attention");
  // A NaN or infinite scale (also one finite in double but not in the kernel's fp32) would
  // turn every output into NaN without an error.
  FA_CHECK_ARG(!softmax_scale.has_value() ||
                   (std::isfinite(*softmax_scale) && std::abs(*softmax_scale) <= std::numeric_limits<float>::max()),
               "fastattn.decode_attention: softmax_scale must be finite in float32 (|softmax_scale| <= ",
               std::numeric_limits<float>::max(), "), got ", softmax_scale.value_or(0.0));
  FA_CHECK_ARG(num_splits >= 0 && num_splits <= decode::kMaxSplits,
               "fastattn.decode_attention: num_splits must be in [0, ", decode::kMaxSplits,
               "] (0 = automatic), got ", num_splits);

  at::Tensor out = empty_output({b, h, d}, q.options());
  at::Tensor lse = at::empty({b, h}, q.options().dtype(at::kFloat));
  auto result_out = [&]() { return q.dim() == 4 ? out.view({b, 1, h, d}) : out; };
  if (b == 0 || h == 0) return {result_out(), lse};

  if (q.is_cpu()) {
    if (s_max > 0) {
      const at::Tensor lo = cache_seqlens.min(), hi = cache_seqlens.max();
      const int64_t lo_v = lo.item<int32_t>(), hi_v = hi.item<int32_t>();
      FA_CHECK_ARG(lo_v >= 0 && hi_v <= s_max, "fastattn.decode_attention: cache_seqlens must be in [0, ",
                   s_max, "] (the cache capacity S_max), got values in [", lo_v, ", ", hi_v, "]");
    } else {
      FA_CHECK_ARG(cache_seqlens.eq(0).all().item<bool>(),
                   "fastattn.decode_attention: cache_seqlens must be 0 for an empty cache (S_max = 0)");
    }
  }

  const at::Tensor seqlens = cache_seqlens.contiguous();
  DecodeParams p;
  p.q = q3.data_ptr();
  p.q_batch_stride = q3.stride(0);
  p.q_head_stride = q3.stride(1);
  p.cache_seqlens = seqlens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.out_batch_stride = h * d;
  p.out_head_stride = d;
  p.lse = lse.data_ptr<float>();
  p.b = b;
  p.seqlen_k_max = s_max;
  p.h = h;
  p.h_k = h_k;
  p.d = d;
  p.softmax_scale = static_cast<float>(softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(double(d)));
  p.dtype = to_dtype(q.scalar_type());

  auto set_caches = [&p](const at::Tensor& kc, const at::Tensor& vc) {
    p.k_cache = kc.data_ptr();
    p.v_cache = vc.data_ptr();
    set_strides(kc, &p.k_batch_stride, &p.k_row_stride, &p.k_head_stride);
    set_strides(vc, &p.v_batch_stride, &p.v_row_stride, &p.v_head_stride);
  };
  set_caches(k_cache, v_cache);

  at::Tensor out_partial, lse_partial;
  auto alloc_scratch = [&]() {
    if (p.num_splits > 1) {
      out_partial = at::empty({p.num_splits, b, h, d}, q.options().dtype(at::kFloat));
      lse_partial = at::empty({p.num_splits, b, h}, q.options().dtype(at::kFloat));
      p.out_partial = out_partial.data_ptr<float>();
      p.lse_partial = lse_partial.data_ptr<float>();
    }
  };

  if (q.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    FA_CHECK_ARG(decode_cuda_supports_head_dim(d), "fastattn.decode_attention: head dim ", d,
                 " is not supported on CUDA (supported: 64, 128, 256)");
    const c10::cuda::CUDAGuard guard(q.device());
    // A cache view the 16-byte loads cannot use (odd strides or offset): run on a compact
    // copy instead. Correct, but it costs a full copy of the cache.
    at::Tensor kc = k_cache, vc = v_cache;
    if (!decode_cuda_supports_layout(p)) {
      kc = dense_aligned_copy(k_cache);
      vc = dense_aligned_copy(v_cache);
      set_caches(kc, vc);
    }
    FA_CHECK_ARG(decode_cuda_supports_layout(p), "fastattn.decode_attention: shape too large for the CUDA grid (B = ",
                 b, ", Hk = ", h_k, ")");
    int num_sms = 0, smem_optin = 0;
    FA_CUDA_CHECK_LAUNCH(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, q.device().index()),
                         "device query");
    FA_CUDA_CHECK_LAUNCH(
        cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.device().index()),
        "device query");
    TORCH_CHECK(smem_optin >= decode_cuda_smem_bytes(d), "fastattn.decode_attention: head dim ", d,
                " needs ", decode_cuda_smem_bytes(d), " bytes of shared memory per block, this GPU allows ",
                smem_optin);
    p.num_splits = num_splits > 0 ? num_splits : decode_num_splits_cuda(b, h, h_k, s_max, d, num_sms);
    alloc_scratch();
    FA_CUDA_CHECK_LAUNCH(decode_attention_cuda(p, current_stream(q)), "decode_attention");
#endif
  } else {
    p.num_splits = num_splits > 0 ? num_splits : decode_num_splits_cpu(b, h_k, s_max);
    alloc_scratch();
    decode_attention_cpu(p);
  }
  return {result_out(), lse};
}

void append_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& cache_seqlens) {
  check_caches(k_cache, v_cache, "append_kv");
  check_same_device(k, k_cache, "k", "k_cache");
  check_same_device(v, k_cache, "v", "k_cache");
  check_same_dtype(k, k_cache, "k", "k_cache");
  check_same_dtype(v, k_cache, "v", "k_cache");
  const int64_t b = k_cache.size(0), s_max = k_cache.size(1), h_k = k_cache.size(2), d = k_cache.size(3);
  FA_CHECK_ARG(k.dim() == 4 && k.size(0) == b && k.size(2) == h_k && k.size(3) == d,
               "fastattn.append_kv: k must be (B, Sn, Hk, D) = (", b, ", Sn, ", h_k, ", ", d,
               ") to match k_cache, got shape ", k.sizes());
  FA_CHECK_ARG(v.sizes() == k.sizes(), "fastattn.append_kv: v must have k's shape ", k.sizes(), ", got ",
               v.sizes());
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  check_seqlens(cache_seqlens, k_cache, b, "append_kv");
  // The caches are written in place while k, v and cache_seqlens are read.
  constexpr const char* op = "fastattn.append_kv";
  check_no_internal_overlap(k_cache, op, "k_cache");
  check_no_internal_overlap(v_cache, op, "v_cache");
  check_no_overlap(k_cache, "k_cache", v_cache, "v_cache", op);
  for (const auto& [cache, cache_name] : {NamedTensor{k_cache, "k_cache"}, NamedTensor{v_cache, "v_cache"}}) {
    check_no_overlap(k, "k", cache, cache_name, op);
    check_no_overlap(v, "v", cache, cache_name, op);
    check_no_overlap(cache_seqlens, "cache_seqlens", cache, cache_name, op, /*exact=*/false);
  }
  const int64_t sn = k.size(1);
  if (b == 0 || sn == 0) return;

  // Capacity: every sequence needs 0 <= cache_seqlens[b] and cache_seqlens[b] + Sn <= S_max.
  if (!is_capturing(k_cache)) {
    const int64_t lo_v = cache_seqlens.min().item<int32_t>(), hi_v = cache_seqlens.max().item<int32_t>();
    FA_CHECK_ARG(lo_v >= 0, "fastattn.append_kv: cache_seqlens must be >= 0, got a minimum of ", lo_v);
    FA_CHECK_ARG(hi_v + sn <= s_max, "fastattn.append_kv: appending ", sn,
                 " rows at cache_seqlens (max ", hi_v, ") exceeds the cache capacity S_max = ", s_max);
  }

  const at::Tensor seqlens = cache_seqlens.contiguous();
  AppendKvParams p;
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.cache_seqlens = seqlens.data_ptr<int32_t>();
  set_strides(k_cache, &p.k_cache_batch_stride, &p.k_cache_row_stride, &p.k_cache_head_stride);
  set_strides(v_cache, &p.v_cache_batch_stride, &p.v_cache_row_stride, &p.v_cache_head_stride);
  set_strides(k, &p.k_batch_stride, &p.k_row_stride, &p.k_head_stride);
  set_strides(v, &p.v_batch_stride, &p.v_row_stride, &p.v_head_stride);
  p.b = b;
  p.seqlen_new = sn;
  p.seqlen_k_max = s_max;
  p.h_k = h_k;
  p.d = d;
  p.dtype = to_dtype(k_cache.scalar_type());
  if (k_cache.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(k_cache.device());
    FA_CUDA_CHECK_LAUNCH(append_kv_cuda(p, current_stream(k_cache)), "append_kv");
#endif
  } else {
    append_kv_cpu(p);
  }
}

namespace {

// append_kv above the kernels, as rotary_ in rotary.cpp: the Autograd kernel refuses what
// autograd would need to record, the ADInplaceOrView kernel bumps the caches' versions.
const c10::TypedOperatorHandle<decltype(append_kv)>& append_kv_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastattn::append_kv", "").typed<decltype(append_kv)>();
  return op;
}

void append_kv_autograd(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& cache_seqlens) {
  check_inplace_not_differentiable(
      "fastattn.append_kv", {{k_cache, "k_cache"}, {v_cache, "v_cache"}, {k, "k"}, {v, "v"}},
      "it writes the cache for inference only, so call it under torch.no_grad() or "
      "torch.inference_mode(), or pass detached tensors");
  at::AutoDispatchBelowAutograd guard;
  append_kv_op().call(k_cache, v_cache, k, v, cache_seqlens);
}

void append_kv_inplace_or_view(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& cache_seqlens) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    append_kv_op().call(k_cache, v_cache, k, v, cache_seqlens);
  }
  bump_versions(k_cache, v_cache);
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) { m.impl("append_kv", &fastattn::append_kv_autograd); }
TORCH_LIBRARY_IMPL(fastattn, ADInplaceOrView, m) { m.impl("append_kv", &fastattn::append_kv_inplace_or_view); }
