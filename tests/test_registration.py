"""The registry: names and options refused at register, finding models in a folder,
suggestions for a name that is not registered."""

import numpy as np
import pytest

from nbtool.errors import InvalidModelName, InvalidOption, ModelFileError, UntrustedModel
from nbtool.catalog.catalog import Registry
from nbtool.catalog.registration import (check_batch_size, check_name, check_replicas,
                             find_models, inspect_model)
from nbtool.wire import ModelSpec


def test_fingerprint_changes_when_the_file_changes(model_dir, tmp_path):
    path = tmp_path / "m.keras"
    path.write_bytes((model_dir / "mlp.keras").read_bytes())
    before = inspect_model("m", path).fingerprint
    path.write_bytes((model_dir / "mlp2.keras").read_bytes())
    assert inspect_model("m", path).fingerprint != before


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


def test_registry_suggests_close_names():
    reg = Registry()
    reg.add(ModelSpec("cnn", "/x.keras", "keras", 1, "f"))
    with pytest.raises(KeyError) as e:
        reg.get("cnm")
    assert "did you mean 'cnn'" in str(e.value)


# -- refused at register: what would later be wrong or unsafe --------------------------------

def test_a_savedmodel_needs_trusted_because_its_graph_can_write_files(engine, keras, tmp_path,
                                                                      unique):
    """Before: a SavedModel with trusted=False wrote a file on the worker at predict."""
    import tensorflow as tf

    target = tmp_path / "written_by_the_graph.txt"

    class Writer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def serve(self, x):
            tf.io.write_file(str(target), "the graph ran")
            return x * 2.0

    writer = Writer()
    tf.saved_model.save(writer, str(tmp_path / "writer"),
                        signatures={"serving_default": writer.serve})
    name = f"{unique}_writer"
    with pytest.raises(UntrustedModel) as e:
        engine.register(name, tmp_path / "writer")
    msg = str(e.value)
    assert f"model '{name}'" in msg and "writer" in msg and "SavedModel" in msg
    assert "file reads and writes" in msg and "trusted=True" in msg
    assert name not in engine.registry and not target.exists()
    engine.register(name, tmp_path / "writer", trusted=True)
    x = np.arange(12, dtype="float32").reshape(3, 4)
    res = engine.predict(name, x)
    assert res.ok and np.allclose(res[name], x * 2) and target.read_text() == "the graph ran"


@pytest.mark.parametrize("bad, clean", [
    ("a/b", "a_b"), ("a%2Fb", "a_2Fb"), (".", "model"), ("..", "model"), (".hidden", "hidden"),
    ("my model", "my_model"), ("", "model"), ("x" * 101, "x" * 100), ("modèle", "mod_le"),
    (3, "3")])
def test_model_names_outside_the_safe_set_are_refused_with_a_clean_name(bad, clean):
    """Before: 'a/b' and 'a%2Fb' landed on one result array; '.' and '..' broke zarr."""
    with pytest.raises(InvalidModelName) as e:
        check_name(bad)
    msg = str(e.value)
    assert f"model name {bad!r}" in msg and "letters, digits and _ - . @ +" in msg
    assert f"such as {clean!r}" in msg
    check_name(clean)                                    # the suggestion itself is valid
    for good in ("cnn@int8", "a-b.c+d_e", "v1.2", "x" * 100):
        assert check_name(good) == good


@pytest.mark.parametrize("bad", [-3, "big", 2.5, True, 0, "0", "64"])
def test_a_batch_size_nbtool_cannot_use_is_refused_with_the_allowed_values(bad):
    """Before: 0 silently meant 64; -3, 2.5 and True reached the worker."""
    with pytest.raises(InvalidOption) as e:
        check_batch_size("cnn", bad)
    msg = str(e.value)
    assert f"model 'cnn': batch_size={bad!r}" in msg and "a whole number >= 1" in msg
    assert "'auto'" in msg and "None (the default: 64, or what runtime='auto' measured " \
        "fastest)" in msg and "Fix:" in msg
    assert [check_batch_size("cnn", v) for v in (1, np.int64(8), "auto", None)] == \
        [1, 8, "auto", None]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_a_replica_count_that_is_not_a_whole_number_of_workers_is_refused(bad):
    """Before: replicas=1.5 became 1, True became 1, without a word."""
    with pytest.raises(InvalidOption, match=r"replicas=.*a whole number >= 1"):
        check_replicas("cnn", bad)
    assert check_replicas("cnn", np.int32(2)) == 2


def test_find_models_warns_when_two_files_would_share_a_name(model_dir):
    """Before: mlp.keras beside mlp.h5 was dropped without a word."""
    with pytest.warns(UserWarning, match=r"skipped .*mlp.keras: .*mlp.h5 already takes the "
                                         r"name 'mlp'.*eng.register\('mlp_keras'") as notes:
        found = find_models(model_dir)
    assert notes[0].filename == __file__
    assert found["mlp"].name == "mlp.h5"
