"""What nbtool takes as input, and the checks on it before anything is scheduled.

:func:`as_source` wraps what the user passes (an ndarray or a list of rows, a ``.npy`` or
``.zarr`` path, a folder of images or :func:`images`, a zarr or Dask array) as one of the
:mod:`nbtool.prediction.sources` kinds, and refuses anything else by what it is, saying what to pass
instead. :func:`check_fits` holds a source against a model's input signature;
:func:`resolve_chunk_size` picks the rows per chunk, or checks the user's.

Example:
    >>> src = as_source(np.zeros((10, 3)))
    >>> src.n_rows, src.row_shape, src.chunk_bounds(4)
    (10, (3,), [(0, 4), (4, 8), (8, 10)])
    >>> resolve_chunk_size(None, src, n_workers=2)
    10
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from nbtool.errors import InputMismatch, NbtoolError
from nbtool.prediction.sources import (ArraySource, DaskSource, ImageFolderSource, NpySource,
    SeveralSource, Source, ZarrSource)
from nbtool.wire import ModelSpec, is_text_dtype

#: Default chunks per worker: enough to balance replicas and overlap, few enough that the
#: per-task overhead (a few ms) stays small against the work.
CHUNKS_PER_WORKER = 4
MIN_DEFAULT_CHUNK = 256


def as_source(x: Any) -> Source:
    """Wrap an input as a :class:`Source`.

    ``x`` is an ndarray or a list of rows; a path to a ``.npy`` file; a path to a zarr
    array (ending in ``.zarr``, or a folder holding zarr metadata) or a zarr array object;
    a path to a folder of images (``.png``, ``.jpg``...; :func:`images` sets their size);
    a Dask array; or a :class:`Source` already made. Raises
    :class:`~nbtool.errors.InputMismatch` for inputs with no rows or that are not rows
    (None, a dict, a generator, a zarr group: the error says what to pass instead) and
    :class:`~nbtool.errors.NbtoolError` for paths it cannot read.

    Example:
        >>> type(as_source([[1.0, 2.0], [3.0, 4.0]])).__name__
        'ArraySource'
        >>> import dask.array as da
        >>> src = as_source(da.zeros((10, 3), chunks=4))
        >>> type(src).__name__, src.chunk_bounds(4)
        ('DaskSource', [(0, 4), (4, 8), (8, 10)])
        >>> as_source(np.float32(1.0))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.InputMismatch: the input expects an array with a first axis of rows...
    """
    if isinstance(x, Source):
        return x
    if isinstance(x, (str, os.PathLike)):
        p = Path(x)
        # zarr.json: zarr 3; .zarray/.zgroup: zarr 2 (a folder without ".zarr" in its name).
        if p.suffix.lower() == ".zarr" or (p.is_dir() and any(
                (p / m).exists() for m in ("zarr.json", ".zarray", ".zgroup"))):
            return _checked(ZarrSource(_open_zarr(p)))
        if p.is_dir():
            return _checked(ImageFolderSource(p))
        if p.suffix.lower() != ".npy":
            raise NbtoolError(
                f"input {x}: nbtool reads .npy files, .zarr arrays and folders of images; "
                f"got a path ending in {p.suffix or '(no suffix)'!r}. Fix: "
                "np.save('input.npy', array) and pass that path, or pass the array itself.")
        if not p.exists():
            raise NbtoolError(f"input {x}: the file does not exist. Fix: check the path "
                              f"(the working directory is {os.getcwd()}).")
        src: Source = NpySource(p)
    elif _is_dask_array(x):
        src = DaskSource(x)
    elif type(x).__module__.startswith("zarr"):
        if hasattr(x, "array_keys"):   # a zarr Group: its arrays are the inputs, not it
            raise _zarr_group_refusal(x)
        src = ZarrSource(x)
    else:
        _refuse_non_arrays(x)
        try:
            arr = np.asarray(x)
        except ValueError as e:
            raise InputMismatch(None, None, "rows of one shape (a rectangular array)",
                                f"a ragged sequence ({e})",
                                "pad or crop the rows to one shape first") from None
        if arr.dtype == object:
            found, fix = describe_objects(arr)
            raise InputMismatch(None, None, "a numeric array", found, fix)
        src = ArraySource(arr) if arr.ndim else None
        if src is None:
            raise InputMismatch(None, None, "an array with a first axis of rows",
                                f"a scalar {arr!r}", "pass an array like x[None] for one row")
    return _checked(src)


def images(folder: str | os.PathLike, size: tuple[int, int] | None = None,
           color: str = "RGB", scale: float = 1.0) -> ImageFolderSource:
    """A folder of image files as an input; workers decode and resize them.

    ``size`` is (height, width), by default the first image's; ``color`` is ``"RGB"`` or
    ``"L"``; pixel values (0-255) are multiplied by ``scale``.

    Example:
        >>> import pathlib, tempfile
        >>> from PIL import Image
        >>> photos = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("cat.jpg", "dog.png"):
        ...     Image.new("RGB", (640, 480)).save(photos / name)
        >>> src = images(photos, size=(224, 224), scale=1 / 255)
        >>> src.n_rows, src.row_shape
        (2, (224, 224, 3))
        >>> res = eng.predict("cnn", src)       # doctest: +SKIP
    """
    return ImageFolderSource(folder, size, color, scale)


#: What every "not an input" refusal says nbtool takes.
_INPUTS = "an array of rows (an ndarray, a .npy or .zarr path, a zarr or Dask array)"


def _refuse_non_arrays(x: Any) -> None:
    """Refuse, by what they are, the inputs ``np.asarray`` would turn into one object.

    Without this, None, a dict or a generator all became a 0-d object array and were
    called "ragged rows", which sends the user looking in the wrong place.
    """
    from collections.abc import Iterator, Mapping
    from types import GeneratorType

    if x is None:
        raise InputMismatch(None, None, _INPUTS, "None",
                            "check that the variable (or the cell's last expression) holds "
                            "the data; a function that only prints returns None")
    if isinstance(x, Mapping):
        keys = list(x)
        shown = repr(keys[:10])[:-1] + (", ...]" if len(keys) > 10 else "]")
        pick = f"x[{keys[0]!r}]" if keys else "one of its arrays"
        raise InputMismatch(None, None, _INPUTS, f"a dict with keys {shown}",
                            f"pass one of its arrays, e.g. {pick}")
    if isinstance(x, Iterator):   # rows must be counted and shaped before anything runs
        gen = isinstance(x, GeneratorType)
        what = "a generator" if gen else f"an iterator ({type(x).__name__})"
        raise InputMismatch(None, None, _INPUTS, what,
                            f"pass np.stack(list({'gen' if gen else 'it'})) or an array "
                            "(nbtool needs the row count and row shape up front)")
    columns, dtypes = getattr(x, "columns", None), getattr(x, "dtypes", None)
    if columns is not None and dtypes is not None and not isinstance(x, np.ndarray):
        # A DataFrame (pandas, polars...): name the columns that are not numbers.
        bad = [c for c, dt in zip(list(columns), list(dtypes)) if not _numeric_dtype(dt)]
        if bad:
            raise InputMismatch(
                None, None, "a numeric array", f"a DataFrame with non-numeric columns {bad}",
                "select numeric columns or use df.to_numpy(dtype='float32')")


def _numeric_dtype(dt: Any) -> bool:
    """Whether a column dtype (numpy's, pandas', or another library's) holds numbers."""
    kind = getattr(dt, "kind", None)
    if isinstance(kind, str):
        return kind in "biuf"
    name = str(dt).lower()   # e.g. polars: Float32, Int64, Boolean, String
    return name.startswith(("float", "int", "uint", "bool"))


def describe_objects(arr: np.ndarray) -> tuple[str, str]:
    """What an object array holds, and the fix: (found, fix) for an InputMismatch.

    Example:
        >>> describe_objects(np.array([1.0, None], dtype=object))[0]
        'an array holding None among its values (missing data?)'
    """
    if arr.ndim == 0:
        item = arr.item()
        return (f"an object of type {type(item).__name__}",
                f"pass {_INPUTS}, e.g. np.asarray(rows, dtype='float32')")
    sample = arr.reshape(-1)[:1000]
    if any(type(v).__name__ in ("NAType", "NaTType") for v in arr.reshape(-1)):
        # pandas' nullable columns (Float32, Int64...) hold pd.NA, which numpy cannot
        # turn into a number: np.asarray(x, dtype='float32') itself fails on it.
        return ("a table holding pandas' missing value <NA> (a nullable column such as "
                "Float32 or Int64)",
                "turn the missing values into NaN first: x.to_numpy(dtype='float32', "
                "na_value=np.nan) (their rows then predict NaN), or x.fillna(0) / x.dropna()")
    if any(v is None for v in sample):
        return ("an array holding None among its values (missing data?)",
                "fill or drop the missing values first, e.g. np.nan for a missing number")
    text = next((v for v in sample if isinstance(v, (str, bytes))), None)
    if text is not None:
        return (f"an array holding text such as {text!r}",
                "convert the text to numbers first, or select the numeric columns")
    if any(isinstance(v, (list, tuple, np.ndarray)) for v in sample):
        return ("an array of Python objects holding sequences (rows of different shapes?)",
                "pad or crop the rows to one shape first")
    types = sorted({type(v).__name__ for v in sample})
    return (f"an array of Python objects ({', '.join(types[:5])})",
            "convert them to numbers first, e.g. np.asarray(x, dtype='float32')")


def _zarr_group_refusal(group: Any, path: Path | None = None) -> InputMismatch:
    """A zarr group is a folder of arrays: say which arrays it has and how to pick one."""
    arrays, groups = sorted(group.array_keys()), sorted(group.group_keys())
    what = f"a zarr group at {path}" if path is not None else "a zarr group"
    if arrays:
        found = f"{what} holding the arrays {arrays}"
        fix = (f"pass one array's path, e.g. '{path / arrays[0]}', or zarr.open_group(...)"
               f"[{arrays[0]!r}]" if path is not None else
               f"pass one array, e.g. group[{arrays[0]!r}]")
    else:
        found = what + " holding no arrays" + (f" (its groups: {groups})" if groups else "")
        fix = ("pick an array inside one of its groups, e.g. group['sub']['x']" if groups
               else "write the rows to an array in it first")
    return InputMismatch(None, None, "a zarr array (rows along its first axis)", found, fix)


def _checked(src: Source) -> Source:
    if src.n_rows == 0:
        raise InputMismatch(None, None, "at least one row", f"{src.describe()} with no rows",
                            "check how the input was selected")
    return src


def _open_zarr(p: Path):
    import zarr

    try:
        return zarr.open_array(str(p), mode="r")
    except Exception as e:   # zarr raises several types for a missing or foreign store
        try:
            group = zarr.open_group(str(p), mode="r")
        except Exception:
            group = None   # neither an array nor a group: the message below says so
        if group is not None:
            raise _zarr_group_refusal(group, p) from None
        raise NbtoolError(f"input {p}: cannot open it as a zarr array ({type(e).__name__}: "
                          f"{e}). Fix: check the path; a zarr group needs the array's path, "
                          "e.g. zarr.open_group(p)['x'].") from None


def _is_dask_array(x) -> bool:
    return type(x).__module__.startswith("dask.array") and hasattr(x, "to_delayed")


# -- checks before a run ---------------------------------------------------------------
def check_fits(spec: ModelSpec, source: Source) -> None:
    """Raise :class:`InputMismatch` if the input's rows or dtype do not fit the model
    (each of its inputs, for a model of several).

    Nothing is scheduled before this passes. Unknown dimensions (``None``) match anything;
    a model with ``preprocess`` is not checked (the preprocessing may reshape).

    Example:
        >>> spec = ModelSpec("mlp", "mlp.h5", "h5", 1, "x", input_shape=(None, 8),
        ...                  input_dtype="float32")
        >>> check_fits(spec, as_source(np.zeros((4, 3))))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.InputMismatch: model 'mlp' (mlp.h5) expects rows of shape (8,)...
    """
    pre = spec.preprocess
    if pre is not None and getattr(pre, "input_dtype", None) is not None:
        _check_preprocess_input(spec, pre, source)
        return
    if pre is not None or spec.input_shape is None and not spec.inputs:
        return
    if isinstance(source, SeveralSource):
        binding = source.bindings[spec.name]
        if isinstance(binding, dict):
            for inp in spec.inputs:
                _check_rows(spec, inp.shape, inp.dtype, source.parts[binding[inp.name]],
                            f"input {inp.name!r}: ")
            return
        source = source.parts[binding]
    if spec.input_shape is None:
        return
    _check_rows(spec, spec.input_shape, spec.input_dtype, source)


def _check_rows(spec: ModelSpec, batch_shape: tuple, dtype: str | None, source: Source,
                which: str = "") -> None:
    """One input's rows (shape, then dtype) against what the model wants there."""
    want = tuple(batch_shape[1:])
    got = tuple(source.row_shape)
    fits = len(want) == len(got) and all(w is None or w == g for w, g in zip(want, got))
    if not fits:
        shown = tuple("?" if w is None else w for w in want)
        fix = _reshape_fix(tuple(want), got, source.n_rows)
        raise InputMismatch(spec.name, spec.path,
                            f"{which}rows of shape {shown} (batch shape {tuple(batch_shape)})",
                            f"rows of shape {got} from {source.describe()}", fix)
    if is_text_dtype(dtype or "float32") or np.dtype(source.dtype).kind in "USO":
        if is_text_dtype(dtype or "float32") != (np.dtype(source.dtype).kind in "USO"):
            want_text = is_text_dtype(dtype or "float32")
            raise InputMismatch(spec.name, spec.path,
                                f"{which}{'text (strings)' if want_text else f'{dtype} numbers'}",
                                f"{'numbers' if want_text else 'text'} from {source.describe()}",
                                "pass the strings themselves (a list, or an array of str)"
                                if want_text else "turn the text into numbers first (or "
                                "register a model whose input takes strings)")
        return
    want_dtype = np.dtype(dtype or "float32")
    if not np.can_cast(source.dtype, want_dtype, casting="same_kind"):
        raise InputMismatch(spec.name, spec.path, f"{which}{want_dtype} input",
                            f"{source.dtype} from {source.describe()}",
                            f"convert it first, e.g. x.astype('{want_dtype}')")


def _reshape_fix(want: tuple, got: tuple, n_rows: int) -> str:
    """The fix for rows of shape ``got`` where a model wants ``want``: a reshape only when
    one really gives whole rows, never one that would fail or scramble the values."""
    other = "pick a model made for this input"
    if None in want:
        return f"reshape the input to rows of that shape, or {other}"
    shape = ", ".join(map(str, want))
    row, per = math.prod(want), math.prod(got)
    if got and per == row:   # same values per row, other layout (e.g. images flattened)
        return f"reshape the input to rows of that shape, e.g. x.reshape(len(x), {shape})"
    if not got:   # a 1-D array: its n_rows values are one row, or several, or neither
        if n_rows == row:
            one = "x.reshape(1, -1) (or x[None])" if len(want) == 1 else \
                f"x.reshape(1, {shape})"
            return f"for one row, use {one}"
        if n_rows % row == 0:
            return (f"for {n_rows // row} rows of {row} values, use x.reshape(-1, {shape}), "
                    f"or {other}")
        return (f"your 1-D array has {n_rows} values, not a whole number of rows of {row}: "
                f"check how it was built, or {other}")
    return (f"your rows hold {per} values each and the model's hold {row}, so no reshape "
            f"fits: {other}, or check how the input was built")


def _check_preprocess_input(spec: ModelSpec, pre, source: Source) -> None:
    """Inputs for an in-graph preset: its dtype, and the model's rows (or any size if it
    resizes, with the model's channels)."""
    want = np.dtype(pre.input_dtype)
    if not np.can_cast(source.dtype, want, casting="safe"):
        raise InputMismatch(spec.name, spec.path, f"{want} input for its preprocessing "
                            f"{getattr(pre, 'name', pre)!r}", f"{source.dtype} from "
                            f"{source.describe()}", f"pass {want} pixels (0-255), or register "
                            "it without preprocess=")
    if spec.input_shape is None:
        return
    model_rows, got = tuple(spec.input_row_shape), tuple(source.row_shape)
    if getattr(pre, "resize", None) is not None:
        ok = len(got) == len(model_rows) and got[-1:] == model_rows[-1:]
    else:
        ok = len(got) == len(model_rows) and all(w is None or w == g
                                                 for w, g in zip(model_rows, got))
    if not ok:
        raise InputMismatch(spec.name, spec.path, f"rows of shape {model_rows}",
                            f"rows of shape {got} from {source.describe()}",
                            "resize the input, or use a preset with resize=(height, width)")


def default_chunk_size(n_rows: int, n_workers: int) -> int:
    """Rows per chunk when the user gives none.

    Example:
        >>> default_chunk_size(100_000, 2), default_chunk_size(100, 2)
        (12500, 100)
    """
    size = math.ceil(n_rows / (CHUNKS_PER_WORKER * max(n_workers, 1)))
    return int(min(n_rows, max(size, MIN_DEFAULT_CHUNK)))


def resolve_chunk_size(chunk_size, source: Source, n_workers: int,
                       max_chunk_bytes: int | None = None) -> int:
    """Validate a user's ``chunk_size`` (or pick one) for this source.

    ``max_chunk_bytes`` is what one chunk's rows may take on a worker; a default chunk is
    shrunk to fit it, a user's chunk that does not fit is refused with the size that does.

    Example:
        >>> src = as_source(np.zeros((100_000, 8), "float32"))
        >>> resolve_chunk_size(None, src, 2), resolve_chunk_size(None, src, 2, 32 * 1000)
        (12500, 1000)
        >>> resolve_chunk_size(0, src, 2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.InputMismatch: the input expects chunk_size to be a whole number...
    """
    fits = max(1, max_chunk_bytes // max(source.row_nbytes, 1)) if max_chunk_bytes else None
    if chunk_size is None:
        if isinstance(source, DaskSource):
            size = source.natural_chunk_size()
        else:
            size = default_chunk_size(source.n_rows, n_workers)
        return min(size, fits) if fits else size
    if fits and isinstance(chunk_size, (int, np.integer)) and not isinstance(chunk_size, bool) \
            and min(chunk_size, source.n_rows) > fits:
        raise InputMismatch(None, None, f"chunks that fit a worker's memory (at most {fits:,} "
                            f"rows of {source.row_nbytes:,} bytes)",
                            f"chunk_size={chunk_size:,}, {chunk_size * source.row_nbytes:,} "
                            "bytes a chunk", f"pass chunk_size={fits} or less")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise InputMismatch(None, None, "chunk_size to be a whole number of rows >= 1",
                            f"chunk_size={chunk_size!r}",
                            "pass e.g. chunk_size=1024, or leave it out to let nbtool pick")
    return int(min(chunk_size, source.n_rows))
