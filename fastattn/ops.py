"""1:1 Python wrappers of ``torch.ops.fastattn.*`` with their fake (meta) impls and autograd.

Everything torch.compile and ``torch.library.opcheck`` need lives here, next to the op it
describes: a ``register_fake`` giving output shapes/dtypes without running a kernel, and a
``register_autograd`` wiring the backward op. One section per op; the public, validated API
is in ``functional.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.autograd.forward_ad as _fw_ad
from torch import Tensor

from ._C_loader import load as _load

_load()
_ops = torch.ops.fastattn

_grad_enabled = torch._C.is_grad_enabled
_below_autograd = torch._C._AutoDispatchBelowAutograd
_any_requires_grad = torch._C._any_requires_grad
_compiling = torch.compiler.is_compiling
_peek_interpreter = torch._C._functorch.peek_interpreter_stack
_is_grad_tracking = torch._C._functorch.is_gradtrackingtensor
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_functorch_unwrapped = torch._C._functorch.get_unwrapped
_layer_depth = torch._C._functorch.get_dynamic_layer_stack_depth  # dynamo folds it (with a guard)


def _compiled_grad_transform() -> bool:
    """While torch.compile traces: whether a torch.func grad transform (grad, vjp, jacrev) may
    track the call's tensors, as far as dynamo lets it be asked: functorch's layer depth and
    the innermost transform's kind (a tensor's grad tracking cannot be read there). One vmap
    or one jvp level is not one (jvp's tangents are read through forward AD); any other
    transform or nesting counts as one."""
    depth = _layer_depth()
    if depth == 0:
        return False
    kind = torch._functorch.pyfunctorch.retrieve_current_functorch_interpreter().key()
    return not (depth == 1 and kind in (torch._C._functorch.TransformType.Vmap, torch._C._functorch.TransformType.Jvp))


def _grad_tracked(t: Tensor) -> bool:
    """Whether a torch.func grad transform tracks t at any level: under grad(vmap(f)) f sees a
    vmap-batched tensor (requires_grad False) wrapping the grad transform's tracking tensor."""
    while True:
        if t.requires_grad and _is_grad_tracking(t):
            return True
        if not _is_functorch_wrapped(t):
            return False
        t = _functorch_unwrapped(t)


def _save(ctx, *tensors) -> None:
    """ctx.save_for_backward(*tensors), with an inference tensor (made under
    torch.inference_mode, e.g. frozen features or a table built during generation) saved as a
    clone: autograd refuses to save one, and torch's own composites (F.rms_norm, ...) never
    save such an input, so a training step over it works there."""
    # (Not one that requires grad itself: its clone, made here with grad off, would cut it out of
    # a create_graph double backward; torch's own error is raised for it instead.)
    ctx.save_for_backward(*(t.clone() if isinstance(t, Tensor) and t.is_inference() and not t.requires_grad else t
                            for t in tensors))


def transform_active() -> bool:
    """Whether a forward-AD dual level or a torch.func transform (grad, jvp, vmap, ...) is
    active: two reads, False in the usual call. While torch.compile traces, only forward AD
    (its level, and unpack_dual in differentiating_transform) is read: dynamo traces those
    faithfully, so a compiled jvp / jacfwd / dual level over fastattn is still seen (it
    used to go unseen, and the tangents came out as zeros), whereas functorch's interpreter
    stack reads as non-empty in plain compiled code: its depth is read there instead (a compiled
    torch.func.grad over a drop-in failed with torch's setup_context error; outside audit)."""
    if _compiling():
        return _fw_ad._current_level >= 0 or _layer_depth() > 0
    return _fw_ad._current_level >= 0 or _peek_interpreter() is not None


def differentiating_transform(*tensors) -> Optional[str]:
    """The derivative machinery that tracks one of ``tensors`` and that fastattn's ops cannot
    serve, or None. Their derivatives are reverse-mode formulas registered with
    torch.library.register_autograd, which this torch supports neither in forward-mode AD (a
    dual input's tangent would silently be dropped: the op runs below Autograd) nor under
    torch.func's grad transforms (torch raises a setup_context error). torch.vmap is fine."""
    forward_ad = "forward-mode AD (torch.func.jvp / jacfwd / hessian, torch.autograd.forward_ad)"
    for t in tensors:
        if isinstance(t, Tensor):
            if _fw_ad._current_level >= 0:
                try:
                    if _fw_ad.unpack_dual(t).tangent is not None:
                        return forward_ad
                except RuntimeError:  # a vmap-batched tensor inside jvp (no batching rule to look)
                    return forward_ad
            if not _compiling() and _grad_tracked(t):
                return "torch.func.grad / vjp / jacrev"
    if _compiling() and any(isinstance(t, Tensor) for t in tensors):
        # Compiled: any transform but one vmap level counts as differentiating (whether it
        # tracks these tensors cannot be read while dynamo traces): the drop-ins then take
        # torch's path, as a compiled torch.func.grad of torch's own ops does.
        if _compiled_grad_transform():
            return "torch.func.grad / vjp / jacrev"
    return None


def refuse_transforms(op, args) -> None:
    """RuntimeError when differentiating_transform(*args) names one; op: an op or a name."""
    what = differentiating_transform(*args)
    if what is not None:
        name = op if isinstance(op, str) else op._qualified_op_name
        raise RuntimeError(
            f"fastattn ({name}): {what} is not supported: fastattn's ops have reverse-mode "
            "derivatives only; use .backward() or torch.autograd.grad. (The drop-ins "
            "fastattn.scaled_dot_product_attention, fastattn.rms_norm and fastattn.nn.RMSNorm hand such calls "
            "to torch.)"
        )


def _call(op, *args):
    """op(*args), below the Autograd dispatch key when grad mode is off or no argument requires
    grad (outside torch.compile tracing and torch.func transforms). register_autograd's Python
    kernel would find nothing to record then and redispatch below Autograd itself; skipping it
    saves ~4 us per call with grad off, most of a small op's cost in a decode step, and ~18 us
    with grad on (a 1 x 1 x 8 x 64 flash forward: 36 -> 18 us, AVX2 Zen 3). Keys above
    Autograd (autocast, Python modes) still run. Under forward-mode AD or torch.func's grad
    transforms a RuntimeError says they are unsupported (differentiating_transform), instead
    of a zero tangent or torch's setup_context error."""
    if _compiling():
        if _fw_ad._current_level >= 0 or _layer_depth() > 0:  # (see transform_active)
            refuse_transforms(op, args)
        return op(*args)
    if _fw_ad._current_level >= 0 or _peek_interpreter() is not None:
        refuse_transforms(op, args)
        if _grad_enabled():
            return op(*args)
    elif _grad_enabled() and _any_requires_grad(*args):
        return op(*args)
    with _below_autograd():
        return op(*args)


def _contiguous_last_dim(t: Tensor) -> Tensor:
    """t with a unit last-dim stride, as the kernels read it: incoming gradients are often
    expanded (``out.sum().backward()`` sends zero strides). An EMPTY tensor counts as
    contiguous whatever its strides, so ``.contiguous()`` returns it unchanged and the op
    would refuse it; it gets a fresh contiguous (empty) tensor instead."""
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.clone(memory_format=torch.contiguous_format) if t.numel() == 0 else t.contiguous()
    return t


# ---- rms_norm ----------------------------------------------------------------------------
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    return _call(_ops.rms_norm_fwd, x, weight, eps)


def rms_norm_add_fwd(
    x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    return _call(_ops.rms_norm_add_fwd, x, residual, weight, eps)


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
    # dw is fp32 from the kernel; the weight may have any float dtype (an fp32 master weight
    # under 16-bit activations), and its gradient is rounded once, to that dtype.
    return dw.to(weight.dtype) if (weight is not None and needed) else None


def _rms_norm_grads_composite(dy, x, weight, eps, dh, need_dw):
    """The backward written with differentiable torch ops in fp32, used when autograd must
    record the backward itself (``create_graph=True``: gradient penalties, Hessian-vector
    products). rstd is recomputed from x rather than taken from the forward, so that its
    dependence on x is part of the recorded graph. Same formulas as the kernels."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    g = dy.float() if dy is not None else torch.zeros_like(xf)
    gw = g * weight.float() if weight is not None else g
    dx = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.float()
    dw = None
    if weight is not None and need_dw:
        dw = (g * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dw


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    _y, rstd = output
    ctx.eps = eps
    _save(ctx, x, weight, rstd)
    ctx.mark_non_differentiable(rstd)  # the backward has no term for it (public API never returns it)


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[1]
    if torch.is_grad_enabled():  # create_graph=True: the backward must be differentiable
        dx, dw = _rms_norm_grads_composite(dy, x, weight, ctx.eps, None, need_dw)
        return dx, dw, None
    dx, dw = _ops.rms_norm_bwd(dy, x, weight, rstd, None)
    return dx, _dweight(dw, weight, need_dw), None


def _rms_norm_add_setup(ctx, inputs, output):
    x, residual, weight, eps = inputs
    _y, h, rstd = output
    ctx.eps = eps
    _save(ctx, h, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    if not (x.requires_grad or residual.requires_grad):
        # h = x + residual needs no gradient when neither addend does (as the unfused sum
        # gives), even when the weight trains.
        ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)  # an unused y arrives as None: the weight then gets None


def _rms_norm_add_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[2]
    if dy is None:
        # Only h = x + residual reached the loss: the weight gets no gradient (None, as the
        # unfused x + residual gives; a zero tensor would still be decayed by AdamW).
        return dh, dh, None, None
    if torch.is_grad_enabled():  # create_graph=True: the backward must be differentiable
        # h is an output of the op; second-order gradients reaching it come back through
        # this function as dh, which is exactly the derivative of h = x + residual.
        dx, dw = _rms_norm_grads_composite(dy, h, weight, ctx.eps, dh, need_dw)
        return dx, dx, dw, None
    dx, dw = _ops.rms_norm_bwd(dy, h, weight, rstd, dh)
    # h = x + residual, so both receive the same gradient.
    return dx, dx, _dweight(dw, weight, need_dw), None


def _rms_norm_bwd_setup(ctx, inputs, output):
    pass


def _rms_norm_bwd_backward(ctx, *grads):
    # The public functions never record this op (with create_graph=True they differentiate
    # the composite above instead); only a direct caller of the raw op gets here. Refuse
    # rather than let autograd treat the op as constant and return zeros.
    raise RuntimeError(
        "fastattn::rms_norm_bwd (the rms_norm backward op) has no derivative: double backward "
        "through the raw op is not supported; differentiate fastattn.rms_norm itself, whose "
        "backward supports create_graph=True"
    )


torch.library.register_autograd(
    "fastattn::rms_norm_fwd", _rms_norm_backward, setup_context=_rms_norm_setup
)
torch.library.register_autograd(
    "fastattn::rms_norm_add_fwd", _rms_norm_add_backward, setup_context=_rms_norm_add_setup
)
torch.library.register_autograd(
    "fastattn::rms_norm_bwd", _rms_norm_bwd_backward, setup_context=_rms_norm_bwd_setup
)

# ---- rotary ------------------------------------------------------------------------------
# check_positions=False skips the position-range check on CUDA (a host sync per call); the
# CPU always checks (see csrc/bindings/rotary.cpp).
def rotary(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor], interleaved: bool, conjugate: bool,
    check_positions: bool = True,
) -> Tuple[Tensor, Tensor]:
    return _call(_ops.rotary, q, k, cos, sin, positions, interleaved, conjugate, check_positions)


def rotary_(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor], interleaved: bool, conjugate: bool,
    check_positions: bool = True,
) -> None:
    if transform_active():
        refuse_transforms(_ops.rotary_, (q, k, cos, sin, positions))
    _ops.rotary_(q, k, cos, sin, positions, interleaved, conjugate, check_positions)


@torch.library.register_fake("fastattn::rotary")
def _rotary_fake(q, k, cos, sin, positions, interleaved, conjugate, check_positions=True):
    # The kernel always returns freshly allocated contiguous outputs.
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.register_fake("fastattn::rotary_")
def _rotary_inplace_fake(q, k, cos, sin, positions, interleaved, conjugate, check_positions=True):
    return None


def _rotary_setup(ctx, inputs, output):
    _q, _k, cos, sin, positions, interleaved, conjugate, _check_positions = inputs
    _save(ctx, cos, sin, positions)
    # An output whose input needs no gradient needs none either (the tables get none): k_rot of
    # a plain k must not require grad when only q does (as torch's formula gives).
    for x, rot in zip((_q, _k), output):
        if not x.requires_grad:
            ctx.mark_non_differentiable(rot)
    ctx.interleaved = interleaved
    ctx.conjugate = conjugate
    ctx.set_materialize_grads(False)  # an unused q_rot / k_rot arrives as None (see the backward)


def _rotary_backward(ctx, dq, dk):
    # A rotation is orthogonal: its adjoint is the rotation by the opposite angle, which is
    # the same kernel with the conjugate flag flipped. The tables get no gradient (they are
    # constants of the model, as in flash-attn's apply_rotary_emb). The forward already
    # checked these positions (or its caller vouched for them): no second host sync here.
    cos, sin, positions = ctx.saved_tensors
    rest = (None,) * 6
    if dq is None and dk is None:  # neither output reached the loss (a downstream backward gave None)
        return (None, None) + rest
    if dq is None or dk is None:
        # Only one of q_rot / k_rot reached the loss: the other input gets no gradient (None,
        # as the unfused rotation gives, so an optimizer skips it). The op rotates a q and a k
        # of one batch and length, so the one gradient is passed as both and half kept.
        g = _contiguous_last_dim(dk if dq is None else dq)
        rot = _ops.rotary(g, g, cos, sin, positions, ctx.interleaved, not ctx.conjugate, False)[0]
        return (None, rot) + rest if dq is None else (rot, None) + rest
    dq, dk = _contiguous_last_dim(dq), _contiguous_last_dim(dk)
    gq, gk = _ops.rotary(dq, dk, cos, sin, positions, ctx.interleaved, not ctx.conjugate, False)
    return (gq, gk) + rest


torch.library.register_autograd("fastattn::rotary", _rotary_backward, setup_context=_rotary_setup)


# ---- flash attention ---------------------------------------------------------------------
def flash_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, window_left: int, window_right: int,
    softcap: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """out (B, Sq, H, D), lse (B, H, Sq) fp32. Causal is (window_left, window_right) = (-1, 0).
    softcap > 0 caps the scores s to softcap * tanh(s / softcap) before the softmax.

    A call that will be differentiated (grad mode on and q, k or v requiring grad) runs the
    tiled forward whatever the shape: the backward recomputes the scores with that kernel's
    arithmetic, and an lse from the KV-cache kernels (which the op takes for up to 16 queries
    over at least 4x as many keys) rounds its scores differently, which left the fp32 gradients
    of a sharp softmax up to ~10x less accurate than torch's (outside audit)."""
    differentiated = _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return _call(_ops.flash_attn_fwd, q, k, v, softmax_scale, window_left, window_right, softcap,
                 not differentiated)


@torch.library.register_fake("fastattn::flash_attn_fwd")
def _flash_attn_fwd_fake(q, k, v, softmax_scale, window_left, window_right, softcap=0.0, allow_short_query=True):
    B, Sq, H, D = q.shape
    return q.new_empty((B, Sq, H, D)), q.new_empty((B, H, Sq), dtype=torch.float32)


def _flash_attn_bwd_impl(dout, q, k, v, out, lse, softmax_scale, window_left, window_right, softcap=0.0):
    """(dq, dk, dv) of flash_attn_fwd: the ``fastattn::flash_attn_bwd`` kernel op (recompute
    from out and lse, deterministic)."""
    dout = _contiguous_last_dim(dout)  # e.g. the expanded ones that out.sum().backward() sends
    return flash_attn_bwd(dout, q, k, v, out, lse, softmax_scale, window_left, window_right, True, softcap)


def _flash_attn_setup(ctx, inputs, output):
    q, k, v, softmax_scale, window_left, window_right, *rest = inputs
    out, lse = output
    _save(ctx, q, k, v, out, lse)
    ctx.softcap = rest[0] if rest else 0.0
    # The backward has no term for a gradient flowing into lse (as flash-attn's): saying so
    # makes lse.requires_grad False, instead of silently dropping that gradient.
    ctx.mark_non_differentiable(lse)
    ctx.softmax_scale = softmax_scale
    ctx.window = (window_left, window_right)


def _flash_attn_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _flash_attn_bwd_impl(dout, q, k, v, out, lse, ctx.softmax_scale, *ctx.window, ctx.softcap)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd(
    "fastattn::flash_attn_fwd", _flash_attn_backward, setup_context=_flash_attn_setup
)


def flash_attn_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    deterministic: bool = True,
    softcap: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of ``flash_attn_fwd``: (dq, dk, dv) with q/k/v's shapes and dtype, recomputed
    from the forward's ``out`` and ``lse`` (B, H, Sq) fp32 (``softcap`` must be the
    forward's). Gradients are bitwise reproducible (``deterministic`` is accepted for API
    parity; both kernels always are)."""
    return _ops.flash_attn_bwd(
        dout, q, k, v, out, lse, softmax_scale, window_left, window_right, deterministic, softcap
    )


@torch.library.register_fake("fastattn::flash_attn_bwd")
def _flash_attn_bwd_fake(dout, q, k, v, out, lse, softmax_scale, window_left, window_right, deterministic,
                         softcap=0.0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_attn_double_backward(ctx, *grads):
    # Reached only when a second derivative is requested (create_graph=True, then a grad of
    # the gradients): without this formula autograd would warn and return zeros.
    raise RuntimeError(
        "fastattn.flash_attention: second derivatives (double backward) are not supported; "
        "the first backward works, but gradients of its gradients cannot be computed"
    )


torch.library.register_autograd(
    "fastattn::flash_attn_bwd", _flash_attn_double_backward, setup_context=lambda ctx, inputs, output: None
)


# ---- variable-length (packed) flash attention --------------------------------------------
def flash_attn_varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """q (total_q, H, D), k/v (total_k, Hk, D), cu_seqlens (B + 1,) int32: out (total_q, H, D),
    lse (H, total_q) fp32. Each sequence is masked (and soft-capped) as flash_attn_fwd does it alone."""
    return _call(
        _ops.flash_attn_varlen_fwd, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
        window_left, window_right, softcap,
    )


@torch.library.register_fake("fastattn::flash_attn_varlen_fwd")
def _flash_attn_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                window_left, window_right, softcap=0.0):
    # Shapes come from q alone: cu_seqlens' values are never read (they are data on the device).
    total_q, H, D = q.shape
    return q.new_empty((total_q, H, D)), q.new_empty((H, total_q), dtype=torch.float32)


def flash_attn_varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    deterministic: bool = True,
    softcap: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of ``flash_attn_varlen_fwd``: (dq, dk, dv) with q/k/v's shapes and dtype,
    recomputed from out and lse (H, total_q) (``softcap`` must be the forward's); bitwise
    reproducible."""
    return _ops.flash_attn_varlen_bwd(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
        window_left, window_right, deterministic, softcap,
    )


@torch.library.register_fake("fastattn::flash_attn_varlen_bwd")
def _flash_attn_varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                softmax_scale, window_left, window_right, deterministic, softcap=0.0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_attn_varlen_setup(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
     *rest) = inputs
    out, lse = output
    _save(ctx, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.mark_non_differentiable(lse)  # as the dense op: no gradient term for lse
    ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right)
    ctx.softcap = rest[0] if rest else 0.0


def _flash_attn_varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dout = _contiguous_last_dim(dout)  # e.g. the expanded ones that out.sum().backward() sends
    dq, dk, dv = flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args, True,
                                       ctx.softcap)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "fastattn::flash_attn_varlen_fwd", _flash_attn_varlen_backward, setup_context=_flash_attn_varlen_setup
)


def _flash_attn_varlen_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastattn.flash_attention_varlen: second derivatives (double backward) are not supported; "
        "the first backward works, but gradients of its gradients cannot be computed"
    )


torch.library.register_autograd(
    "fastattn::flash_attn_varlen_bwd", _flash_attn_varlen_double_backward,
    setup_context=lambda ctx, inputs, output: None,
)


# ---- decode attention and append_kv ------------------------------------------------------
# Decode is inference-only: decode_attention's outputs are marked non-differentiable (so a
# backward through them raises torch's "does not require grad" error instead of silently
# giving no gradient); append_kv only mutates. Its Autograd and ADInplaceOrView kernels are
# in C++ (csrc/bindings/decode.cpp, as rotary_'s in rotary.cpp): they refuse arguments that
# require grad while grad mode is on and bump the caches' version counters.
def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale, num_splits, block_table=None, softcap=0.0):
    return _call(_ops.decode_attention, q, k_cache, v_cache, cache_seqlens, softmax_scale, num_splits, block_table,
                 softcap)


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, window_left,
                           window_right, seqlens_k_add, num_splits, softcap=0.0):
    return _call(_ops.attention_with_kvcache, q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale,
                 window_left, window_right, seqlens_k_add, num_splits, softcap)


def append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table=None, check_capacity=True):
    # check_capacity=False: no host read of cache_seqlens on CUDA (the CPU always checks)
    _ops.append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table, check_capacity)


@torch.library.register_fake("fastattn::decode_attention")
def _decode_attention_fake(q, k_cache, v_cache, cache_seqlens, softmax_scale, num_splits, block_table=None,
                           softcap=0.0):
    b, h = q.shape[0], q.shape[-2]
    return q.new_empty(q.shape), q.new_empty((b, h), dtype=torch.float32)


@torch.library.register_fake("fastattn::attention_with_kvcache")
def _attention_with_kvcache_fake(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, window_left,
                                 window_right, seqlens_k_add, num_splits, softcap=0.0):
    b, sq, h = q.shape[0], q.shape[1], q.shape[2]
    return q.new_empty(q.shape), q.new_empty((b, h, sq), dtype=torch.float32)


@torch.library.register_fake("fastattn::append_kv")
def _append_kv_fake(k_cache, v_cache, k, v, cache_seqlens, block_table=None, check_capacity=True):
    return None


def _decode_attention_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _decode_attention_backward(ctx, dout, dlse):
    raise RuntimeError("fastattn.decode_attention is not differentiable")


def _attention_with_kvcache_backward(ctx, dout, dlse):
    raise RuntimeError("fastattn.attention_with_kvcache is not differentiable")


torch.library.register_autograd(
    "fastattn::decode_attention", _decode_attention_backward, setup_context=_decode_attention_setup
)
torch.library.register_autograd(
    "fastattn::attention_with_kvcache", _attention_with_kvcache_backward, setup_context=_decode_attention_setup
)


# ---- moe_experts (CPU kernel only; no autograd: inference) ---------------------------------
def moe_experts(x, routing_weights, expert_ids, w13, w2):
    return _call(_ops.moe_experts, x, routing_weights, expert_ids, w13, w2)


@torch.library.register_fake("fastattn::moe_experts")
def _moe_experts_fake(x, routing_weights, expert_ids, w13, w2):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.float32)


def _moe_experts_setup(ctx, inputs, output):
    pass  # the output stays attached to the graph so that a backward through it says why it fails


def _moe_experts_backward(ctx, dout):
    raise RuntimeError("fastattn.moe_experts is not differentiable (MoEFeedForward uses it without autograd only)")


torch.library.register_autograd("fastattn::moe_experts", _moe_experts_backward, setup_context=_moe_experts_setup)
