"""Run-time ISA dispatch of the CPU kernels (setup.py's portable build, csrc/cpu/dispatch.cpp).

* fastattn.cpu_isa() is the best tier this CPU supports (decided independently here from
  /proc/cpuinfo);
* every tier the CPU supports computes every op correctly (a subprocess per tier with
  FASTATTN_CPU_ISA=<tier>, tests/cpu_isa_worker.py), so the baseline kernels are proven on
  an AVX2 machine too;
* a tier above the CPU's is capped, a bad value ignored, a missing or broken tier library
  falls back to the baseline, each with a warning;
* the tier libraries export only the kernel table, the avx512 one holds AVX-512 code, and
  the baseline kernels in _C contain no AVX (ymm/zmm) instruction.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

import fastattn
from fastattn.benchmarks.meta import all_cpu_flags

TIERS = ["baseline", "avx2", "avx512"]
PKG_DIR = os.path.dirname(os.path.abspath(fastattn.__file__))
# Where this fastattn is imported from, for the subprocesses.
PKG_PARENT = os.path.dirname(PKG_DIR)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_isa_worker.py")
C_LIB = fastattn._C.__file__
SUFFIX = os.path.basename(C_LIB)[len("_C"):]

# The x86-64-v3 and x86-64-v4 sets as /proc/cpuinfo names them (lzcnt is "abm").
V3_FLAGS = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe", "popcnt", "sse4_2", "ssse3", "cx16"}
V4_FLAGS = V3_FLAGS | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def _portable_build() -> bool:
    return _run_isa({}).stdout.strip() in TIERS


def _best_tier():
    flags = all_cpu_flags()
    if flags is None or not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return None
    if V4_FLAGS <= flags:
        return "avx512"
    if V3_FLAGS <= flags:
        return "avx2"
    return "baseline"


BEST = _best_tier()
needs_x86_linux = pytest.mark.skipif(BEST is None, reason="needs x86-64 Linux (/proc/cpuinfo)")


def _env(isa=None, pythonpath=PKG_PARENT):
    env = {k: v for k, v in os.environ.items() if k != "FASTATTN_CPU_ISA"}
    env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    if isa is not None:
        env["FASTATTN_CPU_ISA"] = isa
    return env


def _run_isa(extra_env, pythonpath=PKG_PARENT):
    """cpu_isa() of a fresh process after one kernel call, and its stderr."""
    code = "import torch, fastattn; fastattn.rms_norm(torch.ones(2, 3)); print(fastattn.cpu_isa())"
    env = _env(pythonpath=pythonpath)
    env.update(extra_env)
    # cwd too: `python -c` puts the current directory first on sys.path.
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=pythonpath, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def portable():
    if not _portable_build():
        pytest.skip(f"single-tier build (FASTATTN_CPU_MARCH={fastattn.cpu_isa()}): no run-time dispatch")


def _tier_lib(tier):
    return os.path.join(PKG_DIR, f"_cpu_{tier}{SUFFIX}")


@needs_x86_linux
def test_cpu_isa_is_best_supported(portable):
    r = _run_isa({})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == BEST, f"auto picked {r.stdout.strip()!r}; /proc/cpuinfo says {BEST!r}\n{r.stderr}"
    assert "fastattn:" not in r.stderr, r.stderr  # no fallback warning in a complete build
    if "FASTATTN_CPU_ISA" not in os.environ:
        assert fastattn.cpu_isa() == BEST


@needs_x86_linux
@pytest.mark.parametrize("tier", TIERS)
def test_tier_kernels_match_reference(portable, tier):
    if TIERS.index(tier) > TIERS.index(BEST):
        pytest.skip(f"this CPU lacks {tier} ({'AVX-512 F/BW/CD/DQ/VL' if tier == 'avx512' else 'x86-64-v3'}): "
                    "its kernels cannot run here; test_tier_libraries checks its library is built and exports "
                    "the table")
    r = subprocess.run([sys.executable, WORKER, tier], env=_env(tier), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith(f"OK {tier}"), f"{r.stdout}\n{r.stderr}"
    assert "fastattn:" not in r.stderr, r.stderr


@needs_x86_linux
def test_unsupported_tier_is_capped(portable):
    above = TIERS[TIERS.index(BEST) + 1:]
    if not above:
        pytest.skip(f"this CPU supports every tier ({BEST})")
    r = _run_isa({"FASTATTN_CPU_ISA": above[-1]})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == BEST
    assert f"FASTATTN_CPU_ISA={above[-1]} is not supported by this CPU; using {BEST}" in r.stderr
    assert r.stderr.count("fastattn:") == 1, r.stderr  # warned once


@needs_x86_linux
def test_bad_value_is_ignored_with_warning(portable):
    r = _run_isa({"FASTATTN_CPU_ISA": "avx-2"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == BEST
    assert "ignoring FASTATTN_CPU_ISA=avx-2" in r.stderr
    assert _run_isa({"FASTATTN_CPU_ISA": "auto"}).stdout.strip() == BEST


@needs_x86_linux
def test_missing_or_broken_tier_library_falls_back(portable, tmp_path):
    if BEST == "baseline":
        pytest.skip("the CPU supports only the baseline tier")
    # A copy of the package with _C but without its tier libraries; then with a broken one.
    pkg = tmp_path / "fastattn"
    shutil.copytree(PKG_DIR, pkg, ignore=shutil.ignore_patterns("_cpu_*", "__pycache__"))
    r = _run_isa({}, pythonpath=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "baseline"
    assert f"cannot load the {BEST} CPU kernels" in r.stderr
    (pkg / f"_cpu_{BEST}{SUFFIX}").write_bytes(b"not a library")
    r = _run_isa({"FASTATTN_CPU_ISA": BEST}, pythonpath=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "baseline", r.stderr


def _tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found")
    return path


@needs_x86_linux
@pytest.mark.parametrize("tier", TIERS[1:])
def test_tier_libraries(portable, tier):
    """Built, exporting exactly the table (checked with nm: loading an avx512 library on a CPU
    without AVX-512 is what dispatch must never do), with code of its ISA."""
    lib = _tier_lib(tier)
    assert os.path.exists(lib), f"{lib} missing from a portable build"
    nm = _tool("nm")
    out = subprocess.run([nm, "-D", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    syms = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert syms == {"fastattn_cpu_kernel_table_v1"}, sorted(syms)[:20]
    dis = subprocess.run([_tool("objdump"), "-d", "--no-show-raw-insn", lib], capture_output=True, text=True,
                         check=True).stdout
    assert "%ymm" in dis
    assert ("%zmm" in dis) == (tier == "avx512")


@needs_x86_linux
def test_baseline_kernels_have_no_avx(portable):
    """_C (baseline kernels, bindings) must run on any x86-64: no ymm/zmm register anywhere."""
    dis = subprocess.run([_tool("objdump"), "-d", "--no-show-raw-insn", C_LIB], capture_output=True, text=True,
                         check=True).stdout
    assert "fastattn3cpu" in dis or "fastattn::cpu" in dis  # the kernels are there
    bad = [line for line in dis.splitlines() if "%ymm" in line or "%zmm" in line]
    assert not bad, f"{len(bad)} AVX instructions in {C_LIB}, e.g. {bad[:3]}"


@needs_x86_linux
@pytest.mark.parametrize("tier", TIERS[1:])
def test_flash_forward_softmax_is_vectorised(portable, tier):
    """The fp32 flash forward's exponentials (a degree-7 polynomial: 7 FMAs) run on whole
    vectors of the tier. On the AVX2 tier GCC had left its `omp simd` loop scalar (one vcomiss
    and branch per score; a quarter of the forward's time at S = 2048, D = 128): the block's
    task held one packed FMA. (The AVX-512 tier had it vectorised: there this guards against a
    regression.)"""
    lib = _tier_lib(tier)
    dis = subprocess.run([_tool("objdump"), "-d", "-C", "--no-show-raw-insn", lib], capture_output=True, text=True,
                         check=True).stdout
    # the function's own block (a "[clone .cold]" part holds only its unlikely branches)
    heads = [m.start() for m in re.finditer(r"^[0-9a-f]+ <[^\n]*FlashFwdCpu<float, false>::run_task\([^\n]*\)>:$", dis,
                                            re.MULTILINE) if "[clone" not in dis[m.start():dis.find("\n", m.start())]]
    assert len(heads) == 1, "FlashFwdCpu<float, false>::run_task not found once (renamed? update this test)"
    body = dis[heads[0]:dis.find("\n\n", heads[0])]
    reg = "%zmm" if tier == "avx512" else "%ymm"
    packed = [line for line in body.splitlines() if "vfmadd" in line and "ps " in line and reg in line]
    assert len(packed) >= 7, f"{len(packed)} packed FMAs on {reg} in the forward's block task"
