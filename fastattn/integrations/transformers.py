"""Hugging Face transformers integration (transformers stays optional).

    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()    # attn_implementation="fastattn" -> fastattn.flash_attention(_varlen)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastattn")
    fa_hf.patch_model(model)   # RMSNorm modules -> fastattn.nn.RMSNorm, RoPE -> fastattn.apply_rotary

``register()`` adds "fastattn" to transformers' ``AttentionInterface`` and to its
``AttentionMaskInterface`` (``fastattn_mask``; without a mask entry transformers would build no
mask at all for an unknown implementation, silently dropping causality and padding). The mask
function hands each attention call one of three things:

* None, exactly where transformers' ``sdpa_mask`` returns None, i.e. where SDPA's own
  ``is_causal`` computes the attention: a single query token (full attention over the keys), or
  causality with SDPA's TOP-LEFT alignment (query i sees keys j <= i) and no padding (a plain
  forward, the first chunk of a dynamic cache, prefill into an empty static cache whose rows
  j >= Sq are unused). These run on ``fastattn.flash_attention`` with that same alignment.
* A 2-D (B, M) mask when the pattern is per-sequence lengths + causal (+ sliding window):
  padding (left or right, any zeros in ``attention_mask``), caches filled before (dynamic,
  static with unused rows, sliding-window caches), and packed sequences (``position_ids``
  restarting inside a row, which transformers detects when there is no ``attention_mask`` and no
  cache, e.g. training with ``use_cache=False``). This is what transformers' flash_attention_2
  path gets: the padding mask up to the last query (bool), or for packed rows an int32
  sequence index + 1. The attention call unpads q/k/v into packed per-sequence tokens (each
  sequence's queries are its last tokens) and runs one ``fastattn.flash_attention_varlen``
  (bottom-right causal, window (sliding_window - 1, 0)), then scatters the output back to
  (B, Sq, H, D). The unpadding indices are computed once per mask and shared by all layers.
  Query rows that are padding come back as 0 (as flash_attention_2; SDPA gives 0 where such a
  row sees no key, e.g. left padding, and attends right-padding rows to the earlier real
  tokens); they only ever reach padded positions, so real tokens' logits match SDPA. (A
  loss that reads a padded position's logits, e.g. left padding with labels shifted so the
  last pad predicts the first real token, matches SDPA and flash_attention_2 there, not eager,
  whose fully masked rows average all the values.) (A
  right-padded prompt given to ``generate()``, which transformers warns against, samples its
  first new token from a padded position: that token can differ from SDPA's, as it does under
  flash_attention_2.)
* transformers' own 4-D SDPA mask for anything else: overlays (``or_mask_function`` /
  ``and_mask_function``, e.g. bidirectional image tokens), chunked or bidirectional masks,
  a user's 4-D mask, every mask built under torch.compile / tracing, and the masks of models
  that read the mask themselves (``_model_reads_mask``: ALiBi Falcon, and models declaring no
  flash-attention support that force the mask, e.g. the sparse-attention indexers of
  DeepSeek-V3.2 / GLM-MoE-DSA / HY-V4, or Doge).
* transformers' eager mask (4-D, additive) for models that declare neither SDPA nor
  flash-attention support (``_declares_neither``): transformers runs them on that mask only,
  and their code relies on it (BigBirdPegasus' decoder for causality, DeepSeek-V4's compressed
  keys for its block bias).

Padding-free batches (sequences flattened into one row) are kept apart as flash_attention_2 keeps
them, beyond what transformers' masks express: the flash kwargs ``cu_seq_lens_q`` /
``cu_seq_lens_k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) always define
the sequences (a ValueError when they do not describe the call's tokens), and without a mask
``position_ids`` restarting inside a single row do too, even when a cache exists (a model called
without ``use_cache=False``, in training or eval mode, builds a DynamicCache, and transformers
then builds a plain causal mask: SDPA and eager attend across the sequences there). A padding
mask decides over both, as for flash_attention_2.

Gemma 2's attention logit soft-capping (the ``softcap`` keyword: scores become
``softcap * tanh(score / softcap)``) is passed to the kernels' own ``softcap=``.

Calls fall back to transformers' SDPA attention (on the exact mask SDPA would get, rebuilt from
the 2-D one where needed) for: 4-D masks, dropout in training, attention sinks,
sparse key selection (``indices``: DeepSeek-V3.2's indexer picks keys per query; applied to the
mask as eager / SDPA apply it), position biases, value head dims that differ, float32 or unsupported head dims on CUDA,
head dims above 512 on the CPU, a sliding window over a row whose padding has holes, and builds without
``fastattn.flash_attention_varlen``. A soft-capped call that falls back (or any soft-capped
call on a build whose kernels lack ``softcap=``) runs the model's own eager attention instead,
SDPA having no soft-capping; so does a call with attention sinks (``s_aux``: GPT-OSS, ...;
``sinks``: Inkling2; transformers' SDPA attention ignores them) and a call asked for attention weights
(``output_attentions=True``, or transformers' output collector asking for them, as for a model
built from a config with ``output_attentions=True``: the kernels return none, and SDPA only warns
that it returns none),
which then returns eager's weights. Each fallback is counted by reason and warned about once
per reason (``RuntimeWarning``)::

    fa_hf.reset_stats()
    model.generate(ids, attention_mask=mask, max_new_tokens=32)
    fa_hf.stats()   # {"fastattn": 64, "sdpa_fallback": 0, "reasons": {}}, one count per layer call
"""
from __future__ import annotations

import contextvars
import importlib
import inspect
import sys
import threading
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

import fastattn

__all__ = ["register", "patch_model", "fastattn_attention_forward", "fastattn_mask", "stats", "reset_stats",
           "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "fastattn"

# RMSNorm classes computing w * (x / rms(x)) exactly, i.e. safe to swap for ours.
_COMPATIBLE_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")
# Gemma's: (x.float() / rms) * (1 + w.float()), cast to x's dtype: ours with unit_offset=True.
_UNIT_OFFSET_RMSNORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")
# Other models copy LlamaRMSNorm under their own name (Mixtral, Qwen2-MoE, Qwen3-MoE, Granite,
# DeepSeek-V2/V3, OLMoE, GLM-4, ... about 140 classes in transformers 5). A class whose forward
# has LlamaRMSNorm.forward's source, character for character, computes the same thing from the
# same attributes (weight, variance_epsilon), so it is swapped too; anything that differs by one
# character (an offset, an fp32 weight product, no weight) stays a "variant not known". Decided
# once per class.
_LLAMA_COPY_CACHE: dict = {}
_GEMMA_COPY_CACHE: dict = {}


def _is_gemma_rmsnorm_copy(cls) -> bool:
    """Whether ``cls`` computes GemmaRMSNorm's ``(1 + w) * x / rms(x)`` by GemmaRMSNorm's own
    code: its ``forward`` and ``_norm`` are Gemma's statement for statement (compared as syntax
    trees, so comments may differ: Qwen3-Next's and Qwen3.5's copies rename the model in one).
    Decided once per class."""
    hit = _GEMMA_COPY_CACHE.get(cls)
    if hit is None:
        hit = False
        try:
            from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

            for name in ("forward", "_norm"):
                code = _code_of(getattr(cls, name, None))
                hit = code is not None and code == _code_of(getattr(GemmaRMSNorm, name))
                if not hit:
                    break
        except ImportError:
            pass
        _GEMMA_COPY_CACHE[cls] = hit
    return hit


def _is_llama_rmsnorm_copy(cls) -> bool:
    hit = _LLAMA_COPY_CACHE.get(cls)
    if hit is None:
        hit = False
        try:
            from transformers.models.llama.modeling_llama import LlamaRMSNorm
            forward = getattr(cls, "forward", None)
            hit = forward is LlamaRMSNorm.forward or (
                inspect.isfunction(forward) and inspect.getsource(forward) == inspect.getsource(LlamaRMSNorm.forward))
        except (ImportError, OSError, TypeError):  # no source (frozen / built-in), no transformers
            hit = False
        _LLAMA_COPY_CACHE[cls] = hit
    return hit


# apply_rotary_pos_emb variants that fastattn.apply_rotary computes: LLaMA's rotate-half (NeoX)
# rotation, q * cos + rotate_half(q) * sin, over the whole head (partial=False) or over its first
# cos.shape[-1] dims with the rest passed through (partial=True, as ours does for R < D). A
# modeling module gets the dispatcher only when its apply_rotary_pos_emb is one of these
# functions (the same code, docstring aside) and its rotate_half is LLaMA's: models copy the name
# for other rotations (Cohere, Ernie 4.5, Helium, GLM: interleaved pairs; NanoChat: flipped
# signs; BLT: LLaMA's function over an interleaved rotate_half; Gemma 3n / 4: one tensor at a
# time), which ours does not compute.
_ROTARY_REFERENCES = (
    ("transformers.models.llama.modeling_llama", "full"),
    ("transformers.models.olmo.modeling_olmo", "full_cast_back"),  # + a cast back to q's / k's dtype
    ("transformers.models.phi3.modeling_phi3", "partial"),
    ("transformers.models.glm4_moe.modeling_glm4_moe", "partial"),  # Phi-3's, written out in more lines
    ("transformers.models.nemotron.modeling_nemotron", "partial"),
)
_ROTARY_REFERENCE_CODE = None
_ROTARY_KIND_CACHE: dict = {}

# Head dims the CUDA flash kernel is built for (others fall back to SDPA there).
_CUDA_HEAD_DIMS = (32, 64, 96, 128, 192, 256)
_CPU_MAX_HEAD_DIM = 512  # (csrc/bindings/flash_attn.cpp kMaxHeadDimCpu)

# Counts, per thread / task, how many patched attention modules are running: the rotary
# dispatcher uses fastattn only inside those, so unpatched models in the same process keep
# transformers' own function.
_IN_PATCHED_ATTENTION = contextvars.ContextVar("fastattn_in_patched_attention", default=0)
# The same count for code that torch.compile traces: dynamo cannot trace ContextVar.get/set
# (two graph breaks per layer, and torch.compile(fullgraph=True) of a patched model failed),
# but it traces a module global's reads and writes (replayed after the graph runs).
_IN_PATCHED_ATTENTION_TRACED = 0

# The reason under which calls asked for attention weights run the model's eager attention.
_OUTPUT_ATTENTIONS_REASON = "attention weights requested (output_attentions=True)"
# The reason under which calls with attention sinks (GPT-OSS, ... pass ``s_aux``) run the model's
# eager attention: transformers' SDPA attention ignores ``s_aux``, so an SDPA fallback would
# silently drop the sinks.
_SINKS_REASON = "attention sinks (s_aux)"
_INDICES_REASON = "sparse key selection (indices)"


def _has_sinks(kwargs) -> bool:
    """Whether the call carries per-head attention sinks: ``s_aux`` (GPT-OSS and its kin) or
    ``sinks`` (Inkling2), one extra logit per query head that takes probability mass."""
    return kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("fastattn.integrations.transformers needs transformers (pip install transformers)") from e
    return transformers


# ---------------------------------------------------------------------------------------
# Fallback accounting
# ---------------------------------------------------------------------------------------
_STATS_LOCK = threading.Lock()
_STATS = {"fastattn": 0, "sdpa_fallback": 0, "reasons": {}}
_WARNED_REASONS: set = set()


def stats() -> dict:
    """How the attention calls of attn_implementation="fastattn" models ran since the last
    ``reset_stats()``: ``{"fastattn": n, "sdpa_fallback": m, "reasons": {reason: count}}``, one
    count per attention call (per layer and forward). Calls inside torch.compile are not counted."""
    with _STATS_LOCK:
        return {"fastattn": _STATS["fastattn"], "sdpa_fallback": _STATS["sdpa_fallback"],
                "reasons": dict(_STATS["reasons"])}


def reset_stats() -> None:
    """Zero the counters of ``stats()`` (the once-per-reason warnings are not re-armed)."""
    with _STATS_LOCK:
        _STATS["fastattn"] = 0
        _STATS["sdpa_fallback"] = 0
        _STATS["reasons"] = {}


def _compiling() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _count_fastattn() -> None:
    if not _compiling():
        with _STATS_LOCK:
            _STATS["fastattn"] += 1


def _count_fallback(reason: str) -> None:
    if _compiling():
        return
    with _STATS_LOCK:
        _STATS["sdpa_fallback"] += 1
        _STATS["reasons"][reason] = _STATS["reasons"].get(reason, 0) + 1
        first = reason not in _WARNED_REASONS
        _WARNED_REASONS.add(reason)
    if first:
        # SDPA has no soft-capping and returns no weights
        to = ("eager attention" if reason.startswith("soft-capped") or reason in (_OUTPUT_ATTENTIONS_REASON, _SINKS_REASON)
              else "SDPA")
        warnings.warn(f"fastattn: attention call fell back to transformers' {to} ({reason}); counts in "
                      "fastattn.integrations.transformers.stats()", RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------
# Mask: transformers' mask function for attn_implementation="fastattn"
# ---------------------------------------------------------------------------------------
_MASK_CODES = None


def _mask_codes():
    """Code objects of transformers' mask-function closures, to recognise causal, sliding-window
    and packed-sequence mask functions by structure (anything else is 'arbitrary')."""
    global _MASK_CODES
    if _MASK_CODES is None:
        from transformers import masking_utils as mu

        t = torch.zeros(1, 1, dtype=torch.long)
        _MASK_CODES = {
            "and": mu.and_masks(mu.causal_mask_function).__code__,
            "sliding": mu.sliding_window_overlay(1).__code__,
            "remap": mu.remap_positions_for_packed_sequence(mu.causal_mask_function, t).__code__,
            "packed": mu.packed_sequence_mask_function(t).__code__,
            "causal": mu.causal_mask_function,
        }
    return _MASK_CODES


def _closure_vars(fn) -> dict:
    cells = fn.__closure__ or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


def _parse_mask_function(fn):
    """(window, packed_sequence_mask) when ``fn`` is transformers' causal mask function, its
    sliding-window causal one (window = sliding_window, keys with q - kv < window), or either
    remapped for packed sequences (packed_sequence_mask (B, S): a sequence index per token).
    None for anything else (or_masks/and_masks overlays, chunked, bidirectional, block masks...)."""
    codes = _mask_codes()
    if fn is codes["causal"]:
        return None, None
    code = getattr(fn, "__code__", None)
    if code is not codes["and"]:
        return None
    parts = list(_closure_vars(fn).get("mask_functions", ()))
    # Packed sequences: and_masks(remap_positions_for_packed_sequence(base, position_ids), packed(psm))
    if len(parts) == 2 and getattr(parts[0], "__code__", None) is codes["remap"] \
            and getattr(parts[1], "__code__", None) is codes["packed"]:
        base = _parse_mask_function(_closure_vars(parts[0]).get("mask_function"))
        psm = _closure_vars(parts[1]).get("packed_sequence_mask")
        if base is None or base[1] is not None or not isinstance(psm, torch.Tensor) or psm.dim() != 2:
            return None
        return base[0], psm
    # Sliding window: and_masks(sliding_window_overlay(w), causal_mask_function)
    window, causal = None, False
    for part in parts:
        if part is codes["causal"]:
            causal = True
        elif getattr(part, "__code__", None) is codes["sliding"]:
            w = _closure_vars(part).get("sliding_window")
            if isinstance(w, torch.Tensor) and w.numel() == 1:
                w = int(w)
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                return None
            window = w if window is None else min(window, w)
        else:
            return None
    return (window, None) if causal else None


def _sdpa_would_skip(padding_mask, q_length, kv_length, q_offset, kv_offset, local_size) -> bool:
    """Whether transformers' sdpa_mask returns None here (SDPA's is_causal computes the attention)."""
    try:
        from transformers.masking_utils import _ignore_causal_mask_sdpa
    except ImportError:  # a transformers without it: every masked call takes the varlen path
        return False
    return bool(_ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, q_offset, kv_offset, local_size))


_READS_MASK: dict = {}


def _model_reads_mask(config) -> bool:
    """Whether the model of ``config`` reads the mask it asks to be materialized
    (``allow_is_causal_skip=False``) in its own code, so it must get the 4-D mask SDPA gets:
    ALiBi Falcon adds its bias onto it, and the models that declare no flash-attention support
    (flash_attention_2 would hand them a 2-D mask too) index it as (B, 1, Sq, Sk): the sparse
    attention indexers of DeepSeek-V3.2 / GLM-MoE-DSA / HY-V4 / Mistral-Large-4, Doge's dynamic
    mask. Their attention calls then take the SDPA fallback. A model's own static-cache decode
    or packed sequences also come with ``allow_is_causal_skip=False``: a model that supports
    flash attention keeps the 2-D mask there."""
    if config is None:
        return False
    if getattr(config, "alibi", False) is True:
        return True
    cls = type(config)
    if cls not in _READS_MASK:
        _READS_MASK[cls] = _declares_no_flash_attention(cls)
    return _READS_MASK[cls]


def _declares_no_flash_attention(config_cls) -> bool:
    """True when a transformers model class of ``config_cls`` (from its modeling module, which is
    imported once the model is built) sets ``_supports_flash_attn = False``; False when unknown."""
    return any(getattr(c, "_supports_flash_attn", True) is False for c in _model_classes(config_cls))


def _model_classes(config_cls) -> list:
    """The classes of ``config_cls``'s transformers modeling module (imported once the model is
    built) that take that config and declare attention support flags; [] when unknown."""
    import typing

    modeling = sys.modules.get(config_cls.__module__.replace(".configuration_", ".modeling_"))
    if modeling is None:
        return []
    found = []
    for obj in list(vars(modeling).values()):
        cc = getattr(obj, "config_class", None) if isinstance(obj, type) else None
        if cc is None or "_supports_flash_attn" not in dir(obj):
            continue
        if cc is config_cls or config_cls in typing.get_args(cc):
            found.append(obj)
    return found


_EAGER_ONLY: dict = {}
_DECLARES_NEITHER: dict = {}


def _calls_attention_interface(config_cls) -> bool:
    """Whether the modeling module of ``config_cls`` dispatches attention through transformers'
    AttentionInterface (its source names ALL_ATTENTION_FUNCTIONS, as transformers' own check of
    a model's attention support reads it); True when unknown."""
    modeling = sys.modules.get(config_cls.__module__.replace(".configuration_", ".modeling_"))
    try:
        return modeling is None or "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(modeling)
    except (OSError, TypeError):
        return True


def _declares_neither(config) -> bool:
    """Whether every model class of ``config`` (its transformers modeling module, imported once
    the model is built) sets ``_supports_sdpa = False`` and ``_supports_flash_attn = False``:
    transformers runs such a model on the eager mask only, so its code was written for that
    mask (4-D, additive float) and nothing else. Decided once per config class, uncached while
    dynamo traces (a dict written during a trace fails its guard on the next call)."""
    if config is None:
        return False
    cls = type(config)
    hit = _DECLARES_NEITHER.get(cls)
    if hit is None:
        classes = _model_classes(cls)
        hit = bool(classes) and all(
            getattr(c, "_supports_sdpa", True) is False and getattr(c, "_supports_flash_attn", True) is False
            for c in classes)
        if _compiling():
            return hit
        _DECLARES_NEITHER[cls] = hit
    return hit


def _eager_only_model(config) -> bool:
    """Whether the model of ``config`` declares neither SDPA nor flash-attention support and its
    modeling code never calls the AttentionInterface (Bloom, MPT, XGLM, GPT-NeoX-Japanese,
    RoFormer, ...): its own attention code runs whatever ``attn_implementation`` says (so never
    fastattn), and reads the mask it is given the way transformers' eager path builds it (4-D,
    additive float). transformers accepts "fastattn" for such a model all the same; handing it
    fastattn's mask (None without padding) silently dropped causality, so it gets
    ``eager_mask`` instead, and a one-time warning says fastattn is not used."""
    if config is None:
        return False
    cls = type(config)
    if cls not in _EAGER_ONLY:
        flags = _declares_neither(config)
        if _compiling():
            # Decided, uncached, by the flags while dynamo traces: no source reading, and no
            # write to the cache (a dict changed during a trace fails its guard on the next
            # call: a second compile of the same shapes).
            return flags
        if not flags:
            _EAGER_ONLY[cls] = False
        else:  # DeepSeek-V4, HY-V4, Git, BridgeTower, ... declare neither but call the interface
            _EAGER_ONLY[cls] = not _calls_attention_interface(cls)
            warnings.warn(
                f"fastattn: {cls.__name__.replace('Config', '')} models support neither SDPA nor flash attention in "
                "transformers: "
                + ("their own (eager) attention code runs, on the eager mask, and fastattn's kernels are not used; "
                   "attn_implementation=\"eager\" gives the same result" if _EAGER_ONLY[cls] else
                   "they get transformers' eager mask (their code reads it, or relies on it for causality: "
                   "BigBirdPegasus' decoder, DeepSeek-V4's compressed keys), so their masked attention runs on "
                   "SDPA with that mask (fastattn's kernels only where eager's mask is None: bidirectional calls "
                   "without padding)"),
                stacklevel=3)
    return _EAGER_ONLY[cls]


def fastattn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    local_size: Optional[int] = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
):
    """transformers mask-interface function for "fastattn" (see the module docstring).

    Returns None where transformers' ``sdpa_mask`` does (SDPA's top-left ``is_causal``); for a
    causal / sliding-window causal pattern with padding, a filled cache or packed sequences, a
    2-D (B, M) mask over positions 0..M-1, M ending at the last query (bool: real token; int32:
    packed-sequence index + 1), carrying the window as ``_fastattn_window``; and ``sdpa_mask``'s
    4-D mask for anything else, which ``fastattn_attention_forward`` hands to SDPA."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function

    def dense():
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)

    if _eager_only_model(kwargs.get("config")) or _declares_neither(kwargs.get("config")):
        # (_eager_only_model first: it warns once about either kind)
        from transformers.masking_utils import eager_mask

        return eager_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                          kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.dim() != 2:
        return dense()
    if not allow_is_causal_skip and _model_reads_mask(kwargs.get("config")):
        return dense()
    if _compiling():
        return _traced_mask(q_length, kv_length, kv_offset, mask_function, attention_mask, local_size,
                            allow_is_causal_skip, kwargs, dense)
    try:
        pattern = _parse_mask_function(mask_function)
    except Exception:  # a transformers whose closures look different: be exact, via SDPA
        pattern = None
    if pattern is None:
        return dense()
    window, packed = pattern
    device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")
    q_offset = int(q_offset)  # static caches keep it in a tensor
    padding_mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if packed is None and allow_is_causal_skip and _sdpa_would_skip(
            padding_mask, q_length, kv_length, q_offset, kv_offset, local_size):
        return None
    # The mask we return is the padding mask up to the last query (later positions are seen by no
    # query), in absolute positions: still a valid transformers 2-D mask, so handing it back to a
    # mask function (generate() builds masks ahead for static caches) gives the same mask again.
    # The attention forward aligns its last min(end, Sk) columns with the key rows, which is where
    # every transformers cache puts them (keys ending at the last query, or starting at position
    # 0 with unused rows after it); anything else takes SDPA's mask.
    end = q_offset + q_length
    if kv_offset != max(end - kv_length, 0):
        return dense()
    if packed is not None:
        if padding_mask is not None or q_offset != 0 or tuple(packed.shape) != (batch_size, end):
            return dense()
        mask = packed.to(device=device, dtype=torch.int32) + 1
    elif padding_mask is None:
        mask = torch.ones(batch_size, end, dtype=torch.bool, device=device)
    else:
        # (a copy: the attribute below never lands on the caller's mask)
        mask = padding_mask[:, :end].to(torch.bool).expand(batch_size, -1).clone()
    mask._fastattn_window = window  # sliding window (q - kv < window), None for plain causal
    return mask


def _traced_mask(q_length, kv_length, kv_offset, mask_function, attention_mask, local_size, allow_is_causal_skip,
                 kwargs, dense):
    """fastattn_mask while torch.compile / export traces. transformers never skips the causal
    mask there (torch < 2.14, and export): its 4-D mask took every traced call to the SDPA
    fallback. Without a padding mask (none can be read while tracing), plain causal attention
    over as many keys as queries needs none: None, the kernel's causal (packed sequences a
    cache hides from transformers' mask are split by the attention forward from position_ids).
    Anything else: SDPA's mask, tagged as built here (``_fastattn_traced``): the closures of
    transformers' other mask functions (packed sequences without a cache, windows, chunks,
    bidirectional or block overlays) cannot be taken apart while tracing."""
    # (q_offset, a traced tensor here, is not read: with as many keys as queries from kv_offset
    # 0, the keys are the queries' own positions, as transformers' causal skip assumes too)
    if (attention_mask is None and isinstance(kv_offset, int) and kv_offset == 0 and q_length == kv_length
            and local_size is None and allow_is_causal_skip and mask_function is _mask_codes()["causal"]
            and not kwargs.get("use_vmap", False)):
        return None
    mask = dense()
    if isinstance(mask, torch.Tensor) and attention_mask is None:
        # (only without a padding mask: one with padding decides, position_ids are not read,
        # as on the eager path and in flash_attention_2)
        mask._fastattn_traced = True
    elif isinstance(mask, torch.Tensor) and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        # A padding mask of all ones (a tokenizer's, over a packed row) lets position_ids split
        # the row on the eager path, as in flash_attention_2; whether it has a zero cannot be
        # read while tracing: decided in the graph (_apply_padding_free_packing).
        mask._fastattn_traced_padding = attention_mask
    return mask


def _traced_packed_forward(q, k, v, position_ids, scaling, window, cap):
    """Causal attention of q/k/v (1, S, H|Hk, D) split into the sequences that position_ids (1, S)
    restarts mark, while torch.compile / export traces (the lengths cannot be read on the host):
    one varlen call with cu_seqlens of fixed size S + 1 (the sequences, then empty ones), which
    for one sequence is exactly flash_attention's result. CPU only (on CUDA the varlen grid
    would span S sequence slots: fastattn_attention_forward takes SDPA there)."""
    S = q.shape[1]
    seg = _restart_segments(position_ids).flatten() - 1  # sequence index per token, non-decreasing
    cu = torch.searchsorted(seg, torch.arange(S + 1, device=q.device, dtype=torch.int32)).to(torch.int32)
    w = (window - 1, 0) if window is not None else (-1, -1)
    out = fastattn.flash_attention_varlen(q[0], k[0], v[0], cu, cu, S, S, causal=True, softmax_scale=scaling,
                                          window=w, **cap)
    return out.unsqueeze(0)


def _restart_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """(1, S) int32 sequence index + 1 of each token of one packed row, in the graph. As
    flash_attention_2 (transformers' prepare_fa_kwargs_from_position_ids), whose split these
    paths follow (a cache exists or the padding mask is all ones, where transformers' own mask
    does not split): a sequence starts where the position is the row's minimum (every packed
    sequence restarts at the same first position: 0, or RoBERTa's padding_idx + 1), and at the
    first token. A gap in the positions (0 1 2 3 10 11 ...) is no restart: one sequence (it
    split the row before, where SDPA, eager and flash_attention_2 attend across it)."""
    first = torch.arange(position_ids.shape[-1], device=position_ids.device) == 0
    starts = (position_ids == position_ids.amin(-1, keepdim=True)) | first
    return starts.to(torch.int32).cumsum(-1, dtype=torch.int32)


def _traced_position_ids(kwargs, query, Sq: int, Sk: int, causal: bool):
    """position_ids (1, Sq) of a traced unmasked call whose packed sequences transformers' mask
    cannot show (a cache exists), for ``_traced_packed_forward``; None where that does not
    apply (flash_attention_2's rule: one batch row; causal, as many keys as queries)."""
    ids = kwargs.get("position_ids")
    if (not causal or Sq != Sk or Sq < 2 or query.shape[0] != 1
            or kwargs.get("cu_seq_lens_q") is not None or not isinstance(ids, torch.Tensor)
            or ids.is_floating_point()):
        return None
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    return ids if ids.dim() == 2 and tuple(ids.shape) == (1, Sq) else None


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------
class _VarlenPlan:
    """Unpadding of a 2-D fastattn mask for Sq queries, computed once per mask and query length
    (every layer of a forward shares the mask)."""

    def __init__(self, mask: torch.Tensor, Sq: int, window: Optional[int]):
        B, L = mask.shape
        packed = mask.dtype != torch.bool
        seg = mask.to(torch.int64)
        valid_k = seg > 0
        nseg = int(seg.max()) + 1 if packed and seg.numel() else 2
        gid = torch.arange(B, device=mask.device).unsqueeze(1) * nseg + seg  # (B, L): one id per sequence
        valid_q = valid_k[:, L - Sq:]
        gid_q = gid[:, L - Sq:]
        cnt_q = torch.bincount(gid_q[valid_q], minlength=B * nseg)
        cnt_k = torch.bincount(gid[valid_k], minlength=B * nseg)
        keep = cnt_q > 0  # sequences with at least one query (the others' keys are seen by nobody)
        sel_k = valid_k & keep[gid]
        idx_q = valid_q.flatten().nonzero().squeeze(1)
        idx_k = sel_k.flatten().nonzero().squeeze(1)
        cnt_q, cnt_k = cnt_q[keep], cnt_k[keep]
        zero = cnt_q.new_zeros(1)
        self.cu_q = torch.cat([zero, cnt_q.cumsum(0)]).to(torch.int32)
        self.cu_k = torch.cat([zero, cnt_k.cumsum(0)]).to(torch.int32)
        # A window counts positions; unpadding keeps them only where each row's tokens are contiguous.
        contiguous = torch.ones((), dtype=torch.bool, device=mask.device)
        if window is not None and not packed:
            pos = torch.arange(L, device=mask.device)
            first = torch.where(valid_k, pos, L).amin(1)
            last = torch.where(valid_k, pos, -1).amax(1)
            count = valid_k.sum(1)
            contiguous = ((last - first + 1 == count) | (count == 0)).all()
        host = torch.stack([cnt_q.max() if cnt_q.numel() else zero[0], cnt_k.max() if cnt_k.numel() else zero[0],
                            contiguous.to(cnt_q.dtype), idx_q.new_tensor(idx_q.numel())]).tolist()
        self.max_q, self.max_k, self.windowable, total_q = int(host[0]), int(host[1]), bool(host[2]), int(host[3])
        self.all_q = total_q == B * Sq  # every query row is a real token: no gather/scatter of queries
        self.bq, self.sq = idx_q // Sq, idx_q % Sq
        self.bk, self.ck = idx_k // L, idx_k % L
        self.total_q = total_q


def _mask_window(attention_mask, kwargs):
    if hasattr(attention_mask, "_fastattn_window"):
        return attention_mask._fastattn_window
    # A 2-D mask that is not ours (or was rebuilt by model code): flash_attention_2's convention.
    w = kwargs.get("sliding_window")
    return int(w) if w else None


def _key_rows(mask: torch.Tensor, Sk: int) -> torch.Tensor:
    """The columns of a 2-D mask (positions up to the last query) that are key rows 0..L-1:
    the last Sk of them (keys ending at the last query) or all (a cache with unused rows)."""
    return mask[:, max(mask.shape[1] - Sk, 0):]


def _varlen_plan(mask: torch.Tensor, Sq: int, Sk: int, window) -> _VarlenPlan:
    plans = getattr(mask, "_fastattn_plans", None)
    if plans is None:
        plans = {}
        try:
            mask._fastattn_plans = plans
        except (AttributeError, RuntimeError):
            pass
    key = (Sq, Sk, window)
    if key not in plans:
        plans[key] = _VarlenPlan(_key_rows(mask, Sk), Sq, window)
    return plans[key]


def _dense_from_2d(mask: torch.Tensor, Sq: int, Sk: int, window) -> torch.Tensor:
    """The (B, 1, Sq, Sk) boolean mask SDPA gets for a 2-D fastattn mask (for the fallbacks)."""
    mask = _key_rows(mask, Sk)
    B, L = mask.shape
    kcol = torch.arange(L, device=mask.device)
    qcol = torch.arange(L - Sq, L, device=mask.device)
    allowed = kcol.unsqueeze(0) <= qcol.unsqueeze(1)  # (Sq, L)
    if window is not None:
        allowed = allowed & (qcol.unsqueeze(1) - kcol.unsqueeze(0) < window)
    if mask.dtype == torch.bool:  # padding: exactly transformers' sdpa_mask
        dense = mask.unsqueeze(1) & allowed
    else:  # packed sequences: same sequence only
        seg = mask.to(torch.int64)
        dense = (seg.unsqueeze(1) == seg[:, L - Sq:].unsqueeze(2)) & (seg.unsqueeze(1) > 0) & allowed
    if Sk > L:
        dense = torch.nn.functional.pad(dense, (0, Sk - L), value=False)
    return dense.unsqueeze(1)


_TAKE_SOFTCAP: Optional[bool] = None


def _kernels_take_softcap() -> bool:
    """Whether this build's flash_attention and flash_attention_varlen take ``softcap=``.
    (Cached in a module global, not functools.lru_cache: torch.compile reads a global as a
    constant, where it traces through an lru_cache wrapper with a warning.)"""
    global _TAKE_SOFTCAP
    if _TAKE_SOFTCAP is None:
        try:
            _TAKE_SOFTCAP = all("softcap" in inspect.signature(getattr(fastattn.functional, name)).parameters
                                for name in ("flash_attention", "flash_attention_varlen"))
        except (AttributeError, TypeError, ValueError):
            _TAKE_SOFTCAP = False
    return _TAKE_SOFTCAP


def _softcap(kwargs) -> Optional[float]:
    """The call's attention logit soft-cap (Gemma 2 passes ``softcap``), None when off."""
    cap = kwargs.get("softcap")
    return float(cap) if cap is not None and cap > 0 else None


def _unsupported_reason(module, query, value, dropout, kwargs) -> Optional[str]:
    if dropout > 0.0 and module.training:
        return "attention dropout in training"
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"{query.dtype} (the kernels take float32, float16 and bfloat16)"
    if _softcap(kwargs) is not None and not _kernels_take_softcap():
        return "soft-capped scores (this fastattn build's kernels have no softcap=)"
    if kwargs.get("position_bias") is not None:
        return "position bias"
    if _has_sinks(kwargs):
        return _SINKS_REASON
    if kwargs.get("indices") is not None:
        return _INDICES_REASON
    if query.shape[-1] != value.shape[-1]:
        return "value head dim differs from the query head dim"
    if query.is_cuda and query.dtype == torch.float32:
        return "float32 on CUDA (the CUDA kernels are fp16/bf16)"
    if query.is_cuda and not fastattn.functional.cuda_kernels_run_on(query):
        return "a GPU this build has no CUDA code for (below sm_80, or an arch it was not compiled for)"
    if query.is_cuda and query.shape[-1] not in _CUDA_HEAD_DIMS:
        return f"head dim {query.shape[-1]} on CUDA (built for {_CUDA_HEAD_DIMS})"
    if query.is_cuda and max(query.shape[0], query.shape[1]) > fastattn.functional._CUDA_GRID_MAX:
        return f"batch or heads above {fastattn.functional._CUDA_GRID_MAX} on CUDA (the kernels' grid limits)"
    if (query.is_cuda and torch.is_grad_enabled() and (query.requires_grad or value.requires_grad)
            and not fastattn.functional.cuda_backward_fits(query, query.shape[-1])):
        return f"head dim {query.shape[-1]} backward on a GPU with less than 128 KiB of shared memory per block"
    if not query.is_cuda and query.shape[-1] > _CPU_MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]} on the CPU (the kernels take up to {_CPU_MAX_HEAD_DIM})"
    return None


def _with_selected_keys(attention_mask, indices, query, key, module, is_causal):
    """The mask restricted to the keys a sparse-attention indexer picked: ``indices`` (B, Sq, topk)
    key positions per query (DeepSeek-V3.2 and its kin pass them to a non-eager, non-SDPA
    implementation in place of the (B, 1, Sq, Sk) restriction they apply for eager / SDPA: the
    same mask is built here). Returns (mask, is_causal) for the SDPA / eager fallback."""
    B, Sq, Sk = query.shape[0], query.shape[2], key.shape[2]
    if indices.dim() != 3 or indices.shape[:2] != (B, Sq):
        raise ValueError(f"fastattn: sparse-attention indices must be (B={B}, Sq={Sq}, topk), got "
                         f"{tuple(indices.shape)}")
    picked = torch.zeros(B, Sq, Sk, dtype=torch.bool, device=query.device)
    picked = picked.scatter(-1, indices.long(), True).unsqueeze(1)  # (B, 1, Sq, Sk)
    if attention_mask is None:  # SDPA's meaning of no mask: top-left causal for more than one query
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and Sq > 1:
            picked = picked & torch.ones(Sq, Sk, dtype=torch.bool, device=query.device).tril()
        return picked, False
    if attention_mask.dtype == torch.bool:
        return attention_mask & picked, is_causal
    return attention_mask.masked_fill(~picked, torch.finfo(attention_mask.dtype).min), is_causal


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    if _softcap(kwargs) is not None:  # SDPA refuses soft-capping: the model's eager attention has it
        return _eager_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if _has_sinks(kwargs):  # transformers' SDPA attention ignores the sinks: eager has them
        return _eager_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if _weights_requested(kwargs) and _eager_of(module) is not None:  # SDPA returns no weights
        return _eager_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _weights_requested(kwargs) -> bool:
    """Whether this call must return attention weights: ``output_attentions=True`` passed down, or
    transformers' output collector asking for "attentions" without it (a config built with
    ``output_attentions=True``, e.g. ``from_config``: the flag then never reaches the attention
    call, and the kernels' missing weights left ``outputs.attentions`` an empty tuple)."""
    if kwargs.get("output_attentions"):
        return True
    if _compiling():
        return False
    collector = sys.modules.get("transformers.utils.output_capturing")
    active = getattr(collector, "_active_collector", None)
    try:
        wanted = active.get() if active is not None else None
    except Exception:  # another transformers' collector
        return False
    return isinstance(wanted, dict) and "attentions" in wanted


def _eager_of(module):
    """The eager attention function of the module's own modeling file, None if it has none."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _eager_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    """A fallback on the eager attention of the module's own modeling file (soft-capped scores,
    attention sinks, attention weights asked for), given the mask SDPA would get (None = SDPA's top-left
    is_causal) as the additive mask eager expects. Returns eager's (out, weights)."""
    eager = _eager_of(module)
    if eager is None:
        what = (f"soft-capped attention (softcap={kwargs.get('softcap')})" if _softcap(kwargs) is not None
                else "attention with sinks (s_aux / sinks)")
        raise NotImplementedError(
            f"fastattn: {what} in {type(module).__name__} needs an eager_attention_forward in "
            f"{type(module).__module__} (or, soft-capped, fastattn kernels with softcap=)")
    Sq, Sk = query.shape[2], key.shape[2]
    mask = attention_mask
    if mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and Sq > 1:
            mask = torch.ones(Sq, Sk, dtype=torch.bool, device=query.device).tril().view(1, 1, Sq, Sk)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _version_of(t) -> Optional[int]:
    """A tensor's in-place version counter (None for inference-mode tensors, which have none):
    what the per-tensor caches below are keyed by."""
    try:
        return int(t._version)
    except (AttributeError, RuntimeError):
        return None


def _packed_from_cu_seq_lens(cu_q, cu_k, B: int, Sq: int, Sk: int, mask_is_none: bool, device) -> torch.Tensor:
    """The (B, Sq) packed-sequence mask (int32 sequence index + 1) of flash-attention's padding-free
    kwargs ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (cumulative sequence lengths over the B * Sq tokens
    flattened, as DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes them). Raises a
    ValueError for kwargs that do not describe these tokens."""
    cu_q, cu_k = torch.as_tensor(cu_q), torch.as_tensor(cu_k)
    key = (B, Sq, Sk, mask_is_none, str(device), _version_of(cu_q), _version_of(cu_k))
    # Cached per tensor version; inference-mode tensors have no version: checked every call.
    cacheable = not _compiling() and None not in key
    if cacheable:
        cache = getattr(cu_q, "_fastattn_packed", None)  # (every layer gets the same tensors)
        hit = cache.get(key) if isinstance(cache, dict) else None
        # (None stands for cu_q itself: storing cu_q on cu_q would be a reference cycle that
        # keeps both alive until a full garbage collection)
        if hit is not None and (hit[0] is cu_k or (hit[0] is None and cu_k is cu_q)):
            return hit[1]
    if not _compiling():
        problem = None
        # keys = queries (self-attention over the same tokens), or a static cache's prefill: keys
        # 0..Sq-1 are the tokens, the rows after them unused (a None mask, SDPA's top-left is_causal)
        if not (Sk == Sq or (Sk > Sq and mask_is_none)):
            problem = f"{Sq} queries against {Sk} keys (a filled cache)"
        elif cu_q.dim() != 1 or cu_q.numel() < 2 or cu_q.shape != cu_k.shape or \
                not torch.equal(cu_q.cpu().long(), cu_k.cpu().long()):
            problem = "cu_seq_lens_k differs from cu_seq_lens_q"
        else:
            host = cu_q.cpu().long()
            ends = set(host.tolist())
            if int(host[0]) != 0 or int(host[-1]) != B * Sq or bool((host.diff() < 0).any()):
                problem = f"cu_seq_lens_q {host.tolist()} is not 0 = c0 <= c1 <= ... = B * Sq = {B * Sq}"
            elif any(b * Sq not in ends for b in range(1, B)):
                problem = "a sequence crosses a batch row"
        if problem is not None:
            raise ValueError(f"fastattn: the flash-attention kwargs cu_seq_lens_q / cu_seq_lens_k do not describe the "
                             f"packed sequences of this call: {problem}")
    tokens = torch.arange(B * Sq, device=device)
    seg = torch.bucketize(tokens, cu_q[1:].to(device=device, dtype=torch.int64), right=True)
    mask = (seg.view(B, Sq) + 1).to(torch.int32)
    if cacheable:
        try:
            cu_q._fastattn_packed = {key: (None if cu_k is cu_q else cu_k, mask)}
        except (AttributeError, RuntimeError):
            pass
    return mask


def _packed_from_position_ids(position_ids, B: int, Sq: int) -> Optional[torch.Tensor]:
    """flash_attention_2's padding-free detection: one row (B = 1) whose position_ids restart
    (``_restart_segments``' rule, flash_attention_2's). The (1, Sq) packed mask (int32 sequence
    index + 1), None when the row is one sequence (or the ids are not a (1, Sq) tensor)."""
    if not isinstance(position_ids, torch.Tensor) or B != 1 or Sq < 2:
        return None
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2 or tuple(position_ids.shape) != (1, Sq) or position_ids.is_floating_point():
        return None

    def packed():
        seg = _restart_segments(position_ids)
        return seg if bool(seg[0, -1] > 1) else None

    return _memo_on(position_ids, "_fastattn_packed", packed)


def _all_true(mask: torch.Tensor) -> bool:
    """Whether a boolean mask has no False (computed once per mask tensor: layers share it)."""
    return _memo_on(mask, "_fastattn_all_true", lambda: bool(mask.all()))


def _memo_on(t: torch.Tensor, attr: str, compute):
    """compute() once per tensor and in-place version, kept on the tensor as ``attr``: every layer
    of a forward gets the same mask / position_ids tensor. Not kept for tensors without a version
    counter (inference mode) or that take no attribute."""
    version = _version_of(t)
    cached = getattr(t, attr, None)
    if cached is not None and version is not None and cached[0] == version:
        return cached[1]
    value = compute()
    if version is not None:
        try:
            setattr(t, attr, (version, value))
        except (AttributeError, RuntimeError):
            pass
    return value


def _apply_padding_free_packing(module, query, key, attention_mask, is_causal, kwargs):
    """flash_attention_2 honours padding-free packing that transformers' SDPA / eager masks miss:
    the flash kwargs ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (DataCollatorWithFlattening(
    return_flash_attn_kwargs=True)), and packed ``position_ids`` without an attention mask even when
    a cache exists (a model in training or eval mode builds a DynamicCache unless use_cache=False,
    and transformers then builds a plain causal mask: every token would attend across the packed
    sequences). Returns (mask, where its window comes from) with the mask to use instead: a packed
    2-D mask (varlen) for a None or packed mask, the 4-D mask restricted to same-sequence keys;
    the mask unchanged where a padding mask decides (as flash_attention_2, which unpads by it and
    ignores the rest) or nothing is packed. A 2-D mask's sliding window is the one of the mask it
    replaces (our mask function's), else the layer's ``sliding_window`` kwarg (as
    flash_attention_2 takes it)."""
    B, Sq, Sk = query.shape[0], query.shape[2], key.shape[2]
    two_d = attention_mask is not None and attention_mask.dim() == 2
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    has_cu = cu_q is not None and cu_k is not None
    if two_d and attention_mask.dtype == torch.bool:
        # A padding mask decides. One without padding over just these queries (our mask function
        # returns it for a sliding window shorter than the queries, where
        # flash_attention_2's mask function returns None) is no mask.
        if not (has_cu or (B == 1 and Sq > 1 and isinstance(kwargs.get("position_ids"), torch.Tensor))) \
                or attention_mask.shape[1] != Sq or _compiling() or not _all_true(attention_mask):
            return attention_mask, attention_mask
        original, attention_mask, two_d = attention_mask, None, False
    else:
        original = attention_mask
    if has_cu:
        packed = _packed_from_cu_seq_lens(cu_q, cu_k, B, Sq, Sk, attention_mask is None, query.device)
    elif attention_mask is None and not _compiling():
        if Sk < Sq:
            return original, original
        packed = _packed_from_position_ids(kwargs.get("position_ids"), B, Sq)
    elif (_compiling() and getattr(attention_mask, "_fastattn_traced", False) and attention_mask.dim() == 4
          and B == 1 and Sq == Sk and is_causal is not False and getattr(module, "is_causal", True)):
        # Traced, transformers' 4-D mask built in fastattn_mask (a sliding window, say; never a
        # caller's own mask): packed position_ids restarts split it by sequence, in the graph and
        # without the host test of whether anything is packed (nothing packed: the mask unchanged).
        ids = kwargs.get("position_ids")
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.numel() != Sq:
            return original, original
        packed = _restart_segments(ids.reshape(1, Sq))
    elif (_compiling() and isinstance(getattr(attention_mask, "_fastattn_traced_padding", None), torch.Tensor)
          and attention_mask.dim() == 4 and B == 1 and Sq == Sk and Sq > 1 and is_causal is not False
          and getattr(module, "is_causal", True) and not has_cu):
        # Traced, transformers' 4-D mask from a caller's padding mask: as eager, packed
        # position_ids split the row only where that padding mask is all ones (decided in the
        # graph, no host read); a mask with padding decides alone.
        ids, padding = kwargs.get("position_ids"), attention_mask._fastattn_traced_padding
        if (not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.numel() != Sq
                or padding.numel() != Sq):
            return original, original
        packed = _restart_segments(ids.reshape(1, Sq))
        keep = (packed.unsqueeze(2) == packed.unsqueeze(1)).unsqueeze(1) | ~padding.to(torch.bool).all()
        if attention_mask.dtype == torch.bool:
            return attention_mask & keep, None
        return attention_mask.masked_fill(~keep, torch.finfo(attention_mask.dtype).min), None
    else:
        return original, original
    if packed is None:
        return original, original  # (a mask without padding keeps its sliding window)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None or two_d:
        if not causal:  # block-diagonal, not causal: SDPA on the dense mask
            same = packed.unsqueeze(2) == packed.unsqueeze(1)  # (B, Sq, Sq)
            if Sk > Sq:
                same = torch.nn.functional.pad(same, (0, Sk - Sq), value=False)
            return same.unsqueeze(1), None
        # (the packed mask is shared by the layers: no _fastattn_window set on it)
        return packed, original
    # a 4-D mask (SDPA fallback): keep only keys of the query's own sequence
    if attention_mask.shape[-1] != Sq or attention_mask.shape[-2] != Sq:
        raise ValueError(f"fastattn: packed sequences (cu_seq_lens_q / cu_seq_lens_k) with a "
                         f"{tuple(attention_mask.shape)} attention mask for {Sq} queries / {Sk} keys")
    same = (packed.unsqueeze(2) == packed.unsqueeze(1)).unsqueeze(1)  # (B, 1, Sq, Sq)
    if attention_mask.dtype == torch.bool:
        return attention_mask & same, None
    return attention_mask.masked_fill(~same, torch.finfo(attention_mask.dtype).min), None


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
    (out (B, Sq, H, D), None), or eager's (out, weights) when ``output_attentions`` asks for
    weights. A None mask runs on fastattn.flash_attention, a 2-D mask (padding, filled caches,
    packed sequences; see ``fastattn_mask``) on fastattn.flash_attention_varlen; the rest falls
    back to transformers' SDPA attention, counted in ``stats()``."""
    # Under autocast, as SDPA's inputs (the model's own rotary multiplies q and k by fp32 cos /
    # sin, so they come back fp32 beside a bf16 v: a dtype mismatch for the kernels).
    query, key, value = fastattn.functional._sdpa_autocast(query, key, value)
    Sq, Sk = query.shape[2], key.shape[2]
    attention_mask, window_of = _apply_padding_free_packing(module, query, key, attention_mask, is_causal, kwargs)
    two_d = attention_mask is not None and attention_mask.dim() == 2
    window = _mask_window(window_of if window_of is not None else attention_mask, kwargs) if two_d else None
    if two_d and (attention_mask.shape[1] < Sq or attention_mask.shape[0] != query.shape[0]):
        raise ValueError(f"a 2-D attention mask for fastattn must be (B={query.shape[0]}, M >= Sq={Sq}) (positions up "
                         f"to the last query), got {tuple(attention_mask.shape)}")
    reason = _unsupported_reason(module, query, value, dropout, kwargs)
    if reason is None and fastattn.ops.transform_active():
        # forward-mode AD or torch.func's grad transforms, which the kernels' derivatives cannot
        # serve (see fastattn.ops.differentiating_transform): SDPA's, as for any other reason
        reason = fastattn.ops.differentiating_transform(query, key, value)
    if reason is None and _weights_requested(kwargs):
        # The kernels return no weights; eager attention does (SDPA and flash_attention_2 just
        # log that they return none). Without an eager function: SDPA, which says so itself.
        reason = _OUTPUT_ATTENTIONS_REASON
    if reason is None and attention_mask is not None and not two_d:
        reason = "mask not expressible as per-sequence lengths + causal/window"
    plan = None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    traced_ids = None
    if reason is None and _compiling() and attention_mask is None:
        traced_ids = _traced_position_ids(kwargs, query, Sq, Sk, bool(causal))
        if traced_ids is not None and query.is_cuda:
            # (the fixed-size varlen grid would span Sq sequence slots there: SDPA on the
            # same-sequence causal mask, as every traced call took before)
            attention_mask = _restart_segments(traced_ids)
            two_d, window, traced_ids = True, _mask_window(None, kwargs), None
    if reason is None and attention_mask is None and traced_ids is None and torch.jit.is_tracing():
        # jit.trace hands the lengths over as tensors, which the causal band below cannot take
        # (sym_min); transformers' SDPA traces them (as the fastattn SDPA drop-in does)
        reason = "mask-free causal call under torch.jit.trace"
    if reason is None and two_d:
        if _compiling():  # the unpadding reads lengths on the host: SDPA's mask, traceable
            reason = "2-D mask under torch.compile"
        elif not hasattr(fastattn, "flash_attention_varlen"):
            reason = "fastattn.flash_attention_varlen unavailable"
        else:
            plan = _varlen_plan(attention_mask, Sq, Sk, window)
            if window is not None and not plan.windowable:
                reason = "sliding window over padding with holes"
    if reason is not None:
        _count_fallback(reason)
        if two_d:
            attention_mask = _dense_from_2d(attention_mask, Sq, Sk, window)
        if kwargs.get("indices") is not None:
            attention_mask, is_causal = _with_selected_keys(attention_mask, kwargs.pop("indices"), query, key,
                                                            module, is_causal)
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)

    _count_fastattn()
    # (B, H, S, D) views of (B, S, H, D) projections: transposing back keeps the last dim contiguous.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    cap = {"softcap": _softcap(kwargs)} if _softcap(kwargs) is not None else {}  # scores cap * tanh(s / cap)
    if traced_ids is not None:
        return _traced_packed_forward(q, k, v, traced_ids, scaling, _mask_window(None, kwargs), cap), None
    if two_d:
        return _varlen_forward(q, k, v, plan, scaling, window, cap), None

    # attention_mask=None means what it means to SDPA (transformers' own sdpa_attention_forward):
    # causal only for more than one query, and then TOP-LEFT aligned (query i sees keys j <= i).
    # transformers relies on that alignment: prefill into an empty static cache passes no mask
    # with Sk = the whole cache, whose rows j >= Sq are unused slots that no query may see.
    # bool(): a traced Sq > 1 is a SymBool, decided (guarded) here as transformers' sdpa decides it.
    window = (-1, -1)
    if bool(causal) and bool(Sq > 1):
        # No branch on Sk vs Sq (one exported / compiled graph serves every cache length).
        k, v, right = fastattn.functional._top_left_causal(k, v, Sq)
        window = (-1, right)
    out = fastattn.flash_attention(q, k, v, softmax_scale=scaling, window=window, **cap)
    return out, None  # (B, Sq, H, D), no attention weights


def _varlen_forward(q, k, v, plan: _VarlenPlan, scaling, window, cap=None):
    """q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> (B, Sq, H, D): the real tokens packed, one varlen
    call (bottom-right causal per sequence: its queries are its last tokens), padded query rows 0
    (as flash_attention_2; SDPA gives them 0 too when they see no key)."""
    B, Sq, H, D = q.shape
    if plan.total_q == 0:
        return q.new_zeros(B, Sq, H, D)
    qp = q.reshape(B * Sq, H, D) if plan.all_q else q[plan.bq, plan.sq]
    kp, vp = k[plan.bk, plan.ck], v[plan.bk, plan.ck]
    out = fastattn.flash_attention_varlen(qp, kp, vp, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, causal=True,
                                          softmax_scale=scaling,
                                          window=(window - 1, 0) if window is not None else (-1, -1), **(cap or {}))
    if plan.all_q:
        return out.view(B, Sq, H, D)
    return out.new_zeros(B, Sq, H, D).index_put((plan.bq, plan.sq), out)


def register() -> None:
    """Make ``attn_implementation="fastattn"`` available in transformers (idempotent)."""
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # Looked up now, not first inside a compiled graph (a module global set during a trace fails
    # its guard on the next call: a second compile of the same shapes).
    _kernels_take_softcap()
    _mask_codes()
    AttentionInterface.register(ATTN_IMPLEMENTATION, fastattn_attention_forward)
    # None (SDPA's is_causal), a 2-D per-sequence mask (varlen) or SDPA's 4-D mask (fallback).
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, fastattn_mask)


# ---------------------------------------------------------------------------------------
# patch_model: RMSNorm modules and rotary application
# ---------------------------------------------------------------------------------------
def _rotary_tables(cos, sin):
    """(cos_t, sin_t, positions) for fastattn.apply_rotary from transformers' cos/sin (B or 1, S, R),
    which hold each frequency twice (NeoX halves) per token: their first halves, flattened over
    (batch, seq), form a table whose row b * S + s is the angle of token (b, s), read with
    positions arange(B * S) (None, the kernel's default arange(S), for one batch row). Copies
    (never views of cos: the tables are kept on cos itself, see _hf_rotary_on_fastattn)."""
    Bc, S, R = cos.shape
    half = R // 2
    cos_t = cos[..., :half].reshape(Bc * S, half).to(torch.float32, copy=True)
    sin_t = sin[..., :half].reshape(Bc * S, half).to(torch.float32, copy=True)
    positions = None if Bc == 1 else torch.arange(Bc * S, device=cos.device).view(Bc, S)
    return cos_t, sin_t, positions


def _hf_rotary_on_fastattn(q, k, cos, sin, unsqueeze_dim=1, partial=False):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin) on fastattn.apply_rotary.

    q (B, H, S, D), k (B, Hk, S, D); cos/sin (B or 1, S, R), already gathered per position
    (see _rotary_tables). R < D (Phi-3's partial rotary) rotates dims 0..R and passes R..D
    through, in the kernel as in Phi-3's function. Every layer of a forward gets the same cos
    and sin tensors: the tables are made once per forward (kept on cos, keyed by its and
    sin's in-place versions and sin's identity).

    Each result has the memory layout the original returns (outside audit: code that .view()s
    q after the rotary works on both): Phi-3's partial form (partial=True) ends in torch.cat,
    a contiguous (B, H, S, D) tensor; the full form is elementwise, laid out as its input, so
    contiguous for a contiguous q / k and otherwise (q a transposed (B, S, H, D) projection, as
    in the attention modules) as the kernel's (B, S, H, D) result viewed (B, H, S, D)."""
    tables = None
    sin_version = None if _compiling() else _version_of(sin)
    if sin_version is not None:
        memo = _memo_on(cos, "_fastattn_rotary_tables",
                        lambda: (weakref.ref(sin), sin_version, _rotary_tables(cos, sin)))
        if memo[0]() is sin and memo[1] == sin_version:
            tables = memo[2]
    if tables is None:  # traced, inference tensors, or another sin with this cos
        tables = _rotary_tables(cos, sin)
    cos_t, sin_t, positions = tables
    # positions index the table just built from cos itself: in range by construction, so no
    # value check (on CUDA it would be a host sync in every attention layer).
    q2, k2 = fastattn.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos_t, sin_t, positions=positions,
                                   check_positions=False)
    q2, k2 = q2.transpose(1, 2), k2.transpose(1, 2)
    # (no copy for the usual transposed input, nor where both layouts agree, e.g. S = 1)
    if partial or q.is_contiguous():
        q2 = q2.contiguous()
    if partial or k.is_contiguous():
        k2 = k2.contiguous()
    return q2, k2


def _make_rotary_dispatcher(original, partial: bool = False, cast_back: bool = False):
    """partial: the original rotates the first cos.shape[-1] dims only (else cos spans the head).
    cast_back: the original returns q and k in their own dtypes (OLMo's: fp32 tables, the
    rotation computed in the promoted dtype and cast back), else in the promoted dtype."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        R = cos.shape[-1] if cos.dim() == 3 else -1
        usable = (
            _in_patched_attention()
            and unsqueeze_dim == 1
            and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape
            and q.shape[-1] == k.shape[-1] and R % 2 == 0
            and (R == q.shape[-1] or (partial and 0 < R < q.shape[-1]))
            and cos.shape[0] in (1, q.shape[0]) and cos.shape[1] == q.shape[2]
            and q.stride(-1) == 1 and k.stride(-1) == 1
            and (not q.is_cuda or fastattn.functional.cuda_kernels_run_on(q))  # (no code for this GPU)
        )
        if (not usable or q.dtype != k.dtype
                or (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
                or (fastattn.ops.transform_active() and fastattn.ops.differentiating_transform(q, k, cos, sin))):
            # The model's own rotary where the kernel would differ from it: q and k of different
            # dtypes (each result has its own), tables that need a gradient (the kernel takes
            # them as constants), forward-mode AD / torch.func grad.
            return original(q, k, cos, sin, *args, **kwargs)
        dtype = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return original(q, k, cos, sin, *args, **kwargs)  # float64: no such kernel
        # cast_back (OLMo's): rotated in fp32 (the kernel computes in fp32 whatever the dtype)
        # and rounded to q's / k's dtype, which is what the kernel returns for them as they are.
        if dtype != q.dtype and not cast_back:
            # q * cos + rotate_half(q) * sin returns the promoted dtype: bf16 q and k with fp32
            # tables (an fp32 model under autocast) give fp32, and so fp32 keys in the cache.
            # Rotated in that dtype, as the original computes it.
            q, k = q.to(dtype), k.to(dtype)
        return _hf_rotary_on_fastattn(q, k, cos, sin, partial=partial)

    apply_rotary_pos_emb._fastattn_original = original
    if isinstance(original, nn.Module):
        # transformers' wrapper from the `kernels` package: a module of a class made for this
        # function, which pickle finds under the function's name in the modeling file and
        # rebuilds per model with type(wrapper)() when a model is unpickled. A plain function
        # there broke every torch.load of such a model in this process ("function() missing
        # required argument"). So the dispatcher is an instance of that class whose forward is
        # ours: type(dispatcher)() is still the original's kind of wrapper.
        try:
            wrapper = type(original)()
        except Exception:  # another kind of module: keep the plain function
            return apply_rotary_pos_emb
        wrapper.__dict__["forward"] = apply_rotary_pos_emb
        wrapper.__dict__["_fastattn_original"] = original
        return wrapper
    return apply_rotary_pos_emb


def _unwrapped_function(fn):
    """The Python function behind ``fn``: itself, a functools.wraps wrapper's target, or the
    function a ``kernels`` hub wrapper module calls (transformers' use_kernel_forward_from_hub
    turns apply_rotary_pos_emb into such a module when the ``kernels`` package is installed).
    None when there is none."""
    for _ in range(4):
        if inspect.isfunction(fn):
            return fn
        inner = getattr(fn, "__wrapped__", None)
        if inner is None and isinstance(fn, nn.Module):
            forward = getattr(type(fn), "forward", None)
            if inspect.isfunction(forward) and forward.__closure__:
                inner = _closure_vars(forward).get("func")
        if inner is None:
            return None
        fn = inner
    return None


def _code_of(fn):
    """The AST of a function's code, its name, decorators and docstring left out (None if its
    source cannot be read)."""
    import ast
    import textwrap

    fn = _unwrapped_function(fn)
    if fn is None:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef):
        return None
    if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
            and isinstance(node.body[0].value.value, str):
        node.body = node.body[1:]  # the docstring
    node.name, node.decorator_list = "f", []
    return ast.dump(node)


def _rotary_kind(modeling_module):
    """"full" / "partial" / "full_cast_back" (OLMo's) when the module's apply_rotary_pos_emb is one
    of _ROTARY_REFERENCES's (with LLaMA's rotate_half), None for any other rotation. Decided once
    per module."""
    global _ROTARY_REFERENCE_CODE
    name = getattr(modeling_module, "__name__", "")
    if name in _ROTARY_KIND_CACHE:
        return _ROTARY_KIND_CACHE[name]
    if _ROTARY_REFERENCE_CODE is None:
        refs = {}
        for ref_name, ref_kind in _ROTARY_REFERENCES:
            try:
                ref = importlib.import_module(ref_name)
            except ImportError:  # a transformers without that model
                continue
            code = _code_of(getattr(ref, "apply_rotary_pos_emb", None))
            if code is not None:
                refs.setdefault(code, ref_kind)
        from transformers.models.llama import modeling_llama

        _ROTARY_REFERENCE_CODE = (refs, _code_of(modeling_llama.rotate_half))
    refs, rotate_half = _ROTARY_REFERENCE_CODE
    kind = None
    fn = getattr(modeling_module, "apply_rotary_pos_emb", None)
    if fn is not None and rotate_half is not None and _code_of(getattr(modeling_module, "rotate_half", None)) == \
            rotate_half:
        kind = refs.get(_code_of(fn))
    _ROTARY_KIND_CACHE[name] = kind
    return kind


def _install_rotary_dispatcher(modeling_module) -> Optional[str]:
    """None when the module's rotary now runs on fastattn (or already did), else why not."""
    fn = getattr(modeling_module, "apply_rotary_pos_emb", None)
    if fn is None:
        return f"no apply_rotary_pos_emb in {modeling_module.__name__}"
    if hasattr(fn, "_fastattn_original"):
        return None
    kind = _rotary_kind(modeling_module)
    if kind is None:
        return (f"apply_rotary_pos_emb in {modeling_module.__name__} is not LLaMA's rotate-half rotary (full or "
                "partial): another rotation (interleaved pairs, other signs, ...) or signature")
    modeling_module.apply_rotary_pos_emb = _make_rotary_dispatcher(fn, kind == "partial",
                                                                   cast_back=kind == "full_cast_back")
    return None


def _in_patched_attention() -> bool:
    if torch.compiler.is_compiling():
        return _IN_PATCHED_ATTENTION_TRACED > 0
    return _IN_PATCHED_ATTENTION.get() > 0


def _patched_attention_forward(self, *args, **kwargs):
    """forward of a patched attention module: its class's forward, with the rotary dispatcher
    switched to fastattn for the duration of the call."""
    if torch.compiler.is_compiling():  # traced: a global dynamo can follow (see its definition)
        global _IN_PATCHED_ATTENTION_TRACED
        _IN_PATCHED_ATTENTION_TRACED += 1
        try:
            return type(self).forward(self, *args, **kwargs)
        finally:
            _IN_PATCHED_ATTENTION_TRACED -= 1
    token = _IN_PATCHED_ATTENTION.set(_IN_PATCHED_ATTENTION.get() + 1)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _IN_PATCHED_ATTENTION.reset(token)


class _PatchedForward:
    """A patched attention module's ``forward`` (``_patched_attention_forward`` on it). It holds
    its module weakly: a bound method stored on the module (module -> method -> module) is a
    reference cycle, which kept the attention weights alive after ``del model`` until a full
    garbage collection (GPU memory that ``torch.cuda.empty_cache()`` could not return). A deep
    copy or a pickle of the module gets one bound to the copy."""

    __slots__ = ("_module", "__weakref__")

    def __init__(self, module: nn.Module):
        self._module = weakref.ref(module)

    def module(self) -> nn.Module:
        module = self._module()
        if module is None:
            raise RuntimeError("fastattn: this patched attention forward belongs to a module that has been freed "
                               "(patch_model binds each forward to its own module; call the module, or patch the "
                               "copy with patch_model)")
        return module

    def __call__(self, *args, **kwargs):
        return _patched_attention_forward(self.module(), *args, **kwargs)

    def __deepcopy__(self, memo):
        module = self.module()
        return type(self)(memo.get(id(module), module))

    def __reduce__(self):
        # Unpickled in another process (torch.save / torch.load, a spawn child's argument), the
        # module needs what patch_model set up process-wide there too: see _UnpickledPatchedForward.
        return (_UnpickledPatchedForward, (self.module(),))


class _UnpickledPatchedForward(_PatchedForward):
    """A patched attention forward unpickled, possibly in a process where patch_model never ran:
    its first call redoes patch_model's process-wide part (the attention implementation's
    registration and the rotary dispatcher in the module's modeling file; both idempotent), not
    while unpickling: loading a model changes nothing process-wide until it runs."""

    __slots__ = ("_ready",)

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self._ready = False

    def __call__(self, *args, **kwargs):
        if not self._ready:
            module = self.module()
            register()
            modeling = sys.modules.get(type(module).__module__) or importlib.import_module(type(module).__module__)
            _install_rotary_dispatcher(modeling)
            self._ready = True
        return super().__call__(*args, **kwargs)


def _wrap_attention_forward(attn: nn.Module) -> bool:
    if getattr(attn, "_fastattn_patched", False):
        return False
    attn.forward = _PatchedForward(attn)
    attn._fastattn_patched = True
    return True


class _HFRMSNorm(fastattn.nn.RMSNorm):
    """fastattn.nn.RMSNorm with the rounding and result dtype of the LLaMA-family RMSNorm it
    replaces, ``weight * x_normed.to(x.dtype)``: for 16-bit x the normalised rows are rounded
    to x's dtype before the weight multiplies them (a second rounding, which torch.nn.RMSNorm
    and our kernel's fused weight do not make: ~1/4 of the elements came out 1 ulp off
    transformers'), and the product has torch's promotion of x's and the weight's dtypes (fp32
    for bf16 activations with an fp32 weight, as under autocast, where ours returned x's).
    transformers' rounding (Liger's casting_mode="llama"), at one more elementwise pass over
    the rows than the fused weight; its bits except where the fp32 mean square, summed in
    another order, differs in its last place and that flips a rounding (measured: ~1e-4 of
    fp16 elements, fewer in bf16)."""

    def forward(self, x, residual=None):
        weight = self.weight
        if (weight is not None and isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16)
                and len(self.normalized_shape) == 1 and weight.shape == self.normalized_shape
                and x.dim() >= 1 and x.shape[-1:] == self.normalized_shape and not x.is_nested):
            out = fastattn.rms_norm(x, None, self.eps, residual=residual)
            normed, h_dtype = (out, x.dtype) if residual is None else (out[0], out[1].dtype)
            # x_normed.to(input dtype), the input being h = x + residual (its promoted dtype):
            # also under CUDA autocast, where rms_norm returns fp32 (an explicit cast, which
            # autocast leaves alone in transformers' code)
            normed = weight * normed.to(h_dtype)
            return normed if residual is None else (normed, out[1])
        out = super().forward(x, residual)
        if weight is None or weight.dtype == x.dtype:
            return out
        dtype = torch.promote_types(x.dtype, weight.dtype)
        return out.to(dtype) if residual is None else (out[0].to(dtype), out[1])


def _norm_eps(module) -> float:
    return getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))


def patch_model(model: nn.Module) -> dict:
    """Swap a transformers model's RMSNorm modules for ``fastattn.nn.RMSNorm`` (sharing the same
    weight Parameter, so state_dict and training are unchanged) and run its rotary embedding on
    ``fastattn.apply_rotary``:

    * LLaMA-family norms (``w * x / rms(x)``: Llama, Mistral, Qwen2/3, Phi-3, and every
      RMSNorm class whose forward is LlamaRMSNorm's source verbatim: Mixtral, Qwen2/3-MoE,
      DeepSeek-V2/V3, Granite, OLMoE, GLM-4, ...) become our RMSNorm; Gemma 1/2/3's ``(1 + w)``
      norms (including Gemma 3's q/k norms, and every class whose ``forward`` and ``_norm`` are
      GemmaRMSNorm's code: Qwen3-Next, Qwen3.5, ...) become our RMSNorm with
      ``unit_offset=True`` (fp32 math, x's dtype out, as Gemma's);
    * attention modules with q/k projections (``q_proj`` or a fused ``qkv_proj``) whose modeling
      file's ``apply_rotary_pos_emb`` is LLaMA's rotate-half rotary (its code, or Phi-3's / GLM-4-MoE's /
      Nemotron's partial rotary for cos/sin narrower than the head, or OLMo's, each with LLaMA's
      ``rotate_half``) run it on fastattn.apply_rotary; other rotations that share the name
      (interleaved pairs: Cohere, Ernie 4.5, Helium, GLM; NanoChat's signs; Gemma 3n/4's one-tensor
      form) are left alone. The switch to fastattn's rotary inside patched
      modules traces under torch.compile (``fullgraph=True`` included).

    Anything else is left alone. Returns a report: ``{"rms_norm": n, "rotary": m, "swapped":
    {class name: count}, "left_alone": {class name: reason}}`` (rotary entries are named by
    their attention class, e.g. ``"rotary:GemmaAttention"``). A rotary entry counts modules whose
    calls of their file's ``apply_rotary_pos_emb`` in LLaMA's layout (cos/sin of shape (batch,
    seq, R) spread over the heads, ``unsqueeze_dim=1``) run on fastattn: it is decided per call,
    so a call in another layout (Pixtral's vision tables) keeps the original, as does a module
    that never calls it (a cross-attention) or calls another function of its file instead
    (DeepSeek-V3's ``apply_rotary_pos_emb_interleave`` with ``rope_interleave=True``). Modules
    patched by an earlier call count as neither."""
    _require_transformers()
    report = {"rms_norm": 0, "rotary": 0, "swapped": {}, "left_alone": {}}

    def swapped(name):
        report["swapped"][name] = report["swapped"].get(name, 0) + 1

    replacements = []
    for parent in model.modules():
        for child_name, child in parent.named_children():
            name = type(child).__name__
            if isinstance(child, fastattn.nn.RMSNorm):
                continue  # ours already (an earlier patch_model)
            weight = getattr(child, "weight", None)
            if (name in _COMPATIBLE_RMSNORMS + _UNIT_OFFSET_RMSNORMS
                    or ("RMSNorm" in name and (_is_llama_rmsnorm_copy(type(child))
                                               or _is_gemma_rmsnorm_copy(type(child))))):
                if isinstance(weight, nn.Parameter) and weight.dim() == 1:
                    replacements.append((parent, child_name, child))
                else:
                    report["left_alone"][name] = "no 1-D weight Parameter"
            elif "RMSNorm" in name:
                report["left_alone"][name] = ("RMSNorm variant not known to compute w * x / rms(x) or "
                                              "(1 + w) * x / rms(x)")
    for parent, child_name, child in replacements:
        name = type(child).__name__
        offset = name in _UNIT_OFFSET_RMSNORMS or _is_gemma_rmsnorm_copy(type(child))
        cls = fastattn.nn.RMSNorm if offset else _HFRMSNorm  # Gemma's returns x's dtype, as ours
        norm = cls(child.weight.shape[0], eps=_norm_eps(child), device="meta", unit_offset=offset)
        norm.weight = child.weight
        setattr(parent, child_name, norm)
        report["rms_norm"] += 1
        swapped(name)
    for module in model.modules():
        name = type(module).__name__
        if not name.endswith("Attention") or getattr(module, "_fastattn_patched", False):
            continue
        if not (hasattr(module, "q_proj") or hasattr(module, "qkv_proj")):
            report["left_alone"]["rotary:" + name] = ("projections other than q_proj / qkv_proj (e.g. GPT-NeoX's "
                                                      "fused query_key_value): rotary not patched")
            continue
        modeling = sys.modules.get(type(module).__module__) or importlib.import_module(type(module).__module__)
        why = _install_rotary_dispatcher(modeling)
        if why is not None:
            report["left_alone"]["rotary:" + name] = why
            continue
        if _wrap_attention_forward(module):
            report["rotary"] += 1
            swapped("rotary:" + name)
    return report
