"""Every runtime a Keras model can run on (TensorFlow, OpenVINO, LiteRT; forced, chosen by
``auto``, and ``auto``'s remembered choice) gives Keras' own ``model.predict`` within 1e-4,
on the kinds of layers converters rewrite most: convolutions, depthwise convolutions,
BatchNorm (folded), several outputs, and uint8 pixels through a preprocess preset.

In-process: a :class:`~nbtool.worker.model_cache.ModelCache` is what a worker runs; the cluster
tests (test_worker_openvino, test_worker_choice) cover the way there.
"""

from __future__ import annotations

import numpy as np
import pytest

from nbtool.preprocess import preset
from nbtool.wire import ModelSpec, file_fingerprint
from nbtool.worker.model_cache import ModelCache

TOL = 1e-4


@pytest.fixture(scope="module")
def runtime_cache(tmp_path_factory):
    """A private machine cache: these tests neither read nor leave choices elsewhere."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("runtime_cache")
        mp.setenv("NBTOOL_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, keras):
    """name -> (path, input rows, Keras' outputs, preprocess)."""
    d = tmp_path_factory.mktemp("runtime_models")
    L = keras.layers
    keras.utils.set_random_seed(11)
    rng = np.random.default_rng(11)
    img = rng.normal(size=(70, 12, 12, 3)).astype("float32")
    made = {
        "conv": (keras.Sequential([keras.Input((12, 12, 3)), L.Conv2D(8, 3, activation="relu"),
                                   L.MaxPooling2D(), L.Conv2D(4, 3, padding="same"),
                                   L.Flatten(), L.Dense(5, activation="softmax")]), img),
        "depthwise": (keras.Sequential([keras.Input((12, 12, 3)),
                                        L.DepthwiseConv2D(3, depth_multiplier=2,
                                                          activation="relu"),
                                        L.SeparableConv2D(6, 3), L.GlobalAveragePooling2D(),
                                        L.Dense(4)]), img),
    }
    bn = keras.Sequential([keras.Input((12, 12, 3)), L.Conv2D(6, 3), L.BatchNormalization(),
                           L.ReLU(), L.GlobalAveragePooling2D(), L.Dense(3, activation="softmax")])
    # Moving statistics far from their initial values: the folding is exercised.
    bn.layers[1].set_weights([rng.uniform(0.5, 2, 6), rng.normal(size=6), rng.normal(size=6),
                              rng.uniform(0.5, 2, 6)])
    made["batchnorm"] = (bn, img)
    inp = keras.Input((10,))
    h = L.Dense(16, activation="relu")(inp)
    made["multi"] = (keras.Model(inp, [L.Dense(2)(h), L.Dense(6, activation="softmax")(h),
                                       L.Dense(1, activation="sigmoid")(h)]),
                     rng.normal(size=(70, 10)).astype("float32"))
    made["uint8"] = (keras.Sequential([keras.Input((12, 12, 3)), L.Conv2D(4, 3),
                                       L.Flatten(), L.Dense(3)]),
                     rng.integers(0, 256, size=(70, 12, 12, 3)).astype("uint8"))
    out = {}
    for name, (model, x) in made.items():
        path = d / f"{name}.keras"
        model.save(path)
        fed = x.astype("float32") / 255.0 if name == "uint8" else x
        want = model.predict(fed, verbose=0)
        out[name] = (path, x, want if isinstance(want, list) else [want],
                     preset("rescale") if name == "uint8" else None)
    return out


def spec_for(path, runtime, preprocess=None, name="m"):
    return ModelSpec(name, str(path), "keras", path.stat().st_size, file_fingerprint(path),
                     runtime=runtime, preprocess=preprocess)


def run(spec, x, sample=None):
    """Load ``spec`` in a fresh cache (a fresh worker) and predict ``x``: (outputs, state)."""
    cache = ModelCache(budget=10**9, device="cpu:0", worker="here")
    loaded, _ = cache.get(spec, sample=sample)
    return cache.run(loaded, x), cache.state_of(spec.name)


def assert_close(got, want, what):
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        assert g.shape == w.shape, what
        assert np.abs(g - w).max() <= TOL, (what, float(np.abs(g - w).max()))


@pytest.mark.parametrize("kind", ["conv", "depthwise", "batchnorm", "multi", "uint8"])
def test_every_runtime_predicts_what_keras_does(fixtures, runtime_cache, kind):
    path, x, want, pre = fixtures[kind]
    for runtime in ("tensorflow", "openvino", "litert"):   # forced
        got, state = run(spec_for(path, runtime, pre), x)
        assert state.runtime == runtime, state.runtime_note
        assert_close(got, want, (kind, runtime))
    # auto, choosing on the user's rows (as inside a prediction), then remembered.
    got, state = run(spec_for(path, "auto", pre), x, sample=lambda: x[:64])
    assert state.runtime in ("tensorflow", "openvino", "litert")
    assert "of your rows" in state.runtime_note and "remembered" in state.runtime_note
    assert_close(got, want, (kind, "auto", state.runtime))
    got, again = run(spec_for(path, "auto", pre), x)
    assert again.runtime == state.runtime and again.runtime_note.startswith("remembered choice")
    assert_close(got, want, (kind, "auto remembered", state.runtime))


def test_a_forced_conversion_says_how_it_was_made_and_reads_its_cache_back(fixtures,
                                                                         runtime_cache):
    path, x, _, _ = fixtures["conv"]
    spec = spec_for(path, "litert", name="forced")
    first = run(spec, x, sample=lambda: x[:10])[1].runtime_note
    assert first.startswith(("converted to LiteRT float32", "read cached LiteRT float32"))
    assert "from TensorFlow on 10 of your rows and 54 random rows" in first
    second = run(spec, x)[1].runtime_note
    assert second.startswith("read cached LiteRT float32") and "64 random rows" in second


def test_litert_outputs_come_in_keras_order_not_the_interpreters(fixtures, runtime_cache):
    """The interpreter lists a converted model's outputs in its own order (here the
    softmax first); nbtool follows the signature's output_0, output_1, ... (Keras')."""
    from nbtool.worker.runtimes.litert import open_tflite
    from nbtool.worker.runtimes.to_litert import litert_path

    path, x, want, _ = fixtures["multi"]
    spec = spec_for(path, "litert", name="order")
    run(spec, x)
    opened = open_tflite(spec, litert_path(spec))
    raw = [tuple(o["shape"][1:]) for o in opened.interpreter.get_output_details()]
    ordered = [tuple(o["shape"][1:]) for o in opened.outputs]
    assert ordered == [w.shape[1:] for w in want]
    assert raw != ordered   # the premise: without the signature the order is wrong


def test_a_model_that_checks_its_values_in_graph_stays_in_tensorflow(runtime_cache,
                                                                      tmp_path, keras):
    """A conversion drops tf.debugging checks: a row that stops the model with an error in
    TensorFlow would come out as NaN, or a number, with no error. auto keeps it in TF."""
    m = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Lambda(lambda t: __import__("tensorflow").debugging.check_numerics(
            t, "row is not finite")),
        keras.layers.Dense(3)])
    m.save(tmp_path / "checks.keras")
    x = np.random.default_rng(3).normal(size=(20, 6)).astype("float32")
    spec = ModelSpec("checks", str(tmp_path / "checks.keras"), "keras",
                     (tmp_path / "checks.keras").stat().st_size,
                     file_fingerprint(tmp_path / "checks.keras"), runtime="auto", trusted=True)
    got, state = run(spec, x)
    assert state.runtime == "tensorflow"
    assert "checks its values in-graph (CheckNumerics)" in state.runtime_note
    assert_close(got, [m.predict(x, verbose=0)], "checks")
    x[4] = np.nan
    cache = ModelCache(budget=10**9, device="cpu:0", worker="here")
    loaded, _ = cache.get(spec)
    with pytest.raises(Exception, match="row is not finite"):
        cache.run(loaded, x)


def test_a_nan_row_comes_out_nan_in_a_converted_runtime_not_as_a_plausible_number(
        fixtures, runtime_cache):
    """XNNPACK's (and OpenVINO's) max(NaN, 0) is 0: a NaN pixel can give a confident,
    finite class. Rows with a NaN or inf input come out NaN; the others are untouched."""
    path, x, want, _ = fixtures["conv"]
    bad = x.copy()
    bad[3, 0, 0, 0], bad[7, 5, 5, 2] = np.nan, np.inf
    for runtime in ("openvino", "litert"):
        got, _ = run(spec_for(path, runtime, name=f"nan_{runtime}"), bad)
        assert np.isnan(got[0][[3, 7]]).all(), runtime
        keep = np.setdiff1d(np.arange(len(x)), [3, 7])
        assert np.abs(got[0][keep] - want[0][keep]).max() <= TOL, runtime
