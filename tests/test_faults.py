"""Faults tried on purpose: each ends with a complete, correct result or a clear error, and
nothing already finished is lost."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from conftest import dense_model

pytestmark = pytest.mark.slow


def test_a_worker_killed_mid_run_is_replaced_and_the_result_is_complete(engine, keras,
                                                                        tmp_path, unique):
    model = dense_model(keras, 4096, seed=21, n_in=256)
    name = f"{unique}_kill"
    engine.register(name, model, device="cpu:1")
    x = np.random.default_rng(5).normal(size=(30_000, 256)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    engine.load(name)
    victim = engine.status()["cpu1"].pid
    run = engine.submit(name, str(tmp_path / "x.npy"), chunk_size=500)
    deadline = time.monotonic() + 60
    while run.progress()[name][0] < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    done_before_kill = run.progress()[name][0]
    assert 5 <= done_before_kill < 60, "the run finished before the kill: make it longer"
    os.kill(victim, signal.SIGKILL)
    res = run.collect()
    assert res.ok, res.errors
    assert np.abs(res[name] - model.predict(x, verbose=0)).max() <= 1e-4
    # The Nanny restarted the worker; the model loaded again on demand where the rest ran.
    engine.pool.wait_for(["cpu1"])
    after = engine.status()
    assert after["cpu1"].pid != victim
    assert sum(s.state_of(name).loads for s in after.values()) >= 1


def test_out_of_memory_halves_the_batch_and_remembers_it(engine, keras, model_dir, reference,
                                                         tmp_path, unique):
    keras.utils.set_random_seed(4)
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Lambda(lambda t: __import__("faults").oom_above(t, 8)),
        keras.layers.Dense(3)])
    model.save(tmp_path / "oom.keras")
    name = f"{unique}_oom"
    engine.register(name, tmp_path / "oom.keras", trusted=True, batch_size=64)
    res = engine.predict(name, reference["x8"], chunk_size=25)
    expected = model.predict(reference["x8"], batch_size=8, verbose=0)   # what fits here too
    assert res.ok and np.abs(res[name] - expected).max() <= 1e-5
    # Wherever its chunks ran (balanced placement: one worker or both, as the run went),
    # each worker halved 64 -> 32 -> 16 -> 8, the only batch that fits.
    ran = res.timings[name]["workers"]
    states = {w: engine.status()[w].models[name] for w in ran}
    assert ran and all(s.batch_size == 8 for s in states.values()), states
    assert all(s.oom_retries == 3 for s in states.values()), states
    assert res.timings[name]["batch_size"] == 8
    again = engine.predict(name, reference["x8"])
    assert again.ok and np.abs(again[name] - expected).max() <= 1e-5
    for w in again.timings[name]["workers"]:   # remembered: no worker runs out again
        assert engine.status()[w].models[name].oom_retries == states.get(w, states[ran[0]]) \
            .oom_retries


def test_out_of_memory_even_at_batch_one_is_a_clear_chunk_failure(engine, keras, reference,
                                                                  model_dir, tmp_path, unique):
    model = keras.Sequential([keras.Input((8,)),
                              keras.layers.Lambda(lambda t: __import__("faults").oom_above(t, 0)),
                              keras.layers.Dense(3)])
    model.save(tmp_path / "never.keras")
    name = f"{unique}_never"
    engine.register(name, tmp_path / "never.keras", trusted=True, batch_size=4)
    good = f"{unique}_good"
    engine.register(good, model_dir / "mlp.keras")
    res = engine.predict([name, good], reference["x8"], combine=None)
    assert not res.ok and all(e.model == name for e in res.errors)
    assert "out of memory even with batch size 1" in str(res.errors[0])
    assert np.abs(res[good] - reference["mlp"]).max() <= 1e-5      # the other model carried on


def test_a_model_that_fails_to_load_is_marked_failed_and_others_carry_on(engine, model_dir,
                                                                        reference, tmp_path,
                                                                        unique):
    import zipfile

    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(model_dir / "mlp.keras") as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, b"garbage" if item.filename.endswith(".h5")
                         else src.read(item.filename))
    broken, fine = f"{unique}_broken", f"{unique}_fine"
    engine.register(broken, bad, device="cpu:0")
    engine.register(fine, model_dir / "mlp.keras", device="cpu:0", replicas=1)
    res = engine.predict([broken, fine], reference["x8"], chunk_size=20, combine=None)
    assert {e.model for e in res.errors} == {broken} and len(res.errors) == 3
    assert np.abs(res[fine] - reference["mlp"]).max() <= 1e-5
    info = engine.status()["cpu0"].models[broken]
    assert info.state == "failed" and "OSError" in info.reason


CLIENT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import nbtool

    if __name__ == "__main__":
        model, x_path, store, out = sys.argv[1:5]
        eng = nbtool.start(n_workers=1, gpus="none", dashboard_address="127.0.0.1:0")
        eng.register("m", model)
        st = eng.status()
        with open(out + ".pids", "w") as f:
            json.dump([s.pid for s in st.values()], f)
        res = eng.predict("m", x_path, chunk_size=400, save=store)
        np.save(out, res["m"])
        print(json.dumps({"computed": res.timings["m"]["chunks"],
                          "resumed": res.timings["m"]["resumed_chunks"]}))
        eng.close()
""")


def test_a_kernel_killed_mid_run_recomputes_at_most_what_was_in_flight(keras, tmp_path):
    model = dense_model(keras, 4096, seed=31, n_in=256)
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(6).normal(size=(40_000, 256)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "client.py").write_text(CLIENT)
    store, out = tmp_path / "p.zarr", tmp_path / "out.npy"
    cmd = [sys.executable, str(tmp_path / "client.py"), str(tmp_path / "m.keras"),
           str(tmp_path / "x.npy"), str(store), str(out)]
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    done = store / "done" / "m"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if done.exists() and len(os.listdir(done)) >= 10:
            break
        assert first.poll() is None, "the first run ended before it could be killed"
        time.sleep(0.02)
    # The kernel dies, and its workers with it: the whole process tree is killed, but for
    # multiprocessing's resource tracker, which then unlinks the semaphores the dead held
    # (killed too, it would leave them in /dev/shm until reboot).
    tree = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
    trackers = [p for p in tree if "resource_tracker" in " ".join(p.cmdline())]
    for p in tree:
        if p not in trackers:
            p.kill()
    psutil.wait_procs(tree, timeout=30)
    stored_at_kill = len([p for p in os.listdir(done) if p.isdigit()])
    assert 10 <= stored_at_kill < 100
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    facts = json.loads(second.stdout.strip().splitlines()[-1])
    assert facts["resumed"] >= stored_at_kill
    assert facts["computed"] + facts["resumed"] == 100
    assert facts["computed"] <= 100 - stored_at_kill
    assert np.abs(np.load(out) - model.predict(x, verbose=0)).max() <= 1e-4


PEAK = textwrap.dedent("""
    import json, sys
    import nbtool

    if __name__ == "__main__":
        x_path, a, b = sys.argv[1:4]
        eng = nbtool.start(n_workers=2, gpus="none", dashboard_address="127.0.0.1:0")
        eng.register("a", a); eng.register("b", b)
        # Outputs go to a result store, written by the workers: the client holds no rows.
        res = eng.predict(["a", "b"], x_path, chunk_size=10_000, save=x_path + ".zarr")
        assert res.ok and res["a"].shape[0] == res.n_rows
        eng.close()
        # VmHWM, not ru_maxrss: the latter survives exec and would report pytest's peak.
        hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
        print(json.dumps({"peak_kb": int(hwm.split()[1])}))
""")


def test_client_memory_does_not_grow_with_the_rows_of_a_npy_input(tmp_path, model_dir, keras):
    (tmp_path / "peak.py").write_text(PEAK)
    rng = np.random.default_rng(7)
    peaks = {}
    for rows in (20_000, 200_000):
        x = rng.normal(size=(rows, 8)).astype("float32")
        path = tmp_path / f"x{rows}.npy"
        np.save(path, x)
        out = subprocess.run([sys.executable, str(tmp_path / "peak.py"), str(path),
                              str(model_dir / "mlp.keras"), str(model_dir / "mlp2.keras")],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        peaks[rows] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kb"]
        if rows == 200_000:
            import nbtool

            ref = keras.saving.load_model(model_dir / "mlp.keras").predict(x, verbose=0)
            stored = nbtool.open_prediction(str(path) + ".zarr")
            assert np.abs(np.asarray(stored["a"]) - ref).max() <= 1e-5
    print("client peak RSS (kB):", peaks)
    assert peaks[200_000] <= 1.10 * peaks[20_000], peaks


def test_eight_models_under_a_quarter_budget_stay_bounded(engine, keras, unique):
    models = [dense_model(keras, 160_000, seed=40 + i) for i in range(8)]
    names = [f"{unique}_e{i}" for i in range(8)]
    for n, m in zip(names, models):
        engine.register(n, m, device="cpu:0")
    x = np.random.default_rng(8).normal(size=(64, 32)).astype("float32")
    refs = [m.predict(x, verbose=0) for m in models]
    size = engine.registry.get(names[0]).size_bytes
    old = engine.workers["cpu0"].budget

    def cycle(budget):
        engine.unload(hard=True)            # a fresh worker process for each measurement
        engine.set_memory_budget(budget)
        idle = engine.status()["cpu0"].idle_memory
        peak_rss, peak_resident = 0, 0
        for _ in range(2):
            for n, ref in zip(names, refs):
                res = engine.predict(n, x)
                assert np.abs(res[n] - ref).max() <= 1e-4
                st = engine.status()["cpu0"]
                peak_rss = max(peak_rss, st.rss - idle)
                peak_resident = max(peak_resident, st.resident_bytes)
        return peak_rss, peak_resident, engine.status()["cpu0"].evictions

    for n in names:   # each model's runtime chosen once and remembered: both cycles
        engine.predict(n, x)   # below load the same artifacts, in fresh worker processes
    try:
        quarter = 8 * size // 4
        rss_bounded, resident, evictions = cycle(quarter)
        rss_free, resident_free, _ = cycle(100 * size)
    finally:
        engine.set_memory_budget(old)
    print(f"8 x {size / 1e6:.1f} MB, budget {quarter / 1e6:.1f} MB: peak RSS growth "
          f"{rss_bounded / 1e6:.0f} MB (no budget: {rss_free / 1e6:.0f} MB), resident "
          f"{resident / 1e6:.0f} MB, {evictions} evictions")
    assert resident <= quarter + size and evictions >= 12
    assert resident_free >= 0.99 * 8 * size          # all eight resident without a budget
    assert rss_bounded < 0.75 * rss_free       # the budget bounds real memory too


def test_a_hard_unload_never_recomputes_a_finished_run(engine, model_dir, unique):
    """Before: the progress loop (what %%infer waits with) called distributed.wait with a
    timeout, and each timeout left the run's futures in a reference cycle; until the
    garbage collector ran, the scheduler kept every task of the finished run as wanted,
    and `%nbtool unload --hard` made it compute them all again on the restarted workers,
    whose input file was gone (FileNotFoundError tracebacks in the worker logs)."""
    import gc
    import io

    from nbtool.views.progress import progress_view, wait_with_progress

    name = f"{unique}_hu"
    engine.register(name, model_dir / "mlp.keras", device="cpu:1")
    x = np.random.default_rng(3).normal(size=(20_000, 8)).astype("float32")

    def tasks_of(run_id):
        return engine.client.run_on_scheduler(lambda dask_scheduler: sorted(
            str(k) for k in dask_scheduler.tasks if str(k).endswith(run_id)))

    gc.disable()   # as between two notebook cells: nothing promises the collector ran
    try:
        run = engine.submit(name, x, chunk_size=500)    # cold: the loop waits many times
        res = wait_with_progress(run, progress_view(run.progress(), widgets=False,
                                                      stream=io.StringIO()))
        assert res.ok and res.timings[name]["chunks"] == 40
        assert tasks_of(run.run_id) == []               # collected: nothing of it is held
        input_file = os.path.basename(run.source.path)
        assert engine.unload(name, hard=True) == ["cpu1"]
        assert tasks_of(run.run_id) == []               # nothing of it was recomputed
    finally:
        gc.enable()
    logs = engine.client.get_worker_logs()
    assert not [line for lines in logs.values() for _, line in lines if input_file in line]
