"""Host-side emulation of the CUDA FlashAttention backward's index math (no GPU needed).

csrc/cuda/flash_bwd_layout.cuh holds every index function flash_bwd.cu uses: the swizzled
shared-memory layout, the lane -> address mapping of each ldmatrix, the accumulator
(lane, element) -> (row, col) mapping, the masking rule, the tile ranges and the tile sizes.
This test compiles that header with the host C++ compiler, dumps the tables, and then:

  * checks the swizzle is a bijection that keeps 16-byte chunks whole and makes every
    ldmatrix phase (8 row addresses) hit 8 distinct 16-byte bank groups;
  * emulates ldmatrix / ldmatrix.trans / mma.sync.m16n8k16 from the PTX ISA's definitions
    (written here independently of the header) and runs the kernels' warp-level products
    (warp_gemm_abt, warp_gemm_xb: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q and
    the dQ kernel's S = Q K^T, dP = dO V^T, dQ += dS K) on random swizzled tiles, comparing
    with plain matmuls;
  * checks, over many (seqlen_q, seqlen_k, window) cases, that the tile ranges cover every
    visible (query, key) pair and that tiles run without masking are fully visible;
  * runs the kernels' block-level algorithm (tile loops, GQA group loop, lse/-inf handling,
    zero-filled tails, where the scale is applied) in numpy and compares dq/dk/dv with the
    analytic gradient of dense attention.

What it cannot check: anything the CUDA compiler or hardware does (asm operand order,
cp.async/barrier ordering, fp16/bf16 rounding). Those run for the first time on a GPU.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

# Matrix products go through einsum's own loops, not BLAS: the matrices are tiny, and a
# multi-threaded BLAS on a loaded CI machine makes them 40x slower.
def mm(a, b):
    return np.einsum("ij,jk->ik", a, b)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "cuda", "flash_bwd_layout.cuh")

DRIVER = r"""
#include <cstdio>
#include <iostream>
#include <string>
#include "flash_bwd_layout.cuh"
using namespace fastattn::bwd_layout;

template <int D> void dump_swz() {
  std::printf("\"swz%d\": [", D);
  for (int r = 0; r < 128; ++r)
    for (int c = 0; c < D; ++c) std::printf("%s%d", (r || c) ? "," : "", swz<D>(r, c));
  std::printf("],\n");
}

int main() {
  std::printf("{\n");
  const char* names[] = {"a_row", "a_col", "bnk_row", "bnk_col", "bkn_row", "bkn_col"};
  int (*fns[])(int) = {a_row, a_col, bnk_row, bnk_col, bkn_row, bkn_col};
  for (int f = 0; f < 6; ++f) {
    std::printf("\"%s\": [", names[f]);
    for (int l = 0; l < 32; ++l) std::printf("%s%d", l ? "," : "", fns[f](l));
    std::printf("],\n");
  }
  std::printf("\"c_row\": [");
  for (int l = 0; l < 32; ++l)
    for (int e = 0; e < 4; ++e) std::printf("%s%d", (l || e) ? "," : "", c_row(l, e));
  std::printf("],\n\"c_col\": [");
  for (int l = 0; l < 32; ++l)
    for (int e = 0; e < 4; ++e) std::printf("%s%d", (l || e) ? "," : "", c_col(l, e));
  std::printf("],\n");
  dump_swz<32>();
  dump_swz<64>();
  dump_swz<96>();
  dump_swz<128>();
  dump_swz<192>();
  dump_swz<256>();
  std::printf("\"cfg\": {");
  for (int d : {32, 64, 96, 128, 192, 256})
    std::printf("%s\"%d\": [%d, %d, %d, %d, %d, %d]", d == 32 ? "" : ", ", d, dkdv_block_m(d),
                dkdv_block_n(d), dq_block_m(d), dq_block_n(d), dkdv_d_split(d), dq_d_split(d));
  std::printf("},\n\"supported\": [");
  for (int d = 0; d <= 512; ++d)
    if (head_dim_supported(d)) std::printf("%s%d", d == 32 ? "" : ", ", d);
  std::printf("],\n\"delta_lanes\": {");
  for (int d : {32, 64, 96, 128, 192, 256})
    std::printf("%s\"%d\": %d", d == 32 ? "" : ", ", d, delta_lanes(d));
  std::printf("},\n");
  // stdin: "S n" then n lines "b h h_k seqlen_k d" (GQA splits), then lines
  // "sq sk wl wr bm bn dump_vis" (masks and tile ranges).
  std::string tag;
  int nsplit = 0;
  std::cin >> tag >> nsplit;
  std::printf("\"splits\": [");
  for (int s = 0; s < nsplit; ++s) {
    long long b, h, hk, skl;
    int d, hps = -1;
    std::cin >> b >> h >> hk >> skl >> d;
    const int splits = dkdv_num_splits(b, h, hk, skl, d, &hps);
    std::printf("%s[%d, %d]", s ? "," : "", splits, hps);
  }
  std::printf("],\n\"cases\": [\n");
  int sq, sk, wl, wr, bm, bn, dump_vis, first = 1;
  while (std::cin >> sq >> sk >> wl >> wr >> bm >> bn >> dump_vis) {
    MaskInfo m{sq, sk, wl, wr};
    const int nmb = (sq + bm - 1) / bm, nnb = (sk + bn - 1) / bn;
    std::printf("%s{\"vis\": \"", first ? "" : ",\n");
    first = 0;
    for (int i = 0; i < sq && dump_vis; ++i)
      for (int j = 0; j < sk; ++j) std::printf("%d", visible(m, i, j) ? 1 : 0);
    std::printf("\", \"mrange\": [");
    for (int nb = 0; nb < nnb; ++nb) {
      int b0, b1;
      m_block_range(m, nb * bn, bn, bm, &b0, &b1);
      std::printf("%s[%d,%d]", nb ? "," : "", b0, b1);
    }
    std::printf("], \"nrange\": [");
    for (int mb = 0; mb < nmb; ++mb) {
      int b0, b1;
      n_block_range(m, mb * bm, bm, bn, &b0, &b1);
      std::printf("%s[%d,%d]", mb ? "," : "", b0, b1);
    }
    std::printf("], \"needs_mask\": \"");
    for (int mb = 0; mb < nmb; ++mb)
      for (int nb = 0; nb < nnb; ++nb)
        std::printf("%d", tile_needs_mask(m, mb * bm, bm, nb * bn, bn) ? 1 : 0);
    std::printf("\"}");
  }
  std::printf("\n]}\n");
  return 0;
}
"""

SEQLENS = [1, 17, 64, 97, 130, 200]
WINDOWS = [(-1, -1), (-1, 0), (5, 0), (40, 3), (0, 0), (-1, 7), (3, -1), (250, 250)]
BLOCKS = [(64, 128), (32, 128), (64, 64)]
# (bm, bn) of the d192 / d256 kernels (dK/dV 32 x 64 and 16 x 64, dQ 64 x 16 and 64 x 32):
# random cases only, to keep the exhaustive grid at its size.
BLOCKS_LARGE_D = [(32, 64), (16, 64), (64, 16), (64, 32)]
HEAD_DIMS = [32, 64, 96, 128, 192, 256]


# (b, h, h_k, seqlen_k, d) for dkdv_num_splits; the block-emulation shapes come first.
BLOCK_CASES = [
    # sq, sk, H, Hk, wl, wr
    (97, 150, 4, 2, -1, -1),   # GQA, tails
    (150, 97, 4, 1, -1, 0),    # MQA, causal with Sq > Sk (rows with no key -> zero grads)
    (130, 130, 2, 2, 20, 0),   # sliding window, causal
    (17, 200, 6, 1, 5, 7),     # window both sides, Sq < Sk, uneven split of 6 heads
    (64, 1, 2, 1, -1, 0),      # one key
]
BLOCK_B = 2
SPLIT_SHAPES = [(BLOCK_B, H, Hk, sk, d) for (_, sk, H, Hk, _, _) in BLOCK_CASES
                for d in (64, 128, 192, 256)]
SPLIT_SHAPES += [(b, hk * g, hk, sk, d) for b in (1, 2, 8) for hk in (1, 2, 8) for g in (1, 2, 3, 7, 8, 32)
                 for sk in (1, 100, 1000, 8192) for d in (64, 128, 256)]


def _cases():
    """(sq, sk, wl, wr, bm, bn, dump_vis): a grid of edge cases (visible() dumped and checked
    too) plus random cases at larger sizes (tile ranges and masks only)."""
    grid = [(sq, sk, wl, wr, bm, bn, 1) for sq in SEQLENS for sk in SEQLENS
            for wl, wr in WINDOWS for bm, bn in BLOCKS]
    rng = np.random.default_rng(0)
    rand = []
    for _ in range(300):
        sq, sk = (int(x) for x in rng.integers(1, 700, size=2))
        wl, wr = (int(x) if x >= 0 else -1 for x in rng.integers(-40, 300, size=2))
        bm, bn = (BLOCKS + BLOCKS_LARGE_D)[int(rng.integers(0, len(BLOCKS) + len(BLOCKS_LARGE_D)))]
        rand.append((sq, sk, wl, wr, bm, bn, 0))
    return grid + rand


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("flash_bwd_layout")
    src = d / "driver.cpp"
    src.write_text(DRIVER)
    exe = d / "driver"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", os.path.dirname(HEADER),
                    str(src), "-o", str(exe)], check=True)
    stdin = f"S {len(SPLIT_SHAPES)}\n"
    stdin += "\n".join(" ".join(map(str, c)) for c in SPLIT_SHAPES) + "\n"
    stdin += "\n".join(" ".join(map(str, c)) for c in _cases()) + "\n"
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True)
    t = json.loads(out.stdout)
    for k in ("a_row", "a_col", "bnk_row", "bnk_col", "bkn_row", "bkn_col"):
        t[k] = np.array(t[k])
    t["c_row"] = np.array(t["c_row"]).reshape(32, 4)
    t["c_col"] = np.array(t["c_col"]).reshape(32, 4)
    t["swz"] = {D: np.array(t.pop(f"swz{D}")).reshape(128, D) for D in HEAD_DIMS}
    return t


# ---- PTX semantics, written from the ISA text (independent of the header) --------------------

def ldmatrix_x4(smem, addr, trans):
    """smem: flat array of 16-bit values; addr[lane]: element offset of the row lane supplies.
    Returns regs[lane][i] = (lo, hi) pair of matrix i."""
    regs = np.zeros((32, 4, 2), dtype=smem.dtype)
    for i in range(4):
        m = np.stack([smem[addr[8 * i + r]: addr[8 * i + r] + 8] for r in range(8)])  # 8x8
        for lane in range(32):
            g, t = lane // 4, lane % 4
            if trans:
                regs[lane, i] = (m[2 * t, g], m[2 * t + 1, g])
            else:
                regs[lane, i] = (m[g, 2 * t], m[g, 2 * t + 1])
    return regs


def mma_m16n8k16(c, a, b):
    """c[lane][4] += A @ B with A from a[lane][4][2], B from b[lane][2][2] (PTX layouts)."""
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(2):
            A[g, 2 * t + j] = a[lane, 0, j]
            A[g + 8, 2 * t + j] = a[lane, 1, j]
            A[g, 2 * t + 8 + j] = a[lane, 2, j]
            A[g + 8, 2 * t + 8 + j] = a[lane, 3, j]
            B[2 * t + j, g] = b[lane, 0, j]
            B[2 * t + 8 + j, g] = b[lane, 1, j]
    assert not np.isnan(A).any() and not np.isnan(B).any()
    C = mm(A, B)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(2):
            c[lane, j] += C[g, 2 * t + j]
            c[lane, 2 + j] += C[g + 8, 2 * t + j]


# ---- the kernels' warp-level routines, mirroring flash_bwd.cu with the header's tables ------

def to_smem(tile, T):
    """Write a [rows][D] tile into flat smem at swz(row, col) (cp.async in load_tile)."""
    rows, D = tile.shape
    s = np.full(rows * D, np.nan)
    sw = T["swz"][D]
    for r in range(rows):
        for ch in range(D // 8):
            off = sw[r, ch * 8]
            s[off: off + 8] = tile[r, ch * 8: ch * 8 + 8]
    assert not np.isnan(s).any()
    return s


def warp_gemm_abt(acc, sA, a_row0, sB, D, NT, T):
    sw = T["swz"][D]
    for ks in range(D // 16):
        a = ldmatrix_x4(sA, [sw[a_row0 + T["a_row"][l], ks * 16 + T["a_col"][l]] for l in range(32)],
                        trans=False)
        for np_ in range(NT // 2):
            b = ldmatrix_x4(sB, [sw[np_ * 16 + T["bnk_row"][l], ks * 16 + T["bnk_col"][l]]
                                 for l in range(32)], trans=False)
            mma_m16n8k16(acc[2 * np_], a, b[:, 0:2])
            mma_m16n8k16(acc[2 * np_ + 1], a, b[:, 2:4])


def warp_gemm_xb(acc, x, sB, D, KS, T, col0=0):
    """acc[DN/8] += X * sB[:, col0:col0 + DN] (DN = 8 * len(acc): the column-split warps)."""
    sw = T["swz"][D]
    DN = 8 * acc.shape[0]
    for ks in range(KS):
        a = np.zeros((32, 4, 2))
        a[:, 0] = x[2 * ks][:, 0:2]
        a[:, 1] = x[2 * ks][:, 2:4]
        a[:, 2] = x[2 * ks + 1][:, 0:2]
        a[:, 3] = x[2 * ks + 1][:, 2:4]
        for dp in range(DN // 16):
            b = ldmatrix_x4(sB, [sw[ks * 16 + T["bkn_row"][l], col0 + dp * 16 + T["bkn_col"][l]]
                                 for l in range(32)], trans=True)
            mma_m16n8k16(acc[2 * dp], a, b[:, 0:2])
            mma_m16n8k16(acc[2 * dp + 1], a, b[:, 2:4])


def acc_to_dense(acc, T):
    """acc[NT][32][4] -> dense 16 x 8*NT via c_row / c_col."""
    NT = acc.shape[0]
    out = np.full((16, 8 * NT), np.nan)
    for nt in range(NT):
        for lane in range(32):
            for e in range(4):
                out[T["c_row"][lane, e], nt * 8 + T["c_col"][lane, e]] = acc[nt, lane, e]
    assert not np.isnan(out).any()
    return out


def dense_to_acc(x, T):
    NT = x.shape[1] // 8
    acc = np.zeros((NT, 32, 4))
    for nt in range(NT):
        for lane in range(32):
            for e in range(4):
                acc[nt, lane, e] = x[T["c_row"][lane, e], nt * 8 + T["c_col"][lane, e]]
    return acc


# ---- tests ------------------------------------------------------------------------------------

def test_ptx_tables_cover_fragments(tables):
    T = tables
    # c_row/c_col: each (row, col) of a 16x8 tile exactly once.
    cells = {(T["c_row"][l, e], T["c_col"][l, e]) for l in range(32) for e in range(4)}
    assert cells == {(r, c) for r in range(16) for c in range(8)}
    # The accumulator layout matches the PTX C/D fragment layout.
    for lane in range(32):
        g, t = lane // 4, lane % 4
        assert [T["c_row"][lane, e] for e in range(4)] == [g, g, g + 8, g + 8]
        assert [T["c_col"][lane, e] for e in range(4)] == [2 * t, 2 * t + 1] * 2


def test_config_tables(tables):
    """The launcher's head dims and the tile table the kernels compile with (smem per block
    within an sm_80 SM's 163 KiB opt-in limit; 8 dK/dV warps; delta lanes a power of two that
    divides the D / 8 chunks of a row)."""
    assert tables["supported"] == HEAD_DIMS
    for D in HEAD_DIMS:
        bm, bn, qm, qn, split_kv, split_q = tables["cfg"][str(D)]
        assert bn // 16 * split_kv == 8 and D % (16 * split_kv) == 0 and D % (16 * split_q) == 0
        assert bm % 16 == 0 and qn % 16 == 0 and qm == 64
        smem_kv = (2 * bn * D + 4 * bm * D) * 2 + 4 * bm * 4
        smem_q = (2 * qm * D + 4 * qn * D) * 2
        assert max(smem_kv, smem_q) <= 163 * 1024, D
        lanes = tables["delta_lanes"][str(D)]
        assert lanes & (lanes - 1) == 0 and (D // 8) % lanes == 0 and lanes <= 32
        assert (D // 8 // lanes) % 2 == 1  # the largest such power of two


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_swizzle(tables, D):
    sw = tables["swz"][D]
    assert sorted(sw.ravel().tolist()) == list(range(128 * D))  # bijection on a 128-row tile
    for r in range(128):
        for c in range(0, D, 8):  # 16-byte chunks stay whole and 16-byte aligned
            assert sw[r, c] % 8 == 0
            assert (sw[r, c: c + 8] == sw[r, c] + np.arange(8)).all()
    # Every ldmatrix phase of the kernels (8 lanes -> 8 rows at one logical chunk) touches 8
    # distinct 16-byte bank groups (the 128-byte bank window), for every row base / column.
    T = tables
    for rowmap, colmap in (("a_row", "a_col"), ("bnk_row", "bnk_col"), ("bkn_row", "bkn_col")):
        for row0 in range(0, 128 - 16 + 1, 16):
            for col0 in range(0, D, 16):
                for i in range(4):
                    lanes = range(8 * i, 8 * i + 8)
                    groups = {(sw[row0 + T[rowmap][l], col0 + T[colmap][l]] * 2 // 16) % 8
                              for l in lanes}
                    assert len(groups) == 8, (rowmap, row0, col0, i)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_dkdv_warp_products(tables, D):
    """One warp of flash_bwd_dkdv_kernel: S^T = K_w Q^T, dV += P^T dO, dP^T = V_w dO^T,
    dK += dS^T Q, with K/V tiles of kBlockN rows (warp 3's rows) and Q/dO tiles of kBlockM rows;
    at d192 / d256 the warp's dK / dV columns are its half (the last half: warp 7)."""
    T = tables
    bm, bn, split = T["cfg"][str(D)][0], T["cfg"][str(D)][1], T["cfg"][str(D)][4]
    dn = D // split
    col0 = (split - 1) * dn
    rng = np.random.default_rng(D)
    K, V = rng.standard_normal((bn, D)), rng.standard_normal((bn, D))
    Q, dO = rng.standard_normal((bm, D)), rng.standard_normal((bm, D))
    sK, sV, sQ, sdO = (to_smem(x, T) for x in (K, V, Q, dO))
    w = 3
    Kw, Vw = K[16 * w: 16 * w + 16], V[16 * w: 16 * w + 16]

    s = np.zeros((bm // 8, 32, 4))
    warp_gemm_abt(s, sK, 16 * w, sQ, D, bm // 8, T)
    St = acc_to_dense(s, T)
    np.testing.assert_allclose(St, mm(Kw, Q.T), rtol=1e-12, atol=1e-12)

    P = np.exp(St / 8 - 1.0)  # any elementwise map: layout is what is tested
    p_acc = dense_to_acc(P, T)
    dv = np.zeros((dn // 8, 32, 4))
    warp_gemm_xb(dv, p_acc, sdO, D, bm // 16, T, col0)
    np.testing.assert_allclose(acc_to_dense(dv, T), mm(P, dO[:, col0:col0 + dn]), rtol=1e-12,
                               atol=1e-12)

    dp = np.zeros((bm // 8, 32, 4))
    warp_gemm_abt(dp, sV, 16 * w, sdO, D, bm // 8, T)
    np.testing.assert_allclose(acc_to_dense(dp, T), mm(Vw, dO.T), rtol=1e-12, atol=1e-12)

    dk = np.zeros((dn // 8, 32, 4))
    warp_gemm_xb(dk, dp, sQ, D, bm // 16, T, col0)
    np.testing.assert_allclose(acc_to_dense(dk, T), mm(mm(Vw, dO.T), Q[:, col0:col0 + dn]),
                               rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_dq_warp_products(tables, D):
    """One warp of flash_bwd_dq_kernel: S = Q_w K^T, dP = dO_w V^T, dQ += dS K (at d256 the
    warp's half of the dQ columns, the last half)."""
    T = tables
    bm, bn, split = T["cfg"][str(D)][2], T["cfg"][str(D)][3], T["cfg"][str(D)][5]
    dn = D // split
    col0 = (split - 1) * dn
    rng = np.random.default_rng(D + 1)
    Q, dO = rng.standard_normal((bm, D)), rng.standard_normal((bm, D))
    K, V = rng.standard_normal((bn, D)), rng.standard_normal((bn, D))
    sQ, sdO, sK, sV = (to_smem(x, T) for x in (Q, dO, K, V))
    w = 2
    s = np.zeros((bn // 8, 32, 4))
    warp_gemm_abt(s, sQ, 16 * w, sK, D, bn // 8, T)
    np.testing.assert_allclose(acc_to_dense(s, T), mm(Q[16 * w: 16 * w + 16], K.T), rtol=1e-12,
                               atol=1e-12)
    dp = np.zeros((bn // 8, 32, 4))
    warp_gemm_abt(dp, sdO, 16 * w, sV, D, bn // 8, T)
    dS = acc_to_dense(dp, T)
    np.testing.assert_allclose(dS, mm(dO[16 * w: 16 * w + 16], V.T), rtol=1e-12, atol=1e-12)
    dq = np.zeros((dn // 8, 32, 4))
    warp_gemm_xb(dq, dp, sK, D, bn // 16, T, col0)
    np.testing.assert_allclose(acc_to_dense(dq, T), mm(dS, K[:, col0:col0 + dn]), rtol=1e-12,
                               atol=1e-10)


def test_tile_ranges_and_masks(tables):
    cases = _cases()
    assert len(cases) == len(tables["cases"])
    for case, out in zip(cases, tables["cases"]):
        sq, sk, wl, wr, bm, bn, dump_vis = case
        i, j = np.meshgrid(np.arange(sq), np.arange(sk), indexing="ij")
        off = sk - sq
        ref = np.ones((sq, sk), bool)
        if wl >= 0:
            ref &= j >= i + off - wl
        if wr >= 0:
            ref &= j <= i + off + wr
        if dump_vis:
            vis = np.frombuffer(out["vis"].encode(), dtype=np.uint8).reshape(sq, sk) - ord("0")
            assert (vis.astype(bool) == ref).all(), case
        nmb, nnb = -(-sq // bm), -(-sk // bn)
        needs = np.frombuffer(out["needs_mask"].encode(), dtype=np.uint8).reshape(nmb, nnb) - 48
        for mb in range(nmb):
            for nb in range(nnb):
                tile = ref[mb * bm: mb * bm + bm, nb * bn: nb * bn + bn]
                full = tile.shape == (bm, bn) and tile.all()
                # Unmasked tiles must be fully visible (correctness), and fully visible
                # tiles run unmasked (the fast path is taken whenever it can be).
                assert bool(needs[mb, nb]) == (not full), (case, mb, nb)
                if tile.any():  # a tile with a visible pair is visited by both kernels
                    b0, b1 = out["mrange"][nb]
                    assert b0 <= mb < b1, (case, mb, nb)
                    b0, b1 = out["nrange"][mb]
                    assert b0 <= nb < b1, (case, mb, nb)
        for nb, (b0, b1) in enumerate(out["mrange"]):
            assert 0 <= b0 <= b1 <= nmb, case
        for mb, (b0, b1) in enumerate(out["nrange"]):
            assert 0 <= b0 <= b1 <= nnb, case


def _reference_grads(q, k, v, dout, scale, wl, wr):
    """Dense attention gradients (float64), GQA by repeat, empty rows -> zero."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    kr, vr = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    i, j = np.meshgrid(np.arange(Sq), np.arange(Sk), indexing="ij")
    off = Sk - Sq
    vis = np.ones((Sq, Sk), bool)
    if wl >= 0:
        vis &= j >= i + off - wl
    if wr >= 0:
        vis &= j <= i + off + wr
    s = np.einsum("bihd,bjhd->bhij", q, kr) * scale
    s = np.where(vis, s, -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0)
    e = np.exp(s - mx)
    den = e.sum(-1, keepdims=True)
    p = np.where(den > 0, e / np.where(den > 0, den, 1), 0)
    lse = np.where(den[..., 0] > 0, np.log(np.where(den[..., 0] > 0, den[..., 0], 1)) + mx[..., 0],
                   -np.inf)
    out = np.einsum("bhij,bjhd->bihd", p, vr)
    dp = np.einsum("bihd,bjhd->bhij", dout, vr)
    delta = np.einsum("bihd,bihd->bhi", dout, out)
    ds = p * (dp - delta[..., None])
    dq = np.einsum("bhij,bjhd->bihd", ds, kr) * scale
    dk = np.einsum("bhij,bihd->bjhd", ds, q).reshape(B, Sk, Hk, G, D).sum(3) * scale
    dv = np.einsum("bhij,bihd->bjhd", p, dout).reshape(B, Sk, Hk, G, D).sum(3)
    return out, lse, dq, dk, dv


def _emulate_kernels(q, k, v, out, lse, dout, scale, wl, wr, cfg, splits, hps):
    """flash_bwd.cu's three kernels at tile granularity (tile products as matmuls; their
    fragment-level correctness is the business of the warp tests above)."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    bm_kv, bn_kv, bm_q, bn_q = cfg[:4]
    off = Sk - Sq
    log2e = 1.4426950408889634
    scale_log2 = scale * log2e

    def vis(i, j):
        m = (i < Sq) & (j < Sk)
        if wl >= 0:
            m &= j >= i + off - wl
        if wr >= 0:
            m &= j <= i + off + wr
        return m

    def tile(x, r0, n, seqlen):  # zero-filled rows past seqlen (load_tile)
        t = np.zeros((n, D))
        r1 = min(r0 + n, seqlen)
        if r1 > r0:
            t[: r1 - r0] = x[r0:r1]
        return t

    def lse_tile(bb, h, r0, n, past=np.inf):  # lse * log2e with -inf -> +inf; delta
        # Rows past seqlen_q: the dK/dV kernel zero-fills (lse 0, delta 0), the dQ kernel uses
        # +inf / 0; either way those rows are masked.
        l = np.full(n, past)
        d = np.zeros(n)
        r1 = min(r0 + n, Sq)
        if r1 > r0:
            x = lse[bb, h, r0:r1]
            l[: r1 - r0] = np.where(x == -np.inf, np.inf, x * log2e)
            d[: r1 - r0] = delta[bb, h, r0:r1]
        return l, d

    def m_range(n0, bn, bm):
        j_max = min(n0 + bn, Sk) - 1
        lo, hi = 0, Sq
        if wr >= 0:
            lo = max(lo, n0 - off - wr)
        if wl >= 0:
            hi = min(hi, j_max - off + wl + 1)
        return (0, 0) if (j_max < n0 or hi <= lo) else (lo // bm, -(-hi // bm))

    def n_range(m0, bm, bn):
        i_max = min(m0 + bm, Sq) - 1
        lo, hi = 0, Sk
        if wl >= 0:
            lo = max(lo, m0 + off - wl)
        if wr >= 0:
            hi = min(hi, i_max + off + wr + 1)
        return (0, 0) if (i_max < m0 or hi <= lo) else (lo // bn, -(-hi // bn))

    delta = np.einsum("bihd,bihd->bhi", dout, out)  # flash_bwd_delta_kernel
    dq = np.zeros_like(q)
    ws_dk = np.full((splits,) + k.shape, np.nan)  # every entry must be written
    ws_dv = np.full((splits,) + v.shape, np.nan)
    with np.errstate(over="ignore", invalid="raise"):
        for bb in range(B):
            for hk_split in range(Hk * splits):  # blockIdx.y
                hk, split = hk_split // splits, hk_split % splits
                h_first = hk * G + split * hps
                n_heads = min(hps, G - split * hps)
                for nb in range(-(-Sk // bn_kv)):
                    n0 = nb * bn_kv
                    Kt, Vt = tile(k[bb, :, hk], n0, bn_kv, Sk), tile(v[bb, :, hk], n0, bn_kv, Sk)
                    acc_dk, acc_dv = np.zeros((bn_kv, D)), np.zeros((bn_kv, D))
                    mb0, mb1 = m_range(n0, bn_kv, bm_kv)
                    for it in range((mb1 - mb0) * n_heads):
                        h = h_first + it // (mb1 - mb0)
                        m0 = (mb0 + it % (mb1 - mb0)) * bm_kv
                        Qt, dOt = tile(q[bb, :, h], m0, bm_kv, Sq), tile(dout[bb, :, h], m0, bm_kv, Sq)
                        l, d = lse_tile(bb, h, m0, bm_kv, past=0.0)
                        x = mm(Kt, Qt.T) * scale_log2
                        jj, ii = np.meshgrid(n0 + np.arange(bn_kv), m0 + np.arange(bm_kv), indexing="ij")
                        x = np.where(vis(ii, jj), x, -np.inf)
                        p = np.exp2(x - l[None, :])
                        acc_dv += mm(p, dOt)
                        ds = p * (mm(Vt, dOt.T) - d[None, :])
                        acc_dk += mm(ds, Qt)
                    r1 = min(n0 + bn_kv, Sk)
                    ws_dk[split, bb, n0:r1, hk] = (acc_dk * scale)[: r1 - n0]
                    ws_dv[split, bb, n0:r1, hk] = acc_dv[: r1 - n0]
            for h in range(H):
                hk = h // G
                for mb in range(-(-Sq // bm_q)):
                    m0 = mb * bm_q
                    Qt, dOt = tile(q[bb, :, h], m0, bm_q, Sq), tile(dout[bb, :, h], m0, bm_q, Sq)
                    l, d = lse_tile(bb, h, m0, bm_q)
                    acc = np.zeros((bm_q, D))
                    nb0, nb1 = n_range(m0, bm_q, bn_q)
                    for nb in range(nb0, nb1):
                        n0 = nb * bn_q
                        Kt, Vt = tile(k[bb, :, hk], n0, bn_q, Sk), tile(v[bb, :, hk], n0, bn_q, Sk)
                        x = mm(Qt, Kt.T) * scale_log2
                        ii, jj = np.meshgrid(m0 + np.arange(bm_q), n0 + np.arange(bn_q), indexing="ij")
                        x = np.where(vis(ii, jj), x, -np.inf)
                        p = np.exp2(x - l[:, None])
                        ds = p * (mm(dOt, Vt.T) - d[:, None])
                        acc += mm(ds, Kt)
                    r1 = min(m0 + bm_q, Sq)
                    dq[bb, m0:r1, h] = (acc * scale)[: r1 - m0]
    dk, dv = ws_dk[0].copy(), ws_dv[0].copy()  # flash_bwd_dkdv_reduce_kernel, split order
    for sp in range(1, splits):
        dk += ws_dk[sp]
        dv += ws_dv[sp]
    assert not np.isnan(dq).any() and not np.isnan(dk).any() and not np.isnan(dv).any()
    return dq, dk, dv


def test_gqa_splits(tables):
    for (b, h, hk, sk, d), (splits, hps) in zip(SPLIT_SHAPES, tables["splits"]):
        g = h // hk
        assert splits >= 1 and hps >= 1, (b, h, hk, sk, d)
        # the splits partition the group: every head in exactly one, none empty
        assert (splits - 1) * hps < g <= splits * hps, (b, h, hk, sk, d, splits, hps)
        if g == 1:
            assert splits == 1
        blocks = -(-sk // tables["cfg"][str(d)][1]) * hk * b
        if blocks >= 264:
            assert splits == 1  # a full grid never pays for the workspace


@pytest.mark.parametrize("D", [64, 128, 192, 256])
@pytest.mark.parametrize("case", range(len(BLOCK_CASES)))
def test_block_algorithm_matches_dense(tables, D, case):
    sq, sk, H, Hk, wl, wr = BLOCK_CASES[case]
    cfg = tables["cfg"][str(D)]
    splits, hps = tables["splits"][SPLIT_SHAPES.index((BLOCK_B, H, Hk, sk, D))]
    rng = np.random.default_rng(sq * 1000 + sk + D)
    B = BLOCK_B
    q = rng.standard_normal((B, sq, H, D))
    k = rng.standard_normal((B, sk, Hk, D))
    v = rng.standard_normal((B, sk, Hk, D))
    dout = rng.standard_normal((B, sq, H, D))
    scale = D ** -0.5
    out, lse, dq_ref, dk_ref, dv_ref = _reference_grads(q, k, v, dout, scale, wl, wr)
    dq, dk, dv = _emulate_kernels(q, k, v, out, lse, dout, scale, wl, wr, cfg, splits, hps)
    np.testing.assert_allclose(dq, dq_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dv, dv_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("splits,hps", [(2, 4), (1, 6)])
def test_block_algorithm_uneven_gqa_split(tables, splits, hps):
    """The kernel's head partition with several heads per split and a short last split
    (6 heads as 4 + 2), and the no-workspace fallback (one split of the whole group)."""
    sq, sk, H, Hk, wl, wr = BLOCK_CASES[3]
    D = 64
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, sq, H, D))
    k = rng.standard_normal((1, sk, Hk, D))
    v = rng.standard_normal((1, sk, Hk, D))
    dout = rng.standard_normal((1, sq, H, D))
    out, lse, dq_ref, dk_ref, dv_ref = _reference_grads(q, k, v, dout, 0.125, wl, wr)
    dq, dk, dv = _emulate_kernels(q, k, v, out, lse, dout, 0.125, wl, wr, tables["cfg"]["64"],
                                  splits, hps)
    for got, ref in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
