"""Every error, tried as a new user would: it names the thing, expected vs found, and the fix.

After each one the engine still works.
"""

import zipfile

import numpy as np
import pytest

from nbtool.errors import (ChunkError, InputMismatch, ModelFileError, ModelLoadError,
                           ModelNotFound, PlacementError, PredictionFailed, UnsupportedFormat)


@pytest.fixture
def still_works(engine, model_dir, reference, unique):
    """Afterwards, a prediction on the same engine succeeds."""
    yield
    name = f"{unique}_after"
    engine.register(name, model_dir / "mlp.keras")
    res = engine.predict(name, reference["x8"])
    assert res.ok and np.abs(res[name] - reference["mlp"]).max() <= 1e-5


def test_unknown_model_suggests_the_close_name(engine, model_dir, reference, unique, still_works):
    engine.register(f"{unique}_cnn", model_dir / "cnn.keras")
    with pytest.raises(ModelNotFound) as e:
        engine.predict([f"{unique}_cnm"], reference["img"])
    assert f"did you mean '{unique}_cnn'" in str(e.value) and "eng.register(" in str(e.value)
    with pytest.raises(ModelNotFound):
        engine.unload(f"{unique}_nope")


def test_missing_and_unsupported_files(engine, tmp_path, unique, still_works):
    with pytest.raises(ModelFileError, match=r"model '\w+' \(.*missing.keras\): the path does not"):
        engine.register(f"{unique}_m", tmp_path / "missing.keras")
    (tmp_path / "m.pt").write_bytes(b"torch")
    with pytest.raises(UnsupportedFormat, match=r"\.pt.*expected a \.keras, \.h5 or \.tflite"):
        engine.register(f"{unique}_m", tmp_path / "m.pt")
    assert f"{unique}_m" not in engine.registry


def test_corrupt_file_fails_at_register_or_at_load_with_the_worker_named(
        engine, model_dir, reference, tmp_path, unique, still_works):
    with pytest.raises(ModelFileError, match="not a readable .keras archive"):
        engine.register(f"{unique}_zip", model_dir / "corrupt.keras")
    # A readable config with garbage weights: only loading can tell.
    bad = tmp_path / "badweights.keras"
    with zipfile.ZipFile(model_dir / "mlp.keras") as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item, b"garbage" if item.filename.endswith(".h5") else data)
    name = f"{unique}_bad"
    engine.register(name, bad)
    with pytest.raises(ModelLoadError) as e:
        engine.load(name)
    msg = str(e.value)
    assert f"model '{name}'" in msg and "badweights.keras" in msg
    assert "failed to load on worker 'cpu" in msg and "Fix:" in msg
    res = engine.predict(name, reference["x8"])            # the same failure, per chunk
    assert not res.ok and all(isinstance(x, ChunkError) for x in res.errors)
    row = next(r for r in engine.models() if r["name"] == name)
    assert "failed:" in row["state"]


def test_untrusted_lambda_is_refused_until_trusted(engine, model_dir, reference, unique,
                                                   still_works):
    name = f"{unique}_lam"
    engine.register(name, model_dir / "checked.keras")
    with pytest.raises(ModelLoadError) as e:
        engine.load(name)
    assert "safe mode" in str(e.value) and "trusted=True" in str(e.value)
    engine.register(name, model_dir / "checked.keras", trusted=True)
    assert engine.predict(name, reference["x8"]).ok


def test_input_that_does_not_fit_is_refused_before_anything_runs(engine, model_dir, reference,
                                                                 unique, still_works):
    name = f"{unique}_mlp"
    engine.register(name, model_dir / "mlp.keras")
    with pytest.raises(InputMismatch) as e:
        engine.predict(name, reference["img"])
    msg = str(e.value)
    assert f"model '{name}'" in msg and "mlp.keras" in msg
    assert "rows of shape (8,)" in msg and "got rows of shape (8, 8, 1)" in msg
    assert "x.reshape(len(x), 8)" in msg
    with pytest.raises(InputMismatch, match=r"expects float32 input, got <U3"):
        engine.predict(name, np.full((4, 8), "abc"))
    st = engine._statuses()
    assert all(name not in s["models"] for s in st.values())    # nothing was scheduled


def test_bad_inputs_and_options(engine, model_dir, unique, still_works):
    name = f"{unique}_mlp"
    engine.register(name, model_dir / "mlp.keras")
    with pytest.raises(InputMismatch, match="at least one row"):
        engine.predict(name, np.zeros((0, 8), "float32"))
    with pytest.raises(InputMismatch, match="chunk_size=0"):
        engine.predict(name, np.zeros((4, 8), "float32"), chunk_size=0)
    with pytest.raises(InputMismatch, match="ragged"):
        engine.predict(name, [[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="choose 'mean', 'vote' or None"):
        engine.predict(name, np.zeros((4, 8), "float32"), combine="median")
    with pytest.raises(Exception, match=r"input .*\.csv.*np\.save"):
        engine.predict(name, "data.csv")
    with pytest.raises(PlacementError, match=r"asks for device 'gpu:0'.*cpu:0, cpu:1"):
        engine.register(f"{unique}_g", model_dir / "mlp.keras", device="gpu:0")


def test_a_failing_chunk_keeps_the_others(engine, model_dir, reference, unique, still_works):
    name = f"{unique}_chk"
    engine.register(name, model_dir / "checked.keras", trusted=True)
    x = reference["x8"].copy()
    x[22] = np.nan                       # chunk 2 of 10-row chunks fails inside the graph
    res = engine.predict(name, x, chunk_size=10, combine=None)
    assert not res.ok and len(res.errors) == 1
    err = res.errors[0]
    assert isinstance(err, ChunkError) and (err.model, err.chunk, err.rows) == (name, 2, (20, 30))
    assert err.worker in ("cpu0", "cpu1") and "row is not finite" in str(err)
    out = res[name]
    assert np.isnan(out[20:30]).all() and not np.isnan(np.delete(out, range(20, 30), 0)).any()
    clean = engine.predict(name, reference["x8"], combine=None)[name]
    assert np.abs(np.delete(out, range(20, 30), 0) - np.delete(clean, range(20, 30), 0)).max() \
        <= 1e-5
    with pytest.raises(PredictionFailed, match=r"(?s)1 part\(s\).*rows 20:30"):
        res.raise_for_errors()


def test_combining_models_with_different_outputs_keeps_each(engine, model_dir, reference, unique):
    a, b = f"{unique}_a", f"{unique}_b"
    engine.register(a, model_dir / "mlp.keras")
    engine.register(b, model_dir / "multi.keras")
    res = engine.predict([a, b], reference["x8"], combine="mean")
    assert res.combined is None and "several outputs" in str(res.errors[0])
    assert np.abs(res[a] - reference["mlp"]).max() <= 1e-5 and len(res[b]) == 2


def test_a_failed_re_registration_keeps_the_old_one(engine, model_dir, reference, unique):
    name = f"{unique}_keep"
    engine.register(name, model_dir / "mlp.keras")
    before = engine.placement[name]
    with pytest.raises(PlacementError):
        engine.register(name, model_dir / "mlp2.keras", device="gpu:0")
    assert engine.placement[name] == before
    assert np.abs(engine.predict(name, reference["x8"])[name] - reference["mlp"]).max() <= 1e-5


def test_re_registering_a_changed_file_serves_the_new_model(engine, model_dir, reference,
                                                            unique, tmp_path):
    name = f"{unique}_swap"
    path = tmp_path / "m.keras"
    path.write_bytes((model_dir / "mlp.keras").read_bytes())
    engine.register(name, path)
    assert np.abs(engine.predict(name, reference["x8"])[name] - reference["mlp"]).max() <= 1e-5
    engine.register(name, path)                       # unchanged: a no-op
    path.write_bytes((model_dir / "mlp2.keras").read_bytes())
    engine.register(name, path)                       # changed: the old copy is dropped
    assert np.abs(engine.predict(name, reference["x8"])[name] - reference["mlp2"]).max() <= 1e-5
