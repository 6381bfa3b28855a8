"""`python -m fastattn bench`: the suites ship in the package and run outside a source
checkout, stdout holds only the table (progress and pytest's output go elsewhere), the results
JSON records the run's metadata, '% of copy' is given only beyond the last-level cache, the
plot has one panel per op family in its own unit, and every error is one line.

Reports run on small synthetic results files; the real runs use --tiny sizes (seconds)."""
from __future__ import annotations

import glob
import json
import re
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastattn import __main__ as cli
from fastattn.benchmarks import meta, report, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG_BENCH = os.path.join(ROOT, "fastattn", "benchmarks")
MiB = 1 << 20
HAVE_MPL = report.matplotlib_missing() is None


def _row(op, impl, shape, dtype="float32", median_s=0.01, **kw):
    r = {"op": op, "impl": impl, "shape": shape, "dtype": dtype, "device": "cpu", "median_s": median_s,
         "times_s": [median_s] * 3}
    r.update(kw)
    return {"name": f"test[{op}-{impl}-{shape}-{dtype}]", "extra_info": r}


def synthetic_results(llc=32 * MiB, dirty=False, tiny=False):
    """A results file in the current format: memory-bound rows in and out of cache, compute-
    bound rows, model rows spanning more than 10x (log scale) and others within 2x (linear)."""
    big, small = 256 * MiB, 4 * MiB
    rows = [
        _row("rms_norm", "fastattn", "8192x4096", gbps=20.0, bytes=big, working_set_bytes=big, in_cache=False,
             pct_of_copy=66.7),
        _row("rms_norm", "F.rms_norm", "8192x4096", gbps=2.0, bytes=big, working_set_bytes=big, in_cache=False,
             pct_of_copy=6.7),
        _row("rms_norm+residual", "fastattn", "256x4096", gbps=80.0, bytes=small, working_set_bytes=small,
             in_cache=True),
        _row("rms_norm+residual", "F.rms_norm", "256x4096", gbps=40.0, bytes=small, working_set_bytes=small,
             in_cache=True),
        _row("flash_attn_fwd+causal", "fastattn", "1x2048x16x128", tflops=0.30, flops=10 ** 11),
        _row("flash_attn_fwd+causal", "sdpa", "1x2048x16x128", tflops=0.20, flops=10 ** 11),
        _row("flash_attn_fwd+bwd+causal", "fastattn", "1x2048x16x128", tflops=0.26, flops=3 * 10 ** 11),
        _row("decode_attention", "fastattn", "B4xS8192xH32/8xD128", gbps=22.0, bytes=big, working_set_bytes=big,
             in_cache=False, pct_of_copy=73.0),
        _row("model prefill", "fastattn", "B1 S256", tokens_per_s=7000.0, tokens=256),
        _row("model prefill", "torch", "B1 S256", tokens_per_s=5600.0, tokens=256),
        _row("model decode", "fastattn", "B16 ctx256", tokens_per_s=1900.0, tokens=16),
        _row("model decode", "torch", "B1 ctx256", tokens_per_s=150.0, tokens=1),
    ]
    block = {"device": "cpu", "device_name": "Test CPU", "cpu_model": "Test CPU", "cpu_flags": ["avx2", "fma"],
             "cpu_isa": "avx2", "cpu_threads": 2, "cpu_llc_bytes": llc, "gpu_model": None, "gpu_l2_bytes": None,
             "llc_bytes": llc, "torch": "2.13.0+cpu", "cuda": None, "fastattn": "0.1.0",
             "cuda_kernels_built": False, "python": "3.11.7", "git_commit": "a" * 40, "git_dirty": dirty,
             "date": "2026-12-01T20:41:38+00:00", "tiny": tiny, "rounds": 5,
             "copy_bandwidth": {"bytes": 256 * MiB, "working_set_bytes": 256 * MiB, "copy_gbps": 30.0,
                                "clone_gbps": 8.0, "copy_times_s": [0.01], "clone_times_s": [0.03]}}
    return {"benchmarks": rows, "fastattn": block}


@pytest.fixture
def results_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(synthetic_results()))
    return str(path)


def run_main(argv, capsys):
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(rc, out, err, *fragments, code=2):
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastattn: error: "), err
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
    assert rc == code, (rc, err)
    assert out == "", out


# ---- report: the table ----------------------------------------------------------------------
def test_report_prints_only_the_table_on_stdout(results_file, capsys):
    rc, out, err = run_main(["bench", "--report", results_file], capsys)
    assert rc == 0 and err == "", err
    lines = out.splitlines()
    assert lines[0].startswith("device: Test CPU (cpu), torch 2.13.0+cpu") and "commit aaaaaaaaaaaa" in lines[0]
    assert "dirty" not in lines[0]
    assert "avx2" in lines[1] and "2 threads" in lines[1] and "LLC 32 MiB" in lines[1]
    assert "copy bandwidth: 30.0 GB/s" in out and "256 MiB working set" in out
    table = {(ln.split()[0], ln.split()[3]): ln for ln in lines if ln.startswith(("rms_norm", "decode", "model"))}
    # beyond the LLC: % of copy; within it: "in cache", never a percentage
    assert table[("rms_norm", "fastattn")].endswith("67%")
    assert table[("rms_norm+residual", "fastattn")].endswith("in cache")
    assert "%" not in table[("rms_norm+residual", "F.rms_norm")]
    assert table[("decode_attention", "fastattn")].endswith("73%")
    assert "TFLOP/s" in out and "tok/s" in out


@pytest.mark.parametrize("row, fragment", [
    (dict(shape=None), "lacks shape"), (dict(median_s=0), "has median_s 0, not a positive time"),
    (dict(median_s="fast"), "has median_s 'fast'")])
def test_report_of_a_malformed_row_is_one_line(tmp_path, capsys, row, fragment):
    # A row without a field, or with a zero time, gave "KeyError: 'shape' (unexpected ...)" or a
    # ZeroDivisionError halfway through the table (benchmark audit).
    results = synthetic_results()
    info = results["benchmarks"][0]["extra_info"]
    for key, value in row.items():
        if value is None:
            del info[key]
        else:
            info[key] = value
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    rc, out, err = run_main(["bench", "--report", str(path)], capsys)
    assert_one_line_error(rc, out, err, f"--report {path}: benchmark row 0", fragment)


def test_percent_of_copy_rule():
    from fastattn.benchmarks import plugin

    llc = 32 * MiB
    out = plugin.memory_fields(2 * llc, 2 * llc, 0.01, 30.0, llc)
    assert out["in_cache"] is False and out["pct_of_copy"] == pytest.approx(100 * out["gbps"] / 30.0)
    inside = plugin.memory_fields(llc, llc // 2, 0.001, 30.0, llc)
    assert inside["in_cache"] is True and "pct_of_copy" not in inside
    assert inside["working_set_bytes"] == llc // 2 and inside["bytes"] == llc
    unknown = plugin.memory_fields(llc, llc, 0.001, 30.0, None)
    assert unknown["in_cache"] is None
    # the copy reference itself is measured well beyond the last-level cache
    for cache in (None, 1 * MiB, 32 * MiB, 256 * MiB):
        assert plugin.copy_working_set(cache) >= 4 * (cache or 0) and plugin.copy_working_set(cache) >= 256 * MiB
    # files that did not record the LLC (older format): whether a row was in cache is unknown
    meta_old = {"copy_bandwidth": {"copy_gbps": 30.0}}
    row = {"gbps": 60.0, "bytes": 8 * MiB, "pct_of_copy": 200.0, "median_s": 1e-3}
    assert report.pct_of_copy(row, meta_old) is None and report.format_pct(row, meta_old) == "?"
    assert report.format_pct(row, {"llc_bytes": 32 * MiB}) == "in cache"
    assert report.format_pct({**row, "bytes": 64 * MiB}, {"llc_bytes": 32 * MiB, **meta_old}) == "200%"


def test_speedup_summary_against_the_fastest_peer():
    res = {"benchmarks": [
        _row("flash", "fastattn", "S1", median_s=0.020),
        _row("flash", "sdpa", "S1", median_s=0.050),
        _row("flash", "sdpa-math", "S1", median_s=0.030),   # the fastest peer, not the first
        _row("flash", "fastattn", "S1", dtype="bfloat16", median_s=0.040),
        _row("flash", "sdpa", "S1", dtype="bfloat16", median_s=0.010),  # a peer that wins: < 1x
        _row("rotary", "fastattn", "S1", median_s=0.001),                # no peer: no summary row
        _row("rms", "F.rms_norm", "S1", median_s=0.001),                 # no fastattn row: none
    ]}
    rows = report.speedup_rows(res)
    assert [(r[0], r[2], r[4]) for r in rows] == [("flash", "bfloat16", "sdpa"), ("flash", "float32", "sdpa-math")]
    assert rows[0][6] == pytest.approx(0.25) and rows[1][6] == pytest.approx(1.5)
    lines = report.speedup_lines(res)
    assert lines[-2].endswith("0.25x") and lines[-1].endswith("1.50x")
    assert report.speedup_lines({"benchmarks": [_row("rotary", "fastattn", "S1")]}) == []


def test_report_reads_the_older_results_format(tmp_path, capsys):
    old = synthetic_results()
    old["fastattn"] = {"device": "cpu", "device_name": "x86_64", "torch": "2.13.0+cpu", "cuda": None,
                       "cpu_threads": 2, "git_commit": "b" * 40 + "-dirty", "date": "2026-12-01",
                       "copy_bandwidth": {"bytes": 256 * MiB, "copy_gbps": 32.0}}
    for b in old["benchmarks"]:
        b["extra_info"].pop("in_cache", None)
        b["extra_info"].pop("working_set_bytes", None)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    rc, out, err = run_main(["bench", "--report", str(path)], capsys)
    assert rc == 0, err
    assert "commit bbbbbbbbbbbb (dirty tree)" in out and "does not record the last-level cache" in out
    assert report.git_dirty(old["fastattn"]) is True


def test_metadata_fields():
    block = meta.collect("cpu")
    for key in ("git_commit", "git_dirty", "cpu_model", "cpu_flags", "cpu_isa", "cpu_threads", "cpu_llc_bytes",
                "gpu_model", "llc_bytes", "torch", "cuda", "fastattn", "date", "device", "device_name"):
        assert key in block, key
    import torch

    assert block["cpu_threads"] == torch.get_num_threads() and block["torch"] == torch.__version__
    assert block["cpu_flags"] is None or all(f in meta.RELEVANT_CPU_FLAGS for f in block["cpu_flags"])
    assert block["cpu_llc_bytes"] is None or block["cpu_llc_bytes"] >= 64 * 1024
    assert isinstance(block["cpu_model"], str) and block["cpu_model"]
    if meta.source_checkout() and os.path.isdir(os.path.join(ROOT, ".git")):
        assert len(block["git_commit"]) == 40 and isinstance(block["git_dirty"], bool)
    json.dumps(block)  # everything serialisable


def test_git_state_outside_a_checkout(tmp_path):
    assert meta.git_state(str(tmp_path)) == (None, None)


def test_default_results_location(tmp_path):
    inside = runner.default_out("cpu", cwd=ROOT)
    outside = runner.default_out("cpu", cwd=str(tmp_path))
    if meta.source_checkout():
        assert inside.startswith(os.path.join(ROOT, "benchmarks", "results", "cpu-")) and inside.endswith(".json")
    assert os.path.dirname(outside) == str(tmp_path)
    assert os.path.basename(outside).startswith("fastattn-bench-cpu-")
    # a --tiny run never lands in the checkout's committed results
    import tempfile

    if meta.source_checkout():
        tiny = runner.default_out("cpu", cwd=ROOT, tiny=True)
        assert os.path.dirname(tiny) == tempfile.gettempdir()
        assert os.path.basename(tiny).startswith("fastattn-bench-tiny-cpu-")
    assert os.path.dirname(runner.default_out("cpu", cwd=str(tmp_path), tiny=True)) == str(tmp_path)


@pytest.mark.source_tree
def test_benchmark_files_are_not_collected_as_tests():
    names = os.listdir(PKG_BENCH)
    assert any(n.startswith("bench_") for n in names)
    assert not [n for n in names if n.startswith("test_") or n == "conftest.py"], names
    assert not glob.glob(os.path.join(ROOT, "benchmarks", "*.py")) or \
        sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))) == ["run.py"]


# ---- report: the plot -----------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed")
def test_plot_one_panel_per_family_in_its_own_unit(tmp_path, results_file, capsys):
    png = tmp_path / "plot.png"
    rc, out, err = run_main(["bench", "--report", results_file, "--plot", str(png)], capsys)
    assert rc == 0 and out.startswith("device:")
    assert err.strip() == f"plot: {png}"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

    fig = report.figure(synthetic_results())
    panels = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_visible() and ax.get_title()}
    assert set(panels) == {"RMSNorm", "FlashAttention forward", "FlashAttention forward + backward",
                           "decode attention over a KV cache", "model prefill", "model decode step"}
    assert panels["RMSNorm"].get_ylabel().startswith("GB/s")
    assert panels["FlashAttention forward"].get_ylabel() == "TFLOP/s"
    assert panels["model prefill"].get_ylabel() == "tok/s"
    # log scale where a panel spans 10x or more, linear otherwise
    assert panels["RMSNorm"].get_yscale() == "log"            # 2 .. 80 GB/s
    assert panels["model decode step"].get_yscale() == "log"  # 150 .. 1900 tok/s
    assert panels["model prefill"].get_yscale() == "linear"   # 5600 .. 7000 tok/s
    # impls side by side, one legend per panel, the in-cache bars marked
    legend = [t.get_text() for t in panels["RMSNorm"].get_legend().get_texts()]
    assert legend[:2] == ["fastattn", "F.rms_norm"] and "in cache (no % of copy)" in legend
    assert any(t.get_text() == "copy 30 GB/s" for t in panels["RMSNorm"].get_legend().get_texts())
    assert all(ax.get_legend() is not None for ax in panels.values())
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_plot_without_matplotlib_is_one_line(results_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, out, err = run_main(["bench", "--report", results_file, "--plot", str(tmp_path / "p.png")], capsys)
    assert_one_line_error(rc, out, err, "--plot", "pip install matplotlib", "fastattn[bench]")
    assert not (tmp_path / "p.png").exists()


# ---- argument errors: one line, exit 2, nothing run -----------------------------------------
def test_bench_argument_errors(tmp_path, results_file, capsys, monkeypatch):
    monkeypatch.setattr(runner, "run_suites", lambda *a, **k: pytest.fail("benchmarks ran despite a bad argument"))

    def check(argv, *fragments):
        rc, out, err = run_main(["bench", *argv], capsys)
        assert_one_line_error(rc, out, err, *fragments)

    check(["--report", str(tmp_path / "none.json")], "--report", "no such file")
    check(["--report", str(tmp_path)], "--report", "is a folder")
    (tmp_path / "bad.json").write_text("{nope")
    check(["--report", str(tmp_path / "bad.json")], "--report", "not valid JSON")
    (tmp_path / "list.json").write_text("[1, 2]")
    check(["--report", str(tmp_path / "list.json")], "--report", "not a benchmark results file")
    check(["--report", results_file, "-k", "rms"], "--report", "-k")
    check(["--report", results_file, "--out", "x.json", "--tiny"], "--report", "--out, --tiny")
    check(["--out", str(tmp_path)], "--out", "is a folder")
    (tmp_path / "f").write_text("")
    check(["--out", str(tmp_path / "f" / "r.json")], "--out", "not a folder")
    check(["--log", str(tmp_path / "missing" / "b.log")], "--log", "no such folder")
    check(["--plot", str(tmp_path / "missing" / "p.png")], "--plot", "no such folder")
    if HAVE_MPL:
        check(["--plot", str(tmp_path / "p.xyz")], "--plot", ".xyz")
    check(["--tiny", "--readme"], "--readme")
    check(["--bogus"], "--bogus", "python -m fastattn bench --help")
    monkeypatch.setattr(runner, "missing_runtime", lambda: "bench needs pytest-benchmark, which is not installed: "
                                                           "pip install 'fastattn[bench]'")
    check([], "pytest-benchmark", "fastattn[bench]")


def test_readme_only_from_a_clean_commit(tmp_path, capsys, monkeypatch):
    readme = os.path.join(ROOT, "README.md")
    before = open(readme).read() if os.path.exists(readme) else None
    monkeypatch.setattr(meta, "source_checkout", lambda: ROOT)
    for name, results, frag in (("dirty", synthetic_results(dirty=True), "dirty tree"),
                                ("tiny", synthetic_results(tiny=True), "--tiny"),
                                ("nogit", {**synthetic_results(), "fastattn": {**synthetic_results()["fastattn"],
                                                                               "git_commit": None,
                                                                               "git_dirty": None}}, "git commit")):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(results))
        rc, out, err = run_main(["bench", "--report", str(path), "--readme"], capsys)
        assert_one_line_error(rc, out, err, "--readme", frag)
    if before is not None:
        assert open(readme).read() == before
    # a clean commit's results are written between the markers (into a copy of the README)
    (tmp_path / "README.md").write_text("# x\n<!-- perf:begin -->\nold\n<!-- perf:end -->\ntail\n")
    note = report.write_readme(synthetic_results(), str(tmp_path / "r.json"), str(tmp_path))
    text = (tmp_path / "README.md").read_text()
    assert "perf-file:r.json" in text and "commit aaaaaaaaaaaa" in text and text.endswith("tail\n")
    assert "performance section updated" in note


def test_bench_paths_are_relative_to_the_callers_folder(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_run(out, filter_expr=None, tiny=False, log_path=None, **kw):
        seen.update(out=out, filter=filter_expr, tiny=tiny, log=log_path)
        return synthetic_results(), [], None

    monkeypatch.setattr(runner, "run_suites", fake_run)
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_main(["bench", "--out", "sub/r.json", "--log", "b.log", "-k", "rms", "--tiny"], capsys)
    assert rc == 0, err
    assert seen == {"out": str(tmp_path / "sub" / "r.json"), "filter": "rms", "tiny": True,
                    "log": str(tmp_path / "b.log")}
    # --out's missing folders are made when the results are written (by run_suites), not
    # before the run: a run that fails or is interrupted leaves no empty folders behind
    assert not (tmp_path / "sub").exists() and out.startswith("device:")


# ---- real (tiny) runs in subprocesses, from a folder outside the source tree ----------------
FAILING_SUITE = '''
import pytest
from fastattn.benchmarks.plugin import DEVICE


def test_ok(bench):
    bench(lambda: None, op="noop", impl="fastattn", shape="1", dtype="float32")


def test_broken(bench):
    raise RuntimeError("kernel exploded\\nsecond line")


def test_peer_without_backend(bench):
    pytest.skip("unavailable: no such backend here")
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The CLI as a user of the wheel runs it: a copy of the built package (what a wheel
    installs: no benchmarks/, no pyproject.toml, no .git around it) on PYTHONPATH, run from a
    folder outside the checkout; all cases at once, as each pays for a torch import."""
    import shutil

    work = tmp_path_factory.mktemp("bench_cli")
    site = work / "site"
    shutil.copytree(os.path.join(ROOT, "fastattn"), site / "fastattn", ignore=shutil.ignore_patterns("__pycache__"))
    res = work / "synthetic.json"
    res.write_text(json.dumps(synthetic_results()))
    failing = work / "failing"
    failing.mkdir()
    (failing / "bench_failing.py").write_text(FAILING_SUITE)
    env = {k: v for k, v in os.environ.items() if k not in ("FASTATTN_DEBUG", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(site) + os.pathsep + env.get("PYTHONPATH", "")
    plot_args = ["--plot", str(work / "tiny.png")] if HAVE_MPL else []
    failing_run = ("import sys; from fastattn import __main__ as m; from fastattn.benchmarks import runner; "
                   f"runner.PACKAGE_DIR = {str(failing)!r}; m.main(['bench', '--tiny', '--out', 'f.json'])")
    cases = {
        "help": ["-m", "fastattn", "bench", "--help"],
        "report": ["-m", "fastattn", "bench", "--report", str(res)],
        "tiny": ["-m", "fastattn", "bench", "--tiny", "-k", "rms_norm", *plot_args],
        "no_match": ["-m", "fastattn", "bench", "--tiny", "-k", "no_such_benchmark", "--out", "missing/r.json"],
        "kvcache": ["-m", "fastattn", "bench", "--tiny", "-k", "kvcache", "--out", "kv.json"],
        "failing": ["-c", failing_run],
    }
    folders = {name: work / name for name in cases}

    def run(name):
        folders[name].mkdir(exist_ok=True)
        return subprocess.run([sys.executable, *cases[name]], capture_output=True, text=True, timeout=240,
                              env=env, cwd=str(folders[name]))

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        done = dict(zip(cases, pool.map(run, cases)))
    return done, folders, work


@pytest.mark.source_tree
def test_help_outside_the_checkout(runs):
    r = runs[0]["help"]
    assert r.returncode == 0 and r.stderr == ""
    text = " ".join(r.stdout.split())
    assert "benchmarks/results/<device>-<date>.json when run from inside" in text
    assert "./fastattn-bench-<device>-<date>.json in the current folder" in text
    assert "fastattn[bench]" in text


@pytest.mark.source_tree
def test_report_outside_the_checkout(runs):
    r = runs[0]["report"]
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("device: Test CPU") and "in cache" in r.stdout


@pytest.mark.source_tree
def test_tiny_run_table_on_stdout_progress_on_stderr(runs):
    r = runs[0]["tiny"]
    folder = runs[1]["tiny"]
    assert r.returncode == 0, r.stderr
    # stdout: the table and nothing else (no pytest dots, no progress, no carriage returns)
    assert r.stdout.startswith("device: ") and "\r" not in r.stdout
    assert "passed" not in r.stdout and "[1/" not in r.stdout and "bench:" not in r.stdout
    table, _, summary = r.stdout.partition("fastattn against the fastest peer")
    rows = [ln for ln in table.splitlines() if ln.startswith("rms_norm")]
    assert len(rows) == 4 and all(ln.endswith("in cache") for ln in rows), r.stdout
    # the summary: one line per (op, shape, dtype) with fastattn and a peer, speedup = peer / ours
    speedups = [ln for ln in summary.splitlines() if ln.startswith("rms_norm")]
    assert len(speedups) == 2 and all(re.search(r"F\.rms_norm +[0-9.]+ ms +[0-9.]+x$", ln) for ln in speedups), r.stdout
    # stderr: one line per benchmark (not a terminal: plain lines), then where the results went
    err = r.stderr.splitlines()
    assert err[0] == "bench: 4 benchmarks"
    assert [ln.split("]")[0] for ln in err[1:5]] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert "rms_norm" in err[1] and "GB/s (in cache)" in err[1]
    summary = [ln for ln in err if ln.startswith("bench: 4 ran")]
    assert summary, r.stderr
    # results written to the current folder (not a source checkout there), with the metadata
    out = glob.glob(str(folder / "fastattn-bench-cpu-*.json"))
    assert len(out) == 1 and out[0] in summary[0]
    block = json.load(open(out[0]))["fastattn"]
    for key in ("git_commit", "git_dirty", "cpu_model", "cpu_flags", "cpu_threads", "llc_bytes", "gpu_model",
                "torch", "cuda", "fastattn", "cpu_isa", "date", "copy_bandwidth"):
        assert key in block, key
    assert block["tiny"] is True and block["copy_bandwidth"]["working_set_bytes"] > (block["llc_bytes"] or 0)
    assert block["git_commit"] is None and block["git_dirty"] is None  # no checkout around a wheel
    assert "commit unknown (not a git checkout)" in r.stdout.splitlines()[0]
    if HAVE_MPL:
        assert f"plot: {runs[2] / 'tiny.png'}" in r.stderr
        assert (runs[2] / "tiny.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.source_tree
def test_tiny_kvcache_suite(runs):
    """bench_kvcache.py at tiny sizes: paged vs contiguous decode at every page size, and
    attention_with_kvcache against SDPA (and decode_attention at Sq = 1), contiguous and paged."""
    r = runs[0]["kvcache"]
    assert r.returncode == 0, r.stderr
    assert "0 failed" in r.stderr and "FAILED" not in r.stderr, r.stderr
    rows = report.rows_of(json.load(open(runs[1]["kvcache"] / "kv.json")))
    got = {(row["op"], row["shape"].rsplit("/", 1)[1], row["impl"]) for row in rows}
    for page in ("page1", "page16", "page256"):
        assert {("decode_attention+paged", page, "fastattn"),
                ("decode_attention+paged", page, "fastattn-contiguous")} <= got, got
    for layout in ("contiguous", "page16"):
        assert {("attention_with_kvcache", layout, impl) for impl in ("fastattn", "fastattn-decode", "sdpa")} <= got
    # the chunked-prefill step: TFLOP/s against SDPA (its GB/s recorded too)
    prefill = [row for row in rows if row["op"] == "attention_with_kvcache+chunked_prefill"]
    assert {row["impl"] for row in prefill} == {"fastattn", "sdpa"}
    assert all(row["tflops"] > 0 and row["flops"] > 0 for row in prefill), prefill
    # every row: GB/s of the same bytes for every implementation of a group
    groups = {}
    for row in rows:
        assert row["gbps"] > 0 and "in_cache" in row, row
        groups.setdefault((row["op"], row["shape"], row["dtype"]), set()).add(row["bytes"])
    assert all(len(b) == 1 for b in groups.values()), groups
    # the speedup summary compares against other libraries only: the kvcache rows against SDPA,
    # not fastattn's own routes (decode_attention, the contiguous cache for the paged rows),
    # which stay in the table (an 0.88x against fastattn-decode read as "keep torch's kernel")
    summary = r.stdout.partition("fastattn against the fastest peer")[2]
    assert "attention_with_kvcache" in summary and "decode_attention+paged" not in summary
    assert "fastattn-" not in summary


@pytest.mark.source_tree
def test_tiny_end_to_end_and_gemm_rate(tmp_path):
    """bench_e2e.py at tiny sizes: our model on fastattn / on its torch backend / transformers
    with sdpa, and transformers with fastattn / sdpa, one interleaved measurement feeding both
    groups, every way generating the same greedy tokens; attention rows carry % of the GEMM
    rate measured in the same run (fp32 and bf16), recorded with the ISA tier and threads.
    (Its own run, not in `runs`: loading transformers and four models takes longer than the
    others, and a slow run must not time out theirs.)"""
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTATTN_DEBUG", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "fastattn", "bench", "--tiny", "-k",
                        "e2e or (bench_flash_attn and not bwd)", "--out", "e2e.json"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "0 failed" in r.stderr and "FAILED" not in r.stderr, r.stderr
    results = json.load(open(tmp_path / "e2e.json"))
    rows = report.rows_of(results)
    gen = {(row["op"], row["impl"]): row for row in rows if row["op"].startswith("generate")}
    assert set(gen) == {("generate (our model)", i) for i in ("fastattn", "torch", "transformers-sdpa")} | {
        ("generate (transformers)", i) for i in ("fastattn", "sdpa")}, set(gen)
    for row in gen.values():
        assert row["tokens_agree"] == 1.0 and row["tokens_per_s"] > 0, row
        assert len(row["times_s"]) == row["rounds_interleaved"] and row["median_s"] > 0
        assert row["tokens"] == row["batch"] * row["new_tokens"]
    # the transformers-sdpa peer of our model is the same measurement as the sdpa row
    assert gen[("generate (our model)", "transformers-sdpa")]["times_s"] == gen[("generate (transformers)",
                                                                                     "sdpa")]["times_s"]
    block = results["fastattn"]
    assert block["cpu_isa"] and block["cpu_threads"] >= 1 and block["cpu_model"]
    gemm = block["gemm"]
    assert gemm["n"] > 0 and all(gemm[d]["tflops"] > 0 for d in ("float32", "bfloat16"))
    attn = [row for row in rows if row["op"].startswith("flash_attn_fwd")]
    assert attn
    for row in attn:
        roof = max(gemm[row["dtype"]]["tflops"], gemm["float32"]["tflops"])  # (meta.gemm_roof_tflops)
        assert row["pct_of_gemm"] == pytest.approx(100 * row["tflops"] / roof)
    # the table: a % GEMM column, the GEMM rates in the header, both generate groups in the summary
    assert "% GEMM" in r.stdout and "GEMM rate: float32 " in r.stdout
    summary = r.stdout.partition("fastattn against the fastest peer")[2]
    assert "generate (our model)" in summary and "generate (transformers)" in summary


def test_gemm_fields_and_the_gemm_column(capsys):
    from fastattn.benchmarks.plugin import gemm_fields

    import torch

    gemm = {"n": 2048, "flops": 2 * 2048**3, "float32": {"tflops": 2.0}, "bfloat16": {"tflops": 4.0}}
    bf16 = gemm_fields(10**12, 1.0, torch.bfloat16, gemm)
    assert bf16["tflops"] == pytest.approx(1.0) and bf16["pct_of_gemm"] == pytest.approx(25.0)
    assert gemm_fields(10**12, 1.0, torch.float16, gemm)["pct_of_gemm"] == pytest.approx(50.0)  # fp32's rate
    assert "pct_of_gemm" not in gemm_fields(10**12, 1.0, torch.float32, None)
    # torch.mm in bf16 on a CPU without native bf16 (AVX2: ~3e-4 TFLOP/s) is no roof for a
    # kernel that widens to fp32: the faster rate is (a bf16 row read as ~50000% before)
    slow_bf16 = {"n": 2048, "float32": {"tflops": 2.0}, "bfloat16": {"tflops": 3e-4}}
    assert gemm_fields(10**12, 1.0, torch.bfloat16, slow_bf16)["pct_of_gemm"] == pytest.approx(50.0)
    assert report.format_gemm({"dtype": "bfloat16", "tflops": 1.0, "pct_of_gemm": 1e5},
                              {"gemm": slow_bf16}) == "50%"  # a file written under the old rule
    assert "bfloat16 0.0003 TFLOP/s" in "\n".join(report.header_lines({"fastattn": {"gemm": slow_bf16}}))
    res = synthetic_results()
    report.print_table(res)
    old = capsys.readouterr().out
    assert "% GEMM" not in old and "GEMM rate" not in old  # files from before the GEMM rate read as before
    res["fastattn"]["gemm"] = gemm
    for b in res["benchmarks"]:
        if "tflops" in b["extra_info"]:
            b["extra_info"]["pct_of_gemm"] = 100 * b["extra_info"]["tflops"] / 2.0
    report.print_table(res)
    out = capsys.readouterr().out
    assert "GEMM rate: float32 2.000 TFLOP/s, bfloat16 4.000 TFLOP/s" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("flash_attn_fwd+causal") and " sdpa " in ln)
    assert line.endswith("10%"), line


@pytest.mark.source_tree
def test_no_matching_benchmark_is_one_line(runs):
    r = runs[0]["no_match"]
    assert_one_line_error(r.returncode, r.stdout, r.stderr, "-k 'no_such_benchmark' selects no benchmark")
    # pytest-benchmark creates its JSON file as it starts: a run that ends without results (or
    # is interrupted) left an empty results file behind, which bench --report then refused.
    assert list(runs[1]["no_match"].glob("*.json")) == []
    assert not (runs[1]["no_match"] / "missing").exists()  # --out's folder: made only for results


@pytest.mark.source_tree
def test_failing_benchmark_is_one_line_and_exit_1(runs):
    r = runs[0]["failing"]
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fastattn: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert "1 benchmark failed" in errors[0] and "test_broken" in errors[0] and "kernel exploded" in errors[0]
    assert "pytest log: " in errors[0]
    log = errors[0].rsplit("pytest log: ", 1)[1].rstrip(")")
    assert os.path.isfile(log) and "kernel exploded" in open(log).read()
    os.remove(log)  # kept for the user; this test's copy goes
    # the benchmark that worked is still in the table and the results file
    assert "noop" in r.stdout and os.path.isfile(runs[1]["failing"] / "f.json")
    # a skipped benchmark (a peer without its backend) has no row: the results file and the
    # table say which are missing, or the speedups against the others look complete
    assert "unavailable here (1: not in the table" in r.stdout and "no such backend here" in r.stdout
    saved = json.loads((runs[1]["failing"] / "f.json").read_text())
    assert saved["fastattn_skipped"] == [["bench_failing::peer_without_backend", "no such backend here"]]
