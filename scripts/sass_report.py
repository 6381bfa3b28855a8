#!/usr/bin/env python3
"""Per-kernel machine-code (SASS) report of the CUDA kernels, with a regression gate.

Reads the objects that scripts/cuda_check.sh keeps (build/cuda-check/objs/<file>.<arch>.o and the
ptxas log <file>.<arch>.log next to each; no second compile) -- or any .o / .cubin given on the
command line -- and prints, per kernel and arch:

  regs       registers per thread (cubin)
  spill      spill store / load bytes from the ptxas log (or, without a log, the number of
             STL / LDL instructions, marked '#')
  smem       static shared memory per block (ptxas log; else the cubin's, less the 1 KiB an sm_90
             cubin adds for the system's per-block reservation). Dynamic shared memory is set by the host at
             launch and is not in the cubin: it is reported as unknown unless given with
             --dyn-smem REGEX=BYTES (matched against the short kernel name)
  thr        threads per block: the __launch_bounds__ maximum (.maxntid, EIATTR_MAX_THREADS in
             the cubin). A kernel without __launch_bounds__ has no knowable block size: no
             occupancy then. Kernels launched with fewer threads than the bound get at least the
             printed occupancy from registers
  occ        blocks per SM from registers (256-register warp granules per scheduler), shared memory
             (static + known dynamic, +1 KiB reserved per block), threads (2048/SM) and the 32-block
             limit; the letter says which limit binds (r/s/t/b). '+' after it: the kernel uses shared
             memory beyond its static size (dynamic, unknown here), so the true number can be lower
  insts      static instruction count (NOPs excluded)
  loop       instructions in the main loop: the largest address range [target, branch] of a
             backward branch in the SASS (so the outermost loop when loops nest; code the
             compiler moved out of the range is not counted; branches of the cold code placed
             after the last EXIT are not loops)
  mov        MOV + IMAD.MOV* register moves, in the whole kernel / in the main loop
  LDG, STG   global loads / stores by access width in bits, e.g. 128x8 16x4
  LDS STS LDSM MMA LDGSTS   counts (MMA = HMMA + HGMMA)

Usage:
  scripts/sass_report.py [OBJ|DIR ...]        (default build/cuda-check/objs)
      --json PATH              machine-readable report (every field above plus an opcode histogram)
      --check BASELINE         regression gate: exit 1 if a kernel gained spills (ptxas spill bytes,
                               STL/LDL instructions) or if the share of its global loads/stores
                               (LDG, STG, LDGSTS) at least as wide as its widest one in the baseline
                               dropped while the number of narrower ones grew (fewer wide ones
                               alone is a restructured kernel); kernels new since the baseline or
                               gone from it are reported, not failed
      --write-baseline PATH    write that baseline from the current objects
      --dyn-smem REGEX=BYTES   dynamic shared memory of the kernels whose short name matches
  make sass-report             (CI: cuda_check.sh's objects, table, build/cuda-check/sass_report.json,
                               gate against scripts/sass_baseline.json)
  make sass-baseline           regenerate the baseline in one command: compiles every kernel
                               (scripts/cuda_check.sh) and writes scripts/sass_baseline.json; commit it

Tools: cuobjdump (and c++filt or cu++filt for names), looked up on PATH, under $CUDA_HOME/bin, in the
pip nvidia-cuda-cuobjdump package (nvidia/cu*/bin) and in the CUDA torch venv's triton
(build/venv-cuda/.../triton/backends/nvidia/bin). Without cuobjdump the report prints SKIPPED and
exits 0, and the gate says it was skipped.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OBJDIR = os.path.join(ROOT, "build", "cuda-check", "objs")

# Per-SM limits of the occupancy calculation (CUDA occupancy calculator figures).
ARCH_LIMITS = {
    80: dict(regs=65536, threads=2048, blocks=32, smem=167936),  # 164 KiB usable
    86: dict(regs=65536, threads=1536, blocks=16, smem=102400),
    89: dict(regs=65536, threads=1536, blocks=24, smem=102400),
    90: dict(regs=65536, threads=2048, blocks=32, smem=233472),  # 228 KiB usable
}
SMEM_RESERVED_PER_BLOCK = 1024
REG_GRANULE = 256       # registers allocated per warp in units of 256
SCHEDULERS = 4          # register file split across 4 sub-partitions
GATE_KINDS = ("ldg", "stg", "ldgsts")


# ---------------------------------------------------------------------------------------------
# tools

def tool_dirs() -> list[str]:
    dirs = []
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    dirs.append(os.path.join(cuda_home, "bin"))
    try:
        spec = importlib.util.find_spec("nvidia")
        for loc in (spec.submodule_search_locations or []) if spec else []:
            dirs += sorted(glob.glob(os.path.join(loc, "*", "bin")))
    except (ImportError, ValueError):
        pass
    for sp in sorted(glob.glob(os.path.join(ROOT, "build", "venv-cuda", "lib", "python*", "site-packages"))):
        dirs.append(os.path.join(sp, "triton", "backends", "nvidia", "bin"))
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "bin")))
    return dirs


def find_tool(name: str) -> str | None:
    p = shutil.which(name)
    if p:
        return p
    for d in tool_dirs():
        cand = os.path.join(d, name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[:500]}")
    return r.stdout


# ---------------------------------------------------------------------------------------------
# parsing

_INST = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_ARCH = re.compile(r"code for sm_(\w+)")


def parse_sass(text: str) -> dict[tuple[str, str], list[tuple[int, str, str]]]:
    """cuobjdump -sass text -> {(arch, mangled function): [(address, mnemonic, operands), ...]}."""
    out: dict[tuple[str, str], list] = {}
    arch, cur = "?", None
    for line in text.splitlines():
        m = _ARCH.search(line)
        if m:
            arch, cur = m.group(1), None
            continue
        m = _FUNC.match(line)
        if m:
            cur = out.setdefault((arch, m.group(1)), [])
            continue
        if cur is None:
            continue
        m = _INST.match(line)
        if not m:
            continue
        body = m.group(2).split()
        if not body:
            continue
        if body[0].startswith("@"):  # predicate guard
            body = body[1:]
        if not body:
            continue
        cur.append((int(m.group(1), 16), body[0], " ".join(body[1:])))
    return out


def parse_res_usage(text: str) -> dict[tuple[str, str], dict]:
    """cuobjdump -res-usage -> {(arch, function): {REG, STACK, SHARED, LOCAL, ...}}."""
    out, arch, fn = {}, "?", None
    for line in text.splitlines():
        m = re.search(r"arch = sm_(\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line:
            out[(arch, fn)] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            fn = None
    return out


def parse_elf_info(text: str) -> dict[tuple[str, str], dict]:
    """cuobjdump -elf -> {(arch, kernel): {max_threads, min_blocks, static_smem}}: the per-kernel
    .nv.info.<name> attributes (EIATTR_MAX_THREADS = .maxntid from __launch_bounds__) and the
    size of .nv.shared.<name>. Only kernels (entry functions) have a .nv.info.<name> section."""
    out: dict[tuple[str, str], dict] = {}
    arch, section, attr = "?", None, None
    smem: dict[tuple[str, str], int] = {}
    for line in text.splitlines():
        m = re.search(r"arch = sm_(\w+)", line)
        if m:
            arch, section, attr = m.group(1), None, None
            continue
        m = re.match(r"^\.nv\.info\.(\S+)\s*$", line)
        if m:
            section = m.group(1)
            out.setdefault((arch, section), {})
            continue
        if re.match(r"^\.\S", line):  # another section's contents
            section = None
        m = re.search(r"\bNOBITS\b.*\s\.nv\.shared\.(\S+)\s*$", line)
        if m and not m.group(1).startswith("reserved"):
            cols = line.split()
            try:  # columns: index offset size ...
                smem[(arch, m.group(1))] = int(cols[2], 16)
            except (IndexError, ValueError):
                pass
            continue
        if section is None:
            continue
        m = re.search(r"Attribute:\s*(EIATTR_\w+)", line)
        if m:
            attr = m.group(1)
            continue
        m = re.search(r"Value:\s*(.*)$", line)
        if m and attr:
            vals = re.findall(r"0x[0-9a-fA-F]+|\b\d+\b", m.group(1))
            nums = [int(v, 0) for v in vals]
            if attr == "EIATTR_MAX_THREADS" and len(nums) >= 3:
                out[(arch, section)]["max_threads"] = nums[0] * nums[1] * nums[2]
            elif attr == "EIATTR_MIN_CTA_PER_SM" and nums:
                out[(arch, section)]["min_blocks"] = nums[0]
            attr = None
    for key, info in out.items():
        info["static_smem"] = smem.get(key, 0)
    return out


def parse_ptxas_log(text: str) -> dict[tuple[str, str], dict]:
    """ptxas -v log -> {(arch, mangled kernel): {spill_store_bytes, spill_load_bytes, stack, regs, smem}}."""
    out, cur, arch = {}, None, "?"
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'(?: for 'sm_(\w+)')?", line)
        if m:
            arch = m.group(2) or "?"
            cur = (arch, m.group(1))
            out[cur] = {}
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = (arch, m.group(1)) if (arch, m.group(1)) in out else None
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            out[cur].update(stack=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                            spill_load_bytes=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            out[cur]["regs"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            out[cur]["smem"] = int(sm.group(1)) if sm else 0
            cur = None
    return out


def access_width(mnemonic: str) -> int:
    """Bits per thread of a memory instruction from its modifiers (.128, .64, .U16, ...; 32 if none)."""
    mods = mnemonic.split(".")[1:]
    for tok in mods:
        if tok in ("128", "64", "32"):
            return int(tok)
        if tok in ("U16", "S16", "16"):
            return 16
        if tok in ("U8", "S8", "8"):
            return 8
    return 32


def is_mov(mnemonic: str) -> bool:
    return mnemonic.split(".")[0] == "MOV" or mnemonic.startswith("IMAD.MOV")


_HEX = re.compile(r"0x([0-9a-f]+)")


def main_loop(insts: list[tuple[int, str, str]]) -> tuple[int, int] | None:
    """(start address, end address) of the largest backward-branch range, or None. Branches
    placed after the kernel's last EXIT are out-of-line cold code (e.g. the BRA.DIV fallback of
    a diverged warp's shuffle), which jumps back into the prologue: its range would span the
    prologue, the real loop and the epilogue, so it does not count as a loop."""
    best, best_n = None, 0
    addrs = [a for a, _, _ in insts]
    exits = [a for a, mn, _ in insts if mn.split(".")[0] == "EXIT"]
    last_exit = exits[-1] if exits else None
    import bisect
    for addr, mn, ops in insts:
        if not mn.startswith("BRA"):
            continue
        if last_exit is not None and addr > last_exit:
            continue
        targets = _HEX.findall(ops)
        if not targets:
            continue
        tgt = int(targets[-1], 16)
        if tgt >= addr:  # forward, or the self-branch padding after EXIT
            continue
        n = bisect.bisect_right(addrs, addr) - bisect.bisect_left(addrs, tgt)
        if n > best_n:
            best, best_n = (tgt, addr), n
    return best


def summarize(insts: list[tuple[int, str, str]]) -> dict:
    insts = [i for i in insts if i[1] != "NOP"]
    # The trailing 'BRA self' padding is not code.
    while insts and insts[-1][1].startswith("BRA") and _HEX.findall(insts[-1][2]) \
            and int(_HEX.findall(insts[-1][2])[-1], 16) == insts[-1][0]:
        insts = insts[:-1]
    hist: dict[str, int] = {}
    widths = {k: {} for k in ("ldg", "stg", "ldgsts", "lds", "sts", "ld", "st")}
    counts = dict(lds=0, sts=0, ldsm=0, stsm=0, hmma=0, hgmma=0, ldgsts=0, ldl=0, stl=0, mov=0, tma=0)
    for _, mn, _ in insts:
        hist[mn] = hist.get(mn, 0) + 1
        base = mn.split(".")[0]
        kind = {"LDG": "ldg", "STG": "stg", "LDGSTS": "ldgsts", "LDS": "lds", "STS": "sts",
                "LD": "ld", "ST": "st"}.get(base)
        if kind:
            w = str(access_width(mn))
            widths[kind][w] = widths[kind].get(w, 0) + 1
        low = base.lower()
        if low in counts and low != "mov":
            counts[low] += 1
        if base.startswith("UTMA") or base == "UBLKCP":
            counts["tma"] += 1
        if is_mov(mn):
            counts["mov"] += 1
    loop = main_loop(insts)
    loop_n = loop_mov = 0
    if loop:
        body = [i for i in insts if loop[0] <= i[0] <= loop[1]]
        loop_n, loop_mov = len(body), sum(is_mov(i[1]) for i in body)
    return dict(insts=len(insts), loop_insts=loop_n, loop_mov=loop_mov,
                loop_range=[hex(loop[0]), hex(loop[1])] if loop else None,
                widths={k: v for k, v in widths.items() if v}, opcodes=dict(sorted(hist.items())), **counts)


def demangle(names: list[str]) -> dict[str, str]:
    tool = find_tool("c++filt") or find_tool("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:
        r = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, timeout=60)
        outs = r.stdout.splitlines()
        if r.returncode == 0 and len(outs) == len(names):
            return dict(zip(names, outs))
    except (OSError, subprocess.SubprocessError):
        pass
    return {n: n for n in names}


def shorten(demangled: str) -> str:
    s = demangled.replace("(anonymous namespace)::", "")
    s = re.sub(r"^void ", "", s)
    depth = 0
    for i, ch in enumerate(s):  # cut the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            s = s[:i]
            break
    s = re.sub(r"\b[A-Za-z_]\w*::", "", s)
    s = s.replace("__nv_bfloat16", "bf16").replace("__half", "half").replace(", ", ",")
    return s


def occupancy(arch: str, regs: int, threads: int | None, smem: int) -> tuple[int | None, str]:
    num = int(re.match(r"\d+", arch).group(0)) if re.match(r"\d+", arch) else 0
    lim = ARCH_LIMITS.get(num) or ARCH_LIMITS[max(k for k in ARCH_LIMITS if k <= max(num, 80))]
    if not threads:
        return None, "-"
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // REG_GRANULE) * REG_GRANULE
    warps_by_regs = (lim["regs"] // SCHEDULERS // regs_per_warp) * SCHEDULERS
    cands = {
        "r": warps_by_regs // warps,
        "s": lim["smem"] // (smem + SMEM_RESERVED_PER_BLOCK),
        "t": lim["threads"] // (warps * 32),
        "b": lim["blocks"],
    }
    n = min(cands.values())
    limiter = next(k for k in "rstb" if cands[k] == n)
    return n, limiter


def inspect_object(path: str, cuobjdump: str) -> list[dict]:
    sass = parse_sass(run([cuobjdump, "-sass", path]))
    res = parse_res_usage(run([cuobjdump, "-res-usage", path]))
    elf = parse_elf_info(run([cuobjdump, "-elf", path]))
    stem = os.path.basename(path)
    for ext in (".o", ".cubin"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    src = re.sub(r"\.(sm_)?\d+a?$", "", stem)
    log_path = os.path.splitext(path)[0] + ".log"
    ptxas = parse_ptxas_log(open(log_path).read()) if os.path.isfile(log_path) else {}
    rows = []
    for (arch, fn), insts in sass.items():
        if (arch, fn) not in elf:  # a device subroutine, not a kernel
            continue
        info, ru = elf[(arch, fn)], res.get((arch, fn), {})
        px = ptxas.get((arch, fn)) or ptxas.get(("?", fn)) or {}
        s = summarize(insts)
        uses_smem = bool(s["lds"] or s["sts"] or s["ldsm"] or s["ldgsts"] or s["stsm"]
                         or any(m.split(".")[0] in ("ATOMS", "LDSM", "STSM") for m in s["opcodes"]))
        # sm_90 cubins count the 1 KiB the system reserves per block in the kernel's shared section
        # (ptxas -v does not): report what the kernel declares, as ptxas does.
        static = px.get("smem")
        if static is None:
            static = info.get("static_smem", ru.get("SHARED", 0))
            if int(re.match(r"\d+", arch).group(0)) >= 90 and static >= SMEM_RESERVED_PER_BLOCK:
                static -= SMEM_RESERVED_PER_BLOCK
        rows.append(dict(
            file=src, arch=f"sm_{arch}", mangled=fn, regs=ru.get("REG", px.get("regs", 0)),
            stack=ru.get("STACK", px.get("stack", 0)),
            spill_store_bytes=px.get("spill_store_bytes"), spill_load_bytes=px.get("spill_load_bytes"),
            static_smem=static, max_threads=info.get("max_threads"), min_blocks=info.get("min_blocks"),
            # a kernel with shared-memory instructions and no static shared memory, or both, may
            # take dynamic shared memory at launch: the cubin cannot say how much
            dynamic_smem_possible=uses_smem, **s))
    return rows


def collect(paths: list[str], cuobjdump: str, dyn: list[tuple[re.Pattern, int]]) -> list[dict]:
    objs = []
    for p in paths:
        if os.path.isdir(p):
            objs += sorted(glob.glob(os.path.join(p, "*.o")) + glob.glob(os.path.join(p, "*.cubin")))
        else:
            objs.append(p)
    rows: list[dict] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(1, os.cpu_count() or 1) * 2)) as ex:
        for r in ex.map(lambda o: inspect_object(o, cuobjdump), objs):
            rows += r
    names = demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        r["demangled"] = names[r["mangled"]]
        r["name"] = shorten(r["demangled"])
    # Short names must stay unique per file and arch; fall back to the full name where not.
    seen: dict[tuple, int] = {}
    for r in rows:
        seen[(r["file"], r["arch"], r["name"])] = seen.get((r["file"], r["arch"], r["name"]), 0) + 1
    for r in rows:
        if seen[(r["file"], r["arch"], r["name"])] > 1:
            r["name"] = r["demangled"]
    for r in rows:
        r["key"] = f"{r['file']}:{r['name']}"
        r["dynamic_smem"] = next((b for pat, b in dyn if pat.search(r["name"])), None)
        smem = r["static_smem"] + (r["dynamic_smem"] or 0)
        occ, lim = occupancy(r["arch"][3:], r["regs"], r["max_threads"], smem)
        r["occupancy"], r["occupancy_limiter"] = occ, lim
        notes = []
        if not r["max_threads"]:
            notes.append("no __launch_bounds__: block size set at launch, occupancy unknown")
        if r["dynamic_smem"] is None and r["dynamic_smem_possible"]:
            notes.append("may use dynamic shared memory (set at launch, not in the cubin): occupancy is an upper bound")
        r["notes"] = notes
    rows.sort(key=lambda r: (r["arch"], r["file"], r["name"]))
    return rows


# ---------------------------------------------------------------------------------------------
# output

def fmt_widths(w: dict) -> str:
    return " ".join(f"{k}x{v}" for k, v in sorted(w.items(), key=lambda kv: -int(kv[0]))) or "-"


def print_table(rows: list[dict]) -> None:
    hdr = (f"{'arch':<7}{'regs':>5} {'spill st/ld':>11} {'smem':>6} {'thr':>4} {'occ':>4} "
           f"{'insts':>6} {'loop':>5} {'mov':>4} {'lmov':>4} {'LDS':>4} {'STS':>4} {'LDSM':>4} {'MMA':>4} "
           f"{'LDGSTS':>6}  {'LDG widths':<22} {'STG widths':<18} kernel")
    print(hdr)
    for r in rows:
        if r["spill_store_bytes"] is not None:
            spill = f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"
        else:
            spill = f"#{r['stl']}/{r['ldl']}"
        occ = "-" if r["occupancy"] is None else f"{r['occupancy']}{r['occupancy_limiter']}"
        if r["occupancy"] is not None and r["dynamic_smem"] is None and r["dynamic_smem_possible"]:
            occ += "+"
        thr = r["max_threads"] or "?"
        smem = str(r["static_smem"]) + ("" if r["dynamic_smem"] is None else f"+{r['dynamic_smem']}")
        ldg = fmt_widths(r["widths"].get("ldg", {}))
        stg = fmt_widths(r["widths"].get("stg", {}))
        print(f"{r['arch']:<7}{r['regs']:>5} {spill:>11} {smem:>6} {thr:>4} {occ:>4} {r['insts']:>6} "
              f"{r['loop_insts']:>5} {r['mov']:>4} {r['loop_mov']:>4} {r['lds']:>4} {r['sts']:>4} "
              f"{r['ldsm']:>4} {r['hmma'] + r['hgmma']:>4} {r['ldgsts']:>6}  {ldg:<22} {stg:<18} {r['key']}")
    print("occ: blocks/SM, limited by r=registers s=shared memory t=threads b=32-block cap; '+': dynamic "
          "shared memory not counted (unknown from the cubin); thr: __launch_bounds__ maximum; "
          "spill in bytes from ptxas ('#': STL/LDL instruction counts); loop/lmov: main loop "
          "(largest backward-branch range)")


# ---------------------------------------------------------------------------------------------
# baseline and gate

def baseline_entry(r: dict) -> dict:
    return dict(spill_store_bytes=r["spill_store_bytes"], spill_load_bytes=r["spill_load_bytes"],
                stl=r["stl"], ldl=r["ldl"], **{k: r["widths"].get(k, {}) for k in GATE_KINDS})


def make_baseline(rows: list[dict]) -> dict:
    return {"about": "per-kernel spills and global load/store widths (bits -> static instruction count); "
                     "regenerate with `make sass-baseline`",
            "kernels": {f"{r['arch']} {r['key']}": baseline_entry(r) for r in rows}}


def wide_share(w: dict, min_bits: int) -> float | None:
    total = sum(w.values())
    if not total:
        return None
    return sum(n for b, n in w.items() if int(b) >= min_bits) / total


def gate(baseline: dict, current: dict) -> tuple[list[str], list[str]]:
    """(failures, notes) of current against baseline, both {'kernels': {key: entry}}."""
    base, cur = baseline.get("kernels", {}), current.get("kernels", {})
    fails, notes = [], []
    for k in sorted(set(cur) - set(base)):
        notes.append(f"new kernel (not in the baseline): {k}")
    for k in sorted(set(base) - set(cur)):
        notes.append(f"kernel gone since the baseline: {k}")
    for k in sorted(set(base) & set(cur)):
        b, c = base[k], cur[k]
        grew = [f"{m} {b[m]} -> {c[m]}" for m in ("spill_store_bytes", "spill_load_bytes", "stl", "ldl")
                if b.get(m) is not None and c.get(m) is not None and c[m] > b[m]]
        if grew:
            fails.append(f"{k}: gained spills: " + ", ".join(grew))
        for kind in GATE_KINDS:
            bw, cw = b.get(kind) or {}, c.get(kind) or {}
            if not sum(bw.values()):
                continue
            widest = max(int(x) for x, n in bw.items() if n)
            bs, cs = wide_share(bw, widest), wide_share(cw, widest)
            # Narrower accesses than the baseline's widest: a regression needs more of them and a
            # lower share of wide ones (fewer wide accesses alone is a restructured kernel).
            bn = sum(n for x, n in bw.items() if int(x) < widest)
            cn = sum(n for x, n in cw.items() if int(x) < widest)
            if cs is None:
                notes.append(f"{k}: no {kind.upper()} left (baseline {fmt_widths(bw)})")
            elif cs < bs - 1e-9 and cn > bn:
                fails.append(f"{k}: {kind.upper()} share at >= {widest} bits {bs:.2f} -> {cs:.2f} "
                             f"(widths {fmt_widths(bw)} -> {fmt_widths(cw)})")
    return fails, notes


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", help="objects/cubins or directories (default build/cuda-check/objs)")
    ap.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    ap.add_argument("--check", metavar="BASELINE", help="fail on regressions against this baseline")
    ap.add_argument("--write-baseline", metavar="PATH", help="write a baseline from the current objects")
    ap.add_argument("--dyn-smem", action="append", default=[], metavar="REGEX=BYTES",
                    help="dynamic shared memory per block of the kernels whose short name matches")
    ap.add_argument("--quiet", action="store_true", help="no table")
    args = ap.parse_args(argv)

    dyn = []
    for spec in args.dyn_smem:
        pat, sep, val = spec.rpartition("=")
        if not sep or not val.isdigit():
            raise ValueError(f"--dyn-smem: expected REGEX=BYTES, got {spec!r}")
        dyn.append((re.compile(pat), int(val)))

    cuobjdump = find_tool("cuobjdump")
    if not cuobjdump:
        print("sass_report: SKIPPED: cuobjdump not found (PATH, $CUDA_HOME/bin, pip nvidia-cuda-cuobjdump, "
              "build/venv-cuda triton); install one to get the report")
        if args.check:
            print("sass gate: SKIPPED (no cuobjdump): regressions in spills / vector widths NOT checked")
        return 0
    paths = args.paths or [DEFAULT_OBJDIR]
    for p in paths:
        if not os.path.exists(p):
            raise RuntimeError(f"sass_report: {p} does not exist (run scripts/cuda_check.sh first: make cuda-check)")
    if not args.paths:  # cuda_check.sh's objects: say so when a kernel source changed since
        objs = glob.glob(os.path.join(DEFAULT_OBJDIR, "*.o"))
        srcs = [f for ext in ("cu", "cuh", "h") for f in glob.glob(os.path.join(ROOT, "csrc", "**", f"*.{ext}"),
                                                                  recursive=True)]
        if objs and srcs and max(map(os.path.getmtime, srcs)) > min(map(os.path.getmtime, objs)):
            print("sass_report: WARNING: csrc/ changed after these objects were compiled: run make cuda-check "
                  "for a current report")
    rows = collect(paths, cuobjdump, dyn)
    if not rows:
        raise RuntimeError(f"sass_report: no kernels found in {paths} (run scripts/cuda_check.sh first)")
    if not args.quiet:
        print(f"sass_report: {len(rows)} kernels ({cuobjdump})")
        print_table(rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"kernels": rows}, f, indent=1)
        print(f"sass_report: JSON written to {args.json}")
    current = make_baseline(rows)
    if args.write_baseline:
        with open(args.write_baseline, "w") as f:  # one kernel per line: readable diffs
            f.write('{"about": ' + json.dumps(current["about"]) + ',\n "kernels": {\n')
            f.write(",\n".join(f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
                              for k, v in sorted(current["kernels"].items())))
            f.write("\n }}\n")
        print(f"sass_report: baseline of {len(rows)} kernels written to {args.write_baseline}")
    status = 0
    if args.check:
        with open(args.check) as f:
            base = json.load(f)
        fails, notes = gate(base, current)
        for n in notes:
            print(f"sass gate: note: {n}")
        for x in fails:
            print(f"sass gate: REGRESSION: {x}")
        if fails:
            print(f"sass gate: FAILED ({len(fails)} regressions against {args.check}; if intended, "
                  "regenerate it with `make sass-baseline` and commit)")
            status = 1
        else:
            print(f"sass gate: OK ({len(set(base.get('kernels', {})) & set(current['kernels']))} kernels "
                  f"checked against {args.check})")
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, ValueError) as e:
        print(e, file=sys.stderr)
        sys.exit(1)
