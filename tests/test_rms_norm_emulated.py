"""Run csrc/cuda/rms_norm.cu — the kernels AND their launchers — on the CPU (no GPU needed).

tests/rms_norm_emulate.cpp compiles rms_norm.cu with g++ after four mechanical rewrites done
here (<<<...>>> launches, extern / static __shared__, the global Pack pointer casts; see the .cpp),
over the fiber runtime and the CUDA runtime API stand-ins of tests/fiber_emulate.h. The calls
go through rms_norm_fwd_cuda / rms_norm_bwd_cuda / rms_norm_bwd_num_row_blocks_cuda, as the
binding makes them, so the launchers' own choices run: vector or scalar instantiation
(alignment, strides, n), row cache in shared memory or not, the >48 KiB opt-in
(cudaFuncGetAttributes / cudaDeviceGetAttribute / cudaFuncSetAttribute against an emulated
opt-in limit; a launch past the kernel's attribute is refused as the runtime refuses it),
the dweight accumulator in shared memory or in the partial rows, the reduce kernel. Results
are compared with fastattn.reference (autograd through it for the backward). Inputs sit
between NaN (reading outside them poisons the result); outputs sit between NaN that must
stay NaN (a write outside them is caught). What it cannot exercise: nvcc, the hardware's
rounding of rsqrtf, speed.
"""
import ctypes
import os
import re
import shutil
import subprocess

import pytest
import torch

from fastattn import reference

from conftest import assert_error_ratio, emu_bank_report, emu_bank_rows
from conftest import emu_ptrs as _ptrs, emu_extent as _extent, emu_ptrs_sizes as _ptrs_sizes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
H100_OPTIN = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90
NO_OPTIN = 48 * 1024     # a device that offers nothing past the default 48 KiB
STATIC = 64              # the row kernels' static scratch (16 floats)


def _rewrite(src):
    """The four mechanical rewrites; each must match exactly as often as expected."""
    rules = [
        (r"(\w+)<<<(.*?)>>>\(", r"::emu::KernelLaunch(\1, \2)(", 3),
        (r"extern __shared__ (?:__align__\(\d+\) )?(\w[\w ]*?) (\w+)\[\];",
         r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_smem());", 2),
        (r"__shared__ (\w[\w:<>, ]*?) (\w+)(\[[^\]]+\]);", r"EMU_STATIC_SHARED(\1, \2, \3);", 3),
        # ldg_pack / stg_pack (global memory); shared memory goes through lds / sts (tracked)
        (r"reinterpret_cast<((?:const )?Pack<[^>]*>)\*>\((g\w+)\)", r"::emu::aligned_ptr<\1>(\2)", 2),
    ]
    for pat, rep, count in rules:
        src, n = re.subn(pat, rep, src, flags=re.S)
        assert n == count, f"rms_norm.cu changed shape: {pat!r} matched {n} times, expected {count}"
    assert "<<<" not in src and "__shared__" not in src
    return src


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    tmp = tmp_path_factory.mktemp("rms_norm_emulate")
    with open(os.path.join(ROOT, "csrc", "cuda", "rms_norm.cu")) as f:
        (tmp / "rms_norm_rewritten.cu").write_text(_rewrite(f.read()))
    for h in ("cuda_runtime.h", "cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h"):
        (tmp / h).write_text("#pragma once  // stand-ins: tests/fiber_emulate.h, tests/rms_norm_emulate.cpp\n")
    lib = tmp / "rms_norm_emulate.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-fno-strict-aliasing", "-Wall", "-Werror", "-Wno-unknown-pragmas",
                    "-Wno-maybe-uninitialized", "-shared", "-fPIC", "-I", str(tmp),
                    "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc", "cuda"),
                    os.path.join(ROOT, "tests", "rms_norm_emulate.cpp"), "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    P, I64, I = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64), ctypes.c_int
    dll.rms_norm_fwd_emulate.restype = I
    dll.rms_norm_fwd_emulate.argtypes = [P, I64, I64, ctypes.c_float, I, I, ctypes.c_char_p, I]
    dll.rms_norm_bwd_emulate.restype = I
    dll.rms_norm_bwd_emulate.argtypes = [P, I64, I64, I, I, ctypes.c_char_p, I]
    dll.emu_bank_report.restype = I
    dll.emu_bank_report.argtypes = [ctypes.c_char_p, I, I]
    dll.rms_norm_bwd_num_row_blocks_emulate.restype = ctypes.c_int64
    dll.rms_norm_bwd_num_row_blocks_emulate.argtypes = [ctypes.c_int64, ctypes.c_int64, I]
    return dll


SENTINEL = -4096.0  # exact in every dtype; what surrounds an output


class Buf:
    """A (rows, n) view into a bigger buffer: `lead` elements before it, row stride `stride`
    (>= n), some elements after it. An input (src given) is surrounded by NaN, so a read
    outside it poisons the result; an output starts as NaN (every element must be written) and
    is surrounded by SENTINEL, which must survive (a write outside it, even of NaN, is seen)."""

    def __init__(self, rows, n, dtype, lead=8, stride=None, src=None):
        self.stride = stride or n
        self.fill = float("nan") if src is not None else SENTINEL
        self.base = torch.full((lead + rows * self.stride + 24,), self.fill, dtype=dtype)
        self.t = self.base[lead:lead + rows * self.stride].view(rows, self.stride)[:, :n]
        self.t.copy_(src if src is not None else torch.full((rows, n), float("nan")))
        self.mask = torch.ones_like(self.base, dtype=torch.bool)
        self.mask[lead:lead + rows * self.stride].view(rows, self.stride)[:, :n] = False

    def untouched_outside(self):
        out = self.base[self.mask]
        return bool(torch.isnan(out).all() if self.fill != self.fill else (out == self.fill).all())


def _ints(*vals):
    return (ctypes.c_int64 * len(vals))(*vals)


def _log(buf):
    """[(kernel, grid, threads, dynamic smem)] of the launches made."""
    out = []
    for line in buf.value.decode().splitlines():
        k, g, t, s = line.split()
        out.append((k, int(g), int(t), int(s)))
    return out


def _vec(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def _tname(dtype):
    return {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bf16"}[dtype]


def _expected_smem(nbytes, optin):
    """What the launcher should ask for: all of it when it fits (with the opt-in past 48 KiB), none otherwise."""
    return nbytes if nbytes + STATIC <= max(optin, 48 * 1024) else 0


def _threads(npacks):
    return min(max(-(-npacks // 32) * 32, 32), 512)


def _unroll(kn):
    """rms_norm.cu's kUnrollOf: the packs a forward thread holds, 2 vectors or 4 scalars."""
    return 2 if kn > 1 else 4


def _fwd_threads(npacks, kn):
    """rms_norm.cu's threads_fwd: the fewest whole warps holding the row at kUnrollOf packs per
    thread, 32..512 (the backward keeps one thread per pack, _threads)."""
    return _threads(-(-npacks // _unroll(kn)))


def _row_in_registers(npacks, kn):
    """rms_norm.cu's row_in_registers: a thread holds up to 2 vectors (4 scalars) of the row."""
    return npacks <= _unroll(kn) * _fwd_threads(npacks, kn)


# (dtype, rows, n, weight, residual, lead (elements before x), x row stride pad, optin, mode)
FWD = [
    (torch.float32, 5, 1024, True, False, 8, 0, H100_OPTIN, 0),    # vector, row cache
    (torch.float16, 4, 111, True, False, 8, 0, H100_OPTIN, 2),     # scalar (n % 8), reverse schedule
    (torch.bfloat16, 3, 4096, False, False, 9, 0, H100_OPTIN, 0),  # scalar (misaligned x), no weight
    (torch.bfloat16, 3, 2048, True, True, 8, 8, H100_OPTIN, 2),    # vector, fused residual, strided x
    (torch.float16, 3, 111, False, True, 8, 3, H100_OPTIN, 0),     # scalar, residual, odd stride
    (torch.float32, 3, 12288, True, False, 8, 0, H100_OPTIN, 2),   # exactly 48 KiB dynamic: opt-in
    (torch.bfloat16, 2, 30000, True, True, 8, 0, H100_OPTIN, 0),   # 60000 B: opt-in, residual
    (torch.float32, 2, 60000, True, False, 8, 0, H100_OPTIN, 2),   # 240000 B > opt-in: no row cache
    (torch.bfloat16, 2, 30000, True, False, 8, 0, NO_OPTIN, 2),    # no opt-in device: no row cache
    (torch.float16, 2, 24577, True, True, 8, 0, NO_OPTIN, 0),      # scalar, residual, no row cache
    (torch.float32, 40, 48, False, False, 8, 0, H100_OPTIN, 2),    # many rows, one warp
    (torch.bfloat16, 3, 8192, True, True, 8, 0, H100_OPTIN, 2),    # vector, the largest row held in registers
    (torch.bfloat16, 2, 8200, True, False, 8, 0, H100_OPTIN, 0),   # one pack past it: rounds + row cache
    (torch.float16, 2, 4097, True, False, 8, 0, H100_OPTIN, 2),    # scalar, odd: rounds of 4 + row cache
    (torch.float32, 2, 8192, True, True, 8, 0, NO_OPTIN, 0),       # vector, rounds of 2, residual, cache
    (torch.bfloat16, 3, 4096, True, False, 8, 0, H100_OPTIN, 2),   # vector, 256 threads x 2 packs each
    (torch.float16, 3, 4096, False, False, 8, 0, H100_OPTIN, 0),   # the same, fp16, no weight
    (torch.bfloat16, 3, 4104, True, True, 8, 8, H100_OPTIN, 0),    # 513 packs: 288 threads, 2 or 1 pack each
]


@pytest.mark.parametrize("case", FWD, ids=lambda c: f"{_tname(c[0])}_r{c[1]}_n{c[2]}_w{int(c[3])}_res{int(c[4])}"
                         f"_lead{c[5]}_pad{c[6]}_optin{c[7] // 1024}k_m{c[8]}")
def test_emulated_rms_norm_fwd(emu, case):
    dtype, rows, n, has_w, has_res, lead, pad, optin, mode = case
    eps = 1e-6
    x = Buf(rows, n, dtype, lead=lead, stride=n + pad, src=torch.randn(rows, n).to(dtype))
    w = Buf(1, n, dtype, src=(1 + 0.5 * torch.randn(1, n)).to(dtype)) if has_w else None
    r = Buf(rows, n, dtype, src=torch.randn(rows, n).to(dtype)) if has_res else None
    y = Buf(rows, n, dtype)
    h = Buf(rows, n, dtype) if has_res else None
    rstd = Buf(1, rows, torch.float32)
    log = ctypes.create_string_buffer(4096)
    rc = emu.rms_norm_fwd_emulate(
        *_ptrs_sizes(x.t, r.t if r else None, w.t if w else None, y.t, h.t if h else None, rstd.t),
        _ints(x.stride, r.stride if r else 0, y.stride, h.stride if h else 0, rows, n, DTYPE_CODE[dtype]),
        eps, mode, optin, log, len(log))
    assert rc == 0, f"launcher returned {rc} (-1: emulation error, see stderr)"

    vec = n % _vec(dtype) == 0 and lead % _vec(dtype) == 0 and pad % _vec(dtype) == 0
    kn = _vec(dtype) if vec else 1
    smem = 0 if _row_in_registers(n // kn, kn) else _expected_smem(n * x.t.element_size(), optin)
    threads = _fwd_threads(n // kn, kn)
    assert _log(log) == [(f"fwd<{_tname(dtype)},{kn},{int(has_res)}>", rows, threads, smem)]

    wt = w.t[0] if w else None
    for b in (y, h, rstd, x, w, r):
        assert b is None or b.untouched_outside()
    if has_res:
        assert torch.equal(h.t, x.t + r.t)  # x + r rounded once, as torch does it
        true_y, _ = reference.rms_norm(x.t.double(), wt.double() if wt is not None else None, eps,
                                       residual=r.t.double())
        low_y, _ = reference.rms_norm(x.t, wt, eps, residual=r.t)
        normed = h.t
    else:
        true_y = reference.rms_norm(x.t.double(), wt.double() if wt is not None else None, eps)
        low_y = reference.rms_norm(x.t, wt, eps)
        normed = x.t
    assert_error_ratio(y.t, low_y, true_y, "y")
    true_rstd = (normed.double().pow(2).mean(-1) + eps).rsqrt()
    torch.testing.assert_close(rstd.t[0].double(), true_rstd, rtol=2e-6, atol=0)


# (dtype, rows, n, weight, dh, lead (elements before dy), optin, num_sms, mode)
BWD = [
    (torch.float32, 37, 1024, True, False, 8, H100_OPTIN, 4, 0),   # vector; 8 row blocks, grid-stride rows
    (torch.float16, 9, 111, True, True, 8, H100_OPTIN, 2, 2),      # scalar (n % 8), dh
    (torch.bfloat16, 5, 4096, False, False, 8, H100_OPTIN, 132, 0),  # no weight: no partials, no reduce
    (torch.float16, 6, 4096, True, False, 9, H100_OPTIN, 1, 2),    # scalar (misaligned dy), 2 row blocks
    (torch.float32, 3, 12288, True, True, 8, H100_OPTIN, 1, 0),    # 48 KiB accumulator: opt-in
    (torch.bfloat16, 5, 16384, True, False, 8, NO_OPTIN, 2, 2),    # 64 KiB > limit: partial rows in global
    (torch.float32, 3, 60000, True, False, 8, H100_OPTIN, 1, 0),   # 240000 B > opt-in: global
    (torch.bfloat16, 300, 1024, True, True, 8, H100_OPTIN, 132, 2),  # 264 row blocks of 4 warps, 1-2 rows each
    (torch.float32, 70, 4097, True, False, 8, H100_OPTIN, 8, 0),   # scalar, odd n, 16 row blocks
]


@pytest.mark.parametrize("case", BWD, ids=lambda c: f"{_tname(c[0])}_r{c[1]}_n{c[2]}_w{int(c[3])}_dh{int(c[4])}"
                         f"_lead{c[5]}_optin{c[6] // 1024}k_sms{c[7]}_m{c[8]}")
def test_emulated_rms_norm_bwd(emu, case):
    dtype, rows, n, has_w, has_dh, lead, optin, sms, mode = case
    eps = 1e-6
    x = Buf(rows, n, dtype, src=torch.randn(rows, n).to(dtype))
    dy = Buf(rows, n, dtype, lead=lead, src=torch.randn(rows, n).to(dtype))
    w = Buf(1, n, dtype, src=(1 + 0.5 * torch.randn(1, n)).to(dtype)) if has_w else None
    dh = Buf(rows, n, dtype, stride=n + 8, src=torch.randn(rows, n).to(dtype)) if has_dh else None
    rstd = Buf(1, rows, torch.float32, src=(x.t.double().pow(2).mean(-1) + eps).rsqrt().float()[None])
    dx = Buf(rows, n, dtype, stride=n + 8)
    nblocks = emu.rms_norm_bwd_num_row_blocks_emulate(rows, n, sms)
    assert nblocks == max(1, min(rows, 2 * sms))
    dw = Buf(1, n, torch.float32) if has_w else None
    partial = Buf(nblocks, n, torch.float32) if has_w else None
    log = ctypes.create_string_buffer(4096)
    rc = emu.rms_norm_bwd_emulate(
        *_ptrs_sizes(dy.t, x.t, w.t if w else None, rstd.t, dh.t if dh else None, dx.t, dw.t if dw else None,
              partial.t if partial else None),
        _ints(dy.stride, x.stride, dh.stride if dh else 0, dx.stride, rows, n, DTYPE_CODE[dtype], nblocks),
        mode, optin, log, len(log))
    assert rc == 0, f"launcher returned {rc} (-1: emulation error, see stderr)"

    vec = n % _vec(dtype) == 0 and lead % _vec(dtype) == 0
    kn = _vec(dtype) if vec else 1
    threads = _threads(n // kn)
    smem = _expected_smem(n * 4, optin) if has_w else 0
    expected = [(f"bwd<{_tname(dtype)},{kn}>", nblocks, threads, smem)]
    if has_w:
        expected.append(("reduce", -(-n // 32), 512, 0))
    assert _log(log) == expected
    for b in (dx, dw, partial, x, dy, w, dh, rstd):
        assert b is None or b.untouched_outside()

    def grads(prec):
        xx = x.t.to(prec).requires_grad_()
        ww = w.t[0].to(prec).requires_grad_() if w else None
        y = reference.rms_norm(xx, ww, eps)
        y.backward(dy.t.to(prec))
        gx = xx.grad + (dh.t.to(prec) if dh else 0)
        return gx, (ww.grad if w else None)

    true_dx, true_dw = grads(torch.float64)
    low_dx, low_dw = grads(dtype)
    assert_error_ratio(dx.t, low_dx, true_dx, "dx")
    if has_w:
        assert_error_ratio(dw.t[0], low_dw, true_dw, "dweight")
        # The reduce adds the block partials in its fixed order: bit-exact.
        assert torch.equal(dw.t[0], _reduce_order_sum(partial.t))


def _reduce_order_sum(p):
    """rms_norm_dweight_reduce_kernel's order: per column, 16 running sums over the partial
    rows y, y + 16, ... in increasing order (from 0.0), then the tree s[y] += s[y + h] for
    h = 8, 4, 2, 1. fp32 adds, as on the device."""
    s = [torch.zeros(p.shape[1], dtype=torch.float32) for _ in range(16)]
    for b in range(p.shape[0]):
        s[b % 16] = s[b % 16] + p[b]
    h = 8
    while h > 0:
        for y in range(h):
            s[y] = s[y] + s[y + h]
        h //= 2
    return s[0]


def test_emulated_launch_refused_past_the_attribute(emu):
    """The emulated runtime refuses a launch asking for more dynamic shared memory than the
    kernel's attribute: the launcher's own request_smem is what makes >48 KiB work. On a device
    whose opt-in limit sits between 48 KiB and 48 KiB + the static scratch, N = 12288 fp32 does
    not fit: the launcher must fall back (no row cache), not fail."""
    rows, n = 2, 12288
    x = Buf(rows, n, torch.float32, src=torch.randn(rows, n))
    y = Buf(rows, n, torch.float32)
    rstd = Buf(1, rows, torch.float32)
    log = ctypes.create_string_buffer(4096)
    rc = emu.rms_norm_fwd_emulate(*_ptrs_sizes(x.t, None, None, y.t, None, rstd.t),
                                  _ints(n, 0, n, 0, rows, n, 0), 1e-6, 0, 48 * 1024 + 32, log, len(log))
    assert rc == 0
    assert _log(log) == [("fwd<float,4,0>", rows, 512, 0)]
    assert_error_ratio(y.t, reference.rms_norm(x.t, None, 1e-6), reference.rms_norm(x.t.double(), None, 1e-6), "y")


@pytest.mark.parametrize("which,expected", [
    (0, "memcheck: fwd<float,4,0>: out-of-bounds read (Pack, 16 bytes) at byte offset 8176 of buffer x (8188 bytes)"),
    (3, "memcheck: fwd<float,4,0>: out-of-bounds write (Pack, 16 bytes) at byte offset 8176 of buffer y (8188 bytes)"),
    (2, "memcheck: fwd<float,4,0>: out-of-bounds read (Pack, 16 bytes) at byte offset 4080 of buffer weight "
        "(4092 bytes)"),
])
def test_memcheck_reports_out_of_bounds_in_the_real_kernel(emu, capfd, which, expected):
    """The sanitizer wiring: told that a buffer is 4 bytes shorter than the kernel's extent, the
    emulator must report the first Pack access past it (kernel, buffer, offset) and return -1."""
    rows, n, dtype = 2, 1024, torch.float32
    x = torch.randn(rows, n)
    w = torch.randn(1, n)
    y = torch.empty(rows, n)
    rstd = torch.empty(1, rows)
    ptrs, sizes = _ptrs_sizes(x, None, w, y, None, rstd)
    sizes[which] -= 4
    log = ctypes.create_string_buffer(4096)
    rc = emu.rms_norm_fwd_emulate(ptrs, sizes, _ints(n, 0, n, 0, rows, n, DTYPE_CODE[dtype]), 1e-6, 0, H100_OPTIN,
                                  log, len(log))
    assert rc == -1
    assert expected in capfd.readouterr().err


def test_bank_conflict_report(emu, tmp_path):
    """Prints (and writes to JSON under the pytest tmp dir) the shared-memory bank-conflict totals
    of every kernel this module ran, at the access points the emulator tracks (every lds / sts:
    the row cache, the block_sum scratch, the dweight accumulator, the reduce tree). A report, not a check; run alone, it first runs one forward and one
    backward case of each path."""
    test_emulated_rms_norm_fwd(emu, FWD[0])
    test_emulated_rms_norm_fwd(emu, FWD[1])
    test_emulated_rms_norm_bwd(emu, BWD[0])
    test_emulated_rms_norm_bwd(emu, BWD[-2])  # bf16: the accumulator's two 16-byte chunks per pack
    n = emu.emu_bank_report(None, 0, 0)
    buf = ctypes.create_string_buffer(n)
    emu.emu_bank_report(buf, n, 0)
    rows = emu_bank_report(emu_bank_rows(buf.value.decode()), "rms_norm", tmp_path)
    assert any(r["kernel"].startswith("fwd<") and r["instructions"] > 0 for r in rows)
