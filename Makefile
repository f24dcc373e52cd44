# The README's two commands: `make run` (the main job) and `make test` (the whole suite);
# `make lint` runs ruff on everything and mypy on the public API (both configured in pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINT_STAMP := $(VENV)/.installed-lint

.PHONY: run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is the CPU wheel on this machine's disk; installing it first keeps pip
# from resolving the plain `torch` requirement to a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

$(LINT_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/pip install -e ".[test,lint]"
	touch $(LINT_STAMP)

run: $(STAMP)
	$(BIN)/lrnn reproduce

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(LINT_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV)
