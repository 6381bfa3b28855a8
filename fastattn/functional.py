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
__all__ += ["apply_rotary"]


def _check_rotary_args(q, k, cos, sin, positions) -> None:
    for t, name in ((q, "q"), (k, "k")):
        check_float(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, S, heads, D), got shape {tuple(t.shape)}")
        check_last_dim_contiguous(t, name)
    check_same_device(k, q, "k", "q")
    check_same_dtype(k, q, "k", "q")
    if k.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"k must have q's batch and sequence sizes {tuple(q.shape[:2])}, got {tuple(k.shape[:2])}"
        )
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k's head dim {k.shape[3]} must equal q's head dim {q.shape[3]}")
    for t, name in ((cos, "cos"), (sin, "sin")):
        check_tensor(t, name)
        check_same_device(t, q, name, "q")
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 (the tables are kept in fp32 whatever q's dtype), got {t.dtype}")
        if t.dim() != 2 or t.shape[1] < 1:
            raise ValueError(f"{name} must have shape (max_pos, R/2) with R the rotary dim, got {tuple(t.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim > q.shape[3]:
        raise ValueError(
            f"the rotary dim R = 2 * cos.shape[1] = {rotary_dim} exceeds the head dim D = {q.shape[3]} "
            "(the tables hold one column per rotated pair; a full-width Hugging Face table "
            "cat(freqs, freqs) is passed as its first half)"
        )
    B, S = q.shape[0], q.shape[1]
    if positions is None:
        if S > cos.shape[0]:
            raise ValueError(
                f"positions default to arange(S) with S = {S} but the cos/sin tables only have {cos.shape[0]} positions"
            )
        return
    check_tensor(positions, "positions")
    check_same_device(positions, q, "positions", "q")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32 or int64, got {positions.dtype}")
    if tuple(positions.shape) not in ((S,), (B, S)):
        raise ValueError(f"positions must have shape (S,) = ({S},) or (B, S) = ({B}, {S}), got {tuple(positions.shape)}")


def apply_rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    positions: Optional[Tensor] = None,
    interleaved: bool = False,
    inplace: bool = False,
):
    """Rotary position embedding of q and k in one fused pass.

    Args:
        q: (B, S, H, D) float32/float16/bfloat16, last dim contiguous; other strides are
            free (e.g. a view into a packed qkv projection).
        k: (B, S, Hk, D), q's dtype and device; Hk may differ from H (GQA/MQA).
        cos, sin: (max_pos, R/2) float32 tables, R = rotary dim <= D (dims R..D pass
            through unchanged), e.g. from ``fastattn.nn.RotaryEmbedding``.
        positions: (B, S) or (S,) int32/int64 position of each token, default ``arange(S)``;
            decoding at an offset is ``positions=torch.arange(off, off + S)``. Values must
            lie in [0, max_pos): always checked on the CPU; on CUDA checked with one host
            sync, except during CUDA graph capture or with
            ``FASTATTN_ROTARY_SKIP_POSITION_CHECK=1``, where a token with a bad position
            gets NaN in its rotated dims instead (the kernel never reads outside the tables).
        interleaved: False for NeoX/LLaMA (pairs ``(i, i + R/2)``), True for GPT-J (pairs
            ``(2i, 2i + 1)``).
        inplace: rotate q and k in place and return them. When autograd needs to record
            the op (grad mode on and q or k requires grad) the rotation is computed out of
            place and copied back with ``Tensor.copy_``, so autograd sees an ordinary
            in-place op: gradients are correct for non-leaf tensors, and a leaf that
            requires grad raises torch's usual in-place error.

    Returns:
        (q_rot, k_rot) with q's and k's shapes and dtype (new contiguous tensors, or q and k
        themselves when ``inplace``). Math is done in fp32.

    Differentiable in q and k (the backward is the rotation by the opposite angle); cos and
    sin are treated as constants and get no gradient.
    """
    _check_rotary_args(q, k, cos, sin, positions)
    if not inplace:
        return ops.rotary(q, k, cos, sin, positions, interleaved, False)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        q_rot, k_rot = ops.rotary(q, k, cos, sin, positions, interleaved, False)
        q.copy_(q_rot)
        k.copy_(k_rot)
        return q, k
    ops.rotary_(q, k, cos, sin, positions, interleaved, False)
    return q, k


# ---- flash attention ---------------------------------------------------------------------

# ---- decode attention and append_kv ------------------------------------------------------
