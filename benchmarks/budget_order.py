"""An ensemble that does not fit the memory budget: each model loaded once per run (model
after model on a crowded worker, the next model's file read ahead) against the order before
(chunk i of every model before chunk i+1, ``NBTOOL_ORDER_BY_MODEL=0``), and against a
budget that holds every model. Same models, same data, one run of this script.

8 models of ~23 MB of weights on one CPU worker, a budget for 2 of them, 4,000 rows in
chunks of 500 (8 chunks per model); loads per run are read from the worker's counters.

Usage:  .venv/bin/python benchmarks/budget_order.py [--rows 4000] [--repeats 3]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _common import arguments  # noqa: E402  (benchmarks/ is on sys.path)


def run_case(eng, names, x, budget, by_model: bool, repeats: int):
    """Median seconds of one ensemble run and the loads per run, over ``repeats`` runs."""
    os.environ["NBTOOL_ORDER_BY_MODEL"] = "1" if by_model else "0"
    eng.set_memory_budget(budget)
    eng.predict(names, x, chunk_size=500, combine=None)   # settle: what stays resident
    seconds, loads = [], []
    for _ in range(repeats):
        before = sum(m.loads for m in eng.status()["cpu0"].models.values())
        t0 = time.perf_counter()
        eng.predict(names, x, chunk_size=500, combine=None)
        seconds.append(time.perf_counter() - t0)
        loads.append(sum(m.loads for m in eng.status()["cpu0"].models.values()) - before)
    return seconds, loads


def main():
    import keras
    import numpy as np

    import nbtool

    args = arguments(__doc__, rows=4000, repeats=3).parse_args()
    with tempfile.TemporaryDirectory(prefix="nbtool-budget-") as tmp:
        os.environ["NBTOOL_CACHE_DIR"] = os.path.join(tmp, "cache")
        x = np.random.default_rng(0).normal(size=(args.rows, 32)).astype("float32")
        with nbtool.start(gpus="none", n_workers=1, dashboard_address=None) as eng:
            names = []
            for i in range(8):
                keras.utils.set_random_seed(i)
                m = keras.Sequential([keras.Input((32,)),
                                      keras.layers.Dense(160_000, activation="relu"),
                                      keras.layers.Dense(4)])
                eng.register(f"m{i}", m, device="cpu:0", runtime="tensorflow")
                names.append(f"m{i}")
            size = max(eng.registry.get(n).size_bytes for n in names)
            cases = {
                "budget for 2, model after model (default)": (int(2.2 * size), True),
                "budget for 2, chunk order (before)": (int(2.2 * size), False),
                "budget for all 8": (int(9 * size), True),
            }
            results = {k: run_case(eng, names, x, b, by, args.repeats)
                       for k, (b, by) in cases.items()}
        os.environ.pop("NBTOOL_CACHE_DIR")
    base = statistics.median(results["budget for all 8"][0])
    print(f"8 models, {args.rows} rows in chunks of 500, one CPU worker; median of "
          f"{args.repeats} (range)")
    for k, (s, loads) in results.items():
        med = statistics.median(s)
        print(f"  {k:<44} {med:6.2f} s ({min(s):.2f}-{max(s):.2f})  {med / base:5.2f}x  "
              f"loads per run {statistics.median(loads):.0f}")


if __name__ == "__main__":
    main()
