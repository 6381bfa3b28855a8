"""fastattn.models.Llama on the other Hugging Face decoder families it loads: sliding-window
attention per layer (Mistral, Qwen2/Qwen3 with use_sliding_window), Qwen3's q/k norms, Phi-3's
fused projections, partial rotary and LongRoPE. Each case builds a tiny random transformers
model, saves it (safetensors), loads it with ``Llama.from_pretrained`` and checks fp32 logits,
greedy generation of a right-padded ragged batch against transformers' generation of each
prompt alone (both backends, contiguous and paged caches) and a bf16 run.

The helpers are generic: a new family is one ``ARCHS`` entry (config class, model class,
config keywords)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastattn.models import Llama, LlamaConfig

from conftest import assert_error_ratio, randomize_norms, save_hf

transformers = pytest.importorskip("transformers")

BACKENDS = ["fastattn", "torch"]
CACHES = ["contiguous", "paged"]
VOCAB = 128
WINDOW = 5  # sliding window of the windowed cases: every prompt below is longer
NEW_TOKENS = 16

# Tiny sizes shared by every family: GQA (4 query heads over 2 kv heads), head_dim 16.
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)


# ---- generic helpers (one per step; a new family only adds an ARCHS entry) -----------------
def build_hf(config_cls, model_cls, seed: int = 0, **overrides):
    """A tiny random transformers model (eager attention, eval mode) with perturbed norms and
    biases, so a mis-mapped one cannot hide."""
    kw = dict(TINY)
    kw.update(overrides)
    cfg = config_cls(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_norms(model_cls(cfg)).eval()


def ids_of(B, S, seed=1):
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def check_logits(hf, path, ids, tol=1e-4):
    """fp32 logits of both backends within tol (relative to the largest logit) of transformers'."""
    with torch.no_grad():
        theirs = hf(ids).logits
        for backend in BACKENDS:
            model = Llama.from_pretrained(path, backend=backend)
            err = (model(ids) - theirs).abs().max().item() / theirs.abs().max().item()
            assert err <= tol, f"{backend}: relative logit error {err:.2e}"
    return model


def hf_greedy_rows(hf, ids, lengths, n=NEW_TOKENS):
    """transformers' greedy continuation of each prompt alone (no padding involved)."""
    return [hf.generate(ids[b : b + 1, :L], max_new_tokens=n, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0]
            for b, L in enumerate(lengths)]


def check_generate(hf, path, ids, lengths, n=NEW_TOKENS):
    """A right-padded ragged batch on both backends and both caches gives, row by row, the
    tokens transformers generates for that prompt alone."""
    theirs = hf_greedy_rows(hf, ids, lengths, n)
    for backend in BACKENDS:
        model = Llama.from_pretrained(path, backend=backend)
        for cache in CACHES:
            out = model.generate(ids, n, prompt_lengths=torch.tensor(lengths), cache=cache, page_size=4)
            for b, L in enumerate(lengths):
                assert torch.equal(out[b, : L + n], theirs[b]), (backend, cache, b)


def check_bf16(path, ids):
    """bf16 on both backends: finite, each within the error-ratio rule of the fp32 model, and
    a short generation runs."""
    truth = Llama.from_pretrained(path, backend="torch")
    fa = Llama.from_pretrained(path, backend="fastattn", dtype=torch.bfloat16)
    th = Llama.from_pretrained(path, backend="torch", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = truth(ids)
        ours, low = fa(ids).float(), th(ids).float()
    assert torch.isfinite(ours).all() and torch.isfinite(low).all()
    assert_error_ratio(ours, low, ref, "bf16 logits", atol=1e-2)
    assert fa.generate(ids, 4, cache="paged", page_size=4).shape == (ids.shape[0], ids.shape[1] + 4)


# ---- the families -------------------------------------------------------------------------
ARCHS = {
    # every layer slides
    "mistral_window": (transformers.MistralConfig, transformers.MistralForCausalLM,
                       dict(sliding_window=WINDOW)),
    # layer 0 full, layers 1-2 slide (max_window_layers), qkv bias
    "qwen2_window": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                     dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                          max_window_layers=1)),
    # q/k RMSNorm per head, head_dim (32) != hidden / heads, biases on q/k/v and o, layer 1 slides
    "qwen3_window": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                     dict(head_dim=32, attention_bias=True, use_sliding_window=True, sliding_window=WINDOW,
                          max_window_layers=1)),
    # fused qkv_proj / gate_up_proj, RoPE on half of each head, every layer slides
    "phi3_partial_rotary": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
                            dict(partial_rotary_factor=0.5, sliding_window=WINDOW, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2)),
}

LENGTHS = [13, 7, 10]  # ragged, every prompt longer than WINDOW


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    config_cls, model_cls, kw = ARCHS[request.param]
    hf = build_hf(config_cls, model_cls, **kw)
    return request.param, hf, save_hf(hf, tmp_path_factory.mktemp(request.param))


def test_logits_match_transformers(arch):
    _, hf, path = arch
    check_logits(hf, path, ids_of(2, 23))


def test_greedy_ragged_batch_matches_transformers(arch):
    _, hf, path = arch
    check_generate(hf, path, ids_of(len(LENGTHS), max(LENGTHS), seed=2), LENGTHS)


def test_bf16_runs_and_agrees(arch):
    _, _, path = arch
    check_bf16(path, ids_of(2, 19))


# ---- sliding window specifics ---------------------------------------------------------------
def test_layer_types_read_as_transformers_does(arch):
    _, hf, path = arch
    config = Llama.from_pretrained(path).config
    window = getattr(hf.config, "sliding_window", None)
    expected = getattr(hf.config, "layer_types", None)  # Mistral / Phi-3 carry none: all layers alike
    if expected is None:
        expected = ["full_attention" if window is None else "sliding_attention"] * hf.config.num_hidden_layers
    assert config.sliding_window == window
    assert config.layer_types == list(expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_matters_and_training_forward(backend, tmp_path):
    """The window changes the logits past it (so the parity tests see it), and the training
    forward's gradients agree between backends with it on."""
    config_cls, model_cls, kw = ARCHS["qwen2_window"]
    path = save_hf(build_hf(config_cls, model_cls, **kw), tmp_path)
    model = Llama.from_pretrained(path, backend=backend)
    ids = ids_of(2, 15)
    with torch.no_grad():
        windowed = model(ids)
        layer_types = model.config.layer_types
        model.config.layer_types = ["full_attention"] * model.config.num_hidden_layers
        full = model(ids)
        model.config.layer_types = layer_types
    assert torch.allclose(windowed[:, :WINDOW], full[:, :WINDOW], atol=1e-5)  # inside the window
    assert (windowed[:, WINDOW:] - full[:, WINDOW:]).abs().max() > 1e-3

    ref = Llama.from_pretrained(path, backend="torch")
    grads = []
    for m in (model, ref):
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        grads.append(m.layers[1].attention.wqkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_sliding_window_config_errors(tmp_path):
    config_cls, model_cls, kw = ARCHS["qwen2_window"]
    path = save_hf(build_hf(config_cls, model_cls, **kw), tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with pytest.raises(ValueError, match="layer_types entry 'chunked_attention'"):
        LlamaConfig.from_hf({**cfg, "model_type": "qwen2", "use_sliding_window": True,
                             "layer_types": ["chunked_attention"] * cfg["num_hidden_layers"]})
    with pytest.raises(ValueError, match="layer_types has 1 entries"):
        LlamaConfig.from_hf({**cfg, "model_type": "qwen2", "use_sliding_window": True,
                             "layer_types": ["sliding_attention"]})
    with pytest.raises(ValueError, match="sliding_window is None"):
        LlamaConfig.from_hf({**cfg, "model_type": "qwen2", "use_sliding_window": False,
                             "layer_types": ["sliding_attention"] * cfg["num_hidden_layers"]})
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        LlamaConfig.from_hf({**cfg, "model_type": "mistral", "sliding_window": 0})
    # qwen2 without use_sliding_window, and llama, never slide (as transformers reads them)
    off = LlamaConfig.from_hf({**cfg, "model_type": "qwen2", "use_sliding_window": False, "layer_types": None})
    assert off.sliding_window is None and set(off.layer_types) == {"full_attention"}
    llama = LlamaConfig.from_hf({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    assert llama.sliding_window is None and set(llama.layer_types) == {"full_attention"}


# ---- Qwen3 and Phi-3 specifics ---------------------------------------------------------------
def test_qwen3_qk_norm_and_phi3_partial_rotary_config(arch):
    name, hf, path = arch
    config = Llama.from_pretrained(path).config
    assert config.qk_norm == name.startswith("qwen3")
    if name.startswith("qwen3"):
        assert config.head_dim == 32 and config.attention_bias and config.o_proj_bias
    if name.startswith("phi3"):
        assert config.partial_rotary_factor == 0.5 and config.rotary_dim == config.head_dim // 2


def phi3_longrope(tmp_path, seed=3):
    """A Phi-3 with LongRoPE: 16 pretraining positions of 64, random short and long factors."""
    config_cls, model_cls, kw = ARCHS["phi3_partial_rotary"]
    half = TINY["hidden_size"] // TINY["num_attention_heads"] // 4  # rotary_dim / 2 at factor 0.5
    g = torch.Generator().manual_seed(seed)
    rope = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
            "short_factor": (1 + torch.rand(half, generator=g)).tolist(),
            "long_factor": (1 + 3 * torch.rand(half, generator=g)).tolist()}
    kw = {**kw, "max_position_embeddings": 64, "original_max_position_embeddings": 16, "rope_parameters": rope,
          "sliding_window": None}
    hf = build_hf(config_cls, model_cls, **kw)
    return hf, save_hf(hf, tmp_path)


def test_phi3_longrope_matches_transformers(tmp_path):
    """LongRoPE switches to its long factors for a whole pass once the pass reaches past
    original_max_position_embeddings (as transformers does), also midway through generation."""
    hf, path = phi3_longrope(tmp_path)
    ids = ids_of(2, 23)
    with torch.no_grad():  # the switch matters: a 12-token pass rotates by the short factors
        assert (hf(ids[:, :12]).logits - hf(ids).logits[:, :12]).abs().max() > 1e-3
        for S in (12, 23):
            check_logits(hf, path, ids[:, :S])
    # equal prompt lengths: the batch crosses the threshold at one step, as each row alone does
    check_generate(hf, path, ids_of(2, 10, seed=5), [10, 10])
    assert Llama.from_pretrained(path).config.longrope_switch == 16


def test_phi3_longrope_generate_recomputes_the_cache_at_the_switch(tmp_path):
    """A prompt shorter than original_max_position_embeddings that grows past it: transformers
    drops its cache at that step and recomputes it with the long factors (the cached keys were
    rotated with the short ones), and so does generate() (greedy / sampling, and beam search).
    Weights large enough that the two rotations pick different tokens (before the fix the
    tokens differed from the step after the switch on)."""
    hf, _ = phi3_longrope(tmp_path / "base")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 if p.dim() > 1 else 0.5 + torch.rand(p.shape, generator=g))
    path = save_hf(hf, tmp_path / "big")
    prompt = ids_of(1, 9, seed=5)
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    beams = hf.generate(prompt, max_new_tokens=20, do_sample=False, num_beams=3, num_return_sequences=2,
                        eos_token_id=None, pad_token_id=0)
    for backend in BACKENDS:
        model = Llama.from_pretrained(path, backend=backend)
        for cache in CACHES:
            assert torch.equal(model.generate(prompt, 20, cache=cache, page_size=4), theirs), (backend, cache)
            ours = model.generate(prompt, 20, num_beams=3, num_return_sequences=2, cache=cache, page_size=4)
            assert torch.equal(ours, beams), ("beams", backend, cache)
    # the ragged batch: the longest row crosses first, the whole batch switches with it
    check_generate(hf, path, ids_of(2, 12, seed=6), [12, 12])


def test_longrope_outside_phi3_keeps_its_cache(tmp_path):
    """transformers recomputes the cache at the LongRoPE switch for Phi-3 only: a Llama with
    rope_type "longrope" keeps its cache (keys rotated with the short factors), and so does
    generate() (it recomputed for every model type; greedy tokens then differed from the step
    after the switch on)."""
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 16,
            "short_factor": [1 + 0.1 * i for i in range(8)], "long_factor": [2 + 0.5 * i for i in range(8)]}
    hf = build_hf(HFLlamaConfig, LlamaForCausalLM, max_position_embeddings=64, rope_parameters=rope)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 if p.dim() > 1 else 0.5 + torch.rand(p.shape, generator=g))
    path = save_hf(hf, tmp_path)
    prompt = ids_of(2, 9, seed=5)
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    model = Llama.from_pretrained(path)
    assert model.config.longrope_switch == 16 and not model.config.longrope_recompute_cache
    assert torch.equal(model.generate(prompt, 20), theirs)
    model.config.longrope_recompute_cache = True  # Phi-3's rule: this case tells the two apart
    assert not torch.equal(model.generate(prompt, 20), theirs)


def test_longrope_prefill_of_right_padded_prompts_follows_their_real_lengths(tmp_path):
    """The factors of a prefill are picked by the longest real prompt, not by the padded width:
    pad columns past original_max_position_embeddings (16) switched the whole prefill to the
    long factors, so the same prompts gave other logits than unpadded."""
    hf, path = phi3_longrope(tmp_path)
    model = Llama.from_pretrained(path)
    assert model.config.longrope_recompute_cache
    ids, lengths = ids_of(2, 12, seed=7), torch.tensor([10, 12], dtype=torch.int32)
    padded = torch.cat([ids, torch.zeros(2, 8, dtype=ids.dtype)], 1)  # width 20 > 16
    model.setup_cache(2, 30)
    want = model.prefill(ids, lengths)
    model.setup_cache(2, 30)
    assert torch.equal(model.prefill(padded, lengths), want)
    assert torch.equal(model.generate(padded, 10, prompt_lengths=lengths)[:, :22],
                       model.generate(ids, 10, prompt_lengths=lengths))


def test_unsupported_rope_fields(tmp_path):
    hf, path = phi3_longrope(tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    rope = cfg["rope_parameters"]
    # transformers 4's name 'su' reads as longrope on Phi-3
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    su = LlamaConfig.from_hf({**old, "rope_scaling": {**rope, "rope_type": "su"}})
    assert su.longrope_switch == 16 and su.rope_scaling["rope_type"] == "longrope"
    with pytest.raises(ValueError, match="rope_scaling short_factor must be 4 positive numbers"):
        LlamaConfig.from_hf({**cfg, "rope_parameters": {**rope, "short_factor": [1.0] * 8}})
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic' is not supported"):
        LlamaConfig.from_hf({**cfg, "rope_parameters": {**rope, "rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="partial_rotary_factor"):  # rotary_dim int(16 * 0.1) = 1
        LlamaConfig.from_hf({**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                        "partial_rotary_factor": 0.1}})
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaConfig.from_hf({**cfg, "hidden_act": "gelu_new"})


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_torch_backend_windowed_decode_equals_reference(paged, softcap):
    """The torch backend's one-call windowed decode (CUDA-graph capturable) is
    reference.attention_with_kvcache with window=(w, 0) for one query per sequence."""
    from fastattn import reference
    from fastattn.models.llama import _windowed_decode_reference

    B, H, Hk, D, cap, page = 3, 4, 2, 16, 24, 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, H, D, generator=g)
    lengths = torch.tensor([1, 9, 24], dtype=torch.int32)
    if paged:
        pages = cap // page
        table = torch.randperm(B * pages, generator=g).view(B, pages).to(torch.int32) + 1
        k_cache = torch.randn(B * pages + 1, page, Hk, D, generator=g)
    else:
        table, k_cache = None, torch.randn(B, cap, Hk, D, generator=g)
    v_cache = torch.randn(k_cache.shape, generator=g)
    for window in (0, 3, 30):
        ours = _windowed_decode_reference(q, k_cache, v_cache, lengths, table, window, None, softcap)
        ref = reference.attention_with_kvcache(q, k_cache, v_cache, lengths, block_table=table, causal=True,
                                               window=(window, 0), softcap=softcap)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
