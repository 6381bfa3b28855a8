"""Decode attention over a KV cache: fastattn vs F.scaled_dot_product_attention(enable_gqa=True)
on the same cache (each SDPA backend on CUDA, the default on the CPU) vs the reference, in
GB/s of KV cache read (and % of the copy bandwidth measured in the same run)."""
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference

from fastattn.benchmarks.plugin import DEVICE, TINY

if TINY:
    SHAPES = [(2, 64, 4, 2)]
    DTYPES = [torch.float32]
    SDPA_BACKENDS = {}
    IMPLS = ["fastattn", "sdpa"]
elif DEVICE == "cuda":
    # (batch, context, H, Hk): batch 1 over growing contexts, batch 64 x 4k; GQA 32/8, MQA, and
    # multi-head (Llama-2-7B-like, 32/32) at batch 16 x 4k (1 GiB of cache).
    SHAPES = [(1, 4096, 32, 8), (1, 16384, 32, 8), (1, 65536, 32, 8), (1, 131072, 32, 8),
              (64, 4096, 32, 8), (1, 65536, 32, 1), (64, 4096, 32, 1), (16, 4096, 32, 32)]
    DTYPES = [torch.bfloat16]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                     "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    IMPLS = ["fastattn"] + [f"sdpa-{name}" for name in SDPA_BACKENDS] + ["reference"]
else:
    # the acceptance shape (GQA 32/8), and multi-head (Llama-2-7B-like, 32/32) at batch 1 x 4k
    SHAPES = [(4, 8192, 32, 8), (1, 4096, 32, 32)]
    DTYPES = [torch.float32, torch.bfloat16]
    SDPA_BACKENDS = {}
    IMPLS = ["fastattn", "sdpa", "reference"]
D = 32 if TINY else 128


def _fn(impl, q, kc, vc, seqlens):
    if impl == "fastattn":
        return lambda: fastattn.decode_attention(q, kc, vc, seqlens)
    if impl == "reference":
        return lambda: reference.decode_attention(q, kc, vc, seqlens)
    # SDPA on the same cache memory: (B, Hk, S, D) views, one query row per sequence.
    q4, k4, v4 = q.unsqueeze(2), kc.transpose(1, 2), vc.transpose(1, 2)
    if impl == "sdpa":
        return lambda: F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True)
    backend = SDPA_BACKENDS[impl.split("-", 1)[1]]

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True)

    try:
        run()
    except RuntimeError as e:  # a backend that does not take this case (layout, GQA, dtype)
        pytest.skip(f"unavailable: {impl}: {str(e).splitlines()[0][:120]}")
    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}_S{s[1]}_H{s[2]}_Hk{s[3]}")
def test_decode(bench, impl, dtype, shape):
    B, S, H, Hk = shape
    kc = torch.randn(B, S, Hk, D, device=DEVICE, dtype=dtype)
    vc = torch.randn(B, S, Hk, D, device=DEVICE, dtype=dtype)
    q = torch.randn(B, H, D, device=DEVICE, dtype=dtype)
    seqlens = torch.full((B,), S, dtype=torch.int32, device=DEVICE)  # full caches: same work for every peer
    fn = _fn(impl, q, kc, vc, seqlens)
    # Bytes that must move: the valid K and V rows (q and out are negligible).
    nbytes = kc.nbytes + vc.nbytes
    bench(fn, op="decode_attention", impl=impl, shape=f"B{B}xS{S}xH{H}/{Hk}xD{D}", dtype=dtype, bytes=nbytes)


def interleaved_vs_copy(reps=7, threads=None, shape=(4, 8192, 32, 8), dtypes=("float32", "bfloat16")):
    """CPU decode against the copy bandwidth of the same process, measured interleaved: every
    repetition times one dst.copy_(src) of 256 MiB (read + write bytes counted) and then each
    dtype's decode (K + V bytes counted), so machine noise hits both alike. Returns a list of
    lines: copy GB/s (median, min-max), then per dtype median ms, GB/s and % of copy."""
    import statistics
    import time

    from fastattn.benchmarks.meta import cpu_model

    if threads is not None:
        torch.set_num_threads(threads)
    B, S, H, Hk = shape
    src = torch.randn(64 * 1024 * 1024)
    dst = torch.empty_like(src)
    cases = {}
    for name in dtypes:
        dt = getattr(torch, name)
        g = torch.Generator().manual_seed(0)
        kc = torch.randn(B, S, Hk, 128, generator=g).to(dt)
        vc = torch.randn(B, S, Hk, 128, generator=g).to(dt)
        q = torch.randn(B, H, 128, generator=g).to(dt)
        sl = torch.full((B,), S, dtype=torch.int32)
        cases[name] = ((q, kc, vc, sl), kc.nbytes + vc.nbytes)
        fastattn.decode_attention(q, kc, vc, sl)  # warm-up
    dst.copy_(src)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    copy_t, op_t = [], {k: [] for k in cases}
    for _ in range(reps):
        copy_t.append(timed(lambda: dst.copy_(src)))
        for k, (args, _) in cases.items():
            op_t[k].append(timed(lambda: fastattn.decode_attention(*args)))
    cbw = [2 * src.nbytes / t / 1e9 for t in copy_t]
    copy_gbs = statistics.median(cbw)
    lines = [f"{cpu_model()}, {torch.get_num_threads()} threads, ISA {fastattn.cpu_isa()}, B{B} S{S} H{H}/{Hk} D128, "
             f"{reps} interleaved reps",
             f"copy_: {copy_gbs:.1f} GB/s (min {min(cbw):.1f}, max {max(cbw):.1f})"]
    for k, (_, nbytes) in cases.items():
        m = statistics.median(op_t[k])
        gbs = nbytes / m / 1e9
        lines.append(f"decode {k}: {m * 1e3:.2f} ms, {gbs:.1f} GB/s = {100 * gbs / copy_gbs:.0f}% of copy "
                     f"(best {nbytes / min(op_t[k]) / 1e9:.1f} GB/s)")
    return lines


if __name__ == "__main__":  # python -m fastattn.benchmarks.bench_decode [reps] [threads]
    import sys

    print("\n".join(interleaved_vs_copy(int(sys.argv[1]) if len(sys.argv) > 1 else 7,
                                        int(sys.argv[2]) if len(sys.argv) > 2 else None)))
