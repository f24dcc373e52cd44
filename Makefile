# The README's commands: `make run` (the main job), `make test` (the whole suite), `make lint` (ruff on
# everything, mypy on the public API; both configured in pyproject.toml) and `make docs` (the site).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINT_STAMP := $(VENV)/.installed-lint
DOCS_STAMP := $(VENV)/.installed-docs
TORCH_PIN := $(VENV)/torch-constraint.txt

.PHONY: run test lint docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is the CPU wheel on this machine's disk; installing it first keeps pip
# from resolving the plain `torch` requirement to a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[test]"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(TORCH_PIN)
	touch $(STAMP)

# The extras are installed with the installed torch pinned, so that pip can never replace it.
$(LINT_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -c $(TORCH_PIN) -e ".[test,lint]"
	touch $(LINT_STAMP)

$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -c $(TORCH_PIN) -e ".[test,docs]"
	touch $(DOCS_STAMP)

run: $(STAMP)
	$(BIN)/lrnn reproduce

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(LINT_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) site
