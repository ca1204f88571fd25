"""The LiteRT runtime: ``.tflite`` files opened in LiteRT's interpreter, run as a predictor.

``open_tflite`` opens the flatbuffer in ``ai-edge-litert`` (no TensorFlow needed);
:class:`LiteRTPredictor` runs it the way
:class:`~nbtool.worker.predictors.CompiledPredictor` runs a Keras model: one fixed batch
shape, the last batch padded, float32 outputs, with int8/uint8 inputs quantized and outputs
dequantized by the model's scale and zero point.

Example:
    >>> _dequantize(np.array([[-128, 127]], np.int8), {"quantization": (0.5, -128)}).tolist()
    [[0.0, 127.5]]
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import numpy as np

from ..errors import ModelLoadError, first_line
from ..wire import ModelSpec
from .batching import run_in_batches
from .runtime import worker_name


class LiteRTPredictor:
    """The :class:`CompiledPredictor` of a ``.tflite`` model: LiteRT's interpreter, one
    fixed batch shape.

    The input tensor is resized to the batch size once (at warm-up) and the last, short
    batch is padded, as in the compiled path, so tensors are allocated once. A model with a
    batch size built in (mediapipe's, with reshapes that merge the batch axis) is resized
    only if that gives what its own batch gives; else it runs at its own batch, and
    ``batch_note`` says so. Every output's first axis is checked against the rows sent. Quantized
    (int8/uint8) inputs are quantized here with the model's scale and zero point, and
    quantized outputs come back dequantized as float32, like every other model's.

    Example:
        >>> p = LiteRTPredictor(open_tflite("cnn@int8.tflite"), 64, (8, 8, 1), "float32")  # doctest: +SKIP
        >>> p(np.ones((70, 8, 8, 1), "float32"))[0].dtype                                   # doctest: +SKIP
        dtype('float32')
    """

    def __init__(self, model: "LiteRTModel", batch_size: int, row_shape: tuple, dtype: str,
                 preprocess=None, name: str | None = None, path: str | None = None):
        self.model = model
        self.name, self.path = name, path          # for errors: which model this is
        self.batch_note: str | None = None         # why the batch is not what was asked
        self.batch_size = int(batch_size)
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.preprocess = preprocess
        self.output_specs: list[tuple[tuple, str]] = []
        self._allocations = 0
        # One interpreter holds one set of tensors: calls must not overlap.
        self._lock = threading.Lock()

    @property
    def traces(self) -> int:
        """How many times tensors were allocated; stays at 1 after warm-up."""
        return self._allocations

    def _allocate(self) -> None:
        it, inp = self.model.interpreter, self.model.input
        it.resize_tensor_input(inp["index"], [self.batch_size, *self.model.row_shape],
                               strict=False)
        it.allocate_tensors()
        self._allocations += 1

    def warm_up(self) -> None:
        """Allocate the tensors for the batch size and run once on zeros; records each
        output's row shape and dtype in ``output_specs``. A model whose own batch is fixed
        keeps it unless resizing gives the same outputs (:meth:`_resizes_cleanly`)."""
        own = self.model.fixed_batch
        if own is not None and own != self.batch_size and not self._resizes_cleanly(own):
            self.batch_note = (f"runs {own} row(s) per call: its batch of {own} is built in "
                               f"and a batch of {self.batch_size} changed its outputs")
            self.batch_size = own
        self._allocations = 0    # the probe's allocations were part of warming up
        with self._lock:
            self._allocate()
        shape = tuple(1 if d is None else d for d in self.row_shape)
        outs = self(np.zeros((1, *shape), self.dtype))
        self.output_specs = [(tuple(o.shape[1:]), str(o.dtype)) for o in outs]

    def _resizes_cleanly(self, own: int) -> bool:
        """Whether a few distinct random rows give the same outputs (shapes, and values
        within 1e-5) at ``batch_size`` as at the model's ``own`` batch.

        A fixed batch in the file often means reshapes that merge the batch axis: resized,
        such a model runs but mixes rows or returns the wrong number of them.
        """
        rows = probe_rows(self.row_shape, self.dtype, min(3, self.batch_size))
        asked = self.batch_size
        try:
            with self._lock:
                self._allocate()
            resized = self(rows)
        except Exception:   # the resized graph cannot even run: its own batch it is
            return False
        self.batch_size = own
        try:
            with self._lock:
                self._allocate()
            reference = self(rows)
        finally:
            self.batch_size = asked
        return same_outputs(resized, reference)

    def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        if not self._allocations:   # e.g. the batch sweep's predictors: never warmed up
            self.warm_up()
        m = self.model
        it, inp = m.interpreter, m.input

        def run_batch(batch):
            if self.preprocess is not None:   # in-graph elsewhere; eager TF ops here
                batch = np.asarray(self.preprocess(batch))
            it.set_tensor(inp["index"], _quantize(batch, inp))
            it.invoke()
            return [_dequantize(it.get_tensor(o["index"]), o) for o in m.outputs]

        with self._lock:
            return run_in_batches(rows, self.batch_size, self.dtype, run_batch,
                                  self.name, self.path)


def probe_rows(row_shape: tuple, dtype, n: int) -> np.ndarray:
    """``n`` distinct, reproducible random rows (unknown sizes become 1): rows that show
    whether a model mixes them up.

    Example:
        >>> probe_rows((None, 2), "uint8", 3).shape
        (3, 1, 2)
    """
    rng = np.random.default_rng(0)
    shape = (n, *(1 if d is None else d for d in row_shape))
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def same_outputs(a: list[np.ndarray], b: list[np.ndarray], tol: float = 1e-5) -> bool:
    """Whether two runs' outputs have the same shapes and values within ``tol``.

    Example:
        >>> same_outputs([np.ones((2, 3))], [np.ones((2, 3)) + 1e-7]), same_outputs(
        ...     [np.ones((2, 3))], [np.ones((1, 6))])
        (True, False)
    """
    return len(a) == len(b) and all(
        x.shape == y.shape and np.allclose(x, y, rtol=tol, atol=tol, equal_nan=True)
        for x, y in zip(a, b))


@dataclasses.dataclass
class LiteRTModel:
    """A ``.tflite`` model opened in LiteRT's interpreter, with its one input's details."""

    interpreter: Any
    input: dict
    outputs: list[dict]
    row_shape: tuple      # the model's own input row shape (what the tensor is resized to)
    fixed_batch: int | None = None   # the batch built into the file, if not resizable (-1)


def open_tflite(spec: ModelSpec) -> LiteRTModel:
    """Open a ``.tflite`` file in LiteRT's interpreter (``ai-edge-litert``); no TensorFlow.

    It uses as many threads as TensorFlow does in this worker (``NBTOOL_TF_THREADS``), so
    comparisons with the Keras original are fair.

    Example:
        >>> open_tflite(spec).input["dtype"]   # doctest: +SKIP
        <class 'numpy.int8'>
    """
    from ai_edge_litert.interpreter import Interpreter

    threads = int(os.environ.get("NBTOOL_TF_THREADS", "0") or 0) or None
    try:
        it = Interpreter(model_path=spec.path, num_threads=threads)
    except ValueError as e:
        raise ModelLoadError(spec.name, spec.path, worker_name(),
                             f"LiteRT cannot open it ({first_line(str(e))})",
                             "check that the file is a complete .tflite flatbuffer (download "
                             "or copy it again); if it is someone else's, ask its publisher "
                             "for one this LiteRT reads, and if it is yours, convert it again "
                             "with tf.lite.TFLiteConverter or eng.optimize") from None
    inputs, outputs = it.get_input_details(), it.get_output_details()
    if len(inputs) != 1:
        raise ModelLoadError(spec.name, spec.path, worker_name(),
                             f"the model takes {len(inputs)} inputs",
                             "nbtool runs single-input models; convert one that takes one "
                             "tensor")
    sig = inputs[0].get("shape_signature")
    shape = inputs[0]["shape"] if sig is None or not len(sig) else sig
    row_shape = tuple(None if int(d) < 0 else int(d) for d in shape[1:])
    fixed_batch = int(shape[0]) if len(shape) and int(shape[0]) > 0 else None
    return LiteRTModel(it, inputs[0], outputs, row_shape, fixed_batch)


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float rows to a quantized input tensor (``q = round(x / scale) + zero_point``)."""
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail.get("quantization", (0.0, 0))
    if dtype.kind in "iu" and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    """A quantized output tensor back to float32 (``(q - zero_point) * scale``)."""
    scale, zero = detail.get("quantization", (0.0, 0))
    if y.dtype.kind in "iu" and scale:
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
    return y.astype(np.float32) if y.dtype.kind == "f" and y.dtype != np.float32 else y
