"""Read the next piece of a chunk while the current one computes.

A chunk that lives in a file (``.npy`` on disk, zarr, a folder of images) costs a read
(page-in, decompression, decoding) before it can compute. Reading it in pieces, one piece
ahead on a reader thread, hides that read behind the compute of the piece before: the
reader's work (Pillow, zarr's codecs, page faults) and TensorFlow's kernels both run
without the GIL. Arrays already in memory are not split: they have nothing to hide.

Example:
    >>> import numpy as np
    >>> rows = np.arange(10)
    >>> compute = lambda part: [part * 2]
    >>> overlapped(lambda a, b: rows[a:b], [(0, 4), (4, 8), (8, 10)], compute)[0]
    array([ 0,  2,  4,  6,  8, 10, 12, 14, 16, 18])
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

#: Batches per piece: small enough that the first, unhidden read is short; big enough that
#: handing a piece between threads costs nothing against it.
PIECE_BATCHES = 4

_READER: ThreadPoolExecutor | None = None
_READER_LOCK = threading.Lock()


def enabled() -> bool:
    """Read-ahead is on unless ``NBTOOL_PREFETCH=0`` (for measuring it against off).

    Example:
        >>> enabled() in (True, False)
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
