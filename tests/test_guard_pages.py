"""Guard-page checks of every CPU kernel: no read or write outside its tensors.

Each input tensor is copied into an anonymous mapping laid out so that the byte right after
its last element ("after") or right before its first element ("before") is the first byte
of a PROT_NONE page: any access outside the tensor's span segfaults instead of silently
reading a neighbour. Gaps inside a strided tensor (padded row/head strides, as slices of a
packed buffer have) are filled with 0xff bytes, NaN in every float dtype, so an access to an
element that is not part of the tensor shows up as NaN in the result.

Every case runs with each of its tensors guarded alone, then all of them at once, on both
sides, and its results are compared loosely with fastattn.reference / torch (the point is
the absence of crashes and of reads outside the tensors; the precision tests are elsewhere).
Tensors an op writes in place (apply_rotary(inplace=True)'s q and k, append_kv's and
attention_with_kvcache's caches) are guarded too, so over-writes fault as well. Outputs the
ops allocate themselves cannot be guarded from here.

The cases run in a subprocess per CPU instruction-set tier this machine supports
(FASTATTN_CPU_ISA is read once per process, as in test_cpu_isa.py), so a crash is a negative
return code rather than a dead pytest; the worker prints each case's name before running it
so the report names the case that crashed:
    FASTATTN_CPU_ISA=avx2 python tests/test_guard_pages.py avx2 [substring filter]
"""
import ctypes
import functools
import itertools
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastattn
from fastattn import ops
from fastattn import reference as ref

PAGE = mmap.PAGESIZE
TIERS = ["baseline", "avx2", "avx512"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# Loose bounds on max |ours - ref| / max(1, max |ref|): these are crash tests, not precision tests.
_TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.mprotect.restype = ctypes.c_int
except (OSError, AttributeError, TypeError):  # no POSIX libc: the tests below skip
    _libc = None
_PROT_NONE = 0


def contiguous_strides(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def padded_strides(shape, pad):
    """Row-major strides with `pad` extra elements after every run of each dim below the
    first: the layout of a slice of a larger buffer (last dim contiguous). A dim of size 1
    gets an unrelated stride (torch allows any; it moves no element), so a kernel that
    steps along it anyway reads far outside the tensor."""
    strides, acc = [], 1
    for i, n in enumerate(reversed(shape)):
        strides.append(acc)
        acc = acc * max(n, 1) + (pad if i < len(shape) - 1 else 0)
    strides = list(reversed(strides))
    for i, n in enumerate(shape):
        if n == 1 and i < len(shape) - 1:
            strides[i] = 7919 * (i + 1)
    return tuple(strides)


def _span_elems(shape, strides):
    return 1 + sum((n - 1) * s for n, s in zip(shape, strides))


def guarded(src, side, strides=None):
    """A copy of src (with the given element strides, default contiguous) whose span ends
    exactly at a PROT_NONE page (side="after") or starts exactly after one ("before")."""
    assert side in ("after", "before")
    shape = tuple(src.shape)
    strides = tuple(strides) if strides is not None else contiguous_strides(shape)
    assert src.numel() > 0 and min(strides) >= 0
    nbytes = _span_elems(shape, strides) * src.element_size()
    npages = -(-nbytes // PAGE)
    mm = mmap.mmap(-1, (npages + 1) * PAGE)
    whole = torch.frombuffer(mm, dtype=torch.uint8)
    whole.fill_(0xFF)
    base = whole.data_ptr()
    if side == "after":
        guard_at, offset = base + npages * PAGE, npages * PAGE - nbytes
    else:
        guard_at, offset = base, PAGE
    del whole
    if _libc.mprotect(guard_at, PAGE, _PROT_NONE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")
    # The tensor's storage is exactly its span: nothing of torch's reaches the guard page.
    raw = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)
    t = raw.view(src.dtype).as_strided(shape, strides)
    t.copy_(src)
    return t


def unguarded(src, strides=None):
    """src with the given strides in ordinary memory (gaps filled with 0xff, as guarded)."""
    if strides is None:
        return src.clone()
    nbytes = _span_elems(src.shape, strides) * src.element_size()
    raw = torch.full((nbytes,), 0xFF, dtype=torch.uint8)
    t = raw.view(src.dtype).as_strided(tuple(src.shape), tuple(strides))
    t.copy_(src)
    return t


class Case:
    """One op call. inputs: {name: (tensor, strides or None)}; run(t) takes the placed
    tensors by name and returns a list of result tensors; expect() returns the list of
    reference results (computed once); ints: indices of results compared exactly."""

    def __init__(self, name, inputs, run, expect, dtype, exact=(), tol=None, each=True):
        self.name, self.inputs, self.run, self.expect = name, inputs, run, expect
        self.dtype, self.exact, self.tol = dtype, set(exact), tol
        # Which inputs are also guarded alone: True (all), False (none: only every input at
        # once, the larger cases) or a list of names (those not already covered by another case).
        self.each = each


def _check(case, got, want, label):
    # In numpy (single-threaded, no dispatch): the checks stay cheap next to the op calls.
    assert len(got) == len(want), f"{label}: {len(got)} results, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = g.detach(), w.detach()
        assert tuple(g.shape) == tuple(w.shape), f"{label} result {i}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        if i in case.exact:
            assert torch.equal(g, w.to(g.dtype)), f"{label} result {i}: differs"
            continue
        g, w = g.double().numpy(), w.double().numpy()
        assert not np.isnan(g).any(), f"{label} result {i}: NaN (a read outside the tensor, or of a gap)"
        fin = ~(np.isinf(g) & (g == w))  # -inf lse of rows that see no key, on both sides
        if fin.any():
            scale = max(1.0, float(np.abs(w[fin]).max()))
            err = float(np.abs(g[fin] - w[fin]).max())
            tol = case.tol if case.tol is not None else _TOL[case.dtype]
            assert err <= tol * scale, f"{label} result {i}: max error {err:.3e} > {tol * scale:.3e}"


def run_case(case, log):
    """The case with each input guarded alone, then all at once, after and before."""
    want = case.expect()
    names = [n for n, (t, _) in case.inputs.items() if t is not None]
    names = names if case.each is True else [n for n in names if n in (case.each or ())]
    runs = 0
    for side in ("after", "before"):
        for target in names + ["*"]:
            label = f"{case.name} [{target} {side}]"
            log(label)
            placed = {}
            for n, (t, strides) in case.inputs.items():
                if t is None:
                    placed[n] = None
                elif target in ("*", n):
                    placed[n] = guarded(t, side, strides)
                else:
                    placed[n] = unguarded(t, strides)
            got = case.run(placed)
            _check(case, got, want, label)
            runs += 1
    return runs


# ---- case builders --------------------------------------------------------------------------
def _rand(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _grads(out, inputs, dout):
    return list(torch.autograd.grad(out, inputs, dout))


def rms_norm_cases():
    cases = []
    configs = [  # (rows shape, n, weight, residual, pad)
        ((1,), 1, True, False, 0), ((3,), 5, False, True, 0), ((2,), 8, True, True, 3),
        ((1,), 16, True, False, 0), ((3,), 17, True, True, 1), ((2, 2), 31, False, False, 0),
        ((1,), 33, True, True, 0), ((3,), 67, True, False, 5), ((2,), 130, True, True, 0),
        ((1,), 257, False, True, 0),
    ]
    for dtype in DTYPES:
        for ci, (rows, n, has_w, has_r, pad) in enumerate(configs):
            g = torch.Generator().manual_seed(100 + ci)
            shape = rows + (n,)
            x = _rand(g, *shape, dtype=dtype)
            w = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype) if has_w else None
            r = _rand(g, *shape, dtype=dtype) if has_r else None
            dy = _rand(g, *shape, dtype=dtype)
            xs = padded_strides(shape, pad) if pad else None
            tag = f"rms_norm {_SHORT[dtype]} x{shape} w={has_w} res={has_r} pad={pad}"

            def run_fwd(t, has_r=has_r):
                ins = [t[k] for k in ("x", "w", "r") if t[k] is not None]
                for i in ins:
                    i.requires_grad_()
                out = fastattn.rms_norm(t["x"], t["w"], 1e-6, residual=t["r"])
                y = out[0] if has_r else out
                res = [y] + ([out[1]] if has_r else [])
                return res + _grads(y, ins, t["dy"])

            def exp_fwd(x=x, w=w, r=r, dy=dy, has_r=has_r):
                ins = [i.double().requires_grad_() for i in (x, w, r) if i is not None]
                xx = ins[0]
                ww = ins[1] if w is not None else None
                rr = ins[-1] if r is not None else None
                out = ref.rms_norm(xx, ww, 1e-6, residual=rr)
                y = out[0] if has_r else out
                res = [y] + ([out[1]] if has_r else [])
                return res + _grads(y, ins, dy.double())

            cases.append(Case(f"{tag} fwd+autograd", {"x": (x, xs), "w": (w, None), "r": (r, xs), "dy": (dy, xs)},
                              run_fwd, exp_fwd, dtype))

            # The backward op on its own with every input guarded (its other inputs are guarded
            # alone by the autograd case above; rstd and dh only here).
            h = (x.float() + r.float()).to(dtype) if has_r else x
            rstd = torch.rsqrt(h.float().pow(2).mean(-1) + 1e-6)
            dh = _rand(g, *shape, dtype=dtype) if has_r else None

            def run_bwd(t):
                dx, dw = ops.rms_norm_bwd(t["dy"], t["h"], t["w"], t["rstd"], t["dh"])
                return [dx, dw]

            def exp_bwd(h=h, w=w, dy=dy, dh=dh):
                hh = h.double().requires_grad_()
                ins = [hh] + ([w.double().requires_grad_()] if w is not None else [])
                y = ref.rms_norm(hh, ins[1] if w is not None else None, 1e-6)
                gr = _grads(y, ins, dy.double())
                dx = gr[0] + (dh.double() if dh is not None else 0)
                return [dx, gr[1] if w is not None else torch.zeros(0)]

            cases.append(Case(f"{tag} bwd op", {"dy": (dy, xs), "h": (h, xs), "w": (w, None), "rstd": (rstd, None),
                                                "dh": (dh, xs)}, run_bwd, exp_bwd, dtype,
                              each=["rstd", "dh"]))
    return cases


def rotary_cases():
    cases = []
    configs = [  # B, S, H, Hk, D, R, interleaved, positions ("none", "1d32", "2d64"), pad
        (1, 1, 1, 1, 2, 2, False, "none", 0),
        (2, 3, 3, 1, 18, 18, True, "2d64", 0),
        (1, 17, 2, 2, 40, 34, False, "1d32", 3),
        (2, 5, 4, 2, 66, 64, False, "2d32", 0),
        (1, 3, 2, 1, 66, 64, True, "none", 2),
        (1, 2, 1, 1, 34, 32, True, "1d64", 0),
        (1, 3, 2, 1, 7, 4, False, "2d64", 1),
        (2, 1, 1, 1, 128, 128, False, "none", 0),
        (1, 33, 1, 1, 36, 36, True, "none", 0),
    ]
    for dtype in DTYPES:
        for ci, (B, S, H, Hk, D, R, inter, pk, pad) in enumerate(configs):
            g = torch.Generator().manual_seed(200 + ci)
            max_pos = S + 5
            q = _rand(g, B, S, H, D, dtype=dtype)
            k = _rand(g, B, S, Hk, D, dtype=dtype)
            ang = torch.randn(max_pos, R // 2, generator=g, dtype=torch.float64)
            cos, sin = ang.cos().float(), ang.sin().float()
            pos = None
            if pk != "none":
                pdt = torch.int32 if pk.endswith("32") else torch.int64
                pshape = (S,) if pk.startswith("1d") else (B, S)
                pos = torch.randint(0, max_pos, pshape, generator=g).to(pdt)
            dq, dk = _rand(g, B, S, H, D, dtype=dtype), _rand(g, B, S, Hk, D, dtype=dtype)
            qs = padded_strides(q.shape, pad) if pad else None
            ks = padded_strides(k.shape, pad) if pad else None
            tag = f"rotary {_SHORT[dtype]} q{tuple(q.shape)} k{tuple(k.shape)} R={R} inter={inter} pos={pk} pad={pad}"
            ps = padded_strides(pos.shape, pad) if (pad and pos is not None and pos.dim() == 2) else None
            inputs = {"q": (q, qs), "k": (k, ks), "cos": (cos, None), "sin": (sin, None), "pos": (pos, ps),
                      "dq": (dq, qs), "dk": (dk, ks)}

            def run_auto(t, inter=inter):
                q_, k_ = t["q"].requires_grad_(), t["k"].requires_grad_()
                qo, ko = fastattn.apply_rotary(q_, k_, t["cos"], t["sin"], positions=t["pos"], interleaved=inter)
                gq, gk = torch.autograd.grad((qo, ko), (q_, k_), (t["dq"], t["dk"]))
                return [qo, ko, gq, gk]

            def exp_auto(q=q, k=k, cos=cos, sin=sin, pos=pos, dq=dq, dk=dk, inter=inter):
                qd, kd = q.double().requires_grad_(), k.double().requires_grad_()
                qo, ko = ref.apply_rotary(qd, kd, cos.double(), sin.double(), pos, inter)
                gq, gk = torch.autograd.grad((qo, ko), (qd, kd), (dq.double(), dk.double()))
                return [qo, ko, gq, gk]

            cases.append(Case(f"{tag} out-of-place+autograd", inputs, run_auto, exp_auto, dtype))

            def run_inplace(t, inter=inter):
                with torch.no_grad():
                    fastattn.apply_rotary(t["q"], t["k"], t["cos"], t["sin"], positions=t["pos"], interleaved=inter,
                                          inplace=True)
                return [t["q"], t["k"]]

            def exp_inplace(q=q, k=k, cos=cos, sin=sin, pos=pos, inter=inter):
                return list(ref.apply_rotary(q.double(), k.double(), cos.double(), sin.double(), pos, inter))

            in_inputs = {n: inputs[n] for n in ("q", "k", "cos", "sin", "pos")}
            cases.append(Case(f"{tag} inplace", in_inputs, run_inplace, exp_inplace, dtype))
    return cases


def _attn_ref_grads(q, k, v, dout, **kw):
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    o, lse = ref.attention(qd, kd, vd, return_lse=True, **kw)
    return [o, lse] + _grads(o, (qd, kd, vd), dout.double())


def _flash_autograd_case(name, q, k, v, dout, qs, ks, kw, dtype, each=True):
    """flash_attention forward (out, lse) and its autograd gradients, q / dout with strides qs,
    k / v with ks (None: contiguous), against the float64 reference."""
    def run(t):
        q_, k_, v_ = (t[n].requires_grad_() for n in ("q", "k", "v"))
        o, lse = fastattn.flash_attention(q_, k_, v_, return_lse=True, **kw)
        return [o, lse] + _grads(o, (q_, k_, v_), t["dout"])

    def expect():
        return _attn_ref_grads(q, k, v, dout, **kw)

    return Case(name, {"q": (q, qs), "k": (k, ks), "v": (v, ks), "dout": (dout, qs)}, run, expect, dtype,
                each=each)


def flash_cases():
    cases = []
    configs = [  # B, Sq, Sk, H, Hk, D, causal, window, softcap, pad
        (1, 1, 1, 1, 1, 1, False, (-1, -1), 0.0, 0),
        (2, 3, 17, 4, 2, 17, True, (-1, -1), 0.0, 3),
        (1, 17, 3, 2, 1, 8, False, (-1, -1), 0.0, 0),
        (1, 33, 33, 3, 3, 64, True, (-1, -1), 0.0, 0),
        (2, 65, 20, 2, 1, 36, False, (5, 2), 0.0, 1),
        (1, 5, 65, 4, 1, 100, True, (9, -1), 30.0, 0),
        (1, 3, 5, 2, 2, 128, False, (-1, -1), 0.0, 8),
        (1, 2, 3, 1, 1, 259, True, (-1, -1), 0.0, 0),
    ]
    for dtype in DTYPES:
        for ci, (B, Sq, Sk, H, Hk, D, causal, window, softcap, pad) in enumerate(configs):
            if D > 128 and dtype != torch.float32:
                continue
            g = torch.Generator().manual_seed(300 + ci)
            q = _rand(g, B, Sq, H, D, dtype=dtype)
            k = _rand(g, B, Sk, Hk, D, dtype=dtype)
            v = _rand(g, B, Sk, Hk, D, dtype=dtype)
            dout = _rand(g, B, Sq, H, D, dtype=dtype)
            qs = padded_strides(q.shape, pad) if pad else None
            ks = padded_strides(k.shape, pad) if pad else None
            kw = dict(causal=causal, window=window, softcap=softcap)
            tag = (f"flash {_SHORT[dtype]} q{tuple(q.shape)} kv{tuple(k.shape)} causal={causal} window={window} "
                   f"softcap={softcap} pad={pad}")

            cases.append(_flash_autograd_case(f"{tag} fwd+autograd", q, k, v, dout, qs, ks, kw, dtype))

            # The backward op with every input guarded (out and lse, which autograd passes from
            # the forward, alone only here).
            left, right = window
            if causal:
                right = 0
            scale = D ** -0.5
            with torch.no_grad():
                out, lse = ops.flash_attn_fwd(q, k, v, scale, left, right, softcap)

            def run_bwd(t, scale=scale, left=left, right=right, softcap=softcap):
                return list(ops.flash_attn_bwd(t["dout"], t["q"], t["k"], t["v"], t["out"], t["lse"], scale, left,
                                               right, True, softcap))

            def exp_bwd(q=q, k=k, v=v, dout=dout, kw=kw):
                return _attn_ref_grads(q, k, v, dout, **kw)[2:]

            cases.append(Case(f"{tag} bwd op", {"dout": (dout, qs), "q": (q, qs), "k": (k, ks), "v": (v, ks),
                                                "out": (out, qs), "lse": (lse, None)}, run_bwd, exp_bwd, dtype,
                              each=["out", "lse"]))
    # SDPA: the (B, H, L, E) layout, transposed to the kernel's.
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(399)
        B, H, Hk, L, S, E = 2, 4, 2, 9, 13, 24
        qq, kk, vv = _rand(g, B, H, L, E, dtype=dtype), _rand(g, B, Hk, S, E, dtype=dtype), _rand(g, B, Hk, S, E,
                                                                                                  dtype=dtype)

        def run_sdpa(t):
            return [fastattn.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True, enable_gqa=True)]

        def exp_sdpa(qq=qq, kk=kk, vv=vv):
            return [torch.nn.functional.scaled_dot_product_attention(qq.double(), kk.double(), vv.double(),
                                                                     is_causal=True, enable_gqa=True)]

        cases.append(Case(f"sdpa {_SHORT[dtype]} q{tuple(qq.shape)} kv{tuple(kk.shape)} causal",
                          {"q": (qq, None), "k": (kk, None), "v": (vv, None)}, run_sdpa, exp_sdpa, dtype))
    return cases


def varlen_cases():
    cases = []
    configs = [  # lens_q, lens_k, H, Hk, D, causal, window, pad
        ([1], [1], 1, 1, 1, False, (-1, -1), 0),
        ([3, 0, 17], [5, 2, 17], 2, 1, 17, True, (-1, -1), 3),
        ([33, 1], [65, 3], 4, 2, 64, False, (4, 4), 0),
        ([2, 5, 1], [2, 5, 9], 2, 2, 40, True, (3, -1), 1),
    ]
    for dtype in DTYPES:
        for ci, (lq, lk, H, Hk, D, causal, window, pad) in enumerate(configs):
            g = torch.Generator().manual_seed(400 + ci)
            tq, tk = sum(lq), sum(lk)
            cq = torch.tensor([0] + list(itertools.accumulate(lq)), dtype=torch.int32)
            ck = torch.tensor([0] + list(itertools.accumulate(lk)), dtype=torch.int32)
            q, k, v = _rand(g, tq, H, D, dtype=dtype), _rand(g, tk, Hk, D, dtype=dtype), _rand(g, tk, Hk, D,
                                                                                                dtype=dtype)
            dout = _rand(g, tq, H, D, dtype=dtype)
            qs = padded_strides(q.shape, pad) if pad else None
            ks = padded_strides(k.shape, pad) if pad else None
            mq, mk = max(lq), max(lk)
            tag = f"varlen {_SHORT[dtype]} lens_q={lq} lens_k={lk} H={H} Hk={Hk} D={D} causal={causal} window={window}"

            def run(t, mq=mq, mk=mk, causal=causal, window=window):
                q_, k_, v_ = (t[n].requires_grad_() for n in ("q", "k", "v"))
                o, lse = fastattn.flash_attention_varlen(q_, k_, v_, t["cq"], t["ck"], mq, mk, causal=causal,
                                                         window=window, return_lse=True)
                return [o, lse] + _grads(o, (q_, k_, v_), t["dout"])

            def exp(q=q, k=k, v=v, cq=cq, ck=ck, dout=dout, causal=causal, window=window):
                qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
                o, lse = ref.attention_varlen(qd, kd, vd, cq, ck, causal=causal, window=window, return_lse=True)
                return [o, lse] + _grads(o, (qd, kd, vd), dout.double())

            cases.append(Case(f"{tag} fwd+autograd", {"q": (q, qs), "k": (k, ks), "v": (v, ks), "cq": (cq, None),
                                                      "ck": (ck, None), "dout": (dout, qs)}, run, exp, dtype))
            left, right = window
            if causal:
                right = 0
            with torch.no_grad():
                out, lse = ops.flash_attn_varlen_fwd(q, k, v, cq, ck, mq, mk, D ** -0.5, left, right)

            def run_bwd(t, mq=mq, mk=mk, left=left, right=right, D=D):
                return list(ops.flash_attn_varlen_bwd(t["dout"], t["q"], t["k"], t["v"], t["out"], t["lse"], t["cq"],
                                                      t["ck"], mq, mk, D ** -0.5, left, right))

            def exp_bwd(exp=exp):
                return exp()[2:]

            cases.append(Case(f"{tag} bwd op", {"dout": (dout, qs), "q": (q, qs), "k": (k, ks), "v": (v, ks),
                                                "out": (out, qs), "lse": (lse, None), "cq": (cq, None),
                                                "ck": (ck, None)}, run_bwd, exp_bwd, dtype,
                              each=["out", "lse"]))
    return cases


def _moe_expected(x, w13, w2, ids, rw):
    """moe_experts in float64: per token, the routing-weighted sum over its picked experts of
    w2 @ (silu(gate) * up), the activation rounded to x's dtype as the kernel stores it."""
    T, K = ids.shape
    inter = w13.shape[1] // 2
    y = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for ti in range(T):
        for j in range(K):
            e = int(ids[ti, j])
            hh = w13[e].double() @ x[ti].double()
            act = (torch.nn.functional.silu(hh[:inter]) * hh[inter:]).to(x.dtype).double()
            y[ti] += rw[ti, j].double() * (w2[e].double() @ act)
    return y


def _paged(g, B, cap_pages, page_size, num_pages, last_len):
    """A block table (B, cap_pages) of distinct pages in shuffled order, with the pool's first
    page as sequence 0's first and its last page holding token last_len - 1 of sequence
    B - 1 (so both ends of the pool are read)."""
    bt = (torch.randperm(num_pages - 2, generator=g)[: B * cap_pages] + 1).view(B, cap_pages)
    bt[0, 0] = 0
    bt[B - 1, max(0, (last_len - 1) // page_size)] = num_pages - 1
    return bt.to(torch.int32)


def _decode_caches(g, B, S, Hk, D, lens, psz, dtype):
    """(block_table or None, cache shape, k_cache, v_cache): page pools of page size psz with a
    capacity of S tokens per sequence (two spare pages), or (B, S, Hk, D) caches when psz = 0."""
    if psz:
        cap_pages = -(-S // psz)
        num_pages = B * cap_pages + 2
        bt, cshape = _paged(g, B, cap_pages, psz, num_pages, lens[-1]), (num_pages, psz, Hk, D)
    else:
        bt, cshape = None, (B, S, Hk, D)
    return bt, cshape, _rand(g, *cshape, dtype=dtype), _rand(g, *cshape, dtype=dtype)


def decode_cases():
    cases = []
    configs = [  # B, S_max, H, Hk, D, seqlens, splits, paged page_size (0 = contiguous), softcap, pad, q4
        (1, 1, 1, 1, 1, [1], 0, 0, 0.0, 0, False),
        (3, 17, 4, 2, 17, [1, 0, 17], 1, 0, 0.0, 3, True),
        (2, 65, 8, 1, 64, [33, 65], 3, 0, 0.0, 0, False),
        (2, 33, 2, 2, 36, [5, 33], 0, 0, 20.0, 1, False),
        (3, 40, 4, 2, 24, [40, 13, 1], 2, 8, 0.0, 0, False),
        (2, 21, 3, 1, 66, [3, 21], 0, 7, 0.0, 2, True),
        (1, 9, 2, 1, 128, [9], 1, 3, 0.0, 0, False),
    ]
    for dtype in DTYPES:
        for ci, (B, S, H, Hk, D, lens, splits, psz, softcap, pad, q4) in enumerate(configs):
            g = torch.Generator().manual_seed(500 + ci)
            q = _rand(g, B, 1, H, D, dtype=dtype) if q4 else _rand(g, B, H, D, dtype=dtype)
            seqlens = torch.tensor(lens, dtype=torch.int32)
            bt, cshape, kc, vc = _decode_caches(g, B, S, Hk, D, lens, psz, dtype)
            cs = padded_strides(cshape, pad) if pad else None
            qs = padded_strides(q.shape, pad) if pad else None
            tag = (f"decode {_SHORT[dtype]} q{tuple(q.shape)} cache{cshape} lens={lens} splits={splits} "
                   f"paged={psz} softcap={softcap} pad={pad}")

            def run(t, splits=splits, softcap=softcap):
                return list(fastattn.decode_attention(t["q"], t["kc"], t["vc"], t["seqlens"], num_splits=splits,
                                                      return_lse=True, block_table=t["bt"], softcap=softcap))

            def exp(q=q, kc=kc, vc=vc, seqlens=seqlens, bt=bt, softcap=softcap):
                return list(ref.decode_attention(q.double(), kc.double(), vc.double(), seqlens, return_lse=True,
                                                 block_table=bt, softcap=softcap))

            bts = padded_strides(bt.shape, pad) if (pad and bt is not None) else None
            cases.append(Case(tag, {"q": (q, qs), "kc": (kc, cs), "vc": (vc, cs), "seqlens": (seqlens, None),
                                    "bt": (bt, bts)}, run, exp, dtype))
    return cases


def kvcache_cases():
    """attention_with_kvcache (with and without new k/v: the append writes into guarded
    caches) and append_kv on its own."""
    cases = []
    configs = [  # B, S_max, Sq, H, Hk, D, start lens, append, paged page_size, causal, window, pad
        (1, 4, 1, 1, 1, 1, [3], True, 0, True, (-1, -1), 0),
        (2, 20, 3, 4, 2, 17, [0, 17], True, 0, True, (-1, -1), 3),
        (2, 40, 7, 6, 1, 32, [5, 23], True, 0, True, (-1, -1), 0),  # 42 rows per kv head: GEMM path
        (2, 33, 5, 6, 2, 40, [7, 33], False, 0, True, (6, -1), 1),
        (3, 24, 4, 2, 2, 24, [9, 0, 20], True, 8, True, (-1, -1), 0),
        (2, 30, 16, 4, 1, 66, [3, 14], True, 5, False, (-1, -1), 2),
    ]
    for dtype in DTYPES:
        for ci, (B, S, Sq, H, Hk, D, lens, append, psz, causal, window, pad) in enumerate(configs):
            g = torch.Generator().manual_seed(600 + ci)
            q = _rand(g, B, Sq, H, D, dtype=dtype)
            seqlens = torch.tensor(lens, dtype=torch.int32)
            if psz:
                cap_pages = -(-S // psz)
                num_pages = B * cap_pages + 2
                bt = _paged(g, B, cap_pages, psz, num_pages, lens[-1] + (Sq if append else 0))
                cshape = (num_pages, psz, Hk, D)
            else:
                bt = None
                cshape = (B, S, Hk, D)
            kc, vc = _rand(g, *cshape, dtype=dtype), _rand(g, *cshape, dtype=dtype)
            kn = _rand(g, B, Sq, Hk, D, dtype=dtype) if append else None
            vn = _rand(g, B, Sq, Hk, D, dtype=dtype) if append else None
            cs = padded_strides(cshape, pad) if pad else None
            qs = padded_strides(q.shape, pad) if pad else None
            ns = padded_strides((B, Sq, Hk, D), pad) if pad else None
            tag = (f"kvcache {_SHORT[dtype]} q{tuple(q.shape)} cache{cshape} lens={lens} append={append} "
                   f"paged={psz} causal={causal} window={window} pad={pad}")
            bts = padded_strides(bt.shape, pad) if (pad and bt is not None) else None
            inputs = {"q": (q, qs), "kc": (kc, cs), "vc": (vc, cs), "seqlens": (seqlens, None), "bt": (bt, bts),
                      "k": (kn, ns), "v": (vn, ns)}

            def run(t, causal=causal, window=window):
                with torch.no_grad():
                    o, lse = fastattn.attention_with_kvcache(t["q"], t["kc"], t["vc"], t["seqlens"], k=t["k"],
                                                             v=t["v"], block_table=t["bt"], causal=causal,
                                                             window=window, return_lse=True)
                return [o, lse, t["kc"], t["vc"]]

            def exp(q=q, kc=kc, vc=vc, seqlens=seqlens, kn=kn, vn=vn, bt=bt, causal=causal, window=window):
                kc2, vc2 = kc.double(), vc.double()
                o, lse = ref.attention_with_kvcache(q.double(), kc2, vc2, seqlens,
                                                    k=None if kn is None else kn.double(),
                                                    v=None if vn is None else vn.double(), block_table=bt,
                                                    causal=causal, window=window, return_lse=True)
                return [o, lse, kc2, vc2]

            cases.append(Case(tag, inputs, run, exp, dtype, exact=(2, 3)))
            if append:
                def run_append(t):
                    with torch.no_grad():
                        fastattn.append_kv(t["kc"], t["vc"], t["k"], t["v"], t["seqlens"], block_table=t["bt"])
                    return [t["kc"], t["vc"]]

                def exp_append(kc=kc, vc=vc, kn=kn, vn=vn, seqlens=seqlens, bt=bt):
                    return list(ref.append_kv(kc.clone(), vc.clone(), kn, vn, seqlens, bt))

                a_inputs = {n: inputs[n] for n in ("kc", "vc", "k", "v", "seqlens", "bt")}
                cases.append(Case(f"append_kv {_SHORT[dtype]} cache{cshape} new{tuple(kn.shape)} lens={lens} "
                                  f"paged={psz} pad={pad}", a_inputs, run_append, exp_append, dtype, exact=(0, 1)))
    return cases


def moe_cases():
    cases = []
    configs = [  # T, hidden, inter, experts, top_k, pad
        (1, 1, 1, 1, 1, 0),
        (3, 17, 9, 3, 2, 3),
        (6, 111, 97, 5, 2, 0),
        (5, 33, 65, 4, 3, 1),
        (2, 64, 32, 2, 1, 0),
    ]
    for dtype in DTYPES:
        for ci, (T, Hd, I, E, K, pad) in enumerate(configs):
            g = torch.Generator().manual_seed(700 + ci)
            x = _rand(g, T, Hd, dtype=dtype)
            w13 = _rand(g, E, 2 * I, Hd, dtype=dtype, scale=Hd ** -0.5)
            w2 = _rand(g, E, Hd, I, dtype=dtype, scale=I ** -0.5)
            ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
            # The first and last experts are always used, so both ends of the weights are read.
            if not (ids[0] == 0).any():
                ids[0, 0] = 0
            if not (ids[-1] == E - 1).any():
                ids[-1, -1] = E - 1
            rw = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
            ps = (lambda shape: padded_strides(shape, pad) if pad else None)
            tag = f"moe {_SHORT[dtype]} x{tuple(x.shape)} inter={I} experts={E} top_k={K} pad={pad}"

            def run(t):
                return [torch.ops.fastattn.moe_experts(t["x"], t["rw"], t["ids"], t["w13"], t["w2"])]

            def exp(x=x, w13=w13, w2=w2, ids=ids, rw=rw):
                return [_moe_expected(x, w13, w2, ids, rw)]

            cases.append(Case(tag, {"x": (x, ps(x.shape)), "rw": (rw, ps(rw.shape)), "ids": (ids, ps(ids.shape)),
                                    "w13": (w13, ps(w13.shape)), "w2": (w2, ps(w2.shape))}, run, exp, dtype))
    return cases


def large_cases():
    """Shapes past the kernels' block sizes (flash: 64/128-row query blocks, 256-key blocks,
    64-key K/V chunks, 128/64 backward tiles; decode: 32-key blocks, automatic split-KV,
    query chunks; rms_norm / rotary / moe: several threads' chunks, register-block tails),
    the largest head dims, page size 1. Only with every input guarded at once, to keep the
    run short."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sd = _SHORT[dtype]
        g = torch.Generator().manual_seed(800)
        # flash fwd + bwd through autograd, and varlen
        for (B, Sq, Sk, H, Hk, D, causal, window, pad) in [(1, 130, 261, 4, 2, 72, True, (-1, -1), 3),
                                                           (2, 67, 129, 2, 1, 24, False, (40, 7), 0),
                                                           (1, 9, 14, 2, 1, 512, False, (-1, -1), 1)]:
            q = _rand(g, B, Sq, H, D, dtype=dtype)
            k = _rand(g, B, Sk, Hk, D, dtype=dtype)
            v = _rand(g, B, Sk, Hk, D, dtype=dtype)
            dout = _rand(g, B, Sq, H, D, dtype=dtype)
            qs = padded_strides(q.shape, pad) if pad else None
            ks = padded_strides(k.shape, pad) if pad else None
            kw = dict(causal=causal, window=window)

            cases.append(_flash_autograd_case(f"large flash {sd} q{tuple(q.shape)} kv{tuple(k.shape)} {kw} pad={pad}",
                                              q, k, v, dout, qs, ks, kw, dtype, each=False))
        lq, lk, H, Hk, D = [130, 7, 1], [261, 3, 66], 2, 1, 40
        cq = torch.tensor([0] + list(itertools.accumulate(lq)), dtype=torch.int32)
        ck = torch.tensor([0] + list(itertools.accumulate(lk)), dtype=torch.int32)
        q, k, v = _rand(g, sum(lq), H, D, dtype=dtype), _rand(g, sum(lk), Hk, D, dtype=dtype), _rand(
            g, sum(lk), Hk, D, dtype=dtype)
        dout = _rand(g, sum(lq), H, D, dtype=dtype)

        def run_vl(t, mq=max(lq), mk=max(lk)):
            q_, k_, v_ = (t[n].requires_grad_() for n in ("q", "k", "v"))
            o, lse = fastattn.flash_attention_varlen(q_, k_, v_, t["cq"], t["ck"], mq, mk, causal=True,
                                                     return_lse=True)
            return [o, lse] + _grads(o, (q_, k_, v_), t["dout"])

        def exp_vl(q=q, k=k, v=v, cq=cq, ck=ck, dout=dout):
            qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
            o, lse = ref.attention_varlen(qd, kd, vd, cq, ck, causal=True, return_lse=True)
            return [o, lse] + _grads(o, (qd, kd, vd), dout.double())

        cases.append(Case(f"large varlen {sd} lens_q={lq} lens_k={lk} causal", {
            "q": (q, padded_strides(q.shape, 2)), "k": (k, None), "v": (v, None), "cq": (cq, None), "ck": (ck, None),
            "dout": (dout, None)}, run_vl, exp_vl, dtype, each=False))

        # decode: automatic splits over a long cache, D 256 and 512, page size 1
        for (B, S, H, Hk, D, lens, psz, pad) in [(2, 300, 4, 2, 256, [77, 300], 0, 0),
                                                 (1, 70, 2, 1, 512, [70], 0, 1),
                                                 (2, 37, 4, 4, 20, [37, 12], 1, 0)]:
            q = _rand(g, B, H, D, dtype=dtype)
            seqlens = torch.tensor(lens, dtype=torch.int32)
            bt, cshape, kc, vc = _decode_caches(g, B, S, Hk, D, lens, psz, dtype)
            cs = padded_strides(cshape, pad) if pad else None

            def run_dec(t):
                return list(fastattn.decode_attention(t["q"], t["kc"], t["vc"], t["seqlens"], return_lse=True,
                                                      block_table=t["bt"]))

            def exp_dec(q=q, kc=kc, vc=vc, seqlens=seqlens, bt=bt):
                return list(ref.decode_attention(q.double(), kc.double(), vc.double(), seqlens, return_lse=True,
                                                 block_table=bt))

            cases.append(Case(f"large decode {sd} q{tuple(q.shape)} cache{cshape} lens={lens} paged={psz}",
                              {"q": (q, None), "kc": (kc, cs), "vc": (vc, cs), "seqlens": (seqlens, None),
                               "bt": (bt, None)}, run_dec, exp_dec, dtype, each=False))

        # attention_with_kvcache: several query chunks (G * Hk * D = 4096 floats per query)
        B, S, Sq, H, Hk, D, lens = 2, 64, 20, 8, 2, 512, [10, 44]
        q = _rand(g, B, Sq, H, D, dtype=dtype)
        kc, vc = _rand(g, B, S, Hk, D, dtype=dtype), _rand(g, B, S, Hk, D, dtype=dtype)
        kn, vn = _rand(g, B, Sq, Hk, D, dtype=dtype), _rand(g, B, Sq, Hk, D, dtype=dtype)
        seqlens = torch.tensor(lens, dtype=torch.int32)

        def run_kv(t):
            with torch.no_grad():
                o, lse = fastattn.attention_with_kvcache(t["q"], t["kc"], t["vc"], t["seqlens"], k=t["k"], v=t["v"],
                                                         window=(30, -1), return_lse=True)
            return [o, lse, t["kc"], t["vc"]]

        def exp_kv(q=q, kc=kc, vc=vc, seqlens=seqlens, kn=kn, vn=vn):
            kc2, vc2 = kc.double(), vc.double()
            o, lse = ref.attention_with_kvcache(q.double(), kc2, vc2, seqlens, k=kn.double(), v=vn.double(),
                                                window=(30, -1), return_lse=True)
            return [o, lse, kc2, vc2]

        cases.append(Case(f"large kvcache {sd} q{tuple(q.shape)} cache{tuple(kc.shape)} lens={lens} window=(30, -1)",
                          {"q": (q, None), "kc": (kc, None), "vc": (vc, None), "seqlens": (seqlens, None),
                           "k": (kn, None), "v": (vn, None)}, run_kv, exp_kv, dtype, exact=(2, 3), each=False))

        # rms_norm over several threads' row chunks, with the residual
        x, r = _rand(g, 70, 1001, dtype=dtype), _rand(g, 70, 1001, dtype=dtype)
        w = (1 + 0.1 * torch.randn(1001, generator=g)).to(dtype)

        def run_rms(t):
            y, h = fastattn.rms_norm(t["x"], t["w"], 1e-6, residual=t["r"])
            return [y, h]

        def exp_rms(x=x, w=w, r=r):
            return list(ref.rms_norm(x.double(), w.double(), 1e-6, residual=r.double()))

        cases.append(Case(f"large rms_norm {sd} x(70, 1001) residual", {
            "x": (x, padded_strides(x.shape, 5)), "w": (w, None), "r": (r, None)}, run_rms, exp_rms, dtype,
            each=False))

        # rotary over several threads' token chunks, in place
        q, k = _rand(g, 2, 150, 4, 66, dtype=dtype), _rand(g, 2, 150, 2, 66, dtype=dtype)
        ang = torch.randn(160, 32, generator=g, dtype=torch.float64)
        cos, sin = ang.cos().float(), ang.sin().float()

        def run_rot(t):
            with torch.no_grad():
                fastattn.apply_rotary(t["q"], t["k"], t["cos"], t["sin"], inplace=True)
            return [t["q"], t["k"]]

        def exp_rot(q=q, k=k, cos=cos, sin=sin):
            return list(ref.apply_rotary(q.double(), k.double(), cos.double(), sin.double()))

        cases.append(Case(f"large rotary {sd} q(2, 150, 4, 66) k(2, 150, 2, 66) inplace", {
            "q": (q, padded_strides(q.shape, 2)), "k": (k, None), "cos": (cos, None), "sin": (sin, None)},
            run_rot, exp_rot, dtype, each=False))

        # moe: token-row blocks of 4 plus a tail, hidden/inter past several cache lines
        T, Hd, I, E, K = 9, 300, 200, 3, 2
        x = _rand(g, T, Hd, dtype=dtype)
        w13 = _rand(g, E, 2 * I, Hd, dtype=dtype, scale=Hd ** -0.5)
        w2 = _rand(g, E, Hd, I, dtype=dtype, scale=I ** -0.5)
        ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1], [0, 1], [1, 2], [2, 0]])
        rw = torch.softmax(torch.randn(T, K, generator=g), dim=-1)

        def run_moe(t):
            return [torch.ops.fastattn.moe_experts(t["x"], t["rw"], t["ids"], t["w13"], t["w2"])]

        def exp_moe(x=x, w13=w13, w2=w2, ids=ids, rw=rw):
            return [_moe_expected(x, w13, w2, ids, rw)]

        cases.append(Case(f"large moe {sd} x{tuple(x.shape)} inter={I} experts={E}", {
            "x": (x, None), "rw": (rw, None), "ids": (ids, None), "w13": (w13, None), "w2": (w2, None)},
            run_moe, exp_moe, dtype, each=False))
    return cases


def all_cases():
    return rms_norm_cases() + rotary_cases() + flash_cases() + varlen_cases() + decode_cases() + kvcache_cases() \
        + moe_cases() + large_cases()


# ---- worker (one process per ISA tier) --------------------------------------------------------
def worker(tier, pattern=""):
    got = fastattn.cpu_isa()
    if got != tier and not (tier == "default" and got not in TIERS):
        print(f"FAIL cpu_isa() is {got!r}, expected {tier!r}", flush=True)
        return 2
    out = sys.stdout

    def log(label):
        out.write(f"CASE {label}\n")
        out.flush()

    # One thread for the small cases (their work fits one chunk of every parallel loop, and
    # the pool's wake-ups would dominate), two for the larger ones, which split their rows,
    # tokens and blocks across threads.
    n_cases = n_runs = 0
    for case in all_cases():
        if pattern and pattern not in case.name:
            continue
        torch.set_num_threads(2 if case.each is False else 1)
        n_runs += run_case(case, log)
        n_cases += 1
    print(f"OK {got} {n_cases} cases {n_runs} runs", flush=True)
    return 0


# ---- pytest side ----------------------------------------------------------------------------------
def _supported_tiers():
    """The tiers this CPU runs, as test_cpu_isa.py decides them (None: not x86-64 Linux)."""
    try:
        from fastattn.benchmarks.meta import all_cpu_flags
        flags = all_cpu_flags()
    except Exception:  # noqa: BLE001
        flags = None
    if flags is None or not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return None
    v3 = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe", "popcnt", "sse4_2", "ssse3", "cx16"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    best = "avx512" if v4 <= flags else ("avx2" if v3 <= flags else "baseline")
    return TIERS[: TIERS.index(best) + 1]


def _env(isa):
    env = {k: v for k, v in os.environ.items() if k != "FASTATTN_CPU_ISA"}
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    if isa is not None:
        env["FASTATTN_CPU_ISA"] = isa
    return env


@functools.lru_cache(maxsize=None)
def _single_tier_build():
    code = "import torch, fastattn; fastattn.rms_norm(torch.ones(2, 3)); print(fastattn.cpu_isa())"
    r = subprocess.run([sys.executable, "-c", code], env=_env(None), capture_output=True, text=True, timeout=120)
    return r.stdout.strip() not in TIERS


_TIERS = _supported_tiers()


needs_mprotect = pytest.mark.skipif(_libc is None or not sys.platform.startswith("linux"),
                                    reason="needs Linux mmap/mprotect")


@needs_mprotect
@pytest.mark.parametrize("tier", TIERS)
def test_guard_pages(tier):
    if _TIERS is None:
        if tier != "baseline":
            pytest.skip("not x86-64 Linux: only the default kernels are run")
        tier_arg, isa = "default", None
    elif _single_tier_build():
        if tier != "baseline":
            pytest.skip("single-tier build: only its kernels are run")
        tier_arg, isa = "default", None
    elif tier not in _TIERS:
        pytest.skip(f"this CPU lacks the {tier} tier")
    else:
        tier_arg, isa = tier, tier
    r = subprocess.run([sys.executable, os.path.abspath(__file__), tier_arg], env=_env(isa), capture_output=True,
                       text=True, timeout=600)
    cases = [line[5:] for line in r.stdout.splitlines() if line.startswith("CASE ")]
    last = cases[-1] if cases else "(before the first case)"
    if r.returncode < 0:
        pytest.fail(f"tier {tier}: killed by signal {-r.returncode} in case: {last}\n{r.stderr[-3000:]}")
    assert r.returncode == 0, f"tier {tier}: exit {r.returncode} in case: {last}\n{r.stdout[-2000:]}\n" \
                              f"{r.stderr[-5000:]}"
    assert r.stdout.splitlines()[-1].startswith("OK "), r.stdout[-2000:]


@needs_mprotect
def test_guard_helper_faults_outside_the_tensor():
    """The helper itself: a read one element past the end (or before the start) of a
    guarded tensor kills a process with SIGSEGV, while reading the tensor does not."""
    code = (
        "import sys, ctypes, torch; sys.path.insert(0, {d!r}); import test_guard_pages as g\n"
        "t = g.guarded(torch.arange(5, dtype=torch.float32), {side!r}, strides=(1,))\n"
        "assert t.tolist() == [0, 1, 2, 3, 4]\n"
        "p = t.data_ptr() + {off}\n"
        "print('reading', flush=True); ctypes.c_float.from_address(p).value\n"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    for side, off in (("after", 5 * 4), ("before", -4)):
        r = subprocess.run([sys.executable, "-c", code.format(d=here, side=side, off=off)], env=_env(None),
                           capture_output=True, text=True, timeout=120)
        assert "reading" in r.stdout, r.stderr
        assert r.returncode == -11, (side, r.returncode, r.stderr[-2000:])
    # In bounds: the first and last element are readable.
    t = guarded(torch.arange(7, dtype=torch.float16).view(7, 1).expand(7, 3).contiguous(), "after",
                strides=padded_strides((7, 3), 2))
    assert t[-1, -1].item() == 6 and t[0, 0].item() == 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))
