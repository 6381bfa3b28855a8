"""fastattn.nn.RMSNorm: a drop-in for torch.nn.RMSNorm on fastattn's kernel."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import functional as F

_shape_t = Union[int, Sequence[int], torch.Size]


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last ``len(normalized_shape)`` dims, as ``torch.nn.RMSNorm``.

    Same constructor, attributes (``normalized_shape``, ``eps``, ``elementwise_affine``,
    ``weight``) and state_dict, and the same inputs: any strides, an input dtype other than
    the weight's (a bf16 activation with the default fp32 weight, autocast; the output has
    the input's dtype, as torch's), any eps. ``eps=None`` means the fp32 epsilon 2**-23
    whatever the input dtype, which is what torch computes (its docs say
    ``torch.finfo(x.dtype).eps``; its kernels use the fp32 accumulation type's).

    ``forward(x)`` returns y; ``forward(x, residual)`` returns ``(y, h)`` with
    ``h = x + residual`` computed in the same kernel pass (the pre-norm residual stream).
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(
        self,
        normalized_shape: _shape_t,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
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
            torch.nn.init.ones_(self.weight)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        nd = len(self.normalized_shape)
        if tuple(x.shape[-nd:]) != self.normalized_shape:
            raise ValueError(
                f"RMSNorm expected input with trailing shape {self.normalized_shape}, got {tuple(x.shape)}"
            )
        # Normalising over several trailing dims is normalising over their flattening.
        lead = x.shape[:-nd]
        n = 1
        for s in self.normalized_shape:
            n *= s
        weight = self.weight.reshape(n) if self.weight is not None else None
        if nd > 1:
            x = x.reshape(*lead, n)
            residual = residual.reshape(*lead, n) if residual is not None else None
        out = F.rms_norm(x, weight, self.eps, residual=residual)
        if nd > 1:
            if residual is not None:
                return out[0].reshape(*lead, *self.normalized_shape), out[1].reshape(*lead, *self.normalized_shape)
            return out.reshape(*lead, *self.normalized_shape)
        return out

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
