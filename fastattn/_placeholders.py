"""TEMPORARY stand-ins for public ops that have not merged yet (delete once they have).

Each function has exactly the DESIGN.md section 2 signature of the real op and computes it
with ``fastattn.reference`` (plain torch, differentiable through autograd). ``__init__``
installs a name only when the real op is missing, so the kernels win automatically as soon
as their branches merge; the model and integrations only ever call ``fastattn.<name>``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference

__all__ = ["apply_rotary", "flash_attention", "decode_attention", "append_kv"]


def apply_rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    positions: Optional[Tensor] = None,
    interleaved: bool = False,
    inplace: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Placeholder for ``fastattn.apply_rotary``: q (B, S, H, D), k (B, S, Hk, D),
    cos/sin (max_pos, R/2) fp32, positions (B, S) or (S,). Returns (q2, k2)."""
    q2, k2 = reference.apply_rotary(q, k, cos, sin, positions=positions, interleaved=interleaved)
    if inplace:
        with torch.no_grad():
            q.copy_(q2)
            k.copy_(k2)
        return q, k
    return q2, k2


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    return_lse: bool = False,
):
    """Placeholder for ``fastattn.flash_attention``: q (B, Sq, H, D), k/v (B, Sk, Hk, D),
    bottom-right causal. Returns out (B, Sq, H, D) [, lse (B, H, Sq) fp32]."""
    return reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window=window,
                               return_lse=return_lse)


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    softmax_scale: Optional[float] = None,
    num_splits: int = 0,
    return_lse: bool = False,
):
    """Placeholder for ``fastattn.decode_attention``: q (B, H, D) or (B, 1, H, D), caches
    (B, S_max, Hk, D), cache_seqlens (B,) int32. ``num_splits`` is ignored here."""
    return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=softmax_scale,
                                      return_lse=return_lse)


def append_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor):
    """Placeholder for ``fastattn.append_kv``: writes k, v (B, Sn, Hk, D) into the caches at
    rows [cache_seqlens[b], + Sn), in place."""
    return reference.append_kv(k_cache, v_cache, k, v, cache_seqlens)
