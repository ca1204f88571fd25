"""OpenVINO variants of a Keras model, made on a worker: ``openvino-bf16`` (the float32 IR
asking OpenVINO to compute in bfloat16) and ``openvino-int8`` (NNCF post-training
quantization of that IR on calibration rows). Both are IR files (``.xml`` + ``.bin``),
which ``register`` accepts like any model file (:mod:`nbtool.worker.runtimes.openvino_files` opens them).

The float32 IR is the one ``runtime="openvino"`` uses, converted once per model file and
OpenVINO version (:func:`~nbtool.worker.runtimes.openvino.open_openvino`, cached on the machine).
bf16 is not a different file of weights: it is OpenVINO's ``INFERENCE_PRECISION_HINT``
kept in the IR's ``rt_info`` (``runtime_options``), so the file alone says how it runs,
wherever it is registered or compiled. NNCF is OpenVINO's own quantization library.

Neither OpenVINO nor NNCF may phone home or write ``~/intel`` for a conversion nbtool
makes on the user's behalf: both find their telemetry package hidden
(:func:`~nbtool.worker.runtimes.openvino.openvino`) and fall back to a no-op stub.

Example:
    >>> sorted(OPENVINO_VARIANTS)
    ['openvino-bf16', 'openvino-int8']
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from nbtool.errors import NbtoolError
from nbtool.wire import ModelSpec
from nbtool.worker.runtimes.openvino import open_openvino, openvino
from nbtool.worker.runtimes.openvino_files import HINT_PATH
from nbtool.worker.environment import describe_exception

#: The OpenVINO variants a worker can make; "openvino-int8" needs calibration rows.
OPENVINO_VARIANTS = ("openvino-bf16", "openvino-int8")


#: What NNCF would import and an OpenVINO model does not need: PyTorch and ONNX (NNCF
#: imports torch for its tensor backends at import, and tries both to learn what kind of
#: model it was given: seconds and hundreds of MB where PyTorch is installed), and
#: OpenVINO's telemetry client (NNCF reports usage through it when it imports).
NOT_NEEDED = ("torch", "onnx", "openvino_telemetry")


def nncf_module():
    """The ``nncf`` module, imported without telemetry, PyTorch or ONNX, its log quiet.

    Example:
        >>> type(nncf_module().telemetry.telemetry).__name__   # the no-op stub
        'MagicMock'
    """
    openvino()
    with not_importing(*NOT_NEEDED):   # with no openvino_telemetry, NNCF uses a no-op stub
        import nncf
    from nncf.telemetry import decorator, wrapper

    # Imported before, with telemetry on (by the user's own code)? Its one caller, the
    # tracking decorator, gets the no-op stub: nbtool's conversions never phone home.
    if not isinstance(decorator.telemetry, wrapper.NNCFTelemetryStub):
        decorator.telemetry = wrapper.telemetry = wrapper.NNCFTelemetryStub()
    nncf.set_log_level(logging.ERROR)   # its INFO lines are not the user's news
    return nncf


@contextlib.contextmanager
def not_importing(*modules: str):
    """Inside the block, ``import`` of ``modules`` fails (imported already or not); after
    it, they are as they were.

    Example:
        >>> with not_importing("json"):
        ...     import json   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ModuleNotFoundError: import of json halted; None in sys.modules
        >>> import json; json.__name__
        'json'
    """
    absent = object()
    before = {m: sys.modules.get(m, absent) for m in modules}
    sys.modules.update(dict.fromkeys(modules))   # None: "import" raises ImportError
    try:
        yield
    finally:
        for m, module in before.items():
            if module is absent:
                sys.modules.pop(m, None)
            else:   # a module, or None where something else hides it (openvino())
                sys.modules[m] = module


def quantize_int8(spec: ModelSpec, model, rows: np.ndarray):
    """``model`` (an ``openvino.Model``) quantized to int8 by NNCF, calibrated on ``rows``
    (one row per sample, as NNCF recommends); an :class:`~nbtool.errors.NbtoolError` that
    names the model if NNCF cannot.

    Example:
        >>> q = quantize_int8(spec, ir.model, rows)   # doctest: +SKIP
    """
    nncf = nncf_module()
    dtype = model.inputs[0].get_element_type().to_dtype()
    dataset = nncf.Dataset([np.asarray(r[None], dtype) for r in rows])
    try:
        with not_importing(*NOT_NEEDED), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):   # its progress bars
            return nncf.quantize(model, dataset, subset_size=len(rows))
    except Exception as e:
        raise NbtoolError(f"model {spec.name!r} ({spec.path}): NNCF could not quantize its "
                          f"OpenVINO IR to int8 ({describe_exception(e)}). Fix: try the "
                          "LiteRT 'int8' or 'dynamic-int8' variants, or 'openvino-bf16'."
                          ) from None


def make_openvino_variant(spec: ModelSpec, variant: str, model,
                          rows: np.ndarray | None = None) -> dict:
    """``spec``'s model (``model``: Keras; None for a SavedModel) as an OpenVINO variant IR.

    Returns ``{"files": {".xml": bytes, ".bin": bytes}}``: the client writes
    both files side by side and registers the ``.xml``. ``rows``: calibration rows, already
    preprocessed, for ``openvino-int8``.

    Example:
        >>> out = make_openvino_variant(spec, "openvino-bf16", keras_model)   # doctest: +SKIP
        >>> sorted(out["files"])                                              # doctest: +SKIP
        ['.bin', '.xml']
    """
    if variant not in OPENVINO_VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of "
                         f"{', '.join(OPENVINO_VARIANTS)}.")
    ov = openvino()
    if model is None:   # a SavedModel: converted from its directory
        row_shape, dtype = (), "float32"
    else:
        row_shape, dtype = tuple(model.inputs[0].shape)[1:], model.inputs[0].dtype
    try:
        ir = open_openvino(spec, model, row_shape, dtype).model
    except Exception as e:
        raise NbtoolError(f"model {spec.name!r} ({spec.path}): OpenVINO could not convert it "
                          f"({describe_exception(e)}). Fix: use the LiteRT variants "
                          "('float16', 'dynamic-int8', 'int8').") from None
    if variant == "openvino-bf16":
        out = ir.clone()
        out.set_rt_info("bf16", HINT_PATH)   # where it runs, the load says if it is bf16
    else:
        out = quantize_int8(spec, ir, rows)
    with tempfile.TemporaryDirectory(prefix="nbtool-openvino-") as d:
        xml = os.path.join(d, "model.xml")
        # Not compressed to float16: the non-quantized weights stay what they were.
        ov.save_model(out, xml, compress_to_fp16=False)
        files = {s: Path(d, "model" + s).read_bytes() for s in (".xml", ".bin")}
    return {"files": files}
