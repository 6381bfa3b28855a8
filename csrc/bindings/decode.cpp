// decode.cpp — tensors -> DecodeParams / AppendKvParams, validation, split-KV scratch and
// device dispatch for decode_attention and append_kv.
//
// Paged caches: with block_table, k_cache/v_cache are page pools (num_pages, page_size, Hk,
// D). On the CPU every page index a call uses is checked against the pool (the host reads
// the table); on CUDA the table is never read on the host and the kernels clamp indices
// into the pool (memory safe; a wrong index reads or overwrites another page).
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

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

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

// Both caches: (B, S_max, Hk, D), or page pools (num_pages, page_size, Hk, D) when paged;
// same shape, dtype and device, last dim contiguous.
void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, bool paged, const char* op) {
  check_device_supported(k_cache, "k_cache");
  check_float_dtype(k_cache, "k_cache");
  check_same_device(v_cache, k_cache, "v_cache", "k_cache");
  check_same_dtype(v_cache, k_cache, "v_cache", "k_cache");
  const char* shape = paged ? "(num_pages, page_size, Hk, D) (a page pool, as block_table is given)"
                            : "(B, S_max, Hk, D)";
  FA_CHECK_ARG(k_cache.dim() == 4, "fastattn.", op, ": k_cache must be 4-D ", shape, ", got shape ",
               k_cache.sizes());
  FA_CHECK_ARG(v_cache.sizes() == k_cache.sizes(), "fastattn.", op, ": v_cache must have k_cache's shape ",
               k_cache.sizes(), ", got ", v_cache.sizes());
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(v_cache, "v_cache");
  FA_CHECK_ARG(k_cache.size(2) > 0 && k_cache.size(3) > 0, "fastattn.", op,
               ": k_cache must have Hk > 0 and D > 0, got shape ", k_cache.sizes());
  if (paged)
    FA_CHECK_ARG(k_cache.size(1) > 0, "fastattn.", op, ": the page size (k_cache.shape[1]) must be >= 1, got shape ",
                 k_cache.sizes());
}

// block_table (B, max_pages_per_seq) int32 on the caches' device; returned with a unit
// stride along the pages (a copy only when the caller's has another).
at::Tensor check_block_table(const at::Tensor& block_table, const at::Tensor& k_cache, int64_t b, const char* op) {
  FA_CHECK_ARG(block_table.scalar_type() == at::kInt, "fastattn.", op, ": block_table must be int32, got ",
               block_table.scalar_type());
  FA_CHECK_ARG(block_table.device() == k_cache.device(), "fastattn.", op, ": block_table is on ",
               block_table.device(), " but must be on ", k_cache.device(), " with the caches");
  FA_CHECK_ARG(block_table.dim() == 2 && block_table.size(0) == b, "fastattn.", op,
               ": block_table must have shape (", b, ", max_pages_per_seq) (one row of page indices per "
               "sequence), got ", block_table.sizes());
  return block_table.size(1) > 1 && block_table.stride(1) != 1 ? block_table.contiguous() : block_table;
}

// CPU only (the host may read everything there): every page a sequence uses for its tokens
// [first[b], last[b]) must be an index into the pool.
void check_pages_cpu(const at::Tensor& block_table, int64_t page_size, int64_t num_pages,
                     const std::vector<int64_t>& first, const std::vector<int64_t>& last, const char* op) {
  const auto bt = block_table.accessor<int32_t, 2>();
  for (int64_t b = 0; b < static_cast<int64_t>(first.size()); ++b) {
    if (last[b] <= first[b]) continue;
    for (int64_t j = first[b] / page_size; j <= (last[b] - 1) / page_size; ++j) {
      const int64_t page = bt[b][j];
      FA_CHECK_ARG(page >= 0 && page < num_pages, "fastattn.", op, ": block_table[", b, ", ", j, "] = ", page,
                   " is not a page of the pool (num_pages = ", num_pages, "); sequence ", b, " uses its tokens [",
                   first[b], ", ", last[b], ") there");
    }
  }
}

void set_paging(DecodeParams* p, const std::optional<at::Tensor>& bt, const at::Tensor& pool) {
  if (!bt.has_value()) return;
  p->block_table = bt->data_ptr<int32_t>();
  p->block_table_batch_stride = bt->stride(0);
  p->page_size = pool.size(1);
  p->num_pages = pool.size(0);
}

// DecodeParams for q4 (B, Sq, H, D) and its outputs; the caches are set by the caller.
DecodeParams kvcache_params(const at::Tensor& q4, const at::Tensor& out, const at::Tensor& lse,
                            const int32_t* cache_seqlens, int64_t s_max, int64_t seqlens_k_add, int64_t window_left,
                            int64_t window_right, double softmax_scale, double softcap) {
  DecodeParams p;
  p.q = q4.data_ptr();
  set_strides(q4, &p.q_batch_stride, &p.q_row_stride, &p.q_head_stride);
  p.cache_seqlens = cache_seqlens;
  p.out = out.data_ptr();
  set_strides(out, &p.out_batch_stride, &p.out_row_stride, &p.out_head_stride);
  p.lse = lse.data_ptr<float>();
  p.b = q4.size(0);
  p.seqlen_q = q4.size(1);
  p.h = q4.size(2);
  p.d = q4.size(3);
  p.seqlen_k_max = s_max;
  p.seqlens_k_add = seqlens_k_add;
  // A side of the band at least s_max + seqlen_q wide excludes no key (a query's position is
  // in [len - seqlen_q, len), len <= s_max): unbounded. As in flash_params.h, this keeps huge
  // values (sys.maxsize for "unbounded") out of the kernels' band arithmetic, where
  // position + window would overflow.
  const int64_t no_bound = s_max + p.seqlen_q;
  p.window_left = window_left >= no_bound ? -1 : window_left;
  p.window_right = window_right >= no_bound ? -1 : window_right;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  p.dtype = to_dtype(q4.scalar_type());
  return p;
}

void set_cache_pointers(DecodeParams* p, const at::Tensor& kc, const at::Tensor& vc) {
  p->k_cache = kc.data_ptr();
  p->v_cache = vc.data_ptr();
  p->h_k = kc.size(2);
  set_strides(kc, &p->k_batch_stride, &p->k_row_stride, &p->k_head_stride);
  set_strides(vc, &p->v_batch_stride, &p->v_row_stride, &p->v_head_stride);
}

// The CPU kernel with its split-KV scratch; num_splits = 0 picks it from the shapes and the
// longest sequence's key count max_keys (query chunks count as more sequences:
// decode::cpu_query_chunk). Not from the capacity: a cache allocated for 2048 tokens holding
// 110 was cut into 16 splits of mostly empty items (4x the time of one).
void run_kvcache_cpu(DecodeParams& p, int64_t num_splits, int64_t max_keys) {
  const int64_t chunk = decode::cpu_query_chunk(p.h / p.h_k, p.h_k, p.d, p.seqlen_q);
  const int64_t chunks = (p.seqlen_q + chunk - 1) / chunk;
  p.num_splits = num_splits > 0 ? num_splits : decode_num_splits_cpu(p.b * chunks, p.h_k, max_keys);
  // (the split partials come from the CPU kernel's kept scratch: out_partial stays null here)
  decode_attention_cpu(p);
}

// The attention of decode_attention and attention_with_kvcache: q4 (B, Sq, H, D) over the
// cache rows [0, cache_seqlens[b] + seqlens_k_add) with the window (bottom-right aligned).
// Returns out (B, Sq, H, D) and lse (B, H, Sq).
std::tuple<at::Tensor, at::Tensor> kvcache_attention(const at::Tensor& q4, const at::Tensor& k_cache,
                                                     const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                     const std::optional<at::Tensor>& block_table_arg,
                                                     std::optional<double> softmax_scale, int64_t window_left,
                                                     int64_t window_right, int64_t seqlens_k_add,
                                                     int64_t num_splits, double softcap, const char* op) {
  const bool paged = block_table_arg.has_value();
  check_caches(k_cache, v_cache, paged, op);
  const int64_t b = q4.size(0), sq = q4.size(1), h = q4.size(2), d = q4.size(3);
  const int64_t h_k = k_cache.size(2);
  std::optional<at::Tensor> block_table;
  if (paged) block_table = check_block_table(*block_table_arg, k_cache, b, op);
  if (!paged)
    FA_CHECK_ARG(k_cache.size(0) == b, "fastattn.", op, ": k_cache has batch ", k_cache.size(0), " but q has batch ",
                 b);
  FA_CHECK_ARG(k_cache.size(3) == d, "fastattn.", op, ": k_cache has head dim ", k_cache.size(3),
               " but q has head dim ", d);
  FA_CHECK_ARG(h % h_k == 0, "fastattn.", op, ": the number of query heads (", h,
               ") must be a multiple of the number of kv heads (", h_k, ")");
  check_seqlens(cache_seqlens, q4, b, op);
  // A NaN or infinite scale (also one finite in double but not in the kernel's fp32) would
  // turn every output into NaN without an error.
  FA_CHECK_ARG(!softmax_scale.has_value() ||
                   (std::isfinite(*softmax_scale) && std::abs(*softmax_scale) <= std::numeric_limits<float>::max()),
               "fastattn.", op, ": softmax_scale must be finite in float32 (|softmax_scale| <= ",
               std::numeric_limits<float>::max(), "), got ", softmax_scale.value_or(0.0));
  FA_CHECK_ARG(num_splits >= 0 && num_splits <= decode::kMaxSplits, "fastattn.", op, ": num_splits must be in [0, ",
               decode::kMaxSplits, "] (0 = automatic), got ", num_splits);
  FA_CHECK_ARG(window_left >= -1 && window_right >= -1, "fastattn.", op,
               ": window sizes must be >= -1 (-1 = unbounded), got (", window_left, ", ", window_right, ")");
  check_softcap(softcap, (std::string("fastattn.") + op + ": ").c_str());
  // Capacity in tokens: S_max, or max_pages_per_seq * page_size.
  const int64_t s_max = paged ? block_table->size(1) * k_cache.size(1) : k_cache.size(1);

  at::Tensor out = empty_output({b, sq, h, d}, q4.options());
  at::Tensor lse = at::empty({b, h, sq}, q4.options().dtype(at::kFloat));
  if (b == 0 || h == 0 || sq == 0) return {out, lse};

  int64_t max_keys = 0;  // (CPU: the longest sequence's keys, for the split count)
  if (q4.is_cpu()) {
    const auto len = cache_seqlens.accessor<int32_t, 1>();  // (int32: check_seqlens; any stride)
    std::vector<int64_t> first(b, 0), last(b);
    for (int64_t i = 0; i < b; ++i) {
      last[i] = len[i] + seqlens_k_add;
      max_keys = std::max(max_keys, last[i]);
      FA_CHECK_ARG(len[i] >= 0 && last[i] <= s_max, "fastattn.", op, ": cache_seqlens",
                   seqlens_k_add > 0 ? " (plus the " + std::to_string(seqlens_k_add) + " new rows)" : std::string(),
                   " must be in [0, ", s_max, "] (the cache capacity",
                   paged ? " max_pages_per_seq * page_size" : " S_max", "), got cache_seqlens[", i, "] = ", len[i]);
    }
    if (paged) check_pages_cpu(*block_table, k_cache.size(1), k_cache.size(0), first, last, op);
  }

  const at::Tensor seqlens = cache_seqlens.contiguous();
  DecodeParams p = kvcache_params(q4, out, lse, seqlens.data_ptr<int32_t>(), s_max, seqlens_k_add, window_left,
                                  window_right,
                                  softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(double(d)), softcap);
  auto set_caches = [&p, &block_table](const at::Tensor& kc, const at::Tensor& vc) {
    set_cache_pointers(&p, kc, vc);
    set_paging(&p, block_table, kc);
  };
  set_caches(k_cache, v_cache);

  if (q4.is_cuda()) {
#ifdef FASTATTN_WITH_CUDA
    FA_CHECK_ARG(decode_cuda_supports_head_dim(d), "fastattn.", op, ": head dim ", d,
                 " is not supported on CUDA (supported: 64, 96, 128, 256)");
    const c10::cuda::CUDAGuard guard(q4.device());
    int num_sms = 0, smem_optin = 0, smem_per_sm = 0;
    FA_CUDA_CHECK_LAUNCH(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, q4.device().index()),
                         "device query");
    FA_CUDA_CHECK_LAUNCH(
        cudaDeviceGetAttribute(&smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, q4.device().index()),
        "device query");
    FA_CUDA_CHECK_LAUNCH(
        cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q4.device().index()),
        "device query");
    // The kernel this call would run (tensor-core or CUDA-core), before any copy below. On parts
    // with 99 KiB per block (sm_86 / sm_89 / sm_120) head dim 64 fits, and 128 on the tensor-core
    // kernel, which runs its 2-stage variant there (72 KiB; told the limit through the params).
    p.smem_per_block_optin = smem_optin;
    const int64_t smem_needed = decode_cuda_launch_smem_bytes(p);
    TORCH_CHECK(smem_optin >= smem_needed, "fastattn.", op, ": this call's decode kernel (head dim ", d,
                ", ", sq, " queries per sequence", softcap > 0 ? ", softcap" : "", ") needs ", smem_needed,
                " bytes of shared memory per block, this GPU allows ", smem_optin,
                " (GPUs with 99 KiB per block, sm_86 / sm_89 / sm_120, run the decode kernels at head dim 64, and "
                "at 128 with one query per sequence and no softcap)");
    // A cache view the 16-byte loads cannot use (odd strides or offset): run on a compact
    // copy instead. Correct, but it costs a full copy of the cache (or pool).
    auto check_limits = [&](const DecodeParams& params) {
      FA_CHECK_ARG(decode_cuda_supports_layout(params), "fastattn.", op,
                   ": shape outside the CUDA kernel's limits (B <= 65535, Hk x row slices <= 65535, "
                   "B * H * Sq < 2^31, cache capacity <= 2^30 tokens); got B = ", b, ", Hk = ", h_k, ", H = ", h,
                   ", Sq = ", sq, ", capacity = ", s_max);
    };
    at::Tensor kc = k_cache, vc = v_cache;
    if (!decode_cuda_supports_layout(p)) {
      // Only a misaligned view is cured by a compact copy: the shape limits are checked on
      // the copy's layout first, so a shape the kernel cannot take is refused before a copy
      // of the whole cache (or pool) is made.
      DecodeParams compact = p;
      const int64_t rows = k_cache.size(1), hd = k_cache.size(2) * k_cache.size(3);
      compact.k_cache = compact.v_cache = nullptr;
      compact.k_head_stride = compact.v_head_stride = k_cache.size(3);
      compact.k_row_stride = compact.v_row_stride = hd;
      compact.k_batch_stride = compact.v_batch_stride = rows * hd;
      check_limits(compact);
      kc = dense_aligned_copy(k_cache);
      vc = dense_aligned_copy(v_cache);
      set_caches(kc, vc);
    }
    check_limits(p);
    p.num_splits = num_splits > 0 ? num_splits : decode_num_splits_cuda(p, num_sms, smem_per_sm);
    at::Tensor out_partial, lse_partial;  // split-KV partials, merged by the combine kernel
    if (p.num_splits > 1) {
      out_partial = at::empty({p.num_splits, b, h, sq, d}, q4.options().dtype(at::kFloat));
      lse_partial = at::empty({p.num_splits, b, h, sq}, q4.options().dtype(at::kFloat));
      p.out_partial = out_partial.data_ptr<float>();
      p.lse_partial = lse_partial.data_ptr<float>();
    }
    FA_CUDA_CHECK_LAUNCH(decode_attention_cuda(p, current_stream(q4)), op);
#endif
  } else {
    run_kvcache_cpu(p, num_splits, max_keys);
  }
  return {out, lse};
}

void check_query(const at::Tensor& q, const at::Tensor& k_cache, const char* op) {
  check_device_supported(q, "q");
  check_same_device(q, k_cache, "q", "k_cache");
  check_float_dtype(q, "q", /*allow_fp32_cuda=*/false);
  check_same_dtype(k_cache, q, "k_cache", "q");
  check_last_dim_contiguous(q, "q");
  (void)op;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_short_query(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, double softmax_scale,
                                                              int64_t window_left, int64_t window_right,
                                                              double softcap) {
  // Every sequence has all Sk keys: the "cache" is k/v itself, read in place (no re-layout),
  // at lengths Sk (filled on q's device: no host sync on CUDA). The same code path on both
  // devices, so the CPU tests of the short-query cases run this glue too.
  const at::Tensor lengths = at::full({q.size(0)}, k.size(1), q.options().dtype(at::kInt));
  return kvcache_attention(q, k, v, lengths, std::nullopt, softmax_scale, window_left, window_right,
                           /*seqlens_k_add=*/0, /*num_splits=*/0, softcap, "flash_attention");
}

std::tuple<at::Tensor, at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache,
                                                    const at::Tensor& cache_seqlens,
                                                    std::optional<double> softmax_scale, int64_t num_splits,
                                                    const std::optional<at::Tensor>& block_table, double softcap) {
  check_query(q, k_cache, "decode_attention");
  FA_CHECK_ARG(q.dim() == 3 || (q.dim() == 4 && q.size(1) == 1),
               "fastattn.decode_attention: q must be (B, H, D) or (B, 1, H, D), got shape ", q.sizes());
  const at::Tensor q4 = q.dim() == 3 ? q.unsqueeze(1) : q;
  auto [out, lse] = kvcache_attention(q4, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, -1, -1, 0,
                                      num_splits, softcap, "decode_attention");
  return {q.dim() == 3 ? out.view({q.size(0), q.size(1), q.size(2)}) : out, lse.view({q4.size(0), q4.size(2)})};
}

std::tuple<at::Tensor, at::Tensor> attention_with_kvcache(const at::Tensor& q, const at::Tensor& k_cache,
                                                          const at::Tensor& v_cache,
                                                          const at::Tensor& cache_seqlens,
                                                          const std::optional<at::Tensor>& block_table,
                                                          std::optional<double> softmax_scale, int64_t window_left,
                                                          int64_t window_right, int64_t seqlens_k_add,
                                                          int64_t num_splits, double softcap) {
  check_query(q, k_cache, "attention_with_kvcache");
  FA_CHECK_ARG(q.dim() == 4, "fastattn.attention_with_kvcache: q must be (B, Sq, H, D), got shape ", q.sizes());
  // (<= int32 max as the lengths: cache_seqlens[b] + seqlens_k_add cannot overflow)
  FA_CHECK_ARG(seqlens_k_add >= 0 && seqlens_k_add <= std::numeric_limits<int32_t>::max(),
               "fastattn.attention_with_kvcache: seqlens_k_add must be in [0, 2^31), got ", seqlens_k_add);
  return kvcache_attention(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, window_left,
                           window_right, seqlens_k_add, num_splits, softcap, "attention_with_kvcache");
}

void append_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table_arg,
               bool check_capacity) {
  const bool paged = block_table_arg.has_value();
  check_caches(k_cache, v_cache, paged, "append_kv");
  check_writable(k_cache, "fastattn.append_kv", "k_cache");
  check_writable(v_cache, "fastattn.append_kv", "v_cache");
  check_same_device(k, k_cache, "k", "k_cache");
  check_same_device(v, k_cache, "v", "k_cache");
  check_same_dtype(k, k_cache, "k", "k_cache");
  check_same_dtype(v, k_cache, "v", "k_cache");
  const int64_t h_k = k_cache.size(2), d = k_cache.size(3);
  const int64_t b = paged ? block_table_arg->size(0) : k_cache.size(0);
  FA_CHECK_ARG(k.dim() == 4 && (paged || k.size(0) == b) && k.size(2) == h_k && k.size(3) == d,
               "fastattn.append_kv: k must be (B, Sn, Hk, D) = (", paged ? "B" : std::to_string(b), ", Sn, ", h_k,
               ", ", d, ") to match k_cache, got shape ", k.sizes());
  FA_CHECK_ARG(v.sizes() == k.sizes(), "fastattn.append_kv: v must have k's shape ", k.sizes(), ", got ",
               v.sizes());
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  std::optional<at::Tensor> block_table;
  if (paged) block_table = check_block_table(*block_table_arg, k_cache, k.size(0), "append_kv");
  check_seqlens(cache_seqlens, k_cache, k.size(0), "append_kv");
  // The caches are written in place while k, v, cache_seqlens and block_table are read.
  constexpr const char* op = "fastattn.append_kv";
  check_no_internal_overlap(k_cache, op, "k_cache");
  check_no_internal_overlap(v_cache, op, "v_cache");
  check_no_overlap(k_cache, "k_cache", v_cache, "v_cache", op);
  for (const auto& [cache, cache_name] : {NamedTensor{k_cache, "k_cache"}, NamedTensor{v_cache, "v_cache"}}) {
    check_no_overlap(k, "k", cache, cache_name, op);
    check_no_overlap(v, "v", cache, cache_name, op);
    check_no_overlap(cache_seqlens, "cache_seqlens", cache, cache_name, op, /*exact=*/false);
    if (paged) check_no_overlap(*block_table_arg, "block_table", cache, cache_name, op, /*exact=*/false);
  }
  const int64_t batch = k.size(0), sn = k.size(1);
  const int64_t s_max = paged ? block_table->size(1) * k_cache.size(1) : k_cache.size(1);
  if (batch == 0) return;

  // Capacity: every sequence needs 0 <= cache_seqlens[b] and cache_seqlens[b] + Sn <= S_max
  // (max_pages_per_seq * page_size when paged), and on the CPU the pages written must exist.
  // On CUDA this reads cache_seqlens on the host: one sync (min and max copied together),
  // skipped with check_capacity=False (the caller guarantees the lengths: the model's decode
  // step) or while capturing a graph. The CPU always checks: there it costs no sync.
  if ((check_capacity || !k_cache.is_cuda()) && !is_capturing(k_cache)) {
    const auto [lo_t, hi_t] = at::aminmax(cache_seqlens);
    const at::Tensor both = at::stack({lo_t, hi_t}).to(at::kCPU, at::kLong);
    const int64_t lo_v = both[0].item<int64_t>(), hi_v = both[1].item<int64_t>();
    FA_CHECK_ARG(lo_v >= 0, "fastattn.append_kv: cache_seqlens must be >= 0, got a minimum of ", lo_v);
    FA_CHECK_ARG(hi_v + sn <= s_max, "fastattn.append_kv: appending ", sn, " rows at cache_seqlens (max ", hi_v,
                 ") exceeds the cache capacity ", paged ? "max_pages_per_seq * page_size = " : "S_max = ", s_max);
  }
  if (sn == 0) return;  // (nothing to write; the lengths were still checked, as for any Sn)
  if (paged && k_cache.is_cpu()) {
    const at::Tensor seq = cache_seqlens.to(at::kLong);
    std::vector<int64_t> first(seq.data_ptr<int64_t>(), seq.data_ptr<int64_t>() + batch), last(first);
    for (auto& x : last) x += sn;
    check_pages_cpu(*block_table, k_cache.size(1), k_cache.size(0), first, last, "append_kv");
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
  p.b = batch;
  p.seqlen_new = sn;
  p.seqlen_k_max = s_max;
  p.h_k = h_k;
  p.d = d;
  if (paged) {
    p.block_table = block_table->data_ptr<int32_t>();
    p.block_table_batch_stride = block_table->stride(0);
    p.page_size = k_cache.size(1);
    p.num_pages = k_cache.size(0);
  }
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
                        const at::Tensor& v, const at::Tensor& cache_seqlens,
                        const std::optional<at::Tensor>& block_table, bool check_capacity) {
  check_inplace_not_differentiable(
      "fastattn.append_kv", {{k_cache, "k_cache"}, {v_cache, "v_cache"}, {k, "k"}, {v, "v"}},
      "it writes the cache for inference only, so call it under torch.no_grad() or "
      "torch.inference_mode(), or pass detached tensors");
  at::AutoDispatchBelowAutograd guard;
  append_kv_op().call(k_cache, v_cache, k, v, cache_seqlens, block_table, check_capacity);
}

void append_kv_inplace_or_view(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& cache_seqlens,
                               const std::optional<at::Tensor>& block_table, bool check_capacity) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    append_kv_op().call(k_cache, v_cache, k, v, cache_seqlens, block_table, check_capacity);
  }
  bump_versions(k_cache, v_cache);
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) { m.impl("append_kv", &fastattn::append_kv_autograd); }
TORCH_LIBRARY_IMPL(fastattn, ADInplaceOrView, m) { m.impl("append_kv", &fastattn::append_kv_inplace_or_view); }
