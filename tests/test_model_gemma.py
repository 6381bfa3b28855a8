"""fastattn.models.Llama on Gemma 1, 2 and 3 (the text decoder, Gemma3ForCausalLM).

Each case builds a tiny random transformers model (GQA, head_dim 256 as Gemma configures it,
sliding layers with a window shorter than the prompts), saves it as safetensors, loads it with
``Llama.from_pretrained`` and checks fp32 logits and greedy generation of a ragged batch
against transformers on both backends, a bf16 run, and the config reading / errors.

Gemma 2's attention soft-capping needs kernels with ``softcap=`` on the fastattn backend: on a
build without them that backend must refuse with NotImplementedError (checked instead)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastattn.models import Llama, LlamaConfig
from fastattn.models import llama as llama_mod

from conftest import assert_error_ratio

transformers = pytest.importorskip("transformers")

BACKENDS = ["fastattn", "torch"]
VOCAB = 128
WINDOW = 5  # every prompt below is longer
NEW_TOKENS = 16
LENGTHS = [13, 7, 10]  # the ragged batch

TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=256, max_position_embeddings=64, rms_norm_eps=1e-6, pad_token_id=0)

ARCHS = {
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(num_hidden_layers=2)),
    # sliding, full; caps small enough to bend these tiny models' scores and logits
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(num_hidden_layers=2, sliding_window=WINDOW, query_pre_attn_scalar=64,
                    attn_logit_softcapping=2.0, final_logit_softcapping=1.5)),
    # sliding, full, sliding; local RoPE base 100, global 1e4 with linear scaling
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(num_hidden_layers=3, sliding_window=WINDOW, sliding_window_pattern=2, query_pre_attn_scalar=64,
                    rope_theta=10000.0, rope_local_base_freq=100.0,
                    rope_scaling={"rope_type": "linear", "factor": 2.0}, final_logit_softcapping=4.0)),
}


def build_hf(name, seed=0, **overrides):
    config_cls, model_cls, kw = ARCHS[name]
    cfg = config_cls(**{**TINY, **kw, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:  # Gemma initialises its (1 + w) norm offsets to 0: make them matter
                p.normal_(0.0, 0.3)
            elif n.endswith(("q_proj.weight", "k_proj.weight")):  # scores large enough for a cap to bend
                p.mul_(8.0)
    return model


def ids_of(B, S, seed=1):
    return torch.randint(1, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def softcap_refused(name, backend) -> bool:
    """Gemma 2 on the fastattn backend of a build whose kernels lack softcap=."""
    return name == "gemma2" and backend == "fastattn" and not llama_mod._kernels_take_softcap()


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    hf = build_hf(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path, safe_serialization=True)
    return request.param, hf, path


_HF_GREEDY = {}


def hf_greedy(name, hf, ids):
    """transformers' greedy continuation of each prompt alone (no padding), once per family."""
    if name not in _HF_GREEDY:
        _HF_GREEDY[name] = [hf.generate(ids[b:b + 1, :L], max_new_tokens=NEW_TOKENS, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[0] for b, L in enumerate(LENGTHS)]
    return _HF_GREEDY[name]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(arch, backend):
    name, hf, path = arch
    ids = ids_of(2, 23)
    model = Llama.from_pretrained(path, backend=backend)
    with torch.no_grad():
        theirs = hf(ids).logits
        if softcap_refused(name, backend):
            with pytest.raises(NotImplementedError, match="attn_logit_softcapping.*softcap="):
                model(ids)
            return
        err = ((model(ids) - theirs).abs().max() / theirs.abs().max()).item()
    assert err <= 1e-4, f"{name}/{backend}: relative logit error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ragged_batch_matches_transformers(arch, backend):
    """Right-padded prompts of 13, 7 and 10 tokens (window 5), 16 new tokens each: row by row
    the tokens transformers generates for that prompt alone (contiguous cache; the paged one
    too on the fastattn backend)."""
    name, hf, path = arch
    ids = ids_of(len(LENGTHS), max(LENGTHS), seed=2)
    model = Llama.from_pretrained(path, backend=backend)
    if softcap_refused(name, backend):
        with pytest.raises(NotImplementedError, match="attn_logit_softcapping"):
            model.generate(ids, NEW_TOKENS, prompt_lengths=torch.tensor(LENGTHS))
        return
    theirs = hf_greedy(name, hf, ids)
    for cache in ("contiguous", "paged") if backend == "fastattn" else ("contiguous",):
        out = model.generate(ids, NEW_TOKENS, prompt_lengths=torch.tensor(LENGTHS), cache=cache, page_size=4)
        for b, L in enumerate(LENGTHS):
            assert torch.equal(out[b, :L + NEW_TOKENS], theirs[b]), (name, backend, cache, b)


def test_bf16_runs_and_agrees(arch):
    """bf16 on both backends: finite, within the error-ratio rule of the fp32 model, and a
    short generation runs."""
    name, _, path = arch
    ids = ids_of(2, 19)
    truth = Llama.from_pretrained(path, backend="torch")
    th = Llama.from_pretrained(path, backend="torch", dtype=torch.bfloat16)
    assert th.dtype == torch.bfloat16
    backend = "torch" if softcap_refused(name, "fastattn") else "fastattn"
    fa = Llama.from_pretrained(path, backend=backend, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = truth(ids)
        ours, low = fa(ids).float(), th(ids).float()
    assert torch.isfinite(ours).all() and torch.isfinite(low).all()
    assert_error_ratio(ours, low, ref, f"{name} bf16 logits", atol=1e-2)
    assert fa.generate(ids, 4, cache="paged", page_size=4).shape == (2, 19 + 4)


def test_config_read_as_transformers_does(arch):
    name, hf, path = arch
    c = Llama.from_pretrained(path).config
    h = hf.config
    assert c.head_dim == 256 and c.norm_unit_offset and c.hidden_act == "gelu_pytorch_tanh"
    assert c.embedding_multiplier == 64 ** 0.5 and c.tie_word_embeddings
    if name == "gemma":
        assert c.sliding_window is None and set(c.layer_types) == {"full_attention"}
        assert not c.sandwich_norms and c.query_pre_attn_scalar is None and c.final_logit_softcapping is None
        return
    assert c.sandwich_norms and c.query_pre_attn_scalar == 64 and c.sliding_window == WINDOW
    assert c.layer_types == list(h.layer_types) == ["sliding_attention", "full_attention", "sliding_attention"][
        :h.num_hidden_layers]
    if name == "gemma2":
        assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (2.0, 1.5)
    else:
        assert c.qk_norm and c.attn_logit_softcapping is None and c.final_logit_softcapping == 4.0
        assert (c.rope_theta, c.rope_local_theta) == (10000.0, 100.0)
        assert c.rope_scaling["rope_type"] == "linear" and c.rope_scaling["factor"] == 2.0


def test_features_matter(arch):
    """Each Gemma feature changes the logits (so the parity tests above see it)."""
    name, _, path = arch
    ids = ids_of(2, 15)
    model = Llama.from_pretrained(path, backend="torch")
    c = model.config
    with torch.no_grad():
        base = model(ids)
        knobs = {"embedding_multiplier": None}
        if name != "gemma":
            knobs.update(layer_types=["full_attention"] * c.num_hidden_layers, final_logit_softcapping=None)
        if name == "gemma2":
            knobs["attn_logit_softcapping"] = None
        for field, off in knobs.items():
            on = getattr(c, field)
            setattr(c, field, off)
            if field == "attn_logit_softcapping":
                for layer in model.layers:
                    layer.attention.softcap = 0.0
            changed = (model(ids) - base).abs().max().item()
            setattr(c, field, on)
            if field == "attn_logit_softcapping":
                for layer in model.layers:
                    layer.attention.softcap = on
            assert changed > 1e-3, f"{name}: {field} makes no difference"
        if name == "gemma3":  # the sliding layers' own RoPE base
            model._rope.clear()
            c.rope_local_theta = c.rope_theta
            changed = (model(ids) - base).abs().max().item()
            c.rope_local_theta = 100.0
            model._rope.clear()
            assert changed > 1e-3
        torch.testing.assert_close(model(ids), base, rtol=0, atol=0)


def test_training_gradients_agree_between_backends(arch):
    """Gemma 2 (soft-capped scores through the flash backward) and Gemma 3 (q/k and sandwich
    norms, windows, local RoPE): the training forward's gradients agree between backends."""
    name, _, path = arch
    if name == "gemma":
        pytest.skip("Gemma 2 and 3 cover every Gemma 1 op")
    if softcap_refused(name, "fastattn"):
        pytest.skip("this build's kernels have no softcap=")
    ids = ids_of(2, 12)
    grads = []
    for backend in BACKENDS:
        m = Llama.from_pretrained(path, backend=backend)
        loss = torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        qk = m.layers[0].attention.q_norm.weight.grad if name == "gemma3" else m.layers[0].attention_norm.weight.grad
        grads.append([qk, m.layers[1].post_ffn_norm.weight.grad, m.layers[0].attention.wqkv.weight.grad])
    for a, b in zip(*grads):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---- config reading and errors ---------------------------------------------------------------
def _config_json(arch):
    with open(os.path.join(arch[2], "config.json")) as f:
        return json.load(f)


def test_legacy_config_layouts():
    """transformers 4.x config.json layouts: Gemma 2 without layer_types alternates (sliding
    first); Gemma 3 with rope_theta / rope_scaling / rope_local_base_freq / sliding_window_pattern."""
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=8)
    g2 = LlamaConfig.from_hf({**base, "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]})
    assert g2.layer_types == ["sliding_attention", "full_attention"] * 3
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.query_pre_attn_scalar) == (50.0, 30.0, 256)
    g3 = LlamaConfig.from_hf({**base, "model_type": "gemma3_text", "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                              "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window_pattern": 3})
    hf3 = transformers.Gemma3TextConfig(**base, rope_theta=1e6, rope_local_base_freq=1e4,
                                        rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=3)
    assert g3.layer_types == list(hf3.layer_types)
    assert g3.rope_theta == hf3.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert g3.rope_local_theta == hf3.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert g3.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    # Gemma 1's legacy hidden_act "gelu" is the tanh GELU, as transformers reads it
    g1 = LlamaConfig.from_hf({**base, "model_type": "gemma", "hidden_act": "gelu"})
    assert g1.hidden_act == "gelu_pytorch_tanh" and g1.sliding_window is None


def test_yarn_pretraining_length_defaults_to_the_gemma_context(arch):
    # A yarn config without lengths: the pretraining length is the model's own default context
    # (8192 for Gemma 1/2, 131072 for Gemma 3), as max_position_embeddings; it was LlamaConfig's 2048.
    name, _, _ = arch
    cfg = {k: v for k, v in _config_json(arch).items() if k not in ("max_position_embeddings",
                                                                    "original_max_position_embeddings")}
    cfg.update(rope_parameters=None, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    c = LlamaConfig.from_hf(cfg)
    want = 131072 if name == "gemma3" else 8192
    assert c.max_position_embeddings == want
    assert c.rope_scaling["original_max_position_embeddings"] == want


def test_unsupported_gemma_fields(arch):
    name, _, _ = arch
    cfg = _config_json(arch)
    act_field = "hidden_act" if name == "gemma" else "hidden_activation"
    with pytest.raises(ValueError, match=f"unsupported {act_field} 'relu'"):
        LlamaConfig.from_hf({**cfg, act_field: "relu"})
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        LlamaConfig.from_hf({**cfg, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        LlamaConfig.from_hf({**cfg, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic'"):
        LlamaConfig.from_hf({**cfg, "rope_parameters": None, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="gemma3_text"):  # the multimodal checkpoint
        LlamaConfig.from_hf({**cfg, "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]})
    if name == "gemma3":
        params = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                  "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}
        with pytest.raises(ValueError, match=r"rope_parameters\['sliding_attention'\] rope_type 'linear'"):
            LlamaConfig.from_hf({**cfg, "rope_parameters": params})
    if name != "gemma":
        with pytest.raises(ValueError, match="sliding_window is None"):
            LlamaConfig.from_hf({**cfg, "sliding_window": None})


def test_unit_offset_norm_init():
    """A randomly initialised Gemma-style model starts from identity norm scales (zeros)."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, head_dim=16, norm_unit_offset=True, sandwich_norms=True, qk_norm=True)
    model = Llama(cfg, backend="torch")
    norms = [m for m in model.modules() if isinstance(m, llama_mod.RMSNormWeight)]
    assert len(norms) == 1 + 4 + 2 and all(m.unit_offset and not m.weight.any() for m in norms)
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                    num_attention_heads=2, hidden_act="gelu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding_scale_rounds_as_transformers(dtype):
    """sqrt(48) is not representable: transformers multiplies by its fp32 value cast to the
    weights' dtype (6.9375 in bf16), and so does the model."""
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, head_dim=16, embedding_multiplier=48 ** 0.5)
    model = Llama(cfg, backend="torch").to(dtype)
    theirs = GemmaTextScaledWordEmbedding(VOCAB, 48, 0, embed_scale=48 ** 0.5).to(dtype)
    with torch.no_grad():
        theirs.weight.copy_(model.tok_embeddings.weight)
    ids = ids_of(2, 9)
    mine = model.tok_embeddings(ids) * model._embedding_scale(dtype)
    assert torch.equal(mine, theirs(ids))


def test_softcap_without_kernel_support_is_a_clear_error(arch, monkeypatch):
    """On a build whose kernels lack softcap=, Gemma 2 on the fastattn backend refuses with an
    error naming the field (never silently uncapped); the torch backend still runs."""
    name, _, path = arch
    if name != "gemma2":
        pytest.skip("only Gemma 2 soft-caps attention scores")
    monkeypatch.setattr(llama_mod, "_kernels_take_softcap", lambda: False)
    ids = ids_of(1, 8)
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="attn_logit_softcapping.*backend='torch'"):
            Llama.from_pretrained(path, backend="fastattn")(ids)
        assert torch.isfinite(Llama.from_pretrained(path, backend="torch")(ids)).all()
