"""Converting a registered Keras model into a cheaper variant, on a worker: LiteRT
flatbuffers (float32, float16, dynamic-int8, int8), Keras' own int8 quantization, and
OpenVINO IR (bf16, NNCF int8: :mod:`~nbtool.worker.ov_variants`).

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

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from nbtool.errors import NbtoolError
from nbtool.wire import ModelSpec
from nbtool.worker.runtimes.to_litert import litert_converter, quiet_converter
from nbtool.worker.ov_variants import OPENVINO_VARIANTS, make_openvino_variant
from nbtool.worker.environment import describe_exception, tensorflow

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
