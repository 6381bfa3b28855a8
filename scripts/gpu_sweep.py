#!/usr/bin/env python3
"""Correctness checks for scripts/gpu_check.sh that the unit tests do not make.

Two modes, each printing one line per case and rewriting a JSON of all results after every
case (so a run cut short by its time box still leaves what it got):

  gpu_sweep.py [--device cuda|cpu] [--tiny] [--json PATH]
      the shape sweep: production-sized shapes the unit tests (which keep shapes small to
      stay fast) never reach -- RMSNorm rows of N = 4096..131072 (fwd, residual, bwd), decode
      at B64 x 4096 and B1 x 65536 with ragged lengths (GQA 32/8, D 128, bf16), paged decode
      (page 16) at B64 x 4096, RoPE at the benchmark shape, CUDA-graph replay of append_kv +
      decode_attention (contiguous and paged), flash forward at S 8k; logit soft-capping
      (softcap=, the kSoftcap kernels) on flash forward S 2k, flash fwd+bwd S 1k, varlen fwd+bwd,
      decode and paged decode at B64 x 4096, paged attention_with_kvcache at B8 x 4096; and one
      Gemma-2-like model step (fastattn.models.Llama: capped scores, sliding + full layers,
      forward, ragged paged prefill and decode), bf16 fastattn vs bf16 torch vs fp32 torch.
  gpu_sweep.py --all ...   the sweep, then the --paths cases (no sanitizer: gpu_check.sh's sweep step)
  gpu_sweep.py --paths [--device cuda|cpu] [--tiny] [--json PATH]
      every kernel path once at small shapes: the driver compute-sanitizer memcheck and
      racecheck run (small, so the sanitizer's slowdown stays inside its time box), still
      checking each result so a path that runs clean but computes garbage is caught too. The
      soft-capped twins included: flash forward d64/d128 causal and not, flash backward d64/d128,
      varlen fwd+bwd, decode (1 split, splits + combine, paged, d64/d128/d256), paged
      attention_with_kvcache.

--tiny shrinks every shape so the CPU kernels run the same cases in seconds (gpu_check.sh
--dry-run). Each case is compared with fastattn.reference (or torch SDPA for the 8k flash
forward, whose reference would materialise 8k x 8k scores) computed in float32 on upcast
inputs, by ||out - ref|| / ||ref|| against a tolerance (bf16 operands: 1e-2, DESIGN/METHOD's
band), and must be finite everywhere. A soft-capped case also checks that the cap changes the
reference by more than 10x the tolerance (else it could not catch a kernel ignoring softcap=);
its q and k are scaled by 2 and the cap is 2. The model case uses the error-ratio rule
(check_ratio; its "rel err" column is its error over the allowed bound, <= 1 passes). Exit
status 0 only when every case passed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the checkout's fastattn (gpu_check.sh builds it in place)

import fastattn  # noqa: E402
from fastattn import reference  # noqa: E402

# bf16 operands land between 1e-3 and 1e-2 relative error against an fp32 reference;
# fp32 far below. Anything above these is a wrong result, not rounding.
TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}


class CaseFailed(AssertionError):
    pass


def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def check(name, out, ref, dtype, errs):
    """Record rel error of `out` vs `ref`; raise CaseFailed past the tolerance or on non-finite."""
    if tuple(out.shape) != tuple(ref.shape):
        raise CaseFailed(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out.float()).all():
        raise CaseFailed(f"{name}: non-finite values in the output")
    e = rel_err(out, ref)
    errs[name] = e
    tol = TOL[dtype]
    if not e <= tol:
        raise CaseFailed(f"{name}: relative error {e:.3e} > {tol:g}")


def check_backward(out, ref, pairs, dt, errs):
    """Backpropagate one random cotangent through `out` and (in fp32) through `ref`, then check
    each (name, ours, reference) leaf's .grad: the backward half of every fwd+bwd case."""
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.float())
    for name, a, b in pairs:
        check(name, a.grad, b.grad, dt, errs)


def check_cap_bites(ref, ref_uncapped, dt):
    """A soft-capped case proves something only if the cap changes the answer well past the
    tolerance: otherwise a kernel that ignored softcap= would pass it."""
    e = rel_err(ref, ref_uncapped)
    if not e > 10 * TOL[dt]:
        raise CaseFailed(f"softcap changes the reference by only {e:.3e}: the case would not catch an uncapped kernel")


def max_abs_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_ratio(name, ours, low, true, errs, factor=2.0, atol=1e-2):
    """The error-ratio rule (tests/conftest.assert_error_ratio): max|ours - true| <= factor *
    max|low - true| + atol, `low` the same computation on the torch path in the same precision.
    errs records ours' error relative to that bound (<= 1 passes)."""
    if tuple(ours.shape) != tuple(true.shape):
        raise CaseFailed(f"{name}: shape {tuple(ours.shape)} != reference {tuple(true.shape)}")
    if not torch.isfinite(ours.float()).all():
        raise CaseFailed(f"{name}: non-finite values in the output")
    err, ref_err = max_abs_err(ours, true), max_abs_err(low, true)
    bound = factor * ref_err + atol
    errs[name] = err / bound
    if not err <= bound:
        raise CaseFailed(f"{name}: max error {err:.3e} > {factor} * torch's {ref_err:.3e} + {atol:g}")


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# ---- inputs --------------------------------------------------------------------------------
def ragged_lengths(B, cap, gen_device, seed):
    """Lengths in [1, cap], random, so mostly not multiples of the 16/64/128 tiles; the first
    is cap (a full cache; cap - 13 when B = 1, so a lone sequence still has a ragged tail)
    and, for B > 2, the second is 1 (a single key)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, cap + 1, (B,), generator=g)
    lens[0] = cap if B > 1 else cap - 13
    if B > 2:
        lens[1] = 1
    return lens.to(torch.int32).to(gen_device)


def paged_copy(kc, vc, lens, page_size, seed):
    """The same tokens as the contiguous caches kc/vc (B, S, Hk, D), in a page pool handed out
    in shuffled order, with 3 spare NaN pages that no table entry names: a kernel reading a page
    it was not given turns the output NaN. Table entries past a sequence's last page point at
    its first page (finite: the fp32 reference reads whole tables, masked)."""
    B, S, Hk, D = kc.shape
    dev = kc.device
    max_pages = math.ceil(S / page_size)
    per_seq = (lens.to(torch.int64).cpu() + page_size - 1) // page_size  # (B,)
    used = torch.arange(max_pages).view(1, -1) < per_seq.view(-1, 1)  # (B, max_pages)
    total = int(per_seq.sum()) + 3
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=g)
    table = torch.zeros(B, max_pages, dtype=torch.int64)
    table[used] = order[: int(per_seq.sum())]
    table = torch.where(used, table, table[:, :1])
    pad = max_pages * page_size - S
    pools = []
    for cache in (kc, vc):
        pool = torch.full((total, page_size, Hk, D), float("nan"), dtype=kc.dtype, device=dev)
        paged = F.pad(cache, (0, 0, 0, 0, 0, pad)).view(B, max_pages, page_size, Hk, D)
        pool[table[used].to(dev)] = paged[used.to(dev)]  # one scatter, not a loop over pages
        pools.append(pool)
    return pools[0], pools[1], table.to(torch.int32).to(dev)


def garbage_tail(cache, lens):
    """Rows past each length get large finite garbage: a kernel that forgets the length
    mask shows it, while the (masked) fp32 reference is unaffected."""
    for b, n in enumerate(lens.tolist()):
        cache[b, n:] = 100.0


def rope_tables(max_pos, rot_dim, device):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()


def sdpa_ref(q, k, v, causal, window=None):
    """fp32 SDPA on (B, S, H, D) inputs with GQA; causal bottom-right as fastattn's."""
    Sq, Sk = q.shape[1], k.shape[1]
    qt, kt, vt = (t.float().transpose(1, 2) for t in (q, k, v))
    mask = None
    if causal or window is not None:
        i = torch.arange(Sq, device=q.device).view(-1, 1) + (Sk - Sq)
        j = torch.arange(Sk, device=q.device).view(1, -1)
        mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
        if causal:
            mask &= j <= i
        if window is not None:
            mask &= j >= i - window[0]
            if window[1] >= 0:
                mask &= j <= i + window[1]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


# ---- sweep cases ---------------------------------------------------------------------------
def case_rms_norm(dev, dt, rows, n, residual, backward):
    def run(errs):
        x = torch.randn(rows, n, device=dev, dtype=dt)
        w = (torch.rand(n, device=dev, dtype=dt) + 0.5)
        r = torch.randn_like(x) if residual else None
        if backward:
            x.requires_grad_(True)
            w.requires_grad_(True)
        y = fastattn.rms_norm(x, w, 1e-6, residual=r) if residual else fastattn.rms_norm(x, w, 1e-6)
        y, h = (y if residual else (y, None))
        xr = x.detach().float().requires_grad_(backward)
        wr = w.detach().float().requires_grad_(backward)
        if residual:
            yr, hr = reference.rms_norm(xr, wr, 1e-6, residual=r.float())
            check("h", h, hr, dt, errs)
        else:
            yr = reference.rms_norm(xr, wr, 1e-6)
        check("y", y, yr, dt, errs)
        if backward:
            check_backward(y, yr, (("dx", x, xr), ("dweight", w, wr)), dt, errs)
    return run


def softcap_kw(softcap):
    """{} for an uncapped case (the call exactly as before softcap= existed), else {"softcap": cap}."""
    return {"softcap": softcap} if softcap else {}


def amp(softcap):
    """Soft-capped cases scale q and k by 2 so that the scores spread over several units of the
    cap (CAP = 2): tanh bends most of them (check_cap_bites)."""
    return 2.0 if softcap else 1.0


CAP = 2.0  # the soft-capped cases' cap: small enough to bend most scores


def case_decode(dev, dt, B, S, H, Hk, D, page_size=None, num_splits=0, softcap=0.0):
    def run(errs):
        kc = (torch.randn(B, S, Hk, D, device=dev) * amp(softcap)).to(dt)
        vc = torch.randn(B, S, Hk, D, device=dev, dtype=dt)
        lens = ragged_lengths(B, S, dev, seed=B * 7 + S)
        q = (torch.randn(B, H, D, device=dev) * amp(softcap)).to(dt)
        kr, vr = kc.float(), vc.float()  # reference sees the valid rows only (masked)
        cap = softcap_kw(softcap)
        if page_size is None:
            garbage_tail(kc, lens)
            garbage_tail(vc, lens)
            out = fastattn.decode_attention(q, kc, vc, lens, num_splits=num_splits, **cap)
        else:
            kp, vp, bt = paged_copy(kc, vc, lens, page_size, seed=S)
            out = fastattn.decode_attention(q, kp, vp, lens, block_table=bt, num_splits=num_splits, **cap)
        ref = reference.decode_attention(q.float(), kr, vr, lens, **cap)
        check("out", out, ref, dt, errs)
        if softcap:
            check_cap_bites(ref, reference.decode_attention(q.float(), kr, vr, lens), dt)
    return run


def case_rope(dev, dt, B, S, H, Hk, D, inplace, random_positions, rot_dim=None, interleaved=False):
    def run(errs):
        max_pos = max(2 * S, 128)
        cos, sin = rope_tables(max_pos, rot_dim or D, dev)
        q = torch.randn(B, S, H, D, device=dev, dtype=dt)
        k = torch.randn(B, S, Hk, D, device=dev, dtype=dt)
        pos = torch.randint(0, max_pos, (B, S), device=dev) if random_positions else None
        qr, kr = reference.apply_rotary(q.float(), k.float(), cos, sin, positions=pos, interleaved=interleaved)
        qo, ko = fastattn.apply_rotary(q, k, cos, sin, positions=pos, interleaved=interleaved, inplace=inplace)
        if inplace and (qo.data_ptr() != q.data_ptr() or ko.data_ptr() != k.data_ptr()):
            raise CaseFailed("inplace=True returned new tensors")
        check("q", qo, qr, dt, errs)
        check("k", ko, kr, dt, errs)
    return run


def case_graph(dev, dt, B, S, H, Hk, D, steps, page_size=None):
    """append_kv + decode_attention captured once in a CUDA graph (on the CPU: run eagerly),
    replayed `steps` times with fresh inputs copied into the static buffers; checked each step
    against the reference advancing an fp32 mirror of the cache. cache_seqlens advances inside
    the graph, so a replay that reads a stale length or writes the wrong row shows."""
    def run(errs):
        cap = S + steps + 1  # + 1: on CUDA the warm-up before the capture appends one row too
        kc = torch.randn(B, cap, Hk, D, device=dev, dtype=dt)
        vc = torch.randn(B, cap, Hk, D, device=dev, dtype=dt)
        lens = ragged_lengths(B, S, dev, seed=11)
        bt = None
        if page_size is not None:
            kc, vc, bt = paged_copy(kc, vc, torch.full((B,), cap, dtype=torch.int32), page_size, seed=5)
        q = torch.randn(B, H, D, device=dev, dtype=dt)
        kn = torch.randn(B, 1, Hk, D, device=dev, dtype=dt)
        vn = torch.randn_like(kn)
        out = torch.empty_like(q)

        def step():
            fastattn.append_kv(kc, vc, kn, vn, lens, block_table=bt)
            lens.add_(1)
            out.copy_(fastattn.decode_attention(q, kc, vc, lens, block_table=bt))

        graph = None
        if dev == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()  # warm-up outside the capture, as CUDA graphs require
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
        # The fp32 mirror starts from the state after the warm-up (the capture ran nothing).
        kr, vr, lr = kc.float(), vc.float(), lens.clone()
        for i in range(steps):
            for t in (q, kn, vn):
                t.copy_(torch.randn_like(t))
            if graph is not None:
                graph.replay()
            else:
                step()
            reference.append_kv(kr, vr, kn.float(), vn.float(), lr, block_table=bt)
            lr.add_(1)
            if not torch.equal(lens, lr):
                raise CaseFailed(f"step {i}: cache_seqlens {lens.tolist()[:4]}... != {lr.tolist()[:4]}...")
            check(f"out[{i}]", out, reference.decode_attention(q.float(), kr, vr, lr, block_table=bt), dt, errs)
        # append_kv is a copy: the cache must equal the mirror exactly, pad rows included.
        if not torch.equal(kc.float().nan_to_num(7.0), kr.nan_to_num(7.0)) or \
                not torch.equal(vc.float().nan_to_num(7.0), vr.nan_to_num(7.0)):
            raise CaseFailed("the caches differ from the reference's appends")
    return run


def qkv_inputs(dev, dt, q_shape, kv_shape, backward, softcap):
    """q, k, v leaves (amp(softcap)-scaled q and k) and their fp32 copies for the reference."""
    a = amp(softcap)
    q = (torch.randn(q_shape, device=dev) * a).to(dt).requires_grad_(backward)
    k = (torch.randn(kv_shape, device=dev) * a).to(dt).requires_grad_(backward)
    v = torch.randn(kv_shape, device=dev).to(dt).requires_grad_(backward)
    qr, kr, vr = (t.detach().float().requires_grad_(backward) for t in (q, k, v))
    return (q, k, v), (qr, kr, vr)


def case_flash(dev, dt, B, Sq, Sk, H, Hk, D, causal, window=None, backward=False, softcap=0.0):
    def run(errs):
        (q, k, v), (qr, kr, vr) = qkv_inputs(dev, dt, (B, Sq, H, D), (B, Sk, Hk, D), backward, softcap)
        kw = {"window": window} if window is not None else {}
        cap = softcap_kw(softcap)
        out = fastattn.flash_attention(q, k, v, causal=causal, **kw, **cap)
        if backward or softcap:  # SDPA has no soft-capping
            ref = reference.attention(qr, kr, vr, causal=causal, window=window or (-1, -1), **cap)
        else:
            ref = sdpa_ref(qr, kr, vr, causal, window)
        check("out", out, ref, dt, errs)
        if softcap:
            with torch.no_grad():
                check_cap_bites(ref, reference.attention(qr, kr, vr, causal=causal, window=window or (-1, -1)), dt)
        if backward:
            check_backward(out, ref, (("dq", q, qr), ("dk", k, kr), ("dv", v, vr)), dt, errs)
    return run


def case_varlen(dev, dt, lens_q, H, Hk, D, causal, backward, softcap=0.0):
    def run(errs):
        cu = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0).tolist()), dtype=torch.int32, device=dev)
        total, mx = int(cu[-1]), max(lens_q)
        (q, k, v), (qr, kr, vr) = qkv_inputs(dev, dt, (total, H, D), (total, Hk, D), backward, softcap)
        cap = softcap_kw(softcap)
        out = fastattn.flash_attention_varlen(q, k, v, cu, cu, mx, mx, causal=causal, **cap)
        ref = reference.attention_varlen(qr, kr, vr, cu, cu, causal=causal, **cap)
        check("out", out, ref, dt, errs)
        if softcap:
            with torch.no_grad():
                check_cap_bites(ref, reference.attention_varlen(qr, kr, vr, cu, cu, causal=causal), dt)
        if backward:
            check_backward(out, ref, (("dq", q, qr), ("dk", k, kr), ("dv", v, vr)), dt, errs)
    return run


def case_kvcache(dev, dt, B, S, Sq, H, Hk, D, page_size=None, softcap=0.0):
    """attention_with_kvcache with new k/v (append + Sq queries, bottom-right causal)."""
    def run(errs):
        a = amp(softcap)
        kc = (torch.randn(B, S, Hk, D, device=dev) * a).to(dt)
        vc = torch.randn(B, S, Hk, D, device=dev, dtype=dt)
        lens = ragged_lengths(B, S - Sq, dev, seed=3)
        bt = None
        if page_size is not None:
            kc, vc, bt = paged_copy(kc, vc, torch.full((B,), S, dtype=torch.int32), page_size, seed=9)
        q = (torch.randn(B, Sq, H, D, device=dev) * a).to(dt)
        kn = (torch.randn(B, Sq, Hk, D, device=dev) * a).to(dt)
        vn = torch.randn(B, Sq, Hk, D, device=dev, dtype=dt)
        kr, vr = kc.float(), vc.float()
        cap = softcap_kw(softcap)
        out = fastattn.attention_with_kvcache(q, kc, vc, lens, k=kn, v=vn, block_table=bt, **cap)

        def ref_of(**kw):  # appends into the fp32 copies (the same rows again: idempotent)
            return reference.attention_with_kvcache(q.float(), kr, vr, lens, k=kn.float(),
                                                    v=vn.float(), block_table=bt, **kw)
        ref = ref_of(**cap)
        check("out", out, ref, dt, errs)
        if softcap:
            check_cap_bites(ref, ref_of(), dt)
    return run


def case_append(dev, dt, B, S, Hk, D, Sn, page_size=None):
    def run(errs):
        kc = torch.randn(B, S, Hk, D, device=dev, dtype=dt)
        vc = torch.randn(B, S, Hk, D, device=dev, dtype=dt)
        lens = ragged_lengths(B, S - Sn, dev, seed=4)
        bt = None
        if page_size is not None:
            kc, vc, bt = paged_copy(kc, vc, torch.full((B,), S, dtype=torch.int32), page_size, seed=2)
        kn = torch.randn(B, Sn, Hk, D, device=dev, dtype=dt)
        vn = torch.randn_like(kn)
        kr, vr = kc.clone(), vc.clone()
        fastattn.append_kv(kc, vc, kn, vn, lens, block_table=bt)
        reference.append_kv(kr, vr, kn, vn, lens, block_table=bt)
        # A copy: exact, NaN pages included (compare with NaN mapped to a sentinel).
        for name, a, b in (("k_cache", kc, kr), ("v_cache", vc, vr)):
            if not torch.equal(a.float().nan_to_num(7.0), b.float().nan_to_num(7.0)):
                raise CaseFailed(f"{name} differs from the reference append")
            errs[name] = 0.0
    return run


def case_gemma2_model(dev, tiny):
    """A Gemma-2-like model step (fastattn.models.Llama, random weights): sliding and full
    layers, scores soft-capped (attn_logit_softcapping) and final logits capped, GeGLU, unit-offset
    and sandwich norms, head_dim 128. The bf16 fastattn backend against the bf16 torch backend,
    both against the fp32 torch model (check_ratio): a forward over the batch (capped flash
    forward with a window and without), then a ragged prefill into a paged cache and decode steps
    (capped attention_with_kvcache on the sliding layer, capped decode_attention on the full one)."""
    def run(errs):
        import copy

        from fastattn.models import Llama, LlamaConfig
        hidden, S, window, steps = (256, 40, 16, 3) if tiny else (512, 300, 100, 3)
        cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=512,
                          sliding_window=window, layer_types=["sliding_attention", "full_attention"],
                          hidden_act="gelu_pytorch_tanh", norm_unit_offset=True, embedding_multiplier=hidden ** 0.5,
                          query_pre_attn_scalar=128, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                          sandwich_norms=True, tie_word_embeddings=True)
        truth = Llama(cfg, backend="torch").to(dev)
        with torch.no_grad():  # scores large enough for the cap to bend (as tests/test_model_gemma.py)
            for layer in truth.layers:
                layer.attention.wqkv.weight[: 6 * 128].mul_(8.0)  # the q (4 heads) and k (2 heads) rows
        fa, th = copy.deepcopy(truth).to(torch.bfloat16), copy.deepcopy(truth).to(torch.bfloat16)
        fa.backend = "fastattn"
        g = torch.Generator().manual_seed(7)
        B = 3
        ids = torch.randint(1, cfg.vocab_size, (B, S + steps), generator=g).to(dev)
        with torch.no_grad():
            check_ratio("logits", fa(ids[:, :S]).float(), th(ids[:, :S]).float(), truth(ids[:, :S]), errs)
        lens = torch.tensor([S, S - 7, S - 13], dtype=torch.int32, device=dev)  # ragged prompts
        prompts = ids[:, :S]
        got = {}
        for tag, m in (("fa", fa), ("th", th), ("truth", truth)):
            m.setup_cache(B, S + steps, cache="paged", page_size=16)
            out = [m.prefill(prompts, prompt_lengths=lens).float()]
            for i in range(steps):
                out.append(m.decode_step(ids.gather(1, (lens.long() + i).view(B, 1)).view(B)).float())
            got[tag] = out
        for i in range(steps + 1):
            check_ratio("prefill logits" if i == 0 else f"decode {i} logits", got["fa"][i], got["th"][i],
                        got["truth"][i], errs)
    return run


# ---- case lists ----------------------------------------------------------------------------
def sweep_cases(dev, tiny):
    bf = torch.bfloat16
    c = []
    ns = [256, 1024] if tiny else [4096, 8192, 16384, 32768, 65536, 131072]
    rows = 4 if tiny else 64
    for n in ns:
        c.append((f"rms_norm {rows}x{n}", case_rms_norm(dev, bf, rows, n, False, False)))
        c.append((f"rms_norm+residual {rows}x{n}", case_rms_norm(dev, bf, rows, n, True, False)))
    for n in (ns[0], ns[-1]):
        c.append((f"rms_norm fwd+bwd {rows}x{n}", case_rms_norm(dev, bf, rows, n, False, True)))
    H, Hk, D = (4, 2, 32) if tiny else (32, 8, 128)
    b64, s4k, s64k = (4, 64, 256) if tiny else (64, 4096, 65536)
    c.append((f"decode B{b64}x{s4k} ragged GQA {H}/{Hk} d{D}", case_decode(dev, bf, b64, s4k, H, Hk, D)))
    c.append((f"decode B1x{s64k} ragged GQA {H}/{Hk} d{D}", case_decode(dev, bf, 1, s64k, H, Hk, D)))
    c.append((f"decode B4x{s64k} ragged GQA {H}/{Hk} d{D}", case_decode(dev, bf, 4, s64k, H, Hk, D)))
    c.append((f"decode paged16 B{b64}x{s4k} ragged GQA {H}/{Hk} d{D}",
              case_decode(dev, bf, b64, s4k, H, Hk, D, page_size=16)))
    c.append((f"decode paged16 B1x{s64k} ragged GQA {H}/{Hk} d{D}",
              case_decode(dev, bf, 1, s64k, H, Hk, D, page_size=16)))
    rb, rs = (1, 64) if tiny else (4, 4096)  # the CUDA benchmark's shape: B4 S4096 H32 Hk8 D128
    c.append((f"rope B{rb} S{rs} H{H} Hk{Hk} D{D} out-of-place", case_rope(dev, bf, rb, rs, H, Hk, D, False, False)))
    c.append((f"rope B{rb} S{rs} H{H} Hk{Hk} D{D} inplace random positions",
              case_rope(dev, bf, rb, rs, H, Hk, D, True, True)))
    gb, gs = (2, 40) if tiny else (8, 4000)
    c.append((f"graph replay append+decode B{gb}x{gs}", case_graph(dev, bf, gb, gs, H, Hk, D, steps=4)))
    c.append((f"graph replay append+decode paged16 B{gb}x{gs}",
              case_graph(dev, bf, gb, gs, H, Hk, D, steps=4, page_size=16)))
    fs = 128 if tiny else 8192
    fd = 64 if tiny else 128
    c.append((f"flash fwd B1 S{fs} H{H}/{Hk} d{fd} causal", case_flash(dev, bf, 1, fs, fs, H, Hk, fd, True)))
    c.append((f"flash fwd B1 S{fs} H{H}/{Hk} d{fd} full", case_flash(dev, bf, 1, fs, fs, H, Hk, fd, False)))
    fr = fs - 61  # a ragged tail in both Sq and Sk
    c.append((f"flash fwd B1 S{fr} H{H}/{Hk} d{fd} causal", case_flash(dev, bf, 1, fr, fr, H, Hk, fd, True)))
    fq = fs // 8 - 5  # a chunk of queries over a longer key range: bottom-right causal
    c.append((f"flash fwd B1 Sq{fq} Sk{fs} H{H}/{Hk} d{fd} causal",
              case_flash(dev, bf, 1, fq, fs, H, Hk, fd, True)))
    # Logit soft-capping (softcap=, Gemma 2): the capped kernels at modest production shapes,
    # each against fastattn.reference with the cap (the paths list has every capped kernel once).
    cs = 128 if tiny else 2048
    c.append((f"flash fwd B1 S{cs - 61} H{H}/{Hk} d{fd} causal softcap",
              case_flash(dev, bf, 1, cs - 61, cs - 61, H, Hk, fd, True, softcap=CAP)))
    cb = 96 if tiny else 1024
    c.append((f"flash fwd+bwd B1 S{cb} H{H}/{Hk} d{fd} causal softcap",
              case_flash(dev, bf, 1, cb, cb, H, Hk, fd, True, backward=True, softcap=CAP)))
    vl = [50, 1, 37] if tiny else [777, 1, 1500]
    c.append((f"flash varlen fwd+bwd {vl} H{H}/{Hk} d{fd} causal softcap",
              case_varlen(dev, bf, vl, H, Hk, fd, True, True, softcap=CAP)))
    c.append((f"decode B{b64}x{s4k} ragged GQA {H}/{Hk} d{D} softcap",
              case_decode(dev, bf, b64, s4k, H, Hk, D, softcap=CAP)))
    c.append((f"decode paged16 B{b64}x{s4k} ragged GQA {H}/{Hk} d{D} softcap",
              case_decode(dev, bf, b64, s4k, H, Hk, D, page_size=16, softcap=CAP)))
    kb, ks = (2, 96) if tiny else (8, 4096)
    c.append((f"attention_with_kvcache Sq4 paged16 B{kb}x{ks} GQA {H}/{Hk} d{D} softcap",
              case_kvcache(dev, bf, kb, ks, 4, H, Hk, D, page_size=16, softcap=CAP)))
    c.append(("model gemma2-like bf16 forward + paged prefill/decode (softcap)", case_gemma2_model(dev, tiny)))
    return c


def path_cases(dev, tiny):
    """Each kernel path once, small (the sanitizers run this)."""
    bf = torch.bfloat16
    n_big = 4096 if tiny else 65536  # past the row cache: the two-pass RMSNorm path
    return [
        ("rms_norm fwd+bwd 16x1024", case_rms_norm(dev, bf, 16, 1024, False, True)),
        ("rms_norm+residual fwd+bwd 16x1024", case_rms_norm(dev, bf, 16, 1024, True, True)),
        (f"rms_norm fwd+bwd 4x{n_big}", case_rms_norm(dev, bf, 4, n_big, False, True)),
        ("rope out-of-place neox", case_rope(dev, bf, 2, 33, 4, 2, 128, False, False)),
        ("rope inplace interleaved positions", case_rope(dev, bf, 2, 33, 4, 2, 128, True, True, interleaved=True)),
        ("rope partial rotary dim 64 of 128", case_rope(dev, bf, 2, 33, 4, 2, 128, False, True, rot_dim=64)),
        ("flash fwd+bwd d64 causal GQA 4/2", case_flash(dev, bf, 1, 200, 200, 4, 2, 64, True, backward=True)),
        ("flash fwd+bwd d128 full", case_flash(dev, bf, 1, 130, 130, 2, 2, 128, False, backward=True)),
        ("flash fwd d128 window (32, 0) Sq<Sk", case_flash(dev, bf, 1, 70, 190, 4, 2, 128, False, window=(32, 0))),
        ("flash varlen fwd+bwd d128 causal", case_varlen(dev, bf, [100, 1, 157], 4, 2, 128, True, True)),
        ("decode contiguous 1 split", case_decode(dev, bf, 3, 300, 8, 2, 128, num_splits=1)),
        ("decode contiguous 4 splits", case_decode(dev, bf, 3, 300, 8, 2, 128, num_splits=4)),
        ("decode d64 auto splits", case_decode(dev, bf, 3, 300, 8, 2, 64)),
        ("decode paged16", case_decode(dev, bf, 3, 300, 8, 2, 128, page_size=16)),
        ("append_kv contiguous", case_append(dev, bf, 3, 64, 2, 128, 5)),
        ("append_kv paged16", case_append(dev, bf, 3, 64, 2, 128, 5, page_size=16)),
        ("attention_with_kvcache Sq4 contiguous", case_kvcache(dev, bf, 2, 96, 4, 8, 2, 128)),
        ("attention_with_kvcache Sq4 paged16", case_kvcache(dev, bf, 2, 96, 4, 8, 2, 128, page_size=16)),
        # The soft-capped twins (kSoftcap kernels): flash forward d64/d128 x causal/not (always the
        # masked kernel), flash backward dK/dV + dQ d64/d128, varlen, decode (1 split, split +
        # combine, paged, d64/d128/d256) and attention_with_kvcache (multi-query, paged).
        ("flash fwd+bwd d64 causal GQA 4/2 softcap",
         case_flash(dev, bf, 1, 150, 150, 4, 2, 64, True, backward=True, softcap=CAP)),
        ("flash fwd d64 full Sq<Sk softcap", case_flash(dev, bf, 1, 70, 133, 4, 2, 64, False, softcap=CAP)),
        ("flash fwd d128 causal Sq<Sk softcap", case_flash(dev, bf, 1, 70, 133, 4, 2, 128, True, softcap=CAP)),
        ("flash fwd+bwd d128 full softcap",
         case_flash(dev, bf, 1, 130, 130, 2, 2, 128, False, backward=True, softcap=CAP)),
        ("flash varlen fwd+bwd d128 causal softcap",
         case_varlen(dev, bf, [100, 1, 57], 4, 2, 128, True, True, softcap=CAP)),
        ("decode contiguous 1 split softcap", case_decode(dev, bf, 3, 300, 8, 2, 128, num_splits=1, softcap=CAP)),
        ("decode paged16 4 splits softcap",
         case_decode(dev, bf, 3, 300, 8, 2, 128, page_size=16, num_splits=4, softcap=CAP)),
        ("decode d64 auto splits softcap", case_decode(dev, bf, 3, 300, 8, 2, 64, softcap=CAP)),
        ("decode d256 auto splits softcap", case_decode(dev, bf, 3, 300, 8, 2, 256, softcap=CAP)),
        ("attention_with_kvcache Sq4 paged16 softcap",
         case_kvcache(dev, bf, 2, 96, 4, 8, 2, 128, page_size=16, softcap=CAP)),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="default: cuda when a GPU and a CUDA build are present, else cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run)")
    ap.add_argument("--paths", action="store_true", help="each kernel path once, small (the sanitizer driver)")
    ap.add_argument("--all", action="store_true",
                    help="the sweep, then the --paths cases without a sanitizer (so that a path case that "
                         "fails on its own is told apart from a sanitizer finding)")
    ap.add_argument("--json", default=None, help="write the results here (rewritten after every case)")
    ap.add_argument("-k", dest="only", default=None, help="run only cases whose name contains this")
    args = ap.parse_args(argv)
    dev = args.device or ("cuda" if torch.cuda.is_available() and fastattn.cuda_built() else "cpu")
    if dev == "cuda" and not (torch.cuda.is_available() and fastattn.cuda_built()):
        print("gpu_sweep: --device cuda but no CUDA device or no CUDA build of fastattn", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if args.paths:
        cases = path_cases(dev, args.tiny)
    else:
        cases = sweep_cases(dev, args.tiny)
        if args.all:
            cases += [(f"paths: {n}", f) for n, f in path_cases(dev, args.tiny)]
    if args.only:
        cases = [(n, f) for n, f in cases if args.only in n]
    mode = "paths" if args.paths else "sweep+paths" if args.all else "sweep"
    doc = {"mode": mode, "device": dev, "tiny": args.tiny, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if dev == "cuda" else None, "cases": []}
    width = max((len(n) for n, _ in cases), default=10)
    print(f"gpu_sweep {mode} on {dev}{' (tiny)' if args.tiny else ''}: {len(cases)} cases", flush=True)
    failed = 0
    for name, fn in cases:
        errs = {}
        t0 = time.perf_counter()
        status, msg = "pass", ""
        try:
            fn(errs)
            sync(dev)
        except CaseFailed as e:
            status, msg = "FAIL", str(e)
        except Exception as e:  # a crash is a failure of this case, not of the whole sweep
            status, msg = "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc(limit=3)
        secs = time.perf_counter() - t0
        failed += status != "pass"
        worst = max(errs.values(), default=float("nan"))
        print(f"{status:5s} {name:{width}s}  max rel err {worst:9.2e}  {secs:6.2f} s  {msg}", flush=True)
        doc["cases"].append({"case": name, "status": status, "message": msg, "seconds": round(secs, 3),
                             "rel_err": errs})
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, args.json)
    print(f"gpu_sweep {mode}: {len(cases) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
