"""In-graph preprocessing: uint8 pixels in, the model's normalised floats inside the graph."""

import numpy as np
import pytest

from nbtool.errors import InputMismatch
from nbtool.preprocess import Preprocess, preset


@pytest.fixture
def pixels():
    return np.random.default_rng(9).integers(0, 256, size=(40, 8, 8, 1), dtype=np.uint8)


def test_a_preset_runs_in_the_graph_and_matches_numpy_preprocessing(engine, model_dir,
                                                                     reference, pixels, unique):
    plain, pre = f"{unique}_plain", f"{unique}_pre"
    engine.register(plain, model_dir / "cnn.keras")
    engine.register(pre, model_dir / "cnn.keras", preprocess="mobilenet")
    expected = engine.predict(plain, pixels.astype("float32") / 127.5 - 1)[plain]
    res = engine.predict(pre, pixels, chunk_size=16)          # uint8 travels, 1/4 the bytes
    assert np.abs(res[pre] - expected).max() <= 1e-5
    for worker in res.timings[pre]["workers"]:   # wherever its chunks ran
        assert engine.status()[worker].models[pre].input_dtype == "uint8"


def test_a_resizing_preset_takes_any_image_size(engine, model_dir, unique):
    import tensorflow as tf

    name = f"{unique}_resize"
    engine.register(name, model_dir / "cnn.keras", preprocess=preset("rescale", resize=(8, 8)))
    big = np.random.default_rng(10).integers(0, 256, size=(10, 16, 16, 1), dtype=np.uint8)
    res = engine.predict(name, big)
    ref_in = tf.image.resize(tf.cast(big, tf.float32), (8, 8)).numpy() / 255
    plain = f"{unique}_plain2"
    engine.register(plain, model_dir / "cnn.keras")
    assert np.abs(res[name] - engine.predict(plain, ref_in)[plain]).max() <= 1e-5


def test_preset_inputs_are_checked_before_anything_runs(engine, model_dir, unique, pixels):
    name = f"{unique}_chk"
    engine.register(name, model_dir / "cnn.keras", preprocess="rescale")
    with pytest.raises(InputMismatch, match=r"uint8 input for its preprocessing 'rescale'"):
        engine.predict(name, pixels.astype("float32"))
    with pytest.raises(InputMismatch, match=r"resize=\(height, width\)"):
        engine.predict(name, np.zeros((4, 16, 16, 1), "uint8"))
    with pytest.raises(ValueError, match="no preprocessing preset 'vgg'"):
        engine.register(f"{unique}_x", model_dir / "cnn.keras", preprocess="vgg")


def test_a_preprocess_is_plain_tensorflow():
    p = Preprocess("imagenet-ish", scale=1 / 255, mean=(0.5,), std=(0.25,))
    out = p(np.array([[[[255]], [[0]]]], "uint8"))
    assert np.allclose(np.asarray(out).ravel(), [2.0, -2.0])


def test_reduced_precision_is_opt_in_and_reports_its_agreement(engine, model_dir, reference,
                                                               unique):
    f32, bf16 = f"{unique}_f32", f"{unique}_bf16"
    engine.register(f32, model_dir / "cnn.keras")
    engine.register(bf16, model_dir / "cnn.keras", precision="bfloat16", replicas=1)
    agree = engine.agreement(f32, bf16, reference["img"])
    print("bfloat16 vs float32:", agree)
    assert agree["rows"] == 60 and 0 < agree["max_abs_diff"] <= 0.05
    assert agree["top1_agreement"] >= 0.9
    (home,) = engine.placement[bf16]
    assert engine.status()[home].models[bf16].precision == "bfloat16"
    with pytest.raises(ValueError, match="precision='int4'"):
        engine.register(f"{unique}_x", model_dir / "cnn.keras", precision="int4")
