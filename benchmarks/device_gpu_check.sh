#!/usr/bin/env bash
# The GPU check in one command, run ON the device machine (issue 16): installs the carried
# wheels into /tmp/site, prints what the machine has, runs `make gpu-check` (tests/test_gpu.py
# then benchmarks/gpu.py, on the machine's python3 with PyTorch and JAX), writing gpu.json
# (what benchmarks/results/gpu.json holds after a run here) and the whole log into $OUT.
#
# 1. Here, once (downloads ~11 MB of cp312 wheels into the git-ignored .gpu-wheels/):
#      make gpu-wheels
# 2. The device tool's call (the lead makes it; nothing else is needed):
#      run(command="bash benchmarks/device_gpu_check.sh", carry=[".gpu-wheels"], timeout_s=600)
#    It comes back with files gpu.json and gpu-check.log (the reply's files_at folder).
# 3. Here: cp <files_at>/gpu.json benchmarks/results/gpu.json, read it, and commit it with
#    `git add -f` (benchmarks/results/ is git-ignored: a run's figures are committed on purpose).
#
# The whole run is held under 9.5 minutes (one call may take 10). Should it not fit, run the
# parts in two calls: `bash benchmarks/device_gpu_check.sh tests`, then `... bench` (each
# part writes its own section of gpu.json, and each call's $OUT starts empty: keep both
# files and merge the second's "benchmark" into the first). Whatever a part measured before
# a failure or a timeout is in gpu.json already (it is written after every test and every
# benchmark configuration). GPU_BENCH_ARGS="--workers 1,2 --repeats 3" before the command
# shortens the benchmark (`python3 benchmarks/gpu.py --help` lists its options).
set -u
part=${1:-all}
case "$part" in
    all | tests | bench) ;;
    *) echo "usage: bash benchmarks/device_gpu_check.sh [all|tests|bench]"; exit 2 ;;
esac
started=$SECONDS
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
# Figures go straight into $OUT: a run stopped at the call's limit still brings them back.
export NBTOOL_GPU_RESULTS=${NBTOOL_GPU_RESULTS:-$OUT/gpu.json}

left() { echo $((570 - (SECONDS - started))); }   # seconds left under the call's 600

versions() {
    python3 -c '
import sys
from importlib import metadata
print("python", sys.version.split()[0], sys.executable)
for dist in ("keras", "jax", "jaxlib", "jax-cuda13-plugin", "torch", "dask", "distributed",
             "numpy", "nvidia-ml-py", "cryptography", "pytest", "pytest-timeout"):
    try:
        print(f"  {dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        print(f"  {dist} MISSING")
import nbtool
print("  nbtool", nbtool.__version__, "from", nbtool.__file__)
'
}

main() {
    echo "== installing .gpu-wheels into /tmp/site"
    if ! ls .gpu-wheels/*.whl >/dev/null 2>&1; then
        echo "no wheels in .gpu-wheels/: run 'make gpu-wheels' here first and carry .gpu-wheels"
        return 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu-wheels/*.whl || return 1
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

    echo "== the machine"
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used --format=csv
    versions
    # Requirements of the carried wheels that this machine's own packages do not meet.
    python3 -m pip check 2>/dev/null \
        | grep -iE "^(keras|dask|distributed|cryptography|optree|partd|zict)" || true

    local status=0
    if [ "$part" = all ] && command -v make >/dev/null; then
        echo "== make gpu-check (at most $(left) s)"
        timeout "$(left)" make gpu-check GPU_PYTHON=python3 \
            GPU_BENCH_ARGS="${GPU_BENCH_ARGS:-}" || status=$?
    else
        if [ "$part" = all ] || [ "$part" = tests ]; then
            echo "== GPU tests (at most $(left) s)"
            timeout "$(left)" python3 -m pytest -m gpu -v --durations=10 tests/test_gpu.py \
                || status=$?
        fi
        if [ "$part" = all ] || [ "$part" = bench ]; then
            echo "== GPU benchmark (at most $(left) s)"
            # shellcheck disable=SC2086  # the options are words
            timeout "$(left)" python3 benchmarks/gpu.py ${GPU_BENCH_ARGS:-} || status=$?
        fi
    fi
    echo "== after the run"
    nvidia-smi --query-gpu=memory.used --format=csv
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv
    return "$status"
}

main 2>&1 | tee "$OUT/gpu-check.log"
status=${PIPESTATUS[0]}
echo "== $((SECONDS - started)) s in all, exit $status; in $OUT: $(ls "$OUT" | tr '\n' ' ')" \
    | tee -a "$OUT/gpu-check.log"
exit "$status"
