"""runtime="openvino": models converted on the workers to OpenVINO IR give Keras' own
predictions, the IR is converted once and read back at later loads, and the combinations
that cannot work are refused at register; the default (auto) says what it chose."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from nbtool.errors import InvalidOption
from nbtool.worker.runtimes.openvino import ir_dir

TOL = 1e-4


@pytest.fixture(scope="module")
def ov_models(tmp_path_factory, keras):
    """Tiny models of the kinds OpenVINO rewrites most (folded BatchNorm, depthwise
    convolutions, several outputs), with inputs and Keras' own predictions."""
    d = tmp_path_factory.mktemp("ov_models")
    L = keras.layers
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    img = rng.normal(size=(50, 8, 8, 3)).astype("float32")
    made = {}

    conv = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(6, 3), L.BatchNormalization(),
                             L.ReLU(), L.GlobalAveragePooling2D(),
                             L.Dense(4, activation="softmax")])
    # Non-trivial moving statistics, so the folding into the convolution is exercised.
    conv.layers[1].set_weights([rng.uniform(0.5, 2, 6), rng.normal(size=6), rng.normal(size=6),
                    rng.uniform(0.5, 2, 6)])
    made["convbn"] = (conv, img)
    made["depthwise"] = (keras.Sequential([
        keras.Input((8, 8, 3)), L.DepthwiseConv2D(3, depth_multiplier=2, activation="relu"),
        L.Conv2D(4, 1), L.Flatten(), L.Dense(3)]), img)
    inp = keras.Input((8,))
    h = L.Dense(16, activation="relu")(inp)
    made["two"] = (keras.Model(inp, [L.Dense(2)(h), L.Dense(5, activation="softmax")(h)]),
                   rng.normal(size=(50, 8)).astype("float32"))
    raw = rng.integers(0, 256, size=(50, 8, 8, 3)).astype("uint8")
    made["rescaled"] = (keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3),
                                          L.Flatten(), L.Dense(3)]), raw)
    out = {}
    for name, (model, x) in made.items():
        model.save(d / f"{name}.keras")
        fed = x.astype("float32") / 255.0 if name == "rescaled" else x
        want = model.predict(fed, verbose=0)
        out[name] = (d / f"{name}.keras", x, want if isinstance(want, list) else [want])
    return out


def _outputs(result, name, n):
    got = result[name]
    return [np.asarray(got[i]) for i in range(n)] if n > 1 else [np.asarray(got)]


def test_openvino_predicts_what_keras_does_and_reuses_its_ir(engine, ov_models, unique):
    names = {}
    for kind, (path, _, _) in ov_models.items():
        name = names[kind] = f"{unique}_{kind}"
        engine.register(name, path, device="cpu", runtime="openvino", replicas=1,
                        preprocess="rescale" if kind == "rescaled" else None)
    for kind, (_, x, want) in ov_models.items():
        res = engine.predict(names[kind], x, combine=None)
        assert res.ok
        for got, expected in zip(_outputs(res, names[kind], len(want)), want):
            assert got.shape == expected.shape
            assert np.abs(got - expected).max() <= TOL, kind

    # What runs it, and how it was prepared, in the worker's report and the table.
    name = names["convbn"]
    (home,) = engine.placement[name]
    state = engine.status([home])[home].state_of(name)
    assert state.runtime == "openvino" and state.runtime_note.startswith("converted")
    # Checked on the first rows of the chunk that loaded it (the user's own).
    assert re.search(r"from TensorFlow on \d+ of your rows", state.runtime_note)
    row = next(r for r in engine.models() if r["name"] == name)
    assert row["runtime"] == "openvino"

    # A second load reads the IR from disk: no conversion, the file untouched.
    xml = os.path.join(ir_dir(engine.registry.get(name)), "model.xml")
    mtime = os.stat(xml).st_mtime_ns
    assert engine.unload(name) == [name]
    states = engine.load(name)[name]
    assert states[home].runtime_note.startswith("read cached") and states[home].loads == 2
    assert os.stat(xml).st_mtime_ns == mtime
    _, x, want = ov_models["convbn"]
    assert np.abs(engine.predict(name, x)[name] - want[0]).max() <= TOL


def test_a_model_registered_with_defaults_runs_what_auto_chose_and_says_why(
        engine, ov_models, unique):
    name = f"{unique}_auto"
    path, x, want = ov_models["two"]
    engine.register(name, path, replicas=1)   # one home: its note is that worker's
    assert engine.registry.get(name).runtime == "auto"
    row = next(r for r in engine.models() if r["name"] == name)
    assert row["runtime"] == "auto"                    # nothing chosen yet
    res = engine.predict(name, x, combine=None)
    for got, expected in zip(_outputs(res, name, 2), want):
        assert np.abs(got - expected).max() <= TOL
    (home,) = engine.placement[name]
    state = engine.status([home])[home].state_of(name)
    assert state.runtime in ("tensorflow", "openvino", "litert")
    assert state.runtime_note.startswith(f"{state.runtime}: ")
    row = next(r for r in engine.models() if r["name"] == name)
    assert row["runtime"] == f"{state.runtime} (auto)"
    assert row["runtime"].title == f"{home}: {state.runtime_note}"   # the HTML tooltip


def test_impossible_runtimes_are_refused_at_register(engine, ov_models, unique, tmp_path):
    from tflite_models import batch_one_tflite

    path = ov_models["two"][0]
    with pytest.raises(InvalidOption) as bad:
        engine.register(f"{unique}_bad", path, runtime="onnx")
    msg = str(bad.value)
    assert f"'{unique}_bad'" in msg and "runtime='onnx'" in msg and "'openvino'" in msg \
        and "Fix:" in msg
    with pytest.raises(InvalidOption, match="precision='bfloat16'.*runtime='tensorflow'"):
        engine.register(f"{unique}_mixed", path, runtime="openvino", precision="bfloat16")
    assert engine.register(f"{unique}_lite", path, runtime="litert").runtime == "litert"
    tflite = batch_one_tflite(tmp_path / "det.tflite")
    with pytest.raises(InvalidOption, match="runtime='openvino'.*'litert' for a .tflite"):
        engine.register(f"{unique}_det", tflite, runtime="openvino")
    assert engine.register(f"{unique}_det", tflite).runtime == "litert"
    for name in (f"{unique}_bad", f"{unique}_mixed"):
        assert name not in engine.registry.names()


def test_a_conversion_off_by_more_than_the_tolerance_fails_the_load(engine, keras, unique,
                                                                     tmp_path):
    """Outputs in the thousands: float32 rounding in another order is off by more than
    1e-4 absolute, so the load fails with the diff and the fix, and nothing stays loaded."""
    from nbtool.errors import ModelLoadError

    L = keras.layers
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(64, 3), L.Flatten(),
                              L.Dense(256), L.Dense(4)])
    last = model.layers[-1]
    last.set_weights([last.get_weights()[0] * 1e4, last.get_weights()[1]])
    model.save(tmp_path / "loud.keras")
    name = f"{unique}_loud"
    engine.register(name, tmp_path / "loud.keras", device="cpu", runtime="openvino",
                    replicas=1)
    with pytest.raises(ModelLoadError) as failed:
        engine.load(name)
    msg = str(failed.value)
    assert name in msg and "max abs diff" in msg and "tolerance 0.0001" in msg \
        and "runtime='tensorflow'" in msg
    (home,) = engine.placement[name]
    status = engine.status([home])[home]
    assert status.state_of(name).state == "failed" and name not in status.lru_order


TELEMETRY_PROBE = """
import os, sys
import numpy as np
if sys.argv[1] == "nbtool":
    from nbtool.worker.runtimes.openvino import import_openvino
    ov = import_openvino()
else:
    import openvino as ov
p = ov.opset13.parameter([1, 4], np.float32)
try:   # the converter starts its telemetry before it looks at its input
    ov.convert_model(ov.Model([ov.opset13.relu(p)], [p]))
except Exception:
    pass
print(sorted(os.listdir(os.environ["HOME"])))
"""


def test_a_conversion_made_for_the_user_sends_no_telemetry_and_leaves_nothing_in_home(tmp_path):
    """OpenVINO's converter sends usage events to Google Analytics by default and writes
    ~/intel (outside CI); nbtool's conversions must do neither."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CI"}
    seen = {}
    for how in ("openvino", "nbtool"):
        home = tmp_path / how
        home.mkdir()
        out = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE, how], capture_output=True,
                             text=True, timeout=120, env={**env, "HOME": str(home)})
        assert out.returncode == 0, out.stderr
        seen[how] = out.stdout.strip().splitlines()[-1]
    assert seen["openvino"] == "['intel']"    # the converter on its own: the premise holds
    assert seen["nbtool"] == "[]"
