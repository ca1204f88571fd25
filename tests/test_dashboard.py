"""The dashboard's widget model, kernel side: what it shows after each button and run."""

import asyncio
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from nbtool.views.panel import Dashboard
from nbtool.views.gpu_monitor import GpuMonitor


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
    engine.register(name, model_dir / "mlp.keras", replicas=1)   # one worker's states
    ns = {"x8": reference["x8"], "path": "some.npy", "_hidden": reference["x8"], "n": 3}
    d = Dashboard(engine, namespace=ns, autorefresh=False)
    d.model = name
    yield d
    d.close()


def state(dash):
    return dash.model_lines[dash.model]["state"].value


def test_shows_devices_models_and_inputs(dash, engine):
    assert {r["worker"] for r in dash.memory.rows} == set(engine.workers)
    assert all(r["budget"] > 0 and r["used"] > 0 for r in dash.memory.rows)
    assert dash.model in dash.run_models.options
    assert dash.run_input.options == ("path", "x8")           # arrays and .npy paths only
    assert "not loaded" in state(dash)
    assert "keras" in dash.model_lines[dash.model]["info"].value


def test_load_unload_and_hard_unload_buttons(dash, engine):
    rows = dash.model_lines[dash.model]
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
    pid = engine.status()[home].pid
    rows["hard"].click()
    wait_until(dash, lambda: not dash.pending, timeout=120)
    assert "done: hard unload" in dash.message.value
    assert state(dash) == f"{home}: not loaded"
    assert engine.status()[home].pid != pid


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
        d.model_lines[name]["load"].click()
        wait_until(d, lambda: "failed:" in d.model_lines[name]["state"].value
                   and not d.pending)
        assert f"load {name} failed" in d.message.value and "Fix:" in d.message.value
        assert "failed: OSError: Unable to" in d.model_lines[name]["state"].value
    finally:
        d.close()


def test_run_form_predicts_binds_and_records(dash, engine, reference):
    dash.run_models.value = (dash.model,)
    dash.run_input.value = "x8"
    assert dash.run_chunk.value == "auto"                    # unset shows "auto", not 0
    dash.run_chunk.value = "7"
    dash.run_out.value = "from_dash"
    bg = dash.start_run()
    dash.refresh()          # its model loads first: the run is still going, and shows
    assert bg.run.run_id in dash.running.rows
    res = bg.result(timeout=120)
    assert dash.namespace["from_dash"] is res
    assert np.abs(res[dash.model] - reference["mlp"]).max() <= 1e-5
    assert "nbtool-prediction" in dash.run_result.value
    assert dash.run_progress.children[0].children[0].children[0].value == 9   # 9 chunks
    dash.refresh()
    assert "60 rows" in dash.history.value and "error(s)" in dash.history.value
    assert not dash.running.rows and "nothing running" in dash.running.box.children[0].value


def test_chunk_size_field_takes_auto_or_a_whole_number(dash):
    dash.run_models.value = (dash.model,)
    dash.run_input.value = "x8"
    for bad in ("abc", "0", "-5", "2.5"):
        dash.run_chunk.value = bad
        assert dash.start_run() is None
        assert dash.message.value.endswith(
            f"chunk size: expected &#x27;auto&#x27; or a positive whole number, got "
            f"&#x27;{bad}&#x27;</span>"), dash.message.value
    assert dash.run is None                                   # nothing was submitted


def test_running_now_shows_each_run_live_then_hands_it_to_the_history(dash, engine):
    x = np.random.default_rng(1).normal(size=(2000, 8)).astype("float32")
    (home,) = engine.placement[dash.model]
    before = {r["worker"]: len(r["history"]) for r in dash.memory.rows}
    run = engine.submit([dash.model], x, chunk_size=10)       # 200 chunks, from the notebook
    dash.refresh()
    row = dash.running.rows[run.run_id]
    bar = row["bars"][dash.model]
    assert bar.max == 200 and bar.value < 200                 # its model is still loading
    assert "2,000 rows in chunks of 10" in row["header"].value
    assert "/200 chunks" in row["texts"][dash.model].value
    seen = {bar.value}
    while not run.done:   # a warm model's 200 chunks can end within a few hundred ms
        time.sleep(0.01)
        dash.refresh()
        if run.run_id in dash.running.rows:
            seen.add(bar.value)
    assert len(seen) >= 2 or bar.value == 200                 # it moved while we looked
    res = run.collect()
    assert res[dash.model].shape == (2000, 3)
    dash.refresh()
    assert run.run_id not in dash.running.rows
    assert "2,000 rows" in dash.history.value
    rows = {r["worker"]: r for r in dash.memory.rows}
    assert rows[home]["rate"] > 0                             # rows/s of the worker that ran it
    assert all(len(rows[w]["history"]) > before[w] for w in before)   # sparkline points
    assert all(v > 0 for v in rows[home]["history"])


def test_gpu_section_reports_fake_gpus_without_inventing_readings(dash, monkeypatch):
    monkeypatch.setenv("NBTOOL_FAKE_GPUS", "2x16GB")
    dash.refresh()
    assert [(g["label"], g["total"], g["used"], g["utilization"], g["history"])
            for g in dash.memory.gpus] == [("gpu:0", 16 * 10**9, None, None, []),
                                           ("gpu:1", 16 * 10**9, None, None, [])]


def test_gpu_monitor_reads_nvml_or_reports_no_gpus_without_a_driver(monkeypatch):
    import pynvml

    monkeypatch.delenv("NBTOOL_FAKE_GPUS", raising=False)
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:      # no NVIDIA driver (this CPU machine): no GPUs, no error
        count = 0
    monitor = GpuMonitor()
    try:
        readings = monitor.read()
        assert len(readings) == count
        for r in readings:        # a GPU machine: real numbers from NVML
            assert r.memory_total > 0 and 0 <= r.memory_used <= r.memory_total
            assert r.utilization is None or 0 <= r.utilization <= 100
        assert len(monitor.read()) == count                   # NVML stays open between reads
    finally:
        monitor.close()


def test_reading_gpus_never_imports_tensorflow_in_the_kernel():
    code = ("import sys, nbtool.views.panel\n"
            "from nbtool.views.gpu_monitor import GpuMonitor\n"
            "print(len(GpuMonitor().read()), 'tensorflow' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "NBTOOL_FAKE_GPUS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False", out.stdout


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
