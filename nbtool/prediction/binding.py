"""Which rows each model of a run takes: one array for a model of one input; a list, a
dict or a table's columns for models of several inputs; text for models of text.

:func:`bind_input` turns what the user passes into the run's :class:`Source`, knowing the
models: a list whose length is the models' number of inputs is their inputs in order (else
it is rows); a dict is inputs by name; a table (:mod:`nbtool.prediction.frames`) gives each
input the column of its name (or what ``columns=`` maps to it), and a model of one input
``(k,)`` its k columns. Anything that does not fit is refused here, before anything is
scheduled, naming the model, its inputs and what was given.

Example:
    >>> from nbtool.signature import InputSpec
    >>> from nbtool.wire import ModelSpec
    >>> two = ModelSpec("two", "two.keras", "keras", 1, "1-1", input_shape=(None, 2),
    ...                 inputs=(InputSpec("image", (None, 2)), InputSpec("meta", (None, 3))))
    >>> src = bind_input({"meta": np.ones((4, 3)), "image": np.zeros((4, 2))}, [two])
    >>> src.bindings["two"], src.n_rows
    ({'image': 'image', 'meta': 'meta'}, 4)
    >>> bind_input(np.zeros((4, 2)), [two])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nbtool.errors.InputMismatch: model 'two' (two.keras) expects 2 inputs: 'image' (rows of (2,), float32), 'meta' (rows of (3,), float32)...
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from nbtool.errors import InputMismatch
from nbtool.prediction.inputs import as_source
from nbtool.prediction.sources import ArraySource, SeveralSource, Source
from nbtool.wire import ModelSpec, is_text_dtype


def bind_input(x: Any, specs: list[ModelSpec], columns: dict | None = None,
               ids: Any = None) -> Source:
    """The run's input ``x`` as a :class:`Source` every model in ``specs`` can take.

    ``columns`` maps an input's name to the table column (or list of columns) it takes;
    ``ids`` names the table column that labels the rows (else its index), or gives the
    labels of an array's rows.

    Example:
        >>> from nbtool.signature import InputSpec
        >>> from nbtool.wire import ModelSpec
        >>> text = ModelSpec("clf", "clf.keras", "keras", 1, "1-1", input_shape=(None, 1),
        ...                  input_dtype="string", inputs=(InputSpec("t", (None, 1), "string"),))
        >>> bind_input(["good film", "bad film"], [text]).array.tolist()
        [['good film'], ['bad film']]
    """
    several = [s for s in specs if s.several and s.preprocess is None]
    if several and isinstance(x, (str, os.PathLike)):
        x = _named_arrays(Path(x)) or x   # a .npz, or a zarr group: arrays by name
    if is_table(x):
        from nbtool.prediction.frames import open_table   # tables only: pandas, pyarrow

        return _bind_table(open_table(x, ids), specs, columns or {})
    if columns:
        raise InputMismatch(None, None, "a table (a DataFrame, an Arrow table or Parquet) "
                            "with columns=", f"columns= with {type(x).__name__}",
                            "pass the table itself, or leave columns= out")
    if isinstance(x, Mapping) and several:
        return _labelled(_bind_dict(x, specs), ids)
    if isinstance(x, (list, tuple)) and several and _is_input_list(x, several):
        return _labelled(_bind_list(x, specs), ids)
    if several:
        raise _several_refusal(several[0], x)
    return _labelled(_one_input(x, specs), ids)


def is_table(x: Any) -> bool:
    """Whether ``x`` is a table nbtool reads by column: a pandas, pyarrow or Dask
    DataFrame/Table, or a path to a ``.parquet`` file or a folder of them.

    Example:
        >>> import pandas as pd
        >>> is_table(pd.DataFrame({"a": [1]})), is_table(np.zeros(3)), is_table("x.parquet")
        (True, False, True)
    """
    module = type(x).__module__
    if module.startswith("pandas") and hasattr(x, "columns"):
        return True
    if module.startswith("pyarrow") and hasattr(x, "column_names"):
        return True
    if module.startswith("dask") and hasattr(x, "columns") and hasattr(x, "npartitions"):
        return True
    if isinstance(x, (str, os.PathLike)):
        p = Path(x)
        return p.suffix.lower() in (".parquet", ".pq") or (
            p.is_dir() and any(f.suffix.lower() in (".parquet", ".pq") for f in p.iterdir()))
    return False


def _named_arrays(p: Path) -> dict | None:
    """The arrays of a ``.npz`` file (read here) or a zarr group (read by the workers)
    by name; None for any other path."""
    if p.suffix.lower() == ".npz" and p.is_file():
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if p.is_dir() and ((p / ".zgroup").exists() or (p / "zarr.json").exists()):
        import zarr

        try:
            group = zarr.open_group(str(p), mode="r")
        except Exception:   # an array, not a group: as_source reads it
            return None
        return {k: group[k] for k in group.array_keys()}
    return None


def _one_input(x: Any, specs: list[ModelSpec]) -> Source:
    """An array (rows, a path...) for models of one input, text as fixed-width unicode."""
    text = [s for s in specs if _text(s)]
    if text and _is_strings(x):
        arr = np.asarray(x, dtype=object)
        bad = [v for v in arr.reshape(-1) if not isinstance(v, str)]
        if bad:
            raise InputMismatch(text[0].name, text[0].path, "text (strings)",
                                f"{len(bad)} values that are not strings (e.g. {bad[0]!r})",
                                "convert them with str(), or drop those rows")
        x = arr.astype(str)
    return _shaped(as_source(x), specs)


def _shaped(src: Source, specs: list[ModelSpec], name: str | None = None) -> Source:
    """One string per row for a text input of rows ``(1,)``: ``["a", "b"]`` is two rows."""
    arr = getattr(src, "array", None)
    if type(src) is ArraySource and arr.ndim == 1 and arr.dtype.kind in "US":
        wants = [_input(s, name) for s in specs]
        if any(i is not None and is_text_dtype(i.dtype) and i.row_shape == (1,)
               for i in wants):
            return ArraySource(arr[:, None])
    return src


def _input(spec: ModelSpec, name: str | None):
    """The input of ``spec`` called ``name`` (its first, for None), if known."""
    if not spec.inputs:
        return None
    return spec.inputs[0] if name is None else \
        next((i for i in spec.inputs if i.name == name), None)


def _text(spec: ModelSpec) -> bool:
    return bool(spec.inputs) and is_text_dtype(spec.inputs[0].dtype) and spec.preprocess is None


def _is_strings(x: Any) -> bool:
    """Whether ``x`` holds text: a list of str, or a numpy array of str or objects."""
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "USO"
    if isinstance(x, (list, tuple)) and x:
        first = x[0]
        while isinstance(first, (list, tuple)) and first:
            first = first[0]
        return isinstance(first, str)
    return False


def _is_input_list(x, several: list[ModelSpec]) -> bool:
    """Whether a list is the models' inputs in order (not rows): as long as their
    number of inputs, and made of arrays, paths or nested lists (a list of numbers is
    one row, never an input)."""
    if len(x) not in {len(s.inputs) for s in several}:
        return False
    return all(hasattr(v, "shape") or isinstance(v, (str, os.PathLike))
               or isinstance(v, (list, tuple)) and len(v) and not np.isscalar(v[0])
               or isinstance(v, (list, tuple)) and len(v) and isinstance(v[0], str)
               for v in x)


def _several_refusal(spec: ModelSpec, x: Any) -> InputMismatch:
    """A model of several inputs given one array (or something else)."""
    names = [i.name for i in spec.inputs]
    shown = type(x).__name__ if not hasattr(x, "shape") else \
        f"one array of shape {tuple(x.shape)}"
    example = ", ".join(f"{n!r}: {n}_rows" for n in names)
    return InputMismatch(spec.name, spec.path, _expects(spec), shown,
                         f"pass a dict by input name, {{{example}}}, or a list in this order "
                         f"[{', '.join(names)}]")


def _expects(spec: ModelSpec) -> str:
    return f"{len(spec.inputs)} inputs: " + ", ".join(i.describe() for i in spec.inputs)


def _bind_dict(x: Mapping, specs: list[ModelSpec]) -> SeveralSource:
    """Inputs by name: each model takes its inputs' names; every key must be used."""
    keys = [str(k) for k in x]
    bindings, used = {}, set()
    for spec in specs:
        names = [i.name for i in spec.inputs] if spec.inputs else []
        if spec.several:
            missing = [n for n in names if n not in keys]
            if missing:
                raise InputMismatch(spec.name, spec.path, _expects(spec),
                                    f"a dict with keys {keys}, missing {missing}",
                                    "add the missing inputs under those names (the names "
                                    "are the model's Input names)")
            bindings[spec.name] = {n: n for n in names}
            used.update(names)
        elif names and names[0] in keys:
            bindings[spec.name] = names[0]
            used.add(names[0])
        else:
            raise InputMismatch(spec.name, spec.path, f"one input{_named(names)}",
                                f"a dict with keys {keys}",
                                "run it apart, on one array, or name its input in the dict")
    extra = [k for k in keys if k not in used]
    if extra:
        expected = sorted(used)
        raise InputMismatch(specs[0].name if len(specs) == 1 else None,
                            specs[0].path if len(specs) == 1 else None,
                            f"inputs named {expected}", f"the extra keys {extra}",
                            f"drop them (a misspelt name? expected {expected})")
    parts = {}
    for k, v in x.items():
        k = str(k)
        try:
            views = [t for t in (_takes(s, k) for s in specs) if t is not None]
            parts[k] = _shaped(_one_input(v, views), views)
        except InputMismatch as e:
            raise InputMismatch(None, None, f"input {k!r} to be rows", str(e),
                                "see above") from None
    return _in_step(parts, bindings, specs)


def _in_step(parts: dict, bindings: dict, specs: list[ModelSpec]) -> SeveralSource:
    """The inputs as one source, or a refusal naming the model when their rows differ."""
    counts = {k: p.n_rows for k, p in parts.items()}
    if len(set(counts.values())) > 1:
        spec = next(s for s in specs if s.several)
        raise InputMismatch(spec.name, spec.path, f"{_expects(spec)}, with one row per "
                            "example in each", "inputs of different row counts: " +
                            ", ".join(f"{k!r} {n:,} rows" for k, n in counts.items()),
                            "give every input the same rows, in the same order")
    return SeveralSource(parts, bindings)


def _takes(spec: ModelSpec, name: str) -> ModelSpec | None:
    """``spec`` seen as a model of its input ``name`` only (for the text and shape rules
    of that input), or None if it has no input of that name."""
    one = _input(spec, name)
    return None if one is None else dataclasses.replace(spec, inputs=(one,))


def _named(names) -> str:
    return f" ({names[0]!r})" if names else ""


def _bind_list(x, specs: list[ModelSpec]) -> SeveralSource:
    """Inputs in order: position i is each model's input i."""
    bindings = {}
    for spec in specs:
        if not spec.several:
            raise InputMismatch(spec.name, spec.path, f"one input{_named(spec.input_names)}",
                                f"a list of {len(x)} inputs (for the other models)",
                                "run it apart from the models of several inputs")
        if len(spec.inputs) != len(x):
            raise InputMismatch(spec.name, spec.path, _expects(spec),
                                f"a list of {len(x)} inputs",
                                "give every model of the run its own inputs: run models "
                                "with different inputs apart")
    # Each position is named after the first model's input there (errors say 'meta').
    keys = [i.name for i in specs[0].inputs]
    for spec in specs:
        bindings[spec.name] = {i.name: keys[k] for k, i in enumerate(spec.inputs)}
    parts = {}
    for k, v in enumerate(x):
        views = [_takes(sp, sp.inputs[k].name) for sp in specs]
        parts[keys[k]] = _shaped(_one_input(v, views), views)
    return _in_step(parts, bindings, specs)


def _bind_table(table, specs: list[ModelSpec], columns: dict) -> SeveralSource:
    """Columns to inputs: by name (or ``columns=``); a model of one input ``(k,)`` takes
    k columns (all those no other input takes, in order). Unused columns are refused."""
    columns = {k: [v] if isinstance(v, str) else list(v) for k, v in columns.items()}
    bindings, groups, used = {}, {}, set()

    def group(cols: list[str]) -> str:
        key = cols[0] if len(cols) == 1 else "+".join(cols)
        groups.setdefault(key, cols)
        used.update(cols)
        return key

    for spec in specs:
        if spec.several:
            missing = [i.name for i in spec.inputs
                       if i.name not in columns and i.name not in table.columns]
            if missing:
                raise InputMismatch(spec.name, spec.path, _expects(spec),
                                    f"{table.what} with the columns {table.columns}, none "
                                    f"for {missing}", "add those columns, or map them: "
                                    f"columns={{{missing[0]!r}: 'column name', ...}}")
            bindings[spec.name] = {i.name: group(columns.get(i.name, [i.name]))
                                   for i in spec.inputs}
            continue
        name = spec.inputs[0].name if spec.inputs else None
        if name in columns or (name in table.columns and _width(spec) in (None, 1)):
            bindings[spec.name] = group(columns.get(name, [name]))
            continue
        bindings[spec.name] = None   # all the columns no input claims: decided below
    rest = [c for c in table.columns if c not in used]
    for spec in specs:
        if bindings[spec.name] is None:   # every column, else those no input claims
            width = _width(spec)
            cols = next((c for c in (table.columns, rest) if c and width in (None, len(c))),
                        None)
            if cols is None:
                shown = f"{len(table.columns)} columns {table.columns}" + \
                    (f" ({len(rest)} not taken by another model: {rest})" if used else "")
                raise InputMismatch(spec.name, spec.path, f"rows of {width} values "
                                    f"(input {spec.inputs[0].describe()})",
                                    f"{table.what} with {shown}",
                                    f"select {width} columns, e.g. df[[...]], map them with "
                                    f"columns={{{spec.inputs[0].name!r}: [...]}}, or name "
                                    "the row labels with ids='column'")
            bindings[spec.name] = group(list(cols))
    extra = [c for c in table.columns if c not in used]
    if extra:
        raise InputMismatch(None, None, "every column to be an input of a model",
                            f"the extra columns {extra} in {table.what}",
                            "drop them (df.drop(columns=[...])), pass the row labels as "
                            "ids='column', or map them to inputs with columns=")
    parts = {}
    for key, cols in groups.items():
        part = table.part(cols)
        wants = [i for s in specs for i in s.inputs
                 if (bindings[s.name] == key if not isinstance(bindings[s.name], dict)
                     else key in [bindings[s.name].get(i.name)])]
        if any(i.row_shape == () for i in wants) and len(cols) == 1 and \
                type(part) is ArraySource:
            part = ArraySource(part.array[:, 0])   # a scalar input: one value per row
        parts[key] = part
    return SeveralSource(parts, bindings, row_ids=table.row_ids, what="columns")


def _width(spec: ModelSpec) -> int | None:
    """How many values a row of a model of one input ``(k,)`` has (None: not that kind)."""
    shape = spec.inputs[0].row_shape if spec.inputs else spec.input_row_shape
    if shape is None or len(shape) != 1 or shape[0] is None:
        return None
    return int(shape[0])


def _labelled(src: Source, ids: Any) -> Source:
    """``src`` with ``ids`` as its rows' labels (checked: one per row)."""
    if ids is None:
        return src
    if isinstance(ids, str):
        raise InputMismatch(None, None, "ids= a column name only with a table (for an array: "
                            "one label per row)", f"ids={ids!r}",
                            "pass ids=list_of_labels, or a DataFrame")
    labels = np.asarray(ids)
    if len(labels) != src.n_rows:
        raise InputMismatch(None, None, f"one id per row ({src.n_rows:,})",
                            f"{len(labels):,} ids", "pass ids with one label per row")
    src.row_ids = labels
    return src

