"""patch_model's RMSNorm swap under autocast: a Hugging Face LLaMA-family model whose
RMSNorm modules were replaced by fastattn.nn.RMSNorm must run under torch.autocast (16-bit
activations meet the fp32 norm weights there) and agree with the unpatched model."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import DEVICES, max_err

transformers = pytest.importorskip("transformers")
fa_hf = pytest.importorskip("fastattn.integrations.transformers")


def _tiny(arch):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    # Qwen3 normalises q and k per head (q_norm / k_norm) right after the projections, so
    # under autocast those norms see bf16 activations with fp32 weights.
    if not hasattr(transformers, "Qwen3Config"):
        pytest.skip("this transformers has no Qwen3")
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("ac_dtype", [torch.bfloat16, torch.float16])
def test_patched_model_under_autocast(device, arch, ac_dtype):
    torch.manual_seed(0)
    plain = _tiny(arch).to(device).eval()
    plain.set_attn_implementation("eager")
    patched = copy.deepcopy(plain)
    counts = fa_hf.patch_model(patched)
    assert counts["rms_norm"] > 0
    ids = torch.randint(0, 128, (2, 12), device=device)

    with torch.no_grad():
        true = plain(ids).logits.double()  # fp32, no autocast: the yardstick
        with torch.autocast(device, dtype=ac_dtype):
            ref = plain(ids).logits
            ours = patched(ids).logits
    assert ours.dtype == ref.dtype
    err, ref_err = max_err(ours, true), max_err(ref, true)
    assert err <= 2 * ref_err + 1e-4, f"patched {err:.3e} vs unpatched {ref_err:.3e} under autocast"


@pytest.mark.parametrize("device", DEVICES)
def test_patched_model_trains_under_autocast(device):
    # Gradients reach the fp32 norm weights, in fp32, under autocast.
    torch.manual_seed(0)
    plain = _tiny("llama").to(device)
    plain.set_attn_implementation("eager")
    patched = copy.deepcopy(plain)
    fa_hf.patch_model(patched)
    ids = torch.randint(0, 128, (2, 12), device=device)
    grads = []
    for m in (plain, patched):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = m(ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if "norm" in n})
    for name, g in grads[1].items():
        assert g is not None and g.dtype == torch.float32, name
        torch.testing.assert_close(g, grads[0][name], rtol=5e-2, atol=5e-2 * grads[0][name].abs().max().item())
