# Two commands: `make bench` (the main job) and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.rla_ext_installed
MAX_JOBS ?= 2
export MAX_JOBS
# Deps for the venv; torch 2.14.1 is the CUDA 13.0 build the CUDA sources compile against.
DEPS := torch==2.14.1 torchvision==0.29.1 "triton>=3.6" ninja pybind11 pytest pytest-benchmark hypothesis numpy matplotlib tqdm scikit-learn setuptools wheel

.PHONY: setup build test bench bench-suite info clean triton-aot emulate-cuda

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(DEPS)
	touch $@

$(STAMP): $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PY) -m rla_ext.info
	touch $@

build: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests
	$(PY) scripts/test_lower_isa.py

bench: $(STAMP)
	$(PY) -m benchmarks --quick

bench-suite: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only

# Every Triton launch compiled for the H100 (sm_90) without a GPU, full tier; `make test` runs the quick one.
triton-aot: $(STAMP)
	$(PY) scripts/triton_aot.py --tier full --self-test

# The CUDA kernels under the CPU emulator, full tier (all schedules, all mutants, ASan/UBSan build);
# `make test` runs the quick one. Builds are cached in build/emulate.
emulate-cuda: $(STAMP)
	RLA_EXT_EMULATE_FULL=1 $(PY) -m pytest -q tests/csrc/emulate

info: $(STAMP)
	$(PY) -m rla_ext.info

clean:
	rm -rf build *.egg-info rla_ext/_C*.so rla_ext/_build_info.json $(STAMP)
