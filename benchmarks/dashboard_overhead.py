"""Does a refreshing dashboard slow predictions down?

Times the same background-style prediction (``predict_async`` on an event loop, as in a
notebook where the dashboard refreshes) with no dashboard and with one refreshing every
0.2 s (five times its default rate). Median of repeats; prints the ratio.

Usage:  .venv/bin/python benchmarks/dashboard_overhead.py [--rows 20000] [--repeats 7]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _common import arguments  # noqa: E402  (benchmarks/ is on sys.path)


async def timed(eng, names, x, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        await eng.predict_async(names, x, chunk_size=1000)
        times.append(time.perf_counter() - t0)
    return times


def main():
    import keras
    import numpy as np

    import nbtool
    from nbtool.views.panel import Dashboard

    ap = arguments(__doc__, rows=20000, repeats=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, nbtool.start(
            gpus="none", dashboard_address="127.0.0.1:0") as eng:
        for i in range(3):
            keras.utils.set_random_seed(i)
            m = keras.Sequential([keras.Input((64,)), keras.layers.Dense(512, activation="relu"),
                                  keras.layers.Dense(512, activation="relu"),
                                  keras.layers.Dense(10, activation="softmax")])
            m.save(Path(tmp) / f"m{i}.keras")
        names = [s.name for s in eng.register_dir(tmp)]
        x = np.random.default_rng(0).random((args.rows, 64), dtype=np.float32)

        async def run():
            await eng.predict_async(names, x)            # warm
            base = await timed(eng, names, x, args.repeats)
            dash = Dashboard(eng, namespace={"x": x}, interval=0.2)
            with_dash = await timed(eng, names, x, args.repeats)
            refreshes = dash.refreshes
            dash.close()
            return base, with_dash, refreshes

        base, with_dash, refreshes = asyncio.run(run())
    b, d = statistics.median(base), statistics.median(with_dash)
    print(f"{args.rows} rows x 3 models, median of {args.repeats}:")
    print(f"  no dashboard                 {b:.3f} s")
    print(f"  dashboard refreshing at 5 Hz {d:.3f} s  ({refreshes} refreshes)  ratio {d / b:.3f}")


if __name__ == "__main__":
    main()
