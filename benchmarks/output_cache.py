"""Re-running a finished prediction in a fresh process: ``cache=True`` against computing.

Issue 17's measure "Cache: rerun of the same %%infer in a fresh process <= 0.1x its
compute time". Each repeat uses a new, empty cache folder (``NBTOOL_CACHE_DIR``):

1. a fresh process starts an engine, registers an ensemble of small convnets, loads them
   (so the time is the prediction's, not the loads') and runs
   ``predict(models, x, cache=True)`` on an in-memory array: the cold run, which computes
   every chunk and writes the cache;
2. a second fresh process (a restarted kernel) starts an engine, registers the same files
   and runs the same ``predict(..., cache=True)`` on the same rows: every chunk comes from
   the cache (checked: no chunk computed), its outputs equal the first's bit for bit.

Reported: the second's prediction time against the first's (medians of ``--repeats``),
and the ratio (target <= 0.1x). Engine start-up is reported beside it, not in the ratio.

Usage (alone):  .venv/bin/python benchmarks/output_cache.py [--rows 4000] [--repeats 3]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import arguments, small_cnn

MODELS = 3
SHAPE = (32, 32, 3)


def child(folder: Path, rows: int, load: bool) -> dict:
    """One process: start, register, (load), predict with cache=True; its figures."""
    import nbtool

    t0 = time.perf_counter()
    eng = nbtool.start(dashboard_address=None)
    started = time.perf_counter() - t0
    names = []
    for k in range(MODELS):
        eng.register(f"cnn{k}", folder / f"cnn{k}.keras")
        names.append(f"cnn{k}")
    if load:
        eng.load(names)
    x = np.random.default_rng(0).random((rows, *SHAPE), dtype=np.float32)
    t0 = time.perf_counter()
    res = eng.predict(names, x, cache=True)
    seconds = time.perf_counter() - t0
    res.raise_for_errors()
    np.savez(folder / f"out-{os.getpid()}.npz", **{n: res[n] for n in names})
    out = {"seconds": seconds, "start_seconds": started, "outputs": f"out-{os.getpid()}.npz",
           "computed": sum(res.timings[n]["chunks"] for n in names),
           "cached": sum(res.timings[n]["cached_chunks"] for n in names)}
    eng.close()
    return out


def run_child(folder: Path, cache_dir: Path, rows: int, load: bool) -> dict:
    env = {**os.environ, "NBTOOL_CACHE_DIR": str(cache_dir)}
    cmd = [sys.executable, __file__, "--child", str(folder), "--rows", str(rows)]
    out = subprocess.run(cmd + (["--load"] if load else []), env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = arguments(__doc__, rows=4000, repeats=3)
    ap.add_argument("--child", default=None, help=argparse_hide())
    ap.add_argument("--load", action="store_true", help=argparse_hide())
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.rows, args.load)))
        return
    import keras

    with tempfile.TemporaryDirectory(prefix="nbtool-bench-cache-") as d:
        folder = Path(d)
        for k in range(MODELS):
            keras.utils.set_random_seed(k)
            small_cnn(SHAPE).save(folder / f"cnn{k}.keras")
        cold, warm = [], []
        for r in range(args.repeats):
            cache_dir = folder / f"cache{r}"
            first = run_child(folder, cache_dir, args.rows, load=True)
            second = run_child(folder, cache_dir, args.rows, load=False)
            assert first["cached"] == 0 and second["computed"] == 0, (first, second)
            a, b = np.load(folder / first["outputs"]), np.load(folder / second["outputs"])
            assert all(np.array_equal(a[n], b[n]) for n in a.files), "outputs differ"
            cold.append(first)
            warm.append(second)
            print(f"repeat {r + 1}: computed {first['seconds']:.2f} s, from the cache "
                  f"{second['seconds']:.3f} s ({second['cached']} chunks)", flush=True)
    c = statistics.median(x["seconds"] for x in cold)
    w = statistics.median(x["seconds"] for x in warm)
    s = statistics.median(x["start_seconds"] for x in warm)
    print(f"{MODELS} convnets, {args.rows} rows of {SHAPE}, medians of {args.repeats}:")
    print(f"  compute (fresh process, models loaded): {c:.2f} s")
    print(f"  rerun in a fresh process, cache=True:   {w:.3f} s = {w / c:.3f}x "
          f"(target <= 0.1x); outputs identical")
    print(f"  (engine start-up in that process, not in the ratio: {s:.1f} s)")


def argparse_hide():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
