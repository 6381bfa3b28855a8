"""flash-attn's Python API on fastattn's kernels: swap the import, keep the calls.

    # from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    from fastattn.integrations.flash_attn import (flash_attn_func, flash_attn_varlen_func,
                                                  flash_attn_with_kvcache)

Every function here has the name, the parameters (names, positional order, defaults) and the
return values of its namesake in flash-attn 2.x's ``flash_attn.flash_attn_interface`` (2.6 and
later: with ``softcap``), and its semantics, down to its C++'s reading of the arguments:
bottom-right causal alignment; ``window_size = (left, right)``, a side that is negative or at
least seqlen_k (k's length, varlen's max_seqlen_k, a cache's capacity) unbounded, then causal
setting right = 0, then an unbounded side beside a bounded one becoming seqlen_k (fastattn's own
ops keep the documented band instead: they differ only for seqlen_q > seqlen_k); ``softcap`` <= 0
off; q / k / v with a strided last dim copied; GQA/MQA by fewer k/v heads; ``softmax_lse`` of
shape (B, H, Sq) (varlen: (H, total_q)) in fp32 with ``+inf`` where a row sees no key (out 0
there); k/v (any number of new tokens) appended to the caches in place by
``flash_attn_with_kvcache`` without advancing ``cache_seqlens``, rotary applied to the new k
(and q) there. Each is a thin layer over
``fastattn.flash_attention`` / ``flash_attention_varlen`` / ``attention_with_kvcache`` /
``apply_rotary``, so devices and dtypes are theirs (CUDA fp16/bf16, and the CPU with fp32 too)
and gradients flow where flash-attn's do (not through ``flash_attn_with_kvcache``).

What flash-attn has and fastattn does not raises ``NotImplementedError`` naming the argument,
never a silently different result: ``dropout_p > 0``, ``alibi_slopes``, ``cache_leftpad``.
``block_table`` in ``flash_attn_varlen_func`` (a paged k/v, vLLM-style prefill) runs forward
only, as in flash-attn, on ``attention_with_kvcache``. ``deterministic`` (a bool) is accepted and
changes nothing: fastattn's backward is always deterministic. Flags are bools (as everywhere in
fastattn; flash-attn reads some by truthiness), and ``max_seqlen_q`` / ``max_seqlen_k`` ints
or 0-d integer tensors (one host read each), as flash-attn's ``int`` custom-op arguments take.
``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)`` with S_dmask an empty
tensor, as flash-attn 2.7+ does without dropout (2.6 gave None). A bad argument raises
``FlashAttnInputError``, both a ``ValueError`` (as everywhere in fastattn) and a
``RuntimeError`` (what flash-attn's C++ checks raise for a wrong dtype, shape or head count), so
code that catches either keeps working. Page sizes of a paged cache are free (flash-attn: multiples of 256) and the rotary
tables may be fp32 or q's dtype (flash-attn: q's dtype).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from .. import functional as F
from .._validate import check_bool, host_values_readable, is_integer

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
    "FlashAttnInputError",
]


class FlashAttnInputError(ValueError, RuntimeError):
    """A bad argument to a function of this module: a ValueError, as fastattn raises everywhere,
    and a RuntimeError, as flash-attn raises from its C++ argument checks (TORCH_CHECK: dtypes,
    shapes, head counts, cu_seqlens), so that code written against flash-attn, which catches
    RuntimeError to fall back to another attention, still catches it (outside audit)."""


def _flash_attn_errors(fn):
    """fn with its ValueErrors raised as FlashAttnInputError (same message)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            if isinstance(e, FlashAttnInputError):
                raise
            # One traceback (the original frames), not two chained ones with the same message.
            raise FlashAttnInputError(*e.args).with_traceback(e.__traceback__) from None

    return call


def _not_supported(dropout_p, alibi_slopes) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"dropout_p={dropout_p}: fastattn's attention kernels have no dropout; pass dropout_p=0.0 "
            "(evaluation, or training without attention dropout) or use "
            "torch.nn.functional.scaled_dot_product_attention(dropout_p=...)")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: fastattn's attention kernels have no ALiBi bias; pass None")


def _int_tensor(t) -> bool:
    return isinstance(t, Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _host_int(n):
    """flash-attn's ints that callers pass as 0-d integer tensors (its custom ops declare them
    ``int``, which torch's argument parser takes a 0-d integer tensor for; Hugging Face's
    padding-free path passes ``cu_seqlens.diff().max()`` so): one host read."""
    return n.item() if _int_tensor(n) and n.dim() == 0 else n


def _window(window_size):
    # flash-attn indexes window_size and passes its two items on as ints: a 2-element integer
    # tensor (its own tests draw windows with torch.randint(0, seqlen_k, (2,))) or a pair of
    # 0-d ones work there too (one host read each).
    if _int_tensor(window_size) and window_size.shape == (2,):
        window_size = tuple(window_size.tolist())
    elif isinstance(window_size, (tuple, list)) and any(_int_tensor(w) and w.dim() == 0 for w in window_size):
        window_size = tuple(_host_int(w) for w in window_size)
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or not all(
            is_integer(side) for side in window_size):
        raise ValueError(f"window_size must be a (left, right) pair of ints (-1 = unbounded), got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def _flash_attn_window(window_size, causal: bool, seqlen_k: int, seqlen_q: int):
    """window_size as flash-attn's C++ reads it, in fastattn's terms. flash-attn first makes a
    side of at least seqlen_k (the keys' length, varlen's max_seqlen_k, a cache's capacity)
    unbounded, then causal sets right = 0, then a side left unbounded beside a bounded one
    becomes seqlen_k: so (-1, 4) over 4 keys is full attention there, where fastattn's own
    ops keep the documented band (they differ only for seqlen_q > seqlen_k). A side that
    reaches every key (left >= seqlen_k - 1; right >= seqlen_q - 1) is passed as -1."""
    left, right = _window(window_size)
    if torch.compiler.is_compiling() or not (type(seqlen_k) is int and type(seqlen_q) is int):
        # Traced sizes (torch.compile / export's SymInts, which dynamo shows as ints;
        # torch.jit.trace's tensors): no branch on them, or a trace would fix the window of
        # its first shape (jit.trace) or guard on it (export: a dynamic length refused).
        # jit.trace has no sym_min / sym_max: there a non-causal window with a bounded side
        # still branches below (the trace keeps its first shape's band).
        # Causal: a left of >= seqlen_k - 1 already reaches every key of fastattn's band
        # (query i sees keys >= i + seqlen_k - seqlen_q - left, i < seqlen_q), so a left side
        # passes as given; so does an unbounded pair without causal.
        if causal:
            return (-1 if left < 0 else left), 0
        if left < 0 and right < 0:
            return -1, -1
        if not torch.jit.is_tracing():
            return _traced_bounded_window(left, right, seqlen_k, seqlen_q)
    left = -1 if left < 0 or left >= seqlen_k else left
    right = -1 if right < 0 or right >= seqlen_k else right
    if causal:
        right = 0
    if left < 0 and right >= 0:
        left = seqlen_k
    if left >= 0 and right < 0:
        right = seqlen_k
    return (-1 if left >= seqlen_k - 1 else left), (-1 if right >= seqlen_q - 1 else right)


def _traced_bounded_window(left: int, right: int, seqlen_k, seqlen_q):
    """_flash_attn_window's rules for a non-causal window with a bounded side, in sym_min /
    sym_max of the traced lengths (no branch). A left side passes as given: one >= seqlen_k
    (unbounded for flash-attn) already reaches every key of fastattn's band. The right side
    is the bounded one, at most seqlen_k (flash-attn's value for a side it cuts or fills in),
    unless every given side is >= seqlen_k: flash-attn then attends to all keys, which is
    right >= seqlen_q - 1 here."""
    given = [side for side in (left, right) if side >= 0]
    reach = seqlen_k if right < 0 else torch.sym_min(right, seqlen_k)
    # 1 when a given side is < seqlen_k, else 0 (every side >= seqlen_k: all keys).
    bounded = torch.sym_max(0, torch.sym_min(1, seqlen_k - min(given)))
    return (-1 if left < 0 else left), torch.sym_max(reach, seqlen_q - 1 - seqlen_q * bounded)


def _softcap(softcap):
    """flash-attn's softcap: anything not > 0 is off."""
    if isinstance(softcap, numbers.Real) and not isinstance(softcap, bool) and not softcap > 0:
        return 0.0
    return softcap


def _maybe_contiguous(x):
    """flash-attn copies q / k / v whose last dim is strided; fastattn's ops refuse them."""
    return x.contiguous() if isinstance(x, Tensor) and x.dim() > 0 and x.stride(-1) != 1 else x


def _flash_attn_lse(lse: Tensor) -> Tensor:
    """flash-attn's softmax_lse: +inf for a row that sees no key (fastattn's own ops say -inf)."""
    return torch.where(lse == -math.inf, math.inf, lse)


def _outputs(result, return_attn_probs: bool):
    if not return_attn_probs:
        return result
    out, lse = result
    # flash-attn 2.7+: the third value is an empty tensor unless dropout records its pattern
    return out, _flash_attn_lse(lse), torch.empty((0,), dtype=out.dtype, device=out.device)


@_flash_attn_errors
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, D); with return_attn_probs,
    (out, softmax_lse (B, H, Sq) fp32, an empty tensor). Differentiable in q, k, v."""
    _not_supported(dropout_p, alibi_slopes)
    causal = check_bool(causal, "causal")
    check_bool(deterministic, "deterministic")
    return_attn_probs = check_bool(return_attn_probs, "return_attn_probs")
    q, k, v = (_maybe_contiguous(t) for t in (q, k, v))
    window = _flash_attn_window(window_size, causal, k.shape[1], q.shape[1]) if isinstance(k, Tensor) \
        and isinstance(q, Tensor) and k.dim() == 4 and q.dim() == 4 else window_size
    result = F.flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window=window,
                               softcap=_softcap(softcap), return_lse=return_attn_probs)
    return _outputs(result, return_attn_probs)


def _unpack(packed, dim: int, count: int, name: str, shape: str):
    if not isinstance(packed, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() != dim + 3 or packed.shape[dim] != count:  # (..., count, heads, headdim)
        raise ValueError(f"{name} must have shape {shape}, got {tuple(packed.shape)}")
    return packed.unbind(dim)


@_flash_attn_errors
def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (B, S, 3, H, D) -> out (B, S, H, D); as flash_attn_func on its three slices."""
    q, k, v = _unpack(qkv, 2, 3, "qkv", "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


@_flash_attn_errors
def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, H, D), kv (B, Sk, 2, Hk, D) -> out (B, Sq, H, D)."""
    k, v = _unpack(kv, 2, 2, "kv", "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


@_flash_attn_errors
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed sequences: q (total_q, H, D), k/v (total_k, Hk, D), cu_seqlens (B + 1,) int32 ->
    out (total_q, H, D); with return_attn_probs, (out, softmax_lse (H, total_q) fp32, an empty
    tensor).
    Differentiable in q, k, v."""
    _not_supported(dropout_p, alibi_slopes)
    causal = check_bool(causal, "causal")
    check_bool(deterministic, "deterministic")
    return_attn_probs = check_bool(return_attn_probs, "return_attn_probs")
    max_seqlen_q, max_seqlen_k = _host_int(max_seqlen_q), _host_int(max_seqlen_k)
    if block_table is not None:
        out, lse = _paged_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                                 softmax_scale, causal, window_size, softcap)
        return _outputs((out, lse), True) if return_attn_probs else out
    q, k, v = (_maybe_contiguous(t) for t in (q, k, v))
    window = _flash_attn_window(window_size, causal, max_seqlen_k, max_seqlen_q) if all(
        is_integer(n) or isinstance(n, torch.SymInt) for n in (max_seqlen_k, max_seqlen_q)) else window_size
    result = F.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                      softmax_scale=softmax_scale, window=window, softcap=_softcap(softcap),
                                      return_lse=return_attn_probs)
    return _outputs(result, return_attn_probs)


def _paged_varlen(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                  softmax_scale, causal: bool, window_size, softcap):
    """flash_attn_varlen_func with block_table (vLLM-style paged prefill): sequence b's queries
    are q rows [cu_seqlens_q[b], cu_seqlens_q[b+1]), its keys the first
    cu_seqlens_k[b+1] - cu_seqlens_k[b] tokens of its pages block_table[b] in the pools
    k_cache / v_cache (num_pages, page_size, Hk, D). Forward only, as in flash-attn: under
    autograd the forward runs and a backward through it raises NotImplementedError (under a
    fullgraph torch.compile with inputs that require grad, tracing that backward fails).

    Eager on the CPU (the lengths are host values there): the keys are gathered from the pages
    into packed k / v and the varlen op runs as without pages. On CUDA and when traced (no host
    read of cu_seqlens; static shapes): one attention_with_kvcache call, each sequence's queries
    placed at the END of a (B, max_seqlen_q) query block, so that the call's bottom-right
    alignment (query row r at key position len_k - max_seqlen_q + r) puts query j at
    len_k - len_q + j, flash-attn's per-sequence alignment; the rows before them are ignored.
    That pads the queries to max_seqlen_q per sequence (a batch of one long prompt and many
    one-token sequences costs B * max_seqlen_q rows), and runs on the decode kernel's shared
    memory limits (GPUs with 99 KiB per block: head dim 64, or 128 with max_seqlen_q = 1)."""
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (q, k_cache, v_cache)):
        # flash-attn runs this forward under autograd too (its tests do) and fails only in a
        # backward: the result gets a grad_fn whose backward raises.
        return _ForwardOnly.apply(
            lambda: _paged_varlen(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  block_table, softmax_scale, causal, window_size, softcap),
            q, k_cache, v_cache)
    for name, t, dims in (("q", q, "3-D (total_q, nheads, headdim)"),
                          ("k", k_cache, "4-D (num_pages, page_size, nheads_k, headdim) with block_table"),
                          ("v", v_cache, "4-D (num_pages, page_size, nheads_k, headdim) with block_table")):
        if not isinstance(t, Tensor) or t.dim() != int(dims[0]):
            raise ValueError(f"{name} must be {dims}, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype != torch.int32 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor of B + 1 cumulative lengths, got "
                             f"{getattr(cu, 'dtype', type(cu).__name__)} of shape {tuple(getattr(cu, 'shape', ()))}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but must be on {q.device} with q")
    B = cu_seqlens_q.shape[0] - 1
    if cu_seqlens_k.shape[0] != B + 1:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length B + 1, got "
                         f"{B + 1} and {cu_seqlens_k.shape[0]}")
    if not isinstance(block_table, Tensor) or block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table must be ({B}, max_pages_per_seq) (one row per sequence), got "
                         f"{tuple(getattr(block_table, 'shape', ()))}")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not (is_integer(n) or isinstance(n, torch.SymInt)):  # (as flash_attention_varlen)
            raise TypeError(f"{name} must be an int (or a 0-d integer tensor), got {type(n).__name__}: {n!r}")
        if n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    total_q, H, D = q.shape
    window = _flash_attn_window(window_size, causal, max_seqlen_k, max_seqlen_q)
    if block_table.dtype != torch.int32:  # (as attention_with_kvcache, which CUDA and traced calls run on)
        raise ValueError(f"block_table must be int32, got {block_table.dtype}")
    if q.device.type == "cpu" and host_values_readable(q, cu_seqlens_q, cu_seqlens_k, block_table):
        # (a few host reads; CUDA: none)
        for name, cu, total, longest in (("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q),
                                         ("cu_seqlens_k", cu_seqlens_k, None, max_seqlen_k)):
            c = cu.tolist()
            lens = [b - a for a, b in zip(c, c[1:])]
            if c[0] != 0 or min(lens, default=0) < 0 or (total is not None and c[-1] > total):
                raise ValueError(f"{name} must start at 0 and be non-decreasing"
                                 + (f", ending at or before total_q = {total}" if total is not None else "")
                                 + f", got {c}")
            if max(lens, default=0) > longest:
                raise ValueError(f"{name} holds a sequence of length {max(lens)} but max_seqlen is {longest}")
        # On the CPU, where the lengths are host values anyway: the sequences' keys gathered
        # from their pages into packed k / v (total_k rows), then the varlen kernel on the
        # packed queries as they are (no padding of the queries to max_seqlen_q).
        k, v = _gather_pages(k_cache, v_cache, block_table, cu_seqlens_k, int(cu_seqlens_k[-1]))
        return F.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        causal=causal, window=window, softmax_scale=softmax_scale,
                                        softcap=_softcap(softcap), return_lse=True)
    # Elsewhere (CUDA, or traced): no host read of the lengths, static shapes.
    Mq = max(int(max_seqlen_q), 1)
    lens_q, lens_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()
    # token t of the packed q: its sequence b (B for spare rows past cu_seqlens_q[-1]) and its
    # row in that sequence's right-aligned block of Mq query rows
    # (no boolean indexing: shapes stay static under torch.compile)
    if B == 0 or total_q == 0:
        return (torch.zeros((total_q, H, D), dtype=q.dtype, device=q.device),
                torch.full((H, total_q), -math.inf, dtype=torch.float32, device=q.device))
    t = torch.arange(total_q, device=q.device)
    seq = torch.searchsorted(cu_seqlens_q[1:].long(), t, right=True)
    real = seq < B
    b = seq.clamp(max=B - 1)
    row = (Mq - lens_q.long()[b] + t - cu_seqlens_q.long()[b]).clamp(0, Mq - 1)
    flat = torch.where(real, b * Mq + row, B * Mq)  # spare rows go to one scratch row past the block
    q_flat = q.new_zeros((B * Mq + 1, H, D))
    q_flat[flat] = q
    o_block, lse_block = F.attention_with_kvcache(q_flat[:B * Mq].view(B, Mq, H, D), k_cache, v_cache,
                                                  lens_k.to(torch.int32), block_table=block_table, causal=causal,
                                                  window=window, softmax_scale=softmax_scale,
                                                  softcap=_softcap(softcap), return_lse=True)  # (B, Mq, H, D), (B, H, Mq)
    out = torch.where(real.view(-1, 1, 1), o_block[b, row], 0.0).to(q.dtype)
    lse = torch.where(real.view(1, -1), lse_block[b, :, row].transpose(0, 1), -math.inf)
    return out, lse


class _ForwardOnly(torch.autograd.Function):
    """(out, lse) of compute() (run without autograd) with a grad_fn on out whose backward
    raises: paged varlen attention has no backward, in flash-attn as here."""

    @staticmethod
    def forward(ctx, compute, *inputs):
        out, lse = compute()
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("block_table: paged varlen attention (flash_attn_varlen_func with block_table) "
                                  "has no backward, as in flash-attn; it is forward only")


def _gather_pages(k_cache, v_cache, block_table, cu_seqlens_k, total_k: int):
    """Packed (total_k, Hk, D) k and v: row t is token t - cu_seqlens_k[b] of the sequence b
    that owns it, read from its page in the pools. Entries of block_table that a token uses
    must be pages of the pool (ValueError otherwise)."""
    page_size, num_pages = k_cache.shape[1], k_cache.shape[0]
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    t = torch.arange(total_k, device=k_cache.device)
    seq = torch.searchsorted(cu_seqlens_k[1:].long(), t, right=True)
    pos = t - cu_seqlens_k.long()[seq]
    slot = pos // page_size
    if total_k and int(slot.max()) >= block_table.shape[1]:
        raise ValueError(f"block_table has {block_table.shape[1]} pages per sequence, too few for "
                         f"{int(pos.max()) + 1} tokens of {page_size} per page")
    pages = block_table.long()[seq, slot]
    if total_k and not bool(((pages >= 0) & (pages < num_pages)).all()):
        bad = int(((pages < 0) | (pages >= num_pages)).nonzero()[0])
        raise ValueError(f"block_table[{int(seq[bad])}, {int(slot[bad])}] = {int(pages[bad])} is not a page of the "
                         f"pool (num_pages = {num_pages}) but sequence {int(seq[bad])} uses it")
    return k_cache[pages, pos % page_size], v_cache[pages, pos % page_size]


@_flash_attn_errors
def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, H, D) -> out (total, H, D)."""
    q, k, v = _unpack(qkv, 1, 3, "qkv", "(total, 3, nheads, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


@_flash_attn_errors
def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (total_q, H, D), kv (total_k, 2, Hk, D) -> out (total_q, H, D)."""
    k, v = _unpack(kv, 1, 2, "kv", "(total_k, 2, nheads_k, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def _rotate_new_tokens(q, k, rotary_cos, rotary_sin, cache_seqlens, rotary_interleaved, q_per_token: bool):
    """flash-attn's rotary in flash_attn_with_kvcache: new key j of sequence b at position
    cache_seqlens[b] + j; query i there too (cache_seqlens[b] + i) when q_per_token (causal or
    local), else every query at cache_seqlens[b]."""
    if k is None:
        raise ValueError("rotary_cos / rotary_sin rotate the new keys: they need k and v")
    if not isinstance(rotary_cos, Tensor) or not isinstance(rotary_sin, Tensor):
        raise TypeError("rotary_cos and rotary_sin must both be tensors (seqlen_ro, rotary_dim / 2), or both None")
    if not (rotary_cos.is_floating_point() and rotary_sin.is_floating_point()):
        raise ValueError(f"rotary_cos / rotary_sin must be floating point, got {rotary_cos.dtype} and {rotary_sin.dtype}")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but must be on {q.device} with q")
    cos, sin = rotary_cos.float(), rotary_sin.float()  # fastattn's tables are fp32 (exact for 16-bit ones)
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    if isinstance(cache_seqlens, Tensor):
        start = cache_seqlens.to(device=q.device, dtype=torch.int64).view(-1, 1)
    else:
        start = torch.full((B, 1), int(cache_seqlens), dtype=torch.int64, device=q.device)
    if start.shape[0] != B:
        raise ValueError(f"cache_seqlens must hold {B} lengths (q's batch), got {start.shape[0]}")
    if B and start.device.type == "cpu" and not torch.jit.is_tracing() and host_values_readable(start, rotary_cos):
        # (named here: apply_rotary's own check speaks of positions; CUDA: no host read)
        last = int(start.max()) + max(Sk, Sq if q_per_token else 1) - 1
        if last >= rotary_cos.shape[0]:
            raise ValueError(f"rotary_cos / rotary_sin hold {rotary_cos.shape[0]} positions, but the new tokens "
                             f"reach position {last} (cache_seqlens + their count - 1)")
    pos_k = start + torch.arange(Sk, device=q.device).view(1, Sk)
    if q_per_token and Sq == Sk:  # one fused call (the common decode / speculative step)
        return F.apply_rotary(q, k, cos, sin, positions=pos_k, interleaved=rotary_interleaved)
    pos_q = start + torch.arange(Sq, device=q.device).view(1, Sq) if q_per_token else start.expand(B, Sq)
    # (the op rotates a q and a k of one length: each is passed as both and half the result kept)
    q_rot = F.apply_rotary(q, q, cos, sin, positions=pos_q, interleaved=rotary_interleaved)[0]
    k_rot = F.apply_rotary(k, k, cos, sin, positions=pos_k, interleaved=rotary_interleaved)[0]
    return q_rot, k_rot


@_flash_attn_errors
def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, Tensor]] = None, cache_batch_idx: Optional[Tensor] = None,
                            cache_leftpad: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q (B, Sq, H, D) over a KV cache, appending k/v (B, Sn, Hk, D) first when
    given (in place, at tokens cache_seqlens[b] + j; cache_seqlens is not advanced). Queries
    are bottom-right aligned: query i sits at key position cache_seqlens[b] + Sn - Sq + i.

    k_cache/v_cache: (B_cache, S_cache, Hk, D) (B_cache >= B, or any with cache_batch_idx), or
    page pools (num_pages, page_size, Hk, D) with block_table (B, max_pages) int32.
    cache_seqlens: int or (B,) int32; None means every sequence fills the cache (no k/v then).
    cache_batch_idx: (B,) integer, the cache row of each sequence (default row b).
    rotary_cos/rotary_sin: (seqlen_ro, rotary_dim / 2) applied to the new k (and q) first,
    interleaved (GPT-J pairs) by default as in flash-attn. Returns out (B, Sq, H, D), with
    return_softmax_lse also softmax_lse (B, H, Sq) fp32. Forward only."""
    _not_supported(0.0, alibi_slopes)
    causal = check_bool(causal, "causal")
    return_softmax_lse = check_bool(return_softmax_lse, "return_softmax_lse")
    rotary_interleaved = check_bool(rotary_interleaved, "rotary_interleaved")
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad: fastattn's caches start at token 0 of each row; pass None")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new tokens to append) or both be None")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together or both be None")
    for name, t in (("q", q), ("k_cache", k_cache)) + ((("k", k),) if k is not None else ()):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, seqlen, heads, headdim), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    q, k, v = (_maybe_contiguous(t) for t in (q, k, v))
    if cache_batch_idx is not None:
        if block_table is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (as in flash-attn): a paged "
                             "cache names each sequence's pages already")
        if not isinstance(cache_batch_idx, Tensor) or cache_batch_idx.dim() != 1 or cache_batch_idx.is_floating_point() \
                or cache_batch_idx.dtype == torch.bool or cache_batch_idx.is_complex():
            raise ValueError("cache_batch_idx must be a (batch,) integer tensor of cache rows, got "
                             f"{getattr(cache_batch_idx, 'dtype', type(cache_batch_idx).__name__)} of shape "
                             f"{tuple(getattr(cache_batch_idx, 'shape', ()))}")
        if cache_batch_idx.shape[0] != q.shape[0]:
            raise ValueError(f"cache_batch_idx must hold {q.shape[0]} cache rows (q's batch), got "
                             f"{cache_batch_idx.shape[0]}")
        if cache_batch_idx.device != k_cache.device:  # (checked here: it becomes a block table below)
            raise ValueError(f"cache_batch_idx is on {cache_batch_idx.device} but must be on {k_cache.device} "
                             "with k_cache")
        if cache_batch_idx.device.type == "cpu" and cache_batch_idx.numel() and host_values_readable(cache_batch_idx):
            # (read on the CPU only: on CUDA that would synchronise, and the paged kernels
            # then check the rows as block_table entries)
            lo, hi = (int(t) for t in torch.aminmax(cache_batch_idx.long()))  # (no uint32 aminmax)
            if lo < 0 or hi >= k_cache.shape[0]:
                raise ValueError(f"cache_batch_idx must name rows of k_cache in [0, {k_cache.shape[0]}), got "
                                 f"{cache_batch_idx.tolist()}")
        # A contiguous cache (B_cache, S_cache, Hk, D) is a page pool of B_cache pages of S_cache
        # tokens: row cache_batch_idx[b] is sequence b's single page.
        block_table = cache_batch_idx.to(torch.int32).view(-1, 1)
    capacity = k_cache.shape[1] * (block_table.shape[1] if isinstance(block_table, Tensor) else 1)
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required with k / v: it says where the new tokens go")
        cache_seqlens = capacity
        if isinstance(capacity, Tensor):  # torch.jit.trace records shapes as 0-d int64 tensors
            cache_seqlens = torch.zeros(q.shape[0], dtype=torch.int32, device=q.device) + capacity.to(torch.int32)
    elif is_integer(cache_seqlens):
        cache_seqlens = int(cache_seqlens)
    elif not isinstance(cache_seqlens, (Tensor, torch.SymInt)):
        raise TypeError(f"cache_seqlens must be an int or a (batch,) int32 tensor, got "
                        f"{type(cache_seqlens).__name__}: {cache_seqlens!r}")
    window = _flash_attn_window(window_size, causal, capacity, q.shape[1])
    if rotary_cos is not None:
        # flash-attn rotates each query at its own position when the attention is causal or
        # local (a side bounded after its clamping of sides >= the cache's capacity).
        left, right = _window(window_size)
        local = 0 <= left < capacity or 0 <= right < capacity
        q, k = _rotate_new_tokens(q, k, rotary_cos, rotary_sin, cache_seqlens, rotary_interleaved, causal or local)
    common = dict(block_table=block_table, causal=causal, window=window, softmax_scale=softmax_scale,
                  softcap=_softcap(softcap), num_splits=num_splits, return_lse=return_softmax_lse)
    if k is not None and k.shape[1] != q.shape[1]:
        # New keys of another length than the queries (flash-attn's seqlen_knew): appended
        # first, then the queries read the grown cache.
        if not isinstance(cache_seqlens, Tensor):  # (append_kv takes the lengths as a tensor)
            cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
        F.append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table=block_table)
        cache_seqlens = cache_seqlens + k.shape[1]
        result = F.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, **common)
    else:
        result = F.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k=k, v=v, **common)
    if return_softmax_lse:
        out, lse = result
        return out, _flash_attn_lse(lse)
    return result
