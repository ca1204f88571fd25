"""What it takes to register a model: its options (:class:`ModelOptions`, declared and
checked here, once), its name, and its file.

A model is registered under a name from a file; :func:`inspect_model` reads the file
(:mod:`nbtool.catalog.files`, no TensorFlow) and refuses, before any worker opens it, a bad
name, a file that is no model, or one that would run code at load unless ``trusted=True``.
The registered models themselves are :class:`nbtool.catalog.catalog.Registry`.

Example:
    A name outside the safe set is refused before the file is even read, with a clean
    name to use instead:

    >>> inspect_model("my model", "models/my model.keras")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nbtool.errors.InvalidModelName: model name 'my model' (from models/my model.keras): ...
    >>> ModelOptions(replicas=2).checked("cnn").replicas
    2
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from pathlib import Path
import re
from typing import Any

from nbtool._util import warn_user
from nbtool.catalog.files import FORMATS, detect_format, read_model_file
from nbtool.errors import (BackendUnsupported, InvalidModelName, InvalidOption, ModelFileError,
    UnsupportedFormat, UntrustedModel)
from nbtool.signature import tensorflow_only
from nbtool.wire import ModelSpec, content_digest, file_fingerprint
from nbtool.worker import PRECISIONS

#: The longest model name: names become file names and result-store array names.
NAME_LIMIT = 100
#: What a model name may hold (ASCII only: no case- or normalization-folding surprises).
#: ``@`` is in it for optimize()'s ``name@variant``.
_NAME_CHARS = re.compile(r"[A-Za-z0-9_\-.@+]+")



@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The options of a registered model, declared once: :meth:`nbtool.engine.Engine.register`
    takes them as its own parameters (and documents them), the catalog checks them here.

    Example:
        >>> ModelOptions(batch_size=64, precision="float32").checked("cnn")
        ModelOptions(device='auto', replicas=None, batch_size=64, preprocess=None, trusted=False, precision=None, runtime=None)
        >>> ModelOptions(replicas=0).checked("cnn")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.InvalidOption: model 'cnn': replicas=0; expected a whole number >= 1 ...
    """

    device: str = "auto"
    replicas: int | None = None
    batch_size: int | str | None = None
    preprocess: Any = None
    trusted: bool = False
    precision: str | None = None
    runtime: str | None = None

    def checked(self, model: str | None) -> "ModelOptions":
        """These options checked for ``model`` (None: for every model of a folder), in
        their normal form: a preprocessing preset resolved, ``"float32"`` as None.
        A wrong value raises an error that names the model, the option and the fix."""
        if self.precision not in (None, "float32") and self.precision not in PRECISIONS:
            raise ValueError(f"model {model!r}: precision={self.precision!r}; expected None, "
                             f"'float32' or one of {sorted(PRECISIONS)} (mixed: weights "
                             "stay float32, the math runs in the lower precision).")
        preprocess = self.preprocess
        if isinstance(preprocess, str):
            from nbtool.preprocess import preset

            preprocess = preset(preprocess)
        return dataclasses.replace(
            self, replicas=None if self.replicas is None else check_replicas(model, self.replicas),
            batch_size=check_batch_size(model, self.batch_size), preprocess=preprocess,
            trusted=bool(self.trusted),
            precision=None if self.precision == "float32" else self.precision)


def inspect_model(name: str, path: str | os.PathLike, **options: Any) -> ModelSpec:
    """Build a :class:`ModelSpec` by reading the model file (never importing TensorFlow).

    Refuses, before anything is sent to a worker: a path that does not exist or is no
    model (:class:`ModelFileError`, :class:`UnsupportedFormat`), a bad name, and, unless
    ``trusted=True``, a file holding a Python lambda or any SavedModel directory
    (:class:`UntrustedModel`). A SavedModel's input signature is unknown here (``None``):
    the worker learns it at the first load.

    Example:
        >>> import pathlib, tempfile
        >>> exported = pathlib.Path(tempfile.mkdtemp()) / "exported"   # model.export(...)
        >>> exported.mkdir(); _ = (exported / "saved_model.pb").write_bytes(b"...")
        >>> inspect_model("exported", exported)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.UntrustedModel: model 'exported' (...): it contains a TensorFlow graph...
        >>> spec = inspect_model("exported", exported, trusted=True, replicas=2)
        >>> spec.format, spec.input_shape, spec.replicas
        ('savedmodel', None, 2)
    """
    check_name(name, path)
    detect_format(path, name)   # a missing path or foreign file is refused before reading
    p = Path(path).resolve()
    # Before reading: a file re-saved while it is read then looks changed at the next run
    # (and is read again), never unchanged with what was read from the older one.
    fingerprint = file_fingerprint(p)
    content = content_digest(p, fingerprint)
    info = read_model_file(p, name)
    if info.unsafe and not options.get("trusted"):
        raise UntrustedModel(name, str(p), *info.unsafe)
    shape, dtype = info.input
    # A .tflite runs in LiteRT; every other format in TensorFlow unless asked otherwise.
    options["runtime"] = check_runtime(name, options.get("runtime"), info.format,
                                       options.get("precision"))
    if info.format in ("tflite", "openvino") and len(info.inputs) > 1:
        names = ", ".join(repr(i.name) for i in info.inputs)
        raise UnsupportedFormat(name, str(p), f"{FORMAT_LABELS[info.format]} that takes "
                                f"{len(info.inputs)} inputs ({names}): nbtool runs those "
                                "formats with one input", "register the Keras original "
                                "(.keras, .h5 or a SavedModel), which runs its several "
                                "inputs in TensorFlow")
    check_convertible(name, options["runtime"], info.inputs, info.format)
    return ModelSpec(name=name, path=str(p), format=info.format, size_bytes=info.size_bytes,
                     fingerprint=fingerprint, content=content, input_shape=shape,
                     input_dtype=dtype, inputs=tuple(info.inputs),
                     output_names=info.output_names,
                     n_inputs=max(len(info.inputs), 1), n_outputs=info.n_outputs, **options)


#: How errors name the formats that run outside TensorFlow.
FORMAT_LABELS = {"tflite": "a .tflite", "openvino": "an OpenVINO IR"}


def check_convertible(model: str, runtime: str, inputs, format: str = "keras") -> None:
    """Refuse a forced conversion (``runtime='openvino'``/``'litert'``) of a model that
    only TensorFlow runs here (:func:`tensorflow_only`).

    Example:
        >>> from nbtool.signature import InputSpec
        >>> check_convertible("two", "openvino", [InputSpec("a"), InputSpec("b")])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.InvalidOption: model 'two': runtime='openvino'; expected 'auto' or 'tensorflow' (it takes 2 inputs...
    """
    why = tensorflow_only(inputs)
    if why and runtime in ("openvino", "litert") and format not in FORMAT_LABELS:
        raise InvalidOption(model, "runtime", runtime,
                            f"'auto' or 'tensorflow' ({why}; nbtool converts models with one "
                            "numeric input to OpenVINO and LiteRT)",
                            "runtime='tensorflow', or leave runtime= out (auto runs it in "
                            "TensorFlow)")


def check_name(name: Any, path: str | os.PathLike | None = None) -> str:
    """Refuse a model name outside the safe set; returns it unchanged when it is fine.

    Names become file names (a model object is saved as ``<name>.keras``) and result-store
    array names, so only letters, digits and ``_ - . @ +`` are allowed, not a leading
    ``.``, at most :data:`NAME_LIMIT` characters: ``a/b`` and ``a%2Fb`` must never land on
    one array, nor ``..`` outside a folder. The error suggests a cleaned name.

    Example:
        >>> check_name("cnn@int8")
        'cnn@int8'
        >>> check_name("my model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.InvalidModelName: model name 'my model': expected letters, ...'my_model'...
    """
    if isinstance(name, str) and len(name) <= NAME_LIMIT and _NAME_CHARS.fullmatch(name) \
            and not name.startswith("."):
        return name
    return _refuse_name(name, path)


def _refuse_name(name: Any, path) -> str:
    raise InvalidModelName(name, clean_name(name if isinstance(name, str) else str(name)),
                           None if path is None else str(path), NAME_LIMIT)


def clean_name(text: str) -> str:
    """A valid model name close to ``text``: other characters become ``_``, leading dots
    go, cut at :data:`NAME_LIMIT` characters (``"model"`` if nothing is left).

    Example:
        >>> clean_name("my model (v2)"), clean_name(".."), clean_name("a/b")
        ('my_model_v2', 'model', 'a_b')
    """
    cleaned = re.sub(r"[^A-Za-z0-9_\-.@+]+", "_", text).lstrip(".").strip("_")
    return cleaned[:NAME_LIMIT].rstrip("_") or "model"


def check_batch_size(model: str | None, batch_size: Any) -> int | str | None:
    """A batch size nbtool can use: a whole number >= 1, ``"auto"`` or ``None`` (64, or
    on a CPU worker with ``runtime="auto"`` the fastest of 32, 64 and 128 found with the
    runtime).

    ``0`` is refused like everywhere else in nbtool (``chunk_size=0`` is too), not read
    as "the default". Returns it as a plain ``int`` (numpy integers are fine).

    Example:
        >>> check_batch_size("cnn", 32), check_batch_size("cnn", "auto")
        (32, 'auto')
        >>> check_batch_size("cnn", 0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.InvalidOption: model 'cnn': batch_size=0; expected a whole number >= 1...
    """
    if batch_size is None or batch_size == "auto" and isinstance(batch_size, str):
        return batch_size
    if _whole(batch_size) and batch_size >= 1:
        return int(batch_size)
    raise InvalidOption(model, "batch_size", batch_size,
                        "a whole number >= 1, 'auto' (a quick sweep at the first load) or "
                        "None (the default: 64, or what runtime='auto' measured fastest)", "batch_size=64, batch_size='auto' or leave "
                        "it out")


#: What may run a model on the workers (``runtime=``): ``auto`` measures and keeps the
#: fastest that agrees with TensorFlow; the others force one.
RUNTIMES = ("auto", "tensorflow", "openvino", "litert")


def check_runtime(model: str | None, runtime: Any, format: str,
                  precision: str | None = None) -> str:
    """The runtime a model of ``format`` runs on: ``runtime`` if it can, else the
    format's own (``None``): LiteRT for ``.tflite``, ``"auto"`` for the others.

    ``auto`` chooses on each CPU worker, at the model's first load there, the fastest of
    TensorFlow, OpenVINO float32 and LiteRT float32 that agrees with TensorFlow, and
    remembers it (on a GPU worker, or with mixed precision, it is TensorFlow). OpenVINO
    and LiteRT can be forced: the model is converted to their float32 graph, checked
    against TensorFlow at every load; neither takes mixed precision (that rebuilds a Keras
    model in TensorFlow), and a ``.tflite`` runs in LiteRT only.

    Example:
        >>> check_runtime("cnn", None, "keras"), check_runtime("det", None, "tflite")
        ('auto', 'litert')
        >>> check_runtime("cnn", "litert", "keras"), check_runtime("cnn", None, "h5", "bfloat16")
        ('litert', 'auto')
        >>> check_runtime("det", "openvino", "tflite")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.InvalidOption: model 'det': runtime='openvino'; expected 'litert' for a .tflite...
    """
    own = {"tflite": "litert", "openvino": "openvino"}.get(format, "auto")   # a file's own
    if runtime is None or runtime == own or own != "auto" and runtime == "auto":
        return own
    if runtime not in RUNTIMES:
        raise InvalidOption(model, "runtime", runtime, f"one of {RUNTIMES} (or None: "
                            f"{own!r} for this {format} model)", "leave it out (auto: the "
                            "fastest that agrees with TensorFlow), or force one with "
                            "runtime='tensorflow', runtime='openvino' or runtime='litert'")
    if format == "openvino":   # an IR file (.xml): only OpenVINO reads it
        raise InvalidOption(model, "runtime", runtime, "'openvino' for an OpenVINO IR",
                            "leave runtime= out")
    if format == "tflite":
        raise InvalidOption(model, "runtime", runtime, "'litert' for a .tflite (LiteRT runs "
                            "it; OpenVINO and TensorFlow run the Keras model it came from)",
                            "runtime='litert' or leave it out (or register the Keras "
                            "original with the runtime you want)")
    if runtime in ("openvino", "litert") and precision not in (None, "float32"):
        raise InvalidOption(model, "precision", precision, f"None with runtime={runtime!r} "
                            f"({runtime} runs the float32 graph; mixed precision rebuilds the "
                            "model in TensorFlow)", "precision=None, or runtime='tensorflow' "
                            "(or 'auto') for mixed precision")
    return runtime


def check_replicas(model: str | None, replicas: Any) -> int:
    """A replica count nbtool can use: a whole number >= 1, returned as a plain ``int``.

    Example:
        >>> check_replicas("cnn", 2)
        2
        >>> check_replicas("cnn", 2.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.InvalidOption: model 'cnn': replicas=2.5; expected a whole number >= 1...
    """
    if _whole(replicas) and replicas >= 1:
        return int(replicas)
    raise InvalidOption(model, "replicas", replicas, "a whole number >= 1 (how many workers "
                        "hold the model)", "replicas=1, or up to the number of workers")


def check_backend_support(spec: ModelSpec, backends: set[str]) -> None:
    """Refuse, at register, what the workers' Keras backends (``backends``: those of the
    workers ``spec`` is placed on) cannot run. ``.keras`` and ``.h5`` files run on every
    backend, ``.tflite`` (LiteRT) and OpenVINO ``.xml`` files need none; a SavedModel,
    ``preprocess=`` (TensorFlow ops, for every format) and a forced runtime (the OpenVINO
    and LiteRT conversions are made and checked with TensorFlow) need TensorFlow.

    Example:
        >>> spec = ModelSpec("m", "/m/exported", "savedmodel", 1, "1-1", runtime="auto")
        >>> check_backend_support(spec, {"tensorflow"})
        >>> check_backend_support(spec, {"jax"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.BackendUnsupported: model 'm' (/m/exported): a SavedModel runs only in TensorFlow, and the workers run Keras on jax. Fix: register a .keras file of it ...
    """
    others = sorted(set(backends) - {"tensorflow"})
    if not others:
        return
    backend = others[0]
    if spec.preprocess is not None:   # TensorFlow ops, whatever runs the model itself
        what = "preprocess= runs TensorFlow ops"
        fix = ("preprocess the rows before predict (or make it Keras layers of the model), "
               "or start the engine with backend='tensorflow'")
    elif spec.format in ("tflite", "openvino"):   # LiteRT and OpenVINO need no TensorFlow
        return
    elif spec.format == "savedmodel":
        what = "a SavedModel runs only in TensorFlow"
        fix = ("register a .keras file of it (model.save('name.keras') where it was made), "
               "or start the engine with backend='tensorflow'")
    elif spec.runtime not in (None, "auto"):
        what = (f"runtime={spec.runtime!r} needs TensorFlow (the OpenVINO and LiteRT "
                "conversions are made and checked with it)")
        fix = (f"leave runtime= out (the workers' Keras runs it on {backend}), or start the "
               f"engine with backend='tensorflow'")
    else:
        return
    raise BackendUnsupported(spec.name, spec.path, backend, what, fix)


def _whole(value: Any) -> bool:
    """A real integer: not a bool (True is not a count), not a float such as 2.0."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def find_models(folder: str | os.PathLike) -> dict[str, Path]:
    """Every runnable model inside ``folder`` (not recursing into SavedModels), by name.

    The name is the file name without its suffix; a SavedModel directory is named after the
    directory. Two models with one name (``mlp.h5`` and ``mlp.keras``): the first in sorted
    order keeps it, the other is skipped with a warning. Names are not checked here
    (``Engine.register_dir`` skips invalid ones with a warning).

    Example:
        >>> import pathlib, tempfile
        >>> models = pathlib.Path(tempfile.mkdtemp())
        >>> for f in ("cnn.keras", "mlp.h5", "det.tflite", "notes.txt"):
        ...     _ = (models / f).write_bytes(b"")
        >>> (models / "exported" / "variables").mkdir(parents=True)
        >>> _ = (models / "exported" / "saved_model.pb").write_bytes(b"")
        >>> sorted(find_models(models))
        ['cnn', 'det', 'exported', 'mlp']
    """
    root = Path(folder)
    if not root.is_dir():
        raise ModelFileError(None, str(folder), "not a directory",
                             "pass the folder that holds your .keras/.h5/.tflite files")
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if "saved_model.pb" in filenames and here != root:
            _keep_first(found, here.name, here)
            dirnames.clear()
            continue
        for f in sorted(filenames):
            if Path(f).suffix.lower() in FORMATS:
                _keep_first(found, Path(f).stem, here / f)
        dirnames.sort()
    return found


def _keep_first(found: dict[str, Path], name: str, path: Path) -> None:
    """The first model found under a name keeps it; a later one is skipped out loud
    (``mlp.h5`` beside ``mlp.keras`` is not silently dropped)."""
    if name not in found:
        found[name] = path
        return
    warn_user(f"skipped {path}: {found[name]} already takes the name {name!r}. Fix: "
              f"register it under a name of its own: eng.register("
              f"{clean_name(name + '_' + path.suffix.lstrip('.')) !r}, {str(path)!r})")
