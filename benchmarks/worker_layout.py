"""Which CPU worker layout runs an ensemble fastest on this machine?

Compares, in one run on the same models and data:
- nbtool with one worker using every core as TensorFlow threads;
- nbtool with one single-threaded worker per core (the default);
- the single-process floor: each model alone in this process, compiled, all cores.

Usage:  .venv/bin/python benchmarks/worker_layout.py [--rows 4000] [--repeats 5]
Prints medians and ratios, and writes benchmarks/results/worker_layout.json.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _common import arguments, compiled_floor, mlp, small_cnn, timed  # noqa: E402  (benchmarks/ is on sys.path)


def build_models(folder: Path):
    import keras

    keras.utils.set_random_seed(0)
    shape = (32, 32, 3)
    models = {
        "small_cnn": small_cnn(shape, filters=(16, 32)),
        "mlp": mlp(shape),
        "separable": keras.Sequential([
            keras.Input(shape), keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.SeparableConv2D(64, 3, activation="relu"),
            keras.layers.SeparableConv2D(64, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")]),
    }
    for name, m in models.items():
        m.save(folder / f"{name}.keras")
    return shape


def time_layout(n_workers: int, folder: Path, x, repeats: int) -> list[float]:
    import nbtool

    with nbtool.start(n_workers=n_workers, gpus="none", dashboard_address="127.0.0.1:0") as eng:
        names = [s.name for s in eng.register_dir(folder)]
        eng.load(*names)
        eng.predict(names, x)                     # warm: traces, hand-off paths
        return timed(lambda: eng.predict(names, x), repeats)


def floor_in_one_process(folder: Path, x, repeats: int) -> list[float]:
    """Each model alone, compiled with a fixed batch of 64, all cores: the compute floor."""
    import keras

    models = [keras.saving.load_model(p, compile=False) for p in sorted(folder.glob("*.keras"))]
    return timed(compiled_floor(models, x, [64] * len(models)), repeats)


def main():
    import numpy as np

    ap = arguments(__doc__, rows=4000, repeats=5)
    args = ap.parse_args()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shape = build_models(folder)
        x = np.random.default_rng(0).random((args.rows, *shape), dtype=np.float32)
        results = {
            f"nbtool 1 worker x {cores} threads": time_layout(1, folder, x, args.repeats),
            f"nbtool {cores} workers x 1 thread": time_layout(cores, folder, x, args.repeats),
            "floor: one process, models in turn": floor_in_one_process(folder, x, args.repeats),
        }
    floor = statistics.median(results["floor: one process, models in turn"])
    print(f"{args.rows} rows, 3 models, {cores} cores; median of {args.repeats} runs")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"  {name:<40} {med:7.3f} s   {med / floor:5.2f}x the floor")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "worker_layout.json").write_text(json.dumps(
        {"rows": args.rows, "cores": cores, "seconds": results}, indent=2))


if __name__ == "__main__":
    main()
