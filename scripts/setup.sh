#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: installs what is missing, then builds fastattn.
#   * torch only if absent, and then the pinned CPU wheel `torch==2.13.0` (a local file on
#     these machines); never a plain `pip install torch`, which pulls GBs of CUDA packages.
#     A machine that already has a (CUDA) torch keeps it, and fastattn builds against it.
#   * test/benchmark tools only if absent (the GPU machine has them and no network).
#   * `pip install -e . --no-build-isolation`: the extension builds with ninja, incrementally.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: torch not found, installing torch==2.13.0 (CPU wheel)"
  "$PY" -m pip install -q "torch==2.13.0"
fi

missing=()
for spec in pytest:pytest pytest_benchmark:pytest-benchmark ninja:ninja numpy:numpy \
            transformers:transformers safetensors:safetensors tqdm:tqdm; do
  mod=${spec%%:*}; pkg=${spec#*:}
  "$PY" -c "import $mod" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  # transformers/safetensors only back optional tests; without a network the core still works.
  "$PY" -m pip install -q "${missing[@]}" || echo "setup: WARNING: could not install ${missing[*]}"
fi

# Rebuild only when a source file is newer than the built extension.
so=$(ls fastattn/_C*.so 2>/dev/null | head -1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -1)" ] \
   || ! "$PY" -c "import fastattn" >/dev/null 2>&1; then
  echo "setup: building fastattn (MAX_JOBS=${MAX_JOBS:-$(nproc)})"
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
    || MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py -q build_ext --inplace
fi
"$PY" -c "import fastattn; print('setup: fastattn', fastattn.__version__, 'ready; CUDA kernels built:', fastattn.cuda_built())"
