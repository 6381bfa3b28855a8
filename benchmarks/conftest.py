"""Benchmark plumbing shared by every suite (pytest-benchmark).

Each benchmark calls the `bench` fixture once:

    bench(fn, op="rms_norm", impl="fastattn", shape="32768x4096", dtype=torch.bfloat16,
          bytes=2 * x.nbytes)          # memory-bound ops: bytes actually read + written
    bench(fn, ..., flops=4 * b * s * s * h * d)   # compute-bound ops

It times `fn` (CUDA: CUDA events around each call after warm-up; CPU: wall clock with the
machine's threads), records every raw timing, and attaches to the pytest-benchmark entry
the achieved GB/s (and % of the copy bandwidth measured in this same run) or TFLOP/s.
`python -m fastattn bench` / `benchmarks/run.py` turns the JSON into a table and plot.

Benchmarks are benchmarks, never tests: nothing here asserts a speed.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time

import pytest
import torch

import fastattn

DEVICE = "cuda" if (torch.cuda.is_available() and fastattn.cuda_built()) else "cpu"
ROUNDS = int(os.environ.get("FASTATTN_BENCH_ROUNDS", "20" if DEVICE == "cuda" else "5"))

_SESSION = {"copy": None}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, rounds: int = ROUNDS, warmup: int = 2):
    """Seconds per call of fn, one entry per round."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    if DEVICE == "cuda":
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _measure_copy():
    """Copy bandwidth of this device, measured now: device-to-device copy into a
    preallocated tensor (read + write bytes), and on the CPU also `clone` (which pays for
    fresh pages, as every op that returns a new tensor does)."""
    numel = (256 << 20) // 4 if DEVICE == "cuda" else (128 << 20) // 4
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    nbytes = 2 * src.nbytes
    t_copy = time_fn(lambda: dst.copy_(src))
    t_clone = time_fn(lambda: src.clone())
    return {
        "bytes": nbytes,
        "copy_times_s": t_copy,
        "clone_times_s": t_clone,
        "copy_gbps": nbytes / statistics.median(t_copy) / 1e9,
        "clone_gbps": nbytes / statistics.median(t_clone) / 1e9,
    }


@pytest.fixture(scope="session")
def copy_bandwidth():
    if _SESSION["copy"] is None:
        _SESSION["copy"] = _measure_copy()
    return _SESSION["copy"]


@pytest.fixture
def bench(benchmark, copy_bandwidth):
    def run(fn, *, op, impl, shape, dtype, bytes=None, flops=None, **extra):
        times = time_fn(fn)
        # Also hand the callable to pytest-benchmark, so its own statistics and raw data are
        # in the JSON; on CUDA each call is synchronised for that wall-clock view.
        target = (lambda: (fn(), torch.cuda.synchronize())) if DEVICE == "cuda" else fn
        benchmark.pedantic(target, rounds=max(3, ROUNDS // 2), iterations=1, warmup_rounds=1)
        med = statistics.median(times)
        info = {
            "op": op,
            "impl": impl,
            "shape": shape,
            "dtype": str(dtype).replace("torch.", ""),
            "device": DEVICE,
            "median_s": med,
            "times_s": times,
        }
        if bytes is not None:
            info["bytes"] = bytes
            info["gbps"] = bytes / med / 1e9
            info["pct_of_copy"] = 100.0 * info["gbps"] / copy_bandwidth["copy_gbps"]
        if flops is not None:
            info["flops"] = flops
            info["tflops"] = flops / med / 1e12
        info.update(extra)
        benchmark.extra_info.update(info)
        return info

    return run


def _git_commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Everything needed to trust a results file: device, versions, commit, date, and the
    copy bandwidth the percentages refer to (with its raw timings)."""
    dev = torch.cuda.get_device_name() if DEVICE == "cuda" else (platform.processor() or platform.machine())
    output_json["fastattn"] = {
        "device": DEVICE,
        "device_name": dev,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fastattn": fastattn.__version__,
        "cuda_kernels_built": fastattn.cuda_built(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth": _SESSION["copy"],
    }
