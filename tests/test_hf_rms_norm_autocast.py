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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padded"])
def test_fastattn_attention_under_autocast_without_patching(device, arch, padded):
    # attn_implementation="fastattn" alone (no patch_model): the model's own rotary turns the
    # autocast bf16 q and k back to fp32 beside a bf16 v, and the kernels refused the mix
    # (ValueError); the attention function now casts as SDPA's autocast policy does.
    fa_hf.register()
    torch.manual_seed(0)
    sdpa = _tiny(arch).to(device)
    sdpa.set_attn_implementation("sdpa")
    ours = copy.deepcopy(sdpa)
    ours.set_attn_implementation("fastattn")
    ids = torch.randint(0, 128, (2, 12), device=device)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0  # left padding: the varlen path
    grads = []
    for m in (sdpa, ours):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = m(ids, attention_mask=mask, labels=ids)
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad)
    with torch.no_grad():
        true = sdpa(ids, attention_mask=mask).logits.double()
        with torch.autocast(device, dtype=torch.bfloat16):
            ref, got = sdpa(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    real = mask.bool()
    err, ref_err = max_err(got[real], true[real]), max_err(ref[real], true[real])
    assert err <= 2 * ref_err + 1e-4, f"fastattn {err:.3e} vs sdpa {ref_err:.3e} under autocast"
    torch.testing.assert_close(grads[1], grads[0], rtol=5e-2, atol=5e-2 * grads[0].abs().max().item())


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                              (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("residual", [False, True])
def test_patched_llama_norm_has_transformers_bits(x_dtype, w_dtype, residual):
    # LlamaRMSNorm rounds the normalised rows to x's dtype before the weight multiplies them;
    # the swapped-in norm fused the weight (one rounding): ~1/4 of the bf16 elements were 1 ulp
    # off transformers', and with an fp32 weight every element was rounded to bf16 where
    # transformers keeps the fp32 product (an outside audit). Now bitwise here, dweight included
    # (elsewhere an fp32 mean square summed in another order can flip a rare rounding).
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    hf = LlamaRMSNorm(257, eps=1e-5).to(w_dtype)
    with torch.no_grad():
        hf.weight.normal_()
    model = torch.nn.Sequential(copy.deepcopy(hf))
    assert fa_hf.patch_model(model)["rms_norm"] == 1
    ours = model[0]
    x = torch.randn(3, 7, 257).to(x_dtype).requires_grad_()
    r = torch.randn(3, 7, 257).to(x_dtype) if residual else None
    want = hf(x if r is None else x + r)
    got = ours(x) if r is None else ours(x, r)
    if r is not None:
        assert torch.equal(got[1], x + r)
        got = got[0]
    assert got.dtype == want.dtype and torch.equal(got, want)
    gw = torch.autograd.grad(want.float().square().sum(), [x, hf.weight])
    gg = torch.autograd.grad(got.float().square().sum(), [x, ours.weight])
    assert torch.equal(gg[1], gw[1])  # dweight: the same products and reduction
    assert max_err(gg[0], gw[0]) <= 2 * max_err(gw[0].float(), gw[0]) + 1e-2 * gw[0].float().abs().max()


def test_patched_llama_norm_with_a_wider_residual():
    # normed rows rounded to x's dtype where the normalised tensor is h = x + residual, of the
    # promoted dtype: bf16 x with an fp32 residual came back bf16, 1e-2 off (reviewer).
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    hf = LlamaRMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.normal_()
    model = torch.nn.Sequential(copy.deepcopy(hf))
    fa_hf.patch_model(model)
    x, r = torch.randn(3, 64).to(torch.bfloat16), torch.randn(3, 64)
    y, h = model[0](x, r)
    want = hf(x + r)
    assert h.dtype == y.dtype == want.dtype == torch.float32
    assert max_err(y, want) <= 4 * torch.finfo(torch.float32).eps * want.abs().max()
