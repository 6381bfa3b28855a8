"""RMSNorm: fastattn vs F.rms_norm vs torch.compile of the reference (CUDA), in GB/s."""
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference

from fastattn.benchmarks.plugin import DEVICE, TINY

if TINY:
    SHAPES = [(64, 256)]
    DTYPES = [torch.float32]
elif DEVICE == "cuda":
    SHAPES = [(32768, 4096), (32768, 8192)]
    DTYPES = [torch.bfloat16, torch.float16]
else:
    SHAPES = [(8192, 4096)]
    DTYPES = [torch.float32, torch.bfloat16]

IMPLS = ["fastattn", "F.rms_norm"] + (["compile(reference)"] if DEVICE == "cuda" and not TINY else [])

_compiled = {}


def _impl(name, residual):
    if name == "fastattn":
        return (lambda x, w, r: fastattn.rms_norm(x, w, 1e-6, residual=r)) if residual else (
            lambda x, w, r: fastattn.rms_norm(x, w, 1e-6))
    if name == "F.rms_norm":
        if residual:
            def f(x, w, r):
                h = x + r
                return F.rms_norm(h, (h.shape[-1],), w, 1e-6), h
            return f
        return lambda x, w, r: F.rms_norm(x, (x.shape[-1],), w, 1e-6)
    key = residual
    if key not in _compiled:
        _compiled[key] = torch.compile(lambda x, w, r: reference.rms_norm(x, w, 1e-6, residual=r))
    return _compiled[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(bench, impl, dtype, shape, residual):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    w = torch.rand(shape[-1], device=DEVICE, dtype=dtype) + 0.5
    r = torch.randn_like(x) if residual else None
    fn = _impl(impl, residual)
    # bytes actually moved: read x (+ r), write y (+ h); the weight is negligible.
    nbytes = x.nbytes * (4 if residual else 2)
    bench(lambda: fn(x, w, r), op="rms_norm" + ("+residual" if residual else ""), impl=impl,
          shape=f"{shape[0]}x{shape[1]}", dtype=dtype, bytes=nbytes)
