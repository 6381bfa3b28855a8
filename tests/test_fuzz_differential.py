"""Differential fuzz of every public fastattn op against an independent computation.

Each op is called with random but valid inputs (seeded, reproducible) and compared with
``fastattn.reference`` in float64 or with torch itself (``F.scaled_dot_product_attention``,
``F.rms_norm``, ``torch.nn.RMSNorm``), forward and backward, by DESIGN.md section 5's rule:
``err(ours) <= 2 * err(reference in the same dtype) + 1e-5`` against the float64 truth
(for fp32 inputs the "same dtype" reference is the unfused fp32 computation, so that bound
is a small multiple of fp32 rounding).

The default case counts keep the whole file well under a minute on 2 cores. More cases:
``FASTATTN_FUZZ_CASES=N`` (per op and per test), another seed: ``FASTATTN_FUZZ_SEED=S``.
A failure message carries the case's parameters; every case is rebuilt from
``(seed, op, index)`` alone, so ``FASTATTN_FUZZ_ONLY=<index>`` reruns one case.
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference as ref

SEED = int(os.environ.get("FASTATTN_FUZZ_SEED", "20261205"))
_CASES = os.environ.get("FASTATTN_FUZZ_CASES")
_ONLY = os.environ.get("FASTATTN_FUZZ_ONLY")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cases(default: int):
    if _ONLY is not None:
        return [int(_ONLY)]
    return range(int(_CASES) if _CASES else default)


def _rng(op: str, i: int) -> random.Random:
    # A str seed is hashed deterministically (sha512): the same case on every run and machine.
    return random.Random(f"{SEED}/{op}/{i}")


def _gen(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.getrandbits(62))


def _randn(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _strided(t: torch.Tensor, rng: random.Random, keep_last=True) -> torch.Tensor:
    """t's values in a random layout: the leading dims permuted in memory and padded (and, with
    keep_last, the last dim contiguous but its rows padded), so every stride but the last is
    'free'. Half the time t itself (contiguous)."""
    if t.dim() < 2 or rng.random() < 0.5:
        return t
    nd = t.dim()
    lead = list(range(nd - 1)) if keep_last else list(range(nd))
    perm = lead[:]
    rng.shuffle(perm)
    if keep_last:
        perm = perm + [nd - 1]
    pads = [rng.choice((0, 0, 1, 3)) for _ in range(nd)]
    big_shape = [t.shape[d] + pads[d] for d in perm]
    big = torch.full(big_shape, float("nan"), dtype=t.dtype)  # padding is NaN: a stray read shows
    view = big[tuple(slice(0, t.shape[d]) for d in perm)]
    inv = [perm.index(d) for d in range(nd)]
    out = view.permute(inv)
    out.copy_(t)
    assert out.shape == t.shape and (not keep_last or t.shape[-1] <= 1 or out.stride(-1) == 1)
    return out


def _max_err(a, b) -> float:
    """max |a - b| over the entries where b is finite."""
    if b.numel() == 0:
        return 0.0
    d = (a.double() - b.double()).abs()
    return torch.where(torch.isfinite(b), d, 0.0).max().item()


def _absmax(*ts) -> float:
    """The largest finite |value| of the tensors (0 for none)."""
    vals = [torch.where(torch.isfinite(t), t.double().abs(), 0.0).max().item() for t in ts if t.numel()]
    return max(vals, default=0.0)


def check_ratio(ours, low, true, what: str, case, factor=2.0, atol=1e-5, scale=None, nan_ok=None):
    """DESIGN.md section 5: max|ours - true| <= factor * max|low - true| + atol, over the
    entries where the truth is finite; where it is not (lse = -inf of a row that sees no key,
    a NaN that propagates) ours must be the same non-finite value.

    atol is relative to ``scale`` (default: the largest finite |true|) when that exceeds 1:
    the unfused reference is sometimes exact by structure (dq of a row that sees one key is
    0 = P * (dP - rowsum(dO * O)) with P = 1, computed as y * (g - g)), where the fused
    kernel's fp32 rounding of terms of size ``scale`` shows instead.

    nan_ok: entries where ours may be NaN although the truth is finite (they are then left
    out): a NaN in a value row of a key a query does NOT see may reach it through 0 * NaN in
    a P @ V product over a tile, as in torch's math; unspecified, so allowed, not required."""
    assert ours.shape == true.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(true.shape)} [{case}]"
    t = true.double()
    o = ours.double()
    nonfin = ~torch.isfinite(t)
    if nonfin.any():
        same = (o[nonfin] == t[nonfin]) | (torch.isnan(o[nonfin]) & torch.isnan(t[nonfin]))
        assert same.all(), f"{what}: non-finite truth not matched ({o[nonfin][~same][:4].tolist()}) [{case}]"
    if nan_ok is not None:
        o = torch.where(torch.isnan(o) & nan_ok & ~nonfin, t, o)
    assert torch.isfinite(o[~nonfin]).all(), f"{what}: non-finite values where the truth is finite [{case}]"
    err, ref_err = _max_err(o, t), _max_err(low, t)
    atol = atol * max(1.0, _absmax(t) if scale is None else scale)
    bound = factor * ref_err + atol
    assert err <= bound, f"{what}: max error {err:.3e} > {factor} * reference error {ref_err:.3e} + {atol:g} [{case}]"


# =========================================================================================
# flash_attention
# =========================================================================================
HEAD_DIMS = (8, 40, 72, 96, 160, 256, 1, 3, 16, 17, 32, 64, 128)


def _seqlen(rng):
    return rng.choice((1, 1, 2, rng.randint(1, 20), rng.randint(1, 70), rng.randint(60, 140)))


def _window(rng, sq, sk):
    if rng.random() < 0.5:
        return (-1, -1)
    side = lambda: rng.choice((-1, 0, 1, rng.randint(0, sq + sk + 2)))  # noqa: E731
    return (side(), side())


def flash_case(rng):
    dtype = rng.choice(DTYPES)
    B = rng.randint(1, 3)
    Sq, Sk = _seqlen(rng), _seqlen(rng)
    if rng.random() < 0.2:  # the short-query (decode kernel) path: Sq <= 16, Sk >= 4 Sq
        Sq, Sk = rng.randint(1, 16), rng.randint(64, 160)
    Hk = rng.randint(1, 3)
    H = Hk * rng.choice((1, 1, 2, 3, 4))
    D = rng.choice(HEAD_DIMS)
    if Sq * Sk * D * B * H > 2_000_000:  # keep each case cheap
        D = rng.choice((8, 16, 40))
    return dict(dtype=dtype, B=B, Sq=Sq, Sk=Sk, H=H, Hk=Hk, D=D, causal=rng.random() < 0.4,
                window=_window(rng, Sq, Sk), softcap=rng.choice((0.0, 0.0, 0.0, rng.uniform(2.0, 30.0))),
                scale=rng.choice((None, None, rng.uniform(-0.5, 1.5))), return_lse=rng.random() < 0.5,
                grad=rng.random() < 0.5, mag=rng.choice((1.0, 1.0, 3.0, 0.01, 10.0)),
                nan=rng.choice((None,) * 9 + ("q", "k", "v")))


def _index_view(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """t's values (an int tensor: cu_seqlens, cache_seqlens, block_table, positions) as a
    strided view of a larger buffer half the time: nothing documents them contiguous."""
    if rng.random() < 0.5 or t.numel() == 0:
        return t
    big = torch.full(tuple(2 * n for n in t.shape), -7, dtype=t.dtype)
    view = big[tuple(slice(0, None, 2) for _ in t.shape)]
    if t.dim() == 2 and rng.random() < 0.5:  # column-major
        view = torch.full(t.shape[::-1], -7, dtype=t.dtype).t()
    view.copy_(t)
    return view


def _inject_nan(c, rng, tensors):
    """A NaN at a random element of q, k or v (c["nan"]): it must reach exactly the outputs
    it reaches in the reference (a row that sees it: NaN out and lse; as torch's math), not
    read as a row that sees no key, nor be dropped."""
    if not c.get("nan"):
        return None
    t = tensors["qkv".index(c["nan"])]
    if not t.numel():
        return None
    idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(rng.randrange(t.numel())), t.shape))
    t[idx] = float("nan")
    return idx


def _v_nan_ok(c, idx, out_shape, H, Hk):
    """For a NaN at v[..., hk, col] (idx): the output entries it may reach though their query
    does not see its key (see check_ratio): column col of the kv head's query heads."""
    if c.get("nan") != "v" or idx is None:
        return None
    ok = torch.zeros(out_shape, dtype=torch.bool)
    hk, col, group = idx[-2], idx[-1], H // Hk
    ok[..., hk * group:(hk + 1) * group, col] = True
    return ok


def _same(a, b) -> bool:
    """Bitwise-equal values, NaN equal to NaN."""
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _probs64(q, k, c):
    """P (B, H, Sq, Sk) in float64 (rows that see no key: 0), cap'(s) of the soft-cap, and the
    kv-head-expanded k, for the backward's rounding terms below."""
    q, k = q.double(), k.double()
    H, Hk, D = q.shape[2], k.shape[2], q.shape[3]
    kk = k.repeat_interleave(H // Hk, 2)
    scale = c["scale"] if c["scale"] is not None else D ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    dcap = torch.ones_like(s)
    if c["softcap"] > 0:
        th = torch.tanh(s / c["softcap"])
        s, dcap = th * c["softcap"], 1 - th * th
    mask = ref.attention_mask(q.shape[1], k.shape[1], c["causal"], c["window"]).view(1, 1, q.shape[1], k.shape[1])
    P = torch.nan_to_num(torch.softmax(s.masked_fill(~mask, float("-inf")), -1), nan=0.0)
    return P, dcap, kk, scale


def flash_bwd_rounding(q, k, dout, out64, c, dtype):
    """The FlashAttention backward (flash-attn's, and fastattn's) forms dS = P * (dP - D) with
    D = rowsum(dO * O) taken from the output the forward returned, i.e. O rounded to the input
    dtype, where the unfused reference differentiates the softmax exactly. That rounding is
    the algorithm's, not an implementation error, and it can exceed the bf16/fp16 reference's
    own error when the softmax is peaked (P near one-hot, dP - D a cancellation). Returns the
    (dq, dk) terms it adds to the exact gradients, in float64: exact + these is the algorithm
    run in exact arithmetic on an output rounded to dtype."""
    P, dcap, kk, scale = _probs64(q, k, c)
    o_r = out64.to(dtype).double()
    delta = ((dout.double() * (out64 - o_r)).sum(-1)).permute(0, 2, 1).unsqueeze(-1)  # D - D_rounded
    dS = P * dcap * delta  # (B, H, Sq, Sk)
    dq = scale * torch.einsum("bhqk,bkhd->bqhd", dS, kk)
    dk = scale * torch.einsum("bhqk,bqhd->bkhd", dS, q.double())
    B, Sk, Hk = k.shape[0], k.shape[1], k.shape[2]
    dk = dk.reshape(B, Sk, Hk, -1, k.shape[3]).sum(3)  # GQA: the group's heads add up
    return dq, dk


def bwd_fp32_atol(q, k, v, dout, c, gscale) -> float:
    """The fp32 rounding the FlashAttention backward cannot avoid, which the unfused
    reference (exact by structure in peaked cases) does not have:
    - dS = P * (dP - D) cancels terms of size T = |scale| * max|dO_i| * max|v_j| (row norms),
      times max(|q|, |k|) in dq/dk, summed over up to n = max(Sq * group, Sk) rows;
    - P is recomputed as exp(s - lse) from an fp32 lse: relative error ~ eps * max|s|.
    Both are tiny for ordinary inputs; real bugs (a wrong mask, head or scale) are O(gscale)."""
    H, Hk, D = q.shape[2], k.shape[2], q.shape[3]
    scale = c["scale"] if c["scale"] is not None else D ** -0.5
    nrm = lambda t: t.double().norm(dim=-1).max().item() if t.numel() else 0.0  # noqa: E731
    T = abs(scale) * nrm(dout) * nrm(v) * max(_absmax(q), _absmax(k))
    n = max(q.shape[1] * H // Hk, k.shape[1])
    smax = abs(scale) * nrm(q) * nrm(k)
    if c["softcap"] > 0:
        smax = min(smax, c["softcap"])
    eps = torch.finfo(torch.float32).eps
    return 1e-5 * max(1.0, gscale) + 4 * eps * (T * math.sqrt(n) + smax * gscale)


def run_flash_case(i):
    rng = _rng("flash", i)
    c = flash_case(rng)
    g = _gen(rng)
    dtype, B, Sq, Sk, H, Hk, D = (c[n] for n in ("dtype", "B", "Sq", "Sk", "H", "Hk", "D"))
    q = _randn((B, Sq, H, D), dtype, g, c["mag"])
    k = _randn((B, Sk, Hk, D), dtype, g, c["mag"])
    v = _randn((B, Sk, Hk, D), dtype, g)
    dout = _randn((B, Sq, H, D), dtype, g)
    nan_at = None
    if c["nan"]:
        c["grad"] = False
        nan_at = _inject_nan(c, rng, (q, k, v))
    kw = dict(causal=c["causal"], softmax_scale=c["scale"], window=c["window"], softcap=c["softcap"])
    case = f"flash #{i} {c}"

    def run(fn, cast, lay):
        args = [lay(t.to(cast)).requires_grad_(c["grad"]) for t in (q, k, v)]
        out, lse = fn(*args, **kw, return_lse=True)
        grads = None
        if c["grad"]:
            grads = torch.autograd.grad(out, args, dout.to(cast))
        return out, lse, grads

    ours = run(fastattn.flash_attention, dtype, lambda t: _strided(t, rng))
    low = run(ref.attention, dtype, lambda t: t)
    true = run(ref.attention, torch.float64, lambda t: t)
    assert ours[0].dtype == dtype and ours[0].is_contiguous() and ours[1].dtype == torch.float32, case
    check_ratio(ours[0], low[0], true[0], "out", case, nan_ok=_v_nan_ok(c, nan_at, ours[0].shape, H, Hk))
    check_ratio(ours[1], low[1], true[1], "lse", case)
    if c["grad"]:
        gscale = _absmax(*true[2])
        atol = bwd_fp32_atol(q, k, v, dout, c, gscale)
        # the reference error: the unfused one in dtype, or the algorithm's own (D from O in dtype)
        extra = flash_bwd_rounding(q, k, dout, true[0].detach(), c, dtype) + (None,)
        for name, o, lo, t, x in zip(("dq", "dk", "dv"), ours[2], low[2], true[2], extra):
            assert o.dtype == dtype, case
            if x is not None and _max_err((t + x).to(dtype), t) > _max_err(lo, t):
                lo = (t + x).to(dtype)
            check_ratio(o, lo, t, name, case, atol=atol, scale=1.0)
    # contiguous inputs give bitwise the same results; return_lse=False the output alone
    if not c["grad"]:
        plain = fastattn.flash_attention(q, k, v, **kw, return_lse=c["return_lse"])
        assert isinstance(plain, tuple if c["return_lse"] else torch.Tensor), case
        for a, b in zip(plain if c["return_lse"] else (plain,), ours[:2]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=case)


@pytest.mark.parametrize("i", _cases(300))
def test_fuzz_flash_attention(i):
    run_flash_case(i)


# =========================================================================================
# flash_attention_varlen
# =========================================================================================
def run_varlen_case(i):
    rng = _rng("varlen", i)
    g = _gen(rng)
    dtype = rng.choice(DTYPES)
    nseq = rng.randint(1, 5)
    lq = [rng.choice((0, 1, rng.randint(0, 40), rng.randint(0, 90))) for _ in range(nseq)]
    lk = [rng.choice((0, 1, rng.randint(0, 40), rng.randint(0, 90))) for _ in range(nseq)]
    Hk = rng.randint(1, 3)
    H = Hk * rng.choice((1, 2, 4))
    D = rng.choice(HEAD_DIMS)
    c = dict(dtype=dtype, lq=lq, lk=lk, H=H, Hk=Hk, D=D, causal=rng.random() < 0.4,
             window=_window(rng, max(lq), max(lk)), softcap=rng.choice((0.0, 0.0, rng.uniform(2.0, 30.0))),
             scale=rng.choice((None, None, rng.uniform(-0.5, 1.5))), grad=rng.random() < 0.5,
             extra_q=rng.choice((0, 0, 5)), extra_k=rng.choice((0, 0, 7)),
             nan=rng.choice((None,) * 9 + ("q", "k", "v")))
    case = f"varlen #{i} {c}"
    tq, tk = sum(lq), sum(lk)
    q = _randn((tq, H, D), dtype, g)
    k = _randn((tk, Hk, D), dtype, g)
    v = _randn((tk, Hk, D), dtype, g)
    dout = _randn((tq, H, D), dtype, g)
    nan_at = None
    if c["nan"]:
        c["grad"] = False
        nan_at = _inject_nan(c, rng, (q, k, v))
    cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0).tolist()), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lk).cumsum(0).tolist()), dtype=torch.int32)
    cq, ck = _index_view(cq, rng), _index_view(ck, rng)
    # max_seqlen may be larger than needed (an upper bound)
    mq, mk = max(lq) + c["extra_q"], max(lk) + c["extra_k"]
    kw = dict(causal=c["causal"], softmax_scale=c["scale"], window=c["window"], softcap=c["softcap"])

    def run(fn, cast, lay, *extra):
        args = [lay(t.to(cast)).requires_grad_(c["grad"]) for t in (q, k, v)]
        out, lse = fn(*args, cq, ck, *extra, **kw, return_lse=True)
        grads = torch.autograd.grad(out, args, dout.to(cast), allow_unused=True) if c["grad"] and tq else None
        return out, lse, grads

    ours = run(fastattn.flash_attention_varlen, dtype, lambda t: _strided(t, rng), mq, mk)
    low = run(ref.attention_varlen, dtype, lambda t: t)
    true = run(ref.attention_varlen, torch.float64, lambda t: t)
    assert ours[0].dtype == dtype and ours[1].shape == (H, tq), case
    check_ratio(ours[0], low[0], true[0], "out", case, nan_ok=_v_nan_ok(c, nan_at, ours[0].shape, H, Hk))
    check_ratio(ours[1], low[1], true[1], "lse", case)
    if ours[2] is not None:
        gscale = _absmax(*[t for t in true[2] if t is not None])
        for name, o, lo, t in zip(("dq", "dk", "dv"), ours[2], low[2], true[2]):
            if t is None:  # the reference never touched the rows (every sequence empty)
                t = lo = torch.zeros_like(o, dtype=torch.float64)
            assert o is not None and o.dtype == dtype and o.shape == t.shape, case
            # per sequence the dense case's tolerances apply; use their worst over sequences
            atol, x_err = 0.0, 0.0
            for b in range(nseq):
                sl_q, sl_k = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
                if lq[b] == 0 or lk[b] == 0:
                    continue
                qb, kb, vb, db = q[sl_q][None], k[sl_k][None], v[sl_k][None], dout[sl_q][None]
                atol = max(atol, bwd_fp32_atol(qb, kb, vb, db, c, gscale))
                if name != "dv":
                    ob = true[0][sl_q][None].detach()
                    xq, xk = flash_bwd_rounding(qb, kb, db, ob, c, dtype)
                    x = xq if name == "dq" else xk
                    tb = (t[sl_q] if name == "dq" else t[sl_k])[None]
                    x_err = max(x_err, _max_err((tb + x).to(dtype), tb))
            if x_err > _max_err(lo, t):  # the algorithm's own rounding (see flash_bwd_rounding)
                lo = _with_err(t, x_err)
            check_ratio(o, lo, t, name, case, atol=max(atol, 1e-5), scale=1.0)


def _with_err(t, err):
    """A tensor at max distance err from t (to feed check_ratio a reference error)."""
    out = t.clone()
    if out.numel():
        out.view(-1)[0] += err
    return out


@pytest.mark.parametrize("i", _cases(150))
def test_fuzz_flash_attention_varlen(i):
    run_varlen_case(i)


# =========================================================================================
# scaled_dot_product_attention (drop-in: compared with torch's, as a user would)
# =========================================================================================
def _outcome(fn):
    """(result, None) or (None, exception)."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 -- the point is to compare what is raised
        return None, e


def _sdpa_f64(q, k, v, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cast = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    kw = dict(kw, attn_mask=cast(kw.get("attn_mask")))
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(cast(q), cast(k), cast(v), **kw)


def sdpa_case(rng):
    dtype = rng.choice(DTYPES + (torch.float64,) if rng.random() < 0.1 else DTYPES)
    B, L, S = rng.randint(1, 3), _seqlen(rng), _seqlen(rng)
    Hk = rng.randint(1, 3)
    gqa = rng.random() < 0.3
    H = Hk * rng.choice((2, 3)) if gqa else Hk
    E = rng.choice(HEAD_DIMS)
    Ev = E if rng.random() < 0.9 else rng.choice((8, 24))
    rank = rng.choice((4, 4, 4, 4, 3, 5))
    mask = rng.choice((None, None, None, "bool", "float"))
    mask_shape = rng.choice(("LS", "LS", "11LS", "B1LS", "BHLS", "1HLS", "1S", "S"))
    # (torch refuses a mask with is_causal: a few such cases check that we raise alike)
    return dict(dtype=dtype, B=B, L=L, S=S, H=H, Hk=Hk, E=E, Ev=Ev, rank=rank, gqa=gqa,
                is_causal=rng.random() < (0.4 if mask is None else 0.05), scale=rng.choice((None, None, rng.uniform(0.01, 1.5))),
                mask=mask, mask_shape=mask_shape, grad=rng.random() < 0.4)


def run_sdpa_case(i):
    rng = _rng("sdpa", i)
    c = sdpa_case(rng)
    g = _gen(rng)
    dtype, B, L, S, H, Hk, E, Ev = (c[n] for n in ("dtype", "B", "L", "S", "H", "Hk", "E", "Ev"))
    case = f"sdpa #{i} {c}"
    lead = {4: (B,), 3: (), 5: (B, 2)}[c["rank"]]
    q = _randn(lead + (H, L, E), dtype, g)
    k = _randn(lead + (Hk, S, E), dtype, g)
    v = _randn(lead + (Hk, S, Ev), dtype, g)
    dout = _randn(lead + (H, L, Ev), dtype, g)
    mask = None
    if c["mask"]:
        shape = {"LS": (L, S), "11LS": (1, 1, L, S), "B1LS": lead + (1, L, S), "BHLS": lead + (H, L, S),
                 "1HLS": (1, H, L, S), "S": (S,), "1S": (1, S)}[c["mask_shape"]]
        if c["mask"] == "bool":
            mask = torch.rand(shape, generator=g) > 0.3
        else:
            mask = _randn(shape, dtype, g)
    kw = dict(attn_mask=mask, is_causal=c["is_causal"], scale=c["scale"], enable_gqa=c["gqa"])
    layouts = [rng.getrandbits(32) if rng.random() < 0.5 else None for _ in range(3)]

    def lay(t, j):
        # the same layout for fastattn and torch (torch's backend choice depends on strides)
        if layouts[j] is None or t.dim() < 2:
            return t
        r = random.Random(layouts[j])
        # a projection viewed as (B, H, L, E): heads and tokens swapped in memory; sometimes
        # the last dim is strided too (torch accepts any strides)
        t2 = t.transpose(-2, -3).contiguous().transpose(-2, -3)
        return _strided(t2, r, keep_last=r.random() < 0.8)

    def run(fn, cast):
        args = [lay(t.to(cast), j).requires_grad_(c["grad"]) for j, t in enumerate((q, k, v))]
        out = fn(*args, **kw)
        grads = torch.autograd.grad(out, args, dout.to(cast)) if c["grad"] else None
        return out, grads

    ours, e_ours = _outcome(lambda: run(fastattn.scaled_dot_product_attention, dtype))
    low, e_low = _outcome(lambda: run(F.scaled_dot_product_attention, dtype))
    if e_low is not None or e_ours is not None:
        # torch's errors are the drop-in's errors
        assert e_low is not None and e_ours is not None, f"torch: {e_low!r}, fastattn: {e_ours!r} [{case}]"
        assert type(e_ours) is type(e_low), f"torch raised {e_low!r}, fastattn {e_ours!r} [{case}]"
        return
    if mask is not None or q.dim() != 4 or Ev != E or dtype == torch.float64:
        # documented as delegated to torch: torch's result, bitwise
        assert torch.equal(ours[0], low[0]) and ours[0].stride() == low[0].stride(), case
        for o, lo in zip(ours[1] or (), low[1] or ()):
            assert torch.equal(o, lo), case
        return
    true = run(_sdpa_f64, torch.float64)
    assert ours[0].dtype == low[0].dtype and ours[0].shape == low[0].shape, case
    # torch's memory layout (code that views the result must work on ours too)
    same_layout = all(n <= 1 or a == b for n, a, b in zip(ours[0].shape, ours[0].stride(), low[0].stride()))
    assert same_layout, f"strides {ours[0].stride()} != torch's {low[0].stride()} [{case}]"
    check_ratio(ours[0], low[0], true[0], "out", case)
    if c["grad"]:
        gscale = _absmax(*true[1])
        scale = c["scale"] if c["scale"] is not None else E ** -0.5
        cc = dict(scale=scale, softcap=0.0)
        atol = 1e-5 * max(1.0, gscale)
        if q.dim() == 4 and mask is None and Ev == E:  # the kernel's backward: its fp32 terms
            tr = lambda t: t.transpose(1, 2)  # noqa: E731
            atol = bwd_fp32_atol(tr(q), tr(k), tr(v), tr(dout), cc, gscale)
        for name, o, lo, t in zip(("dq", "dk", "dv"), ours[1], low[1], true[1]):
            assert o.dtype == lo.dtype and o.shape == lo.shape, case
            if name != "dv" and q.dim() == 4 and mask is None and Ev == E and dtype != torch.float64:
                # the algorithm's rounding of O (flash_bwd_rounding), top-left causal as torch
                Sk_eff = min(S, L) if c["is_causal"] else S
                cw = dict(cc, causal=False, window=(-1, max(L - S, 0)) if c["is_causal"] else (-1, -1))
                tr = lambda t: t.transpose(1, 2)  # noqa: E731
                xq, xk = flash_bwd_rounding(tr(q), tr(k)[:, :Sk_eff], tr(dout), tr(true[0]).detach(), cw, dtype)
                x = tr(xq) if name == "dq" else torch.cat([tr(xk), torch.zeros_like(t[:, :, Sk_eff:])], 2)
                if _max_err((t + x).to(dtype), t) > _max_err(lo, t):
                    lo = (t + x).to(dtype)
            check_ratio(o, lo, t, name, case, atol=atol, scale=1.0)


@pytest.mark.parametrize("i", _cases(250))
def test_fuzz_scaled_dot_product_attention(i):
    run_sdpa_case(i)


# =========================================================================================
# rms_norm and nn.RMSNorm (drop-ins: torch's dtypes, shapes and errors)
# =========================================================================================
RMS_N = (1, 3, 4, 5, 8, 17, 64, 111, 128, 1000, 4097)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _lead_shape(rng):
    return rng.choice(((), (0,), (1,), (3,), (2, 5), (rng.randint(1, 40),), (2, 0, 3), (2, 3, 4)))


def rms_case(rng):
    dtype = rng.choice(FLOATS + (torch.float64,) if rng.random() < 0.1 else FLOATS)
    N = rng.choice(RMS_N)
    lead = _lead_shape(rng)
    if N > 1000:
        lead = lead[:1]
    wdt = rng.choice((None, dtype, dtype, rng.choice(FLOATS)))
    rdt = rng.choice((None, None, dtype, rng.choice(FLOATS)))
    return dict(dtype=dtype, N=N, lead=lead, wdt=wdt, rdt=rdt,
                eps=rng.choice((1e-6, 1e-5, None, 0.0, 1e-2, 1.0)), grad=rng.random() < 0.5,
                mag=rng.choice((1.0, 1.0, 1e-3, 100.0)))


def _torch_rms(x, w, eps, r):
    h = x + r if r is not None else x
    y = F.rms_norm(h, (h.shape[-1],), w, eps)
    return (y, h) if r is not None else y


def run_rms_case(i, module=False):
    rng = _rng("rms_nn" if module else "rms", i)
    c = rms_case(rng)
    g = _gen(rng)
    dtype, N, lead = c["dtype"], c["N"], c["lead"]
    case = f"{'nn.RMSNorm' if module else 'rms_norm'} #{i} {c}"
    shape = lead + (N,)
    x = _randn(shape, dtype, g, c["mag"])
    w = _randn((N,), c["wdt"], g) if c["wdt"] else None
    r = _randn(shape, c["rdt"], g, c["mag"]) if c["rdt"] else None
    seeds = [rng.getrandbits(32) for _ in range(3)]
    grad = c["grad"] and x.numel() > 0
    eps = c["eps"]

    def lay(t, j):  # the same (random, any-stride) layout for every run
        return None if t is None else _strided(t, random.Random(seeds[j]), keep_last=False)

    douts = []

    def run(impl, cast):
        cx = lambda t, j: None if t is None else lay(t.to(cast) if cast else t, j)  # noqa: E731
        xx, ww, rr = cx(x, 0), cx(w, 1), cx(r, 2)
        leaves = [t.requires_grad_(grad) for t in (xx, ww, rr) if t is not None]
        if impl == "ours" and module:
            m = fastattn.nn.RMSNorm(N, eps=eps, elementwise_affine=w is not None, dtype=c["wdt"])
            if w is not None:
                m.weight = torch.nn.Parameter(ww, requires_grad=grad)
                leaves[1] = m.weight
            out = m(xx) if rr is None else m(xx, rr)
        elif impl == "ours":
            out = fastattn.rms_norm(xx, ww, eps, residual=rr)
        else:
            out = _torch_rms(xx, ww, eps if eps is not None or cast != torch.float64 else None, rr)
        outs = out if isinstance(out, tuple) else (out,)
        grads = None
        if grad:
            if not douts:  # drawn once, in the dtypes of our outputs; the same values for every run
                douts.extend(_randn(o.shape, o.dtype, torch.Generator().manual_seed(seeds[0] + j))
                             for j, o in enumerate(outs))
            grads = torch.autograd.grad(outs, leaves, [d.to(o.dtype) for d, o in zip(douts, outs)])
        return outs, grads

    ours = run("ours", None)
    low = run("torch", None)
    for o, lo in zip(ours[0], low[0]):
        assert o.dtype == lo.dtype and o.shape == lo.shape, f"{o.dtype}{tuple(o.shape)} vs torch {lo.dtype}{tuple(lo.shape)} [{case}]"
        # where torch's result is contiguous ours is too (code that views it works on ours);
        # for a strided last dim torch's layout depends on its path (fused kernel: contiguous,
        # composite: the input's) and ours is contiguous
        assert o.is_contiguous() or not lo.is_contiguous(), f"strides {o.stride()}, torch's {lo.stride()} [{case}]"
    if len(ours[0]) == 2:
        assert torch.equal(ours[0][1], low[0][1]), f"h = x + residual differs from torch's [{case}]"
    if eps is None and dtype != torch.float64:
        eps = torch.finfo(torch.float32).eps  # torch's default: the fp32 (accumulation) epsilon
    true = run("torch", torch.float64) if eps is not None else low
    if eps is not None and len(true[0]) == 2:
        # the truth normalises the h the op actually formed (rounded in the promoted dtype),
        # and differentiates there: d/dx = d/dresidual = d/dh (+ the gradient of h itself)
        h = ours[0][1].detach().double().requires_grad_(grad)
        w64 = None if w is None else w.double().requires_grad_(grad)
        y64 = F.rms_norm(h, (N,), w64, eps)
        grads = true[1]
        if grad:
            gh, *gw = torch.autograd.grad(y64, [h] + ([w64] if w64 is not None else []), douts[0].double())
            gh = gh + douts[1].double()
            grads = (gh, *gw, gh)  # leaves: x, weight (if any), residual
        true = ((y64, true[0][1]), grads)
    check_ratio(ours[0][0], low[0][0], true[0][0], "y", case)
    if grad:
        # dx = rstd * (w dy - xhat mean(w dy xhat)) cancels terms of size rstd |w dy|: fp32
        # rounding relative to them (large where eps is ~0 and the rows tiny), not to dx
        h = (ours[0][1] if len(ours[0]) == 2 else x).detach().double()
        rstd = torch.rsqrt(h.pow(2).mean(-1) + (eps if eps is not None else torch.finfo(torch.float64).eps))
        wmax = 1.0 if w is None else max(1.0, _absmax(w))
        atol = 1e-5 + 4 * torch.finfo(torch.float32).eps * _absmax(rstd) * wmax * _absmax(douts[0]) * math.sqrt(N)
        for j, (o, lo, t) in enumerate(zip(ours[1], low[1], true[1])):
            assert o.dtype == lo.dtype and o.shape == lo.shape, case
            check_ratio(o, lo, t, f"grad {j}", case, atol=atol, scale=1.0)


def run_rms_nn_case(i):
    run_rms_case(i, module=True)


@pytest.mark.parametrize("i", _cases(200))
def test_fuzz_rms_norm(i):
    run_rms_case(i)


@pytest.mark.parametrize("i", _cases(80))
def test_fuzz_nn_rms_norm(i):
    run_rms_nn_case(i)


# ---- regressions found by the fuzzer ----------------------------------------------------
def test_regression_rms_norm_empty_strided_last_dim():
    # An empty x (or residual) whose last dim has stride != 1 counts as contiguous to torch, so
    # .contiguous() returned it as it was and the op refused its stride (ValueError); torch
    # returns an empty result.
    for x in (torch.randn(2, 0, 3, 34)[..., ::2], torch.randn(0, 34)[:, ::2]):
        w = torch.randn(17)
        want = F.rms_norm(x, (17,), w, 1e-6)
        got = fastattn.rms_norm(x, w, 1e-6)
        assert got.shape == want.shape and got.dtype == want.dtype
        y, h = fastattn.rms_norm(x, w, 1e-6, residual=x.clone())
        assert y.shape == h.shape == x.shape
        assert fastattn.nn.RMSNorm(17)(x).shape == x.shape


@pytest.mark.parametrize("xdt, wdt", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                      (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_regression_rms_norm_weight_of_another_dtype(xdt, wdt):
    # torch multiplies by a weight of another dtype in fp32 and rounds once; fastattn rounded
    # the weight to x's dtype first: up to ~2.3x torch's error (fp32 master weight, bf16 x),
    # and inf where a bf16 weight overflows fp16 (torch: finite).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1000, generator=g).to(xdt)
    w = (torch.randn(1000, generator=g) * 3).to(wdt)
    true = F.rms_norm(x.double(), (1000,), w.double(), 1e-6)
    ours, theirs = fastattn.rms_norm(x, w, 1e-6), F.rms_norm(x, (1000,), w, 1e-6)
    assert ours.dtype == theirs.dtype == xdt
    # correctly rounded, as torch's: within half an ulp of the truth (+ fp32 rounding)
    ulp = torch.finfo(xdt).eps * true.abs().clamp_min(torch.finfo(xdt).tiny)
    assert ((ours.double() - true).abs() <= 0.5 * ulp * 1.001 + 1e-6).all()
    # a weight beyond fp16's range: torch's result is finite where x * rstd * w is
    if xdt == torch.float16 and wdt == torch.bfloat16:
        xs = torch.full((4, 16), 0.01, dtype=xdt) * torch.rand(4, 16, generator=g).to(xdt)
        big = torch.full((16,), 1e5, dtype=wdt)
        want = F.rms_norm(xs, (16,), big)
        got = fastattn.rms_norm(xs, big)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.isfinite(want).any()


# =========================================================================================
# apply_rotary and nn.RotaryEmbedding
# =========================================================================================
def _tables(max_pos, half, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, half, dtype=torch.float64) * 2 / (2 * half)))
    f = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    return f.cos().float(), f.sin().float()


def _rotary_truth(q, k, cos, sin, positions, interleaved):
    # the reference formula in float64 on the fp32 tables
    return ref.apply_rotary(q.double(), k.double(), cos.double(), sin.double(), positions, interleaved)


def run_rotary_case(i):
    rng = _rng("rotary", i)
    g = _gen(rng)
    dtype = rng.choice(DTYPES)
    B, S = rng.randint(1, 3), rng.choice((1, 2, rng.randint(1, 40), rng.randint(40, 130)))
    Hk = rng.randint(1, 3)
    H = Hk * rng.choice((1, 2, 4))
    D = rng.choice((2, 4, 8, 16, 40, 64, 72, 96, 128, 160, 256, 6, 34))
    R = rng.choice((D, D, 2 * rng.randint(1, D // 2)))
    max_pos = S + rng.choice((0, 0, 5, 300))
    pos_kind = rng.choice(("none", "S", "BS"))
    c = dict(dtype=dtype, B=B, S=S, H=H, Hk=Hk, D=D, R=R, max_pos=max_pos, pos=pos_kind,
             interleaved=rng.random() < 0.5, inplace=rng.random() < 0.3, grad=rng.random() < 0.4,
             pdt=rng.choice((torch.int32, torch.int64)))
    case = f"rotary #{i} {c}"
    cos, sin = _tables(max_pos, R // 2, base=rng.choice((10000.0, 500000.0, 10.0)))
    positions = None
    if pos_kind == "S":
        positions = torch.randint(0, max_pos, (S,), generator=g).to(c["pdt"])
    elif pos_kind == "BS":
        positions = torch.randint(0, max_pos, (B, S), generator=g).to(c["pdt"])
    if positions is not None:
        positions = _index_view(positions, rng)
    q = _randn((B, S, H, D), dtype, g)
    k = _randn((B, S, Hk, D), dtype, g)
    dq, dk = _randn(q.shape, dtype, g), _randn(k.shape, dtype, g)
    seeds = [rng.getrandbits(32) for _ in range(2)]
    lay = lambda t, j: _strided(t, random.Random(seeds[j]))  # noqa: E731

    def run(fn, cast, ours):
        qq, kk = lay(q.to(cast).clone(), 0), lay(k.to(cast).clone(), 1)  # (ours may rotate in place)
        if c["grad"]:
            leaves = (qq.requires_grad_(), kk.requires_grad_())
            # in place needs a non-leaf (as any torch in-place op on a tensor that requires grad)
            qq, kk = qq * 1, kk * 1
        if ours:
            before = (qq.data_ptr(), kk.data_ptr())
            oq, ok = fastattn.apply_rotary(qq, kk, cos, sin, positions=positions, interleaved=c["interleaved"],
                                           inplace=c["inplace"])
            if c["inplace"]:
                assert oq is qq and ok is kk and (oq.data_ptr(), ok.data_ptr()) == before, case
        else:
            oq, ok = fn(qq, kk, cos.to(torch.float64) if cast == torch.float64 else cos,
                        sin.to(torch.float64) if cast == torch.float64 else sin, positions, c["interleaved"])
        grads = torch.autograd.grad((oq, ok), leaves, (dq.to(cast), dk.to(cast))) if c["grad"] else None
        return (oq, ok), grads

    ours = run(None, dtype, True)
    true = run(ref.apply_rotary, torch.float64, False)
    # the "same dtype" reference: the rotation in fp32 on the fp32 tables, rounded once (what an
    # fp32-accumulating kernel can reach; ref.apply_rotary in bf16 would round the tables first)
    low = run(lambda q_, k_, *a: tuple(t.to(dtype) for t in ref.apply_rotary(q_, k_, *a)), torch.float32, False)
    for name, o, lo, t in zip(("q", "k"), ours[0], low[0], true[0]):
        assert o.dtype == dtype and o.shape == t.shape, case
        check_ratio(o, lo, t, name, case)
    if c["grad"]:
        for name, o, lo, t in zip(("dq", "dk"), ours[1], low[1], true[1]):
            assert o.dtype == dtype, case
            check_ratio(o, lo.to(dtype), t, name, case)


@pytest.mark.parametrize("i", _cases(150))
def test_fuzz_apply_rotary(i):
    run_rotary_case(i)


# =========================================================================================
# decode_attention, attention_with_kvcache, append_kv (contiguous and paged caches)
# =========================================================================================
def _kv_setup(rng, g, dtype, B, Hk, D, need):
    """Caches (contiguous or paged, maybe strided views) with random contents, and
    block_table; ``need[b]`` tokens of sequence b must fit."""
    paged = rng.random() < 0.5
    if not paged:
        S_max = max(need) + rng.choice((0, 0, 3, 17))
        shape = (B, S_max, Hk, D)
        block_table, num_pages, page_size = None, None, None
    else:
        page_size = rng.choice((1, 3, 16, rng.randint(1, 20)))
        max_pages = max(1, -(-max(need) // page_size) + rng.choice((0, 0, 1, 2)))
        num_pages = B * max_pages + rng.choice((0, 3))
        perm = torch.randperm(num_pages, generator=g)[: B * max_pages].view(B, max_pages).to(torch.int32)
        # entries past the pages a sequence uses may hold anything (-1 here, or a big index)
        block_table = perm.clone()
        for b in range(B):
            used = -(-need[b] // page_size)
            if used < max_pages and rng.random() < 0.5:
                block_table[b, used:] = rng.choice((-1, 10**6))
        shape = (num_pages, page_size, Hk, D)
    seeds = [rng.getrandbits(32) for _ in range(2)]
    values = [_randn(shape, dtype, g) for _ in range(2)]
    # the caches fastattn gets: views of larger buffers (random strides) as often as not
    strided = lambda: [_strided(t, random.Random(s)) for t, s in zip(values, seeds)]  # noqa: E731
    return values, strided, block_table, paged


def run_kvcache_case(i):
    rng = _rng("kvcache", i)
    g = _gen(rng)
    dtype = rng.choice(DTYPES)
    B = rng.randint(1, 4)
    Hk = rng.randint(1, 3)
    H = Hk * rng.choice((1, 2, 4, 8))
    D = rng.choice(HEAD_DIMS)
    op = rng.choice(("decode", "decode", "kvcache", "kvcache", "kvcache_append", "append"))
    Sq = 1 if op == "decode" else rng.choice((1, 1, 2, rng.randint(1, 9)))
    lens = [rng.choice((0, 1, rng.randint(0, 40), rng.randint(0, 200))) for _ in range(B)]
    add = Sq if op in ("kvcache_append", "append") else 0
    need = [n + add for n in lens]
    values, strided, bt, paged = _kv_setup(rng, g, dtype, B, Hk, D, need)
    c = dict(op=op, dtype=dtype, B=B, H=H, Hk=Hk, D=D, Sq=Sq, lens=lens, paged=paged,
             page_size=values[0].shape[1] if paged else None, cache_shape=tuple(values[0].shape),
             num_splits=rng.choice((0, 0, 1, 2, 3, 7, 128)), softcap=rng.choice((0.0, 0.0, rng.uniform(2.0, 30.0))),
             scale=rng.choice((None, None, rng.uniform(-0.5, 1.5))), causal=rng.random() < 0.7,
             window=_window(rng, Sq, max(need)), q4=rng.random() < 0.5,
             nan=rng.choice((None,) * 9 + ("q", "k", "v")))
    case = f"kvcache #{i} {c}"
    seqlens = _index_view(torch.tensor(lens, dtype=torch.int32), rng)
    q = _strided(_randn((B, Sq, H, D), dtype, g), rng)
    k_new = _randn((B, Sq, Hk, D), dtype, g)
    v_new = _randn((B, Sq, Hk, D), dtype, g)
    # a NaN in q, or in a cache row (values; caches and their copies are made from it)
    nan_at = _inject_nan(c, rng, (q, values[0], values[1]))
    common = dict(softmax_scale=c["scale"], softcap=c["softcap"])

    caches = strided()
    ref_caches = [t.clone() for t in values]
    bt_ours = _index_view(bt, rng) if bt is not None else None
    if bt is not None:  # the reference gathers every listed page: the unused entries made valid
        bt = bt.clamp(0, values[0].shape[0] - 1)
    if op == "append":
        before = [t._version for t in caches]
        fastattn.append_kv(*caches, k_new, v_new, seqlens, block_table=bt_ours)
        ref.append_kv(*ref_caches, k_new, v_new, seqlens, block_table=bt)
        assert all(t._version > v for t, v in zip(caches, before)), f"version counters not bumped [{case}]"
        for o, r in zip(caches, ref_caches):
            assert _same(o, r), f"append_kv wrote differently from the reference [{case}]"
        return
    if op == "decode":
        qd = q[:, 0] if not c["q4"] else q
        out, lse = fastattn.decode_attention(qd, *caches, seqlens, num_splits=c["num_splits"], return_lse=True,
                                             block_table=bt_ours, **common)
        res = lambda cast: ref.decode_attention(  # noqa: E731
            qd.to(cast), ref_caches[0].to(cast), ref_caches[1].to(cast), seqlens, c["scale"], True, bt, c["softcap"])
        low, true = res(dtype), res(torch.float64)
        assert out.shape == qd.shape and lse.shape == (B, H), case
    else:
        kv = dict(k=k_new, v=v_new) if op == "kvcache_append" else {}
        out, lse = fastattn.attention_with_kvcache(
            q, *caches, seqlens, **kv, block_table=bt_ours, causal=c["causal"], window=c["window"],
            num_splits=c["num_splits"], return_lse=True, **common)

        def res(cast):
            rc = [t.to(cast) for t in ref_caches]
            kv_ = {n: t.to(cast) for n, t in kv.items()}
            return ref.attention_with_kvcache(q.to(cast), *rc, seqlens, **kv_, block_table=bt, causal=c["causal"],
                                              window=c["window"], softmax_scale=c["scale"], return_lse=True,
                                              softcap=c["softcap"])
        low, true = res(dtype), res(torch.float64)
        assert out.shape == q.shape and lse.shape == (B, H, Sq), case
        if kv:  # the appended rows, exactly; cache_seqlens not advanced
            ref.append_kv(*ref_caches, k_new, v_new, seqlens, block_table=bt)
            for o, r in zip(caches, ref_caches):
                assert _same(o, r), f"the append differs from the reference [{case}]"
        else:
            for o, r in zip(caches, ref_caches):
                assert _same(o, r), f"the caches changed without k/v [{case}]"
        assert seqlens.tolist() == lens, case
    assert out.dtype == dtype and lse.dtype == torch.float32 and not out.requires_grad, case
    check_ratio(out, low[0], true[0], "out", case, nan_ok=_v_nan_ok(c, nan_at, out.shape, H, Hk))
    check_ratio(lse, low[1], true[1], "lse", case)


@pytest.mark.parametrize("i", _cases(250))
def test_fuzz_kvcache(i):
    run_kvcache_case(i)


def test_regression_backward_of_empty_outputs():
    # out.sum().backward() sends an expanded (zero-stride) gradient; for an empty output
    # .contiguous() kept those strides (an empty tensor counts as contiguous) and the backward
    # ops refused dout's last-dim stride: ValueError instead of torch's empty/zero gradients.
    def leaves(*shapes):
        return [torch.randn(*s, requires_grad=True) for s in shapes]

    for shapes in (((1, 0, 2, 8), (1, 5, 2, 8), (1, 5, 2, 8)), ((0, 3, 2, 8), (0, 5, 2, 8), (0, 5, 2, 8))):
        q, k, v = leaves(*shapes)
        fastattn.flash_attention(q, k, v).sum().backward()
        assert q.grad.shape == q.shape and torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))
    q, k, v = leaves((0, 2, 8), (6, 2, 8), (6, 2, 8))
    cu_q, cu_k = torch.tensor([0, 0], dtype=torch.int32), torch.tensor([0, 6], dtype=torch.int32)
    fastattn.flash_attention_varlen(q, k, v, cu_q, cu_k, 0, 6).sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))
    q, k = leaves((1, 0, 2, 8), (1, 0, 2, 8))
    qr, kr = fastattn.apply_rotary(q, k, torch.randn(4, 4), torch.randn(4, 4))
    (qr.sum() + kr.sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def _inv_freq64(dim, base, scaling):
    """RoPE inverse frequencies in float64, written from the published formulas (Meta's
    llama3 apply_scaling; linear = position interpolation)."""
    freqs = [base ** (-(2 * i) / dim) for i in range(dim // 2)]
    if scaling is None:
        return freqs
    if scaling["rope_type"] == "linear":
        return [f / scaling["factor"] for f in freqs]
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(f)
        elif wavelen > old / lo:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def run_rotary_module_case(i):
    rng = _rng("rotary_nn", i)
    g = _gen(rng)
    dtype = rng.choice(DTYPES)
    D = rng.choice((8, 16, 64, 96, 128, 80))
    dim = rng.choice((D, D, 2 * rng.randint(1, D // 2)))
    scaling = rng.choice((None, None, {"rope_type": "linear", "factor": rng.uniform(1.5, 8.0)},
                          {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": rng.choice((64, 8192))}))
    base = rng.choice((10000.0, 500000.0, 1000.0))
    max_pe = rng.choice((1, 16, 128, 2048))
    B, S = rng.randint(1, 3), rng.choice((1, rng.randint(1, 40)))
    pos_kind = rng.choice(("none", "S", "BS"))
    hi_pos = rng.choice((S, max_pe, 3 * max_pe + 7, 5000))  # beyond the cached tables: they grow
    c = dict(dtype=dtype, D=D, dim=dim, scaling=scaling, base=base, max_pe=max_pe, B=B, S=S, pos=pos_kind,
             hi_pos=hi_pos, interleaved=rng.random() < 0.3, inplace=rng.random() < 0.3,
             cast_module=rng.random() < 0.2)
    case = f"nn.RotaryEmbedding #{i} {c}"
    m = fastattn.nn.RotaryEmbedding(dim, max_position_embeddings=max_pe, base=base, interleaved=c["interleaved"],
                                    scaling=scaling)
    if c["cast_module"]:
        m = m.to(torch.bfloat16)  # the tables must stay (be rebuilt) fp32
    positions = None
    if pos_kind == "S":
        positions = torch.randint(0, max(hi_pos, 1), (S,), generator=g)
    elif pos_kind == "BS":
        positions = torch.randint(0, max(hi_pos, 1), (B, S), generator=g)
    H, Hk = 4, 2
    q = _randn((B, S, H, D), dtype, g)
    k = _randn((B, S, Hk, D), dtype, g)
    oq, ok = m(q.clone(), k.clone(), positions, inplace=c["inplace"])
    assert m.cos.dtype == torch.float32 and oq.dtype == dtype, case
    pos = positions if positions is not None else torch.arange(S)
    n = int(pos.max()) + 1
    inv64 = torch.tensor(_inv_freq64(dim, base, m.scaling), dtype=torch.float64)
    ang = torch.outer(torch.arange(n, dtype=torch.float64), inv64)
    true = ref.apply_rotary(q.double(), k.double(), ang.cos(), ang.sin(), positions, c["interleaved"])
    # fp32 tables the way Hugging Face builds them (the fp32 angle rounding is the module's own)
    inv32 = inv64.float()
    ang32 = torch.outer(torch.arange(n, dtype=torch.int64).float(), inv32)
    low = ref.apply_rotary(q.float(), k.float(), ang32.cos(), ang32.sin(), positions, c["interleaved"])
    for name, o, lo, t in zip(("q", "k"), (oq, ok), low, true):
        check_ratio(o, lo.to(dtype), t, name, case, atol=1e-5 + 2e-7 * n)


@pytest.mark.parametrize("i", _cases(60))
def test_fuzz_nn_rotary_embedding(i):
    run_rotary_module_case(i)


# =========================================================================================
# Bad input: one invalid argument in an otherwise valid random call must raise
# ValueError / TypeError / RuntimeError naming it (never a crash, never a result)
# =========================================================================================
def _bad_calls(rng, g):
    """(description, callable, words one of which the message must contain) for one random
    valid problem with one argument broken."""
    dtype = rng.choice(DTYPES)
    B, Sq, Sk, Hk = rng.randint(1, 3), rng.randint(1, 20), rng.randint(1, 40), rng.randint(1, 2)
    H, D = Hk * rng.choice((1, 2)), rng.choice((8, 16, 64))
    t = lambda *s, dt=dtype: _randn(s, dt, g)  # noqa: E731
    q, k, v = t(B, Sq, H, D), t(B, Sk, Hk, D), t(B, Sk, Hk, D)
    calls = []
    fa = fastattn.flash_attention
    calls += [
        ("flash k dtype", lambda: fa(q, k.double(), v), ("k",)),
        ("flash v shape", lambda: fa(q, k, v[:, :-1] if Sk > 1 else v[..., :-1]), ("v", "shape")),
        ("flash H % Hk", lambda: fa(q[:, :, :1].expand(B, Sq, 3, D).contiguous(), t(B, Sk, 2, D), t(B, Sk, 2, D)),
         ("heads",)),
        ("flash head dim", lambda: fa(q, k[..., :-1], v[..., :-1]), ("head dim", "k", "shape")),
        ("flash last dim", lambda: fa(t(B, Sq, H, 2 * D)[..., ::2], k, v), ("q", "contiguous")),
        ("flash window", lambda: fa(q, k, v, window=(rng.randint(-9, -2), 0)), ("window",)),
        ("flash softcap", lambda: fa(q, k, v, softcap=-rng.uniform(0.1, 5)), ("softcap",)),
        ("flash scale nan", lambda: fa(q, k, v, softmax_scale=float("nan")), ("softmax_scale",)),
        ("flash causal int", lambda: fa(q, k, v, causal=1), ("causal",)),
        ("flash rank", lambda: fa(q[0], k[0], v[0]), ("q", "dimensions")),
        ("flash batch", lambda: fa(q, torch.cat([k, k]), torch.cat([v, v])), ("batch",)),
    ]
    # varlen: malformed cu_seqlens (checked on the CPU)
    lens = [rng.randint(1, 9) for _ in range(rng.randint(1, 4))]
    tot = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    qv, kv_, vv = t(tot, H, D), t(tot, Hk, D), t(tot, Hk, D)
    fv = fastattn.flash_attention_varlen
    bad_cu = cu.clone()
    bad_cu[-1] += 1  # past total_q (ending before it is allowed: spare rows, as flash-attn)
    nonmono = cu.clone()
    nonmono[1] = tot + 1
    calls += [
        ("varlen end", lambda: fv(qv, kv_, vv, bad_cu, cu, max(lens) + 2, max(lens) + 2), ("cu_seqlens",)),
        ("varlen order", lambda: fv(qv, kv_, vv, cu, nonmono, max(lens) + 2, tot + 2), ("cu_seqlens",)),
        ("varlen max_seqlen", lambda: fv(qv, kv_, vv, cu, cu, max(lens) - 1, max(lens)), ("max_seqlen",)),
        ("varlen dtype", lambda: fv(qv, kv_, vv, cu.long(), cu, max(lens), max(lens)), ("cu_seqlens",)),
        ("varlen B", lambda: fv(qv, kv_, vv, cu, cu[:-1], max(lens), tot), ("cu_seqlens",)),
    ]
    # rms_norm
    x = t(3, 17)
    calls += [
        ("rms weight shape", lambda: fastattn.rms_norm(x, t(16)), ("weight",)),
        ("rms residual shape", lambda: fastattn.rms_norm(x, None, residual=t(3, 16)), ("residual",)),
        ("rms int weight", lambda: fastattn.rms_norm(x, torch.ones(17, dtype=torch.int32)), ("weight",)),
        ("rms eps str", lambda: fastattn.rms_norm(x, None, "1e-6"), ("eps",)),
        ("nn.RMSNorm shape", lambda: fastattn.nn.RMSNorm(16)(x), ("shape",)),
    ]
    # rotary
    cos, sin = _tables(Sq + 2, D // 2)
    pos_hi = torch.arange(Sq) + rng.choice((Sq + 2, 10**6))
    pos_neg = torch.arange(Sq)
    pos_neg[rng.randrange(Sq)] = -rng.randint(1, 5)
    ar = fastattn.apply_rotary
    calls += [
        ("rotary pos high", lambda: ar(q, k[:, :Sq] if Sk >= Sq else t(B, Sq, Hk, D), cos, sin, positions=pos_hi),
         ("position",)),
        ("rotary pos negative", lambda: ar(q, t(B, Sq, Hk, D), cos, sin, positions=pos_neg), ("position",)),
        ("rotary table dtype", lambda: ar(q, t(B, Sq, Hk, D), cos.double(), sin.double()), ("cos",)),
        ("rotary table width", lambda: ar(q, t(B, Sq, Hk, D), *_tables(Sq, D)), ("rotary dim", "head dim")),
        ("rotary pos dtype", lambda: ar(q, t(B, Sq, Hk, D), cos, sin, positions=torch.arange(Sq).float()),
         ("positions",)),
        ("rotary overlap", lambda: ar(q, q, cos, sin, inplace=True), ("overlap", "share")),
    ]
    # KV cache
    S_max = max(2, Sk + rng.randint(0, 5))
    kc, vc = t(B, S_max, Hk, D), t(B, S_max, Hk, D)
    lens_ok = torch.randint(0, S_max + 1, (B,), generator=g, dtype=torch.int32)
    too_long = lens_ok.clone()
    too_long[rng.randrange(B)] = S_max + rng.randint(1, 100)
    negative = lens_ok.clone()
    negative[rng.randrange(B)] = -rng.randint(1, 100)
    qd = t(B, H, D)
    page = rng.choice((1, 3, 16))
    max_pages = -(-S_max // page)
    pool_k, pool_v = t(B * max_pages, page, Hk, D), t(B * max_pages, page, Hk, D)
    bt = torch.randperm(B * max_pages, generator=g).view(B, max_pages).to(torch.int32)
    bt_bad = bt.clone()
    full = torch.full((B,), S_max, dtype=torch.int32)
    bad_b = rng.randrange(B)
    bt_bad[bad_b, rng.randrange(max_pages)] = rng.choice((-1, B * max_pages, 2**31 - 1))
    bt_bad_last = bt.clone()  # the page that token S_max - 1 (an appended one below) goes to
    bt_bad_last[bad_b, (S_max - 1) // page] = rng.choice((-1, B * max_pages, 2**31 - 1))
    new_k, new_v = t(B, 2, Hk, D), t(B, 2, Hk, D)
    calls += [
        ("decode len > capacity", lambda: fastattn.decode_attention(qd, kc, vc, too_long), ("cache_seqlens",)),
        ("decode negative len", lambda: fastattn.decode_attention(qd, kc, vc, negative), ("cache_seqlens",)),
        ("decode len dtype", lambda: fastattn.decode_attention(qd, kc, vc, lens_ok.long()), ("cache_seqlens",)),
        ("decode bad page", lambda: fastattn.decode_attention(qd, pool_k, pool_v, full, block_table=bt_bad),
         ("block_table",)),
        ("decode splits", lambda: fastattn.decode_attention(qd, kc, vc, lens_ok, num_splits=129), ("num_splits",)),
        ("decode cache dtype", lambda: fastattn.decode_attention(qd, kc.double(), vc.double(), lens_ok),
         ("k_cache",)),
        ("append past capacity", lambda: fastattn.append_kv(kc, vc, new_k, new_v, full - 1), ("capacity",)),
        ("append bad page", lambda: fastattn.append_kv(pool_k, pool_v, new_k, new_v, full - 2,
                                                       block_table=bt_bad_last), ("block_table",)),
        ("kvcache k without v", lambda: fastattn.attention_with_kvcache(q, kc, vc, lens_ok, k=new_k), ("k", "v")),
        ("kvcache append past capacity",
         lambda: fastattn.attention_with_kvcache(t(B, 2, H, D), kc, vc, full - 1, k=new_k, v=new_v), ("capacity",)),
        ("kvcache window", lambda: fastattn.attention_with_kvcache(q, kc, vc, lens_ok, window=(0, -5)), ("window",)),
    ]
    return calls


def run_bad_input_case(i):
    rng = _rng("bad", i)
    g = _gen(rng)
    for name, fn, words in _bad_calls(rng, g):
        try:
            result = fn()
        except (ValueError, TypeError, RuntimeError) as e:
            msg = str(e).lower()
            assert any(w.lower() in msg for w in words), f"bad input #{i} {name}: {str(e)!r} names none of {words}"
            continue
        raise AssertionError(f"bad input #{i} {name}: no error raised (returned {type(result).__name__})")


@pytest.mark.parametrize("i", _cases(40))
def test_fuzz_bad_input(i):
    run_bad_input_case(i)


@pytest.mark.parametrize("dtype", DTYPES)
def test_regression_nan_propagates(dtype):
    # A NaN in q (or in a key a row sees) gives NaN in that row's output AND lse, as torch's
    # math. Before: the tiled kernel wrote NaN with lse = -inf; the short-query / KV-cache
    # kernel skipped NaN scores in its max, so a NaN query row read as one that sees no key
    # (out 0, lse -inf); and a split holding a NaN key was dropped by the split merge (a
    # finite output from the other splits).
    g = torch.Generator().manual_seed(1)
    t = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    for Sq, Sk in ((5, 7), (3, 200), (1, 64)):  # tiled; short-query (decode kernel) path
        q, k, v = t(2, Sq, 4, 16), t(2, Sk, 2, 16), t(2, Sk, 2, 16)
        q[1, Sq - 1, 3, 5] = float("nan")
        out, lse = fastattn.flash_attention(q, k, v, return_lse=True)
        assert torch.isnan(out[1, Sq - 1, 3]).all() and torch.isnan(lse[1, 3, Sq - 1])
        assert torch.isnan(out).sum() == 16 and torch.isnan(lse).sum() == 1
        out, lse = fastattn.flash_attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                                   torch.tensor([0, Sq, 2 * Sq], dtype=torch.int32),
                                                   torch.tensor([0, Sk, 2 * Sk], dtype=torch.int32), Sq, Sk,
                                                   return_lse=True)
        assert torch.isnan(out[2 * Sq - 1, 3]).all() and torch.isnan(lse[3, 2 * Sq - 1]) and torch.isnan(lse).sum() == 1
    # the KV-cache kernel: a NaN query row, and a NaN key in one of several splits
    kc, vc = t(2, 300, 2, 16), t(2, 300, 2, 16)
    lens = torch.tensor([300, 120], dtype=torch.int32)
    q = t(2, 4, 16)
    q[0, 1, 0] = float("nan")
    for splits in (1, 3, 7):
        out, lse = fastattn.decode_attention(q, kc, vc, lens, num_splits=splits, return_lse=True)
        assert torch.isnan(out[0, 1]).all() and torch.isnan(lse[0, 1]) and torch.isnan(lse).sum() == 1
    kc[1, 100, 1, 2] = float("nan")  # seen by sequence 1 (length 120), kv head 1 = query heads 2, 3
    for splits in (1, 3, 7):
        out, lse = fastattn.decode_attention(q, kc, vc, lens, num_splits=splits, return_lse=True)
        assert torch.isnan(out[1, 2:]).all() and torch.isnan(lse[1, 2:]).all() and torch.isfinite(out[1, :2]).all()
    q4 = t(2, 2, 4, 16)
    q4[1, 0, 0, 0] = float("nan")
    out, lse = fastattn.attention_with_kvcache(q4, kc[:, :99], vc[:, :99], torch.tensor([99, 90], dtype=torch.int32),
                                               return_lse=True)
    assert torch.isnan(out[1, 0, 0]).all() and torch.isnan(lse[1, 0, 0]) and torch.isnan(lse).sum() == 1


@pytest.mark.parametrize("E", [1, 8, 64])
@pytest.mark.parametrize("strided", ["q", "k", "v", None])
def test_regression_sdpa_output_layout_like_torch(E, strided):
    # torch's fused kernels need a unit last-dim stride on query, key AND value (a size-1 head
    # dim included); otherwise its math backend computes and returns a contiguous result. The
    # drop-in returned query's layout whenever query's last dim was contiguous (a strided k or
    # v alone, or E = 1), so out.view(B, -1), fine on torch's result, failed on ours.
    def lay(L, name):
        step = 2 if strided == name else 1
        return torch.randn(2, L, 3, E * step)[..., ::step].transpose(1, 2)

    q, k, v = lay(5, "q"), lay(7, "k"), lay(7, "v")
    ours = fastattn.scaled_dot_product_attention(q, k, v)
    theirs = F.scaled_dot_product_attention(q, k, v)
    assert ours.stride() == theirs.stride()
    torch.testing.assert_close(ours, theirs)
    if theirs.is_contiguous():
        ours.view(2, -1)  # what code relying on torch's layout does
