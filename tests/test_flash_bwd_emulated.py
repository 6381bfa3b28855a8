"""Run the CUDA FlashAttention backward's own code on the CPU (no GPU needed).

tests/flash_bwd_emulate.cpp compiles the launcher flash_bwd.cu runs (csrc/cuda/flash_bwd_launch.cuh:
validation, split choice, kSoftcap / dtype / head-dim dispatch, grids, shared-memory opt-in) and
the kernels of flash_bwd_kernels.cuh with g++, with host versions of ldmatrix / mma.sync /
cp.async / shfl / barriers written from the PTX ISA, runs every thread of every block as a fiber,
and writes dq/dk/dv. Here they are compared with the float64 gradients of dense attention. Every
run is under the sanitizer analogues of tests/fiber_emulate.h: global buffers between guard
pages and cp.async sources bounds-checked (memcheck), every shared-memory access tracked per
barrier interval (racecheck, initcheck); test_bank_conflict_report prints the bank-conflict
totals per kernel. This exercises the kernels' real control flow, indexing, strides, double
buffering, masking, GQA split + reduce and epilogues; what it cannot exercise is the CUDA
compiler, the hardware's asynchrony (cp.async, barriers are synchronous here) and the tensor
cores' exact rounding. See also test_flash_bwd_layout.py. Logit soft-capping
(the kSoftcap kernels) is checked against autograd through fastattn.reference(softcap=) by
flash-attn's error-ratio rule (softcap.cuh: the cap's tanh from ex2.approx and rcp.approx).
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
_spec = importlib.util.spec_from_file_location(
    "flash_bwd_layout_test", os.path.join(ROOT, "tests", "test_flash_bwd_layout.py"))
_layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_layout)
reference_grads = _layout._reference_grads


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    build = tmp_path_factory.mktemp("flash_bwd_emulate")
    stub = build / "stub"  # empty <cuda_*.h>: the emulator supplies what the code uses
    stub.mkdir()
    for name in ("cuda_runtime_api.h", "cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"):
        (stub / name).write_text("#pragma once\n")
    exe = build / "flash_bwd_emulate"
    subprocess.run([cxx, "-std=c++17", "-O2", "-fno-strict-aliasing", "-Wall", "-Werror",
                    "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized",
                    "-I", str(stub), "-I", os.path.join(ROOT, "tests"),
                    "-I", os.path.join(ROOT, "csrc", "include"),
                    "-I", os.path.join(ROOT, "csrc", "cuda"),
                    os.path.join(ROOT, "tests", "flash_bwd_emulate.cpp"), "-o", str(exe)],
                   check=True)
    return str(exe)


def _to_bits(x, dtype):
    if dtype == "16":
        return x.astype(np.float16).view(np.uint16)
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even
    return u.astype(np.uint16)


def _from_bits(b, dtype):
    if dtype == "16":
        return b.view(np.float16).astype(np.float64)
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


CASES = [
    # dtype, d, b, sq, sk, h, hk, wl, wr, causal, use_workspace
    ("16", 64, 1, 70, 150, 4, 1, -1, -1, 0, 1),   # MQA split over blocks + reduce, tails
    ("bf", 128, 1, 150, 90, 2, 2, 20, -1, 1, 1),  # causal + window, Sq > Sk: rows with no key
    ("16", 128, 2, 33, 40, 2, 1, -1, 3, 0, 0),    # GQA without workspace (one block per group)
    ("bf", 64, 1, 130, 130, 1, 1, -1, 0, 1, 0),   # causal MHA, several dQ / dK-dV tiles
    ("16", 128, 1, 1, 1, 1, 1, -1, -1, 0, 0),     # a single query and key
    ("16", 64, 1, 20, 300, 3, 1, 40, 40, 0, 1),   # window both sides, most key tiles unseen
]


def _env(mode, **extra):
    """FASTATTN_EMU_MODE plus the guard side: copies at issue / buffers flush against the guard
    page after them (mode 0), copies at the wait / reverse fibers / guard page before (mode 3)."""
    return dict(os.environ, FASTATTN_EMU_MODE=str(mode), FASTATTN_EMU_GUARD="end" if mode == 0 else "start",
                **extra)


def _write_dense(tmp_path, case, seed):
    """Random inputs of a CASES entry and their float64 reference gradients, written for the emulator."""
    dtype, d, b, sq, sk, h, hk, wl, wr, causal, use_ws = case
    rng = np.random.default_rng(seed)
    q = _from_bits(_to_bits(rng.standard_normal((b, sq, h, d)), dtype), dtype)
    k = _from_bits(_to_bits(rng.standard_normal((b, sk, hk, d)), dtype), dtype)
    v = _from_bits(_to_bits(rng.standard_normal((b, sk, hk, d)), dtype), dtype)
    dout = _from_bits(_to_bits(rng.standard_normal((b, sq, h, d)), dtype), dtype)
    scale = d ** -0.5
    wr_eff = 0 if causal else wr
    out, lse, dq_ref, dk_ref, dv_ref = reference_grads(q, k, v, dout, scale, wl, wr_eff)
    out = _from_bits(_to_bits(out, dtype), dtype)  # the forward's stored output
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout)):
        _to_bits(x, dtype).tofile(tmp_path / f"{name}.bin")
    lse.astype(np.float32).tofile(tmp_path / "lse.bin")
    (tmp_path / "meta.txt").write_text(
        f"{dtype} {d} {b} {sq} {sk} {h} {hk} {wl} {wr} {causal} {scale!r} {use_ws} 8\n")
    return q, k, v, dq_ref, dk_ref, dv_ref


# FASTATTN_EMU_MODE: 0 = cp.async copies at issue, fibers in order; 3 = copies at the wait,
# fibers in reverse order (see flash_bwd_emulate.cpp). Each case runs in both.
@pytest.mark.parametrize("mode", [0, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_emulated_kernels_match_dense(emulator, tmp_path, case, mode):
    dtype, d, b, sq, sk, h, hk, wl, wr, causal, use_ws = case
    q, k, v, dq_ref, dk_ref, dv_ref = _write_dense(tmp_path, case, sq * 7 + sk + d)
    res = subprocess.run([emulator, str(tmp_path)], capture_output=True, text=True, env=_env(mode))
    assert res.returncode == 0, res.stderr or res.stdout  # a sanitizer report, or the launcher's rc=N
    assert res.stdout.startswith("ok"), res.stdout
    if use_ws and h // hk > 1:
        assert "used_splits=1" not in res.stdout, res.stdout  # the split path ran
        assert "flash_bwd_dkdv_reduce_kernel<" in res.stdout, res.stdout
    assert "softcap" not in res.stdout, res.stdout  # the launcher picked the uncapped kernels
    tol = 2e-3 if dtype == "16" else 1.5e-2  # observed: ~5e-4 and ~4e-3
    for name, ref, shape in (("dq", dq_ref, q.shape), ("dk", dk_ref, k.shape),
                             ("dv", dv_ref, v.shape)):
        got = np.fromfile(tmp_path / f"{name}.f32", dtype=np.float32).reshape(shape)
        assert np.isfinite(got).all(), name
        # relative to the gradient scale (floor 0.5: with one key dq is 0 up to rounding)
        err = np.abs(got - ref).max() / max(np.abs(ref).max(), 0.5)
        assert err < tol, (name, err)
    if causal and sq > sk:  # rows that see no key have exactly zero gradient
        empty = sq - sk
        got = np.fromfile(tmp_path / "dq.f32", dtype=np.float32).reshape(q.shape)
        assert (got[:, :empty] == 0).all()


# Bank-report runs beyond CASES[0], CASES[1]: the in-row swizzle of d32 / d96
# (c ^ ((r >> 1) & 3)) and the column-split warps of d256.
BANK_EXTRA = [
    ("16", 32, 1, 37, 45, 4, 2, -1, -1, 0, 1),
    ("bf", 96, 1, 41, 77, 4, 1, -1, -1, 0, 1),
    ("16", 256, 1, 23, 45, 4, 1, -1, -1, 0, 1),
]


def test_bank_conflict_report(emulator, tmp_path):
    """Prints (and writes to JSON under the pytest tmp dir) the shared-memory bank-conflict totals
    of the backward kernels at d 64 (MQA split), d 128 (causal + window), d 32, d 96 and d 256, at
    every shared access the emulator tracks (cp.async destinations, ldmatrix rows, the lse /
    delta ld.shared). A report; the one check is that the d32 / d96 swizzle keeps ldmatrix and
    cp.async at 1 wavefront per ideal (its reason to exist). racecheck / initcheck run on every
    case of this file."""
    rows = []
    for case in (CASES[0], CASES[1], *BANK_EXTRA):
        run_dir = tmp_path / f"d{case[1]}"
        run_dir.mkdir()
        _write_dense(run_dir, case, 1)
        report = run_dir / "bank.txt"
        res = subprocess.run([emulator, str(run_dir)], capture_output=True, text=True,
                             env=_env(0, FASTATTN_EMU_BANK_REPORT=str(report)))
        assert res.returncode == 0, res.stderr
        rows += emu_bank_rows(report.read_text())
    emu_bank_report(rows, "flash_bwd", tmp_path)
    kernels = {r["kernel"].split("<")[0] for r in rows}
    assert kernels == {"flash_bwd_dkdv_kernel", "flash_bwd_dq_kernel"}  # the two with shared memory
    assert {r["access"] for r in rows} == {"cp.async", "ldmatrix", "ld.shared"}
    for d in (32, 96):
        swizzled = [r for r in rows if f",d{d}" in r["kernel"] and r["access"] != "ld.shared"]
        assert len(swizzled) == 4, swizzled  # dK/dV and dQ x cp.async / ldmatrix
        assert all(r["conflict_ratio"] == 1.0 for r in swizzled), swizzled


# ---- logit soft-capping ---------------------------------------------------------------------
SOFTCAP = [
    # dtype, d, b, sq, sk, h, hk, wl, wr, causal, use_workspace, softmax_scale, softcap
    ("16", 64, 1, 70, 150, 4, 1, -1, -1, 0, 1, None, 2.0),    # unmasked, MQA split + reduce, tails
    ("bf", 128, 1, 150, 90, 2, 2, 20, -1, 1, 0, 1.0, 30.0),   # causal + window, raw scores ~ +-11
    ("bf", 64, 1, 130, 130, 2, 1, -1, 0, 1, 0, None, 1.0),    # causal GQA, several tiles
    ("16", 128, 2, 33, 40, 2, 1, -1, 3, 0, 0, 0.5, 5.0),      # window, saturating scores
]


@pytest.mark.parametrize("mode", [0, 3])
@pytest.mark.parametrize("case", SOFTCAP, ids=lambda c: "-".join(map(str, c)))
def test_emulated_softcap_gradients(emulator, tmp_path, case, mode):
    """dq, dk, dv of soft-capped attention (forward out / lse from the float64 reference, as the
    capped forward kernel would store them) against autograd through reference.attention with
    softcap=, by the error-ratio rule against the same autograd run in fp16 / bf16."""
    _check_against_reference(emulator, tmp_path, case, mode)


# ---- head dims 32, 96, 192, 256 ----------------------------------------------------------
# Every instantiation of flash_bwd_hdim{32,96,192,256}.cu: each head dim x fp16 / bf16 x plain /
# soft-capped (cap 0.0 = the plain kernels), tiny odd shapes, each case in one emulator mode
# (the two modes alternate) to keep the emulator time small. d192 / d256 run the column-split
# dK/dV warps (64-key tiles, two warps per 16 key rows) and 32-key dQ tiles; d32 / d96 the
# in-row swizzle (c ^ ((r >> 1) & 3)).
HEAD_DIMS = [
    # dtype, d, b, sq, sk, h, hk, wl, wr, causal, use_workspace, softmax_scale, softcap, mode
    ("16", 32, 1, 37, 45, 4, 2, -1, -1, 0, 1, None, 0.0, 0),   # GQA split + reduce, tails
    ("bf", 32, 2, 19, 70, 2, 1, -1, 0, 1, 0, None, 0.0, 3),    # causal MQA, no workspace
    ("bf", 32, 1, 70, 40, 2, 2, 10, 5, 0, 0, None, 3.0, 3),    # window both sides, Sq > Sk
    ("16", 32, 1, 33, 33, 2, 1, -1, -1, 0, 1, 0.5, 5.0, 0),    # saturating scores, split
    ("bf", 96, 1, 41, 77, 4, 1, -1, -1, 0, 1, None, 0.0, 3),   # MQA split + reduce
    ("16", 96, 1, 70, 31, 2, 2, 20, -1, 1, 0, None, 0.0, 0),   # causal + window, rows with no key
    ("16", 96, 2, 17, 23, 2, 1, -1, 3, 0, 0, None, 2.0, 3),    # right window, GQA, b = 2
    ("bf", 96, 1, 66, 66, 2, 1, -1, 0, 1, 1, 1.0, 30.0, 0),    # causal, raw scores ~ +-10
    ("16", 192, 1, 40, 70, 2, 1, -1, -1, 1, 1, None, 0.0, 3),  # causal MQA split, 2 key tiles
    ("bf", 192, 1, 33, 21, 2, 2, -1, 7, 0, 0, None, 0.0, 0),   # right window, Sq > Sk
    ("bf", 192, 1, 19, 67, 2, 1, 30, -1, 0, 1, None, 1.0, 0),  # left window, split
    ("16", 192, 1, 35, 35, 1, 1, -1, 0, 1, 0, None, 5.0, 3),   # causal MHA
    ("bf", 256, 2, 33, 70, 2, 1, 5, -1, 0, 0, None, 0.0, 3),   # left window, GQA, b = 2
    ("16", 256, 1, 65, 37, 2, 2, -1, 0, 1, 0, None, 0.0, 0),   # causal, Sq > Sk, 2 dK/dV q tiles
    ("16", 256, 1, 23, 45, 4, 1, -1, -1, 0, 1, None, 2.0, 0),  # MQA split + reduce
    ("bf", 256, 1, 37, 37, 2, 1, -1, 0, 1, 0, 1.0, 30.0, 3),   # causal GQA, raw scores ~ +-16
]


@pytest.mark.parametrize("case", HEAD_DIMS, ids=lambda c: "-".join(map(str, c)))
def test_emulated_head_dims(emulator, tmp_path, case):
    """dq, dk, dv at head dims 32 / 96 / 192 / 256 against autograd through reference.attention
    by the error-ratio rule (fp16 / bf16 autograd as the low-precision reference)."""
    *case, mode = case
    _check_against_reference(emulator, tmp_path, tuple(case), mode)
    assert {c[1] for c in HEAD_DIMS} == {32, 96, 192, 256}
    # every (head dim, dtype, plain / capped) instantiation is in the list
    assert len({(c[0], c[1], c[12] > 0) for c in HEAD_DIMS}) == 16


# ---- zero and negative softmax_scale under masks ---------------------------------------------
# The kernels scale the scores before masking them: a mask applied first (-inf) and scaled
# after would give -inf * 0 = NaN at scale 0 and +inf at a negative scale. Both are legal
# scales (finite is all the API asks).
SIGNED_SCALES = [
    # dtype, d, b, sq, sk, h, hk, wl, wr, causal, use_workspace, softmax_scale, softcap
    ("bf", 128, 1, 70, 90, 2, 1, -1, 0, 1, 0, -0.1, 0.0),  # causal GQA, Sq < Sk, tails
    ("16", 64, 1, 65, 65, 2, 2, 9, 0, 1, 1, 0.0, 0.0),     # causal + window, uniform softmax
]


@pytest.mark.parametrize("case", SIGNED_SCALES, ids=lambda c: "-".join(map(str, c)))
def test_emulated_signed_scales(emulator, tmp_path, case):
    """dq, dk, dv with a negative and a zero softmax_scale on masked tiles, by the error-ratio
    rule against autograd through reference.attention."""
    _check_against_reference(emulator, tmp_path, case, 0)


def _check_against_reference(emulator, tmp_path, case, mode, **extra_env):
    dtype, d, b, sq, sk, h, hk, wl, wr, causal, use_ws, scale, cap = case
    tdt = torch.float16 if dtype == "16" else torch.bfloat16
    rng = np.random.default_rng(sq * 11 + sk + d)
    q, k, v, dout = (torch.from_numpy(rng.standard_normal(shape)).to(tdt) for shape in
                     ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d), (b, sq, h, d)))
    scale = d ** -0.5 if scale is None else scale
    kw = dict(causal=bool(causal), softmax_scale=scale, window=(wl, wr), softcap=cap)

    def grads(dt):
        xs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out, lse = reference.attention(*xs, return_lse=True, **kw)
        out.backward(dout.to(dt))
        return out.detach(), lse.detach(), [x.grad for x in xs]

    out, lse, true_grads = grads(torch.float64)
    _, _, low_grads = grads(tdt)
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out.to(tdt)), ("dout", dout)):
        x.view(torch.int16).numpy().view(np.uint16).tofile(tmp_path / f"{name}.bin")
    lse.to(torch.float32).numpy().tofile(tmp_path / "lse.bin")
    (tmp_path / "meta.txt").write_text(
        f"{dtype} {d} {b} {sq} {sk} {h} {hk} {wl} {wr} {causal} {scale!r} {use_ws} 8 {cap!r}\n")
    res = subprocess.run([emulator, str(tmp_path)], capture_output=True, text=True, env=_env(mode, **extra_env))
    assert res.returncode == 0, res.stderr or res.stdout
    assert res.stdout.startswith("ok"), res.stdout
    if use_ws and h // hk > 1:
        assert "used_splits=1" not in res.stdout, res.stdout  # the split path ran
    launched = res.stdout.splitlines()[1:]  # the launcher's choice: the kSoftcap twins iff cap > 0
    main = [l for l in launched if l.startswith(("flash_bwd_dkdv_kernel<", "flash_bwd_dq_kernel<"))]
    assert len(main) == 2, res.stdout
    assert all(f",d{d}" in l and ("softcap>" in l) == (cap > 0) for l in main), res.stdout
    for name, ref, low, shape in zip(("dq", "dk", "dv"), true_grads, low_grads,
                                     (q.shape, k.shape, v.shape)):
        got = torch.from_numpy(np.fromfile(tmp_path / f"{name}.f32", dtype=np.float32).reshape(shape))
        assert_error_ratio(got.to(tdt), low, ref, name)
    if cap == 0:
        return
    # The cap changes the gradients here (so a kernel that ignored it would fail above).
    xs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference.attention(*xs, **dict(kw, softcap=0.0)).backward(dout.double())
    assert (xs[0].grad - true_grads[0]).abs().max() > 1e-2


# Causal block order in sections of pairs (csrc/cuda/block_order.cuh) for the dK/dV and dQ
# kernels: a tiny shared-bytes budget gives one pair per section (the budget is below every
# pair's bytes), a middle one several pairs with a partial last section. The gradients are
# born NaN in the emulator, so a tile skipped (or run twice in place of another) fails.
SECTIONS = [
    # dtype, d, b, sq, sk, h, hk, wl, wr, causal, use_workspace, softmax_scale, softcap, mode, budget
    ("16", 64, 2, 130, 130, 3, 3, -1, 0, 1, 0, None, 0.0, 0, 1),        # 6 pairs, 1 per section
    ("bf", 64, 3, 70, 140, 2, 1, -1, 0, 1, 1, None, 0.0, 3, 75_000),    # GQA split, Sq < Sk: 4 + 2 pairs
    ("16", 128, 2, 140, 70, 4, 2, 30, 0, 1, 0, None, 0.0, 0, 60_000),   # window + causal, Sq > Sk: dQ 3 + 3 + 2
]


@pytest.mark.parametrize("case", SECTIONS, ids=lambda c: "-".join(map(str, c)))
def test_emulated_causal_sections(emulator, tmp_path, case):
    *case, mode, budget = case
    _check_against_reference(emulator, tmp_path, tuple(case), mode, FASTATTN_EMU_SCHED_L2_BYTES=str(budget))
