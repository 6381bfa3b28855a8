"""RoPE on q and k: fastattn vs the Hugging Face LLaMA eager implementation (rotate_half with
cos/sin gathered per position) vs torch.compile of it, in GB/s and % of copy bandwidth.

Bytes are those actually moved: read q and k, write the rotated q and k (in place: the same
count, read + write), plus the per-token cos/sin rows each implementation reads.
"""
import pytest
import torch

import fastattn

from fastattn.benchmarks.plugin import DEVICE, TINY

if TINY:
    SHAPES = [(1, 64, 4, 2, 32)]
    DTYPES = [torch.float32]
    MODES = ["outofplace", "inplace"]
    IMPLS = ["fastattn", "hf_eager"]
elif DEVICE == "cuda":
    # 16k tokens, 32 query / 8 kv heads, D = 128.
    SHAPES = [(4, 4096, 32, 8, 128)]
    DTYPES = [torch.bfloat16]
    MODES = ["outofplace", "inplace"]
    IMPLS = ["fastattn", "hf_eager", "compile(hf_eager)"]
else:
    # The acceptance shape: B1 S4096 H32 Hk8 D128.
    SHAPES = [(1, 4096, 32, 8, 128)]
    DTYPES = [torch.float32, torch.bfloat16]
    MODES = ["outofplace", "inplace"]
    IMPLS = ["fastattn", "hf_eager", "compile(hf_eager)"]

MAX_POS = 128 if TINY else 8192


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_eager(q, k, cos_full, sin_full, positions):
    """What HF LLaMA does per layer, in our (B, S, heads, D) layout: gather the full-width
    cos/sin rows of each position, cast to q's dtype, then q*cos + rotate_half(q)*sin."""
    cos = cos_full[positions].unsqueeze(2).to(q.dtype)
    sin = sin_full[positions].unsqueeze(2).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


_compiled = {}


def _hf_compiled():
    if "hf" not in _compiled:
        _compiled["hf"] = torch.compile(hf_eager)
    return _compiled["hf"]


def _tables(d):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=DEVICE) / d))
    freqs = torch.outer(torch.arange(MAX_POS, dtype=torch.float32, device=DEVICE), inv_freq)
    return freqs.cos(), freqs.sin()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_S{}_H{}_Hk{}_D{}".format(*s))
def test_rotary(bench, impl, mode, dtype, shape):
    B, S, H, Hk, D = shape
    if impl != "fastattn" and mode == "inplace":
        # HF rotates out of place; its in-place variant would be the same computation plus a
        # copy, so only the out-of-place form is the peer.
        pytest.skip("hf_eager is out of place only")
    q = torch.randn(B, S, H, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, S, Hk, D, device=DEVICE, dtype=dtype)
    cos, sin = _tables(D)
    positions = torch.arange(S, device=DEVICE).expand(B, S)
    qk_bytes = q.nbytes + k.nbytes
    if impl == "fastattn":
        inplace = mode == "inplace"
        # What the model and the HF integration run; the default check_positions=True adds one host sync per call.
        fn = lambda: fastattn.apply_rotary(q, k, cos, sin, positions=positions, inplace=inplace,  # noqa: E731
                                           check_positions=False)
        table_bytes = 2 * B * S * (D // 2) * 4
    else:
        cos_full, sin_full = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        f = hf_eager if impl == "hf_eager" else _hf_compiled()
        fn = lambda: f(q, k, cos_full, sin_full, positions)  # noqa: E731
        table_bytes = 2 * B * S * D * 4
    # Working set (distinct bytes touched): q, k, their outputs (none in place) and the tables.
    working_set = (qk_bytes if mode == "inplace" else 2 * qk_bytes) + table_bytes
    bench(fn, op="rotary_" + mode, impl=impl, shape="B{}xS{}xH{}xHk{}xD{}".format(*shape), dtype=dtype,
          bytes=2 * qk_bytes + table_bytes, working_set=working_set)
