"""The LiteRT runtime: ``.tflite`` files opened in LiteRT's interpreter, run as a predictor.

``open_tflite`` opens the flatbuffer in ``ai-edge-litert`` (no TensorFlow needed);
:class:`LiteRTPredictor` runs it the way
:class:`~nbtool.worker.runtimes.predictors.CompiledPredictor` runs a Keras model: one fixed batch
shape, the last batch padded, float32 outputs, with int8/uint8 inputs quantized and outputs
dequantized by the model's scale and zero point.

Example:
    >>> _dequantize(np.array([[-128, 127]], np.int8), {"quantization": (0.5, -128)}).tolist()
    [[0.0, 127.5]]
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

from nbtool._util import expects_gpu, native_logs_filtered
from nbtool.errors import ModelLoadError, first_line
from nbtool.wire import ModelSpec
from nbtool.worker.environment import worker_name
from nbtool.worker.runtimes.fixed_batch import (FixedBatchPredictor, eager_preprocess,
    run_in_batches)


class LiteRTPredictor(FixedBatchPredictor):
    """The fixed-batch predictor of a LiteRT model: its interpreter, one batch shape.

    The input tensor is resized to the batch size once (at warm-up) and the last, short
    batch is padded, as in the compiled path, so tensors are allocated once. A model with a
    batch size built in (mediapipe's, with reshapes that merge the batch axis) is resized
    only if that gives what its own batch gives; else it runs at its own batch, and
    ``batch_note`` says so. Every output's first axis is checked against the rows sent. Quantized
    (int8/uint8) inputs are quantized here with the model's scale and zero point, and
    quantized outputs come back dequantized as float32, like every other model's. A
    ``preprocess`` runs as eager TensorFlow ops on each batch before LiteRT.

    Example:
        >>> p = LiteRTPredictor(open_tflite(spec), 64, (8, 8, 1), "float32")  # doctest: +SKIP
        >>> p(np.ones((70, 8, 8, 1), "float32"))[0].dtype                       # doctest: +SKIP
        dtype('float32')
    """

    def __init__(self, model: "LiteRTModel", batch_size: int, row_shape: tuple, dtype: str,
                 preprocess=None, name: str | None = None, path: str | None = None):
        super().__init__(batch_size, row_shape, dtype, preprocess, name, path)
        self.model = model

    def prepare(self) -> None:
        """Resize the input tensor to the batch size and allocate the tensors."""
        it, inp = self.model.interpreter, self.model.input
        it.resize_tensor_input(inp["index"], [self.batch_size, *self.model.row_shape],
                               strict=False)
        with native_logs_filtered(expect_gpu=expects_gpu()):   # its XNNPACK "INFO" line
            it.allocate_tensors()
        self.prepared += 1

    def warm_up(self) -> None:
        """As every predictor's, but a model whose own batch is fixed keeps it unless
        resizing gives the same outputs (:meth:`_resizes_cleanly`)."""
        own = self.model.fixed_batch
        if own is not None and own != self.batch_size and not self._resizes_cleanly(own):
            self.batch_note = (f"runs {own} row(s) per call: its batch of {own} is built in "
                               f"and a batch of {self.batch_size} changed its outputs")
            self.batch_size = own
        self.prepared = 0    # the probe's allocations were part of warming up
        super().warm_up()

    def _resizes_cleanly(self, own: int) -> bool:
        """Whether a few distinct random rows give the same outputs (shapes, and values
        within 1e-5) at ``batch_size`` as at the model's ``own`` batch.

        A fixed batch in the file often means reshapes that merge the batch axis: resized,
        such a model runs but mixes rows or returns the wrong number of them.
        """
        rows = probe_rows(self.row_shape, self.dtype, min(3, self.batch_size))
        asked = self.batch_size

        def run():
            with self._lock:
                self.prepare()
                return run_in_batches(rows, self.batch_size, self.dtype, self.run_batch,
                                      self.name, self.path)
        try:
            resized = run()
        except Exception:   # the resized graph cannot even run: its own batch it is
            return False
        self.batch_size = own
        try:
            reference = run()
        finally:
            self.batch_size = asked
        return same_outputs(resized, reference)

    def run_batch(self, batch: np.ndarray) -> list[np.ndarray]:
        """Quantize, invoke, dequantize one batch."""
        m = self.model
        it, inp = m.interpreter, m.input
        if self.preprocess is not None:   # in-graph elsewhere; eager TF ops here
            batch = eager_preprocess(self.preprocess, batch)
        it.set_tensor(inp["index"], _quantize(batch, inp))
        it.invoke()
        return [_dequantize(it.get_tensor(o["index"]), o) for o in m.outputs]


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
    """A ``.tflite`` model opened in LiteRT's interpreter, with its one input's details.

    ``path`` is the flatbuffer it was read from; ``converted`` says whether this load made
    it from a Keras model (:mod:`~nbtool.worker.runtimes.to_litert`), and ``seconds`` what that (or
    reading it back) took.
    """

    interpreter: Any
    input: dict
    outputs: list[dict]
    row_shape: tuple      # the model's own input row shape (what the tensor is resized to)
    fixed_batch: int | None = None   # the batch built into the file, if not resizable (-1)
    path: str | None = None
    converted: bool = False
    seconds: float = 0.0


def open_tflite(spec: ModelSpec, path: str | None = None) -> LiteRTModel:
    """Open ``spec``'s ``.tflite`` file (or the flatbuffer at ``path``, a conversion of
    ``spec``'s model) in LiteRT's interpreter (``ai-edge-litert``); no TensorFlow.

    It uses as many threads as TensorFlow does in this worker (``NBTOOL_TF_THREADS``), so
    comparisons with the Keras original are fair. Outputs come in the order the model's
    signature numbers them (``output_0, output_1, ...``, Keras' order) when it has one:
    the interpreter's own tensor order is not the model's.

    Example:
        >>> open_tflite(spec).input["dtype"]   # doctest: +SKIP
        <class 'numpy.int8'>
    """
    from ai_edge_litert.interpreter import Interpreter

    path = path or spec.path
    threads = int(os.environ.get("NBTOOL_TF_THREADS", "0") or 0) or None
    try:
        it = Interpreter(model_path=path, num_threads=threads)
    except ValueError as e:
        raise ModelLoadError(spec.name, path, worker_name(),
                             f"LiteRT cannot open it ({first_line(str(e))})",
                             "check that the file is a complete .tflite flatbuffer (download "
                             "or copy it again); if it is someone else's, ask its publisher "
                             "for one this LiteRT reads, and if it is yours, convert it again "
                             "with tf.lite.TFLiteConverter or eng.optimize") from None
    inputs, outputs = it.get_input_details(), signature_order(it, it.get_output_details())
    if len(inputs) != 1:
        raise ModelLoadError(spec.name, path, worker_name(),
                             f"the model takes {len(inputs)} inputs",
                             "nbtool runs single-input models; convert one that takes one "
                             "tensor")
    sig = inputs[0].get("shape_signature")
    shape = inputs[0]["shape"] if sig is None or not len(sig) else sig
    row_shape = tuple(None if int(d) < 0 else int(d) for d in shape[1:])
    fixed_batch = int(shape[0]) if len(shape) and int(shape[0]) > 0 else None
    return LiteRTModel(it, inputs[0], outputs, row_shape, fixed_batch, path)


def signature_order(interpreter, outputs: list[dict]) -> list[dict]:
    """``outputs`` (the interpreter's details) in the order of the model's one signature,
    when it numbers them ``output_0, output_1, ...`` (a Keras or SavedModel conversion);
    else as they are.

    Example:
        >>> class It:
        ...     def _get_full_signature_list(self):
        ...         return {"serve": {"outputs": {"output_1": 7, "output_0": 9}}}
        >>> [o["index"] for o in signature_order(It(), [{"index": 7}, {"index": 9}])]
        [9, 7]
    """
    try:
        signatures = interpreter._get_full_signature_list()
    except Exception:   # an older interpreter, or a file without signatures
        return outputs
    if len(signatures) != 1:
        return outputs
    named = next(iter(signatures.values())).get("outputs") or {}
    numbers = {name: re.fullmatch(r"output_(\d+)", name) for name in named}
    by_index = {o["index"]: o for o in outputs}
    if len(named) != len(outputs) or not all(numbers.values()) \
            or set(named.values()) != set(by_index):
        return outputs
    order = sorted(named, key=lambda name: int(numbers[name].group(1)))
    return [by_index[named[name]] for name in order]


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
