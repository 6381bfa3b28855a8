"""Sweep of the Hugging Face integration over transformers' text causal-LM architectures, as a
user runs it (README): ``register()``, ``attn_implementation="fastattn"``, ``patch_model``.

Each arch is built tiny from its config class (2 layers, hidden 64, vocab 100, 4 heads / 2 kv
heads where the arch allows, 4 experts for MoE; random fp32 weights, CPU) and compared with the
same weights under ``attn_implementation="eager"``: logits of a plain batch and of a
left-padded ragged batch (real tokens; padded query rows are 0 on fastattn, as
flash_attention_2), max abs diff <= 1e-4 of the logit scale, and 6 greedy new tokens identical.

Most archs are picked because their RMSNorm is a copy of LlamaRMSNorm (patch_model swaps those)
and/or their modeling file has ``apply_rotary_pos_emb`` (patch_model runs LLaMA's rotate-half
variants on fastattn.apply_rotary and leaves the other rotations alone). ``EXPECT`` records
what patch_model is expected to do to each (its report), so a change in what it swaps names
the arch. Not here (tried; 2025 transformers 5.25): hybrid/linear-attention archs that need
model-specific layer layouts beyond those below, composite (vision/audio) configs whose default
towers are large (Gemma 3 / Mllama / Emu3 / Phi-4-MM / dots3), Falcon-H1 and Nemotron-H (tens of
seconds on CPU: the torch Mamba path).

Archs whose own code reads the attention mask as 4-D (the sparse-attention indexers of
DeepSeek-V3.2 / GLM-MoE-DSA / HY-V4 / A.X-K2, Doge's dynamic mask, ALiBi Falcon adding its bias
onto the mask) get transformers' SDPA mask from fastattn's mask function and run on the SDPA (or
eager) fallback; the indexers' key selection (``indices``, top 4 of up to 15 keys here, so it
changes the logits) is applied there as eager / SDPA apply it.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastattn

transformers = pytest.importorskip("transformers")
fa_hf = pytest.importorskip("fastattn.integrations.transformers")

VOCAB = 100
PAD = 0

# Applied where the arch's config class defines the attribute (MoE sizes on MoE archs only, ...).
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, head_dim=16, pad_token_id=PAD, bos_token_id=1,
            eos_token_id=2,
            # MoE
            num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
            moe_k=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, ffn_hidden_size=96,
            # multi-head latent attention (DeepSeek-V2/V3 family)
            kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)

MLA = dict(num_key_value_heads=4)  # latent attention: as many kv heads as heads
MLA_ROPE8 = dict(num_key_value_heads=4, head_dim=8)  # their config's head_dim is the rope dim
IDX = dict(index_topk=4, index_head_dim=16, index_n_heads=2)  # sparse attention: 4 keys per query
MAMBA = dict(mamba_d_state=4, mamba_n_heads=4, mamba_d_head=16, mamba_expand=1)

# arch (test id) -> (config model_type, config kwargs on top of BASE)
ARCHS = {
    "afmoe": ("afmoe", {}),
    "apertus": ("apertus", {}),
    "apertus1p5_text": ("apertus1p5_text", {}),
    "arcee": ("arcee", {}),
    "aria_text": ("aria_text", {}),
    "axk1": ("axk1", MLA_ROPE8),
    "axk2": ("axk2", dict(IDX, **MLA_ROPE8)),
    "bamba": ("bamba", dict(attn_layer_indices=[1], **MAMBA)),
    "beam": ("beam", {}),
    "bitnet": ("bitnet", {}),
    "cohere": ("cohere", {}),
    "cohere2": ("cohere2", {}),
    "cohere2_moe": ("cohere2_moe", {}),
    "cwm": ("cwm", {}),
    "deepseek_v2": ("deepseek_v2", MLA),
    "deepseek_v32": ("deepseek_v32", dict(IDX, **MLA)),
    "deepseek_v3": ("deepseek_v3", MLA_ROPE8),
    "deepseek_v3-no-interleave": ("deepseek_v3", dict(rope_interleave=False, **MLA_ROPE8)),  # LLaMA's rotary
    "deepseek_v4": ("deepseek_v4", {}),
    "diffllama": ("diffllama", {}),
    "doge": ("doge", {}),
    "dots1": ("dots1", {}),
    "ergo": ("ergo", {}),
    "ernie4_5": ("ernie4_5", {}),
    "ernie4_5_moe": ("ernie4_5_moe", {}),
    "exaone": ("exaone", {}),
    "exaone4": ("exaone4", {}),
    "exaone_moe": ("exaone_moe", {}),
    "falcon": ("falcon", {}),
    "falcon-alibi": ("falcon", dict(alibi=True)),
    "falcon_mamba": ("falcon_mamba", {}),
    "flex_olmo": ("flex_olmo", {}),
    "flint": ("flint", {}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3_text", dict(sliding_window=5)),
    "gemma4_text": ("gemma4_text", dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"])),
    "glm": ("glm", {}),
    "glm4": ("glm4", {}),
    "glm_moe_dsa": ("glm_moe_dsa", dict(IDX, **MLA)),
    "glm4_moe": ("glm4_moe", {}),
    "glm4_moe_lite": ("glm4_moe_lite", MLA),
    "gpt_neox": ("gpt_neox", {}),
    "gpt_oss": ("gpt_oss", {}),
    "gptj": ("gptj", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128)),
    "granite": ("granite", {}),
    "granite_swa": ("granite_swa", {}),
    "granitemoe": ("granitemoe", {}),
    "granitemoe_swa": ("granitemoe_swa", {}),
    "granitemoehybrid": ("granitemoehybrid", dict(layer_types=["mamba", "attention"], **MAMBA)),
    "granitemoeshared": ("granitemoeshared", {}),
    "helium": ("helium", {}),
    "hrm_text": ("hrm_text", {}),
    "hunyuan_v1_dense": ("hunyuan_v1_dense", {}),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", {}),
    "hy_v4": ("hy_v4", dict(IDX, indexer_types=["full", "shared"])),
    "hy_v3": ("hy_v3", {}),
    "hyperclovax": ("hyperclovax", {}),
    "inkling_text": ("inkling_text", {}),
    "internlm3": ("internlm3", {}),
    "iquestcoder": ("iquestcoder", {}),
    "jais2": ("jais2", {}),
    "jamba": ("jamba", dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                            mamba_d_state=4, mamba_dt_rank=8, mamba_expand=1)),
    "jetmoe": ("jetmoe", {}),
    "kolibri1": ("kolibri1", {}),
    "laguna": ("laguna", {}),
    "lara_mini": ("lara_mini", {}),
    "lfm2": ("lfm2", {}),
    "lfm2_moe": ("lfm2_moe", dict(layer_types=["conv", "full_attention"], num_dense_layers=1)),
    "lfm3": ("lfm3", {}),
    "llama": ("llama", {}),
    "llama4_text": ("llama4_text", {}),
    "mellum": ("mellum", {}),
    "mimo_v2_flash": ("mimo_v2_flash", {}),
    "minicpm3": ("minicpm3", MLA),
    "minicpm5_moe": ("minicpm5_moe", {}),
    "minimax": ("minimax", {}),
    "minimax_m2": ("minimax_m2", {}),
    "minimax_m3_vl_text": ("minimax_m3_vl_text", {}),
    "ministral": ("ministral", {}),
    "ministral3": ("ministral3", {}),
    "mistral": ("mistral", {}),
    "mixtral": ("mixtral", {}),
    "moshi": ("moshi", {}),
    "nanochat": ("nanochat", {}),
    "nemotron": ("nemotron", {}),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "olmo3": ("olmo3", {}),
    "olmo_hybrid": ("olmo_hybrid", {}),
    "olmoe": ("olmoe", {}),
    "param2moe": ("param2moe", {}),
    "persimmon": ("persimmon", {}),
    "phi": ("phi", {}),
    "phi3": ("phi3", {}),
    "phimoe": ("phimoe", {}),
    "qwen2": ("qwen2", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_next": ("qwen3_next", dict(layer_types=["linear_attention", "full_attention"])),
    "sarvam_mla": ("sarvam_mla", MLA),
    "sarvam_moe": ("sarvam_moe", {}),
    "seed_oss": ("seed_oss", {}),
    "smollm3": ("smollm3", {}),
    "solar_open": ("solar_open", {}),
    "stablelm": ("stablelm", {}),
    "starcoder2": ("starcoder2", {}),
    "vaultgemma": ("vaultgemma", {}),
    "youtu": ("youtu", MLA_ROPE8),
}

# What patch_model's report says per arch: (RMSNorm modules swapped, rotary swapped). Rotary
# left alone: no q_proj/qkv_proj, no apply_rotary_pos_emb, or a rotation ours does not compute
# (interleaved pairs: Cohere, Ergo, Ernie 4.5, Helium, GLM/GLM-4, GPT-J; flipped signs: NanoChat;
# one-tensor signature: Gemma 4; GPT-OSS's chunked form).
EXPECT = {}  # filled below from the lists, so each arch's line stays short
_NO_NORM_SWAP = {"afmoe", "falcon-alibi", "beam", "cohere", "cohere2", "cohere2_moe", "deepseek_v4", "ergo", "falcon", "flex_olmo",
                 "flint", "gemma4_text", "gpt_neox", "gpt_oss", "gptj", "helium", "hrm_text", "jais2", "lara_mini",
                 "llama4_text", "moshi", "nanochat", "nemotron", "olmo", "olmo2", "olmo3",
                 "olmo_hybrid", "persimmon", "phi", "phimoe", "stablelm", "starcoder2"}
_NO_ROTARY_SWAP = {"axk1", "axk2", "deepseek_v32", "falcon-alibi", "glm_moe_dsa", "hy_v4", "cohere", "cohere2", "cohere2_moe", "deepseek_v2", "deepseek_v4", "ergo", "ernie4_5",
                   "ernie4_5_moe", "falcon", "falcon_mamba", "gemma4_text", "glm", "glm4", "gpt_neox", "gpt_oss",
                   "gptj", "helium", "inkling_text", "jetmoe", "lfm3", "llama4_text", "minicpm5_moe", "nanochat",
                   "persimmon"}
# Rotary reported swapped (the attention module and its file's apply_rotary_pos_emb qualify) but
# never called at these configs: the model rotates with another function (DeepSeek-V3 family's
# apply_rotary_pos_emb_interleave under rope_interleave=True, the default), or not at all (Jamba,
# Granite-MoE-hybrid without "rope" position embeddings, Flint whose rotary is on sliding layers only).
_ROTARY_UNUSED = {"deepseek_v3", "flint", "glm4_moe_lite", "granitemoehybrid", "jamba", "sarvam_mla", "youtu"}
# No attention layer at this size (Mamba only; LFM3's first layers are convolutions).
_NO_ATTENTION = {"falcon_mamba", "lfm3"}
# Calls that leave fastattn's kernels, by design (every other arch: none). Attention with sinks
# runs the model's eager attention (transformers' SDPA would drop them); InklingText's relative
# position bias and Llama 4's chunked attention mask run on transformers' SDPA.
_SINKS = "attention sinks (s_aux)"
FALLBACKS = {arch: {_SINKS} for arch in ("deepseek_v4", "flint", "gpt_oss", "granite_swa", "granitemoe_swa",
                                         "hy_v4", "mimo_v2_flash")}
# Sparse attention: the top-k key selection runs on transformers' SDPA (HY-V4 has sinks too: eager).
FALLBACKS.update({arch: {"sparse key selection (indices)"} for arch in ("axk2", "deepseek_v32", "glm_moe_dsa")})
FALLBACKS["doge"] = {"mask not expressible as per-sequence lengths + causal/window"}  # its dynamic mask
FALLBACKS["falcon-alibi"] = {"mask not expressible as per-sequence lengths + causal/window"}  # ALiBi bias
FALLBACKS["inkling_text"] = {"position bias"}
FALLBACKS["llama4_text"] = {"mask not expressible as per-sequence lengths + causal/window"}
for _arch in ARCHS:
    EXPECT[_arch] = (_arch not in _NO_NORM_SWAP, _arch not in _NO_ROTARY_SWAP)


def _config(arch):
    return _config_of(*ARCHS[arch])


def _config_of(model_type, extra):
    """A tiny config of model_type: BASE's fields that its config class has, then extra."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:  # another transformers release than the sweep's (5.25)
        pytest.skip(f"transformers {transformers.__version__} has no model type {model_type!r}")
    cls = CONFIG_MAPPING[model_type]
    known = set(cls().to_dict())
    kw = {k: v for k, v in BASE.items() if k in known}
    kw.update(extra)
    return cls(**kw)


def _ref_and_ours(cfg, ref_impl="eager"):
    """Two tiny models of cfg with the same weights, in eval mode: ref_impl's and "fastattn"'s."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=ref_impl).eval()
        ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fastattn")
    ours.load_state_dict(ref.state_dict())
    return ref, ours.eval()


def _padded(lens, seed=1):
    S = max(lens)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lens), S), generator=g)
    mask = torch.zeros(len(lens), S, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, S - n:] = 1
    ids[mask == 0] = PAD
    return ids, mask


def _rel_err(mine, theirs):
    return ((mine - theirs).abs().max() / max(theirs.abs().max().item(), 1.0)).item()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_arch_matches_eager(arch, monkeypatch):
    fa_hf.register()
    eager, ours = _ref_and_ours(_config(arch))
    report = fa_hf.patch_model(ours)

    norms, rotary = EXPECT[arch]
    swapped_norms = {k: v for k, v in report["swapped"].items() if not k.startswith("rotary:")}
    assert bool(swapped_norms) == norms and report["rms_norm"] == sum(swapped_norms.values()), report
    assert (report["rotary"] > 0) == rotary, report
    # No LlamaRMSNorm copy stays behind (those are swapped), nothing is reported both ways.
    for name, module in ours.named_modules():
        if "RMSNorm" in type(module).__name__ and not isinstance(module, fastattn.nn.RMSNorm):
            assert not fa_hf._is_llama_rmsnorm_copy(type(module)), (name, type(module).__name__)
    assert not set(report["swapped"]) & set(report["left_alone"]), report

    rotary_calls = []
    inner = fastattn.apply_rotary

    def spy(*args, **kwargs):
        rotary_calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(fastattn, "apply_rotary", spy)
    fa_hf.reset_stats()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (fallback notes and transformers' own deprecations)
        ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
        err = _rel_err(ours(ids).logits, eager(ids).logits)
        assert err <= 1e-4, f"{arch}: plain batch, logits differ by {err:.2e} of their scale"

        ids, mask = _padded((9, 4, 6))
        real = mask.bool()
        err = _rel_err(ours(ids, attention_mask=mask).logits[real], eager(ids, attention_mask=mask).logits[real])
        assert err <= 1e-4, f"{arch}: padded batch, logits differ by {err:.2e} of their scale"

        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
        ref = eager.generate(ids, attention_mask=mask, **gen)
        out = ours.generate(ids, attention_mask=mask, **gen)
    assert out.shape == ref.shape and torch.equal(out, ref), (arch, out, ref)

    st = fa_hf.stats()
    assert set(st["reasons"]) == FALLBACKS.get(arch, set()), st
    if arch not in FALLBACKS:
        assert (st["fastattn"] > 0) == (arch not in _NO_ATTENTION), st
    if rotary and arch not in _ROTARY_UNUSED:
        assert rotary_calls, f"{arch}: rotary reported swapped, but fastattn.apply_rotary never ran"


_EAGER_ONLY_CONFIGS = {
    "bloom": dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, pad_token_id=PAD),
    "mpt": dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, pad_token_id=PAD),
    "xglm": dict(vocab_size=VOCAB, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128, pad_token_id=PAD),
}


@pytest.mark.parametrize("model_type", list(_EAGER_ONLY_CONFIGS))
def test_eager_only_archs_get_the_eager_mask(model_type):
    # Models that support neither SDPA nor flash attention run their own attention code under any
    # attn_implementation and read the mask as eager builds it; "fastattn" once handed them None
    # (no causal mask: later tokens leaked into earlier logits) or a 2-D mask (a shape error).
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fa_hf.register()
    cfg = CONFIG_MAPPING[model_type](**_EAGER_ONLY_CONFIGS[model_type])
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    fa_hf._EAGER_ONLY.pop(type(cfg), None)
    with pytest.warns(UserWarning, match="fastattn's kernels are not used"):
        ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fastattn")
        ours.load_state_dict(eager.state_dict())
        ours.eval()
        with torch.no_grad():
            ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
            assert torch.equal(ours(ids).logits, eager(ids).logits)
    ids, mask = _padded((9, 4, 6))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ours(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits)
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
        assert torch.equal(ours.generate(ids, attention_mask=mask, **gen), eager.generate(ids, attention_mask=mask, **gen))


def test_models_on_the_attention_interface_are_not_eager_only():
    # DeepSeek-V4 / HY-V4 / Git / BridgeTower declare neither SDPA nor flash attention but call the
    # AttentionInterface (their modeling source names ALL_ATTENTION_FUNCTIONS): fastattn's masks.
    import importlib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for model_type in ("deepseek_v4", "hy_v4", "git", "bridgetower", "llama"):
        if model_type not in CONFIG_MAPPING:
            continue
        cls = CONFIG_MAPPING[model_type]
        importlib.import_module(cls.__module__.replace(".configuration_", ".modeling_"))
        assert not fa_hf._eager_only_model(_config_of(model_type, {})), model_type


def test_sinks_keyword_takes_the_eager_attention():
    # Inkling2 passes its attention sinks as sinks= (GPT-OSS and its kin: s_aux=), next to a position
    # bias that sends the call to the fallback; transformers' SDPA attention ignores the sinks, so
    # they were silently dropped (logits 6e-2 of their scale away from eager). (Logits only: this
    # tiny Inkling2's own generate fails in transformers, eager included.)
    fa_hf.register()
    eager, ours = _ref_and_ours(_config_of("inkling2_text", dict(sliding_window=4)))
    fa_hf.reset_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
            assert _rel_err(ours(ids).logits, eager(ids).logits) <= 1e-5
            ids, mask = _padded((9, 4, 6))
            real = mask.bool()
            assert _rel_err(ours(ids, attention_mask=mask).logits[real],
                            eager(ids, attention_mask=mask).logits[real]) <= 1e-5
    assert set(fa_hf.stats()["reasons"]) == {"position bias"}


def test_cpu_head_dim_above_the_kernels_falls_back():
    # Head dims above 512 (the CPU kernels' limit): transformers' SDPA, as for unsupported CUDA
    # head dims, not the kernel's ValueError.
    fa_hf.register()
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=576, pad_token_id=PAD)
    sdpa, ours = _ref_and_ours(cfg, "sdpa")
    fa_hf.reset_stats()
    ids, mask = _padded((9, 4, 6))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ours(ids).logits, sdpa(ids).logits)
        real = mask.bool()
        assert torch.equal(ours(ids, attention_mask=mask).logits[real], sdpa(ids, attention_mask=mask).logits[real])
    assert set(fa_hf.stats()["reasons"]) == {"head dim 576 on the CPU (the kernels take up to 512)"}


# Models that declare neither SDPA nor flash attention but call the AttentionInterface: their
# code was written for the eager mask only. BigBirdPegasus' decoder self-attention has
# is_causal=False and relies on the mask for causality; DeepSeek-V4's compressed-sparse layers
# concatenate their 4-D block bias onto the mask.
_NEITHER_CONFIGS = {
    "bigbird_pegasus": dict(vocab_size=VOCAB, d_model=64, decoder_layers=2, encoder_layers=2,
                            decoder_attention_heads=4, encoder_attention_heads=4, decoder_ffn_dim=128,
                            encoder_ffn_dim=128, max_position_embeddings=128, init_std=0.2, pad_token_id=PAD),
    "deepseek_v4": dict(vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, q_lora_rank=24,
                        num_experts_per_tok=2, n_routed_experts=4, max_position_embeddings=128,
                        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
                        mlp_layer_types=["hash_moe", "moe"], sliding_window=128, pad_token_id=PAD,
                        qk_rope_head_dim=8, index_n_heads=2, index_head_dim=16, index_topk=4),
}


@pytest.mark.parametrize("model_type", list(_NEITHER_CONFIGS))
def test_archs_declaring_neither_get_the_eager_mask(model_type):
    # fastattn's mask function handed them SDPA's skip (None without padding) or its 2-D mask:
    # BigBirdPegasus attended to later tokens (logits 0.96 of their scale away from eager, the
    # first token's logits moved when the last token changed), DeepSeek-V4 dropped its block bias
    # (0.37 of the scale) and a padded batch raised in torch.cat (outside audit).
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no model type {model_type!r}")
    fa_hf.register()
    cfg = CONFIG_MAPPING[model_type](**_NEITHER_CONFIGS[model_type])
    ref, ours = _ref_and_ours(cfg)
    fa_hf._EAGER_ONLY.pop(type(cfg), None)
    getattr(fa_hf, "_DECLARES_NEITHER", {}).pop(type(cfg), None)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = ours(ids).logits
        want = ref(ids).logits
        assert _rel_err(got, want) <= 1e-5
        assert any("they get transformers' eager mask" in str(w.message) for w in caught), [str(w.message) for w in caught]
        later = ids.clone()
        later[:, -1] = (later[:, -1] + 1) % VOCAB  # a later token changes no earlier logit
        assert torch.equal(ours(later).logits[:, :-1], got[:, :-1])
        ids, mask = _padded((10, 6))
        real = mask.bool()
        assert _rel_err(ours(ids, attention_mask=mask).logits[real], ref(ids, attention_mask=mask).logits[real]) <= 1e-5
