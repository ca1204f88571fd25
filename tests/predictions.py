"""Predictions made by hand, without a cluster, for the tests of what a result shows."""

from __future__ import annotations

import numpy as np

from nbtool.prediction.results import Prediction


def make(outputs, combined=None, combine=None, source=None, n=None):
    """A Prediction of single-output models, as a run of 0.6 s on cpu0 would give it."""
    n = n or len(next(iter(outputs.values())))
    timings = {m: {"seconds": 0.5, "rows_per_second": n / 0.5, "load_seconds": 0.1,
                   "workers": ["cpu0"], "devices": ["cpu:0"]} for m in outputs}
    return Prediction(list(outputs), {m: [o] for m, o in outputs.items()}, n_rows=n,
                      chunk_size=10, combined=combined, combine=combine, timings=timings,
                      wall_seconds=0.6, source=source)


def digits_like_scores():
    """40 rows of 4 classes: their labels, a model right on all, one wrong on the first 10,
    and 8x8 images to show."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=40)
    good = np.eye(4)[labels] * 0.9 + 0.025
    noisy = good.copy()
    noisy[:10] = np.eye(4)[(labels[:10] + 1) % 4] * 0.9 + 0.025   # wrong on 10 rows
    images = rng.random((40, 8, 8, 1)).astype("float32")
    return labels, good, noisy, images
