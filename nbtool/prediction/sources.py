"""The kinds of input (sources): where the rows live and how each task gets its own.

Which kind an input becomes, and the checks on it, are :mod:`nbtool.prediction.inputs`' business. A
source knows its rows (count, row shape, dtype) and hands each (model, chunk) task a
reference to its rows, never a copy:

- an ndarray (or a list of rows) is scattered once to the workers that need it; each task
  slices it there. On a local cluster the engine hands it over instead as one ``.npy``
  file in shared memory (:class:`SharedArraySource`) that every worker maps;
- a path to a ``.npy`` file is memory-mapped by each worker, which reads only its slice;
  the client reads nothing but the header;
- a ``.zarr`` array (a path, or a zarr array object) is read by each worker, its slice only;
  the client reads the metadata;
- a folder of images (a path, or :func:`nbtool.images` to set size, colour and scale) is
  listed by the client; workers decode and resize their own files;
- a Dask array contributes its blocks (row-wise), computed wherever Dask likes.

Example:
    >>> src = ArraySource(np.zeros((10, 3)))
    >>> src.n_rows, src.row_shape, src.chunk_bounds(4)
    (10, (3,), [(0, 4), (4, 8), (8, 10)])
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from nbtool.errors import InputMismatch, NbtoolError
from nbtool.wire import ImageFiles, NpyFile, SeveralInputs, ZarrRef


class Source:
    """Rows to predict on; subclasses say where they live.

    Example:
        >>> ArraySource(np.zeros((5, 2), "float32")).describe()
        'your array of shape (5, 2) and dtype float32'
    """

    n_rows: int
    row_shape: tuple
    dtype: np.dtype
    #: The rows' labels (a table's index or ``ids=``), for ``Prediction.to_pandas``.
    row_ids = None

    def describe(self) -> str:
        """How an error names these rows (what the user passed, never a file of ours)."""
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

    def task_args(self, model: str, args: tuple) -> tuple:
        """What the task of ``model`` gets for one chunk of :meth:`chunk_args` (the same
        for every model, but with several inputs: :class:`SeveralSource`)."""
        return args

    def scattered(self, args: list[tuple]) -> list:
        """The data each chunk of :meth:`chunk_args` refers to (scattered arrays among
        them are released with the run)."""
        return [data for data, _, _ in args]

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row once read (what a chunk costs a worker per row)."""
        return int(np.prod(self.row_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class ArraySource(Source):
    """An in-memory ndarray: scattered once, sliced on the workers.

    Example:
        >>> src = ArraySource(np.arange(6.0).reshape(3, 2))
        >>> src.describe(), src.row_nbytes, src.fingerprint().startswith("array:")
        ('your array of shape (3, 2) and dtype float64', 16, True)
    """

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
    """A ``.npy`` file: the client reads its header; workers map their own slices.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.npy"
        >>> np.save(path, np.zeros((5, 3), "float32"))
        >>> src = NpySource(path)
        >>> src.n_rows, src.chunk_args(None, [], 2)[-1]     # doctest: +ELLIPSIS
        (5, (NpyFile(path='.../x.npy'), 4, 5))
    """

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
        >>> np.load(ref.path)[start:stop].tolist()       # what a worker reads
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
        """Remove the file (when the run that reads it is over)."""
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

    from nbtool._util import private_folder

    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 2 * nbytes:
            # Not narrowed: a folder of ours that others could write may hold their files.
            return private_folder(shm / f"nbtool-{os.getpid()}", narrow=False)
    except OSError:   # NotPrivate too: someone else's, or a symlink (refused, not followed)
        pass
    return Path(fallback)


class ZarrSource(Source):
    """A zarr array: the client reads its metadata; workers read their own slices.

    Example:
        >>> import zarr
        >>> z = zarr.create_array(store={}, shape=(6, 2), chunks=(3, 2), dtype="float32")
        >>> src = ZarrSource(z)          # in memory: it travels as the array itself
        >>> src.describe(), len(src.chunk_args(None, [], 4))
        ('a zarr array of shape (6, 2) and dtype float32', 2)
    """

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
    """Image files in a folder (sorted by name), decoded and resized on the workers.

    Example:
        >>> import pathlib, tempfile
        >>> from PIL import Image
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(3):
        ...     Image.new("L", (4, 4)).save(folder / f"{i}.png")
        >>> src = ImageFolderSource(folder, color="L")
        >>> src.row_shape, [len(ref.files) for ref, _, _ in src.chunk_args(None, [], 2)]
        ((4, 4, 1), [2, 1])
    """

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


class DaskSource(Source):
    """A Dask array: one chunk per block of rows (rechunked to ``chunk_size`` if given).

    Example:
        >>> import dask.array as da
        >>> src = DaskSource(da.zeros((10, 3), chunks=4))
        >>> src.natural_chunk_size(), src.chunk_bounds(5)
        (4, [(0, 5), (5, 10)])
    """

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
        """The rows of the array's largest block: the chunk when the user gives none."""
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


class SeveralSource(Source):
    """Several inputs in step (a model's inputs, a table's columns): named parts, each a
    :class:`Source` of the same rows, chunked together; each model of the run is bound
    to the parts it takes (``bindings``: model -> its input names -> part keys, or one
    part key for a model of one input).

    Every chunk travels as one :class:`~nbtool.wire.SeveralInputs` of all the parts'
    references; :meth:`task_args` gives each model only its own, by its input names.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> src = SeveralSource({"img": SharedArraySource(np.zeros((5, 2, 2)), folder),
        ...                      "meta": SharedArraySource(np.ones((5, 3)), folder)},
        ...                     {"m": {"image": "img", "meta": "meta"}, "solo": "meta"})
        >>> src.n_rows, src.row_nbytes, src.describe()
        (5, 56, "inputs 'img' (your array of shape (5, 2, 2) and dtype float64), 'meta' (your array of shape (5, 3) and dtype float64)")
        >>> data, start, stop = src.task_args("m", src.chunk_args(None, [], 4)[1])
        >>> data.names, start, stop
        (('image', 'meta'), 4, 5)
        >>> src.task_args("solo", src.chunk_args(None, [], 4)[1])[1:]
        (4, 5)
        >>> src.cleanup()
    """

    def __init__(self, parts: dict[str, Source], bindings: dict, row_ids=None,
                 what: str = "inputs"):
        counts = {k: p.n_rows for k, p in parts.items()}
        if len(set(counts.values())) > 1:
            raise InputMismatch(None, None, "the same number of rows in every input",
                                ", ".join(f"{k!r}: {n:,} rows" for k, n in counts.items()),
                                "give every input one row per example (the rows of one "
                                "example at the same position in each)")
        self.parts, self.bindings, self.row_ids, self.what = dict(parts), bindings, row_ids, what
        self.n_rows = next(iter(counts.values()))
        first = next(iter(self.parts.values()))
        self.row_shape, self.dtype = first.row_shape, first.dtype

    @property
    def row_nbytes(self) -> int:
        return sum(p.row_nbytes for p in self.parts.values())

    def describe(self):
        return f"{self.what} " + ", ".join(f"{k!r} ({p.describe()})" for k, p in self.parts.items())

    def chunk_bounds(self, chunk_size):
        # Dask parts are rechunked to chunk_size: their blocks fall on these bounds too.
        return Source.chunk_bounds(self, chunk_size)

    def chunk_args(self, client, workers, chunk_size):
        per_part = [p.chunk_args(client, workers, chunk_size) for p in self.parts.values()]
        keys = tuple(self.parts)
        return [(SeveralInputs(keys, tuple(chunk), a), a, b)
                for chunk, (a, b) in zip(zip(*per_part), self.chunk_bounds(chunk_size))]

    def task_args(self, model: str, args: tuple) -> tuple:
        """What the task of ``model`` gets for one chunk of :meth:`chunk_args`: its one
        part's ``(data, start, stop)``, or its inputs' parts as one SeveralInputs."""
        data, start, stop = args
        binding = self.bindings[model]
        by_key = dict(zip(data.names, data.parts))
        if not isinstance(binding, dict):
            return by_key[binding]
        return (SeveralInputs(tuple(binding), tuple(by_key[k] for k in binding.values()),
                              data.start), start, stop)

    def scattered(self, args: list[tuple]) -> list:
        """The data every chunk refers to (scattered arrays are released with the run)."""
        return [d for data, _, _ in args for d, _, _ in data.parts]

    def fingerprint(self):
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        for k, p in self.parts.items():
            h.update(f"{k}={p.fingerprint()};".encode())
        return "several:" + h.hexdigest()

    def cleanup(self) -> None:
        """Remove the parts' shared files (when the run that reads them is over)."""
        for p in self.parts.values():
            getattr(p, "cleanup", lambda: None)()
