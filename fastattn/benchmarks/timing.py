"""One timing loop for the benchmark suites and the CLI demo (torch only, no pytest).

CUDA: one pair of events around a BATCH of back-to-back calls, read after the batch's end
event has completed. Events around a single call of a 60-150 us kernel also count the
host's launch overhead and the gap before the first launch (10-40% of such a kernel); with
enough calls queued between the events the GPU never waits for the host, so their time per
call is the kernel's. The batch is sized from one timed calibration call to fill
``batch_seconds`` (at least 1 call, at most ``max_batch``). CPU: wall clock around each call
(a CPU kernel runs synchronously: there is no queue to hide or expose)."""
from __future__ import annotations

import math
import time

import torch


def calls_per_batch(fn, batch_seconds: float = 2e-3, max_batch: int = 200) -> int:
    """CUDA: how many back-to-back calls of fn fill about batch_seconds (one timed call)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end) / 1e3, 1e-7)
    return int(min(max_batch, max(1, math.ceil(batch_seconds / one))))


def time_calls(fn, device: str, rounds: int, warmup: int = 1, batch_seconds: float = 2e-3) -> list:
    """Seconds per call of fn, one entry per round, after `warmup` untimed calls. On CUDA a
    round is a batch of back-to-back calls between one event pair (see the module doc)."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        batch = calls_per_batch(fn, batch_seconds)
    times = []
    for _ in range(rounds):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(batch):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / batch)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times
