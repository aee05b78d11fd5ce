# Two commands do all set-up on a fresh machine with Python >= 3.10 and pip:
#   make demo   -- create .venv, install manyproc, run the demo
#   make test   -- create .venv with the dev extras, run ruff, mypy and the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit integration conformance bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Byte-compile the sources: an editable install does not, and where PYTHONDONTWRITEBYTECODE
# is set every child process would otherwise compile manyproc again at start-up.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m compileall -q src/manyproc
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m compileall -q src/manyproc
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python examples/demo.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks examples

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

unit: $(VENV)/.installed-dev
	$(BIN)/pytest tests/unit -q

integration: $(VENV)/.installed-dev
	$(BIN)/pytest tests/integration -q

conformance: $(VENV)/.installed-dev
	$(BIN)/pytest tests/conformance -q

test: lint typecheck
	$(BIN)/pytest -q

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
