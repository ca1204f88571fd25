"""nbtool tried as a careful, then a hostile user would: every case is right or clearly refused.

Bad inputs, bad and foreign model files, faults, another local user, concurrent result
stores. Each case asserts either the right answer (checked against Keras or the
interpreter) or a refusal that names the thing, what was expected and the fix; and that
nothing computed is lost and nothing is left behind.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from nbtool.errors import NbtoolError


# == model files: foreign, changed, untrusted =================================================
# -- worker side: a model's batch axis, a file changed under a run, failures that stay readable
@pytest.mark.parametrize("kind", ["batch_one", "merging"])
def test_a_tflite_that_merges_its_batch_axis_matches_the_interpreter_or_is_refused(
        engine, keras, tmp_path, unique, kind):
    import tflite_models

    path = getattr(tflite_models, f"{kind}_tflite")(tmp_path / f"{kind}.tflite")
    name = f"{unique}_{kind}"
    engine.register(name, path, batch_size=16)
    x = np.random.default_rng(3).normal(size=(37, tflite_models.K)).astype("float32")
    res = engine.predict(name, x, chunk_size=7, combine=None)   # odd chunks, a short last
    if res.ok:
        got = res[name] if isinstance(res[name], list) else [res[name]]
        truth = tflite_models.row_by_row(path, x)
        assert [g.shape for g in got] == [t.shape for t in truth]
        assert all(np.abs(g - t).max() <= 1e-6 for g, t in zip(got, truth))
    else:                       # refused, by name, with a fix that works (test_litert)
        msg = str(res.errors[0])
        assert f"model '{name}'" in msg and "batch_size=1" in msg and "Fix:" in msg
    assert kind == "merging" or res.ok          # a built-in batch of 1 is run, not refused


def test_a_chunk_sent_with_a_stale_registration_is_refused_not_served_new_weights(
        engine, model_dir, reference, tmp_path, unique):
    from nbtool.errors import ChunkError
    from nbtool.worker.tasks import predict_chunk
    from nbtool.wire import resource_name

    name, path = f"{unique}_stale", tmp_path / "m.keras"
    path.write_bytes((model_dir / "mlp.keras").read_bytes())
    engine.register(name, path)
    old = engine.registry.get(name)
    home = engine.placement[name][0]
    path.write_bytes((model_dir / "mlp2.keras").read_bytes())     # re-saved, never loaded
    stale = engine.client.submit(predict_chunk, old, reference["x8"], 0, 10, 0,
                                 resources={resource_name(home): 1}, pure=False)
    with pytest.raises(ChunkError, match=rf"model '{name}'.*the file changed since it was "
                                         r"registered.*Fix: eng\.register\("):
        stale.result()
    try:                                         # through the engine: the new file, or a refusal
        out = engine.predict(name, reference["x8"])[name]
        assert np.abs(out - reference["mlp2"]).max() <= 1e-5
    except NbtoolError as e:
        assert "changed" in str(e) and "Fix:" in str(e)

# -- registration: refused at register what would later be wrong or unsafe; never stale
def test_a_name_that_leaves_the_work_folder_or_collides_is_refused(engine, keras, unique):
    from nbtool.errors import InvalidModelName

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    escape = engine.work_dir.parent / f"{unique}_escape.keras"
    for bad in (f"../{unique}_escape", f"{unique}/b", f"{unique}%2Fb", ".", ".."):
        with pytest.raises(InvalidModelName, match=r"letters, digits and _ - \. @ \+.*Fix:"):
            engine.register(bad, model)
        assert bad not in engine.registry
    assert not escape.exists()                  # before: saved at work_dir/../<name>.keras
    engine.register(f"{unique}_b", model)       # the clean name works
    assert np.allclose(engine.predict(f"{unique}_b", np.ones((3, 8), "float32"))[f"{unique}_b"],
                       model.predict(np.ones((3, 8), "float32"), verbose=0), atol=1e-5)


@pytest.mark.parametrize("option", [{"batch_size": 0}, {"batch_size": -3}, {"batch_size": True},
                                    {"batch_size": "big"}, {"batch_size": 2.5},
                                    {"replicas": 0}, {"replicas": 1.5}, {"replicas": True}])
def test_register_options_nbtool_cannot_use_are_refused_before_anything(engine, model_dir,
                                                                       unique, option):
    (key, value), = option.items()
    with pytest.raises(NbtoolError, match=rf"{key}={value!r}; expected a whole number >= 1"):
        engine.register(f"{unique}_o", model_dir / "mlp.keras", **option)
    assert f"{unique}_o" not in engine.registry


def test_a_foreign_folder_registers_only_what_is_safe_and_says_why_for_the_rest(
        engine, model_dir, reference, tmp_path, unique):
    import shutil

    folder = tmp_path / "foreign"
    folder.mkdir()
    good = f"{unique}_good"
    shutil.copy(model_dir / "mlp.keras", folder / f"{good}.keras")
    shutil.copy(model_dir / "mlp.keras", folder / f"{unique} bad name.keras")
    shutil.copy(model_dir / "mlp.keras", folder / f".{unique}_hidden.keras")
    shutil.copy(model_dir / "checked.keras", folder / f"{unique}_lambda.keras")
    shutil.copytree(model_dir / "mlp_savedmodel", folder / f"{unique}_graph")
    with pytest.warns(UserWarning) as notes:
        specs = engine.register_dir(folder)
    assert [s.name for s in specs] == [good]
    said = " | ".join(str(n.message) for n in notes)
    assert f"such as '{unique}_bad_name'" in said and f"such as '{unique}_hidden'" in said
    assert "a Lambda layer" in said and "file reads and writes" in said
    assert said.count(", trusted=True).") == 2            # each with its own eng.register
    assert np.abs(engine.predict(good, reference["x8"])[good] - reference["mlp"]).max() <= 1e-5


def test_a_registered_file_replaced_by_an_untrusted_or_deleted_one_is_never_served(
        engine, model_dir, reference, tmp_path, unique):
    from nbtool.errors import ModelFileError, UntrustedModel

    name, path = f"{unique}_swap", tmp_path / "m.keras"
    path.write_bytes((model_dir / "mlp.keras").read_bytes())
    engine.register(name, path, replicas=2)
    assert np.abs(engine.predict(name, reference["x8"])[name] - reference["mlp"]).max() <= 1e-5
    path.write_bytes((model_dir / "checked.keras").read_bytes())    # now holds a lambda
    for _ in range(2):                  # refused every time, not only once: no stale serve
        with pytest.raises(UntrustedModel, match=rf"model '{name}'.*a Lambda layer"):
            engine.predict(name, reference["x8"])
    with pytest.raises(UntrustedModel):
        engine.load(name)
    path.unlink()
    with pytest.raises(ModelFileError, match=rf"model '{name}'.*the path does not exist"):
        engine.predict(name, reference["x8"])
    resident = [m for row in engine.devices() for m in row["models"].split(", ")]
    assert name not in resident                        # and no stale copy stays in memory


# == the cluster: another user, addresses, lifecycle ===========================================
def test_without_the_session_certificate_no_port_of_the_cluster_runs_code(engine, tmp_path):
    """Scheduler, every worker and every nanny: plain tcp, or TLS with a certificate of
    one's own, and Dask's ``run`` op with a pickled function. None gets through."""
    import asyncio

    from distributed.core import rpc
    from distributed.protocol.pickle import dumps
    from distributed.security import Security

    marker = tmp_path / "pwned"

    def pwn():
        marker.write_text("ran")

    info = engine.client.scheduler_info(n_workers=-1)["workers"]
    targets = [engine.client.scheduler.address, *info, *(w["nanny"] for w in info.values())]
    forged = Security.temporary().get_connection_args("client")

    async def attack(address, scheme, args):
        try:
            async with rpc(address.replace("tls://", scheme), timeout=3,
                           connection_args=args) as r:
                reply = await asyncio.wait_for(r.run(function=dumps(pwn)), 5)
        except Exception as e:
            return type(e).__name__
        return f"GOT IN: {reply.get('status')}"

    async def main():
        return [await attack(a, s, args) for a in targets
                for s, args in (("tcp://", {}), ("tls://", forged))]

    outcomes = asyncio.run(main())
    assert len(outcomes) == 2 * (1 + 2 * len(info))
    # Refused at the connection, not by a mistake of this test (a TypeError proves nothing).
    assert set(outcomes) <= {"CommClosedError", "FatalCommClosedError", "OSError",
                             "TimeoutError", "SSLError"}, outcomes
    assert not marker.exists()
    # The same attack with the session's certificate does get in: the certificate is the key.
    owner = engine.client.security.get_connection_args("client")
    assert asyncio.run(attack(next(iter(info)), "tls://", owner)) == "GOT IN: OK"
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("kwargs, says", [
    ({"dashboard_address": "0.0.0.0:8799"}, "allow_remote_dashboard=True"),
    ({"dashboard_address": ":8799"}, "every interface"),
    ({"n_workers": 0}, "n_workers=0: expected a whole number of at least 1"),
    ({"memory_budget": 0}, "memory_budget=0: expected a positive size"),
    ({"memory_budget": "-1GB"}, "memory_budget='-1GB': expected a positive size"),
    ({"address": "tls://127.0.0.1:1"}, "no security= was given"),
])
def test_start_refuses_what_would_expose_the_cluster_or_silently_mean_the_default(
        kwargs, says):
    import nbtool
    from nbtool.engine.session import current_engine

    before = current_engine()
    with pytest.raises(ValueError, match=says) as refused:
        nbtool.start(**{"gpus": "none", **kwargs})
    assert "Fix:" in str(refused.value)
    assert current_engine() is before   # nothing started, nothing replaced


@pytest.mark.slow
def test_dashboard_address_none_serves_no_dashboard_and_nothing_beyond_loopback(
        keep_default_engine):
    """As the docstring says: off. Dask's scheduler serves HTTP whatever ``dashboard``
    says, on port 8787 of every interface when given no address: it stays on loopback,
    without the dashboard's pages (before: a dashboard on 8787, and "Port 8787 in use")."""
    import urllib.error
    import urllib.request

    import psutil

    import nbtool

    eng = nbtool.start(dashboard_address=None, n_workers=1, gpus="none")
    try:
        assert eng.dashboard_link is None and repr(eng).endswith("no dashboard>")
        port = eng.cluster.scheduler.services["dashboard"].port
        assert port != 8787
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10)
        assert missing.value.code == 404
        listening = [c.laddr for c in psutil.Process().net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(a.ip in ("127.0.0.1", "::1") for a in listening), listening
    finally:
        eng.close()



# == runs and result stores ====================================================================
def test_two_runs_on_one_store_one_is_refused_and_each_reads_only_its_own_rows(
        engine, model_dir, reference, unique, tmp_path):
    from nbtool.errors import StoreBusy, StoreRewritten

    name, path, x = f"{unique}_m", str(tmp_path / "p.zarr"), reference["x8"]
    engine.register(name, model_dir / "mlp.keras")
    first = engine.submit(name, x, chunk_size=7, save=path)
    with pytest.raises(StoreBusy, match=f"run {first.run_id} .* is writing it now.*Fix:"):
        engine.predict(name, x * 2, chunk_size=7, save=path)      # concurrently: refused
    a = first.collect()
    assert np.abs(a[name][:] - reference["mlp"]).max() <= 1e-5
    with pytest.warns(UserWarning, match="the input changed"):
        b = engine.predict(name, x[::-1].copy(), chunk_size=7, save=path)   # afterwards
    assert np.abs(b[name][:] - reference["mlp"][::-1]).max() <= 1e-5
    with pytest.raises(StoreRewritten, match="rewritten by another run.*Fix: save each run"):
        a[name]                                 # never b's rows under a's name


@pytest.mark.parametrize("names", [("a/b", "a%2Fb"), (".", ".."), ("x.y", "x%2Ey", "x%252Ey"),
                                   ("cnn@int8", "cnn%40int8")])
def test_model_names_that_could_share_or_escape_a_store_folder_stay_apart(tmp_path, names):
    from nbtool.prediction.store import ResultStore
    from nbtool.wire import StoreRef
    from nbtool.worker.writing import write_chunk

    store = ResultStore(tmp_path / "p.zarr")
    store.prepare([(n, "fp", [((1,), "float32")]) for n in names], "input", 2, 2)
    for i, n in enumerate(names):
        write_chunk(StoreRef(store.path, 0, store.run_id), n, 0, [np.full((2, 1), i, "float32")])
    store.release()
    assert [store.arrays(n)[0][0, 0] for n in names] == list(range(len(names)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]    # nothing climbed out


def test_an_ensemble_with_a_failing_model_never_passes_the_survivors_off_as_combined(
        engine, model_dir, reference, unique):
    chk, good = f"{unique}_chk", f"{unique}_good"
    engine.register(chk, model_dir / "checked.keras", trusted=True)
    engine.register(good, model_dir / "mlp2.keras")
    x = reference["x8"].copy()
    x[59] = np.inf                                               # the last chunk fails
    res = engine.predict([chk, good], x, chunk_size=20, combine="vote")
    assert res.combined is None and not res.ok
    assert f"model '{chk}' failed on 1 of 3 chunks; pass partial_combine=True" in repr(res)
    part = engine.predict([chk, good], x, chunk_size=20, combine="vote", partial_combine=True)
    assert np.array_equal(part.combined[40:59], np.argmax(part[good][40:59], axis=1))
    nobody = np.isnan(part[good][59]).all()          # inf in, NaN out: nobody voted there
    assert part.combined[59] == (-1 if nobody else np.argmax(part[good][59]))


@pytest.mark.parametrize("where", ["file.zarr", "file.zarr/p.zarr", "file.zarr/p.npz"])
def test_save_where_no_result_can_be_written_is_refused_before_the_run(
        engine, model_dir, reference, unique, tmp_path, where):
    name = f"{unique}_m"
    engine.register(name, model_dir / "mlp.keras")
    (tmp_path / "file.zarr").write_text("mine")
    with pytest.raises(NbtoolError, match=r"(result store|save=).*(file of that name exists|"
                       r"not a folder).*Fix: .*(save|pass)"):
        engine.predict(name, reference["x8"], save=str(tmp_path / where))
    assert [p.name for p in tmp_path.iterdir()] == ["file.zarr"]
    assert (tmp_path / "file.zarr").read_text() == "mine"
    assert engine.history == [] or engine.history[-1]["models"] != [name]   # nothing ran



# == inputs and the magics =====================================================================
def _zarr_group(tmp_path):
    import zarr

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("x", shape=(4, 8), dtype="float32")
    return group


@pytest.mark.parametrize("make, found", [
    (lambda tmp: None, "got None"),
    (lambda tmp: {"x": np.zeros((4, 8))}, r"a dict with keys \['x'\]"),
    (lambda tmp: (np.zeros(8) for _ in range(4)), "a generator"),
    (_zarr_group, r"a zarr group holding the arrays \['x'\].*group\['x'\]"),
    (lambda tmp: [[1.0] * 8, [None] + [1.0] * 7], "None among its values"),   # a gap
])
def test_inputs_that_are_not_rows_are_refused_by_what_they_are(engine, model_dir, unique,
                                                               tmp_path, make, found):
    name = f"{unique}_mlp"
    engine.register(name, model_dir / "mlp.keras")
    with pytest.raises(NbtoolError, match=found) as e:
        engine.predict(name, make(tmp_path))
    assert "Fix:" in str(e.value) and "ragged" not in str(e.value)


def test_one_row_as_a_1d_array_is_refused_and_the_suggested_fix_is_right(engine, model_dir,
                                                                         reference, unique):
    name = f"{unique}_mlp"
    engine.register(name, model_dir / "mlp.keras")
    x = reference["x8"][5]
    with pytest.raises(NbtoolError, match=r"your array of shape \(8,\).*x\.reshape\(1, -1\)"):
        engine.predict(name, x)                 # 8 rows of shape (), or one row of 8?
    res = engine.predict(name, x.reshape(1, -1))
    assert np.abs(res[name] - reference["mlp"][5:6]).max() <= 1e-5


def test_the_magics_refuse_a_namespace_breaking_out_a_zero_chunk_and_a_stray_quote(
        engine, model_dir, reference, unique):
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbtool")
    name = f"{unique}_mlp"
    ip.run_line_magic("nbtool", f"register {name} '{model_dir / 'mlp.keras'}'")
    ip.user_ns["x8"] = reference["x8"]
    for line in (f"{name} --out __builtins__", f"{name} --chunk-size 0", f"{name} --out 'x"):
        with pytest.raises(UsageError, match="Fix:"):
            ip.run_cell_magic("infer", line, "x8")
    assert ip.run_cell("print('still fine')").success
    res = ip.run_cell_magic("infer", f"{name} --chunk-size 7", "x8")
    assert res.chunk_size == 7 and np.abs(res[name] - reference["mlp"]).max() <= 1e-5


# == issue 24: never silently wrong, again ======================================================
@pytest.mark.parametrize("kind", ["softplus", "layernorm"])
def test_auto_runtime_is_right_on_rows_unlike_the_first_64(engine, keras, tmp_path, unique,
                                                          kind):
    """Rows after the 64th scaled by 200 (softplus overflows in float32 conversions) or
    offset to 3e3 (LayerNormalization loses digits): whatever runtime auto chose, every
    row equals Keras, with no error (a fallback to TensorFlow says so in a warning)."""
    L = keras.layers
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 8)).astype("float32")
    if kind == "softplus":
        model = keras.Sequential([keras.Input((8,)), L.Dense(16, activation="softplus"),
                                  L.Dense(4)])
        x[64:] *= 200
    else:
        model = keras.Sequential([keras.Input((8,)), L.LayerNormalization(), L.Dense(4)])
        x[64:] = 3e3 + x[64:] * 0.01
    model.save(tmp_path / f"{kind}.keras")
    name = f"{unique}_{kind}"
    engine.register(name, tmp_path / f"{kind}.keras")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        res = engine.predict(name, x)
    assert res.errors == []
    got, want = res[name], model.predict(x, verbose=0)
    # Outputs reach the hundreds: float32 rounding alone (Keras' own batches against the
    # worker's) differs by ~1e-6 of them, so relative as well as absolute.
    assert np.isfinite(got).all() and np.allclose(got, want, rtol=1e-5, atol=1e-4)
    notes = [str(w.message) for w in said if "fell back" in str(w.message)
             or "computed in TensorFlow" in str(w.message)]
    runtimes = {engine.status()[w].models[name].runtime for w in res.timings[name]["workers"]}
    if notes:   # a conversion ran and was caught: it says which, and TensorFlow runs it now
        assert runtimes == {"tensorflow"} and f"model {name!r}: its " in notes[0]


def test_a_model_file_overwritten_with_the_same_size_and_mtime_is_noticed(
        engine, keras, tmp_path, unique):
    """``cp -p`` of another model of the same architecture over a registered file (same
    size, modification time set back): a warm engine and the output cache serve the new
    weights, not the old ones."""
    import shutil
    import time as _time

    path, other = tmp_path / "m.h5", tmp_path / "other.h5"
    from conftest import twin_h5

    old, new = twin_h5(keras, path, 1), twin_h5(keras, other, 2)
    x = np.random.default_rng(0).normal(size=(50, 8)).astype("float32")
    name = f"{unique}_twin"
    engine.register(name, path)
    first = engine.predict(name, x, cache=True)[name]
    assert np.abs(first - old.predict(x, verbose=0)).max() <= 1e-4
    st = path.stat()
    _time.sleep(0.05)
    shutil.copy2(other, path)                            # cp -p: bytes and times
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.warns(UserWarning, match=rf"model '{name}' .*changed since it was registered"):
        again = engine.predict(name, x, cache=True)
    assert again.timings[name]["cached_chunks"] == 0
    assert np.abs(again[name] - new.predict(x, verbose=0)).max() <= 1e-4
    os.chmod(path, 0o640)                                # the same bytes: the same model
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)      # not "changed since registered"
        third = engine.predict(name, x, cache=True)
    assert third.timings[name]["cached_chunks"] == again.timings[name]["chunks"]
    assert np.abs(third[name] - again[name]).max() == 0


def test_one_multi_output_model_with_the_default_combine_is_no_failure(engine, model_dir,
                                                                        reference, unique):
    name = f"{unique}_multi"
    engine.register(name, model_dir / "multi.keras")
    res = engine.predict(name, reference["x8"])            # combine="mean", the default
    assert res.ok and res.errors == [] and res.raise_for_errors() is res
    assert [a.shape[1] for a in res[name]] == [2, 4]
    assert all(np.abs(a - b).max() <= 1e-5 for a, b in zip(res[name], reference["multi"]))


def test_a_table_with_pandas_missing_values_gets_a_fix_that_works(engine, model_dir,
                                                                   reference, unique):
    import pandas as pd

    name = f"{unique}_mlp"
    engine.register(name, model_dir / "mlp.keras")
    frame = pd.DataFrame(reference["x8"][:6], columns=list("abcdefgh")).astype("Float32")
    frame.iloc[2, 3] = pd.NA
    with pytest.raises(NbtoolError, match=r"<NA>.*Fix: .*x\.to_numpy\(dtype='float32', "
                                          r"na_value=np\.nan\)") as e:
        engine.predict(name, frame)
    fixed = frame.to_numpy(dtype="float32", na_value=np.nan)    # the fix, as written
    res = engine.predict(name, fixed)
    assert np.isnan(res[name][2]).all() and "np.asarray(x, dtype='float32')" not in str(e.value)
    keep = [0, 1, 3, 4, 5]
    assert np.abs(res[name][keep] - reference["mlp"][keep]).max() <= 1e-5


def test_an_embedding_index_out_of_range_is_tensorflows_clear_error(engine, keras, tmp_path,
                                                                   unique):
    """Whatever runtime runs it: TensorFlow's message (the value and the range), never
    LiteRT's "out of boundsNode number 3" nor a number made from a row it cannot read."""
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(10, 4),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    model.save(tmp_path / "emb.keras")
    good = np.random.default_rng(1).integers(0, 10, size=(80, 3)).astype("int32")
    for runtime in ("auto", "litert"):
        name = f"{unique}_emb_{runtime}"
        engine.register(name, tmp_path / "emb.keras", runtime=runtime)
        ok = engine.predict(name, good)
        assert ok.ok and np.abs(ok[name] - model.predict(good, verbose=0)).max() <= 1e-5
        bad = good.copy()
        bad[70, 2] = 30
        res = engine.predict(name, bad)
        assert not res.ok and len(res.errors) == 1
        msg = str(res.errors[0])
        assert "boundsNode" not in msg
        assert "30 is not in [0, 10)" in msg or "out of bounds. Node" in msg, msg
