"""Tables as inputs: a pandas DataFrame, a pyarrow Table, a Dask DataFrame, or a Parquet
file or folder, read as named columns that models take (:mod:`nbtool.prediction.binding`).

A table in memory is turned into arrays once, column group by column group (numbers as
they are, text as fixed-width unicode: never Python objects, which no file a worker opens
may hold). A Dask DataFrame (or a Parquet dataset, opened as one) stays lazy: its columns
become Dask arrays whose blocks are its partitions, computed on the workers. The row
index (or an ``ids=`` column) travels with the rows, for :meth:`Prediction.to_pandas`.

Example:
    >>> import pandas as pd
    >>> t = open_table(pd.DataFrame({"age": [31, 45], "city": ["Oslo", "Lima"]},
    ...                             index=["u1", "u2"]))
    >>> t.columns, t.n_rows, list(t.row_ids)
    (['age', 'city'], 2, ['u1', 'u2'])
    >>> t.part(["city"]).array.tolist()
    [['Oslo'], ['Lima']]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from nbtool.errors import InputMismatch, NbtoolError
from nbtool.prediction.inputs import describe_objects
from nbtool.prediction.sources import ArraySource, DaskSource, Source


class Table:
    """A table's columns, each group of them turned into a :class:`Source` on demand.

    ``row_ids``: the rows' labels (the index, or the ``ids`` column, left out of the
    columns); None for a lazy table without an ``ids`` column (rows are then numbered).

    Example:
        >>> import pandas as pd
        >>> t = Table(pd.DataFrame({"user": ["a", "b"], "x": [1.0, 2.0]}), ids="user")
        >>> t.columns, list(t.row_ids), t.row_ids.name
        (['x'], ['a', 'b'], 'user')
    """

    def __init__(self, frame, ids: str | None = None, lazy: bool = False,
                 what: str = "your DataFrame"):
        self.frame, self.lazy, self.what = frame, lazy, what
        columns = [str(c) for c in frame.columns]
        if len(set(columns)) != len(columns):
            dup = sorted({c for c in columns if columns.count(c) > 1})
            raise InputMismatch(None, None, "a table whose column names are unique",
                                f"{what} with the repeated columns {dup}",
                                "rename them, e.g. df.columns = [...]")
        self._names = dict(zip(columns, frame.columns))
        if ids is not None and str(ids) not in self._names:
            raise InputMismatch(None, None, f"ids={ids!r} to be one of its columns",
                                f"{what} with the columns {columns}",
                                "pass ids= one of those names (or leave it out: the index "
                                "labels the rows)")
        self.ids = None if ids is None else str(ids)
        self.columns = [c for c in columns if c != self.ids]
        if lazy:
            self.n_rows = None   # known once partition lengths are, in part()
            self.row_ids = None if ids is None else \
                frame[self._names[self.ids]].to_dask_array(lengths=True)
        else:
            self.n_rows = len(frame)
            self.row_ids = frame.index if ids is None else \
                _labels(frame[self._names[self.ids]], self.ids)

    def part(self, cols: list[str]) -> Source:
        """The columns ``cols`` (in this order) as a Source of rows ``(n, len(cols))``.

        Raises :class:`InputMismatch` naming a missing column, text mixed with numbers,
        or a text column holding something else than strings.

        Example:
            >>> import pandas as pd
            >>> t = Table(pd.DataFrame({"a": [1, 2], "b": [0.5, 1.5]}))
            >>> t.part(["b", "a"]).array.tolist()
            [[0.5, 1.0], [1.5, 2.0]]
            >>> t.part(["c"])  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            nbtool.errors.InputMismatch: the input expects the columns ['c'], got your DataFrame with the columns ['a', 'b']...
        """
        missing = [c for c in cols if c not in self._names]
        if missing:
            raise InputMismatch(None, None, f"the columns {missing}",
                                f"{self.what} with the columns {self.columns}",
                                "add them, rename them, or map inputs to columns with "
                                "columns={'input': 'column', ...}")
        picked = self.frame[[self._names[c] for c in cols]]
        kinds = {c: _kind(picked[self._names[c]].dtype) for c in cols}
        if len(set(kinds.values())) > 1:
            raise InputMismatch(None, None, "the columns of one input to be all numbers or "
                                "all text", f"{kinds}", "map them to separate inputs")
        text = next(iter(kinds.values())) == "text"
        if self.lazy:
            arr = picked.to_dask_array(lengths=True)
            if text:
                arr = arr.map_blocks(lambda b: np.asarray(b, dtype=str), dtype=str)
            self.n_rows = int(arr.shape[0])
            return DaskSource(arr)
        if not text:
            values = picked.to_numpy()
            if values.dtype == object:   # pandas' nullable columns holding <NA>
                found, fix = describe_objects(values)
                raise InputMismatch(None, None, f"numbers in the columns {cols}", found, fix)
            return ArraySource(values)
        values = picked.to_numpy(dtype=object)
        for j, c in enumerate(cols):
            bad = [v for v in values[:, j] if not isinstance(v, str)]
            if bad:
                counts = {}
                for v in values[:, j]:
                    counts[type(v).__name__] = counts.get(type(v).__name__, 0) + 1
                raise InputMismatch(None, None, f"column {c!r} to hold one kind of value "
                                    "(numbers, or text)", "a column of mixed types (" +
                                    ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
                                    + f"; e.g. {bad[0]!r})",
                                    f"pd.to_numeric(df[{c!r}], errors='coerce') for numbers, "
                                    f"or df[{c!r}].fillna('').astype(str) for text")
        return ArraySource(values.astype(str))


def _labels(column, name: str):
    """A column as the rows' labels: a pandas Index named after it."""
    import pandas as pd

    return pd.Index(column.to_numpy(), name=name)


def _kind(dtype) -> str:
    """``"number"`` or ``"text"`` for a column's dtype (numpy's, pandas' or Arrow's)."""
    kind = getattr(dtype, "kind", None)
    if kind in ("b", "i", "u", "f"):
        return "number"
    name = str(dtype).lower()
    if name.startswith(("float", "int", "uint", "bool")):   # pandas' nullable Int64...
        return "number"
    return "text"


def open_table(x: Any, ids: str | None = None) -> Table:
    """``x`` (a pandas/pyarrow/Dask table or a Parquet path) as a :class:`Table`.

    Example:
        >>> import pyarrow as pa
        >>> open_table(pa.table({"x": [1.0, 2.0], "id": ["a", "b"]}), ids="id").columns
        ['x']
    """
    module = type(x).__module__
    if module.startswith("pyarrow"):
        return Table(x.to_pandas(), ids, what="your Arrow table")
    if module.startswith("dask"):
        return Table(x, ids, lazy=True, what="your Dask DataFrame")
    if isinstance(x, (str, os.PathLike)):
        import dask.dataframe as dd

        if not Path(x).exists():
            raise NbtoolError(f"input {x}: the Parquet file or folder does not exist. Fix: "
                              f"check the path (the working directory is {os.getcwd()}).")
        try:
            frame = dd.read_parquet(str(x))
        except Exception as e:   # pyarrow raises several types for a foreign file
            raise NbtoolError(f"input {x}: cannot read it as Parquet ({type(e).__name__}: "
                              f"{e}). Fix: write it with df.to_parquet(path).") from None
        return Table(frame, ids, lazy=True, what=f"the Parquet data {x}")
    return Table(x, ids)
