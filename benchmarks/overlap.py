"""Read-ahead: a chunk's next piece read while the current one computes, on against off.

Inputs that cost a read: a folder of JPEGs (decoded and resized by Pillow on the worker)
and a zstd-compressed zarr array (decompressed on the worker). Each is predicted by the
small convnet with read-ahead on and off (``NBTOOL_PREFETCH``, flipped on the running
workers), alternating, in two layouts: two single-threaded workers (the default on two
cores: no core is free for the reader) and one worker (a core free, as beside a GPU).

Usage:  .venv/bin/python benchmarks/overlap.py [--rows 3000] [--repeats 5]
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _common import arguments, small_cnn  # noqa: E402  (benchmarks/ is on sys.path)


def _set_prefetch(value):
    os.environ["NBTOOL_PREFETCH"] = value


def make_inputs(folder: Path, rows: int):
    import numpy as np
    import zarr
    from PIL import Image

    rng = np.random.default_rng(0)
    pics = folder / "jpegs"
    pics.mkdir()
    base = rng.integers(0, 256, size=(16, 96, 96, 3), dtype=np.uint8)
    for i in range(rows):   # JPEG-compressed noise decodes slowly, like photos
        Image.fromarray(np.roll(base[i % 16], i, axis=1)).save(pics / f"{i:05d}.jpg",
                                                               quality=90)
    z = zarr.create_array(store=str(folder / "x.zarr"), shape=(rows, 64, 64, 3),
                          chunks=(64, 64, 64, 3), dtype="float32",
                          compressors=zarr.codecs.ZstdCodec(level=3))
    z[:] = rng.random((rows, 64, 64, 3), dtype=np.float32)
    return pics, folder / "x.zarr"


def main():
    import nbtool

    ap = arguments(__doc__, rows=3000, repeats=5)
    args = ap.parse_args()
    model = small_cnn((64, 64, 3))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        pics, zpath = make_inputs(Path(tmp), args.rows)
        inputs = {"jpeg folder": nbtool.images(pics, size=(64, 64), scale=1 / 255),
                  "zstd zarr": str(zpath)}
        for layout, n_workers in (("2 workers x 1 thread", 2), ("1 worker", 1)):
            with nbtool.start(gpus="none", n_workers=n_workers,
                              dashboard_address="127.0.0.1:0") as eng:
                eng.register("cnn", model, replicas=n_workers)
                for label, x in inputs.items():
                    eng.predict("cnn", x)                       # load, trace, warm caches
                    times = {"1": [], "0": []}
                    for _ in range(args.repeats):
                        for mode in ("1", "0"):
                            eng.client.run(_set_prefetch, mode)
                            times[mode].append(eng.predict("cnn", x).wall_seconds)
                    results[(layout, label)] = {m: statistics.median(t)
                                                for m, t in times.items()}
    print(f"{args.rows} rows of 64x64x3, small convnet, median of {args.repeats}:")
    print(f"  {'layout':22s} {'input':12s} {'read-ahead off':>15s} {'on':>8s} {'off/on':>7s}")
    for (layout, label), t in results.items():
        print(f"  {layout:22s} {label:12s} {t['0']:14.3f}s {t['1']:7.3f}s "
              f"{t['0'] / t['1']:6.2f}x")


if __name__ == "__main__":
    main()
