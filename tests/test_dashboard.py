"""The dashboard's widget model, kernel side: what it shows after each button and run."""

import asyncio
import time
import zipfile

import numpy as np
import pytest

from nbtool.dashboard import Dashboard


def wait_until(dash, predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dash.refresh()
        if predicate():
            return True
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s; message: {dash.message.value}")


@pytest.fixture
def dash(engine, model_dir, reference, unique):
    name = f"{unique}_d"
    engine.register(name, model_dir / "mlp.keras")
    ns = {"x8": reference["x8"], "path": "some.npy", "_hidden": reference["x8"], "n": 3}
    d = Dashboard(engine, namespace=ns, autorefresh=False)
    d.model = name
    yield d
    d.close()


def state(dash):
    return dash._model_rows[dash.model]["state"].value


def test_shows_devices_models_and_inputs(dash, engine):
    assert {r["worker"] for r in dash.memory.rows} == set(engine.workers)
    assert all(r["budget"] > 0 and r["used"] > 0 for r in dash.memory.rows)
    assert dash.model in dash.run_models.options
    assert dash.run_input.options == ("path", "x8")           # arrays and .npy paths only
    assert "not loaded" in state(dash)
    assert "keras" in dash._model_rows[dash.model]["info"].value


def test_load_unload_and_hard_unload_buttons(dash, engine):
    rows = dash._model_rows[dash.model]
    rows["load"].click()
    assert "loading" in state(dash) or "loaded" in state(dash)
    wait_until(dash, lambda: state(dash).endswith(": loaded"))
    assert "footprint" in rows["cost"].value and "load" in rows["cost"].value
    assert any(dash.model in r["models"] for r in dash.memory.rows)
    rows["unload"].click()
    dash.refresh()
    assert "not loaded (unloaded)" in state(dash)
    rows["load"].click()
    wait_until(dash, lambda: state(dash).endswith(": loaded"))
    (home,) = engine.placement[dash.model]
    pid = engine._statuses()[home]["pid"]
    rows["hard"].click()
    wait_until(dash, lambda: not dash._pending, timeout=120)
    assert "done: hard unload" in dash.message.value
    assert state(dash) == f"{home}: not loaded"
    assert engine._statuses()[home]["pid"] != pid


def test_a_failing_load_shows_the_reason(engine, model_dir, tmp_path, unique):
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(model_dir / "mlp.keras") as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, b"garbage" if item.filename.endswith(".h5")
                         else src.read(item.filename))
    name = f"{unique}_bad"
    engine.register(name, bad)
    d = Dashboard(engine, namespace={}, autorefresh=False)
    try:
        d._model_rows[name]["load"].click()
        wait_until(d, lambda: "failed:" in d._model_rows[name]["state"].value
                   and not d._pending)
        assert f"load {name} failed" in d.message.value and "Fix:" in d.message.value
        assert "failed: OSError: Unable to" in d._model_rows[name]["state"].value
    finally:
        d.close()


def test_run_form_predicts_binds_and_records(dash, engine, reference):
    dash.run_models.value = (dash.model,)
    dash.run_input.value = "x8"
    dash.run_chunk.value = 7
    dash.run_out.value = "from_dash"
    bg = dash.start_run()
    res = bg.result(timeout=120)
    assert dash.namespace["from_dash"] is res
    assert np.abs(res[dash.model] - reference["mlp"]).max() <= 1e-5
    assert "nbtool-prediction" in dash.run_result.value
    assert dash.run_progress.children[0].children[0].children[0].value == 9   # 9 chunks
    dash.refresh()
    assert "60 rows" in dash.history.value and "error(s)" in dash.history.value


def test_bad_run_form_input_says_why(dash):
    dash.run_models.value = ()
    assert dash.start_run() is None and "pick at least one model" in dash.message.value
    dash.run_models.value = (dash.model,)
    dash.run_input.value = "path"                 # a .npy path that does not exist
    assert dash.start_run() is None and "does not exist" in dash.message.value


def test_refreshes_from_the_event_loop_and_stops_when_closed(engine):
    async def main():
        d = Dashboard(engine, namespace={}, interval=0.05)
        assert d.task is not None
        await asyncio.sleep(0.6)
        seen = d.refreshes
        d.close()
        await asyncio.sleep(0.3)
        return seen, d.refreshes, d

    seen, after, d = asyncio.run(main())
    assert seen >= 3 and after == seen and d.closed
