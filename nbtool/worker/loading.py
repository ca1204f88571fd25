"""Opening a model file on a worker (Keras, h5, SavedModel, ``.tflite``), its precision,
and the load errors that say what went wrong and the fix.

Example:
    >>> from nbtool.wire import ModelSpec
    >>> out_of_memory(ModelSpec("cnn", "cnn.keras", "keras", 1, "1-1"), "gpu0").reason
    'out of memory even with batch size 1'
"""

from __future__ import annotations

import os

import numpy as np

from nbtool.errors import ModelLoadError, first_line
from nbtool.signature import SAVEDMODEL_ENDPOINTS, named_outputs
from nbtool.wire import ModelSpec
from nbtool.worker.environment import (describe_exception, out_of_memory_error, tensorflow,
    tensorflow_version, worker_name)
from nbtool.worker.keras_backends import backend_name, start_backend
from nbtool.worker.runtimes import ir_weight_bytes, open_ir_file, open_tflite

#: Mixed-precision policies by the ``precision`` a model is registered with.
PRECISIONS = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def open_model(spec: ModelSpec):
    """Load the file; return a callable ``f(x, training=False)`` (for ``.tflite``, a
    :class:`~nbtool.worker.runtimes.litert.LiteRTModel`), the input row shape and dtype, the number
    of outputs, and the bytes of its weights.

    Example:
        >>> call, row_shape, dtype, n_outputs, weight_bytes = open_model(spec)  # doctest: +SKIP
    """
    if spec.format == "tflite":
        m = open_tflite(spec)
        # Quantized inputs are quantized by the predictor: callers send float32 rows.
        dtype = "float32" if np.dtype(m.input["dtype"]).kind in "iu" \
            and m.input.get("quantization", (0.0, 0))[0] else np.dtype(m.input["dtype"]).name
        # The flatbuffer holds the weights: its size is what the model holds.
        return m, m.row_shape, dtype, len(m.outputs), os.path.getsize(spec.path)
    if spec.format == "openvino":   # an IR file: OpenVINO reads it as it is, no TensorFlow
        ir = open_ir_file(spec)
        return ir, ir.row_shape, ir.dtype, len(ir.model.outputs), ir_weight_bytes(ir)
    backend = backend_name()
    if backend != "tensorflow":   # Keras on JAX or PyTorch: TensorFlow is never imported
        if spec.format == "savedmodel" or spec.preprocess is not None:
            what = "a SavedModel" if spec.format == "savedmodel" else "preprocess="
            raise ModelLoadError(spec.name, spec.path, worker_name(),
                                 f"{what} needs TensorFlow, and this worker runs Keras on "
                                 f"{backend}",
                                 "register the model's .keras file without preprocess=, or "
                                 "start the engine with backend='tensorflow'")
        start_backend()
        return open_keras(spec)
    tf = tensorflow()
    if spec.format == "savedmodel":
        return open_savedmodel(spec, tf)
    return open_keras(spec)


def open_keras(spec: ModelSpec):
    """A ``.keras`` or ``.h5`` file loaded by Keras on this worker's backend (started
    already), at its precision; returned as :func:`open_model` does.

    Example:
        >>> model, row_shape, dtype, n_outputs, weight_bytes = open_keras(spec)  # doctest: +SKIP
    """
    import keras

    model = keras.saving.load_model(spec.path, compile=False, safe_mode=not spec.trusted)
    if spec.precision:
        model = with_precision(model, spec.precision)
    if text_task(model):   # a keras_hub task: raw strings through its own preprocessor
        def call(x, training=False):
            return model(model.preprocessor(x), training=training)
        call.model = model
        return call, (), "string", 1, weight_bytes(model.weights)
    if len(model.inputs) > 1:   # rows come as a dict by input name
        names = list(model.input) if isinstance(model.input, dict) else \
            [t.name for t in model.inputs]
        shapes = {n: tuple(t.shape)[1:] for n, t in zip(names, model.inputs)}
        dtypes = {n: t.dtype for n, t in zip(names, model.inputs)}
        return model, shapes, dtypes, len(model.outputs), weight_bytes(model.weights)
    shape = tuple(model.inputs[0].shape)[1:]
    return model, shape, model.inputs[0].dtype, len(model.outputs), weight_bytes(model.weights)


def text_task(model) -> bool:
    """Whether ``model`` is a ``keras_hub`` task with a text preprocessor (a tokenizer):
    called directly it refuses strings; it takes them through ``model.preprocessor``.

    Example:
        >>> text_task(object())
        False
    """
    pre = getattr(model, "preprocessor", None)
    return pre is not None and hasattr(model, "backbone") and \
        getattr(pre, "tokenizer", None) is not None


def open_savedmodel(spec: ModelSpec, tf):
    """A SavedModel's serving signature (:data:`~nbtool.wire.SAVEDMODEL_ENDPOINTS`) as a
    callable of rows (a dict by input name for several inputs), its outputs in the order
    of their names (:func:`~nbtool.wire.named_outputs`); returned as :func:`open_model`
    does.

    Example:
        >>> call, row_shape, dtype, n_outputs, weight_bytes = open_savedmodel(spec, tf)  # doctest: +SKIP
    """
    obj = tf.saved_model.load(spec.path)
    endpoint = next((e for e in SAVEDMODEL_ENDPOINTS if e in obj.signatures), None)
    if endpoint is None:
        return open_serve_function(spec, obj, tf)
    fn = obj.signatures[endpoint]
    specs = fn.structured_input_signature[1]   # keyword arguments: name -> TensorSpec
    names = sorted(specs)
    order = []   # the outputs' names, in the order they are returned (known at the first call)

    def call(x, training=False):
        out = fn(**(x if isinstance(x, dict) else {names[0]: x}))
        if not order:
            order.extend(named_outputs(out)[0])
        return [out[k] for k in order]
    call.signature = obj   # keeps the loaded object (and its variables) alive
    if len(names) == 1:
        row_shape, dtype = tuple(specs[names[0]].shape)[1:], specs[names[0]].dtype.name
    else:
        row_shape = {n: tuple(specs[n].shape)[1:] for n in names}
        dtype = {n: specs[n].dtype.name for n in names}
    return call, row_shape, dtype, len(fn.structured_outputs), weight_bytes(fn.variables)


def with_precision(model, precision: str):
    """A copy of ``model`` that computes in ``precision`` (mixed: variables stay float32).

    Every layer's dtype policy in the model's config becomes ``mixed_<precision>`` (inputs
    stay as they are), the model is rebuilt from that config, and the weights are copied.

    Example:
        >>> fast = with_precision(model, "bfloat16")   # doctest: +SKIP
    """
    policy = PRECISIONS.get(precision)
    if policy is None:
        raise ValueError(f"precision={precision!r}: expected one of {sorted(PRECISIONS)}.")

    def patch(node, in_input_layer=False):
        if isinstance(node, dict):
            is_input = in_input_layer or node.get("class_name") == "InputLayer"
            out = {}
            for k, v in node.items():
                if k == "dtype" and not is_input and isinstance(v, dict) \
                        and v.get("class_name") == "DTypePolicy":
                    v = {**v, "config": {**v.get("config", {}), "name": policy}}
                out[k] = patch(v, is_input)
            return out
        if isinstance(node, list):
            return [patch(v, in_input_layer) for v in node]
        return node

    rebuilt = model.__class__.from_config(patch(model.get_config()))
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def open_serve_function(spec: ModelSpec, obj, tf):
    """A SavedModel without a serving signature, called by its ``serve`` function (a
    ``tf.Module`` saved with a traced ``serve`` method): one input, its spec from the
    function's own signature; returned as :func:`open_model` does.

    Example:
        >>> call, row_shape, dtype, n_outputs, weight_bytes = open_serve_function(spec, obj, tf)  # doctest: +SKIP
    """
    fn = getattr(obj, "serve", None)
    specs = [s for s in tf.nest.flatten(getattr(fn, "input_signature", None) or ())
             if isinstance(s, tf.TensorSpec)]
    if fn is None or len(specs) != 1:
        found = f"a serve function of {len(specs)} inputs" if fn is not None else \
            f"no serve function, and no signature (it has {sorted(obj.signatures)})"
        raise ModelLoadError(spec.name, spec.path, worker_name(), f"it has {found}",
                             "export it with model.export(path), or tf.saved_model.save(obj, "
                             "path, signatures=...) with a serving signature")

    def call(x, training=False):
        return fn(x)
    call.signature = obj
    return (call, tuple(specs[0].shape)[1:], specs[0].dtype.name, None,
            weight_bytes(getattr(obj, "variables", ())))


def weight_bytes(weights) -> int:
    """The bytes of a model's variables, counted exactly from their shapes and dtypes.

    Example:
        >>> weight_bytes([np.zeros((8, 3), "float32"), np.zeros(3, "float32")])
        108
    """
    return int(sum(np.prod(w.shape, dtype=np.int64)   # a tf.Variable's dtype is a tf.DType
                   * np.dtype(getattr(w.dtype, "as_numpy_dtype", w.dtype)).itemsize
                   for w in weights))


def out_of_memory(spec: ModelSpec, worker: str) -> ModelLoadError:
    """The error of a model that ran out of memory with batches halved down to one.

    Example:
        >>> out_of_memory(ModelSpec("m", "m.keras", "keras", 1, "1-1"), "cpu0").worker
        'cpu0'
    """
    return ModelLoadError(spec.name, spec.path, worker, "out of memory even with batch "
                          "size 1", "free memory on this device (eng.unload(...)), lower "
                          "the memory budget, or place the model on a bigger device")


def load_error(spec: ModelSpec, worker: str, e: Exception) -> ModelLoadError:
    """What Keras, TensorFlow or LiteRT raised while loading, as a :class:`ModelLoadError`
    that names the model and says the fix for its kind of failure.

    Example:
        >>> spec = ModelSpec("m", "m.keras", "keras", 1, "1-1")
        >>> err = load_error(spec, "cpu0", ValueError("Could not locate class 'Foo'"))
        >>> err.reason, err.fix.startswith("the model uses a custom class")
        ("ValueError: Could not locate class 'Foo'", True)
    """
    if out_of_memory_error(e):   # halving the batch did not help
        return out_of_memory(spec, worker)
    msg = describe_exception(e)
    low = f"{msg} {e}".lower()
    if "safe_mode" in low or "lambda" in low and "deserializ" in low:
        return ModelLoadError(spec.name, spec.path, worker,
                              "it contains a Lambda layer (stored Python code), which Keras "
                              "refuses to deserialize in safe mode",
                              f"if you trust this file, register it with trusted=True: "
                              f"eng.register({spec.name!r}, {spec.path!r}, trusted=True)")
    if "could not locate" in low or "unknown layer" in low or "custom_objects" in low:
        return ModelLoadError(spec.name, spec.path, worker, first_line(msg),
                              "the model uses a custom class; make it importable on the "
                              "workers (register it with @keras.saving."
                              "register_keras_serializable in an installed module)")
    return ModelLoadError(spec.name, spec.path, worker, first_line(msg), load_fix(spec))


def load_fix(spec: ModelSpec) -> str:
    """The fix for a file that failed to load, by format: a SavedModel or a ``.tflite`` is
    often someone else's file, which its user cannot simply re-save with ``model.save``.

    Example:
        >>> load_fix(ModelSpec("m", "m.tflite", "tflite", 1, "1-1"))  # doctest: +ELLIPSIS
        'it may use ops this LiteRT does not run (TensorFlow "Select" ops, custom ops)...'
    """
    if spec.format == "savedmodel":
        version = tensorflow_version()
        here = f" (this worker has TensorFlow {version})" if version else ""
        return ("it was probably made with another TensorFlow version" + here + ": ask its "
                "publisher for a .keras or .tflite export, or load it with the TensorFlow it "
                "was made with and re-export it there (tf.saved_model.save, or convert it "
                "with tf.lite.TFLiteConverter.from_saved_model)")
    if spec.format == "tflite":
        return ('it may use ops this LiteRT does not run (TensorFlow "Select" ops, custom '
                "ops) or a newer format: ask its publisher for a .tflite with built-in ops "
                "only (or a .keras export), or upgrade ai-edge-litert on the workers")
    return ("check that the file is complete (re-save it with model.save('name.keras')) and "
            "that the Keras version matches")
