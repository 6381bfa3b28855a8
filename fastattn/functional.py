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
