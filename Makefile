# The README's two commands: `make run` (the main job) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test clean

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

clean:
	rm -rf $(VENV)
