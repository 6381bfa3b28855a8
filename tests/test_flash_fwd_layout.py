"""Host-side emulation of csrc/cuda/flash_fwd_kernel.cuh: layouts, fragments and masking.

No GPU is needed. The CUDA kernel is re-implemented here one thread block at a time,
vectorised over (warp, lane), with exactly the kernel's index math: the swizzled
shared-memory offsets written by the cp.async tile loads, the per-lane ldmatrix row
addresses (and what ldmatrix / ldmatrix.trans hand each lane, per the PTX ISA), the
m16n8k16 A/B/C fragment layouts (an mma is emulated by rebuilding the 16x16 A and 16x8 B
matrices from the 32 lanes' registers, multiplying, and scattering C back), the quad
reductions, the tile range and mask bounds, the online softmax, P re-used as the A
operand, the O staging through shared memory and the lse store. The result is compared
with plain attention on random data, so a wrong lane/register/row/column mapping anywhere
shows up as a wrong number. It also checks that every tile load writes each 16-byte smem
slot exactly once and that every ldmatrix phase and staging access is bank-conflict free.

Keep in sync with the kernel: any change to its index math must be mirrored here.
"""

import math

import numpy as np
import pytest

NEG_INF = -np.inf


class Cfg:
    def __init__(self, head_dim, block_m, block_n, n_warps, masked_only=False):
        self.D, self.BM, self.BN, self.NW = head_dim, block_m, block_n, n_warps
        self.masked_only = masked_only  # only the masked kernel is instantiated (d 32, 96, 192, 256)
        self.NT = n_warps * 32
        self.MT = block_m // (16 * n_warps)  # kMTiles
        self.RPW = 16 * self.MT  # kRowsPerWarp
        self.CH = head_dim // 8  # kChunks
        self.NTS = block_n // 8  # kNTilesS
        self.NTO = head_dim // 8  # kNTilesO
        self.smem_q = block_m * head_dim * 2
        self.smem_kv = block_n * head_dim * 2
        self.smem_bytes = self.smem_q + 2 * self.smem_kv  # Q + one K and one V tile
        # kLoadTpr: threads sharing one row in load_tile (largest of 16, 8, 4 dividing kChunks)
        self.TPR = 16 if self.CH % 16 == 0 else 8 if self.CH % 8 == 0 else 4


def swizzle_key(ch, row):
    """fastattn::flash::swizzle_key<kChunks>(row): row & 7 for rows of a multiple of 8 chunks,
    (row >> 1) & 3 for rows of an odd multiple of 4 (d 32, 96)."""
    assert ch % 4 == 0
    return (row & 7) if ch % 8 == 0 else ((row >> 1) & 3)


def smem_offset(ch, row, chunk):
    """fastattn::flash::smem_offset<kChunks>(row, chunk), in bytes."""
    return row * (ch * 16) + ((chunk ^ swizzle_key(ch, row)) << 4)


LANE = np.arange(32)
G = LANE >> 2  # groupID
T = LANE & 3  # threadID_in_group


class Smem:
    def __init__(self, nbytes):
        self.mem = np.zeros(nbytes // 2, np.float32)  # 16-bit elements, values kept exact

    def write16(self, addr, vals):  # addr: (...,) bytes, vals (..., 8)
        idx = (np.asarray(addr) // 2)[..., None] + np.arange(8)
        self.mem[idx] = vals

    def read16(self, addr):
        idx = (np.asarray(addr) // 2)[..., None] + np.arange(8)
        return self.mem[idx]


def assert_conflict_free(addr):
    """addr (..., 32) byte addresses of 16-byte accesses: each 8-lane phase must hit 8
    distinct 16-byte bank groups (addr / 16 mod 8)."""
    a = np.asarray(addr).reshape(-1, 4, 8)
    grp = (a >> 4) & 7
    for phase in grp.reshape(-1, 8):
        assert len(set(phase.tolist())) == 8, f"bank conflict: {phase}"


def ldmatrix_x4(smem, addr, trans=False):
    """addr (W, 32) byte addresses (lane 8i + r: row r of matrix i). Returns (W, 32, 4, 2):
    register i of lane l holds matrix i's M[l>>2][2(l&3) + {0,1}] (trans: M[2(l&3)+{0,1}][l>>2])."""
    assert_conflict_free(addr)
    rows = smem.read16(addr).reshape(addr.shape[0], 4, 8, 8)  # (W, matrix, row, col)
    out = np.empty((addr.shape[0], 32, 4, 2), np.float32)
    for i in range(4):
        for e in range(2):
            if trans:
                out[:, :, i, e] = rows[:, i, 2 * T + e, G]
            else:
                out[:, :, i, e] = rows[:, i, G, 2 * T + e]
    return out


def mma(d, a, b0, b1):
    """m16n8k16 row.col, fp32 accumulate. d (W,32,4), a (W,32,4,2), b0/b1 (W,32,2)."""
    W = d.shape[0]
    A = np.zeros((W, 16, 16), np.float64)
    B = np.zeros((W, 16, 8), np.float64)
    for e in range(2):
        A[:, G, 2 * T + e] = a[:, :, 0, e]
        A[:, G + 8, 2 * T + e] = a[:, :, 1, e]
        A[:, G, 2 * T + 8 + e] = a[:, :, 2, e]
        A[:, G + 8, 2 * T + 8 + e] = a[:, :, 3, e]
        B[:, 2 * T + e, G] = b0[:, :, e]
        B[:, 2 * T + 8 + e, G] = b1[:, :, e]
    C = A @ B
    for e in range(2):
        d[:, :, e] += C[:, G, 2 * T + e].astype(np.float32)
        d[:, :, 2 + e] += C[:, G + 8, 2 * T + e].astype(np.float32)


def round16(x, dtype):
    if dtype == "fp16":
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)
    # bf16, round to nearest even
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def load_tile(cfg, smem, base, src, row0, seqlen, n_rows):
    """load_tile<Kt, kRows>: with kTpr threads per row, thread tid copies chunk
    tid % kTpr + g * kTpr of rows tid / kTpr + i * (kNThreads / kTpr) (zero-fill past seqlen)."""
    tpr = cfg.TPR
    rpi = cfg.NT // tpr
    assert cfg.NT % tpr == 0 and rpi % 8 == 0 and n_rows % rpi == 0
    tid = np.arange(cfg.NT)
    written = []
    for i in range(n_rows // rpi):
        for g in range(cfg.CH // tpr):
            r, c = tid // tpr + i * rpi, tid % tpr + g * tpr
            valid = row0 + r < seqlen
            rows = np.where(valid, row0 + r, 0)
            vals = src[rows[:, None], c[:, None] * 8 + np.arange(8)]
            vals = np.where(valid[:, None], vals, 0.0)
            addr = base + smem_offset(cfg.CH, r, c)
            assert_conflict_free(addr.reshape(-1, 32))
            smem.write16(addr, vals)
            written.append(addr)
    written = np.sort(np.concatenate(written))
    # every 16-byte slot of the tile written exactly once
    assert np.array_equal(written, base + 16 * np.arange(n_rows * cfg.CH))


def run_block(cfg, dtype, q, k, v, out, lse, m_block, wl, wr, scale_log2, masked):
    """One thread block for one (batch, head); q (Sq, D), k/v (Sk, D) of the right kv head,
    out (Sq, D) and lse (Sq,) written in place."""
    D, BM, BN, NW, MT = cfg.D, cfg.BM, cfg.BN, cfg.NW, cfg.MT
    sq, sk = q.shape[0], k.shape[0]
    smem = Smem(cfg.smem_bytes)
    sQ, sK = 0, cfg.smem_q
    sV = sK + cfg.smem_kv
    m0 = m_block * BM
    diag = sk - sq
    warp = np.arange(NW)[:, None]  # (W, 1)
    lane = LANE[None, :]  # (1, 32)

    n_min, n_max = 0, (sk + BN - 1) // BN
    mask_lo, mask_hi = 0, sk - 1
    if masked:
        if wr >= 0:
            m_last = min(sq, m0 + BM) - 1
            hi_last = m_last + diag + wr
            n_max = 0 if hi_last < 0 else min(n_max, hi_last // BN + 1)
            mask_hi = min(mask_hi, m0 + diag + wr)
        if wl >= 0:
            lo_first = m0 + diag - wl
            n_min = max(lo_first, 0) // BN
            mask_lo = m0 + BM - 1 + diag - wl

    o = np.zeros((NW, 32, MT, cfg.NTO, 4), np.float32)
    row_max = np.full((NW, 32, MT, 2), NEG_INF, np.float32)
    row_sum = np.zeros((NW, 32, MT, 2), np.float32)
    warp_row0 = warp * cfg.RPW
    q_ld_row = warp_row0 + (lane & 15)
    q_ld_chunk = lane >> 4
    k_ld_row = (lane & 7) + 8 * (lane >> 4)  # b0, b1 of tile 2jp in r0, r1; of 2jp+1 in r2, r3
    k_ld_chunk = (lane >> 3) & 1
    v_ld_row = lane & 15
    v_ld_chunk = lane >> 4
    ch = cfg.CH
    tiles_visited = []

    if n_min < n_max:
        load_tile(cfg, smem, sQ, q, m0, sq, BM)
        load_tile(cfg, smem, sK, k, n_min * BN, sk, BN)
        for n in range(n_min, n_max):
            tiles_visited.append(n)
            # V(n) is issued after the barrier that ends PV(n - 1); K(n + 1) after the one that
            # ends QK^T(n) (the kernel's waits and barriers order them against the readers)
            load_tile(cfg, smem, sV, v, n * BN, sk, BN)
            s = np.zeros((NW, 32, MT, cfg.NTS, 4), np.float32)
            for ks in range(D // 16):
                qa = [
                    ldmatrix_x4(smem, sQ + smem_offset(ch, q_ld_row + mi * 16, 2 * ks + q_ld_chunk))
                    for mi in range(MT)
                ]
                for jp in range(cfg.NTS // 2):
                    kb = ldmatrix_x4(
                        smem, np.broadcast_to(sK + smem_offset(ch, 16 * jp + k_ld_row, 2 * ks + k_ld_chunk), (NW, 32))
                    )
                    for mi in range(MT):
                        mma(s[:, :, mi, 2 * jp], qa[mi], kb[:, :, 0], kb[:, :, 1])
                        mma(s[:, :, mi, 2 * jp + 1], qa[mi], kb[:, :, 2], kb[:, :, 3])
            if n + 1 < n_max:
                load_tile(cfg, smem, sK, k, (n + 1) * BN, sk, BN)
            col0 = n * BN
            need_mask = col0 + BN > sk or (masked and (col0 < mask_lo or col0 + BN - 1 > mask_hi))
            for mi in range(MT):
                for hf in range(2):
                    row = m0 + warp_row0 + mi * 16 + (lane >> 2) + 8 * hf  # (W, 32)
                    mx = row_max[:, :, mi, hf].copy()
                    x = s[:, :, mi, :, 2 * hf : 2 * hf + 2] * np.float32(scale_log2)  # (W,32,NTS,2)
                    if need_mask:
                        lo = np.zeros_like(row)
                        hi = np.full_like(row, sk - 1)
                        if masked:
                            if wl >= 0:
                                lo = row + diag - wl
                            if wr >= 0:
                                hi = np.minimum(hi, row + diag + wr)
                        col = col0 + 8 * np.arange(cfg.NTS)[:, None] + 2 * (lane & 3)[..., None, None] + np.arange(2)
                        vis = (col >= lo[..., None, None]) & (col <= hi[..., None, None])
                        x = np.where(vis, x, NEG_INF)
                    mx = np.maximum(mx, x.max(axis=(2, 3)))
                    # quad reduction: shfl_xor 1 then 2
                    mx = np.maximum(mx, mx[:, LANE ^ 1])
                    mx = np.maximum(mx, mx[:, LANE ^ 2])
                    m_use = np.where(mx == NEG_INF, 0.0, mx).astype(np.float32)
                    with np.errstate(invalid="raise"):
                        alpha = np.exp2(row_max[:, :, mi, hf] - m_use)
                        p = np.exp2(x - m_use[..., None, None]).astype(np.float32)
                    row_max[:, :, mi, hf] = mx
                    s[:, :, mi, :, 2 * hf : 2 * hf + 2] = p
                    row_sum[:, :, mi, hf] = row_sum[:, :, mi, hf] * alpha + p.sum(axis=(2, 3))
                    o[:, :, mi, :, 2 * hf : 2 * hf + 2] *= alpha[..., None, None]
            for ks in range(BN // 16):
                pa = []
                for mi in range(MT):
                    a = np.empty((NW, 32, 4, 2), np.float32)
                    a[:, :, 0] = s[:, :, mi, 2 * ks, 0:2]
                    a[:, :, 1] = s[:, :, mi, 2 * ks, 2:4]
                    a[:, :, 2] = s[:, :, mi, 2 * ks + 1, 0:2]
                    a[:, :, 3] = s[:, :, mi, 2 * ks + 1, 2:4]
                    pa.append(round16(a, dtype))
                for jp in range(cfg.NTO // 2):
                    vb = ldmatrix_x4(
                        smem,
                        np.broadcast_to(sV + smem_offset(ch, 16 * ks + v_ld_row, 2 * jp + v_ld_chunk), (NW, 32)),
                        trans=True,
                    )
                    for mi in range(MT):
                        mma(o[:, :, mi, 2 * jp], pa[mi], vb[:, :, 0], vb[:, :, 1])
                        mma(o[:, :, mi, 2 * jp + 1], pa[mi], vb[:, :, 2], vb[:, :, 3])

    # epilogue
    for mi in range(MT):
        for hf in range(2):
            l = row_sum[:, :, mi, hf]
            l = l + l[:, LANE ^ 1]
            l = l + l[:, LANE ^ 2]
            empty = ~(l > 0)
            inv = np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, l)).astype(np.float32)
            lrow = warp_row0 + mi * 16 + (lane >> 2) + 8 * hf  # (W, 32)
            for j in range(cfg.NTO):
                vals = round16(o[:, :, mi, j, 2 * hf : 2 * hf + 2] * inv[..., None], dtype)
                addr = sQ + smem_offset(ch, lrow, j) + 4 * (lane & 3)  # (W, 32) 4-byte stores
                banks = (addr >> 2) & 31
                for w in range(NW):
                    assert len(set(banks[w].tolist())) == 32, "O staging bank conflict"
                smem.mem[addr // 2] = vals[..., 0]
                smem.mem[addr // 2 + 1] = vals[..., 1]
            row = m0 + lrow
            sel = ((lane & 3) == 0) & (row < sq)
            sel = np.broadcast_to(sel, row.shape)
            lse_val = np.where(empty, NEG_INF, row_max[:, :, mi, hf] * 0.6931471805599453 + np.log(np.where(empty, 1.0, l)))
            lse[row[sel]] = lse_val[sel]
    stored = []
    for i in range(cfg.RPW * ch // 32):
        idx = lane + 32 * i
        lrow = warp_row0 + idx // ch
        c = np.broadcast_to(idx % ch, lrow.shape)
        addr = sQ + smem_offset(ch, lrow, c)
        assert_conflict_free(addr)
        val = smem.read16(addr)
        row = m0 + lrow
        ok = row < sq
        out[row[ok][:, None], c[ok][:, None] * 8 + np.arange(8)] = val[ok]
        stored.append((row * ch + c)[ok])
    stored = np.sort(np.concatenate(stored))
    n_rows = max(0, min(sq, m0 + BM) - m0)
    assert np.array_equal(stored, m0 * ch + np.arange(n_rows * ch)), "O store not a permutation"
    return tiles_visited


def normalise_window(sq, sk, window, causal):
    left = -1 if window[0] < 0 else window[0]
    right = -1 if window[1] < 0 else window[1]
    if causal:
        right = 0
    if left >= sq + sk:
        left = -1
    if right >= sq + sk:
        right = -1
    return left, right


def emulate(cfg, dtype, q, k, v, scale, window=(-1, -1), causal=False):
    """q (B, Sq, H, D), k/v (B, Sk, Hk, D) already rounded to 16 bit."""
    B, sq, H, D = q.shape
    sk, Hk = k.shape[1], k.shape[2]
    out = np.full((B, sq, H, D), np.nan, np.float32)
    lse = np.full((B, H, sq), np.nan, np.float32)
    wl, wr = normalise_window(sq, sk, window, causal)
    masked = cfg.masked_only or wl >= 0 or wr >= 0
    scale_log2 = np.float32(scale * 1.4426950408889634)
    for b in range(B):
        for h in range(H):
            kvh = h // (H // Hk)
            ob = np.empty((sq, D), np.float32)
            lb = np.empty((sq,), np.float32)
            for m_block in range((sq + cfg.BM - 1) // cfg.BM):
                visited = run_block(cfg, dtype, q[b, :, h], k[b, :, kvh], v[b, :, kvh], ob, lb, m_block, wl, wr,
                                    scale_log2, masked)
                check_skipped_tiles_are_empty(cfg, sq, sk, m_block, wl, wr, visited)
            out[b, :, h] = ob
            lse[b, h] = lb
    return out, lse


def visible(sq, sk, wl, wr):
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    vis = np.ones((sq, sk), bool)
    if wl >= 0:
        vis &= j >= i + sk - sq - wl
    if wr >= 0:
        vis &= j <= i + sk - sq + wr
    return vis


def check_skipped_tiles_are_empty(cfg, sq, sk, m_block, wl, wr, visited):
    vis = visible(sq, sk, wl, wr)[m_block * cfg.BM : (m_block + 1) * cfg.BM]
    for n in range((sk + cfg.BN - 1) // cfg.BN):
        if n not in visited:
            assert not vis[:, n * cfg.BN : (n + 1) * cfg.BN].any(), f"skipped tile {n} has visible keys"


def reference(q, k, v, scale, window, causal):
    B, sq, H, D = q.shape
    sk, Hk = k.shape[1], k.shape[2]
    wl, wr = window
    if causal:
        wr = 0
    vis = visible(sq, sk, wl, wr)
    rep = H // Hk
    kk = np.repeat(k.astype(np.float64), rep, axis=2)
    vv = np.repeat(v.astype(np.float64), rep, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q.astype(np.float64), kk) * scale
    s = np.where(vis, s, -np.inf)
    mx = s.max(-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    p = np.exp(s - mx)
    l = p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(l[..., 0] > 0, mx[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1)), -np.inf)
    out = np.einsum("bhij,bjhd->bihd", np.where(l > 0, p / np.where(l > 0, l, 1), 0), vv)
    return out, lse


CFGS = {
    # the shipped configurations (flash_fwd_hdim*.cu)
    "d64": Cfg(64, 128, 64, 4),
    "d128": Cfg(128, 128, 64, 4),
    "d32": Cfg(32, 128, 64, 4, masked_only=True),
    "d96": Cfg(96, 128, 64, 4, masked_only=True),
    "d192": Cfg(192, 128, 64, 8, masked_only=True),
    "d256": Cfg(256, 64, 64, 4, masked_only=True),
    # the template's one-m-tile-per-warp path (kMTiles = 1, 8 warps), kept valid
    "d64_mt1": Cfg(64, 128, 64, 8),
}

CASES = [
    # (B, Sq, Sk, H, Hk, window, causal)
    (1, 17, 17, 2, 1, (-1, -1), False),
    (1, 130, 150, 2, 2, (-1, -1), False),
    (1, 150, 97, 2, 1, (-1, -1), True),  # Sq > Sk: first rows see no key
    (1, 97, 200, 2, 1, (-1, -1), True),  # Sq < Sk, GQA
    (1, 200, 200, 1, 1, (40, 7), False),  # window, interior tiles skipped/unmasked
    (1, 1, 33, 2, 2, (-1, -1), True),
    (1, 130, 140, 1, 1, (3, -1), False),  # left only
    (1, 70, 300, 1, 1, (0, 0), False),  # diagonal only
    (1, 130, 70, 1, 1, (5, 0), False),  # many empty rows
    (1, 300, 40, 1, 1, (-1, -1), True),  # whole query blocks see no key (empty tile range)
]


# Every case on the shipped d64 kernel in fp16; the others on a subset (the suite stays < 10 s).
RUNS = (
    [("d64", c, "fp16") for c in range(len(CASES))]
    + [("d64", c, "bf16") for c in (0, 4)]
    + [("d128", c, "fp16") for c in (3, 8, 9)]
    + [("d128", 4, "bf16")]
    + [("d64_mt1", c, "fp16") for c in (2, 4)]
    + [("d32", c, "fp16") for c in (3, 4)]
    + [("d32", 8, "bf16")]
    + [("d96", c, "bf16") for c in (1, 2)]
    + [("d96", 6, "fp16")]
    + [("d192", c, "fp16") for c in (3, 9)]
    + [("d256", c, "bf16") for c in (2, 4)]
)


@pytest.mark.parametrize("cfg_name,case,dtype", RUNS)
def test_emulated_kernel_matches_attention(cfg_name, case, dtype):
    cfg = CFGS[cfg_name]
    B, sq, sk, H, Hk, window, causal = CASES[case]
    rng = np.random.default_rng(case)
    D = cfg.D
    q = round16(rng.standard_normal((B, sq, H, D)), dtype)
    k = round16(rng.standard_normal((B, sk, Hk, D)), dtype)
    v = round16(rng.standard_normal((B, sk, Hk, D)), dtype)
    scale = 1.0 / math.sqrt(D)
    out, lse = emulate(cfg, dtype, q, k, v, scale, window, causal)
    ref_out, ref_lse = reference(q, k, v, scale, window, causal)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    tol = 2e-2 if dtype == "bf16" else 3e-3
    np.testing.assert_allclose(out, ref_out, atol=tol, rtol=0)
    fin = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), fin)
    assert (lse[~fin] == -np.inf).all()
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=1e-4, rtol=1e-5)
    if not fin.all():
        assert (out[np.broadcast_to(~fin.transpose(0, 2, 1)[..., None], out.shape)] == 0).all()


def test_smem_budget_and_layout_facts():
    for cfg in CFGS.values():
        assert cfg.D % 32 == 0 and cfg.BN % 16 == 0
    assert CFGS["d64"].smem_bytes == 32 * 1024
    assert CFGS["d128"].smem_bytes == 64 * 1024
    assert CFGS["d32"].smem_bytes == 16 * 1024
    assert CFGS["d96"].smem_bytes == 48 * 1024  # no opt-in needed
    # 96 KB: within the opt-in limit of every sm_80+ part (sm_86 / sm_89: 99 KB)
    assert CFGS["d192"].smem_bytes == CFGS["d256"].smem_bytes == 96 * 1024
    # the swizzle permutes the chunks of each row in place (never leaves the row), and
    # 8 rows r0..r0+7 at one chunk hit 8 distinct 16-byte bank groups, for every row length
    for ch in (4, 8, 12, 16, 24, 32):
        for r in range(16):
            assert sorted(smem_offset(ch, r, c) for c in range(ch)) == [r * ch * 16 + 16 * c for c in range(ch)]
        for r0 in (0, 8):
            for c in range(ch):
                assert len({(smem_offset(ch, r0 + r, c) >> 4) & 7 for r in range(8)}) == 8


@pytest.mark.parametrize("cfg_name", list(CFGS))
def test_kernel_address_forms_equal_smem_offset(cfg_name):
    """The kernel does not call smem_offset() inside its loops: it uses the strength-reduced
    forms below (per-lane ld_off[4] plus immediates; one offset per thread plus row steps
    in load_tile). They must equal smem_offset() for every lane, warp and loop index."""
    cfg = CFGS[cfg_name]
    RB, ch = cfg.D * 2, cfg.CH
    key = swizzle_key(ch, LANE & 7)
    z = (LANE >> 4) ^ key
    ld_off = [(LANE & 15) * RB + (((2 * i) ^ z) << 4) for i in range(4)]
    zk = ((LANE >> 3) & 1) ^ key
    ldk_off = [((LANE & 7) + 8 * (LANE >> 4)) * RB + (((2 * i) ^ zk) << 4) for i in range(4)]
    for warp in range(cfg.NW):
        warp_row0 = warp * cfg.RPW
        for ks in range(cfg.D // 16):
            for mi in range(cfg.MT):
                kernel = warp_row0 * RB + ld_off[ks & 3] + (ks >> 2) * 128 + mi * 16 * RB
                ref = smem_offset(ch, warp_row0 + mi * 16 + (LANE & 15), 2 * ks + (LANE >> 4))
                assert np.array_equal(kernel, ref)
    for ks in range(cfg.D // 16):  # K
        for jp in range(cfg.NTS // 2):
            kernel = ldk_off[ks & 3] + (ks >> 2) * 128 + jp * 16 * RB
            ref = smem_offset(ch, 16 * jp + (LANE & 7) + 8 * (LANE >> 4), 2 * ks + ((LANE >> 3) & 1))
            assert np.array_equal(kernel, ref)
    for ks in range(cfg.BN // 16):  # V
        for jp in range(cfg.NTO // 2):
            kernel = ld_off[jp & 3] + (jp >> 2) * 128 + ks * 16 * RB
            assert np.array_equal(kernel, smem_offset(ch, 16 * ks + (LANE & 15), 2 * jp + (LANE >> 4)))
    # load_tile: thread tid, row iteration i, column group g
    tpr = cfg.TPR
    rpi = cfg.NT // tpr
    assert cfg.NT % tpr == 0 and rpi % 8 == 0 and ch % tpr == 0
    tid = np.arange(cfg.NT)
    r0, c = tid // tpr, tid % tpr
    for n_rows in (cfg.BM, cfg.BN):
        for i in range(n_rows // rpi):
            for g in range(ch // tpr):
                kernel = smem_offset(ch, r0, c) + i * rpi * RB + g * tpr * 16
                assert np.array_equal(kernel, smem_offset(ch, r0 + i * rpi, c + g * tpr))
        if tpr == ch:  # d 32, 64, 128: chunks tid, tid + kNThreads, ... of the row-major tile
            for i in range(n_rows // rpi):
                idx = tid + i * cfg.NT
                assert np.array_equal(r0 + i * rpi, idx // ch) and np.array_equal(c, idx % ch)
