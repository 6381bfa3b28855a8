"""FlashAttention forward + backward end to end: autograd through the flash_attn_fwd op (its
registered backward is the flash_attn_bwd kernel op) and through the public functions,
opcheck with the autograd checks, torch.compile of a training step, and a tiny 2-layer
attention model whose loss curve with fastattn kernels matches the reference backend."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastattn
from fastattn import ops, reference

from conftest import DEVICES, assert_error_ratio


def _dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def _inputs(B, Sq, Sk, H, Hk, D, dtype, device):
    q = torch.randn(B, Sq, H, D, device=device).to(dtype).requires_grad_()
    k = torch.randn(B, Sk, Hk, D, device=device).to(dtype).requires_grad_()
    v = torch.randn(B, Sk, Hk, D, device=device).to(dtype).requires_grad_()
    return q, k, v


def _ref_grads(q, k, v, dout, causal, window, dtype, scale=None):
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    reference.attention(qq, kk, vv, causal=causal, softmax_scale=scale, window=window).backward(dout.to(dtype))
    return qq.grad, kk.grad, vv.grad


def _check_grads(fn, q, k, v, causal=False, window=(-1, -1), scale=None):
    out = fn(q, k, v)
    dout = torch.randn_like(out)
    out.backward(dout)
    truth = _ref_grads(q, k, v, dout, causal, window, torch.float64, scale)
    low = _ref_grads(q, k, v, dout, causal, window, q.dtype, scale)
    for name, x, t, l in zip(("dq", "dk", "dv"), (q, k, v), truth, low):
        assert_error_ratio(x.grad, l, t, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [(2, 97, 97, 4, 2, (-1, 0)), (1, 33, 70, 4, 1, (16, 4))], ids=["gqa_causal", "mqa_window"])
def test_grads_through_fwd_op(device, case):
    B, Sq, Sk, H, Hk, window = case
    q, k, v = _inputs(B, Sq, Sk, H, Hk, 64, _dtype(device), device)
    _check_grads(lambda q, k, v: ops.flash_attn_fwd(q, k, v, 0.125, *window)[0], q, k, v,
                 window=window, scale=0.125)


def test_sum_loss_expanded_grad():
    # out.sum() sends an expanded (all-zero-stride) gradient into the backward.
    q, k, v = _inputs(1, 17, 17, 2, 2, 32, torch.float32, "cpu")
    ops.flash_attn_fwd(q, k, v, 0.2, -1, 0)[0].sum().backward()
    qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference.attention(qq, kk, vv, causal=True, softmax_scale=0.2).sum().backward()
    for x, r in ((q, qq), (k, kk), (v, vv)):
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=1e-4, atol=1e-5)


def test_lse_is_not_differentiable():
    # The backward has no dlse term: lse must say so rather than drop its gradient silently.
    q, k, v = (torch.randn(1, 9, 2, 16, requires_grad=True) for _ in range(3))
    out, lse = fastattn.flash_attention(q, k, v, causal=True, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_grads_through_flash_attention(device):
    q, k, v = _inputs(2, 65, 80, 4, 2, 64, _dtype(device), device)
    _check_grads(lambda q, k, v: fastattn.flash_attention(q, k, v, causal=True), q, k, v, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_grads_through_sdpa(device, is_causal):
    dtype = _dtype(device)
    # (B, H, L, E) views of (B, L, H, E) storage: what a model's q.view(...).transpose(1, 2) gives.
    q, k, v = (torch.randn(2, 50, 4, 64, device=device).to(dtype).transpose(1, 2).requires_grad_()
               for _ in range(3))
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    dout = torch.randn_like(out)
    out.backward(dout)
    grads = []
    for dt in (torch.float64, dtype):
        qq, kk, vv = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=is_causal).backward(dout.to(dt))
        grads.append((qq.grad, kk.grad, vv.grad))
    for name, x, t, l in zip(("dq", "dk", "dv"), (q, k, v), *grads):
        assert_error_ratio(x.grad, l, t, name)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fwd_with_autograd(device):
    q, k, v = _inputs(1, 33, 40, 4, 2, 64, _dtype(device), device)
    # requires_grad inputs make opcheck's autograd-registration and aot_dispatch tests run
    # the registered backward.
    torch.library.opcheck(torch.ops.fastattn.flash_attn_fwd, (q, k, v, 0.125, -1, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fwd_bwd(device):
    q, k, v = _inputs(2, 40, 40, 4, 2, 64, _dtype(device), device)

    def loss_fn(q, k, v):
        return fastattn.flash_attention(q, k, v, causal=True).float().square().mean()

    def step(fn):
        # The compiled graph is the forward; AOTAutograd compiles the backward graph (which
        # calls the flash_attn_bwd op) that loss.backward() runs.
        for t in (q, k, v):
            t.grad = None
        loss = fn(q, k, v)
        loss.backward()
        return loss.detach(), q.grad, k.grad, v.grad

    expected = step(loss_fn)
    torch._dynamo.reset()
    got = step(torch.compile(loss_fn, fullgraph=True))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", ["flash B=0", "flash Sq=0", "rotary S=0"])
def test_compile_dynamic_backward_of_empty_inputs(case):
    # AOTAutograd hands an empty output's gradient over with every stride 0 (torch calls an
    # empty tensor contiguous, so nothing copies it); the kernels' layout check refused it.
    torch._dynamo.reset()
    cos, sin = torch.randn(10, 4), torch.randn(10, 4)
    if case.startswith("flash"):
        shapes = [(0, 3, 4, 8), (0, 7, 4, 8), (0, 7, 4, 8)] if "B=0" in case else [(2, 0, 4, 8), (2, 7, 4, 8), (2, 7, 4, 8)]

        def f(q, k, v):
            return (fastattn.flash_attention(q, k, v, causal=True),)
    else:
        shapes = [(2, 0, 4, 8), (2, 0, 2, 8)]

        def f(q, k):
            return fastattn.apply_rotary(q, k, cos, sin)
    args = [torch.randn(*s, requires_grad=True) for s in shapes]
    outs = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")(*args)
    # the sum outside the graph: its gradient (expanded ones) is the compiled backward's input
    sum(o.sum() for o in outs).backward()
    for a, s in zip(args, shapes):
        assert a.grad is not None and a.grad.shape == s


# ---- a tiny 2-layer attention model trained with each backend ------------------------------
class _Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, attn):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.hd)
        self.proj = nn.Linear(heads * self.hd, dim)
        self.attn = attn

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).split(
            [self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], dim=-1)
        q = q.view(B, S, self.heads, self.hd)  # strided views: last dim contiguous
        k = k.view(B, S, self.kv_heads, self.hd)
        v = v.view(B, S, self.kv_heads, self.hd)
        return x + self.proj(self.attn(q, k, v).reshape(B, S, -1))


class _Model(nn.Module):
    def __init__(self, attn, vocab=61, dim=256, heads=4, kv_heads=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([_Block(dim, heads, kv_heads, attn) for _ in range(2)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _fastattn_attn(q, k, v):
    # The model trains in fp32; the CUDA kernels take 16-bit inputs only, so there the
    # attention runs in bf16 (its gradients flow back through the casts).
    dtype = q.dtype
    if q.is_cuda:
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    return fastattn.flash_attention(q, k, v, causal=True).to(dtype)


def _reference_attn(q, k, v):
    return reference.attention(q, k, v, causal=True)


def _train(model, ids, steps=6):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("device", DEVICES)
def test_train_loss_curve_matches_reference(device):
    ids = torch.randint(0, 61, (2, 34), device=device)  # 33 positions: odd length
    base = _Model(_reference_attn).to(device)
    ref_model = copy.deepcopy(base)
    fa_model = copy.deepcopy(base)
    for b in fa_model.blocks:
        b.attn = _fastattn_attn
    ref = _train(ref_model, ids)
    ours = _train(fa_model, ids)
    assert ref[-1] < ref[0] - 0.1  # it learns
    tol = 1e-2 if device == "cuda" else 1e-4  # bf16 attention on CUDA, fp32 on the CPU
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert abs(a - b) <= tol * abs(b), f"step {step}: fastattn loss {a} vs reference {b}"
