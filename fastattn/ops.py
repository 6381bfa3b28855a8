"""1:1 Python wrappers of ``torch.ops.fastattn.*`` with their fake (meta) impls and autograd.

Everything torch.compile and ``torch.library.opcheck`` need lives here, next to the op it
describes: a ``register_fake`` giving output shapes/dtypes without running a kernel, and a
``register_autograd`` wiring the backward op. One section per op; the public, validated API
is in ``functional.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._C_loader import load as _load

_load()
_ops = torch.ops.fastattn


# ---- rms_norm ----------------------------------------------------------------------------
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    return _ops.rms_norm_fwd(x, weight, eps)


def rms_norm_add_fwd(
    x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    return _ops.rms_norm_add_fwd(x, residual, weight, eps)


def rms_norm_bwd(dy, x, weight, rstd, dh):
    return _ops.rms_norm_bwd(dy, x, weight, rstd, dh)


@torch.library.register_fake("fastattn::rms_norm_fwd")
def _rms_norm_fwd_fake(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("fastattn::rms_norm_add_fwd")
def _rms_norm_add_fwd_fake(x, residual, weight, eps):
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape),
        x.new_empty(x.shape[:-1], dtype=torch.float32),
    )


@torch.library.register_fake("fastattn::rms_norm_bwd")
def _rms_norm_bwd_fake(dy, x, weight, rstd, dh):
    n = x.shape[-1] if weight is not None else 0
    return x.new_empty(x.shape), x.new_empty((n,), dtype=torch.float32)


def _dweight(dw: Tensor, weight: Optional[Tensor], needed: bool):
    return dw.to(weight.dtype) if (weight is not None and needed) else None


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _ops.rms_norm_bwd(dy, x, weight, rstd, None)
    return dx, _dweight(dw, weight, ctx.needs_input_grad[1]), None


def _rms_norm_add_setup(ctx, inputs, output):
    _x, _residual, weight, _eps = inputs
    _y, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)


def _rms_norm_add_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    dx, dw = _ops.rms_norm_bwd(dy, h, weight, rstd, dh)
    # h = x + residual, so both receive the same gradient.
    return dx, dx, _dweight(dw, weight, ctx.needs_input_grad[2]), None


torch.library.register_autograd(
    "fastattn::rms_norm_fwd", _rms_norm_backward, setup_context=_rms_norm_setup
)
torch.library.register_autograd(
    "fastattn::rms_norm_add_fwd", _rms_norm_add_backward, setup_context=_rms_norm_add_setup
)

# ---- rotary ------------------------------------------------------------------------------

# ---- flash attention ---------------------------------------------------------------------

# ---- decode attention and append_kv ------------------------------------------------------
# Decode is inference-only: decode_attention's outputs are marked non-differentiable (so a
# backward through them raises torch's "does not require grad" error instead of silently
# giving no gradient); append_kv only mutates.
def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale, num_splits):
    return _ops.decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale, num_splits)


def append_kv(k_cache, v_cache, k, v, cache_seqlens):
    _ops.append_kv(k_cache, v_cache, k, v, cache_seqlens)


@torch.library.register_fake("fastattn::decode_attention")
def _decode_attention_fake(q, k_cache, v_cache, cache_seqlens, softmax_scale, num_splits):
    b, h = q.shape[0], q.shape[-2]
    return q.new_empty(q.shape), q.new_empty((b, h), dtype=torch.float32)


@torch.library.register_fake("fastattn::append_kv")
def _append_kv_fake(k_cache, v_cache, k, v, cache_seqlens):
    return None


def _decode_attention_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _decode_attention_backward(ctx, dout, dlse):
    raise RuntimeError("fastattn.decode_attention is not differentiable")


torch.library.register_autograd(
    "fastattn::decode_attention", _decode_attention_backward, setup_context=_decode_attention_setup
)
