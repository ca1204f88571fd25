"""The OpenVINO runtime: a Keras model or SavedModel converted on the worker to OpenVINO's
float32 IR, cached on disk per model fingerprint and OpenVINO version, run as a predictor.

:func:`open_openvino` converts once (``model.export`` to a SavedModel, then
``ov.convert_model``) and saves the IR under ``<machine cache>/openvino/``; a later load of
the same file with the same OpenVINO reads it back and skips the conversion.
:class:`OpenVINOPredictor` runs it the way
:class:`~nbtool.worker.predictors.CompiledPredictor` runs a Keras model: one fixed batch, the
last batch padded, float32 outputs. It is compiled with ``INFERENCE_PRECISION_HINT=f32``:
on CPUs with avx512_bf16 OpenVINO's default is bf16, which is not exact.
:func:`check_agreement` compares it with TensorFlow before the load is accepted.

Example:
    >>> _output_order(["output_10", "output_2", "output_0"])
    [2, 1, 0]
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from ..wire import ModelSpec
from .batching import run_in_batches
from .runtime import cache_root, worker_name

#: The largest difference from TensorFlow (per output, absolute) a conversion may show.
TOLERANCE = 1e-4
#: Rows of the agreement check at load (random, seeded, of the model's input).
CHECK_ROWS = 64


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


def openvino_version() -> str:
    """The installed OpenVINO's version, as the IR cache keys it (``2026.4.1``...).

    Example:
        >>> openvino_version()[:2].isdigit()
        True
    """
    return openvino().get_version().split("-")[0]


def openvino():
    """The ``openvino`` module, imported with its usage telemetry off.

    OpenVINO's converter sends usage events to Google Analytics unless told not to, and
    writes ``~/intel`` to remember a client id. A conversion nbtool makes on the user's
    behalf must not phone home or leave files in their home: with its telemetry package
    hidden, the converter falls back to its own no-op stub (``openvino.tools.ovc``
    imports it under ``try``/``except ImportError``).

    Example:
        >>> openvino().__name__
        'openvino'
    """
    import sys

    sys.modules.setdefault("openvino_telemetry", None)   # None: "import" raises ImportError
    import openvino as ov

    return ov


def ir_dir(spec: ModelSpec) -> str:
    """Where ``spec``'s IR is cached on this machine: one folder per model file (its path
    and fingerprint) and OpenVINO version, so a re-saved file or an upgrade converts again.

    The path's hash is in the name because two files may share a size and mtime.

    Example:
        >>> spec = ModelSpec("cnn", "/m/cnn.keras", "keras", 10, "10-1")
        >>> ir_dir(spec).split(os.sep)[-2:][0], ir_dir(spec).endswith("-10-1-" + openvino_version())
        ('openvino', True)
    """
    where = hashlib.sha1(spec.path.encode()).hexdigest()[:12]
    return os.path.join(cache_root(), "openvino",
                        f"{where}-{spec.fingerprint}-{openvino_version()}")


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
    ov = openvino()

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
    ir = ov.Core().read_model(xml)
    return OpenVINOModel(ir, xml, tuple(row_shape), np.dtype(dtype).name, converted,
                         time.perf_counter() - t0)


class OpenVINOPredictor:
    """The :class:`CompiledPredictor` of an OpenVINO IR: compiled once for one fixed batch
    shape on the CPU, in float32.

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
        self.model = model
        self.name, self.path = name, path          # for errors: which model this is
        self.batch_size = int(batch_size)
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.preprocess = preprocess
        self.output_specs: list[tuple[tuple, str]] = []
        self._compiled = None
        self._order: list[int] = []
        self._compilations = 0
        # One infer request holds one set of tensors: calls must not overlap.
        self._lock = threading.Lock()

    @property
    def traces(self) -> int:
        """How many times it was compiled; stays at 1 after warm-up."""
        return self._compilations

    def _compile(self) -> None:
        ov = openvino()

        m = self.model.model.clone()
        shape = [self.batch_size, *(-1 if d is None else d for d in self.model.row_shape)]
        m.reshape({m.inputs[0]: ov.PartialShape(shape)})
        config = {"INFERENCE_PRECISION_HINT": "f32"}   # bf16 by default on avx512_bf16
        threads = int(os.environ.get("NBTOOL_TF_THREADS", "0") or 0)
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = ov.Core().compile_model(m, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._order = _output_order([o.get_any_name() for o in self._compiled.outputs])
        self._compilations += 1

    def warm_up(self) -> None:
        """Compile for the batch size and run once on zeros; records each output's row
        shape and dtype in ``output_specs``."""
        with self._lock:
            self._compile()
        shape = tuple(1 if d is None else d for d in self.row_shape)
        outs = self(np.zeros((1, *shape), self.dtype))
        self.output_specs = [(tuple(o.shape[1:]), str(o.dtype)) for o in outs]

    def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        if self._compiled is None:   # e.g. the batch sweep's predictors: never warmed up
            with self._lock:
                self._compile()
        model_dtype = np.dtype(self.model.dtype)

        def run_batch(batch):
            if self.preprocess is not None:   # eager TF ops, as for LiteRT
                batch = np.asarray(self.preprocess(batch))
            result = self._request.infer([np.ascontiguousarray(batch, model_dtype)])
            outs = [np.asarray(result[self._compiled.outputs[i]]) for i in self._order]
            return [y.astype(np.float32) if y.dtype.kind == "f" and y.dtype != np.float32
                    else y for y in outs]

        with self._lock:
            return run_in_batches(rows, self.batch_size, self.dtype, run_batch,
                                  self.name, self.path)


def check_agreement(spec: ModelSpec, predictor, reference, rows: np.ndarray,
                    tolerance: float = TOLERANCE) -> float:
    """The largest difference between ``predictor`` and TensorFlow's ``reference`` on
    ``rows``; a :class:`~nbtool.errors.ModelLoadError` if it is over ``tolerance`` for any
    output (or the outputs differ in number or shape), so the load fails.

    Example:
        >>> spec = ModelSpec("cnn", "/m/cnn.keras", "keras", 10, "10-1")
        >>> x = np.zeros((4, 2), "float32")
        >>> check_agreement(spec, lambda r: [r + 1e-6], lambda r: [r], x) <= 1e-6
        True
        >>> check_agreement(spec, lambda r: [r + 0.5], lambda r: [r], x)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.ModelLoadError: ...max abs diff 0.5 from TensorFlow on 4 rows (tolerance 0.0001)...
    """
    got, want = predictor(rows), reference(rows)
    shapes = [y.shape for y in got], [y.shape for y in want]
    if shapes[0] != shapes[1]:
        diff, what = float("inf"), f"outputs of shapes {shapes[0]} where TensorFlow gives " \
                                   f"{shapes[1]}"
    else:
        diff = max((float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)),
                                 initial=0.0)) for a, b in zip(got, want)), default=0.0)
        what = f"max abs diff {diff:.3g} from TensorFlow on {len(rows)} rows"
    if not diff <= tolerance:   # NaN too
        raise ModelLoadError(spec.name, spec.path, worker_name(),
                             f"its OpenVINO conversion gives {what} (tolerance "
                             f"{tolerance:g})", "register it with runtime='tensorflow' "
                             f"(eng.register({spec.name!r}, {spec.path!r}, "
                             "runtime='tensorflow'))")
    return diff


def _output_order(names: list[str]) -> list[int]:
    """The order of a SavedModel's ``output_0, output_1, ...`` as Keras returns them:
    by number, not by name (``output_10`` sorts before ``output_2``); other names as given."""
    numbers = [re.fullmatch(r"output_(\d+)", n or "") for n in names]
    if not all(numbers):
        return list(range(len(names)))
    return sorted(range(len(names)), key=lambda i: int(numbers[i].group(1)))
