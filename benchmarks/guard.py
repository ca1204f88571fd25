"""What the guard on a converted runtime costs (issue 24): every row a conversion computes
is either like the rows its agreement check saw at load, or compared with TensorFlow.

On one worker's model cache (what a CPU worker runs), for each model and each conversion
(OpenVINO, LiteRT), loaded as ``runtime=`` forces it (checked on the first 64 rows):

- **steady**: chunks of rows drawn like the checked ones, guard on against guard off (the
  same loaded conversion, taking turns, medians of ``--repeats``). What every warm chunk
  pays: the range check of each row and the finiteness of each output.
- **unlike rows**: the first chunk of rows scaled by 3 (outside the checked range: every
  row is compared with TensorFlow, which opens for it) against guard off; then the next
  such chunk (its range now taken in: nothing compared).

Usage (alone):  .venv/bin/python benchmarks/guard.py [--rows 2000] [--repeats 5]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import arguments, mlp, small_cnn


def models(folder: Path) -> dict:
    """name -> (path, row shape): a small convnet and a wide MLP, saved as .keras."""
    import keras

    keras.utils.set_random_seed(0)
    made = {"cnn32": (small_cnn((32, 32, 3)), (32, 32, 3)), "mlp784": (mlp((784,), 512), (784,))}
    out = {}
    for name, (model, shape) in made.items():
        model.save(folder / f"{name}.keras")
        out[name] = (folder / f"{name}.keras", shape)
    return out


def median_ms(fn, repeats: int) -> tuple[float, float, float]:
    """Median, min and max milliseconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def measure(path: Path, shape: tuple, runtime: str, rows: int, repeats: int) -> dict:
    from nbtool.wire import ModelSpec, content_digest, file_fingerprint
    from nbtool.worker.model_cache import ModelCache

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, *shape)).astype("float32")
    spec = ModelSpec(path.stem, str(path), "keras", path.stat().st_size,
                     file_fingerprint(path), runtime=runtime, content=content_digest(path))
    cache = ModelCache(budget=10**10, device="cpu:0", worker="bench")
    loaded, _ = cache.get(spec, sample=lambda: x[:64])
    guard = loaded.guard
    assert guard is not None, "a conversion without its guard"

    def guarded():
        loaded.guard = guard
        cache.run(loaded, x)

    def bare():
        loaded.guard = None
        cache.run(loaded, x)

    bare(), guarded()   # warm
    on, off = [], []
    for _ in range(repeats):   # taking turns: a slower moment falls on both
        on.append(median_ms(guarded, 1)[0])
        off.append(median_ms(bare, 1)[0])
    assert guard.reference is None, "ordinary rows opened TensorFlow"
    wide = x * 3
    loaded.guard = guard
    t0 = time.perf_counter()
    out = cache.run(loaded, wide)
    first_unlike = (time.perf_counter() - t0) * 1e3
    compared = guard.checked_rows
    t0 = time.perf_counter()
    cache.run(loaded, wide)
    second_unlike = (time.perf_counter() - t0) * 1e3
    loaded.guard = None
    unguarded_unlike = median_ms(lambda: cache.run(loaded, wide), 3)[0]
    assert np.isfinite(out[0]).all()
    return {"runtime": runtime, "rows": rows,
            "steady_ms_guard": statistics.median(on), "steady_ms_bare": statistics.median(off),
            "steady_ratio": statistics.median(on) / statistics.median(off),
            "steady_ratio_range": [min(a / b for a, b in zip(on, off)),
                                   max(a / b for a, b in zip(on, off))],
            "unlike_first_ms": first_unlike, "unlike_rows_compared": compared,
            "unlike_second_ms": second_unlike, "unlike_bare_ms": unguarded_unlike,
            "unlike_second_ratio": second_unlike / unguarded_unlike}


def main() -> None:
    args = arguments(__doc__, rows=2000, repeats=5).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NBTOOL_CACHE_DIR"] = str(Path(tmp) / "machine-cache")
        folder = Path(tmp)
        results = {}
        for name, (path, shape) in models(folder).items():
            for runtime in ("openvino", "litert"):
                r = measure(path, shape, runtime, args.rows, args.repeats)
                results[f"{name}/{runtime}"] = r
                print(f"{name:7s} {runtime:8s} steady: guard {r['steady_ms_guard']:7.1f} ms, "
                      f"bare {r['steady_ms_bare']:7.1f} ms = {r['steady_ratio']:.3f}x "
                      f"({r['steady_ratio_range'][0]:.3f}-{r['steady_ratio_range'][1]:.3f}); "
                      f"unlike rows: first chunk {r['unlike_first_ms']:.0f} ms "
                      f"({r['unlike_rows_compared']} rows compared, TensorFlow opened), next "
                      f"{r['unlike_second_ms']:.0f} ms = {r['unlike_second_ratio']:.2f}x bare",
                      flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
