# The two commands of the README quickstart, plus developer targets.
#   make demo        set up (idempotent) and run the main job: python -m fastattn demo
#   make test        set up (idempotent) and run the test suite
#   make cuda-check  compile every CUDA kernel with plain nvcc for sm_80 and sm_90a
#   make bench       set up and run the benchmark suite (table + results JSON)
PY ?= python3

.PHONY: setup demo test cuda-check cuda-build-check bench gpu-check

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m fastattn demo

test: setup
	$(PY) -m pytest tests -q -p no:cacheprovider

cuda-check:
	@bash scripts/cuda_check.sh

cuda-build-check:
	@bash scripts/cuda_build_check.sh

bench: setup
	$(PY) -m fastattn bench

# On a GPU machine: build, CUDA tests, sweep, sanitizers, headline benchmarks in <= 8.5 min.
# make gpu-check GPU_CHECK_ARGS="--dry-run /tmp/gc" proves the script on a CPU machine.
gpu-check:
	@bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)
