"""Hugging Face integration on padded, cached and packed batches (issue 16, item 2).

attn_implementation="fastattn" against attn_implementation="sdpa" on the same random weights:
left-padded generate, right-padded forward, static caches with unused tails, sliding windows,
packed training inputs (position_ids restarts). These must run on fastattn.flash_attention_varlen
(counted by fa_hf.stats()); only arbitrary masks fall back to SDPA, counted and warned about."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastattn

transformers = pytest.importorskip("transformers")
fa_hf = pytest.importorskip("fastattn.integrations.transformers")

from hf_tiny import GraphCapture  # noqa: E402

VOCAB = 128
PAD = 0
PROMPT_LENS = (5, 17, 29, 40)  # batch of 4, prompts 5..40 tokens


def _config(arch):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD)
    if arch == "llama-gqa":
        return transformers.LlamaConfig(**base)
    if arch == "qwen3":
        return transformers.Qwen3Config(**base, head_dim=16)
    if arch == "mistral-window":  # sliding window much narrower than the prompts
        return transformers.MistralConfig(**base, sliding_window=7)
    if arch == "gemma3":  # sliding-window and full layers, a cache of each kind
        return transformers.Gemma3TextConfig(**{**base, "num_hidden_layers": 4}, head_dim=16, sliding_window=7)
    raise AssertionError(arch)


_MODELS = {}


def _models(arch):
    """(sdpa, fastattn) models with the same random weights, fp32, eval."""
    if arch not in _MODELS:
        fa_hf.register()
        cfg = _config(arch)
        torch.manual_seed(0)
        theirs = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        theirs.set_attn_implementation("sdpa")
        mine = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).eval()
        mine.load_state_dict(theirs.state_dict())
        mine.set_attn_implementation("fastattn")
        _MODELS[arch] = theirs, mine
    return _MODELS[arch]


def _padded_batch(lens=PROMPT_LENS, side="left", seed=1):
    S = max(lens)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lens), S), generator=g)
    mask = torch.zeros(len(lens), S, dtype=torch.long)
    for b, n in enumerate(lens):
        cols = slice(S - n, S) if side == "left" else slice(0, n)
        mask[b, cols] = 1
    ids[mask == 0] = PAD
    return ids, mask


def _assert_close(mine, theirs, rel=1e-4):
    scale = max(theirs.abs().max().item(), 1.0)
    err = (mine - theirs).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} > {rel} * {scale:.3e}"


class _Count:
    """fa_hf.stats() over a block, plus the calls of fastattn.flash_attention_varlen."""

    def __init__(self, monkeypatch):
        self.varlen = 0
        inner = fastattn.flash_attention_varlen

        def spy(*args, **kwargs):
            self.varlen += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(fastattn, "flash_attention_varlen", spy)
        fa_hf.reset_stats()

    @property
    def stats(self):
        return fa_hf.stats()

    def fraction(self):
        s = fa_hf.stats()
        return s["fastattn"] / max(s["fastattn"] + s["sdpa_fallback"], 1)


GEN = dict(do_sample=False, pad_token_id=PAD, eos_token_id=None, output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen3", "mistral-window", "gemma3"])
def test_left_padded_generate_matches_sdpa_on_fastattn(arch, monkeypatch):
    """The acceptance case: batch of 4, prompts 5..40 tokens, left padding, greedy, fp32."""
    theirs, mine = _models(arch)
    ids, mask = _padded_batch()
    ref = theirs.generate(ids, attention_mask=mask, max_new_tokens=10, **GEN)
    count = _Count(monkeypatch)
    out = mine.generate(ids, attention_mask=mask, max_new_tokens=10, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    _assert_close(torch.stack(out.logits), torch.stack(ref.logits))
    assert count.fraction() >= 0.9, count.stats
    assert count.stats["sdpa_fallback"] == 0, count.stats
    layers = mine.config.num_hidden_layers
    assert count.stats["fastattn"] == layers * 10 and count.varlen == layers * 10  # prefill + 9 decode steps


@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-window", "gemma3"])
def test_left_padded_static_cache_generate_matches_sdpa(arch, monkeypatch):
    """A static cache longer than prompt + new tokens: its unused tail must stay invisible."""
    theirs, mine = _models(arch)
    ids, mask = _padded_batch()
    kw = dict(max_new_tokens=8, cache_implementation="static", **GEN)
    ref = theirs.generate(ids, attention_mask=mask, **kw)
    count = _Count(monkeypatch)
    out = mine.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    _assert_close(torch.stack(out.logits), torch.stack(ref.logits))
    assert count.fraction() >= 0.9 and count.stats["sdpa_fallback"] == 0, count.stats


def test_static_cache_forward_with_padding_and_spare_rows(monkeypatch):
    """StaticCache(max_cache_len=64) prefill + a chunk of 3 queries over a left-padded batch."""
    from transformers import StaticCache

    theirs, mine = _models("llama-gqa")
    ids, mask = _padded_batch(lens=(3, 11, 8, 14))
    nxt = torch.randint(1, VOCAB, (4, 3), generator=torch.Generator().manual_seed(5))
    full_mask = torch.cat([mask, torch.ones(4, 3, dtype=mask.dtype)], 1)
    results = []
    count = None
    with torch.no_grad():
        for m in (theirs, mine):
            if m is mine:
                count = _Count(monkeypatch)
            cache = StaticCache(config=m.config, max_cache_len=64)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            a = m(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits
            pos2 = pos[:, -1:] + torch.arange(1, 4)
            b = m(nxt, attention_mask=full_mask, position_ids=pos2, cache=cache, use_cache=True,
                  cache_position=torch.arange(ids.shape[1], ids.shape[1] + 3)).logits
            results.append((a, b))
    (a0, b0), (a1, b1) = results
    valid = mask.bool()
    _assert_close(a1[valid], a0[valid])
    _assert_close(b1, b0)
    assert count.stats == {"fastattn": 4, "sdpa_fallback": 0, "reasons": {}} and count.varlen == 4


@pytest.mark.parametrize("arch", ["mistral-window", "gemma3"])
def test_dynamic_cache_chunked_prefill_with_padding_matches_sdpa(arch, monkeypatch):
    """Chunks of 8, 1 and 11 queries over a filled dynamic (sliding) cache, left padding; the
    first chunk holds rows that are all padding (no query of theirs is real)."""
    from transformers import DynamicCache

    theirs, mine = _models(arch)
    ids, mask = _padded_batch(lens=(9, 20, 3, 14))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    results = []
    with torch.no_grad():
        for m in (theirs, mine):
            if m is mine:
                count = _Count(monkeypatch)
            cache, chunks = DynamicCache(config=m.config), []
            for a, b in ((0, 8), (8, 9), (9, 20)):
                chunks.append(m(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], cache=cache,
                                use_cache=True).logits)
            results.append(torch.cat(chunks, 1))
    valid = mask.bool()
    _assert_close(results[1][valid], results[0][valid])
    assert count.stats["sdpa_fallback"] == 0 and count.stats["fastattn"] == 3 * mine.config.num_hidden_layers


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen3"])
def test_right_padded_forward_matches_sdpa(arch, monkeypatch):
    theirs, mine = _models(arch)
    ids, mask = _padded_batch(side="right")
    with torch.no_grad():
        ref = theirs(ids, attention_mask=mask).logits
        count = _Count(monkeypatch)
        out = mine(ids, attention_mask=mask).logits
    valid = mask.bool()
    # Padded query rows differ by design (0 here, as flash_attention_2; SDPA attends them to the
    # earlier real tokens), and reach only padded positions: the real tokens' logits must match.
    _assert_close(out[valid], ref[valid])
    assert count.stats["fastattn"] == 2 and count.stats["sdpa_fallback"] == 0 and count.varlen == 2


def _packed_batch(lens=(7, 12, 5, 9), seed=3):
    ids = torch.randint(1, VOCAB, (1, sum(lens)), generator=torch.Generator().manual_seed(seed))
    position_ids = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    return ids, position_ids, lens


@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-window"])
def test_packed_training_step_matches_sdpa_and_separate_sequences(arch, monkeypatch):
    """position_ids restarting at 0 mark packed sequences (as transformers' flash-attention path
    reads them): no attention across them. Loss and gradients vs SDPA on the same packed batch
    (its block-diagonal mask), and the logits vs each sequence run on its own."""
    theirs, mine = _models(arch)
    ids, position_ids, lens = _packed_batch()
    grads, losses, logits = [], [], []
    count = None
    for m in (theirs, mine):
        m.zero_grad(set_to_none=True)
        m.train()
        if m is mine:
            count = _Count(monkeypatch)
        # no cache, as in training: transformers reads packing from position_ids only then
        out = m(ids, position_ids=position_ids, labels=ids, use_cache=False)
        out.loss.backward()
        m.eval()
        losses.append(out.loss.detach())
        logits.append(out.logits.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert count.stats == {"fastattn": 2, "sdpa_fallback": 0, "reasons": {}} and count.varlen == 2
    _assert_close(losses[1], losses[0])
    _assert_close(logits[1], logits[0])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        _assert_close(grads[1][name], grads[0][name], rel=1e-4)
    # each packed sequence on its own (no packing at all)
    with torch.no_grad():
        start = 0
        for n in lens:
            alone = mine(ids[:, start:start + n]).logits
            _assert_close(logits[1][:, start:start + n], alone)
            start += n


def test_right_padded_training_step_matches_sdpa(monkeypatch):
    """Padded fine-tuning batch (labels -100 on the padding): loss and every gradient as SDPA's."""
    theirs, mine = _models("qwen3")
    ids, mask = _padded_batch(lens=(6, 13, 9, 11), side="right")
    labels = ids.masked_fill(mask == 0, -100)
    losses, grads = [], []
    for m in (theirs, mine):
        m.zero_grad(set_to_none=True)
        m.train()
        if m is mine:
            count = _Count(monkeypatch)
        loss = m(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        m.eval()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert count.stats["fastattn"] == 2 and count.stats["sdpa_fallback"] == 0 and count.varlen == 2
    _assert_close(losses[1], losses[0])
    for name in grads[0]:
        _assert_close(grads[1][name], grads[0][name])


def test_arbitrary_4d_mask_falls_back_counted_and_warned(monkeypatch):
    theirs, mine = _models("llama-gqa")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    # not per-sequence lengths + causal: every query also sees key 8 (a "future" key)
    dense = torch.ones(9, 9).tril().bool()
    dense[:, 8] = True
    mask4 = dense.expand(2, 1, 9, 9).clone()
    fa_hf._WARNED_REASONS.clear()
    with torch.no_grad():
        ref = theirs(ids, attention_mask=mask4).logits
        count = _Count(monkeypatch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = mine(ids, attention_mask=mask4).logits
    _assert_close(out, ref)
    s = count.stats
    assert s["fastattn"] == 0 and s["sdpa_fallback"] == 2 and count.varlen == 0
    reason = "mask not expressible as per-sequence lengths + causal/window"
    assert s["reasons"] == {reason: 2}
    msgs = [str(w.message) for w in caught if "fell back" in str(w.message)]
    assert len(msgs) == 1 and reason in msgs[0]  # once, naming the reason


def test_or_mask_overlay_falls_back():
    """A mask function transformers composes with an overlay (e.g. bidirectional image tokens) is
    not recognised: the mask function hands back SDPA's 4-D mask."""
    from transformers.masking_utils import and_masks, causal_mask_function, or_masks

    fa_hf.register()
    am = torch.ones(2, 5, dtype=torch.bool)
    am[0, :2] = False
    for fn in (or_masks(causal_mask_function, lambda b, h, q, kv: kv == 4),
               and_masks(causal_mask_function, lambda b, h, q, kv: kv >= 1)):
        # (create_causal_mask passes allow_is_causal_skip=False with overlays)
        m = fa_hf.fastattn_mask(2, 5, 5, mask_function=fn, attention_mask=am, allow_is_causal_skip=False)
        assert m is not None and m.dim() == 4
        assert torch.equal(m, _sdpa_reference_mask(batch_size=2, q_length=5, kv_length=5, mask_function=fn,
                                                   attention_mask=am))


def _sdpa_reference_mask(**kw):
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(allow_is_causal_skip=False, **kw)


@pytest.mark.parametrize("case", ["left", "right", "holes", "static-tail", "decode", "sliding", "sliding-offset",
                                  "packed"])
def test_mask_function_and_dense_fallback_match_sdpa_mask(case):
    """fastattn_mask's 2-D mask, expanded back to 4-D for the SDPA fallbacks, is transformers'
    own sdpa_mask (rows of real queries; padded query rows everywhere for padding masks)."""
    from transformers.masking_utils import (and_masks, causal_mask_function, packed_sequence_mask_function,
                                            remap_positions_for_packed_sequence, sliding_window_causal_mask_function)

    fa_hf.register()
    B = 3
    am = torch.ones(B, 12, dtype=torch.bool)
    kw = dict(batch_size=B, q_length=12, kv_length=12, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
              attention_mask=am)
    window = None
    if case == "left":
        am[0, :4] = False
        am[2, :7] = False
    elif case == "right":
        am[1, 9:] = False
    elif case == "holes":
        am[1, 3:5] = False
        am[2, :2] = False
    elif case == "static-tail":  # 5 new queries after 7 cached tokens, a cache of 20 rows
        am[0, :3] = False
        kw.update(q_length=5, kv_length=20, q_offset=7)
    elif case == "decode":
        am[0, :3] = False
        kw.update(q_length=1, kv_length=12, q_offset=11)
    elif case == "sliding":
        am[0, :4] = False
        window = 4
        kw.update(mask_function=sliding_window_causal_mask_function(4), local_size=4)
    elif case == "sliding-offset":  # a sliding cache: keys start at absolute position 5
        am = torch.ones(B, 15, dtype=torch.bool)
        am[1, :6] = False
        window = 4
        kw.update(attention_mask=am, q_length=2, kv_length=4 - 1 + 2, q_offset=13, kv_offset=10,
                  mask_function=sliding_window_causal_mask_function(4), local_size=4)
    elif case == "packed":
        position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 0, 1]]).expand(B, -1)
        psm = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        kw.update(attention_mask=None, mask_function=and_masks(
            remap_positions_for_packed_sequence(causal_mask_function, position_ids),
            packed_sequence_mask_function(psm)))
    mine = fa_hf.fastattn_mask(**kw)
    assert mine is not None and mine.dim() == 2, mine
    assert mine._fastattn_window == window
    ref = _sdpa_reference_mask(**kw)
    Sq, Sk = kw["q_length"], kw["kv_length"]
    dense = fa_hf._dense_from_2d(mine, Sq, Sk, window)
    assert dense.shape == ref.shape == (B, 1, Sq, Sk)
    assert torch.equal(dense, ref)
    if case != "packed":
        # generate() builds masks ahead for static caches and the model hands them to its mask
        # function again (eagerly, or under torch.compile where SDPA's mask is built): same mask
        again = fa_hf.fastattn_mask(**{**kw, "attention_mask": mine})
        assert torch.equal(again, mine) and again._fastattn_window == window
        assert torch.equal(_sdpa_reference_mask(**{**kw, "attention_mask": mine}), ref)


def test_mask_function_returns_none_where_sdpa_does():
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    fa_hf.register()
    for kw in (dict(q_length=7, kv_length=7), dict(q_length=1, kv_length=9, q_offset=8),
               dict(q_length=5, kv_length=20, attention_mask=torch.ones(2, 5, dtype=torch.bool))):
        kw = dict(batch_size=2, mask_function=causal_mask_function, **kw)
        assert sdpa_mask(**kw) is None and fa_hf.fastattn_mask(**kw) is None


@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-window"])
def test_falls_back_exactly_without_varlen_kernel(arch, monkeypatch):
    """A fastattn build without flash_attention_varlen: padded calls go to SDPA, counted."""
    theirs, mine = _models(arch)
    ids, mask = _padded_batch()
    monkeypatch.delattr(fastattn, "flash_attention_varlen")
    fa_hf.reset_stats()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, ref = mine(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits
    valid = mask.bool()
    _assert_close(out[valid], ref[valid])
    assert fa_hf.stats()["reasons"] == {"fastattn.flash_attention_varlen unavailable": 2}


def test_sliding_window_over_holes_falls_back(monkeypatch):
    """A window counts positions; padding in the middle of a row (holes) is not per-sequence
    lengths + window any more: that call falls back, exactly."""
    theirs, mine = _models("mistral-window")
    ids, mask = _padded_batch(lens=(12, 12), side="left")
    mask[1, 3:6] = 0
    with torch.no_grad():
        ref = theirs(ids, attention_mask=mask).logits
        count = _Count(monkeypatch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = mine(ids, attention_mask=mask).logits
    valid = mask.bool()
    _assert_close(out[valid], ref[valid])
    assert count.stats["reasons"] == {"sliding window over padding with holes": 2}


def test_padded_batch_low_precision_and_dropout_fallback(monkeypatch):
    """bf16 left-padded forward runs on varlen within the usual error ratio; attention dropout
    in training is one of the documented fallbacks (with the exact SDPA mask)."""
    from conftest import assert_error_ratio

    theirs, mine = _models("llama-gqa")
    ids, mask = _padded_batch()
    valid = mask.bool()
    low_t = copy.deepcopy(theirs).to(torch.bfloat16)
    low_m = copy.deepcopy(mine).to(torch.bfloat16)
    with torch.no_grad():
        truth = theirs(ids, attention_mask=mask).logits
        ref = low_t(ids, attention_mask=mask).logits.float()
        count = _Count(monkeypatch)
        out = low_m(ids, attention_mask=mask).logits.float()
    assert count.varlen == 2
    assert_error_ratio(out[valid], ref[valid], truth[valid], "bf16 logits", atol=1e-2)
    drop = copy.deepcopy(mine).train()
    for layer in drop.model.layers:
        layer.self_attn.attention_dropout = 0.5
    fa_hf.reset_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        drop(ids, attention_mask=mask)
    assert fa_hf.stats()["reasons"] == {"attention dropout in training": 2}


@pytest.mark.parametrize("arch, use_cache", [("llama-gqa", True), ("mistral-window", True), ("mistral-window", False)])
def test_compiled_packed_training_step_stays_per_sequence(arch, use_cache):
    # Under torch.compile, packed position_ids with a cache (a model in train or eval mode builds a
    # DynamicCache unless use_cache=False; transformers then builds a plain causal mask) attended
    # across the packed sequences: the eager path's host check of position_ids was skipped while
    # tracing (outside audit; loss and gradients silently wrong). Now the sequences are split in
    # the graph. Loss and gradients vs the eager fastattn step, which is per sequence.
    import torch._dynamo

    _, mine = _models(arch)
    ids, position_ids, lens = _packed_batch()
    results = []
    for compiled in (False, True):
        m = copy.deepcopy(mine).train()
        torch._dynamo.reset()

        def forward(m, ids, position_ids):
            out = m(ids, position_ids=position_ids, labels=ids, use_cache=use_cache)
            return out.loss, out.logits

        # (fullgraph=False: transformers' DynamicCache set-up breaks the graph on its own)
        fn = torch.compile(forward, backend="eager", fullgraph=not use_cache) if compiled else forward
        loss, logits = fn(m, ids, position_ids)
        loss.backward()
        results.append((loss.detach(), logits.detach(),
                        {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (l0, o0, g0), (l1, o1, g1) = results
    _assert_close(l1, l0, rel=1e-6)
    _assert_close(o1, o0, rel=1e-5)
    for name in g0:
        _assert_close(g1[name], g0[name], rel=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_forward_runs_on_fastattn_kernels(batch):
    # While tracing, transformers never skips the causal mask (torch < 2.14): its 4-D mask sent
    # every compiled / exported forward to the SDPA fallback, silently (outside audit). Now an
    # unpadded causal batch with a cache runs on the kernels (one row: split by position_ids
    # restarts in the graph). Without a cache transformers marks every traced batch as packed,
    # in a mask function that cannot be taken apart while tracing: SDPA's, as before.
    import torch._dynamo

    arch, use_cache = "llama-gqa", True

    theirs, mine = _models(arch)
    ids = torch.randint(1, VOCAB, (batch, 19), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    backend = GraphCapture()
    with torch.no_grad():
        want = mine(ids, use_cache=use_cache).logits
        got = torch.compile(lambda x: mine(x, use_cache=use_cache).logits, backend=backend, fullgraph=True)(ids)
    targets = backend.targets()
    assert any("fastattn" in t and "flash_attn" in t for t in targets), targets
    assert not any("scaled_dot_product_attention" in t for t in targets), targets
    assert torch.equal(got, want)
    with torch.no_grad():
        _assert_close(got, theirs(ids, use_cache=use_cache).logits)
    torch._dynamo.reset()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("how", ["cache", "all_ones_mask"])
def test_position_gap_is_no_restart(how, compiled):
    # One row whose positions jump forward (0 1 2 3 10 11 12 13) but never restart: with a
    # cache or an all-ones mask, SDPA, eager and flash_attention_2 (whose split starts where the
    # position is the row's minimum) attend across the gap; fastattn split the row there
    # (silently different logits and tokens; HF generate-paths audit).
    import torch._dynamo

    theirs, mine = _models("llama-gqa")
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    position_ids = torch.tensor([[0, 1, 2, 3, 10, 11, 12, 13]])
    kw = dict(use_cache=True) if how == "cache" else dict(attention_mask=torch.ones(1, 8, dtype=torch.long),
                                                          use_cache=False)
    torch._dynamo.reset()
    with torch.no_grad():
        want = theirs(ids, position_ids=position_ids, **kw).logits
        run = (lambda i, p: mine(i, position_ids=p, **kw).logits)
        got = (torch.compile(run, backend="eager") if compiled else run)(ids, position_ids)
    _assert_close(got, want, rel=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("use_cache", [False, True])
def test_compiled_packed_row_with_an_all_ones_mask_is_eager_fastattns(use_cache):
    # A tokenizer's all-ones attention_mask over a packed row: eager lets position_ids split the
    # row (as flash_attention_2); compiled, the traced mask kept plain causal attention across
    # the sequences (silently wrong logits, loss and gradients; HF integration audit). Decided in
    # the graph now; a mask with a zero still decides alone (the test below).
    import torch._dynamo

    _, mine = _models("llama-gqa")
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]])
    mask = torch.ones(1, 12, dtype=torch.long)
    torch._dynamo.reset()
    with torch.no_grad():
        want = mine(ids, attention_mask=mask, position_ids=position_ids, use_cache=use_cache).logits
        alone = torch.cat([mine(ids[:, a:b], use_cache=False).logits for a, b in ((0, 5), (5, 9), (9, 12))], 1)
        got = torch.compile(lambda i, m, p: mine(i, attention_mask=m, position_ids=p, use_cache=use_cache).logits,
                            backend="eager")(ids, mask, position_ids)
    _assert_close(want, alone, rel=1e-5)
    _assert_close(got, want, rel=1e-5)
    torch._dynamo.reset()


def test_compiled_padded_packed_row_is_eager_fastattns(monkeypatch):
    # A traced mask built from a caller's padding mask was split by position_ids restarts too:
    # a right-padded packed row (or generate-style position_ids over a mask with a hole)
    # attended differently compiled than eager (reviewer). A padding mask decides, as eager.
    import torch._dynamo

    _, mine = _models("llama-gqa")
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1] * 9 + [0] * 3])
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]])
    torch._dynamo.reset()
    with torch.no_grad():
        want = mine(ids, attention_mask=mask, position_ids=position_ids).logits
        got = torch.compile(lambda i, m, p: mine(i, attention_mask=m, position_ids=p).logits, backend="eager")(
            ids, mask, position_ids)
    _assert_close(got[:, :9], want[:, :9], rel=1e-5)
    torch._dynamo.reset()
