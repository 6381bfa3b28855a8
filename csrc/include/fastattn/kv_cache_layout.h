// kv_cache_layout.h — where row t of sequence b lives in a KV cache, contiguous or paged.
// The one address function of every kernel that reads or writes a cache (CPU decode, CUDA
// decode and append, their emulation in tests/), so the layouts cannot drift apart.
// Plain C++17, host and device.
//
//   contiguous: cache (b, seqlen_k_max, h_k, d)      -> b * batch_stride + t * row_stride
//   paged:      pool (num_pages, page_size, h_k, d)  -> page * batch_stride + (t % page_size) * row_stride
//               with page = block_table[b * block_table_batch_stride + t / page_size],
//               clamped to [0, num_pages) so that a bad table entry can never address memory
//               outside the pool (the CPU binding rejects such entries before any kernel runs;
//               on CUDA the host never reads the table, so this clamp is the guarantee).
// The head offset (h * head_stride) is added by the caller.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_KV_HD __host__ __device__ __forceinline__
#else
#define FASTATTN_KV_HD inline
#endif

namespace fastattn {

struct KvLayout {
  int64_t batch_stride;  // contiguous: stride of the batch dim; paged: stride of one page
  int64_t row_stride;
  const int32_t* block_table;  // nullptr: contiguous
  int64_t block_table_batch_stride;
  int64_t page_size;
  int64_t num_pages;

  FASTATTN_KV_HD int64_t row_offset(int64_t b, int64_t t) const {
    if (block_table == nullptr) return b * batch_stride + t * row_stride;
    int64_t page = block_table[b * block_table_batch_stride + t / page_size];
    page = page < 0 ? 0 : (page >= num_pages ? num_pages - 1 : page);
    return page * batch_stride + (t % page_size) * row_stride;
  }
};

}  // namespace fastattn
