"""What every predictor shares: one fixed batch shape, prepared once, run over rows in
batches (the last one padded), with each output's row shape and dtype learned at warm-up.

A runtime's predictor (:class:`~nbtool.worker.runtimes.predictors.CompiledPredictor` for TensorFlow,
:class:`~nbtool.worker.runtimes.litert.LiteRTPredictor`,
:class:`~nbtool.worker.runtimes.openvino.OpenVINOPredictor`) says only how it prepares itself for the
batch size (:meth:`FixedBatchPredictor.prepare`: trace, allocate, compile) and how it runs
one batch (:meth:`FixedBatchPredictor.run_batch`); the rest is here, the same for all.

Example:
    >>> class Doubler(FixedBatchPredictor):
    ...     def prepare(self):
    ...         self.prepared += 1
    ...     def run_batch(self, batch):
    ...         return [batch * 2]
    >>> p = Doubler(4, (2,), "float32")
    >>> p(np.ones((5, 2), "float32"))[0].shape, p.traces, p.output_specs
    ((5, 2), 1, [((2,), 'float32')])
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable

import numpy as np

from nbtool.errors import BatchAxisMismatch, ChunkCancelled
from nbtool.signature import row_count, take_rows
from nbtool.wire import numpy_dtype
from nbtool.worker.environment import tensorflow


def run_in_batches(rows, batch_size: int, dtype, run_batch: Callable[[np.ndarray], list],
                   model: str | None = None, path: str | None = None) -> list[np.ndarray]:
    """``run_batch`` on every ``batch_size`` rows (as ``dtype``), the last batch padded with
    zeros; returns one array per output, the padding rows dropped.

    ``rows`` is an array, or a dict of arrays by input name for a model with several
    inputs (``dtype`` then a dict too): each batch is then a dict of batches in step.
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
        >>> two = {"a": np.ones((3, 1)), "b": np.arange(3.0)[:, None]}
        >>> run_in_batches(two, 2, {"a": "float32", "b": "float32"},
        ...                lambda b: [b["a"] + b["b"]])[0].ravel().tolist()
        [1.0, 2.0, 3.0]
    """
    parts: list[list[np.ndarray]] = []
    cancelled = cancellation_check()
    for start in range(0, row_count(rows), batch_size):
        if cancelled():   # Dask cannot stop a running task: it stops itself, between batches
            raise ChunkCancelled()
        batch = take_rows(rows, start, start + batch_size)
        m = row_count(batch)
        batch = {k: padded(v, batch_size, dtype[k]) for k, v in batch.items()} \
            if isinstance(batch, dict) else padded(batch, batch_size, dtype)
        outs = [np.asarray(y) for y in run_batch(batch)]
        check_batch_axis(outs, batch_size, model, path)
        parts.append([y[:m] for y in outs])
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def padded(rows, batch_size: int, dtype) -> np.ndarray:
    """``rows`` as ``dtype`` (text as fixed-width unicode), padded with zeros (empty
    strings) to ``batch_size`` rows: one input shape, never a retrace.

    Example:
        >>> padded(np.ones((1, 2)), 3, "float32").tolist()
        [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
        >>> padded(np.array(["hi"], object), 2, "string").tolist()
        ['hi', '']
    """
    batch = np.asarray(rows, dtype=numpy_dtype(dtype))
    if len(batch) < batch_size:
        out = np.zeros((batch_size, *batch.shape[1:]), batch.dtype)
        out[:len(batch)] = batch
        batch = out
    return batch


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


class FixedBatchPredictor:
    """Rows in, one float array per output out, in row order, through one fixed batch shape.

    Subclasses implement :meth:`prepare` (count each preparation in ``self.prepared``) and
    :meth:`run_batch`. A predictor that was never warmed up (the batch sweep's) warms itself
    up at its first call. ``serial`` predictors hold one set of tensors (an interpreter, an
    infer request), so their calls never overlap.

    Example:
        >>> p = CompiledPredictor(model, batch_size=32, row_shape=(8,), dtype="float32")  # doctest: +SKIP
        >>> p(np.ones((70, 8), "float32"))[0].shape                                      # doctest: +SKIP
        (70, 3)
    """

    #: Whether calls must not overlap (one set of tensors per predictor).
    serial = True
    #: Whether a non-finite input row comes out non-finite, as in TensorFlow. A converted
    #: runtime may turn NaN into a plausible number (XNNPACK's max(NaN, 0) is 0): its rows
    #: with a NaN or inf input are set to NaN, so garbage in never looks like an answer.
    propagates_nan = False

    def __init__(self, batch_size: int, row_shape: tuple, dtype, preprocess=None,
                 name: str | None = None, path: str | None = None):
        self.name, self.path = name, path          # for errors: which model this is
        self.batch_size = int(batch_size)
        # Several inputs: a row shape and a dtype per input name (rows come as a dict).
        self.row_shape = {k: tuple(v) for k, v in row_shape.items()} \
            if isinstance(row_shape, dict) else tuple(row_shape)
        self.dtype = {k: numpy_dtype(v) for k, v in dtype.items()} \
            if isinstance(dtype, dict) else numpy_dtype(dtype)
        self.preprocess = preprocess
        self.output_specs: list[tuple[tuple, str]] = []
        self.batch_note: str | None = None         # why the batch is not what was asked
        self.prepared = 0
        self._warm = False
        self._lock = threading.Lock() if self.serial else contextlib.nullcontext()

    @property
    def traces(self) -> int:
        """How many times it was prepared (traced, allocated, compiled); 1 after warm-up."""
        return self.prepared

    def prepare(self) -> None:
        """Make it ready to run batches of ``batch_size`` rows."""
        raise NotImplementedError

    def run_batch(self, batch: np.ndarray) -> list[np.ndarray]:
        """One batch of exactly ``batch_size`` rows through the model: its outputs."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """Prepare for the batch size and run once on zeros, so the first real chunk pays
        nothing; records each output's row shape and dtype in ``output_specs``."""
        self._warm = True
        with self._lock:
            self.prepare()
        outs = self(zero_rows(self.row_shape, self.dtype, 1))
        self.output_specs = [(tuple(o.shape[1:]), str(o.dtype)) for o in outs]

    def __call__(self, rows) -> list[np.ndarray]:
        if not self._warm:   # e.g. the batch sweep's predictors: never warmed up
            self.warm_up()
        with self._lock:
            outs = run_in_batches(rows, self.batch_size, self.dtype, self.run_batch,
                                  self.name, self.path)
        if not self.propagates_nan and not isinstance(rows, dict) \
                and self.dtype.kind == "f" and len(rows):
            bad = ~np.isfinite(np.asarray(rows).reshape(len(rows), -1)).all(axis=1)
            if bad.any():
                for y in outs:
                    if y.dtype.kind == "f":
                        y[bad] = np.nan
        return outs


def zero_rows(row_shape, dtype, n: int):
    """``n`` rows of zeros (empty strings for text) of ``row_shape``, one size for each
    free dimension; a dict of them by input name for several inputs.

    Example:
        >>> zero_rows((None, 3), np.dtype("float32"), 2).shape
        (2, 1, 3)
        >>> {k: v.shape for k, v in zero_rows({"a": (2,), "b": ()}, {"a": "f4", "b": "f4"}, 1).items()}
        {'a': (1, 2), 'b': (1,)}
    """
    if isinstance(row_shape, dict):
        return {k: zero_rows(v, dtype[k], n) for k, v in row_shape.items()}
    shape = tuple(1 if d is None else d for d in row_shape)
    return np.zeros((n, *shape), numpy_dtype(dtype))


def eager_preprocess(preprocess, batch: np.ndarray) -> np.ndarray:
    """``preprocess`` (TensorFlow ops) run eagerly on one batch, for a runtime that runs
    the model alone: TensorFlow is started first with this worker's thread settings (a
    preprocess imports it on its own, and would start it with every core).

    Example:
        >>> eager_preprocess(lambda b: b * 2, np.ones(2))   # doctest: +SKIP
        array([2., 2.])
    """
    tensorflow()
    return np.asarray(preprocess(batch))


def as_float32(outputs) -> list[np.ndarray]:
    """Reduced-precision float outputs as float32, like every other model's; the rest as
    they are.

    Example:
        >>> [y.dtype.name for y in as_float32([np.ones(2, "float16"), np.ones(2, "int32")])]
        ['float32', 'int32']
    """
    outs = [np.asarray(y) for y in outputs]
    return [y.astype(np.float32) if y.dtype.kind == "f" and y.dtype != np.float32 else y
            for y in outs]
