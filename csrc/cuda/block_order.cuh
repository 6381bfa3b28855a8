// block_order.cuh — the order in which the attention kernels' blocks of uneven cost run.
//
// Under a causal mask the blocks of one (head, batch) pair differ in cost by up to the number of
// tiles: forward query block m sees m + 1 key blocks, backward key block n sees the queries
// from n on. Blocks are handed out roughly in linear order (x fastest). Running each pair's
// blocks heaviest first (the plain grid) still lets the last pairs' heaviest blocks start near
// the end, and the GPU idles while they finish: a list-scheduling simulation of the 8k-token
// causal benchmark (2 x 16 heads, 264 block slots) puts the plain order 14% over the ideal
// makespan for the forward and ~6% for the backward kernels. Here the pairs are taken in
// sections of `section` pairs; within a section blocks go by rank (0 = heaviest) and then by
// pair, so every section runs heaviest first across all of its pairs and the whole grid ends
// on its lightest blocks (same simulation: <= 0.5% over with sections of 4 or more pairs).
// Blocks that run together belong to one section; the host sizes it so that what they share
// (K/V for the forward and dQ, Q/dO for dK/dV) stays within an L2 budget. section = 1 is the
// plain order.
#pragma once

#include <cstdint>

namespace fastattn {

struct BlockOrder {
  int rank;  // 0 = the pair's heaviest tile
  int pair;  // which (head, batch)-like pair
};

// The (rank, pair) of linear block `linear` of a grid of num_tiles x num_pairs blocks. A
// bijection of [0, num_tiles * num_pairs) for any section >= 1. 32-bit unsigned arithmetic
// (the host uses sections only for grids below 2^31 blocks): 64-bit division costs the
// register-bound kernels spills.
__host__ __device__ inline BlockOrder block_order(uint32_t linear, uint32_t num_tiles, uint32_t num_pairs,
                                                  uint32_t section) {
  const uint32_t first = linear / (section * num_tiles) * section;  // the section's first pair
  const uint32_t len = num_pairs - first < section ? num_pairs - first : section;
  const uint32_t r = linear - first * num_tiles;
  return {static_cast<int>(r / len), static_cast<int>(first + r % len)};
}

// The linear index of this block (x fastest), for block_order.
#define FASTATTN_LINEAR_BLOCK() (blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z))

// Pairs per section: as many as share `budget_bytes` of shared reads (at least 1, at most all);
// 1 (the plain order) when the grid has 2^31 blocks or more.
inline int64_t block_order_section(int64_t num_tiles, int64_t num_pairs, int64_t shared_bytes_per_pair,
                                   int64_t budget_bytes) {
  if (num_tiles * num_pairs >= (int64_t{1} << 31)) return 1;
  const int64_t per = shared_bytes_per_pair > 0 ? shared_bytes_per_pair : 1;
  const int64_t s = budget_bytes / per;
  return s < 1 ? 1 : (s > num_pairs ? num_pairs : s);
}

// Default budget: well inside the L2 of an A100 (40 MB) and of an H100 / H200 (50 / 60 MB). The
// CPU emulations override it to test small sections.
#ifndef FASTATTN_SCHED_L2_BYTES
#define FASTATTN_SCHED_L2_BYTES (int64_t{16} << 20)
#endif

}  // namespace fastattn
