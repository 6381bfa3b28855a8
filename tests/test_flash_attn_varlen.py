"""fastattn.flash_attention_varlen (and the fastattn::flash_attn_varlen_fwd/bwd ops).

Every sequence of a packed batch must behave exactly as fastattn.flash_attention on its own
slice: compared with per-sequence dense calls (fp32: bitwise or within a few ulps), and with
fastattn.reference.attention_varlen under the error-ratio rule (DESIGN.md section 5).
"""
import itertools
import sys

import pytest
import torch

import fastattn
from fastattn import reference

from conftest import DEVICES, HAS_CUDA, assert_error_ratio

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_CUDA_MARKS = [d for d in DEVICES if not isinstance(d, str)][0].marks
DEVICE_DTYPES = [
    pytest.param(dev, dt, marks=_CUDA_MARKS if dev == "cuda" else (), id=f"{dev}-{DTYPE_IDS[dt]}")
    for dev, dt in [("cpu", torch.float32), ("cpu", torch.float16), ("cpu", torch.bfloat16),
                    ("cuda", torch.float16), ("cuda", torch.bfloat16)]
]


def _cu(lens, device):
    return torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)


def _make(device, dtype, lens_q, lens_k, H, Hk, D):
    q = torch.randn(sum(lens_q), H, D, device=device, dtype=dtype)
    k = torch.randn(sum(lens_k), Hk, D, device=device, dtype=dtype)
    v = torch.randn(sum(lens_k), Hk, D, device=device, dtype=dtype)
    return q, k, v, _cu(lens_q, device), _cu(lens_k, device)


def _call(q, k, v, cq, ck, lens_q, lens_k, **kw):
    return fastattn.flash_attention_varlen(q, k, v, cq, ck, max(lens_q, default=0), max(lens_k, default=0),
                                           return_lse=True, **kw)


def _dense_per_sequence(q, k, v, cq, ck, **kw):
    """flash_attention on each slice: out (total_q, H, D), lse (H, total_q)."""
    cq, ck = cq.tolist(), ck.tolist()
    outs, lses = [], []
    for i in range(len(cq) - 1):
        sl = lambda t, c: t[c[i]:c[i + 1]].unsqueeze(0)  # noqa: E731
        o, l = fastattn.flash_attention(sl(q, cq), sl(k, ck), sl(v, ck), return_lse=True, **kw)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs), torch.cat(lses, 1)


def _assert_same(got, want, name, dtype):
    # fp32: the same kernel on the same rows; only the query-block boundaries may differ from
    # the per-sequence call, which moves a few roundings. 16-bit: one ulp of the output type.
    tol = 2e-6 if dtype == torch.float32 else (8e-3 if dtype == torch.bfloat16 else 1e-3)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=name)


def _check(device, dtype, lens_q, lens_k, H=4, Hk=2, D=64, **kw):
    q, k, v, cq, ck = _make(device, dtype, lens_q, lens_k, H, Hk, D)
    out, lse = _call(q, k, v, cq, ck, lens_q, lens_k, **kw)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (H, q.shape[0]) and lse.dtype == torch.float32 and lse.is_contiguous()
    d_out, d_lse = _dense_per_sequence(q, k, v, cq, ck, **kw)
    _assert_same(out, d_out, "out vs dense", dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(d_lse))
    fin = torch.isfinite(d_lse)
    _assert_same(lse[fin], d_lse[fin], "lse vs dense", torch.float32)
    ref_kw = {k_: v_ for k_, v_ in kw.items()}
    true_out, true_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cq, ck, return_lse=True,
                                                    **ref_kw)
    low_out, low_lse = reference.attention_varlen(q, k, v, cq, ck, return_lse=True, **ref_kw)
    assert_error_ratio(out, low_out, true_out, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(true_lse)), "rows that see no key must have lse -inf"
    fin = torch.isfinite(true_lse)
    assert_error_ratio(lse[fin], low_lse[fin], true_lse[fin].float(), "lse")
    return q, k, v, cq, ck


RAGGED = [
    ([5, 0, 17, 1, 64], [5, 3, 17, 1, 64]),        # lengths 0 and 1, Sq == Sk
    ([1, 65, 128, 129], [63, 65, 127, 257]),      # around the block sizes
    ([40, 7, 300], [10, 7, 20]),                  # Sk < Sq: causal leaves empty rows
    ([0, 0], [0, 0]),                             # nothing at all
    ([3, 9], [0, 12]),                            # a sequence without keys
]


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("lens", RAGGED, ids=["ragged", "blocks", "sk<sq", "empty", "no-keys"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ragged(device, dtype, lens, causal):
    _check(device, dtype, *lens, causal=causal)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("h, hk", [(6, 6), (6, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_heads(device, dtype, h, hk):
    _check(device, dtype, [33, 1, 70], [50, 9, 70], H=h, Hk=hk, causal=True)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("window", [(16, 0), (8, 8), (0, 0), (5, 2), (-1, 40), (30, -1), (sys.maxsize, 3)])
def test_window(device, dtype, window):
    _check(device, dtype, [97, 20, 1, 150], [97, 60, 4, 90], H=2, Hk=1, window=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [1, 40, 128])
def test_head_dims_cpu(dtype, d):
    _check("cpu", dtype, [17, 70, 3], [30, 70, 3], H=2, Hk=2, D=d, causal=True, softmax_scale=0.3)


def test_one_long_sequence_many_short():
    # The balanced case: one sequence far longer than the rest, many (sequence, head, block)
    # items; also enough items for the 128-row query blocks of the CPU forward.
    _check("cpu", torch.float32, [1000] + [3] * 20, [1000] + [5] * 20, H=4, Hk=4, D=32, causal=True)


def test_causal_sets_right_window():
    q, k, v, cq, ck = _make("cpu", torch.float32, [20, 33], [25, 40], 2, 2, 32)
    a = fastattn.flash_attention_varlen(q, k, v, cq, ck, 33, 40, causal=True, window=(10, 7))
    b = fastattn.flash_attention_varlen(q, k, v, cq, ck, 33, 40, window=(10, 0))
    assert torch.equal(a, b)


def test_max_seqlen_larger_than_needed():
    # max_seqlen is only an upper bound: a looser one changes nothing.
    q, k, v, cq, ck = _make("cpu", torch.float32, [20, 33], [25, 40], 2, 1, 32)
    a = fastattn.flash_attention_varlen(q, k, v, cq, ck, 33, 40, causal=True)
    b = fastattn.flash_attention_varlen(q, k, v, cq, ck, 500, 700, causal=True)
    torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_strided_inputs(device, dtype):
    lens = [17, 0, 40, 1]
    total, H, D = sum(lens), 4, 64
    cu = _cu(lens, device)
    # q, k, v slices of one packed (total, 3, H, D) projection, and a (H, total, D) storage.
    qkv = torch.randn(total, 3, H, D, device=device, dtype=dtype)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    out = fastattn.flash_attention_varlen(q, k, v, cu, cu, 40, 40, causal=True)
    want = fastattn.flash_attention_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, 40, 40,
                                           causal=True)
    assert torch.equal(out, want)
    qt = torch.randn(H, total, D, device=device, dtype=dtype).transpose(0, 1)
    out = fastattn.flash_attention_varlen(qt, k, v, cu, cu, 40, 40)
    assert torch.equal(out, fastattn.flash_attention_varlen(qt.contiguous(), k, v, cu, cu, 40, 40))


# ---- gradients -----------------------------------------------------------------------------
def _grads(fn, inputs, dout):
    args = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*args)
    return torch.autograd.grad(out, args, dout.to(out.dtype))


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize(
    "lens_q, lens_k, h, hk, kw",
    [([17, 0, 65, 1], [17, 4, 65, 0], 2, 2, {"causal": True}),
     ([33, 20, 129], [20, 45, 100], 4, 2, {"causal": True}),
     ([20, 7], [45, 30], 4, 1, {"window": (6, 3)})],
    ids=["ragged-causal", "gqa-sk<sq", "mqa-window"],
)
def test_gradients(device, dtype, lens_q, lens_k, h, hk, kw):
    q, k, v, cq, ck = _make(device, dtype, lens_q, lens_k, h, hk, 64)
    dout = torch.randn(q.shape, device=device)
    mq, mk = max(lens_q), max(lens_k)
    ours = _grads(lambda a, b, c: fastattn.flash_attention_varlen(a, b, c, cq, ck, mq, mk, **kw), (q, k, v), dout)
    for g, t in zip(ours, (q, k, v)):
        assert g.dtype == dtype and g.shape == t.shape

    # against per-sequence dense backward
    def dense(a, b, c):
        return _dense_per_sequence(a, b, c, cq, ck, **kw)[0]

    for g, want, name in zip(ours, _grads(dense, (q, k, v), dout), ("dq", "dk", "dv")):
        _assert_same(g, want, name + " vs dense", dtype)
    # against reference autograd (error-ratio rule)
    true = _grads(lambda a, b, c: reference.attention_varlen(a, b, c, cq, ck, **kw),
                  [t.double() for t in (q, k, v)], dout)
    low = _grads(lambda a, b, c: reference.attention_varlen(a, b, c, cq, ck, **kw), (q, k, v), dout)
    for o, t, l, name in zip(ours, true, low, ("dq", "dk", "dv")):
        assert_error_ratio(o, l, t, name)


def test_gradients_strided_inputs():
    lens = [17, 40, 1]
    total, H, D = sum(lens), 2, 32
    cu = _cu(lens, "cpu")
    qkv = torch.randn(total, 3, H, D, requires_grad=True)
    q, k, v = qkv.unbind(1)
    out = fastattn.flash_attention_varlen(q, k, v, cu, cu, 40, 40, causal=True)
    (g,) = torch.autograd.grad(out.square().sum(), qkv)
    qkv2 = qkv.detach().clone().requires_grad_()
    ref = reference.attention_varlen(*qkv2.unbind(1), cu, cu, causal=True)
    (g2,) = torch.autograd.grad(ref.square().sum(), qkv2)
    torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-4)


def test_huge_softmax_scale_exact_backward():
    # |lse| > 512 takes the exact fp32 backward path, run per sequence.
    lens_q, lens_k = [5, 0, 11], [7, 3, 23]
    q, k, v, cq, ck = _make("cpu", torch.float32, lens_q, lens_k, 4, 2, 16)
    dout = torch.randn(q.shape)
    kw = {"causal": True, "softmax_scale": 1e4}
    ours = _grads(lambda a, b, c: fastattn.flash_attention_varlen(a, b, c, cq, ck, 11, 23, **kw), (q, k, v), dout)
    want = _grads(lambda a, b, c: _dense_per_sequence(a, b, c, cq, ck, **kw)[0], (q, k, v), dout)
    for g, w, name in zip(ours, want, "qkv"):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_cpu_thread_count_invariant():
    # Forward and backward bits do not depend on the number of threads.
    lens_q, lens_k = [300, 5, 0, 130], [280, 9, 3, 130]
    q, k, v, cq, ck = _make("cpu", torch.bfloat16, lens_q, lens_k, 4, 2, 64)
    dout = torch.randn(q.shape, dtype=torch.bfloat16)
    runs = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            args = [t.clone().requires_grad_() for t in (q, k, v)]
            out, lse = fastattn.flash_attention_varlen(*args, cq, ck, 300, 280, causal=True, return_lse=True)
            runs.append((out, lse, *torch.autograd.grad(out, args, dout)))
    finally:
        torch.set_num_threads(prev)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_cpu_other_sequences_keys_never_enter(dtype):
    """A non-finite value in one sequence's V reaches no other sequence, not even as 0 * inf.
    Sequences starting at odd packed offsets matter on the bf16 pair path (AVX512-BF16 CPUs),
    whose V layout pairs packed keys 2u, 2u + 1: a pair straddling two sequences must not be
    multiplied into either (its odd edge key is added on its own)."""
    lens_q, lens_k = [3, 70, 5, 41], [3, 67, 9, 41]  # sequences start at packed keys 0, 3, 70, 79
    q, k, v, cq, ck = _make("cpu", dtype, lens_q, lens_k, 4, 2, 64)
    v_bad = v.clone()
    starts = ck.tolist()
    poisoned = [0, 2]  # the last key of sequences 0 and 2: packed keys 2 and 78, each paired
    for s in poisoned:    # with the next sequence's first key
        v_bad[starts[s + 1] - 1] = float("inf")
    for causal, window in [(True, (-1, -1)), (False, (-1, -1)), (True, (8, 0))]:
        kw = dict(causal=causal, window=window)
        out_bad, _ = _call(q, k, v_bad, cq, ck, lens_q, lens_k, **kw)
        out, _ = _call(q, k, v, cq, ck, lens_q, lens_k, **kw)
        qs = cq.tolist()
        for s in (1, 3):  # the clean sequences right after the poisoned ones
            rows = slice(qs[s], qs[s + 1])
            assert torch.isfinite(out_bad[rows].float()).all(), f"sequence {s} {kw}: another sequence's inf got in"
            assert torch.equal(out_bad[rows], out[rows]), f"sequence {s} {kw}"


def test_double_backward_raises():
    q, k, v, cq, ck = _make("cpu", torch.float32, [5, 3], [7, 2], 2, 1, 16)
    q.requires_grad_()
    out = fastattn.flash_attention_varlen(q, k, v, cq, ck, 5, 7, causal=True)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(gq.sum(), q)


def test_lse_not_differentiable():
    q, k, v, cq, ck = _make("cpu", torch.float32, [5, 3], [7, 2], 2, 1, 16)
    q.requires_grad_()
    out, lse = fastattn.flash_attention_varlen(q, k, v, cq, ck, 5, 7, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


# ---- torch.library / torch.compile ---------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, cq, ck = _make(device, dtype, [4, 0, 9], [6, 2, 13], 4, 2, 64)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.fastattn.flash_attn_varlen_fwd, (q, k, v, cq, ck, 9, 13, 0.125, -1, 0))
    torch.library.opcheck(torch.ops.fastattn.flash_attn_varlen_fwd, (q, k, v, cq, ck, 9, 13, 0.125, 3, 2))
    out, lse = torch.ops.fastattn.flash_attn_varlen_fwd(q, k, v, cq, ck, 9, 13, 0.125, -1, 0)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastattn.flash_attn_varlen_bwd,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cq, ck, 9, 13, 0.125, -1, 0,
                           True))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lens_q, lens_k = [7, 0, 20], [9, 4, 20]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def attn(q, k, v, cq, ck):
        out = fastattn.flash_attention_varlen(q, k, v, cq, ck, 20, 20, causal=True)
        out2, lse = fastattn.flash_attention_varlen(q, k, v, cq, ck, 20, 20, window=(4, 4), softmax_scale=0.2,
                                                    return_lse=True)
        return out * 2 + out2, lse

    q, k, v, cq, ck = _make(device, dtype, lens_q, lens_k, 4, 2, 64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = attn(q, k, v, cq, ck)
    o1 = fastattn.flash_attention_varlen(q, k, v, cq, ck, 20, 20, causal=True)
    o2, lse2 = fastattn.flash_attention_varlen(q, k, v, cq, ck, 20, 20, window=(4, 4), softmax_scale=0.2,
                                               return_lse=True)
    torch.testing.assert_close(out, o1 * 2 + o2)
    torch.testing.assert_close(lse, lse2)
    out.float().sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    # other cu_seqlens values (same shapes) reuse the graph: nothing was specialised on them
    cq2, ck2 = _cu([10, 10, 7], device), _cu([3, 20, 10], device)
    out3, _ = attn(q, k, v, cq2, ck2)
    torch.testing.assert_close(out3, 2 * fastattn.flash_attention_varlen(q, k, v, cq2, ck2, 20, 20, causal=True)
                               + fastattn.flash_attention_varlen(q, k, v, cq2, ck2, 20, 20, window=(4, 4),
                                                                 softmax_scale=0.2))


def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, cq, ck: fastattn.flash_attention_varlen(q, k, v, cq, ck, 9, 11, causal=True) + 1,
                      fullgraph=True)
    q, k, v, cq, ck = _make("cpu", torch.float32, [9, 0, 4], [11, 2, 4], 2, 1, 32)
    torch.testing.assert_close(f(q, k, v, cq, ck), fastattn.flash_attention_varlen(q, k, v, cq, ck, 9, 11, causal=True) + 1)


def test_meta_shapes():
    q = torch.empty(30, 4, 64, device="meta")
    k = torch.empty(50, 2, 64, device="meta")
    cu = torch.empty(4, dtype=torch.int32, device="meta")
    out, lse = fastattn.flash_attention_varlen(q, k, k, cu, cu, 20, 30, causal=True, return_lse=True)
    assert out.shape == (30, 4, 64) and out.device.type == "meta" and lse.shape == (4, 30)


# ---- bad input -----------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _i(*vals, device="cpu", dtype=torch.int32):
    return torch.tensor(vals, dtype=dtype, device=device)


Q, K = (lambda: _t(10, 4, 32)), (lambda: _t(12, 2, 32))
CQ, CK = (lambda: _i(0, 4, 10)), (lambda: _i(0, 5, 12))

BAD_INPUTS = [
    # (q, k, v, cu_q, cu_k, max_q, max_k), kwargs, exception, message
    (lambda: (_t(2, 10, 4, 32), K(), K(), CQ(), CK(), 6, 7), {}, ValueError, r"q must have 3 dimensions"),
    (lambda: (Q(), _t(12, 32), K(), CQ(), CK(), 6, 7), {}, ValueError, r"k must have 3 dimensions"),
    (lambda: (Q(), K(), K()[:11], CQ(), CK(), 6, 7), {}, ValueError, r"k and v must have the same shape"),
    (lambda: (Q(), _t(12, 2, 16), _t(12, 2, 16), CQ(), CK(), 6, 7), {}, ValueError, r"k must have q's head dim 32"),
    (lambda: (Q(), _t(12, 3, 32), _t(12, 3, 32), CQ(), CK(), 6, 7), {}, ValueError,
     r"query heads \(4\) must be a multiple of the number of key/value heads \(3\)"),
    (lambda: (Q().double(), K().double(), K().double(), CQ(), CK(), 6, 7), {}, ValueError,
     r"q must be float32, float16 or bfloat16"),
    (lambda: (Q(), K().half(), K().half(), CQ(), CK(), 6, 7), {}, ValueError,
     r"k has dtype torch.float16 but q has dtype torch.float32"),
    (lambda: (_t(10, 4, 600), _t(12, 2, 600), _t(12, 2, 600), CQ(), CK(), 6, 7), {}, ValueError,
     r"head dim must be in \[1, 512\] on the CPU"),
    (lambda: (_t(10, 32, 4).transpose(1, 2), K(), K(), CQ(), CK(), 6, 7), {}, ValueError,
     r"q must have a contiguous last dimension"),
    (lambda: (Q(), K(), K(), _i(0, 4, 10, dtype=torch.int64), CK(), 6, 7), {}, ValueError,
     r"cu_seqlens_q must be int32, got torch.int64"),
    (lambda: (Q(), K(), K(), CQ(), _i(0, 5, 12).float(), 6, 7), {}, ValueError, r"cu_seqlens_k must be int32"),
    (lambda: (Q(), K(), K(), _i(0, 4, 10).view(1, 3), CK(), 6, 7), {}, ValueError,
     r"cu_seqlens_q must be 1-D of length B \+ 1"),
    (lambda: (Q(), K(), K(), _i(), CK(), 6, 7), {}, ValueError, r"cu_seqlens_q must be 1-D of length B \+ 1"),
    (lambda: (Q(), K(), K(), CQ(), _i(0, 5, 12, device="meta"), 6, 7), {}, ValueError,
     r"cu_seqlens_k is on meta but must be on cpu"),
    (lambda: (Q(), K(), K(), CQ(), _i(0, 12), 6, 12), {}, ValueError,
     r"cu_seqlens_q and cu_seqlens_k must have the same length B \+ 1.*got 3 and 2"),
    (lambda: (Q(), K(), K(), [0, 4, 10], CK(), 6, 7), {}, TypeError, r"cu_seqlens_q must be a torch.Tensor"),
    (lambda: (Q(), K(), K(), CQ(), CK(), 6.0, 7), {}, TypeError, r"max_seqlen_q must be a Python int"),
    (lambda: (Q(), K(), K(), CQ(), CK(), 6, torch.tensor(7)), {}, TypeError, r"max_seqlen_k must be a Python int"),
    (lambda: (Q(), K(), K(), CQ(), CK(), -1, 7), {}, ValueError, r"max_seqlen_q must be >= 0"),
    (lambda: (Q(), K(), K(), CQ(), CK(), 6, 7), {"window": (-2, 0)}, ValueError, r"window sizes must be >= 0 or -1"),
    (lambda: (Q(), K(), K(), CQ(), CK(), 6, 7), {"softmax_scale": float("nan")}, ValueError,
     r"softmax_scale must be finite"),
    (lambda: (Q(), K(), K(), CQ(), CK(), 6, 7), {"softmax_scale": "x"}, TypeError,
     r"softmax_scale must be a real number"),
    (lambda: (Q(), _t(12, 2, 32, device="meta"), K(), CQ(), CK(), 6, 7), {}, ValueError,
     r"k is on meta but q is on cpu"),
    # values of cu_seqlens (checked on the CPU, in the binding)
    (lambda: (Q(), K(), K(), _i(1, 4, 10), CK(), 6, 7), {}, ValueError, r"cu_seqlens_q must start at 0, got 1"),
    (lambda: (Q(), K(), K(), CQ(), _i(0, 13, 12), 6, 13), {}, ValueError,
     r"cu_seqlens_k must be non-decreasing"),
    (lambda: (Q(), K(), K(), _i(0, 4, 11), CK(), 7, 7), {}, ValueError,
     r"cu_seqlens_q must end at or before total_q \(q.shape\[0\]\) = 10, got 11"),
    (lambda: (Q(), K(), K(), CQ(), _i(0, 5, 13), 6, 8), {}, ValueError,
     r"cu_seqlens_k must end at or before total_k \(k.shape\[0\]\) = 12, got 13"),
    (lambda: (Q(), K(), K(), CQ(), CK(), 5, 7), {}, ValueError,
     r"sequence 1 has length 6 \(cu_seqlens_q\) but max_seqlen_q is 5"),
    (lambda: (Q(), K(), K(), CQ(), CK(), 6, 6), {}, ValueError,
     r"sequence 1 has length 7 \(cu_seqlens_k\) but max_seqlen_k is 6"),
]


@pytest.mark.parametrize("make, kwargs, exc, match", BAD_INPUTS)
def test_bad_input(make, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastattn.flash_attention_varlen(*make(), **kwargs)


def test_bad_input_direct_op():
    # The C++ binding validates too, for callers of torch.ops.fastattn directly.
    fwd = torch.ops.fastattn.flash_attn_varlen_fwd
    q, k, cq, ck = Q(), K(), CQ(), CK()
    cases = [
        ((q[0], k, k, cq, ck, 6, 7), r"q must have 3 dimensions"),
        ((q, k, k[:5], cq, ck, 6, 7), r"k and v must have the same shape"),
        ((q, _t(12, 3, 32), _t(12, 3, 32), cq, ck, 6, 7), r"must be a multiple of the number of key/value heads"),
        ((q, k, k, cq.long(), ck, 6, 7), r"cu_seqlens_q must be int32"),
        ((q, k, k, cq, ck[:2], 6, 7), r"cu_seqlens_q and cu_seqlens_k must have the same length"),
        ((q, k, k, cq.view(1, 3), ck, 6, 7), r"cu_seqlens_q must be 1-D"),
        ((q, k, k, cq, ck, -1, 7), r"max_seqlen_q and max_seqlen_k must be >= 0"),
        ((q, k, k, _i(0, 4, 11), ck, 7, 7), r"cu_seqlens_q must end at or before total_q"),
        ((q, k, k, cq, _i(0, 7, 5), 7, 7), r"cu_seqlens_k must be non-decreasing"),
        ((q, k, k, cq, ck, 6, 3), r"max_seqlen_k must be at least the longest sequence"),
        ((_t(10, 4, 513), _t(12, 2, 513), _t(12, 2, 513), cq, ck, 6, 7), r"head dim must be in \[1, 512\]"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            fwd(*args, 0.1, -1, -1)
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        fwd(q, k, k, cq, ck, 6, 7, float("inf"), -1, -1)
    with pytest.raises(ValueError, match="window sizes must be >= 0 or -1"):
        fwd(q, k, k, cq, ck, 6, 7, 0.1, -3, -1)
    out, lse = fwd(q, k, k, cq, ck, 6, 7, 0.1, -1, 0)
    bwd = torch.ops.fastattn.flash_attn_varlen_bwd
    with pytest.raises(ValueError, match=r"lse must have shape \(4, 10\)"):
        bwd(out, q, k, k, out, lse.t().contiguous(), cq, ck, 6, 7, 0.1, -1, 0, True)
    with pytest.raises(ValueError, match="dout must have q's shape"):
        bwd(out[:5], q, k, k, out, lse, cq, ck, 6, 7, 0.1, -1, 0, True)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        bwd(out, q, k, k, out, lse, _i(2, 4, 10), ck, 6, 7, 0.1, -1, 0, True)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.cuda
def test_bad_input_cuda():
    q = _t(10, 4, 64, device="cuda", dtype=torch.float16)
    cq = _i(0, 4, 10, device="cuda")
    with pytest.raises(ValueError, match=r"cu_seqlens_q is on cpu but must be on cuda"):
        fastattn.flash_attention_varlen(q, q, q, _i(0, 4, 10), cq, 6, 6)
    with pytest.raises(ValueError, match=r"q must be float16 or bfloat16 on CUDA"):
        fastattn.flash_attention_varlen(q.float(), q.float(), q.float(), cq, cq, 6, 6)


@pytest.mark.parametrize("shape_window", [False, True], ids=["no_window", "window_from_shape"])
def test_compile_dynamic_max_seqlen_does_not_recompile(shape_window):
    # max_seqlen_q/_k are SymInt in the op schemas: under torch.compile(dynamic=True) a new
    # value is a symbol, not a guard (typed int, every value recompiled, and with fullgraph=True
    # the 9th value hit the recompile limit: FailOnRecompileLimitHit). Forward and backward.
    # A window derived from a shape (window=(m // 2, 0)) stays symbolic too: the varlen ops'
    # windows are SymInt (they were int: one graph per length, and _check_window refused a
    # SymInt under non-strict export; export audit).
    import torch._dynamo

    torch._dynamo.reset()
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm

    def fn(q, k, cu, m):
        window = (m // 2, 0) if shape_window else (-1, -1)
        return fastattn.flash_attention_varlen(q, k, k, cu, cu, m, m, window=window).square().sum()

    f = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
    for n in range(3, 14):
        q = torch.randn(2 * n, 5, 16, requires_grad=True)
        k = torch.randn(2 * n, 1, 16, requires_grad=True)
        cu = torch.tensor([0, n, 2 * n], dtype=torch.int32)
        f(q, k, cu, n).backward()
        q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        fn(q2, k2, cu, n).backward()
        assert torch.equal(q.grad, q2.grad) and torch.equal(k.grad, k2.grad)
    assert len(frames) <= 2, f"{len(frames)} graphs for 11 max_seqlen values"


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("api", ["fastattn", "flash_attn"])
def test_export_max_seqlen_read_from_cu_seqlens(strict, api):
    # flash-attn's idiom: max_seqlen = (cu[1:] - cu[:-1]).max().item(), a data-dependent
    # length under export. Its range check branched on it ("Could not guard on data-dependent
    # expression", both export modes), and a checked one failed strict export (export audit).
    from torch.export import Dim, export

    from fastattn.integrations import flash_attn as fa

    class M(torch.nn.Module):
        def forward(self, q, k, v, cu):
            m = (cu[1:] - cu[:-1]).max().item()
            if api == "flash_attn":
                return fa.flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True)
            return fastattn.flash_attention_varlen(q, k, v, cu, cu, m, m, causal=True)

    def inputs(lens, seed):
        g = torch.Generator().manual_seed(seed)
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        T = int(cu[-1])
        return torch.randn(T, 4, 16, generator=g), torch.randn(T, 2, 16, generator=g), \
            torch.randn(T, 2, 16, generator=g), cu

    T, B1 = Dim("T", min=1, max=512), Dim("B1", min=3, max=64)
    program = export(M(), inputs([3, 5], 0), dynamic_shapes=({0: T}, {0: T}, {0: T}, {0: B1}),
                     strict=strict).module()
    for lens in ([7, 2, 11], [1, 1], [20, 3, 0, 9]):
        a = inputs(lens, len(lens))
        assert torch.equal(program(*a), M()(*a)), lens


def test_compiled_bad_max_seqlen_is_a_value_error():
    # A concrete max_seqlen under torch.compile keeps the eager check (a ValueError naming it);
    # only traced (export) values become graph checks (review of the export change).
    import torch._dynamo

    torch._dynamo.reset()
    q = torch.randn(8, 2, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    f = torch.compile(lambda q, cu, m: fastattn.flash_attention_varlen(q, q, q, cu, cu, m, 5), backend="eager")
    for m in (5, 6):  # (the second value makes m a dynamic int)
        f(q, cu, m)
    with pytest.raises(ValueError, match="max_seqlen_q must be >= 0"):
        f(q, cu, -1)


@pytest.mark.parametrize("d", [32, 128])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (5, 3))])
def test_each_sequence_bitwise_flash_attention_bf16(d, causal, window):
    # bf16 on CPUs with AVX512-BF16 multiplies P V by key pairs: they are pairs of each
    # sequence's own keys, so a sequence at an odd packed offset gets flash_attention's bits on
    # its slice (pairs of the packed rows differed by ~1 ulp there, outputs and gradients). On
    # other CPUs (fp32 arithmetic) this holds trivially.
    torch.manual_seed(0)
    lens = [7, 29, 1, 16, 13]  # odd starts: 7, 36, 37, 53
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    qkv = torch.randn(sum(lens), 8, d, dtype=torch.bfloat16)
    q, k, v = (t.clone().requires_grad_() for t in (qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]))  # GQA 4 / 2
    out = fastattn.flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=causal, window=window)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    for i in range(len(lens)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        one = [t.detach()[rows].unsqueeze(0).requires_grad_() for t in (q, k, v)]
        want = fastattn.flash_attention(*one, causal=causal, window=window)
        want_grads = torch.autograd.grad(want, one, grad[rows].unsqueeze(0))
        assert torch.equal(out[rows], want[0]), i
        for name, got, ref in zip("qkv", grads, want_grads):
            assert torch.equal(got[rows], ref[0]), (i, name)
