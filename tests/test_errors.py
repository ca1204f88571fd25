"""Every error, tried as a new user would: it names the thing, expected vs found, and the fix.

After each one the engine still works.
"""

import zipfile

import numpy as np
import pytest

from nbtool.errors import (ChunkError, InputMismatch, ModelFileError, ModelLoadError,
                           ModelNotFound, PlacementError, PredictionFailed, UnsupportedFormat,
                           UntrustedModel)


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
    with pytest.raises(UnsupportedFormat, match=r"\.pt.*expected a \.keras, \.h5, \.tflite or OpenVINO \.xml"):
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
    with pytest.raises(UntrustedModel) as e:     # at register: no worker ever opens it
        engine.register(name, model_dir / "checked.keras")
    msg = str(e.value)
    assert f"model '{name}'" in msg and "checked.keras" in msg and "a Lambda layer" in msg
    assert "safe mode" in msg and f"eng.register('{name}'" in msg and "trusted=True" in msg
    assert name not in engine.registry
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
    # 64 values a row cannot become rows of 8: no reshape is suggested that would fail.
    assert "64 values each and the model's hold 8, so no reshape fits" in msg
    with pytest.raises(InputMismatch, match=r"expects float32 numbers, got text from your "
                                            r"array of shape \(4, 8\) and dtype <U3"):
        engine.predict(name, np.full((4, 8), "abc"))
    st = engine.status()
    assert all(name not in s.models for s in st.values())       # nothing was scheduled


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


# -- worker side: failures that say only what they know, once ---------------------------------
def test_a_run_whose_every_chunk_fails_logs_one_line_each_and_keeps_the_traceback(
        engine, model_dir, unique, still_works):
    name = f"{unique}_allnan"
    engine.register(name, model_dir / "checked.keras", trusted=True)
    res = engine.predict(name, np.full((40, 8), np.nan, "float32"), chunk_size=10,
                         combine=None)
    assert [e.chunk for e in res.errors] == [0, 1, 2, 3]
    tb = res.errors[0].traceback           # the worker's frames travelled with the error
    assert tb.startswith("Traceback (most recent call last)")
    assert "in predict_chunk" in tb and "in run_in_batches" in tb and "row is not finite" in tb
    logs = engine.client.get_worker_logs()
    mine = [msg for entries in logs.values() for _, msg in entries if name in msg]
    assert len(mine) == 4, mine            # one line per chunk, Dask's own block dropped
    assert all("failed on cpu" in m and "\n" not in m and "Traceback" not in m for m in mine)
    with pytest.raises(PredictionFailed) as e:
        res.raise_for_errors()
    assert str(e.value).startswith("4 part(s) of the prediction failed and none succeeded:")
    assert "kept" not in str(e.value)


def test_messages_claim_only_what_they_know_and_end_each_sentence_once(
        engine, model_dir, reference, unique, still_works):
    import pickle
    import re

    from nbtool.errors import ModelFileChanged

    load = ModelLoadError("m", "m.keras", "cpu0", "it contains a Lambda layer",
                          "if you trust it: eng.register('m', 'm.keras', trusted=True)")
    chunk = ChunkError("m", 2, (20, 30), "cpu0", str(load))
    assert "trusted=True). Its rows are NaN in the result;" in str(chunk)
    assert "other chunks" not in str(chunk)
    for e in (load, chunk, ModelFileError("m", "m.keras", "it is gone.", "check the path."),
              InputMismatch("m", "m.keras", "rows of (8,)", "rows of (3,).", "reshape it."),
              PlacementError("m", "gpu:3", ["cpu:0"], "start with gpus=[3]."),
              ModelFileChanged("m", "m.keras", "1-1", "2-2", "cpu0")):
        assert not re.search(r"(?<!\.)\.\.(?!\.)", str(e)), str(e)   # ".." but not "..."
    first = [str(PredictionFailed([chunk], kept=k)).splitlines()[0] for k in (None, 0, 3)]
    assert first == [
        "1 part(s) of the prediction failed (rows of failed chunks are NaN in the Prediction):",
        "1 part(s) of the prediction failed and none succeeded:",
        "1 part(s) of the prediction failed; the 3 chunk(s) that succeeded were kept in the "
        "Prediction (rows of failed chunks are NaN):"]
    assert pickle.loads(pickle.dumps(PredictionFailed([chunk], kept=0))).kept == 0
    # A real run: chunk 0 of 6 fails, the Prediction counts the 5 it kept.
    name = f"{unique}_one"
    engine.register(name, model_dir / "checked.keras", trusted=True)
    x = reference["x8"].copy()
    x[3] = np.nan
    res = engine.predict(name, x, chunk_size=10, combine=None)
    with pytest.raises(PredictionFailed, match=r"^1 part\(s\) .*; the 5 chunk\(s\) that "
                                               r"succeeded were kept"):
        res.raise_for_errors()


def test_a_foreign_savedmodel_or_tflite_that_will_not_load_gets_a_fix_its_user_can_follow(
        engine, model_dir, tmp_path, unique, still_works):
    import shutil

    from tflite_models import select_ops_tflite

    saved = tmp_path / "foreign_savedmodel"
    shutil.copytree(model_dir / "mlp_savedmodel", saved)
    data = next((saved / "variables").glob("variables.data-*"))
    data.write_bytes(data.read_bytes()[:10])          # TensorFlow cannot restore it
    name = f"{unique}_foreign"
    engine.register(name, saved, trusted=True)
    with pytest.raises(ModelLoadError) as e:
        engine.load(name)
    msg = str(e.value)
    assert f"model '{name}'" in msg and "foreign_savedmodel" in msg
    assert "another TensorFlow version (this worker has TensorFlow 2." in msg
    assert "ask its publisher for a .keras or .tflite export" in msg
    assert "tf.saved_model.save" in msg and "model.save(" not in msg
    lite = select_ops_tflite(tmp_path / "foreign.tflite")   # needs ops LiteRT lacks
    engine.register(f"{name}_lite", lite)
    with pytest.raises(ModelLoadError) as e:
        engine.load(f"{name}_lite")
    msg = str(e.value)
    assert "Select TensorFlow op" in msg and "a .tflite with built-in ops only" in msg
    assert "model.save(" not in msg


def test_every_error_survives_the_trip_from_a_worker_with_its_message_and_fields():
    """Errors cross processes pickled. Before, each class wrote its own __reduce__ and
    ModelNotFound's forgot register_hint: the message changed on the way. Now the arguments
    of every error are recorded once, in the base class."""
    import inspect
    import pickle

    import nbtool.errors as errors

    made = {
        errors.ModelNotFound: errors.ModelNotFound("cnm", ["cnn"], "%nbtool register cnm x"),
        errors.ChunkError: ChunkError("m", 2, (20, 30), "cpu0", "boom", traceback="tb"),
        errors.PredictionFailed: PredictionFailed(
            [ChunkError("m", 2, (20, 30), "cpu0", "boom")], kept=3),
        errors.InvalidOption: errors.InvalidOption("m", "batch_size", 0, "a whole number",
                                                   "batch_size=64"),
        errors.ChunkCancelled: errors.ChunkCancelled(),
        errors.CombineError: errors.CombineError("mean", "shapes differ"),
        errors.NoVariantQualifies: errors.NoVariantQualifies("m", "x >= 1", {"m@a": "0.5"}),
    }
    every = [c for _, c in inspect.getmembers(errors, inspect.isclass)
             if issubclass(c, errors.NbtoolError) and c.__module__ == errors.__name__]
    assert set(made) <= set(every)
    for cls, e in made.items():
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is cls and str(back) == str(e), cls
        skip = ("errors", "_init_args")   # hold exceptions: equal only by identity
        assert {k: v for k, v in vars(back).items() if k not in skip} == \
            {k: v for k, v in vars(e).items() if k not in skip}, cls
    assert not [c.__name__ for c in every if "__reduce__" in c.__dict__
                and c is not errors.NbtoolError]
