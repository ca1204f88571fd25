"""``.tflite`` models on the workers, checked against LiteRT's own interpreter run row by row:
files with a batch built in (like mediapipe's) and outputs whose batch axis is not the rows'."""

from __future__ import annotations

import numpy as np
import pytest

from tflite_models import batch_one_tflite, merging_tflite, row_by_row


@pytest.fixture(scope="module")
def lite_dir(tmp_path_factory, keras):
    d = tmp_path_factory.mktemp("lite")
    return {"batch_one": batch_one_tflite(d / "batch_one.tflite"),
            "merging": merging_tflite(d / "merging.tflite")}


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 6)).astype("float32")


def test_tflite_with_batch_of_one_built_in_runs_row_by_row(engine, lite_dir, unique):
    name = f"{unique}_b1"
    path = lite_dir["batch_one"]
    engine.register(name, path, replicas=1)     # asks for the default batch (64)
    for n, chunk in ((20, None), (70, 30)):     # 70: chunks of 30, 30 and 10 rows
        x = rows(n, seed=n)
        res = engine.predict(name, x, chunk_size=chunk, combine=None)
        assert res.errors == []
        truth = row_by_row(path, x)
        got = res[name]
        assert [g.shape for g in got] == [t.shape for t in truth] == [(n, 2, 2), (n, 6)]
        for g, t in zip(got, truth):
            assert np.abs(g - t).max() <= 1e-6
    (home,) = engine.placement[name]
    info = engine.status()[home].models[name]
    assert info.batch_size == 1 and "built in" in info.batch_note
    assert info.traces == 1                  # the probe's allocations do not count


def test_a_tflite_whose_batch_resizes_cleanly_keeps_the_batch_asked_for(engine, lite_dir,
                                                                       unique, tmp_path):
    # The same detector with a resizable batch (-1): nothing to probe, batch 16 is kept.
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def rowwise(x):
        return tf.tanh(x) * 3.0

    conv = tf.lite.TFLiteConverter.from_concrete_functions([rowwise.get_concrete_function()],
                                                           rowwise)
    path = tmp_path / "rowwise.tflite"
    path.write_bytes(conv.convert())
    name = f"{unique}_rw"
    engine.register(name, path, batch_size=16, replicas=1)
    x = rows(40)
    res = engine.predict(name, x)
    assert res.ok and np.abs(res[name] - np.tanh(x) * 3.0).max() <= 1e-5
    (home,) = engine.placement[name]
    info = engine.status()[home].models[name]
    assert info.batch_size == 16 and info.batch_note is None


def test_a_tflite_whose_output_merges_rows_is_refused_naming_it_until_run_row_by_row(
        engine, lite_dir, unique):
    name = f"{unique}_mg"
    path = lite_dir["merging"]
    engine.register(name, path)
    x = rows(20)
    res = engine.predict(name, x, combine=None)
    assert not res.ok
    msg = str(res.errors[0])
    assert f"model '{name}'" in msg and "merging.tflite" in msg
    assert "returned output 0 of shape (1, " in msg and "expected 64 rows first" in msg
    assert f"eng.register('{name}', '{path}', batch_size=1)" in msg
    engine.register(name, path, batch_size=1)       # the fix the message gives
    res = engine.predict(name, x, combine=None)
    assert res.ok and np.abs(res[name] - row_by_row(path, x)[0]).max() == 0


def test_a_tflite_with_batch_size_auto_is_swept_instead_of_failing_to_load(engine, lite_dir,
                                                                          unique):
    # Before: the sweep ran predictors whose tensors were never resized ("Cannot set
    # tensor: Dimension mismatch"), so batch_size="auto" failed every .tflite.
    name = f"{unique}_auto"
    path = lite_dir["batch_one"]
    engine.register(name, path, batch_size="auto", replicas=1)
    x = rows(20, seed=5)
    res = engine.predict(name, x, combine=None)
    assert res.ok
    for g, t in zip(res[name], row_by_row(path, x)):
        assert np.abs(g - t).max() <= 1e-6
    (home,) = engine.placement[name]
    assert engine.status()[home].models[name].batch_size == 1
