"""Run the CUDA FlashAttention forward's own code on the CPU (no GPU needed).

tests/flash_fwd_emulate.cpp compiles csrc/cuda/flash_fwd.cu (the launcher flash_fwd_cuda:
layout checks, mask normalisation, dispatch), flash_fwd_hdim*.cu and the kernel of
flash_fwd_kernel.cuh with g++, with host versions of ldmatrix / mma.sync / cp.async /
shared loads and stores / shfl / barriers written from the PTX ISA, every thread a fiber,
shared memory born NaN and every global buffer against a PROT_NONE guard page. Here out and
lse are compared with a float64 reference of attention: dense and variable-length (packed,
cu_seqlens) batches, head dims 64 and 128, fp16 and bf16, masked (causal / window) and
unmasked kernels, GQA/MQA, rows that see no key; malformed cu_seqlens must run in bounds.
Head dims 32, 96, 192 and 256 (masked kernel + soft-capped twin only): every instantiation,
dense and varlen, by the error-ratio rule against fastattn.reference (test_*_new_head_dims*).
Logit soft-capping (FlashFwdParams::softcap) is checked against fastattn.reference with
softcap= by the error-ratio rule (softcap.cuh: the cap's tanh from ex2.approx and rcp.approx).
What this cannot exercise: the CUDA compiler, real asynchrony and the tensor cores' exact
rounding (the emulated mma accumulates in fp32 in k order; ex2.approx is exact here).
"""
import importlib.util
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import assert_error_ratio, emu_bank_report, emu_bank_rows
from fastattn import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tests", path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_layout = _load("flash_bwd_layout_test", "test_flash_bwd_layout.py")
_emu = _load("flash_bwd_emulated_test", "test_flash_bwd_emulated.py")
_to_bits, _from_bits = _emu._to_bits, _emu._from_bits


@pytest.fixture(scope="module")
def fwd_emulator(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    build = tmp_path_factory.mktemp("flash_fwd_emulate")
    stub = build / "stub"  # empty <cuda_*.h>: the emulator supplies what the code uses
    stub.mkdir()
    for name in ("cuda_runtime_api.h", "cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"):
        (stub / name).write_text("#pragma once\n")
    exe = build / "flash_fwd_emulate"
    subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-fno-strict-aliasing",
                    "-Wall", "-Werror", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized",
                    "-I", str(stub), "-I", os.path.join(ROOT, "tests"),
                    "-I", os.path.join(ROOT, "csrc", "include"),
                    "-I", os.path.join(ROOT, "csrc", "cuda"),
                    os.path.join(ROOT, "tests", "flash_fwd_emulate.cpp"), "-o", str(exe)],
                   check=True)
    return str(exe)


def _reference(q, k, v, scale, wl, wr):
    """One batch entry / sequence: q (sq, h, d) -> out (sq, h, d), lse (h, sq), float64."""
    sq, h, d = q.shape
    if sq == 0 or k.shape[0] == 0:
        return np.zeros_like(q), np.full((h, sq), -np.inf)
    dout = np.zeros_like(q)
    out, lse, _, _, _ = _layout._reference_grads(q[None], k[None], v[None], dout[None], scale,
                                                 wl, wr)
    return out[0], lse[0]


def _write(tmp_path, dtype, d, b, sq, sk, h, hk, wl, wr, causal, scale, q, k, v,
           varlen=None, softcap=0.0):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _to_bits(x, dtype).tofile(tmp_path / f"{name}.bin")
    (tmp_path / "meta.txt").write_text(
        f"{dtype} {d} {b} {sq} {sk} {h} {hk} {wl} {wr} {causal} {scale!r} 8 {softcap!r}\n")
    if varlen is not None:
        cu_q, cu_k, total_q, total_k = varlen
        np.asarray(cu_q, np.int32).tofile(tmp_path / "cu_q.bin")
        np.asarray(cu_k, np.int32).tofile(tmp_path / "cu_k.bin")
        (tmp_path / "varlen.txt").write_text(f"{total_q} {total_k}\n")


def _run(exe, tmp_path, mode, guard, **extra_env):
    env = dict(os.environ, FASTATTN_EMU_MODE=str(mode), FASTATTN_EMU_GUARD=guard, **extra_env)
    res = subprocess.run([exe, str(tmp_path)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    assert res.stdout.startswith("ok"), res.stdout


def _check(got_out, got_lse, ref_out, ref_lse, dtype, what):
    tol = 4e-3 if dtype == "16" else 2.5e-2  # P is rounded to 16 bits before the PV mma
    assert np.isfinite(got_out).all(), what
    err = np.abs(got_out - ref_out).max(initial=0) / max(np.abs(ref_out).max(initial=0), 0.5)
    assert err < tol, (what, "out", err)
    empty = np.isneginf(ref_lse)
    assert (np.isneginf(got_lse) == empty).all(), (what, "lse -inf exactly where no key")
    if (~empty).any():
        lerr = np.abs(got_lse[~empty] - ref_lse[~empty]).max()
        assert lerr < 1e-4 * max(1.0, np.abs(ref_lse[~empty]).max()), (what, "lse", lerr)


def _rnd(rng, dtype, *shape):
    return _from_bits(_to_bits(rng.standard_normal(shape), dtype), dtype)


DENSE = [
    # dtype, d, b, sq, sk, h, hk, wl, wr, causal
    ("16", 64, 2, 130, 200, 4, 2, -1, -1, 0),    # unmasked GQA, query and key tails
    ("bf", 128, 1, 150, 90, 2, 2, 20, -1, 1),    # causal + window, Sq > Sk: rows with no key
    ("16", 128, 1, 1, 1, 1, 1, -1, -1, 0),       # a single query and key
    ("bf", 64, 1, 20, 300, 3, 1, 40, 40, 0),     # window both sides, MQA, most tiles skipped
    ("16", 64, 1, 129, 129, 2, 2, -1, 0, 1),     # causal MHA, two query blocks
    ("bf", 128, 2, 33, 70, 4, 1, -1, -1, 0),     # unmasked bf16 d128
    ("bf", 64, 1, 97, 17, 2, 1, -1, -1, 0),      # unmasked bf16 d64 (the one instantiation not above), odd lengths
]


@pytest.mark.parametrize("mode", [0, 3])
@pytest.mark.parametrize("case", DENSE, ids=lambda c: "-".join(map(str, c)))
def test_emulated_forward_dense(fwd_emulator, tmp_path, case, mode):
    dtype, d, b, sq, sk, h, hk, wl, wr, causal = case
    rng = np.random.default_rng(sq * 5 + sk + d)
    q, k, v = (_rnd(rng, dtype, b, sq, h, d), _rnd(rng, dtype, b, sk, hk, d),
               _rnd(rng, dtype, b, sk, hk, d))
    scale = d ** -0.5
    _write(tmp_path, dtype, d, b, sq, sk, h, hk, wl, wr, causal, scale, q, k, v)
    _run(fwd_emulator, tmp_path, mode, "end" if mode == 0 else "start")
    got = np.fromfile(tmp_path / "out.f32", np.float32).reshape(b, sq, h, d)
    lse = np.fromfile(tmp_path / "lse.f32", np.float32).reshape(b, h, sq)
    for i in range(b):
        ro, rl = _reference(q[i], k[i], v[i], scale, wl, 0 if causal else wr)
        _check(got[i], lse[i], ro, rl, dtype, f"batch {i}")
        if causal and sq > sk:
            assert (got[i, :sq - sk] == 0).all()  # rows that see no key: exactly 0


@pytest.mark.parametrize("mode", [0, 3])
def test_emulated_forward_nan_propagates(fwd_emulator, tmp_path, mode):
    """A NaN in q, or in a key a row sees, makes that row NaN, out AND lse, as torch's attention
    (and fastattn's CPU kernels) do; before, the epilogue took a NaN row sum for an empty row
    (out 0, lse -inf). Causal: a NaN key at position j reaches rows i >= j only."""
    dtype, d, b, sq, sk, h, hk = "bf", 128, 1, 150, 150, 2, 1
    rng = np.random.default_rng(11)
    q, k, v = (_rnd(rng, dtype, b, sq, h, d), _rnd(rng, dtype, b, sk, hk, d), _rnd(rng, dtype, b, sk, hk, d))
    q[0, 7, 1, 3] = np.nan     # query row 7 of head 1
    k[0, 100, 0, 5] = np.nan   # key 100: rows 100.. of both heads see it
    scale = d ** -0.5
    _write(tmp_path, dtype, d, b, sq, sk, h, hk, -1, 0, 1, scale, q, k, v)
    _run(fwd_emulator, tmp_path, mode, "end" if mode == 0 else "start")
    got = np.fromfile(tmp_path / "out.f32", np.float32).reshape(b, sq, h, d)
    lse = np.fromfile(tmp_path / "lse.f32", np.float32).reshape(b, h, sq)
    nan_rows = np.zeros((sq, h), bool)
    nan_rows[7, 1] = True
    nan_rows[100:, :] = True
    assert np.isnan(got[0][nan_rows]).all() and np.isnan(lse[0].T[nan_rows]).all()
    clean = ~nan_rows
    assert np.isfinite(got[0][clean]).all() and np.isfinite(lse[0].T[clean]).all()
    ro, rl = _reference(np.nan_to_num(q[0]), np.nan_to_num(k[0]), v[0], scale, -1, 0)
    assert np.abs(got[0][clean] - ro[clean]).max() < 2.5e-2 * max(np.abs(ro[clean]).max(), 0.5)
    assert np.abs(lse[0].T[clean] - rl.T[clean]).max() < 1e-4 * max(1.0, np.abs(rl).max())


@pytest.mark.parametrize("mode", [0, 3])
def test_emulated_forward_empty_rows_stay_zero_beside_an_inf_value(fwd_emulator, tmp_path, mode):
    """Causal with Sq > Sk: the first Sq - Sk rows see no key and must come out exactly 0 (lse
    -inf) even when a key of their tile holds an inf value: the epilogue scaled them by 0,
    which kept the 0 * inf NaN of the masked key's zero probability."""
    dtype, d, b, sq, sk, h, hk = "bf", 64, 1, 40, 9, 2, 1
    rng = np.random.default_rng(5)
    q, k, v = (_rnd(rng, dtype, b, sq, h, d), _rnd(rng, dtype, b, sk, hk, d), _rnd(rng, dtype, b, sk, hk, d))
    v[0, 0, 0, 3] = np.inf  # key 0: seen by rows sq - sk .. sq - 1
    scale = d ** -0.5
    _write(tmp_path, dtype, d, b, sq, sk, h, hk, -1, 0, 1, scale, q, k, v)
    _run(fwd_emulator, tmp_path, mode, "end" if mode == 0 else "start")
    got = np.fromfile(tmp_path / "out.f32", np.float32).reshape(b, sq, h, d)
    lse = np.fromfile(tmp_path / "lse.f32", np.float32).reshape(b, h, sq)
    assert (got[0, :sq - sk] == 0).all() and np.isneginf(lse[0, :, :sq - sk]).all()
    assert np.isposinf(got[0, sq - sk:, :, 3]).all()
    others = np.delete(got[0, sq - sk:], 3, axis=-1)
    assert np.isfinite(others).all() and np.isfinite(lse[0, :, sq - sk:]).all()


def test_emulated_forward_minus_inf_scores_drop_their_keys(fwd_emulator, tmp_path):
    """Scores that are -inf (a negative q against +inf keys) fill the first key tiles: those keys
    drop out and the rows equal the softmax over the finite keys (the max still at -inf is
    replaced by 0, so no -inf - -inf NaN); with every key +inf each row is 0 and lse -inf, as
    fastattn.reference, torch's SDPA and the CPU kernels give."""
    dtype, d, b, sq, sk, h, hk = "bf", 64, 1, 40, 300, 2, 1
    rng = np.random.default_rng(11)
    q = -np.abs(_rnd(rng, dtype, b, sq, h, d)) - 0.25
    q = _from_bits(_to_bits(q, dtype), dtype)
    k, v = _rnd(rng, dtype, b, sk, hk, d), _rnd(rng, dtype, b, sk, hk, d)
    scale = d ** -0.5
    for n_inf in (150, sk):
        k[0, :n_inf] = np.inf
        _write(tmp_path, dtype, d, b, sq, sk, h, hk, -1, -1, 0, scale, q, k, v)
        _run(fwd_emulator, tmp_path, 0, "end")
        got = np.fromfile(tmp_path / "out.f32", np.float32).reshape(b, sq, h, d)
        lse = np.fromfile(tmp_path / "lse.f32", np.float32).reshape(b, h, sq)
        if n_inf == sk:
            assert (got == 0).all() and np.isneginf(lse).all()
            continue
        ro, rl = _reference(q[0], k[0, n_inf:], v[0, n_inf:], scale, -1, -1)  # the finite keys alone
        assert np.isfinite(got).all() and np.isfinite(lse).all()
        assert np.abs(got[0] - ro).max() < 2.5e-2 * max(np.abs(ro).max(), 0.5)
        assert np.abs(lse[0] - rl).max() < 1e-4 * max(1.0, np.abs(rl).max())


# Causal block order in sections of (head, batch) pairs (csrc/cuda/block_order.cuh): a small K/V
# budget makes these run several sections, the last one partial. kv bytes per pair = sk * d * 4
# / (h / hk); (case, budget in pairs).
SECTIONS = [
    (("16", 64, 2, 300, 300, 3, 3, -1, 0, 1), 4),   # 6 pairs: sections of 4 + 2
    (("bf", 64, 3, 257, 200, 2, 2, -1, 0, 1), 5),   # Sq > Sk, 6 pairs: 5 + 1
    (("bf", 128, 2, 200, 260, 4, 2, 50, 0, 1), 3),  # GQA + window, 8 pairs: 3 + 3 + 2
    (("16", 64, 1, 300, 300, 5, 1, -1, 0, 1), 1),   # MQA, one pair per section
]


@pytest.mark.parametrize("case,pairs", SECTIONS, ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else str(c))
def test_emulated_forward_causal_sections(fwd_emulator, tmp_path, case, pairs):
    """Every (query block, head, batch) is computed exactly once whatever the section size: the
    output is born NaN, so a block skipped leaves NaN and one run twice means another skipped."""
    dtype, d, b, sq, sk, h, hk, wl, wr, causal = case
    rng = np.random.default_rng(sq + sk + d + pairs)
    q, k, v = (_rnd(rng, dtype, b, sq, h, d), _rnd(rng, dtype, b, sk, hk, d),
               _rnd(rng, dtype, b, sk, hk, d))
    scale = d ** -0.5
    _write(tmp_path, dtype, d, b, sq, sk, h, hk, wl, wr, causal, scale, q, k, v)
    budget = pairs * sk * d * 4 // (h // hk)
    _run(fwd_emulator, tmp_path, 3, "end", FASTATTN_EMU_SCHED_L2_BYTES=str(budget))
    got = np.fromfile(tmp_path / "out.f32", np.float32).reshape(b, sq, h, d)
    lse = np.fromfile(tmp_path / "lse.f32", np.float32).reshape(b, h, sq)
    for i in range(b):
        ro, rl = _reference(q[i], k[i], v[i], scale, wl, 0)
        _check(got[i], lse[i], ro, rl, dtype, f"batch {i}")


VARLEN = [
    # dtype, d, h, hk, wl, wr, causal, [(sq, sk) per sequence], max slack
    ("16", 64, 4, 1, -1, -1, 0, [(0, 5), (1, 1), (64, 130), (129, 63), (3, 0), (130, 128)], 0),
    ("bf", 128, 2, 2, 20, -1, 1, [(150, 90), (1, 200), (33, 33), (0, 0), (31, 40)], 0),
    ("bf", 64, 4, 2, 40, 40, 0, [(20, 300), (97, 97), (1, 0), (128, 64)], 0),
    ("16", 128, 2, 1, -1, 3, 0, [(17, 129), (128, 1), (5, 5)], 40),
    ("16", 64, 2, 2, -1, 0, 1, [(1, 17), (129, 129), (64, 1)], 0),
]


@pytest.mark.parametrize("mode", [0, 3])
@pytest.mark.parametrize("case", VARLEN, ids=lambda c: f"{c[0]}-d{c[1]}-h{c[2]}-{c[3]}-"
                         f"w{c[4]}_{c[5]}-c{c[6]}-n{len(c[7])}")
def test_emulated_forward_varlen(fwd_emulator, tmp_path, case, mode):
    dtype, d, h, hk, wl, wr, causal, lens, slack = case
    rng = np.random.default_rng(sum(a * 3 + b for a, b in lens) + d)
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lens])]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lens])]).astype(np.int64)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    max_q = max(a for a, _ in lens) + slack
    max_k = max(b for _, b in lens) + slack
    q = _rnd(rng, dtype, total_q, h, d)
    k, v = _rnd(rng, dtype, total_k, hk, d), _rnd(rng, dtype, total_k, hk, d)
    scale = d ** -0.5
    _write(tmp_path, dtype, d, len(lens), max_q, max_k, h, hk, wl, wr, causal, scale,
           q, k, v, varlen=(cu_q, cu_k, total_q, total_k))
    _run(fwd_emulator, tmp_path, mode, "end" if mode == 0 else "start")
    got = np.fromfile(tmp_path / "out.f32", np.float32).reshape(total_q, h, d)
    lse = np.fromfile(tmp_path / "lse.f32", np.float32).reshape(h, total_q)
    for i in range(len(lens)):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        ro, rl = _reference(q[qs:qe], k[ks:ke], v[ks:ke], scale, wl, 0 if causal else wr)
        _check(got[qs:qe], lse[:, qs:qe], ro, rl, dtype, f"sequence {i} {lens[i]}")
        if ke == ks:
            assert (got[qs:qe] == 0).all()


MALFORMED = [
    # dtype, d, h, hk, wl, wr, causal, cu_q, cu_k, total_q, total_k, max_q, max_k
    ("16", 64, 4, 1, -1, -1, 0, [0, 50, 20, 70], [0, 90, 10, 100], 70, 100, 64, 128),
    ("16", 64, 2, 1, 10, 0, 1, [0, 30, 500, 900], [-7, 60, 2**31 - 1, 40], 70, 100, 64, 128),
    ("bf", 128, 2, 2, -1, -1, 0, [-100, 200, 201, 70], [0, 100, 100, 100], 70, 100, 64, 64),
    ("bf", 128, 4, 2, -1, 5, 0, [5, 3, 2**31 - 1, -2**31], [70, 0, 35, 35], 40, 35, 200, 200),
]


@pytest.mark.parametrize("guard", ["end", "start"])
@pytest.mark.parametrize("mode", [0, 3])
@pytest.mark.parametrize("case", MALFORMED, ids=lambda c: f"{c[0]}-d{c[1]}-cuq{c[7]}-cuk{c[8]}")
def test_emulated_forward_malformed_cu_seqlens_in_bounds(fwd_emulator, tmp_path, case, mode,
                                                         guard):
    dtype, d, h, hk, wl, wr, causal, cu_q, cu_k, total_q, total_k, max_q, max_k = case
    rng = np.random.default_rng(total_q + total_k + d)
    q = _rnd(rng, dtype, total_q, h, d)
    k, v = _rnd(rng, dtype, total_k, hk, d), _rnd(rng, dtype, total_k, hk, d)
    _write(tmp_path, dtype, d, len(cu_q) - 1, max_q, max_k, h, hk, wl, wr, causal, d ** -0.5,
           q, k, v, varlen=(cu_q, cu_k, total_q, total_k))
    _run(fwd_emulator, tmp_path, mode, guard)


def test_bank_conflict_report(fwd_emulator, tmp_path):
    """Prints (and writes to JSON under the pytest tmp dir) the shared-memory bank-conflict totals
    of the forward kernel at every head dim, at every shared access the emulator tracks
    (cp.async destinations, ldmatrix rows, st.shared.b32, ld.shared.v4), and checks the swizzle's
    claim (flash_fwd_kernel.cuh, header comment): every access of every head dim takes its ideal
    number of wavefronts, the odd-half-line rows of d 32 / 96 included. The racecheck / initcheck
    analogues run on every case of this file."""
    rows = []
    cases = [c[:10] for c in (DENSE[0], DENSE[5]) + tuple(NEW_DIMS[i] for i in (0, 4, 8, 12))]
    for case in cases:
        dtype, d, b, sq, sk, h, hk, wl, wr, causal = case
        rng = np.random.default_rng(1)
        q, k, v = (_rnd(rng, dtype, b, sq, h, d), _rnd(rng, dtype, b, sk, hk, d), _rnd(rng, dtype, b, sk, hk, d))
        run_dir = tmp_path / f"d{d}"
        run_dir.mkdir()
        _write(run_dir, dtype, d, b, sq, sk, h, hk, wl, wr, causal, d ** -0.5, q, k, v)
        report = run_dir / "bank.txt"
        env = dict(os.environ, FASTATTN_EMU_MODE="0", FASTATTN_EMU_GUARD="end", FASTATTN_EMU_BANK_REPORT=str(report))
        res = subprocess.run([fwd_emulator, str(run_dir)], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        rows += emu_bank_rows(report.read_text(), kernel=f"flash_fwd_kernel<d{d}>")
    emu_bank_report(rows, "flash_fwd", tmp_path)
    assert {r["kernel"] for r in rows} == {f"flash_fwd_kernel<d{c[1]}>" for c in cases}
    assert {r["access"] for r in rows} >= {"cp.async", "ldmatrix", "st.shared", "ld.shared"}
    conflicts = [r for r in rows if r["wavefronts"] != r["ideal_wavefronts"]]
    assert not conflicts, conflicts


# ---- logit soft-capping ---------------------------------------------------------------------
SOFTCAP = [
    # dtype, d, b, sq, sk, h, hk, wl, wr, causal, softmax_scale, softcap
    ("16", 64, 1, 130, 200, 4, 2, -1, -1, 0, None, 2.0),     # unmasked problem (masked kernel), tails
    ("bf", 64, 1, 129, 129, 2, 1, -1, 0, 1, 1.0, 30.0),      # causal, raw q.k scores ~ +-8 sigma
    ("bf", 128, 1, 150, 90, 2, 2, 20, -1, 1, None, 1.0),     # causal + window, rows with no key
    ("16", 128, 2, 33, 70, 4, 1, 10, 10, 0, 0.5, 5.0),       # window both sides, MQA, saturating
]


def _torch(x, dtype):
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float16 if dtype == "16" else torch.bfloat16)


def _run_dense_and_check(fwd_emulator, tmp_path, mode, rng, dtype, d, b, sq, sk, h, hk, wl, wr, causal, scale, cap):
    """One dense case through the emulated launcher (mode 0: guard at the end, else the start),
    checked against reference.attention: out by flash-attn's error-ratio rule against the same
    reference run in fp16 / bf16, lse -inf (and out exactly 0) where a row sees no key, lse
    close to the float64 one elsewhere. Returns (out, (q, k, v) as torch tensors, the
    reference kwargs, the float64 reference out)."""
    q, k, v = (_rnd(rng, dtype, b, sq, h, d), _rnd(rng, dtype, b, sk, hk, d),
               _rnd(rng, dtype, b, sk, hk, d))
    _write(tmp_path, dtype, d, b, sq, sk, h, hk, wl, wr, causal, scale, q, k, v, softcap=cap)
    _run(fwd_emulator, tmp_path, mode, "end" if mode == 0 else "start")
    got = torch.from_numpy(np.fromfile(tmp_path / "out.f32", np.float32).reshape(b, sq, h, d))
    lse = torch.from_numpy(np.fromfile(tmp_path / "lse.f32", np.float32).reshape(b, h, sq))
    qt, kt, vt = _torch(q, dtype), _torch(k, dtype), _torch(v, dtype)
    kw = dict(causal=bool(causal), softmax_scale=scale, window=(wl, wr), softcap=cap)
    true_out, true_lse = reference.attention(qt.double(), kt.double(), vt.double(), return_lse=True, **kw)
    assert_error_ratio(got.to(qt.dtype), reference.attention(qt, kt, vt, **kw), true_out, "out")
    empty = torch.isneginf(true_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse -inf exactly where no key"
    assert (got[empty.permute(0, 2, 1)] == 0).all()  # rows that see no key: exactly 0
    torch.testing.assert_close(lse[~empty].double(), true_lse[~empty].double(), atol=2e-4, rtol=1e-5)
    return got, (qt, kt, vt), kw, true_out


@pytest.mark.parametrize("mode", [0, 3])
@pytest.mark.parametrize("case", SOFTCAP, ids=lambda c: "-".join(map(str, c)))
def test_emulated_forward_softcap(fwd_emulator, tmp_path, case, mode):
    """Soft-capped scores (the kSoftcap kernels) against reference.attention(softcap=...): out by
    flash-attn's error-ratio rule against the same reference run in fp16 / bf16, lse close to
    the float64 one."""
    dtype, d, b, sq, sk, h, hk, wl, wr, causal, scale, cap = case
    scale = d ** -0.5 if scale is None else scale
    got, qkv, kw, true_out = _run_dense_and_check(fwd_emulator, tmp_path, mode, np.random.default_rng(sq * 3 + sk + d),
                                                  dtype, d, b, sq, sk, h, hk, wl, wr, causal, scale, cap)
    uncapped = reference.attention(*(t.double() for t in qkv), **dict(kw, softcap=0.0))
    assert (uncapped - true_out).abs().max() > 1e-2, "the cap must change the result here"


def test_emulated_forward_softcap_varlen(fwd_emulator, tmp_path):
    """The capped kernel under the varlen prologue: per-sequence reference.attention(softcap=)."""
    dtype, d, h, hk, cap = "bf", 64, 4, 2, 3.0
    lens = [(1, 17), (129, 129), (0, 5), (40, 30)]
    rng = np.random.default_rng(11)
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lens])]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lens])]).astype(np.int64)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q = _rnd(rng, dtype, total_q, h, d)
    k, v = _rnd(rng, dtype, total_k, hk, d), _rnd(rng, dtype, total_k, hk, d)
    _write(tmp_path, dtype, d, len(lens), 129, 129, h, hk, -1, 0, 1, 0.5, q, k, v,
           varlen=(cu_q, cu_k, total_q, total_k), softcap=cap)
    _run(fwd_emulator, tmp_path, 3, "start")
    got = torch.from_numpy(np.fromfile(tmp_path / "out.f32", np.float32).reshape(total_q, h, d))
    qt, kt, vt = _torch(q, dtype), _torch(k, dtype), _torch(v, dtype)
    cq, ck = torch.from_numpy(cu_q), torch.from_numpy(cu_k)
    kw = dict(causal=True, softmax_scale=0.5, softcap=cap)
    true_out = reference.attention_varlen(qt.double(), kt.double(), vt.double(), cq, ck, **kw)
    low_out = reference.attention_varlen(qt, kt, vt, cq, ck, **kw)
    assert_error_ratio(got.to(qt.dtype), low_out, true_out, "out")


# ---- head dims 32, 96, 192, 256 (masked kernel + soft-capped twin only) ---------------------
# Every one of their 16 instantiations (d x fp16/bf16 x capped or not) runs here on odd lengths,
# with GQA/MQA, causal / window / none, rows that see no key and two query blocks, in both
# landing orders / schedules; out by the error-ratio rule against reference.attention, lse
# against the float64 one. Tiles (FwdTraitsHdim<d>): 128 x 64 at d 32 / 96 / 192 (8 warps at
# 192), 64 x 64 at d 256.
NEW_DIMS = [
    # dtype, d, b, sq, sk, h, hk, wl, wr, causal, softcap
    ("16", 32, 1, 97, 130, 4, 2, -1, -1, 0, 0.0),    # unmasked problem on the masked kernel, GQA
    ("bf", 32, 1, 130, 70, 2, 1, 20, -1, 1, 0.0),    # causal + window, Sq > Sk, two query blocks
    ("16", 32, 1, 33, 90, 2, 2, 10, 10, 0, 5.0),     # capped, window both sides
    ("bf", 32, 1, 97, 97, 2, 1, -1, 0, 1, 30.0),     # capped, causal
    ("bf", 96, 1, 97, 130, 2, 1, -1, -1, 0, 0.0),    # Phi-3: unmasked, MQA, key tail
    ("16", 96, 1, 70, 33, 2, 2, -1, 0, 1, 0.0),      # causal, Sq > Sk: rows with no key
    ("16", 96, 1, 33, 70, 4, 2, -1, -1, 0, 2.0),     # capped, unmasked
    ("bf", 96, 1, 129, 90, 2, 1, 30, 5, 0, 10.0),    # capped, window, two query blocks
    ("16", 192, 1, 97, 70, 2, 1, -1, -1, 0, 0.0),    # unmasked, MQA
    ("bf", 192, 1, 60, 97, 2, 2, 40, 0, 1, 0.0),     # causal + window
    ("bf", 192, 1, 33, 70, 4, 2, -1, 0, 1, 50.0),    # capped, causal, GQA
    ("16", 192, 1, 97, 33, 2, 1, 5, 5, 0, 3.0),      # capped, window, rows with no key
    ("bf", 256, 1, 65, 97, 4, 2, -1, -1, 0, 0.0),    # Gemma: unmasked, GQA, two query blocks
    ("16", 256, 1, 70, 40, 2, 1, -1, 0, 1, 0.0),     # causal, Sq > Sk
    ("bf", 256, 1, 33, 70, 2, 1, 20, 0, 1, 50.0),    # Gemma 2: capped, causal + window
    ("16", 256, 1, 65, 65, 2, 2, -1, -1, 0, 1.0),    # capped, unmasked, saturating
]


@pytest.mark.parametrize("mode", [0, 3])
@pytest.mark.parametrize("case", NEW_DIMS, ids=lambda c: "-".join(map(str, c)))
def test_emulated_forward_new_head_dims(fwd_emulator, tmp_path, case, mode):
    dtype, d, b, sq, sk, h, hk, wl, wr, causal, cap = case
    # capped: raw q.k scores (std sqrt(d)), so that even cap 50 bends them visibly
    scale = 1.0 if cap > 0 else d ** -0.5
    got, qkv, kw, true_out = _run_dense_and_check(fwd_emulator, tmp_path, mode, np.random.default_rng(sq * 7 + sk + d),
                                                  dtype, d, b, sq, sk, h, hk, wl, wr, causal, scale, cap)
    if cap > 0:  # the launcher must have picked the capped twin: the cap changes the result here
        uncapped = reference.attention(*(t.double() for t in qkv), **dict(kw, softcap=0.0))
        assert (uncapped - true_out).abs().max() > 1e-2 and (got - uncapped.float()).abs().max() > 1e-2


NEW_DIMS_VARLEN = [
    # dtype, d, h, hk, wl, wr, causal, softcap, [(sq, sk) per sequence]
    ("bf", 32, 2, 1, -1, 0, 1, 0.0, [(1, 17), (130, 129), (0, 5), (40, 30)]),
    ("16", 96, 2, 2, -1, -1, 0, 0.0, [(17, 70), (0, 0), (97, 1), (5, 5)]),
    ("16", 192, 4, 2, 10, 10, 0, 0.0, [(33, 40), (3, 0), (70, 97)]),
    ("bf", 256, 2, 1, -1, 0, 1, 30.0, [(65, 65), (1, 0), (20, 33)]),
]


@pytest.mark.parametrize("case", NEW_DIMS_VARLEN, ids=lambda c: f"{c[0]}-d{c[1]}-n{len(c[8])}")
def test_emulated_forward_new_head_dims_varlen(fwd_emulator, tmp_path, case):
    """The varlen prologue once per new head dim (mode 3, guard at the start: late landing,
    reverse schedule), per sequence against reference.attention_varlen."""
    dtype, d, h, hk, wl, wr, causal, cap, lens = case
    rng = np.random.default_rng(sum(a * 3 + b for a, b in lens) + d)
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lens])]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lens])]).astype(np.int64)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q = _rnd(rng, dtype, total_q, h, d)
    k, v = _rnd(rng, dtype, total_k, hk, d), _rnd(rng, dtype, total_k, hk, d)
    scale = 1.0 if cap > 0 else d ** -0.5
    _write(tmp_path, dtype, d, len(lens), max(a for a, _ in lens), max(b for _, b in lens), h, hk,
           wl, wr, causal, scale, q, k, v, varlen=(cu_q, cu_k, total_q, total_k), softcap=cap)
    _run(fwd_emulator, tmp_path, 3, "start")
    got = torch.from_numpy(np.fromfile(tmp_path / "out.f32", np.float32).reshape(total_q, h, d))
    lse = torch.from_numpy(np.fromfile(tmp_path / "lse.f32", np.float32).reshape(h, total_q))
    qt, kt, vt = _torch(q, dtype), _torch(k, dtype), _torch(v, dtype)
    cq, ck = torch.from_numpy(cu_q), torch.from_numpy(cu_k)
    kw = dict(causal=bool(causal), softmax_scale=scale, window=(wl, wr), softcap=cap)
    true_out, true_lse = reference.attention_varlen(qt.double(), kt.double(), vt.double(), cq, ck,
                                                    return_lse=True, **kw)
    low_out = reference.attention_varlen(qt, kt, vt, cq, ck, **kw)
    assert_error_ratio(got.to(qt.dtype), low_out, true_out, "out")
    empty = torch.isneginf(true_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse -inf exactly where no key"
    assert (got[empty.t()] == 0).all()
    torch.testing.assert_close(lse[~empty].double(), true_lse[~empty].double(), atol=2e-4, rtol=1e-5)
    if cap > 0:  # the capped twin ran: the cap changes the result here
        uncapped = reference.attention_varlen(qt.double(), kt.double(), vt.double(), cq, ck, **dict(kw, softcap=0.0))
        assert (uncapped - true_out).abs().max() > 1e-2 and (got - uncapped.float()).abs().max() > 1e-2
