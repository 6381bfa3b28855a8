"""Pure-torch references for every fastattn op: the ground truth of tests and benchmarks.

Each function computes in the dtype of its inputs, exactly as written, with no fused
kernels. Call it on float32 (or float64) copies for the "true" answer, and on the
low-precision inputs for the "what plain torch would get in this dtype" answer that the
error-ratio rule compares against (DESIGN.md section 5).

Layouts: B batch, S sequence, H query heads, Hk key/value heads, D head dim.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "rms_norm",
    "apply_rotary",
    "attention_mask",
    "attention",
    "attention_varlen",
    "decode_attention",
    "append_kv",
    "paged_rows",
    "attention_with_kvcache",
]


# ---------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------
def rms_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = 1e-6,
    residual: Optional[Tensor] = None,
):
    """RMSNorm over the last dim: ``x / sqrt(mean(x**2) + eps) * weight``.

    x: (..., N); weight: (N,) or None. With ``residual`` (x's shape) returns ``(y, h)``
    where ``h = x + residual`` and ``y = rms_norm(h)``; otherwise returns ``y``. y has h's
    dtype (x's without a residual) whatever the weight's, which is converted to it first, as
    ``fastattn.rms_norm`` documents. eps None: torch's default, the float32 epsilon (the
    float64 one for float64 inputs).
    """
    h = x + residual if residual is not None else x
    if eps is None:
        eps = torch.finfo(torch.float64 if h.dtype == torch.float64 else torch.float32).eps
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(h.dtype)
    return (y, h) if residual is not None else y


# ---------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------
def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    # x (B, S, heads, D); cos/sin (B, S, 1, R/2) already in x's dtype.
    half = cos.shape[-1]
    rot = 2 * half
    xr, rest = x[..., :rot], x[..., rot:]
    if interleaved:  # GPT-J: pairs (2i, 2i+1)
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        out = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:  # NeoX / LLaMA: pairs (i, i + R/2)
        x1, x2 = xr[..., :half], xr[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, rest), dim=-1)


def apply_rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Optional[Tensor] = None,
    interleaved: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Rotary embedding of q (B, S, H, D) and k (B, S, Hk, D).

    cos/sin: (max_pos, R/2) tables, R = rotary dim <= D; dims R..D pass through.
    positions: (B, S) or (S,) integer, default ``arange(S)``. The tables are cast to q's
    dtype first, as Hugging Face's ``apply_rotary_pos_emb`` does.
    """
    B, S = q.shape[0], q.shape[1]
    if positions is None:
        positions = torch.arange(S, device=q.device)
    positions = positions.long()
    if positions.dim() == 1:
        positions = positions.unsqueeze(0).expand(B, S)
    c = cos[positions].unsqueeze(2).to(q.dtype)  # (B, S, 1, R/2)
    s = sin[positions].unsqueeze(2).to(q.dtype)
    return _rotate(q, c, s, interleaved), _rotate(k, c.to(k.dtype), s.to(k.dtype), interleaved)


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------
def attention_mask(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool = False,
    window: Tuple[int, int] = (-1, -1),
    device=None,
) -> Tensor:
    """(seqlen_q, seqlen_k) bool, True where query i may attend key j.

    Bottom-right aligned (flash-attn): query i sits at key position ``i + seqlen_k -
    seqlen_q``; it sees keys in ``[pos - left, pos + right]`` (-1 = unbounded); causal
    forces right = 0.
    """
    # A side at least seqlen_q + seqlen_k wide excludes nothing (and pos + sys.maxsize would
    # overflow int64 below).
    left, right = (-1 if w >= seqlen_q + seqlen_k else w for w in window)
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    pos = i + seqlen_k - seqlen_q
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= pos - left
    if right >= 0:
        mask &= j <= pos + right
    return mask


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    softcap: float = 0.0,
):
    """softmax(cap(q k^T * scale) + mask) v with GQA, bottom-right causal and a sliding window.

    cap(s) = softcap * tanh(s / softcap) when softcap > 0 (Gemma 2's logit soft-capping),
    else s.

    q (B, Sq, H, D); k, v (B, Sk, Hk, D), H % Hk == 0, query head h reads kv head
    h // (H // Hk). key_padding_mask (B, Sk) bool, True = valid key (used by decode).
    Returns out (B, Sq, H, D) and, with return_lse, lse (B, H, Sq) float32. A query row that
    sees no key, or whose visible scores are all -inf, gets out = 0 and lse = -inf.
    """
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if Hk != H:
        k = k.repeat_interleave(H // Hk, dim=2)
        v = v.repeat_interleave(H // Hk, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    mask = attention_mask(Sq, Sk, causal, window, q.device).view(1, 1, Sq, Sk)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.view(B, 1, 1, Sk)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)  # (B, H, Sq)
    probs = torch.softmax(scores, dim=-1)
    # Rows with no visible key (softmax of all -inf is NaN) output 0, and so do rows whose
    # visible scores are all -inf (an infinite key, a q.k that overflowed): no probability
    # mass, as torch's SDPA and flash-attn give. Only those: a NaN in q or in a visible key
    # stays NaN (nan_to_num here used to turn it into 0 or a finite mix), and so does a +inf
    # score (inf - inf).
    probs = torch.where((scores != float("-inf")).any(-1, keepdim=True), probs, 0.0)
    bad = ~torch.isfinite(v)
    if bad.any():
        # A value row reaches the queries that see its key, and only those: its NaN or inf
        # must not come in through 0 * NaN / 0 * inf with a masked key's zero probability.
        # The finite values go through the product; each key holding a non-finite value adds
        # p * value to the rows that see it (inf stays inf, -inf + inf and NaN give NaN).
        out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v.masked_fill(bad, 0.0))
        seen = mask.expand(B, H, Sq, Sk)
        for b, j in bad.any(-1).any(-1).nonzero().tolist():
            odd = torch.where(bad[b, j], v[b, j], 0.0)  # (H, D): the key's non-finite values only
            # masked before the product (not after: the backward of p * odd would then carry
            # 0 * NaN into the probabilities of the rows that do not see the key)
            odd = torch.where(seen[b, :, :, j].unsqueeze(-1), odd.unsqueeze(1), 0.0)  # (H, Sq, D)
            out[b] = out[b] + (probs[b, :, :, j].to(v.dtype).unsqueeze(-1) * odd).transpose(0, 1)
        return (out, lse) if return_lse else out
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    return (out, lse) if return_lse else out


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    softcap: float = 0.0,
):
    """Packed variable-length attention: ``attention`` on each sequence's slice.

    q (total_q, H, D); k, v (total_k, Hk, D); cu_seqlens_q / cu_seqlens_k (B + 1,) integer
    cumulative lengths from 0. Sequence i is ``attention(q[cq[i]:cq[i+1]][None],
    k[ck[i]:ck[i+1]][None], ...)`` with its own bottom-right causal / window alignment.
    Returns out (total_q, H, D) and, with return_lse, lse (H, total_q) float32. Rows past
    ``cu_seqlens_q[-1]`` / ``cu_seqlens_k[-1]`` (spare rows) belong to no sequence: their
    output is 0 and lse -inf. Differentiable (autograd through the slices).
    """
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(cq) - 1):
        o, l = attention(q[cq[i] : cq[i + 1]].unsqueeze(0), k[ck[i] : ck[i + 1]].unsqueeze(0),
                         v[ck[i] : ck[i + 1]].unsqueeze(0), causal=causal, softmax_scale=softmax_scale,
                         window=window, return_lse=True, softcap=softcap)
        outs.append(o[0])
        lses.append(l[0])
    H, spare = q.shape[1], q.shape[0] - (cq[-1] if cq else 0)
    outs.append(q.new_zeros((spare,) + tuple(q.shape[1:])))
    lses.append(torch.full((H, spare), float("-inf"), dtype=torch.float32, device=q.device))
    out, lse = torch.cat(outs, 0), torch.cat(lses, 1)
    return (out, lse) if return_lse else out


def paged_rows(pool: Tensor, block_table: Tensor, seqlen: int) -> Tensor:
    """Rows [0, seqlen) of every sequence of a paged cache, as a dense (B, seqlen, Hk, D) tensor.

    pool (num_pages, page_size, Hk, D); block_table (B, max_pages) integer: token t of
    sequence b is ``pool[block_table[b, t // page_size], t % page_size]``.
    """
    page_size = pool.shape[1]
    t = torch.arange(seqlen, device=pool.device)
    pages = block_table[:, t // page_size].long()  # (B, seqlen)
    return pool[pages, (t % page_size).unsqueeze(0).expand_as(pages)]


def _cache_view(cache: Tensor, block_table: Optional[Tensor]) -> Tensor:
    """The cache as (B, capacity, Hk, D): itself, or the paged pool gathered (a copy). Entries
    of the table past a sequence's tokens may hold anything (as the kernels allow): they are
    clamped into the pool for the gather, and the rows they give are masked by the caller."""
    if block_table is None:
        return cache
    table = block_table.long().clamp(0, cache.shape[0] - 1)
    return paged_rows(cache, table, block_table.shape[1] * cache.shape[1])


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    block_table: Optional[Tensor] = None,
    softcap: float = 0.0,
):
    """One query token per sequence against a KV cache with ragged valid lengths.

    q (B, H, D) or (B, 1, H, D); k_cache, v_cache (B, S_max, Hk, D), or page pools
    (num_pages, page_size, Hk, D) with ``block_table`` (B, max_pages) (see ``paged_rows``);
    cache_seqlens (B,) integer: sequence b attends to cache rows [0, cache_seqlens[b]).
    Returns out with q's shape and, with return_lse, lse (B, H) float32.
    """
    k_cache, v_cache = _cache_view(k_cache, block_table), _cache_view(v_cache, block_table)
    squeeze = q.dim() == 3
    q4 = q.unsqueeze(1) if squeeze else q
    k_cache, v_cache = k_cache[: q4.shape[0]], v_cache[: q4.shape[0]]  # (a cache of more rows: row b is sequence b)
    if not isinstance(cache_seqlens, Tensor):
        cache_seqlens = torch.full((q4.shape[0],), int(cache_seqlens), device=q.device)
    S_max = k_cache.shape[1]
    valid = torch.arange(S_max, device=q.device).unsqueeze(0) < cache_seqlens.view(-1, 1).long()
    out, lse = attention(q4, k_cache, v_cache, softmax_scale=softmax_scale, return_lse=True,
                         key_padding_mask=valid, softcap=softcap)
    out = out.squeeze(1) if squeeze else out
    lse = lse.squeeze(-1)  # (B, H)
    return (out, lse) if return_lse else out


def append_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
              block_table: Optional[Tensor] = None):
    """Write k, v (B, Sn, Hk, D) into the caches at rows [cache_seqlens[b], + Sn), in place.

    Contiguous caches (B, S_max, Hk, D), or page pools with ``block_table`` (capacity
    max_pages * page_size). The caller advances cache_seqlens afterwards. Raises ValueError
    past capacity.
    """
    Sn = k.shape[1]
    if block_table is None:
        S_max = k_cache.shape[1]
    else:
        page_size = k_cache.shape[1]
        S_max = block_table.shape[1] * page_size
    for b, start in enumerate(cache_seqlens.tolist()):
        if start < 0 or start + Sn > S_max:
            raise ValueError(
                f"append_kv: cache_seqlens[{b}] = {start} plus {Sn} new rows exceeds the cache "
                f"capacity {S_max}"
            )
        if block_table is None:
            k_cache[b, start : start + Sn] = k[b]
            v_cache[b, start : start + Sn] = v[b]
        else:
            t = torch.arange(start, start + Sn, device=k_cache.device)
            pages = block_table[b, t // page_size].long()
            k_cache[pages, t % page_size] = k[b]
            v_cache[pages, t % page_size] = v[b]
    return k_cache, v_cache


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    causal: bool = True,
    window: Tuple[int, int] = (-1, -1),
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    softcap: float = 0.0,
):
    """Sq new queries per sequence over a KV cache (chunked prefill, speculative decoding).

    q (B, Sq, H, D). If k, v (B, Sq, Hk, D) are given they are first written into the caches
    at rows [cache_seqlens[b], + Sq) (in place; cache_seqlens is not advanced) and the key
    length is L_b = cache_seqlens[b] + Sq, else L_b = cache_seqlens[b]. Sequence b is then
    ``attention(q[b], K[b, :L_b], V[b, :L_b], causal, window)``: bottom-right aligned, query i
    at key position L_b - Sq + i. Returns out (B, Sq, H, D) and, with return_lse,
    lse (B, H, Sq) float32 (a row that sees no key: out 0, lse -inf).
    """
    if k is not None:
        append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table)
    B, Sq, H, _ = q.shape
    added = Sq if k is not None else 0
    kc, vc = _cache_view(k_cache, block_table), _cache_view(v_cache, block_table)
    outs, lses = [], []
    for b, length in enumerate(cache_seqlens.tolist()):
        L = length + added
        o, l = attention(q[b : b + 1], kc[b : b + 1, :L], vc[b : b + 1, :L], causal=causal,
                         softmax_scale=softmax_scale, window=window, return_lse=True, softcap=softcap)
        outs.append(o)
        lses.append(l)
    out = torch.cat(outs, 0) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, 0) if lses else q.new_zeros((B, H, Sq), dtype=torch.float32)
    return (out, lse) if return_lse else out
