"""Benchmark plumbing shared by every suite: a pytest plugin (pytest-benchmark underneath),
loaded with ``-p fastattn.benchmarks.plugin`` by ``python -m fastattn bench``.

Each benchmark calls the `bench` fixture once:

    bench(fn, op="rms_norm", impl="fastattn", shape="32768x4096", dtype=torch.bfloat16,
          bytes=2 * x.nbytes)          # memory-bound ops: bytes actually read + written
    bench(fn, ..., flops=4 * b * s * s * h * d)   # compute-bound ops

It times `fn` (CUDA: CUDA events around each call after warm-up; CPU: wall clock with the
machine's threads), records every raw timing, and attaches to the pytest-benchmark entry
the achieved GB/s or TFLOP/s. Memory-bound entries also record their working set (the
distinct bytes they touch; `working_set=` where that differs from `bytes`, as for an
in-place op) and, only where that working set is larger than the last-level cache, the %
of the copy bandwidth measured in this same run (itself on a working set several times the
last-level cache); a smaller working set is marked `in_cache` instead, since its GB/s is a
cache bandwidth, not a fraction of DRAM/HBM bandwidth.

The plugin also reports each benchmark's start and end as JSON lines on the file descriptor
named by FASTATTN_BENCH_PROGRESS_FD (the runner draws the progress bar from them), and adds
the run's metadata (fastattn.benchmarks.meta) to the results JSON.

FASTATTN_BENCH_TINY=1 selects tiny shapes and 2 rounds: it checks the plumbing in seconds
(scripts/gpu_check.sh --dry-run, the tests); its numbers mean nothing and are marked so.

Benchmarks are benchmarks, never tests: nothing here asserts a speed.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch

import fastattn
from fastattn.benchmarks import meta
from fastattn.benchmarks.timing import time_calls

DEVICE = "cuda" if (torch.cuda.is_available() and fastattn.cuda_built()) else "cpu"
TINY = os.environ.get("FASTATTN_BENCH_TINY", "") not in ("", "0")
ROUNDS = int(os.environ.get("FASTATTN_BENCH_ROUNDS", "2" if TINY else "20" if DEVICE == "cuda" else "5"))

_SESSION = {"copy": None, "meta": None, "results": {}}


def time_fn(fn, rounds: int = ROUNDS, warmup: int = 2):
    """Seconds per call of fn, one entry per round."""
    return time_calls(fn, DEVICE, rounds, warmup)


def run_meta() -> dict:
    if _SESSION["meta"] is None:
        _SESSION["meta"] = meta.collect(DEVICE)
    return _SESSION["meta"]


def copy_working_set(llc) -> int:
    """Bytes (read + write) of the copy reference: at least 4x the last-level cache, so the
    reference is a DRAM/HBM bandwidth (256 MiB on the CPU, 512 MiB on a GPU at the least)."""
    floor = (512 << 20) if DEVICE == "cuda" else (256 << 20)
    return max(floor, 4 * (llc or 0))


def _measure_copy():
    """Copy bandwidth of this device, measured now: device-to-device copy into a
    preallocated tensor (read + write bytes) on a working set larger than the last-level
    cache, and on the CPU also `clone` (which pays for fresh pages, as every op that returns
    a new tensor does)."""
    working_set = copy_working_set(run_meta()["llc_bytes"])
    numel = working_set // 2 // 4
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    nbytes = 2 * src.nbytes
    t_copy = time_fn(lambda: dst.copy_(src))
    t_clone = time_fn(lambda: src.clone())
    return {
        "bytes": nbytes,
        "working_set_bytes": nbytes,
        "copy_times_s": t_copy,
        "clone_times_s": t_clone,
        "copy_gbps": nbytes / statistics.median(t_copy) / 1e9,
        "clone_gbps": nbytes / statistics.median(t_clone) / 1e9,
    }


def memory_fields(nbytes: int, working_set: int, median_s: float, copy_gbps, llc) -> dict:
    """GB/s of a memory-bound entry, and % of copy only for working sets beyond the LLC."""
    out = {"bytes": nbytes, "working_set_bytes": working_set, "gbps": nbytes / median_s / 1e9}
    if llc is not None and working_set <= llc:
        out["in_cache"] = True
    else:
        out["in_cache"] = False if llc is not None else None
        if copy_gbps:
            out["pct_of_copy"] = 100.0 * out["gbps"] / copy_gbps
    return out


@pytest.fixture(scope="session")
def copy_bandwidth():
    if _SESSION["copy"] is None:
        _SESSION["copy"] = _measure_copy()
    return _SESSION["copy"]


@pytest.fixture
def bench(request, benchmark, copy_bandwidth):
    def run(fn, *, op, impl, shape, dtype, bytes=None, flops=None, working_set=None, **extra):
        times = time_fn(fn)
        # Also hand the callable to pytest-benchmark, so its own statistics and raw data are
        # in the JSON; on CUDA each call is synchronised for that wall-clock view.
        target = (lambda: (fn(), torch.cuda.synchronize())) if DEVICE == "cuda" else fn
        benchmark.pedantic(target, rounds=max(2 if TINY else 3, ROUNDS // 2), iterations=1, warmup_rounds=1)
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
            info.update(memory_fields(bytes, working_set if working_set is not None else bytes, med,
                                      copy_bandwidth["copy_gbps"], run_meta()["llc_bytes"]))
        if flops is not None:
            info["flops"] = flops
            info["tflops"] = flops / med / 1e12
        info.update(extra)
        if "tokens" in extra:
            info["tokens_per_s"] = extra["tokens"] / med
        benchmark.extra_info.update(info)
        _SESSION["results"][request.node.nodeid] = info
        return info

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Everything needed to trust a results file: device, versions, commit and dirty flag,
    CPU model/flags/threads/LLC, GPU, date, and the copy bandwidth the percentages refer to
    (with its raw timings)."""
    block = dict(run_meta())
    block["copy_bandwidth"] = _SESSION["copy"]
    block["tiny"] = TINY
    block["rounds"] = ROUNDS
    output_json["fastattn"] = block


# ---- progress events for the runner (JSON lines on FASTATTN_BENCH_PROGRESS_FD) -------------
class _Events:
    def __init__(self):
        self.fp = None
        fd = os.environ.get("FASTATTN_BENCH_PROGRESS_FD")
        if fd:
            try:
                self.fp = os.fdopen(int(fd), "w", buffering=1)
            except (OSError, ValueError):
                self.fp = None
        self.outcome = {}
        self.message = {}
        self.t0 = {}

    def send(self, **event):
        if self.fp is not None:
            try:
                self.fp.write(json.dumps(event) + "\n")
            except (OSError, ValueError):
                self.fp = None


_EVENTS = _Events()


def _crash_message(report) -> str:
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    text = getattr(crash, "message", None) or str(report.longrepr or "")
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:  # a skip: (file, line, reason)
        text = str(report.longrepr[2])
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def pytest_collection_finish(session):
    _EVENTS.send(event="total", total=len(session.items))


def pytest_collectreport(report):
    if report.failed:
        _EVENTS.send(event="collect_error", nodeid=report.nodeid, message=_crash_message(report))


def pytest_runtest_logstart(nodeid, location):
    _EVENTS.t0[nodeid] = time.perf_counter()
    _EVENTS.send(event="start", nodeid=nodeid)


def pytest_runtest_logreport(report):
    nid = report.nodeid
    if report.failed:
        if _EVENTS.outcome.get(nid) != "failed":
            _EVENTS.outcome[nid] = "failed"
            _EVENTS.message[nid] = f"{report.when}: {_crash_message(report)}"
    elif report.skipped and _EVENTS.outcome.get(nid) is None:
        _EVENTS.outcome[nid] = "skipped"
        _EVENTS.message[nid] = _crash_message(report)
    elif report.when == "call" and report.passed and _EVENTS.outcome.get(nid) is None:
        _EVENTS.outcome[nid] = "passed"


def pytest_runtest_logfinish(nodeid, location):
    info = _SESSION["results"].get(nodeid) or {}
    summary = {k: info[k] for k in ("op", "impl", "shape", "dtype", "median_s", "gbps", "tflops", "tokens_per_s",
                                    "pct_of_copy", "in_cache") if k in info}
    _EVENTS.send(event="end", nodeid=nodeid, outcome=_EVENTS.outcome.get(nodeid, "passed"),
                 message=_EVENTS.message.get(nodeid, ""),
                 seconds=time.perf_counter() - _EVENTS.t0.get(nodeid, time.perf_counter()), result=summary)
