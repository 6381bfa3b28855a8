"""The CUDA rotary kernel, run on the CPU by tests/rotary_emulate.cpp.

tests/rotary_emulate.cpp compiles csrc/cuda/rotary_kernel.cuh (the kernel, launch geometry
and dispatch that rotary.cu launches) with g++, one fiber per CUDA thread (tests/fiber_emulate.h),
on guarded copies of the buffers (memcheck: an out-of-bounds access is reported). This checks
the kernel's indexing, vector/scalar path choice, tail copy, grid-stride loop and
out-of-range handling without a GPU; it says nothing about speed or about the GPU's own
float rounding (the emulation rounds like IEEE fp32 without FMA contraction).
"""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from fastattn import reference

from conftest import ALL_DTYPES, assert_error_ratio
from conftest import emu_extent as _extent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_POS = 64


_SET_MODE = []  # rotary_emulate_set_mode of the loaded emulator


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    tmp = tmp_path_factory.mktemp("rotary_emu")
    # The emulation needs _Float16 (GCC >= 12 on x86); an older toolchain is a reason to
    # skip, a compile error in the kernel header is a failure.
    probe = tmp / "probe.cpp"
    probe.write_text("int main() { _Float16 h = 1; return int(h) - 1; }\n")
    if subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(tmp / "probe")],
                      capture_output=True).returncode != 0:
        pytest.skip("g++ lacks _Float16")
    lib = tmp / "librotary_emulate.so"
    subprocess.run(
        [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unknown-pragmas",
         "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "rotary_emulate.cpp"),
         "-o", str(lib)],
        check=True,
    )
    dll = ctypes.CDLL(str(lib))
    dll.rotary_emulate_set_mode.restype = None
    dll.rotary_emulate_set_mode.argtypes = [ctypes.c_int]
    _SET_MODE[:] = [dll.rotary_emulate_set_mode]
    fn = dll.rotary_emulate
    fn.restype = ctypes.c_int
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [P, P, P, P, P, P, P, I64, P, I, I64, I64, I64, I64, I64, I64, I64, I, I, I, I64,
                   ctypes.POINTER(I64)]
    return fn


def run(fn, q, k, cos, sin, positions=None, interleaved=False, conjugate=False, inplace=False, max_grid=7,
        q_out=None, k_out=None, shrink=None, mode=0):
    """Rotate with the emulated kernel; returns (q_out, k_out, vector_path_used). shrink = (i, n):
    tell the emulator that buffer i (q, k, q_out, k_out, cos, sin, positions) is n bytes shorter
    than it is, and return the raw result (-1: the emulator reported an error). mode 2: the
    fibers of a block run in reverse order."""
    _SET_MODE[0](mode)
    B, S, H, D = q.shape
    if inplace:
        q_out, k_out = q, k
    else:
        q_out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format) if q_out is None else q_out
        k_out = torch.full_like(k, float("nan"), memory_format=torch.contiguous_format) if k_out is None else k_out
    strides = (ctypes.c_int64 * 12)(*(q.stride()[:3] + k.stride()[:3] + q_out.stride()[:3] + k_out.stride()[:3]))
    cos, sin = cos.contiguous(), sin.contiguous()
    pos_ptr, pos64, pos_bs = None, 0, 0
    if positions is not None:
        pos_ptr = positions.data_ptr()
        pos64 = int(positions.dtype == torch.int64)
        pos_bs = positions.stride(0) if positions.dim() == 2 else 0
    nbytes = (ctypes.c_int64 * 7)(*[_extent(t) for t in (q, k, q_out, k_out, cos, sin, positions)])
    vec = fn(q.data_ptr(), k.data_ptr(), q_out.data_ptr(), k_out.data_ptr(), strides, cos.data_ptr(),
             sin.data_ptr(), cos.shape[0], pos_ptr, pos64, pos_bs, B, S, H, k.shape[2], D, 2 * cos.shape[1],
             int(interleaved), int(conjugate), DTYPE_CODE[q.dtype], max_grid, nbytes) if shrink is None else None
    if shrink is not None:
        nbytes[shrink[0]] -= shrink[1]
        return fn(q.data_ptr(), k.data_ptr(), q_out.data_ptr(), k_out.data_ptr(), strides, cos.data_ptr(),
                  sin.data_ptr(), cos.shape[0], pos_ptr, pos64, pos_bs, B, S, H, k.shape[2], D, 2 * cos.shape[1],
                  int(interleaved), int(conjugate), DTYPE_CODE[q.dtype], max_grid, nbytes)
    assert vec >= 0, "the emulator reported an error (see stderr)"
    return q_out, k_out, bool(vec)


def tables(rot):
    angles = torch.rand(MAX_POS, rot // 2, dtype=torch.float64) * 40 - 20
    return angles.cos().float(), angles.sin().float()


def check(q2, k2, q, k, cos, sin, pos, interleaved, rot):
    true = reference.apply_rotary(q.double(), k.double(), cos.double(), sin.double(), pos, interleaved)
    low = reference.apply_rotary(q, k, cos, sin, pos, interleaved)
    assert_error_ratio(q2, low[0], true[0], "q")
    assert_error_ratio(k2, low[1], true[1], "k")
    assert torch.equal(q2[..., rot:], q[..., rot:]) and torch.equal(k2[..., rot:], k[..., rot:])


# (B, S, H, Hk, D, R): GQA / MQA / MHA, partial rotary (tail copy), R/2 not a multiple of the
# vector width (scalar NeoX path), 32 + 8 heads (one round of items, 2 heads each or 4 for
# GPT-J vectors, for fp16 / bf16 at D = 128: the vector path's prefetched first item is every
# item; two rounds for fp32 and for D = 256), head counts that are not a multiple of an item
# (heads past the last: the kernel re-reads the last head's row and must not store it), idle
# rows of threads (hd >= heads), and R = 512 / 1024
# (more pair groups than threads along x: the first item prefetched, the rest loaded in turn).
CASES = [
    (2, 9, 8, 2, 128, 128),
    (1, 11, 3, 1, 128, 64),
    (2, 5, 2, 2, 64, 48),
    (1, 3, 32, 8, 128, 128),
    (1, 2, 32, 8, 256, 256),
    (1, 3, 2, 1, 512, 512),
    (1, 2, 2, 1, 1024, 1024),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_contiguous(emulator, dtype, interleaved, case):
    B, S, H, Hk, D, R = case
    q = torch.randn(B, S, H, D, dtype=dtype)
    k = torch.randn(B, S, Hk, D, dtype=dtype)
    cos, sin = tables(R)
    pos = torch.randint(0, MAX_POS, (B, S))
    q2, k2, vec = run(emulator, q, k, cos, sin, pos, interleaved)
    width = 16 // q.element_size()
    assert vec == ((R % width == 0) if interleaved else ((R // 2) % width == 0))
    check(q2, k2, q, k, cos, sin, pos, interleaved, R)
    qi, ki = q.clone(), k.clone()
    run(emulator, qi, ki, cos, sin, pos, interleaved, inplace=True, mode=2)  # reverse fiber schedule
    check(qi, ki, q, k, cos, sin, pos, interleaved, R)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_packed_qkv_in_place(emulator, dtype, interleaved):
    B, S, H, Hk, D = 2, 7, 4, 2, 64
    qkv = torch.randn(B, S, H + 2 * Hk, D, dtype=dtype)
    before = qkv.clone()
    q, k = qkv[:, :, :H], qkv[:, :, H : H + Hk]
    cos, sin = tables(D)
    pos = torch.arange(5, 5 + S, dtype=torch.int32)  # (S,), int32, shared by the batch
    _, _, vec = run(emulator, q, k, cos, sin, pos, interleaved, inplace=True, max_grid=3)
    assert vec
    check(q, k, before[:, :, :H], before[:, :, H : H + Hk], cos, sin, pos, interleaved, D)
    assert torch.equal(qkv[:, :, H + Hk :], before[:, :, H + Hk :])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_misaligned_views_take_scalar_path(emulator, dtype, interleaved):
    # An element offset of 1 and odd strides: no 16-byte vector is possible.
    B, S, H, Hk, D, R = 2, 5, 3, 1, 64, 48
    q = torch.randn(S, B, H, D + 3, dtype=dtype).transpose(0, 1)[..., 1 : D + 1]
    k = torch.randn(B, S, Hk, D + 1, dtype=dtype)[..., 1:]
    cos, sin = tables(R)
    q2, k2, vec = run(emulator, q, k, cos, sin, None, interleaved)
    assert not vec
    check(q2, k2, q, k, cos, sin, None, interleaved, R)
    # Strided outputs too (the kernel takes output strides; the binding passes contiguous).
    qo = torch.full((B, S, H, D + 2), float("nan"), dtype=dtype)[..., 2:]
    ko = torch.full((B, S, Hk, D + 2), float("nan"), dtype=dtype)[..., 2:]
    run(emulator, q, k, cos, sin, None, interleaved, q_out=qo, k_out=ko)
    check(qo, ko, q, k, cos, sin, None, interleaved, R)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_conjugate_inverts(emulator, interleaved):
    q, k = torch.randn(1, 6, 4, 128), torch.randn(1, 6, 2, 128)
    cos, sin = tables(96)
    pos = torch.randint(0, MAX_POS, (1, 6))
    q2, k2, _ = run(emulator, q, k, cos, sin, pos, interleaved)
    q3, k3, _ = run(emulator, q2, k2, cos, sin, pos, interleaved, conjugate=True)
    torch.testing.assert_close(q3, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k3, k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_range_positions_give_nan(emulator, dtype):
    # What the kernel does when the binding's check is skipped (CUDA graph capture): the
    # token's rotated dims are NaN, its other dims and all other tokens are exact.
    q, k = torch.randn(1, 4, 2, 64, dtype=dtype), torch.randn(1, 4, 1, 64, dtype=dtype)
    cos, sin = tables(32)
    pos = torch.tensor([[0, MAX_POS, -3, 5]])
    q2, k2, _ = run(emulator, q, k, cos, sin, pos)
    for t2, t in ((q2, q), (k2, k)):
        assert torch.isnan(t2[0, 1:3, :, :32].float()).all()
        assert torch.equal(t2[0, 1:3, :, 32:], t[0, 1:3, :, 32:])
    good = torch.tensor([0, 3])
    ref = reference.apply_rotary(q[:, good], k[:, good], cos, sin, pos[:, good])
    torch.testing.assert_close(q2[:, good], ref[0], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(k2[:, good], ref[1], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("which,vector,shrink,expected", [
    # vector path: the last 16-byte load of q (bytes 1520..1535) crosses the shortened end
    # (bounds-checked, byte-exact)
    (0, True, 8, "memcheck: rotary_kernel<half,0,1>: out-of-bounds read (16-byte vector, 16 bytes) at byte offset 1520 "
                 "of buffer q (1528 bytes)"),
    # scalar path (misaligned view): raw 2-byte loads walk onto the guard page (SIGSEGV, reported;
    # the first to fault in the emulator's thread order, past the <= 15 bytes of alignment slack)
    (1, False, 64, "memcheck: rotary_kernel<half,0,0>: out-of-bounds read at byte offset 764 of buffer k (704 bytes)"),
    # a raw store past the shortened output (SIGSEGV: the fault says write)
    (3, False, 64, "memcheck: rotary_kernel<half,0,0>: out-of-bounds write at byte offset 764 of buffer k_out "
                   "(704 bytes)"),
    # cos table: __ldg is bounds-checked (the last position's last angle)
    (4, True, 4, "memcheck: rotary_kernel<half,0,1>: out-of-bounds read (__ldg, 4 bytes) at byte offset 8188 of buffer "
                 "cos (8188 bytes)"),
])
def test_memcheck_reports_out_of_bounds_in_the_real_kernel(emulator, capfd, monkeypatch, which, vector, shrink,
                                                           expected):
    """The sanitizer wiring: told that a buffer is shorter than the kernel's extent, the emulator
    must report the first access past it (kernel, buffer, offset) and return -1."""
    monkeypatch.setenv("FASTATTN_EMU_GUARD", "end")
    B, S, H, Hk, D = 1, 3, 4, 2, 64
    full = torch.randn(B, S, H + Hk + 1, D, dtype=torch.float16)
    q = torch.randn(B, S, H, D, dtype=torch.float16)
    # the misaligned view (one element in) forces the scalar path
    k = full[:, :, :Hk] if vector else full.view(-1)[1:1 + B * S * Hk * D].view(B, S, Hk, D)
    cos, sin = tables(D)
    pos = torch.arange(S, dtype=torch.int32) + (MAX_POS - S)   # the last positions: the table's end
    rc = run(emulator, q, k, cos, sin, pos, shrink=(which, shrink))
    assert rc == -1
    assert expected in capfd.readouterr().err
