"""The PTX stand-ins of tests/ptx_emulate.h, each on its own, against the PTX ISA's tables.

tests/ptx_selftest.cpp compiles the header alone (with the fiber runtime it runs on) into a
shared library; this file gives it per-lane operands and checks per-lane results. The fragment
tables below are written out from the PTX ISA text, independently of the C++ code:

  * mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} ("Matrix Fragments for mma.m16n8k16 with
    floating point type"): A, B filled with distinct small integers (exact in f16 and bf16) and
    C with distinct halves, distributed to the 32 lanes' registers by the ISA table; the
    gathered D must equal numpy's A @ B + C exactly (every partial sum is exact in f32).
  * ldmatrix.sync.aligned.m8n8.x{1,2,4}{,.trans}.shared.b16 ("Warp-level matrix load
    instruction: ldmatrix"): 8x8 matrices of distinct 16-bit values with their rows scattered
    over shared memory; lane 8j + r gives the address of row r of matrix j (the other lanes of
    .x1 / .x2 give a decoy row that must not be read); each lane's registers must hold the
    elements the ISA's fragment table names.
  * ex2.approx.ftz.f32 (PTX ISA 8.x 9.7.3.21): 2^x at most 2 ulp from the correctly rounded
    result, subnormal results flushed to +0 by .ftz (near the bottom of the normal range the
    2 ulp may also round up to the smallest normal), ex2(-inf) = +0, ex2(+-0) = 1,
    ex2(+inf) = +inf, ex2(NaN) = NaN.
  * rcp.approx.ftz.f32 (9.7.3.13): 1/x within 1 ulp, rcp(+-0) = +-inf, rcp(+-inf) = +-0, subnormal
    inputs and results flushed to sign-preserving zero, NaN -> NaN; and the soft-capping tanh
    of csrc/cuda/softcap.cuh built from the ex2 and rcp stand-ins.

Each check is also run against a deliberately wrong table (transposed A / B fragments, the
.trans and plain ldmatrix tables swapped, a matrix order reversed, e^x for 2^x) and must then
fail: a check that cannot fail proves nothing.
"""
import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    so = tmp_path_factory.mktemp("ptx_selftest") / "ptx_selftest.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-fno-strict-aliasing", "-Wall", "-Werror", "-shared", "-fPIC",
                    "-I", os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "ptx_selftest.cpp"),
                    "-o", str(so)], check=True)
    dll = ctypes.CDLL(str(so))
    dll.ptx_selftest_error.restype = ctypes.c_char_p
    p = ctypes.c_void_p
    dll.ptx_ldmatrix.restype = ctypes.c_int
    dll.ptx_ldmatrix.argtypes = [p, ctypes.c_int, p, ctypes.c_int, ctypes.c_int, p]
    dll.ptx_mma.restype = ctypes.c_int
    dll.ptx_mma.argtypes = [ctypes.c_int, p, p, p, p]
    dll.ptx_ex2.restype = None
    dll.ptx_ex2.argtypes = [p, p, ctypes.c_int]
    dll.ptx_rcp.restype = None
    dll.ptx_rcp.argtypes = [p, p, ctypes.c_int]
    return dll


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _bits(x, bf):
    """f32 values exactly representable in the 16-bit type -> their 16-bit patterns."""
    x = np.asarray(x, dtype=np.float32)
    if bf:
        u = x.view(np.uint32)
        assert np.all(u & 0xFFFF == 0), "not exact in bf16"
        return (u >> 16).astype(np.uint16)
    h = x.astype(np.float16)
    assert np.array_equal(h.astype(np.float32), x), "not exact in f16"
    return h.view(np.uint16)


def _pack(lo, hi):
    return np.uint32(lo) | (np.uint32(hi) << np.uint32(16))


# ---- mma.sync.aligned.m16n8k16, floating point: the ISA's fragment tables --------------------
# groupID = laneid >> 2, threadID_in_group = laneid % 4.
#   A (16 x 16, .row), a0..a7, a_i in register i // 2, half i & 1 (lower-numbered = low half):
#     row = groupID for a0, a1, a4, a5; groupID + 8 for a2, a3, a6, a7
#     col = threadID_in_group * 2 + (i & 1) for a0..a3; + 8 for a4..a7
#   B (16 x 8, .col), b0..b3, b_i in register i // 2, half i & 1:
#     row (k) = threadID_in_group * 2 + (i & 1) for b0, b1; + 8 for b2, b3
#     col (n) = groupID
#   C / D (16 x 8, f32), c0..c3:
#     row = groupID for c0, c1; groupID + 8 for c2, c3
#     col = threadID_in_group * 2 + (i & 1)
def isa_mma_a(lane, i):
    g, t = lane >> 2, lane % 4
    row = g if i in (0, 1, 4, 5) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def isa_mma_b(lane, i):
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def isa_mma_c(lane, i):
    g, t = lane >> 2, lane % 4
    return g + (8 if i >= 2 else 0), t * 2 + (i & 1)


def _mma_operands(seed):
    rng = np.random.default_rng(seed)
    # Distinct integers, |A| <= 128, |B| <= 64: exact in f16 and bf16 (8 significant bits);
    # |sum| <= 16 * 128 * 64 + |C| < 2^24, so f32 sums are exact in any order.
    A = rng.permutation(np.arange(-128, 128)).reshape(16, 16).astype(np.float32)
    B = rng.permutation(np.arange(-64, 64)).reshape(16, 8).astype(np.float32)
    C = (rng.permutation(np.arange(128)) - 64).reshape(16, 8).astype(np.float32) * 0.5
    return A, B, C


def _run_mma(lib, bf, A, B, C, a_table=isa_mma_a, b_table=isa_mma_b, c_table=isa_mma_c, d_table=isa_mma_c):
    """Distribute A, B, C to the lanes by the tables, run the stand-in, gather D by d_table."""
    Ab, Bb = _bits(A, bf), _bits(B, bf)
    a = np.zeros((32, 4), np.uint32)
    b = np.zeros((32, 2), np.uint32)
    c = np.zeros((32, 4), np.float32)
    for lane in range(32):
        for r in range(4):
            a[lane, r] = _pack(Ab[a_table(lane, 2 * r)], Ab[a_table(lane, 2 * r + 1)])
        for r in range(2):
            b[lane, r] = _pack(Bb[b_table(lane, 2 * r)], Bb[b_table(lane, 2 * r + 1)])
        for i in range(4):
            c[lane, i] = C[c_table(lane, i)]
    d = np.full((32, 4), np.nan, np.float32)
    assert lib.ptx_mma(int(bf), _ptr(a), _ptr(b), _ptr(c), _ptr(d)) == 0, lib.ptx_selftest_error()
    D = np.full((16, 8), np.nan, np.float32)
    for lane in range(32):
        for i in range(4):
            D[d_table(lane, i)] = d[lane, i]
    return D


@pytest.mark.parametrize("bf", [False, True], ids=["f16", "bf16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mma_m16n8k16_matches_isa_table(lib, bf, seed):
    A, B, C = _mma_operands(seed)
    D = _run_mma(lib, bf, A, B, C)
    want = (A.astype(np.float64) @ B.astype(np.float64) + C).astype(np.float32)
    np.testing.assert_array_equal(D, want)


def test_mma_identity_picks_single_elements(lib):
    # A = I: D = B + C, each output depends on exactly one B element (a fragment slip shows
    # as a wrong value, not as a slightly different sum).
    _, B, C = _mma_operands(3)
    np.testing.assert_array_equal(_run_mma(lib, False, np.eye(16, dtype=np.float32), B, C), B + C)


@pytest.mark.parametrize("wrong", ["a_transposed", "b_k_halves_swapped", "c_rows_swapped"])
def test_mma_check_fails_on_a_wrong_table(lib, wrong):
    A, B, C = _mma_operands(4)
    tables = {
        "a_transposed": {"a_table": lambda lane, i: isa_mma_a(lane, i)[::-1]},
        "b_k_halves_swapped": {"b_table": lambda lane, i: isa_mma_b(lane, i ^ 2)},  # b0,b1 <-> b2,b3
        # C distributed with c0,c1 <-> c2,c3 (rows g and g + 8), D gathered by the ISA table.
        "c_rows_swapped": {"c_table": lambda lane, i: isa_mma_c(lane, i ^ 2)},
    }[wrong]
    D = _run_mma(lib, False, A, B, C, **tables)
    assert not np.array_equal(D, (A.astype(np.float64) @ B + C).astype(np.float32))


# ---- ldmatrix.sync.aligned.m8n8.x{1,2,4}{,.trans}.shared.b16: the ISA's tables ---------------
# Threads 8j .. 8j + 7 give the row addresses of matrix j (rows 0..7). Destination register j
# of thread t: without .trans row t // 4, columns 2 * (t % 4) (low half) and 2 * (t % 4) + 1
# (high half) of matrix j; with .trans the matrix is transposed: column t // 4, rows
# 2 * (t % 4) (low) and 2 * (t % 4) + 1 (high).
def isa_ldmatrix(t, trans):
    """(row, col) of the low and the high half of any register of thread t."""
    if not trans:
        return (t // 4, 2 * (t % 4)), (t // 4, 2 * (t % 4) + 1)
    return (2 * (t % 4), t // 4), (2 * (t % 4) + 1, t // 4)


DECOY = 0xDEAD


def _ldmatrix_case(seed, num):
    """Shared memory with num 8x8 matrices, rows scattered (16-byte slots, shuffled), values
    0x1000 * (j + 1) + 8 * row + col; one extra decoy row of DECOY; per-lane row addresses."""
    rng = np.random.default_rng(seed)
    nslots = 4 * 8 + 8
    slots = rng.permutation(nslots)
    mats = np.array([[[0x1000 * (j + 1) + 8 * r + c for c in range(8)] for r in range(8)] for j in range(num)],
                    np.uint16)
    smem = np.full(nslots * 8, 0x7E00, np.uint16)  # NaN-ish everywhere else
    addr = np.zeros(32, np.uint32)
    decoy_slot = slots[-1]
    smem[decoy_slot * 8:(decoy_slot + 1) * 8] = DECOY
    for lane in range(32):
        j, r = lane // 8, lane % 8
        if j < num:
            s = slots[8 * j + r]
            smem[s * 8:(s + 1) * 8] = mats[j, r]
            addr[lane] = s * 16
        else:  # .x1 / .x2: these threads' addresses are not used
            addr[lane] = decoy_slot * 16
    return mats, smem, addr


def _run_ldmatrix(lib, smem, addr, num, trans):
    out = np.full((32, 4), 0xFFFFFFFF, np.uint32)
    rc = lib.ptx_ldmatrix(_ptr(smem), smem.nbytes, _ptr(addr), num, int(trans), _ptr(out))
    assert rc == 0, lib.ptx_selftest_error()
    return out


def _ldmatrix_expected(mats, num, trans, table=isa_ldmatrix, matrix_of=lambda j: j):
    want = np.full((32, 4), 0xFFFFFFFF, np.uint32)
    for t in range(32):
        lo, hi = table(t, trans)
        for j in range(num):
            m = mats[matrix_of(j)]
            want[t, j] = _pack(m[lo], m[hi])
    return want


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_ldmatrix_matches_isa_table(lib, num, trans, seed):
    mats, smem, addr = _ldmatrix_case(seed, num)
    got = _run_ldmatrix(lib, smem, addr, num, trans)
    np.testing.assert_array_equal(got, _ldmatrix_expected(mats, num, trans))
    assert not np.any((got[:, :num] & 0xFFFF) == DECOY) and not np.any((got[:, :num] >> 16) == DECOY)


@pytest.mark.parametrize("wrong", ["plain_for_trans", "trans_for_plain", "matrices_reversed"])
def test_ldmatrix_check_fails_on_a_wrong_table(lib, wrong):
    mats, smem, addr = _ldmatrix_case(5, 4)
    trans = wrong == "plain_for_trans"
    got = _run_ldmatrix(lib, smem, addr, 4, trans)
    if wrong == "matrices_reversed":
        want = _ldmatrix_expected(mats, 4, trans, matrix_of=lambda j: 3 - j)
    else:
        want = _ldmatrix_expected(mats, 4, trans, table=lambda t, _: isa_ldmatrix(t, not trans))
    assert not np.array_equal(got, want)


# ---- ex2.approx.ftz.f32 -------------------------------------------------------------------------
EX2_ULP = 2  # the ISA: "maximum ulp error is 2 ulp from correctly rounded result", full range
MIN_NORMAL = 2.0 ** -126


def _ex2_ok(x, y, ref=lambda x: np.exp2(np.float64(x))):
    """Whether y is an acceptable ex2.approx.ftz.f32(x): within EX2_ULP ulp of the correctly
    rounded ref(x); a subnormal result must be flushed to +0 (.ftz)."""
    if np.isnan(x):
        return bool(np.isnan(y))
    if x == -np.inf:
        return y == 0.0 and not np.signbit(y)
    if x == np.inf or x == 0.0:
        return y == (np.inf if x > 0 else 1.0)
    with np.errstate(over="ignore"):
        want = np.float32(ref(x))  # correctly rounded (inf past the f32 range)
    if np.isinf(want):
        return y == np.inf
    if np.signbit(y) or np.isnan(y):
        return False
    if 0.0 < y < MIN_NORMAL:  # a subnormal result: .ftz flushes it
        return False
    if want < MIN_NORMAL:  # subnormal (or zero) correctly rounded result: +0, or 2 ulp up
        return y == 0.0 or y - MIN_NORMAL <= EX2_ULP * 2.0 ** -149
    return abs(np.float64(y) - np.float64(want)) <= EX2_ULP * np.float64(np.spacing(want))


def _ex2_inputs():
    rng = np.random.default_rng(0)
    fixed = [-np.inf, np.inf, np.nan, 0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 10.0, -10.0, 126.0, 127.0,
             127.99, 128.0, -125.0, -126.0, -126.5, -140.0, -149.0, -150.0, -200.0, 1e-7, -1e-7]
    rand = rng.uniform(-130.0, 128.0, 2000)
    return np.array(fixed + list(rand), np.float32)


def _run_ex2(lib, x):
    y = np.full_like(x, np.nan)
    lib.ptx_ex2(_ptr(x), _ptr(y), x.size)
    return y


def test_ex2_approx_within_isa_error(lib):
    x = _ex2_inputs()
    y = _run_ex2(lib, x)
    bad = [(float(a), float(b)) for a, b in zip(x, y) if not _ex2_ok(a, b)]
    assert not bad, bad[:10]
    assert _run_ex2(lib, np.array([-np.inf], np.float32))[0] == 0.0
    # Integer exponents in range are powers of two (exact in any approximation within 2^-22).
    k = np.arange(-126, 128, dtype=np.float32)
    np.testing.assert_array_equal(_run_ex2(lib, k), np.exp2(k.astype(np.float64)).astype(np.float32))


def test_ex2_check_fails_on_a_wrong_table(lib):
    x = _ex2_inputs()
    y = _run_ex2(lib, x)
    assert not all(_ex2_ok(a, b, ref=lambda v: np.exp(np.float64(v))) for a, b in zip(x, y))
    # ...a result 3 ulp off, or an unflushed subnormal result, would be rejected.
    want = np.float32(2.0 ** 0.3)
    assert _ex2_ok(np.float32(0.3), np.float32(want + 2 * np.spacing(want)))
    assert not _ex2_ok(np.float32(0.3), np.float32(want + 3 * np.spacing(want)))
    assert not _ex2_ok(np.float32(-140.0), np.float32(2.0 ** -140))


# ---- rcp.approx.ftz.f32 -------------------------------------------------------------------------
def _ulp(x):
    return np.spacing(np.float32(abs(x)))


def _rcp_ok(x, y, ref=lambda x: 1.0 / np.float64(x)):
    """Whether y is an acceptable rcp.approx.ftz.f32(x): within 1 ulp, .ftz flushing."""
    if np.isnan(x):
        return bool(np.isnan(y))
    if abs(x) < 2.0 ** -126:  # +-0 and (flushed) subnormals: +-inf
        return np.isinf(y) and np.signbit(y) == np.signbit(x)
    if np.isinf(x):
        return y == 0 and np.signbit(y) == np.signbit(x)
    want = ref(x)
    if abs(want) < 2.0 ** -126:  # subnormal result: flushed to a sign-preserving 0 (or 1 ulp off)
        return abs(np.float64(y)) <= 2.0 ** -126 and np.signbit(y) == np.signbit(x)
    return abs(np.float64(y) - want) <= _ulp(np.float32(want))


def _rcp_inputs():
    rng = np.random.default_rng(2)
    fixed = [np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-40, -1e-40, 1.0, -1.0, 2.0, 3.0, 1.5, 2.0 ** 126,
             2.0 ** 127, 3e38, -3e38, 2.0 ** -126, 1e-30]
    rand = np.concatenate([rng.uniform(1.0, 2.0, 500), np.exp(rng.uniform(-80, 80, 1500)) *
                           rng.choice([-1, 1], 1500)])
    return np.array(fixed + list(rand), np.float32)


def _run_rcp(lib, x):
    y = np.full_like(x, np.nan)
    lib.ptx_rcp(_ptr(x), _ptr(y), x.size)
    return y


def test_rcp_approx_within_isa_error(lib):
    x = _rcp_inputs()
    y = _run_rcp(lib, x)
    bad = [(float(a), float(b)) for a, b in zip(x, y) if not _rcp_ok(a, b)]
    assert not bad, bad[:10]
    # Powers of two are exact; 1 / 2^127 is subnormal and .ftz flushes it to 0.
    p = np.float32([2.0 ** k for k in range(-126, 127)])
    np.testing.assert_array_equal(_run_rcp(lib, p), (1.0 / p.astype(np.float64)).astype(np.float32))
    assert _run_rcp(lib, np.float32([2.0 ** 127]))[0] == 0.0


def test_rcp_check_fails_on_a_wrong_table(lib):
    x = _rcp_inputs()
    y = _run_rcp(lib, x)
    assert not all(_rcp_ok(a, b, ref=lambda v: 1.0 / np.sqrt(abs(np.float64(v)))) for a, b in zip(x, y))
    assert not _rcp_ok(np.float32(3.0), np.float32(1 / 3) + 2 * _ulp(np.float32(1 / 3)))


def test_softcap_tanh_from_ex2_and_rcp(lib):
    """softcap.cuh's tanh, 1 - 2 * rcp(ex2(2 x log2 e) + 1), on these stand-ins: within a few
    2^-24 of tanh in absolute terms (what a capped logit needs), the limits +-1 exact."""
    x = np.concatenate([np.linspace(-12, 12, 4001), [-1e30, 1e30, 0.0, 1e-20]]).astype(np.float32)
    y2 = (x * np.float32(2.8853900817779268)).astype(np.float32)
    e = _run_ex2(lib, y2)
    t = (np.float32(1) - np.float32(2) * _run_rcp(lib, (e + np.float32(1)).astype(np.float32))).astype(np.float32)
    assert np.abs(t.astype(np.float64) - np.tanh(x.astype(np.float64))).max() < 2.0 ** -21
    assert t[-4] == -1.0 and t[-3] == 1.0 and abs(t[-2]) < 2.0 ** -22
