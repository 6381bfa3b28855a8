"""fastattn.integrations.transformers: attn_implementation="fastattn" and patch_model."""
from __future__ import annotations

import copy

import pytest
import torch

import fastattn

from conftest import DEVICES, assert_error_ratio

transformers = pytest.importorskip("transformers")
fa_hf = pytest.importorskip("fastattn.integrations.transformers")

VOCAB = 128


def tiny_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    base.update(kw)
    return transformers.LlamaConfig(**base)


@pytest.fixture(scope="module")
def models():
    """The same random weights under eager attention and under attn_implementation="fastattn"."""
    fa_hf.register()
    torch.manual_seed(0)
    eager = transformers.LlamaForCausalLM(tiny_config()).eval()
    eager.set_attn_implementation("eager")
    ours = transformers.LlamaForCausalLM(tiny_config()).eval()
    ours.load_state_dict(eager.state_dict())
    ours.set_attn_implementation("fastattn")
    return eager, ours


class Spy:
    """Counts calls of a public fastattn function (the integration looks it up at call time)."""

    def __init__(self, monkeypatch, name):
        self.calls = []
        inner = getattr(fastattn, name)

        def spy(*args, **kwargs):
            self.calls.append(kwargs)
            return inner(*args, **kwargs)

        monkeypatch.setattr(fastattn, name, spy)


def ids_of(B, S, seed=1):
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def test_register_adds_attention_and_mask_functions(models):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert "fastattn" in AttentionInterface._global_mapping
    assert "fastattn" in ALL_MASK_ATTENTION_FUNCTIONS  # else transformers builds no mask at all
    assert models[1].config._attn_implementation == "fastattn"


def test_fastattn_attention_matches_eager(models, monkeypatch):
    eager, ours = models
    spy = Spy(monkeypatch, "flash_attention")
    ids = ids_of(2, 19)
    with torch.no_grad():
        theirs, mine = eager(ids).logits, ours(ids).logits
    assert (mine - theirs).abs().max().item() <= 1e-4
    # one per layer, causal kept (top-left over as many keys as queries: the band right = 0)
    assert len(spy.calls) == 2 and all(tuple(c["window"]) == (-1, 0) for c in spy.calls)


def test_generate_with_cache_matches_eager(models, monkeypatch):
    eager, ours = models
    spy = Spy(monkeypatch, "flash_attention")
    ids = ids_of(2, 7)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), eager.generate(ids, **kw))
    assert len(spy.calls) == 2 * 8  # prefill + 7 decode steps (query length 1, bottom-right causal)


def test_padding_mask_runs_varlen(models, monkeypatch):
    eager, ours = models
    spy = Spy(monkeypatch, "flash_attention")
    varlen = Spy(monkeypatch, "flash_attention_varlen")
    ids = ids_of(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding: unpadded to per-sequence lengths (tests/test_hf_varlen.py)
    with torch.no_grad():
        theirs, mine = eager(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    assert (mine - theirs)[mask.bool()].abs().max().item() <= 1e-4
    assert spy.calls == []  # not silently unmasked on the dense kernel
    assert len(varlen.calls) == 2 and all(c["causal"] for c in varlen.calls)


def test_from_pretrained_with_fastattn(tmp_path, models):
    eager, _ = models
    eager.save_pretrained(str(tmp_path))
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="fastattn").eval()
    assert loaded.config._attn_implementation == "fastattn"
    ids = ids_of(1, 9)
    with torch.no_grad():
        assert (loaded(ids).logits - eager(ids).logits).abs().max().item() <= 1e-4


def test_patch_model_swaps_norms_and_rotary(models, monkeypatch):
    eager, _ = models
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config()).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    reference = transformers.LlamaForCausalLM(tiny_config()).eval()
    reference.load_state_dict(model.state_dict())
    reference.set_attn_implementation("eager")
    weight = model.model.norm.weight
    counts = fa_hf.patch_model(model)
    assert counts == {"rms_norm": 2 * 2 + 1, "rotary": 2, "left_alone": {},
                      "swapped": {"LlamaRMSNorm": 2 * 2 + 1, "rotary:LlamaAttention": 2}}
    assert isinstance(model.model.norm, fastattn.nn.RMSNorm) and model.model.norm.weight is weight
    assert isinstance(model.model.layers[0].input_layernorm, fastattn.nn.RMSNorm)
    assert set(model.state_dict()) == set(reference.state_dict())
    rotary = Spy(monkeypatch, "apply_rotary")
    ids = ids_of(2, 13)
    with torch.no_grad():
        theirs = reference(ids).logits
        assert rotary.calls == []  # an unpatched model in the same process keeps transformers' RoPE
        mine = model(ids).logits
    assert len(rotary.calls) == 2
    assert (mine - theirs).abs().max().item() <= 1e-4
    # still trains: gradients reach the shared norm weights through fastattn's ops
    model.train()
    model(ids, labels=ids).loss.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    # patching twice changes nothing more; a deep copy stays patched, on its own weights
    assert fa_hf.patch_model(model) == {"rms_norm": 0, "rotary": 0, "swapped": {}, "left_alone": {}}
    model.eval()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
        n = len(rotary.calls)
        out = clone(ids).logits
    assert len(rotary.calls) == n + 2
    with torch.no_grad():
        assert not torch.allclose(out, model(ids).logits)


@pytest.mark.parametrize("device", DEVICES)
def test_fastattn_attention_low_precision(models, device):
    """bf16 with attn_implementation="fastattn" vs bf16 eager, both against fp32 eager. On CUDA
    with head_dim 64 (the tiny models' 16 has no CUDA kernel and would fall back to SDPA), and
    every attention call must have run on fastattn's kernel."""
    eager, ours = models
    if device == "cuda":
        torch.manual_seed(0)
        eager = transformers.LlamaForCausalLM(tiny_config(head_dim=64)).eval()
        eager.set_attn_implementation("eager")
        ours = copy.deepcopy(eager)
        ours.set_attn_implementation("fastattn")
    truth = copy.deepcopy(eager).to(device)
    low = copy.deepcopy(eager).to(device, torch.bfloat16)
    mine = copy.deepcopy(ours).to(device, torch.bfloat16)
    ids = ids_of(2, 40).to(device)
    fa_hf.reset_stats()
    with torch.no_grad():
        assert_error_ratio(mine(ids).logits.float(), low(ids).logits.float(), truth(ids).logits, "logits", atol=1e-2)
    assert fa_hf.stats()["sdpa_fallback"] == 0 and fa_hf.stats()["fastattn"] == 2, fa_hf.stats()


# ---- every mask/cache combination transformers produces, against attn_implementation="sdpa" ----
# transformers passes attention_mask=None meaning SDPA's TOP-LEFT causal mask; prefill into an
# empty static cache is such a call with Sk = the whole cache (unused zero rows at the end), the
# path that compiled generation takes.
def _arch_config(arch):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    if arch == "llama-gqa":
        return transformers.LlamaConfig(**base)
    if arch == "llama-mqa":
        return transformers.LlamaConfig(**{**base, "num_key_value_heads": 1})
    if arch == "qwen2":
        return transformers.Qwen2Config(**base)
    if arch == "phi3":
        return transformers.Phi3Config(**base)
    if arch == "qwen3":
        return transformers.Qwen3Config(**base, head_dim=16)
    if arch == "gemma":
        return transformers.GemmaConfig(**base, head_dim=16)
    if arch == "gemma3":  # sliding-window layers (their masked calls run on flash_attention_varlen)
        return transformers.Gemma3TextConfig(**base, head_dim=16, sliding_window=5)
    if arch == "gemma2":  # soft-capped scores on the kernels' softcap= (SDPA has none: eager is the reference)
        return transformers.Gemma2Config(**base, head_dim=16, sliding_window=5, attn_logit_softcapping=1.0,
                                         final_logit_softcapping=2.0)
    if arch == "mistral-window":  # sliding window narrower than the prompts
        return transformers.MistralConfig(**base, sliding_window=5)
    raise AssertionError(arch)


def _sdpa_and_fastattn(arch, patch):
    fa_hf.register()
    cfg = _arch_config(arch)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    theirs.set_attn_implementation("eager" if arch == "gemma2" else "sdpa")
    mine = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).eval()  # its own config
    mine.load_state_dict(theirs.state_dict())
    mine.set_attn_implementation("fastattn")
    if patch:
        fa_hf.patch_model(mine)
    return theirs, mine


def _assert_logits_close(mine, theirs):
    scale = theirs.abs().max().item()
    assert (mine - theirs).abs().max().item() <= 1e-4 * max(scale, 1.0)


ARCHS = ["llama-gqa", "llama-mqa", "qwen2", "phi3", "qwen3", "gemma", "gemma2", "gemma3"]


@pytest.mark.parametrize("patch", [False, True], ids=["plain", "patched"])
@pytest.mark.parametrize("arch", ARCHS)
def test_static_cache_forward_and_generate_match_sdpa(arch, patch, monkeypatch):
    from transformers import StaticCache

    theirs, mine = _sdpa_and_fastattn(arch, patch)
    spy = Spy(monkeypatch, "flash_attention")
    ids = ids_of(2, 13)
    with torch.no_grad():
        logits = [m(ids, cache=StaticCache(config=m.config, max_cache_len=29), use_cache=True).logits
                  for m in (theirs, mine)]
    _assert_logits_close(logits[1], logits[0])
    if arch not in ("gemma2", "gemma3"):  # (their sliding layers' masked calls run on the varlen kernel)
        assert len(spy.calls) == 2  # the prefill ran on the kernel, not on the fallback
    kw = dict(max_new_tokens=8, do_sample=False, cache_implementation="static", pad_token_id=0,
              eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    ref, out = theirs.generate(ids, **kw), mine.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    _assert_logits_close(torch.stack(out.logits), torch.stack(ref.logits))


@pytest.mark.parametrize("arch", ARCHS + ["mistral-window"])
def test_dynamic_cache_chunked_prefill_and_generate_match_sdpa(arch):
    from transformers import DynamicCache

    theirs, mine = _sdpa_and_fastattn(arch, patch=False)
    ids = ids_of(2, 17)
    with torch.no_grad():
        results = []  # chunks of 7, then 1 and 9 queries after a filled cache
        for m in (theirs, mine):
            cache, chunks = DynamicCache(config=m.config), []
            for a, b in ((0, 7), (7, 8), (8, 17)):
                chunks.append(m(ids[:, a:b], cache=cache, use_cache=True).logits)
            results.append(torch.cat(chunks, 1))
    _assert_logits_close(results[1], results[0])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(mine.generate(ids, **kw), theirs.generate(ids, **kw))


@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-window"])
def test_static_cache_chunked_prefill_matches_sdpa(arch):
    from transformers import StaticCache

    theirs, mine = _sdpa_and_fastattn(arch, patch=False)
    ids = ids_of(1, 19)
    with torch.no_grad():
        results = []
        for m in (theirs, mine):
            cache, chunks = StaticCache(config=m.config, max_cache_len=32), []
            for a, b in ((0, 6), (6, 7), (7, 19)):
                pos = torch.arange(a, b)
                chunks.append(m(ids[:, a:b], cache=cache, use_cache=True, cache_position=pos).logits)
            results.append(torch.cat(chunks, 1))
    _assert_logits_close(results[1], results[0])


def test_mask_free_call_is_top_left_causal():
    """The attention function itself: no mask + Sk > Sq must not see keys j > i (SDPA's alignment)."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 4, 5, 16)
    k, v = torch.randn(1, 2, 11, 16), torch.randn(1, 2, 11, 16)
    out, _ = fa_hf.fastattn_attention_forward(module, q, k, v, None, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    one, _ = fa_hf.fastattn_attention_forward(module, q[:, :, :1], k, v, None, scaling=0.25)  # one query: all keys
    ref1 = torch.nn.functional.scaled_dot_product_attention(q[:, :, :1], k, v, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(one, ref1.transpose(1, 2), atol=1e-5, rtol=1e-5)
    # fewer keys than queries (top-left: query i sees j <= i, every row sees key 0)
    out2, _ = fa_hf.fastattn_attention_forward(module, q, k[:, :, :3], v[:, :, :3], None, scaling=0.25)
    ref2 = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :3], v[:, :, :3], is_causal=True, scale=0.25,
                                                            enable_gqa=True)
    torch.testing.assert_close(out2, ref2.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_export_unpadded_batch_with_dynamic_lengths(models):
    """torch.export of a model on fastattn with dynamic batch and length, no mask (an unpadded
    batch of 2 or more rows): the mask-free causal flag was a SymBool there and refused by the
    kernel wrapper's bool check (TypeError, export audit); the key length is not branched on."""
    eager, ours = models

    class LM(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=True).logits

    B, S = torch.export.Dim("B", min=1, max=8), torch.export.Dim("S", min=2, max=64)
    with torch.no_grad():
        program = torch.export.export(LM(ours), (ids_of(2, 9),), dynamic_shapes=({0: B, 1: S},)).module()
        for shape in ((3, 17), (2, 5), (1, 30)):
            ids = ids_of(*shape, seed=shape[1])
            torch.testing.assert_close(program(ids), eager(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_mask_free_call_under_jit_trace():
    """jit.trace hands the lengths over as tensors: the mask-free causal call raised (a
    TypeError, then an AssertionError in sym_min; review). It traces transformers' SDPA, right
    at other lengths."""
    import warnings

    class Attn(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 2

    def f(q, k, v):
        return fa_hf.fastattn_attention_forward(Attn(), q, k, v, None, scaling=0.25)[0]

    g = torch.Generator().manual_seed(0)

    def inputs(Sq, Sk):
        return (torch.randn(1, 4, Sq, 16, generator=g), torch.randn(1, 2, Sk, 16, generator=g),
                torch.randn(1, 2, Sk, 16, generator=g))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tracer's generic warnings)
        traced = torch.jit.trace(f, inputs(5, 9), check_trace=False)
    for Sq, Sk in ((5, 9), (7, 3), (6, 6)):
        a = inputs(Sq, Sk)
        torch.testing.assert_close(traced(*a), f(*a), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float16, torch.float16)])
def test_patched_norm_keeps_hf_result_dtype(x_dtype, w_dtype):
    """A swapped LlamaRMSNorm returns what the HF module returns: weight * normed.to(x.dtype),
    so torch's promotion of the two dtypes (fp32 for bf16 activations and an fp32 weight)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.norm = LlamaRMSNorm(40, eps=1e-5).to(w_dtype)
    with torch.no_grad():
        holder.norm.weight.add_(torch.randn(40).to(w_dtype) * 0.1)
    x = torch.randn(3, 7, 40).to(x_dtype)
    with torch.no_grad():
        theirs = holder.norm(x)
        fa_hf.patch_model(holder)
        assert isinstance(holder.norm, fastattn.nn.RMSNorm)
        mine = holder.norm(x)
        truth = holder.norm.weight.double() * torch.nn.functional.rms_norm(x.double(), (40,), eps=1e-5)
    assert mine.dtype == theirs.dtype
    assert_error_ratio(mine, theirs, truth, "rms_norm", atol=1e-5)


# ---- patch_model on Gemma's (1 + w) norms and Phi-3's partial rotary; soft-capping -------------
def _gemma_config(arch, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0)
    base.update(kw)
    if arch == "gemma":
        return transformers.GemmaConfig(**base)
    if arch == "gemma2":
        return transformers.Gemma2Config(**{"sliding_window": 5, **base})
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(**{"sliding_window": 5, "sliding_window_pattern": 2, **base})
    raise AssertionError(arch)


def _eager_pair(cfg):
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ref.set_attn_implementation("eager")
    with torch.no_grad():  # Gemma inits its norm offsets to 0: make (1 + w) matter
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    model = copy.deepcopy(ref)
    return ref, model


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_patch_model_swaps_gemma_unit_offset_norms(arch, monkeypatch):
    ref, model = _eager_pair(_gemma_config(arch))
    norm_class = {"gemma": "GemmaRMSNorm", "gemma2": "Gemma2RMSNorm", "gemma3": "Gemma3RMSNorm"}[arch]
    attn_class = {"gemma": "GemmaAttention", "gemma2": "Gemma2Attention", "gemma3": "Gemma3Attention"}[arch]
    per_layer = {"gemma": 2, "gemma2": 4, "gemma3": 6}[arch]  # gemma3: + q_norm, k_norm
    weight = model.model.norm.weight
    report = fa_hf.patch_model(model)
    assert report["swapped"] == {norm_class: 2 * per_layer + 1, "rotary:" + attn_class: 2}
    assert report["rms_norm"] == 2 * per_layer + 1 and report["rotary"] == 2 and report["left_alone"] == {}
    norm = model.model.norm
    assert isinstance(norm, fastattn.nn.RMSNorm) and norm.unit_offset and norm.weight is weight
    assert not any(type(m).__name__ == norm_class for m in model.modules())
    assert set(model.state_dict()) == set(ref.state_dict())
    rotary = Spy(monkeypatch, "apply_rotary")
    ids = ids_of(2, 11)
    with torch.no_grad():
        theirs, mine = ref(ids).logits, model(ids).logits
    assert len(rotary.calls) == 2
    _assert_logits_close(mine, theirs)


@pytest.mark.parametrize("norm_path", ["gemma.modeling_gemma.GemmaRMSNorm",
                                       # Gemma's code under another name (a comment differs): swapped since
                                       # patch_model compares the code (it was left alone by name)
                                       "qwen3_next.modeling_qwen3_next.Qwen3NextRMSNorm",
                                       "qwen3_5.modeling_qwen3_5.Qwen3_5RMSNorm"])
@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.bfloat16), (torch.float16, torch.float32)])
def test_patched_gemma_norm_is_hf_math(x_dtype, w_dtype, norm_path):
    """(x.float() / rms) * (1 + w.float()), cast to x's dtype: the same bits as Gemma's module."""
    import importlib

    module_name, class_name = norm_path.rsplit(".", 1)
    try:
        norm_class = getattr(importlib.import_module("transformers.models." + module_name), class_name)
    except (ImportError, AttributeError):
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.norm = norm_class(48, eps=1e-6).to(w_dtype)
    with torch.no_grad():
        holder.norm.weight.normal_(0.0, 0.5)
    x = (torch.randn(3, 5, 48) * 4).to(x_dtype)
    r = torch.randn(3, 5, 48).to(x_dtype)
    with torch.no_grad():
        theirs, theirs_res = holder.norm(x), holder.norm(x + r)
        assert fa_hf.patch_model(holder)["swapped"] == {class_name: 1}
        assert isinstance(holder.norm, fastattn.nn.RMSNorm) and holder.norm.unit_offset
        mine = holder.norm(x)
        mine_res, h = holder.norm(x, r)
    assert mine.dtype == theirs.dtype == x_dtype
    tol = 0 if x_dtype != torch.float32 else 1e-6  # 16-bit: both round the same fp32 value once
    torch.testing.assert_close(mine, theirs, atol=tol, rtol=tol)
    torch.testing.assert_close(mine_res, theirs_res, atol=tol, rtol=tol)
    assert torch.equal(h, x + r)
    # gradients reach the offset weight
    x.requires_grad_(True)
    holder.norm(x).float().sum().backward()
    assert holder.norm.weight.grad is not None and torch.isfinite(holder.norm.weight.grad).all()


def test_patch_model_phi3_partial_rotary(monkeypatch):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    cfg = transformers.Phi3Config(**base, partial_rotary_factor=0.5)  # rotates 8 of 16 dims per head
    torch.manual_seed(0)
    ref = transformers.Phi3ForCausalLM(cfg).eval()
    ref.set_attn_implementation("eager")
    model = copy.deepcopy(ref)
    report = fa_hf.patch_model(model)
    assert report["swapped"] == {"Phi3RMSNorm": 2 * 2 + 1, "rotary:Phi3Attention": 2}
    rotary = Spy(monkeypatch, "apply_rotary")
    ids = ids_of(2, 12)
    with torch.no_grad():
        theirs, mine = ref(ids).logits, model(ids).logits
    assert len(rotary.calls) == 2  # partial rotary on the kernel (dims 8..16 passed through)
    _assert_logits_close(mine, theirs)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_patch_model_keeps_torch_load_working_in_this_process(models, tmp_path):
    # With the `kernels` package (a dependency of transformers 5), the modeling file's
    # apply_rotary_pos_emb is a wrapper module that pickle finds by name and rebuilds per model
    # with type(wrapper)(): after patch_model put a plain function there, torch.load of any
    # Llama, patched or not, failed in this process ("function() missing required argument").
    pytest.importorskip("kernels")
    from transformers.models.llama import modeling_llama

    _, ours = models
    patched, plain = copy.deepcopy(ours), copy.deepcopy(ours)
    plain.set_attn_implementation("eager")
    fa_hf.patch_model(patched)
    assert hasattr(modeling_llama.apply_rotary_pos_emb, "_fastattn_original")
    ids = ids_of(2, 9)
    for i, model in enumerate((patched, plain)):
        with torch.no_grad():
            want = model(ids).logits
        torch.save(model, tmp_path / f"m{i}.pt")
        loaded = torch.load(tmp_path / f"m{i}.pt", weights_only=False)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want)


def _rotary_in_patched_attention(q, k, cos, sin):
    """The patched modeling file's apply_rotary_pos_emb, called as a patched attention calls it."""
    from transformers.models.llama import modeling_llama

    fa_hf.patch_model(transformers.LlamaForCausalLM(tiny_config()))  # installs the dispatcher
    token = fa_hf._IN_PATCHED_ATTENTION.set(1)
    try:
        return modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    finally:
        fa_hf._IN_PATCHED_ATTENTION.reset(token)


def _hf_rotary_args(dtype, B=2, H=4, Hk=2, S=9, D=16):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.manual_seed(0)
    rope = LlamaRotaryEmbedding(tiny_config(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=Hk))
    cos, sin = rope(torch.zeros(1, dtype=dtype), torch.arange(S).expand(B, S))
    return torch.randn(B, H, S, D), torch.randn(B, Hk, S, D), cos, sin


def test_patched_rotary_keeps_transformers_result_dtype():
    # bf16 q and k with fp32 tables (an fp32 model under autocast): transformers' q * cos + ...
    # returns fp32 (and so fp32 keys in the cache); the dispatcher returned bf16.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as theirs

    q, k, cos, sin = _hf_rotary_args(torch.float32)
    q, k = q.bfloat16(), k.bfloat16()
    want = fa_hf._unwrapped_function(theirs)(q, k, cos, sin)
    got = _rotary_in_patched_attention(q, k, cos, sin)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # q and k of different dtypes: each result in its own promoted dtype (it raised)
    got = _rotary_in_patched_attention(q.float(), k, cos.bfloat16(), sin.bfloat16())
    want = fa_hf._unwrapped_function(theirs)(q.float(), k, cos.bfloat16(), sin.bfloat16())
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.float32, torch.bfloat16]
    # float64 (an fp64 model, or fp64 tables): transformers' function (no such kernel; it raised)
    for args in [(q.double(), k.double(), cos, sin), (q.float(), k.float(), cos.double(), sin.double())]:
        got, want = _rotary_in_patched_attention(*args), fa_hf._unwrapped_function(theirs)(*args)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype == torch.float64 and torch.equal(g, w)


def test_patched_olmo_rotary_keeps_q_and_k_dtypes(monkeypatch):
    # OLMo's apply_rotary_pos_emb casts q and k back to their dtypes (its tables stay fp32); the
    # dispatcher returned them promoted to fp32, which met bf16 values in the attention: a
    # patched OLMo / OLMo-2 / OLMo-3 in bf16 raised ValueError (outside audit).
    from transformers.models.olmo2 import modeling_olmo2

    fa_hf.register()
    cfg = transformers.Olmo2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval().to(torch.bfloat16)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        assert fa_hf.patch_model(model)["rotary"] == 2
        calls = Spy(monkeypatch, "apply_rotary")
        got = model(ids).logits
    assert len(calls.calls) == 2  # the kernel ran, in both layers
    assert (got.float() - want.float()).abs().max() <= 2 * 2 ** -7 * want.float().abs().max()
    q, k, cos, sin = _hf_rotary_args(torch.float32)
    q, k = q.bfloat16(), k.bfloat16()
    theirs = fa_hf._unwrapped_function(modeling_olmo2.apply_rotary_pos_emb)(q, k, cos, sin)
    token = fa_hf._IN_PATCHED_ATTENTION.set(1)
    try:
        ours = modeling_olmo2.apply_rotary_pos_emb(q, k, cos, sin)
    finally:
        fa_hf._IN_PATCHED_ATTENTION.reset(token)
    for o, t in zip(ours, theirs):
        assert o.dtype == t.dtype == torch.bfloat16
        torch.testing.assert_close(o.float(), t.float(), rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("layout", ["bshd_view", "bhsd"])
@pytest.mark.parametrize("S", [1, 5])
@pytest.mark.parametrize("form", ["llama", "phi3", "olmo2"])
def test_patched_rotary_returns_transformers_layout(form, S, layout, monkeypatch):
    # The patched rotary returned q and k as views of the kernel's (B, S, H, D) results whatever
    # the original returned: Phi-3's partial form ends in torch.cat (contiguous (B, H, S, D)), and
    # the full forms are elementwise, laid out as their input (outside audit: code that .view()s
    # q after the rotary works on one and raised on the other).
    import importlib

    module = importlib.import_module(f"transformers.models.{form}.modeling_{form}")
    dispatcher = fa_hf._make_rotary_dispatcher(fa_hf._unwrapped_function(module.apply_rotary_pos_emb),
                                               partial=form == "phi3", cast_back=form == "olmo2")
    q, k, cos, sin = _hf_rotary_args(torch.float32, S=S)
    if form == "phi3":  # rotates the first 8 of the 16 dims
        cos, sin = torch.cat([cos[..., :4], cos[..., :4]], -1), torch.cat([sin[..., :4], sin[..., :4]], -1)
    if layout == "bshd_view":  # the attention modules' q / k: (B, S, H, D) projections, transposed
        q, k = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    want = fa_hf._unwrapped_function(module.apply_rotary_pos_emb)(q, k, cos, sin)
    rotary = Spy(monkeypatch, "apply_rotary")
    token = fa_hf._IN_PATCHED_ATTENTION.set(1)
    try:
        got = dispatcher(q, k, cos, sin)
    finally:
        fa_hf._IN_PATCHED_ATTENTION.reset(token)
    assert rotary.calls, "the kernel did not run"
    for g, w in zip(got, want):
        def strides(t):  # (the stride of a size-1 dim is never used)
            return [st for st, n in zip(t.stride(), t.shape) if n > 1]
        assert strides(g) == strides(w) and g.is_contiguous() == w.is_contiguous(), (g.stride(), w.stride())
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_patched_rotary_differentiates_learned_tables():
    # cos / sin that require a gradient (learned or scaled tables): transformers' function gives
    # them one; the kernel takes them as constants, and the dispatcher dropped it silently.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as theirs

    q, k, cos, sin = _hf_rotary_args(torch.float32)
    grads = []
    for fn in (fa_hf._unwrapped_function(theirs), _rotary_in_patched_attention):
        c, s = cos.clone().requires_grad_(), sin.clone().requires_grad_()
        q2, k2 = fn(q, k, c, s)
        grads.append(torch.autograd.grad((q2 * q2.cos()).sum() + k2.sum(), (c, s)))
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("batch_tables", [False, True])
@pytest.mark.parametrize("S", [1, 7])
def test_rotary_tables_kept_per_forward(batch_tables, S, monkeypatch):
    """The rotary tables are built once per cos / sin pair (every layer of a forward gets the same
    tensors), and never reused for another sin, a cos or sin changed in place, or inference
    tensors (no version counter): each result equals transformers' own rotary."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, H, Hk, D = 3, 4, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, H, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g)

    def tables():
        angles = torch.rand(B if batch_tables else 1, S, D // 2, generator=g) * 6.0
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()

    built = []
    real = fa_hf._rotary_tables
    monkeypatch.setattr(fa_hf, "_rotary_tables", lambda c, s: built.append(1) or real(c, s))

    def check(cos, sin):
        mine = fa_hf._hf_rotary_on_fastattn(q, k, cos, sin)
        theirs = apply_rotary_pos_emb(q, k, cos, sin)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    cos, sin = tables()
    for _ in range(3):  # three layers of one forward
        check(cos, sin)
    assert len(built) == 1
    other_cos, other_sin = tables()
    check(cos, other_sin)  # same cos, another sin: not the kept tables
    assert len(built) == 2
    check(cos, sin)  # (the pair kept first is still valid)
    assert len(built) == 2
    with torch.no_grad():
        cos.copy_(other_cos)  # in place: new version, new tables
    check(cos, sin)
    assert len(built) == 3
    with torch.no_grad():
        sin.copy_(other_sin)
    check(cos, sin)
    assert len(built) == 4
    with torch.inference_mode():
        icos, isin = tables()
        check(icos, isin)
        check(icos, isin)
    assert len(built) == 6


def test_patch_model_reports_what_it_left_alone():
    class OddRMSNorm(torch.nn.Module):  # some other norm math: not ours to swap
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

    class ConvAttention(torch.nn.Module):  # an "attention" without q/k projections
        pass

    holder = torch.nn.Module()
    holder.norm, holder.attn = OddRMSNorm(), ConvAttention()
    report = fa_hf.patch_model(holder)
    assert report["rms_norm"] == 0 and report["rotary"] == 0 and report["swapped"] == {}
    assert set(report["left_alone"]) == {"OddRMSNorm", "rotary:ConvAttention"}
    assert type(holder.norm) is OddRMSNorm


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_patch_model_swaps_llama_copies(arch):
    """MixtralRMSNorm / Qwen2MoeRMSNorm are LlamaRMSNorm under another name (same forward
    source): patch_model swaps them (2 per layer + the final norm), and logits stay eager's."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "mixtral":
        cfg, norm_name = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2), "MixtralRMSNorm"
    else:
        cfg, norm_name = transformers.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, shared_expert_intermediate_size=32), \
            "Qwen2MoeRMSNorm"
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = copy.deepcopy(ref)
    norm_cls = type(model.model.norm)
    assert norm_cls.__name__ == norm_name and norm_cls is not LlamaRMSNorm
    report = fa_hf.patch_model(model)
    assert report["swapped"][norm_name] == 2 * 2 + 1 and report["rms_norm"] == 2 * 2 + 1
    assert norm_name not in report["left_alone"]
    assert isinstance(model.model.norm, fastattn.nn.RMSNorm)
    ids = ids_of(2, 11)
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max().item() <= 1e-4


def test_patch_model_leaves_near_copies_of_llama_norm_alone():
    """A norm whose forward differs from LlamaRMSNorm's by anything (here the weight applied in
    fp32, a different result dtype) is a variant patch_model does not know: left alone."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class NearRMSNorm(LlamaRMSNorm):
        def forward(self, hidden_states):
            input_dtype = hidden_states.dtype
            hidden_states = hidden_states.to(torch.float32)
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
            return (self.weight.float() * hidden_states).to(input_dtype)

    class InheritedRMSNorm(LlamaRMSNorm):  # Llama's forward itself: swapped
        pass

    holder = torch.nn.Module()
    holder.near, holder.inherited = NearRMSNorm(8), InheritedRMSNorm(8)
    report = fa_hf.patch_model(holder)
    assert report["swapped"] == {"InheritedRMSNorm": 1} and set(report["left_alone"]) == {"NearRMSNorm"}
    assert type(holder.near) is NearRMSNorm and isinstance(holder.inherited, fastattn.nn.RMSNorm)


def _softcap_pair(arch="gemma2"):
    fa_hf.register()
    cfg = _gemma_config(arch, num_hidden_layers=2, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    ref, mine = _eager_pair(cfg)
    with torch.no_grad():  # large scores, so that the cap (5) bends them
        for name, p in ref.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(20.0)
    mine.load_state_dict(ref.state_dict())
    mine.set_attn_implementation("fastattn")
    return ref, mine


def test_softcap_gemma2_matches_eager():
    """Gemma 2 (attention soft-capping, sliding layers) under attn_implementation="fastattn":
    the cap reaches the kernels when they take softcap=, else the model's eager attention runs
    it (never SDPA's 'does not support softcap' error)."""
    ref, mine = _softcap_pair()
    ids = ids_of(2, 13)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 9:] = 0  # right padding: the varlen path
    fa_hf.reset_stats()
    with torch.no_grad():
        for m in (None, mask):
            theirs, got = ref(ids, attention_mask=m).logits, mine(ids, attention_mask=m).logits
            keep = slice(None) if m is None else m.bool()
            _assert_logits_close(got[keep], theirs[keep])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(mine.generate(ids, **kw), ref.generate(ids, **kw))
    st = fa_hf.stats()
    if fa_hf._kernels_take_softcap():
        assert st["sdpa_fallback"] == 0 and st["fastattn"] > 0
    else:
        assert set(st["reasons"]) == {"soft-capped scores (this fastattn build's kernels have no softcap=)"}


def test_softcap_is_passed_to_the_kernels(monkeypatch):
    """The plumbing: with kernels that take softcap= (stand-ins on fastattn.reference here, so the
    test runs on any build), every Gemma 2 attention call passes the config's cap through."""
    from fastattn import reference

    calls = []

    def flash(q, k, v, *, causal=False, softmax_scale=None, window=(-1, -1), softcap=0.0):
        calls.append(("dense", softcap))
        return reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window=window,
                                   softcap=softcap)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, causal=False, softmax_scale=None, window=(-1, -1),
               softcap=0.0):
        calls.append(("varlen", softcap))
        return reference.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, softmax_scale=softmax_scale,
                                          window=window, softcap=softcap)

    monkeypatch.setattr(fastattn, "flash_attention", flash)
    monkeypatch.setattr(fastattn, "flash_attention_varlen", varlen)
    monkeypatch.setattr(fa_hf, "_kernels_take_softcap", lambda: True)
    ref, mine = _softcap_pair()
    ids = ids_of(2, 13)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :3] = 0  # left padding: the varlen path
    fa_hf.reset_stats()
    with torch.no_grad():
        _assert_logits_close(mine(ids).logits, ref(ids).logits)
        theirs, got = ref(ids, attention_mask=mask).logits, mine(ids, attention_mask=mask).logits
    _assert_logits_close(got[mask.bool()], theirs[mask.bool()])
    assert fa_hf.stats()["sdpa_fallback"] == 0
    assert {c[0] for c in calls} == {"dense", "varlen"} and all(c[1] == 5.0 for c in calls)


def test_patched_model_is_freed_without_a_garbage_collection():
    """From an outside memory audit: patch_model stored a bound method on each attention module
    (module -> method -> module), a reference cycle that kept the attention weights alive after
    `del model` until a full gc (on CUDA, memory torch.cuda.empty_cache() could not return).
    The forward holds its module weakly now; a deepcopy rebinds it to the copy."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config()).eval()
    model.set_attn_implementation("eager")
    fa_hf.patch_model(model)
    ids = ids_of(1, 7)
    with torch.no_grad():
        want = model(ids).logits
        clone = copy.deepcopy(model)
        assert torch.equal(clone(ids).logits, want)
        for p in clone.parameters():
            p.mul_(0.5)  # the copy runs on its own weights
        assert not torch.equal(clone(ids).logits, want)
        del clone
    weight = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)
    attn = weakref.ref(model.model.layers[0].self_attn)
    kept_forward = model.model.layers[0].self_attn.forward
    gc.collect()
    gc.disable()
    try:
        del model
        assert attn() is None and weight() is None
    finally:
        gc.enable()
    with pytest.raises(RuntimeError, match="belongs to a module that has been freed"):
        kept_forward(torch.zeros(1, 7, 64))


def test_packed_mask_cache_holds_no_cycle_when_cu_q_is_cu_k():
    """The packed-sequence mask is cached on cu_seq_lens_q; with the same tensor passed as
    cu_seq_lens_k it stored the tensor on itself (a cycle: tensor and mask lived until a full
    gc). Still cached: the second call returns the same mask."""
    import gc
    import weakref

    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    first = fa_hf._packed_from_cu_seq_lens(cu, cu, 1, 8, 8, True, torch.device("cpu"))
    assert fa_hf._packed_from_cu_seq_lens(cu, cu, 1, 8, 8, True, torch.device("cpu")) is first
    assert first.tolist() == [[1, 1, 1, 2, 2, 2, 2, 2]]
    other = cu.clone()  # a different cu_seq_lens_k is not a hit
    assert fa_hf._packed_from_cu_seq_lens(cu, other, 1, 8, 8, True, torch.device("cpu")) is not first
    cu2 = torch.tensor([0, 3, 8], dtype=torch.int32)
    fa_hf._packed_from_cu_seq_lens(cu2, cu2, 1, 8, 8, True, torch.device("cpu"))
    ref = weakref.ref(cu2)
    gc.collect()
    gc.disable()
    try:
        del cu2
        assert ref() is None
    finally:
        gc.enable()


def test_patched_model_pickled_runs_in_a_fresh_process(models, tmp_path):
    # torch.save of a patched model (attn_implementation="fastattn", patched norms and rotary),
    # torch.load in a process where neither register() nor patch_model ran: the first forward
    # of a patched attention redoes their process-wide part, after unpickling (with the
    # `kernels` package, transformers' pickled rotary wrappers are rebuilt from the modeling
    # file's apply_rotary_pos_emb, which must still be the original then). Same logits.
    import subprocess
    import sys

    _, ours = models
    model = copy.deepcopy(ours)
    fa_hf.patch_model(model)
    ids = ids_of(2, 11)
    with torch.no_grad():
        want = model(ids).logits
    torch.save({"model": model, "ids": ids, "want": want}, tmp_path / "patched.pt")
    child = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "d = torch.load(sys.argv[1], weights_only=False)\n"
        "import transformers.models.llama.modeling_llama as ml\n"
        "assert not hasattr(ml.apply_rotary_pos_emb, '_fastattn_original')\n"
        "with torch.no_grad():\n"
        "    got = d['model'](d['ids']).logits\n"
        "assert hasattr(ml.apply_rotary_pos_emb, '_fastattn_original'), 'rotary dispatcher not reinstalled'\n"
        "assert torch.equal(got, d['want']), (got - d['want']).abs().max()\n"
        "print('OK')\n"
    )
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", child, str(tmp_path / "patched.pt")], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-2000:]


def test_float64_is_sdpas(models, monkeypatch):
    # A float64 model raised the kernels' dtype ValueError, where fastattn.scaled_dot_product_attention
    # hands float64 to torch (training audit). (torch's flash-backend flag, which the SDPA drop-in
    # honours, is not read here: attn_implementation="fastattn" is the caller's explicit choice,
    # and a globally disabled torch flash backend must not switch it off.)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    eager, ours = models
    spy = Spy(monkeypatch, "flash_attention")
    ids = ids_of(2, 11)
    s64, o64 = copy.deepcopy(eager).double(), copy.deepcopy(ours).double()
    s64.set_attn_implementation("sdpa")  # (eager's softmax is fp32)
    fa_hf.reset_stats()
    with torch.no_grad():
        assert torch.equal(o64(ids).logits, s64(ids).logits)
    assert not spy.calls and fa_hf.stats()["sdpa_fallback"] == 2
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        ours(ids)
    assert len(spy.calls) == 2
    fa_hf.reset_stats()


def test_compiled_model_compiles_once_for_one_shape(models, monkeypatch):
    """Caches filled inside the first compiled call (per-config-class answers, transformers'
    mask-function code objects) changed during the trace: their guards failed on the next call,
    a second compile of the same shapes (sdpa: one; training-paths audit). register() fills the
    second, and nothing is cached while tracing."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    _, ours = models
    monkeypatch.setattr(fa_hf, "_EAGER_ONLY", {})  # as in a fresh process, before register()
    monkeypatch.setattr(fa_hf, "_MASK_CODES", None)
    fa_hf.register()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda ids: ours(ids).logits, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            f(ids_of(2, 9))
    torch._dynamo.reset()
    assert counter.frame_count == 1
