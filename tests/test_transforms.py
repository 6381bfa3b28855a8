"""Forward-mode AD and torch.func transforms (fastattn/ops.py: differentiating_transform).

fastattn's ops carry reverse-mode derivatives registered with torch.library.register_autograd,
which this torch serves neither in forward-mode AD nor under torch.func's grad transforms. So:

* the drop-ins (scaled_dot_product_attention, rms_norm, nn.RMSNorm) hand such calls to torch
  and give torch's derivatives (they used to return a zero tangent, or raise torch's
  setup_context error under torch.func.grad);
* every other op raises a RuntimeError naming the transform instead of a silently dropped
  tangent (the grad-off fast path ran the kernel below Autograd and lost it);
* the Hugging Face integration hands such attention calls to SDPA and keeps the model's own
  rotary there;
* torch.vmap, which the ops do serve, still runs the kernels.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastattn


def _qkv(L=3, S=7, E=8):
    torch.manual_seed(0)
    return torch.randn(1, 2, L, E), torch.randn(1, 2, S, E), torch.randn(1, 2, S, E)


def test_sdpa_jvp_and_grad_are_torchs():
    q, k, v = _qkv()
    tq = torch.randn_like(q)
    with sdpa_kernel(SDPBackend.MATH):  # (torch's CPU flash kernel has no forward AD itself)
        ours = torch.func.jvp(lambda a: fastattn.scaled_dot_product_attention(a, k, v, is_causal=True), (q,), (tq,))
        theirs = torch.func.jvp(lambda a: F.scaled_dot_product_attention(a, k, v, is_causal=True), (q,), (tq,))
    assert theirs[1].abs().max() > 0.1
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)
    g = torch.func.grad(lambda a: fastattn.scaled_dot_product_attention(a, k, v).square().sum())(q)
    g_ref = torch.func.grad(lambda a: F.scaled_dot_product_attention(a, k, v).square().sum())(q)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


@pytest.mark.parametrize("unit_offset", [False, True], ids=["plain", "unit_offset"])
def test_rms_norm_module_jvp_grad_jacrev(unit_offset):
    torch.manual_seed(0)
    x, tx = torch.randn(3, 8), torch.randn(3, 8)
    ours = fastattn.nn.RMSNorm(8, eps=1e-6, unit_offset=unit_offset)
    with torch.no_grad():
        ours.weight.normal_()
    scale = (1 + ours.weight) if unit_offset else ours.weight
    theirs = lambda a: F.rms_norm(a, (8,), scale.detach(), 1e-6)  # noqa: E731
    tangent = torch.func.jvp(ours, (x,), (tx,))[1]
    assert tangent.abs().max() > 0.1
    torch.testing.assert_close(tangent, torch.func.jvp(theirs, (x,), (tx,))[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.func.grad(lambda a: ours(a).square().sum())(x),
                               torch.func.grad(lambda a: theirs(a).square().sum())(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(theirs)(x), rtol=1e-6, atol=1e-6)


def test_rms_norm_forward_ad_with_residual():
    torch.manual_seed(0)
    x, r, tx, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    with fwAD.dual_level(), torch.no_grad():  # (forward AD works with grad mode off too)
        y, h = fastattn.rms_norm(fwAD.make_dual(x, tx), w, 1e-5, residual=r)
        y_ref = F.rms_norm(fwAD.make_dual(x, tx) + r, (16,), w, 1e-5)
        t, t_ref = fwAD.unpack_dual(y).tangent, fwAD.unpack_dual(y_ref).tangent
        assert t is not None and torch.equal(fwAD.unpack_dual(h).tangent, tx)
    torch.testing.assert_close(t, t_ref, rtol=1e-6, atol=1e-6)


def _ops_calls():
    q, k, v = (t.transpose(1, 2) for t in _qkv())
    cos, sin = torch.randn(16, 4), torch.randn(16, 4)
    kc, vc = torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)
    lens = torch.tensor([7], dtype=torch.int32)
    return {
        "flash_attention": lambda a: fastattn.flash_attention(a, k, v, causal=True),
        "apply_rotary": lambda a: fastattn.apply_rotary(a, a * 2, cos, sin)[0],
        "apply_rotary_inplace": lambda a: fastattn.apply_rotary(a.clone(), a * 2, cos, sin, inplace=True)[0],
        "decode_attention": lambda a: fastattn.decode_attention(a[:, 0], kc, vc, lens),
        "attention_with_kvcache": lambda a: fastattn.attention_with_kvcache(a, kc, vc, lens),
    }, q


@pytest.mark.parametrize("name", list(_ops_calls()[0]))
def test_other_ops_refuse_instead_of_dropping_the_tangent(name):
    calls, q = _ops_calls()
    fn = calls[name]
    with pytest.raises(RuntimeError, match="forward-mode AD .* is not supported"):
        torch.func.jvp(fn, (q,), (torch.randn_like(q),))
    with pytest.raises(RuntimeError, match="forward-mode AD .* is not supported"):
        with fwAD.dual_level(), torch.no_grad():
            fn(fwAD.make_dual(q, torch.randn_like(q)))
    with pytest.raises(RuntimeError, match=r"torch.func.grad / vjp / jacrev is not supported"):
        torch.func.grad(lambda a: fn(a).sum())(q)
    # constants inside a transform (nothing tracked) still run the kernels
    assert torch.equal(torch.func.grad(lambda a: a.sum() + fn(q.detach()).sum() * 0)(q), torch.ones_like(q))


def test_compiled_forward_ad_is_seen():
    """torch.compile of a jvp / jacfwd / dual level: the drop-ins give torch's tangents and the
    other ops refuse, as in eager (they once returned all-zero tangents under compile: the
    transform check was skipped while dynamo traced)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, tx, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    theirs = torch.func.jvp(lambda a: F.rms_norm(a, (8,), w, 1e-6), (x,), (tx,))[1]
    ours = torch.compile(lambda a, t: torch.func.jvp(lambda b: fastattn.rms_norm(b, w, 1e-6), (a,), (t,))[1],
                         fullgraph=True)(x, tx)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)

    def dual(a, t):
        with fwAD.dual_level():
            return fwAD.unpack_dual(fastattn.rms_norm(fwAD.make_dual(a, t), w, 1e-6)).tangent

    torch.testing.assert_close(torch.compile(dual)(x, tx), theirs, rtol=1e-6, atol=1e-6)
    q, k, v = _qkv()
    tq = torch.randn_like(q)
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(lambda a: F.scaled_dot_product_attention(a, k, v, is_causal=True), (q,), (tq,))[1]
        got = torch.compile(lambda a, t: torch.func.jvp(
            lambda b: fastattn.scaled_dot_product_attention(b, k, v, is_causal=True), (a,), (t,))[1])(q, tq)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    calls, qt = _ops_calls()
    with pytest.raises(Exception, match="forward-mode AD .* is not supported"):
        torch.compile(lambda a, t: torch.func.jvp(calls["flash_attention"], (a,), (t,))[1])(qt, torch.randn_like(qt))


def test_compiled_grad_transforms_are_torchs_for_the_drop_ins():
    """torch.compile(torch.func.grad / jacrev / vmap(grad)) over the drop-ins: torch's
    derivatives, as in eager (outside audit: the transform went unseen while dynamo traced, and
    compiling failed with torch's setup_context error); the other ops refuse by name; a compiled
    vmap alone still runs fastattn's kernels."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 8), torch.randn(8)
    q, k, v = _qkv()
    cases = [(lambda a: fastattn.rms_norm(a, w, 1e-6).pow(3).sum(), lambda a: F.rms_norm(a, (8,), w, 1e-6).pow(3).sum(),
              x),
             (lambda a: fastattn.scaled_dot_product_attention(a, k, v, is_causal=True).pow(2).sum(),
              lambda a: F.scaled_dot_product_attention(a, k, v, is_causal=True).pow(2).sum(), q)]
    for ours, theirs, a in cases:
        stacked = torch.stack([a, 2 * a])  # vmap(grad): per-sample gradients over a batch of two
        for transform, arg in ((torch.func.grad, a), (torch.func.jacrev, a),
                               (lambda f: torch.vmap(torch.func.grad(f)), stacked)):
            torch._dynamo.reset()
            got = torch.compile(transform(ours), fullgraph=True)(arg)
            torch.testing.assert_close(got, transform(theirs)(arg), rtol=1e-5, atol=1e-5)
    calls, qt = _ops_calls()
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"fastattn .*torch.func.grad / vjp / jacrev is not supported"):
        torch.compile(torch.func.grad(lambda a: calls["flash_attention"](a).sum()), fullgraph=True)(qt)
    qs = torch.stack([qt[0], 2 * qt[0]])
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    out = torch.compile(torch.vmap(lambda r: calls["flash_attention"](r[None])[0]), backend=backend, fullgraph=True)(qs)
    torch.testing.assert_close(out, torch.vmap(lambda r: calls["flash_attention"](r[None])[0])(qs), rtol=0, atol=0)
    assert any("fastattn.flash_attn_fwd" in str(gm.graph) for gm in graphs)
    # a compiled jvp whose tangents never reach the op: the op runs (only tangents are refused)
    torch._dynamo.reset()
    t = torch.randn(())
    want = torch.func.jvp(lambda s: calls["flash_attention"](qt) * s, (torch.ones(()),), (t,))
    got = torch.compile(lambda s, ts: torch.func.jvp(lambda b: calls["flash_attention"](qt) * b, (s,), (ts,)),
                        fullgraph=True)(torch.ones(()), t)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_grad_of_vmap_is_torchs_for_the_drop_ins():
    """grad(vmap(f)) (per-sample gradients): f sees a vmap-batched tensor around the grad
    transform's tracking tensor; the drop-ins once missed the inner level and raised torch's
    setup_context error, the other ops raised torch's error instead of fastattn's."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 4, 8), torch.randn(8)
    ours = torch.func.grad(lambda a: torch.vmap(lambda r: fastattn.rms_norm(r, w, 1e-6))(a).pow(2).sum())(x)
    theirs = torch.func.grad(lambda a: torch.vmap(lambda r: F.rms_norm(r, (8,), w, 1e-6))(a).pow(2).sum())(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    q, k, v = torch.randn(3, 2, 5, 8), torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    ours = torch.func.grad(lambda a: torch.vmap(
        lambda r: fastattn.scaled_dot_product_attention(r, k, v))(a).square().sum())(q)
    theirs = torch.func.grad(lambda a: torch.vmap(lambda r: F.scaled_dot_product_attention(r, k, v))(a).square().sum())(q)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"fastattn .*torch.func.grad / vjp / jacrev is not supported"):
        kb, vb = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, 7, 2, 8)
        torch.func.grad(lambda a: torch.vmap(lambda r: fastattn.flash_attention(r, kb, vb))(a).sum())(
            q.transpose(1, 2)[:, None])


def test_nested_transforms_raise():
    """jvp / grad around or inside vmap: an error naming the problem, never a silent tangent."""
    calls, q = _ops_calls()
    f = lambda a: calls["flash_attention"](a[None])[0]  # noqa: E731
    qs = torch.stack([q[0], 2 * q[0]])
    with pytest.raises(RuntimeError, match="forward-mode AD .* is not supported"):
        torch.func.jvp(torch.vmap(f), (qs,), (torch.randn_like(qs),))
    with pytest.raises(RuntimeError, match="forward-mode AD .* is not supported"):
        torch.vmap(lambda a, t: torch.func.jvp(f, (a,), (t,))[1])(qs, torch.randn_like(qs))
    with pytest.raises(RuntimeError, match="torch.func.grad / vjp / jacrev is not supported"):
        torch.vmap(torch.func.grad(lambda a: f(a).sum()))(qs)
    with pytest.raises(RuntimeError):  # (torch's own setup_context error: the op runs under vmap's fallback)
        torch.func.grad(lambda a: torch.vmap(f)(a).sum())(qs)


def test_vmap_still_runs_the_kernels():
    q, k, v = (t.transpose(1, 2) for t in _qkv())
    qs = torch.stack([q[0], 2 * q[0]])  # (2, L, H, E): vmap over a batch of single sequences
    out = torch.vmap(lambda a: fastattn.flash_attention(a[None], k, v)[0])(qs)
    for i in range(2):
        torch.testing.assert_close(out[i], fastattn.flash_attention(qs[i:i + 1], k, v)[0], rtol=0, atol=0)


def test_hf_model_under_func_grad_and_jvp_matches_sdpa():
    transformers = pytest.importorskip("transformers")
    import copy
    import warnings

    import fastattn.integrations.transformers as fa_hf

    fa_hf.register()
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    sdpa = transformers.LlamaForCausalLM(cfg).eval()
    sdpa.config._attn_implementation = "sdpa"
    ours = copy.deepcopy(sdpa)
    ours.set_attn_implementation("fastattn")
    fa_hf.patch_model(ours)
    emb, t = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    loss = lambda m: (lambda e: m(inputs_embeds=e).logits.square().sum())  # noqa: E731
    fa_hf.reset_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one-time fallback warning
        g = torch.func.grad(loss(ours))(emb)
        with sdpa_kernel(SDPBackend.MATH):
            j = torch.func.jvp(lambda e: ours(inputs_embeds=e).logits, (emb,), (t,))[1]
            j_ref = torch.func.jvp(lambda e: sdpa(inputs_embeds=e).logits, (emb,), (t,))[1]
    torch.testing.assert_close(g, torch.func.grad(loss(sdpa))(emb), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(j, j_ref, rtol=1e-5, atol=1e-6)
    reasons = fa_hf.stats()["reasons"]
    assert any("torch.func.grad" in r for r in reasons) and any("forward-mode AD" in r for r in reasons), reasons
    # and outside the transforms the kernels run again
    fa_hf.reset_stats()
    with torch.no_grad():
        ours(inputs_embeds=emb)
    assert fa_hf.stats()["fastattn"] == 2
