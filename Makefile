# The two things a newcomer runs: `make lab` (the quick start) and `make test`.
# Both set up .venv first (once, and again when pyproject.toml changes).

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.nbtool-installed

.PHONY: install lab test test-fast clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# JupyterLab on the quick-start notebook, listening on 127.0.0.1 only.
lab: $(STAMP)
	cd notebooks && ../$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 $(if $(filter 0,$(shell id -u)),--allow-root) quickstart.ipynb

# Everything, the slow end-to-end tests included (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest

# Skip the tests that start extra clusters or notebooks.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache notebooks/quickstart-models

# The benchmark suite: nbtool against the seeds' approaches (see benchmarks/bench.py).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py
