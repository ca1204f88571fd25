"""The shared batch loop: every output's first axis is the rows sent, for every runtime."""

from __future__ import annotations

import numpy as np
import pytest

from nbtool.worker.runtimes.fixed_batch import run_in_batches
from nbtool.errors import BatchAxisMismatch


def test_an_output_that_is_not_one_row_per_input_row_is_refused_naming_the_model():
    x = np.ones((5, 3), "float32")
    with pytest.raises(BatchAxisMismatch, match=r"model 'm' \(m.tflite\) returned output 1 of "
                                                r"shape \(1, 12\) for a batch of 4 rows"):
        run_in_batches(x, 4, "float32", lambda b: [b, b.reshape(1, -1)], "m", "m.tflite")
    # The last, padded batch is checked against the rows sent (4), then cut to its 1 row.
    out = run_in_batches(x, 4, "float32", lambda b: [b.sum(axis=1)])
    assert out[0].tolist() == [3.0] * 5


def test_a_compiled_model_that_sums_over_the_batch_is_refused_not_misassembled(
        engine, unique, tmp_path, keras):
    import tensorflow as tf

    class Total(tf.Module):   # a third-party SavedModel that reduces over its batch axis
        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
        def serve(self, x):
            return tf.reduce_sum(x, axis=0, keepdims=True)

    path = tmp_path / "total_savedmodel"
    tf.saved_model.save(Total(), str(path))
    name = f"{unique}_total"
    engine.register(name, path, trusted=True)          # a SavedModel runs its own graph
    with pytest.raises(BatchAxisMismatch) as e:         # its warm-up batch already shows it
        engine.load(name)
    msg = str(e.value)
    assert f"model '{name}'" in msg and "total_savedmodel" in msg
    assert "of shape (1, 8) for a batch of 64 rows" in msg and "batch_size=1" in msg
    engine.register(name, path, trusted=True, batch_size=1)   # the fix the message gives
    x = np.random.default_rng(0).normal(size=(70, 8)).astype("float32")
    res = engine.predict(name, x, chunk_size=35, combine=None)
    assert res.ok and np.abs(res[name] - x).max() <= 1e-6    # one row: its own sum
