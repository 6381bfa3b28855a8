"""Tables, the plot and the README block, from a results JSON (pytest-benchmark's JSON plus the
"fastattn" metadata block written by fastattn.benchmarks.plugin).

Files written before the metadata grew (no working-set or LLC fields, commit spelled
"<sha>-dirty") are read too.
"""
from __future__ import annotations

import io
import os
import re
import sys
import textwrap

from fastattn.benchmarks import meta as _meta

# One panel per op family, in this order; ops outside the list get a panel of their own.
FAMILIES = [
    ("rms_norm", "RMSNorm"),
    ("rotary", "RoPE (q and k)"),
    ("flash_fwd", "FlashAttention forward"),
    ("flash_fwd_bwd", "FlashAttention forward + backward"),
    ("decode", "decode attention over a KV cache"),
    ("model_prefill", "model prefill"),
    ("model_decode", "model decode step"),
    ("moe", "mixture-of-experts feed-forward"),
    ("generate_ours", "end to end: our model's generate"),
    ("generate_hf", "end to end: transformers generate"),
]
_UNITS = {"gbps": "GB/s", "tflops": "TFLOP/s", "tokens_per_s": "tok/s"}


class ReportError(Exception):
    """A results file that cannot be reported (the CLI prints it as one line)."""


def rows_of(results: dict):
    rows = []
    for b in results.get("benchmarks", []) if isinstance(results, dict) else []:
        info = b.get("extra_info", {}) if isinstance(b, dict) else {}
        if isinstance(info, dict) and "op" in info and "median_s" in info:
            rows.append(info)
    return rows


_ROW_FIELDS = ("op", "shape", "dtype", "impl")


def malformed_row(results: dict):
    """What is wrong with the first benchmark row a table cannot show (a field missing, a time
    that is not a positive number), or None."""
    for i, r in enumerate(rows_of(results)):
        missing = [k for k in _ROW_FIELDS if k not in r]
        if missing:
            return f"benchmark row {i} ({r.get('op', '?')}) lacks {', '.join(missing)}"
        t = r["median_s"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == float("inf"):
            return f"benchmark row {i} ({r['op']} {r['shape']} {r['impl']}) has median_s {t!r}, not a positive time"
    return None


def family_of(op: str):
    """(family key, variant) of an op name as the suites spell it."""
    if op.startswith("rms_norm"):
        return "rms_norm", "residual" if "+residual" in op else "plain"
    if op.startswith("rotary"):
        return "rotary", op.split("_", 1)[1] if "_" in op else ""
    if op.startswith("flash_attn_fwd+bwd"):
        return "flash_fwd_bwd", "causal" if "causal" in op else "full"
    if op.startswith("flash_attn_fwd"):
        return "flash_fwd", "causal" if "causal" in op else "full"
    if op.startswith("decode_attention"):
        return "decode", ""
    if op == "model prefill":
        return "model_prefill", ""
    if op == "model decode":
        return "model_decode", ""
    if op == "moe":
        return "moe", ""
    if op.startswith("generate"):
        return ("generate_hf" if "transformers" in op else "generate_ours"), ""
    return op, ""


def metric_of(row: dict):
    """The throughput key a row is reported in: TFLOP/s, tok/s or GB/s (None: time only)."""
    for key in ("tflops", "tokens_per_s", "gbps"):
        if isinstance(row.get(key), (int, float)):
            return key
    return None


def llc_bytes(meta: dict):
    llc = meta.get("llc_bytes")
    return llc if isinstance(llc, int) and llc > 0 else None


def in_cache(row: dict, meta: dict):
    """True when the row's working set fits in the last-level cache, False when it does not,
    None when unknown (a file that did not record the LLC)."""
    if isinstance(row.get("in_cache"), bool):
        return row["in_cache"]
    ws = row.get("working_set_bytes", row.get("bytes"))
    llc = llc_bytes(meta)
    if not isinstance(ws, (int, float)) or llc is None:
        return None
    return ws <= llc


def pct_of_copy(row: dict, meta: dict):
    """% of the copy bandwidth, or None where it means nothing (no GB/s, or in cache)."""
    if not isinstance(row.get("gbps"), (int, float)) or in_cache(row, meta) is not False:
        return None
    if isinstance(row.get("pct_of_copy"), (int, float)):
        return row["pct_of_copy"]
    copy = (meta.get("copy_bandwidth") or {}).get("copy_gbps")
    return 100.0 * row["gbps"] / copy if copy else None


def git_dirty(meta: dict):
    """True/False, or None when the run was not in a git checkout (or did not say)."""
    if isinstance(meta.get("git_dirty"), bool):
        return meta["git_dirty"]
    commit = meta.get("git_commit")
    if isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", commit):
        return commit.endswith("-dirty")
    return None


def _commit_text(meta: dict) -> str:
    commit = meta.get("git_commit")
    if not isinstance(commit, str) or commit in ("", "unknown"):
        return "commit unknown (not a git checkout)"
    dirty = git_dirty(meta)
    return f"commit {commit.replace('-dirty', '')[:12]}" + (" (dirty tree)" if dirty else "")


def _mib(n) -> str:
    return f"{n / 2**20:.0f} MiB" if isinstance(n, (int, float)) else "?"


def header_lines(results: dict):
    meta = results.get("fastattn", {}) or {}
    lines = []
    dev = meta.get("device")
    name = meta.get("gpu_model") if dev == "cuda" else (meta.get("cpu_model") or meta.get("device_name"))
    lines.append(f"device: {name or meta.get('device_name')} ({dev}), torch {meta.get('torch')}, "
                 f"CUDA {meta.get('cuda') or 'none'}, fastattn {meta.get('fastattn')}, {_commit_text(meta)}, "
                 f"{meta.get('date')}")
    cpu = [f"cpu: {meta.get('cpu_model') or meta.get('device_name')}", f"{meta.get('cpu_threads')} threads"]
    if meta.get("cpu_flags") is not None:
        cpu.append("flags " + (" ".join(meta["cpu_flags"]) or "none of avx2/avx512/amx"))
    if meta.get("cpu_isa"):
        cpu.append(f"kernel ISA {meta['cpu_isa']}")
    if "cpu_llc_bytes" in meta:
        cpu.append(f"LLC {_mib(meta.get('cpu_llc_bytes'))}")
    lines.append(", ".join(cpu))
    copy = meta.get("copy_bandwidth") or {}
    if copy.get("copy_gbps"):
        ws = copy.get("working_set_bytes", copy.get("bytes"))
        text = f"copy bandwidth: {copy['copy_gbps']:.1f} GB/s (copy_ into a preallocated tensor, {_mib(ws)} working set"
        text += ")" if dev == "cuda" or not copy.get("clone_gbps") else f"); clone {copy['clone_gbps']:.1f} GB/s"
        lines.append(text)
    gemm = meta.get("gemm") or {}
    rates = [f"{k} {_tflops(v['tflops'])} TFLOP/s" for k, v in gemm.items()
             if isinstance(v, dict) and isinstance(v.get("tflops"), (int, float))]
    if rates:
        lines.append(f"GEMM rate: {', '.join(rates)} (torch.mm, {gemm.get('n')}x{gemm.get('n')} square, same run): "
                     "'% GEMM' of attention rows is against the faster of their dtype's rate and float32's")
    if llc_bytes(meta) is not None:
        lines.append(f"% copy: only for working sets larger than the {_mib(llc_bytes(meta))} last-level cache; "
                     "smaller ones say 'in cache'")
    else:
        lines.append("% copy: '?': this file does not record the last-level cache size, so whether a working "
                     "set was in cache is unknown (rerun the benchmarks to get it)")
    if meta.get("tiny"):
        lines.append("TINY SIZES (plumbing check): these numbers mean nothing")
    return lines


def _sort_key(r):
    return (r["op"], str(r["shape"]), str(r["dtype"]), r["impl"] != "fastattn", r["impl"])


def format_throughput(r) -> str:
    key = metric_of(r)
    if key == "tflops":
        return f"{r['tflops']:.2f} TFLOP/s"
    if key == "tokens_per_s":
        return f"{r['tokens_per_s']:.1f} tok/s"
    if key == "gbps":
        return f"{r['gbps']:.1f} GB/s"
    return ""


def format_pct(r, meta) -> str:
    if not isinstance(r.get("gbps"), (int, float)):
        return ""
    cached = in_cache(r, meta)
    if cached is None:
        return "?"
    if cached:
        return "in cache"
    pct = pct_of_copy(r, meta)
    return "" if pct is None else f"{pct:.0f}%"


def _tflops(t) -> str:
    return f"{t:.3f}" if t >= 0.01 else f"{t:.2g}"  # (bf16 torch.mm without native bf16: ~3e-4)


def format_gemm(r, meta=None) -> str:
    """% GEMM, recomputed from the file's GEMM rates by meta.gemm_roof_tflops where it has them
    (files written under the earlier rule, a bf16 row against bf16's rate alone, read the same
    as new ones), else as stored."""
    pct = r.get("pct_of_gemm")
    roof = _meta.gemm_roof_tflops((meta or {}).get("gemm"), str(r.get("dtype")))
    if roof and isinstance(r.get("tflops"), (int, float)) and isinstance(pct, (int, float)):
        pct = 100.0 * r["tflops"] / roof
    return f"{pct:.0f}%" if isinstance(pct, (int, float)) else ""


def format_time(t) -> str:
    return f"{t * 1e3:.3f} ms" if t < 1 else f"{t:.3f} s"


def print_table(results: dict, file=None) -> None:
    file = file or sys.stdout
    meta = results.get("fastattn", {}) or {}
    rows = sorted(rows_of(results), key=_sort_key)
    for line in header_lines(results):
        print(line, file=file)
    if not rows:
        print("(no benchmark results in this file)", file=file)
        _print_skipped(results, file)
        return
    cells = [(r["op"], str(r["shape"]), str(r["dtype"]), r["impl"], format_time(r["median_s"]),
              format_throughput(r), format_pct(r, meta), format_gemm(r, meta)) for r in rows]
    names = ("op", "shape", "dtype", "impl", "time", "throughput", "% copy", "% GEMM")
    if not any(c[-1] for c in cells):  # no compute-bound row (or a file from before the GEMM rate)
        cells, names = [c[:-1] for c in cells], names[:-1]
    if not any(c[-1] for c in cells) and names[-1] == "% copy":  # nothing memory-bound either
        cells, names = [c[:-1] for c in cells], names[:-1]
    for line in _columns(names, cells, right=(False, False, False, False, True, True, True, True)):
        print(line, file=file)
    summary = speedup_lines(results)
    if summary:
        print("", file=file)
        for line in summary:
            print(line, file=file)
    _print_skipped(results, file)


def _print_skipped(results: dict, file) -> None:
    """The implementations that could not run here (a peer without its backend, ...): no row."""
    skipped = results.get("fastattn_skipped") or []
    if skipped:
        print("", file=file)
        print(f"unavailable here ({len(skipped)}: not in the table, nor in the speedups):", file=file)
        for name, reason in skipped:
            print(f"  {name}: {reason}", file=file)


def speedup_rows(results: dict):
    """Per (op, shape, dtype): fastattn's time against the fastest other implementation
    measured in the same run. fastattn's own variants (``fastattn-decode``,
    ``fastattn-contiguous``, ``fastattn-padded``: other routes of ours, measured for
    comparison) are not peers. Groups without a fastattn row or without a peer are left out."""
    groups = {}
    for r in rows_of(results):
        groups.setdefault((r["op"], str(r["shape"]), str(r["dtype"])), []).append(r)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], _natural(k[1]), k[2])):
        ours = [r for r in groups[key] if r["impl"] == "fastattn"]
        peers = [r for r in groups[key] if not r["impl"].startswith("fastattn")]
        if not ours or not peers:
            continue
        best = min(peers, key=lambda r: r["median_s"])
        out.append((*key, ours[0]["median_s"], best["impl"], best["median_s"], best["median_s"] / ours[0]["median_s"]))
    return out


def speedup_lines(results: dict):
    """The summary under the table: 'speedup' > 1 means fastattn is faster than the
    fastest peer of the same run (< 1: slower)."""
    rows = speedup_rows(results)
    if not rows:
        return []
    cells = [(op, shape, dtype, format_time(t_ours), impl, format_time(t_peer), f"{sp:.2f}x")
             for op, shape, dtype, t_ours, impl, t_peer, sp in rows]
    names = ("op", "shape", "dtype", "fastattn", "fastest peer", "its time", "speedup")
    return (["fastattn against the fastest peer in the same run (speedup > 1: fastattn is faster):"]
            + _columns(names, cells, right=(False, False, False, True, False, True, True)))


def _columns(names, cells, right):
    """Header, rule and one line per row, each column as wide as its widest cell, the columns
    flagged in `right` right-aligned."""
    widths = [max(len(names[i]), *(len(c[i]) for c in cells)) for i in range(len(names))]

    def fmt(c):
        return " ".join(c[i].rjust(widths[i]) if right[i] else c[i].ljust(widths[i]) for i in range(len(c))).rstrip()

    header = fmt(names)
    return [header, "-" * len(header)] + [fmt(c) for c in cells]


# ---- plot -----------------------------------------------------------------------------------
def matplotlib_missing():
    """None when matplotlib can be imported, else the one-line reason for the user."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("--plot needs matplotlib, which is not installed: pip install matplotlib "
                "(or pip install 'fastattn[bench]')")
    return None


_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def _natural(text: str):
    """Sort key reading digit runs as numbers: 1x512 < 1x1024 < 16x1024."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text) if p)


def _wrap_shape(text: str, width: int = 14) -> str:
    if len(text) <= width:
        return text
    parts = re.split(r"(?<=[x ])", text)  # break after an 'x' or a space
    lines, cur = [], ""
    for p in parts:
        if cur and len(cur) + len(p) > width:
            lines.append(cur.rstrip())
            cur = ""
        cur += p
    lines.append(cur.rstrip())
    return "\n".join(lines)


def _panels(rows):
    order = [k for k, _ in FAMILIES]
    titles = dict(FAMILIES)
    panels = {}
    for r in rows:
        fam, variant = family_of(r["op"])
        panels.setdefault(fam, []).append((variant, r))
    keys = sorted(panels, key=lambda k: (order.index(k) if k in order else len(order), k))
    return [(k, titles.get(k, k), panels[k]) for k in keys]


def _tick(v, _pos=None) -> str:
    """Axis and bar labels: 0.25, 3.5, 180, 6.96k, 1.2M (no 1e+03 notation)."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def plot(results: dict, path: str) -> None:
    """Draw figure(results) into `path` (PNG, or any format matplotlib writes)."""
    import matplotlib.pyplot as plt

    fig = figure(results)
    try:
        fig.savefig(path, dpi=130)
    finally:
        plt.close(fig)


def figure(results: dict):
    """One figure, one panel per op family, each in its own unit; implementations side by side
    per (variant, shape, dtype); log y where a panel's values span 10x or more. GB/s panels
    carry a right-hand '% of copy' axis and the copy line; bars whose working set fits in the
    last-level cache are hatched ('in cache': their % of copy means nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    meta = results.get("fastattn", {}) or {}
    rows = [r for r in rows_of(results) if metric_of(r)]
    if not rows:
        raise ReportError("--plot: no throughput figures in these results to plot")
    panels = _panels(rows)
    all_impls = sorted({r["impl"] for r in rows}, key=lambda i: (i != "fastattn", _natural(i)))
    copy_gbps = (meta.get("copy_bandwidth") or {}).get("copy_gbps")

    # layout: panels with many groups get a full row
    def n_groups(entries):
        return len({(v, r["shape"], r["dtype"]) for v, r in entries})

    widest = max(n_groups(e) * max(1, len({r["impl"] for _, r in e})) for _, _, e in panels)
    ncols = 1 if widest > 14 or len(panels) == 1 else 2
    nrows = -(-len(panels) // ncols)
    panel_w = max(6.5, min(24.0, 0.32 * widest + 2.5))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols, 4.3 * nrows + 0.6), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)

    for ax, (fam, title, entries) in zip(axes.flat, panels):
        metric = max({metric_of(r) for _, r in entries}, key=lambda m: sum(metric_of(r) == m for _, r in entries))
        entries = [(v, r) for v, r in entries if metric_of(r) == metric]
        groups = sorted({(v, str(r["shape"]), str(r["dtype"])) for v, r in entries},
                        key=lambda g: tuple(_natural(x) for x in g))
        impls = [i for i in all_impls if any(r["impl"] == i for _, r in entries)]
        # colours per panel (a panel has few impls, the file may have many): fastattn always red
        others = iter(_COLORS[1:] * 3)
        color = {i: _COLORS[0] if i == "fastattn" else next(others) for i in impls}
        # what does not vary across the panel goes into its title, not under every group
        fixed = [len({g[i] for g in groups}) == 1 for i in range(3)]
        label_parts = [i for i in range(3) if not fixed[i]]
        sub = [groups[0][i] for i in range(3) if fixed[i] and groups[0][i]]
        width = 0.8 / len(impls)
        values = []
        annotate = len(groups) * len(impls) <= 32
        # the bars of each group: the impls measured there, side by side, centred on the group
        present = {g: [i for i in impls if any(r["impl"] == i and (v, str(r["shape"]), str(r["dtype"])) == g
                                               for v, r in entries)] for g in groups}
        for impl in impls:
            xs, ys, hatches = [], [], []
            for gi, g in enumerate(groups):
                for v, r in entries:
                    if r["impl"] == impl and (v, str(r["shape"]), str(r["dtype"])) == g:
                        here = present[g]
                        xs.append(gi + width * (here.index(impl) - (len(here) - 1) / 2))
                        ys.append(r[metric])
                        hatches.append("///" if metric == "gbps" and in_cache(r, meta) else "")
                        break
            if not xs:
                continue
            bars = ax.bar(xs, ys, width * 0.92, label=impl, color=color[impl], edgecolor="white", linewidth=0.5)
            for b, h in zip(bars, hatches):
                if h:
                    b.set_hatch(h)
                    b.set_edgecolor("black")
            values += ys
            if annotate:
                for x, y in zip(xs, ys):
                    ax.annotate(_tick(y), (x, y), xytext=(0, 2), textcoords="offset points", ha="center",
                                va="bottom", fontsize=6.5, rotation=90 if len(impls) > 3 else 0)
        cached = [in_cache(r, meta) for _, r in entries]
        # the copy line where some working set is (or may be) beyond the last-level cache
        show_copy = metric == "gbps" and bool(copy_gbps) and any(c is not True for c in cached)
        values += [copy_gbps] if show_copy else []
        positive = [v for v in values if v > 0]
        log = bool(positive) and max(positive) / min(positive) >= 10
        if log:
            ax.set_yscale("log")
            ax.set_ylim(min(positive) / 2, max(positive) * (6 if annotate else 2))
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(_tick))
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_ylim(0, max(values + [0]) * 1.35 or 1)
            ax.yaxis.set_major_formatter(FuncFormatter(_tick))
        ax.set_xticks(range(len(groups)))
        labels = ["\n".join(_wrap_shape(g[i]) if i == 1 else g[i] for i in label_parts) for g in groups]
        rotate = len(groups) > 8
        ax.set_xticklabels(labels, fontsize=7.5, rotation=35 if rotate else 0, ha="right" if rotate else "center")
        ax.set_xlim(-0.6, len(groups) - 0.4)
        unit = _UNITS[metric]
        ax.set_ylabel(unit + (" (log scale)" if log else ""), fontsize=9)
        ax.set_title(title + (f"\n{', '.join(sub)}" if sub else ""), fontsize=10)
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
        handles = [Patch(facecolor=color[i]) for i in impls]  # plain swatches, whatever the hatching
        names = list(impls)
        if show_copy:
            ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=0.8)
            handles.append(ax.lines[-1])
            names.append(f"copy {copy_gbps:.0f} GB/s")
        # a % of copy axis only where some working set exceeds the last-level cache
        if metric == "gbps" and copy_gbps and any(c is False for c in cached):
            sec = ax.secondary_yaxis("right", functions=(lambda g: 100.0 * g / copy_gbps,
                                                         lambda p: p * copy_gbps / 100.0))
            sec.set_ylabel("% of copy (DRAM working sets)", fontsize=8)
            if log:
                sec.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                sec.yaxis.set_minor_formatter(NullFormatter())
            sec.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
            sec.tick_params(labelsize=7.5)
        if metric == "gbps" and any(cached):
            handles.append(Patch(facecolor="white", edgecolor="black", hatch="///"))
            names.append("in cache (no % of copy)")
        ax.legend(handles, names, fontsize=7, loc="upper left", framealpha=0.85, ncol=2 if len(names) > 4 else 1)

    dev = meta.get("device")
    name = meta.get("gpu_model") if dev == "cuda" else (meta.get("cpu_model") or meta.get("device_name"))
    threads = f", {meta.get('cpu_threads')} threads" if dev != "cuda" and meta.get("cpu_threads") else ""
    title = (f"fastattn benchmarks: {name} ({dev}{threads}), torch {meta.get('torch')}, {_commit_text(meta)}, "
             f"{str(meta.get('date'))[:10]}")
    if meta.get("tiny"):
        title += "  [TINY SIZES: plumbing check only]"
    fig_w = fig.get_size_inches()[0]
    fig.suptitle("\n".join(textwrap.wrap(title, max(60, int(fig_w * 9.5)))), fontsize=11)
    return fig


# ---- README block ---------------------------------------------------------------------------
def readme_refusal(results: dict):
    """None when this results file may go into the README, else why not (one line)."""
    meta = results.get("fastattn", {}) or {}
    if meta.get("tiny"):
        return "--readme: these results come from a --tiny run (plumbing check); the README takes real sizes only"
    dirty = git_dirty(meta)
    if dirty is None:
        return "--readme: these results do not record a git commit; the README takes results from a clean commit only"
    if dirty:
        return ("--readme: these results come from a dirty tree (uncommitted changes); the README takes results "
                "from a clean commit only: commit, rerun the benchmarks, then --readme")
    if not rows_of(results):
        return "--readme: no benchmark results in this file"
    return None


def write_readme(results: dict, source: str, root: str) -> str:
    """Write this results file's table into root/README.md between the perf markers. Each
    results file (one per device) owns one block there, keyed by its file name. Returns a
    one-line note for stderr."""
    readme = os.path.join(root, "README.md")
    text = open(readme).read()
    begin, end = "<!-- perf:begin -->", "<!-- perf:end -->"
    if begin not in text or end not in text:
        raise ReportError(f"--readme: performance markers {begin} / {end} not found in {readme}")
    head, rest = text.split(begin, 1)
    body, tail = rest.split(end, 1)
    parts = re.split(r"<!-- perf-file:(\S+) -->\n", body)
    blocks = {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    buf = io.StringIO()
    print_table(results, file=buf)
    rel = os.path.relpath(os.path.abspath(source), root)
    blocks[os.path.basename(source)] = f"From `{rel}`:\n\n```\n{buf.getvalue()}```\n\n"
    new_body = "\n" + "".join(f"<!-- perf-file:{k} -->\n{v}" for k, v in sorted(blocks.items()))
    with open(readme, "w") as f:
        f.write(head + begin + new_body + end + tail)
    return f"readme: performance section updated from {rel}"
