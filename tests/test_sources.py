"""Inputs that live on disk: workers read their own slices; the client reads metadata."""

import contextlib
import time

import numpy as np
import pytest

from nbtool.errors import InputMismatch, NbtoolError
from nbtool.wire import ImageFiles, NpyFile, ZarrRef
from nbtool.sources import (ImageFolderSource, ZarrSource,
                            as_source, images)


@pytest.fixture
def zarr_input(tmp_path, reference):
    import zarr

    z = zarr.create_array(store=str(tmp_path / "x.zarr"), shape=reference["x8"].shape,
                          chunks=(16, 8), dtype="float32")
    z[:] = reference["x8"]
    return tmp_path / "x.zarr"


@pytest.fixture
def image_folder(tmp_path, reference):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(12, 8, 8), dtype=np.uint8)
    for i, p in enumerate(pixels):
        # Different sizes on disk: the workers resize every image to 8x8.
        Image.fromarray(p).resize((16, 16) if i % 2 else (8, 8), Image.NEAREST).save(
            folder / f"img{i:02d}.png")
    return folder, pixels


def test_zarr_path_and_object_are_read_by_the_workers(engine, model_dir, reference, unique,
                                                      zarr_input):
    import zarr

    src = as_source(str(zarr_input))
    assert isinstance(src, ZarrSource) and isinstance(src.ref, ZarrRef)
    args = src.chunk_args(None, [], 10)
    assert all(isinstance(a[0], ZarrRef) for a in args)      # references, never rows
    name = f"{unique}_z"
    engine.register(name, model_dir / "mlp.keras")
    for x in (str(zarr_input), zarr.open_array(str(zarr_input), mode="r")):
        res = engine.predict(name, x, chunk_size=16)
        assert np.abs(res[name] - reference["mlp"]).max() <= 1e-5


def test_an_image_folder_is_decoded_and_resized_on_the_workers(engine, keras, image_folder,
                                                               unique):
    folder, pixels = image_folder
    src = as_source(str(folder))
    assert isinstance(src, ImageFolderSource) and src.row_shape == (8, 8, 3)
    # Each task carries only its own file names.
    args = src.chunk_args(None, [], 5)
    assert [len(a[0].files) for a in args] == [5, 5, 2]
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    name = f"{unique}_img"
    engine.register(name, model)
    res = engine.predict(name, images(folder, size=(8, 8), color="L", scale=1 / 255),
                         chunk_size=5)
    from PIL import Image

    # What the workers should have read: each file decoded and resized to 8x8 by PIL.
    decoded = np.stack([np.asarray(Image.open(f).convert("L").resize((8, 8), Image.BILINEAR),
                                   dtype="float32") for f in sorted(folder.glob("*.png"))])
    assert np.array_equal(decoded[0::2], pixels[0::2].astype("float32"))  # 8x8 files as-is
    expected = model.predict(decoded[..., None] / 255, verbose=0)
    assert np.abs(res[name] - expected).max() <= 1e-4


def test_bad_sources_say_what_is_wrong(tmp_path, image_folder):
    folder, _ = image_folder
    (folder / "broken.png").write_bytes(b"not a png")
    ref = images(folder, size=(8, 8)).ref
    from nbtool.sources import read_rows

    with pytest.raises(NbtoolError, match=r"broken.png: cannot decode it"):
        read_rows(ref, 0, len(ref.files))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputMismatch, match="image files"):
        as_source(str(empty))
    (tmp_path / "bad.zarr").mkdir()
    with pytest.raises(NbtoolError, match="cannot open it as a zarr array"):
        as_source(str(tmp_path / "bad.zarr"))
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), "float32"))
    with pytest.raises(InputMismatch, match="at least one row"):
        as_source(str(tmp_path / "empty.npy"))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(NbtoolError, match="cannot read it as a .npy"):
        as_source(str(tmp_path / "junk.npy"))


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


def test_npy_rows_are_read_by_reference():
    src_ref = NpyFile("x.npy")
    assert ImageFiles(("a.png",), (2, 2)).color == "RGB" and src_ref.path == "x.npy"


class _Table:
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
             (_Table(), r"a DataFrame with non-numeric columns \['city'\]\. Fix: select "
                        r"numeric columns or use df\.to_numpy\(dtype='float32'\)"),
             (np.array([1.0, None]), r"holding None among its values"),
             (np.array([[1.0, "a"]], dtype=object), r"holding text such as 'a'")]
    for x, msg in cases:
        with pytest.raises(InputMismatch, match=msg) as e:
            as_source(x)
        assert "ragged" not in str(e.value)
    with pytest.raises(InputMismatch, match="ragged"):   # the real ragged case still says so
        as_source([[1.0, 2.0], [3.0]])


def test_an_input_error_names_your_array_never_the_shared_file(engine, model_dir, reference,
                                                              unique):
    name = f"{unique}_mlp"
    engine.register(name, model_dir / "mlp.keras")
    with pytest.raises(InputMismatch) as e:
        engine.predict(name, reference["img"])
    msg = str(e.value)
    assert "from your array of shape (60, 8, 8, 1) and dtype float32" in msg
    assert "/dev/shm" not in msg and str(engine.work_dir) not in msg and ".npy" not in msg


def test_a_zarr_group_names_its_arrays_and_how_to_pick_one(tmp_path, zarr_input, engine,
                                                          model_dir, reference, unique):
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


def test_shared_memory_folder_is_private_and_never_one_another_user_planted():
    # In a child process: its /dev/shm/nbtool-<pid> is new (this process's engine may
    # already have made its own).
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os, shutil, tempfile
        from pathlib import Path
        from nbtool.sources import shared_folder
        fallback = Path(tempfile.mkdtemp())
        mine = Path(f"/dev/shm/nbtool-{os.getpid()}")
        try:
            got = shared_folder(fallback, 10)
            print("own", got == mine and (os.stat(mine).st_mode & 0o777) == 0o700)
            shutil.rmtree(mine)
            target = fallback / "theirs"
            target.mkdir()
            mine.symlink_to(target)                      # planted first: a symlink
            print("symlink", shared_folder(fallback, 10) == fallback)
            mine.unlink()
            mine.mkdir()
            os.chmod(mine, 0o777)                        # open to others
            print("open", shared_folder(fallback, 10) == fallback)
            os.chmod(mine, 0o700)
            os.chown(mine, 65534, 65534)                 # another user's
            print("foreign", shared_folder(fallback, 10) == fallback)
        finally:
            if mine.is_symlink():
                mine.unlink()
            elif mine.exists():
                shutil.rmtree(mine)
            shutil.rmtree(fallback)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["own", "True", "symlink", "True", "open", "True",
                                  "foreign", "True"], out.stdout
