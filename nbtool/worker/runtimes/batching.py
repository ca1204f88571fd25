"""Run rows through a fixed-batch function: the last, short batch padded, outputs joined.

Compiled graphs (``tf.function`` with one input signature) and LiteRT interpreters (tensors
allocated once) both take exactly ``batch_size`` rows; padding the last batch means they
never retrace or reallocate.

Example:
    >>> import numpy as np
    >>> run_in_batches(np.arange(5.0)[:, None], 2, "float32", lambda b: [b * 2])[0].ravel()
    array([0., 2., 4., 6., 8.], dtype=float32)
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from nbtool.errors import BatchAxisMismatch, ChunkCancelled


def run_in_batches(rows, batch_size: int, dtype, run_batch: Callable[[np.ndarray], list],
                   model: str | None = None, path: str | None = None) -> list[np.ndarray]:
    """``run_batch`` on every ``batch_size`` rows (as ``dtype``), the last batch padded with
    zeros; returns one array per output, the padding rows dropped.

    Every output's first axis must be the rows sent: a model that merges or fixes its batch
    axis would otherwise give outputs of the wrong shape (or wrong rows) without a word, so
    it raises :class:`~nbtool.errors.BatchAxisMismatch` naming ``model`` and ``path``.

    Example:
        >>> import numpy as np
        >>> seen = []
        >>> out = run_in_batches(np.ones((3, 1)), 2, "float32",
        ...                      lambda b: seen.append(len(b)) or [b.sum(axis=1)])
        >>> seen, out[0].tolist()
        ([2, 2], [1.0, 1.0, 1.0])
    """
    dtype = np.dtype(dtype)
    parts: list[list[np.ndarray]] = []
    cancelled = cancellation_check()
    for start in range(0, len(rows), batch_size):
        if cancelled():   # Dask cannot stop a running task: it stops itself, between batches
            raise ChunkCancelled()
        batch = np.asarray(rows[start:start + batch_size], dtype=dtype)
        m = len(batch)
        if m < batch_size:   # pad: one input shape, no retracing
            padded = np.zeros((batch_size, *batch.shape[1:]), dtype)
            padded[:m] = batch
            batch = padded
        outs = [np.asarray(y) for y in run_batch(batch)]
        check_batch_axis(outs, batch_size, model, path)
        parts.append([y[:m] for y in outs])
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def cancellation_check() -> Callable[[], bool]:
    """A cheap question for the Dask task running in this thread: "was I cancelled?".

    A cancelled task that has started runs to its end, and its result is thrown away; a
    chunk of a quarter of a worker's memory kept that worker busy for ~50 s after the user
    cancelled, and the next run on it waited without a word. Outside a Dask task the
    answer is always no.

    Example:
        >>> cancellation_check()()
        False
    """
    try:
        from distributed.worker import get_worker, thread_state

        key = getattr(thread_state, "key", None)
        tasks = get_worker().state.tasks if key is not None else None
    except (ImportError, ValueError):   # not in a Dask worker's task thread
        tasks = None
    if tasks is None:
        return lambda: False
    # Read without the worker's lock: one dict lookup, atomic under the GIL.
    return lambda: getattr(tasks.get(key), "state", "forgotten") in (
        "cancelled", "released", "forgotten")


def check_batch_axis(outputs: list[np.ndarray], rows: int, model: str | None = None,
                     path: str | None = None) -> None:
    """Raise :class:`~nbtool.errors.BatchAxisMismatch` unless every output has ``rows``
    rows first (the batch that was sent, padding included).

    Example:
        >>> check_batch_axis([np.zeros((4, 3))], 4)
        >>> check_batch_axis([np.zeros((1, 8, 3))], 4, "pose", "pose.tflite")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.BatchAxisMismatch: model 'pose' (pose.tflite) returned output 0 of shape (1, 8, 3) for a batch of 4 rows; ...
    """
    for i, y in enumerate(outputs):
        if y.ndim == 0 or y.shape[0] != rows:
            raise BatchAxisMismatch(model, path, i, rows, y.shape)
