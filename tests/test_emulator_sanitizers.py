"""The fiber emulator's sanitizer analogues (tests/fiber_emulate.h) fire on bad kernels.

tests/sanitizer_selftest.cpp runs tiny deliberately-bad kernels under the same runtime and
checkers as the real kernels' emulators (decode, rms_norm, rotary): an out-of-bounds global
load / store (memcheck: guarded buffer copies + a SIGSEGV handler that reports the kernel,
buffer and offset), an out-of-bounds cp.async source (bounds-checked against the registered
buffers), shared-memory hazards between two warps with no __syncthreads between them
(racecheck), a read of never-written shared memory (initcheck), and a strided shared store
(bank-conflict count). Each must be reported, and the corrected kernel must run clean. The
real kernels run under these checkers in their own emulated tests.
"""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def st(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    lib = tmp_path_factory.mktemp("sanitizer_selftest") / "sanitizer_selftest.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-fno-strict-aliasing", "-Wall", "-Werror", "-shared", "-fPIC",
                    "-I", os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "sanitizer_selftest.cpp"),
                    "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.selftest_error.restype = ctypes.c_char_p
    for f in (dll.selftest_global, dll.selftest_smem):
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    dll.selftest_bank.restype = ctypes.c_int
    dll.selftest_bank.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
    dll.emu_bank_report.restype = ctypes.c_int
    dll.emu_bank_report.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    return dll


def _buf():
    return torch.zeros(100, dtype=torch.float32)  # 400 bytes, 64-byte aligned


def _run(st, fn, *args):
    b = _buf()
    rc = fn(b.data_ptr(), *args)
    return rc, st.selftest_error().decode(), b


@pytest.mark.parametrize("guard", ["end", "start"])
def test_in_bounds_kernel_runs_clean_and_writes_back(st, monkeypatch, guard):
    monkeypatch.setenv("FASTATTN_EMU_GUARD", guard)
    rc, err, _ = _run(st, st.selftest_global, 0, 68)   # reads buf[68..99]
    assert rc == 0, err
    rc, err, b = _run(st, st.selftest_global, 1, 68)   # writes buf[68..99]
    assert rc == 0, err
    assert (b[68:] == 1).all() and (b[:68] == 0).all()  # the guarded copy's changes come back
    rc, err, _ = _run(st, st.selftest_global, 2, 96)   # cp.async of buf[96..99]
    assert rc == 0, err


def test_memcheck_reports_raw_read_past_the_end(st, monkeypatch):
    monkeypatch.setenv("FASTATTN_EMU_GUARD", "end")
    rc, err, _ = _run(st, st.selftest_global, 0, 69)   # thread 31 reads buf[100]
    assert rc == 1
    assert err == "memcheck: oob_read: out-of-bounds read at byte offset 400 of buffer buf (400 bytes)"


def test_memcheck_reports_raw_write_past_the_end(st, monkeypatch):
    monkeypatch.setenv("FASTATTN_EMU_GUARD", "end")
    rc, err, b = _run(st, st.selftest_global, 1, 70)   # thread 30 writes buf[100]
    assert rc == 1
    assert err == "memcheck: oob_write: out-of-bounds write at byte offset 400 of buffer buf (400 bytes)"
    assert (b[70:] == 1).all()  # the in-bounds writes still land


def test_memcheck_reports_raw_read_before_the_start(st, monkeypatch):
    monkeypatch.setenv("FASTATTN_EMU_GUARD", "start")
    rc, err, _ = _run(st, st.selftest_global, 0, -1)   # thread 0 reads buf[-1]
    assert rc == 1
    assert err == "memcheck: oob_read: out-of-bounds read at byte offset -4 of buffer buf (400 bytes)"


@pytest.mark.parametrize("off,offset", [(-4, -16), (98, 392)])
def test_memcheck_bounds_checks_cp_async_sources(st, monkeypatch, off, offset):
    """Not a guard-page hit (16 bytes before the buffer lie in the mapping's slack): the
    emulator checks every cp.async source against the registered buffers, on both sides."""
    monkeypatch.setenv("FASTATTN_EMU_GUARD", "end")
    rc, err, _ = _run(st, st.selftest_global, 2, off)
    assert rc == 1
    assert err == (f"memcheck: oob_cp_async: out-of-bounds read (cp.async source, 16 bytes) at byte offset {offset} "
                   f"of buffer buf (400 bytes)")


@pytest.mark.parametrize("kind,hazard", [(0, "read-after-write"), (1, "write-after-write"), (2, "write-after-read")])
def test_racecheck_reports_missing_barrier(st, kind, hazard):
    rc, err, _ = _run(st, st.selftest_smem, kind, 0)
    assert rc == 1
    assert err.startswith(f"racecheck: smem_hazard: {hazard} hazard:"), err
    assert ("shared bytes [4, 8)" if kind == 2 else "shared bytes [0, 4)") in err, err
    assert ("warps 0 and 1" if kind == 1 else "warp 1" if kind == 2 else "warp 0 wrote") in err, err
    rc, err, _ = _run(st, st.selftest_smem, kind, 1)  # with the __syncthreads: clean
    assert rc == 0, err


def test_initcheck_reports_read_of_unwritten_shared_memory(st):
    rc, err, _ = _run(st, st.selftest_smem, 3, 0)
    assert rc == 1
    assert err == "initcheck: smem_hazard: warp 1 reads shared bytes [20, 24) (ld.shared) that were never written (block 0)"
    rc, err, _ = _run(st, st.selftest_smem, 3, 1)  # reads a word it wrote: clean
    assert rc == 0, err


def test_bank_conflicts_are_counted(st):
    st.emu_bank_report(None, 0, 1)  # reset
    assert st.selftest_bank(_buf().data_ptr(), 32, b"strided") == 0
    assert st.selftest_bank(_buf().data_ptr(), 1, b"linear") == 0
    n = st.emu_bank_report(None, 0, 0)
    buf = ctypes.create_string_buffer(n)
    st.emu_bank_report(buf, n, 1)
    rows = {tuple(line.split("\t")[:2]): tuple(int(x) for x in line.split("\t")[2:])
            for line in buf.value.decode().splitlines()}
    assert rows[("strided", "st.shared")] == (1, 32, 1)   # all 32 lanes on bank 0: 32 wavefronts
    assert rows[("linear", "st.shared")] == (1, 1, 1)
    assert rows[("linear", "cp.async")] == (1, 4, 4)      # 16-byte accesses: 4 phases of 8 lanes
