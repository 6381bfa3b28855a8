"""FlashAttention forward + backward (one training step of the attention op), in TFLOP/s.

FLOPs: forward 4 * b * Sq * Sk * h * d (halved for causal with Sq == Sk), backward counted as
2.5x the forward, so a step is 3.5x the forward's FLOPs (DESIGN.md section 6).
Peers: CUDA: SDPA's flash, cuDNN and memory-efficient backends (torch.nn.attention.sdpa_kernel);
CPU: torch's CPU SDPA (its flash-attention CPU kernel) forward + backward.
Gradients are taken with torch.autograd.grad, so no impl pays for accumulating into .grad.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastattn

from fastattn.benchmarks.plugin import DEVICE, TINY

if TINY:
    SHAPES = [(1, 64, 2, 32)]
    DTYPES = [torch.float32]
    CAUSAL = [True]
    IMPLS = ["fastattn", "sdpa"]
elif DEVICE == "cuda":
    # bf16, head dim 128, heads * d = 2048, batch * seqlen = 16k tokens.
    SHAPES = [(16384 // s, s, 16, 128) for s in (1024, 2048, 4096, 8192, 16384)]
    DTYPES = [torch.bfloat16]
    CAUSAL = [True, False]
    IMPLS = ["fastattn", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient"]
else:
    SHAPES = [(1, 2048, 16, 128)]
    DTYPES = [torch.float32, torch.bfloat16]
    CAUSAL = [True]
    IMPLS = ["fastattn", "sdpa"]

_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def _fastattn_step(causal):
    def attn(q, k, v):
        return fastattn.flash_attention(q, k, v, causal=causal)

    return attn


def _sdpa_step(causal, backend):
    def attn(q, k, v):  # q, k, v are (B, S, H, D); SDPA wants (B, H, S, D) views of them
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if backend is None:
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)

    return attn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", CAUSAL, ids=lambda c: "causal" if c else "full")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_s{}_h{}_d{}".format(*s))
def test_flash_attn_fwd_bwd(bench, impl, shape, dtype, causal):
    b, s, h, d = shape
    q, k, v = (torch.randn(b, s, h, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(b, s, h, d, device=DEVICE, dtype=dtype)
    attn = _fastattn_step(causal) if impl == "fastattn" else _sdpa_step(causal, _BACKENDS.get(impl))

    def step():
        out = attn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), dout)

    try:
        step()
    except RuntimeError as e:  # a backend that does not take this shape / dtype / GPU
        pytest.skip(f"unavailable: {impl}: {str(e).splitlines()[0][:120]}")
    fwd_flops = 4 * b * s * s * h * d // (2 if causal else 1)
    bench(step, op="flash_attn_fwd+bwd" + ("+causal" if causal else ""), impl=impl,
          shape=f"{b}x{s}x{h}x{d}", dtype=dtype, flops=int(3.5 * fwd_flops))
