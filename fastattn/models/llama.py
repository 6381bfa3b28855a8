"""A LLaMA-family decoder in one file, on fastattn's kernels or on plain torch.

    from fastattn.models import Llama, LlamaConfig
    model = Llama.from_pretrained("path/to/hf-llama", backend="fastattn")   # or backend="torch"
    logits = model(input_ids)                                  # (B, S, vocab), no cache
    ids = model.generate(input_ids, max_new_tokens=32)         # prefill + KV-cache decode

The block is the standard pre-norm one: RMSNorm -> GQA attention with RoPE -> residual ->
RMSNorm -> SwiGLU MLP -> residual, then a final norm and the LM head.

Sliding-window attention (Mistral; Qwen2/Qwen3 with use_sliding_window; any config with
per-layer ``layer_types``): on a "sliding_attention" layer a query at position i sees keys
i - sliding_window + 1 .. i (sliding_window tokens, itself included, as transformers' mask
``kv > q - sliding_window``), on every path: ``window=(sliding_window - 1, 0)`` for the
prefill / training attention, and for a decode step attention_with_kvcache with that window
instead of decode_attention (which has none). The KV cache still keeps every row.

Qwen3: q and k are RMS-normed per head over head_dim (``qk_norm``) before RoPE; head_dim
comes from the config. Phi-3: the checkpoint's fused qkv_proj and gate_up_proj load as they
are (same row order as ours); ``partial_rotary_factor`` < 1 rotates only the first
rotary_dim = int(head_dim * factor) dims of each head (cos/sin tables of width rotary_dim / 2,
the kernels pass the other dims through); LongRoPE (``rope_scaling`` type "longrope", or
"su" / "yarn" on Phi-3, as transformers reads them) keeps short- and long-factor tables and,
like transformers, rotates a whole forward pass with the long ones once its largest position
+ 1 exceeds original_max_position_embeddings (decided on the device during decode; in a prefill
of right-padded prompts, by the longest real prompt); and, like transformers' Phi-3 generation
(``longrope_recompute_cache``, set for Phi-3 checkpoints only: transformers' other models keep
their cache), ``generate`` recomputes the cache (a prefill of every token so far) at the step
where a generation that started below that length first reaches it, since the cached keys were
rotated with the short factors.

Gemma 1/2/3 (model types gemma, gemma2, gemma3_text) are config switches on the same block:
RMSNorm weights stored as offsets, x / rms(x) * (1 + w) in fp32 (``norm_unit_offset``; the
fastattn backend uses ``fastattn.nn.rms_norm.rms_norm_unit_offset``, the function behind
``fastattn.nn.RMSNorm(unit_offset=True)``), embeddings times sqrt(hidden_size) rounded to the
model dtype, GeGLU (``hidden_act="gelu_pytorch_tanh"``), softmax scale
query_pre_attn_scalar ** -0.5; Gemma 2/3 also norm each sublayer's output before its residual
add (``sandwich_norms``) and alternate sliding and full layers; Gemma 2 soft-caps attention
scores (the kernels' ``softcap=``) and the final logits, z -> cap * tanh(z / cap); Gemma 3 has
q/k norms and rotates its sliding layers with their own unscaled RoPE base
(``rope_local_theta``, from rope_local_base_freq) and its full layers with rope_theta and
rope_scaling.

Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): the MLP of a layer is replaced by
``fastattn.models.moe.MoEFeedForward`` (softmax router, top-k, renormalised as the config says,
Qwen2-MoE's sigmoid-gated shared expert; tokens grouped per expert, no loop over tokens) on the
layers ``LlamaConfig.is_moe_layer`` picks (Qwen's decoder_sparse_step / mlp_only_layers keep
dense layers in between). On the fastattn backend, CPU inference with few tokens per expert
(decode steps, short prompts) runs the routed experts with the ``fastattn.moe_experts`` kernel
(``MoEFeedForward.uses_kernel``); otherwise, and always on the torch backend, it is plain torch.
Its decode step syncs with the host once per layer (per-expert token counts), so
``cuda_graph=True`` does not apply.

Backends (same weights, same outputs within rounding):
  "fastattn"  fastattn.rms_norm (residual add fused into the norm), fastattn.apply_rotary,
              fastattn.flash_attention for prefill and training, fastattn.append_kv +
              fastattn.decode_attention for one-token decode steps (both given the block
              table on a paged cache).
  "torch"     the strongest plain-torch model, what a user would write today: F.rms_norm,
              the ordinary rotary (cos/sin tables, rotate_half), F.scaled_dot_product_attention
              with enable_gqa (is_causal for prefill; a boolean key mask for windows and for
              decode steps over the cache, built on the device), the KV cache write a
              vectorised index_put (through the block table on a paged cache, which decode
              gathers first). Soft-capped layers (Gemma 2) use fastattn.reference's explicit
              attention, SDPA having no soft-capping. No host syncs: torch.compile and CUDA
              graphs take it.

KV cache: preallocated for (batch, max length) per layer; ``cache_seqlens`` (B,) int32 holds
each sequence's valid length, so one batch can hold prompts of different lengths.

Paged KV cache (``generate(..., cache="paged", page_size=16)``): per layer a pool of pages
(num_pages, page_size, Hk, D) for K and one for V, and a ``block_table`` (B, max_pages) int32:
token t of sequence b lives at ``pool[block_table[b, t // page_size], t % page_size]``. Pages
come from a free list on the host, one when a sequence's length crosses a page boundary, before
the step's kernels run (the host knows the prompt lengths and the step count: no device sync).
A ragged batch so holds sum_b ceil(len_b / page_size) pages instead of B * max_len rows. Page 0
is the null page: it is never handed out, every unused block_table entry points at it, and the
pad rows of a right-padded prompt that fall outside the sequence's own pages land there (dead
data, as the contiguous cache's pad rows are). The attention code is the same for both caches;
the paged one only passes its block_table to the append and decode calls.

Ragged batches: prompts are LEFT-aligned (right-padded) and their lengths are given as
``prompt_lengths`` or an ``attention_mask`` of ones then zeros. Prefill runs causal attention
over the whole padded block: with right padding, causality alone keeps every real token from
seeing a pad, so no mask is needed and the flash kernel runs unchanged. All rows are written
to the cache, then ``cache_seqlens[b] = prompt_lengths[b]``: the pad rows lie beyond the valid
length, are never read by decode attention, and are overwritten by the next appended tokens.
Each sequence then decodes at its own position (RoPE positions = cache_seqlens).

On CUDA, ``generate(..., cuda_graph=True)`` replays each decode step from a CUDA graph
(``capture_decode_step``), removing the per-layer launch overhead that dominates small-batch
decode.

Parameters are stored fused (q/k/v in one matrix, gate/up in another: two fewer matmuls per
block); ``from_pretrained`` maps Hugging Face names onto them.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import numbers
import os
import threading
import warnings
import weakref
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastattn
from fastattn import reference
from fastattn._validate import host_values_readable, is_integer
from fastattn.nn.rms_norm import rms_norm_unit_offset
from fastattn.nn.rotary import _parse_scaling as _parse_rope_scaling
from fastattn.nn.rotary import rotary_attention_factor, rotary_inv_freq
from fastattn.models.moe import MoEFeedForward

__all__ = ["LlamaConfig", "Llama", "KVCache", "PagedKVCache", "rope_tables", "sample_next_token"]

BACKENDS = ("fastattn", "torch")
CACHES = ("contiguous", "paged")
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's config.layer_types values
# The gated MLP's activation by Hugging Face name: SwiGLU (LLaMA) or GeGLU with tanh GELU (Gemma).
MLP_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}

# Hugging Face model types this file reproduces exactly (same block, same names).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe",
                         "gemma", "gemma2", "gemma3_text")


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------
@dataclass
class LlamaConfig:
    """Mirrors Hugging Face's LlamaConfig fields (same names, same defaults where it matters)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None -> num_attention_heads (MHA); 1 -> MQA
    head_dim: Optional[int] = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, {"rope_type": "linear", "factor": f}, {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, {"rope_type":
    # "yarn", "factor", "original_max_position_embeddings", optional beta_fast / beta_slow /
    # truncate / attention_factor / mscale / mscale_all_dim} or LongRoPE's (below)
    rope_scaling: Optional[dict] = None
    # LongRoPE only: generate() recomputes the cache (a prefill of every token so far) at the step
    # where a generation that started below original_max_position_embeddings first reaches it, as
    # transformers' Phi-3 does (from_hf sets it for model_type "phi3"; its other models keep the cache).
    longrope_recompute_cache: bool = False
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (and on o, unless o_proj_bias says no)
    o_proj_bias: Optional[bool] = None  # None -> attention_bias (LLaMA); Qwen2 has qkv bias only
    mlp_bias: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, List[int]]] = None
    # Sliding-window attention: a query at position i sees keys i - sliding_window + 1 .. i
    # (sliding_window tokens, itself included) on the layers whose layer_types entry is
    # "sliding_attention"; "full_attention" layers see every earlier key. layer_types None:
    # every layer slides when sliding_window is set, none otherwise.
    sliding_window: Optional[int] = None
    layer_types: Optional[List[str]] = None
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on every q and k head, before RoPE
    partial_rotary_factor: float = 1.0  # RoPE on the first rotary_dim = head_dim * this dims of a head
    # Gemma 1/2/3 (model types gemma, gemma2, gemma3_text); the defaults are LLaMA's.
    hidden_act: str = "silu"  # gated MLP activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)
    norm_unit_offset: bool = False  # RMSNorm weights are offsets from 1: x / rms(x) * (1 + w), in fp32
    embedding_multiplier: Optional[float] = None  # embeddings times this, rounded to the model dtype
    query_pre_attn_scalar: Optional[float] = None  # softmax scale = its -1/2 power; None: head_dim ** -0.5
    attn_logit_softcapping: Optional[float] = None  # attention scores s -> cap * tanh(s / cap)
    final_logit_softcapping: Optional[float] = None  # logits z -> cap * tanh(z / cap)
    sandwich_norms: bool = False  # also norm the attention and MLP outputs before each residual add
    rope_local_theta: Optional[float] = None  # sliding layers' RoPE base, unscaled (Gemma 3); None: one RoPE
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE; fastattn.models.moe). num_experts 0: dense.
    # Layer i has the MoE feed-forward when i is not in mlp_only_layers and (i + 1) %
    # decoder_sparse_step == 0, else the dense MLP of intermediate_size. Router jitter and the
    # load-balancing loss (router_jitter_noise, router_aux_loss_coef, output_router_logits) are
    # training-only and not represented.
    num_experts: int = 0
    num_experts_per_tok: int = 2  # top-k
    moe_intermediate_size: Optional[int] = None  # each expert's; None -> intermediate_size
    norm_topk_prob: bool = True  # renormalise the top-k probabilities to sum to 1 (Mixtral: always)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert; 0: none
    decoder_sparse_step: int = 1
    mlp_only_layers: Optional[List[int]] = None  # None -> []
    router_weights_in_input_dtype: bool = False  # Qwen2/3-MoE round the top-k weights to the model dtype

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        real = lambda v: not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)  # noqa: E731
        if not real(self.rope_theta) or self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be a positive number (the RoPE base), got {self.rope_theta!r}")
        if not real(self.rms_norm_eps) or self.rms_norm_eps < 0:
            raise ValueError(f"rms_norm_eps must be a number >= 0, got {self.rms_norm_eps!r}")
        f = self.partial_rotary_factor
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f <= 1 or self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor must be in (0, 1] with an even rotary_dim = "
                             f"int(head_dim * partial_rotary_factor) >= 2, got {f!r} (head_dim {self.head_dim})")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ("default", "linear", "llama3", "yarn", "longrope"):
                raise ValueError(
                    f"rope_scaling type {rope_type!r} is not supported (supported: 'linear', 'llama3', 'yarn', "
                    f"'longrope')"
                )
            if rope_type == "longrope":
                self._check_longrope()
            elif rope_type in ("linear", "llama3", "yarn"):
                try:  # the keys the tables need, checked now rather than at the first forward
                    _parse_rope_scaling(self.rope_scaling)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"rope_scaling: {e}") from None
        self._check_layer_types()
        self._check_gemma_fields()
        self._check_moe_fields()

    def _check_moe_fields(self) -> None:
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                     "decoder_sparse_step"):
            value = getattr(self, name)
            low = 1 if name in ("num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step") else 0
            if (value is not None or name != "moe_intermediate_size") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_experts "
                             f"({self.num_experts})")
        self.mlp_only_layers = [] if self.mlp_only_layers is None else [int(i) for i in self.mlp_only_layers]
        if self.num_experts and self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported for mixture-of-experts layers "
                             "(their experts are SwiGLU: 'silu')")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` has the mixture-of-experts feed-forward (as transformers' Qwen2-MoE
        / Qwen3-MoE pick it; Mixtral: every layer)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def _check_gemma_fields(self) -> None:
        if self.hidden_act not in MLP_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (supported: {tuple(MLP_ACTIVATIONS)})")
        for name in ("embedding_multiplier", "query_pre_attn_scalar", "attn_logit_softcapping",
                     "final_logit_softcapping", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")

    @property
    def softmax_scale(self) -> float:
        """The attention scores' scale: query_pre_attn_scalar ** -0.5 (Gemma 2/3), else head_dim ** -0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def _check_layer_types(self) -> None:
        w = self.sliding_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"sliding_window must be a positive int or None, got {w!r}")
        if self.layer_types is None:
            kind = "full_attention" if w is None else "sliding_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"num_hidden_layers {self.num_hidden_layers}")
        for kind in self.layer_types:
            if kind not in LAYER_TYPES:
                raise ValueError(f"layer_types entry {kind!r} is not supported (supported: {LAYER_TYPES})")
        if w is None and "sliding_attention" in self.layer_types:
            raise ValueError("layer_types has 'sliding_attention' layers but sliding_window is None")

    def _check_longrope(self) -> None:
        r, half = self.rope_scaling, self.rotary_dim // 2
        for name in ("short_factor", "long_factor"):
            f = r.get(name)
            if not isinstance(f, (list, tuple)) or len(f) != half or not all(
                    isinstance(x, numbers.Real) and not isinstance(x, bool) and x > 0 for x in f):
                raise ValueError(f"rope_scaling {name} must be {half} positive numbers (rotary_dim / 2) for "
                                 f"'longrope', got {f!r}")
        orig = r.get("original_max_position_embeddings")
        if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
            raise ValueError(f"rope_scaling original_max_position_embeddings must be a positive int for "
                             f"'longrope', got {orig!r}")

    @property
    def longrope_switch(self) -> Optional[int]:
        """LongRoPE (Phi-3): the pretraining length past which a pass uses the long factors;
        None for every other RoPE."""
        r = self.rope_scaling
        if r is None or r.get("rope_type", r.get("type")) != "longrope":
            return None
        return r["original_max_position_embeddings"]

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def attention_window(self, layer: int) -> int:
        """How many earlier keys a query of `layer` sees besides itself: sliding_window - 1 on
        a sliding layer, -1 (unbounded) on a full one. It is the left side of the kernels'
        ``window=(left, 0)``."""
        if self.layer_types[layer] == "sliding_attention":
            return self.sliding_window - 1
        return -1

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """From a Hugging Face config.json dict (transformers 4.x or 5.x layout)."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        _warn_dropout(hf)
        if model_type in GEMMA_MODEL_TYPES + ("gemma3",):  # their own reading: _gemma_config_kwargs
            return cls(**_gemma_config_kwargs(hf, {f.name for f in fields(cls)}))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture: model_type {model_type!r} (architectures {archs}); "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if archs and not any(a.endswith("ForCausalLM") for a in archs):
            raise ValueError(f"unsupported architecture {archs}: expected a *ForCausalLM checkpoint")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: the SwiGLU MLP needs 'silu'")
        # transformers 5 keeps rope_theta and the scaling together in rope_parameters.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        partial = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if model_type == "phi3" and rope_type in ("su", "yarn"):  # transformers reads both as longrope
            rope_type = rope["rope_type"] = "longrope"
        _standardize_rope(rope, rope_type, hf, top_level=hf.get(
            "original_max_position_embeddings", 4096 if model_type == "phi3" else None))
        scaling = None if rope_type == "default" else rope
        if model_type == "qwen2":
            attention_bias, o_proj_bias = True, False
        elif model_type == "qwen2_moe":  # q/k/v bias unless qkv_bias says no, never on o
            attention_bias, o_proj_bias = bool(hf.get("qkv_bias", True)), False
        else:
            attention_bias = bool(hf.get("attention_bias", False))
            o_proj_bias = attention_bias
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in hf.items() if k in names}
        kw.update(rope_theta=float(theta), rope_scaling=scaling, attention_bias=attention_bias,
                  o_proj_bias=o_proj_bias, mlp_bias=bool(hf.get("mlp_bias", False)))
        kw["sliding_window"], kw["layer_types"] = _hf_sliding_window(hf, model_type)
        kw.update(qk_norm=model_type in ("qwen3", "qwen3_moe"), partial_rotary_factor=partial,
                  longrope_recompute_cache=model_type == "phi3" and rope_type == "longrope")
        kw.update(_hf_moe_kwargs(hf, model_type))
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)


_HF_DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop")


def _warn_dropout(hf: dict) -> None:
    """The model has no dropout. A config that asks for some loads (inference, where transformers
    applies none either, is the same), with a warning: training differs from transformers'
    train mode, which it silently did before (training-paths audit)."""
    asked = {k: hf[k] for k in _HF_DROPOUT_FIELDS
             if isinstance(hf.get(k), numbers.Real) and not isinstance(hf.get(k), bool) and hf[k] > 0}
    if asked:
        warnings.warn(f"fastattn.models.Llama has no dropout: the config's {asked} is not applied (inference "
                      "is unaffected; training differs from transformers' train mode)", stacklevel=3)


def _hf_sliding_window(hf: dict, model_type: str) -> Tuple[Optional[int], Optional[List[str]]]:
    """(sliding_window, layer_types) as transformers reads them for each model type."""
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3"):
        # the window is on only with use_sliding_window, and then (when the config carries no
        # layer_types) on the layers from max_window_layers up
        window = window if hf.get("use_sliding_window", False) else None
        layer_types = hf.get("layer_types")
        if layer_types is None:
            first = hf.get("max_window_layers", 28)
            layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                           for i in range(hf["num_hidden_layers"])]
        return window, layer_types
    if model_type in ("mistral", "phi3", "mixtral"):
        return window, None  # one window for every layer (layer_types, if present, is not read)
    if model_type in ("qwen2_moe", "qwen3_moe"):  # the window only with use_sliding_window
        window = window if hf.get("use_sliding_window", False) else None
        if model_type == "qwen3_moe" or window is None:
            return window, None  # Qwen3-MoE: every layer
        layer_types = hf.get("layer_types")  # Qwen2-MoE: the odd layers below max_window_layers
        if layer_types is None:
            first = hf.get("max_window_layers", 28)
            layer_types = ["sliding_attention" if (i + 1) % 2 and i < first else "full_attention"
                           for i in range(hf["num_hidden_layers"])]
        return window, layer_types
    if model_type in _PER_LAYER_WINDOW_TYPES:  # layer_types as the config gives them
        return window, hf.get("layer_types")
    return None, None  # llama: no sliding window (a stray sliding_window field is not read)


def _hf_moe_kwargs(hf: dict, model_type: str) -> dict:
    """The mixture-of-experts LlamaConfig fields as transformers reads each model type's config."""
    if model_type == "mixtral":  # every layer: num_local_experts experts of intermediate_size
        return dict(num_experts=hf.get("num_local_experts", 8), num_experts_per_tok=hf.get("num_experts_per_tok", 2),
                    moe_intermediate_size=hf.get("intermediate_size", 14336), norm_topk_prob=True,
                    shared_expert_intermediate_size=0, decoder_sparse_step=1, mlp_only_layers=[],
                    router_weights_in_input_dtype=False)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        # transformers 5 writes Qwen3-MoE's expert count as num_local_experts, 4.x as num_experts
        experts = hf.get("num_experts", hf.get("num_local_experts", 60 if model_type == "qwen2_moe" else 128))
        return dict(num_experts=experts,
                    num_experts_per_tok=hf.get("num_experts_per_tok", 4 if model_type == "qwen2_moe" else 8),
                    moe_intermediate_size=hf.get("moe_intermediate_size", 1408 if model_type == "qwen2_moe" else 768),
                    norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                    shared_expert_intermediate_size=(hf.get("shared_expert_intermediate_size", 5632) or 0
                                                     if model_type == "qwen2_moe" else 0),
                    decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                    mlp_only_layers=list(hf.get("mlp_only_layers") or []), router_weights_in_input_dtype=True)
    return dict(num_experts=0)


# Model types whose config.json carries sliding_window and per-layer layer_types as they are.
_PER_LAYER_WINDOW_TYPES: Tuple[str, ...] = ()

# Gemma 1, 2 and 3 (the text decoder, Gemma3ForCausalLM), read by _gemma_config_kwargs.
GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")


def _standardize_rope(rope: dict, rope_type: str, hf: dict, top_level: Optional[int],
                      default_max_pos: int = LlamaConfig.max_position_embeddings) -> None:
    """Fill in what transformers' standardize_rope_params does for llama3 / yarn / longrope:
    the pretraining length (top_level, a config's top-level original_max_position_embeddings,
    wins; then the scaling dict's; then max_position_embeddings, default_max_pos where the
    config has none), and YaRN's factor when absent (max_position_embeddings / that length)."""
    if rope_type not in ("longrope", "llama3", "yarn"):
        return
    max_pos = hf.get("max_position_embeddings", default_max_pos)
    if top_level is not None:
        rope["original_max_position_embeddings"] = top_level
    rope.setdefault("original_max_position_embeddings", max_pos)
    if rope_type == "yarn" and rope.get("factor") is None and is_integer(rope["original_max_position_embeddings"]) \
            and rope["original_max_position_embeddings"] > 0:
        rope["factor"] = max_pos / rope["original_max_position_embeddings"]


def _gemma_config_kwargs(hf: dict, names) -> dict:
    """LlamaConfig keywords for a Gemma 1/2/3 config.json (transformers 4.x or 5.x layout),
    with transformers' defaults for the fields a config leaves out. What the three add to the
    LLaMA block: (1 + w) RMSNorms in fp32, embeddings times sqrt(hidden_size), GeGLU with the
    tanh GELU, head_dim 256 by default; Gemma 2/3: softmax scale query_pre_attn_scalar ** -0.5,
    norms after the attention and the MLP too, sliding and full layers (Gemma 2 alternates,
    Gemma 3 slides on 5 of every 6 by default); Gemma 2: attention and final logit
    soft-capping; Gemma 3: q/k norms and the sliding layers' own RoPE base
    (rope_local_base_freq, unscaled), the full layers' possibly scaled."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type == "gemma3":
        raise ValueError("unsupported architecture: model_type 'gemma3' is Gemma 3's multimodal checkpoint "
                         f"({archs or 'Gemma3ForConditionalGeneration'}); the text decoder loads from a "
                         "'gemma3_text' config (Gemma3ForCausalLM)")
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise ValueError(f"unsupported architecture {archs}: expected a *ForCausalLM checkpoint")
    gen = GEMMA_MODEL_TYPES.index(model_type) + 1
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention is not supported: this model is a causal decoder")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {hf['partial_rotary_factor']} is not supported for {model_type}")
    if gen == 1:  # transformers reads hidden_act, taking the legacy "gelu" for the tanh GELU
        act_field, act = "hidden_act", hf.get("hidden_act", "gelu_pytorch_tanh")
        act = "gelu_pytorch_tanh" if act == "gelu" else act
    else:
        act_field, act = "hidden_activation", hf.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in MLP_ACTIVATIONS:
        raise ValueError(f"unsupported {act_field} {act!r} (supported: {tuple(MLP_ACTIVATIONS)})")
    # RoPE: transformers 5 nests Gemma 3's per layer type in rope_parameters; 4.x had rope_theta
    # (+ rope_scaling) for the full layers and rope_local_base_freq for the sliding ones.
    params = hf.get("rope_parameters")
    local = None
    if gen == 3 and isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        rope, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        rope = dict(params or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 1e6 if gen == 3 else 1e4))
    theta = float(rope.pop("rope_theta"))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    # (per layer type, transformers takes no top-level pretraining length)
    nested = local is not None
    default_max_pos = 131072 if gen == 3 else 8192  # (as max_position_embeddings below)
    _standardize_rope(rope, rope_type, hf, top_level=None if nested else hf.get("original_max_position_embeddings"),
                      default_max_pos=default_max_pos)
    scaling = None if rope_type == "default" else rope
    local_theta = None
    if gen == 3:
        local = local if local is not None else {}
        local_type = local.get("rope_type", local.get("type", "default"))
        if local_type != "default":
            raise ValueError(f"rope_parameters['sliding_attention'] rope_type {local_type!r} is not supported "
                             "(the sliding layers' RoPE must be 'default')")
        local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 1e4)))
    # Sliding layers: as the config lists them, else transformers' default pattern.
    window, layer_types = (hf.get("sliding_window"), hf.get("layer_types")) if gen > 1 else (None, None)
    if gen > 1 and layer_types is None:
        every = 2 if gen == 2 else hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        layer_types = ["sliding_attention" if (i + 1) % every else "full_attention"
                       for i in range(hf["num_hidden_layers"])]
    kw = {k: v for k, v in hf.items() if k in names}
    kw.update(
        head_dim=hf.get("head_dim", 256), hidden_act=act, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", default_max_pos),
        tie_word_embeddings=hf.get("tie_word_embeddings", True), rope_theta=theta, rope_scaling=scaling,
        attention_bias=bool(hf.get("attention_bias", False)), o_proj_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=False, sliding_window=window, layer_types=layer_types, norm_unit_offset=True,
        embedding_multiplier=hf["hidden_size"] ** 0.5, sandwich_norms=gen > 1, qk_norm=gen == 3,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if gen > 1 else None,
        # Gemma 3 keeps attn_logit_softcapping in its config but transformers never applies it
        attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0) if gen == 2 else None,
        final_logit_softcapping=hf.get("final_logit_softcapping", 30.0 if gen == 2 else None) if gen > 1 else None,
        rope_local_theta=local_theta,
    )
    if "partial_rotary_factor" in names:
        kw["partial_rotary_factor"] = 1.0
    return kw


# ---------------------------------------------------------------------------------------
# RoPE tables (Hugging Face compatible: default, linear and llama3 frequency scaling)
# ---------------------------------------------------------------------------------------
def rope_tables(
    head_dim: int,
    max_positions: int,
    theta: float = 10000.0,
    scaling: Optional[dict] = None,
    device=None,
) -> Tuple[Tensor, Tensor]:
    """cos, sin tables of shape (max_positions, head_dim // 2), float32. With partial rotary,
    head_dim is the rotary dim (the kernels rotate that many leading dims of each head).

    Computed as transformers does (fp32 inverse frequencies, fp32 position * frequency
    products), so the tables match its ``LlamaRotaryEmbedding``'s cos/sin bit for bit in fp32
    (the rotation itself, q * cos + rotate_half(q) * sin, is fused with FMAs on the AVX2 /
    AVX-512 tiers: within an ulp of transformers' unfused products, not bitwise).
    """
    # The inverse frequencies (and linear / llama3 scaling) are RotaryEmbedding's.
    inv_freq = rotary_inv_freq(head_dim, theta, scaling, device=device)
    t = torch.arange(max_positions, device=device, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)  # (max_positions, head_dim / 2)
    attention_factor = rotary_attention_factor(scaling)  # YaRN's, else 1
    if attention_factor != 1.0:
        return freqs.cos() * attention_factor, freqs.sin() * attention_factor
    return freqs.cos(), freqs.sin()


def longrope_tables(rotary_dim: int, max_positions: int, theta: float, scaling: dict,
                    device=None) -> Tuple[Tensor, Tensor]:
    """LongRoPE (Phi-3) cos, sin tables of shape (2 * max_positions, rotary_dim // 2), float32.

    Rows [0, max_positions) use the short factors, rows [max_positions, 2 * max_positions)
    the long ones: inverse frequency i is 1 / (factor_i * theta ** (2i / rotary_dim)). Both
    halves are multiplied by the attention factor (given, else sqrt(1 + ln(s) / ln(orig)) for
    s = factor or max_positions / orig when s > 1, else 1). As transformers does, a forward
    pass uses the long factors for all its tokens when its largest position + 1 exceeds
    original_max_position_embeddings: ``Llama`` then reads the second half (positions offset
    by max_positions)."""
    orig = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    factor = max_positions / orig if factor is None else factor
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    t = torch.arange(max_positions, device=device, dtype=torch.int64).float()
    cos, sin = [], []
    for name in ("short_factor", "long_factor"):
        ext = torch.tensor(scaling[name], dtype=torch.float32, device=device)
        freqs = torch.outer(t, 1.0 / (ext * theta**exponents))  # (max_positions, rotary_dim / 2)
        cos.append(freqs.cos() * attention_factor)
        sin.append(freqs.sin() * attention_factor)
    return torch.cat(cos), torch.cat(sin)


# ---------------------------------------------------------------------------------------
# The four backend-dependent operations. Everything else is ordinary torch.
# ---------------------------------------------------------------------------------------
def _rms_norm(backend: str, x: Tensor, weight: Tensor, eps: float, residual: Optional[Tensor] = None,
              unit_offset: bool = False):
    """y = rms_norm(x) or, with residual, (y, h) where h = x + residual and y = rms_norm(h).

    unit_offset (Gemma): y = x / rms(x) * (1 + weight) computed in fp32 and rounded once to
    x's dtype, as Hugging Face's GemmaRMSNorm; h is the add in x's dtype. On the torch
    backend this is F.rms_norm (which normalises in fp32 and rounds to x's dtype before the
    weight, as LlamaRMSNorm does)."""
    if backend == "fastattn" and x.is_cuda and not fastattn.functional.cuda_kernels_run_on(x):
        backend = "torch"  # no code for this GPU in the build (e.g. below sm_80)
    if backend == "fastattn":
        if unit_offset:  # nn.RMSNorm(unit_offset=True)'s function: fused on fp32
            return rms_norm_unit_offset(x, weight, eps, residual=residual)
        return fastattn.rms_norm(x, weight, eps, residual=residual)
    h = x if residual is None else x + residual
    shape = (h.shape[-1],)
    if unit_offset:
        y = F.rms_norm(h.float(), shape, 1.0 + weight.float(), eps).to(h.dtype)
    else:
        y = F.rms_norm(h, shape, weight, eps)
    return y if residual is None else (y, h)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary(backend: str, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor],
            check: bool = True):
    """RoPE of q (B, S, H, D) and k (B, S, Hk, D) at `positions` (None: arange(S)); cos/sin
    (max_pos, R/2) fp32 rotate the first R dims (NeoX halves), the rest pass through. The torch
    backend is the ordinary rotary: full-width tables cast to q's dtype, x * cos + rotate_half(x) * sin.
    check=False: the caller has bounded the positions on the host (fastattn then skips its
    value check, a host sync per call on CUDA)."""
    if backend == "fastattn" and q.is_cuda and not fastattn.functional.cuda_kernels_run_on(q):
        backend = "torch"  # no code for this GPU in the build (e.g. below sm_80)
    if backend == "fastattn":
        return fastattn.apply_rotary(q, k, cos, sin, positions=positions, check_positions=check)
    S, R = q.shape[1], 2 * cos.shape[-1]
    if positions is None:
        c, s = cos[:S], sin[:S]  # (S, R/2)
    else:
        positions = positions.long()
        c, s = cos[positions], sin[positions]  # (S, R/2) or (B, S, R/2)
    c = torch.cat((c, c), dim=-1).to(q.dtype).unsqueeze(-2)  # (..., S, 1, R): broadcast over heads
    s = torch.cat((s, s), dim=-1).to(q.dtype).unsqueeze(-2)

    def rotate(x: Tensor) -> Tensor:
        if R == x.shape[-1]:
            return x * c + _rotate_half(x) * s
        xr = x[..., :R]  # partial rotary (Phi-3): the other dims pass through
        return torch.cat((xr * c + _rotate_half(xr) * s, x[..., R:]), dim=-1)

    return rotate(q), rotate(k)


def _kernels_take_softcap() -> bool:
    """Whether this fastattn build's attention kernels take ``softcap=`` (issue 20 item 1)."""
    try:
        return all("softcap" in inspect.signature(getattr(fastattn.functional, name)).parameters
                   for name in ("flash_attention", "decode_attention", "attention_with_kvcache"))
    except (AttributeError, TypeError, ValueError):
        return False


def _softcap_kw(backend: str, softcap: float) -> dict:
    """``{"softcap": cap}`` for a soft-capped layer (scores s -> cap * tanh(s / cap), Gemma 2),
    ``{}`` otherwise, so that every other model calls the kernels exactly as before."""
    if not softcap:
        return {}
    if backend == "fastattn" and not _kernels_take_softcap():
        raise NotImplementedError(
            "attn_logit_softcapping (Gemma 2's attention soft-capping) on the fastattn backend needs "
            "fastattn kernels with softcap=, which this build lacks; use backend='torch'")
    return {"softcap": float(softcap)}


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, is_causal: bool = False,
          scale: Optional[float] = None) -> Tensor:
    """F.scaled_dot_product_attention on our (B, S, heads, D) layout, GQA by enable_gqa (no
    repeated K/V); mask: bool, True = attend, broadcast to (B, H, Sq, Sk). Returns (B, Sq, H, D)."""
    # A branch, not the comparison itself: head counts traced as SymInts compare to a SymBool,
    # which torch's SDPA refuses (dynamic=True); a branch makes it a guard on the config's heads.
    gqa = True if q.shape[2] != k.shape[2] else False
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=is_causal, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def _attention_kernels_take(q: Tensor, decode: bool, softcap: float = 0.0, check_smem: bool = True) -> bool:
    """Whether fastattn's attention kernels take q: any dtype and head dim on the CPU; on CUDA
    fp16/bf16 and the compiled head dims (flash 32..256, decode/KV cache 64, 96, 128, 256, and
    only the decode shapes whose kernel fits the GPU's shared memory: on 99 KiB parts such as
    an RTX 4090, head dim 64, and 128 without softcap). Elsewhere (an fp32 or head-dim-16 model
    on CUDA, Gemma's 256 on an RTX 4090) the fastattn backend runs that attention call the torch
    backend's way, as the Hugging Face integration falls back to SDPA, instead of failing
    mid-forward; norms, RoPE and the MLP stay on fastattn's kernels. check_smem=False: dtype and
    head dim only (append_kv, whose kernel needs no shared memory)."""
    if not q.is_cuda:
        return True
    dims = fastattn.functional._DECODE_CUDA_HEAD_DIMS if decode else fastattn.functional._CUDA_HEAD_DIMS
    if q.dtype == torch.float32 or q.shape[-1] not in dims or not fastattn.functional.cuda_kernels_run_on(q):
        return False
    return not (decode and check_smem) or fastattn.functional.decode_cuda_fits(q, q.shape[-1], q.shape[1], softcap)


def _causal_attention(backend: str, q: Tensor, k: Tensor, v: Tensor, window: int = -1,
                      scale: Optional[float] = None, softcap: float = 0.0) -> Tensor:
    """Causal self-attention of a block; window >= 0: query i sees keys i - window .. i only.
    scale None: head_dim ** -0.5; softcap > 0: scores s -> softcap * tanh(s / softcap). The torch
    backend runs SDPA (is_causal, or an explicit mask for a window); SDPA has no soft-capping,
    so soft-capped layers take the explicit reference path."""
    if backend == "fastattn" and not _attention_kernels_take(q, decode=False):
        backend = "torch"
    cap = _softcap_kw(backend, softcap)
    if backend == "fastattn":
        return fastattn.flash_attention(q, k, v, causal=True, window=(window, 0), softmax_scale=scale, **cap)
    if cap:
        return reference.attention(q, k, v, causal=True, window=(window, 0), softmax_scale=scale, **cap)
    Sq, Sk = q.shape[1], k.shape[1]
    if window < 0 or window + 1 >= Sk:  # the window hides nothing: plain causal (Sq == Sk here)
        return _sdpa(q, k, v, is_causal=True, scale=scale)
    return _sdpa(q, k, v, reference.attention_mask(Sq, Sk, True, (window, 0), q.device), scale=scale)


def _append_kv(backend: str, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, write_at: Tensor,
               block_table: Optional[Tensor] = None, check: bool = True) -> None:
    """check=False: the caller has bounded write_at + Sn by the capacity on the host (fastattn
    then skips its capacity check, a host read of write_at per call on CUDA)."""
    if backend == "fastattn" and _attention_kernels_take(k, decode=True, check_smem=False):
        fastattn.append_kv(k_cache, v_cache, k, v, write_at, block_table=block_table, check_capacity=check)
        return
    # rows [write_at[b], write_at[b] + Sn) of sequence b; on a paged cache, row t of sequence
    # b is slot t % page_size of page block_table[b, t // page_size] (reference.paged_rows)
    B, Sn = k.shape[0], k.shape[1]
    rows = write_at.long().view(B, 1) + torch.arange(Sn, device=k.device).view(1, Sn)  # (B, Sn)
    batch = torch.arange(B, device=k.device).view(B, 1).expand(B, Sn)
    if block_table is not None:
        page_size = k_cache.shape[1]
        batch, rows = block_table[batch, rows // page_size].long(), rows % page_size  # (page, slot)
    k_cache[batch, rows] = k
    v_cache[batch, rows] = v


def _decode_attention(backend: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                      block_table: Optional[Tensor] = None, window: int = -1, scale: Optional[float] = None,
                      softcap: float = 0.0) -> Tensor:
    """q (B, 1, H, D) at cache row lengths[b] - 1 against rows [0, lengths[b]) of sequence b;
    window >= 0: only rows [lengths[b] - 1 - window, lengths[b]) (decode_attention has no
    window, attention_with_kvcache does: same kernel family, bottom-right aligned). scale and
    softcap as in ``_causal_attention``. The torch backend runs SDPA over the whole cache with
    a (B, 1, 1, S_max) key mask built on the device (no host sync: CUDA graphs can capture it);
    a paged cache is gathered into (B, capacity, Hk, D) first."""
    if backend == "fastattn" and not _attention_kernels_take(q, decode=True, softcap=softcap):
        backend = "torch"
    kw = dict(block_table=block_table, softmax_scale=scale, **_softcap_kw(backend, softcap))
    if backend == "fastattn":
        if window >= 0:
            return fastattn.attention_with_kvcache(q, k_cache, v_cache, lengths, causal=True, window=(window, 0), **kw)
        return fastattn.decode_attention(q, k_cache, v_cache, lengths, **kw)
    return _torch_decode(q, k_cache, v_cache, lengths, block_table, window, scale, softcap)


def _torch_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, block_table: Optional[Tensor],
                  window: int, scale: Optional[float], softcap: float) -> Tensor:
    """The torch backend's decode step: reference.attention_with_kvcache(q, ..., lengths,
    window=(window, 0)) for one query per sequence (window -1: all rows), as ONE attention call
    over the whole cache with a key mask built on the device: sequence b sees cache rows
    [lengths[b] - 1 - window, lengths[b]). (The reference loops over sequences with a host sync
    each, which CUDA graphs cannot capture; tests check both give the same.)"""
    if block_table is not None:  # the pages gathered into (B, capacity, Hk, D)
        rows = block_table.shape[1] * k_cache.shape[1]
        k_cache = reference.paged_rows(k_cache, block_table, rows)
        v_cache = reference.paged_rows(v_cache, block_table, rows)
    j = torch.arange(k_cache.shape[1], device=q.device).view(1, -1)
    last = lengths.long().view(-1, 1) - 1  # (B, 1): the query's row
    visible = j <= last  # (B, capacity)
    if window >= 0:
        visible = visible & (j >= last - window)
    if softcap:  # SDPA has no soft-capping: the explicit path
        return reference.attention(q, k_cache, v_cache, softmax_scale=scale, key_padding_mask=visible,
                                   softcap=float(softcap))
    B, S_max = visible.shape
    return _sdpa(q, k_cache, v_cache, visible.view(B, 1, 1, S_max), scale=scale)


_windowed_decode_reference = _torch_decode  # the name tests/test_model_archs.py imports


def paged_kernels_available() -> bool:
    """Whether this fastattn build has the paged-cache kernels (append_kv / decode_attention
    with block_table, attention_with_kvcache)."""
    return hasattr(fastattn, "attention_with_kvcache")


# ---------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------
class _HostLengthBound:
    """An upper bound of the lengths in ``seqlens`` kept on the host, so that a decode step can
    vouch for its RoPE positions and its cache rows without reading seqlens from the device
    (fastattn's value checks would cost a host sync per layer on CUDA; see ``Llama.decode_step``).

    The bound belongs to the seqlens tensor the cache and the model last wrote, at that
    tensor's version counter: any other in-place write to seqlens (``cache.seqlens.fill_(n)``)
    bumps the counter, and a new seqlens tensor is another object, so either voids the bound
    (``known_max_seqlen()`` is None) and the next decode step reads the lengths once to
    re-establish it. Inference tensors (a cache made under ``torch.inference_mode()``) have
    no version counter: the bound is never trusted, and every step reads the lengths once."""

    _bound = None  # (seqlens, its version, bound) or None

    def known_max_seqlen(self) -> Optional[int]:
        """n with 0 <= seqlens[b] <= n for every b, known without reading the device; None
        when seqlens was written outside the cache and the model since the bound was set."""
        if self._bound is None:
            return None
        t, version, n = self._bound
        if t is not self.seqlens:
            return None
        try:
            return n if t._version == version else None
        except RuntimeError:  # an inference tensor
            return None

    def _note_max_seqlen(self, n: Optional[int]) -> None:
        """Record n >= max(seqlens) (after the write that made it so); None forgets the bound."""
        try:
            self._bound = None if n is None else (self.seqlens, self.seqlens._version, int(n))
        except RuntimeError:  # an inference tensor has no version counter: nothing to vouch with
            self._bound = None


class KVCache(_HostLengthBound):
    """Static per-layer K/V storage for (batch, max_len) plus each sequence's valid length.

    k, v: lists of num_layers tensors (B, max_len, Hk, D); seqlens: (B,) int32 on the cache's
    device. One tensor per layer, not views of one stacked tensor: torch.compile with dynamic
    shapes (torch 2.13's inductor) drops the storage offset of a view passed to an in-place
    custom op, and every layer's append_kv then wrote layer 0's rows.
    """

    block_table = None  # contiguous: row t of sequence b is k[layer][b, t]; see PagedKVCache

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self._note_max_seqlen(0)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def bytes_total(self) -> int:
        return 2 * len(self.k) * self.k[0].numel() * self.k[0].element_size()

    def reset(self) -> None:
        self.seqlens.zero_()
        self._note_max_seqlen(0)

    def grow(self, num_new: int) -> None:
        """Nothing to do: every sequence owns max_len rows from the start (see
        ``PagedKVCache.grow``)."""

    def reorder_rows(self, index: Tensor, upto: Optional[int] = None) -> None:
        """Sequence i becomes what sequence index[i] was (beam search: beams follow their
        parents), one gather per layer. index (N,) integer on any device.

        N == batch_size: in place (a captured CUDA graph stays valid), copying only the first
        ``upto`` rows of each sequence (default all: the rows a caller knows to be live).
        N != batch_size: new (N, max_len) storage (expanding each prompt to its beams)."""
        idx = index.to(device=self.k[0].device, dtype=torch.long).view(-1)
        bound = self.known_max_seqlen()  # a gather of the lengths keeps their bound
        if idx.numel() == self.batch_size:
            t = self.max_len if upto is None else max(0, min(int(upto), self.max_len))
            for kv in self.k + self.v:
                rows = kv[:, :t]
                rows.copy_(rows.index_select(0, idx))
            self.seqlens.copy_(self.seqlens.index_select(0, idx))
        else:
            self.k = [kv.index_select(0, idx) for kv in self.k]
            self.v = [kv.index_select(0, idx) for kv in self.v]
            self.seqlens = self.seqlens.index_select(0, idx)
        self._note_max_seqlen(bound)


@torch.compiler.disable(reason="fastattn: a paged KV cache hands out its pages on the host, outside the graph; "
                               "prefill compiles with fullgraph=True on the contiguous cache")
def _start_eagerly(cache, prompt_lengths: Tensor, S: int) -> None:
    """A traced prefill's page hand-out for the prompts (run eagerly: reads the lengths). The
    graph runs after this returns and may raise: the next eager step reads the lengths again."""
    lengths = [int(n) for n in prompt_lengths.tolist()]
    if not all(1 <= n <= S for n in lengths):
        raise ValueError(f"prompt_lengths must hold {len(lengths)} lengths in [1, {S}], got {lengths}")
    cache.start(lengths)
    cache._host_seqlens_unsure = True


@torch.compiler.disable(reason="fastattn: a paged KV cache hands out its pages on the host, outside the graph; "
                               "decode_step compiles with fullgraph=True on the contiguous cache (setup_cache(..., "
                               "cache='contiguous')), with a graph break here on the paged one")
def _grow_eagerly(cache) -> None:
    """A traced decode step's page hand-out (run eagerly). The graph runs after this returns, so
    a step that raises there cannot roll host_seqlens back as the eager step does (nor can its
    version counter tell, under inductor): host_seqlens are read from the device lengths first
    (one sync per traced paged step), and the next eager step does the same once."""
    cache._resync_host_seqlens()
    cache.grow(1)
    cache._host_seqlens_unsure = True


class PagedKVCache(_HostLengthBound):
    """Paged K/V storage: pages of ``page_size`` tokens handed out to sequences on demand.

    k, v: lists of num_layers page pools (num_pages, page_size, Hk, D), one tensor per layer
    (see KVCache); block_table: (B, max_pages_per_seq) int32, token t of sequence b at
    ``k[layer][block_table[b, t // page_size], t % page_size]``; seqlens: (B,) int32.
    All on the cache's device.

    The allocator lives on the host: a free list of page ids and each sequence's pages, plus
    ``host_seqlens``, the lengths the host has made room for. ``start`` / ``grow`` give a
    sequence a page exactly when its length crosses a page boundary, and write the new
    block_table entries in place (a scalar fill each: no host sync, CUDA-graph safe, since the
    table is never reallocated). Page 0 is the null page: never handed out; every unused
    block_table entry points at it, so stray writes (the pad rows of a right-padded prefill)
    land there and are never read.
    """

    def __init__(self, num_layers: int, batch: int, num_pages: int, page_size: int, max_pages_per_seq: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_table = torch.zeros(batch, max_pages_per_seq, dtype=torch.int32, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.reset()

    @property
    def batch_size(self) -> int:
        return self.block_table.shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_pages(self) -> int:
        """Pages in the pool, the null page included."""
        return self.k[0].shape[0]

    @property
    def max_pages_per_seq(self) -> int:
        return self.block_table.shape[1]

    @property
    def max_len(self) -> int:
        """The most tokens one sequence can address."""
        return self.max_pages_per_seq * self.page_size

    @property
    def num_pages_used(self) -> int:
        """Pages held by sequences now: sum over b of ceil(host_seqlens[b] / page_size)."""
        return sum(len(p) for p in self.pages)

    @property
    def num_pages_free(self) -> int:
        return len(self._free)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page, K and V of every layer."""
        return 2 * len(self.k) * self.k[0][0].numel() * self.k[0].element_size()

    @property
    def bytes_used(self) -> int:
        return self.num_pages_used * self.page_bytes

    @property
    def bytes_total(self) -> int:
        return self.num_pages * self.page_bytes

    def reset(self) -> None:
        """Every page back on the free list, every sequence empty."""
        self._free: List[int] = list(range(self.num_pages - 1, 0, -1))  # pop() hands out 1, 2, ...
        self.pages: List[List[int]] = [[] for _ in range(self.batch_size)]
        self.host_seqlens: List[int] = [0] * self.batch_size
        self.block_table.zero_()
        self.seqlens.zero_()
        self._note_max_seqlen(0)

    def reserve(self, lengths: Sequence[int]) -> None:
        """Give sequence b pages for lengths[b] tokens (host side; pages it holds are kept).
        Does not change host_seqlens or seqlens."""
        p = self.page_size
        for b, n in enumerate(lengths):
            need = -(-int(n) // p)
            if need > self.max_pages_per_seq:
                raise ValueError(f"paged KV cache: sequence {b} would hold {n} tokens, more than its "
                                 f"{self.max_pages_per_seq} pages of {p} ({self.max_len} tokens)")
            held = self.pages[b]
            while len(held) < need:
                if not self._free:
                    raise RuntimeError(
                        f"paged KV cache: out of pages ({self.num_pages - 1} pages of {p} tokens, all "
                        f"held) giving sequence {b} room for {n} tokens; size the pool with "
                        f"setup_cache(..., max_lengths=) covering every sequence's final length")
                page = self._free.pop()
                self.block_table[b, len(held)] = page  # in place: a CUDA graph keeps reading it
                held.append(page)

    _host_seqlens_unsure = False  # set by a traced decode step (see _grow_eagerly)

    def _resync_host_seqlens(self) -> None:
        """host_seqlens from the device lengths (one sync): after a traced decode step, which may
        have raised in its graph after growing them."""
        self.host_seqlens = [int(n) for n in self.seqlens.tolist()]
        self._host_seqlens_unsure = False

    def grow(self, num_new: int) -> None:
        """Make room for num_new more tokens in every sequence (before the step's kernels
        run) and count them in host_seqlens."""
        self.start([n + num_new for n in self.host_seqlens])

    def start(self, lengths: Sequence[int]) -> None:
        """Make room for lengths[b] tokens in sequence b and set host_seqlens (prefill:
        the prompt lengths, after ``reset``). seqlens on the device is the model's to set."""
        lengths = [int(n) for n in lengths]
        if len(lengths) != self.batch_size:
            raise ValueError(f"paged KV cache: {len(lengths)} lengths for a batch of {self.batch_size}")
        self.reserve(lengths)
        self.host_seqlens = lengths

    def reorder_rows(self, index: Tensor, upto: Optional[int] = None,
                     max_lengths: Optional[Sequence[int]] = None) -> None:
        """Sequence i becomes what sequence index[i] was (beam search). Reads index (N,) on
        the host (one sync). ``upto`` is accepted for symmetry with ``KVCache.reorder_rows``;
        the host lengths already bound the copy.

        N == batch_size: each sequence keeps its own pages (taking more from the free list if
        its new length needs them) and the K/V of the pages its source's tokens fill are
        copied in: one gather and one scatter over all layers, for the sequences whose source
        is another one. No page is shared, so appends never need copy-on-write.

        N != batch_size (expanding prompts to their beams after one prefill): a new block
        table of N rows; the first row taking a source takes over its pages, every other one
        gets copies; sources nobody takes give their pages back. ``max_lengths`` (N,), default
        the new lengths, is what each new row may grow to: the pool is enlarged (reallocated
        once) so that it never runs out."""
        src_rows = [int(i) for i in index.tolist()]
        if any(not 0 <= s < self.batch_size for s in src_rows):
            raise ValueError(f"paged KV cache: reorder_rows index out of [0, {self.batch_size}): {src_rows}")
        bound = self.known_max_seqlen()  # a gather of the lengths keeps their bound
        if len(src_rows) != self.batch_size:
            self._expand_rows(index, src_rows, max_lengths)
            self._note_max_seqlen(bound)
            return
        lengths = [self.host_seqlens[s] for s in src_rows]
        self.reserve(lengths)  # only appends pages: the pages holding tokens stay put
        p = self.page_size
        src_pages: List[int] = []
        dst_pages: List[int] = []
        for i, s in enumerate(src_rows):
            if s != i:
                n = -(-lengths[i] // p)
                src_pages += self.pages[s][:n]
                dst_pages += self.pages[i][:n]
        if src_pages:
            device = self.k[0].device
            src = torch.tensor(src_pages, dtype=torch.long, device=device)
            dst = torch.tensor(dst_pages, dtype=torch.long, device=device)
            for kv in self.k + self.v:
                kv[dst] = kv[src]  # the right side is gathered first: overlaps are safe
        self.seqlens.copy_(self.seqlens.index_select(0, index.to(device=self.seqlens.device, dtype=torch.long)))
        self.host_seqlens = lengths
        self._note_max_seqlen(bound)

    def _expand_rows(self, index: Tensor, src_rows: List[int], max_lengths) -> None:
        p = self.page_size
        lengths = [self.host_seqlens[s] for s in src_rows]
        caps = lengths if max_lengths is None else [int(n) for n in max_lengths]
        if len(caps) != len(src_rows) or any(c < n or c > self.max_len for c, n in zip(caps, lengths)):
            raise ValueError(f"paged KV cache: max_lengths must hold {len(src_rows)} lengths, each in "
                             f"[the row's length, {self.max_len}], got {caps}")
        # the pool must hold every new row at its cap (plus the null page)
        want = 1 + sum(-(-c // p) for c in caps)
        if want > self.num_pages:
            extra = want - self.num_pages
            pad = (extra,) + tuple(self.k[0].shape[1:])
            self.k = [torch.cat([kv, kv.new_zeros(pad)]) for kv in self.k]
            self.v = [torch.cat([kv, kv.new_zeros(pad)]) for kv in self.v]
            self._free = list(range(want - 1, want - 1 - extra, -1)) + self._free  # pop() hands out old first
        taken = set()
        pages: List[List[int]] = []
        src_pages: List[int] = []
        dst_pages: List[int] = []
        for s, n in zip(src_rows, lengths):
            held = self.pages[s][:-(-n // p)]
            if s not in taken:
                taken.add(s)
                pages.append(list(self.pages[s]))
                continue
            copy = [self._free.pop() for _ in held]
            src_pages += held
            dst_pages += copy
            pages.append(copy)
        for s in range(self.batch_size):
            if s not in taken:
                self._free += reversed(self.pages[s])
        if src_pages:
            src = torch.tensor(src_pages, dtype=torch.long, device=self.k[0].device)
            dst = torch.tensor(dst_pages, dtype=torch.long, device=self.k[0].device)
            for kv in self.k + self.v:
                kv[dst] = kv[src]
        table = torch.zeros(len(src_rows), self.max_pages_per_seq, dtype=torch.int32)
        for i, row in enumerate(pages):
            table[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        self.block_table = table.to(self.block_table.device)
        self.pages = pages
        self.seqlens = self.seqlens.index_select(0, index.to(device=self.seqlens.device, dtype=torch.long))
        self.host_seqlens = lengths


class _RopeTables:
    """One forward pass's RoPE tables, (max_pos, D/2) fp32 cos / sin (and the sliding layers'
    own pair when they differ, Gemma 3), in an object pytrees do not enter: FSDP2 casts every
    floating tensor of a block's forward arguments (a NamedTuple's too) to its param_dtype,
    and fastattn's rotary takes fp32 tables only (they must not be rounded to bf16)."""

    def __init__(self, cos: Tensor, sin: Tensor, local: Optional[Tuple[Tensor, Tensor]]):
        self.cos, self.sin, self.local = cos, sin, local


class _Step(NamedTuple):
    """What every layer needs for one forward pass."""

    backend: str
    rope: _RopeTables
    positions: Optional[Tensor]  # (B, S) integer, None = arange(S)
    cache: Union[KVCache, PagedKVCache, None]  # None: no cache (plain forward / training)
    decode: bool  # one new token per sequence, attending to the cache
    write_at: Optional[Tensor]  # (B,) int32: cache row of each sequence's first new token
    attend_len: Optional[Tensor]  # (B,) int32: valid cache rows once the new tokens are in
    # False: positions and cache rows were bounded on the host, so the fastattn kernels skip
    # their value checks (each a host sync per layer on CUDA)
    checked: bool = True


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
class RMSNormWeight(nn.Module):
    """Holds an RMSNorm's weight and eps; the norm itself runs in the block (fused with the
    residual add), on the model's backend."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.unit_offset = unit_offset  # Gemma: the weight is an offset, the scale is 1 + weight
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps = eps

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", unit_offset=True" if self.unit_offset else "")


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.n_kv_head = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, qkv_dim, bias=config.attention_bias)
        self.wo = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=config.o_proj_bias)
        self.config = config  # config.attention_window(layer): the layer's sliding window
        if config.qk_norm:  # Qwen3, Gemma 3: one RMSNorm weight over head_dim, shared by the heads
            self.q_norm = RMSNormWeight(self.head_dim, config.rms_norm_eps, config.norm_unit_offset)
            self.k_norm = RMSNormWeight(self.head_dim, config.rms_norm_eps, config.norm_unit_offset)
        # Gemma 2/3: scores scaled by query_pre_attn_scalar ** -0.5 (None: the kernels' head_dim ** -0.5)
        self.softmax_scale = config.softmax_scale if config.query_pre_attn_scalar is not None else None
        self.softcap = config.attn_logit_softcapping or 0.0  # Gemma 2: scores s -> cap * tanh(s / cap)

    def forward(self, x: Tensor, step: _Step, layer: int) -> Tensor:
        B, S, _ = x.shape
        H, Hk, D = self.n_head, self.n_kv_head, self.head_dim
        window = self.config.attention_window(layer)  # keys seen besides the query's own; -1 = all
        qkv = self.wqkv(x).view(B, S, H + 2 * Hk, D)
        q, k, v = qkv.split([H, Hk, Hk], dim=2)  # (B, S, H, D), (B, S, Hk, D) x 2; last dim contiguous
        if self.config.qk_norm:  # each head's q and k normed over D, before RoPE
            q = _rms_norm(step.backend, q, self.q_norm.weight, self.q_norm.eps, unit_offset=self.q_norm.unit_offset)
            k = _rms_norm(step.backend, k, self.k_norm.weight, self.k_norm.eps, unit_offset=self.k_norm.unit_offset)
        cos, sin = step.rope.cos, step.rope.sin
        if step.rope.local is not None and self.config.layer_types[layer] == "sliding_attention":
            cos, sin = step.rope.local  # Gemma 3: local layers rotate with their own base
        q, k = _rotary(step.backend, q, k, cos, sin, step.positions, step.checked)
        if self.config.qk_norm:
            # CUDA autocast runs the qk norms in fp32 (torch 2.13), as transformers' Qwen3 ends
            # up (an fp32 weight times the normed bf16): rotated in fp32 as there, then v's
            # dtype, the one the attention and the KV cache take (SDPA's autocast casts them so
            # too). A no-op everywhere else (q, k and v leave one projection).
            q, k = q.to(v.dtype), k.to(v.dtype)
        scale, cap = self.softmax_scale, self.softcap
        if step.cache is None:  # plain forward / training: causal attention over this block
            out = _causal_attention(step.backend, q, k, v, window, scale, cap)
        else:
            # (B, S_max, Hk, D), or page pools (num_pages, page_size, Hk, D) with a block table
            k_cache, v_cache = step.cache.k[layer], step.cache.v[layer]
            table = step.cache.block_table  # None for the contiguous cache
            _append_kv(step.backend, k_cache, v_cache, k, v, step.write_at, table, step.checked)
            if step.decode:  # one query per sequence against its valid cache rows
                out = _decode_attention(step.backend, q, k_cache, v_cache, step.attend_len, table, window, scale, cap)
            else:  # prefill into an empty cache: the prompt attends to itself, causally
                out = _causal_attention(step.backend, q, k, v, window, scale, cap)
        return self.wo(out.reshape(B, S, H * D))  # (B, S, hidden)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(x W_gate) * (x W_up)), gate and up fused into one matmul (GeGLU with
    the tanh GELU in place of silu when config.hidden_act says so: Gemma)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.hidden_act = config.hidden_act  # a key of MLP_ACTIVATIONS
        self.intermediate_size = config.intermediate_size
        self.w13 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)  # (B, S, inter) x 2
        return self.w2(MLP_ACTIVATIONS[self.hidden_act](gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int = 0):
        super().__init__()
        offset = config.norm_unit_offset
        self.attention_norm = RMSNormWeight(config.hidden_size, config.rms_norm_eps, offset)
        self.attention = Attention(config)
        self.ffn_norm = RMSNormWeight(config.hidden_size, config.rms_norm_eps, offset)
        self.sandwich_norms = config.sandwich_norms
        if config.sandwich_norms:  # Gemma 2/3: each sublayer's output is normed before the residual add
            self.post_attention_norm = RMSNormWeight(config.hidden_size, config.rms_norm_eps, offset)
            self.post_ffn_norm = RMSNormWeight(config.hidden_size, config.rms_norm_eps, offset)
        if config.is_moe_layer(layer):  # Mixtral / Qwen2-MoE / Qwen3-MoE: routed experts
            self.feed_forward = MoEFeedForward(
                config.hidden_size, config.moe_intermediate_size, config.num_experts, config.num_experts_per_tok,
                norm_topk_prob=config.norm_topk_prob,
                shared_expert_intermediate_size=config.shared_expert_intermediate_size,
                router_weights_in_input_dtype=config.router_weights_in_input_dtype)
        else:
            self.feed_forward = FeedForward(config)

    def forward(self, h: Tensor, delta: Optional[Tensor], step: _Step, layer: int):
        """h: the residual stream (B, S, hidden); delta: the previous sublayer's output, not yet
        added to h (None before the first block). Returns the new (h, delta).

        The residual add happens inside the norm (one fused pass on the fastattn backend):
        rms_norm(delta, residual=h) returns (norm(h + delta), h + delta)."""
        norm = self.attention_norm
        if delta is None:
            y = _rms_norm(step.backend, h, norm.weight, norm.eps, unit_offset=norm.unit_offset)
        else:
            y, h = _rms_norm(step.backend, delta, norm.weight, norm.eps, residual=h, unit_offset=norm.unit_offset)
        delta = self.attention(y, step, layer)
        if self.sandwich_norms:
            norm = self.post_attention_norm
            delta = _rms_norm(step.backend, delta, norm.weight, norm.eps, unit_offset=norm.unit_offset)
        norm = self.ffn_norm
        y, h = _rms_norm(step.backend, delta, norm.weight, norm.eps, residual=h, unit_offset=norm.unit_offset)
        if isinstance(self.feed_forward, MoEFeedForward):  # its CPU experts kernel on the fastattn backend
            delta = self.feed_forward(y, backend=step.backend)
        else:
            delta = self.feed_forward(y)
        if self.sandwich_norms:
            norm = self.post_ffn_norm
            delta = _rms_norm(step.backend, delta, norm.weight, norm.eps, unit_offset=norm.unit_offset)
        return h, delta


_MODEL_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def _one_call_at_a_time(method):
    """Serialise a method's calls per model: generate keeps its KV cache on the model
    (self.cache), and two threads generating with one model overwrote each other's cache
    (wrong tokens with no error, or a 'decode past the end' error). The lock is kept beside the
    model (a weak-keyed table), not on it, so the model still pickles and deep-copies."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _MODEL_LOCKS_GUARD:
            lock = _MODEL_LOCKS.get(self)
            if lock is None:
                lock = _MODEL_LOCKS[self] = threading.RLock()
        with lock:
            return method(self, *args, **kwargs)

    return wrapper


class Llama(nn.Module):
    """LLaMA-family decoder. ``backend``: "fastattn" (the kernels) or "torch" (references)."""

    def __init__(self, config: LlamaConfig, backend: str = "fastattn"):
        super().__init__()
        self.config = config
        self.backend = backend
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNormWeight(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._rope: Dict[str, Tuple[Tensor, Tensor]] = {}
        self.cache: Union[KVCache, PagedKVCache, None] = None
        self.reset_parameters()
        self._tie_weights()
        self._build_rope()

    def _build_rope(self) -> None:
        """The RoPE tables for the parameters' device, built now (eagerly) rather than at the
        first forward, which may be traced: tables first built inside torch.compile cost a
        recompile and may differ from eager's by an ulp, and an exported program rebuilt them
        on every call. Tables of other devices are dropped (a model moved to a GPU keeps no
        CPU copy). Not on the meta device (from_pretrained builds on meta, then loads)."""
        device = self.tok_embeddings.weight.device
        if device.type == "meta" or torch.compiler.is_compiling():
            return
        self._rope = {key: t for key, t in self._rope.items() if key.split("/")[0] == str(device)}
        self.rope(device)
        if self.config.rope_local_theta is not None:
            self.rope(device, local=True)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._build_rope()  # (a device move: the new device's tables; a dtype cast: nothing new)
        return out

    # -- setup -------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
        self._backend = name

    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init as transformers does: normal(0, 0.02) weights, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNormWeight):
                (nn.init.zeros_ if m.unit_offset else nn.init.ones_)(m.weight)
            elif isinstance(m, MoEFeedForward):  # its fused expert weights are plain Parameters
                nn.init.normal_(m.w13, std=std)
                nn.init.normal_(m.w2, std=std)

    def _tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def rope(self, device, local: bool = False) -> Tuple[Tensor, Tensor]:
        """The fp32 cos/sin tables (max_position_embeddings, rotary_dim / 2) on `device`, built
        once per device (kept out of the state dict and out of .to(dtype)). local: the sliding
        layers' tables (base rope_local_theta, unscaled: Gemma 3). The model builds its
        device's tables when it is made, loaded or moved (``_build_rope``), so a traced forward
        finds them."""
        key = f"{device}/local" if local else str(device)
        if key not in self._rope:
            c = self.config
            theta, scaling = (c.rope_local_theta, None) if local else (c.rope_theta, c.rope_scaling)
            if c.longrope_switch is not None and not local:  # short then long half: see longrope_tables
                self._rope[key] = longrope_tables(c.rotary_dim, c.max_position_embeddings, theta, scaling, device)
            else:
                self._rope[key] = rope_tables(c.rotary_dim, c.max_position_embeddings, theta, scaling, device=device)
        return self._rope[key]

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward ----------------------------------------------------------------------
    def _hidden(self, input_ids: Tensor, step: _Step, longest: Union[int, Tensor, None] = None) -> Tensor:
        """input_ids (B, S) -> final normed hidden states (B, S, hidden). longest: the longest
        real row (right-padded prompts; default S; a 0-dim tensor when traced), which decides
        LongRoPE's factors."""
        if self.config.longrope_switch is not None:
            step = step._replace(positions=self._longrope_positions(step.positions, input_ids.shape[1],
                                                                   input_ids.device, longest))
        h = self.tok_embeddings(input_ids)  # (B, S, hidden)
        if self.config.embedding_multiplier is not None:  # Gemma: times sqrt(hidden)
            h = h * self._embedding_scale(h.dtype)
        delta = None
        for i, layer in enumerate(self.layers):
            h, delta = layer(h, delta, step, i)
        y, _ = _rms_norm(step.backend, delta, self.norm.weight, self.norm.eps, residual=h,
                         unit_offset=self.norm.unit_offset)
        return y

    def _longrope_positions(self, positions: Optional[Tensor], S: int, device,
                            longest: Union[int, Tensor, None] = None) -> Optional[Tensor]:
        """LongRoPE picks its factors per forward pass, as transformers does: the long ones
        (the tables' second half, rows offset by max_position_embeddings) when the pass's
        largest position + 1 exceeds original_max_position_embeddings. positions None means
        arange(S), of which the longest real row (``longest``, default S: pad columns of
        right-padded prompts do not count) decides; given positions (decode) are tested on the
        device: no host sync."""
        switch, offset = self.config.longrope_switch, self.config.max_position_embeddings
        if positions is None and isinstance(longest, Tensor):  # traced prefill: decided on the device
            positions = torch.arange(S, device=device)
            return positions + (longest > switch).to(positions.dtype) * offset
        if positions is None and longest is None and type(S) is not int:
            # A traced length (torch.compile / export's SymInt, torch.jit.trace's tensor): decided
            # on the device too, or the trace would keep its first length's factors (jit.trace)
            # or guard on the switch (export refused a dynamic length across it).
            positions = torch.arange(S, device=device)
            return positions + (positions + 1 > switch).any().to(positions.dtype) * offset
        if positions is None:
            return None if (S if longest is None else longest) <= switch else torch.arange(S, device=device) + offset
        use_long = (positions.max() + 1 > switch).to(positions.dtype)
        return positions + use_long * offset

    def _embedding_scale(self, dtype: torch.dtype) -> float:
        """config.embedding_multiplier rounded to fp32 and then to `dtype` (transformers keeps it
        in an fp32 buffer and casts it to the weights' dtype), as a Python float: multiplying by
        it is the same as by the rounded tensor, and a CUDA graph or torch.compile sees a
        constant (the first call per dtype does the rounding)."""
        key = (self.config.embedding_multiplier, dtype)
        scales = self.__dict__.setdefault("_embedding_scales", {})
        if key not in scales:
            scales[key] = float(torch.tensor(key[0], dtype=torch.float32).to(dtype))
        return scales[key]

    def _logits(self, y: Tensor) -> Tensor:
        """The LM head; with final_logit_softcapping (Gemma 2) z -> cap * tanh(z / cap), in the
        model dtype and in transformers' order of operations."""
        logits = self.output(y)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _step(self, device, positions=None, cache=None, decode=False, write_at=None, attend_len=None,
              checked=True) -> _Step:
        cos, sin = self.rope(device)
        local = self.rope(device, local=True) if self.config.rope_local_theta is not None else None
        return _Step(self.backend, _RopeTables(cos, sin, local), positions, cache, decode, write_at, attend_len,
                     checked)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, S) integer -> logits (B, S, vocab). No cache; differentiable."""
        _check_ids(input_ids, self.config, self.config.max_position_embeddings)
        # S <= max_position_embeddings: the positions (arange(S), LongRoPE's offset ones) are in the tables
        return self._logits(self._hidden(input_ids, self._step(input_ids.device, checked=False)))

    # -- KV-cache inference -------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int, *, cache: str = "contiguous", page_size: int = 16,
                    max_lengths: Optional[Sequence[int]] = None) -> Union[KVCache, PagedKVCache]:
        """Preallocate (or reuse, if it fits) the KV cache for batch_size sequences of up to
        max_len positions (a prefill of S padded positions needs max_len >= S).

        cache="contiguous": a static (batch_size, max_len) cache per layer.
        cache="paged": a pool of pages of page_size tokens. max_lengths (B,), default max_len
        each, is the most tokens sequence b will ever hold; the pool has
        1 + sum_b ceil(max_lengths[b] / page_size) pages (page 0 is the null page), so it
        never runs out, and the block table ceil(max_len / page_size) columns.

        The cache holds K/V in the dtype the model's projections produce: the model's dtype, or
        under torch.autocast the autocast dtype (as transformers' caches, which take whatever
        k/v arrive), so generate under autocast works; a cache set up under autocast must be
        used under it."""
        c = self.config
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        batch_size, max_len = int(batch_size), int(max_len)
        if max_len > c.max_position_embeddings:
            raise ValueError(
                f"max_len {max_len} exceeds max_position_embeddings {c.max_position_embeddings}"
            )
        if cache == "paged":
            return self._setup_paged_cache(batch_size, max_len, page_size, max_lengths)
        kv = self.cache
        if (not isinstance(kv, KVCache) or kv.batch_size != batch_size or kv.max_len < max_len
                or kv.k[0].dtype != self._cache_dtype() or kv.k[0].device != self.device):
            # The old cache is dropped first: building the new one while it is held would need
            # both at once (a new batch size or dtype, or a longer max_len, as generate asks).
            self.cache = kv = None
            kv = KVCache(c.num_hidden_layers, batch_size, max_len, c.num_key_value_heads, c.head_dim,
                         self._cache_dtype(), self.device)
            self.cache = kv
        kv.reset()
        return kv

    def _setup_paged_cache(self, batch_size: int, max_len: int, page_size, max_lengths) -> PagedKVCache:
        c = self.config
        if not is_integer(page_size) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        page_size = int(page_size)
        if self.backend == "fastattn" and not paged_kernels_available():
            raise NotImplementedError(
                "cache='paged' on the fastattn backend needs fastattn's paged-cache kernels (append_kv / "
                "decode_attention with block_table), which this build lacks; use backend='torch' or "
                "cache='contiguous'")
        max_lengths = [max_len] * batch_size if max_lengths is None else [int(n) for n in max_lengths]
        if len(max_lengths) != batch_size or not all(0 <= n <= max_len for n in max_lengths):
            raise ValueError(f"max_lengths must hold {batch_size} lengths in [0, {max_len}], got {max_lengths}")
        num_pages = 1 + sum(-(-n // page_size) for n in max_lengths)  # + the null page
        width = -(-max_len // page_size)
        kv = self.cache
        if (not isinstance(kv, PagedKVCache) or kv.batch_size != batch_size or kv.page_size != page_size
                or kv.num_pages < num_pages or kv.max_pages_per_seq < width
                or kv.k[0].dtype != self._cache_dtype() or kv.k[0].device != self.device):
            self.cache = kv = None  # (dropped before the new one is built, as above)
            kv = PagedKVCache(c.num_hidden_layers, batch_size, num_pages, page_size, width, c.num_key_value_heads,
                              c.head_dim, self._cache_dtype(), self.device)
            self.cache = kv
        kv.reset()
        return kv

    def _cache_dtype(self) -> torch.dtype:
        # What the k/v projections return: autocast casts a linear's 16/32-bit float inputs to
        # its dtype (never float64 ones).
        dtype, device_type = self.dtype, self.device.type
        if (dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.amp.is_autocast_available(device_type)
                and torch.is_autocast_enabled(device_type)):
            return torch.get_autocast_dtype(device_type)
        return dtype

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, prompt_lengths: Optional[Tensor] = None) -> Tensor:
        """Run the prompts (B, S), right-padded, into the empty cache (``setup_cache`` first).
        prompt_lengths (B,) gives each prompt's real length (default S). Returns the logits
        of each prompt's last real token, (B, vocab).

        All S rows are appended; on a paged cache the pad rows past a sequence's own pages go
        to the null page.

        ``torch.compile(model.prefill, fullgraph=True)`` compiles it with the contiguous cache
        (one graph for every S with ``dynamic=True``): traced, prompt_lengths are not read
        on the host but checked by ``torch._assert_async`` (lengths outside [1, S] raise a
        RuntimeError from the graph on the CPU; on CUDA that is a device-side assert, which,
        as any, leaves the CUDA context unusable), and the next eager decode_step reads the
        lengths once; a paged cache hands out the prompts' pages eagerly there (a graph break)."""
        cache = self.cache
        _check_ids(input_ids, self.config, None)
        B, S = input_ids.shape
        if cache is None or cache.batch_size != B or cache.max_len < S:
            raise ValueError(f"call setup_cache({B}, max_len >= {S}) before prefill")
        traced = torch.compiler.is_compiling()
        longest: Union[int, Tensor]
        if prompt_lengths is None:
            prompt_lengths = torch.full((B,), S, dtype=torch.int32, device=input_ids.device)
            lengths, longest = [S] * B, S
        elif traced:
            # Traced (no host reads inside a graph): checked on the device instead, and the
            # host bound decode steps vouch with is forgotten (the next eager step reads them).
            if not isinstance(prompt_lengths, Tensor) or prompt_lengths.numel() != B \
                    or prompt_lengths.is_floating_point() or prompt_lengths.is_complex():
                raise ValueError(f"prompt_lengths must be a ({B},) integer tensor")
            prompt_lengths = prompt_lengths.reshape(B)
            # (a constant message: formatting B and S into it would specialise the graph on them)
            torch._assert_async(((prompt_lengths >= 1) & (prompt_lengths <= S)).all(),
                                "prompt_lengths must hold one length in [1, S] per prompt (S = input_ids.shape[1])")
            lengths, longest = None, (prompt_lengths.max() if B else 0)
        else:  # read once (one sync on CUDA): the host bound of the lengths decode steps vouch with
            lengths = [int(n) for n in prompt_lengths.reshape(-1).tolist()]
            if len(lengths) != B or not all(1 <= n <= S for n in lengths):
                raise ValueError(f"prompt_lengths must hold {B} lengths in [1, {S}], got {lengths}")
            longest = max(lengths, default=0)
        cache.reset()
        if cache.block_table is not None:  # paged: pages for each prompt's real tokens, first
            if lengths is None:
                _start_eagerly(cache, prompt_lengths, S)
            else:
                cache.start(lengths)
        # The rows written are [0, S) of an empty cache holding max_len >= S, and the positions
        # arange(S) (LongRoPE: + max_position_embeddings) lie in the tables when S <= max_position_embeddings:
        # nothing for the kernels to check then (else they raise the error).
        step = self._step(input_ids.device, cache=cache, write_at=cache.seqlens,
                          checked=S > self.config.max_position_embeddings)
        y = self._hidden(input_ids, step, longest=longest)  # (B, S, hidden)
        cache.seqlens.copy_(prompt_lengths)  # pad rows beyond each length are dead
        cache._note_max_seqlen(None if lengths is None else longest)
        last = (prompt_lengths.long() - 1).view(B, 1, 1).expand(B, 1, y.shape[-1])
        return self._logits(y.gather(1, last).squeeze(1))  # (B, vocab)

    @torch.no_grad()
    def decode_step(self, tokens: Tensor) -> Tensor:
        """One new token per sequence, tokens (B,), at position cache.seqlens[b]; appends its
        K/V to the cache and returns the next-token logits (B, vocab).

        ValueError, before any work, when a sequence already fills the cache (or the RoPE
        tables, max_position_embeddings). That is decided on the host from the lengths the
        model wrote (prefill, then one more per step): the kernels then skip their own value
        checks, which on CUDA cost a host sync per layer. If ``cache.seqlens`` was written
        directly since, the step reads it once (one sync) instead.

        ``torch.compile(model.decode_step, fullgraph=True)`` compiles it with the contiguous
        cache (the kernels then check the room themselves: a full cache raises the same
        ValueError when the step runs); a paged cache compiles with a graph break (its pages
        are handed out on the host each step, from the lengths read on the device: one sync)."""
        cache = self.cache
        if cache is None:
            raise ValueError("call setup_cache(...) and prefill(...) before decode_step")
        _check_step_tokens(tokens, self.config, cache.batch_size)
        if torch.compiler.is_compiling():
            # Traced (torch.compile(model.decode_step, fullgraph=True), as gpt-fast compiles its
            # decode): neither the lengths nor their version counter can be read on the host
            # while tracing, so the kernels check the positions and the cache room themselves.
            if cache.block_table is not None:
                # The paged cache hands out pages on the host (a Python free list): traced,
                # every step would recompile. That part runs eagerly (a graph break, so not
                # under fullgraph=True; the contiguous cache has none), the device work compiles once.
                _grow_eagerly(cache)
            return self._decode(tokens, checked=True)
        if getattr(cache, "_host_seqlens_unsure", False):
            cache._resync_host_seqlens()  # (traced steps ran before this one; one may have raised)
        bound = self._decode_room(cache)
        grown = getattr(cache, "host_seqlens", None)
        cache.grow(1)  # paged: a new page for each sequence that crosses a page boundary
        try:
            logits = self._decode(tokens, checked=False)
        except BaseException:
            if grown is not None:  # the step did not happen: its row is not counted (a page it took stays held)
                cache.host_seqlens = grown
            raise
        cache._note_max_seqlen(bound)
        return logits

    def _decode_room(self, cache, read: bool = True) -> Optional[int]:
        """Host check that every sequence of `cache` has room for one more token: in the cache
        and in the RoPE tables (positions < max_position_embeddings). Returns the bound of the
        lengths after that token. Without a known bound (seqlens written directly) the lengths
        are read (one sync), or with read=False None is returned (nothing checked)."""
        n = cache.known_max_seqlen()
        if n is None:
            if not read:
                return None
            n = 0
            if cache.seqlens.numel():
                lo, n = torch.stack(torch.aminmax(cache.seqlens)).tolist()
                if lo < 0:
                    raise ValueError(f"cache.seqlens must be >= 0, got a minimum of {lo}")
        max_pos = self.config.max_position_embeddings
        if n + 1 > min(cache.max_len, max_pos):
            what = (f"the cache's capacity max_len = {cache.max_len}" if cache.max_len <= max_pos
                    else f"max_position_embeddings = {max_pos} (the RoPE tables)")
            raise ValueError(f"decode past the end: a sequence already holds {n} tokens and one more exceeds "
                             f"{what}; size the cache with setup_cache(batch, max_len) for prompt plus new tokens")
        return n + 1

    def _decode(self, tokens: Tensor, checked: bool = True) -> Tensor:
        """decode_step's device work (what a CUDA graph records): no host-side allocation.
        checked=False when the caller has made sure every sequence has room for the new token
        (``_decode_room``): the fastattn kernels then skip their host-synchronising checks."""
        cache = self.cache
        B = tokens.shape[0]
        positions = cache.seqlens.view(B, 1)  # each sequence decodes at its own position
        attend_len = cache.seqlens + 1
        step = self._step(tokens.device, positions=positions, cache=cache, decode=True,
                          write_at=cache.seqlens, attend_len=attend_len, checked=checked)
        y = self._hidden(tokens.view(B, 1), step)  # (B, 1, hidden)
        logits = self._logits(y[:, 0])  # (B, vocab)
        # Last: a step that raises before here leaves the lengths as they were (decode_step then
        # also rolls back the host lengths).
        cache.seqlens.copy_(attend_len)
        return logits

    @torch.no_grad()
    def capture_decode_step(self, warmup: int = 2):
        """CUDA only: record one ``decode_step`` on the current cache into a CUDA graph and
        return ``step(tokens (B,)) -> logits (B, vocab)`` that replays it: no Python, launch
        overhead or host sync per layer. Every op of the step must be capturable (the
        fastattn kernels are).

        The graph is bound to this cache (call again after ``setup_cache`` allocates a new
        one) and needs room for one more row per sequence. The returned logits tensor is
        overwritten by the next replay. Warm-up steps write scratch K/V into each sequence's
        next row only, which the real step overwrites; cache lengths are restored.

        On a paged cache the block table is read in place by every replay: ``step`` first
        gives each sequence crossing a page boundary its new page (host side, from the free
        list, as ``decode_step`` does), then replays."""
        cache = self.cache
        if cache is None:
            raise ValueError("call setup_cache (and prefill) before capture_decode_step")
        moe = [i for i in range(self.config.num_hidden_layers) if self.config.is_moe_layer(i)]
        if moe:  # the expert grouping reads per-expert token counts on the host
            raise ValueError(f"capture_decode_step (cuda_graph=True) does not support mixture-of-experts "
                             f"layers ({len(moe)} here): their routing syncs with the host every step; "
                             f"decode without cuda_graph")
        if cache.k[0].device.type != "cuda":
            raise ValueError(f"capture_decode_step needs the model on a CUDA device, not {cache.k[0].device}")
        bound = self._decode_room(cache)  # the warm-up and recorded steps write one more row
        tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=cache.k[0].device)
        saved = cache.seqlens.clone()
        if cache.block_table is not None:  # the warm-up rows' pages (the next step's anyway)
            cache.reserve([n + 1 for n in cache.host_seqlens])
        # CUDA graphs want the first runs (allocator, lazy init) on a side stream.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._decode(tokens, checked=False)
                cache.seqlens.copy_(saved)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._decode(tokens, checked=False)  # recorded, not run: lengths stay as saved
        cache.seqlens.copy_(saved)
        cache._note_max_seqlen(bound - 1)  # the lengths are back as they were

        def step(new_tokens: Tensor) -> Tensor:
            # The host bound of the lengths, when known, catches a step past the end for free.
            # A replay never syncs: if seqlens was written directly (no known bound), nothing
            # is checked, as inside any graph, and the kernels drop rows past the capacity.
            _check_step_tokens(new_tokens, self.config, cache.batch_size)  # (values: CUDA, not read)
            n = self._decode_room(cache, read=False)
            cache.grow(1)
            tokens.copy_(new_tokens)
            graph.replay()
            cache._note_max_seqlen(n)  # None (unknown) stays unknown
            return logits

        return step

    @torch.no_grad()
    @_one_call_at_a_time
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        eos_token_id: Optional[Union[int, Sequence[int]]] = None,
        *,
        prompt_lengths: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        pad_token_id: Optional[int] = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: Union[bool, str] = False,
        num_return_sequences: int = 1,
        repetition_penalty: float = 1.0,
        min_new_tokens: int = 0,
        progress: bool = False,
        cuda_graph: bool = False,
        cache: str = "contiguous",
        page_size: int = 16,
    ) -> Tensor:
        """Prefill + KV-cache decode. Greedy at temperature 0, else temperature / top-k /
        top-p sampling (``generator`` makes it reproducible); beam search with num_beams > 1.

        input_ids (B, S). Prompts of different lengths are left-aligned (right-padded) with
        their lengths given by ``prompt_lengths`` (B,) or ``attention_mask`` (B, S) of ones
        followed by zeros. Returns (B, S + n) ids, n <= max_new_tokens: row b is its prompt
        (prompt_lengths[b] tokens), then its new tokens, then ``pad_token_id`` (default: the
        first eos id, else 0). A sequence stops after emitting an eos id; generation stops
        when all have. ``cuda_graph=True`` (CUDA only) replays each decode step from a CUDA
        graph (see ``capture_decode_step``).

        ``repetition_penalty`` (1 = off) divides the positive and multiplies the negative
        scores of every token already in the sequence (prompt or generated);
        ``min_new_tokens`` forbids the eos ids until that many tokens are out. Both as
        transformers' ``generate`` (see ``fastattn.models.generation``).

        Beam search (``num_beams`` > 1, no sampling options), transformers' rules:
        ``length_penalty`` (a finished hypothesis scores sum(log p) / length ** length_penalty),
        ``early_stopping`` (True: stop once num_beams hypotheses are done; False: stop when
        none can improve, by the current length; "never": by the maximum length). Returns
        (B * num_return_sequences, S + n): each prompt's best ``num_return_sequences``
        hypotheses, best first, laid out as above. Beams are cache rows, reordered in place
        after each step (one gather; on the paged cache every beam owns its pages and the
        moved beams' pages are copied); the prompts are prefilled once, then copied to their beams.

        ``cache="paged"`` keeps K/V in pages of ``page_size`` tokens (``PagedKVCache``): only
        each prompt's real tokens and its new ones take pages, and the pool holds
        sum_b ceil((prompt_lengths[b] + max_new_tokens - 1) / page_size) of them (plus the null
        page). Same tokens as the default ``cache="contiguous"``; ``self.cache`` reports the
        pages used afterwards.

        The KV cache lives on the model (``self.cache``), so calls on one model from several
        threads run one at a time; to generate in parallel, give each thread its own model
        (``copy.deepcopy(model)``).
        """
        from . import generation

        _check_ids(input_ids, self.config, None)
        lengths = _prompt_lengths(input_ids, prompt_lengths, attention_mask)  # (B,) int32
        if not is_integer(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        S, max_pos = input_ids.shape[1], self.config.max_position_embeddings
        if S > max_pos:
            raise ValueError(f"input_ids has {S} positions, more than max_position_embeddings {max_pos}")
        if S + max_new_tokens - 1 > max_pos:  # the last new token is returned, never fed back
            raise ValueError(f"max_new_tokens {max_new_tokens}: a {S}-position prompt and {max_new_tokens} new "
                             f"tokens need {S + max_new_tokens - 1} positions (the last new token is not fed "
                             f"back), more than max_position_embeddings {max_pos}; use max_new_tokens <= "
                             f"{max_pos - S + 1}")
        _check_sampling(temperature, top_k, top_p)
        generation.check_options(num_beams, length_penalty, early_stopping, num_return_sequences,
                                 repetition_penalty, min_new_tokens, temperature, top_k, top_p)
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
        if not is_integer(page_size) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        # NumPy integers (accepted above) become Python ints before they size anything
        max_new_tokens, num_beams, num_return_sequences, min_new_tokens, page_size = (
            int(v) for v in (max_new_tokens, num_beams, num_return_sequences, min_new_tokens, page_size))
        top_k = None if top_k is None else int(top_k)
        # eos ids outside the vocabulary can never be sampled: ignored, as transformers does
        eos = [e for e in _eos_list(eos_token_id) if 0 <= e < self.config.vocab_size]
        if pad_token_id is not None and not (is_integer(pad_token_id) and 0 <= pad_token_id < self.config.vocab_size):
            # (finished rows feed it back into the embedding)
            raise ValueError(f"pad_token_id must be a token id in [0, {self.config.vocab_size}), got {pad_token_id!r}")
        pad = int(pad_token_id) if pad_token_id is not None else (eos[0] if eos else 0)
        if input_ids.shape[0] == 0:  # no sequence: nothing to run, on any cache
            return torch.full((0, input_ids.shape[1] + max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
        common = dict(eos=eos, pad=pad, repetition_penalty=float(repetition_penalty), min_new_tokens=min_new_tokens,
                      progress=progress, cuda_graph=cuda_graph, cache=cache, page_size=page_size)
        if num_beams > 1:
            return generation.beam_search(self, input_ids, lengths, max_new_tokens, num_beams=num_beams,
                                          length_penalty=float(length_penalty), early_stopping=early_stopping,
                                          num_return_sequences=num_return_sequences, **common)
        return generation.sample(self, input_ids, lengths, max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, generator=generator, **common)

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, backend: str = "fastattn", dtype: Optional[torch.dtype] = None,
                        device=None) -> "Llama":
        """Load a local Hugging Face LLaMA-format folder: config.json plus model.safetensors or
        sharded *.safetensors with model.safetensors.index.json (never pickle files).

        dtype None (or "auto", as transformers spells it) keeps the checkpoint's dtype; a torch
        floating dtype or its name ("bfloat16", "float16", "float32") converts; device None
        means the CPU."""
        dtype = _dtype_arg(dtype)
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"from_pretrained: {path!r} is not a directory")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"from_pretrained: missing config.json in {path!r}")
        with open(cfg_path) as f:
            config = LlamaConfig.from_hf(json.load(f))
        device = torch.device(device if device is not None else "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"from_pretrained: device {str(device)!r} requested but torch sees no CUDA device "
                             f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
        hf_state = _load_safetensors(path, device)
        if dtype is None:
            dtype = next((t.dtype for t in hf_state.values() if t.is_floating_point()), torch.float32)
        state = _map_hf_state_dict(hf_state, config, dtype)
        with torch.device("meta"):
            model = cls(config, backend=backend)
        model.load_state_dict(state, strict=True, assign=True)
        model._tie_weights()  # assign=True gives each key its own Parameter
        model._build_rope()  # (built on meta: the tables for the loaded weights' device now)
        return model


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------
def sample_next_token(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """logits (B, vocab) -> next tokens (B,) int64.

    temperature 0: argmax. Otherwise softmax(logits / temperature) restricted to the top_k
    largest logits and then to the smallest set of most likely tokens whose probability
    reaches top_p (nucleus; the most likely token is always kept), sampled with `generator`.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    # A temperature so small that a row's largest (finite) logit overflows fp32 (to +inf, or
    # to -inf when it is negative; below ~7e-46 the temperature itself is 0 in fp32 and a 0
    # logit gives NaN: the softmax then gives NaN) takes its limit: the row's largest logits
    # alone, equally likely (the exact distribution in fp32: any smaller logit is >= 1 ulp
    # below, over a tiny temperature).
    largest = logits.amax(dim=-1, keepdim=True)  # (B, 1)
    overflow = ~scaled.amax(dim=-1, keepdim=True).isfinite() & largest.isfinite()
    logits = torch.where(overflow, torch.where(logits == largest, 0.0, float("-inf")), scaled)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        drop = mass_before >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------
# Helpers: argument checks, checkpoint loading
# ---------------------------------------------------------------------------------------
def _check_ids(input_ids, config: LlamaConfig, max_len: Optional[int]) -> None:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be a (batch, seq) int64 or int32 tensor (the embedding's index "
                         f"types), got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per sequence")
    if max_len is not None and input_ids.shape[1] > max_len:
        raise ValueError(f"input_ids has {input_ids.shape[1]} positions, more than "
                         f"max_position_embeddings {max_len}")
    # An id outside the vocabulary would be an IndexError deep in the embedding on the CPU and
    # a device-side assert on CUDA. Reading the range is one host sync per call on CUDA; a
    # compiled graph skips it rather than break on a data-dependent branch (and so do meta and
    # fake ids, which have no values: a model moved to "meta" runs for shapes).
    if input_ids.numel() and host_values_readable(input_ids):
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {config.vocab_size})")


def _check_step_tokens(tokens, config: LlamaConfig, batch: int) -> None:
    """decode_step's tokens: (batch,) int64 / int32, ids in the vocabulary (read on the CPU only:
    on CUDA that would be a host sync per step; generate() passes sampled ids)."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 1 or tokens.shape[0] != batch or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be a ({batch},) int64 or int32 tensor (one id per cached sequence), "
                         f"got {tokens.dtype} of shape {tuple(tokens.shape)}")
    if tokens.device.type == "cpu" and tokens.numel() and host_values_readable(tokens):
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"tokens holds token id {lo if lo < 0 else hi}, outside the vocabulary "
                             f"[0, {config.vocab_size})")


def _is_real(value) -> bool:
    """A Python or NumPy real number (not a bool, not a tensor, not a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_sampling(temperature, top_k, top_p) -> None:
    if not _is_real(temperature):
        raise ValueError(f"temperature must be >= 0 (a finite number): a Python or NumPy real number, got "
                         f"{type(temperature).__name__} {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (a finite number), got {temperature!r}")
    if top_k is not None and (not is_integer(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not _is_real(top_p):
        raise ValueError(f"top_p must be in (0, 1] or None: a Python or NumPy real number, got "
                         f"{type(top_p).__name__} {top_p!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _dtype_arg(dtype) -> Optional[torch.dtype]:
    """from_pretrained's dtype: None / "auto", a floating torch.dtype, or its name."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(named, torch.dtype):
            dtype = named
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None, 'auto', or a floating torch dtype (or its name, e.g. 'bfloat16'), "
                         f"got {dtype!r}")
    return dtype


def _eos_list(eos_token_id) -> List[int]:
    """An int, a NumPy integer, a tensor (0-d or 1-d) or a list of ints, as transformers takes it."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        return [int(e) for e in eos_token_id.reshape(-1).tolist()]
    if is_integer(eos_token_id):
        return [int(eos_token_id)]
    try:
        ids = [e for e in eos_token_id]
    except TypeError:
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}") from None
    if not all(is_integer(e) for e in ids):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return [int(e) for e in ids]


def _prompt_lengths(input_ids: Tensor, prompt_lengths, attention_mask) -> Tensor:
    B, S = input_ids.shape
    device = input_ids.device
    if prompt_lengths is not None and attention_mask is not None:
        raise ValueError("give prompt_lengths or attention_mask, not both")
    if attention_mask is not None:
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask must have shape {(B, S)}, got {tuple(attention_mask.shape)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1 (ones for the prompt's tokens, then zeros)")
        m = attention_mask.to(device=device, dtype=torch.long)
        lengths = m.sum(dim=1)
        left_aligned = torch.arange(S, device=device).view(1, S) < lengths.view(B, 1)
        if not bool((m.bool() == left_aligned).all()):
            raise ValueError("attention_mask must be ones followed by zeros (left-aligned, right-padded "
                             "prompts); left padding is not supported")
        prompt_lengths = lengths
    if prompt_lengths is None:
        return torch.full((B,), S, dtype=torch.int32, device=device)
    lengths = torch.as_tensor(prompt_lengths, device=device)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"prompt_lengths must be integers, got {lengths.dtype}")
    lengths = lengths.to(torch.int32).view(-1)
    if lengths.numel() != B:
        raise ValueError(f"prompt_lengths must have {B} entries, got {lengths.numel()}")
    if bool(((lengths < 1) | (lengths > S)).any()):
        raise ValueError(f"prompt_lengths must lie in [1, {S}], got {lengths.tolist()}")
    return lengths


def _progress(iterable, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


def _load_safetensors(path: str, device: torch.device) -> Dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover - safetensors ships with transformers
        raise ImportError("from_pretrained needs the safetensors package (pip install safetensors)") from e
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
            hint = (f" (found {pickles}: pickle checkpoints are never loaded; convert them to safetensors)"
                    if pickles else "")
            raise FileNotFoundError(f"from_pretrained: no model.safetensors, model.safetensors.index.json "
                                    f"or *.safetensors in {path!r}{hint}")
    state: Dict[str, Tensor] = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"from_pretrained: missing weight shard {name!r} in {path!r}")
        state.update(load_file(file, device=str(device)))
    return state


def _map_hf_moe(take, hf: Dict[str, Tensor], p: str, q: str, config: LlamaConfig) -> Dict[str, Tensor]:
    """One MoE layer's Hugging Face tensors (prefix p = "model.layers.{i}.") -> MoEFeedForward's
    (prefix q). Either layout save_pretrained writes: per-expert matrices (the default,
    save_original_format=True: Mixtral's block_sparse_moe.experts.{e}.w1/w3/w2, Qwen's
    mlp.experts.{e}.gate_proj/up_proj/down_proj) or transformers 5's fused 3-D tensors
    (mlp.experts.gate_up_proj (E, 2 * inter, hidden), gate rows then up rows, and
    mlp.experts.down_proj (E, hidden, inter)), which are ours as they are."""
    m = p + ("block_sparse_moe." if p + "block_sparse_moe.gate.weight" in hf else "mlp.")
    out = {q + "router.weight": take(m + "gate.weight")}
    E = config.num_experts
    if m + "experts.gate_up_proj" in hf:
        out[q + "w13"] = take(m + "experts.gate_up_proj")
        out[q + "w2"] = take(m + "experts.down_proj")
    else:
        names = ("w1", "w3", "w2") if m + "experts.0.w1.weight" in hf else ("gate_proj", "up_proj", "down_proj")
        e = m + "experts.{}."
        out[q + "w13"] = torch.stack([torch.cat([take(e.format(j) + names[0] + ".weight"),
                                                 take(e.format(j) + names[1] + ".weight")]) for j in range(E)])
        out[q + "w2"] = torch.stack([take(e.format(j) + names[2] + ".weight") for j in range(E)])
    if config.shared_expert_intermediate_size:  # Qwen2-MoE
        s = m + "shared_expert."
        out[q + "shared_w13.weight"] = torch.cat([take(s + "gate_proj.weight"), take(s + "up_proj.weight")])
        out[q + "shared_w2.weight"] = take(s + "down_proj.weight")
        out[q + "shared_gate.weight"] = take(m + "shared_expert_gate.weight")
    return out


def _map_hf_state_dict(hf: Dict[str, Tensor], config: LlamaConfig, dtype: torch.dtype) -> Dict[str, Tensor]:
    """Hugging Face LLaMA names -> this model's (fused q/k/v and gate/up) names."""
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    used = set()

    def take(name: str) -> Tensor:
        if name not in hf:
            raise ValueError(f"from_pretrained: checkpoint is missing {name!r}")
        used.add(name)
        return hf[name].to(dtype)

    out = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if config.tie_word_embeddings:
        out["output.weight"] = take("lm_head.weight") if "lm_head.weight" in hf else out["tok_embeddings.weight"]
    else:
        out["output.weight"] = take("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out[q + "attention_norm.weight"] = take(p + "input_layernorm.weight")
        if config.sandwich_norms:  # Gemma 2/3: post_attention_layernorm norms the attention output
            out[q + "post_attention_norm.weight"] = take(p + "post_attention_layernorm.weight")
            out[q + "ffn_norm.weight"] = take(p + "pre_feedforward_layernorm.weight")
            out[q + "post_ffn_norm.weight"] = take(p + "post_feedforward_layernorm.weight")
        else:
            out[q + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
        a = p + "self_attn."
        if a + "qkv_proj.weight" in hf:  # Phi-3: already fused, rows q then k then v as ours
            out[q + "attention.wqkv.weight"] = take(a + "qkv_proj.weight")
            if config.attention_bias:
                out[q + "attention.wqkv.bias"] = take(a + "qkv_proj.bias")
        else:
            out[q + "attention.wqkv.weight"] = torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"])
            if config.attention_bias:
                out[q + "attention.wqkv.bias"] = torch.cat([take(a + f"{n}_proj.bias") for n in "qkv"])
        if config.qk_norm:
            out[q + "attention.q_norm.weight"] = take(a + "q_norm.weight")
            out[q + "attention.k_norm.weight"] = take(a + "k_norm.weight")
        out[q + "attention.wo.weight"] = take(a + "o_proj.weight")
        if config.o_proj_bias:
            out[q + "attention.wo.bias"] = take(a + "o_proj.bias")
        m = p + "mlp."
        if config.is_moe_layer(i):
            out.update(_map_hf_moe(take, hf, p, q + "feed_forward.", config))
            continue
        if m + "gate_up_proj.weight" in hf:  # Phi-3: already fused, gate rows then up rows as ours
            out[q + "feed_forward.w13.weight"] = take(m + "gate_up_proj.weight")
        else:
            out[q + "feed_forward.w13.weight"] = torch.cat([take(m + "gate_proj.weight"),
                                                            take(m + "up_proj.weight")])
        out[q + "feed_forward.w2.weight"] = take(m + "down_proj.weight")
        if config.mlp_bias:
            out[q + "feed_forward.w13.bias"] = torch.cat([take(m + "gate_proj.bias"), take(m + "up_proj.bias")])
            out[q + "feed_forward.w2.bias"] = take(m + "down_proj.bias")
    unused = sorted(set(hf) - used)
    if not config.shared_expert_intermediate_size:
        # Qwen2-MoE with shared_expert_intermediate_size 0: transformers saves a zero-width shared
        # expert (its output is 0 whatever its gate says), nothing to load.
        empty = {n.rsplit("mlp.", 1)[0] for n in unused if ".mlp.shared_expert." in n and hf[n].numel() == 0}
        unused = [n for n in unused if not (n.rsplit("mlp.", 1)[0] in empty and (
            ".mlp.shared_expert." in n and hf[n].numel() == 0 or n.endswith(".mlp.shared_expert_gate.weight")))]
    if unused:
        raise ValueError(f"from_pretrained: {len(unused)} checkpoint tensors this model does not use, "
                         f"e.g. {unused[:4]} (is the config right?)")
    return out
