# Two commands on a fresh machine: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test bench lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on the CPU machines this is the local CPU build, no multi-GB download
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/expertmesh run --prompt "The capital of France is" --max-new-tokens 24

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/engine.py

lint: install
	$(BIN)/ruff check .
