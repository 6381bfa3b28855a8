"""Decoding loops for ``Llama.generate``: greedy / sampling and beam search, on the KV cache.

``Llama.generate`` checks its arguments and calls ``sample`` (num_beams == 1) or
``beam_search`` (num_beams > 1). Both share the logits processors below, which follow
transformers' rules so that tokens match its ``generate`` one for one:

* repetition penalty p: for every token already present in the sequence (its real prompt
  tokens and what it generated so far), a score s > 0 becomes s / p and s <= 0 becomes s * p.
  Greedy/sampling applies it to the fp32 logits (before temperature / top-k / top-p); beam
  search to the log-probabilities (so those, all <= 0, are multiplied), as transformers does.
* min_new_tokens m: while fewer than m tokens have been generated, every eos id scores -inf.

Beam search (``beam_search``) -- beams are cache rows. A batch of B prompts is prefilled once,
the cache is expanded to B * num_beams rows (row b * num_beams + j is beam j of prompt b), and
every step runs one decode over all rows, then reorders the cache rows to follow the
surviving beams with one gather (``KVCache.reorder_rows`` / ``PagedKVCache.reorder_rows``).
Nothing is re-prefilled. The scoring is transformers' (v4.50+ vectorised) beam search:

* a beam's score is the sum of its tokens' log-softmax values (after the processors); at
  the start only beam 0 of each prompt is live (the others score -1e9), so the first step
  does not pick one token num_beams times;
* each step every prompt ranks its num_beams * vocab continuations and keeps the best
  K = max(2, 1 + number of eos ids) * num_beams of them; those ending in eos (or reaching
  max_new_tokens, where all of them end) are candidates for the finished set, the best
  num_beams that do not end become the next running beams;
* a candidate among the top num_beams of the K that ends is scored
  score / generated_length ** length_penalty and kept if it is among the best num_beams
  finished hypotheses of its prompt (the finished set holds num_beams);
* early_stopping=True: a prompt takes no more finished hypotheses once it holds num_beams,
  and the search ends when every prompt does. False: a prompt is closed when its best
  running beam, divided by its current length ** length_penalty, cannot beat its worst
  finished hypothesis; "never": the same test, but with a positive length_penalty the best
  running beam is measured at the maximum length (the canonical, exhaustive rule);
* the result per prompt is its best num_return_sequences finished hypotheses, best first.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional

import torch
from torch import Tensor

from fastattn._validate import is_integer

__all__ = ["check_options", "repetition_penalty_", "sample", "beam_search", "token_presence"]

_NEG = -1.0e9  # "not a candidate": what transformers adds, so ties break the same way


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------
def check_options(num_beams, length_penalty, early_stopping, num_return_sequences, repetition_penalty,
                  min_new_tokens, temperature, top_k, top_p) -> None:
    """ValueError for any option generate cannot honour (all checks are host-side)."""
    if not is_integer(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1 (1 = greedy / sampling), got {num_beams!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) \
            or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not is_integer(num_return_sequences) \
            or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be an int in [1, num_beams={num_beams}] (several "
                         f"sequences per prompt come from beam search), got {num_return_sequences!r}")
    if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, numbers.Real) \
            or not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty!r}")
    if not is_integer(min_new_tokens) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be a non-negative int, got {min_new_tokens!r}")
    if num_beams > 1 and (temperature != 0 or top_k is not None or top_p is not None):
        raise ValueError(f"beam search (num_beams={num_beams}) is deterministic: temperature, top_k and top_p "
                         f"apply only to sampling with num_beams=1 (got temperature={temperature!r}, "
                         f"top_k={top_k!r}, top_p={top_p!r})")


# ---------------------------------------------------------------------------------------
# Logits processors
# ---------------------------------------------------------------------------------------
def token_presence(input_ids: Tensor, lengths: Tensor, vocab: int) -> Tensor:
    """(B, vocab) bool: which tokens occur among the first lengths[b] ids of row b."""
    B, S = input_ids.shape
    real = torch.arange(S, device=input_ids.device).view(1, S) < lengths.view(B, 1).long()
    ids = torch.where(real, input_ids.long(), vocab)  # pads go to a spare column, dropped below
    seen = torch.zeros(B, vocab + 1, dtype=torch.bool, device=input_ids.device)
    seen.scatter_(1, ids, True)
    return seen[:, :vocab]


def repetition_penalty_(scores: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """In place on fp32 scores (N, vocab): where seen, s > 0 -> s / penalty, else s * penalty."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return scores.copy_(torch.where(seen, penalised, scores))


def _process(scores: Tensor, seen: Optional[Tensor], penalty: float, eos_t: Optional[Tensor],
             generated: int, min_new_tokens: int) -> Tensor:
    if seen is not None:
        repetition_penalty_(scores, seen, penalty)
    if eos_t is not None and generated < min_new_tokens:
        scores.index_fill_(1, eos_t, float("-inf"))
    return scores


# ---------------------------------------------------------------------------------------
# Greedy / sampling
# ---------------------------------------------------------------------------------------
def sample(model, input_ids: Tensor, lengths: Tensor, max_new_tokens: int, *, temperature, top_k, top_p,
           generator, eos: List[int], pad: int, repetition_penalty: float, min_new_tokens: int,
           progress: bool, cuda_graph: bool, cache: str, page_size: int) -> Tensor:
    """num_beams == 1: see ``Llama.generate``. Returns (B, S + n)."""
    from .llama import _progress, sample_next_token

    B, S = input_ids.shape
    device = input_ids.device
    out = _prompt_block(input_ids, lengths, max_new_tokens, pad)
    if max_new_tokens == 0:
        return out[:, :S]
    # The last new token is returned, never fed back: S + max_new_tokens - 1 positions are cached.
    max_lengths = [n + max_new_tokens - 1 for n in lengths.tolist()] if cache == "paged" else None
    model.setup_cache(B, S + max_new_tokens - 1, cache=cache, page_size=page_size, max_lengths=max_lengths)
    logits = model.prefill(input_ids, lengths)  # (B, vocab)
    decode = model.capture_decode_step() if cuda_graph and max_new_tokens > 1 else model.decode_step
    eos_t = torch.tensor(eos, device=device) if eos else None
    penalise = repetition_penalty != 1.0
    seen = token_presence(input_ids, lengths, logits.shape[-1]) if penalise else None
    masks_eos = eos_t is not None and min_new_tokens > 0
    recompute_at = _longrope_recompute_step(model, S, lengths)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)
    steps = range(max_new_tokens)
    if progress:
        steps = _progress(steps, desc="decode")
    n = 0
    for i in steps:
        if penalise or masks_eos:
            logits = _process(logits.float(), seen, repetition_penalty, eos_t, i, min_new_tokens)
        tok = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_t is not None:
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
        out[rows, lengths.long() + i] = tok
        n = i + 1
        if eos_t is not None:
            finished |= torch.isin(tok, eos_t)
            if bool(finished.all()):
                break
        if penalise:
            seen[rows, tok] = True
        if i + 1 < max_new_tokens:
            if i == recompute_at:
                logits = model.prefill(out[:, : S + i + 1], lengths + (i + 1))
            else:
                logits = decode(tok)
    return out[:, : S + n]


def _longrope_recompute_step(model, S: int, lengths: Tensor) -> Optional[int]:
    """LongRoPE (Phi-3): the prefill of prompts no longer than original_max_position_embeddings
    rotated the cache's keys with the short factors; the first decode step whose position
    reaches that length runs with the long ones, and there transformers' Phi-3 drops its cache
    and recomputes it (Phi3ForCausalLM.prepare_inputs_for_generation; its other models keep the
    cache: config.longrope_recompute_cache). The loops here do the same, by a prefill of every
    token so far, at the step index this returns (None: never). The longest real prompt
    decides, as in the prefill (pad columns do not count)."""
    switch = model.config.longrope_switch
    longest = int(lengths.max())
    if switch is None or not model.config.longrope_recompute_cache or longest > switch:
        return None
    return switch - longest


def _with_new_tokens(input_ids: Tensor, lengths: Tensor, new: Tensor, pad: int) -> Tensor:
    """(M, S + n) for new (M, n) with M = B * r: row m is prompt m // r's real tokens, then
    new[m], then pad (beam search's hypotheses, r per prompt)."""
    B, M, n = input_ids.shape[0], new.shape[0], new.shape[1]
    r = M // B
    out = _prompt_block(input_ids, lengths, n, pad).repeat_interleave(r, 0)
    at = lengths.long().repeat_interleave(r).view(M, 1) + torch.arange(n, device=new.device).view(1, n)
    return out.scatter_(1, at, new)


def _prompt_block(input_ids: Tensor, lengths: Tensor, max_new_tokens: int, pad: int) -> Tensor:
    """(B, S + max_new_tokens) of pad with each row's real prompt tokens in front."""
    B, S = input_ids.shape
    out = torch.full((B, S + max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
    real = torch.arange(S, device=input_ids.device).view(1, S) < lengths.view(B, 1).long()
    out[:, :S] = torch.where(real, input_ids.long(), pad)
    return out


# ---------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------
def _pick(t: Tensor, index: Tensor) -> Tensor:
    """t (B, M, ...) -> (B, K, ...): t[b, index[b, k]]."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def beam_search(model, input_ids: Tensor, lengths: Tensor, max_new_tokens: int, *, num_beams: int,
                length_penalty: float, early_stopping, num_return_sequences: int, eos: List[int], pad: int,
                repetition_penalty: float, min_new_tokens: int, progress: bool, cuda_graph: bool, cache: str,
                page_size: int) -> Tensor:
    """num_beams > 1: see the module docstring and ``Llama.generate``.

    Returns (B * num_return_sequences, S + n): row b * num_return_sequences + r is prompt b's
    r-th best hypothesis: its real prompt tokens, its new tokens (the last an eos id unless
    it ran to max_new_tokens), then pad; n is the longest returned hypothesis."""
    from .llama import _progress

    B, S = input_ids.shape
    nb = num_beams
    N = B * nb
    device = input_ids.device
    if max_new_tokens == 0:
        return _prompt_block(input_ids, lengths, 0, pad).repeat_interleave(num_return_sequences, 0)
    T = max_new_tokens
    expand = torch.arange(B, device=device).repeat_interleave(nb)  # cache row of each beam, at the start
    # prefill each prompt once, then copy its cache rows (pages) to its beams
    caps = [n + T - 1 for n in lengths.tolist()]  # what each sequence may grow to (the last token is not fed back)
    if cache == "paged":
        model.setup_cache(B, S + T - 1, cache="paged", page_size=page_size, max_lengths=caps)
        logits = model.prefill(input_ids, lengths)
        model.cache.reorder_rows(expand, max_lengths=[c for c in caps for _ in range(nb)])
    else:
        model.setup_cache(B, S + T - 1)
        logits = model.prefill(input_ids, lengths)
        model.cache.reorder_rows(expand, upto=S)
    logits = logits.index_select(0, expand)  # (N, vocab)
    decode = model.capture_decode_step() if cuda_graph and T > 1 else model.decode_step
    V = logits.shape[-1]
    eos_t = torch.tensor(eos, device=device) if eos else None
    penalise = repetition_penalty != 1.0
    seen = token_presence(input_ids, lengths, V).index_select(0, expand) if penalise else None
    K = max(2, 1 + len(eos)) * nb  # candidates kept per prompt and step
    in_top = torch.arange(K, device=device) < nb  # only these may finish
    recompute_at = _longrope_recompute_step(model, S, lengths)
    row0 = (torch.arange(B, device=device) * nb).view(B, 1)

    run_tokens = torch.full((B, nb, T), pad, dtype=torch.long, device=device)  # new tokens of each beam
    run_scores = torch.full((B, nb), _NEG, dtype=torch.float32, device=device)
    run_scores[:, 0] = 0.0
    fin_tokens = run_tokens.clone()  # the finished set, best first
    fin_scores = torch.full((B, nb), _NEG, dtype=torch.float32, device=device)
    fin_done = torch.zeros(B, nb, dtype=torch.bool, device=device)
    fin_len = torch.zeros(B, nb, dtype=torch.long, device=device)
    open_ = torch.ones(B, 1, dtype=torch.bool, device=device)  # may still improve its finished set
    steps = range(T)
    if progress:
        steps = _progress(steps, desc="beam search")
    for i in steps:
        logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
        logp = _process(logp, seen, repetition_penalty, eos_t, i, min_new_tokens)
        total = (logp.view(B, nb, V) + run_scores.unsqueeze(-1)).view(B, nb * V)
        top_scores, top = torch.topk(total, K, dim=1)  # (B, K), best first
        src = top // V  # beam each candidate extends
        tok = top % V
        cand_tokens = _pick(run_tokens, src)
        cand_tokens[:, :, i] = tok
        if i + 1 == T:
            ends = torch.ones(B, K, dtype=torch.bool, device=device)
        elif eos_t is not None:
            ends = torch.isin(tok, eos_t)
        else:
            ends = torch.zeros(B, K, dtype=torch.bool, device=device)

        # the best num_beams candidates that go on are the next running beams
        going = top_scores + ends.to(torch.float32) * _NEG
        keep = torch.topk(going, nb, dim=1).indices  # (B, nb)
        run_tokens = _pick(cand_tokens, keep)
        run_scores = _pick(going, keep)
        run_src = _pick(src, keep)

        # ending candidates among the top num_beams enter the finished set if good enough
        finishing = ends & in_top.view(1, K)
        scored = top_scores / float((i + 1) ** length_penalty)
        full = fin_done.all(dim=1, keepdim=True) & (early_stopping is True)
        scored += full.to(torch.float32) * _NEG
        scored += (~open_).to(torch.float32) * _NEG
        scored += (~finishing).to(torch.float32) * _NEG
        best = torch.topk(torch.cat([fin_scores, scored], dim=1), nb, dim=1).indices
        fin_tokens = _pick(torch.cat([fin_tokens, cand_tokens], dim=1), best)
        fin_scores = _pick(torch.cat([fin_scores, scored], dim=1), best)
        fin_done = _pick(torch.cat([fin_done, finishing], dim=1), best)
        fin_len = _pick(torch.cat([fin_len, torch.full_like(tok, i + 1)], dim=1), best)

        # can a prompt's running beams still beat its worst finished hypothesis?
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = T
        else:
            best_len = i + 1
        best_running = run_scores[:, :1] / float(best_len ** length_penalty)
        worst = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, _NEG)
        open_ = open_ & (best_running > worst).any(dim=1, keepdim=True)
        go_on = bool(open_.any()) and not (early_stopping is True and bool(fin_done.all())) \
            and not bool(ends.all())
        if not go_on:
            break
        # the cache, and what each beam has seen, follow the beams
        rows = (run_src + row0).view(N)
        model.cache.reorder_rows(rows, upto=S + i + 1)
        new = run_tokens[:, :, i].reshape(N)
        if penalise:
            seen = seen.index_select(0, rows)
            seen[torch.arange(N, device=device), new] = True
        if i == recompute_at:  # LongRoPE: every beam's tokens so far, recomputed (see sample)
            beams = _with_new_tokens(input_ids, lengths, run_tokens[:, :, : i + 1].reshape(N, i + 1), pad)
            logits = model.prefill(beams, lengths.repeat_interleave(nb) + (i + 1))
        else:
            logits = decode(new)

    R = num_return_sequences
    n = int(fin_len[:, :R].max())
    return _with_new_tokens(input_ids, lengths, fin_tokens[:, :R, :n].reshape(B * R, n), pad)
