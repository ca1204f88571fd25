"""Throughput of the quick-start ensemble on a GPU worker against CPU workers, and with one to
four workers sharing one GPU, for each Keras backend the machine has (JAX and PyTorch on the
device machine).

The ensemble is the quick-start notebook's (mlp_small, mlp_wide and cnn on 8x8x1 digits),
built here with their initial weights (only speed is measured), on ``--rows`` random rows.
Each configuration starts its engine, loads the models and predicts twice (warm-up), then
times ``--repeats`` predictions of the ensemble (combine="mean"); reported: every time, the
median, min and max, and rows/s at the median. Per backend:

- gpu:        ``nbtool.start(backend=b)`` on the GPU machine: one worker on the GPU, the
              models registered with the defaults;
- gpu_batch_N: the same worker with ``batch_size=N`` (``--gpu-batch``, default 1024): the
              default batch is sized for CPU workers;
- cpu:        ``nbtool.start(backend=b, gpus="none")``: the default CPU workers;
- shared gpu: k = 2, 3, 4 worker processes on the one GPU (the gpu worker's own settings,
              its budget and threads split k ways), each model with ``replicas=k``. nbtool
              runs one worker per GPU; this measures whether more per GPU would pay.

The GPU's and CPU's combined outputs are compared (max abs difference, recorded; over 1e-2
is a wrong result and the run ends with an error after writing its figures).

Usage:  python3 benchmarks/gpu.py [--rows 100000] [--repeats 3] [--workers 1,2,3,4]
(``make gpu-check`` runs it after the GPU tests, on the device machine). Merges its figures
into benchmarks/results/gpu.json (or ``$NBTOOL_GPU_RESULTS``) under "benchmark" after each
configuration, so a run cut short keeps what it measured. Without a GPU it says so and
writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import gpu_support as gs  # noqa: E402  (tests/ holds what the GPU tests and this share)
from _common import arguments, timed  # noqa: E402  (benchmarks/ is on sys.path)
from nbtool._util.gpus import FAKE_GPUS_ENV  # noqa: E402

#: Above this, GPU and CPU outputs disagree: a wrong result, not rounding (TF32 included).
WRONG = 1e-2
#: The quick-start notebook's ensemble (notebooks/quickstart.ipynb).
QUICKSTART = ("mlp_small", "mlp_wide", "cnn")


def quickstart_models(folder: Path) -> None:
    """The quick-start notebook's three models, with their initial weights (only their speed
    is measured); run in a child process with Keras on the CPU (``--build DIR``)."""
    import keras

    layers = keras.layers
    keras.utils.set_random_seed(0)

    def mlp(units):
        return keras.Sequential([keras.Input((8, 8, 1)), layers.Flatten(),
                                 layers.Dense(units, activation="relu"),
                                 layers.Dense(10, activation="softmax")])

    cnn = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(16, 3, activation="relu"),
                            layers.Flatten(), layers.Dense(10, activation="softmax")])
    for name, model in {"mlp_small": mlp(32), "mlp_wide": mlp(128), "cnn": cnn}.items():
        model.save(folder / f"{name}.keras")


def summary(seconds: list[float], rows: int) -> dict:
    """Times, their median and range, and rows/s at the median."""
    med = statistics.median(seconds)
    return {"seconds": [round(s, 4) for s in seconds], "median_s": round(med, 4),
            "min_s": round(min(seconds), 4), "max_s": round(max(seconds), 4),
            "rows_per_s": round(rows / med, 1)}


def measure(eng, paths: list[Path], x, repeats: int, **register) -> tuple[dict, np.ndarray]:
    """Register and load the ensemble, predict twice, then time ``repeats`` predictions."""
    names = [p.stem for p in paths]
    for p in paths:
        eng.register(p.stem, p, **register)
    eng.load(*names)
    t0 = time.perf_counter()
    first = eng.predict(names, x)
    warm = time.perf_counter() - t0
    if not first.ok:
        raise RuntimeError(f"the ensemble failed: {first.errors}")
    eng.predict(names, x)   # a second warm-up: what the first left (costs, traces) settles
    seconds = timed(lambda: eng.predict(names, x), repeats)
    status = eng.status()
    figures = {**summary(seconds, len(x)), "first_s": round(warm, 4),
               "workers": {w: s.device for w, s in status.items()},
               "gpu_memory_used": gs.device_used(),   # NVML, the whole device (None: no GPU)
               "placement": {n: eng.placement[n] for n in names},
               "batch_sizes": {n: sorted({s.state_of(n).batch_size for s in status.values()
                                          if s.state_of(n).loaded}) for n in names}}
    return figures, np.asarray(first.combined)


def shared_gpu_engine(slot, k: int):
    """An engine of ``k`` workers on one GPU, each with ``slot``'s environment (its backend
    and memory settings) and 1/k of its budget and threads."""
    from distributed import Client

    from nbtool.engine.cluster import PinnedCluster
    from nbtool.engine.engine import Engine
    from nbtool.engine.session import wait_for_start
    from nbtool.worker import NbtoolWorkerPlugin

    budget, threads = slot.budget // k, max(1, slot.tf_threads // k)
    env = dict(slot.env, NBTOOL_MEMORY_BUDGET=str(budget))
    env.update({key: str(threads) for key in ("NBTOOL_TF_THREADS", "OMP_NUM_THREADS",
                                              "TF_NUM_INTRAOP_THREADS") if key in env})
    slots = [dataclasses.replace(slot, name=f"{slot.name}-{i}", budget=budget,
                                 tf_threads=threads, env=env) for i in range(k)]
    cluster = PinnedCluster(slots, dashboard_address=None)
    client = Client(cluster)
    try:
        wait_for_start(client, cluster, k, None)
        client.register_plugin(NbtoolWorkerPlugin())
        return Engine(client, cluster)
    except BaseException:
        client.close()
        cluster.close()
        raise


def run_backend(backend: str, gpu, paths, x, args, out: dict, save) -> list[str]:
    """Every configuration for one backend; returns the disagreements found."""
    import nbtool

    mine = out.setdefault(backend, {})
    problems = []
    with nbtool.start(backend=backend, gpus=[gpu.index], dashboard_address=None) as eng:
        mine["gpu"], on_gpu = measure(eng, paths, x, args.repeats)
        mine["gpu"]["settings"] = eng.pool.run_on(gs.precision_settings)
        slot = eng.cluster.slots[next(iter(eng.workers))]
        if args.gpu_batch:   # the default batch is CPU-sized: what a GPU-sized one gives
            key = f"gpu_batch_{args.gpu_batch}"
            mine[key], combined = measure(eng, paths, x, args.repeats,
                                          batch_size=args.gpu_batch)
            mine[key]["max_abs_diff_vs_default_batch"] = float(np.abs(combined - on_gpu).max())
    save()
    with nbtool.start(backend=backend, gpus="none", dashboard_address=None) as eng:
        mine["cpu"], on_cpu = measure(eng, paths, x, args.repeats)
    diff = float(np.abs(on_gpu - on_cpu).max())
    mine["gpu_vs_cpu_max_abs_diff"] = diff
    mine["gpu_speedup_over_cpu"] = round(mine["cpu"]["median_s"] / mine["gpu"]["median_s"], 3)
    if diff > WRONG:
        problems.append(f"{backend}: GPU and CPU outputs differ by {diff:.3g} (> {WRONG})")
    save()
    shared = mine.setdefault("shared_gpu", {"1": {k: mine["gpu"][k] for k in (
        "median_s", "min_s", "max_s", "rows_per_s")}})
    for k in (k for k in args.workers if k > 1):
        with shared_gpu_engine(slot, k) as eng:
            shared[str(k)], combined = measure(eng, paths, x, args.repeats, device="gpu",
                                               replicas=k)
        shared[str(k)]["speedup_over_1"] = round(
            mine["gpu"]["median_s"] / shared[str(k)]["median_s"], 3)
        diff = float(np.abs(combined - on_gpu).max())
        shared[str(k)]["max_abs_diff_vs_1"] = diff
        if diff > WRONG:
            problems.append(f"{backend}, {k} workers on one GPU: outputs differ by {diff:.3g}")
        save()
    return problems


def report(figures: dict) -> None:
    print(f"\nquick-start ensemble, {figures['rows']} rows, median of {figures['repeats']}:")
    for backend, r in figures["backends"].items():
        for what in ("gpu", f"gpu_batch_{figures['gpu_batch']}", "cpu"):
            if what in r:
                f = r[what]
                print(f"  {backend:<10} {what:<14} {f['median_s']:.3f} s "
                      f"({f['min_s']:.3f}-{f['max_s']:.3f}), {f['rows_per_s']:,.0f} rows/s, "
                      f"{len(f['workers'])} worker(s)")
        for k, f in sorted(r.get("shared_gpu", {}).items()):
            if k != "1":
                print(f"  {backend:<10} {k} workers on one GPU: {f['median_s']:.3f} s, "
                      f"{f.get('speedup_over_1', 1)}x one worker")


def main() -> int:
    ap = arguments(__doc__, rows=100_000, repeats=3)
    ap.add_argument("--workers", default="1,2,3,4",
                    help="worker processes on one GPU to try (default 1,2,3,4)")
    ap.add_argument("--gpu-batch", type=int, default=1024,
                    help="also time the GPU worker with this batch size (0: skip)")
    ap.add_argument("--build", help=argparse.SUPPRESS)   # the child process's part
    args = ap.parse_args()
    if args.build:
        quickstart_models(Path(args.build))
        return 0
    args.workers = sorted({int(k) for k in args.workers.split(",") if k})
    if gs.DRY:   # a dry run on a CPU machine: its one injected GPU runs on the CPU
        os.environ.setdefault(FAKE_GPUS_ENV, "1x8GB")
    gpus, backends = gs.real_gpus(), gs.backends()
    if not gpus or not backends:
        print("no GPU found by NVML, or no Keras backend importable: nothing to measure "
              "(this benchmark runs on a GPU machine: make gpu-check)")
        return 0
    figures = {"ensemble": list(QUICKSTART), "rows": args.rows, "repeats": args.repeats,
               "gpu_batch": args.gpu_batch,
               "input": "random float32 rows of 8x8x1", "backends": {}}

    def save():
        path = gs.merge_results("benchmark", figures)
        if path is not None:
            print(f"  (figures so far merged into {path})", flush=True)

    problems = []
    with tempfile.TemporaryDirectory(prefix="nbtool-gpu-bench-") as tmp:
        folder = Path(tmp)
        # The machine cache (runtime choices, costs) and Keras' config: nothing left behind.
        os.environ["NBTOOL_CACHE_DIR"] = str(folder / "nbtool-cache")
        os.environ.setdefault("KERAS_HOME", str(folder / "keras"))
        gs.finish({"building the quick-start models":
                   gs.keras_child(backends[0], "--build", str(folder), script=__file__)})
        paths = [folder / f"{name}.keras" for name in QUICKSTART]
        x = np.random.default_rng(0).random((args.rows, 8, 8, 1), dtype=np.float32)
        for backend in backends:
            print(f"== {backend}", flush=True)
            problems += run_backend(backend, gpus[0], paths, x, args,
                                    figures["backends"], save)
    report(figures)
    if problems:
        print("WRONG RESULTS:\n  " + "\n  ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
