# pemn-jax: every target creates .venv from requirements.txt (and requirements-gemm.txt) when it is
# missing or stale.
PYTHON ?= python3
# Transparent huge pages for malloc: XLA:CPU re-allocates its step buffer every step (see
# experiments/results/PERFORMANCE.md); the pemn command sets this by itself.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/demo
# extra flags for the demo, e.g. DEMO_FLAGS=--config.model.dtype=bfloat16
DEMO_FLAGS ?=

.PHONY: help demo test test-fast lint bench bench-remat bench-native bench-codec bench-input clean-demo

help:
	@echo "make demo        - set up .venv and train the demo (masked ConvMixer, RP, embedded Fashion-MNIST)"
	@echo "make clean-demo  - delete the demo's workdir (WORKDIR, default workdirs/demo) to start over"
	@echo "make test        - set up .venv, lint with ruff, run the whole test suite (what CI runs)"
	@echo "make test-fast   - the edit-and-rerun loop: the tests not marked slow, no lint (under 2 minutes)"
	@echo "make lint        - ruff check and ruff format --check"
	@echo "make bench       - the train-step benchmark (python -m experiments.bench_step)"
	@echo "make bench-remat - the masked step with and without model.remat_blocks (experiments.bench_remat)"
	@echo "make bench-native - the masked step in pure XLA vs with the native kernels (bench_remat --compare native)"
	@echo "make bench-codec - the mask codec against the entropy bound (experiments.bench_codec)"
	@echo "make bench-input - host NumPy vs on-device JAX augmentation throughput (experiments.bench_input)"
	@echo "make help        - this list"

# requirements-gemm.txt: oneDNN's bf16 GEMM (x86-64 only; used where the CPU has AMX-BF16 or
# AVX512-BF16, by model.dtype=bfloat16): installed here so that the tests and benchmarks cover it.
$(STAMP): requirements.txt requirements-gemm.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet -r requirements-gemm.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check pemn_jax tests experiments
	$(BIN)/ruff format --check pemn_jax tests experiments

test: lint
	$(BIN)/python -m pytest -q tests

# The edit-and-rerun loop: no lint (a formatting nit should not hold back a test run; `make test`
# lints); `-m "not slow"` leaves out the subprocess, multi-device, fuzzing and compile-heavy tests
# (tests/conftest.py's SLOW_TESTS and the modules' own marks); and XLA's LLVM backend at -O0, as
# these tests are compile-bound: a third less time, the same verdicts (`make test` and CI compile
# as users do).
test-fast: $(STAMP)
	XLA_FLAGS="--xla_backend_optimization_level=0 $$XLA_FLAGS" $(BIN)/python -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python -m experiments.demo --workdir $(WORKDIR) $(DEMO_FLAGS)

clean-demo:
	rm -rf $(WORKDIR)

bench: $(STAMP)
	$(BIN)/python -m experiments.bench_step

bench-remat: $(STAMP)
	$(BIN)/python -m experiments.bench_remat

bench-native: $(STAMP)
	$(BIN)/python -m experiments.bench_remat --compare native --rows 0,1,2

bench-codec: $(STAMP)
	$(BIN)/python -m experiments.bench_codec

bench-input: $(STAMP)
	$(BIN)/python -m experiments.bench_input
