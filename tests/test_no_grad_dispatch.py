"""Ops called with grad mode off go below the Autograd dispatch key (fastattn.ops._call): the
same results, outputs that do not require grad, torch's own modes (dispatch modes, fake
tensors, autocast, inference mode, torch.compile) still seeing the ops. CPU only."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn import ops
from fastattn.models import rope_tables


def _calls():
    """name -> fn(requires_grad) calling one public function whose op goes through _call."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    x, res, w = r(5, 24), r(5, 24), r(24)
    q, k, v = r(2, 7, 4, 16), r(2, 7, 2, 16), r(2, 7, 2, 16)
    qv, kv, vv = r(9, 4, 16), r(9, 2, 16), r(9, 2, 16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    kc, vc = r(2, 12, 2, 16), r(2, 12, 2, 16)
    lens = torch.tensor([5, 12], dtype=torch.int32)
    cos, sin = rope_tables(16, 16)

    def grad(*ts, on):
        return [t.detach().requires_grad_(on) for t in ts]

    return {
        "rms_norm": lambda on: fastattn.rms_norm(*grad(x, w, on=on), 1e-6),
        "rms_norm_residual": lambda on: fastattn.rms_norm(*grad(x, w, on=on), 1e-6, residual=grad(res, on=on)[0])[0],
        "apply_rotary": lambda on: fastattn.apply_rotary(*grad(q, k, on=on), cos, sin)[0],
        "flash_attention": lambda on: fastattn.flash_attention(*grad(q, k, v, on=on), causal=True),
        "flash_attention_short_query": lambda on: fastattn.flash_attention(
            *grad(q[:, :1], k, v, on=on)),
        "flash_attention_varlen": lambda on: fastattn.flash_attention_varlen(
            *grad(qv, kv, vv, on=on), cu, cu, 5, 5, causal=True),
        "decode_attention": lambda on: fastattn.decode_attention(*grad(q[:, 0], on=on), kc, vc, lens),
        "attention_with_kvcache": lambda on: fastattn.attention_with_kvcache(
            *grad(q[:, :2], on=on), kc, vc, lens, causal=True),
    }


CALLS = list(_calls())


class _Spy:
    """Counts entries into ops._below_autograd (the grad-off path of ops._call)."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = ops._below_autograd
        spy = self

        class Counted:
            def __enter__(self):
                spy.count += 1
                self.inner = real()
                return self.inner.__enter__()

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

        monkeypatch.setattr(ops, "_below_autograd", Counted)


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_grad_off_same_bits_and_below_autograd(name, mode, monkeypatch):
    fn = _calls()[name]
    expected = fn(False).detach()  # grad mode on, nothing requires grad (below Autograd too, next test)
    spy = _Spy(monkeypatch)
    with (torch.no_grad() if mode == "no_grad" else torch.inference_mode()):
        out = fn(True)  # inputs that require grad: nothing is recorded with grad mode off
    assert spy.count >= 1, "grad mode off: the op must be called below the Autograd key"
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", CALLS)
def test_grad_on_nothing_requiring_grad_goes_below_autograd(name, monkeypatch):
    """Grad mode on and no argument requiring grad (an eval loop without no_grad): the
    register_autograd kernel would record nothing and redispatch below Autograd itself; _call
    goes there directly (~18 us less per call, outside speed audit). Same bits as through the
    Autograd kernel, outputs that do not require grad."""
    fn = _calls()[name]
    monkeypatch.setattr(ops, "_any_requires_grad", lambda *args: True)  # through the Autograd kernel
    spy = _Spy(monkeypatch)
    expected = fn(False)
    assert spy.count == 0
    monkeypatch.setattr(ops, "_any_requires_grad", torch._C._any_requires_grad)
    out = fn(False)
    assert spy.count >= 1, "nothing requires grad: the op must be called below the Autograd key"
    assert not out.requires_grad and out.grad_fn is None and not expected.requires_grad
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", CALLS)
def test_grad_on_keeps_autograd(name, monkeypatch):
    spy = _Spy(monkeypatch)
    out = _calls()[name](True)
    assert spy.count == 0
    if name in ("decode_attention", "attention_with_kvcache"):
        return  # inference-only: outputs marked non-differentiable
    assert out.requires_grad and out.grad_fn is not None
    out.sum().backward()


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", CALLS)
def test_grad_off_dispatch_modes_see_the_op(name):
    fn = _calls()[name]
    with torch.no_grad(), _Recorder() as rec:
        fn(False)
    assert any(s.startswith("fastattn.") for s in rec.seen), rec.seen


def test_grad_off_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.no_grad(), FakeTensorMode() as mode:
        q, k, v = (mode.from_tensor(torch.randn(2, 5, 4, 16)) for _ in range(3))
        out = fastattn.flash_attention(q, k, v, causal=True)
    assert out.shape == (2, 5, 4, 16) and type(out).__name__ == "FakeTensor"


def test_grad_off_autocast_as_with_grad():
    x, w = torch.randn(6, 32), torch.rand(32) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_grad = fastattn.rms_norm(x, w, 1e-6)
        with torch.no_grad():
            without = fastattn.rms_norm(x, w, 1e-6)
    assert without.dtype == with_grad.dtype and torch.equal(without, with_grad)


def test_grad_off_compile_fullgraph():
    q, k, v = (torch.randn(1, 9, 2, 16) for _ in range(3))
    f = torch.compile(lambda q, k, v: fastattn.flash_attention(q, k, v, causal=True), fullgraph=True,
                      backend="aot_eager")
    with torch.no_grad():
        out = f(q, k, v)
    assert torch.equal(out, fastattn.flash_attention(q, k, v, causal=True))
