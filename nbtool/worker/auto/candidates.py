"""The runtimes a Keras model may run on, as opened on a worker: TensorFlow (the model
itself, and the reference the others are checked against), and its conversions (OpenVINO
IR, LiteRT float32), each with the files it is made of.

Example:
    >>> sorted(CONVERTERS)
    ['litert', 'openvino']
    >>> LABELS["openvino"]
    'OpenVINO IR'
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Callable

import numpy as np

from nbtool.wire import ModelSpec, is_text_dtype
from nbtool.worker.auto.agreement import check_rows
from nbtool.worker.loading import open_model
from nbtool.worker.runtimes import (LiteRTModel, OpenVINOModel, input_signature, ir_files,
    ir_note, open_litert, open_openvino, probe_rows)


@dataclasses.dataclass
class Opened:
    """A model opened for the runtime it will run on, ready to make predictors of.

    ``call``: the Keras model (or SavedModel callable) for TensorFlow, an
    :class:`~nbtool.worker.runtimes.openvino.OpenVINOModel` or a
    :class:`~nbtool.worker.runtimes.litert.LiteRTModel`; ``row_shape``/``dtype``: what the predictor
    takes (preprocess included); ``note``: why this runtime, and how it was prepared;
    ``predictor``: one already warmed up at the batch the choice timed, if any;
    ``batch``: the batch ``auto`` found fastest here (None: the user's, or the default).
    ``envelope``: for a conversion, the range of rows its agreement check saw.
    """

    call: Any
    row_shape: tuple
    dtype: str
    n_outputs: int | None
    weight_bytes: int
    runtime: str
    note: str | None = None
    predictor: Any = None
    own_shape: tuple = ()
    own_dtype: str = "float32"
    batch: int | None = None
    #: For a conversion: what its agreement check saw (rows unlike it are checked
    #: against TensorFlow as they run, :mod:`~nbtool.worker.auto.guard`).
    envelope: Any = None


def open_original(spec: ModelSpec, note: str | None = None) -> Opened:
    """``spec``'s file opened in its own format's runtime: TensorFlow (LiteRT for a
    ``.tflite``, OpenVINO for an ``.xml`` IR): what conversions are checked against.

    Example:
        >>> open_original(spec).runtime   # doctest: +SKIP
        'tensorflow'
    """
    call, own_shape, own_dtype, n_outputs, weight_bytes = open_model(spec)
    row_shape, dtype = input_signature(spec, own_shape, own_dtype)
    if spec.format == "openvino" and note is None:   # an IR file: the precision it runs in
        note = ir_note(call)
    return Opened(call, row_shape if isinstance(row_shape, dict) else tuple(row_shape),
                  dtype, n_outputs, weight_bytes,
                  {"tflite": "litert", "openvino": "openvino"}.get(spec.format, "tensorflow"),
                  note,
                  own_shape=own_shape if isinstance(own_shape, dict) else tuple(own_shape),
                  own_dtype=dtype_name(own_dtype))


def dtype_name(dtype) -> str:
    """A dtype as a plain name (``"float32"``), whatever framework's object it is.

    Several inputs' dtypes (a dict by input name) give a dict of names; text is
    ``"string"``.

    Example:
        >>> dtype_name(np.float32), dtype_name("uint8"), dtype_name({"t": "string"})
        ('float32', 'uint8', {'t': 'string'})
    """
    if isinstance(dtype, dict):
        return {k: dtype_name(v) for k, v in dtype.items()}
    name = getattr(dtype, "name", dtype)
    if is_text_dtype(name):
        return "string"
    try:
        return np.dtype(name).name
    except TypeError:   # bfloat16 has no numpy dtype
        return str(name)


def convert_openvino(spec: ModelSpec, tf_model: Opened) -> OpenVINOModel:
    """The OpenVINO IR of the model TensorFlow opened (converted, or read from the cache)."""
    return open_openvino(spec, tf_model.call, tf_model.own_shape, tf_model.own_dtype)


def convert_litert(spec: ModelSpec, tf_model: Opened) -> LiteRTModel:
    """The float32 LiteRT flatbuffer of the model TensorFlow opened (or the cached one)."""
    return open_litert(spec, tf_model.call)


#: The conversions a Keras model may run as, by runtime name.
CONVERTERS: dict[str, Callable[[ModelSpec, Opened], Any]] = {
    "openvino": convert_openvino, "litert": convert_litert}
#: How notes name each conversion.
LABELS = {"openvino": "OpenVINO IR", "litert": "LiteRT float32"}


def artifact_files(artifact) -> list[str]:
    """The files a conversion is made of (what its record's sha256 covers).

    Example:
        >>> artifact_files(object())
        []
    """
    if isinstance(artifact, OpenVINOModel):
        return ir_files(artifact.ir_path)
    if isinstance(artifact, LiteRTModel) and artifact.path:
        return [artifact.path]
    return []


def discard(artifact) -> None:
    """Remove a conversion's cached folder: it disagreed with TensorFlow, and must not be
    read back by a later load (that one converts again).

    Example:
        >>> discard(object())   # not a conversion: nothing to remove
    """
    files = artifact_files(artifact)
    if files:
        shutil.rmtree(os.path.dirname(files[0]), ignore_errors=True)


def reference_outputs(reference, row_shape: tuple, dtype,
                      sample: np.ndarray | None) -> tuple[np.ndarray, str, list]:
    """The check rows (:func:`~nbtool.worker.auto.agreement.check_rows`), how to name them, and
    TensorFlow's outputs on them. If TensorFlow fails on the user's rows (a model that
    refuses some inputs), random rows are checked instead: the chunk itself will fail, or
    not, on its own.

    Example:
        >>> rows, what, want = reference_outputs(lambda r: [r * 2], (2,), "float32", None)
        >>> what, want[0].shape
        ('64 random rows', (64, 2))
    """
    rows, what = check_rows(row_shape, dtype, sample)
    try:
        return rows, what, reference(rows)
    except Exception:
        if sample is None and np.dtype(dtype).kind not in "biu":
            raise
    rows = probe_rows(row_shape, dtype, len(rows))
    if np.dtype(dtype).kind not in "biu":
        return rows, f"{len(rows)} random rows", reference(rows)
    try:
        return rows, f"{len(rows)} random rows", reference(rows)
    except Exception:   # ids out of a small vocabulary (an Embedding of fewer than 100)
        rows = rows % 2
        return rows, f"{len(rows)} random rows of 0s and 1s", reference(rows)
