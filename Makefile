# Two commands on a fresh machine: `make serve` (the main job) and `make test` (`make test-all`: every test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run serve test test-all bench plots lint protos

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on the CPU machines this is the local CPU build, no multi-GB download
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

serve: install  # a tiny Mixtral (real tokenizer) on 2 expert workers of a local Ray, gRPC on 127.0.0.1:50051
	$(BIN)/expertmesh serve

run: install  # one generation in-process, no server
	$(BIN)/expertmesh run --prompt "The capital of France is" --max-new-tokens 24

# The tests run in a worker process of pytest-xdist: a test that takes its process down (a Ray
# driver whose raylet died exits at once) fails alone, a fresh worker goes on, the summary comes.
# `make test` leaves out the tests marked slow (chaos, faults at real sizes, several Ray nodes,
# Ray's autoscaler): the fast majority. `make test-all` (what CI runs) runs every test.
PYTEST := $(BIN)/python -m pytest -n 1 --max-worker-restart 8

test: install
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow"

test-all: install
	$(BIN)/ruff check .
	$(PYTEST)

bench: install
	$(BIN)/python bench/engine.py

plots: install  # docs/images/*.svg from bench/results/*.json (bench/plots.py)
	$(BIN)/python bench/plots.py

lint: install
	$(BIN)/ruff check .

protos: install  # regenerate the Python stubs after changing the .proto
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos \
		protos/expertmesh/v1/generation.proto
