"""Mutation proof of the CPU emulation of the CUDA kernels (issue 14, item 3).

Each MUTATION plants one known bug into a COPY of the kernel sources (csrc/) and runs a few
of the emulated tests (tests/*_emulated.py, copied beside it) against that copy; the bug is
caught iff one of them FAILS. The real extension is untouched: the subprocess imports fastattn
from this checkout (PYTHONPATH), and only the sources the emulators compile with g++ are
mutated.

Rules that keep the proof honest:
  * the original snippet must occur exactly once in the real source, or the test fails and
    names the mutation to update (a refactor must not turn a mutation into a silent no-op);
  * the same emulated tests must PASS on an unmutated copy (one control run, shared), so a
    catch is not an artefact of the copy;
  * a catch is a test FAILURE (a failed assertion inside a test), not an error: a mutation
    whose source no longer compiles (the emulators compile in fixtures -> setup error), a
    crash of the test process or a missing test id is reported as such, never as a catch;
  * tests are selected by exact node id: a renamed case fails the control loudly.

At the end of the module the table "mutation -> emulated test that caught it" is printed.
Run one mutation: pytest tests/test_mutations.py -k <name>. Skipped outside the source
checkout (tests/conftest.py, the `source_tree` marker).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

# ~3-4 minutes on 2 cores (one pytest per mutation, each compiling its emulator). `make test`
# runs slow tests too (no -m filter), so CI runs this; `-m 'not slow'` skips it locally.
pytestmark = [pytest.mark.source_tree, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str         # test id: the bug
    path: str         # source file, relative to the checkout root
    old: str          # exact snippet of the real source (must occur exactly once)
    new: str          # what the bug looks like
    tests: tuple      # node ids of emulated tests (relative to the copy's root) expected to fail
    why: str          # how the emulation sees it


FWD = "tests/test_flash_fwd_emulated.py::test_emulated_forward_dense"
RMS = "tests/test_rms_norm_emulated.py::test_emulated_rms_norm_fwd"
RMS_BWD = "tests/test_rms_norm_emulated.py::test_emulated_rms_norm_bwd"
ROT = "tests/test_rotary_emulated.py::test_contiguous"
DEC = "tests/test_decode_emulated.py::test_emulated_decode_kernel_matches_reference"
BWD = "tests/test_flash_bwd_emulated.py::test_emulated_kernels_match_dense"
DMMA = "tests/test_decode_emulated.py::test_emulated_decode_mma_matches_reference"

MUTATIONS = [
    Mutation(
        "bwd_dkdv_main_loop_syncthreads_removed",
        "csrc/cuda/flash_bwd_kernels.cuh",
        "    cp_async_wait_all();\n    __syncthreads();\n    next_tile(&next_h, &next_m0);",
        "    cp_async_wait_all();\n    next_tile(&next_h, &next_m0);",
        (f"{BWD}[16-64-1-70-150-4-1--1--1-0-1-0]",),
        "initcheck: a warp's ldmatrix reads K / Q rows other warps have not copied yet (shared "
        "memory never written in this block)"),
    Mutation(
        "bwd_dkdv_refill_before_barrier",
        "csrc/cuda/flash_bwd_kernels.cuh",
        "    __syncthreads();\n    next_tile(&next_h, &next_m0);  // now the tile of iteration it + 1\n"
        "    if (it + 1 < total) load_q_tile(next_h, next_m0, buf ^ 1);\n",
        "    next_tile(&next_h, &next_m0);  // now the tile of iteration it + 1\n"
        "    if (it + 1 < total) load_q_tile(next_h, next_m0, buf ^ 1);\n    __syncthreads();\n",
        (f"{BWD}[bf-64-1-130-130-1-1--1-0-1-0-0]",),
        "racecheck: the Q / dO refill (cp.async landing at issue) overwrites the buffer slower warps "
        "still read in the same barrier interval (write-after-read; needs >= 3 query tiles)"),
    Mutation(
        "bwd_load_tile_row_bound_off_by_one",
        "csrc/cuda/flash_bwd_kernels.cuh",
        "const bool ok = row0 + r0 + i * kRowsPerSweep < seqlen;",
        "const bool ok = row0 + r0 + i * kRowsPerSweep <= seqlen;",
        (f"{BWD}[16-64-1-70-150-4-1--1--1-0-1-0]",),
        "memcheck: the tile tail copies row seqlen, past the end of q for the last head (the "
        "cp.async source is bounds-checked)"),
    Mutation(
        "bwd_dkdv_next_head_not_advanced",
        "csrc/cuda/flash_bwd_kernels.cuh",
        "      *m = mb_begin * kBlockM;\n      ++*h;\n",
        "      *m = mb_begin * kBlockM;\n",
        ("tests/test_flash_bwd_emulated.py::test_emulated_signed_scales[bf-128-1-70-90-2-1--1-0-1-0--0.1-0.0]",),
        "GQA without a split: one dK/dV block loops over both query heads of its kv head; with the "
        "head counter stuck it reads head 0's Q / dO twice, so dK / dV miss head 1's share"),
    Mutation(
        "bwd_ldmatrix_row_address_group_step",
        "csrc/cuda/flash_bwd_kernels.cuh",
        "return addr[s % kPer] + static_cast<uint32_t>((s / kPer) * kGroup * 16 + extra_rows * D * 2);",
        "return addr[s % kPer] + static_cast<uint32_t>((s / kPer) * kGroup * 8 + extra_rows * D * 2);",
        ("tests/test_flash_bwd_emulated.py::test_emulated_signed_scales[bf-128-1-70-90-2-1--1-0-1-0--0.1-0.0]",),
        "the precomputed ldmatrix row addresses step half a chunk group per group (only head dims "
        "of two or more groups, d >= 128, take that step): the d128 dQ kernel reads chunks 4..11 "
        "where 8..15 belong, so dQ is wrong"),
    Mutation(
        "bwd_lse_log2_not_scaled",
        "csrc/cuda/flash_bwd_kernels.cuh",
        "    p.lse_log2[r] = lse_log2(p.fwd.lse[r]);",
        "    p.lse_log2[r] = p.fwd.lse[r];",
        (f"{BWD}[16-64-1-70-150-4-1--1--1-0-1-0]",),
        "the delta kernel hands the dK/dV and dQ loops lse in natural-log units where they subtract "
        "it from log2-domain scores: P is off by a factor 2^(lse (log2 e - 1)), every gradient wrong"),
    Mutation(
        "bwd_dkdv_mask_pass_keeps_p",
        "csrc/cuda/flash_bwd_kernels.cuh",
        "                                   key_row0 + bwd_layout::c_row(lane, e)))\n            s[nt][e] = -INFINITY;",
        "                                   key_row0 + bwd_layout::c_row(lane, e)))\n            s[nt][e] += 0.f;",
        (f"{BWD}[bf-64-1-130-130-1-1--1-0-1-0-0]",),
        "the dK/dV mask pass leaves the scores of hidden keys in place: causal dK / dV take the "
        "future queries' share"),
    Mutation(
        "bwd_store_row_bound_dropped",
        "csrc/cuda/flash_bwd_kernels.cuh",
        "    if (row >= seqlen) continue;\n    T* dst",
        "    T* dst",
        (f"{BWD}[16-64-1-70-150-4-1--1--1-0-1-0]",),
        "memcheck: the dQ epilogue stores the rows of the last query tile past seqlen_q onto the "
        "guard page after dq (a raw store, SIGSEGV reported)"),
    Mutation(
        "bwd_launcher_smem_opt_in_dropped",
        "csrc/cuda/flash_bwd_launch.cuh",
        "  if (smem > 48 * 1024)\n    FASTATTN_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));\n",
        "",
        (f"{BWD}[16-64-1-70-150-4-1--1--1-0-1-0]",),
        "the real launcher runs under the emulated CUDA runtime: the dK/dV kernel's 65 KiB of "
        "dynamic shared memory without cudaFuncSetAttribute is refused (cudaErrorInvalidValue)"),
    Mutation(
        "bwd_dkdv_column_half_dropped",
        "csrc/cuda/flash_bwd_kernels.cuh",
        "  // This warp's 16 key rows (wrow) and its dK / dV columns [col0, col0 + kDn).\n"
        "  const int wrow = Cfg::kDSplit == 1 ? warp : warp % Cfg::kRowWarps;\n"
        "  const int col0 = Cfg::kDSplit == 1 ? 0 : (warp / Cfg::kRowWarps) * kDn;\n",
        "  // This warp's 16 key rows (wrow) and its dK / dV columns [col0, col0 + kDn).\n"
        "  const int wrow = Cfg::kDSplit == 1 ? warp : warp % Cfg::kRowWarps;\n"
        "  const int col0 = 0;\n",
        ("tests/test_flash_bwd_emulated.py::test_emulated_head_dims[bf-192-1-33-21-2-2--1-7-0-0-None-0.0-0]",),
        "d192 column-split dK/dV warps: both halves accumulate and store columns [0, 96), so "
        "dK / dV columns 96..191 keep the NaN the output buffers are born with"),
    Mutation(
        "fwd_main_loop_syncthreads_removed",
        "csrc/cuda/flash_fwd_kernel.cuh",
        "      cp_async_wait<0>();\n      __syncthreads();\n      load_tile<Kt, kBlockN>(sV,",
        "      cp_async_wait<0>();\n      load_tile<Kt, kBlockN>(sV,",
        (f"{FWD}[16-64-1-129-129-2-2--1-0-1-3]", f"{FWD}[16-64-1-129-129-2-2--1-0-1-0]"),
        "late cp.async (mode bit 0) + reverse schedule: a warp reads K/Q rows other threads "
        "have not copied yet -> NaN-born shared memory in the scores"),
    Mutation(
        "rms_norm_fwd_tail_off_by_one",
        "csrc/cuda/rms_norm.cu",
        "const int count = t < npacks ? ",
        "const int count = t <= npacks ? ",
        (f"{RMS}[float_r40_n48_w0_res0_lead8_pad0_optin227k_m2]",),
        "the row held in registers gives thread npacks a pack too (it exists in a one-warp block over "
        "a 12-pack fp32 row): the vector just past the row is loaded and stored, so the row's sum "
        "and the next row's y go wrong and the last row's store hits the sentinel around y"),
    Mutation(
        "rms_norm_block_sum_scratch_barrier_removed",
        "csrc/cuda/rms_norm.cu",
        "  __syncthreads();  // scratch may still be read from the previous call\n",
        "",
        (f"{RMS_BWD}[bf16_r300_n1024_w1_dh1_lead8_optin227k_sms132_m2]",),
        "a block's next row writes its warp's scratch sum while other warps may still read the "
        "previous row's: racecheck (the scratch goes through the tracked lds / sts) reports the "
        "write-after-read between warps; the fiber schedule alone leaves the values right"),
    Mutation(
        "rotary_angles_refill_barrier_removed",
        "csrc/cuda/rotary_kernel.cuh",
        "    __syncthreads();  // the previous token's readers are done\n",
        "",
        (f"{ROT}[2x9x8x2x128x128-neox-dtype1]",),
        "the next token's cos / sin overwrite the shared angles while other warps still rotate "
        "with the previous token's (grid-stride tokens): racecheck on the tracked lds / sts"),
    Mutation(
        "fwd_cp_async_v_wait_count",
        "csrc/cuda/flash_fwd_kernel.cuh",
        "      cp_async_wait<1>();\n      __syncthreads();\n",
        "      cp_async_wait<2>();\n      __syncthreads();\n",
        (f"{FWD}[16-64-2-130-200-4-2--1--1-0-3]", f"{FWD}[bf-128-2-33-70-4-1--1--1-0-3]"),
        "wait_group 2 with V(n) and K(n + 1) pending retires nothing: in late mode (bit 0) the PV "
        "mma reads V before its copies land -> NaN-born shared memory (initcheck) / wrong out"),
    Mutation(
        "fwd_ldmatrix_lane_row_address",
        "csrc/cuda/flash_fwd_kernel.cuh",
        "ld_off[i] = static_cast<uint32_t>((lane & 15) * Kt::kRowBytes",
        "ld_off[i] = static_cast<uint32_t>((lane & 7) * Kt::kRowBytes",
        (f"{FWD}[16-64-1-129-129-2-2--1-0-1-0]",),
        "lanes 8-15 / 24-31 address rows 0-7 again: matrices 1 and 3 of every Q/K/V ldmatrix "
        "are the wrong rows -> wrong out/lse"),
    Mutation(
        "fwd_ldmatrix_swizzle_key_odd_half_lines",
        "csrc/cuda/flash_fwd_kernel.cuh",
        "    const int key = swizzle_key<kChunks>(lane & 7);\n",
        "    const int key = lane & 7;\n",
        ("tests/test_flash_fwd_emulated.py::test_emulated_forward_new_head_dims[bf-96-1-97-130-2-1--1--1-0-0.0-0]",),
        "the ldmatrix readers use the 8-chunk key r & 7 while the cp.async writers and the O "
        "staging use d 96's (r >> 1) & 3: Q/K/V fragments come from the wrong chunks (and the "
        "reads hit rows other warps stage O in: racecheck)"),
    Mutation(
        "fwd_online_softmax_rescale_skipped",
        "csrc/cuda/flash_fwd_kernel.cuh",
        "              o[mi][j][2 * hf] *= alpha[mi][hf];\n              o[mi][j][2 * hf + 1] *= alpha[mi][hf];\n",
        "",
        (f"{FWD}[16-64-2-130-200-4-2--1--1-0-0]",),
        "O keeps contributions scaled by an old row max when a later key tile raises it"),
    Mutation(
        "rotary_second_half_offset_uses_head_dim",
        "csrc/cuda/rotary_kernel.cuh",
        "load_raw<T, kElems, kVec>(in + half + i0, it.b[u]);",
        "load_raw<T, kElems, kVec>(in + p.d / 2 + i0, it.b[u]);",
        (f"{ROT}[1x11x3x1x128x64-neox-dtype1]", f"{ROT}[1x11x3x1x128x64-neox-dtype0]"),
        "partial rotary (R 64 < D 128): x2 is read from the pass-through tail, not R/2 on"),
    Mutation(
        "decode_cp_async_wait_count",
        "csrc/cuda/decode_kernels.cuh",
        "      cp_async_commit();\n      cp_async_wait<1>();\n",
        "      cp_async_commit();\n      cp_async_wait<2>();\n",
        (f"{DEC}[bfloat16_D128_H12_Hk1_s1_m3]", f"{DEC}[float16_D64_H7_Hk1_s3_m1]"),
        "tile t is not waited for: in late-copy mode its shared memory is still NaN (or the "
        "previous tile) when the warps read it"),
    Mutation(
        "decode_key_bounds_check_dropped",
        "csrc/cuda/decode_kernels.cuh",
        "const bool valid = tile_row0 + row < end;",
        "const bool valid = row < kBlockN;",
        (f"{DEC}[bfloat16_D128_H32_Hk8_s1_m0]",),
        "the key predicate checks the tile bound instead of the sequence end: keys past the end "
        "(zero-filled K) score 0 instead of -inf and take softmax weight (ragged lengths)"),
    Mutation(
        "decode_k_read_ignores_swizzle",
        "csrc/cuda/decode_kernels.cuh",
        "lds<uint4>(tK + swz<kD>(row, c * 8));",
        "lds<uint4>(tK + row * kD + c * 8);",
        (f"{DEC}[bfloat16_D128_H32_Hk8_s1_m0]",),
        "K chunks are written swizzled (chunk c of row r at c ^ (r & 7)) but read linearly: "
        "every row but r % 8 == 0 dots Q with permuted K chunks"),
    Mutation(
        "decode_merge_syncthreads_removed",
        "csrc/cuda/decode_kernels.cuh",
        "        sts<float>(sL + warp * kHeadsPerWarp + i, l[i]);\n      }\n    }\n  }\n  __syncthreads();\n",
        "        sts<float>(sL + warp * kHeadsPerWarp + i, l[i]);\n      }\n    }\n  }\n",
        (f"{DEC}[bfloat16_D128_H32_Hk8_s1_m0]", f"{DEC}[float16_D64_H7_Hk1_s3_m1]"),
        "racecheck: the merge reads other warps' partial outputs / max / sum with no barrier after "
        "their shared-memory stores (tracked lds / sts): a write-after-read or read-after-write "
        "hazard, reported with the kernel's name"),
    Mutation(
        "decode_mma_copy_ignores_swizzle",
        "csrc/cuda/decode_mma.cuh",
        "(((lane & 7) ^ ((lane >> 3) + 4 * jj)) << 4)",
        "((lane & 7) << 4)",
        (f"{DMMA}[bfloat16_D128_H32_Hk8_p0_s1_w-1_m0]", f"{DMMA}[float16_D64_H32_Hk1_p1_s2_w-1_m3]"),
        "the slab copies write chunk c of row r linearly while every ldmatrix reads it at "
        "c ^ (r & 7): K and V rows arrive with permuted chunks"),
    Mutation(
        "decode_mma_copy_end_bound_dropped",
        "csrc/cuda/decode_mma.cuh",
        "      const bool ok = key < end;\n      int64_t page = b, row = key;",
        "      const bool ok = true;\n      int64_t page = b, row = key;",
        (f"{DMMA}[float16_D128_H16_Hk2_p16_s3_w-1_m1]",),
        "rows past the split's end are copied instead of zero-filled: on a paged pool the table "
        "is read past the sequence's pages (memcheck) and NaN rows of unused pages reach P V "
        "(0 * NaN)"),
    Mutation(
        "decode_d96_idle_lanes_store_partials",
        "csrc/cuda/decode_kernels.cuh",
        "      if (kPvLanes < 32 && lane >= kPvLanes) continue;  // (D = 96: no dims on this lane)\n",
        "",
        (f"{DEC}[bfloat16_D96_H40_Hk1_s1_m2]",),
        "D = 96: lanes 24..31 own no output dims (their P V sums repeat lanes 16..23's columns); "
        "storing them writes past the head's 96 floats into the next merge row, which the same "
        "lane's next head overwrites, except after a warp's 8th head (G = 32 slice: 8 heads a "
        "warp), where it lands in the next warp's row or the max / sum area"),
]


def _copy_tree(src, dst):
    """csrc/ and tests/ (the emulators find sources relative to tests/), plus the two files
    conftest.py and pytest look at (setup.py marks a source tree, pyproject.toml the ini)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.o", "junit.xml")
    for d in ("csrc", "tests"):
        shutil.copytree(os.path.join(src, d), os.path.join(dst, d), ignore=ignore)
    for f in ("setup.py", "pyproject.toml"):
        if os.path.exists(os.path.join(src, f)):
            shutil.copy2(os.path.join(src, f), os.path.join(dst, f))


def _run_pytest(tree, node_ids, first_failure_stops):
    """Run the node ids in `tree`; returns (returncode, {node id: outcome}, {node id: failure
    message}, output, seconds).
    Outcome: 'passed', 'failed' (an assertion in the test), 'error' (setup / collection),
    'skipped'."""
    xml = os.path.join(tree, "junit.xml")
    if os.path.exists(xml):
        os.remove(xml)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", tree,
           f"--junitxml={xml}", "-o", "junit_family=xunit2"]
    if first_failure_stops:
        cmd.append("-x")
    t0 = time.monotonic()
    res = subprocess.run(cmd + list(node_ids), cwd=tree, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    secs = time.monotonic() - t0
    out = res.stdout[-6000:] + res.stderr[-3000:]
    outcomes = {}
    messages = {}  # node id -> the start of its failure message
    if os.path.exists(xml):
        for tc in ET.parse(xml).getroot().iter("testcase"):
            file = tc.get("file") or ""
            cls = tc.get("classname", "")
            name = tc.get("name", "")
            # classname is "tests.test_x" (module path, dots); rebuild "tests/test_x.py::name"
            node = cls.replace(".", "/") + ".py::" + name if not file else f"{file}::{name}"
            kinds = {child.tag: child for child in tc}
            outcome = ("failed" if "failure" in kinds else "error" if "error" in kinds else
                       "skipped" if "skipped" in kinds else "passed")
            outcomes[node] = outcome
            if "failure" in kinds:
                messages[node] = " ".join((kinds["failure"].get("message") or "").split())[:160]
    return res.returncode, outcomes, messages, out, secs


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """The checkout's sources, copied once: the control and every mutation start from the same
    bytes even if someone edits the working tree during the run."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found (the emulators compile the kernels with it)")
    tree = str(tmp_path_factory.mktemp("mutation_snapshot"))
    _copy_tree(ROOT, tree)
    return tree


@pytest.fixture(scope="module")
def control(snapshot, tmp_path_factory):
    """One unmutated copy; every mutation's tests run there once and must all pass."""
    tree = str(tmp_path_factory.mktemp("mutation_control"))
    _copy_tree(snapshot, tree)
    ids = sorted({t for m in MUTATIONS for t in m.tests})
    return _run_pytest(tree, ids, first_failure_stops=False)


@pytest.fixture(scope="module")
def report(request):
    rows = []
    yield rows
    lines = ["", "mutation proof: each planted bug and the emulated test that caught it",
             f"{'mutation':42} {'file':32} {'secs':>5}  caught by"]
    for name, path, caught_by, secs, why in rows:
        lines.append(f"{name:42} {path:32} {secs:5.1f}  {caught_by}")
        lines.append(f"{'':82}   ({why})")
    text = "\n".join(lines)
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(text, flush=True)
    else:
        print(text)
    out = os.environ.get("FASTATTN_MUTATION_REPORT")
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


@pytest.mark.parametrize("mut", MUTATIONS, ids=lambda m: m.name)
def test_mutation_is_caught(mut, snapshot, control, report, tmp_path, record_property):
    with open(os.path.join(snapshot, mut.path)) as f:
        src = f.read()
    n = src.count(mut.old)
    assert n == 1, (
        f"mutation {mut.name!r}: its original snippet occurs {n} times in {mut.path} (expected "
        f"exactly once). The source was refactored: update this mutation in "
        f"tests/test_mutations.py so that it still plants the same bug.\nsnippet:\n{mut.old}")
    assert mut.new != mut.old

    rc, outcomes, _, out, _ = control
    for t in mut.tests:
        assert outcomes.get(t) == "passed", (
            f"control: {t} did not pass on an UNMUTATED copy of the sources "
            f"({outcomes.get(t, 'not run / not found')}), so it cannot prove {mut.name!r}.\n{out}")

    tree = str(tmp_path / "tree")
    _copy_tree(snapshot, tree)
    target = os.path.join(tree, mut.path)
    with open(target, "w") as f:
        f.write(src.replace(mut.old, mut.new, 1))
    rc, outcomes, messages, out, secs = _run_pytest(tree, mut.tests, first_failure_stops=True)

    failed = [t for t in mut.tests if outcomes.get(t) == "failed"]
    errored = [t for t in mut.tests if outcomes.get(t) == "error"]
    assert not errored or failed, (
        f"mutation {mut.name!r} made {errored} ERROR (setup / compile), which is not a catch: "
        f"make the mutation compile.\n{out}")
    assert outcomes or rc == 0, f"mutation {mut.name!r}: the test process crashed (rc {rc}).\n{out}"
    assert failed, (
        f"mutation {mut.name!r} ({mut.path}) was NOT caught: {mut.tests} -> {outcomes} "
        f"(rc {rc}). Expected: {mut.why}.\n{out}")
    why = messages.get(failed[0], "")
    report.append((mut.name, mut.path, failed[0].split("/", 1)[1], secs, why))
    record_property("caught_by", failed[0])
    record_property("failure", why)
    print(f"{mut.name}: caught by {failed[0]} in {secs:.1f} s")
