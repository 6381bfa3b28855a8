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
    # (batch, context, H, Hk): batch 1 over growing contexts, batch 64 x 4k; GQA 32/8 and MQA.
    SHAPES = [(1, 4096, 32, 8), (1, 16384, 32, 8), (1, 65536, 32, 8), (1, 131072, 32, 8),
              (64, 4096, 32, 8), (1, 65536, 32, 1), (64, 4096, 32, 1)]
    DTYPES = [torch.bfloat16]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                     "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    IMPLS = ["fastattn"] + [f"sdpa-{name}" for name in SDPA_BACKENDS] + ["reference"]
else:
    SHAPES = [(4, 8192, 32, 8)]  # the acceptance shape
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
        pytest.skip(f"{impl}: {str(e).splitlines()[0][:120]}")
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
