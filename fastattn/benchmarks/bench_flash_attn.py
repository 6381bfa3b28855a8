"""FlashAttention forward: fastattn vs F.scaled_dot_product_attention with each backend, in TFLOP/s.

FLOPs are FlashAttention's convention: 4 * b * Sq * Sk * h * d, halved for causal (Sq == Sk).
CUDA shapes follow FlashAttention's benchmark: seqlen 512..16k, batch = 16k / seqlen,
heads x head dim = 2048, head dims 64 and 128, causal and not; peers are SDPA's flash,
cuDNN, memory-efficient and math backends (math only up to 4k, where it still fits). On
the CPU: the acceptance shape B1 H16 S2048 D128 causal in fp32 and bf16 plus a non-causal
one, against torch's CPU SDPA (its default, flash, kernel) and its math backend.
Each implementation gets its native layout: fastattn (B, S, H, D), SDPA (B, H, S, D).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastattn

from fastattn.benchmarks.plugin import DEVICE, TINY

if TINY:
    SHAPES = [(1, 64, 2, 32, True)]
    DTYPES = [torch.float32]
    IMPLS = ["fastattn", "sdpa"]
elif DEVICE == "cuda":
    SHAPES = [(16384 // s, s, 2048 // d, d, c) for d in (64, 128) for s in (512, 1024, 2048, 4096, 8192, 16384)
              for c in (False, True)]
    DTYPES = [torch.bfloat16]
    IMPLS = ["fastattn", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"]
else:
    SHAPES = [(1, 2048, 16, 128, True), (1, 2048, 16, 128, False)]
    DTYPES = [torch.float32, torch.bfloat16]
    IMPLS = ["fastattn", "sdpa", "sdpa-math"]

_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}


def _shape_id(s):
    b, n, h, d, causal = s
    return f"b{b}-s{n}-h{h}-d{d}-{'causal' if causal else 'full'}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_flash_attn_fwd(bench, impl, dtype, shape):
    b, s, h, d, causal = shape
    if impl == "sdpa-math" and (s > 4096 or (DEVICE == "cpu" and (not causal or dtype != torch.float32))):
        pytest.skip("the math backend materialises the scores: only measured where it is cheap")
    flops = 4 * b * s * s * h * d // (2 if causal else 1)
    if impl == "fastattn":
        q, k, v = (torch.randn(b, s, h, d, device=DEVICE, dtype=dtype) for _ in range(3))

        def fn():
            return fastattn.flash_attention(q, k, v, causal=causal)
    else:
        q, k, v = (torch.randn(b, h, s, d, device=DEVICE, dtype=dtype) for _ in range(3))
        backend = _BACKENDS.get(impl)

        def fn():
            if backend is None:  # torch's default choice (on the CPU: its flash kernel)
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        try:
            fn()
        except RuntimeError as e:  # backend not available for this device / shape / build
            pytest.skip(f"unavailable: {impl}: {str(e).splitlines()[0][:120]}")
    bench(fn, op="flash_attn_fwd" + ("+causal" if causal else ""), impl=impl,
          shape=f"{b}x{s}x{h}x{d}", dtype=dtype, flops=flops)
