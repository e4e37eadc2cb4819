# `make demo` and `make test` each set up a virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint test-torch

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: setup
	$(BIN)/deformconv demo

lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

test: lint
	$(BIN)/python -m pytest

# The suite on another PyTorch from PyPI, e.g. the oldest supported: make test-torch TORCH=2.4.1
# (a CUDA wheel of several GB where PyPI has no CPU one; numpy<2 for Triton 3.2's interpreter).
TORCH ?= 2.4.1
test-torch:
	$(PYTHON) -m venv $(VENV)-torch$(TORCH)
	$(VENV)-torch$(TORCH)/bin/pip install -q torch==$(TORCH) "numpy<2" pytest hypothesis \
		pillow matplotlib tqdm onnx onnxscript onnxruntime
	$(VENV)-torch$(TORCH)/bin/pip install -q --no-deps -e .
	$(VENV)-torch$(TORCH)/bin/python -m pytest
