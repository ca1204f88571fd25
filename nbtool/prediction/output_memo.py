"""The on-disk memo of prediction outputs: ``predict(..., cache=True)``.

Each (model, chunk) output is one ``.npz`` file under ``<nbtool cache>/outputs/`` (the
machine's cache folder: ``NBTOOL_CACHE_DIR``, else ``~/.cache/nbtool``), named by a key
made of:

- the model: the sha256 of its file's bytes (a re-saved file is a new model, even under
  the same size and modification time; a copy elsewhere is the same one), format, precision, preprocessing (the function's pickled bytes and
  code), the runtime as registered (``"auto"`` may choose runtimes whose outputs differ by
  up to 1e-4: the key is the registered choice, so a rerun returns what the first run's
  choice computed), its input shape and dtype, and the Keras backend of its workers;
- the chunk's rows: a blake2b hash of the rows' bytes (with their row shape and dtype)
  for an in-memory array and for a ``.npy`` file (memory-mapped: the kernel reads the
  rows once, which a hit saves many times over); for a zarr array or a folder of images,
  the source's own fingerprint (its files' sizes and modification times) with the
  chunk's bounds (so any change there recomputes every chunk of it). A content key needs
  no bounds: the same rows give the same outputs wherever they sit. A Dask array is not
  cached (a warning says so): its rows exist only once computed, and its name (a token
  of its graph) does not change when files it reads change.

A run looks every chunk up before anything is sent (:class:`RunCache`): the chunks found
are not submitted, as the chunks a result store holds are not; the others are written
here, from the kernel, as their outputs arrive (a temporary file, then a rename: an entry
is whole or absent). An entry that cannot be read back whole (truncated, corrupted, of
the wrong shape) is removed and recomputed. The folder is bounded (``NBTOOL_OUTPUT_CACHE_SIZE``,
default 2 GB): the least recently used entries go first (a read marks an entry used).
The folder is made 0700; one owned by another user, or writable by others, is not used.

Example:
    >>> import tempfile
    >>> cache = OutputCache(tempfile.mkdtemp(), limit=10_000)
    >>> cache.put("k1", [np.ones((2, 3), "float32")])
    >>> cache.get("k1", rows=2, n_outputs=1)[0].tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    >>> cache.get("k2", rows=2, n_outputs=1) is None
    True
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
import re
import stat
import time

import numpy as np

from nbtool._util import as_bytes, env_setting, warn_user

#: The default bound on the folder's size (``NBTOOL_OUTPUT_CACHE_SIZE`` sets another).
DEFAULT_LIMIT = 2_000_000_000
SUFFIX = ".npz"
#: An entry's file name: the key (blake2b, 20 bytes, as hex) and the suffix.
ENTRY_NAME = re.compile(r"[0-9a-f]{40}\.npz")
#: Lookups of this process: what :func:`cache_info` reports.
STATS = {"hits": 0, "misses": 0}


def cache_folder() -> Path:
    """Where the outputs are kept: ``outputs/`` in the machine's nbtool cache folder.

    Example:
        >>> cache_folder().name
        'outputs'
    """
    from nbtool.worker import machine_folder

    return Path(machine_folder()) / "outputs"


def cache_limit() -> int:
    """The bound on the folder's size in bytes: ``NBTOOL_OUTPUT_CACHE_SIZE`` or 2 GB.

    Example:
        >>> cache_limit() > 0
        True
    """
    return env_setting("NBTOOL_OUTPUT_CACHE_SIZE", as_bytes) or DEFAULT_LIMIT


class OutputCache:
    """One folder of entries: each a list of arrays under a key, bounded by size (LRU).

    Example:
        >>> import tempfile
        >>> cache = OutputCache(tempfile.mkdtemp(), limit=1000)
        >>> a, b = "a" * 40, "b" * 40                 # keys: 40 hex digits
        >>> cache.put(a, [np.zeros(100, "float32")]); cache.put(b, [np.zeros(100, "float32")])
        >>> cache.evict(), sorted(cache.entries()) == [b]   # a was the least recently used
        (1, True)
    """

    def __init__(self, folder: str | os.PathLike | None = None, limit: int | None = None):
        self.folder = Path(folder) if folder is not None else cache_folder()
        self.limit = limit if limit is not None else cache_limit()

    def usable(self) -> bool:
        """Make the folder (0700) if missing; False, with a warning, if it is not ours or
        others may write it (its entries could then be anyone's outputs).

        Example:
            >>> import tempfile; OutputCache(tempfile.mkdtemp()).usable()
            True
        """
        from nbtool._util import private_folder
        from nbtool.errors import NotPrivate

        try:
            private_folder(self.folder)
        except NotPrivate as e:
            warn_user(f"the output cache is not a folder of yours alone: {e}. Its entries "
                      "are not read and everything is computed. Fix: set NBTOOL_CACHE_DIR "
                      "to a folder of your own.")
            return False
        return True

    def path(self, key: str) -> Path:
        return self.folder / (key + SUFFIX)

    def get(self, key: str, rows: int, n_outputs: int | None,
            specs: tuple | None = None) -> list[np.ndarray] | None:
        """The arrays under ``key`` if whole (``n_outputs`` arrays of ``rows`` rows, each
        of its ``specs``' row shape and dtype when known); else None. A damaged entry, or
        one not owned by this user, is removed (a damaged one) or ignored, never used.
        """
        p = self.path(key)
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            STATS["misses"] += 1
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                warn_user(f"output cache entry {p} is not a file of yours; ignored.")
                STATS["misses"] += 1
                return None
            with os.fdopen(fd, "rb", closefd=False) as f, \
                    np.load(f, allow_pickle=False) as z:
                arrays = [np.asarray(z[f"out{k}"]) for k in range(len(z.files))]
            ok = (n_outputs is None or len(arrays) == n_outputs) and arrays and \
                all(len(a) == rows for a in arrays) and (specs is None or all(
                    tuple(a.shape[1:]) == tuple(s) and a.dtype == np.dtype(d)
                    for a, (s, d) in zip(arrays, specs)))
            if not ok:
                raise ValueError("not the outputs expected")
        except Exception:   # truncated, not a zip, wrong arrays: recompute, drop it
            p.unlink(missing_ok=True)
            STATS["misses"] += 1
            return None
        finally:
            os.close(fd)
        touch(p)   # used now: the last to be evicted
        STATS["hits"] += 1
        return arrays

    def put(self, key: str, outputs: list[np.ndarray]) -> None:
        """Keep ``outputs`` under ``key``: written to a temporary file, then renamed, so an
        entry is whole or absent. An entry larger than the whole bound is not kept."""
        if sum(np.asarray(o).nbytes for o in outputs) > self.limit:
            return
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **{f"out{k}": np.asarray(o) for k, o in enumerate(outputs)})
            os.replace(tmp, self.path(key))
            touch(self.path(key))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            warn_user(f"could not write to the output cache {self.folder} ({e}); the "
                      "result is not affected. Fix: free disk space or clear_cache().")

    def entries(self) -> dict[str, os.stat_result]:
        """Key -> stat of each entry (temporary files and foreign ones left out)."""
        out = {}
        try:
            with os.scandir(self.folder) as it:
                for e in it:
                    # Only names nbtool writes (a key's 40 hex digits): a file someone
                    # else put here is neither counted nor ever deleted.
                    if ENTRY_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                        out[e.name[:-len(SUFFIX)]] = e.stat(follow_symlinks=False)
        except OSError:
            pass
        return out

    def evict(self) -> int:
        """Remove the least recently used entries until the folder fits its bound;
        returns how many went."""
        entries = sorted(self.entries().items(), key=lambda kv: kv[1].st_mtime_ns)
        total = sum(s.st_size for _, s in entries)
        gone = 0
        for key, s in entries:
            if total <= self.limit:
                break
            self.path(key).unlink(missing_ok=True)
            total -= s.st_size
            gone += 1
        return gone


def touch(path: Path) -> None:
    """Mark an entry used now, to the nanosecond (the file system's own clock ticks
    coarser: two writes in a row could tie).

    Example:
        >>> import tempfile; p = Path(tempfile.mkdtemp()) / "e"; _ = p.write_bytes(b"")
        >>> touch(p); p.stat().st_mtime_ns > 0
        True
    """
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:   # removed meanwhile (a clear_cache elsewhere): nothing to mark
        pass


def model_key(spec, backends: list[str]) -> str:
    """What of a model changes its outputs, hashed (see the module's text).

    Example:
        >>> from nbtool.wire import ModelSpec
        >>> spec = ModelSpec("m", "/m.keras", "keras", 3, "3-1", input_shape=(None, 8))
        >>> model_key(spec, ["tensorflow"]) == model_key(spec, ["jax"])
        False
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((spec.identity, spec.format, spec.precision, spec.runtime,
                   spec.input_shape, spec.input_dtype, spec.n_inputs,
                   sorted(set(backends)))).encode())
    if spec.preprocess is not None:
        import cloudpickle

        h.update(cloudpickle.dumps(spec.preprocess))
        code = getattr(spec.preprocess, "__code__", None)
        if code is not None:   # imported functions pickle by name: their code counts too
            h.update(code.co_code + repr(code.co_consts).encode())
    return h.hexdigest()


def chunk_keys(source, bounds: list[tuple[int, int]]) -> list[str] | None:
    """One key per chunk of ``source``: its rows' hash, or the source's fingerprint with
    the chunk's bounds where the rows live in files the kernel does not read; for several
    inputs, one key of all their rows' keys; None for a Dask array (not cached: see the
    module's text).

    Example:
        >>> from nbtool.prediction.sources import ArraySource
        >>> x = np.arange(12.0).reshape(6, 2)
        >>> a = chunk_keys(ArraySource(x), [(0, 3), (3, 6)])
        >>> x[4, 0] = -1; b = chunk_keys(ArraySource(x), [(0, 3), (3, 6)])
        >>> a[0] == b[0], a[1] == b[1]
        (True, False)
    """
    from nbtool.prediction.sources import DaskSource, NpySource, SeveralSource

    if isinstance(source, SeveralSource):   # several inputs: keys of all their rows
        parts = [chunk_keys(p, bounds) for p in source.parts.values()]
        if any(p is None for p in parts):
            return None
        return [hashlib.blake2b("|".join(ks).encode(), digest_size=16).hexdigest()
                for ks in zip(*parts)]
    if isinstance(source, DaskSource):
        return None
    rows = getattr(source, "array", None)
    if isinstance(source, NpySource) and not isinstance(rows, np.ndarray):
        rows = np.load(source.path, mmap_mode="r")
    if not isinstance(rows, np.ndarray):
        fp = source.fingerprint()
        return [hashlib.blake2b(f"{fp}|{a}:{b}".encode(), digest_size=16).hexdigest()
                for a, b in bounds]
    keys = []
    for a, b in bounds:
        h = hashlib.blake2b(f"rows{rows.shape[1:]}{rows.dtype.str}{b - a}".encode(),
                            digest_size=16)
        h.update(np.ascontiguousarray(rows[a:b]).data)
        keys.append(h.hexdigest())
    return keys


class RunCache:
    """One run's use of the cache: the key of each (model, chunk), what was found, and
    the writes of what it computes.

    Example:
        >>> cached = RunCache(specs, backends, source, bounds)   # doctest: +SKIP
        >>> cached.found["cnn"].keys()                            # doctest: +SKIP
        dict_keys([0, 1, 2])
    """

    def __init__(self, specs, backends: dict[str, list[str]], source,
                 bounds: list[tuple[int, int]], cache: OutputCache | None = None):
        self.cache = cache or OutputCache()
        self.bounds = bounds
        self.keys: dict[tuple[str, int], str] = {}
        self.found: dict[str, dict[int, list[np.ndarray]]] = {s.name: {} for s in specs}
        rows = chunk_keys(source, bounds)
        if rows is None:
            warn_user("cache=True: a Dask array's outputs are not cached (its rows exist "
                      "only once computed, and its name does not follow the files it "
                      "reads); computing them. Fix: pass an ndarray, a .npy or zarr path.")
        if rows is None or not self.cache.usable():
            self.cache = None
            return
        for spec in specs:
            m = model_key(spec, backends.get(spec.name, []))
            n_out = len(spec.output_specs) if spec.output_specs else spec.n_outputs
            for i, (a, b) in enumerate(bounds):
                key = self.keys[(spec.name, i)] = hashlib.blake2b(
                    f"{m}|{rows[i]}".encode(), digest_size=20).hexdigest()
                got = self.cache.get(key, b - a, n_out, spec.output_specs)
                if got is not None:
                    self.found[spec.name][i] = got

    def store(self, model: str, chunk: int, outputs) -> None:
        """Keep a computed chunk's outputs (nothing for a chunk the cache did not key)."""
        key = self.keys.get((model, chunk))
        if self.cache is not None and key is not None and outputs is not None:
            self.cache.put(key, list(outputs))

    def finish(self) -> None:
        """The run's writes are done: bring the folder back under its bound."""
        if self.cache is not None:
            self.cache.evict()


def cache_info() -> dict:
    """The output cache of ``predict(..., cache=True)``: its folder, entries, bytes and
    bound, and this process's hits and misses (one per model and chunk looked up).

    Example:
        >>> import nbtool
        >>> sorted(nbtool.cache_info())
        ['bytes', 'entries', 'folder', 'hits', 'limit', 'misses']
    """
    cache = OutputCache()
    entries = cache.entries()
    return {"folder": str(cache.folder), "entries": len(entries),
            "bytes": sum(s.st_size for s in entries.values()), "limit": cache.limit,
            "hits": STATS["hits"], "misses": STATS["misses"]}


def clear_cache() -> dict:
    """Remove every entry of the output cache (nothing else of nbtool's cache folder);
    returns how many entries and bytes went.

    Example:
        >>> import nbtool
        >>> sorted(nbtool.clear_cache())
        ['bytes', 'entries']
        >>> nbtool.cache_info()["entries"]
        0
    """
    cache = OutputCache()
    entries = cache.entries()
    for key in entries:
        cache.path(key).unlink(missing_ok=True)
    return {"entries": len(entries), "bytes": sum(s.st_size for s in entries.values())}
