# The two things a newcomer runs: `make lab` (the quick start) and `make test`.
# Both set up .venv first (once, and again when pyproject.toml changes).

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.nbtool-installed

.PHONY: install lab test test-fast clean bench

# One line per step says what is happening; the big install shows pip's own progress
# (which package, download bars) rather than minutes of silence.
$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) with $(PYTHON) (a few seconds)"
	@$(PYTHON) -m venv $(VENV)
	@echo "==> upgrading pip in $(VENV) (a few seconds)"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "==> installing nbtool and its dependencies (TensorFlow, Dask, JupyterLab...; a few minutes the first time)"
	@$(BIN)/python -m pip install --progress-bar on -e ".[test]"
	@touch $(STAMP)
	@echo "==> $(VENV) is ready"

install: $(STAMP)

# JupyterLab on the quick-start notebook, listening on 127.0.0.1 only.
lab: $(STAMP)
	@echo "==> starting JupyterLab on notebooks/quickstart.ipynb (127.0.0.1 only; open the URL it prints, Ctrl-C stops it)"
	@cd notebooks && ../$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 $(if $(filter 0,$(shell id -u)),--allow-root) quickstart.ipynb

# Everything, the slow end-to-end tests included (what CI runs).
test: $(STAMP)
	@echo "==> running every test, the slow end-to-end ones included (about 10 minutes on 2 cores)"
	@$(BIN)/python -m pytest --durations=20

# Skip the tests that start extra clusters or notebooks.
test-fast: $(STAMP)
	@echo "==> running the fast tests (the slow end-to-end ones are skipped)"
	@$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache notebooks/quickstart-models

# The benchmark suite: nbtool against the seeds' approaches (see benchmarks/bench.py).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py
