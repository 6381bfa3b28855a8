# The two commands of the README quickstart, plus developer targets.
#   make demo        set up (idempotent) and run the main job: python -m fastattn demo
#   make test        set up (idempotent) and run the test suite
#   make cuda-check  compile every CUDA kernel with plain nvcc for sm_80 and sm_90a (objects kept
#                    in build/cuda-check/objs for sass-report)
#   make sass-report per-kernel SASS report of those objects (registers, spills, shared memory,
#                    occupancy, main-loop size, MOVs, LDG/STG widths, LDSM/MMA counts; JSON in
#                    build/cuda-check/sass_report.json) and the regression gate against
#                    scripts/sass_baseline.json (fails on new spills or narrower global loads/stores)
#   make sass-baseline  regenerate scripts/sass_baseline.json in one command (compiles every
#                    kernel, writes the baseline; commit it when a kernel change is intended)
#   make bench       set up and run the benchmark suite (table + results JSON)
PY ?= python3

.PHONY: setup demo test cuda-check cuda-build-check sass-report sass-baseline bench gpu-check

setup:
	@PYTHON="$(PY)" bash scripts/setup.sh

demo: setup
	$(PY) -m fastattn demo

test: setup
	$(PY) -m pytest tests -q -p no:cacheprovider

cuda-check:
	@bash scripts/cuda_check.sh

cuda-build-check:
	@bash scripts/cuda_build_check.sh

SASS_OBJS = build/cuda-check/objs
sass-report:
	@[ -n "$(wildcard $(SASS_OBJS)/*.o)" ] || bash scripts/cuda_check.sh
	$(PY) scripts/sass_report.py $(SASS_OBJS) --json build/cuda-check/sass_report.json --check scripts/sass_baseline.json

sass-baseline:
	@bash scripts/cuda_check.sh
	$(PY) scripts/sass_report.py $(SASS_OBJS) --json build/cuda-check/sass_report.json --write-baseline scripts/sass_baseline.json

bench: setup
	$(PY) -m fastattn bench

# On a GPU machine: build, CUDA tests, sweep, sanitizers, headline benchmarks in <= 8.5 min.
# make gpu-check GPU_CHECK_ARGS="--dry-run /tmp/gc" proves the script on a CPU machine.
gpu-check:
	@bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)
