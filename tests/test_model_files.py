"""Reading model files without TensorFlow: formats, sizes, input signatures, bad files,
and what in a file would run code at load."""

import json
import subprocess
import sys

import pytest

from nbtool.errors import ModelFileError, UnsupportedFormat, UntrustedModel
from nbtool.catalog.files import detect_format, needs_trust
from nbtool.catalog.registration import inspect_model


def test_keras_h5_and_savedmodel_are_read_with_their_input_signature(model_dir):
    keras_spec = inspect_model("mlp", model_dir / "mlp.keras")
    h5_spec = inspect_model("mlp", model_dir / "mlp.h5")
    sm_spec = inspect_model("sm", model_dir / "mlp_savedmodel", trusted=True)
    assert (keras_spec.format, h5_spec.format, sm_spec.format) == ("keras", "h5", "savedmodel")
    assert keras_spec.input_shape == h5_spec.input_shape == (None, 8)
    assert keras_spec.input_dtype == "float32"
    assert sm_spec.input_shape == (None, 8)     # read from its serving signature
    assert all(s.size_bytes > 0 for s in (keras_spec, h5_spec, sm_spec))


def test_functional_models_report_every_output(model_dir):
    spec = inspect_model("multi", model_dir / "multi.keras")
    assert spec.n_outputs == 2 and spec.input_shape == (None, 8)
    assert inspect_model("cnn", model_dir / "cnn.keras").input_row_shape == (8, 8, 1)


def test_reading_models_never_imports_tensorflow(model_dir):
    code = (
        "import sys, nbtool.catalog.registration as r\n"
        f"r.inspect_model('a', {str(model_dir / 'mlp.keras')!r})\n"
        f"r.inspect_model('b', {str(model_dir / 'mlp.h5')!r})\n"
        f"r.inspect_model('c', {str(model_dir / 'mlp_savedmodel')!r}, trusted=True)\n"
        f"r.inspect_model('d', {str(model_dir / 'checked.keras')!r}, trusted=True)\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


def test_unsupported_format_says_what_would_work(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    with pytest.raises(UnsupportedFormat) as e:
        detect_format(tmp_path / "m.onnx", "m")
    assert ".onnx" in str(e.value) and ".keras" in str(e.value) and "SavedModel" in str(e.value)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UnsupportedFormat, match="saved_model.pb"):
        detect_format(tmp_path / "empty_dir", "d")


def test_corrupt_archive_is_reported_with_a_fix(model_dir):
    with pytest.raises(ModelFileError) as e:
        inspect_model("bad", model_dir / "corrupt.keras")
    assert "not a readable .keras archive" in str(e.value) and "model.save" in str(e.value)


def test_weights_only_h5_is_explained(tmp_path, keras):
    m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    m.save_weights(tmp_path / "w.weights.h5")
    (tmp_path / "w.h5").write_bytes((tmp_path / "w.weights.h5").read_bytes())
    with pytest.raises(ModelFileError, match="weights only"):
        inspect_model("w", tmp_path / "w.h5")


def test_a_lambda_anywhere_in_the_config_is_refused_at_register_unless_trusted(keras, tmp_path):
    """Before: read fine here, refused only by the worker at the first predict."""
    import h5py

    inner = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t + 1,
                                                                     name="plus_one")])
    i = keras.Input((4,))
    nested = keras.Model(i, keras.layers.Dense(2)(inner(i)))     # a Functional around it
    nested.save(tmp_path / "nested.keras")
    nested.save(tmp_path / "nested.h5")
    # A Keras 2 .h5 marks its lambda differently (marshalled bytecode, function_type).
    k2 = {"class_name": "Sequential", "config": {"name": "k2", "layers": [
        {"class_name": "InputLayer", "config": {"batch_input_shape": [None, 4]}},
        {"class_name": "Lambda", "config": {"name": "old_lambda", "function_type": "lambda",
                                            "function": ["4wEAAAAA", None, None]}}]}}
    with h5py.File(tmp_path / "k2.h5", "w") as f:
        f.attrs["model_config"] = json.dumps(k2)
    for file, layer in (("nested.keras", "plus_one"), ("nested.h5", "plus_one"),
                        ("k2.h5", "old_lambda")):
        with pytest.raises(UntrustedModel) as e:
            inspect_model("nested", tmp_path / file)
        msg = str(e.value)
        assert f"a Lambda layer '{layer}'" in msg and "safe mode" in msg and file in msg
        assert "Fix: if you trust it" in msg and "eng.register('nested', " in msg
        assert msg.endswith("trusted=True).")
        assert inspect_model("nested", tmp_path / file, trusted=True).input_shape == (None, 4)
    # Only what safe mode refuses: a lambda loss in the compile config is never loaded.
    assert needs_trust({"class_name": "Functional", "config": {"layers": []},
                        "compile_config": {"loss": {"class_name": "__lambda__"}}}) is None


def _save_ir(path, n_inputs: int = 1):
    """A tiny OpenVINO IR (``.xml`` + ``.bin``), made with OpenVINO itself, as users save
    theirs (``ov.save_model``)."""
    import numpy as np

    from nbtool.worker.runtimes.openvino import import_openvino

    ov = import_openvino()
    params = [ov.opset13.parameter([-1, 6, 6, 2], np.float32, name=f"x{i}")
              for i in range(n_inputs)]
    w = ov.opset13.constant(np.ones((2, 3), np.float32))
    outs = [ov.opset13.matmul(p, w, False, False) for p in params]
    ov.save_model(ov.Model(outs + [ov.opset13.relu(params[0])], params), str(path))
    return path


def test_an_openvino_ir_is_read_without_tensorflow_or_openvino(tmp_path):
    xml = _save_ir(tmp_path / "det.xml")
    code = ("import sys, nbtool.catalog.registration as r\n"
            f"s = r.inspect_model('det', {str(xml)!r})\n"
            "print(s.format, s.runtime, s.input_shape, s.input_dtype, s.n_outputs, "
            "s.size_bytes, 'tensorflow' in sys.modules, 'openvino' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    size = (tmp_path / "det.xml").stat().st_size + (tmp_path / "det.bin").stat().st_size
    assert out == ["openvino", "openvino", "(None,", "6,", "6,", "2)", "float32", "2",
                   str(size), "False", "False"]   # an IR runs no code: no trust needed
    from nbtool.catalog.files import read_model_file
    from nbtool.errors import UnsupportedFormat

    two = read_model_file(_save_ir(tmp_path / "two.xml", n_inputs=2))
    assert [i.name for i in two.inputs] == ["x0", "x1"] and two.n_outputs == 3
    with pytest.raises(UnsupportedFormat, match=r"IR that takes 2 inputs \('x0', 'x1'\).*"
                                                r"Keras original"):
        inspect_model("two", tmp_path / "two.xml")   # it would fail at load: refused now


def test_a_broken_or_foreign_ir_is_named_with_a_fix(tmp_path):
    from nbtool.errors import InvalidOption

    xml = _save_ir(tmp_path / "det.xml")
    with pytest.raises(InvalidOption, match="'openvino' for an OpenVINO IR"):
        inspect_model("det", xml, runtime="tensorflow")
    (tmp_path / "det.bin").unlink()
    with pytest.raises(ModelFileError, match="det.bin is not beside it") as err:
        inspect_model("det", xml)
    assert "openvino.save_model" in str(err.value)
    other = tmp_path / "config.xml"
    other.write_text("<config><a/></config>")
    with pytest.raises(ModelFileError, match=r"root element is <config>, expected <net>"):
        inspect_model("cfg", other)
    other.write_text("<net><layers>")
    with pytest.raises(ModelFileError, match="not a readable OpenVINO IR .xml"):
        inspect_model("cut", other)


def test_an_ir_whose_weights_are_saved_again_gets_a_new_fingerprint(tmp_path):
    """The .xml is only the graph: weights re-saved in the .bin beside it must not be
    served from a copy loaded before."""
    from nbtool.wire import file_fingerprint

    (tmp_path / "m.xml").write_text("<net/>")
    (tmp_path / "m.bin").write_bytes(b"\0" * 16)
    before = file_fingerprint(tmp_path / "m.xml")
    (tmp_path / "m.bin").write_bytes(b"\0" * 32)
    assert file_fingerprint(tmp_path / "m.xml") != before
