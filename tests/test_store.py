"""The result store: chunks written by the workers, resumed, invalidated, opened lazily."""

import json
import os
import shutil

import numpy as np
import pytest

import nbtool
from nbtool.prediction.store import ResultStore


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
    with pytest.warns(UserWarning, match="the input changed") as notes:
        res = engine.predict(a, reference["x8"] * 2, chunk_size=10, save=str(path))
    assert res.timings[a]["chunks"] == 6
    assert notes[0].filename == __file__    # the user's line, not the store's
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


def test_a_second_run_on_a_store_in_use_is_refused_and_the_first_keeps_its_rows(
        engine, two, reference, tmp_path):
    """Before: a second run on the same save= path rewrote the store under the first, whose
    Prediction then returned the second run's rows with 0 errors."""
    from nbtool.errors import StoreBusy

    a, b = two
    path = tmp_path / "p.zarr"
    first = engine.submit([a, b], reference["x8"], chunk_size=8, save=str(path))
    with pytest.raises(StoreBusy, match=rf"result store {path}: run {first.run_id} \(process "
                       r"\d+, since .*\) is writing it now.*Fix: wait for that run to finish"):
        engine.submit([a, b], reference["x8"] * 2, chunk_size=8, save=str(path))
    res = first.collect()
    assert res.ok
    assert np.abs(np.asarray(res[a]) - reference["mlp"]).max() <= 1e-5
    assert np.abs(res.combined - (reference["mlp"] + reference["mlp2"]) / 2).max() <= 1e-5
    # Collected: the lock is free again, and a resume that writes nothing changes nothing.
    again = engine.predict([a, b], reference["x8"], chunk_size=8, save=str(path))
    assert again.timings[a]["chunks"] == 0
    assert np.abs(np.asarray(res[a]) - reference["mlp"]).max() <= 1e-5   # still its own


def test_a_prediction_whose_store_another_run_rewrote_refuses_to_read_it(engine, two,
                                                                          reference, tmp_path):
    """Before: run A's Prediction, read after run B wrote other inputs to the same path,
    silently returned B's rows."""
    from nbtool.errors import StoreRewritten

    a, _ = two
    path = tmp_path / "p.zarr"
    res_a = engine.predict(a, reference["x8"], chunk_size=10, save=str(path))
    with pytest.warns(UserWarning, match="the input changed"):
        res_b = engine.predict(a, reference["x8"][::-1].copy(), chunk_size=10, save=str(path))
    gone = (rf"result store {path}: it was rewritten by another run at \d{{4}}-.*; this "
            rf"Prediction's rows of model '{a}' are gone\. Fix: save each run to its own path, "
            r"or read the store again with nbtool.open_prediction")
    with pytest.raises(StoreRewritten, match=gone):
        res_a[a]
    with pytest.raises(StoreRewritten, match=gone):
        res_a.combined
    assert "rows of model" in repr(res_a) and "nbtool-warning" in res_a._repr_html_()
    assert "<table" not in res_a._repr_html_()          # no numbers of the other run
    assert np.abs(np.asarray(res_b[a]) - reference["mlp"][::-1]).max() <= 1e-5
    assert np.array_equal(nbtool.open_prediction(path)[a][:], res_b[a][:])


def test_model_names_that_differ_only_in_escaping_get_their_own_arrays(tmp_path):
    """Before: 'a/b' and 'a%2Fb' were one array in the store (the second overwrote the
    first), and '.'/'..' were folder names that climb out of it."""
    from nbtool.wire import StoreRef
    from nbtool.worker.writing import write_chunk

    names = ["a/b", "a%2Fb", ".", "..", "a.b", "__x"]
    path = tmp_path / "s" / "p.zarr"
    store = ResultStore(path)
    store.prepare([(n, "fp", [((2,), "float32")]) for n in names], "input", 4, 2)
    for i, n in enumerate(names):
        ref = StoreRef(store.path, 0, store.run_id)
        write_chunk(ref, n, 0, [np.full((2, 2), i, "float32")])
    store.release()
    for i, n in enumerate(names):
        assert store.completed(n) == {0}
        assert np.array_equal(store.arrays(n)[0][:2], np.full((2, 2), i, "float32")), n
    assert os.listdir(tmp_path) == ["s"] and os.listdir(tmp_path / "s") == ["p.zarr"]
    lazy = nbtool.open_prediction(path)
    assert [float(lazy[n][0, 0]) for n in names] == [float(i) for i in range(len(names))]


def test_a_late_task_of_a_run_that_no_longer_holds_the_store_writes_nothing(tmp_path):
    from nbtool.errors import ResultStoreError
    from nbtool.wire import StoreRef
    from nbtool.worker.writing import write_chunk

    store = ResultStore(tmp_path / "p.zarr")
    store.prepare([("m", "fp", [((1,), "float32")])], "input", 4, 2)
    old = store.run_id
    store.release()                              # run `old` ended (collected or cancelled)
    store.acquire("newer")                       # and another run holds the store now
    with pytest.raises(ResultStoreError, match=rf"belongs to run {old}, which has ended "
                       r"\(run newer holds it now\), so it was not written"):
        write_chunk(StoreRef(store.path, 0, old), "m", 0, [np.ones((2, 1), "float32")])
    store.release()
    assert store.completed("m") == set()


def test_save_onto_a_file_or_under_one_is_a_clear_error_and_leaves_nothing(engine, two,
                                                                         reference, tmp_path):
    """Before: raw OS errors (FileExistsError, NotADirectoryError) from deep inside zarr,
    and for .npz only after the whole run had computed."""
    from nbtool.errors import NbtoolError, ResultStoreError

    a, _ = two
    (tmp_path / "taken.zarr").write_text("a file")
    (tmp_path / "notes.txt").write_text("a file")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ResultStoreError, match=rf"result store {tmp_path / 'taken.zarr'}: a "
                       "file of that name exists.*Fix: save to a new path ending in .zarr"):
        engine.predict(a, reference["x8"], save=str(tmp_path / "taken.zarr"))
    under = tmp_path / "notes.txt" / "p.zarr"
    with pytest.raises(ResultStoreError, match=rf"result store {under}: {tmp_path / 'notes.txt'}"
                       " is not a folder.*Fix: save under a folder"):
        engine.predict(a, reference["x8"], save=str(under))
    with pytest.raises(NbtoolError, match=r"save='.*notes.txt/p.npz': .*notes.txt is not a "
                       r"folder.*Fix: pass a .npz path in a folder you can write"):
        engine.predict(a, reference["x8"], save=str(tmp_path / "notes.txt" / "p.npz"))
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "taken.zarr").read_text() == "a file"
