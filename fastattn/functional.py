"""The public fastattn functions: validation, defaults and docs with shapes.

Each function checks its arguments (clear ``ValueError``/``TypeError`` naming the argument),
then calls one op from ``fastattn.ops``. All math accumulates in fp32; outputs have the
input dtype.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import ops
from ._validate import (
    FLOAT_DTYPES,
    check_bool,
    check_float,
    check_last_dim_contiguous,
    check_same_device,
    check_same_dtype,
    check_softcap,
    check_softmax_scale,
    check_tensor,
    check_traced,
    host_values_readable,
    is_integer,
)

# Each op section appends its public names, so sections can be edited independently.
__all__ = []


# ---- rms_norm ----------------------------------------------------------------------------
import numbers as _numbers  # noqa: E402

__all__ += ["rms_norm"]

_RMS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _rms_norm_eps(eps) -> float:
    """torch's rules for rms_norm's eps: any real number (negative and 0 included; a row
    whose mean square plus eps is <= 0 comes out NaN/inf, as in torch), and None means the
    epsilon of the fp32 accumulation type of the kernels' dtypes (torch uses
    numeric_limits<opmath_t>::epsilon(), so 2**-23 for bfloat16/float16 inputs too, not
    finfo(bfloat16).eps). The float64 and complex inputs that torch computes keep None, so
    torch applies its own default there (2**-52 for float64: its opmath type is double)."""
    if eps is None:
        return torch.finfo(torch.float32).eps
    if isinstance(eps, Tensor) and eps.numel() == 1 and not eps.is_complex():
        return float(eps)
    if not isinstance(eps, (_numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"eps must be a real number (float) or None, got {type(eps).__name__}: {eps!r}")
    return float(eps)


def _check_rms_float(t, name: str, allow_complex: bool = False) -> None:
    check_tensor(t, name)
    if not (t.is_floating_point() or (allow_complex and t.is_complex())):
        # torch's rms_norm promotes an integer / bool weight or residual (and a complex weight on
        # a real x) to x's dtype; fastattn refuses it instead (the kernels read them as floats,
        # and such a norm weight is almost always a mistake), saying how to get torch's result.
        raise ValueError(
            f"{name} must be a floating-point tensor, got {t.dtype} (fastattn does not promote {t.dtype} "
            f"tensors as torch.nn.functional.rms_norm does; pass {name}.to(x.dtype) for its result)"
        )


def _contiguous_last_dim(t: Tensor) -> Tensor:
    # The kernels read rows with unit stride; any other layout is copied once (as torch's
    # own kernels do), and the copy is differentiable.
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        # An empty tensor counts as contiguous whatever its strides, so .contiguous() would
        # return it unchanged and the op would refuse its last-dim stride where torch returns
        # an empty result: an explicit contiguous clone (nothing to copy).
        return t.clone(memory_format=torch.contiguous_format) if t.numel() == 0 else t.contiguous()
    return t


def _any_instance_of_loaded(module_name: str, class_name: str, *objs) -> bool:
    """Whether any obj is an instance of module_name.class_name, without importing the module
    (no instance can exist before it is loaded): torch's DTensor, CausalBias."""
    module = sys.modules.get(module_name)
    return module is not None and any(isinstance(o, getattr(module, class_name)) for o in objs)


def _any_dtensor(*tensors) -> bool:
    return _any_instance_of_loaded("torch.distributed.tensor", "DTensor", *tensors)


def _rms_norm_plain(x, weight, eps, residual) -> bool:
    """The usual call, decided in a few comparisons (~1 us instead of ~4 of checks): a float32 /
    float16 / bfloat16 x that is not nested, a float eps, a weight of x's dtype and device and
    shape (N,) or none, a residual of x's dtype, shape and device or none, and not the CUDA
    autocast case. rms_norm then goes straight to the kernels; anything else takes its checks
    and conversions one by one."""
    if not (isinstance(x, Tensor) and type(eps) is float):
        return False
    if _any_dtensor(x, weight, residual):
        return False
    dtype = x.dtype
    if not (dtype in FLOAT_DTYPES and x.dim() >= 1 and not x.is_nested):
        return False
    if weight is not None and not (isinstance(weight, Tensor) and weight.dtype == dtype and weight.dim() == 1
                                   and weight.shape[0] == x.shape[-1] and weight.device == x.device):
        return False
    if residual is not None and not (isinstance(residual, Tensor) and residual.dtype == dtype
                                     and residual.shape == x.shape and residual.device == x.device
                                     and not residual.is_nested):
        return False
    return not (x.is_cuda and ((dtype != torch.float32 and _CUDA_AUTOCAST_RMS_NORM_FP32
                                and torch.is_autocast_enabled("cuda")) or not cuda_kernels_run_on(x)))


# Whether this torch's CUDA autocast runs rms_norm in fp32 (torch 2.13 does; torch 2.11 left it
# alone, seen on an H200: nn.RMSNorm under fp16 autocast returned fp16). Read off torch's own
# dispatcher once, so fastattn.rms_norm returns what torch's rms_norm returns on either.
_CUDA_AUTOCAST_RMS_NORM_FP32 = torch._C._dispatch_has_kernel_for_dispatch_key("aten::rms_norm", "AutocastCUDA")


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
        x: (..., N) float32/float16/bfloat16, any strides (a last dim that is not
            contiguous is copied once). float64, complex64 and complex128 are accepted
            too, and so are nested (jagged) tensors and DTensors (x, weight or residual):
            those are computed by torch's own rms_norm (there are no such kernels, and no
            sharding rule for fastattn's ops).
        weight: (N,) or None, any float dtype and strides. A weight whose dtype differs from
            x's (the fp32 master weight of a 16-bit model, or under autocast) is converted
            to x's dtype for the kernel; its gradient is reduced in fp32 and returned in the
            weight's own dtype.
        eps: added to the mean square; any real number as in torch (a row whose mean
            square + eps <= 0 gives NaN/inf, as in torch). None means torch's default: the
            fp32 epsilon (2**-23) for float32/float16/bfloat16 inputs, the float64 one
            (2**-52) for float64 (and complex128) inputs.
        residual: optional tensor of x's shape, any float dtype and strides. Then
            ``h = x + residual`` (torch's type promotion) is computed and normalised in the
            same pass, and ``(y, h)`` is returned (the pre-norm residual stream).

    Returns:
        y (x's shape and dtype), or ``(y, h)`` when ``residual`` is given (both of h's
        dtype). Computed in fp32. Under CUDA autocast, where this torch runs rms_norm in
        fp32 (2.13 does, 2.11 did not), 16-bit inputs are normalised in fp32 and y is fp32,
        exactly as torch's.

    Differentiable in x, weight and residual, to any order (with ``create_graph=True`` the
    backward is recorded as torch ops).
    """
    if _rms_norm_plain(x, weight, eps, residual) and not ops.transform_active():  # straight to the kernel
        x = _contiguous_last_dim(x)
        if residual is None:
            return ops.rms_norm_fwd(x, weight, eps)[0]
        y, h, _rstd = ops.rms_norm_add_fwd(x, _contiguous_last_dim(residual), weight, eps)
        return y, h
    check_tensor(x, "x")
    if x.dtype not in _RMS_DTYPES and not x.is_complex():
        raise ValueError(
            f"x must be float32, float16, bfloat16 or float64 (or complex, computed by torch), got {x.dtype}"
        )
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension, got a 0-dim tensor")
    torch_eps = eps is None  # None is left to torch where torch computes (its default depends on the dtype)
    eps = _rms_norm_eps(eps)
    if x.is_nested or (isinstance(residual, Tensor) and residual.is_nested) or _any_dtensor(x, weight, residual):
        # Nested (jagged) tensors and DTensors (which have no sharding rule for fastattn's ops):
        # torch's own rms_norm (the kernels take strided tensors).
        h = x + residual if residual is not None else x
        y = torch.nn.functional.rms_norm(h, (h.shape[-1],), weight, None if torch_eps else eps)
        return (y, h) if residual is not None else y
    # Complex weights and residuals only with a complex x (torch would drop their imaginary
    # parts, or make a real x complex, with a warning at most).
    if residual is not None:
        _check_rms_float(residual, "residual", allow_complex=x.is_complex())
    if weight is not None:
        _check_rms_float(weight, "weight", allow_complex=x.is_complex())
        check_same_device(weight, x, "weight", "x")
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(
                f"weight must have shape ({x.shape[-1]},) to match x's last dimension, got {tuple(weight.shape)}"
            )
    if residual is not None:
        check_same_device(residual, x, "residual", "x")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            # h = x + residual in the promoted dtype, as the unfused expression.
            dtype = torch.promote_types(x.dtype, residual.dtype)
            if dtype not in _RMS_DTYPES and not dtype.is_complex:
                raise ValueError(
                    f"residual has dtype {residual.dtype}: x + residual would be {dtype} (torch's type "
                    f"promotion with x's {x.dtype}), not float32, float16, bfloat16, float64 or complex"
                )
            x, residual = x.to(dtype), residual.to(dtype)
    if (x.dtype == torch.float64 or x.is_complex()
            or (x.is_cuda and not cuda_kernels_run_on(x))
            or (ops.transform_active() and ops.differentiating_transform(x, weight, residual))):
        # No fp64 or complex kernels (fp64 is for checking, e.g. gradcheck, not for speed), no
        # kernel for GPUs below sm_80, and no forward-mode / torch.func derivatives
        # (ops.differentiating_transform): torch's own, with torch's default eps when none is given.
        h = x + residual if residual is not None else x
        y = torch.nn.functional.rms_norm(h, (h.shape[-1],), weight, None if torch_eps else eps)
        return (y, h) if residual is not None else y
    if x.is_cuda and x.dtype != torch.float32 and _CUDA_AUTOCAST_RMS_NORM_FP32 and torch.is_autocast_enabled("cuda"):
        # Where torch lists rms_norm among CUDA autocast's fp32 ops, it normalises in fp32
        # and returns fp32 (CPU autocast leaves it alone). The residual add is not an autocast op.
        if residual is None:
            return rms_norm(x.float(), weight, eps)
        h = x + residual
        return rms_norm(h.float(), weight, eps), h
    if weight is not None and weight.dtype != x.dtype and x.dtype != torch.float32:
        # torch multiplies a 16-bit x's normalised rows by a weight of another dtype in fp32
        # and rounds the product once. The kernels read the weight in x's dtype, and rounding
        # it there first (an fp32 master weight under bf16 activations) cost up to twice
        # torch's error, or overflowed it (a bf16 weight above 65504 with fp16 x: inf where
        # torch is finite). So normalise in fp32 (a 16-bit weight converts exactly) and round
        # once, as torch; the add of a residual stays in h's dtype, as in the unfused form.
        h = x + residual if residual is not None else x
        y = rms_norm(h.float(), weight if weight.dtype != torch.float64 else weight.float(), eps).to(h.dtype)
        return (y, h) if residual is not None else y
    x = _contiguous_last_dim(x)
    if residual is None:
        y, _rstd = ops.rms_norm_fwd(x, weight, eps)
        return y
    residual = _contiguous_last_dim(residual)
    y, h, _rstd = ops.rms_norm_add_fwd(x, residual, weight, eps)
    return y, h


# ---- rotary ------------------------------------------------------------------------------
__all__ += ["apply_rotary"]


def _rotary_args_ok(q, k, cos, sin, positions) -> bool:
    """Whether _check_rotary_args passes, decided in a few comparisons (~1 us instead of ~5);
    anything else goes through its checks one by one, which name what is wrong."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(cos, Tensor) and isinstance(sin, Tensor)):
        return False
    qs, ks, cs, device = q.shape, k.shape, cos.shape, q.device
    if not (len(qs) == 4 and len(ks) == 4 and q.dtype in FLOAT_DTYPES and k.dtype == q.dtype and k.device == device
            and ks[0] == qs[0] and ks[1] == qs[1] and ks[3] == qs[3]
            and (qs[3] <= 1 or (q.stride(-1) == 1 and k.stride(-1) == 1))
            and cos.dtype == torch.float32 and sin.dtype == torch.float32 and len(cs) == 2 and cs[1] >= 1
            and sin.shape == cs and cos.device == device and sin.device == device and 2 * cs[1] <= qs[3]):
        return False
    if positions is None:
        return qs[1] <= cs[0]
    return (isinstance(positions, Tensor) and positions.device == device
            and positions.dtype in (torch.int32, torch.int64)
            # (by rank first: comparing a (B, S) shape with (S,) made torch.compile / export guard S != B)
            and ((positions.dim() == 1 and positions.shape[0] == qs[1])
                 or (positions.dim() == 2 and positions.shape[0] == qs[0] and positions.shape[1] == qs[1])))


def _check_rotary_args(q, k, cos, sin, positions) -> None:
    if _rotary_args_ok(q, k, cos, sin, positions):
        return
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


def _stride_span(t: Tensor) -> int:
    return sum(st * (n - 1) for st, n in zip(t.stride(), t.shape))


def _internal_overlap(t: Tensor):
    """Whether two indices of t reach one memory location: False when proven from the
    strides (sorted, each exceeds the span of the smaller dims), True for an expand, None
    when the strides cannot tell. Mirrors internal_overlap in csrc/bindings/common.h."""
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1)
    if t.numel() <= 1 or not dims:
        return False
    if dims[0][0] < 0:
        return None
    if dims[0][0] == 0:
        return True
    span = 0
    for st, n in dims:
        if st <= span:
            return None
        span += st * (n - 1)
    return False


def _elements_overlap(a: Tensor, b: Tensor):
    """Whether a and b share an element, exactly (True/False), or None when undecidable
    (different element sizes, misaligned addresses, search budget spent). Mirrors
    elements_overlap in csrc/bindings/common.h: a[x] is b[y] iff sum sa_i x_i - sum sb_j y_j
    equals the element distance of their first elements, solved over the index boxes."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if min(a.stride() + b.stride(), default=0) < 0:
        return None
    esz = a.element_size()
    a_lo, b_lo = a.data_ptr(), b.data_ptr()
    if a_lo + (_stride_span(a) + 1) * esz <= b_lo or b_lo + (_stride_span(b) + 1) * b.element_size() <= a_lo:
        return False
    if b.element_size() != esz or (b_lo - a_lo) % esz:
        return None
    ranges = {}  # stride -> (lo, hi) of the index difference along it
    for t, sign in ((a, 1), (b, -1)):
        for st, n in zip(t.stride(), t.shape):
            if st and n > 1:
                lo, hi = ranges.get(st, (0, 0))
                ranges[st] = (lo, hi + n - 1) if sign > 0 else (lo - (n - 1), hi)
    terms = sorted(ranges.items(), reverse=True)
    rest_lo, rest_hi = [0] * (len(terms) + 1), [0] * (len(terms) + 1)
    for i in range(len(terms) - 1, -1, -1):
        c, (lo, hi) = terms[i]
        rest_lo[i], rest_hi[i] = rest_lo[i + 1] + c * lo, rest_hi[i + 1] + c * hi
    budget = [1 << 16]

    def solve(i, r):
        if r < rest_lo[i] or r > rest_hi[i]:
            return False
        if i == len(terms):
            return r == 0
        c, (lo, hi) = terms[i]
        unknown = False
        for z in range(max(lo, -((rest_hi[i + 1] - r) // c)), min(hi, (r - rest_lo[i + 1]) // c) + 1):
            budget[0] -= 1
            if budget[0] < 0:
                return None
            found = solve(i + 1, r - c * z)
            if found:
                return True
            unknown = unknown or found is None
        return None if unknown else False

    return solve(0, (b_lo - a_lo) // esz)


def _check_inplace_memory(q: Tensor, k: Tensor) -> None:
    # The binding makes the same checks for the in-place kernel; this is for the path that
    # rotates out of place and copies back, where shared elements would get k's rotation
    # in q (copy_ itself only refuses an expand).
    for t, name in ((q, "q"), (k, "k")):
        if _internal_overlap(t) is not False:
            raise ValueError(
                f"fastattn.apply_rotary(inplace=True): {name} has elements sharing memory (e.g. an expand), or "
                "strides that cannot rule it out; it is written in place, so pass a tensor with distinct elements"
            )
    found = _elements_overlap(q, k)
    if found is not False:
        raise ValueError(
            "fastattn.apply_rotary(inplace=True): q and k overlap in memory"
            + (" (or their strides cannot rule it out)" if found is None else "")
            + "; the op writes in place, so they must not share elements"
        )


def apply_rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    positions: Optional[Tensor] = None,
    interleaved: bool = False,
    inplace: bool = False,
    check_positions: bool = True,
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
            sync, except with ``check_positions=False``, during CUDA graph capture or with
            ``FASTATTN_ROTARY_SKIP_POSITION_CHECK=1``, where a token with a bad position
            gets NaN in its rotated dims instead (the kernel never reads outside the tables).
        interleaved: False for NeoX/LLaMA (pairs ``(i, i + R/2)``), True for GPT-J (pairs
            ``(2i, 2i + 1)``).
        inplace: rotate q and k in place and return them. When autograd needs to record
            the op (grad mode on and q or k requires grad) the rotation is computed out of
            place and copied back with ``Tensor.copy_``, so autograd sees an ordinary
            in-place op: gradients are correct for non-leaf tensors, and a leaf that
            requires grad raises torch's usual in-place error. q and k may be views of one
            buffer (e.g. the q and k heads of a packed qkv projection, interleaved in
            memory) as long as they share no element: that is decided exactly from their
            sizes, strides and addresses. ValueError if q and k share an element (it would
            be rotated twice), if q or k has elements sharing memory (an expand, or strides
            that cannot rule it out), or if the tables or positions lie in q's or k's
            memory. (Under torch.compile the copy-back path skips these checks, which need
            real addresses; the in-place kernel always makes them.)
        check_positions: True (default) checks the positions' values as above. False is for
            callers that guarantee them (e.g. a decode loop that bounds its lengths on the
            host): on CUDA it skips the check and its host sync (one per call otherwise:
            the device cannot run ahead of the CPU); on the CPU, where the check costs no
            sync, the values are still checked. Shape and dtype checks always run.

    Returns:
        (q_rot, k_rot) with q's and k's shapes and dtype (new contiguous tensors, or q and k
        themselves when ``inplace``). Math is done in fp32.

    Differentiable in q and k (the backward is the rotation by the opposite angle); cos and
    sin are treated as constants and get no gradient.
    """
    _check_rotary_args(q, k, cos, sin, positions)
    check_positions = check_bool(check_positions, "check_positions")
    interleaved = check_bool(interleaved, "interleaved")
    inplace = check_bool(inplace, "inplace")
    if not inplace:
        return ops.rotary(q, k, cos, sin, positions, interleaved, False, check_positions)
    if ops.transform_active():
        ops.refuse_transforms("fastattn.apply_rotary(inplace=True)", (q, k, cos, sin, positions))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        if not torch.compiler.is_compiling():
            _check_inplace_memory(q, k)
        q_rot, k_rot = ops.rotary(q, k, cos, sin, positions, interleaved, False, check_positions)
        q.copy_(q_rot)
        k.copy_(k_rot)
        return q, k
    ops.rotary_(q, k, cos, sin, positions, interleaved, False, check_positions)
    return q, k


# ---- flash attention ---------------------------------------------------------------------
__all__ += ["flash_attention", "scaled_dot_product_attention"]

from ._C_loader import load as _load_extension  # noqa: E402

# Head dims the CUDA kernel is built for (flash_fwd_cuda_supports_head_dim); the CPU kernel
# takes any head dim up to _CPU_MAX_HEAD_DIM.
_CUDA_HEAD_DIMS = (32, 64, 96, 128, 192, 256)
_CPU_MAX_HEAD_DIM = 512
_CUDA_BUILT = bool(_load_extension().WITH_CUDA)  # a CPU-only build delegates CUDA SDPA calls
# The CUDA backward's largest block at head dim 256 (flash_bwd.cu's dQ kernel) needs 128 KiB of
# shared memory, more than the 99 KiB per block of sm_86 / sm_89 / sm_120 parts (the forward
# always fits); other head dims fit every supported GPU.
_CUDA_BWD_SMEM_D256 = 128 * 1024
# The CUDA flash kernels put the batch and the heads on grid dimensions of at most 65535 blocks.
_CUDA_GRID_MAX = 65535


_CODE_FOR_DEVICE: dict = {}  # device index -> cuda_kernels_run_on's answer
_SMEM_OPTIN_BY_DEVICE: dict = {}  # device index -> shared memory per block (opt-in), bytes


def _per_device(cache: dict, t: Tensor, compute):
    """compute(index) for t's CUDA device, asked once per device (its properties never change).
    While torch.compile traces, the device is not asked (None unless an eager call already
    did: the caller then decides)."""
    index = t.device.index or 0  # (a CUDA tensor's device always has its index)
    value = cache.get(index)
    if value is None and not torch.compiler.is_compiling():
        value = cache[index] = compute(index)
    return value


def _smem_optin(t: Tensor) -> Optional[int]:
    """The opt-in shared memory per block of t's GPU (bytes); unlimited where torch does not say;
    None while torch.compile traces before any eager call asked (see _per_device)."""
    return _per_device(_SMEM_OPTIN_BY_DEVICE, t, lambda i: getattr(
        torch.cuda.get_device_properties(i), "shared_memory_per_block_optin", 2**31 - 1))


def _build_runs_on(capability, archs: str) -> bool:
    """Whether a build for `archs` (setup.py's FASTATTN_CUDA_ARCHS, e.g. "8.0;9.0a") has code for
    a GPU of this (major, minor) capability: sm_XY code runs on the same major from minor Y on,
    an "a" arch only on itself, and the compute_80 PTX setup.py embeds with "8.0" on any GPU from
    sm_80 on; nothing runs below sm_80 (mma.sync bf16, cp.async)."""
    if capability < (8, 0):
        return False
    names = [a.strip() for a in archs.split(";") if a.strip()]
    if not names:
        return True  # (not recorded: assume the build was made for it)
    for name in names:
        exact = name.endswith("a")
        major, minor = (int(x) for x in name.rstrip("a").split("."))
        if (major, minor) == (8, 0) or (capability == (major, minor) if exact else
                                        capability[0] == major and capability[1] >= minor):
            return True
    return False


def cuda_kernels_run_on(t: Tensor) -> bool:
    """Whether t's GPU can run this build's CUDA kernels (_build_runs_on: sm_80 or newer, and
    code for it in the build). Where not (a V100 or T4; an A100 under a build made for an H100
    alone), the SDPA drop-in, rms_norm / nn.RMSNorm, the Hugging Face integration and the model
    run torch's way instead. While torch.compile traces: the answer of an earlier eager call on
    that device, else True (the device is not asked there)."""
    known = _per_device(_CODE_FOR_DEVICE, t, lambda i: _build_runs_on(
        torch.cuda.get_device_capability(i), getattr(_load_extension(), "CUDA_ARCHS", "")))
    return True if known is None else known


def cuda_backward_fits(t: Tensor, head_dim: int) -> bool:
    """Whether the CUDA flash backward at head_dim runs on t's GPU (False: head dim 256 on a GPU
    with less than 128 KiB of shared memory per block). True where torch does not report the
    limit, and while torch.compile traces unless an eager call already read it."""
    if head_dim != 256:
        return True
    optin = _smem_optin(t)
    return optin is None or optin >= _CUDA_BWD_SMEM_D256


_INT64_MAX = 2**63 - 1


def _check_window(window) -> tuple:
    if type(window) is tuple and len(window) == 2:  # the common case: plain ints in range
        left, right = window
        if type(left) is int and type(right) is int and -1 <= left <= _INT64_MAX and -1 <= right <= _INT64_MAX:
            return left, right
    # Python and NumPy integers alike; a bool is refused (True is not a window size).
    if not (isinstance(window, (tuple, list)) and len(window) == 2
            and all(is_integer(w) or isinstance(w, torch.SymInt) for w in window)):
        raise ValueError(f"window must be a pair of ints (left, right), got {window!r}")
    if any(isinstance(w, torch.SymInt) for w in window):
        # A window derived from a shape while torch.compile / torch.export traces: kept
        # symbolic (the ops take SymInt windows), so the graph serves every length; its range
        # is checked when the graph runs.
        for w in window:
            if isinstance(w, torch.SymInt):
                check_traced(w >= -1, f"window sizes must be >= 0 or -1 (unbounded), got {window}")
        return tuple(w if isinstance(w, torch.SymInt) else int(w) for w in window)
    left, right = int(window[0]), int(window[1])
    if left < -1 or right < -1:
        raise ValueError(f"window sizes must be >= 0 or -1 (unbounded), got {(left, right)}")
    # A side past int64 (the ops' schema type) reaches past any sequence: unbounded, as the
    # docs promise for every side >= Sq + Sk, rather than the schema's "expected int" error.
    return (-1 if left > _INT64_MAX else left), (-1 if right > _INT64_MAX else right)


def _qkv_ok(q, k, v, rank: int) -> bool:
    """Whether q, k, v pass every check of _check_qkv, decided in a few comparisons: the usual
    call costs ~1 us of checks instead of ~5. Anything else (including what is fine but not
    plain, e.g. meta tensors) goes through the checks one by one, which name what is wrong."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        return False
    dtype, device, qs, ks = q.dtype, q.device, q.shape, k.shape
    if not (len(qs) == rank and len(ks) == rank and ks == v.shape and k.dtype == dtype and v.dtype == dtype
            and k.device == device and v.device == device and (rank != 4 or ks[0] == qs[0])):
        return False
    D, H, Hk = qs[-1], qs[-2], ks[-2]
    if device.type == "cpu":
        dims_ok = dtype in FLOAT_DTYPES and 1 <= D <= _CPU_MAX_HEAD_DIM
    else:
        dims_ok = (device.type == "cuda" and _CUDA_BUILT and dtype in (torch.float16, torch.bfloat16)
                   and D in _CUDA_HEAD_DIMS)
    return (dims_ok and ks[-1] == D and Hk >= 1 and H % Hk == 0
            and (D == 1 or (q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1)))


def _default_softmax_scale(D) -> float:
    """1 / sqrt(D). torch.jit.trace records it as a constant of the traced head dim (the op takes
    a float), so a traced function would be silently wrong at another head dim: said while
    tracing (outside audit), where torch's own TracerWarning spoke only of a float conversion."""
    if torch.jit.is_tracing():
        import warnings

        warnings.warn(f"torch.jit.trace records fastattn's default softmax_scale (1 / sqrt(D), D = {int(D)} here) "
                      "as a constant: the traced function is wrong at any other head dim. Pass softmax_scale= "
                      "explicitly to say the scale is meant to be fixed.", torch.jit.TracerWarning, stacklevel=3)
    return D ** -0.5


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, layouts) -> int:
    """The checks flash_attention (4-D, batched) and flash_attention_varlen (3-D, packed)
    share: dtypes, ranks, devices, shapes, GQA head counts, head dims per device, contiguous
    last dims. Returns the head dim D."""
    q_layout, kv_layout = layouts
    rank = q_layout.count(",") + 1
    if _qkv_ok(q, k, v, rank):
        return q.shape[-1]
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_float(t, name, cuda_16bit_only=True)
    for t, name, layout in ((q, "q", q_layout), (k, "k", kv_layout), (v, "v", kv_layout)):
        if t.dim() != rank:
            raise ValueError(f"{name} must have {rank} dimensions {layout}, got {t.dim()}")
    check_same_device(k, q, "k", "q")
    check_same_device(v, q, "v", "q")
    # (meta tensors pass: the op's fake impl gives shapes without a kernel)
    if q.device.type not in ("cpu", "cuda", "meta") or (q.is_cuda and not _CUDA_BUILT):
        raise ValueError(
            f"q is on {q.device} but this build of fastattn has kernels for "
            f"{'the CPU and CUDA' if _CUDA_BUILT else 'the CPU only (rebuild with a CUDA torch and nvcc)'}"
        )
    check_same_dtype(k, q, "k", "q")
    check_same_dtype(v, q, "v", "q")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    H, D = q.shape[-2], q.shape[-1]
    if rank == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have q's batch size {q.shape[0]}, got {k.shape[0]}")
    if k.shape[-1] != D:
        raise ValueError(f"k must have q's head dim {D}, got {k.shape[-1]}")
    Hk = k.shape[-2]
    if Hk < 1 or H % Hk != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the number of key/value heads ({Hk}): "
                         f"q is {q_layout} and k / v {kv_layout}, heads in dim -2"
                         + (" (a (B, H, S, D) tensor, as SDPA takes, is passed as x.transpose(1, 2))" if rank == 4
                            else ""))
    if q.is_cuda and D not in _CUDA_HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported on CUDA (supported: {', '.join(map(str, _CUDA_HEAD_DIMS))})")
    if not q.is_cuda and not 1 <= D <= _CPU_MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {_CPU_MAX_HEAD_DIM}] on the CPU, got {D}")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_last_dim_contiguous(t, name)
    return D


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window=(-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """FlashAttention: ``softmax(cap(q k^T * softmax_scale) + mask) v`` without materialising the scores.

    Args:
        q: (B, Sq, H, D) query. float32/float16/bfloat16 on the CPU, float16/bfloat16 on
            CUDA (D in 32, 64, 96, 128, 192, 256 there; any D up to 512 on the CPU). Last dim contiguous; the
            other strides are free (e.g. slices of a packed qkv tensor).
        k, v: (B, Sk, Hk, D) with q's dtype and device; ``H % Hk == 0`` (GQA/MQA: query head
            h reads kv head ``h // (H // Hk)``; K/V are never copied per query head).
        causal: bottom-right aligned, as flash-attn: query i sees keys ``j <= i + Sk - Sq``.
        softmax_scale: defaults to ``1 / sqrt(D)``. Any real number with |softmax_scale| <=
            2.35865e38 (its product with log2(e) finite in float32; negative and 0 included);
            NaN, inf, larger values and non-numbers raise. The scaled scores
            ``softmax_scale * q.k`` (and, for the KV-cache kernels a short query runs on,
            ``softmax_scale * log2(e) * q``) are computed in fp32 and must stay finite there:
            a large scale sharpens the softmax towards the hard argmax, but where a score
            overflows to +inf (or the pre-scaled q does) the result is unspecified (zeros,
            NaN or another key's value row; not checked). A score of -inf (an infinite key,
            or a q.k overflowing to -inf) drops its key, and a row whose visible scores are
            all -inf outputs 0 and lse -inf, as torch's SDPA and flash-attn give.
        window: (left, right) sliding window: query i sees keys in
            ``[i + Sk - Sq - left, i + Sk - Sq + right]``; -1 is unbounded, and so is any
            side >= Sq + Sk (e.g. ``sys.maxsize``). ``causal`` sets right = 0. Rows that see
            no key output 0 (and lse = -inf, the log of an empty sum; flash-attn writes +inf).
            flash-attn's C++ treats a side >= Sk as unbounded already: the two differ only
            when Sq > Sk and Sk <= side < Sq + Sk, where this keeps the band above (the one
            flash-attn documents).
        softcap: logit soft-capping (Gemma 2, Grok; flash-attn's ``softcap``): when > 0 each
            scaled score s becomes ``cap(s) = softcap * tanh(s / softcap)`` before the mask
            and softmax; 0 (the default) is off and runs the uncapped kernel. A real number
            >= 0, finite in float32 (ValueError otherwise).
        return_lse: also return the log-sum-exp of the (capped) scaled scores.

    Returns:
        out (B, Sq, H, D) contiguous, q's dtype; with return_lse, ``(out, lse)`` where lse is
        (B, H, Sq) float32 (natural log).

    Differentiable in q, k and v. lse is not differentiable (as in flash-attn): it comes back
    with ``requires_grad=False``, so a loss through it alone raises instead of silently
    getting no gradient. The backward is the FlashAttention
    backward kernel (``fastattn.ops.flash_attn_bwd``): recomputed from out and lse, O(Sq + Sk)
    memory, bitwise reproducible gradients. A call that will be differentiated (grad mode on,
    q, k or v requiring grad) runs the forward on the tiled kernel whose arithmetic the
    backward repeats, also where up to 16 queries over at least 4x as many keys otherwise run
    on the KV-cache kernel. When |lse| exceeds 512 (scores scaled far beyond anything a model
    produces, where one fp32 lse per row cannot resolve P) the gradients come from an exact
    fp32 path with O(Sq * Sk) memory per head instead; on CUDA that test reads lse on the host
    and is made only when |softmax_scale| > 1. Below that, P is recomputed from the fp32 lse,
    whose rounding (about |lse| * 6e-8) reaches the probabilities: fp32 gradients of rows with
    |lse| in the tens to hundreds are less accurate than torch's fp32 softmax gives them (up to
    ~30x its error at |lse| ~ 250; the 16-bit dtypes' own rounding hides it). Second
    derivatives (``create_graph=True`` and a gradient of the gradients) raise a RuntimeError.

    NaN inputs: a NaN in q, or in a key a row sees, makes that row's output and lse NaN; a
    NaN in v reaches the rows that see its key, and rows that do not see it only where they
    share its key tile (through 0 * NaN; under torch's SDPA a NaN value reaches every row).
    Checked on the CPU kernels.
    """
    D = _check_qkv(q, k, v, ("(B, Sq, H, D)", "(B, Sk, Hk, D)"))
    causal = check_bool(causal, "causal")
    return_lse = check_bool(return_lse, "return_lse")
    left, right = _check_window(window)
    if causal:
        right = 0
    softmax_scale = check_softmax_scale(softmax_scale)
    softcap = check_softcap(softcap)
    if softmax_scale is None:
        softmax_scale = _default_softmax_scale(D)
    out, lse = ops.flash_attn_fwd(q, k, v, softmax_scale, left, right, softcap)
    return (out, lse) if return_lse else out


def _sdpa_kernel_covers(query, key, value, attn_mask, dropout_p, enable_gqa, scale) -> bool:
    """True when fastattn's kernel computes exactly what F.scaled_dot_product_attention would."""
    if attn_mask is not None or dropout_p != 0.0:
        return False  # dropout (or a dropout_p torch refuses, e.g. negative) is torch's
    if not torch._C._get_flash_sdp_enabled():  # (torch.backends.cuda.flash_sdp_enabled(), traceable)
        # sdpa_kernel(...) without SDPBackend.FLASH_ATTENTION (or enable_flash_sdp(False)):
        # the caller picked torch's backends (the math one for double backward, say), or
        # none that exists here (torch's "No viable backend" error).
        return False
    if scale is not None:
        try:
            check_softmax_scale(scale, "scale")
        except (TypeError, ValueError):
            return False  # torch decides what such a scale means (or how it fails)
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)):
        return False
    if query.is_nested or key.is_nested or value.is_nested:
        return False  # nested (jagged) batches: torch's nested SDPA
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if not (query.device == key.device == value.device) or query.device.type not in ("cpu", "cuda"):
        return False
    B, H, L, E = query.shape
    Hk, S = key.shape[1], key.shape[2]
    if key.shape != (B, Hk, S, E) or value.shape != key.shape:
        return False  # broadcasting batches or a value head dim != E: torch handles it
    if Hk != H and not (enable_gqa and Hk >= 1 and H % Hk == 0):
        return False  # torch raises its own error for these
    if L == 0 or S == 0 or B == 0 or H == 0:
        return False
    if query.is_cuda:
        # (training at head dim 256 on a 99 KiB GPU: torch's, whose backward runs there)
        needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        return (_CUDA_BUILT and query.dtype != torch.float32 and E in _CUDA_HEAD_DIMS
                and B <= _CUDA_GRID_MAX and H <= _CUDA_GRID_MAX  # (e.g. Swin's batch x windows)
                and cuda_kernels_run_on(query)
                and (not needs_grad or cuda_backward_fits(query, E)))
    return 1 <= E <= _CPU_MAX_HEAD_DIM


def _sdpa_autocast(query, key, value):
    """What autocast does to SDPA's inputs (it is in the lower-precision list of CPU and CUDA
    autocast): with autocast on for the device, every floating-point tensor on it other than
    float64 is cast to the autocast dtype. The fastattn op has no autocast kernel, so the
    cast is made here; the result then has the autocast dtype, as torch's."""
    if not isinstance(query, Tensor) or query.device.type not in ("cpu", "cuda"):
        return query, key, value
    device_type = query.device.type
    if not torch.is_autocast_enabled(device_type):
        return query, key, value
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if (isinstance(t, Tensor) and t.device.type == device_type and t.is_floating_point()
                and t.dtype not in (torch.float64, dtype)):
            return t.to(dtype)
        return t

    return cast(query), cast(key), cast(value)


# torch's own SDPA, taken once at import: the drop-in hands it what the kernel does not cover,
# and users swap the drop-in in (torch.nn.functional.scaled_dot_product_attention = it), after
# which looking the name up at call time would find the drop-in itself (endless recursion).
_TORCH_SDPA = torch.nn.functional.scaled_dot_product_attention
if getattr(_TORCH_SDPA, "__module__", None) == __name__:  # (a reload after such a swap)
    _TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on fastattn's kernel
    (``scale`` and ``enable_gqa`` keyword-only, as torch's parser has them).

    Args:
        query: (B, H, L, E); key, value: (B, Hk, S, E). Hk == H, or with ``enable_gqa`` any
            Hk dividing H (query head h reads kv head ``h // (H // Hk)``, as torch).
        attn_mask, dropout_p: a general mask or dropout are handed to torch unchanged.
        is_causal: TOP-LEFT aligned, as torch: query i sees keys ``j <= i`` (this differs
            from ``flash_attention(causal=True)`` when L != S). A Python bool, as torch
            (TypeError otherwise); so is ``enable_gqa``.
        scale: defaults to ``1 / sqrt(E)``. The scaled scores must be finite in fp32 (see
            ``flash_attention``).

    Returns:
        (B, H, L, E) in query's dtype, in torch's memory layout: query's (contiguous for a
        contiguous query), or contiguous where any of query, key, value has a last dim that
        is not contiguous (torch computes those with its math backend). The kernel writes a (B, L, H, E) buffer, so a query that is
        such a buffer transposed (or L = 1) costs nothing more; other layouts cost one copy
        of the output (measured on the CPU at 0.2-2.6% of the call for typical shapes, up to
        ~8% when S is tiny).

    Under autocast (CPU or CUDA), floating-point inputs other than float64 are cast to the
    autocast dtype first and the result has that dtype, exactly as torch's SDPA (which is on
    autocast's lower-precision list).

    What the kernel does not cover is computed by torch itself, so results and errors are
    torch's: ``attn_mask``, ``dropout_p > 0``, nested (jagged) tensors, inputs that are not
    4-D, broadcast batch dims, a value head dim differing from E, fp32 or head dims other
    than 32/64/96/128/192/256 on CUDA, empty inputs, other dtypes/devices, and every call while
    torch's flash backend is switched off (``torch.nn.attention.sdpa_kernel`` without
    ``SDPBackend.FLASH_ATTENTION``, e.g. the math backend for double backward, or
    ``torch.backends.cuda.enable_flash_sdp(False)``; under torch.compile, as it was when
    traced), and calls recorded by ``torch.jit.trace`` (which would fix the shapes' arithmetic
    as constants). Differentiable (see ``flash_attention`` for the backward).
    """
    # torch's own argument errors (its parser takes a Python bool only, not an int or a NumPy
    # bool): a truthy non-bool must not silently switch the mask on.
    for flag, name in ((is_causal, "is_causal"), (enable_gqa, "enable_gqa")):
        if not isinstance(flag, bool):
            kind = type(flag)
            kind = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
            raise TypeError(f"scaled_dot_product_attention(): argument '{name}' must be bool, not {kind}")
    if attn_mask is not None and _is_causal_bias(attn_mask):
        # torch.nn.attention.bias.causal_upper_left / causal_lower_right: torch's CausalBias
        # computes itself from its __torch_function__ only when the function called is the
        # one named torch.nn.functional.scaled_dot_product_attention, which after a swap is
        # this one (its uninitialised data was then read as a dense mask: silently wrong).
        return type(attn_mask)._dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                         enable_gqa=enable_gqa)
    query, key, value = _sdpa_autocast(query, key, value)
    # Forward-mode AD and torch.func's grad transforms (which fastattn's ops cannot serve, see
    # ops.differentiating_transform) are torch's too.
    # torch.jit.trace records Python arithmetic on shapes as constants (the causal band, the
    # default scale, the output layout's strides): a traced drop-in was silently wrong at any
    # other shape, so tracing records torch's own SDPA, one op that traces exactly.
    if torch.jit.is_tracing() or not _sdpa_kernel_covers(query, key, value, attn_mask, dropout_p, enable_gqa,
                                                         scale) or (
            ops.transform_active() and ops.differentiating_transform(query, key, value)):
        return _TORCH_SDPA(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa,
        )
    L, S = query.shape[2], key.shape[2]
    # (B, H, L, E) -> (B, L, H, E) is a free transpose: the op takes any batch/row/head strides.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    unit_last = q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    if not unit_last:
        q, k, v = _contiguous_last_dim(q), _contiguous_last_dim(k), _contiguous_last_dim(v)
    left, right = -1, -1
    if is_causal:
        k, v, right = _top_left_causal(k, v, L)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    out, _lse = ops.flash_attn_fwd(q, k, v, float(scale), left, right)
    out = out.transpose(1, 2)
    # torch returns query's memory layout (its kernels write an empty_like of the query, whose
    # last dim they make contiguous first), so code that views the result (out.view(B, -1))
    # works on ours too. The kernel writes (B, L, H, E): free when query is that buffer
    # transposed (a q projection viewed and transposed, as in Hugging Face models; and L = 1
    # decode steps); any other query layout costs one copy of the output, a few percent of
    # the attention on the CPU (the copy is O(L * E) per head, the kernel O(L * S * E)).
    if not unit_last or torch._C._functorch.is_batchedtensor(out):
        # torch's fused kernels take a unit last-dim stride only (its check counts a size-1
        # head dim too) on all three inputs; otherwise its math backend computes, and returns
        # a contiguous result whatever query's layout (a strided k or v alone decides it).
        # Under torch.vmap torch's batching rule gives a contiguous result too (a batched
        # query's per-example strides, whose vmapped dim lies between them, leave gaps).
        out = out.contiguous()
    elif out.stride() != query.stride() and any(
            n > 1 and so != sq for n, so, sq in zip(out.shape, out.stride(), query.stride())):
        out = _in_layout_of(out, query)
    return out


def _top_left_causal(k: Tensor, v: Tensor, seqlen_q):
    """Top-left causal attention (SDPA's ``is_causal``: query i sees keys j <= i) in the kernels'
    bottom-right terms: k/v (B, Sk, Hk, D) -> (k', v', window_right). The keys j >= seqlen_q
    are seen by no query, so keeping the first min(Sk, seqlen_q) leaves the bottom-right band
    with right = seqlen_q - min(Sk, seqlen_q) (0 when Sk >= seqlen_q). No branch on symbolic
    lengths: compiled with dynamic shapes (or exported with separate lengths), one graph
    serves every pair (eager, with plain ints, it branches: ~10 us less per call)."""
    seqlen_k = k.shape[1]
    # (eager: no view to make. Not while dynamo traces, where a SymInt's type reads as int and
    # the branch would become a guard on Sk vs seqlen_q.)
    if not ops._compiling() and type(seqlen_k) is int and type(seqlen_q) is int:
        if seqlen_k <= seqlen_q:
            return k, v, seqlen_q - seqlen_k
        return k.narrow(1, 0, seqlen_q), v.narrow(1, 0, seqlen_q), 0
    kept = torch.sym_min(seqlen_k, seqlen_q)
    right = seqlen_q - kept
    if torch.compiler.is_exporting() and not (statically_known_true(kept == seqlen_k)
                                              or statically_known_true(kept != seqlen_k)):
        # export records whether each view is contiguous, and for a (B, Sk, ...) buffer cut to
        # `kept` rows that is a guard on Sk vs seqlen_q: the graph would then refuse the other
        # relation (lengths whose relation is known, static ones included, take the view). A gather is contiguous at every length (one copy of the kept keys and
        # values, O(Sk * Hk * D) beside the kernel's O(seqlen_q * Sk * D)).
        rows = torch.arange(kept, device=k.device)
        return k.index_select(1, rows), v.index_select(1, rows), right
    return k.narrow(1, 0, kept), v.narrow(1, 0, kept), right


def _is_causal_bias(mask) -> bool:
    return _any_instance_of_loaded("torch.nn.attention.bias", "CausalBias", mask)


# TorchScript compiles a call to a Python function unless it is registered as a builtin: after
# the swap, torch.jit.script of nn.MultiheadAttention (or of anything calling F.sdpa) tried to
# compile this function and failed on its keyword-only arguments. Scripted code calls torch's
# own op instead (as a jit.trace records it, above).
torch.jit._builtins._register_builtin(scaled_dot_product_attention, "aten::scaled_dot_product_attention")


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)  # (as torch: a size-0 dim counts as 1)
    return tuple(reversed(strides))


def _in_layout_of(out: Tensor, like: Tensor) -> Tensor:
    """out's values in the memory layout of torch.empty_like(like). The buffer is made from out
    (new_empty_strided), not from like: under vmap over key and value only, the query is
    unbatched where out is batched, and a copy into an empty_like of the query fails (eager and
    compiled). Traceable with symbolic strides (torch.compile(dynamic=True), export)."""
    if not (ops._compiling() or torch.compiler.is_exporting()) and like.stride() == _contiguous_strides(like.shape):
        # Eager, and like has exactly the contiguous strides, size-1 dims included (the usual
        # query): .contiguous() is that layout, ~3 us cheaper than the meta tensor below.
        # (is_contiguous() would also pass a size-1 dim with another stride, which empty_like
        # keeps: a batch-1 query sliced from a packed projection.)
        return out.contiguous()
    strides = torch.empty_like(like, device="meta").stride()
    return out.new_empty_strided(like.shape, strides).copy_(out)

# ---- variable-length (packed) flash attention --------------------------------------------
__all__ += ["flash_attention_varlen"]


_INT32_MAX = 2**31 - 1


def _check_max_seqlen(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (_numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be a Python int (an upper bound on the sequence lengths), "
                        f"got {type(value).__name__}: {value!r}")
    if isinstance(value, torch.SymInt) or torch.compiler.is_exporting():
        # Traced: a length from a shape, or from `.item()` (flash-attn's idiom: the max of
        # cu_seqlens' differences), which no branch may read; the bounds become checks the
        # graph runs (strict export's dynamo shows a SymInt as an int, hence is_exporting).
        check_traced(value >= 0, f"{name} must be >= 0")
        check_traced(value <= _INT32_MAX, f"{name} must be <= {_INT32_MAX} (sequence lengths are int32)")
        return value
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > _INT32_MAX:  # the op's limit (lengths are int32, as cu_seqlens)
        raise ValueError(f"{name} must be <= {_INT32_MAX} (sequence lengths are int32, as cu_seqlens), got {value}")
    return int(value)


def _check_cu_seqlens(cu_seqlens, name: str, ref: Tensor) -> None:
    check_tensor(cu_seqlens, name)
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(
            f"{name} must be 1-D of length B + 1 (cumulative sequence lengths from 0), got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != ref.device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but must be on {ref.device} with q, k and v")


def flash_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window=(-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """FlashAttention over a packed batch of variable-length sequences (flash-attn's varlen API).

    Sequence ``i`` owns query rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of q and key/value
    rows ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` of k and v, and its output is
    ``flash_attention(q_i[None], k_i[None], v_i[None], ...)[0]`` on those slices: no padding,
    no attention across sequences, the same masking, scale, GQA and lse conventions, and on
    the CPU the same bits, outputs and gradients (bf16 on AVX512-BF16 pairs each sequence's
    own keys, as flash_attention does on its slice), except for a slice of at most 16 queries
    over at least 4x as many keys in a call that is not differentiated: flash_attention alone
    runs those on the KV-cache kernel, whose sums differ from the tiled kernel's by fp32
    rounding.

    Args:
        q: (total_q, H, D) queries of all sequences, concatenated along tokens. float32/
            float16/bfloat16 on the CPU (D in 1..512), float16/bfloat16 on CUDA (D in 32, 64,
            96, 128, 192, 256). Last dim contiguous; the other strides are free (e.g. a slice of a packed
            qkv projection).
        k, v: (total_k, Hk, D) with q's dtype and device; ``H % Hk == 0`` (GQA/MQA: query
            head h reads kv head ``h // (H // Hk)``).
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 on q's device, cumulative lengths:
            ``[0, len_0, len_0 + len_1, ..., total]``. Sequences of length 0 are allowed (a
            query row whose sequence has no key outputs 0, lse -inf). Both have B + 1 entries.
        max_seqlen_q, max_seqlen_k: Python ints, upper bounds on the per-sequence lengths
            (used to size the launch; under torch.compile they stay Python ints and nothing
            reads cu_seqlens on the host).
        causal: bottom-right aligned per sequence: query i of a sequence with lengths
            (Sq_i, Sk_i) sees keys ``j <= i + Sk_i - Sq_i``.
        softmax_scale: defaults to ``1 / sqrt(D)``; as ``flash_attention``'s (|softmax_scale|
            <= 2.35865e38), with the scaled scores finite in fp32 (as ``flash_attention``:
            unspecified where they overflow).
        window: (left, right) sliding window per sequence, as ``flash_attention``: query i
            sees keys in ``[i + Sk_i - Sq_i - left, i + Sk_i - Sq_i + right]``; -1 (or any
            side >= max_seqlen_q + max_seqlen_k) is unbounded; ``causal`` sets right = 0.
        softcap: > 0 caps each scaled score s to ``softcap * tanh(s / softcap)`` before the
            softmax, as ``flash_attention``; 0 = off.
        return_lse: also return the log-sum-exp of the (capped) scaled scores.

    Returns:
        out (total_q, H, D) contiguous in q's dtype; with return_lse, ``(out, lse)`` where lse
        is (H, total_q) float32 (natural log, flash-attn's varlen layout).

    Validation: on the CPU the values of cu_seqlens are checked (start at 0, non-decreasing,
    end at or before total_q / total_k, every length <= max_seqlen) and a violation raises
    ValueError. Rows past ``cu_seqlens_q[-1]`` / ``cu_seqlens_k[-1]`` (spare rows of a
    preallocated buffer, as flash-attn allows) belong to no sequence and are not read; on the
    CPU their output and gradients are 0 and their lse -inf, on CUDA they are left unwritten
    (as in flash-attn).
    On CUDA they are not read on the host (that would synchronise; a training step or a CUDA
    graph must not): the kernels clamp every sequence's rows to the tensors and its lengths
    to max_seqlen, so malformed cu_seqlens are memory-safe but give unspecified results.

    Differentiable in q, k and v (the FlashAttention backward kernel, bitwise reproducible
    gradients; lse is not differentiable). Second derivatives raise a RuntimeError.
    """
    D = _check_qkv(q, k, v, ("(total_q, H, D)", "(total_k, Hk, D)"))
    _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q)
    _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must have the same length B + 1 (one entry per sequence, plus one), "
            f"got {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
        )
    max_seqlen_q = _check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    max_seqlen_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    causal = check_bool(causal, "causal")
    return_lse = check_bool(return_lse, "return_lse")
    left, right = _check_window(window)
    if causal:
        right = 0
    softmax_scale = check_softmax_scale(softmax_scale)
    softcap = check_softcap(softcap)
    if softmax_scale is None:
        softmax_scale = _default_softmax_scale(D)
    out, lse = ops.flash_attn_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, left, right, softcap
    )
    return (out, lse) if return_lse else out


# ---- attention over a KV cache: decode_attention, attention_with_kvcache, append_kv -------
__all__ += ["decode_attention", "attention_with_kvcache", "append_kv"]

from ._validate import check_softmax_scale  # noqa: E402

_DECODE_CUDA_HEAD_DIMS = (64, 96, 128, 256)
# The decode kernels' shared memory per block (decode_cuda_launch_smem_bytes in
# csrc/cuda/decode.cu; tests/test_decode_emulated.py checks this rule against it): every shape
# fits 163 KiB (sm_80, sm_90); on parts with 99 KiB (sm_86 / sm_89 / sm_120: RTX 30xx-50xx, A10,
# L4, L40S) head dim 64 does, and 128 with one query per sequence and no softcap (the
# tensor-core kernel's 2-stage variant); the other shapes' kernels raise there.
_DECODE_SMEM_ALL_SHAPES = 163 * 1024


def decode_cuda_fits(t: Tensor, head_dim: int, seqlen_q: int = 1, softcap: float = 0.0) -> bool:
    """Whether the CUDA decode kernels (decode_attention, attention_with_kvcache) run this shape
    on t's GPU, by its shared memory per block (see above). True where torch does not report the
    limit, and while torch.compile traces unless an eager call already read it."""
    optin = _smem_optin(t)
    return optin is None or _decode_smem_fits(optin, head_dim, seqlen_q, softcap)


def _decode_smem_fits(optin: int, head_dim: int, seqlen_q: int, softcap: float) -> bool:
    if optin >= _DECODE_SMEM_ALL_SHAPES:
        return True
    return head_dim == 64 or (head_dim == 128 and seqlen_q == 1 and not softcap > 0)


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


def _check_caches(k_cache, v_cache, paged: bool = False) -> None:
    check_float(k_cache, "k_cache")
    check_tensor(v_cache, "v_cache")
    check_same_device(v_cache, k_cache, "v_cache", "k_cache")
    check_same_dtype(v_cache, k_cache, "v_cache", "k_cache")
    layout = "(num_pages, page_size, Hk, D) (a page pool, as block_table is given)" if paged else "(B, S_max, Hk, D)"
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be 4-D {layout}, got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    check_last_dim_contiguous(k_cache, "k_cache")
    check_last_dim_contiguous(v_cache, "v_cache")
    if paged and k_cache.shape[1] < 1:
        raise ValueError(f"the page size (k_cache.shape[1]) must be >= 1, got shape {tuple(k_cache.shape)}")


def _check_block_table(block_table, k_cache: Tensor, batch: int) -> None:
    check_tensor(block_table, "block_table")
    if block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.device != k_cache.device:
        raise ValueError(f"block_table is on {block_table.device} but must be on {k_cache.device} with the caches")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(
            f"block_table must have shape ({batch}, max_pages_per_seq) (one row of page indices per sequence), "
            f"got {tuple(block_table.shape)}"
        )


def _check_cache_query(q, k_cache, v_cache, cache_seqlens, block_table, batch: int) -> None:
    """Checks shared by decode_attention and attention_with_kvcache (q's rank is theirs)."""
    check_float(q, "q", cuda_16bit_only=True)
    _check_caches(k_cache, v_cache, paged=block_table is not None)
    check_same_device(k_cache, q, "k_cache", "q")
    check_same_dtype(k_cache, q, "k_cache", "q")
    check_last_dim_contiguous(q, "q")
    H, D = q.shape[-2], q.shape[-1]
    Hk = k_cache.shape[2]
    if block_table is None:
        if k_cache.shape[0] != batch:  # (a larger cache batch was cut to q's before)
            raise ValueError(f"k_cache has batch {k_cache.shape[0]} but q has batch {batch} "
                             f"(a contiguous cache needs at least q's batch)")
    else:
        _check_block_table(block_table, k_cache, batch)
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache has head dim {k_cache.shape[3]} but q has head dim {D}")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the number of kv heads ({Hk}): "
                         f"q's heads are its dim -2, the caches' their dim 2 (k_cache (B, S_cache, Hk, D))")
    if q.is_cuda and D not in _DECODE_CUDA_HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported on CUDA (supported: {_DECODE_CUDA_HEAD_DIMS})")
    _check_cache_seqlens(cache_seqlens, q, batch)


def _kvcache_conveniences(q, k_cache, v_cache, cache_seqlens, block_table):
    """flash-attn's ``flash_attn_with_kvcache`` conveniences, for decode_attention and
    attention_with_kvcache: ``cache_seqlens`` as a Python int (every sequence has that length;
    an int32 tensor on the caches' device is made from it), and a contiguous cache whose batch
    is larger than q's (a cache preallocated for the largest batch: sequence b is its row b,
    rows from B on are neither read nor written). Anything else passes through unchanged to the
    checks."""
    if not (isinstance(q, Tensor) and isinstance(k_cache, Tensor) and isinstance(v_cache, Tensor)):
        return k_cache, v_cache, cache_seqlens
    if q.dim() not in (3, 4):
        return k_cache, v_cache, cache_seqlens
    B = q.shape[0]
    if isinstance(cache_seqlens, torch.SymInt):  # a length from a shape while torch.compile / export traces
        check_traced(cache_seqlens >= 0, "cache_seqlens must be >= 0")
        check_traced(cache_seqlens < 2**31, "cache_seqlens must be < 2^31 (an int32 length)")
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=k_cache.device)
    elif is_integer(cache_seqlens):
        n = int(cache_seqlens)
        if not 0 <= n < 2**31:
            raise ValueError(f"cache_seqlens must be in [0, 2^31) (an int32 length), got {n}")
        cache_seqlens = torch.full((B,), n, dtype=torch.int32, device=k_cache.device)
    k_cache, v_cache = _batch_rows(k_cache, v_cache, B, block_table)
    return k_cache, v_cache, cache_seqlens


def _batch_rows(k_cache, v_cache, B: int, block_table):
    """The first B rows of a contiguous (k_cache, v_cache) preallocated for a larger batch
    (sequence b is row b; rows from B on are neither read nor written); anything else (a paged
    pool, caches of different shapes, a smaller batch) unchanged, for the checks to report."""
    if block_table is None and k_cache.dim() == 4 and v_cache.shape == k_cache.shape:
        if torch.compiler.is_exporting():
            # Exported with the cache batch as a dim of its own: no branch on it (one graph
            # serves every cache batch >= q's; cutting a row-major cache's batch is contiguous
            # at any size, so no guard either). A batch known to be smaller goes to the checks.
            if not (statically_known_true(k_cache.shape[0] == B) or statically_known_true(k_cache.shape[0] < B)):
                check_traced(k_cache.shape[0] >= B, "k_cache needs at least q's batch")
                return k_cache.narrow(0, 0, B), v_cache.narrow(0, 0, B)
        elif k_cache.shape[0] > B:
            return k_cache[:B], v_cache[:B]
    return k_cache, v_cache


# decode::kMaxSplits (csrc/include/fastattn/decode_split.h): the ops refuse more splits. Checked
# here too, before attention_with_kvcache appends: a call that raises must leave the caches alone.
_MAX_SPLITS = 128


def _check_num_splits(num_splits) -> int:
    if not is_integer(num_splits):
        raise TypeError(f"num_splits must be an int in [0, {_MAX_SPLITS}] (0 = automatic), "
                        f"got {type(num_splits).__name__}: {num_splits!r}")
    if not 0 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [0, {_MAX_SPLITS}] (0 = automatic), got {num_splits}")
    return int(num_splits)


def _check_pages_cpu(block_table: Tensor, pool: Tensor, cache_seqlens: Tensor, extra: int) -> None:
    """CPU only (values are read on the host): every page holding a token of
    ``[0, cache_seqlens[b] + extra)`` must be an index into the pool, as the op checks. Lengths
    outside [0, capacity] are clamped here; append_kv reports them (before it writes)."""
    num_pages, page_size = pool.shape[0], pool.shape[1]
    max_pages = block_table.shape[1]
    if block_table.numel() == 0:
        return
    # Common case first: every entry of the table is a page (one reduction, ~5x cheaper than
    # the masked test below, which runs on every decode step of a paged model otherwise).
    lo, hi = torch.aminmax(block_table)
    if int(lo) >= 0 and int(hi) < num_pages:
        return
    last = (cache_seqlens.to(torch.int64) + extra).clamp(0, max_pages * page_size)
    used = torch.arange(max_pages) < ((last + page_size - 1) // page_size)[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a page of the pool (num_pages = {num_pages}); "
            f"sequence {b} uses its tokens [0, {int(last[b])}) there"
        )


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    softmax_scale: Optional[float] = None,
    num_splits: int = 0,
    return_lse: bool = False,
    block_table: Optional[Tensor] = None,
    softcap: float = 0.0,
):
    """Attention of one new query token per sequence over a KV cache (the decode step).

    ``out[b, h] = softmax(cap(softmax_scale * q[b, h] . K_b[:L_b, h // G])) V_b[:L_b, h // G]``
    with ``G = H // Hk``, ``L_b = cache_seqlens[b]`` (ragged batches) and ``K_b`` sequence
    b's keys (its cache row, or its pages).

    Args:
        q: (B, H, D) or (B, 1, H, D); float32/float16/bfloat16 on the CPU, float16/bfloat16
            on CUDA. Last dim contiguous.
        k_cache, v_cache: q's dtype, ``H % Hk == 0`` (GQA/MQA, query head h reads kv head
            ``h // (H // Hk)``), last dim contiguous, other strides free (e.g. a view of a
            larger cache). CUDA: D in {64, 96, 128, 256}; CPU: any D.
            Contiguous cache (``block_table=None``): (B, S_max, Hk, D), or (B', S_max, Hk, D)
            with B' > B (a cache preallocated for a larger batch, as flash-attn allows:
            sequence b uses row b, the rows from B on are not touched).
            Paged cache: page pools (num_pages, page_size, Hk, D), any page_size >= 1.
        cache_seqlens: (B,) int32 on q's device, or a Python int (every sequence has that
            length, as flash-attn takes it); sequence b attends to its tokens
            ``[0, cache_seqlens[b])``. A sequence of length 0 gets out = 0 and lse = -inf.
            Values must lie in [0, capacity] (S_max, or max_pages_per_seq * page_size):
            checked on the CPU; on CUDA they are not read on the host (that would
            synchronise) and are clamped into that range by the kernel.
        softmax_scale: a finite real number, default ``1 / sqrt(D)``, |softmax_scale| <=
            2.35865e38 (as ``flash_attention``). NaN, +-inf and larger values raise
            ValueError (they would make outputs NaN), a non-number TypeError. The scaled
            scores ``softmax_scale * q.k`` (and ``softmax_scale * log2(e) * q``) must be
            finite in fp32: where one overflows to +-inf the result is unspecified (zeros,
            NaN or another key's value row; not checked), as in ``flash_attention``.
        num_splits: split-KV factor in [0, 128] (each sequence's keys are cut into this many
            chunks, merged exactly). 0 picks it: on CUDA from the shapes and the SM count only,
            never from the values of cache_seqlens (no host synchronisation, so a decode step
            can be captured in a CUDA graph); on the CPU, which reads the lengths anyway to
            check them, from the batch size and the longest sequence (not the capacity S_max).
            Never from the thread count: the same bits on any number of threads.
        return_lse: also return lse (B, H) float32, the natural-log sum of exp(scores).
        block_table: (B, max_pages_per_seq) int32 on q's device, for a paged cache: token t
            of sequence b is ``k_cache[block_table[b, t // page_size], t % page_size]``.
            Only the entries of pages holding tokens < cache_seqlens[b] are read (the rest
            may hold anything); pages may be shared between sequences and listed in any
            order. On the CPU every used entry is checked to be in [0, num_pages)
            (ValueError); on CUDA the table is never read on the host and the kernel clamps
            entries into the pool, so a bad entry reads a wrong page but never memory
            outside the pool.
        softcap: logit soft-capping, ``cap(s) = softcap * tanh(s / softcap)`` when > 0
            (Gemma 2); 0 = off (``cap(s) = s``). As in ``flash_attention``.

    Returns:
        out with q's shape and dtype, or ``(out, lse)`` with return_lse.

    Not differentiable (an inference op): the outputs never require grad. Accumulation is fp32.
    A NaN in q or in a cached key a row sees makes its output and lse NaN (whatever
    num_splits), as in ``flash_attention``.
    """
    if not isinstance(q, Tensor):
        check_tensor(q, "q")
    if not (q.dim() == 3 or (q.dim() == 4 and q.shape[1] == 1)):
        raise ValueError(f"q must be (B, H, D) or (B, 1, H, D), got shape {tuple(q.shape)}")
    k_cache, v_cache, cache_seqlens = _kvcache_conveniences(q, k_cache, v_cache, cache_seqlens, block_table)
    _check_cache_query(q, k_cache, v_cache, cache_seqlens, block_table, q.shape[0])
    softmax_scale = check_softmax_scale(softmax_scale)
    softcap = check_softcap(softcap)
    num_splits = _check_num_splits(num_splits)
    return_lse = check_bool(return_lse, "return_lse")
    out, lse = ops.decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale, num_splits, block_table,
                                    softcap)
    return (out, lse) if return_lse else out


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    causal: bool = True,
    window=(-1, -1),
    softmax_scale: Optional[float] = None,
    softcap: float = 0.0,
    num_splits: int = 0,
    return_lse: bool = False,
    check_capacity: bool = True,
):
    """Several new query tokens per sequence over a KV cache: the chunked-prefill,
    speculative-decoding or multi-token step (flash-attn's ``flash_attn_with_kvcache``).

    If ``k``/``v`` are given they are first written into the caches at each sequence's
    tokens ``[cache_seqlens[b], cache_seqlens[b] + Sq)`` (as ``append_kv``), and the keys
    are ``L_b = cache_seqlens[b] + Sq`` tokens; without them the cache already holds the
    keys and ``L_b = cache_seqlens[b]``. Then, per sequence, the Sq queries attend to keys
    ``[0, L_b)`` bottom-right aligned: query i sits at key position ``L_b - Sq + i`` (with
    k/v given, that is ``cache_seqlens[b] + i``) and, causal, sees keys up to it; a window
    ``(left, right)`` limits it to ``[pos - left, pos + right]`` (-1 = unbounded). A query
    that sees no key (Sq > L_b, causal) gets out = 0 and lse = -inf. ``cache_seqlens`` is
    NOT advanced: the caller adds Sq after the step.

    Args:
        q: (B, Sq, H, D), Sq >= 0; dtypes as ``decode_attention``. Read as passed: a q that
            shares memory with a cache (e.g. views the rows the append writes) is copied
            first (in eager mode).
        k_cache, v_cache: (B, S_max, Hk, D), or page pools (num_pages, page_size, Hk, D)
            with ``block_table``, as in ``decode_attention``. Written in place when k/v are
            given.
        cache_seqlens: (B,) int32, as in ``decode_attention``; with k/v, every
            ``cache_seqlens[b] + Sq`` must fit the capacity (ValueError; on CUDA inside a
            graph capture the rows past capacity are dropped instead, as ``append_kv``).
        k, v: (B, Sq, Hk, D) new keys/values for the q tokens, or both None.
        block_table: (B, max_pages_per_seq) int32 for a paged cache (see ``decode_attention``).
        causal: mask keys after each query's position (default True, as a decoder needs;
            flash-attn's flash_attn_with_kvcache defaults to False: code ported from it that
            relies on that default must pass causal=False). Argument names follow this
            package (``window``, not flash-attn's ``window_size``; the cache comes before the
            new k / v); flash-attn's rotary_cos / cache_batch_idx / cache_leftpad / alibi are
            not taken (a TypeError names them).
        window: (left, right) sliding window, -1 = unbounded; causal sets right = 0.
        softmax_scale, softcap, num_splits: as in ``decode_attention`` (the scaled scores
            must be finite in fp32).
        return_lse: also return lse (B, H, Sq) float32.
        check_capacity: with k/v, as ``append_kv``'s: False skips the capacity check's host read
            of cache_seqlens on CUDA (one synchronisation a call) for callers that bound the
            lengths themselves; rows past the capacity are then dropped. The CPU checks anyway.

    A call that raises leaves the caches unchanged: every check (on the CPU also the page
    indices of all tokens ``[0, cache_seqlens[b] + Sq)``) runs before k/v are appended.
    Two exceptions, both after the append: under torch.compile (where reading values would
    break the graph) the page indices of the tokens already cached are checked by the attention
    op; on CUDA the grid limits (B and Hk x row slices <= 65535) are checked when the kernel is
    chosen (the decode kernel's shared memory on 99 KiB parts before the append). A call that
    raises there has written the new rows past ``cache_seqlens``, which it does not advance:
    the valid tokens are unchanged.

    Returns:
        out (B, Sq, H, D) in q's dtype, or ``(out, lse)``.

    With Sq = 1 and no window this is ``decode_attention`` (same kernel). Forward only: not
    differentiable. On CUDA, one thread block serves up to 32 (query, head) rows of a kv
    head, so large Sq * H / Hk re-reads the cache once per 32 rows (fine for speculative
    decoding; long chunked prefills are better served by ``flash_attention``).
    """
    check_tensor(q, "q")
    if q.dim() != 4:
        raise ValueError(f"q must be (B, Sq, H, D), got shape {tuple(q.shape)}")
    B, Sq = q.shape[0], q.shape[1]
    k_cache, v_cache, cache_seqlens = _kvcache_conveniences(q, k_cache, v_cache, cache_seqlens, block_table)
    _check_cache_query(q, k_cache, v_cache, cache_seqlens, block_table, B)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values) or both be None")
    causal = check_bool(causal, "causal")
    return_lse = check_bool(return_lse, "return_lse")
    check_capacity = check_bool(check_capacity, "check_capacity")
    left, right = _check_window(window)
    if causal:
        right = 0
    softmax_scale = check_softmax_scale(softmax_scale)
    softcap = check_softcap(softcap)
    num_splits = _check_num_splits(num_splits)
    if k is not None:
        for t, name in ((k, "k"), (v, "v")):
            check_tensor(t, name)
        Hk, D = k_cache.shape[2], k_cache.shape[3]
        if k.dim() != 4 or tuple(k.shape) != (B, Sq, Hk, D):
            raise ValueError(f"k must be (B, Sq, Hk, D) = ({B}, {Sq}, {Hk}, {D}) to match q and k_cache, "
                             f"got shape {tuple(k.shape)}")
        if q.is_cuda and not decode_cuda_fits(q, D, Sq, softcap):
            raise RuntimeError(
                f"fastattn.attention_with_kvcache: the decode kernel for head dim {D}, {Sq} queries per sequence"
                f"{', softcap' if softcap > 0 else ''} needs more shared memory per block than this GPU allows "
                "(GPUs with 99 KiB per block, sm_86 / sm_89 / sm_120, run it at head dim 64, and at 128 with one "
                "query per sequence and no softcap); the caches were not touched")
        # Every check the attention op makes runs before the append, so a call that raises
        # leaves the caches as they were (a caller that catches and retries must not append
        # twice). The op's CPU page check covers tokens [0, cache_seqlens + Sq), append_kv's
        # only the new rows: the pages of the tokens already cached are checked here. On CUDA
        # neither op reads the table on the host (the kernels clamp page indices), and under
        # torch.compile reading values would break the graph: the op checks after the append.
        if block_table is not None and k_cache.device.type == "cpu" and host_values_readable(block_table,
                                                                                             cache_seqlens):
            _check_pages_cpu(block_table, k_cache, cache_seqlens, Sq)
        if type(q) is Tensor and not torch.compiler.is_compiling() and any(
                q.untyped_storage().data_ptr() == c.untyped_storage().data_ptr()
                and _elements_overlap(q, c) is not False for c in (k_cache, v_cache)):
            # q is attention's input as passed: a q that shares elements with a cache (a view
            # of the rows being written, or may be) is copied before the append, which would
            # otherwise change it first (silently wrong output). Decided from the storages
            # first (~1 us; the element test only for a q inside a cache's storage). Traced,
            # or for a tensor subclass (fake tensors: no data pointers), not detected.
            q = q.clone()
        try:
            append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table=block_table, check_capacity=check_capacity)
        except (ValueError, RuntimeError) as e:  # the op's messages name append_kv, which this caller did not call
            msg, prefix = str(e), "fastattn.append_kv: "
            if type(e) not in (ValueError, RuntimeError) or not msg.startswith(prefix):
                raise
            raise type(e)(f"fastattn.attention_with_kvcache (appending k, v): {msg[len(prefix):]}") from None
    lengths, seqlens_k_add = cache_seqlens, (Sq if k is not None else 0)
    if k is not None and torch.jit.is_tracing():
        # torch.jit.trace records an int argument as a constant (a trace of a decode step would
        # read one new row at every chunk length): the lengths after the append as a tensor
        # instead, from the traced size (the kernel reads cache_seqlens[b] + seqlens_k_add).
        lengths, seqlens_k_add = cache_seqlens + q.shape[1], 0
    out, lse = ops.attention_with_kvcache(q, k_cache, v_cache, lengths, block_table, softmax_scale, left,
                                          right, seqlens_k_add, num_splits, softcap)
    return (out, lse) if return_lse else out


def append_kv(
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor,
    v: Tensor,
    cache_seqlens: Tensor,
    *,
    block_table: Optional[Tensor] = None,
    check_capacity: bool = True,
) -> None:
    """Write new keys/values into the caches in place: token ``cache_seqlens[b] + i`` of
    sequence b becomes ``k[b, i]`` (same for v).

    Args:
        k_cache, v_cache: (B, S_max, Hk, D), or page pools (num_pages, page_size, Hk, D) with
            ``block_table``; modified in place; last dim contiguous, other strides free. A
            contiguous cache may have a larger batch than k (preallocated for the largest
            batch): sequence b is its row b, the rows from B on are not touched.
        k, v: (B, Sn, Hk, D) with the caches' dtype and device.
        cache_seqlens: (B,) int32 on the caches' device: the current valid length of each
            sequence, i.e. where its new rows go. It is NOT advanced: the caller does
            ``cache_seqlens += Sn`` after the call (so several layers can append with the
            same lengths before one update).
        block_table: (B, max_pages_per_seq) int32, for a paged cache (see
            ``decode_attention``): the pages that will hold the new tokens must be in the
            table already (the caller allocates pages).
        check_capacity: True (default) checks the lengths as below. False is for callers
            that guarantee them (e.g. a decode loop that bounds its lengths on the host): on
            CUDA it skips the check and its host read of cache_seqlens; on the CPU, where
            the check costs no sync, it still runs.

    Raises ValueError when a write would land past the capacity (``cache_seqlens[b] + Sn >
    S_max``, or ``max_pages_per_seq * page_size``) or at a negative row, and on the CPU when
    a page index it would write is not in [0, num_pages). On CUDA the capacity check reads
    cache_seqlens on the host (one synchronisation) and is skipped with
    ``check_capacity=False`` or while a CUDA graph is being captured; then the kernel
    silently drops out-of-range rows instead (memory is never written out of bounds); page
    indices are never read on the host there and are clamped into the pool. Two sequences
    appending into the same page rows race: the allocator must give each its own pages for
    new tokens.

    An in-place op like torch's own: it bumps the caches' version counters (a cache saved
    for some backward and then appended to is reported when that backward runs). It is not
    differentiable, so with grad mode on it raises RuntimeError if a cache, k or v requires
    grad (call it under ``torch.no_grad()``/``torch.inference_mode()``). ValueError if a
    cache has elements sharing memory (an expand), if the two caches share elements (the
    same tensor twice; k and v interleaved in one buffer are fine), or if k, v,
    cache_seqlens or block_table share memory with a cache. k and v may be the same tensor
    (both are only read).
    """
    paged = block_table is not None
    _check_caches(k_cache, v_cache, paged=paged)
    for t, name in ((k, "k"), (v, "v")):
        check_tensor(t, name)
        check_same_device(t, k_cache, name, "k_cache")
        check_same_dtype(t, k_cache, name, "k_cache")
    # A contiguous cache preallocated for a larger batch than k's (as attention_with_kvcache /
    # decode_attention accept): sequence b is its row b; rows from B on are not touched.
    if k.dim() == 4:
        k_cache, v_cache = _batch_rows(k_cache, v_cache, k.shape[0], block_table)
    _, _, Hk, D = k_cache.shape
    B = k.shape[0] if (paged and k.dim() == 4) else k_cache.shape[0]
    if k.dim() != 4 or k.shape[0] != B or k.shape[2] != Hk or k.shape[3] != D:
        batch = "B" if paged else str(B)
        raise ValueError(f"k must be (B, Sn, Hk, D) = ({batch}, Sn, {Hk}, {D}) to match k_cache, "
                         f"got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    check_last_dim_contiguous(k, "k")
    check_last_dim_contiguous(v, "v")
    if paged:
        _check_block_table(block_table, k_cache, B)
    _check_cache_seqlens(cache_seqlens, k_cache, B)
    check_capacity = check_bool(check_capacity, "check_capacity")
    ops.append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table, check_capacity)
