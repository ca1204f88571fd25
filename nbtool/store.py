"""A result store on disk that survives crashes: ``predict(..., save="preds.zarr")``.

Each (model, chunk) task writes its outputs from the worker, as it completes, into one zarr
chunk per output (the zarr chunks are the prediction's chunks), then drops a marker file
``done/<model>/<chunk>`` by an atomic rename. A chunk counts as stored only if its marker
exists, so it is either wholly there or absent. A manifest (``nbtool.json``) records the
models and their file fingerprints, the input's fingerprint and the chunking. Running the
same prediction again resumes: stored chunks are not recomputed. A changed model file
invalidates that model's chunks, a changed input or chunking invalidates the store; they
never mix silently.

Example:
    >>> res = eng.predict(["cnn"], "big.npy", save="preds.zarr")   # doctest: +SKIP
    >>> res = nbtool.open_prediction("preds.zarr")                  # lazy: read on access
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from .errors import NbtoolError

MANIFEST = "nbtool.json"
FORMAT_VERSION = 1


def _key(model: str) -> str:
    """A model name as a folder name (names have no spaces; '/' would nest groups)."""
    return model.replace("/", "%2F")


@dataclasses.dataclass(frozen=True)
class StoreRef:
    """What a task needs to write its chunk: the store's path and the chunk's first row.

    Example:
        >>> StoreRef("/data/preds.zarr", 0).path
        '/data/preds.zarr'
    """

    path: str
    start: int

    def write(self, model: str, chunk: int, outputs: list[np.ndarray]) -> None:
        """Write one chunk's outputs, then mark it done (atomically)."""
        import zarr

        group = zarr.open_group(self.path, mode="r+")
        for k, out in enumerate(outputs):
            group[f"{_key(model)}/out{k}"][self.start:self.start + len(out)] = out
        done = Path(self.path) / "done" / _key(model)
        done.mkdir(parents=True, exist_ok=True)
        tmp = done / f".{chunk}.{os.getpid()}.tmp"
        tmp.write_bytes(b"")
        os.replace(tmp, done / str(chunk))


class ResultStore:
    """The client's side of a store: prepare it for a run, find what is done, read it back.

    Example:
        >>> store = ResultStore("preds.zarr")          # doctest: +SKIP
        >>> store.completed("cnn")                     # doctest: +SKIP
        {0, 1, 2}
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(Path(path).resolve())
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict | None:
        f = Path(self.path) / MANIFEST
        if not f.exists():
            return None
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise NbtoolError(f"result store {self.path}: its manifest {MANIFEST} is "
                              f"unreadable ({e}). Fix: delete the folder to start over, or "
                              "save to another path.") from None

    def completed(self, model: str) -> set[int]:
        """Chunks of ``model`` that are wholly stored."""
        done = Path(self.path) / "done" / _key(model)
        return {int(p.name) for p in done.iterdir() if p.name.isdigit()} if done.exists() \
            else set()

    def prepare(self, models: list[tuple[str, str, list]], input_fingerprint: str,
                n_rows: int, chunk_size: int) -> dict[str, set[int]]:
        """Make the store ready for a run; returns the chunks already done per model.

        ``models`` holds (name, model fingerprint, output specs [(row shape, dtype)]).
        """
        import zarr

        root = Path(self.path)
        m = self.manifest
        if root.exists() and m is None and any(root.iterdir()):
            raise NbtoolError(f"result store {self.path}: the folder exists and is not an "
                              "nbtool result store. Fix: save to a new path.")
        if m is not None and (m.get("input") != input_fingerprint or m.get("n_rows") != n_rows
                              or m.get("chunk_size") != chunk_size):
            what = "the input" if m.get("input") != input_fingerprint else "the chunking"
            warnings.warn(f"result store {self.path}: {what} changed since it was written; "
                          "its results are discarded and everything is computed again.",
                          stacklevel=3)
            shutil.rmtree(root)
            m = None
        if m is None:
            m = {"format": FORMAT_VERSION, "input": input_fingerprint, "n_rows": n_rows,
                 "chunk_size": chunk_size, "models": {}}
            zarr.open_group(self.path, mode="w")
        group = zarr.open_group(self.path, mode="r+")
        for name, fingerprint, specs in models:
            known = m["models"].get(name)
            entry = {"fingerprint": fingerprint, "outputs": [[list(s), d] for s, d in specs]}
            if known is not None and known != entry:
                warnings.warn(f"result store {self.path}: model {name!r} changed since its "
                              "results were written; they are discarded and computed again.",
                              stacklevel=3)
                shutil.rmtree(root / _key(name), ignore_errors=True)
                shutil.rmtree(root / "done" / _key(name), ignore_errors=True)
                known = None
            if known is None:
                for k, (shape, dtype) in enumerate(specs):
                    dt = np.dtype(dtype)
                    group.create_array(f"{_key(name)}/out{k}", shape=(n_rows, *shape),
                                       chunks=(chunk_size, *shape), dtype=dt,
                                       fill_value=np.nan if dt.kind == "f" else 0,
                                       overwrite=True)
                m["models"][name] = entry
        self._write_manifest(m)
        return {name: self.completed(name) for name, _, _ in models}

    def _write_manifest(self, m: dict) -> None:
        f = Path(self.path) / MANIFEST
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(m, indent=1))
        os.replace(tmp, f)
        self.manifest = m

    def arrays(self, model: str) -> list:
        """The model's outputs as zarr arrays (nothing is read until indexed)."""
        import zarr

        group = zarr.open_group(self.path, mode="r")
        n = len(self.manifest["models"][model]["outputs"])
        return [group[f"{_key(model)}/out{k}"] for k in range(n)]


def open_prediction(path: str | os.PathLike):
    """Open a result store as a :class:`~nbtool.results.Prediction`, lazily.

    ``res[name]`` is then a zarr array: indexing it reads only those rows. Chunks that
    never completed hold NaN; ``res.completed`` says which are stored.

    Example:
        >>> res = nbtool.open_prediction("preds.zarr")   # doctest: +SKIP
        >>> res["cnn"][:10]                              # doctest: +SKIP
    """
    from .results import Prediction

    store = ResultStore(path)
    if store.manifest is None:
        raise NbtoolError(f"{path}: not an nbtool result store (no {MANIFEST}). Fix: pass the "
                          "path given as save= to predict.")
    m = store.manifest
    models = list(m["models"])
    n_chunks = -(-m["n_rows"] // m["chunk_size"])
    res = Prediction(models, {name: store.arrays(name) for name in models}, None, None,
                     {}, [], m["n_rows"], m["chunk_size"])
    res.completed = {name: store.completed(name) for name in models}
    res.n_chunks = n_chunks
    return res
