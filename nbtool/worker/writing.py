"""Writing a chunk's outputs into the result store, on the worker that computed them.

The store's layout (one folder per model, ``done/`` markers, the lock file) is the wire's
(:class:`nbtool.wire.StoreRef`, :func:`nbtool.wire.store_key`); the kernel's side (making,
locking, reading the store) is :mod:`nbtool.prediction.store`.

Example:
    >>> import tempfile, numpy as np, zarr
    >>> from nbtool.wire import StoreRef
    >>> path = tempfile.mkdtemp() + "/p.zarr"
    >>> g = zarr.open_group(path, mode="w"); _ = g.zeros(name="cnn/out0", shape=(8, 3), dtype="float32")
    >>> write_chunk(StoreRef(path, 4), "cnn", 1, [np.ones((4, 3), "float32")])
    >>> float(zarr.open_group(path)["cnn/out0"][:].sum()), (Path(path) / "done" / "cnn" / "1").exists()
    (12.0, True)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nbtool.errors import ResultStoreError
from nbtool.wire import StoreRef, store_key, store_owner


def write_chunk(ref: StoreRef, model: str, chunk: int, outputs: list[np.ndarray],
                names: tuple | None = None) -> None:
    """Write one chunk's outputs, then mark it done (atomically); a ``.parquet`` store
    gets one file for the chunk (``names``: the outputs' names, if the model has them).
    """
    import zarr

    _check_owner(ref, model, chunk)
    if ref.path.lower().endswith(".parquet"):
        _write_parquet(ref, model, chunk, outputs, names)
        return
    group = zarr.open_group(ref.path, mode="r+")
    for k, out in enumerate(outputs):
        group[f"{store_key(model)}/out{k}"][ref.start:ref.start + len(out)] = out
    done = Path(ref.path) / "done" / store_key(model)
    done.mkdir(parents=True, exist_ok=True)
    tmp = done / f".{chunk}.{os.getpid()}.tmp"
    tmp.write_bytes(b"")
    # Checked again last: a run cancelled while this task computed must not mark rows
    # done in a store that another run holds now.
    _check_owner(ref, model, chunk)
    os.replace(tmp, done / str(chunk))


def _write_parquet(ref: StoreRef, model: str, chunk: int, outputs: list[np.ndarray],
                   names: tuple | None) -> None:
    """The chunk's file ``<model>/part-<chunk>.parquet``: a record per (row, output),
    written beside it and renamed into place (a file there is a whole chunk)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(outputs[0]) if outputs else 0
    rows, labels, index, values = [], [], [], []
    for k, out in enumerate(outputs):
        flat = np.asarray(out, dtype=np.float64).reshape(n, -1)
        rows.append(np.arange(ref.start, ref.start + n, dtype=np.int64))
        labels += [names[k] if names else str(k)] * n
        index.append(np.full(n, k, np.int32))
        values.append(pa.FixedSizeListArray.from_arrays(flat.reshape(-1), flat.shape[1]))
    table = pa.table({"row": np.concatenate(rows), "model": [model] * len(labels),
                      "output": labels, "output_index": np.concatenate(index),
                      "values": pa.concat_arrays([v.cast(pa.list_(pa.float64())) for v in values])})
    folder = Path(ref.path) / store_key(model)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".part-{chunk:05d}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    _check_owner(ref, model, chunk)   # a run that ended meanwhile must not add a chunk
    os.replace(tmp, folder / f"part-{chunk:05d}.parquet")


def _check_owner(ref: StoreRef, model: str, chunk: int) -> None:
    """A task of a run that no longer holds the store (cancelled, or collected while
    this task was still running) writes nothing."""
    if ref.run is None:
        return
    holder = store_owner(ref.path)
    if holder != ref.run:
        now = f"run {holder} holds it now" if holder else "no run holds it now"
        raise ResultStoreError(ref.path, f"chunk {chunk} of model {model!r} belongs to "
                               f"run {ref.run}, which has ended ({now}), so it was not "
                               "written", "run the prediction again to fill the store")
