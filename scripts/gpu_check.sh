#!/usr/bin/env bash
# One command for a GPU session (DESIGN.md section 7): build for the visible arch, run the
# whole test suite on CUDA (a CUDA test that skips is a failure here), compute-sanitizer
# memcheck + racecheck over a representative subset, the benchmark suite against the peers,
# and leave the log, junit XML, results JSON and plot in the output folder.
#
#   scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_out)
#   scripts/gpu_check.sh --dry-run [OUT_DIR]  on a CPU machine: no build (the installed
#       extension is used), tests only collected, no sanitizer, benchmarks at tiny sizes;
#       proves the script and its output folder before a GPU minute is spent on them.
#   GPU_CHECK_SKIP_BENCH=1 / GPU_CHECK_SKIP_SANITIZER=1 to shorten a run;
#   GPU_CHECK_BENCH_FILTER="rms_norm" to pass -k to the benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
OUT_DIR="${1:-${OUT:-$PWD/gpu_check_out}}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
PY="${PYTHON:-python3}"
declare -A RC
step() { echo; echo "=== $1  ($(date -u +%T))"; }

step "device"
nvidia-smi || true
unset FASTATTN_CUDA_ARCHS FASTATTN_FORCE_CPU   # build for the visible GPU's arch only

if [ "$DRY_RUN" = "1" ]; then
  step "build (dry run: skipped, using the installed extension)"
  "$PY" -m fastattn info
  RC[build]=$?
  step "tests (dry run: collected only)"
  "$PY" -m pytest tests -q -p no:cacheprovider --collect-only >"$OUT_DIR/tests_collect.log" 2>&1
  RC[tests]=$?
  tail -n 1 "$OUT_DIR/tests_collect.log"
else
step "build"
start=$(date +%s)
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
  || MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py -q build_ext --inplace
RC[build]=$?
echo "build: rc=${RC[build]} in $(( $(date +%s) - start )) s"
"$PY" -m fastattn info
if ! "$PY" -c "import fastattn, torch, sys; sys.exit(0 if fastattn.cuda_built() and torch.cuda.is_available() else 1)"; then
  echo "gpu_check: the CUDA kernels are not built or no GPU is visible"; RC[build]=1
fi

step "tests (all, CUDA required: no CUDA test may skip)"
FASTATTN_REQUIRE_CUDA=1 "$PY" -m pytest tests -q -p no:cacheprovider -rs --junitxml="$OUT_DIR/tests.xml"
RC[tests]=$?
fi

if [ "$DRY_RUN" != "1" ] && [ "${GPU_CHECK_SKIP_SANITIZER:-0}" != "1" ] && command -v compute-sanitizer >/dev/null; then
  subset=()
  for f in tests/test_rms_norm.py tests/test_rotary.py tests/test_decode.py tests/test_flash_attn.py; do
    [ -f "$f" ] && subset+=("$f")
  done
  step "compute-sanitizer memcheck (${subset[*]})"
  timeout 900 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
    "$PY" -m pytest "${subset[@]}" -q -p no:cacheprovider -x -k "cuda and not compile and not opcheck"
  RC[memcheck]=$?
  step "compute-sanitizer racecheck (attention subset)"
  att=()
  for f in tests/test_flash_attn.py tests/test_decode.py tests/test_rms_norm.py; do [ -f "$f" ] && att+=("$f"); done
  timeout 900 compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
    "$PY" -m pytest "${att[@]}" -q -p no:cacheprovider -x -k "cuda and not compile and not opcheck and not grad and not backward"
  RC[racecheck]=$?
fi

if [ "${GPU_CHECK_SKIP_BENCH:-0}" != "1" ]; then
  step "benchmarks"
  args=(--out "$OUT_DIR/results.json")
  # The GPU machine may lack matplotlib: then plot afterwards, with bench --report --plot.
  if "$PY" -c "import matplotlib" 2>/dev/null; then args+=(--plot "$OUT_DIR/results.png")
  else echo "no matplotlib here: no plot (later: python -m fastattn bench --report results.json --plot results.png)"; fi
  [ "$DRY_RUN" = "1" ] && args+=(--tiny)
  [ -n "${GPU_CHECK_BENCH_FILTER:-}" ] && args+=(-k "$GPU_CHECK_BENCH_FILTER")
  "$PY" -m fastattn bench --log "$OUT_DIR/bench_pytest.log" "${args[@]}"
  RC[bench]=$?
fi

step "summary"
fail=0
for k in "${!RC[@]}"; do
  echo "  $k: rc=${RC[$k]}"
  [ "${RC[$k]}" != "0" ] && fail=1
done
echo "outputs in $OUT_DIR"
exit $fail
