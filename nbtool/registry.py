"""Model specs and the registry, read from the files without importing TensorFlow.

The notebook kernel must not import TensorFlow (it would grab GPU memory), so everything the
client needs to know about a model (format, size, input shape and dtype) is read from the
file itself: the ``config.json`` inside a ``.keras`` zip, the ``model_config`` attribute of
an ``.h5`` file (Keras 2 or Keras 3), the flatbuffer of a ``.tflite`` (read with LiteRT's
schema). SavedModel directories only tell their size here; their input signature is
learned on the worker the first time the model loads. What would run code at load (a
Python lambda, any SavedModel graph) is refused here unless ``trusted=True``.

Example:
    A ``.keras`` file is a zip; the ``config.json`` inside (trimmed here to what is read)
    is enough to know the model, with no TensorFlow imported and no weights loaded.

    >>> import json, pathlib, tempfile, zipfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "mlp.keras"
    >>> layers = [{"class_name": "InputLayer",
    ...            "config": {"batch_shape": [None, 8], "dtype": "float32"}}]
    >>> with zipfile.ZipFile(path, "w") as z:
    ...     z.writestr("config.json", json.dumps({"class_name": "Sequential",
    ...                                           "config": {"layers": layers}}))
    >>> reg = Registry()
    >>> reg.add(inspect_model("mlp", path)) is None     # None: no "mlp" was there before
    True
    >>> spec = reg.get("mlp")
    >>> spec.format, spec.input_shape, spec.input_dtype
    ('keras', (None, 8), 'float32')
"""

from __future__ import annotations

import json
import numbers
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from .errors import (InvalidModelName, InvalidOption, ModelFileError, ModelNotFound,
                     UnsupportedFormat, UntrustedModel)
from .wire import ModelSpec, file_fingerprint

#: File suffixes and what they are. A directory holding ``saved_model.pb`` is "savedmodel".
FORMATS = {".keras": "keras", ".h5": "h5", ".hdf5": "h5", ".tflite": "tflite"}

#: The longest model name: names become file names and result-store array names.
NAME_LIMIT = 100
#: What a model name may hold (ASCII only: no case- or normalization-folding surprises).
#: ``@`` is in it for optimize()'s ``name@variant``.
_NAME_CHARS = re.compile(r"[A-Za-z0-9_\-.@+]+")

#: Why a Python lambda in a Keras config needs trust (the worker says the same at load).
_LAMBDA_WHY = ("Keras refuses to deserialize in safe mode (loading it runs the Python code "
               "stored in the file)")
#: Why a SavedModel always needs trust: no safe mode exists for a TensorFlow graph.
_SAVEDMODEL_WHY = ("can run arbitrary TensorFlow ops on the workers, including file reads "
                   "and writes (a SavedModel has no safe mode)")


def detect_format(path: str | os.PathLike, model: str | None = None) -> str:
    """Say which format a model path is in: ``"keras"``, ``"h5"``, ``"savedmodel"`` or
    ``"tflite"``.

    Raises :class:`ModelFileError` if the path does not exist and
    :class:`UnsupportedFormat` if nbtool cannot run it.

    Example:
        >>> detect_format("does/not/exist.keras")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.ModelFileError: file does/not/exist.keras: the path does not exist...
    """
    p = Path(path)
    if not p.exists():
        raise ModelFileError(model, str(path), "the path does not exist",
                             f"check the path (the working directory is {os.getcwd()})")
    if p.is_dir():
        if (p / "saved_model.pb").exists():
            return "savedmodel"
        raise UnsupportedFormat(model, str(path), "a directory without saved_model.pb")
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise UnsupportedFormat(model, str(path))
    return fmt


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
    fmt = detect_format(path, name)
    p = Path(path).resolve()
    # Before reading: a file re-saved while it is read then looks changed at the next run
    # (and is read again), never unchanged with what was read from the older one.
    fingerprint = file_fingerprint(p)
    reader = {"keras": _read_keras_zip, "h5": _read_h5, "savedmodel": _read_savedmodel,
              "tflite": _read_tflite}[fmt]
    size, inputs, n_outputs, unsafe = reader(name, p)
    if unsafe and not options.get("trusted"):
        raise UntrustedModel(name, str(p), *unsafe)
    shape, dtype = inputs[0] if inputs else (None, None)
    return ModelSpec(name=name, path=str(p), format=fmt, size_bytes=size,
                     fingerprint=fingerprint, input_shape=shape, input_dtype=dtype,
                     n_inputs=max(len(inputs), 1), n_outputs=n_outputs, **options)


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
    """A batch size nbtool can use: a whole number >= 1, ``"auto"`` or ``None`` (64).

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
                        "None (the default, 64)", "batch_size=64, batch_size='auto' or leave "
                        "it out")


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


def _whole(value: Any) -> bool:
    """A real integer: not a bool (True is not a count), not a float such as 2.0."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def needs_trust(config: Any) -> str | None:
    """What in a Keras model config would run code when loaded (a Python lambda), or None.

    The whole tree is walked, nested Functional/Sequential models too, but not the
    ``compile_config`` (workers load with ``compile=False``). Keras 3 stores a lambda as
    ``{"class_name": "__lambda__"}``; Keras 2 ``.h5`` files mark it ``function_type:
    "lambda"``. These are exactly what Keras' safe mode refuses; the worker still loads
    with safe mode as the second line of defence.

    Example:
        >>> layer = {"class_name": "Lambda", "config": {"name": "scale",
        ...          "function": {"class_name": "__lambda__", "config": {"code": "..."}}}}
        >>> needs_trust({"class_name": "Sequential", "config": {"layers": [layer]}})
        "a Lambda layer 'scale'"
        >>> needs_trust({"class_name": "Sequential", "config": {"layers": []}}) is None
        True
    """
    stack: list[tuple[Any, str | None]] = [(config, None)]
    while stack:
        node, layer = stack.pop()
        if isinstance(node, list):
            stack.extend((v, layer) for v in node)
            continue
        if not isinstance(node, dict):
            continue
        cfg = node.get("config")
        if node.get("class_name") == "Lambda" and isinstance(cfg, dict):
            layer = cfg.get("name") or layer
        if node.get("class_name") == "__lambda__" or "lambda" in (
                node.get("function_type"), node.get("output_shape_type")):
            return f"a Lambda layer {layer!r}" if layer else "a Python lambda"
        stack.extend((v, layer) for k, v in node.items() if k != "compile_config")
    return None


def _read_keras_zip(name: str, p: Path):
    try:
        with zipfile.ZipFile(p) as z:
            config = json.loads(z.read("config.json"))
            weights = sum(i.file_size for i in z.infolist() if i.filename.endswith(".h5")
                          or i.filename.endswith(".npz"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as e:
        raise ModelFileError(name, str(p), f"not a readable .keras archive ({e})",
                             "re-save the model with model.save('name.keras')") from None
    return (max(weights, p.stat().st_size), *_signature_from_config(config),
            _lambda_trust(config))


def _lambda_trust(config: dict) -> tuple[str, str] | None:
    """``(what, why)`` for :class:`UntrustedModel` if the config holds a lambda."""
    found = needs_trust(config)
    return None if found is None else (found, _LAMBDA_WHY)


def _read_h5(name: str, p: Path):
    import h5py  # light: no TensorFlow behind it

    try:
        with h5py.File(p, "r") as f:
            raw = f.attrs.get("model_config")
    except OSError as e:
        raise ModelFileError(name, str(p), f"not a readable HDF5 file ({e})",
                             "re-save the model with model.save('name.keras')") from None
    if raw is None:
        raise ModelFileError(name, str(p), "the HDF5 file holds weights only, no model "
                             "config", "save the whole model with model.save('name.keras'), "
                             "not model.save_weights()")
    config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    return p.stat().st_size, *_signature_from_config(config), _lambda_trust(config)


def _read_savedmodel(name: str, p: Path):
    # Its graph is code: any SavedModel needs trusted=True (see _SAVEDMODEL_WHY).
    return disk_size(p), [], None, ("a TensorFlow graph (a SavedModel directory)",
                                    _SAVEDMODEL_WHY)


def disk_size(path: str | Path) -> int:
    """Bytes on disk of a model file, or of every file in a model directory (SavedModel).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "a").write_bytes(b"123")
        3
        >>> disk_size(d), disk_size(d / "a")
        (3, 3)
    """
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _read_tflite(name: str, p: Path):
    """Size, input and outputs of a LiteRT flatbuffer, read with its schema (no TF).

    A quantized (int8/uint8) input is reported as float32: that is what callers send, the
    worker quantizes it with the model's scale and zero point.
    """
    fix = ("convert the model again (eng.optimize(...) or tf.lite.TFLiteConverter) and "
           "save the bytes it returns unchanged")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ModelFileError(name, str(p), f"the file cannot be read ({e})", fix) from None
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelFileError(name, str(p), "not a LiteRT (.tflite) flatbuffer: its file "
                             f"identifier is {data[4:8]!r}, expected b'TFL3'", fix)
    try:
        from ai_edge_litert import schema_py_generated as schema  # flatbuffers only, no TF

        model = schema.Model.GetRootAs(data, 0)
        graph = model.Subgraphs(0)
        inputs = []
        for i in range(graph.InputsLength()):
            t = graph.Tensors(graph.Inputs(i))
            dims = t.ShapeSignatureAsNumpy() if t.ShapeSignatureLength() else t.ShapeAsNumpy()
            dims = [] if isinstance(dims, int) else list(dims)
            shape = tuple(None if int(d) < 0 else int(d) for d in dims)
            if shape:
                shape = (None, *shape[1:])   # the worker resizes the batch axis
            dtype = _TFLITE_TYPES.get(t.Type(), "float32")
            q = t.Quantization()
            if dtype in ("int8", "uint8") and q is not None and q.ScaleLength():
                dtype = "float32"
            inputs.append((shape or None, dtype))
        n_outputs = graph.OutputsLength()
    except ImportError:   # without ai-edge-litert the worker learns it at the first load
        return p.stat().st_size, [], None, None
    except Exception as e:   # a truncated or damaged flatbuffer
        raise ModelFileError(name, str(p), f"a damaged .tflite flatbuffer ({type(e).__name__}"
                             f": {e})", fix) from None
    return p.stat().st_size, inputs, n_outputs, None


#: LiteRT's tensor type codes (schema ``TensorType``) for the dtypes a model input can have.
_TFLITE_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool",
                 7: "int16", 9: "int8", 10: "float64"}


def _signature_from_config(config: dict) -> tuple[list[tuple[tuple, str]], int | None]:
    """Inputs ``[(batch_shape, dtype), ...]`` and the number of outputs of a Keras config."""
    cfg = config.get("config", {})
    layers = cfg.get("layers", [])
    by_name = {l.get("config", {}).get("name"): l for l in layers}
    inputs: list[tuple[tuple, str]] = []
    if config.get("class_name") == "Sequential":
        first = layers[0] if layers else {}
        if first.get("class_name") == "InputLayer":
            inputs.append(_input_layer_signature(first))
        elif cfg.get("build_input_shape"):
            inputs.append((tuple(cfg["build_input_shape"]), _dtype_name(cfg.get("dtype"))))
        return inputs, 1
    for ref in _refs(cfg.get("input_layers")):
        layer = by_name.get(ref)
        if layer is not None and layer.get("class_name") == "InputLayer":
            inputs.append(_input_layer_signature(layer))
    outputs = _refs(cfg.get("output_layers"))
    return inputs, (len(outputs) or None)


def _refs(spec) -> list[str]:
    """Layer names from Keras' ``input_layers``/``output_layers`` (one ref or a list)."""
    if not spec:
        return []
    if isinstance(spec, list) and spec and isinstance(spec[0], str):
        return [spec[0]]
    if isinstance(spec, dict):
        return [r[0] for r in spec.values()]
    return [r[0] for r in spec if isinstance(r, list) and r]


def _input_layer_signature(layer: dict) -> tuple[tuple, str]:
    c = layer.get("config", {})
    shape = c.get("batch_shape") or c.get("batch_input_shape")
    return (tuple(shape) if shape else None), _dtype_name(c.get("dtype"))


def _dtype_name(dtype) -> str:
    if isinstance(dtype, dict):  # a DTypePolicy
        name = dtype.get("config", {}).get("name", "float32")
        return "float32" if name.startswith("mixed_") else name
    return dtype or "float32"


class Registry:
    """The registered models of one engine, by name.

    Example:
        >>> reg = Registry()
        >>> reg.names()
        []
        >>> reg.get("cnn")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.ModelNotFound: no model named 'cnn' is registered; ...
        >>> reg.add(ModelSpec("cnn", "/m/cnn.keras", "keras", 1024, "1024-1"))  # None: new
        >>> reg.names(), "cnn" in reg, reg.remove("cnn").path, len(reg)
        (['cnn'], True, '/m/cnn.keras', 0)
    """

    def __init__(self):
        self._specs: dict[str, ModelSpec] = {}

    def add(self, spec: ModelSpec) -> ModelSpec | None:
        """Add or replace a spec; returns the spec it replaced, if any."""
        old = self._specs.get(spec.name)
        self._specs[spec.name] = spec
        return old

    def remove(self, name: str) -> ModelSpec:
        """Forget a model; raises :class:`ModelNotFound` if it is not registered."""
        spec = self.get(name)
        del self._specs[name]
        return spec

    def get(self, name: str) -> ModelSpec:
        """The spec of a registered model, or a :class:`ModelNotFound` with suggestions."""
        try:
            return self._specs[name]
        except KeyError:
            raise ModelNotFound(name, list(self._specs)) from None

    def names(self) -> list[str]:
        """Registered model names, in registration order."""
        return list(self._specs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def __iter__(self):
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)


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
    warnings.warn(f"skipped {path}: {found[name]} already takes the name {name!r}. Fix: "
                  f"register it under a name of its own: eng.register("
                  f"{clean_name(name + '_' + path.suffix.lstrip('.')) !r}, {str(path)!r})",
                  stacklevel=3)
