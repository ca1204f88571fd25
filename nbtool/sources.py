"""Inputs, split into chunks without copying them in the client.

A source knows its rows (count, row shape, dtype) and hands each (model, chunk) task a
reference to its rows, never a copy:

- an ndarray (or a list of rows) is scattered once to the workers that need it; each task
  slices it there. On a local cluster the engine hands it over instead as one ``.npy``
  file in shared memory (:class:`SharedArraySource`) that every worker maps;
- a path to a ``.npy`` file is memory-mapped by each worker, which reads only its slice;
  the client reads nothing but the header;
- a ``.zarr`` array (a path, or a zarr array object) is read by each worker, its slice only;
  the client reads the metadata;
- a folder of images (a path, or :func:`images` to set size, colour and scale) is listed
  by the client; workers decode and resize their own files;
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
from .wire import ImageFiles, NpyFile, ZarrRef


def read_rows(data: Any, start: int, stop: int | None) -> np.ndarray:
    """Rows ``start:stop`` of ``data`` (an array or a file reference), on a worker.

    Example:
        >>> read_rows(np.arange(10), 2, 5)
        array([2, 3, 4])
    """
    if isinstance(data, NpyFile):
        return np.asarray(np.load(data.path, mmap_mode="r")[start:stop])
    if isinstance(data, ZarrRef):
        import zarr

        return np.asarray(zarr.open_array(data.store, path=data.path or None, mode="r")[start:stop])
    if isinstance(data, ImageFiles):
        return _decode_images(data, start, stop)
    return data[start:stop]


def _decode_images(ref: ImageFiles, start: int, stop: int | None) -> np.ndarray:
    from PIL import Image

    h, w = ref.size
    files = ref.files[start:stop]
    channels = 1 if ref.color == "L" else 3
    out = np.empty((len(files), h, w, channels), np.float32)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert(ref.color).resize((w, h), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32)
        except OSError as e:
            raise NbtoolError(f"image file {f}: cannot decode it ({e}). Fix: remove or "
                              "replace the file, or move it out of the folder.") from None
        out[i] = arr.reshape(h, w, channels) * ref.scale
    return out


class Source:
    """Rows to predict on; subclasses say where they live.

    Example:
        >>> as_source(np.zeros((5, 2), "float32")).describe()
        'your array of shape (5, 2) and dtype float32'
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

    def fingerprint(self) -> str:
        """Changes when the rows change: how a result store knows its input."""
        raise NotImplementedError

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row once read (what a chunk costs a worker per row)."""
        return int(np.prod(self.row_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class ArraySource(Source):
    """An in-memory ndarray: scattered once, sliced on the workers."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.n_rows, self.row_shape, self.dtype = len(array), array.shape[1:], array.dtype

    def describe(self):
        return f"your array of shape {self.array.shape} and dtype {self.dtype}"

    def chunk_args(self, client, workers, chunk_size):
        # One copy per worker that needs it, sent once; every chunk is then a slice there.
        # hash=False: the same array sent twice must not collide with a released key.
        data = client.scatter(self.array, workers=workers, broadcast=True, hash=False)
        return [(data, a, b) for a, b in self.chunk_bounds(chunk_size)]

    def fingerprint(self):
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.array.shape}{self.array.dtype}".encode())
        h.update(np.ascontiguousarray(self.array).view(np.uint8).reshape(-1))
        return "array:" + h.hexdigest()


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

    def fingerprint(self):
        st = os.stat(self.path)
        return f"npy:{self.path}:{st.st_size}:{st.st_mtime_ns}"


class SharedArraySource(NpySource):
    """An ndarray handed to *local* workers through one file in shared memory.

    Written once (to ``/dev/shm`` when it has room, else the engine's work folder, which
    the page cache shares just as well) and memory-mapped by every worker: no pickling,
    no copy per worker over sockets, as scattering would make. Only for workers on this
    machine; the file goes when the run is collected.

    Example:
        >>> import tempfile
        >>> src = SharedArraySource(np.arange(8, dtype="float32").reshape(4, 2),
        ...                         tempfile.mkdtemp())
        >>> ref, start, stop = src.chunk_args(None, [], 2)[1]
        >>> ref                                        # doctest: +ELLIPSIS
        NpyFile(path='.../input-....npy')
        >>> read_rows(ref, start, stop).tolist()
        [[4.0, 5.0], [6.0, 7.0]]
        >>> src.describe()
        'your array of shape (4, 2) and dtype float32'
        >>> src.cleanup()
    """

    def __init__(self, array: np.ndarray, folder: str | os.PathLike):
        import uuid

        self.array = array
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"input-{uuid.uuid4().hex[:12]}.npy"
        np.save(path, array)
        super().__init__(path)

    def describe(self):
        # The file is how the rows travel, not what the user passed: never name it.
        return ArraySource.describe(self)

    def fingerprint(self):
        return ArraySource(self.array).fingerprint()

    def cleanup(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def shared_folder(fallback: str | os.PathLike, nbytes: int) -> Path:
    """``/dev/shm/nbtool-<pid>`` if it has room for ``nbytes`` twice over, else ``fallback``.

    The folder is this user's alone (0700). ``/dev/shm`` is writable by everyone, so a
    folder of that name that another user made first, or a symlink planted there, is
    never used: the input then goes to ``fallback`` (the engine's private work folder).

    Example:
        >>> shared_folder("/tmp", 10**18)   # nothing has room for an exabyte
        PosixPath('/tmp')
    """
    import shutil
    import stat

    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 2 * nbytes:
            folder = shm / f"nbtool-{os.getpid()}"
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError:
                pass
            st = os.lstat(folder)   # lstat: a symlink is not followed, it is refused
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() \
                    and stat.S_IMODE(st.st_mode) & 0o077 == 0:
                return folder
    except OSError:
        pass
    return Path(fallback)


class ZarrSource(Source):
    """A zarr array: the client reads its metadata; workers read their own slices."""

    def __init__(self, array):
        self.array = array
        self.n_rows, self.row_shape, self.dtype = (int(array.shape[0]), tuple(array.shape[1:]),
                                                   np.dtype(array.dtype))
        root = getattr(array.store, "root", None)
        # A local store travels as its path; an in-memory one has to travel as the array.
        self.ref = ZarrRef(str(root), array.path) if root is not None else array

    def describe(self):
        return f"a zarr array of shape {(self.n_rows, *self.row_shape)} and dtype {self.dtype}"

    def chunk_args(self, client, workers, chunk_size):
        return [(self.ref, a, b) for a, b in self.chunk_bounds(chunk_size)]

    def fingerprint(self):
        if isinstance(self.ref, ZarrRef):
            root = Path(self.ref.store) / self.ref.path
            newest = max((f.stat().st_mtime_ns for f in root.rglob("*") if f.is_file()),
                         default=0)
            return f"zarr:{root}:{self.n_rows}:{self.row_shape}:{self.dtype}:{newest}"
        from dask.base import tokenize

        return "zarr-memory:" + tokenize(np.asarray(self.array[:]))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageFolderSource(Source):
    """Image files in a folder (sorted by name), decoded and resized on the workers."""

    def __init__(self, folder, size: tuple[int, int] | None = None, color: str = "RGB",
                 scale: float = 1.0):
        root = Path(folder)
        files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputMismatch(None, None, f"image files ({', '.join(IMAGE_SUFFIXES)}) in "
                                f"{folder}", "none", "check the folder, or pass an array")
        if color not in ("RGB", "L"):
            raise ValueError(f"color={color!r}: expected 'RGB' or 'L' (grayscale).")
        if size is None:   # the first image's size: only its header is read
            from PIL import Image

            try:
                with Image.open(files[0]) as im:
                    size = (im.height, im.width)
            except OSError as e:
                raise NbtoolError(f"image file {files[0]}: cannot read it ({e}). Fix: remove "
                                  "the file or pass size=(height, width).") from None
        self.folder, self.files = str(root), tuple(files)
        self.ref = ImageFiles(self.files, tuple(int(v) for v in size), color, float(scale))
        self.n_rows = len(files)
        self.row_shape = (*self.ref.size, 1 if color == "L" else 3)
        self.dtype = np.dtype("float32")

    def describe(self):
        return f"{self.n_rows} images in {self.folder} (read as {self.row_shape})"

    def chunk_args(self, client, workers, chunk_size):
        # Each task gets only its own file names, not the whole list.
        return [(dataclasses.replace(self.ref, files=self.files[a:b]), 0, b - a)
                for a, b in self.chunk_bounds(chunk_size)]

    def fingerprint(self):
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.ref.size, self.ref.color, self.ref.scale)).encode())
        for f in self.files:
            st = os.stat(f)
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return "images:" + h.hexdigest()


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

    def fingerprint(self):
        from dask.base import tokenize

        return "dask:" + tokenize(self.array)


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
            found, fix = _describe_objects(arr)
            raise InputMismatch(None, None, "a numeric array", found, fix)
        src = ArraySource(arr) if arr.ndim else None
        if src is None:
            raise InputMismatch(None, None, "an array with a first axis of rows",
                                f"a scalar {arr!r}", "pass an array like x[None] for one row")
    return _checked(src)


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


def _describe_objects(arr: np.ndarray) -> tuple[str, str]:
    """What an object array holds, and the fix: (found, fix) for an InputMismatch."""
    if arr.ndim == 0:
        item = arr.item()
        return (f"an object of type {type(item).__name__}",
                f"pass {_INPUTS}, e.g. np.asarray(rows, dtype='float32')")
    sample = arr.reshape(-1)[:1000]
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
