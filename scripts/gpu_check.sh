#!/usr/bin/env bash
# One command for a GPU session (DESIGN.md section 7), sized to one lease: 15 minutes of device
# time in all, one command at most 10 minutes. Every step runs under its own `timeout`, writes
# into the output folder as it goes, and the summary table (step, status, seconds) is printed
# last even when a step times out or fails. Total at most 510 s (8.5 min) on a 16-core H100/H200.
#
#   scripts/gpu_check.sh [OUT_DIR]            OUT_DIR default: $OUT, else ./gpu_check_out
#   scripts/gpu_check.sh --dry-run [--quick] [OUT_DIR]
#       the same script on a CPU machine: no build (the extension already built in the
#       checkout), the CUDA test files run (every test skips), the sweep and the sanitizer
#       driver's cases at tiny sizes on the CPU, sanitizers and ncu "skipped (no GPU)", the
#       benchmarks with --tiny. --quick: one CUDA test file (tests/test_gpu_check.py).
#
# Steps (budget seconds, printed at the start; GPU_CHECK_T_<STEP> overrides one):
#   info       nvidia-smi, versions, the tools present
#   build      setup.py build_ext --inplace for the visible arch only, MAX_JOBS=nproc
#              (incremental: setup.py keeps its objects under build/)
#   tests      pytest -m cuda, one process per test file (-x in each, so one broken file
#              neither hides the rest nor, with a sticky CUDA error, poisons them), up to
#              GPU_CHECK_TEST_JOBS files at once; FASTATTN_REQUIRE_CUDA=1; a per-test timeout
#              when pytest-timeout is installed
#   sweep      scripts/gpu_sweep.py --all: production shapes the unit tests miss (soft-capped
#              flash/varlen/decode/kvcache and a Gemma-2-like model step included), then the
#              sanitizer driver's cases without a sanitizer, each vs fastattn.reference
#   memcheck, racecheck
#              compute-sanitizer over scripts/gpu_sweep.py --paths (every kernel path once,
#              the softcap twins too, small; only fastattn's kernels instrumented), after a
#              trivial probe run (in memcheck's box); both skip cleanly where the sanitizer is
#              missing, refuses the device or cannot start torch within the probe's 20 s
#   bench      the headline benchmarks (decode, rms_norm, rotary, flash forward and forward +
#              backward; no model, no torch.compile) with python -m fastattn bench -k "$BENCH_K",
#              then scripts/gpu_ab_decode.py: both decode kernels (tensor-core and CUDA-core,
#              FASTATTN_DECODE_MMA) on the shapes whose kernel choice is unmeasured
#   ncu        optional (GPU_CHECK_NCU=1), only in the time left: ncu --clock-control none on
#              the --paths driver, one launch per kernel; speed of light, warp stall reasons,
#              launch geometry and occupancy as CSV (ncu.csv)
# After a failed build the GPU steps are "skipped (build failed)". GPU_CHECK_SKIP="memcheck
# bench" skips named steps (skipping build uses the extension already built: a rerun on the
# warm machine); GPU_CHECK_TEST_FILES="tests/a.py tests/b.py" runs only those test files;
# GPU_CHECK_BENCH_K replaces the benchmark -k expression; GPU_CHECK_TEST_JOBS (4) and
# GPU_CHECK_TEST_TIMEOUT (45 s per test) tune the tests step. Exit status 0 only when every
# step that ran passed.
#
# Output folder (at most 8 files: what the device tool brings back): gpu_check.log (everything),
# summary.tsv, tests.tsv (one line per test file), sweep.json, bench.json, bench.png,
# bench_pytest.log, ncu.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY_RUN=0
QUICK=0
OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUT_DIR=$arg ;;
  esac
done
OUT_DIR="${OUT_DIR:-${OUT:-$ROOT/gpu_check_out}}"
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || { echo "gpu_check: cannot create $OUT_DIR" >&2; exit 2; }
PY="${PYTHON:-python3}"
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.tsv"
: >"$LOG"
printf 'step\tstatus\tseconds\tbudget\n' >"$SUMMARY"
# The log gets everything as it happens; fds 3/4 keep the terminal for the final table, which
# is printed after tee is flushed so that it really is the last thing on stdout.
exec 3>&1 4>&2
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

# ---- time budget -----------------------------------------------------------------------------
# Per-step budgets in seconds. tests/test_gpu_check.py parses these lines and checks that their
# sum plus KILL_GRACE per step plus SLACK stays within TOTAL_BUDGET: keep the format.
declare -A BUDGET
BUDGET[info]=${GPU_CHECK_T_INFO:-8}
BUDGET[build]=${GPU_CHECK_T_BUILD:-120}  # 42-44 s in both H200 sessions (sm_90a, 16 jobs)
BUDGET[tests]=${GPU_CHECK_T_TESTS:-122}
BUDGET[sweep]=${GPU_CHECK_T_SWEEP:-40}
BUDGET[memcheck]=${GPU_CHECK_T_MEMCHECK:-58}  # the probe (<= 20 s) included
BUDGET[racecheck]=${GPU_CHECK_T_RACECHECK:-45}
BUDGET[bench]=${GPU_CHECK_T_BENCH:-90}  # 32 s for the suites in the second H200 session, + the A/B
OPTIONAL_BUDGET_ncu=${GPU_CHECK_T_NCU:-60}  # optional step: only ever gets the time left
TOTAL_BUDGET=510   # seconds: 8.5 minutes, the whole command
KILL_GRACE=2       # timeout -k: SIGKILL this long after SIGTERM
SLACK=10           # the summary, the tee flush, shell overhead
STEPS=(info build tests sweep memcheck racecheck bench ncu)
BUDGET[ncu]=$OPTIONAL_BUDGET_ncu

T_START=$(date +%s)
DEADLINE=$((T_START + TOTAL_BUDGET - SLACK))
SKIP_LIST=" ${GPU_CHECK_SKIP:-} "
SKIP_LIST=${SKIP_LIST//,/ }
declare -A STATUS SECS
BUILD_OK=1

now_ms() { date +%s%3N; }
fmt_secs() { printf '%d.%d' $(($1 / 1000)) $((($1 % 1000) / 100)); }

record() {  # record STEP STATUS MILLISECONDS
  STATUS[$1]=$2
  SECS[$1]=$(fmt_secs "$3")
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "${SECS[$1]}" "${BUDGET[$1]}" >>"$SUMMARY"
  echo "--- $1: $2 (${SECS[$1]} s)"
}

# run_step STEP FUNCTION: runs the (exported) shell function under `timeout`, its budget
# capped by the time left before the deadline; timeout kills the function's whole process
# group (pytest, compute-sanitizer and their children included).
run_step() {
  local step=$1 fn=$2 left t rc t0
  if [[ "$SKIP_LIST" == *" $step "* ]]; then
    record "$step" "skipped (GPU_CHECK_SKIP)" 0; return
  fi
  left=$((DEADLINE - $(date +%s) - KILL_GRACE))
  t=${BUDGET[$step]}
  ((t > left)) && t=$left
  if ((t < 3)); then
    record "$step" "skipped (no time left)" 0; return
  fi
  echo
  echo "=== $step  (budget ${BUDGET[$step]} s, time box $t s, $(date -u +%T), +$(($(date +%s) - T_START)) s)"
  export STEP_DEADLINE=$(($(date +%s) + t))
  : >"$STEP_NOTE"
  t0=$(now_ms)
  timeout -k "$KILL_GRACE" "$t" bash -c "$fn" </dev/null
  rc=$?
  local ms=$(($(now_ms) - t0))
  if ((rc == 0)); then record "$step" "pass" "$ms"
  elif ((rc == 124 || rc == 137)); then record "$step" "TIMEOUT (time box $t s)" "$ms"
  elif ((rc == 77)); then record "$step" "$(cat "$STEP_NOTE" 2>/dev/null || echo skipped)" "$ms"
  else record "$step" "FAIL (rc $rc)" "$ms"
  fi
}

skip_step() {  # skip_step STEP REASON
  echo; echo "=== $1: skipped ($2)"
  record "$1" "skipped ($2)" 0
}

# A step function that decides to skip itself writes its status to $STEP_NOTE and exits 77.
STEP_NOTE=$(mktemp)
TMP_DIR=$(mktemp -d)
trap 'rm -rf "$TMP_DIR" "$STEP_NOTE"' EXIT

export ROOT OUT_DIR PY DRY_RUN QUICK STEP_NOTE TMP_DIR
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's fastattn, built in place
export PYTHONUNBUFFERED=1
unset FASTATTN_FORCE_CPU

# ---- the steps (each runs in `bash -c` under timeout, so they are exported) -------------------
step_info() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  echo "nproc: $(nproc)"
  for tool in nvcc compute-sanitizer ncu; do
    if command -v "$tool" >/dev/null; then echo "$tool: $("$tool" --version 2>&1 | tail -n 1)"
    else echo "$tool: not found"; fi
  done
  # No torch import here (a cold import can take longer than this step's box): the build
  # step's `fastattn info` prints python, torch, CUDA and the device.
  "$PY" -c "import pytest_timeout" 2>/dev/null && echo "pytest-timeout: yes" || echo "pytest-timeout: no (the step time boxes only)"
  return 0
}

step_build() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: no build; the extension already built in the checkout:"
    "$PY" -m fastattn info
    return
  fi
  # Only the visible GPU's arch ("9.0" -> "9.0a": sm_90a features, as setup.py's default).
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  [ -n "$cap" ] || cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  [ "${cap%%.*}" -ge 9 ] 2>/dev/null && cap="${cap}a"
  export FASTATTN_CUDA_ARCHS="${FASTATTN_CUDA_ARCHS:-$cap}"
  # The CUDA tests need no portable CPU tiers: one native CPU build instead of three.
  export FASTATTN_CPU_MARCH="${GPU_CHECK_CPU_MARCH:-native}"
  export MAX_JOBS="${MAX_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
  echo "FASTATTN_CUDA_ARCHS=$FASTATTN_CUDA_ARCHS FASTATTN_CPU_MARCH=$FASTATTN_CPU_MARCH MAX_JOBS=$MAX_JOBS"
  # setup.py directly: no pip, so nothing can try to reach an index on the offline machine.
  "$PY" setup.py -q build_ext --inplace || return 1
  "$PY" -m fastattn info || return 1
  "$PY" -c "import fastattn, torch, sys; sys.exit(0 if fastattn.cuda_built() and torch.cuda.is_available() else 1)" \
    || { echo "build: the CUDA kernels are not built or no GPU is visible"; return 1; }
}

# The test files with CUDA tests: those that parametrize over conftest.DEVICES or use the cuda
# marker, found by grep so a new file is never left out. Known heavy files go first, so that
# the parallel jobs finish together; any other file follows.
CUDA_TEST_ORDER="test_rms_norm test_flash_attn test_kvcache test_softcap test_rotary test_flash_attn_varlen test_sdpa
test_flash_attn_bwd test_decode test_nn_rms_norm test_flash_attn_train test_nn_rotary test_hf_rms_norm_autocast
test_model_paged test_model test_hf_integration"
export CUDA_TEST_ORDER

cuda_test_files() {
  local found f
  found=$(grep -lE '\bDEVICES\b|mark\.cuda\b' tests/test_*.py | sort)
  for f in $CUDA_TEST_ORDER; do
    grep -qx "tests/$f.py" <<<"$found" && echo "tests/$f.py"
  done
  for f in $found; do
    grep -qw "$(basename "$f" .py)" <<<"$CUDA_TEST_ORDER" || echo "$f"
  done
}

step_tests() {
  # Units of work, one pytest process each: one file per unit on the GPU. In a dry run every
  # test skips, so per-file isolation buys nothing and one process over all files (or, with
  # --quick, over one file) runs the same loop in a fraction of the time.
  local units=() f all=""
  for f in $(cuda_test_files); do all+="$f "; done
  if [ "$DRY_RUN" = 1 ] && [ "$QUICK" = 1 ]; then units=("tests/test_decode.py")
  elif [ "$DRY_RUN" = 1 ]; then units=("${all% }")
  else for f in $all; do units+=("$f"); done
  fi
  # A rerun can name its files: GPU_CHECK_TEST_FILES="tests/test_decode.py tests/test_kvcache.py".
  if [ -n "${GPU_CHECK_TEST_FILES:-}" ]; then read -r -a units <<<"$GPU_CHECK_TEST_FILES"; fi
  local jobs=${GPU_CHECK_TEST_JOBS:-4}
  local args=(-m cuda -x -q -p no:cacheprovider --tb=short)
  # GPU: list the reasons of the skips left (a CUDA test skipping there deserves a look).
  if [ "$DRY_RUN" = 1 ]; then args+=(-rfE); else args+=(-rfEs); fi
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    # thread method: a test stuck in a CUDA sync never returns to Python for a signal.
    args+=(-o "timeout=${GPU_CHECK_TEST_TIMEOUT:-45}" -o timeout_method=thread)
  fi
  local env_req=()
  [ "$DRY_RUN" = 1 ] || env_req=(env FASTATTN_REQUIRE_CUDA=1)
  local tsv="$OUT_DIR/tests.tsv"
  printf 'files\tstatus\tseconds\tresult\n' >"$tsv"
  echo "${#units[@]} pytest processes, $jobs at a time: pytest FILES ${args[*]}"
  declare -A pids
  local running=0 i=0 fail=0 n k rc secs
  finish_one() {  # report a finished unit: its log, then one line in tests.tsv
    local k=$1 rc=$2 secs=$3 log="$TMP_DIR/unit$1.log" st last
    last=$(grep -E '(passed|failed|skipped|error|deselected|no tests ran)' "$log" | tail -n 1)
    if ((rc == 0)); then st=pass; elif ((rc == 124 || rc == 137)); then st=TIMEOUT; else st="FAIL (rc $rc)"; fi
    ((rc == 0)) || fail=1
    echo "----- ${units[$k]}: $st in ${secs} s: $last"
    cat "$log"
    printf '%s\t%s\t%s\t%s\n' "${units[$k]}" "$st" "$secs" "$last" >>"$tsv"
  }
  while ((i < ${#units[@]} || running > 0)); do
    while ((running < jobs && i < ${#units[@]})); do
      n=$i; i=$((i + 1))
      local left=$((STEP_DEADLINE - $(date +%s) - 3))
      if ((left < 5)); then
        echo "----- ${units[$n]}: not run (the step's time is spent)"
        printf '%s\tnot run\t0\t\n' "${units[$n]}" >>"$tsv"; fail=1; continue
      fi
      # Each unit gets its own time box inside the step's, so it ends before the step does.
      # ${units[$n]} unquoted: a unit is a space-separated list of files.
      ( s=$(date +%s); timeout -k 2 "$left" "${env_req[@]}" "$PY" -m pytest ${units[$n]} "${args[@]}" \
          >"$TMP_DIR/unit$n.log" 2>&1
        echo "$? $(($(date +%s) - s))" >"$TMP_DIR/unit$n.rc" ) &
      pids[$n]=$!; running=$((running + 1))
    done
    ((running > 0)) || break
    wait -n 2>/dev/null
    for k in "${!pids[@]}"; do
      if [ -f "$TMP_DIR/unit$k.rc" ]; then
        read -r rc secs <"$TMP_DIR/unit$k.rc"
        wait "${pids[$k]}" 2>/dev/null
        finish_one "$k" "$rc" "$secs"
        unset "pids[$k]"; running=$((running - 1))
      fi
    done
  done
  echo "tests: $(grep -c $'\tpass\t' "$tsv") of ${#units[@]} pytest processes passed (tests.tsv)"
  return $fail
}

step_sweep() {
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" scripts/gpu_sweep.py --all --device cpu --tiny --json "$OUT_DIR/sweep.json"
  else
    # --all: the sanitizers' driver cases too, plain, so a sanitizer step that fails can be
    # read as a sanitizer finding (or not) against this run.
    "$PY" scripts/gpu_sweep.py --all --device cuda --json "$OUT_DIR/sweep.json"
  fi
}

# The sanitizers run the --paths driver with the caching allocator off, so that an access past
# a tensor lands outside any allocation instead of inside a cached block.
SANITIZER_ARGS="--error-exitcode 86 --print-limit 20 --report-api-errors no"
export SANITIZER_ARGS

# The probe: a trivial CUDA run under memcheck, inside the memcheck step's box. Where the
# sanitizer refuses the device (gVisor: "Device not supported", then error 999) or cannot even
# start torch within the probe's own time box, memcheck and racecheck skip cleanly, saying why.
sanitizer_probe() {
  local out rc t=${GPU_CHECK_T_SANITIZER_PROBE:-20}
  out=$(timeout -k 2 "$t" compute-sanitizer --tool memcheck $SANITIZER_ARGS "$PY" -c \
    "import torch; x = torch.arange(8., device='cuda'); assert (x + 1).sum().item() == 36" 2>&1)
  rc=$?
  echo "$out" | tail -n 20
  if ((rc == 124 || rc == 137)); then echo "probe timed out after $t s (too slow here)"
  elif ((rc != 0)); then echo "sanitizer refuses the device, probe rc $rc"
  fi >"$TMP_DIR/sanitizer_probe"
  ((rc == 0))
}

run_sanitizer() {  # run_sanitizer TOOL
  # No GPU: skipped; the driver's cases ran on the CPU in the sweep step (gpu_sweep.py --all).
  if [ "$DRY_RUN" = 1 ]; then echo "skipped (no GPU)" >"$STEP_NOTE"; exit 77; fi
  if ! command -v compute-sanitizer >/dev/null; then echo "skipped (compute-sanitizer not found)" >"$STEP_NOTE"; exit 77; fi
  # memcheck probes; racecheck reuses that verdict (or probes itself when memcheck was skipped).
  if [ ! -e "$TMP_DIR/sanitizer_probe" ]; then
    sanitizer_probe && echo "probe passed: compute-sanitizer works here"
  fi
  if [ -s "$TMP_DIR/sanitizer_probe" ]; then
    echo "skipped ($(cat "$TMP_DIR/sanitizer_probe"))" >"$STEP_NOTE"; exit 77
  fi
  # kns=fastattn: instrument only our kernels (all in namespace fastattn), not torch's or
  # cuBLAS's in the reference computations: faster, and no reports about code we don't own.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$1" $SANITIZER_ARGS --kernel-name kns=fastattn \
    "$PY" scripts/gpu_sweep.py --paths --device cuda
}
step_memcheck() { run_sanitizer memcheck; }
step_racecheck() { run_sanitizer racecheck; }

# The headline benchmarks: decode (fastattn vs SDPA's flash and cuDNN backends), RMSNorm and
# RoPE (vs torch eager), flash forward and forward + backward d128 at S 2k and 8k (vs SDPA
# flash, cuDNN); no model suite, no torch.compile peers, no varlen/kvcache suites. About 67
# benchmarks on CUDA (the second H200 session ran 64 of them in 32 s).
BENCH_K='(bench_decode and not math and not efficient and not reference) or (bench_rms_norm and not compile) or (bench_rotary and not compile) or (bench_flash_attn.py and not d64 and not s512 and not s1024 and not s4096 and not s16384 and not math and not efficient) or (bench_flash_attn_bwd and (s2048 or s8192) and not efficient)'
export BENCH_K

step_bench() {
  local args=(-k "${GPU_CHECK_BENCH_K:-$BENCH_K}" --out "$OUT_DIR/bench.json" --log "$OUT_DIR/bench_pytest.log")
  if "$PY" -c "import matplotlib" 2>/dev/null; then args+=(--plot "$OUT_DIR/bench.png")
  else echo "no matplotlib: no plot (later: python -m fastattn bench --report bench.json --plot bench.png)"; fi
  [ "$DRY_RUN" = 1 ] && args+=(--tiny)
  "$PY" -m fastattn bench "${args[@]}" || return 1
  # Tensor-core vs CUDA-core decode, one process each (the table goes to the log).
  local ab=()
  [ "$DRY_RUN" = 1 ] && ab+=(--tiny)
  "$PY" scripts/gpu_ab_decode.py "${ab[@]}"
}

step_ncu() {
  if [ "$DRY_RUN" = 1 ]; then echo "skipped (no GPU)" >"$STEP_NOTE"; exit 77; fi
  if ! command -v ncu >/dev/null; then echo "skipped (ncu not found)" >"$STEP_NOTE"; exit 77; fi
  # --clock-control none: leave the card's clocks as found (device README); the --paths
  # driver launches each fastattn kernel about once, so the first 64 matching launches cover
  # every kernel (about 40 uncapped, about 20 more for the soft-capped cases).
  # The sections a text reader needs (the lease has no ncu UI): speed of light (DRAM / SM
  # throughput), warp stall reasons (e.g. "No Instruction" for an instruction-cache-bound
  # loop), launch geometry and occupancy; one CSV row per metric per launch in ncu.csv.
  ncu --clock-control none --kernel-name regex:'rms_norm|rotary|decode|append_kv|flash' --launch-count 64 \
    --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy \
    --csv --page details --log-file "$OUT_DIR/ncu.csv" "$PY" scripts/gpu_sweep.py --paths --device cuda
}
export -f cuda_test_files step_info step_build step_tests step_sweep sanitizer_probe run_sanitizer step_memcheck \
  step_racecheck step_bench step_ncu

# ---- run ---------------------------------------------------------------------------------------
budget_line=""
for s in "${STEPS[@]}"; do budget_line+="$s ${BUDGET[$s]}s, "; done
echo "gpu_check $( ((DRY_RUN)) && echo "--dry-run ")$( ((QUICK)) && echo "--quick ")into $OUT_DIR, $(date -u +%FT%TZ)"
echo "budget: ${budget_line%, } (ncu optional, time left only); total ${TOTAL_BUDGET} s"
echo "bench -k: ${GPU_CHECK_BENCH_K:-$BENCH_K}"

run_step info step_info
run_step build step_build
# A build skipped on purpose (a rerun on the warm machine with nothing changed) counts as built.
[ "${STATUS[build]}" = pass ] || [ "${STATUS[build]}" = "skipped (GPU_CHECK_SKIP)" ] || BUILD_OK=0
for s in tests sweep memcheck racecheck bench; do
  if ((BUILD_OK)); then run_step "$s" "step_$s"; else skip_step "$s" "build failed"; fi
done
if ((!BUILD_OK)); then skip_step ncu "build failed"
elif [ "${GPU_CHECK_NCU:-0}" = 1 ] || ((DRY_RUN)); then run_step ncu step_ncu
else skip_step ncu "GPU_CHECK_NCU not set"
fi

# ---- summary: always last ----------------------------------------------------------------------
fail=0
table=$(
  echo
  echo "=== summary ($( ((DRY_RUN)) && echo "dry run, ")$(( $(date +%s) - T_START )) s of ${TOTAL_BUDGET} s; outputs in $OUT_DIR)"
  printf '%-16s %-54s %8s %7s\n' step status seconds budget
  for s in "${STEPS[@]}"; do
    printf '%-16s %-54s %8s %7s\n' "$s" "${STATUS[$s]:-not run}" "${SECS[$s]:-0.0}" "${BUDGET[$s]}"
  done
)
for s in "${STEPS[@]}"; do
  case "${STATUS[$s]:-not run}" in pass|skipped*) ;; *) fail=1 ;; esac
done
# Flush the log's tee, then print the table to the terminal and append it to the log.
exec 1>&3 2>&4
wait "$TEE_PID" 2>/dev/null
result="gpu_check: $( ((fail)) && echo "FAILED" || echo "all steps passed or skipped")"
printf '%s\n%s\n' "$table" "$result" | tee -a "$LOG"
exit $fail
