"""nbtool against the seeds' approaches, side by side in one run, on the same models and data.

Approaches (each timed ``--repeats`` times; medians and ratios are reported):
- seed: sequential       for each model: load_model, then model.predict
- seed: Pool per call    multiprocessing.Pool: each process loads and predicts per call
- seed: load once        models loaded beforehand; model.predict for each (warm)
- floor                  each model alone in this process, compiled (tf.function, its best
                         batch), all cores, summed over the models
- nbtool cold            from nbtool.start() to the result, loads included (its workers
                         are new processes: they import TensorFlow; the seeds above run
                         in this process, where TensorFlow is already imported)
- nbtool warm            the same prediction again on the running engine
- fresh process          the sequential seed and nbtool cold again, each in a new Python
                         process from its first import to the result (x read from .npy):
                         cold for both, as after a kernel restart

Then: dispatch overhead per task (a tiny model, many small chunks), time against input rows
(1k to 64k), and time against the number of models under a memory budget.

Usage:  make bench      (or .venv/bin/python benchmarks/bench.py [--rows 2000] [--repeats 3])
Writes benchmarks/results/bench.json.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SHAPE = (64, 64, 3)

from _common import arguments, compiled_floor, mlp, small_cnn, timed  # noqa: E402  (benchmarks/ is on sys.path)


def build_models(folder: Path) -> list[Path]:
    import keras

    keras.utils.set_random_seed(0)
    models = {
        "mobilenet_v3s": keras.applications.MobileNetV3Small(
            input_shape=SHAPE, weights=None, classes=10, include_preprocessing=False),
        "efficientnet_b0": keras.applications.EfficientNetB0(
            input_shape=SHAPE, weights=None, classes=10),
        "small_cnn": small_cnn(SHAPE),
        "mlp": mlp(SHAPE),
    }
    paths = []
    for name, m in models.items():
        paths.append(folder / f"{name}.keras")
        m.save(paths[-1])
    return paths


# -- the seeds' approaches, as the seeds write them ------------------------------------------
def seed_sequential(paths, x):
    import keras

    return [keras.models.load_model(p, compile=False).predict(x, verbose=0) for p in paths]


def _load_and_predict(path, x):
    import keras

    return keras.models.load_model(path, compile=False).predict(x, verbose=0)


def seed_pool(paths, x):
    ctx = multiprocessing.get_context("spawn")   # TF is not fork-safe
    with ctx.Pool(processes=len(paths)) as pool:
        return pool.starmap(_load_and_predict, [(str(p), x) for p in paths])


def seed_load_once(models, x):
    return [m.predict(x, verbose=0) for m in models]


SEED_SCRIPT = """
import time
t0 = time.perf_counter()
import sys
import keras
import numpy as np
x = np.load(sys.argv[1])
[keras.models.load_model(p, compile=False).predict(x, verbose=0) for p in sys.argv[2:]]
print(time.perf_counter() - t0)
"""

NBTOOL_SCRIPT = """
import time
t0 = time.perf_counter()
import sys
from pathlib import Path
import numpy as np
import nbtool

if __name__ == "__main__":
    x = np.load(sys.argv[1])
    with nbtool.start(gpus="none", dashboard_address="127.0.0.1:0") as eng:
        for p in sys.argv[2:]:
            eng.register(Path(p).stem, p, replicas=len(eng.workers))
        eng.predict([Path(p).stem for p in sys.argv[2:]], x)
        print(time.perf_counter() - t0)
"""


def fresh_process(script: str, folder: Path, npy: Path, paths) -> float:
    """Seconds from a new Python process's first import to its result (it says)."""
    import subprocess
    import sys

    file = folder / "fresh.py"
    file.write_text(script)
    out = subprocess.run([sys.executable, str(file), str(npy), *map(str, paths)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return float(out.stdout.strip().splitlines()[-1])


def best_batches(models, x):
    """The floor's batch per model: the best of 32..256, as a careful user would pick."""
    import tensorflow as tf

    out = []
    for m in models:
        rates = {}
        for bs in (32, 64, 128, 256):
            fn = tf.function(lambda b, m=m: m(b, training=False), autograph=False,
                             input_signature=[tf.TensorSpec((bs, *SHAPE), tf.float32)])
            fn(x[:bs])
            t0 = time.perf_counter()
            for _ in range(2):
                fn(x[:bs])
            rates[bs] = 2 * bs / (time.perf_counter() - t0)
        out.append(max(rates, key=rates.get))
    return out


def main():
    import keras
    import numpy as np

    import nbtool

    ap = arguments(__doc__, rows=2000, repeats=3)
    ap.add_argument("--replicas", type=int, default=None,
                    help="nbtool replicas per model (default: every worker)")
    args = ap.parse_args()
    cores = os.cpu_count()
    results: dict[str, object] = {"rows": args.rows, "cores": cores, "shape": SHAPE}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = build_models(folder)
        x = np.random.default_rng(0).random((args.rows, *SHAPE), dtype=np.float32)
        models = [keras.models.load_model(p, compile=False) for p in paths]
        batches = best_batches(models, x)
        times = {}
        times["seed: sequential load+predict"] = timed(lambda: seed_sequential(paths, x),
                                                        args.repeats)
        times["seed: Pool, load per call"] = timed(lambda: seed_pool(paths, x), args.repeats)
        times["seed: load once, predict each"] = timed(lambda: seed_load_once(models, x),
                                                        args.repeats)
        times["floor: compiled, best batch, all cores"] = timed(
            compiled_floor(models, x, batches), args.repeats)
        names = [p.stem for p in paths]
        cold, warm, cold_parts, unplanned = [], [], [], []
        replicas = args.replicas
        for i in range(2 * args.repeats):
            # Alternating: planned from measured costs (the default) and every replica
            # loading every model (NBTOOL_PLAN_COLD=0, as on a model never run here).
            plan = i % 2 == 0
            os.environ["NBTOOL_PLAN_COLD"] = "1" if plan else "0"
            t0 = time.perf_counter()
            with nbtool.start(gpus="none", dashboard_address="127.0.0.1:0") as eng:
                started = time.perf_counter() - t0
                r = replicas or len(eng.workers)
                for p in paths:
                    eng.register(p.stem, p, replicas=r)   # the default batch (64)
                res = eng.predict(names, x)
                (cold if plan else unplanned).append(time.perf_counter() - t0)
                if not plan:
                    continue
                # Where cold time goes: start (workers, TF import), then per worker the
                # loads (open, trace, warm-up) and the compute of its chunks.
                cold_parts.append({
                    "start": started,
                    "load_seconds_per_worker": sum(t["load_seconds"] for t in
                                                   res.timings.values()) / len(eng.workers),
                    "compute_seconds_per_worker": sum(t["compute_seconds"] for t in
                                                      res.timings.values()) / len(eng.workers),
                    "predict_wall": res.wall_seconds})
                eng.load(names)   # warm: every replica resident (some load after a cold run)
                for _ in range(2):
                    t1 = time.perf_counter()
                    res = eng.predict(names, x)
                    warm.append(time.perf_counter() - t1)
                batch_used = {n: res.timings[n]["batch_size"] for n in names}
                ref = models[0].predict(x[:64], verbose=0)
                assert np.abs(np.asarray(res[names[0]][:64]) - ref).max() <= 1e-4
        os.environ.pop("NBTOOL_PLAN_COLD")
        times["nbtool cold (start to result)"] = cold
        times["nbtool cold, unplanned (NBTOOL_PLAN_COLD=0)"] = unplanned
        times["nbtool warm"] = warm
        npy = folder / "x.npy"
        np.save(npy, x)
        seq_fresh, nb_fresh = [], []
        for _ in range(args.repeats):
            seq_fresh.append(fresh_process(SEED_SCRIPT, folder, npy, paths))
            nb_fresh.append(fresh_process(NBTOOL_SCRIPT, folder, npy, paths))
        times["fresh process: seed sequential"] = seq_fresh
        times["fresh process: nbtool cold"] = nb_fresh
        results["seconds"] = times
        results["cold_breakdown"] = {k: statistics.median(c[k] for c in cold_parts)
                                     for k in cold_parts[0]}
        results["floor_batches"] = dict(zip(names, batches))
        results["nbtool_batches"] = batch_used
        results["replicas"] = r

        # Dispatch overhead, rows scaling and models under a budget, on one engine.
        with nbtool.start(gpus="none", dashboard_address="127.0.0.1:0") as eng:
            tiny = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
            eng.register("tiny", tiny, replicas=len(eng.workers))
            xs = np.random.default_rng(1).random((4000, 8), dtype=np.float32)
            eng.predict("tiny", xs)
            one = statistics.median(timed(lambda: eng.predict("tiny", xs, chunk_size=4000), 3))
            many = statistics.median(timed(lambda: eng.predict("tiny", xs, chunk_size=10), 3))
            results["dispatch_ms_per_task"] = 1000 * (many - one) / (400 - 1)

            feat = keras.Sequential([keras.Input((256,)), keras.layers.Dense(512, activation="relu"),
                                     keras.layers.Dense(10)])
            eng.register("feat", feat, replicas=len(eng.workers))
            big = np.random.default_rng(2).random((64_000, 256), dtype=np.float32)
            eng.predict("feat", big[:4000])
            scaling = {}
            for rows in (1000, 4000, 16000, 64000):
                scaling[rows] = statistics.median(timed(lambda: eng.predict("feat", big[:rows]), 3))
            results["rows_scaling_seconds"] = scaling

            budget_models = []
            for i in range(8):
                keras.utils.set_random_seed(i)
                m = keras.Sequential([keras.Input((64,)), keras.layers.Dense(20000, activation="relu"),
                                      keras.layers.Dense(10)])
                eng.register(f"b{i}", m, device="cpu:0")
                budget_models.append(f"b{i}")
            size = eng.registry.get("b0").size_bytes
            eng.set_memory_budget(int(2.5 * size))     # two of them fit
            xb = np.random.default_rng(3).random((2000, 64), dtype=np.float32)
            by_count = {}
            for k in (1, 2, 4, 8):
                by_count[k] = statistics.median(timed(
                    lambda: [eng.predict(n, xb) for n in budget_models[:k]], 2))
            results["models_under_budget_seconds"] = by_count

    report(results)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str))


def report(r):
    med = {k: statistics.median(v) for k, v in r["seconds"].items()}
    fl = med["floor: compiled, best batch, all cores"]
    warm = med["nbtool warm"]
    print(f"\n{r['rows']} rows of {r['shape']}, 4 models, {r['cores']} cores; median of "
          f"{len(next(iter(r['seconds'].values())))} runs; nbtool replicas={r['replicas']}")
    print(f"  {'approach':<42}{'seconds':>9}{'x floor':>9}{'x nbtool warm':>15}")
    for k, v in med.items():
        print(f"  {k:<42}{v:9.3f}{v / fl:9.2f}{v / warm:15.2f}")
    print(f"  batches: floor {r['floor_batches']}, nbtool {r['nbtool_batches']}")
    print("  nbtool cold, each run (the first on new model files, later ones planned from "
          "what it measured): " + ", ".join(
              f"{v:.2f}s" for v in r["seconds"]["nbtool cold (start to result)"]))
    print("  cold planning: unplanned / planned = "
          f"{med['nbtool cold, unplanned (NBTOOL_PLAN_COLD=0)'] / med['nbtool cold (start to result)']:.2f}x")
    print("  nbtool cold, where the time goes (median): " + ", ".join(
        f"{k} {v:.2f}s" for k, v in r["cold_breakdown"].items()))
    print(f"  dispatch overhead: {r['dispatch_ms_per_task']:.2f} ms per task")
    sc = r["rows_scaling_seconds"]
    print("  rows -> seconds (per 1k rows): " + ", ".join(
        f"{k}: {v:.3f} ({1000 * v / k:.4f})" for k, v in sc.items()))
    print("  models under a 2-model budget -> seconds: " + ", ".join(
        f"{k}: {v:.3f}" for k, v in r["models_under_budget_seconds"].items()))


if __name__ == "__main__":
    main()
