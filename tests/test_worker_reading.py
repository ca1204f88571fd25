"""Reading a chunk on a worker: only its rows of a file, and a piece ahead of its compute,
with the same answer as reading it whole."""

import threading
import time

import numpy as np
import pytest

from nbtool.worker.reading import overlapped, pieces, read_rows


def test_a_worker_reads_only_its_rows_of_an_array_npy_file_or_zarr_array(tmp_path):
    import zarr

    from nbtool.wire import NpyFile, ZarrRef

    x = np.arange(40, dtype="float32").reshape(10, 4)
    np.save(tmp_path / "x.npy", x)
    z = zarr.create_array(store=str(tmp_path / "x.zarr"), shape=x.shape, chunks=(3, 4),
                          dtype="float32")
    z[:] = x
    for data in (x, NpyFile(str(tmp_path / "x.npy")), ZarrRef(str(tmp_path / "x.zarr"))):
        rows = read_rows(data, 3, 7)
        assert isinstance(rows, np.ndarray) and np.array_equal(rows, x[3:7]), data
        assert np.array_equal(read_rows(data, 8, None), x[8:])


def test_the_next_piece_is_read_while_the_current_one_computes():
    events = []
    lock = threading.Lock()

    def note(what, k):
        with lock:
            events.append((what, k, threading.current_thread().name))

    def read(a, b):
        note("read-start", a)
        time.sleep(0.05)
        note("read-end", a)
        return np.arange(a, b)

    def compute(rows):
        note("compute-start", int(rows[0]))
        time.sleep(0.05)
        note("compute-end", int(rows[0]))
        return [rows * 10]

    bounds = pieces(0, 12, 4)
    out = overlapped(read, bounds, compute)
    assert np.array_equal(out[0], np.arange(12) * 10)
    order = [(w, k) for w, k, _ in events]
    for (a, _), (b, _) in zip(bounds, bounds[1:]):
        # piece b's read began before piece a's compute ended
        assert order.index(("read-start", b)) < order.index(("compute-end", a)), order
    readers = {t for w, _, t in events if w.startswith("read")}
    assert readers and all(t.startswith("nbtool-read-ahead") for t in readers)


def test_an_error_while_reading_ahead_is_raised_to_the_caller():
    def read(a, b):
        if a >= 4:
            raise OSError(f"rows {a}:{b} unreadable")
        return np.zeros(b - a)

    with pytest.raises(OSError, match="rows 4:8"):
        overlapped(read, pieces(0, 8, 4), lambda rows: [rows])


@pytest.fixture
def on_workers(engine):
    """Set NBTOOL_PREFETCH on the workers for one test, then restore it."""
    import os

    def setenv(value):
        if value is None:
            os.environ.pop("NBTOOL_PREFETCH", None)
        else:
            os.environ["NBTOOL_PREFETCH"] = value

    yield lambda value: engine.client.run(setenv, value)
    engine.client.run(setenv, None)


def test_files_read_ahead_or_whole_give_the_same_answer(engine, keras, unique, tmp_path,
                                                        on_workers):
    from PIL import Image

    from conftest import dense_model
    from nbtool.prediction.inputs import images

    model = dense_model(keras, 64, seed=21, n_in=48)
    x = np.random.default_rng(4).normal(size=(1500, 48)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    folder = tmp_path / "imgs"
    folder.mkdir()
    pixels = np.random.default_rng(5).integers(0, 256, (300, 4, 4, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"{i:03d}.png")
    img_model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                                  keras.layers.Dense(5)])
    engine.register(f"{unique}_npy", model, batch_size=16)     # pieces of 64 rows
    engine.register(f"{unique}_img", img_model, batch_size=8)  # pieces of 32 images
    results = {}
    for mode in ("1", "0"):
        on_workers(mode)
        results[mode] = (
            engine.predict(f"{unique}_npy", str(tmp_path / "x.npy"), chunk_size=700)[
                f"{unique}_npy"],
            engine.predict(f"{unique}_img", images(folder, size=(4, 4)), chunk_size=150)[
                f"{unique}_img"])
    assert np.array_equal(results["1"][0], results["0"][0])
    assert np.array_equal(results["1"][1], results["0"][1])
    assert np.abs(results["1"][0] - model.predict(x, verbose=0)).max() <= 1e-4
    expected = img_model.predict(pixels.astype("float32"), verbose=0)
    assert np.abs(results["1"][1] - expected).max() <= 1e-4
