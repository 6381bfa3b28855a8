"""fastattn.apply_rotary (and the rotary ops) against fastattn.reference.apply_rotary."""
import warnings

import pytest
import torch

import fastattn
from fastattn import reference

from conftest import ALL_DTYPES, DEVICES, assert_error_ratio

# (B, S, H, Hk, D, R): MHA, GQA 4:1, MQA; odd S; D 64/128 and 80 with partial rotary; an R/2
# that is not a multiple of 8 (the CUDA kernel's scalar path); R = 20 (the CPU kernel's
# 16-wide fp16 loops end in a scalar remainder).
SHAPES = [
    (2, 1, 4, 4, 64, 64),
    (2, 17, 8, 2, 128, 128),
    (1, 97, 4, 1, 80, 32),
    (2, 17, 4, 1, 64, 48),
    (1, 5, 2, 2, 24, 20),
]
MAX_POS = 160


def _tables(rot, device, max_pos=MAX_POS):
    angles = torch.rand(max_pos, rot // 2, device=device, dtype=torch.float64) * 40 - 20
    return angles.cos().float(), angles.sin().float()


def _positions(mode, B, S, device):
    if mode == "none":
        return None
    if mode == "seq_int32":
        return torch.randperm(MAX_POS, device=device)[:S].to(torch.int32)
    if mode == "batch_int64":
        return torch.randint(0, MAX_POS, (B, S), device=device, dtype=torch.int64)
    if mode == "offset":  # decoding S tokens after a prefix of 60, as (S,) int64
        return torch.arange(60, 60 + S, device=device)
    raise AssertionError(mode)


def _check(q2, k2, q, k, cos, sin, pos, interleaved, rot):
    true = reference.apply_rotary(q.double(), k.double(), cos.double(), sin.double(), pos, interleaved)
    low = reference.apply_rotary(q, k, cos, sin, pos, interleaved)
    assert q2.dtype == q.dtype and k2.dtype == k.dtype
    assert_error_ratio(q2, low[0], true[0], "q")
    assert_error_ratio(k2, low[1], true[1], "k")
    # Dims R..D pass through bit for bit.
    assert torch.equal(q2[..., rot:], q[..., rot:]) and torch.equal(k2[..., rot:], k[..., rot:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(device, dtype, interleaved, shape):
    B, S, H, Hk, D, R = shape
    q = torch.randn(B, S, H, D, device=device, dtype=dtype)
    k = torch.randn(B, S, Hk, D, device=device, dtype=dtype)
    cos, sin = _tables(R, device)
    for mode in ["none", "seq_int32", "batch_int64", "offset"]:
        pos = _positions(mode, B, S, device)
        q2, k2 = fastattn.apply_rotary(q, k, cos, sin, positions=pos, interleaved=interleaved)
        assert q2.is_contiguous() and k2.is_contiguous()
        _check(q2, k2, q, k, cos, sin, pos, interleaved, R)
        # In place gives the same bits as out of place.
        qi, ki = q.clone(), k.clone()
        out = fastattn.apply_rotary(qi, ki, cos, sin, positions=pos, interleaved=interleaved, inplace=True)
        assert out[0] is qi and out[1] is ki
        assert torch.equal(qi, q2) and torch.equal(ki, k2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("inplace", [False, True], ids=["outofplace", "inplace"])
def test_packed_qkv_views(device, dtype, interleaved, inplace):
    # q, k, v as views of one (B, S, H + 2 Hk, D) projection output: batch/row/head strides
    # are those of the packed tensor, and v (and everything else) must be left alone.
    B, S, H, Hk, D, R = 2, 17, 4, 2, 64, 64
    qkv = torch.randn(B, S, H + 2 * Hk, D, device=device, dtype=dtype)
    before = qkv.clone()
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + Hk], qkv[:, :, H + Hk :]
    cos, sin = _tables(R, device)
    pos = _positions("batch_int64", B, S, device)
    q0, k0 = q.clone(), k.clone()
    q2, k2 = fastattn.apply_rotary(q, k, cos, sin, positions=pos, interleaved=interleaved, inplace=inplace)
    _check(q2, k2, q0, k0, cos, sin, pos, interleaved, R)
    assert torch.equal(v, before[:, :, H + Hk :])
    if inplace:
        assert torch.equal(qkv[:, :, :H], q2) and torch.equal(qkv[:, :, H : H + Hk], k2)
    else:
        assert torch.equal(qkv, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_strides(device, dtype):
    # Head stride != D (padded rows), a (S, B) batch-major buffer seen as (B, S), and an
    # odd element offset: every stride is free except the last dim's.
    B, S, H, Hk, D, R = 3, 17, 3, 1, 80, 48
    q = torch.randn(S, B, H, D + 3, device=device, dtype=dtype).transpose(0, 1)[..., 1 : D + 1]
    k = torch.randn(B, S, Hk, D + 5, device=device, dtype=dtype)[..., :D]
    cos, sin = _tables(R, device)
    pos = _positions("seq_int32", B, S, device)
    for interleaved in (False, True):
        q2, k2 = fastattn.apply_rotary(q, k, cos, sin, positions=pos, interleaved=interleaved)
        _check(q2, k2, q, k, cos, sin, pos, interleaved, R)
        qi, ki = q.clone(), k.clone()  # clone keeps the strides
        fastattn.apply_rotary(qi, ki, cos, sin, positions=pos, interleaved=interleaved, inplace=True)
        assert torch.equal(qi, q2) and torch.equal(ki, k2)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_positions_and_tables(device):
    B, S, H, D = 2, 9, 2, 32
    q, k = torch.randn(B, S, H, D, device=device), torch.randn(B, S, H, D, device=device)
    cos, sin = _tables(D, device)
    pos = torch.randint(0, MAX_POS, (S, B), device=device).t()  # (B, S) with stride (1, B)
    cos_t = cos.t().contiguous().t()  # (max_pos, R/2) with a non-unit last stride
    q2, k2 = fastattn.apply_rotary(q, k, cos_t, sin, positions=pos)
    _check(q2, k2, q, k, cos, sin, pos, False, D)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    cos, sin = _tables(16, device)
    q, k = torch.randn(0, 5, 2, 16, device=device), torch.randn(0, 5, 1, 16, device=device)
    q2, k2 = fastattn.apply_rotary(q, k, cos, sin)
    assert q2.shape == q.shape and k2.shape == k.shape
    q, k = torch.randn(2, 0, 2, 16, device=device), torch.randn(2, 0, 1, 16, device=device)
    out = fastattn.apply_rotary(q, k, cos, sin, positions=torch.zeros(2, 0, dtype=torch.long, device=device),
                                inplace=True)
    assert out[0] is q and out[1] is k
    q2, k2 = fastattn.apply_rotary(q, k, cos, sin)
    assert q2.shape == (2, 0, 2, 16) and k2.shape == (2, 0, 1, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_backward(device, dtype, interleaved):
    B, S, H, Hk, D, R = 2, 17, 4, 2, 80, 64
    q = torch.randn(B, S, H, D, device=device, dtype=dtype)
    k = torch.randn(B, S, Hk, D, device=device, dtype=dtype)
    cos, sin = _tables(R, device)
    pos = _positions("batch_int64", B, S, device)
    gq, gk = torch.randn(q.shape, device=device), torch.randn(k.shape, device=device)

    def run(fn, cast, tables_cast):
        qq = q.detach().to(cast).requires_grad_()
        kk = k.detach().to(cast).requires_grad_()
        q2, k2 = fn(qq, kk, cos.to(tables_cast), sin.to(tables_cast), pos)
        ((q2.float() * gq).sum() + (k2.float() * gk).sum()).backward()
        return qq.grad, kk.grad

    ours = run(lambda a, b, c, s, p: fastattn.apply_rotary(a, b, c, s, positions=p, interleaved=interleaved),
               dtype, torch.float32)
    ref = lambda a, b, c, s, p: reference.apply_rotary(a, b, c, s, p, interleaved)  # noqa: E731
    true = run(ref, torch.float64, torch.float64)
    low = run(ref, dtype, torch.float32)
    for o, t, l, name in zip(ours, true, low, ["dq", "dk"]):
        assert o.dtype == dtype
        assert_error_ratio(o, l, t, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("used", ["q", "k"])
def test_backward_one_output_and_inverse(device, used):
    # Only one rotated output used: the other input gets no gradient at all (None, as the
    # unfused rotation gives: an optimizer then skips it rather than decaying a zero
    # gradient), the used one the exact adjoint; and rotating back by the backward op
    # recovers the input (the rotation is orthogonal).
    q = torch.randn(1, 5, 2, 32, device=device, requires_grad=True)
    k = torch.randn(1, 5, 1, 32, device=device, requires_grad=True)
    cos, sin = _tables(32, device)
    q2, k2 = fastattn.apply_rotary(q, k, cos, sin)
    out, x, other = (q2, q, k) if used == "q" else (k2, k, q)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    assert other.grad is None
    xd = x.detach().double().requires_grad_()
    (reference.apply_rotary(xd, xd, cos.double(), sin.double())[0] * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=1e-5, rtol=1e-5)
    qb, kb = torch.ops.fastattn.rotary(q2.detach(), torch.zeros_like(k), cos, sin, None, False, True)
    torch.testing.assert_close(qb, q.detach(), atol=1e-5, rtol=1e-5)


def test_backward_with_neither_gradient_defined():
    """From an outside audit: a downstream backward returning None for both rotated outputs
    (and gradcheck's check_undefined_grad, on by default) crashed the backward with an
    AttributeError; neither input gets a gradient, as with the unfused rotation."""
    class NoGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a.sum() + b.sum()

        @staticmethod
        def backward(ctx, g):
            return None, None

    q = torch.randn(1, 3, 2, 8, requires_grad=True)
    k = torch.randn(1, 3, 1, 8, requires_grad=True)
    cos, sin = _tables(8, "cpu")
    w = torch.ones((), requires_grad=True)
    (NoGrad.apply(*fastattn.apply_rotary(q, k, cos, sin)) * w).backward()
    assert q.grad is None and k.grad is None and w.grad is not None
    with warnings.catch_warnings():  # (gradcheck warns about fp32 inputs; the rotation is linear)
        warnings.simplefilter("ignore", UserWarning)
        assert torch.autograd.gradcheck(lambda a, b: fastattn.apply_rotary(a, b, cos, sin), (q, k),
                                        eps=1e-2, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_autograd(device):
    cos, sin = _tables(32, device)
    leaf_q = torch.randn(2, 5, 2, 32, device=device, requires_grad=True)
    leaf_k = torch.randn(2, 5, 1, 32, device=device, requires_grad=True)
    # A leaf that requires grad cannot be rotated in place, exactly as with any torch op.
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fastattn.apply_rotary(leaf_q, leaf_k, cos, sin, inplace=True)
    # Non-leaf tensors (e.g. a projection's output) are rotated in place with correct grads.
    q, k = leaf_q * 1.0, leaf_k * 1.0
    q2, k2 = fastattn.apply_rotary(q, k, cos, sin, inplace=True)
    assert q2 is q and k2 is k
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    ((q2 * gq).sum() + (k2 * gk).sum()).backward()
    lq, lk = leaf_q.detach().clone().requires_grad_(), leaf_k.detach().clone().requires_grad_()
    r = fastattn.apply_rotary(lq, lk, cos, sin)
    ((r[0] * gq).sum() + (r[1] * gk).sum()).backward()
    torch.testing.assert_close(leaf_q.grad, lq.grad)
    torch.testing.assert_close(leaf_k.grad, lk.grad)
    # Under no_grad the in-place kernel runs directly, even on leaves.
    with torch.no_grad():
        fastattn.apply_rotary(leaf_q, leaf_k, cos, sin, inplace=True)
    torch.testing.assert_close(leaf_q.detach(), r[0].detach())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    cos, sin = _tables(48, device)
    q = torch.randn(2, 7, 4, 64, device=device, requires_grad=True)
    k = torch.randn(2, 7, 2, 64, device=device, requires_grad=True)
    pos32 = torch.randint(0, MAX_POS, (7,), device=device, dtype=torch.int32)
    pos64 = torch.randint(0, MAX_POS, (2, 7), device=device)
    for pos in (None, pos32, pos64):
        for interleaved, conjugate in ((False, False), (True, True)):
            torch.library.opcheck(torch.ops.fastattn.rotary, (q, k, cos, sin, pos, interleaved, conjugate))
            torch.library.opcheck(
                torch.ops.fastattn.rotary_,
                (q.detach().clone(), k.detach().clone(), cos, sin, pos, interleaved, conjugate),
            )
        # the trailing check_positions argument, both ways
        for check in (True, False):
            torch.library.opcheck(torch.ops.fastattn.rotary, (q, k, cos, sin, pos, False, False, check))
            torch.library.opcheck(
                torch.ops.fastattn.rotary_, (q.detach().clone(), k.detach().clone(), cos, sin, pos, True, False, check)
            )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    cos, sin = _tables(64, device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, pos):
        q2, k2 = fastattn.apply_rotary(q, k, cos, sin, positions=pos)
        return (q2 * 2).sum() + k2.sum()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def g(q, k):
        fastattn.apply_rotary(q, k, cos, sin, interleaved=True, inplace=True)
        return q + 1, k

    q = torch.randn(2, 9, 4, 64, device=device, requires_grad=True)
    k = torch.randn(2, 9, 2, 64, device=device, requires_grad=True)
    pos = torch.randint(0, MAX_POS, (2, 9), device=device)
    out = f(q, k, pos)
    q2, k2 = fastattn.apply_rotary(q, k, cos, sin, positions=pos)
    torch.testing.assert_close(out, (q2 * 2).sum() + k2.sum())
    out.backward()
    assert q.grad is not None and k.grad is not None

    qi, ki = q.detach().clone(), k.detach().clone()
    a, b = g(qi, ki)
    rq, rk = fastattn.apply_rotary(q.detach(), k.detach(), cos, sin, interleaved=True)
    torch.testing.assert_close(a, rq + 1)
    torch.testing.assert_close(b, rk)
    torch.testing.assert_close(qi, rq)


def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    cos, sin = _tables(32, "cpu")
    f = torch.compile(lambda q, k: fastattn.apply_rotary(q * 2, k, cos, sin)[0] + 1, fullgraph=True)
    q, k = torch.randn(1, 5, 2, 32), torch.randn(1, 5, 1, 32)
    torch.testing.assert_close(f(q, k), fastattn.apply_rotary(q * 2, k, cos, sin)[0] + 1)


# ---- bad input ---------------------------------------------------------------------------
def _good(**over):
    args = dict(
        q=torch.randn(2, 5, 4, 32),
        k=torch.randn(2, 5, 2, 32),
        cos=torch.rand(16, 12),
        sin=torch.rand(16, 12),
        positions=None,
    )
    args.update(over)
    return args


BAD = [
    (dict(q=torch.randint(0, 5, (2, 5, 4, 32))), ValueError, "q must be float32, float16 or bfloat16"),
    (dict(q=torch.randn(2, 5, 32)), ValueError, r"q must have 4 dims \(B, S, heads, D\)"),
    (dict(k=torch.randn(2, 5, 2, 16)), ValueError, "k's head dim 16 must equal q's head dim 32"),
    (dict(k=torch.randn(2, 4, 2, 32)), ValueError, "k must have q's batch and sequence sizes"),
    (dict(k=torch.randn(1, 5, 2, 32)), ValueError, "k must have q's batch and sequence sizes"),
    (dict(k=torch.randn(2, 5, 2, 32).half()), ValueError, "k has dtype .* but q has dtype"),
    (dict(q=torch.randn(2, 5, 32, 4).transpose(2, 3)), ValueError, "q must have a contiguous last dimension"),
    (dict(cos=torch.rand(16, 12).double()), ValueError, "cos must be float32"),
    (dict(sin=torch.rand(16, 12).half()), ValueError, "sin must be float32"),
    (dict(cos=torch.rand(16, 12, 1)), ValueError, r"cos must have shape \(max_pos, R/2\)"),
    (dict(sin=torch.rand(16, 8)), ValueError, "sin must have cos's shape"),
    (dict(cos=torch.rand(16, 17), sin=torch.rand(16, 17)), ValueError, "rotary dim R = 2 \\* cos.shape\\[1\\] = 34 exceeds the head dim D = 32"),
    (dict(cos=torch.rand(4, 12), sin=torch.rand(4, 12)), ValueError, "positions default to arange\\(S\\) with S = 5"),
    (dict(positions=torch.arange(5).float()), ValueError, "positions must be int32 or int64"),
    (dict(positions=torch.arange(4)), ValueError, r"positions must have shape \(S,\) = \(5,\) or \(B, S\) = \(2, 5\)"),
    (dict(positions=torch.zeros(1, 5, dtype=torch.long)), ValueError, "positions must have shape"),
    (dict(positions=torch.tensor([0, 1, 2, 3, 16])), ValueError, r"positions must lie in \[0, 16\).*\[0, 16\]"),
    (dict(positions=torch.tensor([0, -1, 2, 3, 4], dtype=torch.int32)), ValueError, r"positions must lie in \[0, 16\)"),
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (dict(cos=None), TypeError, "cos must be a torch.Tensor"),
    (dict(positions=[0, 1, 2, 3, 4]), TypeError, "positions must be a torch.Tensor"),
    (dict(k=torch.randn(2, 5, 2, 32, device="meta")), ValueError, "k is on meta but q is on cpu"),
    (dict(cos=torch.rand(16, 12, device="meta")), ValueError, "cos is on meta but q is on cpu"),
]


@pytest.mark.parametrize("over, exc, match", BAD, ids=[str(i) for i in range(len(BAD))])
@pytest.mark.parametrize("inplace", [False, True], ids=["outofplace", "inplace"])
def test_bad_input(over, exc, match, inplace):
    a = _good(**over)
    with pytest.raises(exc, match=match):
        fastattn.apply_rotary(a["q"], a["k"], a["cos"], a["sin"], positions=a["positions"], inplace=inplace)


@pytest.mark.parametrize("over, exc, match", [b for b in BAD if b[1] is ValueError and "meta" not in b[2]])
def test_bad_input_direct_op(over, exc, match):
    # The C++ binding validates too, for callers of torch.ops.fastattn directly.
    a = _good(**over)
    with pytest.raises(exc, match=match):
        torch.ops.fastattn.rotary(a["q"], a["k"], a["cos"], a["sin"], a["positions"], False, False)
    with pytest.raises(exc, match=match):
        torch.ops.fastattn.rotary_(a["q"], a["k"], a["cos"], a["sin"], a["positions"], False, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True], ids=["outofplace", "inplace"])
def test_positions_out_of_range(device, inplace):
    # Checked on every device (on CUDA with one host sync, outside graph capture).
    q, k = torch.randn(2, 3, 2, 16, device=device), torch.randn(2, 3, 1, 16, device=device)
    cos, sin = _tables(16, device, max_pos=10)
    q0, k0 = q.clone(), k.clone()
    for pos in (torch.tensor([[0, 1, 2], [3, 10, 4]], device=device),
                torch.tensor([0, -1, 2], device=device, dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"positions must lie in \[0, 10\)"):
            fastattn.apply_rotary(q, k, cos, sin, positions=pos, inplace=inplace)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # rejected before the kernel ran
    pos = torch.tensor([7, 8, 9], device=device)  # up to the last row of the table
    q2, k2 = fastattn.apply_rotary(q, k, cos, sin, positions=pos, inplace=inplace)
    _check(q2, k2, q0, k0, cos, sin, pos, False, 16)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_positions_check_reads_only_the_view_cpu(dtype):
    # The CPU check reads the positions' own elements: a (B, S) view into a wider buffer (row
    # stride != S) or an expanded row, values outside the view ignored, inside it refused.
    q, k = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 1, 16)
    cos, sin = _tables(16, "cpu", max_pos=10)
    wide = torch.tensor([[1, 2, 3, 99], [4, 5, 6, -7]], dtype=dtype)
    view = wide[:, :3]
    q2, k2 = fastattn.apply_rotary(q, k, cos, sin, positions=view)
    _check(q2, k2, q, k, cos, sin, view, False, 16)
    expanded = torch.tensor([2, 9, 0], dtype=dtype).expand(2, 3)
    q2, k2 = fastattn.apply_rotary(q, k, cos, sin, positions=expanded)
    _check(q2, k2, q, k, cos, sin, expanded, False, 16)
    for bad, lo, hi in ((wide[:, 1:], -7, 99), (torch.tensor([2, 10, 0], dtype=dtype).expand(2, 3), 0, 10),
                        (wide[1:, :3] - 5, -1, 1)):
        with pytest.raises(ValueError, match=rf"positions must lie in \[0, 10\).*\[{lo}, {hi}\]"):
            fastattn.apply_rotary(q, k, cos, sin, positions=bad.expand(2, 3))


@pytest.mark.parametrize("inplace", [False, True], ids=["outofplace", "inplace"])
def test_check_positions_flag_cpu(inplace):
    # check_positions=False skips the check's host sync on CUDA only: on the CPU the check
    # costs no sync and still runs, so a bad position stays a clear error there.
    q, k = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 1, 16)
    cos, sin = _tables(16, "cpu", max_pos=10)
    bad = torch.tensor([[0, 1, 2], [3, 10, 4]])
    for check in (True, False):
        with pytest.raises(ValueError, match=r"positions must lie in \[0, 10\)"):
            fastattn.apply_rotary(q, k, cos, sin, positions=bad, inplace=inplace, check_positions=check)
        with pytest.raises(ValueError, match=r"positions must lie in \[0, 10\)"):
            torch.ops.fastattn.rotary(q, k, cos, sin, bad, False, False, check)
    # good positions: the same result either way
    pos = torch.tensor([[7, 8, 9], [0, 5, 9]])
    r_true = fastattn.apply_rotary(q.clone(), k.clone(), cos, sin, positions=pos, inplace=inplace)
    r_false = fastattn.apply_rotary(q.clone(), k.clone(), cos, sin, positions=pos, inplace=inplace,
                                    check_positions=False)
    assert torch.equal(r_true[0], r_false[0]) and torch.equal(r_true[1], r_false[1])
    _check(r_false[0], r_false[1], q, k, cos, sin, pos, False, 16)
    for bad_flag in (1, None, "yes"):
        with pytest.raises(TypeError, match="check_positions must be a bool"):
            fastattn.apply_rotary(q, k, cos, sin, positions=pos, check_positions=bad_flag)


def test_backward_does_not_recheck_positions():
    # The backward rotates with the same positions the forward checked: check_positions=False.
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.fastattn.rotary.default:
                seen.append((args[6], args[7] if len(args) > 7 else kwargs.get("check_positions", True)))
            return func(*args, **(kwargs or {}))

    cos, sin = _tables(16, "cpu", max_pos=10)
    q = torch.randn(1, 3, 2, 16, requires_grad=True)
    k = torch.randn(1, 3, 1, 16, requires_grad=True)
    with Record():
        q2, k2 = fastattn.apply_rotary(q, k, cos, sin, positions=torch.tensor([1, 4, 9]))
        (q2.sum() + k2.sum()).backward()
    assert seen == [(False, True), (True, False)]  # (conjugate, check_positions): forward, backward


def test_inplace_overlap_rejected():
    cos, sin = torch.rand(8, 4), torch.rand(8, 4)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="q and k overlap in memory"):
        fastattn.apply_rotary(q, q[:, :, :1], cos, sin, inplace=True)
    with pytest.raises(ValueError, match="q has elements sharing memory"):
        fastattn.apply_rotary(torch.randn(1, 4, 1, 8).expand(1, 4, 2, 8), torch.randn(1, 4, 1, 8), cos, sin,
                              inplace=True)


def test_direct_inplace_op_autograd_guard():
    # The raw in-place op refuses to run where autograd would need it, and bumps versions
    # so a tensor saved for another op's backward is reported when rotated in place.
    cos, sin = torch.rand(8, 4), torch.rand(8, 4)
    q = torch.randn(1, 4, 2, 8, requires_grad=True) * 1.0
    k = torch.randn(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match="rotary_ \\(in place\\) is not differentiable"):
        torch.ops.fastattn.rotary_(q, k, cos, sin, None, False, False)
    x = torch.randn(1, 4, 2, 8)
    w = torch.randn(8, 8, requires_grad=True)
    y = (x @ w).sum()
    v = (x._version, k._version)
    torch.ops.fastattn.rotary_(x, k, cos, sin, None, False, False)
    assert x._version == v[0] + 1 and k._version == v[1] + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


# ---- issue 13: in-place rotation of q and k that share memory ------------------------------
def _overlapping_views(requires_grad=False):
    # Heads 2..3 of q are heads 0..1 of k: the same elements, reached through strided views
    # (at::get_overlap_status cannot decide those).
    buf = torch.randn(1, 4, 6, 8)
    if requires_grad:
        buf = buf.requires_grad_() * 1.0
    return buf, buf[:, :, 0:4], buf[:, :, 2:6]


@pytest.mark.parametrize("how", ["functional", "op", "functional_grad"])
def test_inplace_shared_elements_refused(how):
    cos, sin = torch.rand(8, 4), torch.rand(8, 4)
    buf, q, k = _overlapping_views(requires_grad=how == "functional_grad")
    before = buf.detach().clone()
    with pytest.raises(ValueError, match="q and k overlap in memory"):
        if how == "op":
            torch.ops.fastattn.rotary_(q, k, cos, sin, None, False, False)
        else:
            fastattn.apply_rotary(q, k, cos, sin, inplace=True)
    assert torch.equal(buf.detach(), before)  # nothing rotated (let alone twice)
    # Out of place they are just two inputs.
    q2, k2 = fastattn.apply_rotary(q, k, cos, sin)
    rq, rk = reference.apply_rotary(q.detach(), k.detach(), cos, sin, None, False)
    torch.testing.assert_close(q2, rq)
    torch.testing.assert_close(k2, rk)


@pytest.mark.parametrize("layout", ["heads", "qkv_axis", "row_padded"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_inplace_packed_qkv_layouts(layout, grad):
    # Disjoint q and k interleaved in one buffer (their byte ranges intersect): rotated in
    # place, exactly as out of place; in the grad path the gradients match too.
    B, S, H, Hk, D = 2, 5, 4, 2, 16
    if layout == "heads":  # (B, S, H + 2 Hk, D), the usual fused projection
        base = torch.randn(B, S, H + 2 * Hk, D)
        views = lambda t: (t[:, :, :H], t[:, :, H : H + Hk])  # noqa: E731
    elif layout == "qkv_axis":  # (B, S, 3, H, D) with H == Hk
        base = torch.randn(B, S, 3, H, D)
        views = lambda t: (t[:, :, 0], t[:, :, 1, :Hk])  # noqa: E731
    else:  # q and k share rows with padding between heads and an odd head stride
        base = torch.randn(B, S, H + Hk, D + 3)
        views = lambda t: (t[:, :, :H, 1 : D + 1], t[:, :, H:, 2 : D + 2])  # noqa: E731
    cos, sin = _tables(12, "cpu")
    pos = _positions("batch_int64", B, S, "cpu")
    leaf = base.clone().requires_grad_(grad)
    q0, k0 = views(leaf)
    q_out, k_out = fastattn.apply_rotary(q0, k0, cos, sin, positions=pos)
    buf = leaf * 1.0 if grad else leaf.detach().clone()
    q, k = views(buf)
    q2, k2 = fastattn.apply_rotary(q, k, cos, sin, positions=pos, inplace=True)
    assert q2 is q and k2 is k
    assert torch.equal(q, q_out) and torch.equal(k, k_out)
    if grad:
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        ((q * gq).sum() + (k * gk).sum()).backward()
        g_inplace = leaf.grad.clone()
        leaf.grad = None
        ((q_out * gq).sum() + (k_out * gk).sum()).backward()
        torch.testing.assert_close(g_inplace, leaf.grad)


def test_inplace_internal_and_table_overlap_refused():
    cos, sin = torch.rand(8, 4), torch.rand(8, 4)
    k = torch.randn(1, 4, 1, 8)
    # Rows 4 elements apart but 8 wide: each row shares half its elements with the next.
    q = torch.randn(64).as_strided((1, 4, 1, 8), (32, 4, 8, 1))
    with pytest.raises(ValueError, match="q has elements sharing memory"):
        torch.ops.fastattn.rotary_(q, k, cos, sin, None, False, False)
    with pytest.raises(ValueError, match="q has elements sharing memory"):
        fastattn.apply_rotary(q, k, cos, sin, inplace=True)
    # q written while the kernel reads the cos table from the same memory.
    buf = torch.rand(64)
    with pytest.raises(ValueError, match="q and cos overlap in memory"):
        fastattn.apply_rotary(buf.view(1, 4, 2, 8), k, buf[:32].view(8, 4), sin, inplace=True)
    zeros = torch.zeros(32)  # positions 0 read from the memory that k's rotation writes
    with pytest.raises(ValueError, match="k and positions overlap in memory"):
        fastattn.apply_rotary(torch.randn(1, 4, 2, 8), zeros.view(1, 4, 1, 8), cos, sin,
                              positions=zeros[:4].view(torch.int32), inplace=True)


def test_overlap_decision_is_exact_on_random_views():
    # q and k as random strided views (last dim contiguous) of one buffer, against a
    # brute-force comparison of their element addresses: the in-place op refuses exactly
    # the pairs that share an element, and the Python check of the autograd path agrees.
    from fastattn.functional import _elements_overlap, _internal_overlap

    gen = torch.Generator().manual_seed(13)

    def rnd(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def view(buf, B, S, D):
        H = rnd(1, 3)
        strides = (rnd(0, 40), rnd(0, 24), rnd(D, 12), 1)
        size = (B, S, H, D)
        span = sum(st * (n - 1) for st, n in zip(strides, size)) + 1
        return buf.as_strided(size, strides, rnd(0, buf.numel() - span))

    def addresses(t):
        idx = torch.arange(N).as_strided(t.shape, t.stride(), t.storage_offset())
        return set(idx.flatten().tolist())

    cos, sin = torch.rand(8, 2), torch.rand(8, 2)
    seen = {True: 0, False: 0}
    N = 200
    for _ in range(600):
        buf = torch.randn(N)
        B, S, D = rnd(1, 2), rnd(1, 3), rnd(4, 6)
        q, k = view(buf, B, S, D), view(buf, B, S, D)
        if _internal_overlap(q) is not False or _internal_overlap(k) is not False:
            continue
        shared = bool(addresses(q) & addresses(k))
        assert _elements_overlap(q, k) is shared and _elements_overlap(k, q) is shared
        seen[shared] += 1
        if shared:
            with pytest.raises(ValueError, match="q and k overlap in memory;"):
                torch.ops.fastattn.rotary_(q, k, cos, sin, None, False, False)
        else:
            expect = fastattn.apply_rotary(q, k, cos, sin)
            torch.ops.fastattn.rotary_(q, k, cos, sin, None, False, False)
            assert torch.equal(q, expect[0]) and torch.equal(k, expect[1])
    assert min(seen.values()) > 20, seen


@pytest.mark.parametrize("inplace", [False, True])
def test_rotated_k_requires_grad_only_with_k(inplace):
    # Only q requires grad: k_rot must not (the tables get no gradient), as torch's formula
    # gives; else append_kv(k_rot) in grad mode refused it and an in-place k joined the graph.
    cos, sin = torch.randn(16, 4), torch.randn(16, 4)
    q = torch.randn(1, 3, 2, 8, requires_grad=True)
    k = torch.randn(1, 3, 2, 8)
    if inplace:
        q2 = q * 1
        fastattn.apply_rotary(q2, k, cos, sin, inplace=True)
        assert q2.requires_grad and not k.requires_grad and k.grad_fn is None
        return
    q_rot, k_rot = fastattn.apply_rotary(q, k, cos, sin)
    assert q_rot.requires_grad and not k_rot.requires_grad
    kc, vc = torch.zeros(1, 8, 2, 8), torch.zeros(1, 8, 2, 8)
    fastattn.append_kv(kc, vc, k_rot, torch.randn(1, 3, 2, 8), torch.tensor([0], dtype=torch.int32))
    torch.testing.assert_close(kc[:, :3], k_rot)
    # and the other way round: only k
    q_rot, k_rot = fastattn.apply_rotary(q.detach(), k.requires_grad_(), cos, sin)
    assert k_rot.requires_grad and not q_rot.requires_grad
    k_rot.sum().backward()
    assert k.grad is not None and q.grad is None


def test_inference_mode_tables_train_later():
    # cos / sin tables made under torch.inference_mode (e.g. by a generation step) used by a
    # training step afterwards: saved as copies (autograd cannot save an inference tensor).
    with torch.inference_mode():
        cos, sin = torch.randn(16, 4), torch.randn(16, 4)
    q = torch.randn(1, 3, 2, 8, requires_grad=True)
    q_rot, _ = fastattn.apply_rotary(q, torch.randn(1, 3, 2, 8), cos, sin)
    q_rot.square().sum().backward()
    qq = q.detach().clone().requires_grad_()
    reference.apply_rotary(qq, torch.randn(1, 3, 2, 8), cos.clone(), sin.clone())[0].square().sum().backward()
    torch.testing.assert_close(q.grad, qq.grad)


def test_inplace_inference_tensor_refused_before_any_write():
    # q made under torch.inference_mode(), rotated in place outside it: refused (as torch
    # refuses in-place updates of inference tensors) before anything is written.
    with torch.inference_mode():
        q = torch.randn(1, 3, 2, 8)
    k, q0 = torch.randn(1, 3, 1, 8), q.clone()
    cos, sin = _tables(8, "cpu")
    with pytest.raises(RuntimeError, match=r"apply_rotary\(inplace=True\): q is an inference tensor"):
        fastattn.apply_rotary(q, k, cos, sin, inplace=True)
    assert torch.equal(q, q0)
