# Quick start: `make repro` (set up, fetch the data, run the pipeline), `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: bench gpu-check setup data browser params repro test test-slow test-full clean

# The virtual environment, re-installed when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST into data/: from data/ itself, a DVC remote, Debian's package (installed here
# when missing, as root where apt-get exists) or, last, Keras's download. md5 sums verified.
data: setup
	@$(BIN)/python -m pipeline.data.fetch --no-download 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; \
	  fi; \
	  $(BIN)/python -m pipeline.data.fetch; }
	@$(BIN)/dvc commit --force --quiet data.dvc

# Debian's Chromium for the MLflow UI tests (a test dependency only), installed when missing,
# as root where apt-get exists.
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; \
	  fi; }

# params.yaml from conf/ plus overrides: make params ARGS='optimizer=rmsprop'
params: setup
	$(BIN)/python -m pipeline.params $(ARGS)

repro: data
	@$(BIN)/python -m pipeline.locks
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(ARGS)

test-slow: data browser
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m slow $(ARGS)

# The default configuration on all of Fashion-MNIST reaches the README's accuracy (17-31 min on
# 2 AVX2-only cores; not part of CI)
test-full: data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m full $(ARGS)

# Throughput of the train stage against a bare model.fit; appends to benchmarks/results.md
bench: data
	$(BIN)/python benchmarks/throughput.py $(ARGS)

# Throughput and time to 93%/94% test accuracy on one GPU, Keras on JAX (under 5 minutes):
# make gpu-check ARGS='--batch-size 2048'
gpu-check: data
	KERAS_BACKEND=jax $(BIN)/python benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf runs outputs
