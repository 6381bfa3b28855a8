"""fastattn.rms_norm (and the fused residual form) against fastattn.reference.rms_norm."""
import pytest
import torch

import fastattn
from fastattn import reference

from conftest import ALL_DTYPES, DEVICES, HAS_CUDA, assert_error_ratio

SIZES = [1, 111, 4097]


def _inputs(device, dtype, n, rows=(3, 7), strided=False, weight=True, residual=False):
    if strided:  # rows of a wider buffer: a row stride != n
        base = torch.randn(rows[0] * rows[1], n + 13, device=device, dtype=dtype)
        x = base[:, 5 : 5 + n]
    else:
        x = torch.randn(*rows, n, device=device, dtype=dtype)
    w = (torch.rand(n, device=device, dtype=dtype) + 0.5) if weight else None
    r = torch.randn_like(x) if residual else None
    return x, w, r


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("weight", [True, False])
def test_forward(device, dtype, n, strided, weight):
    x, w, _ = _inputs(device, dtype, n, strided=strided, weight=weight)
    y = fastattn.rms_norm(x, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    true = reference.rms_norm(x.double(), w.double() if w is not None else None, 1e-5)
    low = reference.rms_norm(x, w, 1e-5)
    assert_error_ratio(y, low, true)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("strided", [False, True])
def test_forward_residual(device, dtype, n, strided):
    x, w, r = _inputs(device, dtype, n, strided=strided, residual=True)
    y, h = fastattn.rms_norm(x, w, 1e-6, residual=r)
    # h is x + r rounded once to the input dtype: exactly what torch computes.
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    true_y, true_h = reference.rms_norm(x.double(), w.double(), 1e-6, residual=r.double())
    low_y, _ = reference.rms_norm(x, w, 1e-6, residual=r)
    assert_error_ratio(y, low_y, true_y, "y")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_forward_large_cpu(dtype, residual):
    """Outputs of >= 16 MiB take the CPU kernel's non-temporal-store path (csrc/cpu/rms_norm.cpp,
    use_streaming_stores); the other tests' outputs are far smaller."""
    x, w, r = _inputs("cpu", dtype, 4096, rows=(2, 1024), residual=residual)
    out = fastattn.rms_norm(x, w, 1e-6, residual=r)
    y, h = out if residual else (out, None)
    if residual:
        torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    src = x + r if residual else x
    true = reference.rms_norm(src.double(), w.double(), 1e-6)
    low = reference.rms_norm(src, w, 1e-6)
    assert_error_ratio(y, low, true)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", [7, 111, 4097])
@pytest.mark.parametrize("residual", [False, True])
def test_forward_rows_independent_cpu(dtype, n, residual):
    """The CPU kernel sweeps a thread's rows pipelined (the next row's sum of squares with the
    current row's scaling; csrc/cpu/rms_norm.cpp, row_pass), the chunk's first and last rows
    through the unpaired halves. A row's y, h and rstd must be the same bits whichever way it
    ran: alone, inside a chunk, on 1 or 2 threads (non-finite rows included)."""
    x, w, r = _inputs("cpu", dtype, n, rows=(1, 9), residual=residual)
    x = x[0]
    r = r[0] if residual else None
    x[3, n // 2] = float("nan")
    x[5, 0] = float("inf")

    def fwd(xx, rr):
        return fastattn.ops.rms_norm_add_fwd(xx, rr, w, 1e-6) if residual else fastattn.ops.rms_norm_fwd(xx, w, 1e-6)

    def bits(ts):
        return [t.view(torch.int32 if t.element_size() == 4 else torch.int16) for t in ts]

    prev = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(bits(fwd(x, r)))
        rows = [bits(fwd(x[i : i + 1], r[i : i + 1] if residual else None)) for i in range(x.shape[0])]
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b)
    for i, row in enumerate(rows):
        for whole, alone in zip(outs[0], row):
            assert torch.equal(whole[i : i + 1], alone), f"row {i}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_backward(device, dtype, n, weight, residual):
    x, w, r = _inputs(device, dtype, n, rows=(2, 5), weight=weight, residual=residual)
    leaves = [t for t in (x, w, r) if t is not None]

    def run(fn, cast):
        args = [t.detach().to(cast).requires_grad_() for t in leaves]
        xx, ww, rr = args[0], (args[1] if weight else None), (args[-1] if residual else None)
        out = fn(xx, ww, 1e-6, residual=rr)
        if residual:  # both outputs carry gradient, as in a transformer block
            y, h = out
            loss = (y.float() * gy).sum() + (h.float() * gh).sum()
        else:
            loss = (out.float() * gy).sum()
        loss.backward()
        return [a.grad for a in args]

    gy = torch.randn(x.shape, device=device)
    gh = torch.randn(x.shape, device=device)
    ours = run(fastattn.rms_norm, dtype)
    true = run(reference.rms_norm, torch.float64)
    low = run(reference.rms_norm, dtype)
    names = ["dx", "dweight", "dresidual"] if weight else ["dx", "dresidual"]
    for o, t, l, name in zip(ours, true, low, names):
        assert o.dtype == dtype
        # Gradients scale with rstd (up to 1/sqrt(eps) for tiny rows), so the absolute
        # slack of the rule is taken relative to the gradient's magnitude.
        assert_error_ratio(o, l, t, name, atol=1e-5 * max(1.0, t.abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("create_graph", [False, True])
def test_residual_only_h_used_weight_gets_no_gradient(device, create_graph):
    # Only h = x + residual reaches the loss: as unfused (h = x + r; rms_norm(h, w)), the
    # weight's gradient stays None (an optimizer skips it; a zero gradient would still be
    # decayed by AdamW), x and the residual get h's gradient.
    x = torch.randn(3, 16, device=device, requires_grad=True)
    r = torch.randn(3, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    gh = torch.randn(3, 16, device=device)
    _y, h = fastattn.rms_norm(x, w, 1e-6, residual=r)
    (dx, dr) = torch.autograd.grad((h * gh).sum(), (x, r), create_graph=create_graph)
    assert torch.equal(dx, gh) and torch.equal(dr, gh)
    _y, h = fastattn.rms_norm(x, w, 1e-6, residual=r)
    (h * gh).sum().backward()
    assert w.grad is None and torch.equal(x.grad, gh) and torch.equal(r.grad, gh)


@pytest.mark.parametrize("device", DEVICES)
def test_residual_h_needs_no_grad_when_only_the_weight_trains(device):
    # As unfused (h = x + r needs no gradient when neither addend does): h must not require
    # grad, and a backward from h alone raises torch's error instead of silently doing nothing.
    x, r = torch.randn(3, 16, device=device), torch.randn(3, 16, device=device)
    w = torch.randn(16, device=device, requires_grad=True)
    y, h = fastattn.rms_norm(x, w, 1e-6, residual=r)
    assert y.requires_grad and not h.requires_grad and h.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        h.sum().backward()
    (dw,) = torch.autograd.grad(y.sum(), (w,))
    (want,) = torch.autograd.grad(fastattn.rms_norm(x + r, w, 1e-6).sum(), (w,))
    assert torch.equal(dw, want)


@pytest.mark.parametrize("device", DEVICES)
def test_dweight_deterministic(device):
    x = torch.randn(257, 333, device=device)
    w = torch.rand(333, device=device, requires_grad=True)
    gy = torch.randn_like(x)
    grads = []
    for threads in (1, 2, 1):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            w.grad = None
            (fastattn.rms_norm(x, w) * gy).sum().backward()
            grads.append(w.grad.clone())
        finally:
            torch.set_num_threads(prev)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_eps_none(device):
    x = torch.randn(0, 16, device=device)
    assert fastattn.rms_norm(x).shape == (0, 16)
    for dtype in ALL_DTYPES:
        # Small rows, where the epsilon matters: torch's eps=None is the epsilon of the
        # fp32 accumulation type for 16-bit inputs too (not finfo(bfloat16).eps = 2**-7).
        x = torch.randn(4, 16, device=device, dtype=dtype) * 1e-2
        y = fastattn.rms_norm(x, None, None)
        ref = torch.nn.functional.rms_norm(x, (16,), None, None)
        torch.testing.assert_close(y, ref, atol=0, rtol={torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_rms_norm(device):
    x = torch.randn(6, 250, device=device)
    w = torch.randn(250, device=device)
    torch.testing.assert_close(fastattn.rms_norm(x, w, 1e-5), torch.nn.functional.rms_norm(x, (250,), w, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(3, 5, 40, device=device, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    r = torch.randn(3, 5, 40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastattn.rms_norm_fwd, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.fastattn.rms_norm_fwd, (x, None, 1e-6))
    torch.library.opcheck(torch.ops.fastattn.rms_norm_add_fwd, (x, r, w, 1e-6))
    y, rstd = torch.ops.fastattn.rms_norm_fwd(x.detach(), w.detach(), 1e-6)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastattn.rms_norm_bwd, (dy, x.detach(), w.detach(), rstd, None))
    torch.library.opcheck(torch.ops.fastattn.rms_norm_bwd, (dy, x.detach(), None, rstd, dy.clone()))
    # A weight of another dtype than x (converted inside; dweight stays fp32).
    xb = x.detach().bfloat16().requires_grad_()
    torch.library.opcheck(torch.ops.fastattn.rms_norm_fwd, (xb, w, 1e-6))
    torch.library.opcheck(torch.ops.fastattn.rms_norm_add_fwd, (xb, r.detach().bfloat16(), w, -1e-6))
    yb, rstdb = torch.ops.fastattn.rms_norm_fwd(xb.detach(), w.detach(), 1e-6)
    torch.library.opcheck(torch.ops.fastattn.rms_norm_bwd, (torch.randn_like(yb), xb.detach(), w.detach(), rstdb, None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual", [False, True])
def test_float64_like_torch(device, residual):
    # torch.nn.RMSNorm(dtype=torch.float64) works (gradcheck, numerics); so does ours.
    x = torch.randn(3, 20, device=device, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 20, device=device, dtype=torch.float64, requires_grad=True) if residual else None
    w = torch.rand(20, device=device, dtype=torch.float64, requires_grad=True)
    out = fastattn.rms_norm(x, w, 1e-6, residual=r)
    y = out[0] if residual else out
    assert y.dtype == torch.float64
    h = x + r if residual else x
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(h, (20,), w, 1e-6))
    assert torch.autograd.gradcheck(lambda *a: fastattn.rms_norm(a[0], a[1], 1e-6, residual=a[2] if residual else None),
                                    (x, w, r if residual else None))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(x, w, r):
        y, h = fastattn.rms_norm(x, w, 1e-6, residual=r)
        return fastattn.rms_norm(y * 2, w) + h

    x = torch.randn(4, 64, device=device, requires_grad=True)
    w = torch.rand(64, device=device, requires_grad=True)
    r = torch.randn(4, 64, device=device)
    out = block(x, w, r)
    y, h = fastattn.rms_norm(x, w, 1e-6, residual=r)
    torch.testing.assert_close(out, fastattn.rms_norm(y * 2, w) + h)
    out.sum().backward()
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_drop_in_cases(device):
    # The issue-13 inputs trace without graph breaks: strided x, mixed dtypes, eps None/< 0.
    torch._dynamo.reset()

    def block(x, w, r):
        y, h = fastattn.rms_norm(x[:, ::2], w, None, residual=r)
        return fastattn.rms_norm(y, w.bfloat16(), -1e-6) + h

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(32, device=device, requires_grad=True)
    r = torch.randn(4, 32, device=device)
    out = compiled(x, w, r)
    torch.testing.assert_close(out, block(x, w, r))
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    f = torch.compile(lambda x, w: fastattn.rms_norm(x, w) * 3, fullgraph=True)
    x, w = torch.randn(8, 32), torch.rand(32)
    torch.testing.assert_close(f(x, w), fastattn.rms_norm(x, w) * 3)


# ---- double backward (issue 13) ----------------------------------------------------------
def _second_order(fn, x, w, r, eps=1e-6):
    """d/d(x, w, r) of sum(dL/dx * v) where L = sum(y * gy) (+ sum(h * gh)): a Hessian-vector
    product, the thing create_graph=True exists for (gradient penalties, MAML...)."""
    out = fn(x, w, eps, residual=r)
    if r is not None:
        y, h = out
        loss = (y * _GY.to(y.dtype)).sum() + (h * _GH.to(h.dtype)).sum()
    else:
        loss = (out * _GY.to(out.dtype)).sum()
    leaves = [t for t in (x, w, r) if t is not None]
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    second_loss = sum((g * v.to(g.dtype)).sum() for g, v in zip(first, _V))
    second = torch.autograd.grad(second_loss, leaves, allow_unused=True)
    return [g.detach() for g in first], [torch.zeros_like(t) if g is None else g for g, t in zip(second, leaves)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_double_backward(device, dtype, weight, residual):
    global _GY, _GH, _V
    n = 48
    x, w, r = _inputs(device, dtype, n, rows=(3, 4), weight=weight, residual=residual)
    _GY = torch.randn(x.shape, device=device, dtype=torch.float64)
    _GH = torch.randn(x.shape, device=device, dtype=torch.float64)
    _V = [torch.randn(t.shape, device=device, dtype=torch.float64) for t in (x, w, r) if t is not None]

    def run(fn, cast):
        args = [t.detach().to(cast).requires_grad_() if t is not None else None for t in (x, w, r)]
        return _second_order(fn, *args)

    ours1, ours2 = run(fastattn.rms_norm, dtype)
    true1, true2 = run(reference.rms_norm, torch.float64)
    low1, low2 = run(reference.rms_norm, dtype)
    for o, t, l in zip(ours1 + ours2, true1 + true2, low1 + low2):
        assert o.dtype == dtype
        # Never silently zero: the second-order terms of RMSNorm are not.
        assert t.abs().max() > 1e-3
        assert_error_ratio(o, l, t, "grad", atol=1e-5 * max(1.0, t.abs().max().item()))


def test_double_backward_through_raw_bwd_op_raises():
    # The raw backward op has no derivative of its own: asking for one must raise, not
    # return zeros (torch's default for an op without an autograd kernel is a warning).
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.rand(8, requires_grad=True)
    _y, rstd = torch.ops.fastattn.rms_norm_fwd(x.detach(), w.detach(), 1e-6)
    dy = torch.randn(3, 8, requires_grad=True)
    dx, _dw = torch.ops.fastattn.rms_norm_bwd(dy, x, w, rstd, None)
    with pytest.raises(RuntimeError, match="rms_norm.*double backward"):
        dx.sum().backward()


def test_first_order_backward_uses_the_kernel():
    # create_graph=False (the training loop) must keep running the fused backward kernel.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 32, requires_grad=True)
    w = torch.rand(32, requires_grad=True)
    r = torch.randn(4, 32, requires_grad=True)
    for res in (None, r):
        out = fastattn.rms_norm(x, w, 1e-6, residual=res)
        loss = (out[0] + out[1]).sum() if res is not None else out.sum()
        with Record() as rec:
            loss.backward()
        assert any("fastattn.rms_norm_bwd" in o for o in rec.ops), rec.ops


# ---- mixed dtypes and autocast (issue 13) --------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", ALL_DTYPES)
@pytest.mark.parametrize("w_dtype", ALL_DTYPES + [torch.float64])
def test_mixed_weight_dtype(device, x_dtype, w_dtype):
    n = 96
    x = torch.randn(5, n, device=device, dtype=x_dtype)
    w = (torch.rand(n, device=device, dtype=torch.float64) + 0.5).to(w_dtype)
    gy = torch.randn(5, n, device=device, dtype=torch.float64)
    expected = torch.nn.functional.rms_norm(x, (n,), w, 1e-6)

    def run(fn, xd, wd):
        xx = x.detach().to(xd).requires_grad_()
        ww = w.detach().to(wd).requires_grad_()
        y = fn(xx, ww, 1e-6)
        (y.double() * gy).sum().backward()
        return y, xx.grad, ww.grad

    y, dx, dw = run(fastattn.rms_norm, x_dtype, w_dtype)
    assert y.dtype == expected.dtype == x_dtype
    assert dx.dtype == x_dtype and dw.dtype == w_dtype
    true = run(reference.rms_norm, torch.float64, torch.float64)
    # torch's own result in these dtypes is the "low precision" yardstick for y.
    assert_error_ratio(y, expected, true[0], "y")
    low = run(reference.rms_norm, x_dtype, x_dtype)
    assert_error_ratio(dx, low[1], true[1], "dx", atol=1e-5 * max(1.0, true[1].abs().max().item()))
    # The weight gradient is reduced in fp32 and cast once to the weight's own dtype: an
    # fp32 (or fp64) master weight gets an fp32-accurate gradient.
    tol = {torch.float64: 1e-5, torch.float32: 1e-5}.get(w_dtype)
    if tol is not None and x_dtype == torch.float32:
        torch.testing.assert_close(dw.double(), true[2], rtol=tol, atol=tol)
    else:  # the yardstick: plain torch autograd in these same two dtypes
        low_mixed = run(reference.rms_norm, x_dtype, w_dtype)
        assert_error_ratio(dw, low_mixed[2], true[2], "dweight", atol=1e-5 * max(1.0, true[2].abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_fp32_weight_gradient_not_rounded(device, dtype):
    # A 16-bit activation with the fp32 master weight of nn.RMSNorm(...): the weight gradient
    # must not be rounded to 16 bits on its way back (a sum over many rows would lose it).
    n = 64
    x = torch.randn(64, n, device=device, dtype=dtype)
    w = torch.rand(n, device=device, requires_grad=True)
    gy = torch.randn(64, n, device=device, dtype=dtype)
    (fastattn.rms_norm(x, w, 1e-6) * gy).sum().backward()
    xf = x.double()
    true = (gy.double() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).sum(0)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad.double(), true, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", ALL_DTYPES)
@pytest.mark.parametrize("r_dtype", ALL_DTYPES)
def test_mixed_residual_dtype(device, x_dtype, r_dtype):
    # h = x + residual follows torch's type promotion, as the unfused expression would.
    x = torch.randn(4, 40, device=device, dtype=x_dtype, requires_grad=True)
    r = torch.randn(4, 40, device=device, dtype=r_dtype, requires_grad=True)
    w = torch.rand(40, device=device, requires_grad=True)
    y, h = fastattn.rms_norm(x, w, 1e-6, residual=r)
    h_torch = x + r
    y_torch = torch.nn.functional.rms_norm(h_torch, (40,), w, 1e-6)
    assert h.dtype == h_torch.dtype and y.dtype == y_torch.dtype
    torch.testing.assert_close(h, h_torch, rtol=0, atol=0)
    torch.testing.assert_close(y, y_torch)
    (y.float().sum() + h.float().sum()).backward()
    assert x.grad.dtype == x_dtype and r.grad.dtype == r_dtype and w.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", ALL_DTYPES)
@pytest.mark.parametrize("w_dtype", ALL_DTYPES)
@pytest.mark.parametrize("ac_dtype", [torch.bfloat16, torch.float16])
def test_autocast(device, x_dtype, w_dtype, ac_dtype):
    # Under autocast the result dtype is whatever torch's own rms_norm gives on that device
    # (CPU autocast leaves rms_norm alone; CUDA autocast runs it in fp32).
    x = torch.randn(3, 64, device=device, dtype=x_dtype, requires_grad=True)
    w = torch.rand(64, device=device, dtype=w_dtype, requires_grad=True)
    with torch.autocast(device, dtype=ac_dtype):
        expected = torch.nn.functional.rms_norm(x, (64,), w, 1e-6)
        y = fastattn.rms_norm(x, w, 1e-6)
        m = torch.nn.RMSNorm(64, eps=1e-6, device=device, dtype=w_dtype)
        ours_m = fastattn.nn.RMSNorm(64, eps=1e-6, device=device, dtype=w_dtype)
        assert ours_m(x).dtype == m(x).dtype
    assert y.dtype == expected.dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[y.dtype]
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
    y.float().sum().backward()
    assert x.grad.dtype == x_dtype and w.grad.dtype == w_dtype


# ---- any strides (issue 13) ------------------------------------------------------------------
_LAYOUTS = {
    # last-dim stride 2: every other element of a wider row
    "every_other": lambda t: t.repeat_interleave(2, -1)[..., ::2],
    # column-major: last-dim stride = number of rows
    "transposed": lambda t: t.t().contiguous().t(),
    # every row the same memory (row stride 0)
    "expanded_rows": lambda t: t[:1].expand_as(t),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("strided_weight", [False, True])
def test_any_strides(device, dtype, layout, residual, strided_weight):
    n = 72
    base_x = torch.randn(n, n, device=device, dtype=dtype)
    base_r = torch.randn(n, n, device=device, dtype=dtype)
    base_w = torch.rand(2 * n, device=device, dtype=dtype) + 0.5
    gy = torch.randn(n, n, device=device, dtype=torch.float64)
    gh = torch.randn(n, n, device=device, dtype=torch.float64)

    def run(fn, cast):
        # Leaves are dense; the function sees strided views of them.
        bx = base_x.detach().to(cast).requires_grad_()
        br = base_r.detach().to(cast).requires_grad_()
        bw = base_w.detach().to(cast).requires_grad_()
        x = _LAYOUTS[layout](bx)
        rr = _LAYOUTS[layout](br) if residual else None
        ww = bw[::2] if strided_weight else bw[:n]
        if fn is fastattn.rms_norm and cast == dtype:
            assert layout == "expanded_rows" or x.stride(-1) != 1
            assert ww.stride(-1) == (2 if strided_weight else 1)
        out = fn(x, ww, 1e-6, residual=rr)
        y = out[0] if residual else out
        loss = (y.double() * gy).sum()
        if residual:
            loss = loss + (out[1].double() * gh).sum()
        loss.backward()
        return [y.detach()] + [t.grad for t in ((bx, bw, br) if residual else (bx, bw))]

    ours = run(fastattn.rms_norm, dtype)
    true = run(reference.rms_norm, torch.float64)
    low = run(reference.rms_norm, dtype)
    for o, t, l, name in zip(ours, true, low, ["y", "dx", "dweight", "dresidual"]):
        assert o.dtype == dtype
        assert_error_ratio(o, l, t, name, atol=1e-5 * max(1.0, t.abs().max().item()))


def test_any_strides_direct():
    # The cases the issue names, compared with F.rms_norm.
    F = torch.nn.functional
    x = torch.randn(6, 40)
    w = torch.rand(40)
    torch.testing.assert_close(fastattn.rms_norm(x[:, ::2], w[::2], 1e-6), F.rms_norm(x[:, ::2], (20,), w[::2], 1e-6))
    torch.testing.assert_close(fastattn.rms_norm(x.t(), None, 1e-6), F.rms_norm(x.t(), (6,), None, 1e-6))
    y, h = fastattn.rms_norm(x[:, ::2], None, 1e-6, residual=x[:, 1::2])
    torch.testing.assert_close(h, x[:, ::2] + x[:, 1::2])
    torch.testing.assert_close(y, F.rms_norm(x[:, ::2] + x[:, 1::2], (20,), None, 1e-6))


# ---- eps: anything torch takes (issue 13) -------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("eps", [-1e-6, 0, 0.0, -1.0, -1e-30, None, 1, True, 2.5, float("nan"), float("inf")])
@pytest.mark.parametrize("weight", [False, True])
def test_eps_like_torch(device, dtype, eps, weight):
    x = torch.randn(5, 24, device=device, dtype=dtype)
    x[1] = 0  # mean square 0: eps <= 0 gives inf * 0 = NaN here, as in torch
    x[2] *= 1e-3  # mean square ~1e-6: a negative eps of -1e-6 may make it negative
    w = torch.rand(24, device=device, dtype=dtype) + 0.5 if weight else None
    y = fastattn.rms_norm(x, w, eps)
    expected = torch.nn.functional.rms_norm(x, (24,), w, eps)
    assert y.dtype == expected.dtype
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol, equal_nan=True)
    # And the residual form and the module agree.
    y2, _h = fastattn.rms_norm(x, w, eps, residual=torch.zeros_like(x))
    torch.testing.assert_close(y2, y, rtol=0, atol=0, equal_nan=True)


def test_eps_negative_gradients_match_torch():
    x = torch.randn(3, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    fastattn.rms_norm(x, None, -1e-7).sum().backward()
    torch.nn.functional.rms_norm(x2, (16,), None, -1e-7).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, equal_nan=True)


# ---- every kernel path (issue 13) --------------------------------------------------------------
# rms_norm.cu picks among: a 16-byte vector path (n % (16 / elem) == 0, 16-byte aligned
# pointers and row strides) or a scalar one; the forward keeps the row in dynamic shared
# memory (n * elem bytes) when it fits, which needs the >48 KiB opt-in above 48 KiB (counting
# the kernels' 64 bytes of static scratch) and is impossible beyond the device's opt-in limit
# (then the row is re-read from global memory); the backward with a weight accumulates
# dweight in n * 4 bytes of shared memory under the same two limits, else in its global
# partial row. The sizes below straddle the 48 KiB limit for 2- and 4-byte rows (the 4-byte
# one is also where N = 12288 failed to launch) and go past every device's opt-in limit.
# A row held in registers gets the fewest warps that give each thread 2 vectors (4 scalars):
# 4104 (513 bf16/fp16 packs: 288 threads, some with 2 packs and some with 1) is the uneven split.
PATH_SIZES = [8, 4096, 4104, 8192, 12272, 12280, 12288, 24544, 24552, 24576, 65536, 131072]


def _path_inputs(device, dtype, n, rows, layout, residual):
    if layout == "contiguous":
        x = torch.randn(rows, n, device=device, dtype=dtype)
        r = torch.randn(rows, n, device=device, dtype=dtype) if residual else None
    else:  # "padded": row stride n + 16 (16-byte aligned: vector path); "misaligned": scalar path
        off = 8 if layout == "padded" else 1
        x = torch.randn(rows, n + 16, device=device, dtype=dtype)[:, off : off + n]
        r = torch.randn(rows, n + 16, device=device, dtype=dtype)[:, off : off + n] if residual else None
    return x, r


def _check_paths(device, dtype, n, rows, layout, residual, weight):
    x, r = _path_inputs(device, dtype, n, rows, layout, residual)
    w = (torch.rand(n, device=device, dtype=dtype) + 0.5) if weight else None
    gy = torch.randn(rows, n, device=device, dtype=torch.float32)
    gh = torch.randn(rows, n, device=device, dtype=torch.float32)

    def run(fn, cast):
        args = [t.detach().to(cast).requires_grad_() if t is not None else None for t in (x, w, r)]
        out = fn(args[0], args[1], 1e-6, residual=args[2])
        if residual:
            y, h = out
            loss = (y.float() * gy).sum() + (h.float() * gh).sum()
        else:
            y = out
            loss = (y.float() * gy).sum()
        loss.backward()
        return [y.detach()] + [a.grad for a in args if a is not None]

    ours = run(fastattn.rms_norm, dtype)
    true = run(reference.rms_norm, torch.float64)
    low = run(reference.rms_norm, dtype)
    names = ["y", "dx"] + (["dweight"] if weight else []) + (["dresidual"] if residual else [])
    for o, t, l, name in zip(ours, true, low, names):
        assert o.dtype == dtype
        assert_error_ratio(o, l, t, f"{name} (n={n})", atol=1e-5 * max(1.0, t.abs().max().item()))


_LAYOUTS_2D = ["contiguous", "padded", "misaligned"]


def _dev_name(dev):
    return dev if isinstance(dev, str) else dev.values[0]


def _dev_marks(dev):
    return () if isinstance(dev, str) else dev.marks


# The CPU kernel has no size thresholds: a few sizes keep the CPU suite quick; CUDA gets all.
_CPU_PATH_SIZES = [8, 4096, 12288, 131072]
_PATH_CASES = [
    pytest.param(_dev_name(dev), n, layout, id=f"{_dev_name(dev)}-{n}-{layout}", marks=_dev_marks(dev))
    for dev in DEVICES
    for n in (_CPU_PATH_SIZES if _dev_name(dev) == "cpu" else PATH_SIZES)
    for layout in _LAYOUTS_2D
]


@pytest.mark.parametrize("device, n, layout", _PATH_CASES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_kernel_paths(device, dtype, n, layout, residual):
    if device == "cuda":
        # More rows than the backward's 2 * num_SMs row blocks, so blocks accumulate
        # dweight over several rows (in shared or in global memory).
        rows = 2 * torch.cuda.get_device_properties(0).multi_processor_count + 5
    else:
        rows = 2 if n >= 4096 else 5  # the CPU kernel has no size thresholds; stay quick
    _check_paths(device, dtype, n, rows, layout, residual, weight=True)
    if layout == "contiguous" and not residual:
        _check_paths(device, dtype, n, rows, layout, residual, weight=False)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("side", ["fits", "over"])
def test_cuda_optin_limit(dtype, side):
    # The largest n whose shared-memory buffer (forward row cache in the storage type; the
    # backward's fp32 dweight) still fits the device's opt-in limit, and the next size up,
    # which must take the global-memory fallback. Both the forward and backward limits.
    props = torch.cuda.get_device_properties(0)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if not optin:
        pytest.skip("torch does not report the opt-in shared memory limit")
    static = 64  # the kernels' block_sum scratch: kMaxThreads / 32 floats
    rows = 2 * props.multi_processor_count + 5
    for elem in sorted({torch.finfo(dtype).bits // 8, 4}):
        n = (optin - static) // elem // 8 * 8  # a multiple of 8: the vector path
        if side == "over":
            n += 8
        _check_paths("cuda", dtype, n, rows, "contiguous", residual=False, weight=True)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_autocast_matches_torch():
    # Where this torch registers rms_norm in CUDA autocast's fp32 list (2.13), the result is
    # fp32; where it does not (2.11, seen on an H200), torch leaves the dtype alone: ours too.
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("aten::rms_norm", "AutocastCUDA")
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = torch.nn.functional.rms_norm(x, (256,), w, 1e-6)
        y = fastattn.rms_norm(x, w, 1e-6)
        y2, h = fastattn.rms_norm(x, w, 1e-6, residual=r)
        h_torch = x + r
        y2_torch = torch.nn.functional.rms_norm(h_torch, (256,), w, 1e-6)
    assert y.dtype == expected.dtype == (torch.float32 if registered else torch.bfloat16)
    torch.testing.assert_close(y, expected)
    assert h.dtype == h_torch.dtype and y2.dtype == y2_torch.dtype
    torch.testing.assert_close(h, h_torch, rtol=0, atol=0)
    torch.testing.assert_close(y2, y2_torch)
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


# ---- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(4, 8), torch.randn(7), None), ValueError, r"weight must have shape \(8,\)"),
        (lambda: (torch.randn(4, 8), torch.randn(8, 1), None), ValueError, "weight must have shape"),
        (lambda: (torch.randint(0, 5, (4, 8)), None, None), ValueError, "x must be float32, float16, bfloat16 or float64"),
        (lambda: (torch.randn(4, 8), None, torch.ones(4, 8, dtype=torch.complex64)), ValueError, "residual must be a floating-point"),
        (lambda: (torch.randn(4, 8), torch.arange(8), None), ValueError, "weight must be a floating-point tensor"),
        # the message names the dtype it refuses (it said "integer" for a bool or complex weight too)
        (lambda: (torch.randn(4, 8), torch.ones(8, dtype=torch.bool), None), ValueError, "does not promote torch.bool"),
        (lambda: (torch.randn(4, 8), torch.ones(8, dtype=torch.complex64), None), ValueError,
         "does not promote torch.complex64"),
        (lambda: (torch.randn(4, 8), None, torch.randn(4, 9)), ValueError, "residual must have x's shape"),
        (lambda: (torch.randn(4, 8), None, torch.ones(4, 8, dtype=torch.int32)), ValueError, "residual must be a floating-point tensor"),
        (lambda: (torch.tensor(1.0), None, None), ValueError, "at least 1 dimension"),
        (lambda: ([1.0, 2.0], None, None), TypeError, "x must be a torch.Tensor"),
        (lambda: (torch.randn(4, 8), torch.randn(8, device="meta"), None), ValueError, "weight is on meta but x is on cpu"),
    ],
)
def test_bad_input(make, exc, match):
    x, w, r = make()
    with pytest.raises(exc, match=match):
        fastattn.rms_norm(x, w, 1e-6, residual=r)


def test_bad_input_direct_op():
    # The C++ binding validates too, for callers of torch.ops.fastattn directly.
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        torch.ops.fastattn.rms_norm_fwd(torch.randn(2, 8), torch.randn(3), 1e-6)
    with pytest.raises(ValueError, match="must be float32, float16 or bfloat16"):
        torch.ops.fastattn.rms_norm_fwd(torch.randn(2, 8).double(), None, 1e-6)
    with pytest.raises(ValueError, match="x must have a contiguous last dimension"):
        torch.ops.fastattn.rms_norm_fwd(torch.randn(8, 4).t(), None, 1e-6)
    with pytest.raises(ValueError, match="weight must be a floating-point tensor"):
        torch.ops.fastattn.rms_norm_fwd(torch.randn(2, 8), torch.arange(8), 1e-6)


def test_bad_eps_type():
    # torch.nn.functional.rms_norm raises TypeError for a non-number eps; so do we, by name.
    with pytest.raises(TypeError, match="eps must be a real number"):
        fastattn.rms_norm(torch.randn(2, 8), None, "1e-6")
    with pytest.raises(TypeError, match="eps must be a real number"):
        fastattn.rms_norm(torch.randn(2, 8), None, 1e-6j)


@pytest.mark.parametrize("residual", [False, True])
def test_inference_tensor_input_with_trainable_weight(residual):
    # Frozen features made under torch.inference_mode, then a trainable norm over them: torch's
    # F.rms_norm trains (its composite never saves the input); the op saves x, which autograd
    # refuses for an inference tensor, so it is saved as a copy.
    with torch.inference_mode():
        x = torch.randn(4, 24)
        res = torch.randn(4, 24)
    w = torch.randn(24, requires_grad=True)
    ww = w.detach().clone().requires_grad_()
    if residual:
        y, h = fastattn.rms_norm(x, w, eps=1e-6, residual=res)
        (y.square().sum() + h.sum()).backward()
        want = torch.nn.functional.rms_norm(x + res, (24,), ww, 1e-6)
    else:
        fastattn.rms_norm(x, w, eps=1e-6).square().sum().backward()
        want = torch.nn.functional.rms_norm(x, (24,), ww, 1e-6)
    want.square().sum().backward()
    torch.testing.assert_close(w.grad, ww.grad, rtol=1e-5, atol=1e-5)
    m = fastattn.nn.RMSNorm(24, eps=1e-6)
    m(x).sum().backward()
    assert m.weight.grad is not None and m.weight.grad.shape == (24,)


@pytest.mark.parametrize("residual", [False, True])
def test_raw_op_rstd_is_not_differentiable(residual):
    # The backward has no term for rstd: the raw ops mark it non-differentiable (as the flash
    # op's lse) rather than let a gradient through it be dropped silently.
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    if residual:
        _y, _h, rstd = fastattn.ops.rms_norm_add_fwd(x, torch.randn(3, 16), w, 1e-6)
    else:
        _y, rstd = fastattn.ops.rms_norm_fwd(x, w, 1e-6)
    assert not rstd.requires_grad


@pytest.mark.parametrize("shape", [(2, 1 << 20), (1 << 19, 16)], ids=["long_rows", "many_rows"])
def test_fp32_error_does_not_grow_with_size_cpu(shape):
    # fp32 sums over long rows (sum of squares, the backward's dot product) and over many rows
    # (dweight) stay within 2.5x of torch's error against fp64. One fp32 chain per SIMD lane
    # over a 2^20 row gave 19x (forward) and 12x (dx); one chain per column over a 2^19-row
    # batch gave 6x (dweight).
    torch.manual_seed(0)
    rows, n = shape
    x = torch.randn(rows, n) + 1.0
    w = torch.randn(n)
    go = torch.randn(rows, n)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    want = torch.nn.functional.rms_norm(xd, (n,), wd, 1e-6)
    want_grads = torch.autograd.grad(want, (xd, wd), go.double())

    def errors(fn):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xg, wg)
        grads = torch.autograd.grad(y, (xg, wg), go)
        return [(a.double() - b).abs().max().item() for a, b in zip((y, *grads), (want, *want_grads))]

    ours = errors(lambda a, b: fastattn.rms_norm(a, b, 1e-6))
    theirs = errors(lambda a, b: torch.nn.functional.rms_norm(a, (n,), b, 1e-6))
    for name, e_ours, e_torch in zip(("y", "dx", "dweight"), ours, theirs):
        assert e_ours <= 2.5 * e_torch, f"{name}: {e_ours:.3g} vs torch {e_torch:.3g}"
