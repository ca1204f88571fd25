"""The Engine's methods: arguments refused before anything runs, a closed engine says so,
a finished run is let go, and every table reads one status."""

import asyncio

import pytest

import nbtool
from nbtool.errors import EngineClosed, NbtoolError


def test_set_memory_budget_refuses_zero_and_keeps_the_budget(engine):
    before = {n: w.budget for n, w in engine.workers.items()}
    for bad in ("0", 0, "-1GB", None):
        with pytest.raises(ValueError, match=r"memory_budget=.*expected a positive size"):
            engine.set_memory_budget(bad)
    engine.refresh_workers()
    assert {n: w.budget for n, w in engine.workers.items()} == before


def test_a_closed_engine_refuses_every_public_method_with_one_clear_error(
        keep_default_engine, model_dir, reference):
    eng = nbtool.start(gpus="none", n_workers=1, dashboard_address="127.0.0.1:0")
    eng.register("m", model_dir / "mlp.keras")
    eng.close()
    eng.close()   # twice: a no-op
    x = reference["x8"]
    calls = {
        "register": lambda: eng.register("m2", model_dir / "mlp.keras"),
        "register_dir": lambda: eng.register_dir(model_dir),
        "load": lambda: eng.load("m"),
        "start_load": lambda: eng.start_load("m"),
        "unload": lambda: eng.unload("m"),
        "predict": lambda: eng.predict("m", x),
        "predict_async": lambda: asyncio.run(eng.predict_async("m", x)),
        "submit": lambda: eng.submit("m", x),
        "models": eng.models,
        "devices": eng.devices,
        "agreement": lambda: eng.agreement("m", "m", x),
        "optimize": lambda: eng.optimize("m", ["float16"], calibration=x),
        "dashboard": eng.dashboard,
        "set_memory_budget": lambda: eng.set_memory_budget("1GB"),
    }
    for method, call in calls.items():
        with pytest.raises(EngineClosed) as closed:
            call()
        assert str(closed.value).startswith(f"eng.{method}(...): this engine is closed; "
                                            "start a new one with nbtool.start()"), method
    # Nothing slipped in: the register above did not register.
    assert "m2" not in eng.registry
    assert eng.dashboard_link is None and "closed" in repr(eng)
    # The default engine's shortcuts keep their own message.
    with pytest.raises(NbtoolError, match="no nbtool engine is running"):
        nbtool.predict("m", x)


def test_precision_for_a_tflite_or_savedmodel_is_refused_not_silently_ignored(
        engine, model_dir, unique, tmp_path):
    """Before: accepted, and the model still ran in float32 (agreement 1.5e-8 with the
    float32 original, while the .keras one in bfloat16 differed by 3.5e-3)."""
    from nbtool.errors import InvalidOption
    from tflite_models import batch_one_tflite

    tfl = batch_one_tflite(tmp_path / "one.tflite")
    for path, extra in ((tfl, {}), (model_dir / "mlp_savedmodel", {"trusted": True})):
        with pytest.raises(InvalidOption, match="precision='bfloat16'; expected None for a "
                                                ".tflite or SavedModel"):
            engine.register(f"{unique}_p", path, precision="bfloat16", **extra)
        assert f"{unique}_p" not in engine.registry
    engine.register(f"{unique}_k", model_dir / "mlp.keras", precision="bfloat16")   # still fine


def test_a_collected_run_is_not_kept_alive_by_the_engine(engine, model_dir, unique):
    """Before: the engine's list of running predictions held a finished run, and with it
    the Prediction's arrays, until the next submit."""
    import gc
    import weakref

    import numpy as np

    engine.register(f"{unique}_m", model_dir / "mlp.keras")
    res = engine.predict(f"{unique}_m", np.zeros((100, 8), "float32"))
    gone = weakref.ref(res)
    del res
    gc.collect()
    assert gone() is None and engine.running() == []


def test_the_tables_and_status_tell_one_story_of_a_models_life(engine, model_dir, unique):
    """eng.models(), eng.devices() and eng.status() read the same worker reports: a model
    not loaded, loaded where it is placed, then soft-unloaded."""
    name = f"{unique}_life"
    engine.register(name, model_dir / "mlp.keras", device="cpu:1")
    (home,) = engine.placement[name]

    def row():
        return next(r for r in engine.models() if r["name"] == name)

    assert row()["state"] == f"{home}: not loaded" and row()["footprint"] == "-"
    states = engine.load(name)[name]
    assert list(states) == [home] and states[home].loaded and states[home].loads == 1
    status = engine.status([home])[home]
    assert status.state_of(name).describe() == "loaded" and name in status.lru_order
    assert row()["state"] == f"{home}: loaded" and row()["footprint"] != "-"
    assert row()["load s"] == f"{status.state_of(name).load_seconds:.2f}"
    device = next(r for r in engine.devices() if r["worker"] == home)
    assert name in device["models"] and device["pid"] == status.pid
    assert engine.unload(name) == [name]
    assert engine.status([home])[home].state_of(name).describe() == "unloaded"
    assert row()["state"] == f"{home}: unloaded"


def test_options_are_declared_once_and_the_engine_takes_them_as_its_own():
    """Issue 25: ``RunOptions`` and ``ModelOptions`` declare the options; the engine's
    methods take their fields as parameters (help() and IDEs show them), document each
    once, and refuse an unknown one naming the method and what it takes."""
    import dataclasses
    import inspect

    from nbtool.catalog.registration import ModelOptions
    from nbtool.engine.engine import Engine
    from nbtool.prediction.runs import RunOptions

    run_fields = [f.name for f in dataclasses.fields(RunOptions)]
    for method in (Engine.predict, Engine.predict_async, Engine.submit):
        assert list(inspect.signature(method).parameters) == ["self", "models", "x", *run_fields]
    model_fields = [f.name for f in dataclasses.fields(ModelOptions)]
    assert list(inspect.signature(Engine.register).parameters) == \
        ["self", "name", "model", *model_fields]
    assert inspect.iscoroutinefunction(Engine.predict_async)
    for doc, fields in ((Engine.predict.__doc__, run_fields),
                        (Engine.register.__doc__, model_fields)):
        assert not [f for f in fields if f"``{f}" not in doc], "an option without its doc"
    with pytest.raises(TypeError, match=r"predict\(\): got an unexpected keyword argument "
                                        r"'chunksize'; it takes models, x, chunk_size"):
        Engine.predict.__wrapped__(None, "m", None, chunksize=10)
    with pytest.raises(ValueError, match="combine='median' is not a combine method"):
        Engine.submit.__wrapped__(None, "m", None, 10, "median")
