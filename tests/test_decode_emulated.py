"""Run the CUDA decode kernels' own code on the CPU (no GPU needed).

tests/decode_emulate.cpp compiles csrc/cuda/decode_kernels.cuh (the kernels decode.cu
launches) with g++ into a shared library, with host versions of cp.async (zero-fill, commit /
wait_group), shuffles, barriers and the 16-bit types, and runs every thread of every block
as a fiber. Here its outputs are compared with the float64 reference. This exercises the
kernels' real control flow, warp roles for every group size, split-KV ranges, swizzled
shared-memory indexing, double buffering, masking, the in-block merge, the combine kernel and
append_kv's indexing. What it cannot exercise: the CUDA compiler, real asynchrony, the
hardware's fast-math rounding and speed.
"""
import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch

from fastattn import reference

from conftest import assert_error_ratio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    lib = tmp_path_factory.mktemp("decode_emulate") / "decode_emulate.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-fno-strict-aliasing", "-Wall", "-Werror", "-Wno-unknown-pragmas",
                    "-Wno-maybe-uninitialized", "-shared", "-fPIC",
                    "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc", "cuda"),
                    os.path.join(ROOT, "tests", "decode_emulate.cpp"), "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.decode_emulate.restype = ctypes.c_int
    dll.decode_emulate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                                   ctypes.c_float, ctypes.c_int]
    dll.decode_num_splits_for_slots.restype = ctypes.c_int64
    dll.decode_num_splits_for_slots.argtypes = [ctypes.c_int64] * 3
    dll.append_kv_emulate.restype = ctypes.c_int
    dll.append_kv_emulate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64)]
    return dll


def _ptrs(*tensors):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() if t is not None else None for t in tensors])


def _ints(*vals):
    return (ctypes.c_int64 * len(vals))(*vals)


def _emulated_decode(emu, q, kc, vc, seqlens, scale, num_splits, mode=0, block_table=None, seqlens_k_add=0,
                     window=(-1, -1), out_transposed=False):
    """Run decode_kernel (+ combine) under the emulator. q (B, H, D) -> out (B, H, D), lse (B, H);
    q (B, Sq, H, D) -> out (B, Sq, H, D), lse (B, H, Sq). kc/vc: contiguous caches
    (B, S_max, Hk, D) or, with block_table (B, max_pages) int32, page pools (num_pages,
    page_size, Hk, D). out_transposed: out is a (B, H, Sq, D) buffer seen as (B, Sq, H, D),
    so its row and head strides differ from q's."""
    squeeze = q.dim() == 3
    q4 = q.unsqueeze(1) if squeeze else q
    B, Sq, H, D = q4.shape
    Hk = kc.shape[2]
    if block_table is None:
        S, bt_stride, page, npages = kc.shape[1], 0, 0, 0
    else:
        page, npages = kc.shape[1], kc.shape[0]
        S, bt_stride = block_table.shape[1] * page, block_table.stride(0)
    if out_transposed:
        out = torch.full((B, H, Sq, D), float("nan"), dtype=q.dtype).transpose(1, 2)
    else:
        out = torch.full((B, Sq, H, D), float("nan"), dtype=q.dtype)
    lse = torch.full((B, H, Sq), float("nan"))
    op = torch.full((num_splits, B, H, Sq, D), float("nan"))
    lp = torch.full((num_splits, B, H, Sq), float("nan"))
    wl, wr = window
    rc = emu.decode_emulate(
        _ptrs(q4, kc, vc, seqlens, out, lse, op, lp, block_table),
        _ints(*q4.stride()[:3], *kc.stride()[:3], *vc.stride()[:3], *out.stride()[:3],
              B, Sq, S, H, Hk, D, num_splits, int(q.dtype == torch.bfloat16), seqlens_k_add, wl, wr,
              bt_stride, page, npages),
        scale, mode)
    assert rc == 0, "the emulator reported an error (see stderr)"
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
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}_D{c[1]}_H{c[2]}_Hk{c[3]}_s{c[6]}_m{c[8]}")
def test_emulated_decode_kernel_matches_reference(emu, case):
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


def test_emulated_append_kv_kernel(emu):
    for dtype, vec, es in ((torch.bfloat16, 1, 2), (torch.float16, 0, 2), (torch.float32, 0, 4), (torch.float32, 1, 4)):
        B, S, Hk, D, Sn = 3, 20, 2, 16, 4
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
        rc = emu.append_kv_emulate(_ptrs(kc, vc, k, v, seqlens, None),
                                   _ints(*kc.stride()[:3], *vc.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                         B, Sn, S, Hk, D, es, vec, 2, 0, 0, 0))
        assert rc == 0
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), (dtype, vec)


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
