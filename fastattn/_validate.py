"""Argument checks shared by the public functions. They run in eager mode and under
torch.compile alike (the C++ bindings check again for direct torch.ops callers), and every
message names the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake as _is_fake

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT32_MAX = torch.finfo(torch.float32).max
# The largest float32 s with s * log2(e) finite in float32: the kernels run the softmax on exp2,
# with the scores scaled by softmax_scale * log2(e) (a larger scale gave NaN rows although the
# scaled scores were finite; outside audit).
_SOFTMAX_SCALE_MAX = 2.3586574359122396e38


def check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(t: Tensor, name: str, cuda_16bit_only: bool = False) -> None:
    check_tensor(t, name)
    if cuda_16bit_only and t.is_cuda and t.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float16 or bfloat16 on CUDA, got {t.dtype}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
            "all tensors must be on the same device"
        )


def check_same_dtype(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


def check_last_dim_contiguous(t: Tensor, name: str) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")


def check_softmax_scale(scale, name: str = "softmax_scale"):
    """None (the caller's default) or a finite real number with |scale| <= _SOFTMAX_SCALE_MAX,
    returned as a Python float. Tensors, strings, complex numbers, bools, NaN, +-inf and
    larger magnitudes are refused by name: such a scale would silently turn outputs into NaN."""
    if scale is None:
        return None
    if type(scale) is float and abs(scale) <= _SOFTMAX_SCALE_MAX:  # (the common case, without the ABC checks)
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number (float) or None, got {type(scale).__name__}: {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or abs(scale) > _SOFTMAX_SCALE_MAX:
        raise ValueError(f"{name} must be finite in float32 times log2(e) (|{name}| <= {_SOFTMAX_SCALE_MAX:.6g}: the "
                         f"kernels take the softmax on exp2 of the scores scaled by {name} * log2(e)), got {scale}")
    return scale


def check_softcap(softcap, name: str = "softcap") -> float:
    """Logit soft-capping: 0 (off) or a positive real number finite in float32, returned as a
    Python float. Anything else (negative, NaN, inf, a bool, a tensor, a string) is a
    ValueError naming the argument: a wrong cap would silently give NaN or a wrong softmax."""
    if type(softcap) is float and 0.0 <= softcap <= _FLOAT32_MAX:  # (the common case, without the ABC checks)
        return softcap
    if isinstance(softcap, bool) or not isinstance(softcap, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise ValueError(f"{name} must be a real number >= 0 (0 = off), got {type(softcap).__name__}: {softcap!r}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap < 0 or softcap > _FLOAT32_MAX:
        raise ValueError(f"{name} must be 0 (off) or a positive number finite in float32, got {softcap}")
    return softcap


def check_bool(value, name: str) -> bool:
    """A flag: a Python bool or a NumPy bool, returned as a Python bool. Anything else (an
    int, a string, None) is a TypeError naming the argument, not read by truthiness:
    ``causal="no"`` must not silently mean causal."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")


def check_traced(condition, message: str) -> None:
    """A check on a traced length (a SymInt under torch.compile / torch.export), recorded in the
    graph and run with it: ``torch._check``. Under strict export the message callable is
    dropped: dynamo lifts it as a graph constant, and strict export of a length read with
    ``.item()`` then fails (torch 2.13) before anything runs."""
    if torch.compiler.is_dynamo_compiling() and torch.compiler.is_exporting():
        torch._check(condition)
    else:
        torch._check(condition, lambda: message)


def host_values_readable(*tensors) -> bool:
    """Whether the values of these (CPU) tensors may be read on the host for a check: not while
    torch.compile / torch.export traces, and not for meta or fake tensors (shape propagation,
    which has no values: such checks are then skipped, as when traced)."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t.device.type == "meta" or (type(t) is not Tensor and _is_fake(t)):
            return False
    return True


def is_integer(value) -> bool:
    """A Python or NumPy integer (any numbers.Integral), but not a bool: True is not a size."""
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))
