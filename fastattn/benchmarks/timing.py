"""One timing loop for the benchmark suites and the CLI demo (torch only, no pytest).

CUDA: a pair of events around each call, read after the call's end event has completed, so
the launch queue never hides a call's time. CPU: wall clock around each call."""
from __future__ import annotations

import time

import torch


def time_calls(fn, device: str, rounds: int, warmup: int = 1) -> list:
    """Seconds per call of fn, one entry per round, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times
