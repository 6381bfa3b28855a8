#!/usr/bin/env bash
# Real CUDA build check (no GPU needed): the CUDA build of torch in a venv of its own, fastattn
# built with nvcc (sm_80 + sm_90a) against it and linked, `import fastattn` with WITH_CUDA=1,
# and every op of the `fastattn` library (found in the dispatcher, cross-checked with the m.def schemas of
# csrc/bindings) has a CPU, a CUDA and a Meta kernel. Catches binding compile errors and
# undefined symbols of the CUDA path, which the CPU build and `make cuda-check` never see.
#
#   scripts/cuda_build_check.sh            (make cuda-build-check; CI runs it)
#
# Nothing of the checkout's own build is touched: the sources (csrc, fastattn, setup.py,
# pyproject.toml) are copied to build/cuda-check/src and built there, so fastattn/_C*.so and
# build/fastattn-*-cpu-*/ stay the CPU build of the main environment.
#
# Environment:
#   CUDA_BUILD_VENV      the venv (default build/venv-cuda; reused when it already has the torch)
#   CUDA_BUILD_TORCH     the torch to install there (default torch==2.14.1: a CUDA 13.0 build
#                        that pip on Python 3.11 takes from this machine's disk; ~5.5 GB)
#   CUDA_BUILD_ARCHS     FASTATTN_CUDA_ARCHS for the build (default "8.0;9.0a", setup.py's own
#                        default without a GPU; "9.0a" alone saves about a minute of nvcc on 2
#                        cores: the bindings' g++ against torch's headers is most of the build)
#   CUDA_BUILD_CPU_MARCH FASTATTN_CPU_MARCH for the build (default x86-64: _C's CPU kernels
#                        once, no CPU tier libraries -- those are CPU-only, identical with or
#                        without CUDA, and built and tested by `make test`; "portable" builds
#                        them too)
#   CUDA_HOME            the CUDA toolkit (default: /usr/local/cuda, else nvcc's parent)
#   MAX_JOBS             parallel compile jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV="${CUDA_BUILD_VENV:-build/venv-cuda}"
TORCH_SPEC="${CUDA_BUILD_TORCH:-torch==2.14.1}"
ARCHS="${CUDA_BUILD_ARCHS:-8.0;9.0a}"
CPU_MARCH="${CUDA_BUILD_CPU_MARCH:-x86-64}"
WORK=build/cuda-check
SRC="$WORK/src"
LOG="$WORK/build.log"
export MAX_JOBS="${MAX_JOBS:-2}"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
step_t=$T0
mkdir -p "$WORK"

say() { echo "cuda_build_check: $*"; }
step() {  # one line per finished step, with its time and the total so far
  local now; now=$(date +%s)
  say "$1 ($((now - step_t)) s; total $((now - T0)) s)"
  step_t=$now
}
die() { echo "cuda_build_check: FAILED: $*" >&2; exit 1; }

# ---- 1. preflight: everything that can fail early fails here ------------------------------
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
[ -x "$NVCC" ] || die "nvcc not found (set NVCC=... or put it on PATH)"
if [ -z "${CUDA_HOME:-}" ]; then
  # torch would guess CUDA_HOME from `which nvcc`; /usr/local/bin/nvcc is a wrapper script,
  # which would give /usr/local (no cuda_runtime.h there).
  if [ -f /usr/local/cuda/include/cuda_runtime.h ]; then CUDA_HOME=/usr/local/cuda
  else CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$NVCC")")")"; fi
fi
export CUDA_HOME
[ -f "$CUDA_HOME/include/cuda_runtime.h" ] || die "no cuda_runtime.h under CUDA_HOME=$CUDA_HOME"
[ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc under CUDA_HOME=$CUDA_HOME/bin"
NVCC_VER=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
PYBASE="${PYTHON:-python3}"
PYVER=$("$PYBASE" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "$PYBASE not runnable"
say "nvcc $NVCC_VER (CUDA_HOME=$CUDA_HOME), $PYBASE $PYVER, venv $VENV, $TORCH_SPEC, archs $ARCHS, MAX_JOBS=$MAX_JOBS, load $(cut -d' ' -f1-3 /proc/loadavg)"

VPY="$VENV/bin/python"
want_torch=${TORCH_SPEC#torch==}
have_torch=""
if [ -x "$VPY" ]; then
  have_torch=$("$VPY" -c 'from importlib import metadata; print(metadata.version("torch"))' 2>/dev/null || true)
fi
if [ "$have_torch" != "$want_torch" ]; then
  [ "$PYVER" = "3.11" ] || die "$TORCH_SPEC is on this machine's disk for Python 3.11 only; $PYBASE is $PYVER"
  mkdir -p "$(dirname "$VENV")"
  free_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print int($4 / 1048576)}')
  [ "$free_gb" -ge 8 ] || die "only $free_gb GB free under $(dirname "$VENV"); the CUDA torch venv needs ~6 GB (+ ~1 GB build)"
  say "disk: $free_gb GB free, venv needs ~6 GB"
fi
step "preflight OK"

# ---- 2. the venv with the CUDA torch ------------------------------------------------------
if [ "$have_torch" != "$want_torch" ]; then
  if [ ! -x "$VPY" ]; then
    "$PYBASE" -m venv "$VENV" || die "python3 -m venv $VENV"
    step "venv created: $VENV"
  fi
  # Pinned, never a bare `torch`: pip (Python 3.11) takes torch and the nvidia-* wheels from
  # this machine's disk. numpy/ninja pinned as in the main environment.
  "$VPY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" numpy==2.4.6 ninja==1.13.2 \
    >"$WORK/pip.log" 2>&1 || { tail -30 "$WORK/pip.log" >&2; die "pip install $TORCH_SPEC into $VENV"; }
  step "installed $TORCH_SPEC, numpy, ninja into $VENV ($(du -sh "$VENV" | cut -f1))"
else
  step "reusing $VENV (torch $have_torch)"
fi
read -r TV TCUDA < <("$VPY" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null) \
  || die "torch does not import in $VENV"
[ "$TCUDA" != "None" ] || die "torch $TV in $VENV is a CPU build"
[ "${TCUDA%%.*}" = "${NVCC_VER%%.*}" ] || die "torch $TV is built with CUDA $TCUDA, nvcc is $NVCC_VER (major versions must match)"
step "torch $TV (CUDA $TCUDA) imports"

# ---- 3. an out-of-tree copy of the sources ------------------------------------------------
# tar keeps mtimes, so ninja (in $SRC/build/) recompiles only what changed since the last
# run on this machine; stale files are removed first, built .so files kept.
mkdir -p "$SRC"
rm -rf "$SRC/csrc"
[ -d "$SRC/fastattn" ] && find "$SRC/fastattn" -type f ! -name '*.so' -delete
tar -C "$ROOT" --exclude='*.so' --exclude=__pycache__ -cf - csrc fastattn setup.py pyproject.toml README.md | tar -C "$SRC" -xf -
step "sources copied to $SRC"

# ---- 4. build with nvcc against the CUDA torch --------------------------------------------
# No GPU is needed: FASTATTN_CUDA_ARCHS names the archs (else setup.py would ask the GPU).
say "building (FASTATTN_CUDA_ARCHS=$ARCHS FASTATTN_CPU_MARCH=$CPU_MARCH, nice -n 10; log $LOG) ..."
if ! (cd "$SRC" && env -u FASTATTN_FORCE_CPU FASTATTN_CUDA_ARCHS="$ARCHS" FASTATTN_CPU_MARCH="$CPU_MARCH" \
      nice -n 10 "$ROOT/$VPY" setup.py build_ext --inplace) >"$LOG" 2>&1; then
  echo "---- last 150 lines of $LOG ----" >&2
  tail -150 "$LOG" >&2
  grep -n -E "error|undefined reference" "$LOG" | head -40 >&2 || true
  die "CUDA build of fastattn (see above)"
fi
units=$(grep -c -E '^\[[0-9]+/[0-9]+\] ' "$LOG" || true)
cu=$(grep -c -E '^\[[0-9]+/[0-9]+\] .*\(cuda\)$' "$LOG" || true)
so=$(ls "$SRC"/fastattn/_C*.so)
step "built and linked $(basename "$so") ($((units)) ninja steps, $cu .cu units; $(du -h "$so" | cut -f1))"

# ---- 5. import and dispatcher check -------------------------------------------------------
# Run from outside the checkout so that only the copy's fastattn can be imported.
(cd "$WORK" && PYTHONPATH="$ROOT/$SRC" "$ROOT/$VPY" - "$ROOT/$SRC" "$ROOT/csrc/bindings" 2>&1) <<'PY' || die "import / dispatcher check (see above)"
import glob, os, re, sys, time, warnings
t = time.time()
src, bindings = sys.argv[1], sys.argv[2]
warnings.filterwarnings("ignore")
import torch
import fastattn  # dlopen with RTLD_NOW: an undefined symbol fails here
assert os.path.realpath(fastattn.__file__).startswith(os.path.realpath(src)), fastattn.__file__
print(f"cuda_build_check: import fastattn OK: {os.path.relpath(fastattn._C.__file__, os.path.dirname(src))}, "
      f"WITH_CUDA={int(fastattn._C.WITH_CUDA)}, CUDA_ARCHS={getattr(fastattn._C, 'CUDA_ARCHS', '?')}, "
      f"torch.cuda.is_available()={torch.cuda.is_available()}")
if not fastattn.cuda_built():
    sys.exit("cuda_build_check: FAILED: fastattn._C was built without CUDA (WITH_CUDA=0)")

# The ops: whatever the dispatcher has in the fastattn namespace, and whatever the bindings
# define with m.def("name(...") -- the two lists must agree.
ops = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastattn::"))
defined = set()
for f in glob.glob(os.path.join(bindings, "*.cpp")):
    defined |= set(re.findall(r'm\.def\(\s*"([A-Za-z_][A-Za-z0-9_]*)(?:\.[A-Za-z0-9_]+)?\(', open(f).read()))
bad = []
if not ops:
    bad.append("no op in the fastattn namespace")
for name in sorted(defined - set(ops)):
    bad.append(f"{name}: defined in csrc/bindings but not in the dispatcher")
for name in sorted(set(ops) - defined):
    bad.append(f"{name}: in the dispatcher but no m.def in csrc/bindings (check the regex)")
keys = ["CPU", "CUDA", "Meta"]
extra = ["Autograd", "CompositeImplicitAutograd"]
print(f"{'op':<26}" + "".join(f"{k:>7}" for k in keys) + "  other")
for name in ops:
    q = f"fastattn::{name}"
    has = {k: torch._C._dispatch_has_kernel_for_dispatch_key(q, k) for k in keys + extra}
    print(f"{name:<26}" + "".join(f"{'yes' if has[k] else 'NO':>7}" for k in keys)
          + "  " + ",".join(k for k in extra if has[k]))
    for k in keys:
        if not has[k]:
            bad.append(f"{name}: no {k} kernel")
# The CPU path of the CUDA build runs (one tiny call; no GPU here).
x = torch.randn(3, 8)
y, _ = torch.ops.fastattn.rms_norm_fwd(x, torch.ones(8), 1e-6)
ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
if not torch.allclose(y, ref, atol=1e-5):
    bad.append("rms_norm_fwd on CPU gives wrong numbers in the CUDA build")
if bad:
    print("cuda_build_check: FAILED:\n  " + "\n  ".join(bad))
    sys.exit(1)
print(f"cuda_build_check: {len(ops)} ops, each with CPU, CUDA and Meta kernels; CPU rms_norm_fwd OK "
      f"({time.time() - t:.0f} s)")
PY
step "import and dispatcher check OK"
say "OK ($(( $(date +%s) - T0 )) s)"
