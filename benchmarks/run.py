"""Run the benchmark suite, save the results JSON, print a table, optionally plot.

    python benchmarks/run.py [--out PATH] [--plot PNG] [-k EXPR]
    python -m fastattn bench ...            (the same)
    python benchmarks/run.py --report PATH  (table/plot from an existing results file)

Results go to benchmarks/results/<device>-<date>.json by default, written by this tooling
only (pytest-benchmark's JSON plus a "fastattn" block: device, versions, commit, date,
copy bandwidth, and every raw timing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def rows_of(results: dict):
    rows = []
    for b in results.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "op" in info:
            rows.append(info)
    return rows


def print_table(results: dict, file=sys.stdout) -> None:
    meta = results.get("fastattn", {})
    copy = meta.get("copy_bandwidth") or {}
    print(f"device: {meta.get('device_name')} ({meta.get('device')}), torch {meta.get('torch')}, "
          f"commit {str(meta.get('git_commit'))[:12]}, {meta.get('date')}", file=file)
    if copy:
        print(f"copy bandwidth: {copy.get('copy_gbps', 0):.1f} GB/s (copy_ into a preallocated tensor); "
              f"clone {copy.get('clone_gbps', 0):.1f} GB/s", file=file)
    header = f"{'op':<26} {'shape':<26} {'dtype':<9} {'impl':<24} {'time':>10} {'throughput':>14} {'% copy':>7}"
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in sorted(rows_of(results), key=lambda r: (r["op"], r["shape"], r["dtype"], r["impl"])):
        if "tflops" in r:
            thr = f"{r['tflops']:.2f} TFLOP/s"
        elif "gbps" in r:
            thr = f"{r['gbps']:.1f} GB/s"
        elif "tokens_per_s" in r:
            thr = f"{r['tokens_per_s']:.1f} tok/s"
        else:
            thr = ""
        pct = f"{r['pct_of_copy']:.0f}%" if "pct_of_copy" in r else ""
        t = r["median_s"]
        ts = f"{t * 1e3:.3f} ms" if t < 1 else f"{t:.3f} s"
        print(f"{r['op']:<26} {r['shape']:<26} {r['dtype']:<9} {r['impl']:<24} {ts:>10} {thr:>14} {pct:>7}", file=file)


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib); skipping the plot")
        return
    rows = rows_of(results)
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["dtype"]), []).append(r)
    keys = sorted(groups)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys)), 4.5))
    impls = sorted({r["impl"] for r in rows})
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, k in enumerate(keys):
            for r in groups[k]:
                if r["impl"] == impl:
                    xs.append(j + i * width)
                    ys.append(r.get("tflops", r.get("gbps", r.get("tokens_per_s", 0))))
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels(["\n".join(k) for k in keys], fontsize=7)
    ax.set_ylabel("GB/s, TFLOP/s or tok/s (per op)")
    meta = results.get("fastattn", {})
    ax.set_title(f"fastattn benchmarks on {meta.get('device_name')} ({str(meta.get('git_commit'))[:8]})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: wrote {path}")


def write_readme(results: dict, source: str) -> None:
    """Write this results file's table into README.md between the perf markers. Each
    results file (one per device) owns one block there, keyed by its file name."""
    import io
    import re

    readme = os.path.join(os.path.dirname(HERE), "README.md")
    text = open(readme).read()
    begin, end = "<!-- perf:begin -->", "<!-- perf:end -->"
    if begin not in text or end not in text:
        print("readme: performance markers not found; README.md left unchanged")
        return
    head, rest = text.split(begin, 1)
    body, tail = rest.split(end, 1)
    parts = re.split(r"<!-- perf-file:(\S+) -->\n", body)
    blocks = {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    buf = io.StringIO()
    print_table(results, file=buf)
    rel = os.path.relpath(os.path.abspath(source), os.path.dirname(HERE))
    blocks[os.path.basename(source)] = f"From `{rel}`:\n\n```\n{buf.getvalue()}```\n\n"
    new_body = "\n" + "".join(f"<!-- perf-file:{k} -->\n{v}" for k, v in sorted(blocks.items()))
    with open(readme, "w") as f:
        f.write(head + begin + new_body + end + tail)
    print(f"readme: performance section updated from {rel}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results JSON path")
    p.add_argument("--plot", help="PNG path for a bar plot")
    p.add_argument("-k", dest="filter", help="pytest -k expression")
    p.add_argument("--report", help="only print the table (and --plot) of an existing results JSON")
    p.add_argument("--readme", action="store_true",
                   help="also write the table into README.md between the perf markers")
    args = p.parse_args(argv)

    if args.report:
        with open(args.report) as f:
            results = json.load(f)
    else:
        if args.out is None:
            import torch

            dev = "cuda" if torch.cuda.is_available() else "cpu"
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
            args.out = os.path.join(HERE, "results", f"{dev}-{stamp}.json")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        cmd = [sys.executable, "-m", "pytest", HERE, "-q", "-p", "no:cacheprovider",
               "-o", "python_files=bench_*.py", "--benchmark-only", "--benchmark-save-data", f"--benchmark-json={args.out}",
               "--benchmark-disable-gc", "--benchmark-columns=median,rounds"]
        if args.filter:
            cmd += ["-k", args.filter]
        rc = subprocess.call(cmd, cwd=os.path.dirname(HERE))
        if rc != 0 or not os.path.exists(args.out):
            print(f"benchmarks failed (pytest exit {rc})")
            return rc or 1
        with open(args.out) as f:
            results = json.load(f)
        print(f"\nresults: {args.out}\n")
    print_table(results)
    if args.readme:
        write_readme(results, args.report or args.out)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
