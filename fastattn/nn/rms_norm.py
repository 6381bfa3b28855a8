"""fastattn.nn.RMSNorm: a drop-in for torch.nn.RMSNorm on fastattn's kernel (and, with
``unit_offset=True``, for Gemma's ``(1 + w)`` RMSNorm)."""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import functional as F

_shape_t = Union[int, Sequence[int], torch.Size]

__all__ = ["RMSNorm", "rms_norm_unit_offset"]


def rms_norm_unit_offset(x: Tensor, weight: Tensor, eps: Optional[float] = 1e-6, residual: Optional[Tensor] = None):
    """Gemma's RMSNorm: ``x / sqrt(mean(x**2) + eps) * (1 + weight)`` over the last dim.

    The weight is stored as an offset from one (zeros = identity scale). As in Gemma's
    norms, ``1 + weight`` and the product are computed in fp32 (fp64 for fp64 inputs) and
    the result has x's dtype (also under autocast, and for a weight of another dtype).

    With ``residual``, ``h = x + residual`` (torch's type promotion) and ``(y, h)`` is
    returned with ``y = norm(h)``. On fp32 inputs this is one fused kernel pass with the
    scale ``1 + weight`` as the kernel's weight. The kernel reads its weight in x's dtype,
    so on 16-bit inputs ``1 + weight`` rounded to 16 bits would cost up to 2**-9 relative
    (bf16) on every output; there the add is torch's (Gemma's own, in h's dtype) and the
    norm runs in fp32 on ``h.float()``, rounded once to h's dtype at the end.

    Differentiable in x, weight and residual.
    """
    if residual is not None and residual.dtype != x.dtype:
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    if weight is None:
        return F.rms_norm(x, None, eps, residual=residual)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = 1.0 + weight.to(compute)
    if x.dtype == compute:
        return F.rms_norm(x, scale, eps, residual=residual)
    h = x if residual is None else x + residual
    y = F.rms_norm(h.to(compute), scale, eps).to(h.dtype)
    return y if residual is None else (y, h)


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last ``len(normalized_shape)`` dims, as ``torch.nn.RMSNorm``.

    Same constructor, attributes (``normalized_shape``, ``eps``, ``elementwise_affine``,
    ``weight``) and state_dict, and the same inputs: any strides, an input dtype other than
    the weight's (a bf16 activation with the default fp32 weight, autocast; the output has
    the input's dtype, as torch's), any eps. ``eps=None`` means the epsilon of torch's
    accumulation type, which is what torch computes (its docs say ``torch.finfo(x.dtype).eps``):
    the fp32 one, 2**-23, for float32/float16/bfloat16 inputs, the float64 one for float64.

    ``forward(x)`` returns y; ``forward(x, residual)`` returns ``(y, h)`` with
    ``h = x + residual`` computed in the same kernel pass (the pre-norm residual stream).

    ``unit_offset=True`` is Gemma's variant: the weight is an offset from one (initialised
    to zeros) and y = x / rms(x) * (1 + weight), computed in fp32 and returned in x's
    dtype whatever the weight's dtype (``rms_norm_unit_offset``). Same state_dict.
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine", "unit_offset"]

    def __init__(
        self,
        normalized_shape: _shape_t,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        unit_offset: bool = False,
    ) -> None:
        super().__init__()
        self.unit_offset = bool(unit_offset)
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            (torch.nn.init.zeros_ if self.unit_offset else torch.nn.init.ones_)(self.weight)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        """x (..., *normalized_shape) -> y, x's shape and dtype; with residual (x's shape),
        ``(y, h)``: h = x + residual and y = RMSNorm(h), one kernel pass."""
        nd = len(self.normalized_shape)
        if nd == 0:
            raise ValueError("RMSNorm's normalized_shape must have at least one dimension, got ()")
        weight = self.weight  # (one Module attribute lookup: this forward runs per layer per token)
        if weight is not None and weight.shape != self.normalized_shape:
            raise ValueError(
                f"RMSNorm's weight must have normalized_shape {self.normalized_shape}, got {tuple(weight.shape)}"
            )
        if x.shape[-nd:] != self.normalized_shape:
            raise ValueError(
                f"RMSNorm expected input with trailing shape {self.normalized_shape}, got {tuple(x.shape)}"
            )
        if nd == 1:  # nothing to flatten
            if self.unit_offset:
                return rms_norm_unit_offset(x, weight, self.eps, residual=residual)
            return F.rms_norm(x, weight, self.eps, residual=residual)
        if x.is_nested:
            # A nested (jagged) tensor cannot be flattened over its trailing dims: torch's own
            # rms_norm over normalized_shape (one normalized dim goes to F.rms_norm, which
            # hands nested tensors to torch as well).
            if self.unit_offset:
                raise ValueError("RMSNorm(unit_offset=True) takes a nested tensor only with a 1-D normalized_shape")
            h = x if residual is None else x + residual
            y = torch.nn.functional.rms_norm(h, self.normalized_shape, weight, self.eps)
            return y if residual is None else (y, h)
        # Normalising over several trailing dims is normalising over their flattening.
        lead = x.shape[:-nd]
        n = 1
        for s in self.normalized_shape:
            n *= s
        weight = weight.reshape(n) if weight is not None else None
        x = x.reshape(*lead, n)
        residual = residual.reshape(*lead, n) if residual is not None else None
        if self.unit_offset:
            out = rms_norm_unit_offset(x, weight, self.eps, residual=residual)
        else:
            out = F.rms_norm(x, weight, self.eps, residual=residual)
        if residual is not None:
            return out[0].reshape(*lead, *self.normalized_shape), out[1].reshape(*lead, *self.normalized_shape)
        return out.reshape(*lead, *self.normalized_shape)

    def __prepare_scriptable__(self):
        # torch.jit.script(module) compiles what this returns: TorchScript cannot compile the
        # custom-op dispatch and argument checks of forward, so a scripted RMSNorm (like a
        # scripted torch.nn.RMSNorm, whose drop-in this is) runs torch's rms_norm on the same
        # weight Parameter. forward(x) only. Not for subclasses: their own forward may differ
        # (the HF integration's keeps the HF output dtype), and scripting must not drop it.
        if type(self) is not RMSNorm:
            return self
        return _ScriptedRMSNorm(self)

    def extra_repr(self) -> str:
        offset = ", unit_offset=True" if self.unit_offset else ""
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}{offset}"


class _ScriptedRMSNorm(torch.nn.Module):
    """What ``torch.jit.script(fastattn.nn.RMSNorm(...))`` compiles (see
    ``RMSNorm.__prepare_scriptable__``): torch's rms_norm over the module's own weight
    Parameter (shared, not copied), with Gemma's ``(1 + weight)`` in fp32 for
    ``unit_offset=True``; ``forward(x)`` only (no residual)."""

    __constants__ = ["normalized_shape", "eps", "unit_offset"]

    def __init__(self, src: RMSNorm) -> None:
        super().__init__()
        self.normalized_shape: List[int] = list(src.normalized_shape)
        self.eps: Optional[float] = src.eps
        self.unit_offset: bool = src.unit_offset
        if src.weight is not None:
            self.weight = src.weight
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.unit_offset and weight is not None:
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            scale = 1.0 + weight.to(compute)
            return torch.nn.functional.rms_norm(x.to(compute), self.normalized_shape, scale, self.eps).to(x.dtype)
        return torch.nn.functional.rms_norm(x, self.normalized_shape, weight, self.eps)
