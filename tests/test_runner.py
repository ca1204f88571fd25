"""runner.py: the checks that run before anything is scheduled, on real model files."""

import numpy as np
import pytest

from nbtool.errors import InputMismatch
from nbtool.registry import inspect_model
from nbtool.runner import check_fits
from nbtool.sources import as_source


def test_a_1d_input_gets_the_reshape_that_gives_whole_rows(model_dir, reference):
    spec = inspect_model("mlp", model_dir / "mlp.keras")      # rows of shape (8,)
    row = reference["x8"][0]
    with pytest.raises(InputMismatch, match=r"Fix: for one row, use x\.reshape\(1, -1\) "
                                            r"\(or x\[None\]\)") as e:
        check_fits(spec, as_source(row))
    assert "len(x)" not in str(e.value)      # x.reshape(8, 8) would fail on 8 values
    check_fits(spec, as_source(row.reshape(1, -1)))     # the fix fits
    flat = reference["x8"][:3].reshape(-1)
    with pytest.raises(InputMismatch, match=r"for 3 rows of 8 values, use x\.reshape\(-1, 8\)"):
        check_fits(spec, as_source(flat))
    assert np.array_equal(flat.reshape(-1, 8), reference["x8"][:3])
    with pytest.raises(InputMismatch, match=r"has 10 values, not a whole number of rows of 8"):
        check_fits(spec, as_source(flat[:10]))
    cnn = inspect_model("cnn", model_dir / "cnn.keras")       # rows of shape (8, 8, 1)
    with pytest.raises(InputMismatch, match=r"for one row, use x\.reshape\(1, 8, 8, 1\)"):
        check_fits(cnn, as_source(reference["img"][0].reshape(-1)))
    with pytest.raises(InputMismatch, match=r"e\.g\. x\.reshape\(len\(x\), 8, 8, 1\)"):
        check_fits(cnn, as_source(reference["img"].reshape(60, 64)))


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
