"""Reading a chunk's rows on a worker: from memory, a ``.npy`` file, zarr or image files,
and a piece ahead of the compute when they come from a file.

A chunk that lives in a file (``.npy`` on disk, zarr, a folder of images) costs a read
(page-in, decompression, decoding) before it can compute. Reading it in pieces, one piece
ahead on a reader thread, hides that read behind the compute of the piece before: the
reader's work (Pillow, zarr's codecs, page faults) and TensorFlow's kernels both run
without the GIL. Arrays already in memory are not split: they have nothing to hide.

Example:
    >>> rows = np.arange(10)
    >>> compute = lambda part: [part * 2]
    >>> overlapped(lambda a, b: read_rows(rows, a, b), [(0, 4), (4, 8), (8, 10)], compute)[0]
    array([ 0,  2,  4,  6,  8, 10, 12, 14, 16, 18])
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import os
import threading
from typing import Any, Callable, Sequence

import numpy as np

from nbtool.errors import NbtoolError
from nbtool.wire import ImageFiles, NpyFile, SeveralInputs, ZarrRef


def read_rows(data: Any, start: int, stop: int | None) -> np.ndarray | dict:
    """Rows ``start:stop`` of ``data`` (an array or a file reference), on a worker; for
    :class:`~nbtool.wire.SeveralInputs`, a dict of each input's rows by name.

    Example:
        >>> read_rows(np.arange(10), 2, 5)
        array([2, 3, 4])
        >>> read_rows(SeveralInputs(("a", "b"), ((np.arange(10), 4, 8), (np.ones(4), 0, None))), 1, 3)
        {'a': array([5, 6]), 'b': array([1., 1.])}
    """
    if isinstance(data, SeveralInputs):   # each part's rows count from its own start
        a, b = start - data.start, None if stop is None else stop - data.start
        return {name: read_rows(part, first + a, None if b is None else first + b)
                for name, (part, first, _) in zip(data.names, data.parts)}
    if isinstance(data, NpyFile):
        return np.asarray(np.load(data.path, mmap_mode="r")[start:stop])
    if isinstance(data, ZarrRef):
        import zarr

        return np.asarray(zarr.open_array(data.store, path=data.path or None, mode="r")[start:stop])
    if isinstance(data, ImageFiles):
        return decode_images(data, start, stop)
    return data[start:stop]


def decode_images(ref: ImageFiles, start: int, stop: int | None) -> np.ndarray:
    """Image files ``start:stop`` of ``ref``, decoded, converted and resized as it says.

    Example:
        >>> decode_images(ImageFiles((), (8, 8), color="L"), 0, None).shape
        (0, 8, 8, 1)
    """
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


# -- read-ahead ---------------------------------------------------------------------------
#: Batches per piece: small enough that the first, unhidden read is short; big enough that
#: handing a piece between threads costs nothing against it.
PIECE_BATCHES = 4

_READER: ThreadPoolExecutor | None = None
_READER_LOCK = threading.Lock()


def read_ahead_enabled() -> bool:
    """Read-ahead is on unless ``NBTOOL_PREFETCH=0`` (for measuring it against off).

    Example:
        >>> read_ahead_enabled() in (True, False)
        True
    """
    return os.environ.get("NBTOOL_PREFETCH", "1") != "0"


def pieces(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """``start:stop`` cut into pieces of ``size`` rows (the last may be shorter).

    Example:
        >>> pieces(10, 25, 6)
        [(10, 16), (16, 22), (22, 25)]
    """
    size = max(1, int(size))
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


def overlapped(read: Callable[[int, int], np.ndarray], bounds: Sequence[tuple[int, int]],
               compute: Callable[[np.ndarray], list[np.ndarray]]) -> list[np.ndarray]:
    """``compute`` over each piece ``read(a, b)``, reading piece k+1 while k computes;
    returns the outputs of every piece joined in order (one array per output).

    Errors from ``read`` or ``compute`` are raised here, as if called in turn.

    Example:
        >>> overlapped(lambda a, b: np.ones(b - a), [(0, 3), (3, 5)], lambda p: [p, -p])[1]
        array([-1., -1., -1., -1., -1.])
    """
    pool = _reader()
    parts: list[list[np.ndarray]] = []
    ahead = pool.submit(read, *bounds[0])
    for k in range(len(bounds)):
        rows = ahead.result()
        if k + 1 < len(bounds):
            ahead = pool.submit(read, *bounds[k + 1])
        parts.append(compute(rows))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def _reader() -> ThreadPoolExecutor:
    """One reader thread per worker process: reads queue behind each other, as a disk
    would make them anyway, and never compete with the compute for more than one core."""
    global _READER
    with _READER_LOCK:
        if _READER is None:
            _READER = ThreadPoolExecutor(1, thread_name_prefix="nbtool-read-ahead")
        return _READER


def read_file_ahead(path: str) -> None:
    """Ask the OS to read ``path`` (a file, or every file of a folder) into its page cache
    in the background, so the model this worker loads next reads from memory: called
    while the current model computes. Best effort: a path that cannot be read is left to
    the load, which says why.

    Example:
        >>> read_file_ahead("/nowhere/model.keras")
    """
    def advise():
        files = [path] if not os.path.isdir(path) else [
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except (OSError, AttributeError):   # not Linux: the load reads it then
                pass
            finally:
                os.close(fd)
    threading.Thread(target=advise, name="nbtool-read-model-ahead", daemon=True).start()
