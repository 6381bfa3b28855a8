"""Memory that must stay bounded in a long-running process (a server, a training loop with
varying lengths): the CPU kernels keep no per-shape state."""
import ctypes
import gc
import sys

import pytest
import torch

import fastattn


def _rss_mib() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status, glibc malloc_trim")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_forward_memory_does_not_grow_with_new_lengths(dtype):
    """From an outside audit: the CPU flash forward's fp32 block products were ATen's
    cpublas::brgemm, which JIT-compiles and keeps one kernel per (m, n, k, lda, ldb, ldc) per
    thread, never evicted; the K^T scratch's leading dimension is the key count, so every new
    Sk added ~40 KiB (400 lengths here: +14 MiB; 1,000 training steps of varying length kept
    growing). The GEMM is now fastattn's own (cpu_gemm.h): nothing kept per shape."""
    g = torch.Generator().manual_seed(0)

    def call(sk):
        q = torch.randn(1, 17, 1, 32, generator=g).to(dtype)  # 17 queries: the tiled kernel
        k = torch.randn(1, sk, 1, 32, generator=g).to(dtype)
        fastattn.flash_attention(q, k, k)

    for sk in range(100, 140):  # warm the allocator and the kernels' own scratch
        call(sk)
    before = _rss_mib()
    for sk in range(200, 600):
        call(sk)
    grown = _rss_mib() - before
    assert grown < 4.0, f"RSS grew by {grown:.1f} MiB over 400 new key lengths"
