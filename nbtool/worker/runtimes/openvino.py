"""The OpenVINO runtime: a Keras model or SavedModel converted on the worker to OpenVINO's
float32 IR, cached on disk per model fingerprint and OpenVINO version, run as a predictor.

:func:`open_openvino` converts once (``model.export`` to a SavedModel, then
``ov.convert_model``) and saves the IR under ``<machine cache>/openvino/``; a later load of
the same file with the same OpenVINO reads it back and skips the conversion.
:class:`OpenVINOPredictor` runs it the way
:class:`~nbtool.worker.runtimes.predictors.CompiledPredictor` runs a Keras model: one fixed batch, the
last batch padded, float32 outputs. It is compiled with ``INFERENCE_PRECISION_HINT=f32``:
on CPUs with avx512_bf16 OpenVINO's default is bf16, which is not exact.
:mod:`~nbtool.worker.auto.agreement` compares it with TensorFlow before it is used.

Example:
    >>> _output_order(["output_10", "output_2", "output_0"])
    [2, 1, 0]
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from nbtool.wire import ModelSpec
from nbtool.worker.environment import artifact_key, machine_folder
from nbtool.worker.runtimes.fixed_batch import (FixedBatchPredictor, as_float32,
    eager_preprocess)


@dataclasses.dataclass
class OpenVINOModel:
    """A model's OpenVINO IR, read and ready to compile at any batch size.

    ``converted`` says whether this load converted it (else the IR on disk was reused).
    """

    model: Any            # openvino.Model, its batch axis dynamic
    ir_path: str          # the .xml on disk (its weights beside it, .bin)
    row_shape: tuple      # the model's own input row shape (None: any size)
    dtype: str            # its input dtype
    converted: bool
    seconds: float        # what converting (or reading) took
    precision_hint: str = "f32"   # what it compiles with: "bf16" where an IR file asks for it


def openvino_version() -> str:
    """The installed OpenVINO's version, as the IR cache keys it (``2026.4.1``...).

    Example:
        >>> openvino_version()[:2].isdigit()
        True
    """
    return import_openvino().get_version().split("-")[0]


def import_openvino():
    """The ``openvino`` module, imported with its usage telemetry off.

    OpenVINO's converter sends usage events to Google Analytics unless told not to, and
    writes ``~/intel`` to remember a client id. A conversion nbtool makes on the user's
    behalf must not phone home or leave files in their home: with its telemetry package
    hidden, the converter falls back to its own no-op stub (``openvino.tools.ovc``
    imports it under ``try``/``except ImportError``).

    Example:
        >>> import_openvino().__name__
        'openvino'
    """
    import sys

    sys.modules.setdefault("openvino_telemetry", None)   # None: "import" raises ImportError
    import openvino as ov

    return ov


def ir_dir(spec: ModelSpec) -> str:
    """Where ``spec``'s IR is cached on this machine: one folder per model's bytes
    (:func:`~nbtool.worker.environment.artifact_key`) and OpenVINO version, so a re-saved file
    or an upgrade converts again.

    Example:
        >>> spec = ModelSpec("cnn", "/m/cnn.keras", "keras", 10, "10-1")
        >>> ir_dir(spec).split(os.sep)[-2:][0], ir_dir(spec).endswith("-10-1-" + openvino_version())
        ('openvino', True)
    """
    return os.path.join(machine_folder(), "openvino",
                        f"{artifact_key(spec)}-{openvino_version()}")


def open_openvino(spec: ModelSpec, model, row_shape: tuple, dtype) -> OpenVINOModel:
    """``spec``'s model as OpenVINO IR: read from the cache, else converted from ``model``
    (a Keras model; a SavedModel is converted from its directory) and saved there.

    Several workers may convert one model at once: each writes a folder of its own and
    renames it into place; the first rename wins and the others' are removed.

    Example:
        >>> ov_model = open_openvino(spec, keras_model, (8,), "float32")   # doctest: +SKIP
        >>> ov_model.converted                                           # doctest: +SKIP
        True
    """
    ov = import_openvino()

    t0 = time.perf_counter()
    final = ir_dir(spec)
    xml = os.path.join(final, "model.xml")
    converted = not os.path.exists(xml)
    if converted:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        work = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=".converting-")
        try:
            if spec.format == "savedmodel":
                source = spec.path
            else:
                source = os.path.join(work, "saved_model")
                model.export(source, format="tf_saved_model", verbose=False)
            ir = ov.convert_model(source)
            # save_model compresses weights to float16 by default: that is not exact
            # (up to 8e-4 off on a small convnet here); float32 it stays.
            ov.save_model(ir, os.path.join(work, "ir", "model.xml"), compress_to_fp16=False)
            try:
                os.rename(os.path.join(work, "ir"), final)
            except OSError:   # another worker's conversion landed first: use that one
                pass
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return read_ir(xml, row_shape, dtype, converted, t0)


def read_ir(xml: str, row_shape: tuple, dtype, converted: bool = False,
            started: float | None = None) -> OpenVINOModel:
    """The IR at ``xml`` (its weights beside it), read: no TensorFlow, no conversion.

    Example:
        >>> read_ir(ir_dir(spec) + "/model.xml", (8,), "float32").converted   # doctest: +SKIP
        False
    """
    t0 = time.perf_counter() if started is None else started
    ir = import_openvino().Core().read_model(xml)
    return OpenVINOModel(ir, xml, tuple(row_shape), np.dtype(dtype).name, converted,
                         time.perf_counter() - t0)


def ir_files(xml: str) -> list[str]:
    """The files an IR is made of: its graph (``.xml``) and its weights (``.bin``).

    Example:
        >>> ir_files("/c/openvino/x/model.xml")
        ['/c/openvino/x/model.xml', '/c/openvino/x/model.bin']
    """
    return [xml, os.path.splitext(xml)[0] + ".bin"]


class OpenVINOPredictor(FixedBatchPredictor):
    """The fixed-batch predictor of an OpenVINO IR: compiled once for one fixed batch shape
    on the CPU, in float32.

    It uses as many threads as TensorFlow does in this worker (``NBTOOL_TF_THREADS``).
    A ``preprocess`` runs as eager TensorFlow ops on each batch before OpenVINO (as for
    LiteRT): the IR is the model alone, so one IR serves every preprocessing.

    Example:
        >>> p = OpenVINOPredictor(open_openvino(spec, model, (8,), "float32"), 64, (8,), "float32")  # doctest: +SKIP
        >>> p(np.ones((70, 8), "float32"))[0].shape                                                # doctest: +SKIP
        (70, 3)
    """

    def __init__(self, model: OpenVINOModel, batch_size: int, row_shape: tuple, dtype: str,
                 preprocess=None, name: str | None = None, path: str | None = None):
        super().__init__(batch_size, row_shape, dtype, preprocess, name, path)
        self.model = model
        self._compiled = None
        self._order: list[int] = []

    def prepare(self) -> None:
        """Compile the IR for the batch size, in float32, and make its infer request."""
        ov = import_openvino()

        m = self.model.model.clone()
        shape = [self.batch_size, *(-1 if d is None else d for d in self.model.row_shape)]
        m.reshape({m.inputs[0]: ov.PartialShape(shape)})
        config = {"INFERENCE_PRECISION_HINT": self.model.precision_hint}   # not bf16 by default
        threads = int(os.environ.get("NBTOOL_TF_THREADS", "0") or 0)
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = ov.Core().compile_model(m, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._order = _output_order([o.get_any_name() for o in self._compiled.outputs])
        self.prepared += 1

    def run_batch(self, batch: np.ndarray) -> list[np.ndarray]:
        """One batch through the compiled model, outputs in Keras' order, as float32."""
        if self.preprocess is not None:   # eager TF ops, as for LiteRT
            batch = eager_preprocess(self.preprocess, batch)
        result = self._request.infer([np.ascontiguousarray(batch, self.model.dtype)])
        return as_float32(result[self._compiled.outputs[i]] for i in self._order)


def _output_order(names: list[str]) -> list[int]:
    """The order of a SavedModel's ``output_0, output_1, ...`` as Keras returns them:
    by number, not by name (``output_10`` sorts before ``output_2``); other names as given."""
    numbers = [re.fullmatch(r"output_(\d+)", n or "") for n in names]
    if not all(numbers):
        return list(range(len(names)))
    return sorted(range(len(names)), key=lambda i: int(numbers[i].group(1)))
