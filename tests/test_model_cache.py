"""The worker-side cache: load once, stay loaded, evict under a budget, unload soft and hard."""

import numpy as np
import pytest

from conftest import dense_model

MB = 1_000_000


def test_a_cache_reports_each_model_as_a_typed_state_through_load_evict_and_unload(
        model_dir, reference):
    from nbtool.wire import ModelSpec, ModelState, file_fingerprint
    from nbtool.worker.model_cache import ModelCache

    def spec_of(name):
        path = model_dir / f"{name}.keras"
        return ModelSpec(name, str(path), "keras", path.stat().st_size, file_fingerprint(path))

    mlp, cnn = spec_of("mlp"), spec_of("cnn")
    cache = ModelCache(budget=10**9, device="cpu:0", worker="here")   # in this process
    loaded, seconds = cache.get(mlp)
    assert seconds > 0 and cache.get(mlp)[1] == 0.0                    # resident: no load
    assert np.abs(cache.run(loaded, reference["x8"])[0] - reference["mlp"]).max() <= 1e-5
    state = cache.state_of("mlp")
    assert isinstance(state, ModelState) and state.loaded and state.describe() == "loaded"
    assert (state.loads, state.uses, state.traces) == (1, 2, 1)
    # Its signature, learned at this load: what the kernel keeps in its registry.
    assert state.input_shape == (None, 8) and state.input_dtype == "float32"
    assert state.n_outputs == 1 and state.output_specs == [((3,), "float32")]
    assert state.accounted == state.weight_bytes == 4 * (8 * 16 + 16 + 16 * 3 + 3)
    cache.set_budget(state.accounted + 1)                 # room for the mlp alone
    cache.get(cnn)
    status = cache.status()
    assert status.lru_order == ["cnn"] and status.evictions == 1
    assert status.state_of("mlp").describe() == "evicted" and status.state_of("mlp").uses == 0
    assert cache.resident() == {"cnn": cnn.fingerprint}
    assert cache.unload() == ["cnn"] and cache.status().state_of("cnn").state == "unloaded"
    assert cache.status().state_of("never").describe() == "not loaded"


def test_a_model_loads_once_on_its_worker_and_nowhere_else(engine, model_dir, reference, unique):
    name = f"{unique}_once"
    engine.register(name, model_dir / "mlp.keras", replicas=1)
    (home,) = engine.placement[name]
    for chunk in (7, 13, None):
        res = engine.predict(name, reference["x8"], chunk_size=chunk)
        assert np.abs(res[name] - reference["mlp"]).max() <= 1e-5
    engine.load(name)
    st = engine.status()
    assert st[home].models[name].loads == 1
    assert st[home].models[name].traces == 1          # fixed batch shape: no retracing
    others = [w for w in st if w != home]
    assert all(name not in st[w].models for w in others)


def test_load_warms_every_replica_and_reports_footprint(engine, model_dir, unique):
    name = f"{unique}_warm"
    engine.register(name, model_dir / "cnn.keras", replicas=2)
    out = engine.load(name)
    assert set(out[name]) == {"cpu0", "cpu1"}
    for entry in out[name].values():
        assert entry.state == "loaded" and entry.load_seconds > 0
        assert entry.footprint >= 0 and entry.input_shape == (None, 8, 8, 1)
    table = engine.models()
    row = next(r for r in table if r["name"] == name)
    assert row["state"] == "cpu0: loaded; cpu1: loaded" or row["state"] == "cpu1: loaded; cpu0: loaded"


def test_soft_unload_drops_the_model_and_it_reloads_on_demand(engine, model_dir, reference,
                                                              unique):
    name = f"{unique}_soft"
    engine.register(name, model_dir / "mlp.keras", replicas=1)
    engine.predict(name, reference["x8"])
    (home,) = engine.placement[name]
    assert engine.unload(name) == [name]
    st = engine.status()[home]
    assert name not in st.lru_order and st.models[name].state == "unloaded"
    res = engine.predict(name, reference["x8"])
    assert np.abs(res[name] - reference["mlp"]).max() <= 1e-5
    assert engine.status()[home].models[name].loads == 2


def test_budget_smaller_than_the_models_evicts_lru_and_stays_correct(engine, keras, unique):
    models = [dense_model(keras, 160_000, seed=i) for i in range(4)]   # ~23 MB of weights each
    x = np.random.default_rng(2).normal(size=(64, 32)).astype("float32")
    refs = [m.predict(x, verbose=0) for m in models]
    names = [f"{unique}_d{i}" for i in range(4)]
    for n, m in zip(names, models):
        engine.register(n, m, device="cpu:0")
    size = max(engine.registry.get(n).size_bytes for n in names)
    old = engine.workers["cpu0"].budget
    engine.set_memory_budget(int(2.2 * size))          # room for two of the four
    try:
        budget = engine.workers["cpu0"].budget
        largest = 0
        for rnd in range(2):
            for n, ref in zip(names, refs):
                res = engine.predict(n, x)
                assert np.abs(res[n] - ref).max() <= 1e-4
                st = engine.status()["cpu0"]
                largest = max(largest, *(st.models[m].accounted for m in st.lru_order))
                assert st.resident_bytes <= budget + largest
                assert st.lru_order[-1] == n          # the one just used is resident
        st = engine.status()["cpu0"]
        assert st.evictions >= 6
        assert st.peak_accounted <= budget + largest
        # Weights are counted from the variables: 4 bytes x (32*160000 + 160000 + 160000*4 + 4)
        assert st.models[names[0]].weight_bytes == 4 * (32 * 160_000 + 160_000 + 640_004)
        assert all(st.models[n].loads == 2 for n in names)   # each evicted once a round
    finally:
        engine.set_memory_budget(old)


def test_an_ensemble_over_the_budget_loads_each_model_once_per_run(engine, keras, unique):
    """Chunk i of every model before chunk i+1 would evict a model at every chunk here
    (8 loads per model per run); model after model, each loads once."""
    models = [dense_model(keras, 160_000, seed=20 + i) for i in range(4)]
    x = np.random.default_rng(3).normal(size=(256, 32)).astype("float32")
    refs = [m.predict(x, verbose=0) for m in models]
    names = [f"{unique}_e{i}" for i in range(4)]
    for n, m in zip(names, models):
        engine.register(n, m, device="cpu:0", runtime="tensorflow")
    size = max(engine.registry.get(n).size_bytes for n in names)
    old = engine.workers["cpu0"].budget
    engine.set_memory_budget(int(2.2 * size))          # room for two of the four
    try:
        for run in (1, 2):
            res = engine.predict(names, x, chunk_size=32, combine=None)   # 8 chunks each
            for n, ref in zip(names, refs):
                assert np.abs(res[n] - ref).max() <= 1e-4
            st = engine.status()["cpu0"]
            assert all(st.models[n].loads == run for n in names), \
                {n: st.models[n].loads for n in names}
    finally:
        engine.set_memory_budget(old)


def test_hard_unload_restarts_the_holder_and_rewarms_the_rest(engine, keras, model_dir, unique):
    big, keep = f"{unique}_big", f"{unique}_keep"
    engine.register(big, dense_model(keras, 160_000, seed=7), device="cpu:1")
    engine.register(keep, model_dir / "mlp.keras", device="cpu:1")
    engine.load(big, keep)
    before = engine.status()["cpu1"]
    assert engine.unload(big, hard=True) == ["cpu1"]
    after = engine.status()["cpu1"]
    assert after.pid != before.pid
    # Everything it held but the model asked to go is loaded again, once, in the new process.
    assert keep in before.lru_order
    assert set(after.lru_order) == set(before.lru_order) - {big}
    assert all(after.models[m].loads == 1 for m in after.lru_order)
    assert big not in after.models


@pytest.mark.slow
def test_hard_unload_of_everything_returns_worker_memory(engine, keras, unique):
    idle = {w: s.idle_memory for w, s in engine.status().items()}
    for i, w in enumerate(("cpu0", "cpu1")):
        for j in range(3):
            engine.register(f"{unique}_m{i}{j}", dense_model(keras, 160_000, seed=10 + 3 * i + j),
                            device=w.replace("cpu", "cpu:"))
    engine.load(*[f"{unique}_m{i}{j}" for i in range(2) for j in range(3)])
    loaded = engine.status()
    for w in idle:
        assert loaded[w].rss > idle[w] + 50 * MB       # the models really took memory
    engine.unload()                 # soft first: the memory stays with the processes...
    assert all(s.rss > idle[w] + 50 * MB for w, s in engine.status().items())
    assert engine.unload(hard=True) == ["cpu0", "cpu1"]     # ...until they restart
    after = engine.status()
    for w in idle:
        assert after[w].lru_order == []
        assert abs(after[w].rss - idle[w]) <= 0.10 * idle[w], (w, after[w].rss, idle[w])


def test_the_batch_size_is_swept_once_and_remembered(engine, keras, unique, tmp_path):
    import json
    import os

    model = dense_model(keras, 256, seed=99, n_in=64)
    name = f"{unique}_sweep"
    engine.register(name, model, device="cpu:0", batch_size="auto")
    engine.load(name)
    first = engine.status()["cpu0"].models[name]
    cache = json.loads(open(os.path.join(os.environ["NBTOOL_CACHE_DIR"],
                                         "batch_sizes.json")).read())
    mine = {k: v for k, v in cache.items() if engine.registry.get(name).fingerprint in k}
    assert list(mine.values()) == [first.batch_size]
    assert first.batch_size in (16, 32, 64, 128, 256, 512)
    engine.unload(name, hard=True)            # a new process reads the answer from disk
    engine.load(name)
    again = engine.status()["cpu0"].models[name]
    assert again.batch_size == first.batch_size and again.loads == 1
    # Another CPU worker of this machine takes the same answer: still one entry.
    engine.register(f"{name}_on1", engine.registry.get(name).path, device="cpu:1",
                    batch_size="auto")
    engine.load(f"{name}_on1")
    assert engine.status()["cpu1"].models[f"{name}_on1"].batch_size == \
        first.batch_size
    cache = json.loads(open(os.path.join(os.environ["NBTOOL_CACHE_DIR"],
                                         "batch_sizes.json")).read())
    assert len([k for k in cache if engine.registry.get(name).fingerprint in k]) == 1
    engine.register(f"{name}_fixed", model, batch_size=24, device="cpu:0")
    engine.register(f"{name}_default", model, device="cpu:0")
    engine.load(f"{name}_fixed", f"{name}_default")
    models = engine.status()["cpu0"].models
    assert models[f"{name}_fixed"].batch_size == 24
    # No sweep unless asked: the batch auto timed with the runtime (32, 64 or 128).
    default = models[f"{name}_default"]
    assert default.batch_size in (32, 64, 128)
    assert f"at batch {default.batch_size}" in default.runtime_note


def test_a_model_file_re_saved_in_place_is_refused_under_its_old_registration(
        engine, model_dir, reference, unique, tmp_path):
    from nbtool.errors import ModelFileChanged
    from nbtool.wire import file_fingerprint
    from nbtool.worker.tasks import load_model
    from nbtool.wire import resource_name

    name = f"{unique}_resaved"
    path = tmp_path / "m.keras"
    path.write_bytes((model_dir / "mlp.keras").read_bytes())
    engine.register(name, path, replicas=1)
    old = engine.registry.get(name)
    (home,) = engine.placement[name]
    engine.load(name)
    path.write_bytes((model_dir / "mlp2.keras").read_bytes())   # new weights, same path
    engine.unload(name)                                          # soft: it must load again
    # The old registration reaches the worker (bypassing the engine's own check):
    # it must not load the new weights under the old fingerprint.
    future = engine.client.submit(load_model, old, resources={resource_name(home): 1},
                                  pure=False)
    with pytest.raises(ModelFileChanged) as e:
        future.result()
    msg = str(e.value)
    assert f"model '{name}' ({path})" in msg and "changed since it was registered" in msg
    assert f"(registered {old.fingerprint}, now {file_fingerprint(path)})" in msg
    assert f"eng.register('{name}', '{path}') again" in msg
    st = engine.status()[home]
    assert name not in st.lru_order and st.models[name].state == "failed"
