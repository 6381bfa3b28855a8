"""Benchmark plumbing shared by every suite: a pytest plugin (pytest-benchmark underneath),
loaded with ``-p fastattn.benchmarks.plugin`` by ``python -m fastattn bench``.

Each benchmark calls the `bench` fixture once:

    bench(fn, op="rms_norm", impl="fastattn", shape="32768x4096", dtype=torch.bfloat16,
          bytes=2 * x.nbytes)          # memory-bound ops: bytes actually read + written
    bench(fn, ..., flops=4 * b * s * s * h * d)   # compute-bound ops

It times `fn` (CUDA: after warm-up, each round a batch of back-to-back calls between one
CUDA event pair, divided by the batch size; CPU: wall clock of each call with the machine's
threads), records every raw timing, and attaches to the pytest-benchmark entry
the achieved GB/s or TFLOP/s. Memory-bound entries also record their working set (the
distinct bytes they touch; `working_set=` where that differs from `bytes`, as for an
in-place op) and, only where that working set is larger than the last-level cache, the %
of the copy bandwidth measured in this same run (itself on a working set several times the
last-level cache); a smaller working set is marked `in_cache` instead, since its GB/s is a
cache bandwidth, not a fraction of DRAM/HBM bandwidth. Compute-bound entries (`flops=`)
record their TFLOP/s and its % of the dense GEMM rate (torch.mm on large square matrices)
measured in this same run ("% GEMM": fp32 rows against the fp32 GEMM, bf16 / fp16 rows
against the faster of their dtype's GEMM and fp32's, meta.gemm_roof_tflops), the compute roof
an attention kernel is read against.
`times=` hands in timings the suite measured itself (interleaved with the peers, as the
end-to-end suite does).

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

_SESSION = {"copy": None, "gemm": None, "meta": None, "results": {}}


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


def gemm_size() -> int:
    """n of the n x n x n GEMM reference: large enough to run at the BLAS's peak rate."""
    return 256 if TINY else 4096 if DEVICE == "cuda" else 2048


def _measure_gemm():
    """The dense matrix-multiply rate of this device, measured now (torch.mm on n x n
    matrices, 2 n^3 FLOP), per dtype an attention kernel may run in: the compute roof that
    attention's TFLOP/s is read against ("% GEMM")."""
    n = gemm_size()
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if DEVICE == "cuda" else [])
    out = {"n": n, "flops": 2 * n**3}
    for dtype in dtypes:
        a = torch.randn(n, n, device=DEVICE).to(dtype)
        b = torch.randn(n, n, device=DEVICE).to(dtype)
        c = torch.empty(n, n, device=DEVICE, dtype=dtype)
        times = time_fn(lambda: torch.mm(a, b, out=c))
        name = str(dtype).replace("torch.", "")
        out[name] = {"times_s": times, "tflops": out["flops"] / statistics.median(times) / 1e12}
    return out


def gemm_fields(flops: int, median_s: float, dtype, gemm) -> dict:
    """TFLOP/s of a compute-bound entry and its % of the same run's GEMM rate
    (meta.gemm_roof_tflops: fp16/bf16 against the faster of that dtype's GEMM and fp32's,
    anything else against fp32)."""
    out = {"flops": flops, "tflops": flops / median_s / 1e12}
    roof = meta.gemm_roof_tflops(gemm, str(dtype).replace("torch.", ""))
    if roof:
        out["pct_of_gemm"] = 100.0 * out["tflops"] / roof
    return out


@pytest.fixture(scope="session")
def gemm_rate():
    if _SESSION["gemm"] is None:
        _SESSION["gemm"] = _measure_gemm()
    return _SESSION["gemm"]


@pytest.fixture(scope="session")
def copy_bandwidth():
    if _SESSION["copy"] is None:
        _SESSION["copy"] = _measure_copy()
    return _SESSION["copy"]


@pytest.fixture
def bench(request, benchmark, copy_bandwidth):
    def run(fn, *, op, impl, shape, dtype, bytes=None, flops=None, working_set=None, times=None, **extra):
        """times: per-round seconds measured by the caller (interleaved with its peers, as the
        end-to-end suite does); pytest-benchmark then times fn once more, one round (its entry
        is what puts the row into the JSON)."""
        pedantic = dict(rounds=max(2 if TINY else 3, ROUNDS // 2), warmup_rounds=1)
        if times is None:
            times = time_fn(fn)
        else:
            pedantic = dict(rounds=1, warmup_rounds=0)
        # Also hand the callable to pytest-benchmark, so its own statistics and raw data are
        # in the JSON; on CUDA each call is synchronised for that wall-clock view.
        target = (lambda: (fn(), torch.cuda.synchronize())) if DEVICE == "cuda" else fn
        benchmark.pedantic(target, iterations=1, **pedantic)
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
            info.update(gemm_fields(flops, med, dtype, request.getfixturevalue("gemm_rate")))
        info.update(extra)
        if "tokens" in extra:
            info["tokens_per_s"] = extra["tokens"] / med
        benchmark.extra_info.update(info)
        _SESSION["results"][request.node.nodeid] = info
        return info

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Everything needed to trust a results file: device, versions, commit and dirty flag,
    CPU model/flags/threads/LLC and the CPU kernels' ISA tier, GPU, date, and the copy
    bandwidth and GEMM rates the percentages refer to (with their raw timings)."""
    block = dict(run_meta())
    block["copy_bandwidth"] = _SESSION["copy"]
    block["gemm"] = _SESSION["gemm"]
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
                                    "pct_of_copy", "pct_of_gemm", "in_cache") if k in info}
    _EVENTS.send(event="end", nodeid=nodeid, outcome=_EVENTS.outcome.get(nodeid, "passed"),
                 message=_EVENTS.message.get(nodeid, ""),
                 seconds=time.perf_counter() - _EVENTS.t0.get(nodeid, time.perf_counter()), result=summary)
