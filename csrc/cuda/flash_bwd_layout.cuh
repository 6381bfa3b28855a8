// flash_bwd_layout.cuh — the index math of the FlashAttention backward kernels, in one place.
//
// Everything here is a pure integer function (no CUDA intrinsics), compiled as
// __host__ __device__ by nvcc and as plain C++ by a host compiler. flash_bwd.cu uses these
// functions and nothing else for: the swizzled shared-memory layout, the lane -> address
// mapping of every ldmatrix, the lane -> (row, col) mapping of the mma accumulators, the
// masking rule and the tile ranges a thread block loops over. tests/test_flash_bwd_layout.py
// compiles this header with g++, dumps the tables, and emulates the warp-level products
// (ldmatrix + mma.sync semantics taken from the PTX ISA) and the tile iteration in numpy;
// tests/test_flash_bwd_emulated.py runs the kernels themselves on an emulated GPU.
//
// ---------------------------------------------------------------------------------------
// PTX facts relied on (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type" and "ldmatrix"); g = lane >> 2 (groupID), t = lane & 3 (threadID_in_group):
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32  D = A * B + C
//   A (16x16, 4 x .b32 = 8 halves a0..a7, low half = lower index):
//     reg0 = A[g][2t..2t+1]      reg1 = A[g+8][2t..2t+1]
//     reg2 = A[g][2t+8..2t+9]    reg3 = A[g+8][2t+8..2t+9]
//   B (16x8, 2 x .b32):  reg0 = B[2t..2t+1][g]   reg1 = B[2t+8..2t+9][g]
//   C/D (16x8 fp32, 4 floats): c0,c1 = C[g][2t..2t+1]  c2,c3 = C[g+8][2t..2t+1]
//   ldmatrix.sync.aligned.m8n8.x4.shared.b16 {r0..r3}, [addr]:
//     lane 8*i + r supplies the address of row r (16 contiguous bytes) of matrix i;
//     without .trans, ri of lane l = M_i[l/4][2(l%4) .. 2(l%4)+1]
//     with    .trans, ri of lane l = { M_i[2(l%4)][l/4], M_i[2(l%4)+1][l/4] }
// Consequences used by the kernels (all verified by the numpy emulation):
//   * A operand from a row-major [m][k] smem tile: matrices i = (rows +8*(i&1), cols +8*(i>>1))
//     -> lane address (a_row(lane), a_col(lane)); r0..r3 = reg0..reg3 of A.
//   * B operand for two adjacent n8 tiles from smem stored [n][k] (e.g. K[key][d] for
//     S = Q K^T): no transpose; matrices i = (n +8*(i>>1), k +8*(i&1)) -> lane address
//     (bnk_row = n offset, bnk_col = k offset); r0,r1 = B of n-tile 0, r2,r3 = n-tile 1.
//   * B operand for two adjacent n8 tiles from smem stored [k][n] (e.g. dO[query][d] for
//     dV = P^T dO, K[key][d] for dQ = dS K): ldmatrix.trans; matrices i = (k +8*(i&1),
//     n +8*(i>>1)) -> lane address (bkn_row = k offset, bkn_col = n offset); r0,r1 = B of
//     n-tile 0, r2,r3 = n-tile 1.
//   * Accumulator -> A operand with no data movement: the C fragments of n-tiles 2j and
//     2j+1 (16 x 16 together) are exactly the A fragment of k-slice j:
//     reg0 = pack(C[2j].c0, c1), reg1 = pack(C[2j].c2, c3), reg2 = pack(C[2j+1].c0, c1),
//     reg3 = pack(C[2j+1].c2, c3). This is how P^T / dS^T (dK/dV kernel) and dS (dQ kernel)
//     feed the next mma: the dK/dV kernel computes S^T = K Q^T directly (rows = keys), so
//     the transposes of P and dS never exist as a separate step.
// ---------------------------------------------------------------------------------------
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_BWD_HD __host__ __device__ __forceinline__
#else
#define FASTATTN_BWD_HD inline
#endif

namespace fastattn {
namespace bwd_layout {

// Shared-memory tiles are [rows][D] 16-bit elements, D one of 32, 64, 96, 128, 192, 256 (a row
// is D/8 chunks of 16 bytes). An ldmatrix phase reads the same logical chunk of 8 consecutive
// rows; the swizzle must land those 8 reads on 8 different 16-byte bank groups (the 128-byte
// bank window) and keep every chunk inside its own row (a permutation of the row's chunks):
//   * D % 64 == 0 (8k chunks per row, so a row starts on a 128-byte boundary): chunk c of row
//     r is stored at chunk c ^ (r & 7). The XOR permutes the low 3 bits of the chunk index,
//     i.e. within aligned groups of 8 chunks, which the row has a whole number of.
//   * D = 32 or 96 (4 or 12 chunks: rows alternate between the two 64-byte halves of the
//     window): chunk c of row r is stored at c ^ ((r >> 1) & 3). The XOR stays inside aligned
//     groups of 4 chunks (in-row), r & 1 picks the half of the window and (r >> 1) & 3 the
//     16-byte group inside it, so 8 consecutive rows again hit 8 distinct bank groups.
// cp.async writes whole 16-byte chunks (the set of chunks of an aligned group is unchanged by
// the XOR, so 8 consecutive chunk copies stay conflict-free too).
template <int D>
FASTATTN_BWD_HD int swz(int row, int col) {
  static_assert(D % 64 == 0 || D % 64 == 32, "head dim: a multiple of 32");
  if constexpr (D % 64 == 0) {
    return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
  } else {
    return row * D + ((((col >> 3) ^ ((row >> 1) & 3))) << 3) + (col & 7);
  }
}

// ldmatrix.x4 lane -> (row, col) offsets inside a 16 x 16 block, see the header comment.
FASTATTN_BWD_HD int a_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
FASTATTN_BWD_HD int a_col(int lane) { return (lane >> 4) * 8; }
FASTATTN_BWD_HD int bnk_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }    // n offset
FASTATTN_BWD_HD int bnk_col(int lane) { return ((lane >> 3) & 1) * 8; }           // k offset
FASTATTN_BWD_HD int bkn_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }  // k
FASTATTN_BWD_HD int bkn_col(int lane) { return (lane >> 4) * 8; }                 // n offset

// Accumulator element e (0..3) of `lane` inside a 16 x 8 C tile.
FASTATTN_BWD_HD int c_row(int lane, int e) { return (lane >> 2) + (e >> 1) * 8; }
FASTATTN_BWD_HD int c_col(int lane, int e) { return (lane & 3) * 2 + (e & 1); }

// ---- tile sizes (the kernels' configuration, here so the host-side test sees it) --------
// The head dims the CUDA backward supports (one flash_bwd_hdim<D>.cu each).
FASTATTN_BWD_HD constexpr bool head_dim_supported(int64_t d) {
  return d == 32 || d == 64 || d == 96 || d == 128 || d == 192 || d == 256;
}
// dK/dV kernel: key rows per block, query rows per inner tile, and the number of warps that
// share one 16-key-row slice, each owning D / dkdv_d_split columns of its dK and dV (1 up to
// d128; 2 at d192 / d256, whose full 16 x D fp32 dK + dV accumulators, D floats per thread,
// would not fit in registers). Warps = dkdv_block_n / 16 * dkdv_d_split = 8 at every head dim.
FASTATTN_BWD_HD constexpr int dkdv_block_n(int d) { return d <= 128 ? 128 : 64; }
FASTATTN_BWD_HD constexpr int dkdv_d_split(int d) { return d <= 128 ? 1 : 2; }
FASTATTN_BWD_HD constexpr int dkdv_block_m(int d) {
  return d <= 64 ? 64 : (d == 256 ? 16 : 32);
}
// dQ kernel: query rows per block (4 row warps x 16), key rows per inner tile, and warps per
// 16 query rows (each owning D / dq_d_split columns of dQ: 2 at d256 only, where the 16 x 256
// fp32 accumulator, 128 floats per thread, spilled 28-32 B even with 16-key tiles).
FASTATTN_BWD_HD constexpr int dq_block_m(int /*d*/) { return 64; }
FASTATTN_BWD_HD constexpr int dq_block_n(int d) { return d <= 128 ? 64 : (d == 192 ? 16 : 32); }
FASTATTN_BWD_HD constexpr int dq_d_split(int d) { return d == 256 ? 2 : 1; }
// delta kernel: lanes per row (the largest power of two dividing the D / 8 16-byte chunks, so
// a row's lanes sit inside one warp and reduce with xor shuffles), D / 8 / lanes chunks each.
FASTATTN_BWD_HD constexpr int delta_lanes(int d) { return (d / 8) & -(d / 8); }

// ---- GQA / MQA split of the dK/dV kernel -------------------------------------------------
// The dK/dV kernel runs one block per (key tile, kv head, batch) and loops over the query
// heads of the kv head's group. With few kv heads (MQA, small batch, short keys) that grid
// can be smaller than the GPU, so the group is split over `splits` blocks of at most
// `heads_per_split` heads each; every split writes fp32 partial dK/dV to the workspace and a
// reduce kernel adds the splits in index order (deterministic). The choice depends on the
// shape only (never on the device), so results are identical on every GPU.
constexpr int kDkdvTargetBlocks = 264;  // two waves of a 132-SM H100 at one block per SM

FASTATTN_BWD_HD int dkdv_num_splits(int64_t b, int64_t h, int64_t h_k, int64_t seqlen_k, int d,
                                    int* heads_per_split) {
  const int64_t group = h_k > 0 ? h / h_k : 1;
  const int64_t blocks = (seqlen_k + dkdv_block_n(d) - 1) / dkdv_block_n(d) * h_k * b;
  if (group <= 1 || blocks <= 0 || blocks >= kDkdvTargetBlocks) {
    *heads_per_split = static_cast<int>(group);
    return 1;
  }
  int64_t want = (kDkdvTargetBlocks + blocks - 1) / blocks;
  if (want > group) want = group;
  const int64_t hps = (group + want - 1) / want;
  *heads_per_split = static_cast<int>(hps);
  return static_cast<int>((group + hps - 1) / hps);
}

// ---- variable-length (packed) batches ------------------------------------------------------
// Rows [*start, *start + *len) of sequence i of a packed tensor of `total` rows, from its
// cu_seqlens (FlashFwdParams), memory-safe for ANY content since nothing validates cu_seqlens
// on the device side: start clamped to [0, total], end to [start, total], length to the launch
// bound max_len (the grid was sized from it). Well-formed cu_seqlens pass through unchanged.
FASTATTN_BWD_HD void varlen_bounds(const int32_t* cu, int64_t i, int64_t total, int64_t max_len,
                                   int64_t* start, int* len) {
  int64_t s = cu[i];
  s = s < 0 ? 0 : (s > total ? total : s);
  int64_t e = cu[i + 1];
  e = e < s ? s : (e > total ? total : e);
  *start = s;
  *len = static_cast<int>(e - s < max_len ? e - s : max_len);
}

// ---- masking ----------------------------------------------------------------------------
// The forward's rule (params.h): query i sees key j iff j < seqlen_k, i < seqlen_q and
//   j >= i + off - wl (wl >= 0), j <= i + off + wr (wr >= 0), off = seqlen_k - seqlen_q.
// wl/wr are clamped to [-1, seqlen_q + seqlen_k] by the launcher (a larger window is the
// same as an unbounded one), so all of this fits in int for seqlens below 2^29.
struct MaskInfo {
  int seqlen_q, seqlen_k, wl, wr;
};

FASTATTN_BWD_HD bool visible(const MaskInfo& m, int i, int j) {
  const int off = m.seqlen_k - m.seqlen_q;
  return i < m.seqlen_q && j < m.seqlen_k && (m.wl < 0 || j >= i + off - m.wl) &&
         (m.wr < 0 || j <= i + off + m.wr);
}

// Does the tile [m0, m0 + bm) x [n0, n0 + bn) need per-element masking? false only when every
// (i, j) of the tile is visible (then the masking code is skipped for the tile).
FASTATTN_BWD_HD bool tile_needs_mask(const MaskInfo& m, int m0, int bm, int n0, int bn) {
  const int off = m.seqlen_k - m.seqlen_q;
  if (m0 + bm > m.seqlen_q || n0 + bn > m.seqlen_k) return true;
  // Hardest pair for the right bound: largest key, smallest query; left bound: the reverse.
  if (m.wr >= 0 && n0 + bn - 1 > m0 + off + m.wr) return true;
  if (m.wl >= 0 && n0 < m0 + bm - 1 + off - m.wl) return true;
  return false;
}

// dK/dV kernel: the query blocks [*begin, *end) (of size bm) that can see any key of the key
// tile [n0, n0 + bn). Visible rows i for some key j in the tile satisfy
//   i >= j_min - off - wr  (wr >= 0)   and   i <= j_max - off + wl  (wl >= 0).
FASTATTN_BWD_HD void m_block_range(const MaskInfo& m, int n0, int bn, int bm, int* begin,
                                   int* end) {
  const int off = m.seqlen_k - m.seqlen_q;
  const int j_max = (n0 + bn < m.seqlen_k ? n0 + bn : m.seqlen_k) - 1;
  int lo = 0, hi = m.seqlen_q;  // rows [lo, hi)
  if (m.wr >= 0 && n0 - off - m.wr > lo) lo = n0 - off - m.wr;
  if (m.wl >= 0 && j_max - off + m.wl + 1 < hi) hi = j_max - off + m.wl + 1;
  if (j_max < n0 || hi <= lo) {
    *begin = 0;
    *end = 0;
    return;
  }
  *begin = lo / bm;
  *end = (hi + bm - 1) / bm;
}

// dQ kernel: the key blocks [*begin, *end) (of size bn) that the query tile [m0, m0 + bm)
// can see. Visible keys for some row i satisfy
//   j >= i_min + off - wl  (wl >= 0)   and   j <= i_max + off + wr  (wr >= 0).
FASTATTN_BWD_HD void n_block_range(const MaskInfo& m, int m0, int bm, int bn, int* begin,
                                   int* end) {
  const int off = m.seqlen_k - m.seqlen_q;
  const int i_max = (m0 + bm < m.seqlen_q ? m0 + bm : m.seqlen_q) - 1;
  int lo = 0, hi = m.seqlen_k;  // keys [lo, hi)
  if (m.wl >= 0 && m0 + off - m.wl > lo) lo = m0 + off - m.wl;
  if (m.wr >= 0 && i_max + off + m.wr + 1 < hi) hi = i_max + off + m.wr + 1;
  if (i_max < m0 || hi <= lo) {
    *begin = 0;
    *end = 0;
    return;
  }
  *begin = lo / bn;
  *end = (hi + bn - 1) / bn;
}

}  // namespace bwd_layout
}  // namespace fastattn
