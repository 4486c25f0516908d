# The two commands of the README: `make run` and `make test`. Both set up what they need.
# `make test-fast` lints and runs only the tests that start no server.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: run test test-fast lint system-deps bench clean

$(BIN)/mcn-exporter: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

run: $(BIN)/mcn-exporter
	$(BIN)/mcn-exporter serve --config config.example.yaml

system-deps:
	scripts/install-system-deps

lint: $(BIN)/mcn-exporter
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(BIN)/mcn-exporter system-deps lint
	$(BIN)/python -m pytest

test-fast: $(BIN)/mcn-exporter lint
	$(BIN)/python -m pytest -m "not server"

bench: $(BIN)/mcn-exporter system-deps
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) data .mypy_cache .ruff_cache .pytest_cache .hypothesis
