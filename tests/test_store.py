"""The result store: chunks written by the workers, resumed, invalidated, opened lazily."""

import json
import os
import shutil

import numpy as np
import pytest

import nbtool
from nbtool.store import ResultStore


@pytest.fixture
def two(engine, model_dir, unique):
    a, b = f"{unique}_a", f"{unique}_b"
    engine.register(a, model_dir / "mlp.keras")
    engine.register(b, model_dir / "mlp2.keras")
    return a, b


def test_save_writes_every_chunk_from_the_workers(engine, two, reference, tmp_path):
    a, b = two
    path = tmp_path / "p.zarr"
    res = engine.predict([a, b], reference["x8"], chunk_size=8, save=str(path))
    assert not isinstance(res[a], np.ndarray)       # stays in the store until read
    assert np.abs(np.asarray(res[a]) - reference["mlp"]).max() <= 1e-5
    assert np.abs(np.asarray(res[b]) - reference["mlp2"]).max() <= 1e-5
    manifest = json.loads((path / "nbtool.json").read_text())
    assert manifest["chunk_size"] == 8 and manifest["n_rows"] == 60
    assert set(manifest["models"]) == {a, b} and manifest["input"].startswith("array:")
    assert sorted(int(p) for p in os.listdir(path / "done" / a)) == list(range(8))
    lazy = nbtool.open_prediction(path)
    assert lazy.completed[a] == set(range(8))
    assert np.array_equal(lazy[a][8:16], res[a][8:16])       # read on index, rows 8:16 only


def test_running_again_resumes_and_recomputes_only_what_is_missing(engine, two, reference,
                                                                    tmp_path):
    a, b = two
    path = tmp_path / "p.zarr"
    engine.predict([a, b], reference["x8"], chunk_size=8, save=str(path))
    # A crash between a chunk's data and its marker: the marker is what counts.
    for chunk in ("2", "5"):
        os.remove(path / "done" / a / chunk)
    res = engine.predict([a, b], reference["x8"], chunk_size=8, save=str(path))
    assert res.timings[a]["chunks"] == 2 and res.timings[a]["resumed_chunks"] == 6
    assert res.timings[b]["chunks"] == 0 and res.timings[b]["resumed_chunks"] == 8
    assert np.abs(np.asarray(res[a]) - reference["mlp"]).max() <= 1e-5
    assert np.abs(res.combined - (reference["mlp"] + reference["mlp2"]) / 2).max() <= 1e-5


def test_a_changed_model_file_invalidates_only_that_model(engine, model_dir, reference,
                                                          tmp_path, unique):
    a, b = f"{unique}_a", f"{unique}_b"
    file_a = tmp_path / "a.keras"
    shutil.copy(model_dir / "mlp.keras", file_a)
    engine.register(a, file_a)
    engine.register(b, model_dir / "mlp2.keras")
    path = tmp_path / "p.zarr"
    engine.predict([a, b], reference["x8"], chunk_size=20, save=str(path))
    shutil.copy(model_dir / "mlp2.keras", file_a)                 # the file changes...
    engine.register(a, file_a)
    with pytest.warns(UserWarning, match=f"model '{a}' changed"):
        res = engine.predict([a, b], reference["x8"], chunk_size=20, save=str(path))
    assert res.timings[a]["chunks"] == 3 and res.timings[b]["chunks"] == 0
    assert np.abs(np.asarray(res[a]) - reference["mlp2"]).max() <= 1e-5   # never mixed


def test_a_changed_input_or_chunking_starts_over(engine, two, reference, tmp_path):
    a, _ = two
    path = tmp_path / "p.zarr"
    engine.predict(a, reference["x8"], chunk_size=10, save=str(path))
    with pytest.warns(UserWarning, match="the input changed"):
        res = engine.predict(a, reference["x8"] * 2, chunk_size=10, save=str(path))
    assert res.timings[a]["chunks"] == 6
    with pytest.warns(UserWarning, match="the chunking changed"):
        res = engine.predict(a, reference["x8"] * 2, chunk_size=12, save=str(path))
    assert res.timings[a]["chunks"] == 5


def test_store_errors_are_clear(engine, two, reference, tmp_path):
    a, _ = two
    (tmp_path / "taken.zarr").mkdir()
    (tmp_path / "taken.zarr" / "other.txt").write_text("mine")
    with pytest.raises(Exception, match="not an nbtool result store"):
        engine.predict(a, reference["x8"], save=str(tmp_path / "taken.zarr"))
    with pytest.raises(ValueError, match=r"\.zarr.*\.npz"):
        engine.predict(a, reference["x8"], save=str(tmp_path / "p.csv"))
    with pytest.raises(Exception, match="not an nbtool result store"):
        nbtool.open_prediction(tmp_path / "nothing.zarr")


def test_failed_chunks_are_not_marked_and_are_retried(engine, model_dir, reference, tmp_path,
                                                      unique):
    name = f"{unique}_chk"
    engine.register(name, model_dir / "checked.keras", trusted=True)
    x = reference["x8"].copy()
    x[25] = np.nan
    path = tmp_path / "p.zarr"
    res = engine.predict(name, x, chunk_size=10, combine=None, save=str(path))
    assert len(res.errors) == 1 and ResultStore(path).completed(name) == {0, 1, 3, 4, 5}
    assert np.isnan(res[name][20:30]).all() and not np.isnan(res[name][30:40]).any()
    res = engine.predict(name, x, chunk_size=10, combine=None, save=str(path))
    assert res.timings[name]["chunks"] == 0 and len(res.errors) == 1   # only chunk 2 ran
