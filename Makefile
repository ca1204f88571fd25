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
	@echo "==> running every test, the slow end-to-end ones included (13 to 25 minutes on 2 cores)"
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

# -- On a GPU machine (issue 16) --------------------------------------------------------------
# Here: `make gpu-wheels`. Then on the device machine: `bash benchmarks/device_gpu_check.sh`
# (the run the lead makes is written at the top of that script): it installs the wheels into
# a target folder and runs `make gpu-check`, which writes benchmarks/results/gpu.json.
.PHONY: gpu-wheels gpu-check

GPU_WHEELS_DIR = .gpu-wheels
# What the device machine's Python 3.12 lacks for nbtool's kernel side and workers (it has
# numpy, h5py, psutil, nvidia-ml-py, jax, torch, pytest, click, cloudpickle, toolz, msgpack,
# pyyaml, jinja2, fsspec, sortedcontainers, rich, absl-py, ml-dtypes...: KINDS.md's list):
# Keras and its two missing needs, Dask and Distributed and theirs, and cryptography (the
# cluster's TLS) and its. The versions .venv runs; one of each (pip install refuses two).
GPU_WHEELS = keras==3.15.1 namex==0.1.0 optree==0.20.0 \
	dask==2026.8.0 distributed==2026.8.0 tornado==6.6.1 zict==3.0.0 tblib==3.2.2 \
	locket==1.0.0 partd==1.4.2 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
GPU_PLATFORMS = $(foreach p,manylinux_2_28_x86_64 \
	manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))
GPU_PIP ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m pip
# The device machine's python3 (not .venv): it holds PyTorch and JAX with CUDA.
GPU_PYTHON ?= python3
# Options for benchmarks/gpu.py, e.g. GPU_BENCH_ARGS="--workers 1,2 --repeats 3".
GPU_BENCH_ARGS ?=

gpu-wheels:
	@echo "==> downloading the wheels the GPU machine lacks into $(GPU_WHEELS_DIR)/ (cp312, manylinux)"
	@rm -rf $(GPU_WHEELS_DIR) && mkdir -p $(GPU_WHEELS_DIR)
	@$(GPU_PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(GPU_PLATFORMS) -d $(GPU_WHEELS_DIR) $(GPU_WHEELS)
	@ls $(GPU_WHEELS_DIR) && du -sh $(GPU_WHEELS_DIR)

# The GPU tests, then the GPU benchmark (both write benchmarks/results/gpu.json); the
# benchmark runs even when a test failed, and the target fails if either did.
gpu-check:
	@status=0; \
	$(GPU_PYTHON) -m pytest -m gpu -v --durations=10 tests/test_gpu.py || status=1; \
	$(GPU_PYTHON) benchmarks/gpu.py $(GPU_BENCH_ARGS) || status=1; \
	exit $$status
