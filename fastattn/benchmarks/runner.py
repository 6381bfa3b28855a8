"""`python -m fastattn bench`: run the suites of this package with pytest-benchmark in a quiet
subprocess, draw one progress line per benchmark on stderr, and print only the table on
stdout. pytest's own output goes to a log file, whose path is given on failure.

The CLI (fastattn.__main__) checks every argument before anything heavy runs; errors reach it
as BenchUsageError (bad input, exit 2) or BenchError (a benchmark failed, exit 1), one line each.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from fastattn.benchmarks import meta, report

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# The pytest configuration of a benchmark run, written to a private ini file so that no
# pytest.ini / pyproject.toml / setup.cfg above the install location changes the run.
PYTEST_INI = """\
[pytest]
python_files = bench_*.py
python_functions = test_*
addopts =
filterwarnings =
    ignore::DeprecationWarning
"""


class BenchError(Exception):
    """A benchmark run that failed (one line; the CLI exits with code 1)."""


class BenchUsageError(Exception):
    """A bad -k expression or the like, found by pytest (one line; the CLI exits with code 2)."""


def default_out(device: str, cwd=None, tiny: bool = False) -> str:
    """benchmarks/results/<device>-<date>.json inside the source checkout fastattn runs from
    (when the current folder is inside it), else fastattn-bench-<device>-<date>.json in the
    current folder. A --tiny run's numbers mean nothing, so inside the checkout they never land
    beside the committed results: fastattn-bench-tiny-<device>-<date>.json in the temporary
    folder instead."""
    cwd = os.path.abspath(cwd or os.getcwd())
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    root = meta.source_checkout()
    if root is not None:
        real_root, real_cwd = os.path.realpath(root), os.path.realpath(cwd)
        if real_cwd == real_root or real_cwd.startswith(real_root + os.sep):
            if tiny:
                import tempfile

                return os.path.join(tempfile.gettempdir(), f"fastattn-bench-tiny-{device}-{stamp}.json")
            return os.path.join(root, "benchmarks", "results", f"{device}-{stamp}.json")
    return os.path.join(cwd, f"fastattn-bench-{device}-{stamp}.json")


def missing_runtime():
    """None when pytest and pytest-benchmark can be imported, else the one-line reason."""
    import importlib.util

    missing = [m for m, spec in (("pytest", "pytest"), ("pytest-benchmark", "pytest_benchmark"))
               if importlib.util.find_spec(spec) is None]
    if missing:
        return (f"bench needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
                f"pip install 'fastattn[bench]' (or pip install {' '.join(missing)})")
    return None


# How the suites' skip messages start when an implementation cannot run here (a peer without
# its backend, a build without a kernel): those are recorded in the results and the table.
UNAVAILABLE = "unavailable: "


class _Progress:
    """One progress line per benchmark on stderr: a tqdm bar (with each finished benchmark
    written above it) when stderr is a terminal, a plain line per benchmark otherwise, so
    logs stay clean. Nothing here touches stdout."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        self.total = None
        self.done = 0
        self.counts = {"passed": 0, "skipped": 0, "failed": 0}
        self.failures = []
        self.skips = []
        self.collect_errors = []

    def _line(self, text):
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def handle(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "total":
            self.total = ev.get("total")
            if self.tty:
                try:
                    from tqdm import tqdm

                    self.bar = tqdm(total=self.total, desc="bench", unit="bench", file=self.stream,
                                    dynamic_ncols=True, leave=False)
                except ImportError:
                    self.bar = None
            if self.bar is None and self.total:
                self._line(f"bench: {self.total} benchmarks")
        elif kind == "collect_error":
            self.collect_errors.append((ev.get("nodeid"), ev.get("message")))
            self._line(f"bench: cannot collect {ev.get('nodeid')}: {ev.get('message')}")
        elif kind == "start" and self.bar is not None:
            self.bar.set_postfix_str(_short(ev.get("nodeid", "")), refresh=True)
        elif kind == "end":
            self.done += 1
            outcome = ev.get("outcome", "passed")
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            if outcome == "failed":
                self.failures.append((ev.get("nodeid"), ev.get("message")))
            elif outcome == "skipped":
                reason = ev.get("message", "").removeprefix("Skipped: ")
                if reason.startswith(UNAVAILABLE):  # (not the suites' by-design skips)
                    self.skips.append((_short(ev.get("nodeid", "")), reason[len(UNAVAILABLE):]))
            width = len(str(self.total or 0))
            head = f"[{self.done:>{width}}/{self.total}]" if self.total else f"[{self.done}]"
            self._line(f"{head} {_short(ev.get('nodeid', ''))}  {_describe(outcome, ev)}")
            if self.bar is not None:
                self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()  # leave=False: the bar line is cleared, nothing stays behind
            self.bar = None


def _short(nodeid: str) -> str:
    return nodeid.rsplit("/", 1)[-1].replace(".py::test_", "::")


def _describe(outcome: str, ev: dict) -> str:
    secs = f"{ev.get('seconds', 0):.1f} s"
    if outcome == "skipped":
        return f"skipped ({ev.get('message', '')})"
    if outcome == "failed":
        return f"FAILED ({ev.get('message', '')})"
    r = ev.get("result") or {}
    thr = report.format_throughput(r)
    if r.get("in_cache"):
        thr += " (in cache)"
    elif isinstance(r.get("pct_of_copy"), (int, float)):
        thr += f" ({r['pct_of_copy']:.0f}% of copy)"
    elif isinstance(r.get("pct_of_gemm"), (int, float)):
        thr += f" ({r['pct_of_gemm']:.0f}% of GEMM)"
    return f"{thr}  [{secs}]" if thr else f"ok  [{secs}]"


def _last_error_line(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if ln.startswith(("ERROR", "E ")) or "error:" in ln.lower():
            return ln
    return lines[-1] if lines else ""


def run_suites(out: str, filter_expr=None, tiny: bool = False, log_path=None, progress_stream=None,
               suites_dir=None):
    """Run the suites and write `out` (the results JSON). Returns (results, failures, log path):
    the JSON's contents, [(benchmark, one-line reason)] of failed benchmarks, and where pytest's
    output went: `log_path`, or a temporary file that is kept only when something failed.
    `suites_dir`: the folder of bench_*.py files (this package's by default)."""
    keep_log = log_path is not None
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="fastattn-bench-", suffix=".log")
        os.close(fd)
    # pytest's config file and pytest-benchmark's storage folder: a private folder, removed after.
    workdir = tempfile.mkdtemp(prefix="fastattn-bench-")
    failed = True
    try:
        results, failures = _run(out, filter_expr, tiny, log_path, progress_stream, suites_dir or PACKAGE_DIR,
                                 workdir)
        failed = bool(failures)
    except (BenchUsageError, KeyboardInterrupt):
        failed = False  # a bad -k or Ctrl-C: the log holds nothing the message does not say
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if not keep_log and not failed:
            try:
                os.remove(log_path)
            except OSError:
                pass
    return results, failures, log_path


def _run(out, filter_expr, tiny, log_path, progress_stream, suites_dir, workdir):
    ini = os.path.join(workdir, "pytest.ini")
    # pytest-benchmark creates its JSON file when it starts: written in the work folder and
    # moved to `out` once complete, an interrupted run leaves no empty results file there (nor
    # removes an earlier one).
    partial = os.path.join(workdir, "results.json")
    with open(ini, "w") as f:
        f.write(PYTEST_INI)
    cmd = [sys.executable, "-m", "pytest", suites_dir, "-c", ini, "--rootdir", suites_dir, "-q", "-rfEs",
           "-p", "no:cacheprovider", "-p", "pytest_benchmark.plugin", "-p", "fastattn.benchmarks.plugin",
           "--benchmark-only", "--benchmark-save-data", f"--benchmark-json={partial}", "--benchmark-disable-gc",
           "--benchmark-columns=median,rounds", f"--benchmark-storage=file://{os.path.join(workdir, 'storage')}"]
    if filter_expr:
        cmd += ["-k", filter_expr]
    env = dict(os.environ)
    # The same fastattn as this process (a checkout on PYTHONPATH, an editable or a wheel
    # install), and no third-party pytest plugins or options from the environment.
    env["PYTHONPATH"] = meta.package_root() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_PLUGINS", None)
    env["FASTATTN_BENCH_TINY"] = "1" if tiny else "0"
    read_fd, write_fd = os.pipe()
    env["FASTATTN_BENCH_PROGRESS_FD"] = str(write_fd)
    progress = _Progress(progress_stream)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=workdir, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        try:
            with os.fdopen(read_fd, "r") as events:
                for line in events:
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    progress.handle(ev)
            rc = proc.wait()
        except BaseException:  # Ctrl-C: stop the benchmarks too
            proc.kill()
            proc.wait()
            raise
        finally:
            progress.close()
    secs = time.perf_counter() - t0
    c = progress.counts
    where = f"pytest log: {log_path}"
    if rc == 5 or (rc == 0 and progress.total == 0):
        raise BenchUsageError(f"-k {filter_expr!r} selects no benchmark (names look like "
                              "bench_rms_norm.py::test_rms_norm[plain-8192x4096-float32-fastattn])")
    if rc == 4:
        raise BenchUsageError(f"pytest refused the run: {_last_error_line(log_path)}")
    if progress.collect_errors:
        nodeid, msg = progress.collect_errors[0]
        raise BenchError(f"bench: cannot load {nodeid}: {msg} ({where})")
    if rc not in (0, 1) or not os.path.exists(partial):
        raise BenchError(f"bench: pytest exited with code {rc} before writing results: "
                         f"{_last_error_line(log_path)} ({where})")
    with open(partial) as f:
        results = json.load(f)
    if progress.skips:
        # An implementation that could not run has no row: recorded, so that the table says
        # which are missing (a peer skipped for want of a backend must not leave the speedups
        # against the others looking complete).
        results["fastattn_skipped"] = [list(s) for s in progress.skips]
        with open(partial, "w") as f:
            json.dump(results, f, indent=4)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # (--out's missing folders, now)
    shutil.move(partial, out)
    failures = list(progress.failures)
    if rc == 1 and not failures:
        failures = [("?", _last_error_line(log_path))]
    summary = f"bench: {c.get('passed', 0)} ran, {c.get('skipped', 0)} skipped, {c.get('failed', 0)} failed " \
              f"in {secs:.0f} s; results: {out}"
    sys.stderr.write(summary + "\n")
    sys.stderr.flush()
    return results, failures
