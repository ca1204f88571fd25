"""predict(..., cache=True): outputs memoised on disk, read back instead of computed."""

import os
import shutil
import stat

import numpy as np
import pytest

import nbtool
from nbtool.prediction.output_memo import OutputCache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A cache folder of this test's own (the memo is kept by the kernel: its
    environment is enough), so no other test's entries answer."""
    d = tmp_path / "nbtool-cache"
    monkeypatch.setenv("NBTOOL_CACHE_DIR", str(d))
    return d / "outputs"


def test_a_rerun_sends_no_task_and_returns_the_same_outputs(engine, two, reference,
                                                            cache_dir, tmp_path):
    a, b = two
    x = reference["x8"]
    first = engine.predict([a, b], x, chunk_size=20, cache=True)
    assert first.timings[a]["chunks"] == 3 and first.timings[a]["cached_chunks"] == 0
    assert np.abs(first[a] - reference["mlp"]).max() <= 1e-5
    assert stat.S_IMODE(os.stat(cache_dir).st_mode) == 0o700
    assert nbtool.cache_info()["entries"] == 6
    hits = nbtool.cache_info()["hits"]
    run = engine.submit([a, b], x.copy(), chunk_size=20, cache=True)   # equal rows, new array
    assert run.futures == []                                            # nothing sent
    again = run.collect()
    assert nbtool.cache_info()["hits"] == hits + 6
    for m in (a, b):
        assert again.timings[m]["cached_chunks"] == 3 and again.timings[m]["chunks"] == 0
        assert np.array_equal(again[m], first[m])
    assert np.array_equal(again.combined, first.combined)
    # A .npy file is keyed by its rows too: the same rows answer from the same entries.
    np.save(tmp_path / "x.npy", x)
    from_file = engine.predict([a], str(tmp_path / "x.npy"), chunk_size=20, cache=True)
    assert from_file.timings[a]["cached_chunks"] == 3
    assert np.array_equal(from_file[a], first[a])
    # Without cache=, nothing is read (and everything computed).
    assert engine.predict([a], x, chunk_size=20).timings[a]["chunks"] == 3


def test_a_changed_chunk_alone_is_computed_again(engine, two, reference, cache_dir):
    a, _ = two
    x = reference["x8"].copy()
    engine.predict([a], x, chunk_size=20, cache=True)
    x[25] += 1.0                                                 # a row of chunk 1
    res = engine.predict([a], x, chunk_size=20, cache=True)
    assert res.timings[a]["chunks"] == 1 and res.timings[a]["cached_chunks"] == 2
    fresh = engine.predict([a], x, chunk_size=20)
    assert np.abs(res[a] - fresh[a]).max() <= 1e-6
    assert not np.allclose(res[a][25], reference["mlp"][25])


def test_a_resaved_model_file_is_computed_again(engine, model_dir, reference, cache_dir,
                                                tmp_path, unique):
    name, path = f"{unique}_m", tmp_path / "m.keras"
    shutil.copy(model_dir / "mlp.keras", path)
    engine.register(name, path)
    engine.predict([name], reference["x8"], chunk_size=20, cache=True)
    shutil.copy(model_dir / "mlp2.keras", path)                  # re-saved in place
    with pytest.warns(UserWarning, match="changed since it was registered"):
        res = engine.predict([name], reference["x8"], chunk_size=20, cache=True)
    assert res.timings[name]["chunks"] == 3 and res.timings[name]["cached_chunks"] == 0
    assert np.abs(res[name] - reference["mlp2"]).max() <= 1e-5     # never the old outputs


def test_a_damaged_entry_is_computed_again(engine, two, reference, cache_dir):
    a, _ = two
    engine.predict([a], reference["x8"], chunk_size=20, cache=True)
    entries = sorted(cache_dir.glob("*.npz"))
    assert len(entries) == 3
    entries[0].write_bytes(entries[0].read_bytes()[:50])          # truncated
    entries[1].write_bytes(b"not a zip at all")                   # garbage
    res = engine.predict([a], reference["x8"], chunk_size=20, cache=True)
    assert res.timings[a]["chunks"] == 2 and res.timings[a]["cached_chunks"] == 1
    assert np.abs(res[a] - reference["mlp"]).max() <= 1e-5
    assert engine.predict([a], reference["x8"], chunk_size=20,
                          cache=True).timings[a]["cached_chunks"] == 3   # rewritten whole


def test_the_bound_evicts_the_least_recently_used(tmp_path):
    one = [np.zeros(250, "float32")]                              # ~1.2 kB on disk each
    a, b, c, d = (k * 40 for k in "abcd")                         # keys: 40 hex digits
    cache = OutputCache(tmp_path, limit=4000)
    assert cache.usable()
    for key in (a, b, c):
        cache.put(key, one)
    assert cache.get(a, rows=250, n_outputs=1) is not None       # 'a' used: 'b' is oldest
    cache.put(d, one)
    assert cache.evict() == 1 and sorted(cache.entries()) == [a, c, d]
    assert cache.get(a, rows=250, n_outputs=2) is None            # not what was asked: gone
    assert a not in cache.entries()


def test_files_the_cache_did_not_write_are_neither_counted_nor_deleted(cache_dir):
    """A foreign ``.npz`` (the user's own, in the folder by mistake) and other files in the
    cache folder are not entries: cache_info() does not count them, clear_cache() leaves
    them (before: both were counted, and the .npz deleted)."""
    cache = OutputCache()
    assert cache.usable()                                       # makes the 0700 folder
    cache.put("e" * 40, [np.zeros(10, "float32")])
    foreign = {name: cache_dir / name for name in ("mine.npz", "notes.txt", "F" * 40 + ".npz")}
    for path in foreign.values():
        np.savez(path, x=np.ones(3)) if path.suffix == ".npz" else path.write_text("mine")
    assert nbtool.cache_info()["entries"] == 1
    assert nbtool.clear_cache()["entries"] == 1
    assert all(p.exists() for p in foreign.values())
    assert np.load(foreign["mine.npz"])["x"].tolist() == [1.0, 1.0, 1.0]


def test_cache_info_and_clear_cache(engine, two, reference, cache_dir, monkeypatch):
    a, _ = two
    monkeypatch.setenv("NBTOOL_OUTPUT_CACHE_SIZE", "1MB")
    engine.predict([a], reference["x8"], chunk_size=20, cache=True)
    info = nbtool.cache_info()
    assert info["folder"] == str(cache_dir) and info["limit"] == 1_000_000
    assert info["entries"] == 3 and info["bytes"] > 0
    other = cache_dir.parent / "runtimes.json"                    # the rest of the cache
    other.write_text("{}")
    assert nbtool.clear_cache() == {"entries": 3, "bytes": info["bytes"]}
    assert nbtool.cache_info()["entries"] == 0 and other.exists()
    assert engine.predict([a], reference["x8"], chunk_size=20,
                          cache=True).timings[a]["chunks"] == 3


def test_a_zarr_save_and_a_dask_input_are_refused_clearly(engine, two, reference, cache_dir,
                                                          tmp_path):
    with pytest.raises(ValueError, match="cache=True with save=.*do not combine"):
        engine.predict(list(two), reference["x8"], save=str(tmp_path / "p.zarr"), cache=True)
    assert not (tmp_path / "p.zarr").exists()
    import dask.array as da

    x = da.from_array(reference["x8"], chunks=20)
    for _ in range(2):
        with pytest.warns(UserWarning, match="a Dask array's outputs are not cached"):
            res = engine.predict([two[0]], x, cache=True)
        assert res.timings[two[0]]["chunks"] == 3
        assert np.abs(res[two[0]] - reference["mlp"]).max() <= 1e-5


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the folder away")
def test_a_folder_of_another_user_is_not_read(engine, two, reference, cache_dir):
    a, _ = two
    engine.predict([a], reference["x8"], chunk_size=20, cache=True)
    os.chown(cache_dir, 65534, 65534)
    try:
        with pytest.warns(UserWarning, match="not a folder of yours alone"):
            res = engine.predict([a], reference["x8"], chunk_size=20, cache=True)
        assert res.timings[a]["chunks"] == 3
    finally:
        os.chown(cache_dir, 0, 0)


def test_infer_cache_flag_and_config(engine, two, reference, cache_dir):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbtool")
    a, b = two
    ip.user_ns["x8"] = reference["x8"]
    first = ip.run_cell_magic("infer", f"{a} {b} --chunk-size 20 --cache", "x8")
    assert first.timings[a]["chunks"] == 3
    again = ip.run_cell_magic("infer", f"{a} {b} --chunk-size 20 --cache", "x8")
    assert again.timings[a]["cached_chunks"] == 3 and again.timings[b]["chunks"] == 0
    assert np.array_equal(again.combined, first.combined)
    plain = ip.run_cell_magic("infer", f"{a} --chunk-size 20", "x8")
    assert plain.timings[a]["cached_chunks"] == 0
    ip.run_line_magic("config", "Nbtool.cache = True")
    try:
        by_config = ip.run_cell_magic("infer", f"{a} --chunk-size 20", "x8")
    finally:
        ip.run_line_magic("config", "Nbtool.cache = False")
    assert by_config.timings[a]["cached_chunks"] == 3
