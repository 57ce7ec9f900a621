# Two entry points that do all their own set-up on a fresh machine:
#   make demo   -> .venv with pinned PyTorch + torchkiln, then `kiln demo`
#   make test   -> the same with the dev extras, then pytest
# CUDA users: make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check
CONSTRAINTS := $(VENV)/torch-constraint.txt
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

.PHONY: demo test bench lint venv dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, pinned; then a constraint file so nothing else can swap it for another build.
$(VENV)/.torch: | $(BIN)/python
	$(PIP) install -q $(TORCH_SPEC)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINTS)
	touch $@

$(VENV)/.base: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@ $(VENV)/.base

venv: $(VENV)/.base
dev: $(VENV)/.dev

demo: $(VENV)/.base
	$(BIN)/kiln demo $(DEMO_ARGS)

test: $(VENV)/.dev
	bash scripts/ensure-chromium.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests benchmarks

bench: $(VENV)/.dev
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev,bench]"
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .cache .pytest_cache build src/*.egg-info
