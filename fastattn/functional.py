"""The public fastattn functions: validation, defaults and docs with shapes.

Each function checks its arguments (clear ``ValueError``/``TypeError`` naming the argument),
then calls one op from ``fastattn.ops``. All math accumulates in fp32; outputs have the
input dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from ._validate import check_float, check_last_dim_contiguous, check_same_device, check_same_dtype, check_tensor

# Each op section appends its public names, so sections can be edited independently.
__all__ = []


# ---- rms_norm ----------------------------------------------------------------------------
__all__ += ["rms_norm"]


def rms_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = 1e-6,
    *,
    residual: Optional[Tensor] = None,
):
    """RMSNorm over the last dimension, matching ``torch.nn.functional.rms_norm``.

    ``y = x / sqrt(mean(x**2, -1) + eps) * weight``

    Args:
        x: (..., N) float32/float16/bfloat16, last dim contiguous; other strides are free.
        weight: (N,) with x's dtype, or None.
        eps: added to the mean square; None means ``torch.finfo(x.dtype).eps``.
        residual: optional tensor of x's shape. Then ``h = x + residual`` is computed and
            normalised in the same pass, and ``(y, h)`` is returned (the pre-norm residual
            stream of a transformer block).

    Returns:
        y (x's shape and dtype), or ``(y, h)`` when ``residual`` is given.

    Differentiable in x, weight and residual.
    """
    check_float(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension, got a 0-dim tensor")
    check_last_dim_contiguous(x, "x")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if weight is not None:
        check_tensor(weight, "weight")
        check_same_device(weight, x, "weight", "x")
        check_same_dtype(weight, x, "weight", "x")
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(
                f"weight must have shape ({x.shape[-1]},) to match x's last dimension, got {tuple(weight.shape)}"
            )
    if residual is None:
        y, _rstd = ops.rms_norm_fwd(x, weight, eps)
        return y
    check_tensor(residual, "residual")
    check_same_device(residual, x, "residual", "x")
    check_same_dtype(residual, x, "residual", "x")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_last_dim_contiguous(residual, "residual")
    y, h, _rstd = ops.rms_norm_add_fwd(x, residual, weight, eps)
    return y, h


# ---- rotary ------------------------------------------------------------------------------

# ---- flash attention ---------------------------------------------------------------------

# ---- decode attention and append_kv ------------------------------------------------------
__all__ += ["decode_attention", "append_kv"]


def _check_cache_seqlens(cache_seqlens, ref: Tensor, batch: int) -> None:
    check_tensor(cache_seqlens, "cache_seqlens")
    if cache_seqlens.dtype != torch.int32:
        raise ValueError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if cache_seqlens.device != ref.device:
        raise ValueError(
            f"cache_seqlens is on {cache_seqlens.device} but must be on {ref.device} with the caches"
        )
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != batch:
        raise ValueError(
            f"cache_seqlens must have shape ({batch},) (one length per sequence), got {tuple(cache_seqlens.shape)}"
        )


def _check_caches(k_cache, v_cache) -> None:
    check_float(k_cache, "k_cache")
    check_tensor(v_cache, "v_cache")
    check_same_device(v_cache, k_cache, "v_cache", "k_cache")
    check_same_dtype(v_cache, k_cache, "v_cache", "k_cache")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be 4-D (B, S_max, Hk, D), got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    check_last_dim_contiguous(k_cache, "k_cache")
    check_last_dim_contiguous(v_cache, "v_cache")


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
    """Attention of one new query token per sequence over a KV cache (the decode step).

    ``out[b, h] = softmax(softmax_scale * q[b, h] . k_cache[b, :L_b, h // G]) v_cache[b, :L_b, h // G]``
    with ``G = H // Hk`` and ``L_b = cache_seqlens[b]`` (ragged batches).

    Args:
        q: (B, H, D) or (B, 1, H, D); float32/float16/bfloat16 on the CPU, float16/bfloat16
            on CUDA. Last dim contiguous.
        k_cache, v_cache: (B, S_max, Hk, D), q's dtype, ``H % Hk == 0`` (GQA/MQA, query head
            h reads kv head ``h // (H // Hk)``). Last dim contiguous; other strides are free
            (e.g. a view of a larger cache). CUDA: D in {64, 128, 256}; CPU: any D.
        cache_seqlens: (B,) int32 on q's device; sequence b attends to cache rows
            ``[0, cache_seqlens[b])``. A sequence of length 0 gets out = 0 and lse = -inf.
            Values must lie in [0, S_max]: checked on the CPU; on CUDA they are not read on
            the host (that would synchronise) and are clamped to [0, S_max] by the kernel.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        num_splits: split-KV factor (each sequence's keys are cut into this many chunks,
            merged exactly). 0 picks it from the shapes (and the SM count on CUDA) only,
            never from the values of cache_seqlens: no host synchronisation, so a decode
            step can be captured in a CUDA graph.
        return_lse: also return lse (B, H) float32, the natural-log sum of exp(scores).

    Returns:
        out with q's shape and dtype, or ``(out, lse)`` with return_lse.

    Not differentiable (an inference op): the outputs never require grad. Accumulation is fp32.
    """
    check_float(q, "q", cuda_16bit_only=True)
    _check_caches(k_cache, v_cache)
    check_same_device(k_cache, q, "k_cache", "q")
    check_same_dtype(k_cache, q, "k_cache", "q")
    if not (q.dim() == 3 or (q.dim() == 4 and q.shape[1] == 1)):
        raise ValueError(f"q must be (B, H, D) or (B, 1, H, D), got shape {tuple(q.shape)}")
    check_last_dim_contiguous(q, "q")
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    Hk = k_cache.shape[2]
    if k_cache.shape[0] != B:
        raise ValueError(f"k_cache has batch {k_cache.shape[0]} but q has batch {B}")
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache has head dim {k_cache.shape[3]} but q has head dim {D}")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the number of kv heads ({Hk})")
    _check_cache_seqlens(cache_seqlens, q, B)
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    out, lse = ops.decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale, num_splits)
    return (out, lse) if return_lse else out


def append_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor) -> None:
    """Write new keys/values into the caches in place: ``k_cache[b, cache_seqlens[b] + i] = k[b, i]``.

    Args:
        k_cache, v_cache: (B, S_max, Hk, D), modified in place; last dim contiguous, other
            strides free.
        k, v: (B, Sn, Hk, D) with the caches' dtype and device.
        cache_seqlens: (B,) int32 on the caches' device: the current valid length of each
            sequence, i.e. where its new rows go. It is NOT advanced: the caller does
            ``cache_seqlens += Sn`` after the call (so several layers can append with the
            same lengths before one update).

    Raises ValueError when a write would land past the capacity (``cache_seqlens[b] + Sn >
    S_max``) or at a negative row. On CUDA that check reads cache_seqlens on the host (one
    synchronisation) and is skipped while a CUDA graph is being captured; then the kernel
    silently drops out-of-range rows instead (memory is never written out of bounds).
    """
    _check_caches(k_cache, v_cache)
    for t, name in ((k, "k"), (v, "v")):
        check_tensor(t, name)
        check_same_device(t, k_cache, name, "k_cache")
        check_same_dtype(t, k_cache, name, "k_cache")
    B, _, Hk, D = k_cache.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[2] != Hk or k.shape[3] != D:
        raise ValueError(f"k must be (B, Sn, Hk, D) = ({B}, Sn, {Hk}, {D}) to match k_cache, got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    check_last_dim_contiguous(k, "k")
    check_last_dim_contiguous(v, "v")
    _check_cache_seqlens(cache_seqlens, k_cache, B)
    ops.append_kv(k_cache, v_cache, k, v, cache_seqlens)
