"""Inputs, split into chunks without copying them in the client.

A source knows its rows (count, row shape, dtype) and hands each (model, chunk) task a
reference to its rows, never a copy:

- an ndarray is scattered once to the workers that need it; each task slices it there;
- a path to a ``.npy`` file is memory-mapped by each worker, which reads only its slice;
  the client reads nothing but the header;
- a Dask array contributes its blocks (row-wise), computed wherever Dask likes.

Example:
    >>> src = as_source(np.zeros((10, 3)))
    >>> src.n_rows, src.row_shape, src.chunk_bounds(4)
    (10, (3,), [(0, 4), (4, 8), (8, 10)])
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputMismatch, NbtoolError


@dataclasses.dataclass(frozen=True)
class NpyFile:
    """A ``.npy`` file that workers open themselves (memory-mapped).

    Example:
        >>> read_rows(NpyFile("x.npy"), 100, 200).shape   # doctest: +SKIP
        (100, 28, 28)
    """

    path: str


def read_rows(data: Any, start: int, stop: int | None) -> np.ndarray:
    """Rows ``start:stop`` of ``data`` (an array or an :class:`NpyFile`), on a worker.

    Example:
        >>> read_rows(np.arange(10), 2, 5)
        array([2, 3, 4])
    """
    if isinstance(data, NpyFile):
        return np.asarray(np.load(data.path, mmap_mode="r")[start:stop])
    return data[start:stop]


class Source:
    """Rows to predict on; subclasses say where they live.

    Example:
        >>> as_source(np.zeros((5, 2), "float32")).describe()
        'an array of shape (5, 2) and dtype float32'
    """

    n_rows: int
    row_shape: tuple
    dtype: np.dtype

    def describe(self) -> str:
        return f"an array of shape {(self.n_rows, *self.row_shape)} and dtype {self.dtype}"

    def chunk_bounds(self, chunk_size: int) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` covering every row, ``chunk_size`` rows each."""
        return [(s, min(s + chunk_size, self.n_rows))
                for s in range(0, self.n_rows, chunk_size)]

    def chunk_args(self, client, workers: list[str], chunk_size: int) -> list[tuple]:
        """``[(data, start, stop), ...]`` to hand to :func:`nbtool.worker.predict_chunk`."""
        raise NotImplementedError


class ArraySource(Source):
    """An in-memory ndarray: scattered once, sliced on the workers."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.n_rows, self.row_shape, self.dtype = len(array), array.shape[1:], array.dtype

    def chunk_args(self, client, workers, chunk_size):
        # One copy per worker that needs it, sent once; every chunk is then a slice there.
        # hash=False: the same array sent twice must not collide with a released key.
        data = client.scatter(self.array, workers=workers, broadcast=True, hash=False)
        return [(data, a, b) for a, b in self.chunk_bounds(chunk_size)]


class NpySource(Source):
    """A ``.npy`` file: the client reads its header; workers map their own slices."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(Path(path).resolve())
        try:
            array = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise NbtoolError(f"input file {path}: cannot read it as a .npy array ({e}). "
                              "Fix: save the input with np.save(path, array).") from None
        self.n_rows, self.row_shape, self.dtype = len(array), array.shape[1:], array.dtype
        del array

    def describe(self):
        return f"{self.path} ({super().describe()})"

    def chunk_args(self, client, workers, chunk_size):
        ref = NpyFile(self.path)
        return [(ref, a, b) for a, b in self.chunk_bounds(chunk_size)]


class DaskSource(Source):
    """A Dask array: one chunk per block of rows (rechunked to ``chunk_size`` if given)."""

    def __init__(self, array):
        self.array = array
        if any(np.isnan(c) for c in array.chunks[0]):
            raise InputMismatch(None, None, "a Dask array with known chunk sizes",
                                "unknown chunk sizes along the rows",
                                "call x.compute_chunk_sizes() first")
        self.n_rows, self.row_shape, self.dtype = (int(array.shape[0]),
                                                   tuple(array.shape[1:]), array.dtype)

    def describe(self):
        return f"a Dask array of shape {self.array.shape} and dtype {self.dtype}"

    def natural_chunk_size(self) -> int:
        return int(max(self.array.chunks[0]))

    def chunk_bounds(self, chunk_size):
        arr = self._rechunked(chunk_size)
        ends = np.cumsum(arr.chunks[0]).tolist()
        return list(zip([0, *ends[:-1]], ends))

    def _rechunked(self, chunk_size):
        whole_rows = {i: -1 for i in range(1, self.array.ndim)}
        return self.array.rechunk({0: chunk_size, **whole_rows})

    def chunk_args(self, client, workers, chunk_size):
        blocks = self._rechunked(chunk_size).to_delayed().ravel()
        return [(block, 0, None) for block in blocks]


def as_source(x: Any) -> Source:
    """Wrap an input as a :class:`Source`: ndarray, ``.npy`` path, Dask array, or a list.

    Raises :class:`~nbtool.errors.InputMismatch` for inputs with no rows and
    :class:`~nbtool.errors.NbtoolError` for paths it cannot read.

    Example:
        >>> type(as_source([[1.0, 2.0], [3.0, 4.0]])).__name__
        'ArraySource'
        >>> as_source(np.float32(1.0))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.InputMismatch: the input expects an array with a first axis of rows...
    """
    if isinstance(x, Source):
        return x
    if isinstance(x, (str, os.PathLike)):
        p = Path(x)
        if p.suffix.lower() != ".npy":
            raise NbtoolError(
                f"input {x}: nbtool reads arrays from .npy files; got a path ending in "
                f"{p.suffix or '(no suffix)'!r}. Fix: np.save('input.npy', array) and pass "
                "that path, or pass the array itself.")
        if not p.exists():
            raise NbtoolError(f"input {x}: the file does not exist. Fix: check the path "
                              f"(the working directory is {os.getcwd()}).")
        src: Source = NpySource(p)
    elif _is_dask_array(x):
        src = DaskSource(x)
    else:
        try:
            arr = np.asarray(x)
        except ValueError as e:
            raise InputMismatch(None, None, "rows of one shape (a rectangular array)",
                                f"a ragged sequence ({e})",
                                "pad or crop the rows to one shape first") from None
        if arr.dtype == object:
            raise InputMismatch(None, None, "a numeric array",
                                "an array of Python objects (ragged rows?)",
                                "pad or crop the rows to one shape and use a numeric dtype")
        src = ArraySource(arr) if arr.ndim else None
        if src is None:
            raise InputMismatch(None, None, "an array with a first axis of rows",
                                f"a scalar {arr!r}", "pass an array like x[None] for one row")
    if src.n_rows == 0:
        raise InputMismatch(None, None, "at least one row", f"{src.describe()} with no rows",
                            "check how the input was selected")
    return src


def _is_dask_array(x) -> bool:
    return type(x).__module__.startswith("dask.array") and hasattr(x, "to_delayed")
