"""Converting a registered Keras model into a cheaper variant, on a worker: LiteRT
flatbuffers (float32, float16, dynamic-int8, int8), Keras' own int8 quantization, and
OpenVINO IR (bf16, NNCF int8: :mod:`~nbtool.worker.variants`).

Conversion needs TensorFlow, which the notebook kernel never imports (it would take GPU
memory and seconds to start); the workers already run it and can read the model file. So
the kernel (:mod:`nbtool.engine.optimize`, which says what each variant is) sends this task to a
worker and gets the bytes back.

Example:
    >>> sorted(CONVERSIONS)   # doctest: +NORMALIZE_WHITESPACE
    ['dynamic-int8', 'float16', 'float32', 'int8', 'keras-int8', 'openvino-bf16',
     'openvino-int8']
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
import sys
import tempfile
import time
from typing import Any

import numpy as np

from nbtool.errors import NbtoolError
from nbtool.wire import ModelSpec
from nbtool.worker.environment import describe_exception, tensorflow
from nbtool.worker.runtimes import (HINT_PATH, import_openvino, litert_converter,
    open_openvino, quiet_converter)


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
    import_openvino()
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
            else:   # a module, or None where something else hides it (import_openvino())
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
    ov = import_openvino()
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


#: The variants a worker can make (:data:`nbtool.engine.optimize.VARIANTS` says what each is, for
#: the user; a test keeps the two in step). "int8" and "openvino-int8" need calibration rows.
CONVERSIONS = ("float32", "float16", "dynamic-int8", "int8", "keras-int8",
               *OPENVINO_VARIANTS)


def convert_variant(spec: ModelSpec, variant: str,
                    calibration: np.ndarray | None = None) -> dict[str, Any]:
    """Convert a registered Keras model into one variant; runs on a Dask worker.

    Returns ``{"data": bytes, "suffix": ".tflite" or ".keras", "seconds": float}``, or
    for an OpenVINO variant ``{"files": {".xml": bytes, ".bin": bytes}, "seconds": float}``:
    the client writes the bytes next to the models it saves, like a Keras object given to
    ``register``.

    Example:
        >>> out = client.submit(convert_variant, spec, "float16").result()   # doctest: +SKIP
        >>> out["suffix"], len(out["data"]) < spec.size_bytes                # doctest: +SKIP
        ('.tflite', True)
    """
    if variant not in CONVERSIONS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(CONVERSIONS)}.")
    if spec.format in ("tflite", "openvino"):
        what = "a LiteRT model" if spec.format == "tflite" else "an OpenVINO IR"
        raise NbtoolError(f"model {spec.name!r} ({spec.path}) is already {what}; "
                          "nbtool converts Keras models (.keras, .h5, SavedModel). Fix: "
                          "optimize the Keras original it came from.")
    tf = tensorflow()
    import keras

    t0 = time.perf_counter()
    with quiet_converter():
        if spec.format == "savedmodel":
            model = None
        else:
            model = keras.saving.load_model(spec.path, compile=False,
                                            safe_mode=not spec.trusted)
        if variant == "keras-int8":
            data = keras_int8(spec, model)
            return {"data": data, "suffix": ".keras", "seconds": time.perf_counter() - t0}
        if variant in OPENVINO_VARIANTS:
            rows = calibration_rows(spec, calibration, variant) \
                if variant == "openvino-int8" else None
            out = make_openvino_variant(spec, variant, model, rows)
            return {**out, "seconds": time.perf_counter() - t0}
        converter = litert_converter(spec, model)
        if variant != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if variant == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if variant == "int8":
            rows = calibration_rows(spec, calibration, variant)
            converter.representative_dataset = lambda: ([r[None]] for r in rows)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        try:
            data = converter.convert()
        except Exception as e:
            raise NbtoolError(f"model {spec.name!r} ({spec.path}): the LiteRT converter "
                              f"could not make the {variant!r} variant "
                              f"({describe_exception(e)}). Fix: try another variant (float16 "
                              "and dynamic-int8 support the most ops), or convert it yourself "
                              "and register the .tflite.") from None
    return {"data": bytes(data), "suffix": ".tflite", "seconds": time.perf_counter() - t0}


def calibration_rows(spec: ModelSpec, calibration, variant: str = "int8") -> np.ndarray:
    """The rows an int8 variant (``variant``) calibrates on: preprocessed, as float32.

    Example:
        >>> spec = ModelSpec("m", "m.keras", "keras", 1, "1-1")
        >>> calibration_rows(spec, np.ones((2, 3), "uint8")).dtype
        dtype('float32')
    """
    if calibration is None or len(calibration) == 0:
        raise ValueError(f"model {spec.name!r}: the {variant!r} variant needs calibration "
                         "rows (a representative sample of real inputs, ~100-500 rows). Fix: "
                         "pass calibration=x_train[:200].")
    rows = np.asarray(calibration)
    if spec.preprocess is not None:   # the converted graph starts after preprocessing
        rows = np.asarray(spec.preprocess(rows))
    return rows.astype(np.float32)


def keras_int8(spec: ModelSpec, model) -> bytes:
    """``model`` quantized by Keras (``quantize("int8")``) and saved: the ``.keras`` bytes.

    Example:
        >>> data = keras_int8(spec, keras.saving.load_model(spec.path))   # doctest: +SKIP
    """
    if model is None:
        raise NbtoolError(f"model {spec.name!r} ({spec.path}) is a SavedModel; Keras' "
                          "quantize() needs a Keras model. Fix: use the LiteRT variants "
                          "('dynamic-int8', 'int8') for it, or register the .keras file.")
    model.quantize("int8")
    quantized = [layer.name for layer in model._flatten_layers(include_self=False)
                 if getattr(layer, "quantization_mode", None) == "int8"]
    if not quantized:
        raise NbtoolError(f"model {spec.name!r} ({spec.path}): Keras' quantize('int8') "
                          "changed nothing: it quantizes Dense, EinsumDense and Embedding "
                          "layers, and this model has none. Fix: use the LiteRT variants "
                          "('dynamic-int8', 'int8').")
    with tempfile.TemporaryDirectory(prefix="nbtool-quantize-") as d:
        path = os.path.join(d, "model.keras")
        model.save(path)
        return Path(path).read_bytes()
