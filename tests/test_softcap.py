"""Logit soft-capping (Gemma 2, Grok; flash-attn's ``softcap``): scores s = scale * q.k become
softcap * tanh(s / softcap) before the mask and softmax, on every attention entry point.

Checked against fastattn.reference (the ground truth, which takes ``softcap=`` too): fp32
tightly against float64, fp16/bf16 by the error-ratio rule (DESIGN.md section 5); gradients
of the dense and varlen ops; decode and attention_with_kvcache on contiguous and paged
caches; the short-query path of flash_attention; softcap=0 bit-identical to no softcap;
scores far past the cap; opcheck, torch.compile and bad input.
"""
import math

import pytest
import torch

import fastattn
from fastattn import ops, reference

from conftest import DEVICES, assert_error_ratio
from test_kvcache import _to_paged

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
ALL = [torch.float32, torch.float16, torch.bfloat16]
_CUDA_MARKS = [d for d in DEVICES if not isinstance(d, str)][0].marks
# Forward kernels: fp32/fp16/bf16 on the CPU, fp16/bf16 on CUDA.
DEVICE_DTYPES = [
    pytest.param(dev, dt, marks=_CUDA_MARKS if dev == "cuda" else (), id=f"{dev}-{DTYPE_IDS[dt]}")
    for dev in ("cpu", "cuda")
    for dt in (ALL if dev == "cpu" else ALL[1:])
]
CAP = 2.0  # small enough that tanh bends most scores: an unapplied cap fails every check


def _qkv(B, Sq, Sk, H, Hk, D, dtype, device="cpu", amp=2.0):
    # amp > 1 spreads the scores over several units of CAP.
    q = (torch.randn(B, Sq, H, D, device=device) * amp).to(dtype)
    k = (torch.randn(B, Sk, Hk, D, device=device) * amp).to(dtype)
    v = torch.randn(B, Sk, Hk, D, device=device).to(dtype)
    return q, k, v


def _check_out_lse(out, lse, true_out, true_lse, low_out, low_lse, fp32_tight, atol=2e-6):
    """Error-ratio rule for every dtype; with fp32_tight also an absolute bound against
    float64 (atol: a few fp32 roundings of the scores, which grow with their magnitude)."""
    assert out.shape == true_out.shape and lse.shape == true_lse.shape and lse.dtype == torch.float32
    dead = torch.isneginf(true_lse)
    assert torch.equal(torch.isneginf(lse), dead), "lse must be -inf exactly where a row sees no key"
    assert_error_ratio(out, low_out, true_out, "out")
    assert_error_ratio(lse[~dead], low_lse[~dead].float(), true_lse[~dead], "lse", atol=1e-5)
    if fp32_tight:
        torch.testing.assert_close(out.double(), true_out, atol=atol, rtol=1e-5)
        torch.testing.assert_close(lse[~dead].double(), true_lse[~dead].double(), atol=5 * atol, rtol=1e-6)


# ---- flash_attention forward --------------------------------------------------------------
# (B, Sq, Sk, H, Hk, D, causal, window): MHA / GQA / MQA; Sq, Sk off every block size (64 and
# 128 query rows, 256 keys) and past them; odd head dims; causal / window with Sq != Sk both
# ways (rows that see no key). (2, 5, 200, ...) and (1, 16, 64, ...) take the short-query path
# (Sq <= 16, Sk >= 4 Sq: the KV-cache kernel reads k/v in place).
FWD_CASES = [
    (2, 17, 17, 4, 4, 64, False, (-1, -1)),
    (1, 150, 300, 4, 2, 128, True, (-1, -1)),
    (1, 97, 33, 4, 1, 80, True, (-1, -1)),
    (1, 129, 257, 2, 2, 40, False, (31, 7)),
    (2, 5, 200, 8, 2, 64, False, (-1, -1)),
    (1, 16, 64, 4, 1, 80, True, (-1, -1)),
    (2, 3, 300, 4, 2, 128, False, (40, 0)),
]


def _case_id(c):
    return "B{}_q{}_k{}_h{}x{}_d{}_{}_w{}x{}".format(*c[:6], "causal" if c[6] else "full", *c[7])


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", FWD_CASES, ids=_case_id)
def test_flash_attention_forward(device, dtype, case):
    B, Sq, Sk, H, Hk, D, causal, window = case
    if device == "cuda" and D not in (32, 64, 96, 128, 192, 256):
        pytest.skip("CUDA head dims are 32, 64, 96, 128, 192, 256")
    q, k, v = _qkv(B, Sq, Sk, H, Hk, D, dtype, device)
    kw = dict(causal=causal, window=window, softcap=CAP)
    out, lse = fastattn.flash_attention(q, k, v, return_lse=True, **kw)
    true_out, true_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    low_out, low_lse = reference.attention(q, k, v, return_lse=True, **kw)
    _check_out_lse(out, lse, true_out, true_lse, low_out, low_lse, fp32_tight=dtype == torch.float32)
    # The cap changed the answer (the check above would pass an uncapped kernel otherwise).
    plain = reference.attention(q.double(), k.double(), v.double(), causal=causal, window=window)
    assert (plain - true_out).abs().max() > 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_gemma_cap_and_custom_scale(device):
    """Gemma 2's cap of 50 with its query_pre_attn_scalar-style scale, and a negative scale."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = _qkv(2, 40, 70, 4, 2, 64, dtype, device, amp=6.0)
    for scale, cap, atol in ((0.0625, 50.0, 3e-5), (-0.2, 3.0, 2e-6), (1.0, 0.5, 2e-6)):
        out, lse = fastattn.flash_attention(q, k, v, causal=True, softmax_scale=scale, softcap=cap, return_lse=True)
        kw = dict(causal=True, softmax_scale=scale, softcap=cap, return_lse=True)
        true_out, true_lse = reference.attention(q.double(), k.double(), v.double(), **kw)
        low_out, low_lse = reference.attention(q, k, v, **kw)
        _check_out_lse(out, lse, true_out, true_lse, low_out, low_lse, fp32_tight=dtype == torch.float32,
                       atol=atol)


@pytest.mark.parametrize("dtype", ALL, ids=DTYPE_IDS.get)
def test_large_scores_stay_finite(dtype):
    """Scores thousands of times the cap: tanh saturates at +-1, nothing overflows, and the
    result is the capped softmax (many keys tie at the cap)."""
    q, k, v = _qkv(1, 33, 90, 2, 1, 64, dtype, amp=30.0)
    for Sq in (33, 4):  # tiled kernel, short-query path
        qs = q[:, :Sq]
        out, lse = fastattn.flash_attention(qs, k, v, softcap=CAP, return_lse=True)
        assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
        true_out, true_lse = reference.attention(qs.double(), k.double(), v.double(), softcap=CAP, return_lse=True)
        low_out, low_lse = reference.attention(qs, k, v, softcap=CAP, return_lse=True)
        # No fp32-tight bound here: scores of ~1000 carry fp32 rounding of ~1e-4 into the
        # unsaturated tanh; the error-ratio rule judges that against the fp32 reference.
        _check_out_lse(out, lse, true_out, true_lse, low_out, low_lse, fp32_tight=False)
        assert (lse <= CAP + math.log(90) + 1e-4).all()  # every capped score is <= CAP


def test_noncontiguous_inputs():
    qkv = torch.randn(2, 50, 3, 4, 64) * 2
    q, k, v = qkv[:, :, 0], qkv[:, :, 1, :2], qkv[:, :, 2, :2]  # strided views, GQA 2
    out = fastattn.flash_attention(q, k, v, causal=True, softcap=CAP)
    want = reference.attention(q.double(), k.double(), v.double(), causal=True, softcap=CAP)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)


# ---- softcap = 0 is the uncapped kernel, bit for bit --------------------------------------
def test_zero_is_bitwise_off():
    q, k, v = _qkv(2, 40, 90, 4, 2, 64, torch.bfloat16)
    for Sq in (40, 3):
        a = fastattn.flash_attention(q[:, :Sq], k, v, causal=True, return_lse=True)
        b = fastattn.flash_attention(q[:, :Sq], k, v, causal=True, return_lse=True, softcap=0.0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # backward
    grads = []
    for kw in ({}, {"softcap": 0}):
        qq, kk, vv = (t.float().requires_grad_() for t in (q, k, v))
        fastattn.flash_attention(qq, kk, vv, causal=True, **kw).sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    assert all(torch.equal(x, y) for x, y in zip(*grads))
    # decode, kvcache, varlen
    kc, vc = k.float(), v.float()
    seqlens = torch.tensor([90, 61], dtype=torch.int32)
    q3 = q[:, 0].float()
    assert torch.equal(fastattn.decode_attention(q3, kc, vc, seqlens),
                       fastattn.decode_attention(q3, kc, vc, seqlens, softcap=0.0))
    q4 = q[:, :20].float()
    assert torch.equal(fastattn.attention_with_kvcache(q4, kc, vc, seqlens),
                       fastattn.attention_with_kvcache(q4, kc, vc, seqlens, softcap=0.0))
    cu = torch.tensor([0, 40, 80], dtype=torch.int32)
    qv, kv_, vv_ = q.reshape(80, 4, 64), k[:, :40].reshape(80, 2, 64), v[:, :40].reshape(80, 2, 64)
    assert torch.equal(fastattn.flash_attention_varlen(qv, kv_, vv_, cu, cu, 40, 40, causal=True),
                       fastattn.flash_attention_varlen(qv, kv_, vv_, cu, cu, 40, 40, causal=True, softcap=0.0))


# ---- gradients ----------------------------------------------------------------------------
def _ref_grads(q, k, v, dout, dtype, **kw):
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    reference.attention(qq, kk, vv, **kw).backward(dout.to(dtype))
    return qq.grad, kk.grad, vv.grad


# (B, Sq, Sk, H, Hk, D, window): blocks of 64 / 128 rows and keys crossed, GQA / MQA, causal
# and window with Sq != Sk, odd head dims.
BWD_CASES = [
    (2, 17, 17, 4, 4, 64, (-1, -1)),
    (1, 130, 97, 4, 2, 64, (-1, 0)),
    (1, 33, 200, 4, 1, 80, (40, 8)),
    (1, 70, 70, 2, 2, 128, (-1, 0)),
]


@pytest.mark.parametrize("dtype", ALL, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: "B{}_q{}_k{}_h{}x{}_d{}_w{}x{}".format(*c[:6], *c[6]))
def test_backward_kernel(dtype, case):
    """ops.flash_attn_bwd with softcap against float64 autograd of the capped reference; out
    and lse come from the reference in fp32, so this checks the backward kernel alone."""
    B, Sq, Sk, H, Hk, D, window = case
    q, k, v = _qkv(B, Sq, Sk, H, Hk, D, dtype)
    dout = torch.randn(B, Sq, H, D).to(dtype)
    scale = D ** -0.5
    out, lse = reference.attention(q.float(), k.float(), v.float(), softmax_scale=scale, window=window,
                                   softcap=CAP, return_lse=True)
    grads = ops.flash_attn_bwd(dout, q, k, v, out.to(dtype), lse, scale, window[0], window[1], True, CAP)
    kw = dict(softmax_scale=scale, window=window, softcap=CAP)
    truth = _ref_grads(q, k, v, dout, torch.float64, **kw)
    low = _ref_grads(q, k, v, dout, dtype, **kw)
    for name, g, t, l in zip(("dq", "dk", "dv"), grads, truth, low):
        assert g.dtype == dtype
        assert_error_ratio(g, l, t, name)
        if dtype == torch.float32:
            torch.testing.assert_close(g.double(), t, atol=1e-5, rtol=1e-5)


def test_autograd_end_to_end():
    """Gradients through fastattn.flash_attention (forward kernel's lse + backward kernel),
    and through the exact fp32 backward that |lse| > 512 selects (a cap of 1000 lets the
    scores get there)."""
    for scale, cap in ((None, CAP), (40.0, 1000.0)):
        q, k, v = _qkv(1, 45, 60, 4, 2, 64, torch.float32)
        dout = torch.randn(1, 45, 4, 64)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = fastattn.flash_attention(qq, kk, vv, causal=True, softmax_scale=scale, softcap=cap,
                                            return_lse=True)
        if scale is not None:
            assert lse[torch.isfinite(lse)].abs().max() > 512  # the exact path is the one tested
        out.backward(dout)
        truth = _ref_grads(q, k, v, dout, torch.float64, causal=True, softmax_scale=scale, softcap=cap)
        low = _ref_grads(q, k, v, dout, torch.float32, causal=True, softmax_scale=scale, softcap=cap)
        for name, g, t, l in zip(("dq", "dk", "dv"), (qq.grad, kk.grad, vv.grad), truth, low):
            assert_error_ratio(g, l, t, name, atol=1e-4 if scale else 1e-5)


# ---- varlen -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL, ids=DTYPE_IDS.get)
def test_varlen_forward_and_grads(dtype):
    lens_q, lens_k = [5, 0, 140, 33], [40, 7, 140, 20]
    cq = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    H, Hk, D = 4, 2, 64
    q = (torch.randn(int(cq[-1]), H, D) * 2).to(dtype)
    k = (torch.randn(int(ck[-1]), Hk, D) * 2).to(dtype)
    v = torch.randn(int(ck[-1]), Hk, D).to(dtype)
    for causal in (False, True):
        kw = dict(causal=causal, softcap=CAP)
        out, lse = fastattn.flash_attention_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), return_lse=True, **kw)
        true_out, true_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cq, ck,
                                                        return_lse=True, **kw)
        low_out, low_lse = reference.attention_varlen(q, k, v, cq, ck, return_lse=True, **kw)
        _check_out_lse(out, lse, true_out, true_lse, low_out, low_lse, fp32_tight=dtype == torch.float32)

    dout = torch.randn_like(q, dtype=torch.float32).to(dtype)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    fastattn.flash_attention_varlen(qq, kk, vv, cq, ck, 140, 140, causal=True, softcap=CAP).backward(dout)
    grads = []
    for dt in (torch.float64, dtype):
        q2, k2, v2 = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        reference.attention_varlen(q2, k2, v2, cq, ck, causal=True, softcap=CAP).backward(dout.to(dt))
        grads.append((q2.grad, k2.grad, v2.grad))
    for name, g, t, l in zip(("dq", "dk", "dv"), (qq.grad, kk.grad, vv.grad), *grads):
        assert_error_ratio(g, l, t, name)


# ---- decode_attention and attention_with_kvcache --------------------------------------------
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode(device, dtype, paged):
    B, S_max, H, Hk, D = 4, 300, 8, 2, 64
    lengths = [0, 1, 257, 300]
    kc = (torch.randn(B, S_max, Hk, D, device=device) * 2).to(dtype)
    vc = torch.randn(B, S_max, Hk, D, device=device).to(dtype)
    q = (torch.randn(B, H, D, device=device) * 2).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    kw = dict(softcap=CAP, return_lse=True)
    true_out, true_lse = reference.decode_attention(q.double(), kc.double(), vc.double(), seqlens, **kw)
    low_out, low_lse = reference.decode_attention(q, kc, vc, seqlens, **kw)
    kp, vp, bt = _to_paged(kc, vc, 16) if paged else (kc, vc, None)
    for num_splits in (1, 3, 0):
        out, lse = fastattn.decode_attention(q, kp, vp, seqlens, num_splits=num_splits, block_table=bt, **kw)
        _check_out_lse(out, lse, true_out, true_lse, low_out, low_lse, fp32_tight=dtype == torch.float32)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("Sq, causal, window", [(3, True, (-1, -1)), (20, True, (30, -1)), (6, False, (-1, -1))],
                         ids=["q3-causal", "q20-window", "q6-full"])
def test_attention_with_kvcache(device, dtype, paged, Sq, causal, window):
    """Few queries (4 x 4 register tiles) and Sq * H / Hk >= 16 (the fp32 GEMM block products),
    new keys appended first, ragged lengths."""
    B, S_max, H, Hk, D = 3, 200, 8, 2, 64
    lengths = [0, 50, 200 - Sq]
    kc = (torch.randn(B, S_max, Hk, D, device=device) * 2).to(dtype)
    vc = torch.randn(B, S_max, Hk, D, device=device).to(dtype)
    q = (torch.randn(B, Sq, H, D, device=device) * 2).to(dtype)
    k_new = (torch.randn(B, Sq, Hk, D, device=device) * 2).to(dtype)
    v_new = torch.randn(B, Sq, Hk, D, device=device).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    kw = dict(causal=causal, window=window, softcap=CAP, return_lse=True)
    k_ref, v_ref = kc.clone(), vc.clone()
    reference.append_kv(k_ref, v_ref, k_new, v_new, seqlens)
    true_out, true_lse = reference.attention_with_kvcache(q.double(), k_ref.double(), v_ref.double(),
                                                          seqlens + Sq, **kw)
    low_out, low_lse = reference.attention_with_kvcache(q, k_ref, v_ref, seqlens + Sq, **kw)
    kp, vp, bt = _to_paged(kc, vc, 7) if paged else (kc.clone(), vc.clone(), None)
    out, lse = fastattn.attention_with_kvcache(q, kp, vp, seqlens, k=k_new, v=v_new, block_table=bt, **kw)
    _check_out_lse(out, lse, true_out, true_lse, low_out, low_lse, fp32_tight=dtype == torch.float32)


# ---- torch.library / torch.compile ----------------------------------------------------------
def test_opcheck():
    q, k, v = _qkv(2, 9, 13, 4, 2, 64, torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.fastattn.flash_attn_fwd, (q, k, v, 0.125, -1, 0, CAP))
    torch.library.opcheck(torch.ops.fastattn.flash_attn_fwd, (q[:, :2], k, v, 0.125, 3, 2, CAP))  # short query
    out, lse = ops.flash_attn_fwd(q, k, v, 0.125, -1, 0, CAP)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastattn.flash_attn_bwd,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, 0.125, -1, 0, True, CAP))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    cuk = torch.tensor([0, 6, 13], dtype=torch.int32)
    q3, k3, v3 = (t.detach()[0].requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.fastattn.flash_attn_varlen_fwd, (q3, k3, v3, cu, cuk, 5, 7, 0.125, -1, 0, CAP))
    o3, l3 = ops.flash_attn_varlen_fwd(q3, k3, v3, cu, cuk, 5, 7, 0.125, -1, 0, CAP)
    torch.library.opcheck(torch.ops.fastattn.flash_attn_varlen_bwd,
                          (torch.randn_like(o3), q3.detach(), k3.detach(), v3.detach(), o3.detach(), l3, cu, cuk,
                           5, 7, 0.125, -1, 0, True, CAP))
    kc, vc = k.detach(), v.detach()
    seqlens = torch.tensor([13, 5], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastattn.decode_attention, (q.detach()[:, 0], kc, vc, seqlens, None, 0, None, CAP))
    kp, vp, bt = _to_paged(kc, vc, 4)
    torch.library.opcheck(torch.ops.fastattn.attention_with_kvcache,
                          (q.detach()[:, :3], kp, vp, seqlens, bt, None, -1, 0, 0, 0, CAP))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def attn(q, k, v):
        return fastattn.flash_attention(q, k, v, causal=True, softcap=CAP) * 2

    q, k, v = (t.requires_grad_() for t in _qkv(2, 20, 20, 4, 2, 64, torch.float32))
    out = attn(q, k, v)
    torch.testing.assert_close(out, fastattn.flash_attention(q, k, v, causal=True, softcap=CAP) * 2)
    out.sum().backward()
    want = _ref_grads(q, k, v, torch.full_like(out, 2.0), torch.float64, causal=True, softcap=CAP)
    torch.testing.assert_close(q.grad.double(), want[0], atol=1e-5, rtol=1e-5)


# ---- bad input ----------------------------------------------------------------------------
BAD_CAPS = [-1.0, float("nan"), float("inf"), -float("inf"), 1e39, "2", True, None, torch.tensor(2.0)]


@pytest.mark.parametrize("cap", BAD_CAPS, ids=repr)
def test_bad_softcap(cap):
    q, k, v = _qkv(1, 4, 8, 2, 1, 32, torch.float32)
    seqlens = torch.tensor([8], dtype=torch.int32)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    calls = [
        lambda: fastattn.flash_attention(q, k, v, softcap=cap),
        lambda: fastattn.flash_attention_varlen(q[0], k[0], v[0], cu, torch.tensor([0, 8], dtype=torch.int32), 4, 8,
                                                softcap=cap),
        lambda: fastattn.decode_attention(q[:, 0], k, v, seqlens, softcap=cap),
        lambda: fastattn.attention_with_kvcache(q, k, v, seqlens, softcap=cap),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="softcap"):
            call()


def test_bad_softcap_raw_ops():
    """The bindings check too (direct torch.ops callers skip functional.py)."""
    q, k, v = _qkv(1, 4, 8, 2, 1, 32, torch.float32)
    seqlens = torch.tensor([8], dtype=torch.int32)
    for cap in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softcap"):
            torch.ops.fastattn.flash_attn_fwd(q, k, v, 0.1, -1, -1, cap)
        with pytest.raises(ValueError, match="softcap"):
            torch.ops.fastattn.decode_attention(q[:, 0], k, v, seqlens, None, 0, None, cap)
        with pytest.raises(ValueError, match="softcap"):
            torch.ops.fastattn.attention_with_kvcache(q, k, v, seqlens, None, None, -1, 0, 0, 0, cap)
