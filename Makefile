# Quick start: `make repro` (set up, fetch the data, run the pipeline), `make test`.
# `make help` lists the targets: the `## ` text on each target's line.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help bench bench-accuracy bench-data bench-search gpu-check setup data browser params repro test test-unit test-slow \
	test-full clean
.DEFAULT_GOAL := help

help: ## list the targets, one line each
	@awk -F ':.*## ' '/^[a-z-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The virtual environment, re-installed when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install the package with its test dependencies

# Fashion-MNIST into data/: from data/ itself, a DVC remote, Debian's package (installed here
# when missing, as root where apt-get exists) or, last, Keras's download. md5 sums verified.
data: setup ## put Fashion-MNIST in data/ (md5 sums checked) and record it in data.dvc
	@$(BIN)/python -m pipeline.data.fetch --no-download 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; \
	  fi; \
	  $(BIN)/python -m pipeline.data.fetch; }
	@$(BIN)/dvc commit --force --quiet data.dvc

# Debian's Chromium for the MLflow UI tests (a test dependency only), installed when missing,
# as root where apt-get exists.
browser: ## install Debian's Chromium for the MLflow UI tests, when missing
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; \
	  fi; }

# params.yaml from conf/ plus overrides: make params ARGS='optimizer=rmsprop'
params: setup ## write params.yaml from conf/ plus overrides: make params ARGS='optimizer=rmsprop'
	$(BIN)/python -m pipeline.params $(ARGS)

# Its last lines say how to enter the environment, for the README's next commands.
repro: data ## set up, fetch the data and run the pipeline (dvc repro)
	@$(BIN)/python -m pipeline.locks
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo
	@echo "Next, in this shell and in every new one, enter the environment:"
	@echo "  source $(VENV)/bin/activate"
	@echo "then python -m pipeline ..., dvc exp run ... and mlflow ui ... work as the README shows."

test: data ## the test suite, less the tests marked slow or full
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(ARGS)

# No data, no DVC, no training: configs, pure functions, model shapes (mark: unit).
test-unit: setup ## the fast tests for the inner loop, under a minute
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m unit $(ARGS)

test-slow: data browser ## the tests marked slow (CI runs them after make test)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m slow $(ARGS)

# The default configuration on all of Fashion-MNIST reaches the README's accuracy (17-31 min on
# 2 AVX2-only cores; not part of CI)
test-full: data ## the default config on all of Fashion-MNIST reaches the README's accuracy
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m full $(ARGS)

# Throughput of the train stage against a bare model.fit; appends to benchmarks/results.md
bench: data ## throughput of the train stage against a bare model.fit
	$(BIN)/python benchmarks/throughput.py $(ARGS)

# Prepare and a training epoch at 5,000 and 20,000 synthetic 400x300 photos (224 px) against
# the decode limit and image_dataset_from_directory; appends to benchmarks/results.md:
# make bench-data ARGS='--large' (adds 50,000), ARGS='--sizes 200 400' (a quick look)
bench-data: setup ## prepare and training at 5,000/20,000 photos against the decode limit
	$(BIN)/python benchmarks/data_scale.py $(ARGS)

# Test accuracy of experiment=fast and experiment=best over 3 seeds, training time counted in
# epochs of the default measured in the same run; a trick against its absence:
# make bench-accuracy ARGS='fast fast:augment.erase=0.5'
bench-accuracy: data ## time to accuracy of the fast and best presets, in default-epoch equivalents
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/time_to_accuracy.py $(ARGS)

# The same seeded 16-trial study with the median pruner and without (about 2 hours on 2 AVX2
# cores)
bench-search: data ## a hyperparameter search with pruning against the same without
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/search_pruning.py $(ARGS)

# Throughput and time to 93%/94% test accuracy on one GPU, Keras on JAX (under 5 minutes):
# make gpu-check ARGS='--batch-size 2048'
gpu-check: data ## throughput and time to 93%/94% test accuracy on one GPU (Keras on JAX)
	KERAS_BACKEND=jax $(BIN)/python benchmarks/gpu_check.py $(ARGS)

clean: ## remove runs/ and outputs/
	rm -rf runs outputs
