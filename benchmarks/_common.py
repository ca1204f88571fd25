"""Pieces every benchmark here shares: timing, and the compute floor."""

from __future__ import annotations

import argparse
import time


def arguments(doc: str, rows: int, repeats: int) -> argparse.ArgumentParser:
    """The options every benchmark takes (``--rows``, ``--repeats``), with its defaults;
    add more, then ``parse_args()``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rows", type=int, default=rows)
    ap.add_argument("--repeats", type=int, default=repeats)
    return ap


def timed(fn, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def compiled_floor(models, x, batches):
    """A function running each model alone over ``x``: ``tf.function`` with one fixed batch
    shape per model (the last batch padded), the way a careful user writes it by hand."""
    import numpy as np
    import tensorflow as tf

    row = tuple(x.shape[1:])
    fns = []
    for m, bs in zip(models, batches):
        fn = tf.function(lambda b, m=m: m(b, training=False), autograph=False,
                         input_signature=[tf.TensorSpec((bs, *row), tf.float32)])
        fns.append((fn, bs))

    def run():
        for fn, bs in fns:
            for s in range(0, len(x), bs):
                b = x[s:s + bs]
                if len(b) < bs:
                    b = np.concatenate([b, np.zeros((bs - len(b), *row), b.dtype)])
                fn(b)
    run()   # trace outside the timing
    return run


def small_cnn(shape, filters=(32, 64)):
    """Two convolutions, pooling, a softmax over 10 classes: the cheap convnet of the suite."""
    import keras

    return keras.Sequential([
        keras.Input(shape), keras.layers.Conv2D(filters[0], 3, activation="relu"),
        keras.layers.MaxPooling2D(), keras.layers.Conv2D(filters[1], 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")])


def mlp(shape, units=256):
    """Flatten, one hidden layer, a softmax over 10 classes."""
    import keras

    return keras.Sequential([
        keras.Input(shape), keras.layers.Flatten(),
        keras.layers.Dense(units, activation="relu"), keras.layers.Dense(10, activation="softmax")])


def calibrated(model, shape, seed=0):
    """``model`` with its BatchNorm statistics set from one batch of random rows.

    A freshly built MobileNet or EfficientNet (``weights=None``) keeps BatchNorm's initial
    statistics, so activations shrink layer after layer to ~1e-11 and every row's softmax is
    0.1 everywhere: runtimes "agree" on a constant, which proves nothing. One training-mode
    pass with momentum 0 sets each BatchNorm's statistics to what reaches it, and the
    outputs then differ from row to row (top-1 spread over the classes).
    """
    import keras
    import numpy as np

    norms = [layer for layer in model._flatten_layers()
             if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return model
    x = np.random.default_rng(seed).random((64, *shape), dtype=np.float32)
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(x, training=True)
    for layer, m in zip(norms, momenta):
        layer.momentum = m
    return model
