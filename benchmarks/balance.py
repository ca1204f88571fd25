"""Default placement against replicas=1: a warm ensemble, a first cold run, a tight budget.

Three measures, each alternating the two ways in one engine, medians of ``--repeats``:
- warm: a 3-model ensemble (MobileNetV3Small, a residual CNN, an MLP at 96x96, a ``.npy``
  input) registered with the defaults (auto: every worker with room) and with
  ``replicas=1`` (the old default), against the compute floor (each model alone in this
  process, ``tf.function``, batch 64, summed);
- first cold run on this machine (nothing measured: new files), defaults against
  ``replicas=1``;
- tight budget: 8 models, a budget for 2 per worker, every run using all 8: time and
  evictions, defaults against ``replicas=1``.

Usage:  .venv/bin/python benchmarks/balance.py [--rows 2000] [--repeats 3]
TensorFlow runs every model (``runtime="tensorflow"``): this measures placement only.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SHAPE = (96, 96, 3)

from _common import arguments, calibrated, compiled_floor, mlp, timed  # noqa: E402


def residual_cnn(shape):
    import keras

    inp = keras.Input(shape)
    h = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(inp)
    for _ in range(2):
        r = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
        r = keras.layers.Conv2D(32, 3, padding="same")(r)
        h = keras.layers.Activation("relu")(keras.layers.Add()([h, r]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax")(h))


def build(folder: Path):
    import keras

    keras.utils.set_random_seed(0)
    models = {"mobilenet": keras.applications.MobileNetV3Small(
                  input_shape=SHAPE, weights=None, classes=10, include_preprocessing=False),
              "rescnn": residual_cnn(SHAPE), "mlp": mlp(SHAPE)}
    paths = {}
    for name, m in models.items():
        paths[name] = folder / f"{name}.keras"
        calibrated(m, SHAPE).save(paths[name])
    return models, paths


def fresh_copy(path: Path, folder: Path, tag: str) -> Path:
    """The same model under a new file: a new fingerprint, so nothing measured yet."""
    out = folder / f"{path.stem}_{tag}.keras"
    out.write_bytes(path.read_bytes())
    return out


def main():
    args = arguments(__doc__, rows=2000, repeats=3).parse_args()
    import numpy as np

    import nbtool

    work = Path(tempfile.mkdtemp(prefix="nbtool-balance-"))
    os.environ["NBTOOL_CACHE_DIR"] = str(work / "cache")
    models, paths = build(work)
    x = np.random.default_rng(0).random((args.rows, *SHAPE), dtype=np.float32)
    npy = work / "x.npy"
    np.save(npy, x)
    floor_run = compiled_floor(list(models.values()), x, [64] * len(models))
    floor = statistics.median(timed(floor_run, args.repeats))
    print(f"floor (each model alone here, summed): {floor:.2f}s")

    eng = nbtool.start(n_workers=2, gpus="none", dashboard_address="127.0.0.1:0")
    try:
        # replicas=1 first: placed as it would be alone (the auto ones fit around it)
        ways = {"replicas=1": {"replicas": 1}, "default": {}}
        names = {w: [] for w in ways}
        for way, options in ways.items():
            for m, p in paths.items():
                name = f"{m}_{'auto' if not options else 'r1'}"
                eng.register(name, p, runtime="tensorflow", **options)
                names[way].append(name)
            eng.predict(names[way], str(npy))   # cold: loads, measures
            eng.load(*names[way])               # the copies loaded afterwards, waited for
            eng.predict(names[way], str(npy))
        print(eng.models())
        warm, where = {w: [] for w in ways}, {}
        for _ in range(args.repeats):
            for way in ways:
                t0 = time.perf_counter()
                res = eng.predict(names[way], str(npy))
                warm[way].append(time.perf_counter() - t0)
                where[way] = {n: res.timings[n]["workers"] for n in names[way]}
        for way in ways:
            med = statistics.median(warm[way])
            print(f"warm {way}: median {med:.2f}s ({min(warm[way]):.2f}-{max(warm[way]):.2f}) "
                  f"= {med / floor:.2f}x the floor")
        print("warm, ran on:", where)

        cold = {"default": {}, "replicas=1": {"replicas": 1}}
        seconds = {way: [] for way in cold}
        for i in range(args.repeats):
            for k, (way, options) in enumerate(cold.items()):
                fresh = []
                for m, p in paths.items():
                    tag = f"c{i}{k}"
                    eng.register(f"{m}_{tag}", fresh_copy(p, work, tag), runtime="tensorflow",
                                 **options)
                    fresh.append(f"{m}_{tag}")
                t0 = time.perf_counter()
                eng.predict(fresh, str(npy))
                seconds[way].append(time.perf_counter() - t0)
                eng.unload(fresh)
        cold = seconds
        for way, ts in cold.items():
            print(f"first cold run, {way}: median {statistics.median(ts):.2f}s "
                  f"({min(ts):.2f}-{max(ts):.2f})")
    finally:
        eng.close()

    tight(args, work)


def tight(args, work: Path):
    """8 models, budget for 2 per worker: defaults against replicas=1."""
    import keras
    import numpy as np

    import nbtool

    keras.utils.set_random_seed(1)
    files = []
    for i in range(8):
        m = keras.Sequential([keras.Input((256,)), keras.layers.Dense(2048, activation="relu"),
                              keras.layers.Dense(2048, activation="relu"),
                              keras.layers.Dense(10)])
        files.append(work / f"dense{i}.keras")
        m.save(files[-1])
    size = files[0].stat().st_size
    x = np.random.default_rng(1).random((4000, 256), dtype=np.float32)
    for way, options in (("default", {}), ("replicas=1", {"replicas": 1})) * 1:
        eng = nbtool.start(n_workers=2, gpus="none", dashboard_address="127.0.0.1:0",
                           memory_budget=int(size * 2.5))
        try:
            names = []
            for i, f in enumerate(files):
                eng.register(f"d{i}", f, runtime="tensorflow", **options)
                names.append(f"d{i}")
            eng.predict(names, x)   # first run: loads and measures
            before = sum(s.evictions for s in eng.status().values())
            ts = timed(lambda: eng.predict(names, x), args.repeats)
            evictions = sum(s.evictions for s in eng.status().values()) - before
            print(f"tight budget, {way}: median {statistics.median(ts):.2f}s "
                  f"({min(ts):.2f}-{max(ts):.2f}), {evictions / args.repeats:.1f} evictions "
                  f"per run; placement {dict(eng.placement)}")
        finally:
            eng.close()


if __name__ == "__main__":
    try:
        main()
    finally:   # the models, the input and the cost cache it measured into
        import shutil

        for folder in Path(tempfile.gettempdir()).glob("nbtool-balance-*"):
            shutil.rmtree(folder, ignore_errors=True)
