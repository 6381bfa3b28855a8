"""Mixture-of-experts feed-forward (fastattn.models.moe) and the MoE decoders built on it
(Mixtral, Qwen2-MoE, Qwen3-MoE through fastattn.models.Llama).

The module is checked against a naive loop over tokens (exact in fp32 up to summation order),
including routing ties, both renormalisation settings and the shared expert; the decoders
against transformers on tiny random checkpoints (2 layers, GQA, 4 experts top-2) saved with
save_pretrained in both of its layouts: fp32 logits, greedy tokens of a ragged batch on both
backends, bf16 runs, and clear errors for what is not supported."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from fastattn.models import Llama, LlamaConfig
from fastattn.models import moe as moe_mod
from fastattn.models.moe import MoEFeedForward

from conftest import assert_error_ratio

BACKENDS = ["fastattn", "torch"]
VOCAB = 128
NEW_TOKENS = 16


# ---- the module against a per-token loop ---------------------------------------------------
def naive_moe(m: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token at a time, in fp32."""
    x2 = x.reshape(-1, m.hidden_size).float()
    I = m.intermediate_size
    out = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        xt = x2[t]
        probs = torch.softmax(m.router.weight.float() @ xt, dim=-1)
        w, ids = torch.topk(probs, m.top_k)
        if m.norm_topk_prob:
            w = w / w.sum()
        for j in range(m.top_k):
            e = int(ids[j])
            h = m.w13[e].float() @ xt
            y = m.w2[e].float() @ (F.silu(h[:I]) * h[I:])
            out[t] += w[j] * y
        if m.shared_intermediate_size:
            S = m.shared_intermediate_size
            h = m.shared_w13.weight.float() @ xt
            y = m.shared_w2.weight.float() @ (F.silu(h[:S]) * h[S:])
            out[t] += torch.sigmoid(m.shared_gate.weight.float() @ xt)[0] * y
    return out.view(x.shape)


def make_moe(seed=0, hidden=32, inter=24, experts=4, top_k=2, **kw):
    torch.manual_seed(seed)
    m = MoEFeedForward(hidden, inter, experts, top_k, **kw)
    with torch.no_grad():
        m.router.weight.normal_(0, 0.5)  # decisive routing, no near-ties
    return m.eval()


@pytest.mark.parametrize("top_k,norm,shared", [(2, True, 0), (2, False, 0), (1, True, 0), (3, False, 40),
                                               (2, True, 40), (4, True, 0)])
def test_module_matches_per_token_loop(top_k, norm, shared):
    m = make_moe(top_k=top_k, norm_topk_prob=norm, shared_expert_intermediate_size=shared)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        ours, ref = m(x), naive_moe(m, x)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-5
    # the autograd path (per-expert SwiGLU, concatenated) gives the same numbers
    assert (m(x).detach() - ours).abs().max().item() <= 1e-6


def test_strided_input_on_the_kernel_path():
    # x is any (..., hidden) view: a transposed or sliced activation takes the experts kernel
    # like a contiguous one (the kernel refused a last-dim stride != 1 with a ValueError)
    m = make_moe(top_k=2)
    x = torch.randn(32, 5).t()
    with torch.no_grad():
        assert m.uses_kernel(x) and x.stride(-1) != 1
        assert (m(x) - naive_moe(m, x)).abs().max().item() <= 1e-5
        wide = torch.randn(4, 64)[:, ::2]
        assert (m(wide) - naive_moe(m, wide)).abs().max().item() <= 1e-5


def test_one_token_and_an_expert_nobody_picks():
    m = make_moe(experts=8, top_k=2)
    x = torch.randn(1, 32)  # one token: 6 of the 8 experts get no rows
    with torch.no_grad():
        assert (m(x) - naive_moe(m, x)).abs().max().item() <= 1e-5
        assert m(x[:0]).shape == (0, 32)


def test_routing_ties_follow_topk():
    """All router logits equal: every expert ties, the experts are those torch.topk picks and
    the weights are 1/E (raw) or 1/k (renormalised); the output still equals the loop's."""
    for norm in (False, True):
        m = make_moe(experts=4, top_k=2, norm_topk_prob=norm)
        with torch.no_grad():
            m.router.weight.zero_()
            x = torch.randn(5, 32)
            w, ids = m.route(x)
            _, expect = torch.topk(torch.full((5, 4), 0.25), 2, dim=-1)
            assert torch.equal(ids, expect)
            assert torch.allclose(w, torch.full_like(w, 0.5 if norm else 0.25))
            assert (m(x) - naive_moe(m, x)).abs().max().item() <= 1e-5
    # two experts with identical router rows always tie with each other
    m = make_moe(experts=4, top_k=2, norm_topk_prob=False)
    with torch.no_grad():
        m.router.weight[3] = m.router.weight[1]
        x = torch.randn(9, 32)
        w, ids = m.route(x)
        probs = torch.softmax(x @ m.router.weight.t(), dim=-1)
        assert torch.equal(ids, torch.topk(probs, 2, dim=-1).indices)
        assert (m(x) - naive_moe(m, x)).abs().max().item() <= 1e-5


def test_renormalisation_flag():
    x = torch.randn(6, 32)
    raw = make_moe(seed=3, norm_topk_prob=False)
    normed = make_moe(seed=3, norm_topk_prob=True)
    with torch.no_grad():
        w_raw, ids_raw = raw.route(x)
        w_norm, ids_norm = normed.route(x)
    assert torch.equal(ids_raw, ids_norm)
    assert torch.allclose(w_norm.sum(-1), torch.ones(6))
    assert (w_raw.sum(-1) < 1 - 1e-3).all()
    assert torch.allclose(w_norm, w_raw / w_raw.sum(-1, keepdim=True))
    # the Qwen routers round the top-k weights to the activation dtype
    q = make_moe(seed=3, norm_topk_prob=False, router_weights_in_input_dtype=True).to(torch.bfloat16)
    with torch.no_grad():
        w_q, _ = q.route(x.bfloat16())
    assert w_q.dtype == torch.float32 and torch.equal(w_q, w_q.bfloat16().float())


def test_shared_expert():
    m = make_moe(shared_expert_intermediate_size=40)
    plain = make_moe()  # same seed: same router and experts, no shared expert
    with torch.no_grad():
        plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("shared")})
        x = torch.randn(4, 32)
        h = x @ m.shared_w13.weight.t()
        mlp = (F.silu(h[:, :40]) * h[:, 40:]) @ m.shared_w2.weight.t()
        expect = plain(x) + torch.sigmoid(x @ m.shared_gate.weight.t()) * mlp
        assert (m(x) - expect).abs().max().item() <= 1e-5
        m.shared_gate.weight.zero_()  # gate 0.5
        assert (m(x) - plain(x) - 0.5 * mlp).abs().max().item() <= 1e-5


def test_gradients_match_the_loop():
    m = make_moe(shared_expert_intermediate_size=16).train()
    x = torch.randn(10, 32, requires_grad=True)
    g = torch.randn(10, 32)
    (m(x) * g).sum().backward()
    ours = [x.grad, m.w13.grad, m.w2.grad, m.router.weight.grad, m.shared_gate.weight.grad]
    x2 = x.detach().clone().requires_grad_()
    m.zero_grad()
    (naive_moe(m, x2) * g).sum().backward()
    ref = [x2.grad, m.w13.grad, m.w2.grad, m.router.weight.grad, m.shared_gate.weight.grad]
    for a, b in zip(ours, ref):
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_both_expert_paths(dtype, monkeypatch):
    """Experts with many tokens multiply in fp32 (CPU), those with few natively: both within
    the error-ratio rule of the fp32 module, and they agree with each other."""
    m = make_moe(experts=4, top_k=2, shared_expert_intermediate_size=40)
    x = torch.randn(64, 32)  # ~32 rows per expert
    monkeypatch.setitem(moe_mod.NATIVE_CPU_MATMUL, dtype, False)  # a CPU without bf16/fp16 matrix units
    with torch.no_grad():
        ref = m(x)
        low = m.to(dtype)
        monkeypatch.setattr(moe_mod, "UPCAST_MIN_ROWS", 1)
        wide = low(x.to(dtype))
        monkeypatch.setattr(moe_mod, "UPCAST_MIN_ROWS", 10 ** 9)
        native = low(x.to(dtype))
    assert wide.dtype == dtype and native.dtype == dtype
    rounded = make_moe(experts=4, top_k=2, shared_expert_intermediate_size=40).to(dtype).float()
    with torch.no_grad():
        truth = rounded(x.to(dtype).float())  # the same rounded weights, fp32 math
    assert_error_ratio(wide.float(), native.float(), truth, f"{dtype} moe", atol=1e-3)
    assert (wide.float() - native.float()).abs().max().item() <= 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_native_cpu_matmul_widens_no_expert(dtype, monkeypatch):
    """On a CPU with matrix instructions for the dtype every expert multiplies natively, however
    many tokens it has: the upcast threshold no longer matters, and the result is not the
    widened path's."""
    m = make_moe(experts=4, top_k=2).to(dtype)
    x = torch.randn(64, 32).to(dtype)  # ~32 rows per expert
    with torch.no_grad():
        monkeypatch.setitem(moe_mod.NATIVE_CPU_MATMUL, dtype, True)
        monkeypatch.setattr(moe_mod, "UPCAST_MIN_ROWS", 10 ** 9)
        native = m(x)
        monkeypatch.setattr(moe_mod, "UPCAST_MIN_ROWS", 1)
        with_units = m(x)
        monkeypatch.setitem(moe_mod.NATIVE_CPU_MATMUL, dtype, False)
        widened = m(x)
    assert torch.equal(with_units, native)
    assert not torch.equal(widened, native)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoEFeedForward(32, 24, 4, 5)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoEFeedForward(32, 24, 4, 0)
    # an input whose last dim is not hidden_size but whose size divides by it was folded into
    # rows of hidden_size and returned in its shape: a wrong answer, no error (MoE audit)
    m = make_moe()
    for shape in [(2, 3, 16), (4, 64), (128,), (3, 33)]:
        for backend in BACKENDS:
            with pytest.raises(ValueError, match=r"x must be \(\.\.\., hidden_size\) = \(\.\.\., 32\)"):
                m(torch.randn(shape), backend=backend)


# ---- the experts kernel (torch.ops.fastattn.moe_experts, CPU) -------------------------------
def kernel(m: MoEFeedForward, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastattn.moe_experts(x, weights, ids, m.w13, m.w2)


def routed(m: MoEFeedForward, n: int, dtype=torch.float32, seed=0):
    x = torch.randn(n, m.hidden_size, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():
        weights, ids = m.route(x)
    return x, weights, ids


# (hidden, inter, experts, top_k, tokens): odd sizes (vector tails, odd pair counts), one expert
# (all rows in it: 13 > the kernel's 4-row block), top_k = E, and M per expert from 1 upwards.
KERNEL_CASES = [(32, 24, 4, 2, 1), (32, 24, 4, 2, 5), (111, 97, 8, 2, 13), (111, 97, 1, 1, 13),
                (64, 40, 4, 4, 6), (17, 9, 3, 3, 2), (48, 16, 2, 1, 9)]


@pytest.mark.parametrize("hidden,inter,experts,top_k,tokens", KERNEL_CASES)
def test_kernel_matches_torch_experts_fp32(hidden, inter, experts, top_k, tokens):
    """fp32: the kernel equals the module's torch experts up to summation order. Tolerance:
    both sum hidden (then inter) fp32 products in different orders (8 lanes + a horizontal
    sum vs BLAS blocking) and the kernel's silu uses a polynomial exp (2e-7 relative), so the
    two differ by a few fp32 ulps of the largest partial sums: 2e-6 of max |out|."""
    m = make_moe(hidden=hidden, inter=inter, experts=experts, top_k=top_k)
    x, weights, ids = routed(m, tokens)
    with torch.no_grad():
        ours = kernel(m, x, weights, ids)
        ref = m.experts(x, weights, ids)
    assert ours.dtype == torch.float32 and ours.shape == (tokens, hidden)
    assert (ours - ref).abs().max().item() <= 2e-6 * ref.abs().max().item()
    # and the definition (the per-token loop) in the same tolerance
    truth = naive_moe(m, x)
    assert (ours - truth).abs().max().item() <= 2e-6 * truth.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("hidden,inter,experts,top_k,tokens", [(111, 97, 8, 2, 13), (64, 40, 4, 4, 6), (17, 9, 3, 3, 2),
                                                              (1000, 160, 4, 2, 5)])
def test_kernel_low_precision_error_ratio(dtype, hidden, inter, experts, top_k, tokens):
    """bf16/fp16 weights widened in registers (bf16 on vdpbf16ps where the CPU has
    AVX512-BF16), fp32 sums, the activation rounded to the dtype: within the error-ratio rule of the module's torch experts in the same dtype, both against
    fp32 math on the same rounded weights and inputs."""
    m = make_moe(hidden=hidden, inter=inter, experts=experts, top_k=top_k).to(dtype)
    x, weights, ids = routed(m, tokens, dtype)
    with torch.no_grad():
        ours = kernel(m, x, weights, ids)
        low = m.experts(x, weights, ids)
        m32 = make_moe(hidden=hidden, inter=inter, experts=experts, top_k=top_k).to(dtype).float()
        truth = m32.experts(x.float(), weights, ids)
    assert_error_ratio(ours, low, truth, f"{dtype} moe_experts", atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_strided_inputs_and_thread_count(dtype):
    """x and the weights read through their strides (row-strided x, padded weight rows of odd
    length, so 16-bit rows start off cache lines, every other expert): the same bits as on
    contiguous copies, and the same bits with one thread and with two. fp32 also equals the
    torch experts to summation order. hidden 40 and inter 28 leave tails on every vector path."""
    m = make_moe(hidden=40, inter=28, experts=6, top_k=2).to(dtype)
    base = torch.randn(7, 2 * 40).to(dtype)
    x = base[:, 8:48]  # row stride 80
    assert not x.is_contiguous()
    w13_pad = torch.randn(12, 56, 47).to(dtype)
    w2_pad = torch.randn(12, 40, 33).to(dtype)
    with torch.no_grad():
        w13_pad[::2, :, :40] = m.w13
        w2_pad[::2, :, :28] = m.w2
    w13, w2 = w13_pad[::2, :, :40], w2_pad[::2, :, :28]
    with torch.no_grad():
        weights, ids = m.route(x)
        ours = torch.ops.fastattn.moe_experts(x, weights, ids, w13, w2)
        assert torch.equal(ours, torch.ops.fastattn.moe_experts(x.contiguous(), weights, ids, m.w13, m.w2))
        if dtype == torch.float32:
            ref = m.experts(x.contiguous(), weights, ids)
            assert (ours - ref).abs().max().item() <= 2e-6 * ref.abs().max().item()
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = torch.ops.fastattn.moe_experts(x, weights, ids, w13, w2)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, ours)


@pytest.mark.parametrize("shared", [0, 40], ids=["mixtral", "shared_expert"])
@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_module_uses_the_kernel_on_the_fastattn_backend(shared, tokens, monkeypatch):
    """Few tokens per expert, no autograd, CPU: forward (backend "fastattn", the default) runs
    the kernel; backend "torch" and autograd run the torch experts; all agree (fp32)."""
    m = make_moe(experts=8, top_k=2, shared_expert_intermediate_size=shared)
    x = torch.randn(1, tokens, 32)
    calls = []
    real = MoEFeedForward.uses_kernel
    monkeypatch.setattr(MoEFeedForward, "uses_kernel", lambda self, *a: calls.append(real(self, *a)) or calls[-1])
    with torch.no_grad():
        fa, pt = m(x), m(x, backend="torch")
    assert calls == [True, False]
    graded = m(x)  # parameters require grad: the autograd path
    assert calls[-1] is False and graded.requires_grad
    ref = naive_moe(m, x)
    for out in (fa, pt, graded.detach()):
        assert out.shape == x.shape and (out - ref).abs().max().item() <= 2e-6 * ref.abs().max().item()
    with torch.no_grad():  # many tokens per expert: torch's GEMMs
        assert not m.uses_kernel(torch.randn(8 * moe_mod.KERNEL_MAX_ROWS_PER_EXPERT, 32))


def test_kernel_opcheck():
    m = make_moe(hidden=24, inter=20, experts=4, top_k=2)
    x, weights, ids = routed(m, 5)
    w13, w2 = m.w13.detach(), m.w2.detach()
    torch.library.opcheck(torch.ops.fastattn.moe_experts.default, (x, weights, ids, w13, w2))


def test_kernel_argument_errors():
    m = make_moe(hidden=24, inter=20, experts=4, top_k=2)
    x, weights, ids = routed(m, 5)
    w13, w2 = m.w13.detach(), m.w2.detach()
    op = torch.ops.fastattn.moe_experts
    bad = [
        (dict(x=x.t().contiguous().t()), "x must have a contiguous last dimension"),
        (dict(x=x[None]), "x must have 2 dims"),
        (dict(x=x.long()), "x must be float32, float16 or bfloat16"),
        (dict(w13=w13.half()), "w13 has dtype"),
        (dict(w13=w13[:, :, :20]), "w13 must have shape"),
        (dict(w13=w13[:, :39]), "w13 must have shape"),
        (dict(w2=w2[:3]), "w2 must have shape"),
        (dict(w2=w2[0]), "w2 must have 3 dims"),
        (dict(weights=weights.half()), "routing_weights must be float32"),
        (dict(weights=weights[:, :1]), "routing_weights must have expert_ids' shape"),
        (dict(ids=ids.int()), "expert_ids must be int64"),
        (dict(ids=ids[:4]), "expert_ids must have shape"),
        (dict(ids=ids + 3), r"expert_ids must lie in \[0, 4\)"),
        (dict(ids=ids - 1), r"expert_ids must lie in \[0, 4\)"),
    ]
    for change, message in bad:
        args = dict(x=x, weights=weights, ids=ids, w13=w13, w2=w2)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            op(args["x"], args["weights"], args["ids"], args["w13"], args["w2"])
    with pytest.raises(RuntimeError, match="not differentiable"):
        op(x.requires_grad_(), weights, ids, w13, w2).sum().backward()


# ---- Hugging Face decoders -----------------------------------------------------------------
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)

ARCHS = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2)),
    # raw top-k weights (norm_topk_prob False), a shared expert, layer 1 dense (mlp_only_layers)
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                       shared_expert_intermediate_size=80, norm_topk_prob=False, mlp_only_layers=[1])),
    # q/k norms, renormalised top-k, head_dim 32 != hidden / heads
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                       head_dim=32)),
}


@pytest.mark.parametrize("backend", ["fastattn", "torch"])
def test_router_only_training(backend):
    # Frozen experts, trainable router (router fine-tuning): the call is differentiated through
    # the routing weights alone. The fastattn backend ran the kernel (no derivative) and the
    # backward raised.
    m = make_moe(shared_expert_intermediate_size=16).train()
    for p in m.parameters():
        p.requires_grad_(p is m.router.weight)
    x = torch.randn(6, 32)
    assert not m.uses_kernel(x, backend)
    g = torch.randn(6, 32)
    (m(x, backend) * g).sum().backward()
    ours = m.router.weight.grad.clone()
    m.zero_grad()
    (naive_moe(m, x) * g).sum().backward()
    assert (ours - m.router.weight.grad).abs().max().item() <= 1e-6 and ours.abs().max() > 0


@pytest.mark.parametrize("backend", ["fastattn", "torch"])
def test_forward_mode_ad(backend):
    # torch.func.jvp through a frozen module: the kernel dropped the tangent (zeros, no error)
    # and the torch backend's out= matmuls raised; both now take the differentiable experts.
    m = make_moe(shared_expert_intermediate_size=16).requires_grad_(False)
    x, t = torch.randn(5, 32), torch.randn(5, 32)
    _, tangent = torch.func.jvp(lambda a: m(a, backend), (x,), (t,))
    _, want = torch.func.jvp(lambda a: naive_moe(m, a), (x,), (t,))
    assert (tangent - want).abs().max().item() <= 1e-5 and want.abs().max() > 0


def test_float64_without_grad_takes_the_torch_experts():
    # fp64: off the kernel under no_grad (it raised a ValueError), and the experts run in fp64
    # (they were rounded to fp32); the routing weights are fp32 softmaxes, as transformers'.
    m = make_moe(shared_expert_intermediate_size=16).double().requires_grad_(False)
    x = torch.randn(3, 32, dtype=torch.float64)
    assert not m.uses_kernel(x)
    with torch.no_grad():
        out = m(x)
        weights, ids = m.route(x)
        want = torch.zeros_like(x)
        I = m.intermediate_size
        for t in range(3):
            for j in range(m.top_k):
                h = m.w13[ids[t, j]] @ x[t]
                want[t] += weights[t, j].double() * (m.w2[ids[t, j]] @ (F.silu(h[:I]) * h[I:]))
            h = m.shared_w13.weight @ x[t]
            want[t] += torch.sigmoid(m.shared_gate.weight @ x[t])[0] * (m.shared_w2.weight @ (F.silu(h[:16]) * h[16:]))
    assert out.dtype == torch.float64
    assert (out - want).abs().max().item() <= 1e-12 * want.abs().max().item()


def test_qwen2_moe_without_shared_expert_loads(tmp_path):
    # shared_expert_intermediate_size 0: transformers saves zero-width shared-expert tensors (and
    # their gate), which from_pretrained refused as unused.
    hf = build_hf("qwen2_moe", shared_expert_intermediate_size=0)
    hf.save_pretrained(str(tmp_path))
    model = Llama.from_pretrained(str(tmp_path))
    ids = ids_of(2, 7)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def build_hf(name, **overrides):
    config_cls, model_cls, extra = ARCHS[name]
    kw = dict(TINY, **extra)
    kw.update(overrides)
    cfg = config_cls(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(cfg)
    with torch.no_grad():  # norms and biases off their init, decisive routers
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif pname.endswith("gate.weight"):  # routers and Qwen2-MoE's shared-expert gate
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, folder in the default per-expert layout, folder in
    transformers 5's fused layout)."""
    out = {}
    for name in ARCHS:
        hf = build_hf(name)
        per_expert = tmp_path_factory.mktemp(name)
        hf.save_pretrained(str(per_expert))
        fused = tmp_path_factory.mktemp(name + "_fused")
        hf.save_pretrained(str(fused), save_original_format=False)
        out[name] = (hf, str(per_expert), str(fused))
    return out


def ids_of(B, S, seed=1):
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def test_checkpoint_layouts(checkpoints):
    """The two layouts really differ (per-expert matrices vs fused 3-D tensors)."""
    from safetensors import safe_open
    _, per_expert, fused = checkpoints["mixtral"]
    with safe_open(os.path.join(per_expert, "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in f.keys()
    with safe_open(os.path.join(fused, "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.experts.gate_up_proj").shape == (4, 2 * 96, 64)


@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_match_transformers(checkpoints, name):
    hf, per_expert, fused = checkpoints[name]
    ids = ids_of(3, 13)
    with torch.no_grad():
        theirs = hf(ids).logits
    for path in (per_expert, fused):
        for backend in BACKENDS:
            model = Llama.from_pretrained(path, backend=backend)
            with torch.no_grad():
                err = (model(ids) - theirs).abs().max().item() / theirs.abs().max().item()
            assert err <= 1e-4, (path, backend, err)
    kinds = [type(layer.feed_forward).__name__ for layer in model.layers]
    assert kinds == (["MoEFeedForward", "FeedForward"] if name == "qwen2_moe" else ["MoEFeedForward"] * 2)


@pytest.mark.parametrize("name", list(ARCHS))
def test_greedy_ragged_batch_matches_transformers(checkpoints, name, monkeypatch):
    """A right-padded ragged batch, both backends, contiguous and paged caches: each row is the
    prompt, then the 16 tokens transformers' greedy generate gives that prompt alone, then
    padding. The fastattn backend runs its MoE layers' decode steps with the experts kernel
    (CPU, no autograd, few tokens per expert), the torch backend never uses it."""
    hf, path, _ = checkpoints[name]
    lengths = [9, 4, 12]
    ids = ids_of(3, 12, seed=5)
    theirs = [hf.generate(ids[b:b + 1, :L], max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0] for b, L in enumerate(lengths)]
    used = []
    real = MoEFeedForward.uses_kernel
    monkeypatch.setattr(MoEFeedForward, "uses_kernel", lambda self, *a: used.append(real(self, *a)) or used[-1])
    for backend in BACKENDS:
        used.clear()
        model = Llama.from_pretrained(path, backend=backend)
        for cache in ("contiguous", "paged"):
            out = model.generate(ids, NEW_TOKENS, prompt_lengths=torch.tensor(lengths), pad_token_id=VOCAB - 1,
                                 cache=cache, page_size=4)
            assert out.shape == (3, 12 + NEW_TOKENS)
            for b, L in enumerate(lengths):
                assert torch.equal(out[b, :L + NEW_TOKENS], theirs[b]), (backend, cache, b)
                assert (out[b, L + NEW_TOKENS:] == VOCAB - 1).all()
        assert used and any(used) == (backend == "fastattn"), backend  # fastattn: the decode steps at least


WINDOWED = {  # every layer slides (Mixtral, Qwen3-MoE); Qwen2-MoE: the odd layers below max_window_layers
    "mixtral": dict(sliding_window=5),
    "qwen2_moe": dict(use_sliding_window=True, sliding_window=5, max_window_layers=2),
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=5),
}


@pytest.mark.parametrize("name", list(WINDOWED))
def test_sliding_window_variants(name, tmp_path):
    hf = build_hf(name, **WINDOWED[name])
    hf.save_pretrained(str(tmp_path))
    ids = ids_of(2, 13)  # longer than the window
    with torch.no_grad():
        theirs = hf(ids).logits
        for backend in BACKENDS:
            model = Llama.from_pretrained(str(tmp_path), backend=backend)
            err = (model(ids) - theirs).abs().max().item() / theirs.abs().max().item()
            assert err <= 1e-4, (backend, err)
    expect = ["sliding_attention", "full_attention"] if name == "qwen2_moe" else ["sliding_attention"] * 2
    assert model.config.sliding_window == 5 and model.config.layer_types == expect
    # a Qwen2-MoE config.json without layer_types (transformers 4.x) gets transformers' default pattern
    config = json.load(open(tmp_path / "config.json"))
    config.pop("layer_types", None)
    assert LlamaConfig.from_hf(config).layer_types == expect


def test_beam_search_matches_transformers(checkpoints):
    """4 beams on the Mixtral checkpoint, both backends: transformers' generate(num_beams=4)."""
    hf, path, _ = checkpoints["mixtral"]
    ids = ids_of(2, 7, seed=5)
    theirs = hf.generate(ids, max_new_tokens=12, num_beams=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    for backend in BACKENDS:
        model = Llama.from_pretrained(path, backend=backend)
        assert torch.equal(model.generate(ids, 12, num_beams=4, eos_token_id=None), theirs), backend


@pytest.mark.parametrize("name", list(ARCHS))
def test_bf16_runs(checkpoints, name, monkeypatch):
    _, path, _ = checkpoints[name]
    # prefill experts (~24 rows each) take the fp32-multiply path, decode experts (<= 2) the native one
    # (as on a CPU without bf16 matrix instructions)
    monkeypatch.setattr(moe_mod, "UPCAST_MIN_ROWS", 8)
    monkeypatch.setitem(moe_mod.NATIVE_CPU_MATMUL, torch.bfloat16, False)
    ids = ids_of(2, 24)
    truth = Llama.from_pretrained(path, backend="torch")
    with torch.no_grad():
        ref = truth(ids)
        outs = {}
        for backend in BACKENDS:
            model = Llama.from_pretrained(path, backend=backend, dtype=torch.bfloat16)
            assert model.layers[0].feed_forward.w13.dtype == torch.bfloat16
            outs[backend] = model(ids).float()
            assert torch.isfinite(outs[backend]).all()
            assert model.generate(ids[:, :6], 4).shape == (2, 10)
    assert_error_ratio(outs["fastattn"], outs["torch"], ref, f"{name} bf16 logits", atol=1e-2)


def test_decoder_sparse_step_layers():
    """Qwen2/3-MoE pick the MoE layers as transformers does: (i + 1) % decoder_sparse_step == 0
    and i not in mlp_only_layers."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                      num_attention_heads=4, num_experts=4, moe_intermediate_size=16, decoder_sparse_step=2,
                      mlp_only_layers=[3])
    model = Llama(cfg)
    assert [type(l.feed_forward).__name__ == "MoEFeedForward" for l in model.layers] == \
        [False, True, False, False, False, True]
    assert model.layers[1].feed_forward.w13.shape == (4, 32, 32)
    assert model.layers[0].feed_forward.w13.weight.shape == (96, 32)
    with torch.no_grad():
        assert model(ids_of(1, 5)).shape == (1, 5, VOCAB)


def _write(tmp_path, name, **changes):
    config = dict(json.load(open(os.path.join(name, "config.json"))))
    config.update(changes)
    folder = tmp_path / "edited"
    folder.mkdir(exist_ok=True)
    for f in os.listdir(name):
        if f != "config.json":
            dst = folder / f
            if not dst.exists():
                os.symlink(os.path.join(name, f), dst)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unsupported_fields_are_named(checkpoints, tmp_path):
    _, path, _ = checkpoints["mixtral"]
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        Llama.from_pretrained(_write(tmp_path, path, num_experts_per_tok=5))
    with pytest.raises(ValueError, match="hidden_act"):
        Llama.from_pretrained(_write(tmp_path, path, hidden_act="gelu"))
    with pytest.raises(ValueError, match="model_type 'deepseek_v2'"):
        Llama.from_pretrained(_write(tmp_path, path, model_type="deepseek_v2"))
    with pytest.raises(ValueError, match="num_experts"):
        LlamaConfig(num_experts=-1)
    with pytest.raises(ValueError, match="decoder_sparse_step"):
        LlamaConfig(num_experts=4, decoder_sparse_step=0)
    # a checkpoint whose expert count disagrees with the config is refused, naming a tensor
    with pytest.raises(ValueError, match="experts"):
        Llama.from_pretrained(_write(tmp_path, path, num_local_experts=3))


@pytest.mark.parametrize("eager", [False, True], ids=["grouped_mm", "eager"])
def test_bench_builds_the_same_block_as_transformers(eager):
    """bench_moe's pair shares its weights, and the module equals transformers'
    MixtralSparseMoeBlock (fp32 exactly up to summation order; bf16 within rounding)."""
    from fastattn.benchmarks import bench_moe

    shape = dict(hidden=32, inter=48, experts=4, top_k=2)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        ours, theirs = bench_moe.build(dtype, device="cpu", shape=shape, eager=eager)
        assert theirs.experts.gate_up_proj is ours.w13 and theirs.gate.weight is ours.router.weight
        x = torch.randn(2, 40, 32).to(dtype)
        with torch.no_grad():
            a, b = ours(x).float(), theirs(x).float()
        assert (a - b).abs().max().item() <= tol * b.abs().max().item()


def test_cuda_graph_capture_refuses_moe(checkpoints):
    """MoE routing reads per-expert counts on the host, which a CUDA graph cannot hold: a
    clear error before any device work (checked on the CPU, where it is raised first)."""
    _, per_expert, _ = checkpoints["mixtral"]
    model = Llama.from_pretrained(per_expert, backend="torch")
    model.setup_cache(1, 16)
    model.prefill(ids_of(1, 5))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        model.capture_decode_step()
    with pytest.raises(ValueError, match="mixture-of-experts"):
        model.generate(ids_of(1, 5), 3, cuda_graph=True)


# ---- torch.compile / torch.export ----------------------------------------------------------
def test_module_compiles_fullgraph_on_every_experts_path():
    """Traced, the routed experts take experts_traced (the grouped path reads per-expert counts
    on the host, which failed fullgraph compiles and exports: autograd, or more than
    KERNEL_MAX_ROWS_PER_EXPERT rows per expert). Same values and gradients as eager."""
    m = make_moe(shared_expert_intermediate_size=16).train()
    x = torch.randn(3, 30, 32)  # 180 routed rows over 4 experts: not the kernel's
    g = torch.randn(3, 30, 32)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert (compiled(x) - m(x)).abs().max().item() <= 1e-5
    grads = []
    for fn in (m, compiled):
        x1 = x.clone().requires_grad_()
        m.zero_grad()
        (fn(x1) * g).sum().backward()
        grads.append([x1.grad, m.w13.grad, m.w2.grad, m.router.weight.grad, m.shared_gate.weight.grad])
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-5


def test_moe_model_exports_and_compiles_prefill_and_decode():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32)
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    B, S = torch.export.Dim("B", max=64), torch.export.Dim("S", max=100)
    ids = ids_of(2, 20)
    with torch.no_grad():  # (inference: the experts kernel at any length)
        exported = torch.export.export(model, (ids,), dynamic_shapes=({0: B, 1: S},))
    # other sizes on both sides of the eager kernel's row limit (a shape test there was a guard
    # the exported program failed on the other side of: decode-sized inputs were refused)
    for other in (ids_of(3, 33, seed=2), ids_of(2, 5, seed=2), ids_of(1, 16, seed=2)):
        with torch.no_grad():
            assert (exported.module()(other) - model(other)).abs().max().item() <= 1e-4
    # prefill and a decode step, compiled fullgraph, give eager's logits (batch 40: more rows
    # per expert than the kernel takes)
    prompt, step = ids_of(40, 3), ids_of(40, 1, seed=3)[:, 0]
    want = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = Llama(cfg).eval()
        m.setup_cache(40, 8)
        prefill = torch.compile(m.prefill, fullgraph=True, backend="aot_eager") if compiled else m.prefill
        decode = torch.compile(m.decode_step, fullgraph=True, backend="aot_eager") if compiled else m.decode_step
        with torch.no_grad():
            got = (prefill(prompt), decode(step))
        if not compiled:
            want = got
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_module_exports_with_a_dynamic_token_count(grad):
    # Without autograd the program runs the experts kernel at every token count (a row-count
    # test picking kernel or GEMM was a guard the program failed on the other side of), with
    # it the traced experts.
    m = make_moe(shared_expert_intermediate_size=16)
    N = torch.export.Dim("N", min=2, max=512)
    with torch.set_grad_enabled(grad):
        program = torch.export.export(m, (torch.randn(8, 32),), dynamic_shapes=({0: N},))
        assert ("moe_experts" in str(program.graph)) == (not grad)
        for n in (3, 40, 300):
            x = torch.randn(n, 32)
            assert (program.module()(x) - m(x)).abs().max().item() <= 1e-5


def test_traced_experts_keep_an_unpicked_experts_overflow_out():
    # experts_traced runs every expert on every token: weighting an expert's inf by the 0
    # routing weight of a token that did not pick it gave NaN in every row (review)
    m = make_moe().train()  # (autograd: the traced experts, not the kernel)
    with torch.no_grad():
        m.router.weight[3] = -50.0  # expert 3 is never picked by a positive x ...
        m.w13[3] = 1.0
        m.w2[3] = 1e38  # ... and overflows wherever it runs
    x = torch.rand(8, 32) + 0.1
    assert not bool((m.route(x)[1] == 3).any())
    assert not torch.isfinite(m._swiglu(x, m.w13[3], m.w2[3], m.intermediate_size)).all()
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert torch.isfinite(out).all() and (out - m(x)).abs().max().item() <= 1e-5
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (m.w13, m.w2, m.router.weight))
