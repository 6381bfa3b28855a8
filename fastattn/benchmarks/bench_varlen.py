"""Variable-length (packed) FlashAttention forward: fastattn.flash_attention_varlen against the
two things a user without it would do with a ragged batch, in TFLOP/s of the REAL work.

The batch: 8 sequences with lengths drawn uniformly from 64..2048 (fixed seed), H = 16 query
heads, Hk = 4 kv heads (GQA), D = 128, causal, fp32 and bf16 (fp16/bf16 on CUDA). FLOPs are
counted on the unpadded sequences only: sum_i 4 * L_i^2 * H * D / 2 (causal), the same count
for every implementation, so a padded run that does more work shows a lower TFLOP/s.

Peers (inputs prepared outside the timed call, which favours them: the pad/unpad copies a
real caller pays are not timed):
  fastattn-padded: the batch padded to the longest sequence, (B, Lmax, H, D), and one dense
      fastattn.flash_attention call. It does the padded work; its result is not equal to
      the varlen one (flash_attention has no key-padding mask): it is the cost of padding.
  sdpa-masked: F.scaled_dot_product_attention on the padded (B, H, Lmax, D) batch with a
      boolean (B, 1, Lmax, Lmax) mask, causal inside each sequence and hiding the padded
      keys (padded query rows see key 0 so no row is fully masked); K/V repeated to H heads
      (torch's fastest path for a masked call).
"""
import pytest
import torch
import torch.nn.functional as F

import fastattn

from fastattn.benchmarks.plugin import DEVICE, TINY

if TINY:
    BATCHES = [(2, 16, 64, 2, 1, 32)]  # (B, min len, max len, H, Hk, D)
    DTYPES = [torch.float32]
else:
    BATCHES = [(8, 64, 2048, 16, 4, 128)]
    DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]
IMPLS = ["fastattn", "fastattn-padded", "sdpa-masked"]
CAUSAL = True


def _lengths(b, lo, hi):
    g = torch.Generator().manual_seed(0)
    return torch.randint(lo, hi + 1, (b,), generator=g).tolist()


def _shape_id(s):
    b, lo, hi, h, hk, d = s
    return f"b{b}-len{lo}..{hi}-h{h}-hk{hk}-d{d}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("batch", BATCHES, ids=_shape_id)
def test_flash_attn_varlen_fwd(bench, impl, dtype, batch):
    b, lo, hi, h, hk, d = batch
    lens = _lengths(b, lo, hi)
    total, lmax = sum(lens), max(lens)
    flops = sum(4 * n * n * h * d // (2 if CAUSAL else 1) for n in lens)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    q = torch.randn(total, h, d, device=DEVICE, dtype=dtype, generator=gen)
    k = torch.randn(total, hk, d, device=DEVICE, dtype=dtype, generator=gen)
    v = torch.randn(total, hk, d, device=DEVICE, dtype=dtype, generator=gen)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)

    def padded(t):  # (total, heads, d) -> (b, lmax, heads, d), zeros after each sequence
        out = t.new_zeros(b, lmax, t.shape[1], d)
        for i, n in enumerate(lens):
            out[i, :n] = t[cu[i]:cu[i] + n]
        return out

    if impl == "fastattn":
        def fn():
            return fastattn.flash_attention_varlen(q, k, v, cu, cu, lmax, lmax, causal=CAUSAL)
    elif impl == "fastattn-padded":
        qp, kp, vp = padded(q), padded(k), padded(v)

        def fn():
            return fastattn.flash_attention(qp, kp, vp, causal=CAUSAL)
    else:
        qp = padded(q).transpose(1, 2).contiguous()
        kp = padded(k).repeat_interleave(h // hk, dim=2).transpose(1, 2).contiguous()
        vp = padded(v).repeat_interleave(h // hk, dim=2).transpose(1, 2).contiguous()
        idx = torch.arange(lmax, device=DEVICE)
        valid = idx.view(1, -1) < torch.tensor(lens, device=DEVICE).view(-1, 1)  # (b, lmax) real tokens
        mask = valid.view(b, 1, 1, lmax) & valid.view(b, 1, lmax, 1)
        if CAUSAL:
            mask = mask & (idx.view(1, -1) <= idx.view(-1, 1))
        mask[..., 0] |= ~valid.view(b, 1, lmax)  # padded query rows see key 0: no all-masked row

        def fn():
            return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)

    bench(fn, op="flash_attn_varlen_fwd" + ("+causal" if CAUSAL else ""), impl=impl,
          shape=f"{b}x({lo}..{hi})x{h}/{hk}x{d}", dtype=dtype, flops=flops, seqlens=lens, tokens_total=total,
          padded_tokens=b * lmax)
