"""Hugging Face transformers integration (transformers stays optional).

    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()    # attn_implementation="fastattn" -> fastattn.flash_attention
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastattn")
    fa_hf.patch_model(model)   # RMSNorm modules -> fastattn.nn.RMSNorm, RoPE -> fastattn.apply_rotary

``register()`` adds "fastattn" to transformers' ``AttentionInterface`` and to its
``AttentionMaskInterface`` (with transformers' own SDPA mask builder). Without the mask
entry transformers would build no mask at all for an unknown implementation, silently
dropping causality and padding. With it, the mask builder returns None exactly when SDPA's
own ``is_causal`` computes the attention: a single query token (full attention over the keys),
or causality with SDPA's TOP-LEFT alignment (query i sees keys j <= i) and no padding. That
covers a plain forward, the first chunk of a dynamic cache, and prefill into an empty static
cache, where the keys are the whole cache and rows j >= Sq are unused slots. Those calls run on
``fastattn.flash_attention`` with that same alignment (the keys no query sees are dropped).
Any real mask (padding, a filled cache with several new queries, sliding windows wider than
the keys, packed sequences) is not expressible by the flash kernel; those calls, and dropout
in training, soft-capping, attention sinks and position biases, fall back to transformers'
SDPA attention on the same mask, so results stay exact.
"""
from __future__ import annotations

import contextvars
import importlib
import sys
import types
from typing import Optional

import torch
from torch import nn

import fastattn

__all__ = ["register", "patch_model", "fastattn_attention_forward", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "fastattn"

# RMSNorm classes computing w * (x / rms(x)) exactly, i.e. safe to swap for ours. (Gemma's
# (1 + w) variant and others with different math are deliberately absent.)
_COMPATIBLE_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")

# Head dims the CUDA flash kernel is built for (others fall back to SDPA there).
_CUDA_HEAD_DIMS = (64, 128)

# Counts, per thread / task, how many patched attention modules are running: the rotary
# dispatcher uses fastattn only inside those, so unpatched models in the same process keep
# transformers' own function.
_IN_PATCHED_ATTENTION = contextvars.ContextVar("fastattn_in_patched_attention", default=0)


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("fastattn.integrations.transformers needs transformers (pip install transformers)") from e
    return transformers


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------
def fastattn_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """transformers attention function: query (B, H, Sq, D), key/value (B, Hk, Sk, D) ->
    (out (B, Sq, H, D), None). Mask-free calls run on fastattn.flash_attention; the rest fall
    back to transformers' SDPA attention (see the module docstring)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    unsupported = (
        attention_mask is not None
        or (dropout > 0.0 and module.training)
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
        or kwargs.get("s_aux") is not None
        or query.shape[-1] != value.shape[-1]
        or (query.is_cuda and query.dtype == torch.float32)  # CUDA kernels are fp16/bf16
        or (query.is_cuda and query.shape[-1] not in _CUDA_HEAD_DIMS)
    )
    if unsupported:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    # attention_mask=None means what it means to SDPA (transformers' own sdpa_attention_forward):
    # causal only for more than one query, and then TOP-LEFT aligned (query i sees keys j <= i).
    # transformers relies on that alignment: prefill into an empty static cache passes no mask
    # with Sk = the whole cache, whose rows j >= Sq are unused slots that no query may see.
    Sq, Sk = query.shape[2], key.shape[2]
    causal = bool(causal) and Sq > 1
    # (B, H, S, D) views of (B, S, H, D) projections: transposing back keeps the last dim contiguous.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    window = (-1, -1)
    if causal and Sk > Sq:
        k, v = k[:, :Sq], v[:, :Sq]  # keys j >= Sq are seen by no query: a square causal problem
    elif causal and Sk < Sq:
        window = (-1, Sq - Sk)  # top-left j <= i is the bottom-right band with right = Sq - Sk
    out = fastattn.flash_attention(q, k, v, causal=causal and Sk >= Sq, softmax_scale=scaling, window=window)
    return out, None  # (B, Sq, H, D), no attention weights


def register() -> None:
    """Make ``attn_implementation="fastattn"`` available in transformers (idempotent)."""
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, fastattn_attention_forward)
    # sdpa_mask returns None when the mask is plain causal (then we take the flash path) and a
    # boolean (B, 1, Sq, Sk) mask otherwise (then we fall back, with that mask).
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


# ---------------------------------------------------------------------------------------
# patch_model: RMSNorm modules and rotary application
# ---------------------------------------------------------------------------------------
def _hf_rotary_on_fastattn(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin) on fastattn.apply_rotary.

    q (B, H, S, D), k (B, Hk, S, D); cos/sin (B or 1, S, D), already gathered per position
    and holding each frequency twice (NeoX halves). The first halves of cos/sin, flattened
    over (batch, seq), form a table whose row b * S + s is the angle of token (b, s), so the
    kernel reads it with positions = arange(B * S)."""
    Bc, S, D = cos.shape
    half = D // 2
    cos_t = cos[..., :half].reshape(Bc * S, half).float()
    sin_t = sin[..., :half].reshape(Bc * S, half).float()
    if Bc == 1:
        positions = torch.arange(S, device=q.device)
    else:
        positions = torch.arange(Bc * S, device=q.device).view(Bc, S)
    q2, k2 = fastattn.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos_t, sin_t, positions=positions)
    return q2.transpose(1, 2), k2.transpose(1, 2)


def _make_rotary_dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        usable = (
            _IN_PATCHED_ATTENTION.get() > 0
            and unsqueeze_dim == 1
            and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3
            and cos.shape[-1] == q.shape[-1] == k.shape[-1]
            and cos.shape[0] in (1, q.shape[0]) and cos.shape[1] == q.shape[2]
            and q.stride(-1) == 1 and k.stride(-1) == 1
        )
        if not usable:
            return original(q, k, cos, sin, *args, **kwargs)
        return _hf_rotary_on_fastattn(q, k, cos, sin)

    apply_rotary_pos_emb._fastattn_original = original
    return apply_rotary_pos_emb


def _install_rotary_dispatcher(modeling_module) -> bool:
    fn = getattr(modeling_module, "apply_rotary_pos_emb", None)
    if fn is None:
        return False
    if not hasattr(fn, "_fastattn_original"):
        modeling_module.apply_rotary_pos_emb = _make_rotary_dispatcher(fn)
    return True


def _patched_attention_forward(self, *args, **kwargs):
    """forward of a patched attention module: its class's forward, with the rotary dispatcher
    switched to fastattn for the duration of the call."""
    token = _IN_PATCHED_ATTENTION.set(_IN_PATCHED_ATTENTION.get() + 1)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _IN_PATCHED_ATTENTION.reset(token)


def _wrap_attention_forward(attn: nn.Module) -> bool:
    if getattr(attn, "_fastattn_patched", False):
        return False
    # A bound method (not a closure over the old one), so deepcopy rebinds it to the copy.
    attn.forward = types.MethodType(_patched_attention_forward, attn)
    attn._fastattn_patched = True
    return True


class _HFRMSNorm(fastattn.nn.RMSNorm):
    """fastattn.nn.RMSNorm with the result dtype of the LLaMA-family RMSNorm it replaces,
    ``weight * x_normed.to(x.dtype)``: torch's promotion of x's and the weight's dtypes (fp32
    for bf16 activations with an fp32 weight, as under autocast), where torch.nn.RMSNorm and
    ours return x's dtype."""

    def forward(self, x, residual=None):
        out = super().forward(x, residual)
        if self.weight is None or self.weight.dtype == x.dtype:
            return out
        dtype = torch.promote_types(x.dtype, self.weight.dtype)
        return out.to(dtype) if residual is None else (out[0].to(dtype), out[1])


def patch_model(model: nn.Module) -> dict:
    """Swap a transformers LLaMA-family model's RMSNorm modules for ``fastattn.nn.RMSNorm``
    (sharing the same weight Parameter, so state_dict and training are unchanged) and run its
    rotary embedding on ``fastattn.apply_rotary``. Modules with different math are left
    alone. Returns counts: {"rms_norm": n, "rotary": m}."""
    _require_transformers()
    counts = {"rms_norm": 0, "rotary": 0}
    replacements = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if type(child).__name__ in _COMPATIBLE_RMSNORMS and isinstance(getattr(child, "weight", None), nn.Parameter):
                replacements.append((parent, child_name, child))
    for parent, child_name, child in replacements:
        eps = getattr(child, "variance_epsilon", getattr(child, "eps", 1e-6))
        norm = _HFRMSNorm(child.weight.shape[0], eps=eps, device="meta")
        norm.weight = child.weight
        setattr(parent, child_name, norm)
        counts["rms_norm"] += 1
    for module in model.modules():
        if not type(module).__name__.endswith("Attention") or not hasattr(module, "q_proj"):
            continue
        modeling = sys.modules.get(type(module).__module__) or importlib.import_module(type(module).__module__)
        if _install_rotary_dispatcher(modeling) and _wrap_attention_forward(module):
            counts["rotary"] += 1
    return counts
