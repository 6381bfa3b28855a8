"""scripts/sass_report.py: the SASS parser on a real object compiled here from a tiny kernel (skipped
without nvcc or cuobjdump), the occupancy model, and the regression gate."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.source_tree

_SCRIPT = os.path.join(ROOT, "scripts", "sass_report.py")
if not os.path.isfile(_SCRIPT):  # a copy of tests/ run against an installed wheel: nothing to load
    pytest.skip(f"needs the fastattn source tree ({_SCRIPT} not found)", allow_module_level=True)
_spec = importlib.util.spec_from_file_location("sass_report", _SCRIPT)
sr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sr)

# A loop of 128-bit loads, one 128-bit and one 16-bit store, static shared memory, and a second
# kernel without __launch_bounds__.
PROBE_CU = r"""
__global__ void __launch_bounds__(128) probe_kernel(const float4* __restrict__ x, float4* __restrict__ z,
                                                    unsigned short* __restrict__ y, int n, int iters) {
  __shared__ float buf[256];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int k = 0; k < iters; ++k) {
    const float4 v = x[i + k * n];
    acc.x += v.x; acc.y *= v.y; acc.z -= v.z; acc.w += v.w * v.x;
  }
  buf[threadIdx.x] = acc.x;
  __syncthreads();
  z[i] = acc;
  y[i] = static_cast<unsigned short>(buf[(threadIdx.x + 1) % 128]);
}
__global__ void unbounded_kernel(float* p) { p[threadIdx.x] += 1.f; }
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if not nvcc:
        pytest.skip("skip: nvcc not found")
    if not sr.find_tool("cuobjdump"):
        pytest.skip("skip: cuobjdump not found")
    d = tmp_path_factory.mktemp("sass")
    src = d / "probe.cu"
    src.write_text(PROBE_CU)
    # Both archs in one object (cuda_check.sh makes one per arch, <file>.<arch>.o with its ptxas
    # log <file>.<arch>.log beside it; one nvcc call here keeps the test short).
    obj = d / "probe.o"
    r = subprocess.run([nvcc, "-c", str(src), "-o", str(obj), "-O3", "-gencode", "arch=compute_80,code=sm_80",
                        "-gencode", "arch=compute_90a,code=sm_90a", "-Xptxas", "-v"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (d / "probe.log").write_text(r.stdout + r.stderr)
    bare = d / "bare"  # the object without its log
    bare.mkdir()
    shutil.copy(obj, bare / "probe.o")
    return d, r.stdout + r.stderr


def _ptxas(log: str, kernel: str, arch: str) -> tuple[int, int]:
    """(registers, smem bytes) ptxas -v reported for the kernel, read here independently."""
    block = log[log.index(f"Compiling entry function '{kernel}' for 'sm_{arch}'"):]
    m = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", block)
    return int(m.group(1)), int(m.group(2) or 0)


def test_probe_object(probe, capsys):
    d, log = probe
    cuobjdump = sr.find_tool("cuobjdump")
    rows = sr.collect([str(d)], cuobjdump, [])
    by = {(r["arch"], r["name"]): r for r in rows}
    assert set(by) == {(a, k) for a in ("sm_80", "sm_90a") for k in ("probe_kernel", "unbounded_kernel")}, by.keys()
    for arch in ("80", "90a"):
        regs, smem = _ptxas(log, "_Z12probe_kernelPK6float4PS_Ptii", arch)
        p = by[(f"sm_{arch}", "probe_kernel")]
        assert p["file"] == "probe" and p["key"] == "probe:probe_kernel"
        assert p["regs"] == regs and p["static_smem"] == smem == 1024
        assert p["occupancy"] == sr.occupancy(arch, regs, 128, 1024)[0] > 0
    # Without the ptxas log: spills fall back to STL/LDL counts, static shared memory to the
    # cubin's (less sm_90's reserved 1 KiB).
    bare = {(r["arch"], r["name"]): r for r in sr.collect([str(d / "bare")], cuobjdump, [])}
    for key, r in bare.items():
        assert r["spill_store_bytes"] is None and r["stl"] == r["ldl"] == 0
        assert r["static_smem"] == by[key]["static_smem"] and r["regs"] == by[key]["regs"], key
    p, u = by[("sm_80", "probe_kernel")], by[("sm_80", "unbounded_kernel")]
    assert p["spill_store_bytes"] == 0 and p["spill_load_bytes"] == 0 and p["stl"] == p["ldl"] == 0
    assert p["max_threads"] == 128 and u["max_threads"] is None
    assert u["occupancy"] is None and any("launch_bounds" in n for n in u["notes"])
    # Widths: the loop's float4 loads, the float4 and the u16 store.
    assert set(p["widths"]["ldg"]) == {"128"}, p["widths"]
    assert p["widths"]["stg"].get("128", 0) >= 1 and p["widths"]["stg"].get("16", 0) >= 1, p["widths"]
    assert p["sts"] >= 1 and p["lds"] >= 1 and p["dynamic_smem_possible"]
    assert p["hmma"] == 0 and p["ldsm"] == 0
    # Main loop: a real backward branch whose range holds the loads, inside the kernel.
    assert 0 < p["loop_insts"] < p["insts"]
    lo, hi = (int(x, 16) for x in p["loop_range"])
    assert lo < hi
    assert p["loop_mov"] <= p["mov"]
    assert u["loop_insts"] == 0 and u["loop_range"] is None
    # The table names every kernel.
    sr.print_table(rows)
    out = capsys.readouterr().out
    assert "probe:probe_kernel" in out and "probe:unbounded_kernel" in out


def test_probe_gate_end_to_end(probe, tmp_path, capsys):
    d, _ = probe
    base, js = tmp_path / "base.json", tmp_path / "report.json"
    # (the baseline is written before the check: checked against itself here)
    assert sr.main([str(d), "--quiet", "--json", str(js), "--write-baseline", str(base), "--check", str(base),
                    "--dyn-smem", "^probe_k=100000"]) == 0
    assert "sass gate: OK" in capsys.readouterr().out
    rows = json.loads(js.read_text())["kernels"]
    assert {r["key"] for r in rows} == {"probe:probe_kernel", "probe:unbounded_kernel"}
    for r in rows:  # --dyn-smem reaches the matching kernel's occupancy only
        dyn = 100000 if r["name"] == "probe_kernel" else None
        assert r["dynamic_smem"] == dyn
        if dyn:
            assert r["occupancy"] == sr.occupancy(r["arch"][3:], r["regs"], 128, 1024 + dyn)[0]
    with pytest.raises(ValueError, match="--dyn-smem"):
        sr.main([str(d), "--dyn-smem", "probe_kernel"])
    # A baseline where every STG of the probe was 128-bit: today's 16-bit store is a regression.
    b = json.loads(base.read_text())
    key = "sm_90a probe:probe_kernel"
    b["kernels"][key]["stg"] = {"128": 3}
    base.write_text(json.dumps(b))
    assert sr.main([str(d), "--quiet", "--check", str(base)]) == 1
    out = capsys.readouterr().out
    assert f"REGRESSION: {key}: STG share at >= 128 bits 1.00 -> " in out and "FAILED" in out


def test_missing_cuobjdump_skips(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sr, "find_tool", lambda name: None)
    assert sr.main([str(tmp_path), "--check", str(tmp_path / "none.json")]) == 0
    out = capsys.readouterr().out
    assert "SKIPPED" in out and "sass gate: SKIPPED" in out


def test_occupancy_model():
    # CUDA occupancy calculator figures: 56 regs x 128 threads -> 7 granules/warp, 9 warps per
    # scheduler, 9 blocks; 255 regs x 256 threads -> 1 block; 32 regs x 1024 threads -> thread
    # limit 2; 100 KiB of shared memory -> 1 block on sm_80, 2 on sm_90.
    assert sr.occupancy("90a", 56, 128, 1024) == (9, "r")
    assert sr.occupancy("80", 255, 256, 0) == (1, "r")
    assert sr.occupancy("80", 32, 1024, 0)[0] == 2
    assert sr.occupancy("80", 32, 128, 100 * 1024) == (1, "s")
    assert sr.occupancy("90a", 32, 128, 100 * 1024) == (2, "s")
    assert sr.occupancy("90a", 16, 32, 0) == (32, "b")
    assert sr.occupancy("90a", 32, None, 0) == (None, "-")


def test_parsers_on_text():
    sass = """
\tcode for sm_90a
\t\tFunction : _Z3fooPf
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                      /* 0x00000a00ff017b82 */
        /*0010*/                   MOV R2, R3 ;                                      /* 0x0 */
        /*0020*/              @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;                                      /* 0x0 */
        /*0030*/                   IMAD.MOV.U32 R5, RZ, RZ, R4 ;                                      /* 0x0 */
        /*0040*/                   STG.E.U16 desc[UR4][R2.64], R5 ;                                      /* 0x0 */
        /*0050*/               @P1 BRA 0x20 ;                                      /* 0x0 */
        /*0060*/                   EXIT ;                                      /* 0x0 */
        /*0070*/                   BRA 0x70;                                      /* 0x0 */
        /*0080*/                   NOP;                                      /* 0x0 */
"""
    fns = sr.parse_sass(sass)
    assert list(fns) == [("90a", "_Z3fooPf")]
    s = sr.summarize(fns[("90a", "_Z3fooPf")])
    assert s["insts"] == 7  # NOP and the trailing self-branch excluded
    assert s["loop_range"] == ["0x20", "0x50"] and s["loop_insts"] == 4 and s["loop_mov"] == 1
    assert s["mov"] == 2 and s["widths"] == {"ldg": {"128": 1}, "stg": {"16": 1}}
    assert [sr.access_width(m) for m in ("LDG.E.64.CONSTANT", "STG.E", "LDGSTS.E.BYPASS.LTC128B.128",
                                         "LDG.E.S8", "STS.U16")] == [64, 32, 128, 8, 16]
    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem\n")
    assert sr.parse_ptxas_log(log) == {("90a", "_Z3fooPf"): dict(stack=8, spill_store_bytes=12, spill_load_bytes=4, regs=40,
                                                                   smem=1024)}
    assert sr.shorten("void fastattn::(anonymous namespace)::k<__nv_bfloat16, 64, (fastattn::Mode)1>"
                      "(fastattn::Args)") == "k<bf16,64,(Mode)1>"


def _entry(spill=0, ldg=None, stg=None, stl=0):
    return dict(spill_store_bytes=spill, spill_load_bytes=spill, stl=stl, ldl=0, ldg=ldg or {}, stg=stg or {}, ldgsts={})


def test_gate_logic():
    base = {"kernels": {
        "sm_90a rotary:k": _entry(stg={"128": 8}),
        "sm_90a rms:k": _entry(ldg={"128": 4, "32": 4}),
        "sm_90a fwd:k": _entry(),
        "sm_80 old:k": _entry(),
    }}
    # No change: passes, nothing to say.
    assert sr.gate(base, copy.deepcopy(base)) == ([], [])
    cur = copy.deepcopy(base)
    del cur["kernels"]["sm_80 old:k"]
    cur["kernels"]["sm_90a new:k"] = _entry(spill=64)            # new kernels are reported, not failed
    cur["kernels"]["sm_90a rotary:k"] = _entry(stg={"128": 8, "16": 8})  # narrower stores appear
    cur["kernels"]["sm_90a fwd:k"] = _entry(spill=16, stl=2)          # spills appear
    cur["kernels"]["sm_90a rms:k"] = _entry(ldg={"128": 8})           # an improvement
    fails, notes = sr.gate(base, cur)
    assert any(f.startswith("sm_90a rotary:k: STG share at >= 128 bits 1.00 -> 0.50") for f in fails), fails
    assert "sm_90a fwd:k: gained spills: spill_store_bytes 0 -> 16, spill_load_bytes 0 -> 16, stl 0 -> 2" in fails
    assert not any("rms:k" in f or "new:k" in f for f in fails), fails
    assert len(fails) == 2
    assert "new kernel (not in the baseline): sm_90a new:k" in notes
    assert "kernel gone since the baseline: sm_80 old:k" in notes
    # Wider than the baseline's widest counts as at least as wide: LDG 64 -> 128 is no regression.
    b2 = {"kernels": {"a": _entry(ldg={"64": 2, "32": 2})}}
    assert sr.gate(b2, {"kernels": {"a": _entry(ldg={"128": 2, "32": 2})}})[0] == []
    assert sr.gate(b2, {"kernels": {"a": _entry(ldg={"32": 4})}})[0] != []  # the 64-bit loads went scalar
    # Fewer wide accesses with no more narrow ones is a restructured kernel, not a narrower one.
    b3 = {"kernels": {"a": _entry(ldg={"128": 9, "32": 1}, stg={"32": 3, "16": 3})}}
    assert sr.gate(b3, {"kernels": {"a": _entry(ldg={"128": 7, "32": 1}, stg={"32": 1, "16": 3})}}) == ([], [])
    assert sr.gate(b3, {"kernels": {"a": _entry(ldg={"128": 7, "32": 2}, stg={"32": 3, "16": 4})}})[0] == [
        "a: LDG share at >= 128 bits 0.90 -> 0.78 (widths 128x9 32x1 -> 128x7 32x2)",
        "a: STG share at >= 32 bits 0.50 -> 0.43 (widths 32x3 16x3 -> 32x3 16x4)"]


def test_main_loop_ignores_cold_code_after_exit():
    # A loop [0x20, 0x50] and, after EXIT, an out-of-line fallback that branches back into the
    # prologue (0x10): its range would swallow the whole kernel, so it is not the main loop.
    insts = [(0x00, "S2R", "R0, SR_TID.X"), (0x10, "MOV", "R1, R0"), (0x20, "LDS", "R2, [R1]"),
             (0x30, "FFMA", "R3, R2, R2, R3"), (0x40, "ISETP.NE.AND", "P0, PT, R1, RZ, PT"),
             (0x50, "BRA", "0x20"), (0x60, "EXIT", ""), (0x70, "SHFL.BFLY", "R4, R3, 0x1, 0x1f"),
             (0x80, "BRA", "0x10")]
    assert sr.main_loop(insts) == (0x20, 0x50)
    # Without an EXIT every backward branch counts, as before.
    assert sr.main_loop([i for i in insts if i[1] != "EXIT"]) == (0x10, 0x80)
