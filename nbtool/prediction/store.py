"""A result store on disk that survives crashes: ``predict(..., save="preds.zarr")``.

Each (model, chunk) task writes its outputs from the worker, as it completes, into one zarr
chunk per output (the zarr chunks are the prediction's chunks), then drops a marker file
``done/<model>/<chunk>`` by an atomic rename. A chunk counts as stored only if its marker
exists, so it is either wholly there or absent. A manifest (``nbtool.json``) records the
models and their file fingerprints, the input's fingerprint and the chunking. Running the
same prediction again resumes: stored chunks are not recomputed. A changed model file
invalidates that model's chunks, a changed input or chunking invalidates the store; they
never mix silently.

One run writes a store at a time (:mod:`nbtool.prediction.store`). The manifest records which
run last wrote each model; a Prediction backed by the store checks it when read and refuses
rows another run has written since (:class:`~nbtool.errors.StoreRewritten`).

Example:
    >>> res = eng.predict(["cnn"], "big.npy", save="preds.zarr")   # doctest: +SKIP
    >>> res = nbtool.open_prediction("preds.zarr")   # lazy  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import time

import numpy as np

from nbtool._util import warn_user
from nbtool.errors import NbtoolError, ResultStoreError, StoreBusy, StoreRewritten
from nbtool.wire import STORE_LOCK as LOCK, store_key as _key


class StoreLock:
    """The writer lock of the store at ``path`` (a folder that exists), through one open file.

    Example:
        >>> import tempfile
        >>> lock = StoreLock(tempfile.mkdtemp()); lock.acquire("run1")
        >>> lock.run_id, lock.held
        ('run1', True)
        >>> lock.release(); lock.held
        False
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.run_id: str | None = None   # the run holding the lock through this object
        self._file = None                # its open lock file, while held

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._file is not None

    def acquire(self, run_id: str) -> None:
        """Take the lock for run ``run_id`` (a no-op if this object holds it already);
        raise :class:`~nbtool.errors.StoreBusy` at once if another run holds it, and
        ``OSError`` if the lock file cannot be made."""
        if self._file is not None:
            return
        f = os.fdopen(os.open(Path(self.path) / LOCK, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        if not _try_lock(f):   # held: by another kernel, or by another run of this one
            holder = _holder_text(f.read())
            f.close()
            raise StoreBusy(self.path, f"{holder} is writing it now; a second run would mix "
                            "its rows into that one's", "wait for that run to finish "
                            "(run.collect()) or stop it (run.cancel()), or save this run to "
                            "another path") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"run": run_id, "pid": os.getpid(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self._file, self.run_id = f, run_id

    def release(self) -> None:
        """Give the lock back (a no-op if not held); late tasks of the run that held it
        find no owner in the lock file and write nothing."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.seek(0)
            f.truncate()
        except OSError:
            pass
        finally:
            f.close()   # closing the descriptor drops the flock


def _try_lock(f) -> bool:
    """Take an exclusive lock on open file ``f`` without waiting; False if another open
    file holds it (another process, or another run of this one: flock locks belong to
    open files, not processes). The OS drops it when the file is closed or the process
    dies, so a crashed kernel leaves no stale lock."""
    try:
        import fcntl
    except ImportError:   # Windows
        import msvcrt

        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _holder_text(text: str) -> str:
    """Who holds a lock, from its lock file's text: "run 1a2b3c4d (process 123, since
    ...)", or "another run" when it has not written its id yet.

    Example:
        >>> _holder_text('{"run": "1a2b3c4d", "pid": 123, "since": "2025-01-01 10:00:00"}')
        'run 1a2b3c4d (process 123, since 2025-01-01 10:00:00)'
    """
    try:
        info = json.loads(text) if text.strip() else {}
    except ValueError:
        info = {}
    if not info.get("run"):
        return "another run"
    return f"run {info['run']} (process {info.get('pid')}, since {info.get('since')})"


MANIFEST = "nbtool.json"
#: 2: model names are percent-encoded injectively (1 only replaced '/', so 'a/b' and
#: 'a%2Fb' shared one array).
FORMAT_VERSION = 2
_REWRITTEN_FIX = ("save each run to its own path, or read the store again with "
                  "nbtool.open_prediction")


def _key_v1(model: str) -> str:
    """How format-1 stores named their folders: read-only, for opening old stores."""
    return model.replace("/", "%2F")


class ResultStore:
    """The client's side of a store: prepare it for a run, find what is done, read it back.

    What a run does with it, without a cluster: prepare it for 10 rows in chunks of 4
    (3 chunks) of one model with one output of 3 values per row, write chunk 1 as a
    worker would, and read it back.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "preds.zarr"
        >>> store = ResultStore(path)
        >>> store.acquire("run1")
        >>> store.prepare([("cnn", "model-fp", [((3,), "float32")])], "input-fp", 10, 4)
        {'cnn': set()}
        >>> from nbtool.wire import StoreRef; from nbtool.worker.writing import write_chunk
        >>> write_chunk(StoreRef(store.path, 4, "run1"), "cnn", 1, [np.ones((4, 3), "float32")])
        >>> store.completed("cnn")
        {1}
        >>> store.release()
        >>> store.arrays("cnn")[0][3:5].tolist()
        [[nan, nan, nan], [1.0, 1.0, 1.0]]
    """

    #: The manifest's file name in the store's folder.
    manifest_name = MANIFEST

    def __init__(self, path: str | os.PathLike):
        self.path = str(Path(path).resolve())
        self.manifest = self._read_manifest()
        self._writer = StoreLock(self.path)

    def _key(self, model: str) -> str:
        old = self.manifest is not None and self.manifest.get("format") == 1
        return _key_v1(model) if old else _key(model)

    # -- the writer lock ---------------------------------------------------------------------
    def check_target(self) -> None:
        """Refuse a path that cannot become a result store, before anything is created:
        an existing file, a path under a file, an unwritable folder, a foreign folder.

        Example:
            >>> ResultStore("/dev/null/p.zarr").check_target()  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            nbtool.errors.ResultStoreError: result store /dev/null/p.zarr: /dev/null is not...
        """
        root = Path(self.path)
        if root.exists() and not root.is_dir():
            raise ResultStoreError(self.path, "a file of that name exists, and a result store "
                                   "is a folder", "save to a new path ending in .zarr, or "
                                   "delete that file first")
        parent = root
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ResultStoreError(self.path, f"{parent} is not a folder (a file), so no "
                                   "folder can be made under it", "save under a folder, "
                                   "e.g. save='preds.zarr' beside the notebook")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ResultStoreError(self.path, f"the folder {parent} is not writable",
                                   "save to a folder you can write, e.g. beside the notebook")
        if root.exists() and self.manifest is None and \
                any(p.name != LOCK for p in root.iterdir()):
            raise ResultStoreError(self.path, "the folder exists and is not an nbtool result "
                                   "store", "save to a new path")

    def acquire(self, run_id: str) -> None:
        """Take the writer lock for run ``run_id``; raise :class:`~nbtool.errors.StoreBusy`
        at once if another run holds it. :meth:`release` gives it back.

        Example:
            >>> import pathlib, tempfile
            >>> path = pathlib.Path(tempfile.mkdtemp()) / "preds.zarr"
            >>> store = ResultStore(path); store.acquire("run1")
            >>> ResultStore(path).acquire("run2")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            nbtool.errors.StoreBusy: result store .../preds.zarr: run run1 (process ...) is writing it now...
            >>> store.release(); ResultStore(path).acquire("run2")   # free again
        """
        if self.locked:
            return
        self.check_target()
        try:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            self._writer.acquire(run_id)
        except OSError as e:
            raise self.unwritable(e) from None

    def release(self) -> None:
        """Give the writer lock back (a no-op if not held)."""
        self._writer.release()

    @property
    def locked(self) -> bool:
        """True while this object holds the writer lock."""
        return self._writer.held

    @property
    def run_id(self) -> str | None:
        """The run holding the writer lock through this object."""
        return self._writer.run_id

    def unwritable(self, e: OSError) -> ResultStoreError:
        """The error for a store that cannot be written (``e`` says why).

        Example:
            >>> str(ResultStore("/p.zarr").unwritable(PermissionError(13, "Permission denied")))
            'result store /p.zarr: cannot write there (PermissionError: Permission denied). Fix: save to a folder you can write, e.g. beside the notebook.'
        """
        return ResultStoreError(self.path, f"cannot write there ({type(e).__name__}: "
                                f"{e.strerror or e})", "save to a folder you can write, "
                                "e.g. beside the notebook")

    def runs(self) -> dict[str, str | None]:
        """The run that last wrote each model (from the manifest)."""
        m = self.manifest or {}
        return {n: e.get("run") for n, e in m.get("models", {}).items()}

    def _read_manifest(self) -> dict | None:
        f = Path(self.path) / self.manifest_name
        if not f.exists():
            return None
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise NbtoolError(f"result store {self.path}: its manifest {self.manifest_name} is "
                              f"unreadable ({e}). Fix: delete the folder to start over, or "
                              "save to another path.") from None

    def completed(self, model: str) -> set[int]:
        """Chunks of ``model`` that are wholly stored."""
        done = Path(self.path) / "done" / self._key(model)
        return {int(p.name) for p in done.iterdir() if p.name.isdigit()} if done.exists() \
            else set()

    def prepare(self, models: list[tuple[str, str, list]], input_fingerprint: str,
                n_rows: int, chunk_size: int, n_chunks: int | None = None
                ) -> dict[str, set[int]]:
        """Make the store ready for a run; returns the chunks already done per model.

        ``models`` holds (name, model fingerprint, output specs [(row shape, dtype)]), and
        optionally the outputs' names.
        Takes the writer lock first if this object does not hold it yet (:meth:`release`
        gives it back). Each model that this run will write (chunks missing, or new) is
        recorded in the manifest as written by this run.
        """
        if not self.locked:
            import uuid

            self.acquire(uuid.uuid4().hex[:8])
        root = Path(self.path)
        # Read again under the lock: the run that held it before may have changed it.
        m = self.manifest = self._read_manifest()
        if m is not None and m.get("format") != FORMAT_VERSION:
            warn_user(f"result store {self.path} was written by an older nbtool (format "
                      f"{m.get('format')}); its results are discarded and everything is "
                      "computed again.")
            m = None
        elif m is not None and (m.get("input") != input_fingerprint or m.get("n_rows") !=
                                n_rows or m.get("chunk_size") != chunk_size):
            what = "the input" if m.get("input") != input_fingerprint else "the chunking"
            warn_user(f"result store {self.path}: {what} changed since it was written; "
                      "its results are discarded and everything is computed again.")
            m = None
        if m is None:
            _clear(root)    # all but the lock file this run holds
            m = {"format": FORMAT_VERSION, "input": input_fingerprint, "n_rows": n_rows,
                 "chunk_size": chunk_size, "models": {}}
            self.manifest = m
        group = self._open_outputs()
        n_chunks = n_chunks if n_chunks is not None else -(-n_rows // chunk_size)
        for name, fingerprint, specs, *names in models:
            m["models"][name] = self._prepare_model(group, name, fingerprint, specs,
                                                    n_rows, chunk_size, n_chunks)
            if names and names[0]:   # the outputs' names, for open_prediction
                m["models"][name]["names"] = list(names[0])
        self._write_manifest(m)
        return {name: self.completed(name) for name, *_ in models}

    def _prepare_model(self, group, name: str, fingerprint: str, specs: list, n_rows: int,
                       chunk_size: int, n_chunks: int) -> dict:
        """One model's arrays, kept or made new; returns its manifest entry."""
        root = Path(self.path)
        known = self.manifest["models"].get(name)
        entry = {"fingerprint": fingerprint, "outputs": [[list(s), d] for s, d in specs]}
        if known is not None and {k: known.get(k) for k in entry} != entry:
            warn_user(f"result store {self.path}: model {name!r} changed since its "
                      "results were written; they are discarded and computed again.")
            known = None
        if known is None:
            shutil.rmtree(root / _key(name), ignore_errors=True)
            shutil.rmtree(root / "done" / _key(name), ignore_errors=True)
            self._new_outputs(group, name, specs, n_rows, chunk_size)
        writes = known is None or len(self.completed(name)) < n_chunks
        if not writes:   # wholly stored: this run reads it, the last writer stays
            return {**entry, "run": known.get("run"), "written_at": known.get("written_at")}
        return {**entry, "run": self.run_id, "written_at": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _open_outputs(self):
        """Where the outputs go: the zarr group (opened to add arrays)."""
        import zarr

        # mode="a", never "w": "w" deletes the folder, the lock file with it.
        return zarr.open_group(self.path, mode="a")

    def _new_outputs(self, group, name: str, specs: list, n_rows: int, chunk_size: int):
        """A model's empty outputs: one zarr array per output, one zarr chunk per chunk."""
        for k, (shape, dtype) in enumerate(specs):
            dt = np.dtype(dtype)
            group.create_array(f"{_key(name)}/out{k}", shape=(n_rows, *shape),
                               chunks=(chunk_size, *shape), dtype=dt,
                               fill_value=np.nan if dt.kind == "f" else 0, overwrite=True)

    def _write_manifest(self, m: dict) -> None:
        f = Path(self.path) / self.manifest_name
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(m, indent=1))
        os.replace(tmp, f)
        self.manifest = m

    def arrays(self, model: str) -> list:
        """The model's outputs as zarr arrays (nothing is read until indexed)."""
        import zarr

        group = zarr.open_group(self.path, mode="r")
        n = len(self.manifest["models"][model]["outputs"])
        return [group[f"{self._key(model)}/out{k}"] for k in range(n)]


class ParquetStore(ResultStore):
    """A result store as a Parquet dataset: ``save="preds.parquet"``.

    Each (model, chunk) task writes one file, ``<model>/part-<chunk>.parquet``, from its
    worker by an atomic rename (a file there is a whole chunk: it is the chunk's marker).
    Every file has one schema, so pandas, pyarrow and Dask read the whole folder as one
    table: a record per (input row, model, output) with the row's number, the model's and
    output's names (an unnamed output's is its index), the output's index, and its values
    (a list: the row's values in C order, as float64, whatever the output's dtype). Lock,
    manifest (``_nbtool.json``: a name Parquet readers skip) and resuming are the zarr
    store's.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "preds.parquet"
        >>> store = ParquetStore(path); store.acquire("run1")
        >>> store.prepare([("cnn", "model-fp", [((3,), "float32")])], "input-fp", 10, 4)
        {'cnn': set()}
        >>> from nbtool.wire import StoreRef; from nbtool.worker.writing import write_chunk
        >>> write_chunk(StoreRef(store.path, 4, "run1"), "cnn", 1, [np.ones((4, 3), "float32")])
        >>> store.release(); store.completed("cnn")
        {1}
        >>> store.arrays("cnn")[0][3:5].tolist()
        [[nan, nan, nan], [1.0, 1.0, 1.0]]
        >>> import pandas as pd
        >>> pd.read_parquet(path).columns.tolist()
        ['row', 'model', 'output', 'output_index', 'values']
    """

    manifest_name = "_nbtool.json"

    def completed(self, model: str) -> set[int]:
        folder = Path(self.path) / self._key(model)
        return {int(p.name[5:-8]) for p in folder.glob("part-*.parquet")} \
            if folder.is_dir() else set()

    def _open_outputs(self):
        return None

    def _new_outputs(self, group, name: str, specs: list, n_rows: int, chunk_size: int):
        (Path(self.path) / _key(name)).mkdir(parents=True, exist_ok=True)

    def arrays(self, model: str) -> list[np.ndarray]:
        """The model's outputs read from its files (NaN where a chunk is not stored)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        specs = self.manifest["models"][model]["outputs"]
        out = [np.full((self.manifest["n_rows"], *shape), np.nan,
                       np.dtype(dtype) if np.dtype(dtype).kind in "fc" else np.float64)
               for shape, dtype in specs]
        for f in sorted((Path(self.path) / self._key(model)).glob("part-*.parquet")):
            table = pq.read_table(f)
            for k, (shape, _) in enumerate(specs):
                part = table.filter(pc.equal(table["output_index"], k))
                values = part.column("values").combine_chunks().flatten().to_numpy()
                out[k][part.column("row").to_numpy()] = values.reshape(-1, *shape)
        return out


def open_result_store(path: str | os.PathLike) -> ResultStore:
    """The result store at ``path``: a Parquet dataset for ``.parquet``, else zarr.

    Example:
        >>> type(open_result_store("p.parquet")).__name__, type(open_result_store("p.zarr")).__name__
        ('ParquetStore', 'ResultStore')
    """
    return (ParquetStore if str(path).lower().endswith(".parquet") else ResultStore)(path)


def _clear(root: Path) -> None:
    """Empty a store's folder, keeping its lock file (and the lock on it)."""
    root.mkdir(parents=True, exist_ok=True)
    for p in root.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_npz_target(path: str | os.PathLike) -> None:
    """Refuse a ``save="*.npz"`` path that cannot be written, before the run rather than
    after it: a folder of that name, a missing or unwritable folder, a path under a file.

    Example:
        >>> check_npz_target("/dev/null/p.npz")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.NbtoolError: save='/dev/null/p.npz': /dev/null is not a folder...
    """
    target = Path(path).expanduser().resolve()
    parent = target.parent
    problem = None
    if target.is_dir():
        problem = f"{target} is a folder"
    elif parent.exists() and not parent.is_dir():
        problem = f"{parent} is not a folder (a file), so nothing can be saved under it"
    elif not parent.exists():
        problem = f"the folder {parent} does not exist"
    elif not os.access(parent, os.W_OK | os.X_OK) or \
            (target.exists() and not os.access(target, os.W_OK)):
        problem = f"{target} cannot be written"
    if problem:
        raise NbtoolError(f"save={str(path)!r}: {problem}, so the results could not be "
                          "written there after the run. Fix: pass a .npz path in a folder "
                          "you can write, e.g. save='preds.npz' beside the notebook.")


def check_runs(path: str, runs: dict[str, str | None], models: list[str]) -> None:
    """Raise :class:`~nbtool.errors.StoreRewritten` if another run wrote any of ``models``
    in the store at ``path`` since ``runs`` (model -> run id, from its manifest) was read.

    Example:
        >>> check_runs("preds.zarr", res.store_runs, ["cnn"])   # doctest: +SKIP
    """
    manifest = (ParquetStore if str(path).lower().endswith(".parquet") else ResultStore
                ).manifest_name
    try:
        m = json.loads((Path(path) / manifest).read_text())
    except (OSError, ValueError):
        m = None
    for name in models:
        now = (m or {}).get("models", {}).get(name)
        if now is not None and now.get("run") == runs.get(name):
            continue
        when = f" at {now['written_at']}" if now and now.get("written_at") else ""
        what = "was rewritten by another run" + when if now else \
            "was deleted or rewritten by another run"
        raise StoreRewritten(path, f"it {what}; this Prediction's rows of model {name!r} are "
                             "gone", _REWRITTEN_FIX)
