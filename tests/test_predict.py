"""Chunked predictions on the real cluster equal Keras' own model.predict."""

import asyncio

import dask.array as da
import numpy as np
import pytest

TOL = 1e-5


@pytest.mark.parametrize("chunk_size", [1, 7, 100, None])
@pytest.mark.parametrize("replicas", [1, 2])
def test_predictions_equal_keras_predict_for_any_chunking(engine, model_dir, reference, unique,
                                                          chunk_size, replicas):
    eng = engine
    eng.register(f"{unique}_mlp", model_dir / "mlp.keras", replicas=replicas)
    eng.register(f"{unique}_cnn", model_dir / "cnn.keras", replicas=replicas)
    res = eng.predict([f"{unique}_mlp"], reference["x8"], chunk_size=chunk_size)
    assert res.ok
    assert np.abs(res[f"{unique}_mlp"] - reference["mlp"]).max() <= TOL
    res = eng.predict(f"{unique}_cnn", reference["img"], chunk_size=chunk_size, combine=None)
    assert np.abs(res[f"{unique}_cnn"] - reference["cnn"]).max() <= TOL
    expected_chunks = -(-60 // (chunk_size or 60)) if chunk_size else res.timings[
        f"{unique}_cnn"]["chunks"]
    assert res.timings[f"{unique}_cnn"]["chunks"] == expected_chunks


def test_replicas_share_the_chunks_between_workers(engine, keras, unique):
    from conftest import dense_model

    model = dense_model(keras, 2048, seed=3, n_in=256)
    eng = engine
    eng.register(f"{unique}_wide", model, replicas=2)
    x = np.random.default_rng(1).normal(size=(20000, 256)).astype("float32")
    res = eng.predict(f"{unique}_wide", x, chunk_size=1000)
    assert res.timings[f"{unique}_wide"]["workers"] == ["cpu0", "cpu1"]
    assert np.abs(res[f"{unique}_wide"] - model.predict(x, verbose=0)).max() <= 1e-4


def test_a_cold_ensemble_is_planned_from_what_this_machine_measured(engine, keras, unique):
    """Never measured: every replica loads and runs it, and the run records its costs.
    Measured as costly to load: each worker loads a different model, the others load in
    the background, and the next run uses every replica, each model loaded once per worker."""
    from conftest import dense_model
    from nbtool.worker.measure import model_costs, record_cost

    eng = engine
    x = np.random.default_rng(6).normal(size=(2000, 64)).astype("float32")
    fresh = f"{unique}_fresh"
    eng.register(fresh, dense_model(keras, 64, seed=30, n_in=64), replicas=2)
    first = eng.predict(fresh, x, chunk_size=250)
    assert first.timings[fresh]["workers"] == ["cpu0", "cpu1"]
    cpu0 = eng.pool.addresses(["cpu0"])["cpu0"]
    measured = eng.client.run(model_costs, [eng.registry.get(fresh)], workers=[cpu0])[cpu0]
    assert measured[fresh]["load"] > 0 and measured[fresh]["row"] > 0

    models = {f"{unique}_a": dense_model(keras, 256, seed=31, n_in=64),
              f"{unique}_b": dense_model(keras, 128, seed=32, n_in=64)}
    for name, model in models.items():
        eng.register(name, model, replicas=2)
        # As if measured before: loading dwarfs computing these rows.
        eng.client.run(record_cost, eng.registry.get(name), "cpu:0", load=5.0, row=1e-7,
                       workers=[cpu0])
    names = list(models)
    cold = eng.predict(names, x, chunk_size=250, combine=None)
    ran_on = [cold.timings[n]["workers"] for n in names]
    assert sorted(w for ws in ran_on for w in ws) == ["cpu0", "cpu1"], ran_on
    for name, model in models.items():
        assert np.abs(cold[name] - model.predict(x, verbose=0)).max() <= 1e-4
    loaded = eng.load(*names)                     # waits for the background replicas
    assert all(sorted(loaded[n]) == ["cpu0", "cpu1"] for n in names)
    states = eng.status()
    assert all(states[w].state_of(n).loads == 1 for w in ("cpu0", "cpu1") for n in names)
    warm = eng.predict(names, x, chunk_size=250, combine=None)
    assert all(warm.timings[n]["workers"] == ["cpu0", "cpu1"] for n in names)
    assert all(warm.timings[n]["load_seconds"] == 0 for n in names)


@pytest.mark.slow
def test_a_default_ensemble_runs_every_model_on_both_workers_once_warm(engine, keras, unique):
    """Before: with the default replicas=1 three models on two workers left one worker
    carrying two while the other idled (1.62x the floor). Now each may run on both, and
    runs split every model's chunks over both workers: the first (nothing measured yet),
    and warm ones, planned from what that run measured."""
    from conftest import dense_model

    models = {f"{unique}_{i}": dense_model(keras, 64 * (i + 1), seed=40 + i, n_in=64)
              for i in range(3)}
    for name, model in models.items():
        assert engine.register(name, model).replicas is None   # the default: auto
    names = list(models)
    assert all(sorted(engine.placement[n]) == ["cpu0", "cpu1"] for n in names)
    shown = {r["name"]: r["device"] for r in engine.models()}
    assert all(shown[n] in ("auto: cpu0, cpu1", "auto: cpu1, cpu0") for n in names), shown
    x = np.random.default_rng(8).normal(size=(3000, 64)).astype("float32")
    cold = engine.predict(names, x, chunk_size=250, combine=None)
    assert all(cold.timings[n]["workers"] == ["cpu0", "cpu1"] for n in names)
    warm = engine.predict(names, x, chunk_size=250, combine=None)
    for name, model in models.items():
        assert warm.timings[name]["workers"] == ["cpu0", "cpu1"], warm.timings[name]
        assert warm.timings[name]["load_seconds"] == 0
        assert np.abs(warm[name] - model.predict(x, verbose=0)).max() <= 1e-4
        assert np.abs(cold[name] - model.predict(x, verbose=0)).max() <= 1e-4


def test_every_format_gives_the_same_answer(engine, model_dir, reference, unique):
    eng = engine
    eng.register(f"{unique}_k", model_dir / "mlp.keras")
    eng.register(f"{unique}_h5", model_dir / "mlp.h5", device="cpu", replicas=2)
    eng.register(f"{unique}_sm", model_dir / "mlp_savedmodel", trusted=True)   # a graph
    names = [f"{unique}_k", f"{unique}_h5", f"{unique}_sm"]
    res = eng.predict(names, reference["x8"], chunk_size=13)
    for n in names:
        assert np.abs(res[n] - reference["mlp"]).max() <= TOL, n
    assert np.abs(res.combined - reference["mlp"]).max() <= TOL


def test_a_model_object_from_the_notebook_is_saved_once_and_runs(engine, keras, reference,
                                                                 unique):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    spec = engine.register(f"{unique}_fresh", model)
    assert spec.path.endswith(f"{unique}_fresh.keras") and spec.path.startswith(
        str(engine.work_dir))
    res = engine.predict(f"{unique}_fresh", reference["x8"])
    assert np.abs(res[f"{unique}_fresh"] - model.predict(reference["x8"], verbose=0)).max() <= TOL


def test_multi_output_models_keep_every_output_in_input_order(engine, model_dir, reference,
                                                              unique):
    engine.register(f"{unique}_multi", model_dir / "multi.keras")
    res = engine.predict(f"{unique}_multi", reference["x8"], chunk_size=7, combine=None)
    outs = res[f"{unique}_multi"]
    assert isinstance(outs, list) and len(outs) == 2
    for got, want in zip(outs, reference["multi"]):
        assert got.shape == want.shape and np.abs(got - want).max() <= TOL


def test_npy_path_and_dask_array_inputs(engine, model_dir, reference, unique, tmp_path):
    engine.register(f"{unique}_mlp", model_dir / "mlp.keras")
    path = tmp_path / "x.npy"
    np.save(path, reference["x8"])
    res = engine.predict(f"{unique}_mlp", str(path), chunk_size=16)
    assert np.abs(res[f"{unique}_mlp"] - reference["mlp"]).max() <= TOL
    dx = da.from_array(reference["x8"], chunks=(11, 8))
    res = engine.predict(f"{unique}_mlp", dx)
    assert res.chunk_size == 11 and res.timings[f"{unique}_mlp"]["chunks"] == 6
    assert np.abs(res[f"{unique}_mlp"] - reference["mlp"]).max() <= TOL
    res = engine.predict(f"{unique}_mlp", dx, chunk_size=25)
    assert res.timings[f"{unique}_mlp"]["chunks"] == 3
    assert np.abs(res[f"{unique}_mlp"] - reference["mlp"]).max() <= TOL


def test_combine_mean_and_vote(engine, model_dir, reference, unique):
    a, b = f"{unique}_a", f"{unique}_b"
    engine.register(a, model_dir / "mlp.keras")
    engine.register(b, model_dir / "mlp2.keras")
    mean = engine.predict([a, b], reference["x8"], combine="mean")
    assert np.abs(mean.combined - (reference["mlp"] + reference["mlp2"]) / 2).max() <= TOL
    vote = engine.predict([a, b, a], reference["x8"], combine="vote")   # duplicates ignored
    assert vote.models == [a, b]
    # Two voters: where they agree, their class; where not, the voted class whose mean
    # score is higher (never a class nobody voted for).
    va, vb = np.argmax(reference["mlp"], 1), np.argmax(reference["mlp2"], 1)
    mean_scores = (reference["mlp"] + reference["mlp2"]) / 2
    rows = np.arange(len(va))
    expected = np.where(mean_scores[rows, va] >= mean_scores[rows, vb], va, vb)
    assert (va != vb).any() and np.array_equal(vote.combined, expected)
    none = engine.predict([a, b], reference["x8"], combine=None)
    assert none.combined is None


def test_predict_async_is_awaitable_and_gives_the_same_result(engine, model_dir, reference,
                                                              unique):
    engine.register(f"{unique}_m", model_dir / "mlp.keras")

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        res = await engine.predict_async(f"{unique}_m", reference["x8"], chunk_size=5)
        t.cancel()
        return res, ticks

    res, ticks = asyncio.run(main())
    assert np.abs(res[f"{unique}_m"] - reference["mlp"]).max() <= TOL
    assert ticks > 0      # the event loop kept running while the prediction did


def test_module_shortcuts_act_on_the_last_engine(engine, model_dir, reference, unique):
    import nbtool

    assert nbtool.default_engine() is engine
    nbtool.register(f"{unique}_s", model_dir / "mlp.keras")
    res = nbtool.predict(f"{unique}_s", reference["x8"])
    assert np.abs(res[f"{unique}_s"] - reference["mlp"]).max() <= TOL
    assert any(r["name"] == f"{unique}_s" for r in nbtool.models())


def test_results_are_saved_when_asked(engine, model_dir, reference, unique, tmp_path):
    engine.register(f"{unique}_m", model_dir / "mlp.keras")
    res = engine.predict(f"{unique}_m", reference["x8"], save=str(tmp_path / "p.npz"))
    saved = np.load(tmp_path / "p.npz")
    assert np.array_equal(saved[f"{unique}_m"], res[f"{unique}_m"])
    assert np.array_equal(saved["combined"], res.combined)


def test_a_models_signature_is_learned_at_its_first_load_and_never_loaded_for_again(
        engine, model_dir, reference, unique, tmp_path):
    """Before: a run saved to a result store loaded its models just to learn their output
    shapes, every time, and a SavedModel's run loaded it twice before anything was
    scheduled (once for its input, once for its outputs)."""
    from distributed import get_task_stream

    name = f"{unique}_sm"
    engine.register(name, model_dir / "mlp_savedmodel", trusted=True)
    registered = engine.registry.get(name)
    assert registered.input_shape == (None, 8)                 # read from its signature,
    assert registered.output_specs is None                     # its output shapes at a load

    def loads_during(save):
        with get_task_stream(client=engine.client) as stream:
            res = engine.predict(name, reference["x8"], chunk_size=20, save=save)
        return res, [t["key"] for t in stream.data if "nbtool-load-" in str(t["key"])]

    first, loads = loads_during(str(tmp_path / "first.zarr"))
    assert len(loads) == 1, loads                               # one load taught both
    spec = engine.registry.get(name)
    assert spec.input_shape == (None, 8) and spec.n_outputs == 1
    assert [shape for shape, _ in spec.output_specs] == [(3,)]
    second, loads = loads_during(str(tmp_path / "second.zarr"))
    assert loads == []                                          # kept in the registry
    third, loads = loads_during(None)
    assert loads == []
    for res in (first, second, third):
        assert np.abs(np.asarray(res[name]) - reference["mlp"]).max() <= TOL
    engine.register(name, model_dir / "mlp_savedmodel", trusted=True)   # the same again:
    assert engine.registry.get(name) == spec                    # a no-op, nothing forgotten


def test_prediction_renders_a_table(engine, model_dir, reference, unique):
    engine.register(f"{unique}_m", model_dir / "mlp.keras")
    res = engine.predict(f"{unique}_m", reference["x8"])
    html = res._repr_html_()
    assert f"{unique}_m" in html and "<table" in html and "rows/s" in html
    assert f"{unique}_m" in repr(res) and "60 rows" in repr(res)
    assert engine.history[-1]["models"] == [f"{unique}_m"]


def test_a_model_retrained_and_saved_in_place_is_served_new_on_every_row_with_a_warning(
        engine, keras, unique, tmp_path):
    """Before: the spec kept the old fingerprint, the cached replicas kept serving the old
    weights, and one replica that reloaded mixed old and new chunks, with 0 errors."""
    import warnings

    from conftest import dense_model
    from nbtool.catalog.registration import file_fingerprint
    from nbtool.worker.tasks import resident_models, unload_models

    name, path = f"{unique}_re", tmp_path / "retrained.keras"
    dense_model(keras, 16, seed=40, n_in=8).save(path)
    engine.register(name, path, replicas=2)
    x = np.random.default_rng(7).normal(size=(120, 8)).astype("float32")
    first = engine.predict(name, x, chunk_size=10, combine=None)
    assert first.timings[name]["workers"] == ["cpu0", "cpu1"]         # both replicas warm
    assert np.abs(first[name] - keras.saving.load_model(path).predict(x, verbose=0)).max() <= TOL

    dense_model(keras, 16, seed=41, n_in=8).save(path)                # retrained, same path
    new = keras.saving.load_model(path).predict(x, verbose=0)
    assert np.abs(new - first[name]).max() > 1e-2                     # really other weights
    with pytest.warns(UserWarning, match=rf"model '{name}' \(.*retrained.keras\) changed since "
                      "it was registered; using the new file") as notes:
        second = engine.predict(name, x, chunk_size=10, combine=None)
    assert notes[0].filename == __file__    # the user's line, not the engine's insides
    assert second.ok and np.abs(second[name] - new).max() <= TOL
    fingerprint = file_fingerprint(path)
    assert engine.registry.get(name).fingerprint == fingerprint
    assert engine.registry.get(name).replicas == 2                    # the same options
    now = engine.registry.get(name).identity                         # the new bytes' digest
    assert all(m.get(name) in (None, now)                             # no old copy anywhere
               for m in engine.client.run(resident_models).values())

    # One replica drops it (an eviction, a restart): the reload is the new file, no mix.
    cpu0 = engine.pool.addresses(["cpu0"])["cpu0"]
    engine.client.run(unload_models, [name], workers=[cpu0])
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        third = engine.predict(name, x, chunk_size=10, combine=None)
    assert not [n for n in notes if "changed since" in str(n.message)]   # unchanged: no note
    assert third.ok and np.abs(third[name] - new).max() <= TOL


def _shared_files(engine) -> set:
    """Every input file the engine has handed to its local workers, wherever it went."""
    import os

    from nbtool.prediction.sources import shared_folder

    folders = set(engine.runs.shared_dirs) | {shared_folder(engine.work_dir / "inputs", 1)}
    return {f"{d}/{n}" for d in folders if d.is_dir() for n in os.listdir(d)}


def test_a_refused_input_or_save_leaves_no_file_in_shared_memory(engine, model_dir, unique,
                                                                 tmp_path):
    """Before: the input was written to /dev/shm before it was checked, and a refused one
    stayed there until eng.close() (three refused 45 MB inputs held 134 MB of RAM)."""
    from nbtool.errors import InputMismatch, ResultStoreError

    name = f"{unique}_m"
    engine.register(name, model_dir / "mlp.keras")
    engine.predict(name, np.zeros((4, 8), "float32"))        # the shared folder exists
    before = _shared_files(engine)
    wrong = np.zeros((50_000, 7), "float32")                   # rows of 7, the model wants 8
    with pytest.raises(InputMismatch, match=rf"model '{name}'.*expects rows of shape \(8,\)"):
        engine.predict(name, wrong)
    (tmp_path / "file.zarr").write_text("not a folder")
    with pytest.raises(ResultStoreError, match="a file of that name exists"):
        engine.predict(name, np.zeros((50_000, 8), "float32"), save=str(tmp_path / "file.zarr"))
    assert _shared_files(engine) == before
    run = engine.submit(name, np.zeros((500, 8), "float32"), chunk_size=100)
    assert len(_shared_files(engine) - before) == 1            # a run's input lives while it runs
    run.cancel()                                               # and goes when it is cancelled
    assert _shared_files(engine) == before


def test_an_ensemble_with_a_failed_model_has_no_combined_unless_asked(engine, reference,
                                                                      failing_pair):
    """Before: `combined` silently became the mean of the models that survived, on the rows
    where one failed, as if the whole ensemble had voted."""
    chk, good = failing_pair
    x = reference["x8"].copy()
    x[25] = np.nan                                             # chunk 2 of 6 fails in-graph
    res = engine.predict([chk, good], x, chunk_size=10)
    assert res.combined is None and len(res.errors) == 1
    assert res.combined_note == (f"combined is not available: model '{chk}' failed on 1 of 6 "
                                 "chunks; pass partial_combine=True to combine the others")
    part = engine.predict([chk, good], x, chunk_size=10, partial_combine=True)
    assert part.combined_note.startswith(f"combined is partial (partial_combine=True): model "
                                         f"'{chk}' failed on 1 of 6 chunks")
    ok = np.r_[0:20, 30:60]
    assert np.abs(part.combined[ok] - (part[chk][ok] + part[good][ok]) / 2).max() <= TOL
    # the other model only (row 25 NaN in: NaN or junk out, the same junk in both)
    np.testing.assert_allclose(part.combined[20:30], part[good][20:30], atol=TOL, equal_nan=True)
    finite = np.r_[0:25, 26:60]                                # row 25 is NaN in, junk out
    assert np.abs(part[good][finite] - reference["mlp"][finite]).max() <= TOL
    whole = engine.predict([chk, good], reference["x8"], chunk_size=10)    # nothing failed
    assert whole.combined_note is None and whole.combined is not None
    late = asyncio.run(engine.predict_async([chk, good], x, chunk_size=10,
                                            partial_combine=True))
    assert np.array_equal(late.combined, part.combined, equal_nan=True)   # row 25: NaN in both


#: Issue 25: a warm ``eng.predict`` calls into at most this many kernel modules (16 before
#: the redesign: facade, registry, worker.runtime, run_assembly... each one more hop).
#: 13 since issue 26: binding (which rows each model takes: one array, several inputs,
#: a table's columns, text) is a step of every run.
WARM_PREDICT_MODULES = 13


def test_a_warm_predict_walks_few_kernel_modules(engine, model_dir, reference, unique):
    """Counted with ``sys.setprofile`` (and ``threading.setprofile``, for the run's
    callbacks) around one warm call: the modules of nbtool whose functions run in this
    process. A new hop on the warm path shows up here with its module's name."""
    import sys
    import threading

    name = f"{unique}_walk"
    engine.register(name, model_dir / "mlp.keras")
    x = reference["x8"]
    engine.predict(name, x)
    engine.predict(name, x)   # warm: loaded, signature learned, costs measured
    walked: list[str] = []

    def profile(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        if event == "call" and module.startswith("nbtool") and module not in walked:
            walked.append(module)

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        res = engine.predict(name, x)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    assert np.abs(res[name] - reference["mlp"]).max() <= TOL
    assert "nbtool.engine.engine" in walked and "nbtool.prediction.run" in walked
    assert len(walked) <= WARM_PREDICT_MODULES, f"{len(walked)} modules: {walked}"
