// decode_split.h — how decode attention splits one sequence's keys between split-KV work
// items. Shared by the CPU kernel (csrc/cpu/decode.cpp), the CUDA kernel (csrc/cuda/decode.cu)
// and tests/test_decode.py (which checks a Python transcription of the same formula), so
// every backend cuts the same way. Plain C++17, host and device.
//
// Split-KV is sized per sequence from its own valid length `len` (read by the kernel from
// cache_seqlens on the device, never by the host): each of the `num_splits` splits gets
// ceil(len / num_splits) keys rounded up to whole key blocks of the kernel, so a ragged batch
// spreads every sequence over all splits instead of leaving the splits of a short sequence
// empty while a long one runs alone. Splits past the end are empty (begin == end).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_DECODE_HD __host__ __device__ __forceinline__
#else
#define FASTATTN_DECODE_HD inline
#endif

namespace fastattn {
namespace decode {

// Upper bound of num_splits (the split-KV scratch is num_splits x b x h x (d + 1) fp32).
constexpr int64_t kMaxSplits = 128;

// Keys [*begin, *end) of a sequence of valid length `len` that split `split` of
// `num_splits` covers, in whole blocks of `key_block` keys (the last one may be partial).
FASTATTN_DECODE_HD void split_range(int64_t len, int64_t num_splits, int64_t split,
                                    int64_t key_block, int64_t* begin, int64_t* end) {
  const int64_t per_split = (len + num_splits - 1) / num_splits;
  const int64_t chunk = (per_split + key_block - 1) / key_block * key_block;
  const int64_t b = split * chunk;
  *begin = b < len ? b : len;
  *end = b + chunk < len ? b + chunk : len;
}

// Split-KV factor for a grid of `blocks` (batch x kv heads x head slices) on a device that
// runs `slots` blocks at once: with at least ~80% of a wave already, no split; otherwise
// the most splits that still fit in ONE wave (floor, so e.g. 8 kv heads on 132 SMs take 16
// splits = 128 blocks, not 17 = 136 blocks, a second wave of 4), but at least 2 key blocks
// per split so partial writes and the combine stay small next to the cache reads.
FASTATTN_DECODE_HD int64_t num_splits_for_slots(int64_t blocks, int64_t slots, int64_t seqlen_k_max,
                                                int64_t key_block) {
  if (blocks < 1) blocks = 1;
  if (blocks * 5 >= slots * 4) return 1;
  int64_t n = slots / blocks;
  const int64_t tiles = (seqlen_k_max + key_block - 1) / key_block;
  if (n > tiles / 2) n = tiles / 2;
  if (n > kMaxSplits) n = kMaxSplits;
  return n < 1 ? 1 : n;
}

// Multi-query (attention_with_kvcache) on the CPU: a work item handles a chunk of the
// seqlen_q query rows of one sequence for all h_k kv heads, holding chunk * group * h_k
// fp32 query rows and as many output rows. The chunk keeps those two buffers within
// ~512 KiB each (in L2 next to the streamed K/V block on 1-2 MiB-L2 cores); every chunk
// reads (and, on the GEMM path, stages) the whole visible cache again, so fewer, larger
// chunks win: 128 KiB chunks were 1.2-1.4x slower at B8 L4096 H32/8 D128 with 16 and 128
// queries (AVX-512, 2 threads). Decode (seqlen_q = 1) is one chunk. Shapes only, so the work
// split and the bits never depend on the machine.
FASTATTN_DECODE_HD int64_t cpu_query_chunk(int64_t group, int64_t h_k, int64_t d, int64_t seqlen_q) {
  constexpr int64_t kRowBudgetFloats = 131072;
  int64_t per_query = group * h_k * d;
  if (per_query < 1) per_query = 1;
  int64_t chunk = kRowBudgetFloats / per_query;
  if (chunk < 1) chunk = 1;
  return chunk < seqlen_q ? chunk : (seqlen_q < 1 ? 1 : seqlen_q);
}

}  // namespace decode
}  // namespace fastattn
