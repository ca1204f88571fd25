"""A Keras model or SavedModel converted on the worker to a float32 LiteRT flatbuffer, for
``runtime="litert"`` and the ``auto`` choice; cached on disk per model file, fingerprint,
TensorFlow (the converter's) and LiteRT versions.

The conversion is exact float32: no optimizations, no reduced types (those are
:func:`nbtool.worker.variants.convert_variant`'s opt-in variants). Its outputs are compared
with TensorFlow's before it is used (:mod:`~nbtool.worker.auto.agreement`).

Example:
    >>> spec = ModelSpec("cnn", "/m/cnn.keras", "keras", 10, "10-1")
    >>> litert_path(spec).split(os.sep)[-3], os.path.basename(litert_path(spec))
    ('litert', 'model.tflite')
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import tempfile
import time
import warnings

from nbtool._util import expects_gpu, native_logs_filtered
from nbtool.wire import ModelSpec
from nbtool.worker.environment import artifact_key, machine_folder, tensorflow
from nbtool.worker.runtimes.litert import LiteRTModel, open_tflite


def package_version(name: str) -> str | None:
    """An installed package's version, read from its metadata: nothing is imported.

    Example:
        >>> package_version("numpy") is not None, package_version("no-such-package")
        (True, None)
    """
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def litert_path(spec: ModelSpec) -> str:
    """Where ``spec``'s float32 LiteRT conversion is cached on this machine: one folder per
    model's bytes (:func:`~nbtool.worker.environment.artifact_key`) and converter/runtime versions, so a
    re-saved file or an upgrade converts again.

    Example:
        >>> spec = ModelSpec("cnn", "/m/cnn.keras", "keras", 10, "10-1")
        >>> "-10-1-tf" in litert_path(spec)
        True
    """
    versions = f"tf{package_version('tensorflow')}-litert{package_version('ai-edge-litert')}"
    return os.path.join(machine_folder(), "litert", f"{artifact_key(spec)}-{versions}",
                        "model.tflite")


def open_litert(spec: ModelSpec, model) -> LiteRTModel:
    """``spec``'s model as a float32 LiteRT flatbuffer: read from the cache, else converted
    from ``model`` (a Keras model; a SavedModel is converted from its directory) and saved
    there. Several workers may convert at once: each writes its own file and renames it
    into place (the last rename wins; the conversions are the same).

    Example:
        >>> m = open_litert(spec, keras_model)   # doctest: +SKIP
        >>> m.converted, m.path.endswith("model.tflite")   # doctest: +SKIP
        (True, True)
    """
    t0 = time.perf_counter()
    final = litert_path(spec)
    converted = not os.path.exists(final)
    if converted:
        data = convert_float32(spec, model)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(final), prefix=".converting-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    opened = open_tflite(spec, final)
    opened.converted, opened.seconds = converted, time.perf_counter() - t0
    return opened


def convert_float32(spec: ModelSpec, model) -> bytes:
    """The float32 flatbuffer of ``model`` (or of ``spec``'s SavedModel directory): TF's
    converter with no optimizations, built-in ops only (a model that needs TensorFlow ops
    fails here, and stays on TensorFlow).

    Example:
        >>> len(convert_float32(spec, keras_model)) > 0   # doctest: +SKIP
        True
    """
    with quiet_converter():
        return bytes(litert_converter(spec, model).convert())


def litert_converter(spec: ModelSpec, model):
    """TF's LiteRT converter for ``model`` (None, or a SavedModel ``spec``: its directory),
    built-in ops only; the variants of :mod:`~nbtool.worker.variants` add their options.

    Example:
        >>> litert_converter(spec, keras_model).optimizations   # doctest: +SKIP
        set()
    """
    tf = tensorflow()
    converter = tf.lite.TFLiteConverter.from_saved_model(spec.path) \
        if model is None or spec.format == "savedmodel" \
        else tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter


@contextlib.contextmanager
def quiet_converter():
    """What converters print is not the user's news: "Saved artifact at ..." on stdout, a
    warning per layer, and the LiteRT converter's native "Ignored ..." lines.

    Example:
        >>> with quiet_converter():
        ...     print("Saved artifact at /tmp/x")
    """
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), \
            native_logs_filtered(expect_gpu=expects_gpu()):
        warnings.simplefilter("ignore")
        yield
