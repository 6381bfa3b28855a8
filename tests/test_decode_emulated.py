"""Run the CUDA decode code (launchers and kernels) on the CPU (no GPU needed).

tests/decode_emulate.cpp compiles csrc/cuda/decode.cu and decode_softcap.cu themselves (the
entry points decode_attention_cuda / append_kv_cuda / decode_num_splits_cuda, the launches of
decode_launch.cuh, the kernels of decode_kernels.cuh) with g++ into a shared library, with
host versions of cp.async (zero-fill, commit / wait_group), shuffles, barriers, the CUDA
runtime calls and the 16-bit types, and runs every thread of every block as a fiber, under
the memcheck / racecheck / initcheck analogues of tests/fiber_emulate.h (every shared-memory
access of the kernels is tracked). Here its outputs are compared with the float64 reference.
This exercises the launchers' checks, dispatch and grids, the kernels' real control flow,
warp roles for every group size, split-KV ranges, swizzled shared-memory indexing, double
buffering, barriers, masking, the in-block merge, the combine kernel and append_kv's
indexing. What it cannot exercise: the CUDA compiler, real asynchrony, the hardware's
fast-math rounding and speed.

FASTATTN_EMU_MODE_XOR=N (0..3) flips the cp.async landing order (bit 0) and the fiber
schedule (bit 1) of every case, so the whole module can be run under all four combinations.
"""
import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch

from fastattn import reference

from conftest import assert_error_ratio, emu_bank_report, emu_bank_rows
from conftest import emu_ptrs as _ptrs, emu_extent as _extent, emu_ptrs_sizes as _ptrs_sizes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    return _build(cxx, tmp_path_factory.mktemp("decode_emulate"), os.path.join(ROOT, "csrc", "cuda"))


@pytest.fixture(autouse=True)
def _decode_mma_back_on(request):
    """Tests that switch the tensor-core path off (emu_set_decode_mma(0)) get it back on after."""
    yield
    if "emu" in request.fixturenames:
        request.getfixturevalue("emu").emu_set_decode_mma(1)


def _build(cxx, folder, cuda_dir):
    """Compile tests/decode_emulate.cpp (which #includes decode.cu and decode_softcap.cu from
    cuda_dir) into folder/decode_emulate.so and load it. The .cu files include
    <cuda_runtime.h> / <cuda_runtime_api.h>: empty stubs here, fiber_emulate.h defines what
    the launchers use. -fno-gnu-unique: the emulator's inline globals (tests/fiber_emulate.h)
    stay this library's own, not shared with another emulator loaded into the same process
    (the other emulators' libraries, or a mutant build of this one)."""
    stubs = folder / "stubs"
    stubs.mkdir(exist_ok=True)
    for h in ("cuda_runtime.h", "cuda_runtime_api.h"):
        (stubs / h).write_text("// empty: tests/fiber_emulate.h stands in for the CUDA runtime\n")
    lib = folder / "decode_emulate.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-fno-strict-aliasing", "-Wall", "-Werror", "-Wno-unknown-pragmas",
                    "-Wno-maybe-uninitialized", "-fno-gnu-unique", "-shared", "-fPIC", "-I", str(stubs), "-I", cuda_dir,
                    "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "tests"),
                    os.path.join(ROOT, "tests", "decode_emulate.cpp"), "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.decode_emulate.restype = ctypes.c_int
    dll.decode_emulate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                                   ctypes.POINTER(ctypes.c_int64),
                                   ctypes.c_float, ctypes.c_int, ctypes.c_float]
    dll.decode_num_splits_for_slots.restype = ctypes.c_int64
    dll.decode_num_splits_for_slots.argtypes = [ctypes.c_int64] * 3
    dll.decode_num_splits_emulate.restype = ctypes.c_int64
    dll.decode_num_splits_emulate.argtypes = [ctypes.c_int64] * 6 + [ctypes.c_int, ctypes.c_int64, ctypes.c_float]
    dll.decode_launch_smem_emulate.restype = ctypes.c_int64
    dll.decode_launch_smem_emulate.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_float]
    dll.append_kv_emulate.restype = ctypes.c_int
    dll.append_kv_emulate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                                      ctypes.POINTER(ctypes.c_int64)]
    dll.emu_set_device.restype = None
    dll.emu_set_device.argtypes = [ctypes.c_int, ctypes.c_int]
    dll.decode_last_error.restype = ctypes.c_char_p
    dll.decode_launch_log.restype = ctypes.c_int
    dll.decode_launch_log.argtypes = [ctypes.c_char_p, ctypes.c_int]
    dll.emu_bank_report.restype = ctypes.c_int
    dll.emu_bank_report.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    dll.emu_set_device(SMEM_OPTIN, NUM_SMS)
    dll.emu_set_decode_mma.restype = None
    dll.emu_set_decode_mma.argtypes = [ctypes.c_int]
    return dll


# The emulated device: H100's opt-in shared memory per block and SM count.
SMEM_OPTIN, NUM_SMS = 227 * 1024, 132
SMEM_PER_SM = 228 * 1024  # an H100's / H200's shared memory per SM (cudaDevAttrMaxSharedMemoryPerMultiprocessor)
MODE_XOR = int(os.environ.get("FASTATTN_EMU_MODE_XOR", "0"))


def _launch_log(emu):
    """The last run's launches: one (kernel, grid, threads, smem) tuple each (grid "x" or "xXyXz")."""
    n = emu.decode_launch_log(None, 0)
    buf = ctypes.create_string_buffer(n)
    emu.decode_launch_log(buf, n)
    return [tuple(line.split(" ")) for line in buf.value.decode().splitlines()]


def _num_splits(emu, B, Sq, H, Hk, S, D, num_sms=NUM_SMS, smem_per_sm=SMEM_PER_SM, softcap=0.0):
    """num_splits = 0 resolved as the binding resolves it: decode_num_splits_cuda on the
    emulated device, for the kernel the launcher picks."""
    return emu.decode_num_splits_emulate(B, Sq, H, Hk, S, D, num_sms, smem_per_sm, softcap)


def _ints(*vals):
    return (ctypes.c_int64 * len(vals))(*vals)


def _emulated_decode(emu, q, kc, vc, seqlens, scale, num_splits, mode=0, block_table=None, seqlens_k_add=0,
                     window=(-1, -1), out_transposed=False, shrink=None, softcap=0.0):
    """Run decode_attention_cuda (decode_kernel + combine) under the emulator. q (B, H, D) ->
    out (B, H, D), lse (B, H); q (B, Sq, H, D) -> out (B, Sq, H, D), lse (B, H, Sq). kc/vc:
    contiguous caches (B, S_max, Hk, D) or, with block_table (B, max_pages) int32, page pools
    (num_pages, page_size, Hk, D). out_transposed: out is a (B, H, Sq, D) buffer seen as
    (B, Sq, H, D), so its row and head strides differ from q's. num_splits 0: the launcher's
    own choice (decode_num_splits_cuda on the emulated device), the partials sized for it as
    the binding sizes them."""
    squeeze = q.dim() == 3
    q4 = q.unsqueeze(1) if squeeze else q
    B, Sq, H, D = q4.shape
    Hk = kc.shape[2]
    if block_table is None:
        S, bt_stride, page, npages = kc.shape[1], 0, 0, 0
    else:
        page, npages = kc.shape[1], kc.shape[0]
        S, bt_stride = block_table.shape[1] * page, block_table.stride(0)
    if num_splits == 0:
        num_splits = _num_splits(emu, B, Sq, H, Hk, S, D, softcap=softcap)
    if shrink is None:  # (the memcheck test below expects the first faulting thread of mode 0)
        mode ^= MODE_XOR
    if out_transposed:
        out = torch.full((B, H, Sq, D), float("nan"), dtype=q.dtype).transpose(1, 2)
    else:
        out = torch.full((B, Sq, H, D), float("nan"), dtype=q.dtype)
    lse = torch.full((B, H, Sq), float("nan"))
    op = torch.full((num_splits, B, H, Sq, D), float("nan"))
    lp = torch.full((num_splits, B, H, Sq), float("nan"))
    wl, wr = window
    ptrs, sizes = _ptrs_sizes(q4, kc, vc, seqlens, out, lse, op, lp, block_table)
    if shrink is not None:  # (i, n): tell the emulator buffer i is n bytes shorter; return rc
        sizes[shrink[0]] -= shrink[1]
    rc = emu.decode_emulate(
        ptrs, sizes,
        _ints(*q4.stride()[:3], *kc.stride()[:3], *vc.stride()[:3], *out.stride()[:3],
              B, Sq, S, H, Hk, D, num_splits, int(q.dtype == torch.bfloat16), seqlens_k_add, wl, wr,
              bt_stride, page, npages),
        scale, mode, softcap)
    if shrink is not None:
        return rc
    assert rc == 0, emu.decode_last_error().decode()
    return (out[:, 0], lse[:, :, 0]) if squeeze else (out, lse)


def _check(q, kc, vc, seqlens, out, lse, scale):
    true_out, true_lse = reference.decode_attention(q.double(), kc.double(), vc.double(), seqlens,
                                                    softmax_scale=scale, return_lse=True)
    low_out = reference.decode_attention(q, kc, vc, seqlens, softmax_scale=scale)
    assert_error_ratio(out, low_out, true_out, "out")
    finite = seqlens.long() > 0
    assert torch.isneginf(lse[~finite]).all() and (out[~finite] == 0).all()
    torch.testing.assert_close(lse[finite].double(), true_lse[finite].double(), atol=2e-3, rtol=0)


# (dtype, D, H, Hk, lengths, S_max, num_splits, strided cache, mode)
CASES = [
    (torch.bfloat16, 128, 32, 8, [300, 1, 0, 257], 300, 1, False, 0),   # G = 4, ragged, tails
    (torch.float16, 64, 7, 1, [200, 129], 200, 3, True, 1),            # G = 7, splits, late cp.async
    (torch.bfloat16, 64, 24, 2, [260, 5], 260, 2, False, 2),           # G = 12: two head slices
    (torch.float16, 128, 40, 1, [140], 140, 1, True, 3),               # G = 40: two blocks per kv head
    (torch.bfloat16, 64, 2, 2, [1, 600], 600, 8, False, 1),            # MHA, more splits than tiles
    (torch.float16, 128, 17, 1, [33, 0], 64, 2, False, 0),             # G = 17: four head slices
    (torch.float16, 128, 4, 4, [513, 1000, 31], 1000, 5, True, 1),     # MHA, D 128, splits, late copies
    (torch.bfloat16, 128, 12, 1, [700], 700, 1, False, 3),             # G = 12, one split: 6 tiles
    (torch.float16, 64, 10, 2, [129, 128], 130, 1, False, 1),          # G = 5, a 1-key tail tile
    (torch.bfloat16, 128, 32, 1, [400, 2], 400, 4, False, 2),          # MQA, G = 32: full head slice
    (torch.bfloat16, 256, 8, 2, [130, 64], 130, 2, True, 1),           # D 256: 64-key tiles
    (torch.float16, 256, 20, 1, [70, 200], 200, 1, False, 2),          # D 256, G = 20: 16-head slices
    # D 96 (12 chunks a row: the 4 trailing chunks swizzled among themselves, 16 copy lanes per
    # row with 4 idle, P V on 24 lanes x 4 dims): ragged, tails, splits, strided, both dtypes.
    (torch.float16, 96, 32, 8, [300, 1, 0, 257], 300, 3, True, 1),     # G = 4, splits, late copies
    (torch.bfloat16, 96, 40, 1, [140, 33], 140, 1, False, 2),          # G = 40: two blocks per kv head
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}_D{c[1]}_H{c[2]}_Hk{c[3]}_s{c[6]}_m{c[8]}")
def test_emulated_decode_kernel_matches_reference(emu, case):
    """The CUDA-core decode_kernel on every case (decode_mma_kernel switched off: the same
    cases run on the tensor-core path in test_emulated_decode_cases_on_mma)."""
    emu.emu_set_decode_mma(0)
    try:
        _run_decode_case(emu, case)
        assert _launch_log(emu)[0][0].startswith("decode_kernel<")
    finally:
        emu.emu_set_decode_mma(1)


def _run_decode_case(emu, case):
    dtype, D, H, Hk, lengths, S, num_splits, strided, mode = case
    B = len(lengths)
    if strided:  # a view into a bigger cache: every stride but the last differs (multiples of 8)
        base = torch.randn(2, B, S + 2, Hk + 1, D + 8).to(dtype)
        kc, vc = base[0, :, 1:S + 1, :Hk, :D], base[1, :, 1:S + 1, :Hk, :D]
    else:
        kc = torch.randn(B, S, Hk, D).to(dtype)
        vc = torch.randn(B, S, Hk, D).to(dtype)
    # Cache rows past each length hold NaN: they must never reach the output.
    for b, n in enumerate(lengths):
        kc[b, n:] = float("nan")
        vc[b, n:] = float("nan")
    q = torch.randn(B, H, D).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    scale = 1.0 / math.sqrt(D)
    out, lse = _emulated_decode(emu, q, kc, vc, seqlens, scale, num_splits, mode)
    _check(q, kc.nan_to_num(0.0), vc.nan_to_num(0.0), seqlens, out, lse, scale)


@pytest.mark.parametrize("mma", [0, 1])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_emulated_decode_nan_propagates(emu, mma, num_splits):
    """A NaN in q, or in a key a row sees, makes that row NaN, out AND lse, as torch's attention
    (and fastattn's CPU kernels) do; before, the merges skipped it: 0 / -inf, or the other
    splits' finite result. Keys a row does not see (past its length) never reach it."""
    emu.emu_set_decode_mma(mma)
    torch.manual_seed(3)
    B, H, Hk, D, S = 2, 8, 2, 128, 200
    q = torch.randn(B, H, D).to(torch.bfloat16)
    kc = torch.randn(B, S, Hk, D).to(torch.bfloat16)
    vc = torch.randn(B, S, Hk, D).to(torch.bfloat16)
    seqlens = torch.tensor([200, 120], dtype=torch.int32)
    q[0, 1, 5] = float("nan")             # one query row
    kc[1, 50, 0, 3] = float("nan")        # a key that heads 0..3 of batch 1 see
    kc[1, 150:, 1] = float("nan")         # keys past batch 1's length: seen by nobody
    vc[1, 150:, 1] = float("nan")
    out, lse = _emulated_decode(emu, q, kc, vc, seqlens, D ** -0.5, num_splits)
    nan_rows = torch.zeros(B, H, dtype=torch.bool)
    nan_rows[0, 1] = True
    nan_rows[1, :4] = True
    assert torch.isnan(out[nan_rows].float()).all() and torch.isnan(lse[nan_rows]).all()
    clean = ~nan_rows
    assert torch.isfinite(out[clean].float()).all() and torch.isfinite(lse[clean]).all()
    ref_out, ref_lse = reference.decode_attention(q.double().nan_to_num(0.0), kc.double().nan_to_num(0.0),
                                                  vc.double().nan_to_num(0.0), seqlens, softmax_scale=D ** -0.5,
                                                  return_lse=True)
    torch.testing.assert_close(out[clean].double(), ref_out[clean], atol=2e-2, rtol=0)
    torch.testing.assert_close(lse[clean].double(), ref_lse[clean].double(), atol=2e-3, rtol=0)
    assert _launch_log(emu)[0][0].startswith("decode_mma_kernel<" if mma else "decode_kernel<")


# append_kv_cuda copies 16 bytes at a time when every base, stride and row is 16-byte
# aligned, else one element: (dtype, D, the kernel it must launch).
APPEND_PATHS = [(torch.bfloat16, 16, "append_kv_kernel<uint4>"), (torch.float16, 12, "append_kv_kernel<uint16_t>"),
                (torch.float32, 6, "append_kv_kernel<uint32_t>"), (torch.float32, 16, "append_kv_kernel<uint4>")]


def test_emulated_append_kv_kernel(emu):
    for dtype, D, kernel in APPEND_PATHS:
        B, S, Hk, Sn = 3, 20, 2, 4
        kc = torch.randn(B, S, Hk, D).to(dtype)
        vc = torch.randn(B, S, Hk, D).to(dtype)
        k = torch.randn(B, Sn, Hk, D).to(dtype)
        v = torch.randn(B, Sn, Hk, D).to(dtype)
        seqlens = torch.tensor([0, 7, 18], dtype=torch.int32)  # the last one runs past capacity
        kc_ref, vc_ref = kc.clone(), vc.clone()
        for b, start in enumerate(seqlens.tolist()):
            n = min(Sn, S - start)
            kc_ref[b, start:start + n] = k[b, :n]
            vc_ref[b, start:start + n] = v[b, :n]
        _append(emu, kc, vc, k, v, seqlens, None, S, kernel)
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), (dtype, D)


# ---- the launcher itself (decode_attention_cuda: checks, twin choice, grids, opt-in) -------

def _small_decode(dtype=torch.float16, D=64, B=2, H=8, Hk=2, S=200, lengths=(200, 77)):
    kc = torch.randn(B, S, Hk, D).to(dtype)
    vc = torch.randn(B, S, Hk, D).to(dtype)
    return torch.randn(B, H, D).to(dtype), kc, vc, torch.tensor(lengths, dtype=torch.int32)


@pytest.mark.parametrize("softcap", [0.0, 20.0])
def test_launcher_grids_and_twin_choice(emu, softcap):
    """decode_attention_cuda launches the (capped or uncapped) decode_kernel on the grid
    (splits, Hk x row slices, B) with 128 threads and more than the default 48 KiB of dynamic
    shared memory (its opt-in), then the combine over B x H x Sq rows of D threads; with one
    split, no combine. G = 40 needs two 32-row slices per kv head. An uncapped call takes the
    tensor-core decode_mma_kernel instead, on the grid (splits, Hk x head slices, B): G = 4 and
    2 one slice with one 16-row m-tile (kernel argument 1), G = 40 two slices of 20 heads with
    two m-tiles; the same combine. The capped calls stay on decode_kernel."""
    for splits, H, Hk in ((3, 8, 2), (1, 40, 1), (3, 4, 2)):
        q, kc, vc, seqlens = _small_decode(H=H, Hk=Hk)
        out, lse = _emulated_decode(emu, q, kc, vc, seqlens, 0.125, splits, softcap=softcap)
        log = _launch_log(emu)
        name = "decode_kernel<half,64,softcap>" if softcap else "decode_kernel<half,64>"
        slices = -(-(H // Hk) // 32)
        if not softcap:
            rows = -(-(H // Hk) // slices)
            name = f"decode_mma_kernel<half,64,{1 if rows <= 16 else 2}>"
        assert [e[:3] for e in log[:1]] == [(name, f"{splits}x{Hk * slices}x2", "128")]
        assert int(log[0][3]) > 48 * 1024
        if splits > 1:
            assert log[1:] == [("decode_combine_kernel<half,64>", str(2 * H), "64", "0")]
        else:
            assert len(log) == 1
        if not softcap:
            _check(q, kc, vc, seqlens, out, lse, 0.125)


def test_launcher_warps_per_head_dim(emu):
    """Block size per head dim (warps_for in decode_kernels.cuh): 4 warps at D = 64, where two
    blocks share an SM, 8 warps from D = 96 on (one block per SM by shared memory), and the
    dynamic shared memory the launcher asks for: the double-buffered K/V tiles, the fp32 query
    rows, one 8-head x 32-key probability buffer per warp and the per-row mask bounds. At
    D = 64 / 128 the tensor-core decode_mma_kernel runs instead (here G = 4; with it switched
    off, decode_kernel): 4 warps, each with its own 3-stage ring of 16-key K and V slabs, plus
    32 16-bit query rows."""
    for mma in (False, True):
        emu.emu_set_decode_mma(int(mma))
        for D, warps, block_n, rows in ((64, 4, 128, 32), (96, 8, 128, 32), (128, 8, 128, 32), (256, 8, 64, 16)):
            q, kc, vc, seqlens = _small_decode(D=D, H=8, Hk=2, S=150, lengths=(150, 40))
            out, lse = _emulated_decode(emu, q, kc, vc, seqlens, 0.1, 1)
            _check(q, kc, vc, seqlens, out, lse, 0.1)
            log = _launch_log(emu)
            if mma and D in (64, 128):
                smem = 4 * 3 * 2 * 16 * D * 2 + 32 * D * 2
                assert log == [(f"decode_mma_kernel<half,{D},1>", "1x2x2", "128", str(smem))], (D, log)
            else:
                smem = 2 * 2 * block_n * D * 2 + rows * D * 4 + warps * 8 * 32 * 4 + (2 * rows * 4 + 15) // 16 * 16
                assert log == [(f"decode_kernel<half,{D}>", "1x2x2", str(32 * warps), str(smem))], (D, log)
            assert smem <= 163 * 1024  # an A100's opt-in


def test_launcher_split_choice_and_refusals(emu):
    """num_splits = 0 resolved by decode_num_splits_cuda (one kv head on 132 SMs: the cache is
    cut into as many splits as keep >= 2 key tiles each), the partials sized for it; and the
    launcher's refusals: a split count outside [1, kMaxSplits], missing partials, a head
    dim the device cannot give its shared memory to (sm_86's 99 KiB opt-in at D = 128)."""
    emu.emu_set_decode_mma(0)  # the CUDA-core kernel (128-key tiles); restored by the fixture
    q, kc, vc, seqlens = _small_decode(dtype=torch.bfloat16, D=128, B=1, H=2, Hk=1, S=1000, lengths=(1000,))
    splits = _num_splits(emu, 1, 1, 2, 1, 1000, 128)
    assert splits == (1000 + 127) // 128 // 2
    out, lse = _emulated_decode(emu, q, kc, vc, seqlens, 0.1, 0)
    assert _launch_log(emu)[0][1] == str(splits)  # grid (splits, 1, 1), logged as "x" alone
    _check(q, kc, vc, seqlens, out, lse, 0.1)

    def rc_of(num_splits, partials=True):
        B, H, D = q.shape
        bufs = (torch.empty(B, 1, H, D, dtype=q.dtype), torch.empty(B, H),  # kept alive over the call
                torch.empty(max(num_splits, 1), B, H, D) if partials else None, torch.empty(max(num_splits, 1), B, H))
        ptrs, sizes = _ptrs_sizes(q, kc, vc, seqlens, *bufs, None)
        return emu.decode_emulate(ptrs, sizes, _ints(H * D, H * D, D, *kc.stride()[:3], *vc.stride()[:3], H * D,
                                                     H * D, D, B, 1, kc.shape[1], H, kc.shape[2], D, num_splits, 1, 0,
                                                     -1, -1, 0, 0, 0), 0.1, 0, 0.0)

    for bad in (0, 129):
        assert rc_of(bad) == 1 and "decode_attention_cuda returned cudaError_t 1" in emu.decode_last_error().decode()
        assert _launch_log(emu) == []
    assert rc_of(2, partials=False) == 1 and _launch_log(emu) == []
    emu.emu_set_device(99 * 1024, NUM_SMS)
    try:
        assert rc_of(1) == 1 and _launch_log(emu) == []
    finally:
        emu.emu_set_device(SMEM_OPTIN, NUM_SMS)
    assert rc_of(1) == 0 and len(_launch_log(emu)) == 1


def test_split_heuristic_fills_one_wave(emu):
    """decode_num_splits_cuda's rule (decode_split.h) on an H100 (132 SMs, one block per SM
    at D = 128): a grid that fills the GPU is not split; a small one is split to fill ONE
    wave without a straggler second wave; never below 2 key tiles per split."""
    f = emu.decode_num_splits_for_slots
    assert f(64 * 8, 132, 4096) == 1            # batch 64 x 8 kv heads: already 3.9 waves
    assert f(1 * 8, 132, 65536) == 16           # batch 1: 16 x 8 = 128 blocks <= 132
    assert f(1 * 1, 132, 131072) == 128         # MQA batch 1: capped at kMaxSplits
    assert f(1 * 8, 132, 1024) == 4             # short cache: >= 2 tiles of 128 keys per split
    assert f(1 * 8, 132, 100) == 1
    for blocks in (1, 3, 8, 17, 40, 100, 105, 106, 200):
        for s in (1, 300, 4096, 131072):
            n = f(blocks, 132, s)
            assert 1 <= n <= 128
            assert n == 1 or blocks * n <= 132


def test_split_heuristic_sizes_for_the_tensor_core_kernel(emu):
    """num_splits = 0 counts the blocks per SM of the kernel that will run: decode_mma_kernel
    fits 2 blocks per SM at d128 (4 / 3 at d64 with one / two m16 tiles) where shared memory
    allows, decode_kernel 1 (2 at d64). On the H200 the one-block rule left batch 64 x 4k MQA
    at 128 blocks for 264 slots (6% achieved occupancy, 52% of copy)."""
    assert _num_splits(emu, 64, 1, 32, 1, 4096, 128) == 4       # MQA, 64 blocks: 4 splits = 256 of 264 slots
    assert _num_splits(emu, 1, 1, 32, 8, 65536, 128) == 33      # 8 kv heads: 264 blocks
    assert _num_splits(emu, 64, 1, 32, 8, 4096, 128) == 1       # 512 blocks: no split
    assert _num_splits(emu, 1, 1, 32, 8, 65536, 64) == 66       # d64, G = 4, one m-tile: 4 per SM
    assert _num_splits(emu, 4, 1, 32, 1, 65536, 64) == 99       # d64, G = 32, two m-tiles: 3 per SM
    assert _num_splits(emu, 1, 1, 32, 8, 4096, 128) == 32       # >= 2 key blocks of 64 per split
    # An A100's 164 KiB per SM holds one d128 block (104 KiB + 1 KiB reserved).
    assert _num_splits(emu, 1, 1, 32, 8, 65536, 128, num_sms=108, smem_per_sm=164 * 1024) == 13
    # The CUDA-core kernel keeps its rule: soft-capping, several query rows, group < 4, or the
    # tensor-core path switched off.
    assert _num_splits(emu, 1, 1, 32, 8, 65536, 128, softcap=30.0) == 16
    assert _num_splits(emu, 1, 2, 32, 8, 65536, 128) == 16
    assert _num_splits(emu, 1, 1, 40, 1, 65536, 128) == 128    # G = 40: 2 head slices, 264 / 2 capped
    emu.emu_set_decode_mma(0)
    try:
        assert _num_splits(emu, 1, 1, 32, 8, 65536, 128) == 16
    finally:
        emu.emu_set_decode_mma(1)
    for B, H, Hk, D in ((1, 32, 8, 128), (3, 28, 4, 128), (64, 32, 1, 128), (2, 32, 2, 64), (5, 20, 1, 64)):
        n = _num_splits(emu, B, 1, H, Hk, 100000, D)
        per_sm = 2 if D == 128 else (4 if H // Hk <= 16 else 3)
        assert 1 <= n <= 128 and (n == 1 or B * Hk * n <= NUM_SMS * per_sm), (B, H, Hk, D, n)


# ---- paged caches and several query rows (attention_with_kvcache) -------------------------

def _to_pool(dense, page, extra, table=None, padded=False):
    """Scatter a dense cache (B, cap, Hk, D) (cap a multiple of page) into a pool of
    B * cap / page + extra pages, in shuffled order (or as `table` says); unused pages hold
    NaN, which must never reach an output. padded: the pool is a view of a bigger buffer, so
    its page, row and head strides differ from a compact pool's (K and V then differ)."""
    B, cap, Hk, D = dense.shape
    mp = cap // page
    n = B * mp + extra
    if table is None:
        table = torch.randperm(n)[:B * mp].view(B, mp).to(torch.int32)
    if padded:
        pool = torch.full((n, page + 1, Hk + 1, D + 8), float("nan"), dtype=dense.dtype)[:, :page, :Hk, :D]
    else:
        pool = torch.full((n, page, Hk, D), float("nan"), dtype=dense.dtype)
    pool[table.long()] = dense.view(B, mp, page, Hk, D)
    return pool, table


def _make_cache(B, cap, Hk, D, dtype, lengths, dead_before=None):
    """Dense K/V caches with NaN in rows no query may see: at and past each length, and
    before dead_before[b] (keys left of every row's window, which the kernel must skip)."""
    kc = torch.randn(B, cap, Hk, D).to(dtype)
    vc = torch.randn(B, cap, Hk, D).to(dtype)
    for b, n in enumerate(lengths):
        kc[b, n:] = float("nan")
        vc[b, n:] = float("nan")
        if dead_before is not None:
            kc[b, :dead_before[b]] = float("nan")
            vc[b, :dead_before[b]] = float("nan")
    return kc, vc


def _check_kvcache(q, kc, vc, key_lens, out, lse, scale, window, block_table=None):
    """Compare with reference.attention_with_kvcache at key lengths key_lens (B,), the
    caches' NaN rows zeroed for the reference (the kernel must never have read them)."""
    kc0, vc0 = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    true_out, true_lse = reference.attention_with_kvcache(
        q.double(), kc0.double(), vc0.double(), key_lens, block_table=block_table, causal=False, window=window,
        softmax_scale=scale, return_lse=True)
    low_out = reference.attention_with_kvcache(q, kc0, vc0, key_lens, block_table=block_table, causal=False,
                                               window=window, softmax_scale=scale)
    assert_error_ratio(out, low_out, true_out, "out")
    dead = torch.isneginf(true_lse)  # (B, H, Sq): rows that see no key
    assert torch.isneginf(lse[dead]).all()
    assert (out.permute(0, 2, 1, 3)[dead] == 0).all()
    torch.testing.assert_close(lse[~dead].double(), true_lse[~dead].double(), atol=2e-3, rtol=0)
    return dead


# (dtype, D, H, Hk, page_size, lengths, max_pages, num_splits, mode)
PAGED_CASES = [
    (torch.bfloat16, 64, 8, 2, 1, [37, 0, 40], 40, 1, 0),           # page 1: every row its own page
    (torch.float16, 128, 4, 1, 16, [32, 48, 5, 0], 4, 3, 1),        # MQA, lengths on page bounds, splits
    (torch.bfloat16, 64, 16, 2, 256, [256, 300, 1], 2, 2, 2),       # page 256 > tile, length at a bound
    (torch.float16, 256, 8, 1, 3, [9, 100, 0], 40, 2, 3),           # odd page size, D 256, MQA G = 8
    (torch.float16, 64, 4, 4, 16, [160, 17], 12, 4, 1),             # MHA, more splits, late copies
    (torch.bfloat16, 64, 40, 1, 7, [50], 8, 1, 0),                  # G = 40: two blocks per kv head
    (torch.bfloat16, 96, 8, 2, 3, [9, 200, 0], 70, 2, 3),           # D 96: odd pages, splits
]


@pytest.mark.parametrize("case", PAGED_CASES, ids=lambda c: f"{str(c[0])[6:]}_D{c[1]}_H{c[2]}_Hk{c[3]}_p{c[4]}_s{c[7]}_m{c[8]}")
def test_emulated_paged_decode_matches_reference(emu, case):
    dtype, D, H, Hk, page, lengths, mp, num_splits, mode = case
    B = len(lengths)
    kd, vd = _make_cache(B, mp * page, Hk, D, dtype, lengths)
    kp, table = _to_pool(kd, page, extra=3)
    vp, _ = _to_pool(vd, page, extra=3, table=table, padded=True)
    assert kp.stride() != vp.stride()
    q = torch.randn(B, H, D).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    scale = 1.0 / math.sqrt(D)
    out, lse = _emulated_decode(emu, q, kp, vp, seqlens, scale, num_splits, mode, block_table=table)
    true_out, true_lse = reference.decode_attention(q.double(), kp.nan_to_num(0.0).double(),
                                                    vp.nan_to_num(0.0).double(), seqlens, softmax_scale=scale,
                                                    return_lse=True, block_table=table)
    low_out = reference.decode_attention(q, kp.nan_to_num(0.0), vp.nan_to_num(0.0), seqlens, softmax_scale=scale,
                                         block_table=table)
    assert_error_ratio(out, low_out, true_out, "out")
    finite = seqlens.long() > 0
    assert torch.isneginf(lse[~finite]).all() and (out[~finite] == 0).all()
    torch.testing.assert_close(lse[finite].double(), true_lse[finite].double(), atol=2e-3, rtol=0)
    # The same cache, contiguous: the two layouts give the same numbers (same key order).
    out_c, lse_c = _emulated_decode(emu, q, kd, vd, seqlens, scale, num_splits, mode)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


# (dtype, D, H, Hk, Sq, seqlens_k_add, window, cache lengths, page (0: contiguous), cap, splits, mode)
MQ_CASES = [
    (torch.bfloat16, 64, 8, 2, 1, 0, (5, 0), [40, 3, 0], 0, 48, 2, 0),       # windowed decode: kbeg only
    (torch.float16, 64, 8, 2, 3, 3, (-1, 0), [10, 0, 130], 16, 144, 2, 1),   # causal chunk, paged
    (torch.bfloat16, 64, 4, 1, 16, 16, (-1, 0), [100, 0], 0, 128, 3, 2),     # Sq 16, G 4: 64 rows, 2 slices
    (torch.float16, 128, 2, 2, 16, 16, (5, 0), [200, 3], 16, 224, 2, 1),     # sliding window, paged, D 128
    (torch.bfloat16, 64, 12, 1, 3, 0, (-1, -1), [50, 2, 0], 0, 64, 1, 3),    # no mask, G 12 x 3 = 36 rows
    (torch.float16, 64, 4, 2, 3, 0, (-1, 0), [2, 1, 0, 5], 3, 6, 1, 0),      # rows before key 0 see nothing
    (torch.bfloat16, 64, 4, 2, 5, 0, (0, 0), [3, 7], 0, 8, 2, 1),           # only its own key; some none
    (torch.float16, 64, 6, 3, 5, 0, (4, 2), [30, 6], 7, 35, 3, 2),           # window with a right side
    (torch.bfloat16, 256, 16, 2, 16, 16, (5, 0), [40], 0, 64, 2, 3),         # D 256: 8 rows x 16 = 8 slices
    (torch.float16, 96, 8, 2, 5, 5, (-1, 0), [150, 3], 16, 160, 2, 1),       # D 96: causal chunk, paged
    (torch.float16, 64, 8, 1, 16, 16, (-1, 0), [300], 16, 320, 5, 1),        # G 8 x 16: 4 slices, 5 splits
    # Edge steps: a 32-key step is unmasked only if inside every row's range. Left-only window
    # (no right bound): step [0, 32) is inside row 0's range but not row 15's.
    (torch.float16, 64, 4, 2, 16, 16, (20, -1), [200], 0, 224, 1, 0),
    # Causal, key length 140: step [96, 128) ends inside row 15's range but past row 0's.
    (torch.bfloat16, 64, 4, 1, 16, 0, (-1, 0), [140], 0, 160, 1, 2),
    # Window sides at the int64 limit: no overflow, nothing masked (len 1 < Sq: pos_0 < 0).
    (torch.float16, 64, 4, 2, 3, 0, (2 ** 63 - 1, 2 ** 63 - 1), [20, 1], 0, 32, 2, 0),
]


@pytest.mark.parametrize("case", MQ_CASES,
                         ids=lambda c: f"{str(c[0])[6:]}_D{c[1]}_H{c[2]}_Hk{c[3]}_Sq{c[4]}_add{c[5]}_w{c[6][0]}_{c[6][1]}_p{c[8]}_s{c[10]}")
def test_emulated_kvcache_attention_matches_reference(emu, case):
    dtype, D, H, Hk, Sq, add, window, lengths, page, cap, num_splits, mode = case
    B = len(lengths)
    key_lens = [n + add for n in lengths]
    # Keys left of every row's window (kbeg = key_len - Sq - window_left) are NaN: skipped.
    dead = [max(n - Sq - window[0], 0) if window[0] >= 0 else 0 for n in key_lens]
    kc, vc = _make_cache(B, cap, Hk, D, dtype, key_lens, dead)
    table = None
    if page:
        kc, table = _to_pool(kc, page, extra=2, padded=True)
        vc, _ = _to_pool(vc, page, extra=2, table=table)
    # q as a (B, H, Sq, D) buffer seen as (B, Sq, H, D): row stride D, head stride Sq * D.
    q = torch.randn(B, H, Sq, D).to(dtype).transpose(1, 2)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    scale = 1.0 / math.sqrt(D)
    out, lse = _emulated_decode(emu, q, kc, vc, seqlens, scale, num_splits, mode, block_table=table,
                                seqlens_k_add=add, window=window, out_transposed=Sq > 1)
    dead_rows = _check_kvcache(q, kc, vc, torch.tensor(key_lens), out, lse, scale, window, table)
    # The cases mean to cover rows without any key where they say so (and not elsewhere).
    if window in ((-1, 0), (0, 0)) and add == 0 and min(lengths) < Sq:
        assert dead_rows.any()


def test_emulated_kvcache_split_invariance(emu):
    """Causal multi-query rows give the same result for 1 and several splits (the splits cut
    [kbeg, len) and the combine merges exactly, up to fp32 rounding)."""
    dtype, D, H, Hk, Sq = torch.float16, 64, 4, 2, 8
    lengths = [150, 9]
    key_lens = [n + Sq for n in lengths]
    kc, vc = _make_cache(2, 160, Hk, D, dtype, key_lens, [max(n - Sq - 20, 0) for n in key_lens])
    q = torch.randn(2, Sq, H, D).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    o1, l1 = _emulated_decode(emu, q, kc, vc, seqlens, 0.125, 1, 0, seqlens_k_add=Sq, window=(20, 0))
    o4, l4 = _emulated_decode(emu, q, kc, vc, seqlens, 0.125, 4, 1, seqlens_k_add=Sq, window=(20, 0))
    torch.testing.assert_close(o4.float(), o1.float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(l4, l1, atol=1e-5, rtol=0)


def _append(emu, kc, vc, k, v, seqlens, table, cap, kernel):
    """append_kv_cuda under the emulator; it must launch `kernel` (its path choice), once."""
    B, Sn, Hk, D = k.shape
    if table is None:
        bt_stride, page, npages = 0, 0, 0
    else:
        bt_stride, page, npages = table.stride(0), kc.shape[1], kc.shape[0]
    rc = emu.append_kv_emulate(*_ptrs_sizes(kc, vc, k, v, seqlens, table),
                               _ints(*kc.stride()[:3], *vc.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                     B, Sn, cap, Hk, D, k.element_size(), bt_stride, page, npages))
    assert rc == 0, emu.decode_last_error().decode()
    assert [entry[0] for entry in _launch_log(emu)] == [kernel]


@pytest.mark.parametrize("page", [1, 3, 16])
def test_emulated_paged_append_kv_kernel(emu, page):
    for dtype, D, kernel in APPEND_PATHS[:3]:
        B, Hk, Sn, mp = 4, 2, 5, 48 // page
        cap = mp * page
        kp, table = _to_pool(torch.randn(B, cap, Hk, D).to(dtype), page, extra=3)
        vp, _ = _to_pool(torch.randn(B, cap, Hk, D).to(dtype), page, extra=3, table=table, padded=True)
        # Unused pages: finite markers that must stay untouched (NaN would not compare equal).
        kp.nan_to_num_(-7.0)
        vp.nan_to_num_(7.0)
        k = torch.randn(B, Sn, Hk, D).to(dtype)
        v = torch.randn(B, Sn, Hk, D).to(dtype)
        # Rows crossing page boundaries; the last sequence runs past capacity (dropped rows).
        starts = [0, 14, 30, cap - 2]
        seqlens = torch.tensor(starts, dtype=torch.int32)
        k_ref, v_ref = kp.clone(), vp.clone()
        for b, start in enumerate(starts):
            n = min(Sn, cap - start)
            reference.append_kv(k_ref, v_ref, k[b:b + 1, :n], v[b:b + 1, :n], seqlens[b:b + 1], table[b:b + 1])
        _append(emu, kp, vp, k, v, seqlens, table, cap, kernel)
        assert torch.equal(kp, k_ref) and torch.equal(vp, v_ref), (dtype, D, page)


def test_emulated_bad_page_indices_stay_in_the_pool(emu):
    """block_table entries outside [0, num_pages) are clamped by KvLayout: decode reads and
    append writes stay inside the pool. The pool is a slice of a larger buffer whose pages
    around it hold NaN (decode) or sentinels (append)."""
    dtype, D, H, Hk, page, mp, B = torch.float16, 64, 4, 2, 4, 6, 2
    n = B * mp + 4
    kbig = torch.full((n + 4, page, Hk, D), float("nan"), dtype=dtype)
    vbig = torch.full((n + 4, page, Hk, D), float("nan"), dtype=dtype)
    kp, vp = kbig[2:-2], vbig[2:-2]
    kp.copy_(torch.randn(n, page, Hk, D))
    vp.copy_(torch.randn(n, page, Hk, D))
    table = (torch.randperm(n - 2)[:B * mp] + 1).view(B, mp).to(torch.int32)  # pages 0, n-1 unused
    # Just outside the pool on both sides, within the two guard pages of the buffer, so that
    # an unclamped access shows up as NaN / a changed sentinel rather than a crash.
    table[0, 1] = -2          # clamps to page 0
    table[1, 0] = n + 1       # clamps to page n - 1
    table[1, 3] = n           # one past the end: also page n - 1
    clamped = table.clamp(0, n - 1)
    lengths = [mp * page, 15]
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(B, H, D).to(dtype)
    out, lse = _emulated_decode(emu, q, kp, vp, seqlens, 0.125, 2, 1, block_table=table)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    true_out = reference.decode_attention(q.double(), kp.double(), vp.double(), seqlens, softmax_scale=0.125,
                                          block_table=clamped)
    low_out = reference.decode_attention(q, kp, vp, seqlens, softmax_scale=0.125, block_table=clamped)
    assert_error_ratio(out, low_out, true_out, "out")

    # append: sentinels around the pool; writes through bad entries land on the clamped pages.
    kbig.fill_(3.0)
    vbig.fill_(-3.0)
    kp.copy_(torch.randn(n, page, Hk, D))
    vp.copy_(torch.randn(n, page, Hk, D))
    k = torch.randn(B, 6, Hk, D).to(dtype)
    v = torch.randn(B, 6, Hk, D).to(dtype)
    starts = torch.tensor([2, 0], dtype=torch.int32)  # seq 0 rows 2..7 (pages 0, 1), seq 1 rows 0..5
    k_ref, v_ref = kp.clone(), vp.clone()
    reference.append_kv(k_ref, v_ref, k, v, starts, clamped)
    _append(emu, kp, vp, k, v, starts, table, mp * page, "append_kv_kernel<uint4>")
    assert torch.equal(kp, k_ref) and torch.equal(vp, v_ref)
    assert (kbig[:2] == 3.0).all() and (kbig[-2:] == 3.0).all()
    assert (vbig[:2] == -3.0).all() and (vbig[-2:] == -3.0).all()


@pytest.mark.parametrize("which,shrink,expected,H", [
    # the last key row's last 16-byte chunk (cp.async source, bounds-checked byte-exactly)
    (1, 2, "memcheck: decode_kernel<half,64>: out-of-bounds read (cp.async source, 16 bytes) at byte offset 16368 "
           "of buffer k_cache (16382 bytes)", 2),
    # a raw store of the output past its shortened end (guard page, SIGSEGV reported)
    (4, 64, "memcheck: decode_kernel<half,64>: out-of-bounds write at byte offset 448 of buffer out (448 bytes)", 2),
    # the same two in the tensor-core kernel (G = 4)
    (1, 2, "memcheck: decode_mma_kernel<half,64,1>: out-of-bounds read (cp.async source, 16 bytes) at byte offset "
           "16368 of buffer k_cache (16382 bytes)", 4),
    # (its first faulting store depends on the fiber schedule: any offset past the end)
    (4, 64, ("memcheck: decode_mma_kernel<half,64,1>: out-of-bounds write at byte offset ", " of buffer out (960 bytes)"),
     4),
])
def test_memcheck_reports_out_of_bounds_in_the_real_kernel(emu, capfd, monkeypatch, which, shrink, expected, H):
    """The sanitizer wiring: told that a buffer is shorter than the kernel's extent, the emulator
    must report the first access past it (kernel, buffer, offset) and return 1."""
    monkeypatch.setenv("FASTATTN_EMU_GUARD", "end")
    emu.emu_set_decode_mma(int("decode_mma_kernel" in str(expected)))  # G = 2 would take it too
    q = torch.randn(2, H, 64).to(torch.float16)
    kc = torch.randn(2, 64, 1, 64).to(torch.float16)
    vc = torch.randn(2, 64, 1, 64).to(torch.float16)
    seqlens = torch.tensor([64, 64], dtype=torch.int32)
    rc = _emulated_decode(emu, q, kc, vc, seqlens, 0.125, 1, shrink=(which, shrink))
    assert rc == 1
    err = capfd.readouterr().err
    for part in (expected if isinstance(expected, tuple) else (expected,)):
        assert part in err, err


# The barrier between the end-of-block merge's stores (each warp's partial output, max and sum)
# and the merge's reads of the other warps' partials.
MERGE_BARRIER = """        sts<float>(sL + warp * kHeadsPerWarp + i, l[i]);
      }
    }
  }
  __syncthreads();
"""


def _emulator_without_barrier(tmp_path, kernel_file, snippet):
    """The emulator built from a copy of csrc/cuda in which `snippet` (a unique piece of
    kernel_file ending in its __syncthreads) has lost that barrier."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    src = os.path.join(ROOT, "csrc", "cuda")
    mutant = tmp_path / "cuda"
    mutant.mkdir()
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), mutant / f)
    text = (mutant / kernel_file).read_text()
    assert text.count(snippet) == 1, f"{kernel_file} changed: update the snippet"
    (mutant / kernel_file).write_text(text.replace(snippet, snippet.replace("  __syncthreads();\n", "")))
    return _build(cxx, tmp_path, str(mutant))


def test_racecheck_catches_a_removed_merge_barrier(tmp_path):
    """A planted bug the numbers alone may miss: without the __syncthreads between the merge's
    shared-memory stores and its reads of other warps' partials, a warp can read another's
    stale bytes. The tracked accessors (lds / sts) must make racecheck report it, naming the
    kernel; the decode cases run clean with the barrier in place (every test above)."""
    emu = _emulator_without_barrier(tmp_path, "decode_kernels.cuh", MERGE_BARRIER)
    # G = 2: one head slice, four warps share it (decode_mma_kernel switched off: it would take it)
    emu.emu_set_decode_mma(0)
    q, kc, vc, seqlens = _small_decode(H=4, Hk=2)
    out, lse = torch.empty(2, 1, 4, 64, dtype=q.dtype), torch.empty(2, 4)  # alive over the calls
    ptrs, sizes = _ptrs_sizes(q.unsqueeze(1), kc, vc, seqlens, out, lse, None, None, None)
    ints = _ints(4 * 64, 4 * 64, 64, *kc.stride()[:3], *vc.stride()[:3], 4 * 64, 4 * 64, 64,
                 2, 1, 200, 4, 2, 64, 1, 0, 0, -1, -1, 0, 0, 0)
    for mode in range(4):  # both cp.async landing orders, both fiber schedules
        rc = emu.decode_emulate(ptrs, sizes, ints, 0.125, mode, 0.0)
        err = emu.decode_last_error().decode()
        assert rc == 1 and err.startswith("racecheck: decode_kernel<half,64>: "), (mode, err)
        assert "hazard" in err and "with no __syncthreads between them" in err, err


def _bank_table(emu, tmp_path, label):
    """The shared-memory bank-conflict totals gathered by the emulator (a report, not a check)."""
    n = emu.emu_bank_report(None, 0, 0)
    buf = ctypes.create_string_buffer(n)
    emu.emu_bank_report(buf, n, 0)
    return emu_bank_report(emu_bank_rows(buf.value.decode()), label, tmp_path)


def test_bank_conflict_report(emu, tmp_path):
    """Prints (and writes to JSON under the pytest tmp dir) the bank-conflict totals of every
    kernel this module ran, over all its shared-memory accesses (cp.async destinations, and the
    lds / sts loads and stores). Run alone, it first runs one decode case of each head dim so
    that there is something to report. (Known: at D = 256 the end-of-block merge stores two
    16-byte vectors per lane 32 bytes apart, a 2-way conflict on one store per head per block.)"""
    for D in (64, 96, 128, 256):
        q = torch.randn(2, 4, D).to(torch.float16)
        kc = torch.randn(2, 130, 2, D).to(torch.float16)
        vc = torch.randn(2, 130, 2, D).to(torch.float16)
        _emulated_decode(emu, q, kc, vc, torch.tensor([130, 70], dtype=torch.int32), 0.1, 2)
    rows = _bank_table(emu, tmp_path, "decode")
    assert any(r["kernel"].startswith("decode_kernel<") and r["instructions"] > 0 for r in rows)


# ---- logit soft-capping (DecodeParams::softcap: the kSoftcap twin of decode_kernel) ---------
# (dtype, D, H, Hk, Sq, window, cache lengths, page (0: contiguous), cap, splits, scale, softcap, mode)
SOFTCAP_CASES = [
    (torch.bfloat16, 128, 8, 2, 1, (-1, -1), [300, 1, 0], 0, 300, 2, None, 2.0, 0),     # decode, G 4, splits
    (torch.float16, 64, 7, 1, 1, (-1, -1), [200, 129], 16, 208, 1, 1.0, 30.0, 3),       # paged, raw scores ~ +-8
    (torch.float16, 256, 8, 2, 1, (-1, -1), [130, 64], 0, 130, 2, None, 1.0, 1),        # D 256
    (torch.bfloat16, 64, 4, 1, 16, (-1, 0), [100, 0], 7, 126, 3, 0.5, 5.0, 2),          # multi-query causal, paged
    (torch.float16, 128, 2, 2, 5, (4, 2), [30, 6], 0, 40, 1, None, 1.5, 1),             # window both sides
    (torch.bfloat16, 256, 16, 2, 4, (-1, 0), [40], 5, 50, 2, None, 3.0, 3),             # D 256 multi-query, paged
    (torch.bfloat16, 96, 8, 2, 1, (-1, -1), [200, 7], 0, 200, 3, None, 2.0, 1),         # D 96 decode, splits
    (torch.float16, 96, 4, 1, 6, (-1, 0), [60], 9, 63, 1, None, 1.5, 2),                # D 96 multi-query, paged
]


@pytest.mark.parametrize("case", SOFTCAP_CASES,
                         ids=lambda c: f"{str(c[0])[6:]}_D{c[1]}_H{c[2]}_Hk{c[3]}_Sq{c[4]}_w{c[5][0]}_{c[5][1]}_p{c[7]}_cap{c[11]}")
def test_emulated_decode_softcap_matches_reference(emu, case):
    """Soft-capped decode and multi-query (chunked prefill) attention, contiguous and paged,
    against reference.attention_with_kvcache(softcap=...) by the error-ratio rule, with
    the cap's tanh built from ex2 / rcp as softcap.cuh does; the cap must change the answer here."""
    dtype, D, H, Hk, Sq, window, lengths, page, cap, num_splits, scale, softcap, mode = case
    B = len(lengths)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dead = [max(n - Sq - window[0], 0) if window[0] >= 0 else 0 for n in lengths]
    kc, vc = _make_cache(B, cap, Hk, D, dtype, lengths, dead)
    table = None
    if page:
        kc, table = _to_pool(kc, page, extra=2, padded=True)
        vc, _ = _to_pool(vc, page, extra=2, table=table)
    q = torch.randn(B, Sq, H, D).to(dtype)
    key_lens = torch.tensor(lengths, dtype=torch.int32)
    out, lse = _emulated_decode(emu, q, kc, vc, key_lens, scale, num_splits, mode, block_table=table,
                                window=window, softcap=softcap)
    kc0, vc0 = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    kw = dict(block_table=table, causal=False, window=window, softmax_scale=scale, softcap=softcap)
    true_out, true_lse = reference.attention_with_kvcache(q.double(), kc0.double(), vc0.double(), key_lens,
                                                          return_lse=True, **kw)
    low_out = reference.attention_with_kvcache(q, kc0, vc0, key_lens, **kw)
    assert_error_ratio(out, low_out, true_out, "out")
    dead_rows = torch.isneginf(true_lse)
    assert torch.isneginf(lse[dead_rows]).all()
    assert (out.permute(0, 2, 1, 3)[dead_rows] == 0).all()
    torch.testing.assert_close(lse[~dead_rows].double(), true_lse[~dead_rows].double(), atol=2e-3, rtol=0)
    uncapped = reference.attention_with_kvcache(q.double(), kc0.double(), vc0.double(), key_lens,
                                                **dict(kw, softcap=0.0))
    assert (uncapped - true_out).abs().max() > 1e-2, "the cap must change the result here"
    if Sq == 1:  # decode_attention's own reference (one query token) agrees too
        ref1 = reference.decode_attention(q[:, 0].double(), kc0.double(), vc0.double(), key_lens,
                                          softmax_scale=scale, block_table=table, softcap=softcap)
        torch.testing.assert_close(ref1, true_out[:, 0])


# ---- tensor-core decode (decode_mma.cuh): seqlen_q = 1, any group, uncapped, D 64 / 128 -------
# (dtype, D, H, Hk, lengths, cap, page (0: contiguous; -1: strided contiguous view), num_splits
#  (0: the launcher's choice), window_left, mode)
MMA_CASES = [
    (torch.bfloat16, 128, 32, 8, [300, 1, 0, 257], 300, 0, 1, -1, 0),    # G = 4, ragged, empty row, tails
    (torch.float16, 128, 16, 2, [97, 1025], 1040, 16, 3, -1, 1),          # G = 8, paged 16, splits, late copies
    (torch.bfloat16, 64, 32, 1, [513, 17], 520, -1, 1, -1, 2),            # MQA G = 32: two m-tiles, strided
    (torch.float16, 64, 32, 1, [37, 0, 40], 40, 1, 2, -1, 3),             # G = 32, page 1, splits
    (torch.bfloat16, 128, 40, 2, [65, 130], 130, 0, 4, -1, 1),            # G = 20: padded second m-tile
    (torch.float16, 64, 8, 2, [300, 20], 300, 0, 2, 50, 0),               # G = 4, left window 50, splits
    (torch.bfloat16, 128, 8, 1, [200, 33, 16], 208, 16, 1, -1, 3),        # MQA G = 8, paged, lengths on pages
    (torch.float16, 128, 32, 1, [1025], 1025, 0, 0, -1, 2),               # G = 32 D 128, auto splits
    (torch.bfloat16, 64, 12, 3, [17, 97, 1], 97, 7, 3, 9, 1),             # G = 4, odd pages, window, splits
    (torch.float16, 128, 6, 6, [300, 0, 129], 300, 0, 3, -1, 2),          # MHA G = 1: 15 padding rows
    (torch.bfloat16, 64, 4, 2, [77, 500], 512, 16, 0, 40, 1),             # G = 2, paged, window, auto splits
    (torch.float16, 128, 9, 3, [1, 260], 260, -1, 2, -1, 3),              # G = 3, strided, splits
    (torch.bfloat16, 128, 48, 1, [300, 0], 300, 16, 3, -1, 0),            # MQA G = 48: 2 slices of 24
    (torch.float16, 64, 71, 1, [129, 64], 130, 7, 0, 30, 1),              # G = 71 (Falcon): 3 slices, 24 / 24 / 23
    (torch.bfloat16, 64, 66, 2, [77, 200], 200, -1, 2, -1, 2),            # G = 33 twice: slices of 17 and 16
]


@pytest.mark.parametrize("case", MMA_CASES,
                         ids=lambda c: f"{str(c[0])[6:]}_D{c[1]}_H{c[2]}_Hk{c[3]}_p{c[6]}_s{c[7]}_w{c[8]}_m{c[9]}")
def test_emulated_decode_mma_matches_reference(emu, case):
    """decode_attention_cuda routes one-token uncapped decode with a group of 1..32 heads at
    D 64 / 128 to decode_mma_kernel (one m16 tile of heads for G <= 16, two for G <= 32), and
    its output and lse match the reference by the error-ratio rule: contiguous (also a strided
    view), paged (page sizes 1, 7, 16), split (same partials + combine) and not, left windows,
    ragged lengths with an empty sequence, odd lengths; NaN rows outside the window / past the
    length must never reach the output."""
    dtype, D, H, Hk, lengths, cap, page, num_splits, wl, mode = case
    B = len(lengths)
    dead = [max(n - 1 - wl, 0) if wl >= 0 else 0 for n in lengths]
    if page > 0:
        cap = -(-cap // page) * page
    kc, vc = _make_cache(B, cap, Hk, D, dtype, lengths, dead)
    table = None
    if page > 0:
        kc, table = _to_pool(kc, page, extra=3)
        vc, _ = _to_pool(vc, page, extra=3, table=table, padded=True)
    elif page < 0:  # a view into a bigger cache: every stride but the last differs
        base = torch.full((2, B, cap + 2, Hk + 1, D + 8), float("nan"), dtype=dtype)
        base[0, :, 1:cap + 1, :Hk, :D] = kc
        base[1, :, 1:cap + 1, :Hk, :D] = vc
        kc, vc = base[0, :, 1:cap + 1, :Hk, :D], base[1, :, 1:cap + 1, :Hk, :D]
    q = torch.randn(B, H, D).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    scale = 1.0 / math.sqrt(D)
    out, lse = _emulated_decode(emu, q, kc, vc, seqlens, scale, num_splits, mode, block_table=table, window=(wl, -1))
    log = _launch_log(emu)
    splits = num_splits or _num_splits(emu, B, 1, H, Hk, cap if table is None else table.shape[1] * page, D)
    tname = "half" if dtype == torch.float16 else "bf16"
    slices = -(-(H // Hk) // 32)
    mtiles = 1 if -(-(H // Hk) // slices) <= 16 else 2
    grid = "x".join(str(v) for v in (splits, Hk * slices, B)) if (Hk * slices, B) != (1, 1) else str(splits)
    assert log[0][:3] == (f"decode_mma_kernel<{tname},{D},{mtiles}>", grid, "128"), log
    assert len(log) == (2 if splits > 1 else 1)
    dead_rows = _check_kvcache(q.unsqueeze(1), kc, vc, seqlens, out.unsqueeze(1), lse.unsqueeze(2), scale, (wl, -1),
                               table)
    assert dead_rows.sum() == H * lengths.count(0)


def test_emulated_decode_mma_split_invariance(emu):
    """1, 3 and 7 splits of the tensor-core path agree up to fp32 rounding (the key cuts move,
    the exact combine merges them)."""
    q, kc, vc, seqlens = _small_decode(dtype=torch.bfloat16, D=128, B=2, H=16, Hk=2, S=700, lengths=(700, 129))
    o1, l1 = _emulated_decode(emu, q, kc, vc, seqlens, 0.09, 1, 0)
    assert _launch_log(emu)[0][0] == "decode_mma_kernel<bf16,128,1>"
    for splits, mode in ((3, 1), (7, 2)):
        o, lse = _emulated_decode(emu, q, kc, vc, seqlens, 0.09, splits, mode)
        torch.testing.assert_close(o.float(), o1.float(), atol=1e-2, rtol=0)
        torch.testing.assert_close(lse, l1, atol=1e-5, rtol=0)


def test_emulated_decode_mma_routing(emu):
    """What stays on decode_kernel: soft-capping, several query tokens, head dims 96 / 256;
    every group at D 64 / 128 takes decode_mma_kernel (above 32 in slices of <= 32 heads)."""
    def first_kernel(H, Hk, D, softcap=0.0, Sq=1):
        q = torch.randn(1, Sq, H, D).to(torch.float16)
        kc = torch.randn(1, 40, Hk, D).to(torch.float16)
        vc = torch.randn(1, 40, Hk, D).to(torch.float16)
        _emulated_decode(emu, q, kc, vc, torch.tensor([40], dtype=torch.int32), 0.1, 1, softcap=softcap)
        return _launch_log(emu)[0][0]

    assert first_kernel(4, 1, 64) == "decode_mma_kernel<half,64,1>"
    assert first_kernel(32, 1, 128) == "decode_mma_kernel<half,128,2>"
    assert first_kernel(17, 1, 64) == "decode_mma_kernel<half,64,2>"
    assert first_kernel(3, 1, 64) == "decode_mma_kernel<half,64,1>"
    assert first_kernel(2, 2, 128) == "decode_mma_kernel<half,128,1>"
    assert first_kernel(33, 1, 64) == "decode_mma_kernel<half,64,2>"   # 2 slices of 17 and 16
    assert first_kernel(96, 2, 128) == "decode_mma_kernel<half,128,2>"  # G = 48: 2 slices of 24
    assert first_kernel(8, 2, 64, softcap=5.0) == "decode_kernel<half,64,softcap>"
    assert first_kernel(8, 2, 64, Sq=2) == "decode_kernel<half,64>"
    assert first_kernel(8, 2, 96) == "decode_kernel<half,96>"
    assert first_kernel(8, 2, 256) == "decode_kernel<half,256>"


# The barrier between decode_mma_kernel's merge stores (each warp's O rows, max, sum) and the
# reads of all warps' partials.
MMA_MERGE_BARRIER = """        sts<float>(sL + warp * 32 + row, l);
      }
    }
  }
  __syncthreads();
"""


def test_racecheck_catches_a_removed_mma_merge_barrier(tmp_path):
    """The tensor-core kernel's merge under racecheck: without its __syncthreads, the reads of
    other warps' partials are a read-after-write hazard, reported under the kernel's name."""
    emu = _emulator_without_barrier(tmp_path, "decode_mma.cuh", MMA_MERGE_BARRIER)
    q, kc, vc, seqlens = _small_decode(H=8, Hk=2)  # G = 4
    out, lse = torch.empty(2, 1, 8, 64, dtype=q.dtype), torch.empty(2, 8)
    ptrs, sizes = _ptrs_sizes(q.unsqueeze(1), kc, vc, seqlens, out, lse, None, None, None)
    ints = _ints(8 * 64, 8 * 64, 64, *kc.stride()[:3], *vc.stride()[:3], 8 * 64, 8 * 64, 64,
                 2, 1, 200, 8, 2, 64, 1, 0, 0, -1, -1, 0, 0, 0)
    for mode in range(4):
        rc = emu.decode_emulate(ptrs, sizes, ints, 0.125, mode, 0.0)
        err = emu.decode_last_error().decode()
        assert rc == 1 and err.startswith("racecheck: decode_mma_kernel<half,64,1>: "), (mode, err)
        assert "hazard" in err and "with no __syncthreads between them" in err, err


def test_decode_mma_bank_conflicts(emu, tmp_path):
    """decode_mma_kernel's shared-memory accesses are conflict free: the swizzled cp.async slab
    fills and every ldmatrix phase (8 rows at one logical chunk), the padded merge stores and the
    merge reads, at both head dims and both m-tile counts. The count starts afresh here: the
    emulator pairs the k-th tracked access of each lane of a warp, so the merge stores of a
    group that only partly fills an m-tile (G = 20: lanes of rows >= G store nothing) would be
    paired across different instructions."""
    emu.emu_bank_report(None, 0, 1)
    for D in (64, 128):
        for H in (8, 64):  # G = 4 and 32
            q = torch.randn(2, H, D).to(torch.bfloat16)
            kc = torch.randn(2, 150, 2, D).to(torch.bfloat16)
            vc = torch.randn(2, 150, 2, D).to(torch.bfloat16)
            _emulated_decode(emu, q, kc, vc, torch.tensor([150, 70], dtype=torch.int32), 0.1, 2)
    rows = [r for r in _bank_table(emu, tmp_path, "decode_mma") if r["kernel"].startswith("decode_mma_kernel<")]
    assert {r["kernel"] for r in rows} >= {f"decode_mma_kernel<bf16,{D},{m}>" for D in (64, 128) for m in (1, 2)}
    for r in rows:
        assert r["conflict_ratio"] == 1.0, r


@pytest.mark.parametrize("case", [c for c in CASES if c[1] in (64, 128)],
                         ids=lambda c: f"{str(c[0])[6:]}_D{c[1]}_H{c[2]}_Hk{c[3]}_s{c[6]}_m{c[8]}")
def test_emulated_decode_cases_on_mma(emu, case):
    """The decode_kernel cases whose shapes the launcher now sends to decode_mma_kernel (every
    group at D 64 / 128), as the launcher runs them: on the tensor-core kernel, same checks."""
    _run_decode_case(emu, case)
    assert _launch_log(emu)[0][0].startswith("decode_mma_kernel<")


@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("Sq,softcap", [(1, 0.0), (3, 0.0), (1, 30.0)])
def test_launch_smem_bytes_is_what_the_launch_uses(emu, D, Sq, softcap):
    """decode_cuda_launch_smem_bytes, what the bindings compare with the device's opt-in limit
    (and what flash_attention's short-query route asks before it takes the decode kernels), is
    the dynamic shared memory of the kernel the launcher actually runs (the tensor-core kernel's
    104 KiB at d128 for one query, not the CUDA-core kernel's 152 KiB the binding used to check);
    at d64 either fits the 99 KiB of sm_86 / sm_89 parts."""
    torch.manual_seed(0)
    B, H, Hk, S = 1, 8, 2, 130
    q = torch.randn(B, Sq, H, D).to(torch.bfloat16)
    kc, vc = (torch.randn(B, S, Hk, D).to(torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([S], dtype=torch.int32)
    want = emu.decode_launch_smem_emulate(Sq, H, Hk, D, softcap)
    _emulated_decode(emu, q, kc, vc, seqlens, 0.1, 1, softcap=softcap)
    launched = [int(entry[3]) for entry in _launch_log(emu) if "combine" not in entry[0]]
    assert launched == [want]
    assert (want <= 99 * 1024) == (D == 64)


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == 128],
                         ids=lambda c: f"{str(c[0])[6:]}_H{c[2]}_Hk{c[3]}_s{c[6]}_m{c[8]}")
def test_emulated_decode_mma_d128_on_a_99_kib_part(emu, case):
    """On a GPU with 99 KiB of shared memory per block (sm_86 / sm_89 / sm_120) the 3-stage d128
    tensor-core kernel (104 KiB) cannot launch, and the CUDA-core one (152 KiB) neither: the
    launcher runs the 2-stage variant (72 KiB) there, the same checks pass, and what the
    bindings compare with the limit (decode_cuda_launch_smem_bytes) is what it launches."""
    emu.emu_set_device(99 * 1024, NUM_SMS)
    try:
        _run_decode_case(emu, case)
        log = [e for e in _launch_log(emu) if "combine" not in e[0]]
        rows = case[2] // case[3]
        rows = -(-rows // -(-rows // 32))  # decode_mma_rows: heads per slice
        smem = 4 * 2 * 2 * 16 * 128 * 2 + 32 * 128 * 2
        assert log[0][0].endswith(f",128,{1 if rows <= 16 else 2},2stages>") and log[0][3] == str(smem), log
        assert emu.decode_launch_smem_emulate(1, case[2], case[3], 128, 0.0) == smem <= 99 * 1024
    finally:
        emu.emu_set_device(SMEM_OPTIN, NUM_SMS)
    _run_decode_case(emu, case)  # the usual device: the 3-stage kernel, 104 KiB
    assert [e[3] for e in _launch_log(emu) if "combine" not in e[0]][0] == str(4 * 3 * 2 * 16 * 128 * 2 + 32 * 128 * 2)


@pytest.mark.parametrize("D", [64, 96, 128, 256])
def test_python_decode_fits_rule_is_the_launchers(emu, D):
    """fastattn.functional._decode_smem_fits (what the model asks before it sends a decode step
    to the CUDA kernels, else the torch path) agrees with decode_cuda_launch_smem_bytes on a
    99 KiB part and on an A100 (163 KiB), for every shape class."""
    from fastattn.functional import _decode_smem_fits

    for optin in (99 * 1024, 163 * 1024, SMEM_OPTIN):
        emu.emu_set_device(optin, NUM_SMS)
        try:
            for Sq in (1, 3):
                for softcap in (0.0, 30.0):
                    need = emu.decode_launch_smem_emulate(Sq, 8, 2, D, softcap)
                    assert (need <= optin) == _decode_smem_fits(optin, D, Sq, softcap), (optin, Sq, softcap, need)
        finally:
            emu.emu_set_device(SMEM_OPTIN, NUM_SMS)
