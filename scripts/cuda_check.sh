#!/usr/bin/env bash
# CUDA compile check: every csrc/cuda/*.cu with plain nvcc -- no torch on the include path --
# for sm_80 and sm_90a. Fails on any compile error or warning (-Werror all-warnings), and on
# register spills unless FASTATTN_ALLOW_SPILLS=1. Prints registers / shared memory / spill
# bytes per kernel and arch (from ptxas -v).
#   scripts/cuda_check.sh [file.cu ...]      (default: all of csrc/cuda)
# The objects and ptxas logs are kept in $FASTATTN_CHECK_OBJDIR (default build/cuda-check/objs,
# <name>.<arch>.o / .log) for scripts/sass_report.py (make sass-report) to read without a second
# compile. A run over all files empties that directory first; a run over some files replaces
# only their objects.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [ ! -x "$NVCC" ]; then
  echo "cuda_check: nvcc not found (set NVCC=...)" >&2
  exit 1
fi
ARCHS="${FASTATTN_CHECK_ARCHS:-80 90a}"
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  mapfile -t files < <(ls csrc/cuda/*.cu 2>/dev/null || true)
fi
if [ ${#files[@]} -eq 0 ]; then
  echo "cuda_check: no .cu files under csrc/cuda"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
OBJDIR="${FASTATTN_CHECK_OBJDIR:-build/cuda-check/objs}"
mkdir -p "$OBJDIR"
if [ $# -eq 0 ]; then rm -f "$OBJDIR"/*.o "$OBJDIR"/*.log; fi
jobs="${MAX_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"  # (nproc honours OMP_NUM_THREADS)
echo "cuda_check: $("$NVCC" --version | tail -1); archs: $ARCHS; files: ${#files[@]}"

compile_one() {  # file arch -> writes $tmp/<name>.<arch>.log (+ .secs: "wall user sys" seconds, .rc: nvcc status)
  local f=$1 arch=$2 name rc=0 TIMEFORMAT='%R %U %S'
  name=$(basename "$f" .cu)
  { time "$NVCC" -c "$f" -o "$tmp/$name.$arch.o" -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr \
    -Icsrc/include -DFASTATTN_WITH_CUDA -gencode "arch=compute_$arch,code=sm_$arch" \
    -Xptxas -v -Werror all-warnings -Xcompiler -Wall,-Werror >"$tmp/$name.$arch.log" 2>&1 || rc=$?; } 2>"$tmp/$name.$arch.secs"
  echo "$rc" >"$tmp/$name.$arch.rc"
  return $rc
}
export -f compile_one
export NVCC tmp

status=0
pids=()
for f in "${files[@]}"; do
  for arch in $ARCHS; do
    compile_one "$f" "$arch" &
    pids+=("$!:$f:$arch")
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 0.2; done
  done
done
# Each compile's status comes from its .rc file, not from `wait PID`: on a busy machine the
# pids wrap (pid_max 32768) and a later child of this shell (the sleeps above) can take a finished
# compile's pid, after which bash has forgotten that compile's status ("not a child of this shell").
wait
for entry in "${pids[@]}"; do
  rest=${entry#*:}; f=${rest%:*}; arch=${rest##*:}
  n=$(basename "$f" .cu)
  if [ "$(cat "$tmp/$n.$arch.rc" 2>/dev/null)" != "0" ]; then
    echo "FAILED: $f for sm_$arch"; cat "$tmp/$n.$arch.log"; status=1
  fi
  # Keep the object and the ptxas log for sass_report.py (a failed compile leaves no stale object).
  rm -f "$OBJDIR/$n.$arch.o" "$OBJDIR/$n.$arch.log"
  [ -f "$tmp/$n.$arch.o" ] && mv "$tmp/$n.$arch.o" "$OBJDIR/"
  cp "$tmp/$n.$arch.log" "$OBJDIR/" 2>/dev/null || true
done

# Resource report: one line per kernel and arch.
python3 - "$tmp" <<'PY' || status=1
import glob, os, re, subprocess, sys
tmp = sys.argv[1]
allow = os.environ.get("FASTATTN_ALLOW_SPILLS") == "1"
bad = []
print(f"{'file':<22} {'arch':<6} {'regs':>5} {'smem':>7} {'spill st':>9} {'spill ld':>9} {'stack':>6}  kernel")
for log in sorted(glob.glob(os.path.join(tmp, "*.log"))):
    base = os.path.basename(log)[:-4]
    fname, arch = base.rsplit(".", 1)
    text = open(log).read()
    cur = None
    spill = (0, 0)
    stack = 0
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            stack, spill = int(m.group(1)), (int(m.group(2)), int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            regs = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            smem = int(sm.group(1)) if sm else 0
            try:
                name = subprocess.run(["c++filt", cur], capture_output=True, text=True).stdout.strip()
            except OSError:
                name = cur
            name = name.replace("(anonymous namespace)::", "").replace("fastattn::", "")
            name = re.sub(r"^void ", "", name)
            name = re.sub(r"\((?!.*<).*$", "", name)[:100]
            print(f"{fname:<22} {arch:<6} {regs:>5} {smem:>7} {spill[0]:>9} {spill[1]:>9} {stack:>6}  {name}")
            if spill[0] or spill[1]:
                bad.append(f"{fname} sm_{arch} {name}: {spill[0]} B spill stores, {spill[1]} B spill loads")
            cur, spill, stack = None, (0, 0), 0
# Build cost: kernel instantiations per arch and each file's nvcc wall time (the parallel
# build's wall time is about the slowest file's; keep it well under ~3 minutes).
counts = {}
for log in glob.glob(os.path.join(tmp, "*.log")):
    arch = os.path.basename(log)[:-4].rsplit(".", 1)[1]
    counts[arch] = counts.get(arch, 0) + len(re.findall(r"Compiling entry function", open(log).read()))
print("kernel instantiations per arch: " + ", ".join(f"sm_{a} {n}" for a, n in sorted(counts.items())))
secs = []
for f in sorted(glob.glob(os.path.join(tmp, "*.secs"))):
    fname, arch = os.path.basename(f)[:-5].rsplit(".", 1)
    try:
        wall, user, sys_ = (float(x) for x in open(f).read().split()[-3:])
        secs.append((user + sys_, wall, fname, arch))
    except ValueError:
        pass
# CPU seconds are what a 16-core build pays per file regardless of how loaded this machine is;
# wall seconds are this run's (inflated when other work shares the cores).
print("nvcc per file, CPU s (wall s): " + ", ".join(f"{n}/sm_{a} {c:.0f} ({w:.0f})" for c, w, n, a in sorted(secs, reverse=True)))
print(f"nvcc CPU seconds in all: {sum(c for c, _, _, _ in secs):.0f}")
if bad:
    print("\nregister spills:\n  " + "\n  ".join(bad))
    if not allow:
        sys.exit(1)
PY
# The bindings' CUDA branches (#ifdef FASTATTN_WITH_CUDA) are only built with a CUDA torch,
# which CI does not have. Syntax-check them against the CPU torch's headers (which ship
# c10/cuda) plus the CUDA toolkit's, so a typo there cannot wait for a GPU machine to surface.
if [ "${FASTATTN_SKIP_BINDINGS_CHECK:-0}" != "1" ] && python3 -c "import torch" 2>/dev/null; then
  TI=$(python3 -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
  PYI=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  CUDA_INC="${CUDA_HOME:-/usr/local/cuda}/include"
  [ -f "$CUDA_INC/cuda_runtime.h" ] || CUDA_INC="$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include"
  mkdir -p "$tmp/shim/c10/cuda/impl"
  # A generated header the CPU wheel does not ship; its only content is this macro.
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$tmp/shim/c10/cuda/impl/cuda_cmake_macros.h"
  bpids=()
  for f in csrc/bindings/*.cpp; do
    { rc=0; g++ -fsyntax-only -std=c++20 -Wall -Werror -Wno-unknown-pragmas -DFASTATTN_WITH_CUDA -I"$tmp/shim" -I"$TI" \
      -I"$TI/torch/csrc/api/include" -I"$CUDA_INC" -I"$PYI" -Icsrc/include "$f" >"$tmp/$(basename "$f").bind.log" 2>&1 \
      || rc=$?; echo "$rc" >"$tmp/$(basename "$f").bind.rc"; } &
    bpids+=("$!:$f")
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 0.2; done
  done
  wait  # statuses from the .rc files, as for the kernels above
  for entry in "${bpids[@]}"; do
    f=${entry#*:}
    if [ "$(cat "$tmp/$(basename "$f").bind.rc" 2>/dev/null)" = "0" ]; then echo "bindings (CUDA branch, syntax): $f OK"; else
      echo "FAILED bindings (CUDA branch, syntax): $f"; cat "$tmp/$(basename "$f").bind.log"; status=1; fi
  done
else
  echo "bindings check skipped (torch not importable or FASTATTN_SKIP_BINDINGS_CHECK=1)"
fi

if [ $status -eq 0 ]; then echo "cuda_check: OK"; else echo "cuda_check: FAILED"; fi
exit $status
