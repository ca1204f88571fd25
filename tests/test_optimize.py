"""Variants of real models trained on scikit-learn's digits: converted, registered, run on
the session's real cluster through ``predict``, compared, and chosen by measurement."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from nbtool.errors import ModelFileError, ModelLoadError, NbtoolError
from nbtool.engine.optimize import Comparison, NoVariantQualifies

VARIANTS = ["float16", "dynamic-int8", "int8", "keras-int8"]
PREFIX = f"opt{uuid.uuid4().hex[:4]}"


@pytest.fixture(scope="module")
def digits():
    """8x8 digits scaled to [0, 1]: train, calibration and test rows (no downloads)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], d.target[order]
    return {"x_train": x[:1400], "y_train": y[:1400], "x_test": x[1400:], "y_test": y[1400:]}


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory, keras, digits):
    """A small MLP (64 features in) and a small CNN (8x8x1 in), trained a few epochs."""
    d = tmp_path_factory.mktemp("digits")
    keras.utils.set_random_seed(1)
    mlp = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                            keras.layers.Dense(10, activation="softmax")], name="mlp")
    cnn = keras.Sequential([keras.Input((8, 8, 1)),
                            keras.layers.Conv2D(16, 3, activation="relu"),
                            keras.layers.Flatten(),
                            keras.layers.Dense(10, activation="softmax")], name="cnn")
    x, y = digits["x_train"], digits["y_train"]
    for model, xs in ((mlp, x.reshape(len(x), 64)), (cnn, x)):
        model.compile("adam", "sparse_categorical_crossentropy")
        model.fit(xs, y, epochs=8, batch_size=32, verbose=0)
    mlp.save(d / "mlp.keras")
    cnn.save(d / "cnn.keras")
    return {"dir": d, "mlp": d / "mlp.keras", "cnn": d / "cnn.keras"}


def inputs(digits, kind: str, part: str) -> np.ndarray:
    x = digits[f"x_{part}"]
    return x.reshape(len(x), 64) if kind == "mlp" else x


@pytest.fixture(scope="module")
def optimized(engine, digits_models, digits):
    """Both digits models registered and optimized into every variant, with labels."""
    out = {}
    for kind in ("mlp", "cnn"):
        name = f"{PREFIX}_{kind}"
        engine.register(name, str(digits_models[kind]))
        out[kind] = engine.optimize(name, VARIANTS,
                                    calibration=inputs(digits, kind, "train")[:200],
                                    x=inputs(digits, kind, "test"),
                                    labels=digits["y_test"], throughput_rows=1024)
    return out


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_variants_run_through_predict_within_their_bounds(engine, optimized, digits, kind):
    name = f"{PREFIX}_{kind}"
    x = inputs(digits, kind, "test")
    res = engine.predict([name] + [f"{name}@{v}" for v in VARIANTS], x, chunk_size=150,
                         combine=None)
    res.raise_for_errors()
    ref = res[name]
    for v in VARIANTS:
        out = res[f"{name}@{v}"]
        assert out.shape == ref.shape and out.dtype == np.float32, v
    # float16 weights: softmax outputs within 1e-2 of the float32 original
    assert np.abs(res[f"{name}@float16"] - ref).max() <= 1e-2
    for v in ("dynamic-int8", "int8", "keras-int8"):
        agree = (res[f"{name}@{v}"].argmax(1) == ref.argmax(1)).mean()
        assert agree >= 0.95, (v, agree)
    # the full-int8 model's output really was dequantized: probabilities, not int8 codes
    assert np.allclose(res[f"{name}@int8"].sum(1), 1.0, atol=0.05)
    assert engine.registry.get(f"{name}@int8").format == "tflite"
    assert engine.registry.get(f"{name}@keras-int8").format == "keras"


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_comparison_has_every_measure_and_renders(optimized, kind):
    cmp = optimized[kind]
    name = f"{PREFIX}_{kind}"
    table = cmp.to_dict()
    assert list(table) == [name] + [f"{name}@{v}" for v in VARIANTS]
    for row in table.values():
        assert row["size_bytes"] > 0 and row["rows_per_second"] > 0
        assert row["load_seconds"] >= 0 and 0 <= row["top1_agreement"] <= 1
        assert 0.8 <= row["accuracy"] <= 1.0, row
    assert table[name]["top1_agreement"] == 1.0 and table[name]["max_abs_diff"] == 0.0
    # LiteRT int8 files hold int8 weights: well under half the float32 .keras file
    assert table[f"{name}@int8"]["size_bytes"] < 0.5 * table[name]["size_bytes"]
    assert table[f"{name}@float16"]["max_abs_diff"] <= 1e-2
    html = cmp._repr_html_()
    assert "<table" in html and f"{name}@int8" in html and "accuracy" in html
    text = repr(cmp)
    assert f"{name}@dynamic-int8" in text and "rows/s" in text and "top-1 agree" in text


def test_choose_picks_the_fastest_within_tolerance(engine, optimized):
    cmp = optimized["cnn"]
    rows = cmp.to_dict()
    chosen = cmp.choose(min_agreement=0.95)
    ok = [m for m, r in rows.items() if "@" in m and r["top1_agreement"] >= 0.95]
    assert chosen == max(ok, key=lambda m: rows[m]["rows_per_second"])
    strict = cmp.choose(max_abs_diff=1e-2)
    assert rows[strict]["max_abs_diff"] <= 1e-2
    by_accuracy = cmp.choose(max_accuracy_drop=0.02)
    assert rows[by_accuracy]["accuracy_drop"] <= 0.02
    assert engine.choose(f"{PREFIX}_cnn", min_agreement=0.95) == chosen


def test_choose_says_why_when_no_variant_qualifies(engine, optimized, digits_models):
    with pytest.raises(NoVariantQualifies) as err:
        optimized["mlp"].choose(min_agreement=1.01)
    msg = str(err.value)
    assert f"{PREFIX}_mlp@int8 has top-1 agreement" in msg and "loosen" in msg
    no_labels = Comparison("m", [{"model": "m", "top1_agreement": 1.0},
                                 {"model": "m@int8", "top1_agreement": 0.9}])
    with pytest.raises(ValueError, match="no labels"):
        no_labels.choose(max_accuracy_drop=0.01)
    engine.register(f"{PREFIX}_plain", str(digits_models["mlp"]))
    with pytest.raises(NbtoolError, match="no variants measured yet"):
        engine.choose(f"{PREFIX}_plain")


def test_every_variant_offered_is_one_the_workers_can_make():
    from nbtool.engine.optimize import NEEDS_CALIBRATION, VARIANTS
    from nbtool.worker.variants import CONVERSIONS

    assert list(VARIANTS) == list(CONVERSIONS) and NEEDS_CALIBRATION <= set(CONVERSIONS)


def test_bad_requests_fail_before_anything_runs(engine, digits_models, digits):
    name = f"{PREFIX}_bad"
    engine.register(name, str(digits_models["mlp"]))
    with pytest.raises(ValueError, match="needs calibration rows"):
        engine.optimize(name, ["int8"], x=inputs(digits, "mlp", "test"))
    with pytest.raises(ValueError, match="variant 'int4'"):
        engine.optimize(name, ["int4"], x=inputs(digits, "mlp", "test"))
    with pytest.raises(ValueError, match="expects rows of shape"):   # CNN-shaped rows
        engine.optimize(name, ["float16"], calibration=digits["x_train"][:50])
    assert f"{name}@int8" not in engine.registry


def test_a_tflite_file_registers_directly_without_tensorflow(engine, digits_models, digits,
                                                            keras, tmp_path):
    import tensorflow as tf

    model = keras.saving.load_model(digits_models["cnn"])
    data = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    path = tmp_path / "cnn_lite.tflite"
    path.write_bytes(data)
    # the kernel reads its input from the flatbuffer, without importing TensorFlow
    probe = ("import sys; from nbtool.catalog.registration import inspect_model; "
             f"s = inspect_model('c', {str(path)!r}); "
             "print(s.format, s.input_shape, s.input_dtype, s.n_outputs, "
             "'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert out == "tflite (None, 8, 8, 1) float32 1 False"
    name = f"{PREFIX}_lite"
    engine.register(name, str(path), batch_size=32, replicas=1)
    x = digits["x_test"][:101]     # 4 batches, the last one padded
    got = engine.predict(name, x, chunk_size=60, combine=None)[name]
    np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-5)
    entry = engine.load(name)[name]
    (info,) = entry.values()
    assert info.batch_size == 32 and info.traces == 1   # tensors allocated once
    # uint8 pixels in, rescaled by the preset before LiteRT runs (eagerly, on the worker)
    engine.register(f"{name}_u8", str(path), batch_size=32, preprocess="rescale")
    px = np.round(x * 255).astype("uint8")
    got = engine.predict(f"{name}_u8", px, chunk_size=60, combine=None)[f"{name}_u8"]
    np.testing.assert_allclose(got, model.predict(px.astype("float32") / 255, verbose=0),
                               atol=1e-5)
    folder = tmp_path / "zoo"
    folder.mkdir()
    (folder / "zoo_lite.tflite").write_bytes(data)
    (folder / "zoo_cnn.keras").write_bytes(Path(digits_models["cnn"]).read_bytes())
    specs = {s.name: s for s in engine.register_dir(folder)}
    assert specs["zoo_lite"].format == "tflite" and specs["zoo_cnn"].format == "keras"


def test_a_corrupt_tflite_file_is_named_in_the_error(engine, optimized, tmp_path):
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"this is not a flatbuffer at all")
    with pytest.raises(ModelFileError) as err:
        engine.register(f"{PREFIX}_junk", str(junk))
    assert str(junk) in str(err.value) and "TFL3" in str(err.value)
    assert "convert the model again" in str(err.value)
    # a real header with its body cut off: caught when read, or when LiteRT opens it
    source = Path(engine.registry.get(f"{PREFIX}_mlp@float16").path).read_bytes()
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(source[:len(source) // 3])
    with pytest.raises((ModelFileError, ModelLoadError)) as err:
        engine.register(f"{PREFIX}_cut", str(cut))
        engine.load(f"{PREFIX}_cut")
    assert str(cut) in str(err.value)


def test_optimize_magic_renders_and_binds_the_comparison(engine, digits_models, digits):
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbtool")
    name = f"{PREFIX}_magic"
    engine.register(name, str(digits_models["mlp"]))
    ip.user_ns.update(xs=inputs(digits, "mlp", "train")[:120],
                      xt=inputs(digits, "mlp", "test")[:200], yt=digits["y_test"][:200])
    cmp = ip.run_line_magic("nbtool", f"optimize {name} --variants float16 int8 "
                                      "--calibration xs --data xt --labels yt --out cmp")
    assert ip.user_ns["cmp"] is cmp and isinstance(cmp, Comparison)
    assert set(cmp.to_dict()) == {name, f"{name}@float16", f"{name}@int8"}
    assert "accuracy" in cmp._repr_html_()
    assert engine.predict(f"{name}@int8", ip.user_ns["xt"]).ok
    with pytest.raises(UsageError, match="Did you mean 'int8'"):
        ip.run_line_magic("nbtool", f"optimize {name} --variants int9 --calibration xs")
    with pytest.raises(UsageError, match="needs calibration rows"):
        ip.run_line_magic("nbtool", f"optimize {name} --variants int8 --data xt")
    assert "optimize" in ip.find_line_magic("nbtool").__doc__


OV_VARIANTS = ["openvino-bf16", "openvino-int8"]


@pytest.fixture(scope="module")
def ov_optimized(engine, digits_models, digits):
    """The digits CNN optimized into the OpenVINO variants, with labels."""
    name = f"{PREFIX}_ov"
    engine.register(name, str(digits_models["cnn"]), device="cpu")
    return engine.optimize(name, OV_VARIANTS, calibration=inputs(digits, "cnn", "train")[:200],
                           x=inputs(digits, "cnn", "test"), labels=digits["y_test"],
                           throughput_rows=1024)


def test_openvino_variants_are_ir_files_that_register_and_predict(engine, ov_optimized,
                                                                  digits):
    from nbtool.worker.runtimes.openvino_files import bf16_supported

    name = f"{PREFIX}_ov"
    x = inputs(digits, "cnn", "test")
    res = engine.predict([name] + [f"{name}@{v}" for v in OV_VARIANTS], x, chunk_size=150,
                         combine=None)
    res.raise_for_errors()
    ref = res[name]
    for v in OV_VARIANTS:
        spec = engine.registry.get(f"{name}@{v}")
        xml = Path(spec.path)
        assert spec.format == spec.runtime == "openvino" and xml.suffix == ".xml", v
        assert xml.with_suffix(".bin").is_file() and spec.input_shape == (None, 8, 8, 1)
        out = res[f"{name}@{v}"]
        assert out.shape == ref.shape and out.dtype == np.float32, v
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95, v
        assert np.allclose(out.sum(1), 1.0, atol=0.05), v   # probabilities, not codes
    bf16 = np.abs(res[f"{name}@openvino-bf16"] - ref).max()
    if bf16_supported():   # the hint in the IR took effect: not float32's answer
        assert 1e-5 < bf16 <= 0.05, bf16
    else:                  # OpenVINO computed float32 instead
        assert bf16 <= 1e-4, bf16
    # int8 weights: the int8 IR's .bin is well under half the float32 one's
    sizes = {v: Path(engine.registry.get(f"{name}@{v}").path).with_suffix(".bin").stat()
             .st_size for v in OV_VARIANTS}
    assert sizes["openvino-int8"] < 0.5 * sizes["openvino-bf16"], sizes


def test_openvino_variants_are_compared_honestly_and_chosen(engine, ov_optimized):
    from nbtool.worker.runtimes.openvino_files import bf16_supported

    name = f"{PREFIX}_ov"
    rows = ov_optimized.to_dict()
    assert list(rows) == [name] + [f"{name}@{v}" for v in OV_VARIANTS]
    for v in OV_VARIANTS:
        row = rows[f"{name}@{v}"]
        assert row["runtime"] == "openvino" and row["format"] == "openvino"
        assert row["rows_per_second"] > 0 and row["size_bytes"] > 0
        assert row["top1_agreement"] >= 0.95 and row["accuracy_drop"] <= 0.03, row
    note = rows[f"{name}@openvino-bf16"]["note"]
    if bf16_supported():
        assert "bf16 (its rt_info asks for it; this CPU computes it)" in note, note
    else:
        assert "runs as float32 on this CPU" in note, note
    assert rows[f"{name}@openvino-int8"]["note"].startswith(
        "OpenVINO IR file, int8 where quantized, float32 elsewhere")
    text, html = repr(ov_optimized), ov_optimized._repr_html_()
    assert f"{name}@openvino-bf16: " in text and "openvino" in html and "<li>" in html
    chosen = ov_optimized.choose(min_agreement=0.95)
    assert chosen == max((f"{name}@{v}" for v in OV_VARIANTS),
                         key=lambda m: rows[m]["rows_per_second"])
    assert engine.choose(name, min_agreement=0.95) == chosen


TELEMETRY_PROBE = """
import os, sys
import numpy as np
if sys.argv[1] == "openvino-first":   # a user's own code imported OpenVINO first
    import openvino
if sys.argv[1] != "nncf":
    from nbtool.worker.variants import nncf_module
    nncf = nncf_module()
else:
    import nncf
import openvino as ov
p = ov.opset13.parameter([-1, 4], np.float32)
m = ov.Model([ov.opset13.matmul(p, ov.opset13.constant(np.ones((4, 3), np.float32)),
                                False, False)], [p])
rows = np.ones((3, 4), np.float32)
if sys.argv[1] != "nncf":
    from nbtool.wire import ModelSpec
    from nbtool.worker.variants import quantize_int8
    quantize_int8(ModelSpec("m", "m.xml", "openvino", 1, "1-1"), m, rows)
else:
    nncf.quantize(m, nncf.Dataset([r[None] for r in rows]), subset_size=3)
print(type(nncf.telemetry.telemetry).__name__, os.path.exists(os.environ["TORCH_PROBE"]),
      "tensorflow" in sys.modules, sorted(os.listdir(os.environ["HOME"])))
"""


def test_quantizing_for_the_user_sends_no_telemetry_and_leaves_nothing_in_home(tmp_path):
    """NNCF reports usage through openvino_telemetry, which writes ~/intel (NNCF turns it
    off under pytest and in CI, hence a plain subprocess without CI). It also imports torch
    (seconds, where PyTorch is installed) for its tensor backends and to learn what kind of
    model it was given; a ``torch`` on the path notes each try and is not found."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "torch.py").write_text("import os\nopen(os.environ['TORCH_PROBE'], 'w').close()\n"
                                    "raise ImportError('not installed here')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NNCF_CI")}
    path = os.pathsep.join(filter(None, [str(probe), env.get("PYTHONPATH")]))
    seen = {}
    for how in ("nncf", "nbtool", "openvino-first"):
        home = tmp_path / how
        home.mkdir()
        out = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE, how], capture_output=True,
                             text=True, timeout=120,
                             env={**env, "HOME": str(home), "PYTHONPATH": path,
                                  "TORCH_PROBE": str(tmp_path / f"{how}-tried-torch")})
        assert out.returncode == 0, out.stderr
        seen[how] = out.stdout.strip().splitlines()[-1]
    assert seen["nncf"] == "NNCFTelemetry True False ['intel']"   # the premise holds
    assert seen["nbtool"] == "MagicMock False False []"   # its no-op stub; no torch, no TF
    # OpenVINO imported by the user's own code wrote ~/intel then (not nbtool's doing);
    # NNCF's telemetry stays off all the same.
    assert seen["openvino-first"] == "MagicMock False False ['intel']"


@pytest.mark.slow
def test_optimization_notebook_runs_and_shows_the_comparison():
    import nbformat
    from nbclient import NotebookClient

    folder = Path(__file__).resolve().parent.parent / "notebooks"
    nb = nbformat.read(folder / "optimization.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(folder)}}).execute()
    text = "\n".join(
        part for cell in nb.cells for o in cell.get("outputs", [])
        for part in (o.get("text", ""), o.get("data", {}).get("text/html", ""),
                     o.get("data", {}).get("text/plain", "")))
    assert "nbtool-comparison" in text and "cnn@int8" in text and "mlp@float16" in text
    assert "chosen:" in text and "pruned" in text and "Traceback" not in text
    from notebook_output import assert_quiet

    assert_quiet(nb, "optimization.ipynb")


def test_docstring_examples_of_optimize_run():
    import doctest

    import nbtool.engine.optimize

    result = doctest.testmod(nbtool.engine.optimize, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
