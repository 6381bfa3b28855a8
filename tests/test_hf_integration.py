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
    assert len(spy.calls) == 2 and all(c["causal"] for c in spy.calls)  # one per layer, causal kept


def test_generate_with_cache_matches_eager(models, monkeypatch):
    eager, ours = models
    spy = Spy(monkeypatch, "flash_attention")
    ids = ids_of(2, 7)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), eager.generate(ids, **kw))
    assert len(spy.calls) == 2 * 8  # prefill + 7 decode steps (query length 1, bottom-right causal)


def test_padding_mask_falls_back_exactly(models, monkeypatch):
    eager, ours = models
    spy = Spy(monkeypatch, "flash_attention")
    ids = ids_of(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding: not expressible by the flash kernel
    with torch.no_grad():
        theirs, mine = eager(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    assert (mine - theirs)[mask.bool()].abs().max().item() <= 1e-4
    assert spy.calls == []  # went to transformers' SDPA with the mask, not silently unmasked


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
    assert counts == {"rms_norm": 2 * 2 + 1, "rotary": 2}
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
    assert fa_hf.patch_model(model) == {"rms_norm": 0, "rotary": 0}
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
    """bf16 with attn_implementation="fastattn" vs bf16 eager, both against fp32 eager."""
    eager, ours = models
    truth = copy.deepcopy(eager).to(device)
    low = copy.deepcopy(eager).to(device, torch.bfloat16)
    mine = copy.deepcopy(ours).to(device, torch.bfloat16)
    ids = ids_of(2, 40).to(device)
    with torch.no_grad():
        assert_error_ratio(mine(ids).logits.float(), low(ids).logits.float(), truth(ids).logits, "logits", atol=1e-2)
