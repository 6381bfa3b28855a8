"""scripts/gpu_check.sh and scripts/gpu_sweep.py, proven on the CPU (DESIGN.md section 7): a
GPU lease is 15 minutes, so the script must work the first time it runs there.

- the dry run (--dry-run --quick) exits 0 and prints the summary table, every step in it, last;
- the per-step budgets in the script add up, with the kill grace and slack, to at most 510 s;
- the time boxes work: a step over its budget is reported TIMEOUT (and the run fails), a
  failed build skips the GPU steps, and the table is still printed;
- gpu_sweep's kernel-path cases pass on the CPU, and its checker fails on a wrong result;
- the soft-capped kernels (softcap=) are in both the sweep and the sanitizer driver, run in the
  dry run, and each capped case fails when its op drops the cap;
- the benchmark -k expression selects the headline CUDA benchmarks (and no compile/model ones)
  from the CUDA parametrization of the suites.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.source_tree

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
SWEEP = os.path.join(ROOT, "scripts", "gpu_sweep.py")
MAX_TOTAL = 510  # seconds: the 8.5 minutes for the whole command


def _script_text():
    with open(SCRIPT) as f:
        return f.read()


def _steps():
    m = re.search(r"^STEPS=\(([^)]*)\)$", _script_text(), re.M)
    assert m, "STEPS=(...) not found in gpu_check.sh"
    return m.group(1).split()


def _budgets():
    """{step: default seconds} from the BUDGET[step]=${GPU_CHECK_T_STEP:-N} lines."""
    found = re.findall(r"^BUDGET\[(\w+)\]=\$\{GPU_CHECK_T_(\w+):-(\d+)\}(?:\s+#.*)?$", _script_text(), re.M)
    for step, env, _ in found:
        assert env == step.upper(), f"BUDGET[{step}] is overridden by GPU_CHECK_T_{env}"
    return {step: int(secs) for step, _, secs in found}


def _const(name):
    m = re.search(rf"^{name}=(\d+)\b", _script_text(), re.M)
    assert m, f"{name}= not found in gpu_check.sh"
    return int(m.group(1))


def _run(args, env_extra=None, timeout=240):
    env = dict(os.environ)
    for var in list(env):  # the script's knobs, as a developer's shell might hold them
        if var.startswith("GPU_CHECK_") or var == "OUT":
            env.pop(var)
    env["PYTHON"] = sys.executable  # the interpreter running these tests, not whatever python3 is
    env.update(env_extra or {})
    return subprocess.run(["bash", SCRIPT] + args, env=env, capture_output=True, text=True, timeout=timeout)


def _summary(stdout):
    """{step: status} from the summary table, which must close the output."""
    lines = stdout.rstrip("\n").splitlines()
    assert lines and lines[-1].startswith("gpu_check: "), f"no verdict line last:\n{stdout[-2000:]}"
    heads = [i for i, ln in enumerate(lines) if ln.startswith("step ") and "status" in ln and "budget" in ln]
    assert heads, f"no summary table:\n{stdout[-2000:]}"
    rows = {}
    for ln in lines[heads[-1] + 1 : -1]:
        m = re.match(r"^(\S+)\s+(.*?)\s+(\d+\.\d)\s+(\d+)$", ln)
        assert m, f"bad summary row {ln!r}"
        rows[m.group(1)] = m.group(2)
    return rows


def test_budget_fits_the_window():
    steps, budgets = _steps(), _budgets()
    optional = [s for s in steps if s not in budgets]
    # ncu is the only step without a BUDGET line of its own: it runs only in the time left.
    assert optional == ["ncu"], f"steps without a BUDGET[...] line: {optional}"
    assert re.search(r"^OPTIONAL_BUDGET_ncu=\$\{GPU_CHECK_T_NCU:-\d+\}", _script_text(), re.M)
    assert set(budgets) == set(steps) - set(optional), f"budgets for unknown steps: {set(budgets) - set(steps)}"
    total, grace, slack = _const("TOTAL_BUDGET"), _const("KILL_GRACE"), _const("SLACK")
    assert total <= MAX_TOTAL
    need = sum(budgets.values()) + grace * len(steps) + slack
    assert need <= total, f"budgets {budgets} + {grace} s kill grace x {len(steps)} steps + {slack} s = {need} s > {total} s"
    text = _script_text()
    # Every step, the optional one too, is capped by one deadline that leaves the slack.
    assert "DEADLINE=$((T_START + TOTAL_BUDGET - SLACK))" in text
    assert re.search(r'timeout -k "\$KILL_GRACE" "\$t" bash -c "\$fn"', text), "run_step must use timeout"


def test_dry_run_quick(tmp_path):
    out = tmp_path / "out"
    r = _run(["--dry-run", "--quick", str(out)])
    rows = _summary(r.stdout)
    assert list(rows) == _steps(), f"summary rows {list(rows)} != steps {_steps()}"
    for step, status in rows.items():
        assert status == "pass" or status.startswith("skipped"), f"{step}: {status}\n{r.stdout[-3000:]}"
    for step in ("info", "build", "tests", "sweep", "bench"):
        assert rows[step] == "pass", f"{step} must run in a dry run, got {rows[step]}"
    assert rows["memcheck"] == rows["racecheck"] == "skipped (no GPU)"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert r.stdout.rstrip().endswith("gpu_check: all steps passed or skipped")
    # What the device tool brings back: at most 8 files, all of them here.
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    for name in ("gpu_check.log", "summary.tsv", "tests.tsv", "sweep.json", "bench.json"):
        assert name in files, f"{name} missing from {files}"
    assert "=== summary" in (out / "gpu_check.log").read_text()
    with open(out / "summary.tsv") as f:
        assert [ln.split("\t")[0] for ln in f.read().splitlines()[1:]] == _steps()
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["device"] == "cpu" and sweep["tiny"] and sweep["mode"] == "sweep+paths"
    names = [c["case"] for c in sweep["cases"]]
    assert any(n.startswith("paths: ") for n in names) and any(n.startswith("graph replay") for n in names)
    assert all(c["status"] == "pass" for c in sweep["cases"]), [c for c in sweep["cases"] if c["status"] != "pass"]
    # The soft-capped kernels ran in the dry run: in the sweep, in the sanitizer driver's cases,
    # and the Gemma-2-like model step; each printed as a passing line of the sweep's output.
    capped = [n for n in names if "softcap" in n]
    sweep_capped = [n for n in capped if not n.startswith("paths: ")]
    paths_capped = [n[len("paths: "):] for n in capped if n.startswith("paths: ")]
    assert paths_capped == [n for n, _ in _load_sweep().path_cases("cpu", tiny=True) if "softcap" in n]
    for family in ("flash fwd ", "flash fwd+bwd", "varlen", "decode ", "decode paged16", "attention_with_kvcache",
                   "model gemma2"):
        assert any(family in n for n in sweep_capped), f"no soft-capped {family!r} case in the sweep: {sweep_capped}"
    for n in capped:
        assert re.search(rf"^pass\s+{re.escape(n)}\s+max rel err", r.stdout, re.M), f"{n!r} not reported as passed"
    tests = (out / "tests.tsv").read_text().splitlines()
    assert len(tests) == 2 and "\tpass\t" in tests[1] and "skipped" in tests[1], tests


def test_time_box_and_skips(tmp_path):
    # The sweep gets 3 s and, through an interpreter wrapper that stalls only the sweep, needs
    # 60 (on a quiet machine the real tiny sweep can finish inside 3 s): TIMEOUT, a failed run,
    # and the table still last.
    wrapper = tmp_path / "slow_sweep_python"
    wrapper.write_text(f'#!/bin/bash\ncase " $* " in *gpu_sweep.py*) sleep 60;; esac\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    r = _run(["--dry-run", str(tmp_path / "out")], {"GPU_CHECK_T_SWEEP": "3", "PYTHON": str(wrapper),
                                                   "GPU_CHECK_SKIP": "tests memcheck bench"}, timeout=120)
    rows = _summary(r.stdout)
    assert rows["sweep"].startswith("TIMEOUT"), rows
    assert rows["tests"] == rows["bench"] == rows["memcheck"] == "skipped (GPU_CHECK_SKIP)", rows
    assert rows["build"] == "pass"
    assert r.returncode == 1
    assert r.stdout.rstrip().endswith("gpu_check: FAILED")


def test_failed_build_skips_the_rest(tmp_path):
    r = _run(["--dry-run", str(tmp_path)], {"PYTHON": "false"}, timeout=60)
    rows = _summary(r.stdout)
    assert rows["build"].startswith("FAIL"), rows
    for step in _steps()[2:]:
        assert rows[step] == "skipped (build failed)", (step, rows[step])
    assert r.returncode == 1


def _load_sweep():
    spec = importlib.util.spec_from_file_location("gpu_sweep", SWEEP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_path_cases_pass_on_cpu():
    sweep = _load_sweep()
    names = []
    for name, fn in sweep.path_cases("cpu", tiny=True):
        errs = {}
        fn(errs)
        assert errs, f"{name}: checked nothing"
        names.append(name)
    # Every kernel family the sanitizers must cover has a case.
    for family in ("rms_norm", "rope", "flash fwd+bwd", "varlen", "decode", "paged16", "append_kv",
                   "attention_with_kvcache"):
        assert any(family in n for n in names), family
    # ... and every soft-capped twin (the kSoftcap kernels): flash forward d64/d128 causal and
    # not, flash backward d64/d128, varlen, decode (1 split, splits + combine, paged, each head
    # dim), multi-query paged attention_with_kvcache.
    capped = [n for n in names if n.endswith(" softcap")]
    for d in ("d64", "d128"):
        assert any(f"flash fwd+bwd {d}" in n for n in capped), f"no capped flash backward {d}"
        for mode in ("causal", "full"):
            assert any(n.startswith("flash fwd") and f" {d} {mode}" in n for n in capped), (d, mode)
    for family in ("flash varlen fwd+bwd", "decode contiguous 1 split", "splits", "decode paged16", "decode d64",
                   "decode d256", "attention_with_kvcache Sq4 paged16"):
        assert any(family in n for n in capped), family


def test_softcap_cases_catch_an_uncapped_kernel(monkeypatch):
    """Each soft-capped path case fails when its op silently drops softcap= (the cap bends these
    scores far past the tolerance), and the checks pass again with the real op."""
    sweep = _load_sweep()
    fastattn = sweep.fastattn
    cases = dict(sweep.path_cases("cpu", tiny=True))
    ops = {"flash_attention": ["flash fwd+bwd d64 causal GQA 4/2 softcap", "flash fwd d128 causal Sq<Sk softcap"],
           "flash_attention_varlen": ["flash varlen fwd+bwd d128 causal softcap"],
           "decode_attention": ["decode paged16 4 splits softcap"],
           "attention_with_kvcache": ["attention_with_kvcache Sq4 paged16 softcap"]}
    for op, names in ops.items():
        real = getattr(fastattn, op)

        def uncapped(*a, _real=real, **k):
            k.pop("softcap", None)
            return _real(*a, **k)
        monkeypatch.setattr(fastattn, op, uncapped)
        for name in names:
            with pytest.raises(sweep.CaseFailed, match="relative error"):
                cases[name]({})
        monkeypatch.setattr(fastattn, op, real)
        errs = {}
        cases[names[0]](errs)
        assert errs and max(errs.values()) <= sweep.TOL[torch.bfloat16]
    # A case whose scores the cap would not bend is refused, not passed.
    with pytest.raises(sweep.CaseFailed, match="would not catch"):
        sweep.check_cap_bites(torch.ones(4), torch.ones(4), torch.bfloat16)


def test_sweep_checker_catches_wrong_results(monkeypatch):
    sweep = _load_sweep()
    fastattn = sweep.fastattn
    real = fastattn.rms_norm
    # 1% too large: inside bf16's rounding for one element, far outside it in the norm.
    monkeypatch.setattr(fastattn, "rms_norm", lambda *a, **k: real(*a, **k) * 1.03)
    with pytest.raises(sweep.CaseFailed, match="relative error"):
        sweep.case_rms_norm("cpu", torch.bfloat16, 4, 256, False, False)({})
    real_dec = fastattn.decode_attention
    monkeypatch.setattr(fastattn, "decode_attention",
                        lambda *a, **k: real_dec(*a, **k).index_fill(0, torch.tensor([0]), float("nan")))
    with pytest.raises(sweep.CaseFailed, match="non-finite"):
        sweep.case_decode("cpu", torch.bfloat16, 3, 64, 4, 2, 32)({})
    # The sweep's exit status follows its cases.
    monkeypatch.setattr(fastattn, "decode_attention", real_dec)
    assert sweep.main(["--device", "cpu", "--tiny", "-k", "decode B1x"]) == 0
    monkeypatch.setattr(fastattn, "decode_attention", lambda *a, **k: real_dec(*a, **k) * 2)
    assert sweep.main(["--device", "cpu", "--tiny", "-k", "decode B1x"]) == 1


_COLLECT_AS_CUDA = r"""
import os, sys, tempfile
import torch, fastattn
# Collect the suites as they parametrize themselves on a GPU machine (their shapes and peers
# are chosen at import from plugin.DEVICE); nothing is run.
torch.cuda.is_available = lambda: True
fastattn.cuda_built = lambda: True
import pytest
import fastattn.benchmarks as b
d = os.path.dirname(b.__file__)
ini = os.path.join(tempfile.mkdtemp(), "pytest.ini")
with open(ini, "w") as f:
    f.write("[pytest]\npython_files = bench_*.py\npython_functions = test_*\naddopts =\n")
sys.exit(pytest.main([d, "-c", ini, "--rootdir", d, "--collect-only", "-q", "-p", "no:cacheprovider",
                      "-k", sys.argv[1]]))
"""


def test_bench_selection_on_cuda():
    m = re.search(r"^BENCH_K='([^']+)'$", _script_text(), re.M)
    assert m, "BENCH_K='...' not found in gpu_check.sh"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _COLLECT_AS_CUDA, m.group(1)], capture_output=True, text=True,
                       env=env, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ids = [ln for ln in r.stdout.splitlines() if "::" in ln]
    for family in ("bench_decode.py", "bench_rms_norm.py", "bench_rotary.py", "bench_flash_attn.py",
                   "bench_flash_attn_bwd.py"):
        assert any(i.startswith(family) and i.endswith("fastattn]") for i in ids), f"no fastattn run of {family}"
    for banned in ("compile", "bench_model", "varlen", "kvcache", "math", "efficient"):
        assert not any(banned in i for i in ids), f"{banned} selected: {[i for i in ids if banned in i][:3]}"
    # the backward at the two headline lengths only (each step is 3.5 forwards)
    assert all("_s2048_" in i or "_s8192_" in i for i in ids if i.startswith("bench_flash_attn_bwd.py"))
    # The bench step's 90 s hold these CUDA benchmarks (inputs, warm-up, 20 rounds
    # each): the second H200 session ran 64 of them, the backward ones included, in 32 s.
    assert 20 <= len(ids) <= 75, len(ids)


def test_profile_shapes_script_runs_on_cpu():
    """scripts/gpu_profile_shapes.py (the benchmark shapes for ncu) runs its calls at tiny
    sizes on the CPU, so a GPU session does not find a broken script first."""
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_profile_shapes.py")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "gpu_profile_shapes: done on cpu" in r.stdout


def test_decode_ab_script_runs_on_cpu():
    """scripts/gpu_ab_decode.py (tensor-core vs CUDA-core decode, one process each) runs its
    plumbing on the CPU with --tiny: both sides time, and the table has a row per shape."""
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_ab_decode.py"), "--tiny"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("2x64x4/")]
    assert len(rows) == 2 and all(ln.rstrip().endswith("x") for ln in rows), r.stdout
