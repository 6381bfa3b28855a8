"""RMSNorm: fastattn vs F.rms_norm vs torch.compile of the reference (CUDA), in GB/s.

On the CPU every call returns fresh output tensors, and at these sizes (128 MiB per output in
fp32) the allocator hands out fresh pages each time (glibc mmaps anything over 32 MiB and
unmaps it on free), which the kernel then faults in (the OS zeroes each page first). That cost
is part of what a user pays, and F.rms_norm pays it too, but it is not the kernel's: the
fastattn rows record it as `fresh_outputs_s`, the median time of allocating the op's outputs
the way its binding does (csrc/bindings/common.h, empty_output: MADV_HUGEPAGE on large CPU
outputs) and writing them once, measured in the same run, and `fresh_outputs_share` (its
fraction of the op's median time).
"""
import ctypes
import statistics
import sys

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


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_MADV_HUGEPAGE = 14


def _fresh_output(x, libc):
    """torch.empty_like(x) advised as empty_output advises it (2 MiB-aligned inner range of an
    output of >= 8 MiB), then written once: allocation + page faults + one write."""
    t = torch.empty_like(x)
    huge = 2 << 20
    if libc is not None and t.nbytes >= 4 * huge:
        lo = (t.data_ptr() + huge - 1) & ~(huge - 1)
        hi = (t.data_ptr() + t.nbytes) & ~(huge - 1)
        if hi > lo:
            libc.madvise(lo, hi - lo, _MADV_HUGEPAGE)
    return t.fill_(0)


def _fresh_outputs_fields(x, count, op_median_s):
    from fastattn.benchmarks.plugin import time_fn

    libc = _libc()
    times = time_fn(lambda: [_fresh_output(x, libc) for _ in range(count)])
    med = statistics.median(times)
    return {"fresh_outputs_s": med, "fresh_outputs_times_s": times, "fresh_outputs_share": med / op_median_s}


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
def test_rms_norm(bench, benchmark, impl, dtype, shape, residual):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    w = torch.rand(shape[-1], device=DEVICE, dtype=dtype) + 0.5
    r = torch.randn_like(x) if residual else None
    fn = _impl(impl, residual)
    # bytes actually moved: read x (+ r), write y (+ h); the weight is negligible.
    nbytes = x.nbytes * (4 if residual else 2)
    info = bench(lambda: fn(x, w, r), op="rms_norm" + ("+residual" if residual else ""), impl=impl,
                 shape=f"{shape[0]}x{shape[1]}", dtype=dtype, bytes=nbytes)
    if impl == "fastattn" and DEVICE == "cpu":
        # y (+ h): what the op's own allocation costs, next to its time (see the module doc).
        fields = _fresh_outputs_fields(x, 2 if residual else 1, info["median_s"])
        info.update(fields)
        benchmark.extra_info.update(fields)
