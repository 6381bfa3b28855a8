"""The argument checks' fast paths (functional._qkv_ok, _rotary_args_ok, _rms_norm_plain,
_check_window's and _validate's shortcuts) accept nothing the full checks refuse and change
no result: every call below gives the same value or the same error with the fast paths on
and forced off. CPU only."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import fastattn
from fastattn import _validate, functional


def _outcome(fn):
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the error itself is what is compared
        return ("raise", type(e), str(e))
    if isinstance(out, tuple):
        return ("ok", tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in out))
    return ("ok", out.clone() if isinstance(out, torch.Tensor) else out)


def _same(a, b):
    if a[0] != b[0]:
        return False
    if a[0] == "raise":
        return a[1:] == b[1:]
    x, y = a[1], b[1]
    if isinstance(x, tuple):
        return len(x) == len(y) and all(_same(("ok", u), ("ok", w)) for u, w in zip(x, y))
    if isinstance(x, torch.Tensor):
        return (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and x.device == y.device
                and (x.is_meta or torch.equal(x, y) or bool(((x == y) | (x.isnan() & y.isnan())).all())))
    return x == y and type(x) is type(y)


def _compare(monkeypatch, fn, fast_names):
    fast = _outcome(fn)
    with monkeypatch.context() as m:
        for name in fast_names:
            m.setattr(functional, name, lambda *a, **k: False)
        slow = _outcome(fn)
    assert _same(fast, slow), (fast, slow)
    return fast


def _t(shape, dtype=torch.float32, last_stride_2=False, device="cpu"):
    if last_stride_2 and len(shape) and shape[-1] > 0:
        base = torch.randn(*shape[:-1], 2 * shape[-1], device=device).to(dtype) if dtype.is_floating_point else \
            torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
        return base[..., ::2]
    if dtype.is_floating_point:
        return torch.randn(tuple(shape), device=device).to(dtype)
    return torch.zeros(tuple(shape), dtype=dtype, device=device)


QKV_CASES = [
    # (q shape, k shape, v shape, dtype q, dtype k, strided) for flash_attention
    ((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8), torch.float32, torch.float32, None),
    ((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8), torch.bfloat16, torch.bfloat16, None),
    ((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8), torch.float16, torch.float16, "q"),
    ((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8), torch.float32, torch.float32, "k"),
    ((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8), torch.float32, torch.float32, "v"),
    ((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8), torch.float32, torch.bfloat16, None),
    ((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8), torch.float64, torch.float64, None),
    ((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8), torch.int32, torch.int32, None),
    ((2, 5, 4, 8), (3, 7, 2, 8), (3, 7, 2, 8), torch.float32, torch.float32, None),
    ((2, 5, 4, 8), (2, 7, 3, 8), (2, 7, 3, 8), torch.float32, torch.float32, None),
    ((2, 5, 4, 8), (2, 7, 2, 6), (2, 7, 2, 6), torch.float32, torch.float32, None),
    ((2, 5, 4, 8), (2, 7, 2, 8), (2, 6, 2, 8), torch.float32, torch.float32, None),
    ((2, 5, 4, 8), (2, 7, 0, 8), (2, 7, 0, 8), torch.float32, torch.float32, None),
    ((2, 5, 4, 1), (2, 7, 2, 1), (2, 7, 2, 1), torch.float32, torch.float32, "k"),
    ((2, 5, 4, 0), (2, 7, 2, 0), (2, 7, 2, 0), torch.float32, torch.float32, None),
    ((2, 5, 4, 513), (2, 3, 2, 513), (2, 3, 2, 513), torch.float32, torch.float32, None),
    ((2, 5, 4, 512), (2, 3, 2, 512), (2, 3, 2, 512), torch.float32, torch.float32, None),
    ((5, 4, 8), (7, 2, 8), (7, 2, 8), torch.float32, torch.float32, None),
    ((2, 5, 4, 8), (2, 7, 8), (2, 7, 8), torch.float32, torch.float32, None),
    ((0, 5, 4, 8), (0, 7, 2, 8), (0, 7, 2, 8), torch.float32, torch.float32, None),
    ((2, 0, 4, 8), (2, 0, 2, 8), (2, 0, 2, 8), torch.float32, torch.float32, None),
    ((2, 1, 4, 8), (2, 9, 2, 8), (2, 9, 2, 8), torch.float32, torch.float32, None),  # short-query route
]


@pytest.mark.parametrize("case", range(len(QKV_CASES)))
def test_flash_attention_fast_checks(case, monkeypatch):
    qs, ks, vs, qd, kd, strided = QKV_CASES[case]
    q, k, v = _t(qs, qd, strided == "q"), _t(ks, kd, strided == "k"), _t(vs, kd, strided == "v")
    for window, scale, cap in [((-1, -1), None, 0.0), ((2, 0), 0.3, 5.0), ([1, 1], 1, 0), ((np.int64(3), -1), -0.5, 0.0),
                               ((-2, 0), 0.3, 0.0), ((True, 0), 0.3, 0.0), ((0, 2**63), float("nan"), 0.0),
                               ((-1, -1), 0.3, -1.0), ((-1, -1), 1e39, 0.0), ((-1, -1), 0.3, float("inf"))]:
        _compare(monkeypatch, lambda: fastattn.flash_attention(q, k, v, window=window, softmax_scale=scale,
                                                               softcap=cap), ["_qkv_ok"])


def test_flash_attention_fast_checks_other_types(monkeypatch):
    q = torch.randn(1, 3, 2, 8)
    for bad in (None, q.numpy(), [1.0]):
        _compare(monkeypatch, lambda: fastattn.flash_attention(bad, q, q), ["_qkv_ok"])
        _compare(monkeypatch, lambda: fastattn.flash_attention(q, bad, q), ["_qkv_ok"])
    meta = torch.empty(1, 3, 2, 8, device="meta")  # (the fake impl's shapes)
    assert _compare(monkeypatch, lambda: fastattn.flash_attention(meta, meta, meta), ["_qkv_ok"])[0] == "ok"


def test_varlen_fast_checks(monkeypatch):
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    for qs, ks, dt, strided in [((7, 4, 8), (7, 2, 8), torch.float32, False), ((7, 4, 8), (7, 3, 8), torch.float32, False),
                                ((7, 4, 8), (7, 2, 8), torch.bfloat16, True), ((7, 4, 8), (7, 2, 8, 1), torch.float32, False)]:
        q, k = _t(qs, dt, strided), _t(ks, dt)
        _compare(monkeypatch, lambda: fastattn.flash_attention_varlen(q, k, k, cu, cu, 4, 4, causal=True), ["_qkv_ok"])


ROTARY_CASES = list(itertools.product(
    [(2, 5, 4, 16), (2, 5, 4, 15), (2, 5, 4, 1), (2, 5, 16)],  # q shape
    ["same", "batch", "seq", "dim"],  # k differs in
    [torch.float32, torch.bfloat16, torch.float64],
    [(16, 8), (16, 4), (4, 8), (16, 9), (16, 0), (16,)],  # cos shape
    ["none", "arange", "batch", "int16", "bad_shape"],  # positions
))


@pytest.mark.parametrize("case", range(0, len(ROTARY_CASES), 7))
def test_apply_rotary_fast_checks(case, monkeypatch):
    qs, kdiff, dt, cs, pos = ROTARY_CASES[case]
    q = _t(qs, dt)
    ks = list(qs)
    if len(ks) == 4:
        ks[2] = 2
        if kdiff == "batch":
            ks[0] += 1
        elif kdiff == "seq":
            ks[1] += 1
        elif kdiff == "dim":
            ks[3] += 2
    k = _t(tuple(ks), dt)
    cos, sin = torch.rand(*cs), torch.rand(*cs)
    S, B = qs[1], qs[0]
    positions = {"none": None, "arange": torch.arange(S), "batch": torch.arange(S).repeat(B, 1) % 4,
                 "int16": torch.arange(S, dtype=torch.int16), "bad_shape": torch.arange(S + 1)}[pos]
    _compare(monkeypatch, lambda: fastattn.apply_rotary(q, k, cos, sin, positions=positions), ["_rotary_args_ok"])


def test_apply_rotary_fast_checks_strides_and_tables(monkeypatch):
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    cos, sin = torch.rand(8, 8), torch.rand(8, 8)
    for args in [(q[..., ::2], k[..., ::2], cos[:, :4], sin[:, :4]), (q, k[..., ::2], cos, sin),
                 (q, k, cos.double(), sin), (q, k, cos, sin.half()), (q, k, cos, sin[:, :4]), (q, k, cos[:4], sin[:4]),
                 (q, k, cos, torch.rand(8, 8, device="meta")), (q, k, None, sin), (q, k, cos, sin.t())]:
        _compare(monkeypatch, lambda: fastattn.apply_rotary(*args), ["_rotary_args_ok"])


RMS_X = [((6, 32), torch.float32), ((2, 3, 32), torch.bfloat16), ((6, 32), torch.float16), ((6, 32), torch.float64),
         ((32,), torch.float32), ((), torch.float32), ((6, 32), torch.int64), ((6, 0), torch.float32)]
RMS_W = ["none", "same", "fp32", "bf16", "shape", "2d", "int"]
RMS_R = ["none", "same", "fp32", "shape", "int", "strided"]
RMS_EPS = [1e-6, None, 1, np.float32(1e-5), torch.tensor(1e-5), -1.0, float("nan"), "x"]


@pytest.mark.parametrize("xi", range(len(RMS_X)))
def test_rms_norm_fast_path(xi, monkeypatch):
    shape, dt = RMS_X[xi]
    x = _t(shape, dt)
    n = shape[-1] if shape else 1
    for wk, rk, eps in itertools.product(RMS_W, RMS_R, RMS_EPS[:4]):
        weight = {"none": None, "same": _t((n,), dt) if dt.is_floating_point else torch.ones(n, dtype=dt),
                  "fp32": torch.rand(n), "bf16": torch.rand(n).bfloat16(), "shape": torch.rand(n + 1),
                  "2d": torch.rand(1, n), "int": torch.ones(n, dtype=torch.int32)}[wk]
        residual = {"none": None, "same": _t(shape, dt), "fp32": _t(shape, torch.float32),
                    "shape": _t((1, *shape), dt), "int": torch.ones(shape, dtype=torch.int32),
                    "strided": _t(shape, dt, last_stride_2=True) if shape else None}[rk]
        _compare(monkeypatch, lambda: fastattn.rms_norm(x, weight, eps, residual=residual), ["_rms_norm_plain"])
    for eps in RMS_EPS[4:]:
        _compare(monkeypatch, lambda: fastattn.rms_norm(x, None, eps), ["_rms_norm_plain"])


def test_rms_norm_fast_path_strided_and_nested(monkeypatch):
    x, w = torch.randn(4, 64)[:, ::2], torch.rand(32)
    _compare(monkeypatch, lambda: fastattn.rms_norm(x, w, 1e-6), ["_rms_norm_plain"])
    nested, w = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)], layout=torch.jagged), torch.rand(8)
    fast = fastattn.rms_norm(nested, w, 1e-6)
    monkeypatch.setattr(functional, "_rms_norm_plain", lambda *a: False)
    slow = fastattn.rms_norm(nested, w, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(fast.unbind(), slow.unbind()))


@pytest.mark.parametrize("value", [0.5, -0.0, 0.0, 3.4028234663852886e38, 3.5e38, -3.5e38, float("nan"), float("inf"),
                                   -float("inf"), 1, True, np.float32(2.0), np.float64(float("nan")), "1.0", None,
                                   torch.tensor(0.5)])
def test_scale_and_softcap_shortcuts(value, monkeypatch):
    """check_softmax_scale / check_softcap with their float shortcut vs a float subclass (which
    skips the shortcut and takes the full checks)."""
    class F(float):
        pass

    def both(check):
        fast = _outcome(lambda: check(value))
        slow = _outcome(lambda: check(F(value)) if type(value) is float else check(value))
        if fast[0] == "ok" and slow[0] == "ok":
            assert fast[1] == slow[1] and type(fast[1]) is type(slow[1]) or (fast[1] != fast[1] and slow[1] != slow[1])
        else:
            assert fast[:2] == slow[:2], (fast, slow)

    both(_validate.check_softmax_scale)
    both(_validate.check_softcap)


@pytest.mark.parametrize("window", [(-1, -1), (0, 0), (5, -1), (-2, 3), (2**63 - 1, 0), (2**63, 0), (2**64, 2**64),
                                    (True, 0), (1.0, 2), (np.int32(3), 4), [3, 4], (3,), (1, 2, 3), "ab", None])
def test_window_shortcut(window):
    class I(int):
        pass

    slow_window = tuple(I(w) if type(w) is int else w for w in window) if isinstance(window, tuple) else window
    fast, slow = _outcome(lambda: functional._check_window(window)), _outcome(lambda: functional._check_window(slow_window))
    assert fast[:2] == slow[:2] if fast[0] == "raise" else fast == slow, (fast, slow)


def test_cuda_build_arch_rule():
    # Which GPUs a CUDA build has code for (the drop-ins / HF integration / model hand the rest
    # to torch): sm_XY code runs on the same major from minor Y on, "a" archs only on themselves,
    # the default build's compute_80 PTX on anything from sm_80 on, nothing below sm_80.
    from fastattn.functional import _build_runs_on

    default = "8.0;9.0a"
    assert _build_runs_on((8, 0), default) and _build_runs_on((8, 6), default) and _build_runs_on((8, 9), default)
    assert _build_runs_on((9, 0), default) and _build_runs_on((12, 0), default)  # (12.0: the PTX)
    assert not _build_runs_on((7, 5), default) and not _build_runs_on((7, 0), default)
    assert _build_runs_on((9, 0), "9.0a") and not _build_runs_on((8, 0), "9.0a")
    assert not _build_runs_on((10, 0), "9.0a") and not _build_runs_on((8, 9), "9.0a")
    assert _build_runs_on((8, 9), "8.6") and not _build_runs_on((8, 0), "8.6")
    assert _build_runs_on((8, 6), "") and not _build_runs_on((7, 5), "")
