#!/usr/bin/env bash
# Idempotent set-up for a fresh machine (`make setup`): installs what is missing, then builds
# fastattn, saying what it does at each step.
#   * torch only if absent, and then the pinned CPU wheel `torch==2.13.0` (a local file on
#     these machines); never a plain `pip install torch`, which pulls GBs of CUDA packages.
#     A machine that already has a (CUDA) torch keeps it, and fastattn builds against it.
#   * test/benchmark tools only if absent (the GPU machine has them and no network).
#   * `pip install -e . --no-build-isolation`: the extension builds with ninja, incrementally,
#     in a persistent folder under build/ (see setup.py), printing one line per compiled unit
#     ("[3/7] csrc/cpu/flash_fwd.cpp (avx2)") plus any compiler diagnostics in full; the
#     whole output goes to build/setup.log. Skipped when no source changed since the last
#     build with the same configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
say() { echo "setup: $*"; }

# One interpreter start for everything below: find_spec / the installed metadata, no imports
# (importing torch or transformers costs seconds).
probe() {
  "$PY" - "$@" <<'PYEOF'
import importlib.util, os, re, sys
from importlib import metadata
what = sys.argv[1]
if what == "torch":
    spec = importlib.util.find_spec("torch")
    if spec is None:
        sys.exit(1)
    cuda = None
    try:
        src = open(os.path.join(spec.submodule_search_locations[0], "version.py")).read()
        m = re.search(r"^cuda\b[^=]*=\s*['\"]([^'\"]+)['\"]", src, re.M)
        cuda = m.group(1) if m else None
    except OSError:
        pass
    print(metadata.version("torch"), f"(CUDA {cuda})" if cuda else "(CPU)")
else:  # modules:packages -> the missing packages
    print(" ".join(p.split(":")[1] for p in sys.argv[2:] if importlib.util.find_spec(p.split(":")[0]) is None))
PYEOF
}

say "python $("$PY" -c 'import sys; print(sys.version.split()[0])') ($(command -v "$PY"))"
if ! TORCH=$(probe torch); then
  say "torch not found, installing torch==2.13.0 (CPU wheel)"
  "$PY" -m pip install -q "torch==2.13.0"
  TORCH=$(probe torch)
fi
say "torch $TORCH"

tools="pytest:pytest pytest_benchmark:pytest-benchmark ninja:ninja numpy:numpy transformers:transformers
       safetensors:safetensors tqdm:tqdm matplotlib:matplotlib"
# shellcheck disable=SC2086
read -r -a missing <<<"$(probe tools $tools)"
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  # transformers/safetensors/matplotlib only back optional tests and plots; without a
  # network the core still works.
  "$PY" -m pip install -q "${missing[@]}" || say "WARNING: could not install ${missing[*]}"
else
  say "test tools present (pytest, pytest-benchmark, ninja, numpy, transformers, safetensors, tqdm, matplotlib)"
fi

# Rebuild when an extension is missing, a source is newer than the oldest built library, the
# build configuration changed, or the package does not import.
mkdir -p build
config="torch=$TORCH march=${FASTATTN_CPU_MARCH:-portable} force_cpu=${FASTATTN_FORCE_CPU:-0} archs=${FASTATTN_CUDA_ARCHS:-}"
oldest=$(ls -tr fastattn/_C*.so fastattn/_cpu_*.so 2>/dev/null | head -1 || true)
READY="import fastattn; print('setup: fastattn', fastattn.__version__, 'ready; CUDA kernels built:', fastattn.cuda_built(), '; CPU kernels:', fastattn.cpu_isa())"
ready=""
reason=""
if [ -z "$(ls fastattn/_C*.so 2>/dev/null || true)" ]; then
  reason="fastattn._C is not built"
elif newer=$(find csrc setup.py -newer "$oldest" -type f 2>/dev/null | head -1) && [ -n "$newer" ]; then
  reason="$newer changed"
elif [ "$(cat build/setup.config 2>/dev/null || true)" != "$config" ]; then
  reason="build configuration changed ($config)"
elif ! ready=$("$PY" -c "$READY" 2>/dev/null); then
  reason="import fastattn fails"
fi

# Shows our lines and the compiler's output; pip's and setuptools' chatter only goes to the log.
# A progress line opens a region in which everything (compiler diagnostics, a failing
# command) is shown; the next "fastattn:" line closes it.
# A shell loop, not awk: mawk (Debian's awk) reads a pipe in blocks, and every line of a
# minutes-long build then came out at its end.
progress() {
  local line text region=0
  while IFS= read -r line || [ -n "$line" ]; do
    text="${line#"${line%%[! ]*}"}"  # without its leading spaces
    if [[ $text == "fastattn: "* ]]; then
      printf '  %s\n' "$text"; region=0
    elif [[ $text =~ ^\[[0-9]+/[0-9]+\]\  ]]; then
      printf '  %s\n' "$text"; region=1
    elif [ "$region" = 1 ]; then
      printf '%s\n' "$line"
    fi
  done
}

if [ -n "$reason" ]; then
  # (nproc honours OMP_NUM_THREADS, which a test setting of 1 must not make a 1-job build)
  jobs="${MAX_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
  say "building fastattn ($reason): pip install --no-build-isolation --no-deps -e . (MAX_JOBS=$jobs, log: build/setup.log)"
  start=$SECONDS
  if ! MAX_JOBS="$jobs" "$PY" -m pip install -v --no-build-isolation --no-deps -e . 2>&1 \
       | tee build/setup.log | progress; then
    say "pip install -e failed; last lines of build/setup.log:"
    tail -n 25 build/setup.log | sed 's/^/  | /'
    say "falling back to: setup.py build_ext --inplace"
    MAX_JOBS="$jobs" "$PY" setup.py build_ext --inplace 2>&1 | tee -a build/setup.log | progress || {
      status=$?
      say "build FAILED (exit status $status); last lines of build/setup.log:"
      tail -n 40 build/setup.log | sed 's/^/  | /'
      exit "$status"
    }
  fi
  echo "$config" > build/setup.config
  ready=""
  say "build done in $((SECONDS - start)) s"
else
  say "fastattn is up to date (no change since the last build); skipping the build"
fi
[ -n "$ready" ] || ready=$("$PY" -c "$READY")
echo "$ready"
