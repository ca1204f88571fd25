"""In-graph preprocessing: uint8 pixels in vs. float32 normalised in numpy first.

Both sides run the same small convnet (replicas on every worker) on 8,000 64x64x3 images;
the first normalises in the notebook and hands over float32 (4x the bytes), the second
hands over uint8 and rescales inside the compiled graph (``preprocess="rescale"``).

Usage:  .venv/bin/python benchmarks/preprocess.py [--rows 8000] [--repeats 5]
"""

from __future__ import annotations

import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _common import arguments, timed  # noqa: E402  (benchmarks/ is on sys.path)


def main():
    import keras
    import numpy as np

    import nbtool

    ap = arguments(__doc__, rows=8000, repeats=5)
    args = ap.parse_args()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Conv2D(16, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
    with nbtool.start(gpus="none", dashboard_address="127.0.0.1:0") as eng:
        n = len(eng.workers)
        eng.register("f32", model, replicas=n)
        eng.register("u8", model, replicas=n, preprocess="rescale")
        px = np.random.default_rng(0).integers(0, 256, size=(args.rows, 64, 64, 3), dtype=np.uint8)
        eng.predict("f32", px[:100].astype("float32") / 255)
        eng.predict("u8", px[:100])
        a = statistics.median(timed(lambda: eng.predict("f32", px.astype("float32") / 255),
                                    args.repeats))
        b = statistics.median(timed(lambda: eng.predict("u8", px), args.repeats))
        diff = np.abs(eng.predict("f32", px.astype("float32") / 255)["f32"]
                      - eng.predict("u8", px)["u8"]).max()
    print(f"{args.rows} images, median of {args.repeats}:")
    print(f"  float32, normalised in numpy, then handed over  {a:.3f} s")
    print(f"  uint8 handed over, rescaled inside the graph    {b:.3f} s   ({a / b:.2f}x faster)")
    print(f"  max abs difference {diff:.2g}")


if __name__ == "__main__":
    main()
