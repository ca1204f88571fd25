"""Reading models without TensorFlow: formats, sizes, input signatures, and bad files."""

import subprocess
import sys

import pytest

from nbtool.errors import ModelFileError, UnsupportedFormat
from nbtool.registry import Registry, detect_format, find_models, inspect_model


def test_keras_h5_and_savedmodel_are_read_with_their_input_signature(model_dir):
    keras_spec = inspect_model("mlp", model_dir / "mlp.keras")
    h5_spec = inspect_model("mlp", model_dir / "mlp.h5")
    sm_spec = inspect_model("sm", model_dir / "mlp_savedmodel")
    assert (keras_spec.format, h5_spec.format, sm_spec.format) == ("keras", "h5", "savedmodel")
    assert keras_spec.input_shape == h5_spec.input_shape == (None, 8)
    assert keras_spec.input_dtype == "float32"
    assert sm_spec.input_shape is None          # learned on a worker at first load
    assert all(s.size_bytes > 0 for s in (keras_spec, h5_spec, sm_spec))


def test_functional_models_report_every_output(model_dir):
    spec = inspect_model("multi", model_dir / "multi.keras")
    assert spec.n_outputs == 2 and spec.input_shape == (None, 8)
    assert inspect_model("cnn", model_dir / "cnn.keras").input_row_shape == (8, 8, 1)


def test_fingerprint_changes_when_the_file_changes(model_dir, tmp_path):
    path = tmp_path / "m.keras"
    path.write_bytes((model_dir / "mlp.keras").read_bytes())
    before = inspect_model("m", path).fingerprint
    path.write_bytes((model_dir / "mlp2.keras").read_bytes())
    assert inspect_model("m", path).fingerprint != before


def test_reading_models_never_imports_tensorflow(model_dir):
    code = (
        "import sys, nbtool.registry as r\n"
        f"r.inspect_model('a', {str(model_dir / 'mlp.keras')!r})\n"
        f"r.inspect_model('b', {str(model_dir / 'mlp.h5')!r})\n"
        f"r.inspect_model('c', {str(model_dir / 'mlp_savedmodel')!r})\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


def test_find_models_names_files_and_savedmodel_directories(model_dir):
    found = find_models(model_dir)
    assert {"mlp", "mlp2", "cnn", "multi", "mlp_savedmodel", "corrupt"} <= set(found)
    assert found["mlp_savedmodel"].is_dir()


def test_missing_file_names_the_model_the_path_and_the_fix(tmp_path):
    with pytest.raises(ModelFileError) as e:
        inspect_model("cnn", tmp_path / "nope.keras")
    msg = str(e.value)
    assert "model 'cnn'" in msg and "nope.keras" in msg and "does not exist" in msg
    assert "Fix:" in msg


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


def test_registry_suggests_close_names():
    reg = Registry()
    reg.add(inspect_model.__globals__["ModelSpec"]("cnn", "/x.keras", "keras", 1, "f"))
    with pytest.raises(KeyError) as e:
        reg.get("cnm")
    assert "did you mean 'cnn'" in str(e.value)
