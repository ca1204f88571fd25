"""prediction/run.py: one prediction run on the cluster: cancelled between batches, and heard of
when it ends by whoever subscribed."""

import numpy as np


def test_a_cancelled_run_frees_its_worker_between_batches_not_after_its_chunk(
        engine, model_dir, unique):
    """Before: Dask cannot stop a started task, so a cancelled run's chunk ran to its end
    (~50 s for a default chunk of a big .npy) and the next run on that worker waited
    without a word. Now the chunk stops at its next batch."""
    import time

    name = f"{unique}_long"
    engine.register(name, model_dir / "mlp.keras", batch_size=8)
    probe = np.zeros((4000, 8), "float32")
    engine.predict(name, probe)                                   # loaded, and timed
    t0 = time.perf_counter()
    engine.predict(name, probe, chunk_size=4000)
    rows_per_s = len(probe) / (time.perf_counter() - t0)
    rows = int(rows_per_s * 40)                                   # one chunk of ~40 s
    run = engine.submit(name, np.zeros((rows, 8), "float32"), chunk_size=rows)
    deadline = time.monotonic() + 30
    while not any(engine.client.processing().values()):          # the chunk has started
        assert time.monotonic() < deadline, "the chunk never started"
        time.sleep(0.05)
    time.sleep(0.5)
    cancelled_at = time.perf_counter()
    run.cancel()                     # waits (at most 5 s) for the workers to drop the task
    freed = time.perf_counter() - cancelled_at
    busy = engine.client.run(lambda dask_worker: sum(
        1 for ts in dask_worker.state.tasks.values() if ts.state in ("executing", "cancelled")))
    assert not any(busy.values()) and freed < 5, (freed, busy)
    assert engine.predict(name, probe[:10])[name].shape == (10, 3)   # the worker is free


def test_a_run_tells_its_subscribers_once_when_collected_and_never_when_cancelled(
        engine, model_dir, reference, unique):
    """The run knows nothing of the engine: whoever wants to hear of its end subscribes."""
    from nbtool.prediction.inputs import as_source
    from nbtool.prediction.run import PredictionRun

    name = f"{unique}_m"
    spec = engine.register(name, model_dir / "mlp.keras")
    placements = [(spec, engine.placement[name])]
    heard = []
    run = PredictionRun(engine.pool, placements, as_source(reference["x8"]), 20, combine=None)
    run.add_done_callback(heard.append)
    run.submit()
    res = run.collect()
    assert heard == [res] and run.collect() is res and heard == [res]     # once
    assert np.abs(res[name] - reference["mlp"]).max() <= 1e-5 and res.timings[name]["chunks"] == 3
    late = []
    run.add_done_callback(late.append)
    assert late == [res]                                  # subscribed after: told at once
    stopped = PredictionRun(engine.pool, placements, as_source(reference["x8"]), 20)
    stopped.add_done_callback(heard.append)
    stopped.submit()
    stopped.cancel()
    assert heard == [res]                                 # a cancelled run has no result
