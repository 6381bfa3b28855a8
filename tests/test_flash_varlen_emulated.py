"""Variable-length (packed) FlashAttention backward: the REAL CUDA kernels on the CPU.

tests/flash_bwd_emulate.cpp (see test_flash_bwd_emulated.py for what the emulation covers)
runs the launcher flash_bwd.cu runs (flash_bwd_launch.cuh) and flash_bwd_kernels.cuh with
FlashFwdParams::cu_seqlens_q/k set: packed q/k/v/out/dout, lse and delta (h, total_q), one grid
over the max_seqlen bounds with per-block sequence offsets. Under the emulator's sanitizer
analogues: every buffer (cu_seqlens and the workspace too) sits against a PROT_NONE guard page
(at its end, or at its start with FASTATTN_EMU_GUARD=start) and cp.async sources are
bounds-checked (memcheck), shared-memory accesses are checked for races and reads of
never-written bytes (racecheck / initcheck); any report fails the run.

Checked here: ragged batches (lengths 0 and 1, around the 64 / 128 / 32 row tiles, Sq != Sk
per sequence, GQA/MQA with and without the split workspace, causal, windows) against a
per-sequence float64 reference of dense attention on each slice; and malformed cu_seqlens
(decreasing, negative, past the end, longer than the max bound) that must simply run in
bounds (their results are unspecified). Both cp.async landing orders / fiber schedules.
"""
import importlib.util
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import assert_error_ratio
from fastattn import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tests", path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_emu = _load("flash_bwd_emulated_test", "test_flash_bwd_emulated.py")
_layout = _load("flash_bwd_layout_test", "test_flash_bwd_layout.py")
emulator = _emu.emulator  # the module-scoped fixture that builds tests/flash_bwd_emulate.cpp
_to_bits, _from_bits = _emu._to_bits, _emu._from_bits


def _seq_reference(q, k, v, dout, scale, wl, wr):
    """One sequence: q (sq, h, d) ... -> out, lse (h, sq), dq, dk, dv in float64."""
    sq, h, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    if sq == 0 or sk == 0:  # no query, or rows that see no key: out 0, lse -inf, grads 0
        return (np.zeros_like(q), np.full((h, sq), -np.inf), np.zeros_like(q),
                np.zeros_like(k), np.zeros_like(v))
    out, lse, dq, dk, dv = _layout._reference_grads(q[None], k[None], v[None], dout[None],
                                                    scale, wl, wr)
    return out[0], lse[0], dq[0], dk[0], dv[0]


def _write_inputs(tmp_path, dtype, d, h, hk, wl, wr, causal, use_ws, cu_q, cu_k, total_q,
                  total_k, max_q, max_k, q, k, v, out, dout, lse, scale):
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout)):
        _to_bits(x, dtype).tofile(tmp_path / f"{name}.bin")
    lse.astype(np.float32).tofile(tmp_path / "lse.bin")
    np.asarray(cu_q, np.int32).tofile(tmp_path / "cu_q.bin")
    np.asarray(cu_k, np.int32).tofile(tmp_path / "cu_k.bin")
    b = len(cu_q) - 1
    (tmp_path / "meta.txt").write_text(
        f"{dtype} {d} {b} {max_q} {max_k} {h} {hk} {wl} {wr} {causal} {scale!r} {use_ws} 8\n")
    (tmp_path / "varlen.txt").write_text(f"{total_q} {total_k}\n")


def _run(emulator, tmp_path, mode, guard):
    env = dict(os.environ, FASTATTN_EMU_MODE=str(mode), FASTATTN_EMU_GUARD=guard)
    return subprocess.run([emulator, str(tmp_path)], capture_output=True, text=True, env=env)


CASES = [
    # dtype, d, h, hk, wl, wr, causal, use_workspace, [(sq, sk) per sequence], max slack
    # MQA with the split workspace; lengths 0 and 1, around the 64-row dQ and 128-row dK/dV
    # tiles, Sq > Sk and Sq < Sk, a query-only sequence (no keys) and a key-only one.
    ("16", 64, 4, 1, -1, -1, 0, 1, [(0, 5), (1, 1), (64, 130), (65, 63), (3, 0), (129, 128)], 0),
    # causal + left window, d128 (32-row dK/dV query tiles): rows that see no key, empty seq
    ("bf", 128, 2, 2, 20, -1, 1, 1, [(150, 90), (1, 200), (33, 33), (0, 0), (31, 40)], 0),
    # GQA without workspace (one block per group), right window only; max bounds with slack
    ("16", 128, 4, 2, -1, 3, 0, 0, [(17, 129), (128, 1), (5, 5)], 40),
    # windows on both sides, most key tiles unseen; GQA split
    ("bf", 64, 2, 1, 40, 40, 0, 1, [(20, 300), (97, 97), (1, 0)], 0),
    # causal MQA bf16 d64, several sequences of one row (decode-like) next to a long one
    ("bf", 64, 3, 1, -1, -1, 1, 1, [(1, 17), (1, 1), (130, 130), (2, 64)], 0),
    # no query row at all (total_q = 0, max_seqlen_q = 0): dK = dV = 0, no dQ / delta grid
    ("16", 64, 2, 1, -1, -1, 1, 1, [(0, 5), (0, 130)], 0),
]


@pytest.mark.parametrize("mode", [0, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-d{c[1]}-h{c[2]}-{c[3]}-"
                         f"w{c[4]}_{c[5]}-c{c[6]}-ws{c[7]}-n{len(c[8])}")
def test_varlen_backward_matches_per_sequence(emulator, tmp_path, case, mode):
    _check_per_sequence(emulator, tmp_path, case, mode)


# Head dims 32 / 96 / 192 / 256 under the varlen prologue, one emulator mode each: around
# their own tiles (d192: 64-key dK/dV blocks of two column halves, 16-key dQ tiles; d256:
# 16-query dK/dV tiles, dQ column halves), empty and one-row sequences.
HEAD_DIM_CASES = [
    # dtype, d, h, hk, wl, wr, causal, use_workspace, [(sq, sk) per sequence], max slack, mode
    ("bf", 32, 2, 1, -1, -1, 1, 1, [(1, 17), (0, 3), (66, 65)], 0, 3),
    ("16", 96, 2, 2, 9, -1, 0, 0, [(33, 20), (1, 1), (0, 0)], 5, 0),
    ("bf", 192, 4, 1, -1, -1, 0, 1, [(17, 65), (3, 0), (20, 7)], 0, 0),
    ("16", 256, 2, 1, -1, 4, 1, 0, [(40, 33), (1, 1), (17, 0)], 3, 3),
]


@pytest.mark.parametrize("case", HEAD_DIM_CASES, ids=lambda c: f"{c[0]}-d{c[1]}-m{c[-1]}")
def test_varlen_backward_head_dims(emulator, tmp_path, case):
    *case, mode = case
    _check_per_sequence(emulator, tmp_path, tuple(case), mode)


def _check_per_sequence(emulator, tmp_path, case, mode):
    dtype, d, h, hk, wl, wr, causal, use_ws, lens, slack = case
    rng = np.random.default_rng(sum(a * 3 + b for a, b in lens) + d)
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lens])]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lens])]).astype(np.int64)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    max_q = max(a for a, _ in lens) + slack
    max_k = max(b for _, b in lens) + slack

    def rnd(*shape):
        return _from_bits(_to_bits(rng.standard_normal(shape), dtype), dtype)

    q, dout = rnd(total_q, h, d), rnd(total_q, h, d)
    k, v = rnd(total_k, hk, d), rnd(total_k, hk, d)
    scale = d ** -0.5
    wr_eff = 0 if causal else wr
    out = np.zeros_like(q)
    lse = np.zeros((h, total_q))
    dq_ref, dk_ref, dv_ref = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for i in range(len(lens)):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        o_i, l_i, dq_i, dk_i, dv_i = _seq_reference(q[qs:qe], k[ks:ke], v[ks:ke], dout[qs:qe],
                                                    scale, wl, wr_eff)
        out[qs:qe], lse[:, qs:qe] = o_i, l_i
        dq_ref[qs:qe], dk_ref[ks:ke], dv_ref[ks:ke] = dq_i, dk_i, dv_i
    out = _from_bits(_to_bits(out, dtype), dtype)  # the forward's stored output
    _write_inputs(tmp_path, dtype, d, h, hk, wl, wr, causal, use_ws, cu_q, cu_k, total_q,
                  total_k, max_q, max_k, q, k, v, out, dout, lse, scale)
    res = _run(emulator, tmp_path, mode, "end" if mode == 0 else "start")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok"), res.stdout
    if use_ws and h // hk > 1:
        assert "used_splits=1" not in res.stdout, res.stdout  # the split path ran
    delta = np.fromfile(tmp_path / "delta.f32", dtype=np.float32).reshape(h, total_q)
    delta_ref = np.einsum("ihd,ihd->hi", dout, out)
    scale_delta = max(1.0, np.abs(delta_ref).max(initial=0))
    assert np.abs(delta - delta_ref).max(initial=0) <= 1e-4 * scale_delta
    tol = 2e-3 if dtype == "16" else 1.5e-2  # as the dense emulated test
    for name, ref in (("dq", dq_ref), ("dk", dk_ref), ("dv", dv_ref)):
        got = np.fromfile(tmp_path / f"{name}.f32", dtype=np.float32).reshape(ref.shape)
        assert np.isfinite(got).all(), name  # every packed row was written
        for i in range(len(lens)):  # per sequence, relative to that sequence's gradient scale
            lo, hi = (cu_q[i], cu_q[i + 1]) if name == "dq" else (cu_k[i], cu_k[i + 1])
            if hi == lo:
                continue
            r, g = ref[lo:hi], got[lo:hi]
            err = np.abs(g - r).max() / max(np.abs(r).max(), 0.5)
            assert err < tol, (name, i, lens[i], err)
            # a sequence with no keys (dq) or no queries (dk, dv): exactly zero
            if lens[i][1 if name == "dq" else 0] == 0:
                assert not np.any(g), (name, i, lens[i])


# Malformed cu_seqlens: the kernels are not given validated ones on CUDA (no host sync), so
# each must run in bounds under the guard pages; the values it writes are unspecified.
MALFORMED = [
    # dtype, d, h, hk, wl, wr, causal, use_ws, cu_q, cu_k, total_q, total_k, max_q, max_k
    ("16", 64, 4, 1, -1, -1, 0, 1, [0, 50, 20, 70], [0, 90, 10, 100], 70, 100, 64, 128),
    ("16", 64, 2, 1, 10, 0, 1, 1, [0, 30, 500, 900], [-7, 60, 2**31 - 1, 40], 70, 100, 64, 128),
    ("bf", 128, 2, 2, -1, -1, 0, 0, [-100, 200, 201, 70], [0, 100, 100, 100], 70, 100, 64, 64),
    ("bf", 128, 4, 2, -1, 5, 0, 1, [5, 3, 2**31 - 1, -2**31], [70, 0, 35, 35], 40, 35, 200, 200),
]


@pytest.mark.parametrize("guard", ["end", "start"])
@pytest.mark.parametrize("mode", [0, 3])
@pytest.mark.parametrize("case", MALFORMED, ids=lambda c: f"{c[0]}-d{c[1]}-cuq{c[8]}-cuk{c[9]}")
def test_varlen_backward_malformed_cu_seqlens_in_bounds(emulator, tmp_path, case, mode, guard):
    (dtype, d, h, hk, wl, wr, causal, use_ws, cu_q, cu_k, total_q, total_k, max_q,
     max_k) = case
    rng = np.random.default_rng(total_q + total_k + d)

    def rnd(*shape):
        return _from_bits(_to_bits(rng.standard_normal(shape), dtype), dtype)

    q, out, dout = rnd(total_q, h, d), rnd(total_q, h, d), rnd(total_q, h, d)
    k, v = rnd(total_k, hk, d), rnd(total_k, hk, d)
    lse = rng.standard_normal((h, total_q)) + 3.0
    _write_inputs(tmp_path, dtype, d, h, hk, wl, wr, causal, use_ws, cu_q, cu_k, total_q,
                  total_k, max_q, max_k, q, k, v, out, dout, lse, d ** -0.5)
    res = _run(emulator, tmp_path, mode, guard)
    assert res.returncode == 0, (res.returncode, res.stderr)
    assert res.stdout.startswith("ok"), res.stdout


def test_varlen_backward_softcap(emulator, tmp_path):
    """The soft-capped dK/dV and dQ kernels under the varlen prologue (causal GQA with the split
    workspace, an empty and a one-row sequence) against autograd through
    reference.attention_varlen(softcap=), by the error-ratio rule."""
    dtype, d, h, hk, cap, scale = "bf", 64, 4, 2, 2.0, 0.25
    lens = [(1, 17), (0, 3), (129, 130), (40, 30)]
    tdt = torch.bfloat16
    rng = np.random.default_rng(5)
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lens])]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lens])]).astype(np.int64)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q, k, v, dout = (torch.from_numpy(rng.standard_normal(shape)).to(tdt) for shape in
                     ((total_q, h, d), (total_k, hk, d), (total_k, hk, d), (total_q, h, d)))
    cq, ck = torch.from_numpy(cu_q), torch.from_numpy(cu_k)
    kw = dict(causal=True, softmax_scale=scale, softcap=cap)

    def grads(dt):
        xs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out, lse = reference.attention_varlen(*xs, cq, ck, return_lse=True, **kw)
        out.backward(dout.to(dt))
        return out.detach(), lse.detach(), [x.grad for x in xs]

    out, lse, true_grads = grads(torch.float64)
    _, _, low_grads = grads(tdt)
    f = lambda t: _from_bits(t.view(torch.int16).numpy().view(np.uint16), dtype)
    _write_inputs(tmp_path, dtype, d, h, hk, -1, 0, 1, 1, cu_q, cu_k, total_q, total_k,
                  max(a for a, _ in lens), max(b for _, b in lens), f(q), f(k), f(v),
                  f(out.to(tdt)), f(dout), lse.numpy(), scale)
    meta = tmp_path / "meta.txt"
    meta.write_text(meta.read_text().strip() + f" {cap!r}\n")  # the optional softcap field
    res = _run(emulator, tmp_path, 3, "start")
    assert res.returncode == 0, res.stderr
    for name, ref, low in zip(("dq", "dk", "dv"), true_grads, low_grads):
        got = torch.from_numpy(np.fromfile(tmp_path / f"{name}.f32", dtype=np.float32).reshape(ref.shape))
        assert_error_ratio(got.to(tdt), low, ref, name)
