# The README's commands: `make run` (the main job), `make test` (the whole suite) and `make docs` (the site).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: run test docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is the CPU wheel on this machine's disk; installing it first keeps pip
# from resolving the plain `torch` requirement to a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/lrnn reproduce

test: $(STAMP)
	$(BIN)/python -m pytest tests

# The docs extras with the installed torch pinned, so that pip can never replace it.
$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(BIN)/pip install -c $(VENV)/torch-constraint.txt -e ".[test,docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) site
