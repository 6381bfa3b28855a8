"""Runs every CPU kernel once on small odd shapes and checks it against fastattn.reference.

Used by test_cpu_isa.py in a subprocess per instruction-set tier (FASTATTN_CPU_ISA is read
once per process):
    FASTATTN_CPU_ISA=avx2 python tests/cpu_isa_worker.py avx2
exits 0 and prints "OK <tier> <checks>" when the tier in use is the expected one and every
output matches. Tolerances: fp32 against a float64 reference, max error <= 2e-5 * max|ref|;
fp16/bf16 by DESIGN's error-ratio rule: err(ours) <= 2 * err(reference run in that dtype) +
1e-5 * max|ref|, both against the float64 reference.
"""
import sys

import torch

import fastattn
from fastattn import reference as ref

checks = 0


def check(name, ours, ref_true, ref_low=None):
    global checks
    ours, ref_true = ours.detach(), ref_true.detach()
    assert ours.shape == ref_true.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref_true.shape)}"
    scale = max(1.0, ref_true.double().abs().max().item())
    err = (ours.double() - ref_true.double()).abs().max().item()
    if ref_low is None:  # fp32
        bound = 2e-5 * scale
    else:
        ref_err = (ref_low.detach().double() - ref_true.double()).abs().max().item()
        bound = 2.0 * ref_err + 1e-5 * scale
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e}"
    checks += 1


def run_ref(fn, dtype, *tensors):
    """fn on float64 copies (truth) and, for 16-bit dtypes, on copies in that dtype."""
    true = fn(*[t.detach().double().requires_grad_(t.requires_grad) for t in tensors])
    low = fn(*[t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]) if dtype != torch.float32 else None
    return true, low


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout.to(out.dtype))


def test_flash(dtype, causal):
    g = torch.Generator().manual_seed(1)
    B, Sq, Sk, H, Hk, D = 2, 37, 45, 4, 2, 44
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, Sk, Hk, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Sk, Hk, D, generator=g).to(dtype).requires_grad_()
    dout = torch.randn(B, Sq, H, D, generator=g)
    out = fastattn.flash_attention(q, k, v, causal=causal)
    dq, dk, dv = grads(out, (q, k, v), dout)

    def f(q, k, v):
        o = ref.attention(q, k, v, causal=causal)
        return (o,) + grads(o, (q, k, v), dout)

    true, low = run_ref(f, dtype, q, k, v)
    for i, (name, ours) in enumerate([("out", out), ("dq", dq), ("dk", dk), ("dv", dv)]):
        check(f"flash {dtype} causal={causal} {name}", ours, true[i], low[i] if low else None)


def test_decode(dtype):
    g = torch.Generator().manual_seed(2)
    B, S_max, H, Hk, D = 3, 50, 4, 2, 44
    q = torch.randn(B, H, D, generator=g).to(dtype)
    kc = torch.randn(B, S_max, Hk, D, generator=g).to(dtype)
    vc = torch.randn(B, S_max, Hk, D, generator=g).to(dtype)
    seqlens = torch.tensor([50, 17, 1], dtype=torch.int32)
    for splits in (0, 1, 3):
        out = fastattn.decode_attention(q, kc, vc, seqlens, num_splits=splits)
        true, low = run_ref(lambda q, k, v: ref.decode_attention(q, k, v, seqlens), dtype, q, kc, vc)
        check(f"decode {dtype} splits={splits}", out, true, low)
    # append_kv: a copy, so exact.
    k = torch.randn(B, 3, Hk, D, generator=g).to(dtype)
    v = torch.randn(B, 3, Hk, D, generator=g).to(dtype)
    start = torch.tensor([0, 10, 47], dtype=torch.int32)
    kc2, vc2 = kc.clone(), vc.clone()
    fastattn.append_kv(kc2, vc2, k, v, start)
    rk, rv = ref.append_kv(kc.clone(), vc.clone(), k, v, start)
    assert torch.equal(kc2, rk) and torch.equal(vc2, rv), f"append_kv {dtype}: caches differ"
    global checks
    checks += 1


def test_rms_norm(dtype, residual):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 101, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(101, generator=g)).to(dtype).requires_grad_()
    r = torch.randn(3, 7, 101, generator=g).to(dtype).requires_grad_() if residual else None
    dy = torch.randn(3, 7, 101, generator=g)
    inputs = (x, w) + ((r,) if residual else ())

    def f(x, w, r=None):
        y = ref.rms_norm(x, w, eps=1e-6, residual=r)
        y = y[0] if residual else y
        return (y,) + grads(y, (x, w) + ((r,) if residual else ()), dy)

    y = fastattn.rms_norm(x, w, eps=1e-6, residual=r)
    y = y[0] if residual else y
    ours = (y,) + grads(y, inputs, dy)
    true, low = run_ref(f, dtype, *inputs)
    for i, name in enumerate(["y", "dx", "dweight", "dresidual"][: len(ours)]):
        check(f"rms_norm {dtype} residual={residual} {name}", ours[i], true[i], low[i] if low else None)


def test_rotary(dtype, interleaved):
    g = torch.Generator().manual_seed(4)
    B, S, H, Hk, D, R, max_pos = 2, 9, 4, 2, 44, 36, 16
    q = torch.randn(B, S, H, D, generator=g).to(dtype)
    k = torch.randn(B, S, Hk, D, generator=g).to(dtype)
    ang = torch.randn(max_pos, R // 2, generator=g, dtype=torch.float64)
    cos, sin = ang.cos().float(), ang.sin().float()
    pos = torch.randint(0, max_pos, (B, S), generator=g)
    qo, ko = fastattn.apply_rotary(q, k, cos, sin, positions=pos, interleaved=interleaved)
    true = ref.apply_rotary(q.double(), k.double(), cos.double(), sin.double(), pos, interleaved)
    low = ref.apply_rotary(q, k, cos, sin, pos, interleaved) if dtype != torch.float32 else (None, None)
    check(f"rotary {dtype} interleaved={interleaved} q", qo, true[0], low[0])
    check(f"rotary {dtype} interleaved={interleaved} k", ko, true[1], low[1])


def test_moe_experts(dtype):
    """The experts kernel (torch.ops.fastattn.moe_experts): hidden 111 = 3 x 32 + 15 and inter
    97 leave vector tails on every path (8-lane widening, 32-value vdpbf16ps steps), 6 tokens
    top-2 over 5 experts give experts of one to several rows. Truth: the per-token loop in
    float64 on the same inputs; low: the same loop in the dtype (its matmuls round gate/up,
    the activation and the expert outputs)."""
    g = torch.Generator().manual_seed(3)
    T, H, I, E, K = 6, 111, 97, 5, 2
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    out = torch.ops.fastattn.moe_experts(x, weights, ids, w13, w2)

    def loop(x, w13, w2, weights):
        y = torch.zeros(T, H, dtype=torch.float64)
        for t in range(T):
            for j in range(K):
                e = int(ids[t, j])
                h = w13[e] @ x[t]
                act = (torch.nn.functional.silu(h[:I]) * h[I:]).to(x.dtype)
                y[t] += weights[t, j].double() * (w2[e] @ act).double()
        return y

    true = loop(x.double(), w13.double(), w2.double(), weights)
    low = loop(x, w13, w2, weights) if dtype != torch.float32 else None
    check(f"moe_experts {dtype}", out, true, low)


def main():
    want = sys.argv[1]
    got = fastattn.cpu_isa()
    assert got == want, f"cpu_isa() is {got!r}, expected {want!r}"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for causal in (False, True):
            test_flash(dtype, causal)
        test_decode(dtype)
        for residual in (False, True):
            test_rms_norm(dtype, residual)
        for interleaved in (False, True):
            test_rotary(dtype, interleaved)
        test_moe_experts(dtype)
    assert fastattn.cpu_isa() == want
    print(f"OK {want} {checks}")


if __name__ == "__main__":
    main()
