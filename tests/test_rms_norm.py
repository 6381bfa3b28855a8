"""fastattn.rms_norm (and the fused residual form) against fastattn.reference.rms_norm."""
import pytest
import torch

import fastattn
from fastattn import reference

from conftest import ALL_DTYPES, DEVICES, assert_error_ratio

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
    x = torch.randn(4, 16, device=device, dtype=torch.bfloat16)
    y = fastattn.rms_norm(x, None, None)
    ref = torch.nn.functional.rms_norm(x.float(), (16,), None, torch.finfo(torch.bfloat16).eps)
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=1e-2)


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


def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    f = torch.compile(lambda x, w: fastattn.rms_norm(x, w) * 3, fullgraph=True)
    x, w = torch.randn(8, 32), torch.rand(32)
    torch.testing.assert_close(f(x, w), fastattn.rms_norm(x, w) * 3)


# ---- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(4, 8), torch.randn(7), None), ValueError, r"weight must have shape \(8,\)"),
        (lambda: (torch.randn(4, 8), torch.randn(8, 1), None), ValueError, "weight must have shape"),
        (lambda: (torch.randint(0, 5, (4, 8)), None, None), ValueError, "x must be float32, float16 or bfloat16"),
        (lambda: (torch.randn(4, 8), torch.randn(8, dtype=torch.float64), None), ValueError, "weight has dtype"),
        (lambda: (torch.randn(4, 8), None, torch.randn(4, 9)), ValueError, "residual must have x's shape"),
        (lambda: (torch.randn(4, 8), None, torch.randn(4, 8).half()), ValueError, "residual has dtype"),
        (lambda: (torch.randn(8, 4).t(), None, None), ValueError, "x must have a contiguous last dimension"),
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
    with pytest.raises(ValueError, match="eps must be >= 0"):
        torch.ops.fastattn.rms_norm_fwd(torch.randn(2, 8), None, -1.0)
