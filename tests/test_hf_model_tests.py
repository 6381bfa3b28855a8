"""attn_implementation="fastattn" (register + patch_model) under the patterns of transformers' own
model tests (tests/test_modeling_common.py, tests/generation/test_utils.py), on tiny random
configs (2 layers, hidden 64) against "eager" / "sdpa" with the same weights, at those tests'
tolerances:

* test_eager_matches_sdpa_inference: batch 7, the last row padded by 2 (left / right) or no
  mask, sliding_window=2 where the config has one, fp32 / bf16, the last hidden state of real
  tokens; the output_attentions variant.
* flash_attn_inference_equivalence: one row, one padded position, bf16, atol 4e-2; then a
  training-mode forward.
* attention_mask_padding_matches_padding_free_with_position_ids (+ fa_kwargs): a padded batch
  against the same sequences flattened into one row (DataCollatorWithFlattening), with
  position_ids, flash kwargs (cu_seq_lens_q / max_length_q ...) or both; also as a training step
  would run it (no use_cache=False: the model builds a DynamicCache).
* training: loss and every gradient vs eager / SDPA, with gradient checkpointing (reentrant and
  not); test_retain_grad_hidden_states_attentions.
* generation: test_generate_continue_from_past_key_values, assisted decoding and prompt lookup vs
  greedy, test_generate_from_inputs_embeds (dynamic and static cache), beam search with
  num_return_sequences and sequences_scores, DynamicCache.crop, continuous batching
  (generate_batch) refusing the implementation clearly.

Regressions: flash_attention_2 honours padding-free packing (the cu_seq_lens_* kwargs, and packed
position_ids without a mask even when a cache exists); fastattn ignored both and attended across
the packed sequences (as transformers' SDPA does there), silently.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
fa_hf = pytest.importorskip("fastattn.integrations.transformers")

from hf_tiny import padded, rel_err, same_weight_models, tiny_config_kwargs  # noqa: E402

VOCAB = 99
PAD = 0


def _config(arch):
    base = tiny_config_kwargs(VOCAB, PAD, max_positions=256)
    # sliding_window=2 as test_eager_matches_sdpa_inference sets it on configs that have one
    if arch == "llama":
        return transformers.LlamaConfig(**base)
    if arch == "mistral":
        return transformers.MistralConfig(**base, sliding_window=2)
    if arch == "qwen2":  # a sliding and a full layer
        return transformers.Qwen2Config(**base, use_sliding_window=True, sliding_window=2, max_window_layers=1)
    if arch == "gemma2":  # soft-capping: no SDPA, eager is the reference
        return transformers.Gemma2Config(**base, head_dim=16, sliding_window=2, attn_logit_softcapping=50.0,
                                         final_logit_softcapping=30.0)
    if arch == "phi3":
        return transformers.Phi3Config(**base, sliding_window=2)
    if arch == "qwen3moe":
        return transformers.Qwen3MoeConfig(**base, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32)
    raise AssertionError(arch)


_MODELS = {}


def _models(arch, dtype=torch.float32):
    """{"eager", "sdpa" (where the model has it), "fastattn" (+ patch_model)} on the same weights."""
    key = (arch, dtype)
    if key not in _MODELS:
        _MODELS[key] = same_weight_models(transformers, fa_hf, _config(arch), dtype,
                                          skip_sdpa=arch == "gemma2")  # (SDPA refuses its softcap)
    return _MODELS[key]


def _padded(lens, side="left", seed=1):
    return padded(lens, VOCAB, PAD, side, seed)


_rel_err = rel_err


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback notes, transformers' deprecations
        yield


# ---- test_eager_matches_sdpa_inference -----------------------------------------------------
_TOL = {torch.float32: (1e-6, 1e-4), torch.bfloat16: (1e-2, 1e-2)}  # (atol, rtol) on CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2", "phi3", "qwen3moe"])
def test_eager_matches_sdpa_inference(arch, dtype):
    ms = _models(arch, dtype)
    ref_impl = "sdpa" if "sdpa" in ms else "eager"
    ids = torch.randint(3, VOCAB, (7, 7), generator=torch.Generator().manual_seed(3))
    cases = [(side, use_mask, False) for side in ("left", "right") for use_mask in (True, False)]
    if dtype == torch.float32:
        cases.append(("left", True, True))  # output_attentions: fastattn runs eager's attention there
    for side, use_mask, output_attentions in cases:
        mask = None
        if use_mask:
            mask = torch.ones(7, 7, dtype=torch.long)
            if side == "left":
                mask[-1, :2] = 0
            else:
                mask[-1, -2:] = 0
        fa_hf.reset_stats()
        with torch.no_grad():
            out = {impl: m(ids, attention_mask=mask, output_hidden_states=True,
                           output_attentions=output_attentions).hidden_states[-1] for impl, m in ms.items()}
        st = fa_hf.stats()
        if output_attentions:
            assert st["fastattn"] == 0 and st["sdpa_fallback"] == 2, st
        else:
            assert st == {"fastattn": 2, "sdpa_fallback": 0, "reasons": {}}, st

        def real(x):  # as the transformers test: padded tokens of the last row are not compared
            if not use_mask:
                return x.float()
            y = torch.zeros_like(x, dtype=torch.float32)
            y[:-1] = x[:-1]
            y[-1:, 2:] = x[-1:, 2:] if side == "left" else x[-1:, :-2]
            return y

        mine, theirs = real(out["fastattn"]), real(out[ref_impl])
        atol, rtol = _TOL[dtype]
        if dtype == torch.bfloat16:
            atol = max(atol, 3e-2 * max(mine.abs().max().item(), theirs.abs().max().item()))
        ok = [torch.allclose(a, b, atol=atol, rtol=rtol) for a, b in zip(mine, theirs)]
        # transformers accepts 80% of the rows; every row must match here
        assert np.mean(ok) == 1.0, (side, use_mask, output_attentions, ok, (mine - theirs).abs().max().item())


# ---- flash_attn_inference_equivalence (+ its training-mode forward) -------------------------
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_flash_attn_inference_equivalence(arch, side):
    ms = _models(arch, torch.bfloat16)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if side == "left":
        mask[:, 0] = 0
    else:
        mask[:, -1] = 0
    with torch.no_grad():
        for kw in (dict(), dict(attention_mask=mask)):
            ref = ms["eager"](ids, output_hidden_states=True, **kw).hidden_states[-1]
            out = ms["fastattn"](ids, output_hidden_states=True, **kw).hidden_states[-1]
            if kw:
                keep = mask[0].bool()
                ref, out = ref[:, keep], out[:, keep]
            torch.testing.assert_close(out.float(), ref.float(), atol=4e-2, rtol=4e-2)
    m = ms["fastattn"]
    m.train()
    try:
        out = m(ids, attention_mask=mask)
    finally:
        m.eval()
    assert torch.isfinite(out.logits).all()


# ---- padding-free (packed) batches: DataCollatorWithFlattening ------------------------------
_LENS = (5, 9, 3, 7)


def _flattened(**collator_kw):
    """The padded (right) batch of _LENS and the same sequences flattened into one row."""
    from transformers import DataCollatorWithFlattening

    ids, mask = _padded(_LENS, side="right", seed=4)
    feats = [{"input_ids": ids[b, :n].tolist()} for b, n in enumerate(_LENS)]
    batch = DataCollatorWithFlattening(return_tensors="pt", **collator_kw)(feats)
    batch.pop("labels")
    return ids, mask, batch


_FLAT_MODES = {
    "position_ids": dict(return_position_ids=True),
    "position_ids+fa_kwargs": dict(return_position_ids=True, return_flash_attn_kwargs=True),
    "fa_kwargs": dict(return_position_ids=False, return_flash_attn_kwargs=True),
}


@pytest.mark.parametrize("mode", list(_FLAT_MODES))
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2", "qwen3moe"])
def test_padding_matches_padding_free(arch, mode):
    """attention_mask_padding_matches_padding_free_with_position_ids (fa_kwargs=False / True), and
    the flash kwargs alone (RoPE is relative: no position_ids changes nothing within a sequence)."""
    ms = _models(arch)
    ids, mask, batch = _flattened(**_FLAT_MODES[mode])
    fa_hf.reset_stats()
    with torch.no_grad():
        padded = ms["fastattn"](ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
        free = ms["fastattn"](**batch, use_cache=False).logits[0]
    assert _rel_err(free, padded) <= 1e-4
    assert fa_hf.stats()["sdpa_fallback"] == 0


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_padding_matches_padding_free_bf16(arch):
    ms = _models(arch, torch.bfloat16)
    ids, mask, batch = _flattened(**_FLAT_MODES["position_ids+fa_kwargs"])
    with torch.no_grad():
        padded = ms["fastattn"](ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
        free = ms["fastattn"](**batch, use_cache=False).logits[0]
    tol = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(free.float(), padded.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("how", ["train-default-cache", "eval-default-cache", "fa_kwargs-only"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_packed_sequences_are_never_attended_across(arch, how):
    """Regression. A flattened batch as a Trainer step runs it (model.train(), no use_cache=False:
    the model builds a DynamicCache, so transformers builds a plain causal mask and does not look
    at the position_ids), in eval mode the same way, or with DataCollatorWithFlattening's flash
    kwargs and no position_ids: flash_attention_2 keeps the sequences apart (cu_seq_lens_* /
    position_ids); fastattn attended across them, silently (loss off by ~0.5 here)."""
    ms = _models(arch)
    mode = "fa_kwargs" if how == "fa_kwargs-only" else "position_ids+fa_kwargs"
    ids, mask, batch = _flattened(**_FLAT_MODES[mode])
    if how == "train-default-cache":
        batch.pop("cu_seq_lens_q"), batch.pop("cu_seq_lens_k"), batch.pop("max_length_q"), batch.pop("max_length_k")
    kw = {} if how != "fa_kwargs-only" else dict(use_cache=False)
    m = ms["fastattn"]
    with torch.no_grad():
        alone = torch.cat([m(ids[b:b + 1, :n]).logits[0] for b, n in enumerate(_LENS)])
    fa_hf.reset_stats()
    m.train(how.startswith("train"))
    try:
        out = m(**batch, **kw)
    finally:
        m.eval()
    assert _rel_err(out.logits[0].detach(), alone) <= 1e-4
    assert fa_hf.stats() == {"fastattn": 2, "sdpa_fallback": 0, "reasons": {}}, fa_hf.stats()
    # the reference attention here does attend across: the case is a real one
    with torch.no_grad():
        theirs = ms["eager"](**batch, **kw).logits[0]
    assert _rel_err(theirs, alone) > 1e-2


def test_packed_sequences_backward_matches_separate_sequences():
    """Gradients of a packed training step (default cache, flash kwargs) = those of the sequences
    each in its own row of a padded batch (labels -100 on the padding; same mean over tokens)."""
    ms = _models("llama")
    m = ms["fastattn"]
    ids, mask, batch = _flattened(**_FLAT_MODES["position_ids+fa_kwargs"])
    labels_free = batch["input_ids"].clone()
    starts = torch.tensor([0, *np.cumsum(_LENS)[:-1].tolist()])
    labels_free[0, starts] = -100  # (a sequence's first token is predicted from the previous one)
    labels_pad = ids.masked_fill(mask == 0, -100)
    grads = []
    for kw in (dict(**batch, labels=labels_free), dict(input_ids=ids, attention_mask=mask, labels=labels_pad)):
        m.zero_grad(set_to_none=True)
        m.train()
        try:
            m(**kw).loss.backward()
        finally:
            m.eval()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert _rel_err(grads[0][name], grads[1][name]) <= 1e-4, name


def test_inconsistent_flash_kwargs_raise():
    ms = _models("llama")
    _, _, batch = _flattened(**_FLAT_MODES["fa_kwargs"])
    total = batch["input_ids"].shape[1]
    with torch.no_grad():
        bad = dict(batch, cu_seq_lens_q=torch.tensor([0, 4, total - 1], dtype=torch.int32))
        bad["cu_seq_lens_k"] = bad["cu_seq_lens_q"]
        with pytest.raises(ValueError, match="cu_seq_lens"):
            ms["fastattn"](**bad, use_cache=False)
        bad = dict(batch, cu_seq_lens_k=torch.tensor([0, 4, total], dtype=torch.int32))
        with pytest.raises(ValueError, match="cu_seq_lens_k differs"):
            ms["fastattn"](**bad, use_cache=False)
    # inference-mode tensors have no version counter (the per-tensor cache is skipped): still
    # checked (the check used to be skipped with the cache)
    with torch.inference_mode():
        bad = dict(batch, cu_seq_lens_q=torch.tensor([0, 4, total + 5], dtype=torch.int32))
        bad["cu_seq_lens_k"] = bad["cu_seq_lens_q"]
        with pytest.raises(ValueError, match="cu_seq_lens"):
            ms["fastattn"](**bad, use_cache=False)


# ---- training: backward equivalence, gradient checkpointing ---------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
def test_training_gradients_match_with_gradient_checkpointing(arch):
    ms = _models(arch)
    for side in ("right", "left", None):
        if side is None:
            ids, _ = _padded((9, 9, 9))
            mask, labels = None, ids
        else:
            ids, mask = _padded((9, 4, 6), side)
            labels = ids.masked_fill(mask == 0, -100)
        # left padding: the last padded position predicts the first real token, and eager's
        # attention of a row that sees no key (a uniform average) differs from SDPA's (zeros),
        # which fastattn gives: the reference is SDPA there
        ref_impl = "sdpa" if side == "left" else "eager"
        for gc in (None, True, False):
            res = {}
            for impl in (ref_impl, "fastattn"):
                m = ms[impl]
                m.zero_grad(set_to_none=True)
                m.train()
                if gc is not None:
                    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": gc})
                try:
                    loss = m(ids, attention_mask=mask, labels=labels).loss
                    loss.backward()
                finally:
                    if gc is not None:
                        m.gradient_checkpointing_disable()
                    m.eval()
                res[impl] = loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
            (l_ref, g_ref), (l_fa, g_fa) = res[ref_impl], res["fastattn"]
            assert abs(l_fa.item() - l_ref.item()) <= 1e-5, (side, gc)
            assert g_ref.keys() == g_fa.keys() and g_ref
            for name in g_ref:
                assert _rel_err(g_fa[name], g_ref[name]) <= 1e-4, (side, gc, name)


def test_attention_outputs_requested_by_the_config():
    """Regression (test_attention_outputs, "check that output_attentions also work using config"):
    a model built from a config with output_attentions=True gets no output_attentions kwarg in its
    attention calls, only transformers' output collector asks for the weights; fastattn ran its
    kernels and outputs.attentions came back an empty tuple, silently. Now those calls run the
    eager attention, as with the kwarg."""
    fa_hf.register()
    ms = _models("llama")
    ids, mask = _padded((9, 4, 6))
    real = mask.bool()
    cfg = copy.deepcopy(ms["eager"].config)
    cfg.output_attentions = True  # (set before the implementation: transformers refuses it after)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="fastattn").eval()
    m.load_state_dict(ms["eager"].state_dict())
    fa_hf.reset_stats()
    with torch.no_grad():
        out = m(ids, attention_mask=mask)
        ref = ms["eager"](ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == len(ref.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions):
        assert a.shape == b.shape and (a - b).transpose(1, 2)[real].abs().max().item() <= 1e-5
    st = fa_hf.stats()
    assert st["fastattn"] == 0 and st["sdpa_fallback"] == 2, st
    # no collector asking: the kernels again
    fa_hf.reset_stats()
    with torch.no_grad():
        ms["fastattn"](ids, attention_mask=mask)
    assert fa_hf.stats()["fastattn"] == 2


def test_retain_grad_hidden_states_attentions():
    m = _models("llama")["fastattn"]
    ids, mask = _padded((9, 4, 6))
    m.train()
    try:
        out = m(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        hidden, attn = out.hidden_states[0], out.attentions[0]
        hidden.retain_grad()
        attn.retain_grad()
        out.logits.flatten()[0].backward(retain_graph=True)
    finally:
        m.eval()
    assert hidden.grad is not None and attn.grad is not None
    assert attn.grad.abs().sum() > 0


# ---- generation -----------------------------------------------------------------------------
GEN = dict(pad_token_id=PAD, eos_token_id=None, do_sample=False)


def _gen(model, *args, **kw):
    return model.generate(*args, **GEN, **kw)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_generate_paths_match_eager(arch):
    ms = _models(arch)
    E, F = ms["eager"], ms["fastattn"]
    ids, mask = _padded((9, 4, 6))
    fa_hf.reset_stats()

    # test_generate_continue_from_past_key_values
    def continued(m):
        first = _gen(m, ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True)
        mask2 = torch.cat([mask, torch.ones(3, 3, dtype=mask.dtype)], 1)
        return _gen(m, first.sequences, attention_mask=mask2, past_key_values=first.past_key_values,
                    max_new_tokens=4)

    once = _gen(F, ids, attention_mask=mask, max_new_tokens=7)
    assert torch.equal(continued(F), continued(E)) and torch.equal(continued(F), once)
    assert torch.equal(once, _gen(E, ids, attention_mask=mask, max_new_tokens=7))

    # assisted decoding / prompt lookup match greedy search (batch 1, as transformers tests them)
    i1, m1 = ids[:1], mask[:1]
    greedy = _gen(E, i1, attention_mask=m1, max_new_tokens=8)
    assert torch.equal(_gen(F, i1, attention_mask=m1, max_new_tokens=8, assistant_model=F), greedy)
    assert torch.equal(_gen(F, i1, attention_mask=m1, max_new_tokens=8, assistant_model=E), greedy)
    assert torch.equal(_gen(F, i1, attention_mask=m1, max_new_tokens=8, prompt_lookup_num_tokens=2), greedy)

    # test_generate_from_inputs_embeds (+ with a static cache)
    ref = _gen(E, inputs_embeds=E.get_input_embeddings()(ids), attention_mask=mask, max_new_tokens=5)
    emb = F.get_input_embeddings()(ids)
    assert torch.equal(_gen(F, inputs_embeds=emb, attention_mask=mask, max_new_tokens=5), ref)
    assert torch.equal(_gen(F, inputs_embeds=emb, attention_mask=mask, max_new_tokens=5,
                            cache_implementation="static"), ref)

    # beam search, num_return_sequences, scores
    kw = dict(num_beams=3, num_return_sequences=3, max_new_tokens=5, return_dict_in_generate=True,
              output_scores=True, output_logits=True)
    a, b = _gen(F, ids, attention_mask=mask, **kw), _gen(E, ids, attention_mask=mask, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert _rel_err(a.sequences_scores, b.sequences_scores) <= 1e-4
    assert _rel_err(torch.stack(a.logits), torch.stack(b.logits)) <= 1e-4
    st = fa_hf.stats()
    assert st["sdpa_fallback"] == 0 and st["fastattn"] > 0, st


@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
def test_dynamic_cache_crop_then_recompute(arch):
    """What assisted decoding does to the cache: crop it, then run the dropped tokens again."""
    from transformers import DynamicCache

    ms = _models(arch)
    ids, mask = _padded((9, 4, 6))
    real = mask[:, 6:].bool()
    out = {}
    with torch.no_grad():
        for impl in ("eager", "fastattn"):
            m = ms[impl]
            cache = DynamicCache(config=m.config)
            full = m(ids, attention_mask=mask, past_key_values=cache).logits[:, 6:]
            cache.crop(-3)
            again = m(ids[:, 6:], attention_mask=mask, past_key_values=cache).logits
            assert _rel_err(again[real], full[real]) <= 1e-4, impl
            out[impl] = again[real]
    assert _rel_err(out["fastattn"], out["eager"]) <= 1e-4


def test_continuous_batching_refuses_fastattn_clearly():
    """generate_batch (continuous batching, a paged cache transformers builds no mask for) accepts
    only paged|eager, sdpa and flash implementations: fastattn must be refused, not run maskless."""
    from transformers import GenerationConfig

    m = _models("llama")["fastattn"]
    with pytest.raises(ValueError, match="not supported for continuous batching"):
        m.generate_batch([[5, 6, 7, 8], [9, 10, 11]],
                         generation_config=GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=None,
                                                            pad_token_id=PAD))
