"""Hugging Face generate paths on attn_implementation="fastattn" (+ patch_model), as the README
tells users to run them, against the same random weights under "eager" (and "sdpa"):
greedy / seeded sampling / beam search / no cache / static and sliding-window caches on
left-padded ragged batches, scores, bf16, explicit position_ids, output_attentions, and
torch.compile(fullgraph=True) of a patched model. Token ids must match exactly in fp32."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastattn

transformers = pytest.importorskip("transformers")
fa_hf = pytest.importorskip("fastattn.integrations.transformers")

from hf_tiny import GraphCapture, padded, rel_err, same_weight_models, tiny_config_kwargs  # noqa: E402

VOCAB = 100
PAD = 0


def _config(arch):
    base = tiny_config_kwargs(VOCAB, PAD, max_positions=128)
    if arch == "llama":
        return transformers.LlamaConfig(**base)
    if arch == "qwen2":
        return transformers.Qwen2Config(**base)
    if arch == "qwen3":
        return transformers.Qwen3Config(**base, head_dim=16)
    if arch == "mistral-window":  # window narrower than prompt + new tokens
        return transformers.MistralConfig(**base, sliding_window=5)
    if arch == "phi3":  # partial rotary is Phi-3's default off; fused qkv_proj
        return transformers.Phi3Config(**base)
    if arch == "gemma":
        return transformers.GemmaConfig(**base, head_dim=16)
    if arch == "gemma2":  # soft-capped scores (no SDPA for it: eager is the reference)
        return transformers.Gemma2Config(**base, head_dim=16, sliding_window=5, attn_logit_softcapping=1.0,
                                         final_logit_softcapping=2.0)
    if arch == "gemma3":  # sliding and full layers
        return transformers.Gemma3TextConfig(**base, head_dim=16, sliding_window=5)
    if arch == "mixtral":
        return transformers.MixtralConfig(**base, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2-moe":
        return transformers.Qwen2MoeConfig(**base, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32)
    raise AssertionError(arch)


ARCHS = ["llama", "qwen2", "qwen3", "mistral-window", "phi3", "gemma", "gemma2", "gemma3", "mixtral", "qwen2-moe"]
_MODELS = {}


def _models(arch, dtype=torch.float32):
    """{"eager": ..., "fastattn": ...} (+ "sdpa" where the model has it) on the same random
    weights; the fastattn one set up as the README says (register + patch_model)."""
    key = (arch, dtype)
    if key not in _MODELS:
        _MODELS[key] = same_weight_models(transformers, fa_hf, _config(arch), dtype,
                                          skip_sdpa=arch == "gemma2")  # (SDPA refuses its softcap)
    return _MODELS[key]


def _padded(lens, side="left", seed=1):
    return padded(lens, VOCAB, PAD, side, seed)


_rel_err = rel_err


BATCHES = {"b1": (7,), "b3": (9, 4, 6)}  # prompts up to 9 tokens, past the window of 5 once generating
GEN = dict(max_new_tokens=8, pad_token_id=PAD, eos_token_id=None)
MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "no-cache": dict(do_sample=False, use_cache=False),
    "static": dict(do_sample=False, cache_implementation="static"),
    "static-beam": dict(do_sample=False, num_beams=3, cache_implementation="static"),
}


def _generate(model, ids, mask, **kw):
    torch.manual_seed(1234)  # the same draws for seeded sampling
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (deprecation notes of transformers' own)
        return model.generate(ids, attention_mask=mask, **GEN, **kw)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_modes_match_eager(arch, batch):
    """Every decoding mode, on a left-padded ragged batch (and batch 1), token for token."""
    ms = _models(arch)
    ids, mask = _padded(BATCHES[batch])
    fa_hf.reset_stats()
    for mode, kw in MODES.items():
        ref = _generate(ms["eager"], ids, mask, **kw)
        out = _generate(ms["fastattn"], ids, mask, **kw)
        assert out.shape == ref.shape and torch.equal(out, ref), (mode, out, ref)
    st = fa_hf.stats()
    assert st["sdpa_fallback"] == 0 and st["fastattn"] > 0, st


@pytest.mark.parametrize("arch", ["llama", "mistral-window", "gemma2", "gemma3"])
def test_generate_scores_and_beam_scores_match_eager(arch):
    ms = _models(arch)
    ids, mask = _padded(BATCHES["b3"])
    for kw in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
        kw = dict(kw, return_dict_in_generate=True, output_scores=True, output_logits=True)
        ref, out = _generate(ms["eager"], ids, mask, **kw), _generate(ms["fastattn"], ids, mask, **kw)
        assert torch.equal(out.sequences, ref.sequences)
        assert _rel_err(torch.stack(out.logits), torch.stack(ref.logits)) <= 1e-4
        s_ref, s_out = torch.stack(ref.scores), torch.stack(out.scores)
        finite = torch.isfinite(s_ref)  # top-k / beam masking: -inf in the same places
        assert torch.equal(torch.isfinite(s_out), finite)
        assert _rel_err(s_out[finite], s_ref[finite]) <= 1e-4
        if "num_beams" in kw:
            assert _rel_err(out.sequences_scores, ref.sequences_scores) <= 1e-4


@pytest.mark.parametrize("arch", ["mistral-window", "gemma3"])
def test_sliding_window_cache_generate_matches_eager(arch):
    """cache_implementation="sliding_window": a cache that holds only the window, prompts past it."""
    ms = _models(arch)
    ids, mask = _padded((9, 4, 6))
    for kw in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
        kw = dict(kw, cache_implementation="sliding_window")
        assert torch.equal(_generate(ms["fastattn"], ids, mask, **kw), _generate(ms["eager"], ids, mask, **kw))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_forward_logits_match_eager_and_sdpa(arch, side):
    """model(...) on a padded batch, with and without explicit position_ids: real tokens' logits."""
    ms = _models(arch)
    ids, mask = _padded((9, 4, 6), side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for kw in (dict(), dict(position_ids=pos)):
            logits = {impl: m(ids, attention_mask=mask, **kw).logits[mask.bool()] for impl, m in ms.items()}
            for impl in logits:
                assert _rel_err(logits["fastattn"], logits[impl]) <= 1e-4, (impl, kw)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2-moe"])
def test_bf16_forward_and_generate_close_to_sdpa(arch):
    """bf16: fastattn within the eager-vs-SDPA spread of the SDPA logits (fp32 truth)."""
    ms, truth = _models(arch, torch.bfloat16), _models(arch)["eager"]
    ids, mask = _padded((9, 4, 6))
    real = mask.bool()
    with torch.no_grad():
        ref = truth(ids, attention_mask=mask).logits[real]
        err = {impl: (m(ids, attention_mask=mask).logits[real].float() - ref).abs().max().item()
               for impl, m in ms.items()}
    assert err["fastattn"] <= 2 * max(err["sdpa"], err["eager"]) + 1e-3, err
    out = _generate(ms["fastattn"], ids, mask, do_sample=False)
    assert out.dtype == torch.long and out.shape == (3, 9 + 8)


# ---- output_attentions: attention weights come from the model's eager attention ----
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
def test_output_attentions_falls_back_to_eager_weights(arch):
    """SDPA and flash_attention_2 return no weights (a logged warning); fastattn used to return
    none and say nothing. Now the calls that must produce weights run the eager attention."""
    ms = _models(arch)
    ids, mask = _padded((9, 4, 6))
    real = mask.bool()
    fa_hf.reset_stats()
    with torch.no_grad():
        ref = ms["eager"](ids, attention_mask=mask, output_attentions=True)
        out = ms["fastattn"](ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == len(ref.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions):
        # rows of real queries (B, S, H, Sk) (padded query rows see no key: no meaning)
        assert a.shape == b.shape and (a - b).transpose(1, 2)[real].abs().max().item() <= 1e-5
    assert _rel_err(out.logits[real], ref.logits[real]) <= 1e-4
    st = fa_hf.stats()
    assert st["fastattn"] == 0 and st["sdpa_fallback"] == 2 and len(st["reasons"]) == 1, st
    assert "output_attentions" in next(iter(st["reasons"]))
    # without output_attentions the same model runs on fastattn again
    fa_hf.reset_stats()
    with torch.no_grad():
        plain = ms["fastattn"](ids, attention_mask=mask)
    assert plain.attentions is None and fa_hf.stats()["sdpa_fallback"] == 0
    # generate: the weights of every step
    kw = dict(do_sample=False, return_dict_in_generate=True, output_attentions=True, max_new_tokens=3)
    g_ref = ms["eager"].generate(ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=None, **kw)
    g_out = ms["fastattn"].generate(ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=None, **kw)
    assert torch.equal(g_out.sequences, g_ref.sequences)
    assert len(g_out.attentions) == 3
    for step_out, step_ref in zip(g_out.attentions, g_ref.attentions):
        for a, b in zip(step_out, step_ref):
            diff = (a - b).transpose(1, 2)
            diff = diff[real] if a.shape[2] > 1 else diff
            assert a.shape == b.shape and diff.abs().max().item() <= 1e-5


def test_output_attentions_fallback_is_warned():
    ms = _models("llama")
    ids, _ = _padded((5,))
    fa_hf._WARNED_REASONS.discard(fa_hf._OUTPUT_ATTENTIONS_REASON)
    with pytest.warns(RuntimeWarning, match="eager attention.*output_attentions"), torch.no_grad():
        ms["fastattn"](ids, output_attentions=True)


# ---- torch.compile ----
def test_patched_model_compiles_fullgraph():
    """patch_model's rotary switch was a ContextVar, which dynamo cannot trace: two graph breaks
    per layer, and torch.compile(fullgraph=True) of a patched model failed."""
    import torch._dynamo

    torch._dynamo.reset()
    m = _models("llama")["fastattn"]
    ids, _ = _padded((9, 9))
    backend = GraphCapture()
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(ids).logits, m(ids).logits
    assert _rel_err(got, want) <= 1e-5
    targets = backend.targets()
    assert any("fastattn" in t and "rotary" in t for t in targets), targets  # rotary on fastattn when compiled
    assert any("fastattn" in t and "flash" in t for t in targets), targets
    torch._dynamo.reset()
    # an unpatched model in the same process keeps transformers' rotary under compile too
    plain = transformers.AutoModelForCausalLM.from_config(_config("llama"), attn_implementation="fastattn").eval()
    backend = GraphCapture()
    with torch.no_grad():
        torch.compile(plain, backend=backend, fullgraph=True)(ids)
    assert not any("rotary" in t for t in backend.targets())
    torch._dynamo.reset()


def test_compiled_static_cache_generate_matches_eager():
    """generate()'s own compilation of the decode steps (automatic with a static cache on GPUs;
    forced here on the CPU), fullgraph, on a patched model: the same tokens as eager."""
    import torch._dynamo
    from transformers import CompileConfig

    torch._dynamo.reset()
    ms = _models("llama")
    ids, mask = _padded((9, 4, 6))
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True  # (transformers compiles on accelerators only by default)
    kw = dict(do_sample=False, cache_implementation="static")
    ref = _generate(ms["eager"], ids, mask, **kw)
    fa_hf.reset_stats()
    mine = copy.deepcopy(ms["fastattn"])  # (generate keeps its compiled forward on the model)
    out = _generate(mine, ids, mask, compile_config=config, **kw)
    assert torch.equal(out, ref)
    # only the prefill ran outside the compiled graph (calls inside it are not counted)
    assert fa_hf.stats() == {"fastattn": 2, "sdpa_fallback": 0, "reasons": {}}, fa_hf.stats()
    torch._dynamo.reset()
