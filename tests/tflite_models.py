"""Tiny models that reproduce what real third-party files do to the batch axis.

mediapipe's ``.tflite`` files have a batch of 1 built in and reshapes that merge the batch
axis: resized to a bigger batch they still run, but return the wrong number of rows or mix
rows. These stand-ins are a few hundred bytes and need no mediapipe.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

K = 6   # values per input row


def _convert(fn, path: Path) -> Path:
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    path.write_bytes(conv.convert())
    return path


def batch_one_tflite(path: Path) -> Path:
    """A ``[1, K]`` input with two outputs, like mediapipe's detectors: ``boxes`` reshapes to
    ``[1, -1, 2]`` (at batch B: B*2 boxes in one row), ``centred`` subtracts the mean of
    the whole flattened input (at batch B: of every row together)."""
    import tensorflow as tf

    w = tf.constant(np.random.default_rng(0).normal(size=(K, 4)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([1, K], tf.float32)])
    def detector(x):
        flat = tf.reshape(x, [1, -1])                     # merges the batch axis
        boxes = tf.reshape(tf.tanh(tf.matmul(tf.reshape(flat, [-1, K]), w)), [1, -1, 2])
        centred = x - tf.reduce_mean(flat, axis=1, keepdims=True)
        return {"boxes": boxes, "centred": centred}

    return _convert(detector, path)


def merging_tflite(path: Path) -> Path:
    """A resizable ``[-1, K]`` input whose output flattens every row into one: nothing can
    run it row-wise except one row at a time, and nbtool must say so."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, K], tf.float32)])
    def merged(x):
        return tf.reshape(x * 2.0, [1, -1])

    return _convert(merged, path)


def row_by_row(path: Path, x: np.ndarray) -> list[np.ndarray]:
    """What LiteRT's interpreter gives for each row at the model's own batch of 1, stacked:
    the ground truth. Outputs in the interpreter's output order."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, outs = it.get_input_details()[0], it.get_output_details()
    per_row = []
    for row in x:
        it.set_tensor(inp["index"], row[None].astype("float32"))
        it.invoke()
        per_row.append([it.get_tensor(o["index"]).copy() for o in outs])
    return [np.concatenate([r[i] for r in per_row]) for i in range(len(outs))]


def select_ops_tflite(path: Path) -> Path:
    """A ``.tflite`` that needs TensorFlow "Select" (flex) ops, which LiteRT's interpreter
    does not have: someone else's file that opens but cannot allocate its tensors."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def det(x):
        return tf.linalg.det(tf.reshape(x, [-1, 2, 2]))

    conv = tf.lite.TFLiteConverter.from_concrete_functions([det.get_concrete_function()], det)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                      tf.lite.OpsSet.SELECT_TF_OPS]
    path.write_bytes(conv.convert())
    return path
