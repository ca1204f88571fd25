"""Inputs: what as_source takes and refuses, the checks against a model, chunk sizing."""

import contextlib
import time

import numpy as np
import pytest

from nbtool.errors import InputMismatch
from nbtool.prediction.inputs import as_source, check_fits
from nbtool.catalog.registration import inspect_model


class DataFrameLike:
    """What a DataFrame (pandas, polars) shows nbtool: columns, their dtypes, __array__."""

    columns = ["age", "city", "score"]
    dtypes = [np.dtype("int64"), np.dtype("O"), np.dtype("float64")]

    def __array__(self, dtype=None, copy=None):
        return np.array([[31, "Oslo", 0.5], [42, "Lima", 0.7]], dtype=object)


def test_none_a_dict_a_generator_or_a_text_table_are_named_not_called_ragged():
    def rows():
        yield np.zeros(8)

    cases = [(None, r"got None\. Fix: check that the variable"),
             ({"x": np.zeros((2, 8)), "y": np.zeros(2)},
              r"a dict with keys \['x', 'y'\]\. Fix: .*x\['x'\]"),
             (rows(), r"a generator\. Fix: pass np\.stack\(list\(gen\)\) or an array"),
             (DataFrameLike(), r"a DataFrame with non-numeric columns \['city'\]\. Fix: select "
                        r"numeric columns or use df\.to_numpy\(dtype='float32'\)"),
             (np.array([1.0, None]), r"holding None among its values"),
             (np.array([[1.0, "a"]], dtype=object), r"holding text such as 'a'")]
    for x, msg in cases:
        with pytest.raises(InputMismatch, match=msg) as e:
            as_source(x)
        assert "ragged" not in str(e.value)
    with pytest.raises(InputMismatch, match="ragged"):   # the real ragged case still says so
        as_source([[1.0, 2.0], [3.0]])


def test_a_zarr_group_names_its_arrays_and_how_to_pick_one(tmp_path, engine, model_dir,
                                                          reference, unique):
    import zarr

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("x", shape=reference["x8"].shape, dtype="float32")[:] = reference["x8"]
    group.create_array("y", shape=(60,), dtype="int64")
    with pytest.raises(InputMismatch, match=r"a zarr group holding the arrays \['x', 'y'\]\. "
                                            r"Fix: pass one array, e.g\. group\['x'\]"):
        as_source(group)
    with pytest.raises(InputMismatch, match=r"zarr group at .*g\.zarr holding the arrays "
                                            r"\['x', 'y'\]\. Fix: .*g\.zarr/x'"):
        as_source(str(tmp_path / "g.zarr"))
    # The fixes work: the array object, and the array's path.
    name = f"{unique}_zg"
    engine.register(name, model_dir / "mlp.keras")
    for x in (group["x"], str(tmp_path / "g.zarr" / "x")):
        assert np.abs(engine.predict(name, x)[name] - reference["mlp"]).max() <= 1e-5


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


def test_an_input_error_names_your_array_never_the_shared_file(engine, model_dir, reference,
                                                              unique):
    name = f"{unique}_mlp"
    engine.register(name, model_dir / "mlp.keras")
    with pytest.raises(InputMismatch) as e:
        engine.predict(name, reference["img"])
    msg = str(e.value)
    assert "from your array of shape (60, 8, 8, 1) and dtype float32" in msg
    assert "/dev/shm" not in msg and str(engine.work_dir) not in msg and ".npy" not in msg


@contextlib.contextmanager
def every_worker_thread_held(client):
    """Every worker thread busy with a task that waits on an event until the block ends.

    A task submitted inside the block waits in its worker's queue, so cancelling it there
    means it never starts. Why: a cancelled task that has started runs to its end (a
    thread cannot be stopped), and one chunk sized to a quarter of a worker's memory keeps
    that worker's only thread busy for about a minute, which the next test on that worker
    waited out (47 s of test_a_zarr_group_names_its_arrays_and_how_to_pick_one).
    """
    from distributed import Event

    release = Event(client=client)
    prefix = f"hold-{release.name}"
    threads = {addr: w["nthreads"] for addr, w in
               client.scheduler_info(n_workers=-1)["workers"].items()}
    holds = [client.submit(release.wait, key=f"{prefix}-{addr}-{i}", workers=[addr],
                           allow_other_workers=False, pure=False)
             for addr, n in threads.items() for i in range(n)]

    def holding() -> bool:   # each thread runs a hold (not a task left by an earlier test)
        running = client.run(lambda dask_worker: sum(
            str(ts.key).startswith(prefix) for ts in dask_worker.state.executing))
        return all(running.get(addr) == n for addr, n in threads.items())

    try:
        wait_until(holding, "every worker thread to be held")
        yield
    finally:
        release.set()
        client.gather(holds)


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition()`` until it is true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {timeout:.0f}s"
        time.sleep(0.05)


#: A worker's states for a task whose function has started (a cancelled one included).
STARTED = ("executing", "long-running", "cancelled", "resumed")


def queued_chunks_of_run(client, run_id: str) -> dict:
    """``{key: state}`` of the tasks of the run ``run_id`` that the workers hold; fails if
    any of them has started."""
    suffix = f"-{run_id}"
    found = client.run(lambda dask_worker: {str(k): ts.state for k, ts in
                                            dask_worker.state.tasks.items()
                                            if str(k).endswith(suffix)})
    held = {k: state for by_key in found.values() for k, state in by_key.items()}
    started = {k: state for k, state in held.items() if state in STARTED}
    assert not started, f"chunks of the run {run_id} started: {started}"
    return held


def test_a_chunk_that_does_not_fit_a_worker_is_refused(engine, model_dir, unique, tmp_path):
    name = f"{unique}_big"
    engine.register(name, model_dir / "mlp.keras")
    # A memory-mapped file: nothing is read, so the size can be far beyond the test's RAM.
    big = np.lib.format.open_memmap(tmp_path / "huge.npy", mode="w+", dtype="float32",
                                    shape=(400_000_000, 8))
    del big
    with pytest.raises(InputMismatch, match=r"chunks that fit a worker's memory.*chunk_size="):
        engine.predict(name, str(tmp_path / "huge.npy"), chunk_size=300_000_000)
    limit = min(w["memory_limit"] for w in engine.client.scheduler_info(
        n_workers=-1)["workers"].values())
    # The run is really submitted, but none of its chunks (millions of rows each) may start.
    with every_worker_thread_held(engine.client):
        run = engine.submit(name, str(tmp_path / "huge.npy"))   # a default chunk shrinks
        assert run.futures and run.chunk_size * 32 <= limit // 4   # to fit
        # Cancelled once its chunks are queued on the worker: the scheduler's message that
        # drops them follows the one that sent them, so once they are gone none can come.
        wait_until(lambda: queued_chunks_of_run(engine.client, run.run_id),
                   "the run's chunks to reach their worker")
        run.cancel()
        wait_until(lambda: not queued_chunks_of_run(engine.client, run.run_id),
                   "the worker to drop the cancelled run's chunks")
    # Nothing of the run ran or is left to run: the next test finds the workers idle.
    assert not queued_chunks_of_run(engine.client, run.run_id)
