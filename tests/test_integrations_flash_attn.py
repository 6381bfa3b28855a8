"""fastattn.integrations.flash_attn: flash-attn 2.x's Python API (names, parameters, return
values, semantics) on fastattn's kernels, checked against fastattn/reference.py."""
import inspect
import math

import numpy as np

import pytest
import torch
from torch import Tensor

from fastattn import reference
from fastattn.integrations import flash_attn as fa

from conftest import DEVICES, assert_error_ratio, dtypes_for

# flash-attn 2.6+'s flash_attn_interface, parameter by parameter (name, default): code written
# against it, positionally or by keyword, must run unchanged.
_ATTN_TAIL = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
              ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
_REQ = inspect.Parameter.empty
FLASH_ATTN_SIGNATURES = {
    "flash_attn_func": [("q", _REQ), ("k", _REQ), ("v", _REQ)] + _ATTN_TAIL,
    "flash_attn_qkvpacked_func": [("qkv", _REQ)] + _ATTN_TAIL,
    "flash_attn_kvpacked_func": [("q", _REQ), ("kv", _REQ)] + _ATTN_TAIL,
    "flash_attn_varlen_func": [("q", _REQ), ("k", _REQ), ("v", _REQ), ("cu_seqlens_q", _REQ), ("cu_seqlens_k", _REQ),
                               ("max_seqlen_q", _REQ), ("max_seqlen_k", _REQ)] + _ATTN_TAIL + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [("qkv", _REQ), ("cu_seqlens", _REQ), ("max_seqlen", _REQ)] + _ATTN_TAIL,
    "flash_attn_varlen_kvpacked_func": [("q", _REQ), ("kv", _REQ), ("cu_seqlens_q", _REQ), ("cu_seqlens_k", _REQ),
                                        ("max_seqlen_q", _REQ), ("max_seqlen_k", _REQ)] + _ATTN_TAIL,
    "flash_attn_with_kvcache": [
        ("q", _REQ), ("k_cache", _REQ), ("v_cache", _REQ), ("k", None), ("v", None), ("rotary_cos", None),
        ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None), ("cache_leftpad", None),
        ("block_table", None), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
        ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
        ("return_softmax_lse", False)],
}


@pytest.mark.parametrize("name", list(FLASH_ATTN_SIGNATURES))
def test_signature_is_flash_attn(name):
    params = inspect.signature(getattr(fa, name)).parameters.values()
    assert [(p.name, p.default) for p in params] == FLASH_ATTN_SIGNATURES[name]
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    assert name in fa.__all__


def _qkv(device, dtype, B, Sq, Sk, H, Hk, D, requires_grad=False):
    q, k, v = (torch.randn(B, S, h, D, device=device, dtype=dtype) for S, h in ((Sq, H), (Sk, Hk), (Sk, Hk)))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


CASES = {  # (Sq, Sk, H, Hk, D), causal, window_size, softcap
    "causal_gqa": ((37, 37, 4, 2, 64), True, (-1, -1), 0.0),
    "bottom_right_sq_gt_sk": ((9, 5, 2, 1, 32), True, (-1, -1), 0.0),  # rows that see no key
    "window_softcap_mqa": ((23, 41, 6, 1, 40), False, (7, 3), 5.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_flash_attn_func_matches_reference(device, case):
    (Sq, Sk, H, Hk, D), causal, window, softcap = CASES[case]
    for dtype in dtypes_for(device):
        q, k, v = _qkv(device, dtype, 2, Sq, Sk, H, Hk, D, requires_grad=True)
        # flash-attn's positional order: dropout_p, softmax_scale, causal, window_size, softcap, ...
        out, lse, probs = fa.flash_attn_func(q, k, v, 0.0, None, causal, window, softcap, None, False, True)
        assert probs.shape == (0,) and probs.dtype == dtype  # flash-attn 2.7+: empty unless dropout
        ref = lambda *t: reference.attention(*t, causal=causal, window=window, softcap=softcap,  # noqa: E731
                                             return_lse=True)
        true, true_lse = ref(*(t.double() for t in (q, k, v)))
        low, _ = ref(q, k, v)
        assert_error_ratio(out, low, true)
        seen = true_lse > -math.inf
        torch.testing.assert_close(lse[seen].double(), true_lse[seen].double(), rtol=0, atol=1e-3 if dtype != torch.float32 else 1e-5)
        # flash-attn's softmax_lse is +inf where a row sees no key (its out is 0 there)
        assert torch.isposinf(lse[~seen]).all() and (out.transpose(1, 2)[~seen] == 0).all()
        if case == "bottom_right_sq_gt_sk":
            assert (~seen).any()
        grad = torch.randn_like(out)
        ours = torch.autograd.grad(out, (q, k, v), grad)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        want = torch.autograd.grad(ref(qd, kd, vd)[0], (qd, kd, vd), grad.double())
        lows = torch.autograd.grad(ref(q, k, v)[0], (q, k, v), grad)
        for name, a, lo, t in zip("qkv", ours, lows, want):
            assert_error_ratio(a, lo, t, name=f"d{name}")


def _flash_attn_oracle(q, k, v, causal, window_size, softcap=0.0, scale=None, seqlen_k=None):
    """flash-attn's C++ semantics in fp64, written from its mha_fwd / set_params_fprop: a window
    side >= seqlen_k (default: k's length) is unbounded (-1), causal sets right = 0, an
    unbounded side beside a bounded one becomes seqlen_k, any negative side is unbounded;
    query i sees keys j in [i + Sk - Sq - left, i + Sk - Sq + right]; softcap > 0 caps the
    scaled scores; a row that sees no key gives out 0 and lse +inf. q (B, Sq, H, D), k/v
    (B, Sk, Hk, D) -> out (B, Sq, H, D), lse (B, H, Sq)."""
    q, k, v = q.double(), k.double(), v.double()
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    seqlen_k = Sk if seqlen_k is None else seqlen_k
    left, right = (-1 if w < 0 or w >= seqlen_k else w for w in window_size)
    if causal:
        right = 0
    if left < 0 and right >= 0:
        left = seqlen_k
    if left >= 0 and right < 0:
        right = seqlen_k
    scale = D ** -0.5 if scale is None else scale
    k, v = (t.repeat_interleave(H // Hk, dim=2) for t in (k, v))
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq).view(Sq, 1) + Sk - Sq
    j = torch.arange(Sk).view(1, Sk)
    seen = torch.ones(Sq, Sk, dtype=torch.bool)
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    s = s.masked_fill(~seen, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(seen.any(-1).view(1, 1, Sq, 1), torch.softmax(s, dim=-1), torch.zeros_like(s))
    out = torch.einsum("bhij,bjhd->bihd", p.nan_to_num(0.0), v)
    return out, torch.where(torch.isneginf(lse), math.inf, lse)


def _paged_pools(device, dtype, lens_k, page_size, Hk, D, generator):
    """Page pools holding each sequence's keys on shuffled pages, and its block_table (unused
    entries -1, as vLLM leaves them)."""
    num_pages = sum(-(-n // page_size) for n in lens_k) + 2
    k_pool, v_pool = (torch.randn(num_pages, page_size, Hk, D, generator=generator).to(device, dtype) for _ in "kv")
    free = torch.randperm(num_pages, generator=generator).tolist()
    table = torch.full((len(lens_k), max(-(-n // page_size) for n in lens_k) + 1), -1, dtype=torch.int32)
    for b, n in enumerate(lens_k):
        for j in range(-(-n // page_size)):
            table[b, j] = free.pop()
    return k_pool, v_pool, table.to(device)


PAGED_VARLEN_CASES = {  # lens_q, lens_k, page_size, causal, window_size, softcap, spare query rows
    "causal_prefill_chunks": ([3, 1, 5], [7, 1, 9], 4, True, (-1, -1), 0.0, 0),
    "empty_sequences_spare_rows": ([3, 0, 5], [2, 4, 0], 3, False, (-1, -1), 0.0, 2),
    "window_sq_gt_sk": ([6, 2], [4, 11], 4, True, (2, 0), 0.0, 0),
    "window_softcap": ([5, 2], [9, 6], 2, False, (3, 1), 5.0, 0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(PAGED_VARLEN_CASES))
@pytest.mark.parametrize("traced", [False, True])
def test_varlen_with_block_table_matches_flash_attn(device, case, traced):
    # flash_attn_varlen_func(..., block_table=) (vLLM-style paged prefill): k / v are page
    # pools, sequence b's keys the first cu_seqlens_k[b+1] - cu_seqlens_k[b] tokens of its
    # pages, each sequence bottom-right aligned with its own lengths; forward only. Eager on
    # the CPU the keys are gathered (the lengths are host values); traced, and on CUDA, the
    # queries are placed in a (B, max_seqlen_q) block for attention_with_kvcache instead.
    lens_q, lens_k, page_size, causal, window, softcap, spare = PAGED_VARLEN_CASES[case]
    call = fa.flash_attn_varlen_func
    if traced:
        torch._dynamo.reset()
        call = torch.compile(fa.flash_attn_varlen_func, backend="eager", fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    H, Hk, D = 4, 2, 16
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,  # noqa: E731
                                   device=device)
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    for dtype in dtypes_for(device):
        k_pool, v_pool, table = _paged_pools(device, dtype, lens_k, page_size, Hk, D, gen)
        q = torch.randn(sum(lens_q) + spare, H, D, generator=gen).to(device, dtype)
        out, lse, _ = call(q, k_pool, v_pool, cu_q, cu_k, max(lens_q), max(lens_k), 0.0, None,
                           causal, window, softcap, None, False, True, table)
        assert out.shape == q.shape and out.dtype == dtype and lse.shape == (H, q.shape[0])
        assert torch.equal(call(q, k_pool, v_pool, cu_q, cu_k, max(lens_q), max(lens_k), 0.0,
                                None, causal, window, softcap, block_table=table), out)
        for b, (n_q, n_k) in enumerate(zip(lens_q, lens_k)):
            rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
            k_b, v_b = (reference.paged_rows(p, table[b:b + 1].long().clamp(min=0), n_k) for p in (k_pool, v_pool))
            args = (q[rows].unsqueeze(0), k_b, v_b, causal, window, softcap)
            true, true_lse = _flash_attn_oracle(*args, seqlen_k=max(lens_k))
            low, _ = _flash_attn_oracle(*(t.to(dtype) if isinstance(t, Tensor) else t for t in args),
                                        seqlen_k=max(lens_k))
            assert_error_ratio(out[rows].unsqueeze(0), low.to(dtype), true, name=f"out of sequence {b}")
            lse_b = lse[:, rows].transpose(0, 1).unsqueeze(0)  # (1, n_q, H) as the oracle's (1, H, n_q)
            seen = torch.isfinite(true_lse[0].transpose(0, 1))
            assert torch.equal(torch.isposinf(lse_b[0]), ~seen)
            torch.testing.assert_close(lse_b[0][seen].double().cpu(), true_lse[0].transpose(0, 1)[seen].cpu(),
                                       rtol=0, atol=1e-3 if dtype != torch.float32 else 1e-5)
        if spare:  # rows past cu_seqlens_q[-1]: out 0, lse +inf
            assert (out[sum(lens_q):] == 0).all() and torch.isposinf(lse[:, sum(lens_q):]).all()


def test_varlen_with_block_table_compiles_and_refuses_what_it_lacks():
    gen = torch.Generator().manual_seed(1)
    k_pool, v_pool, table = _paged_pools("cpu", torch.float32, [9, 10], 4, 2, 16, gen)
    cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 9, 19], dtype=torch.int32)
    q = torch.randn(8, 4, 16, generator=gen)

    def f(q, k_pool, v_pool, cu_q, cu_k, table):
        return fa.flash_attn_varlen_func(q, k_pool, v_pool, cu_q, cu_k, 4, 10, causal=True, block_table=table)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(q, k_pool, v_pool, cu_q, cu_k, table),
                               f(q, k_pool, v_pool, cu_q, cu_k, table))
    # eager on the CPU: exactly the dense varlen op over the gathered keys
    k, v = (reference.paged_rows(p, table.long().clamp(min=0), 10) for p in (k_pool, v_pool))
    packed = [torch.cat([t[0, :9], t[1]]) for t in (k, v)]
    assert torch.equal(f(q, k_pool, v_pool, cu_q, cu_k, table),
                       fa.flash_attn_varlen_func(q, *packed, cu_q, cu_k, 4, 10, causal=True))
    # forward only, as in flash-attn: under autograd the forward runs (flash-attn's own tests
    # do that; it raised here) and a backward raises
    out = f(q.clone().requires_grad_(), k_pool, v_pool, cu_q, cu_k, table)
    assert torch.equal(out, f(q, k_pool, v_pool, cu_q, cu_k, table)) and out.requires_grad
    with pytest.raises(NotImplementedError, match="paged varlen attention .* has no backward"):
        out.sum().backward()
    with torch.no_grad():
        f(q.clone().requires_grad_(), k_pool, v_pool, cu_q, cu_k, table)
    for args, exc, match in (
            ((q, k_pool[0], v_pool[0], cu_q, cu_k, table), ValueError, r"k must be 4-D \(num_pages, page_size"),
            ((q, k_pool, v_pool, cu_q, cu_k, table[:1]), ValueError, r"block_table must be \(2, max_pages_per_seq\)"),
            ((q, k_pool, v_pool, cu_q.long(), cu_k, table), ValueError, "cu_seqlens_q must be a 1-D int32"),
            ((q, k_pool, v_pool, cu_q, cu_k, table.long()), ValueError, "block_table must be int32"),
            ((q, k_pool, v_pool, cu_q, cu_k[:2], table), ValueError, "must have the same length B"),
            ((q, k_pool, v_pool, torch.tensor([0, 3, 9], dtype=torch.int32), cu_k, table), ValueError,
             "cu_seqlens_q must start at 0 and be non-decreasing, ending at or before total_q = 8"),
            ((q, k_pool, v_pool, cu_q, torch.tensor([0, 9, 21], dtype=torch.int32), table), ValueError,
             "cu_seqlens_k holds a sequence of length 12 but max_seqlen is 10")):
        with pytest.raises(exc, match=match):
            f(*args)
    with pytest.raises(ValueError, match="block_table|page"):  # a used entry that is no page of the pool
        f(q, k_pool, v_pool, cu_q, cu_k, torch.where(table == table[1, 0], 99, table))


@pytest.mark.parametrize("window", [(-1, 4), (3, 6), (2, -1), (-2, -5), (6, 0), (0, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_window_normalised_as_flash_attn(window, causal):
    # Sq > Sk with a side between Sk and Sq - 1: flash-attn's clamping (a side >= Sk is
    # unbounded, then the other side becomes Sk) differs from the documented band that
    # fastattn's own flash_attention keeps; the drop-in must follow flash-attn.
    torch.manual_seed(0)
    q, k, v = _qkv("cpu", torch.float32, 2, 10, 4, 4, 2, 16)
    want, want_lse = _flash_attn_oracle(q, k, v, causal, window, softcap=3.0)
    out, lse, _ = fa.flash_attn_func(q, k, v, 0.0, None, np.bool_(causal), window, 3.0, None, False, True)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=2e-6)
    # varlen: flash-attn clamps against max_seqlen_k; here one sequence of the same shapes, one empty
    cu_q = torch.tensor([0, 10, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 8], dtype=torch.int32)
    out = fa.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 10, 4, 0.0,
                                    None, causal, window, 3.0)
    torch.testing.assert_close(out.double(), want.flatten(0, 1), rtol=0, atol=2e-6)


def test_flash_attn_func_copies_a_strided_last_dim_and_ignores_negative_softcap():
    torch.manual_seed(0)
    q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in _qkv("cpu", torch.float32, 1, 6, 6, 2, 2, 8))
    assert q.stride(-1) != 1
    want, _ = _flash_attn_oracle(q, k, v, True, (-1, -1))
    torch.testing.assert_close(fa.flash_attn_func(q, k, v, causal=True, softcap=-1.0).double(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_variants_are_their_slices(device):
    dtype = dtypes_for(device)[0]
    B, S, H, D = 2, 19, 4, 32
    qkv = torch.randn(B, S, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True, window_size=[5, 0])
    want = fa.flash_attn_func(*qkv.unbind(2), causal=True, window_size=(5, 0))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.sum().backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0

    q = torch.randn(B, S, 2 * H, D, device=device, dtype=dtype)
    kv = qkv.detach()[:, :, 1:]
    out = fa.flash_attn_kvpacked_func(q, kv, softmax_scale=0.3, causal=False)
    torch.testing.assert_close(out, fa.flash_attn_func(q, *kv.unbind(2), softmax_scale=0.3), rtol=0, atol=0)

    cu = torch.tensor([0, 7, 7, 19], dtype=torch.int32, device=device)
    packed = qkv.detach()[0].requires_grad_()  # (total 19, 3, H, D)
    out, lse, probs = fa.flash_attn_varlen_qkvpacked_func(packed, cu, 12, 0.0, None, True, return_attn_probs=True)
    want, want_lse, _ = fa.flash_attn_varlen_func(*packed.unbind(1), cu, cu, 12, 12, causal=True,
                                                  return_attn_probs=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    assert probs.numel() == 0 and lse.shape == (H, S)
    out.sum().backward()
    assert packed.grad.abs().sum() > 0
    out = fa.flash_attn_varlen_kvpacked_func(q[0], packed.detach()[:, 1:], cu, cu, 12, 12, causal=True)
    torch.testing.assert_close(out, fa.flash_attn_varlen_func(q[0], *packed.detach()[:, 1:].unbind(1), cu, cu, 12, 12,
                                                              causal=True), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_varlen_func_matches_reference(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lens_q, lens_k = [5, 0, 13, 6], [9, 4, 13, 2]  # the last: 4 causal rows that see no key
    cu_q = torch.tensor([0, 5, 5, 18, 24], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 13, 26, 28], dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), 4, 48, device=device, dtype=dtype)
    k, v = (torch.randn(sum(lens_k), 2, 48, device=device, dtype=dtype) for _ in range(2))
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), 0.0, 0.2, True, (4, 0),
                                            2.0, None, True, True)
    true, true_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=True,
                                                softmax_scale=0.2, window=(4, 0), softcap=2.0, return_lse=True)
    low = reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True, softmax_scale=0.2, window=(4, 0), softcap=2.0)
    assert_error_ratio(out, low, true)
    seen = true_lse > -math.inf
    torch.testing.assert_close(lse[seen].double(), true_lse[seen].double(), rtol=0, atol=1e-3)
    assert (~seen).sum() == 4 * 4 and torch.isposinf(lse[~seen]).all()


def _rotary_reference(q, k, cos, sin, start, interleaved, q_per_token):
    B, Sq = q.shape[:2]
    pos_k = start.view(B, 1).long() + torch.arange(Sq, device=q.device).view(1, Sq)
    pos_q = pos_k if q_per_token else start.view(B, 1).long().expand(B, Sq)
    _, k_rot = reference.apply_rotary(q, k, cos, sin, positions=pos_k, interleaved=interleaved)
    q_rot, _ = reference.apply_rotary(q, k, cos, sin, positions=pos_q, interleaved=interleaved)
    return q_rot, k_rot


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (False, (6, 2)), (False, (40, 40))])
@pytest.mark.parametrize("interleaved", [True, False])
def test_with_kvcache_rotary_and_cache_batch_idx(device, causal, window, interleaved):
    # New k (and q) rotated at cache_seqlens + i; without causal or a window narrower than the
    # cache all queries sit at cache_seqlens; k/v written in place into the rows that
    # cache_batch_idx names, the other rows untouched; cache_seqlens not advanced.
    dtype = torch.float32 if device == "cpu" else torch.float16
    B, Sq, H, Hk, D, R, S_cache = 2, 3, 4, 2, 32, 16, 40
    q, k, v = _qkv(device, dtype, B, Sq, Sq, H, Hk, D)
    k_cache, v_cache = (torch.randn(4, S_cache, Hk, D, device=device, dtype=dtype) for _ in range(2))
    angles = torch.rand(64, R // 2, device=device) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # flash-attn's tables are in q's dtype
    seqlens = torch.tensor([11, 30], dtype=torch.int32, device=device)
    rows = torch.tensor([3, 1], dtype=torch.int32, device=device)
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, seqlens, rows, None, None, None, causal, window,
                                          0.0, interleaved, None, 0, True)
    assert seqlens.tolist() == [11, 30]

    q_per_token = causal or window == (6, 2)  # (40, 40): both sides reach the capacity, i.e. unbounded
    qr, kr = _rotary_reference(q.double(), k.double(), cos.double(), sin.double(), seqlens, interleaved, q_per_token)
    want_kc, want_vc = k_cache.double()[rows.long()], v_cache.double()[rows.long()]
    true, true_lse = reference.attention_with_kvcache(qr, want_kc, want_vc, seqlens, k=kr, v=v.double(),
                                                      causal=causal, window=window, return_lse=True)
    qr_low, kr_low = _rotary_reference(q, k, cos.float(), sin.float(), seqlens, interleaved, q_per_token)
    low = reference.attention_with_kvcache(qr_low.to(dtype), k_cache[rows.long()].clone(), v_cache[rows.long()].clone(),
                                           seqlens, k=kr_low.to(dtype), v=v, causal=causal, window=window)
    assert_error_ratio(out, low, true)
    torch.testing.assert_close(lse.double(), true_lse.double(), rtol=0, atol=1e-4 if dtype == torch.float32 else 2e-3)
    for b, r in enumerate(rows.tolist()):
        torch.testing.assert_close(kc[r].double(), want_kc[b], rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-3)
        torch.testing.assert_close(vc[r], v_cache[r].index_copy(0, torch.arange(11 + 19 * b, 14 + 19 * b,
                                                                                  device=device), v[b]))
    for r in (0, 2):
        assert torch.equal(kc[r], k_cache[r]) and torch.equal(vc[r], v_cache[r])


@pytest.mark.parametrize("causal, window, local", [
    (np.bool_(True), (-1, -1), True),  # a NumPy bool is causal (the queries' rotary positions too)
    (False, (-1, 39), True),           # one side below the capacity (40): local
    (False, (40, -1), False),          # a side at the capacity is unbounded: not local
    (False, (-1, -1), False),
])
@pytest.mark.parametrize("num_new", [1, 3, 5])  # new keys: fewer, as many as, more than the 3 queries
def test_with_kvcache_matches_flash_attn(causal, window, local, num_new):
    # flash-attn's kvcache step: the num_new keys rotated at cache_seqlens + j and appended;
    # query i rotated at cache_seqlens + i when causal or local, else at cache_seqlens; the
    # queries then bottom-right aligned over cache_seqlens + num_new keys, window clamped
    # against the capacity.
    torch.manual_seed(0)
    B, Sq, H, Hk, D, R, capacity = 2, 3, 4, 2, 32, 16, 40
    q = torch.randn(B, Sq, H, D)
    k, v = (torch.randn(B, num_new, Hk, D) for _ in range(2))
    k_cache, v_cache = (torch.randn(B, capacity, Hk, D) for _ in range(2))
    angles = torch.rand(64, R // 2) * 6
    cos, sin = angles.cos(), angles.sin()
    seqlens = torch.tensor([9, 30], dtype=torch.int32)
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, seqlens, causal=causal, window_size=window,
                                          return_softmax_lse=True)
    for b in range(B):
        n = int(seqlens[b])
        pos_k = torch.arange(n, n + num_new).view(1, -1)
        pos_q = torch.arange(n, n + Sq).view(1, -1) if local else torch.full((1, Sq), n)
        _, k_rot = reference.apply_rotary(k[b:b + 1].double(), k[b:b + 1].double(), cos.double(), sin.double(),
                                          positions=pos_k, interleaved=True)
        q_rot, _ = reference.apply_rotary(q[b:b + 1].double(), q[b:b + 1].double(), cos.double(), sin.double(),
                                          positions=pos_q, interleaved=True)
        keys = torch.cat([k_cache[b:b + 1, :n].double(), k_rot], 1)
        values = torch.cat([v_cache[b:b + 1, :n].double(), v[b:b + 1].double()], 1)
        want, want_lse = _flash_attn_oracle(q_rot, keys, values, bool(causal), window, seqlen_k=capacity)
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(lse[b:b + 1].double(), want_lse, rtol=0, atol=1e-5)
        torch.testing.assert_close(kc[b, n:n + num_new].double(), k_rot[0], rtol=0, atol=1e-6)
        assert torch.equal(vc[b, n:n + num_new], v[b]) and torch.equal(kc[b, :n], k_cache[b, :n])
        assert torch.equal(kc[b, n + num_new:], k_cache[b, n + num_new:])
    assert seqlens.tolist() == [9, 30]


def test_with_kvcache_int_lengths_and_new_keys_of_another_length():
    # an int cache_seqlens on the path that appends first (new keys != queries) raised a TypeError
    torch.manual_seed(0)
    q = torch.randn(2, 1, 4, 16)
    k, v = (torch.randn(2, 3, 2, 16) for _ in range(2))
    caches = [torch.randn(2, 12, 2, 16) for _ in range(2)]
    a, b = [c.clone() for c in caches], [c.clone() for c in caches]
    out_int = fa.flash_attn_with_kvcache(q, *a, k, v, cache_seqlens=4, causal=True)
    out_t = fa.flash_attn_with_kvcache(q, *b, k, v, cache_seqlens=torch.full((2,), 4, dtype=torch.int32), causal=True)
    assert torch.equal(out_int, out_t) and all(torch.equal(x, y) for x, y in zip(a, b))
    want, _ = _flash_attn_oracle(q, torch.cat([caches[0][:, :4], k], 1), torch.cat([caches[1][:, :4], v], 1), True,
                                 (-1, -1), seqlen_k=12)
    torch.testing.assert_close(out_int.double(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_with_kvcache_defaults_paged_and_int_lengths(device):
    dtype = dtypes_for(device)[0]
    B, H, Hk, D, page = 3, 4, 1, 64, 5
    q = torch.randn(B, 1, H, D, device=device, dtype=dtype)
    pool_k, pool_v = (torch.randn(13, page, Hk, D, device=device, dtype=dtype) for _ in range(2))
    table = torch.tensor([[4, 2, 9], [1, 0, 12], [7, 3, 5]], dtype=torch.int32, device=device)
    lens = torch.tensor([3, 15, 8], dtype=torch.int32, device=device)
    # flash-attn's defaults: causal=False, no lse
    out = fa.flash_attn_with_kvcache(q, pool_k, pool_v, cache_seqlens=lens, block_table=table)
    want = reference.attention_with_kvcache(q.double(), pool_k.double(), pool_v.double(), lens, block_table=table,
                                            causal=False)
    low = reference.attention_with_kvcache(q, pool_k, pool_v, lens, block_table=table, causal=False)
    assert_error_ratio(out, low, want)
    # cache_seqlens None: every sequence is the whole cache; an int: every sequence that long
    k_cache, v_cache = (torch.randn(B, 9, Hk, D, device=device, dtype=dtype) for _ in range(2))
    full = fa.flash_attn_with_kvcache(q, k_cache, v_cache)
    nine = torch.full((B,), 9, dtype=torch.int32, device=device)
    torch.testing.assert_close(full, fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=nine), rtol=0, atol=0)
    torch.testing.assert_close(fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=6),
                               fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=nine - 3), rtol=0, atol=0)


@pytest.mark.parametrize("call, match", [
    (lambda q, kc: fa.flash_attn_func(q, q, q, 0.1), "dropout_p=0.1"),
    (lambda q, kc: fa.flash_attn_func(q, q, q, alibi_slopes=torch.ones(2)), "alibi_slopes"),
    (lambda q, kc: fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=1,
                                              cache_leftpad=torch.zeros(1, dtype=torch.int32)), "cache_leftpad"),
], ids=["dropout", "alibi", "cache_leftpad"])
def test_what_fastattn_lacks_is_not_implemented(call, match):
    q = torch.randn(1, 3, 2, 16)
    with pytest.raises(NotImplementedError, match=match):
        call(q, torch.randn(1, 8, 2, 16))


def test_bad_arguments_name_themselves():
    q = torch.randn(1, 3, 2, 16)
    kc = torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match="window_size must be a"):
        fa.flash_attn_func(q, q, q, window_size=4)
    with pytest.raises(ValueError, match="dropout_p must be a number"):
        fa.flash_attn_func(q, q, q, dropout_p=None)
    with pytest.raises(ValueError, match="qkv must have shape"):
        fa.flash_attn_qkvpacked_func(torch.randn(1, 3, 2, 2, 16))
    with pytest.raises(ValueError, match="cache_seqlens is required with k / v"):
        fa.flash_attn_with_kvcache(q, kc, kc, q, q)
    with pytest.raises(ValueError, match="k and v must be given together"):
        fa.flash_attn_with_kvcache(q, kc, kc, q, cache_seqlens=1)
    with pytest.raises(ValueError, match="rotary_cos / rotary_sin rotate the new keys"):
        fa.flash_attn_with_kvcache(q, kc, kc, None, None, torch.ones(8, 4), torch.ones(8, 4), cache_seqlens=1)
    with pytest.raises(ValueError, match="cache_batch_idx cannot be combined with block_table"):
        fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=1, cache_batch_idx=torch.zeros(1, dtype=torch.int32),
                                   block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_batch_idx must be a"):
        fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=1, cache_batch_idx=torch.zeros(1))
    # cache_batch_idx errors name cache_batch_idx (it is run as a one-page block_table inside)
    with pytest.raises(ValueError, match=r"cache_batch_idx must name rows of k_cache in \[0, 2\), got \[5\]"):
        fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=1, cache_batch_idx=torch.tensor([5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cache_batch_idx must name rows of k_cache in \[0, 2\), got \[-1\]"):
        fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=1, cache_batch_idx=torch.tensor([-1]))
    for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.int64):  # any integer dtype names rows
        out = fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=1, cache_batch_idx=torch.tensor([1]).to(dtype))
        torch.testing.assert_close(out, fa.flash_attn_with_kvcache(q, kc[1:], kc[1:], cache_seqlens=1))
    with pytest.raises(ValueError, match=r"cache_batch_idx must hold 1 cache rows \(q's batch\), got 2"):
        fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=1, cache_batch_idx=torch.tensor([0, 1]))
    # packed inputs of the wrong rank name the packed argument, not the slice
    for call, match in ((lambda: fa.flash_attn_qkvpacked_func(torch.randn(2, 5, 3, 4)), "qkv must have shape"),
                        (lambda: fa.flash_attn_kvpacked_func(q, torch.randn(1, 3, 2, 16)), "kv must have shape"),
                        (lambda: fa.flash_attn_varlen_qkvpacked_func(torch.randn(5, 3, 2), torch.tensor(
                            [0, 5], dtype=torch.int32), 5), "qkv must have shape"),
                        (lambda: fa.flash_attn_varlen_kvpacked_func(q[0], torch.randn(3, 2, 2, 16, 1), *[torch.tensor(
                            [0, 3], dtype=torch.int32)] * 2, 3, 3), "kv must have shape")):
        with pytest.raises(ValueError, match=match):
            call()


def test_bad_arguments_are_runtime_errors_too_as_flash_attns_checks():
    """flash-attn's C++ checks (TORCH_CHECK) raise RuntimeError for a wrong dtype, shape, head
    count or cu_seqlens; code written for it catches RuntimeError to fall back, and fastattn's
    ValueError slipped past (outside audit). Each compat function's ValueError is now also a
    RuntimeError, with the same message; what fastattn lacks stays NotImplementedError."""
    q = torch.randn(2, 17, 4, 32)
    k = torch.randn(2, 23, 2, 32)
    kc = torch.randn(2, 40, 2, 32)
    cu = torch.tensor([0, 17], dtype=torch.int32)
    for call, match in (
            (lambda: fa.flash_attn_func(q, k.bfloat16(), k), "k has dtype torch.bfloat16 but q has dtype"),
            (lambda: fa.flash_attn_func(q, k[:, :, :1].expand(2, 23, 3, 32), k[:, :, :1].expand(2, 23, 3, 32)),
             "must be a multiple of the number of key/value heads"),
            (lambda: fa.flash_attn_qkvpacked_func(torch.randn(2, 3, 3)), "qkv must have shape"),
            (lambda: fa.flash_attn_kvpacked_func(q, torch.randn(1, 3, 2, 16)), "kv must have shape"),
            (lambda: fa.flash_attn_varlen_func(q[0], k[0], k[0], cu.long(), cu, 17, 23), "cu_seqlens_q must be"),
            (lambda: fa.flash_attn_varlen_qkvpacked_func(torch.randn(5, 3, 2), cu, 5), "qkv must have shape"),
            (lambda: fa.flash_attn_varlen_kvpacked_func(q[0], torch.randn(3, 2, 2, 16, 1), cu, cu, 17, 3),
             "kv must have shape"),
            (lambda: fa.flash_attn_with_kvcache(q[:, :1], kc, kc, q[:, :1], cache_seqlens=1),
             "k and v must be given together"),
            (lambda: fa.flash_attn_func(q, q, q, window_size=4), "window_size must be a")):
        with pytest.raises(RuntimeError, match=match) as info:
            call()
        assert isinstance(info.value, ValueError) and type(info.value) is fa.FlashAttnInputError
        # one traceback, not the same message twice in a chain
        assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(NotImplementedError):
        fa.flash_attn_func(q, q, q, 0.1)


def test_flags_and_tables_name_the_argument_the_caller_passed():
    """From an outside audit: the flags were checked under the names of fastattn's own
    parameters (return_lse, interleaved), ``deterministic`` was not checked at all, and a
    cache_batch_idx / rotary table on another device or too short was reported as block_table,
    cos or 'positions'."""
    q = torch.randn(1, 3, 2, 16)
    kc = torch.randn(2, 8, 2, 16)
    cq = torch.tensor([0, 3], dtype=torch.int32)
    for call, match in (
            (lambda: fa.flash_attn_func(q, q, q, return_attn_probs=1), "return_attn_probs must be a bool"),
            (lambda: fa.flash_attn_varlen_func(q[0], q[0], q[0], cq, cq, 3, 3, return_attn_probs=1),
             "return_attn_probs must be a bool"),
            (lambda: fa.flash_attn_func(q, q, q, deterministic="yes"), "deterministic must be a bool"),
            (lambda: fa.flash_attn_varlen_func(q[0], q[0], q[0], cq, cq, 3, 3, deterministic=None),
             "deterministic must be a bool"),
            (lambda: fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=1, return_softmax_lse=1),
             "return_softmax_lse must be a bool"),
            (lambda: fa.flash_attn_with_kvcache(q, kc, kc, q, q, torch.ones(8, 4), torch.ones(8, 4), cache_seqlens=1,
                                                rotary_interleaved=1), "rotary_interleaved must be a bool"),
            (lambda: fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=3.0),
             "cache_seqlens must be an int or a \\(batch,\\) int32 tensor, got float")):
        with pytest.raises(TypeError, match=match):
            call()
    with pytest.raises(ValueError, match="cache_batch_idx is on meta but must be on cpu with k_cache"):
        fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=1, cache_batch_idx=torch.zeros(1, dtype=torch.int32,
                                                                                             device="meta"))
    with pytest.raises(ValueError, match="rotary_sin is on meta but must be on cpu with q"):
        fa.flash_attn_with_kvcache(q, kc, kc, q, q, torch.ones(8, 4), torch.ones(8, 4, device="meta"), cache_seqlens=1)
    # 3 new tokens at 4, 5, 6: a 6-position table is one short (7 is enough); int or tensor lengths
    for seqlens in (4, torch.tensor([4], dtype=torch.int32)):
        with pytest.raises(ValueError, match="rotary_cos / rotary_sin hold 6 positions, but the new tokens reach "
                                             "position 6"):
            fa.flash_attn_with_kvcache(q, kc, kc, q, q, torch.ones(6, 4), torch.zeros(6, 4), cache_seqlens=seqlens)
        fa.flash_attn_with_kvcache(q, kc.clone(), kc.clone(), q, q, torch.ones(7, 4), torch.zeros(7, 4),
                                   cache_seqlens=seqlens)


@pytest.mark.parametrize("paged", [False, True])
def test_varlen_max_seqlen_as_0d_integer_tensors(paged):
    """flash-attn declares max_seqlen_q / max_seqlen_k ``int`` in its custom ops, which take a
    0-d integer tensor (Hugging Face's padding-free path passes ``cu_seqlens.diff().max()``);
    fastattn refused them (outside audit): now the same result as the ints."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(10, 4, 32, generator=g)
    cq = torch.tensor([0, 4, 10], dtype=torch.int32)
    ck = torch.tensor([0, 5, 12], dtype=torch.int32)
    if paged:
        pool = torch.randn(4, 8, 2, 32, generator=g)
        k, v, extra = pool, pool.flip(0), dict(block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    else:
        k, v, extra = torch.randn(12, 2, 32, generator=g), torch.randn(12, 2, 32, generator=g), {}
    want = fa.flash_attn_varlen_func(q, k, v, cq, ck, 6, 7, causal=True, **extra)
    for mq, mk in ((cq.diff().max(), ck.diff().max()), (torch.tensor(6), torch.tensor(7, dtype=torch.int16))):
        assert torch.equal(fa.flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, causal=True, **extra), want)
    with pytest.raises(TypeError, match="max_seqlen_q must be a"):
        fa.flash_attn_varlen_func(q, k, v, cq, ck, 6.0, 7, causal=True, **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_spare_rows_past_the_last_sequence(dtype):
    # flash-attn reads only the rows cu_seqlens name: k/v (and q) buffers may be longer. The
    # spare rows get output 0, lse -inf (flash-attn's +inf) and no gradient.
    torch.manual_seed(0)
    q = torch.randn(9, 4, 16, dtype=dtype, requires_grad=True)   # 2 spare query rows
    k = torch.randn(12, 2, 16, dtype=dtype, requires_grad=True)  # 3 spare key rows
    v = torch.randn(12, 2, 16, dtype=dtype, requires_grad=True)
    cq, ck = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cq, ck, 4, 5, causal=True, return_attn_probs=True)
    true = reference.attention_varlen(*(t.detach().double() for t in (q, k, v)), cq, ck, causal=True)
    low = reference.attention_varlen(*(t.detach() for t in (q, k, v)), cq, ck, causal=True)
    assert_error_ratio(out, low, true)
    assert (out[7:] == 0).all() and (lse[:, 7:] == float("inf")).all() and lse[:, :7].isfinite().all()
    dout = torch.randn_like(out)
    out.backward(dout)
    assert (q.grad[7:] == 0).all() and (k.grad[9:] == 0).all() and (v.grad[9:] == 0).all()
    # the rows that do belong to sequences: the same as on buffers without the spare rows
    q2, k2, v2 = (t.detach()[:n].clone().requires_grad_() for t, n in ((q, 7), (k, 9), (v, 9)))
    out2 = fa.flash_attn_varlen_func(q2, k2, v2, cq, ck, 4, 5, causal=True)
    out2.backward(dout[:7])
    assert torch.equal(out[:7], out2)
    assert torch.equal(q.grad[:7], q2.grad) and torch.equal(k.grad[:9], k2.grad) and torch.equal(v.grad[:9], v2.grad)


def test_torch_compile_fullgraph():
    q, k, v = _qkv("cpu", torch.float32, 1, 9, 9, 2, 2, 16)
    f = torch.compile(lambda a, b, c: fa.flash_attn_func(a, b, c, causal=True), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(q, k, v), fa.flash_attn_func(q, k, v, causal=True), rtol=0, atol=0)


@pytest.mark.parametrize("window_size", [(3, -1), (-1, 3), (3, 2)])
def test_compile_dynamic_one_sided_window_serves_every_length(window_size):
    # flash-attn makes the unbounded side of a one-sided window seqlen_k: a SymInt under
    # dynamic compile (with more queries than keys it reaches the op), which must stay symbolic
    # rather than give one graph per length.
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda q, k: fa.flash_attn_func(q, k, k, window_size=window_size), backend=counter,
                      fullgraph=True, dynamic=True)
    frames = []
    for S in (10, 14, 22, 30):
        q, k = torch.randn(2, S + 3, 4, 16), torch.randn(2, S, 2, 16)
        assert torch.equal(f(q, k), fa.flash_attn_func(q, k, k, window_size=window_size))
        frames.append(counter.frame_count)
    assert frames[-1] == frames[1], frames  # (the first trace may restart once)


def test_window_size_as_a_tensor():
    # flash-attn's tests draw local windows as torch.randint(0, seqlen_k, (2,)): a 2-element
    # int64 tensor (or a pair of 0-d ones), which flash-attn reads item by item; refused here
    # before (flash-attn test-port audit).
    torch.manual_seed(0)
    q, k = torch.randn(1, 9, 4, 16), torch.randn(1, 13, 2, 16)
    want = fa.flash_attn_func(q, k, k, window_size=(2, 5))
    for window in (torch.tensor([2, 5]), torch.tensor([2, 5], dtype=torch.int32), (torch.tensor(2), torch.tensor(5))):
        assert torch.equal(fa.flash_attn_func(q, k, k, window_size=window), want)
    kc = torch.randn(1, 16, 2, 16)
    seqlens = torch.tensor([13], dtype=torch.int32)
    assert torch.equal(fa.flash_attn_with_kvcache(q[:, :1], kc, kc, cache_seqlens=seqlens, window_size=torch.tensor([3, 0])),
                       fa.flash_attn_with_kvcache(q[:, :1], kc, kc, cache_seqlens=seqlens, window_size=(3, 0)))
    for bad in (torch.tensor([2.0, 5.0]), torch.tensor([1, 2, 3]), torch.tensor([True, False])):
        with pytest.raises(ValueError, match="window_size must be a"):
            fa.flash_attn_func(q, k, k, window_size=bad)


def _band(left, right, seqlen_q, seqlen_k):
    """Which keys each query sees under fastattn's (left, right) window (-1 unbounded)."""
    i = torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
    j = torch.arange(seqlen_k)[None, :]
    return ((j >= i - left) | (left < 0)) & ((j <= i + right) | (right < 0))


def test_traced_bounded_window_is_flash_attns_band():
    # Under torch.compile / export a non-causal window with a bounded side is mapped without
    # branching on the lengths (sym_min / sym_max); on plain ints that mapping must give the
    # band of the eager mapping (flash-attn's rules) for every window and every pair of lengths.
    sides = (-1, 0, 1, 2, 3, 5, 8, 12)
    for left in sides:
        for right in sides:
            if left < 0 and right < 0:
                continue
            for seqlen_q in range(1, 11):
                for seqlen_k in range(1, 11):
                    want = _band(*fa._flash_attn_window((left, right), False, seqlen_k, seqlen_q), seqlen_q, seqlen_k)
                    got = _band(*fa._traced_bounded_window(left, right, seqlen_k, seqlen_q), seqlen_q, seqlen_k)
                    assert torch.equal(got, want), (left, right, seqlen_q, seqlen_k)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("causal, window_size", [(True, (4, 0)), (False, (3, 2)), (False, (5, -1)), (False, (-1, 3))])
def test_export_window_serves_every_length(strict, causal, window_size):
    # Strict export (dynamo shows traced lengths as ints) specialised a causal window's key
    # length, and non-causal bounded windows were refused in both modes (export audit).
    from torch.export import Dim, export

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return fa.flash_attn_func(q, k, v, causal=causal, window_size=window_size)

    def inputs(sq, sk):
        g = torch.Generator().manual_seed(sq * 100 + sk)
        return (torch.randn(1, sq, 4, 16, generator=g), torch.randn(1, sk, 2, 16, generator=g),
                torch.randn(1, sk, 2, 16, generator=g))

    sq, sk = Dim("sq", min=2, max=64), Dim("sk", min=2, max=64)
    program = export(M(), inputs(4, 5), dynamic_shapes=({1: sq}, {1: sk}, {1: sk}), strict=strict).module()
    for shape in ((20, 20), (3, 11), (17, 6), (2, 2), (9, 3)):
        a = inputs(*shape)
        assert torch.equal(program(*a), M()(*a)), shape


@pytest.mark.parametrize("causal, window_size", [(True, (4, 0)), (True, (9, -1)), (True, (-1, -1)), (False, (-1, -1))])
def test_traced_window_serves_every_length(causal, window_size):
    # The window mapping branched on the sequence lengths: torch.jit.trace kept the first
    # shape's band (a (4, 0) window traced at 4 tokens attended fully causal at 20: silently
    # wrong) and torch.export refused a dynamic length (audit). Causal and unbounded windows
    # no longer depend on the lengths; fewer keys than queries included.
    import warnings

    from torch.export import Dim, export

    def f(q, k, v):
        return fa.flash_attn_func(q, k, v, causal=causal, window_size=window_size)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return f(q, k, v)

    def inputs(sq, sk):
        g = torch.Generator().manual_seed(sq * 100 + sk)
        return (torch.randn(1, sq, 4, 16, generator=g), torch.randn(1, sk, 2, 16, generator=g),
                torch.randn(1, sk, 2, 16, generator=g))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tracer's generic warnings)
        traced = torch.jit.trace(f, inputs(4, 4))
    sq, sk = Dim("sq", min=2, max=64), Dim("sk", min=2, max=64)
    program = export(M(), inputs(4, 5), dynamic_shapes=({1: sq}, {1: sk}, {1: sk}))
    for shape in ((20, 20), (3, 11), (17, 6), (2, 2)):
        a = inputs(*shape)
        want = f(*a)
        assert torch.equal(traced(*a), want), shape
        assert torch.equal(program.module()(*a), want), shape


def test_traced_kvcache_without_cache_seqlens():
    # cache_seqlens=None means "every row fills the cache": its length came from k_cache's
    # shape, which torch.jit.trace records as a 0-d int64 tensor, and the call raised
    # "cache_seqlens must be int32". Traced, it now follows the cache's batch and length.
    import warnings

    def f(q, k_cache, v_cache):
        return fa.flash_attn_with_kvcache(q, k_cache, v_cache, causal=True)

    def inputs(batch, seqlen_cache):
        g = torch.Generator().manual_seed(batch * 100 + seqlen_cache)
        return (torch.randn(batch, 1, 4, 16, generator=g), torch.randn(batch, seqlen_cache, 2, 16, generator=g),
                torch.randn(batch, seqlen_cache, 2, 16, generator=g))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tracer's generic warnings)
        traced = torch.jit.trace(f, inputs(2, 8))
    for shape in ((2, 8), (3, 21), (1, 5)):
        a = inputs(*shape)
        q, k_cache, v_cache = a
        want = reference.attention(q.float(), k_cache.float(), v_cache.float(), causal=True)
        torch.testing.assert_close(traced(*a), f(*a), rtol=0, atol=0)
        torch.testing.assert_close(f(*a), want, rtol=1e-5, atol=1e-5)
