"""What a model file says about itself, read without importing TensorFlow.

The notebook kernel must not import TensorFlow (it would grab GPU memory), so everything the
client needs to know about a model (format, size, input shape and dtype, outputs) is read
from the file itself: the ``config.json`` inside a ``.keras`` zip, the ``model_config``
attribute of an ``.h5`` file (Keras 2 or Keras 3), the flatbuffer of a ``.tflite`` (read
with LiteRT's schema), the graph of an OpenVINO IR ``.xml`` (:mod:`nbtool.catalog.files`).
A SavedModel's signature is read from its ``saved_model.pb`` (:func:`savedmodel_signature`,
a few protobuf fields decoded by hand). What would run code at load (a Python lambda, any SavedModel graph) is
said here too, so the registry can refuse it unless trusted.

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
    >>> info = read_model_file(path)
    >>> info.format, info.inputs, info.n_outputs, info.unsafe
    ('keras', [InputSpec(name='input', shape=(None, 8), dtype='float32')], 1, None)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any
import xml.etree.ElementTree as ET
import zipfile

from nbtool.errors import ModelFileError, UnsupportedFormat
from nbtool.signature import InputSpec, named_outputs
from nbtool.catalog.savedmodel_pb import savedmodel_signature


#: OpenVINO's element types (the ``element_type`` of a ``Parameter``) as numpy dtype names.
ELEMENT_TYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64",
                 "i8": "int8", "u8": "uint8", "i16": "int16", "u16": "uint16",
                 "i32": "int32", "u32": "uint32", "i64": "int64", "u64": "uint64",
                 "boolean": "bool"}

_FIX = ("save it again with openvino.save_model(model, 'name.xml'), which writes the .xml "
        "and its .bin, and keep the two side by side")


def weights_path(xml: str | os.PathLike) -> Path:
    """The weights file of an IR: the ``.bin`` with the ``.xml``'s name, beside it (where
    OpenVINO's ``read_model`` looks for it).

    Example:
        >>> str(weights_path("models/det.xml"))
        'models/det.bin'
    """
    return Path(xml).with_suffix(".bin")


def ir_size(xml: str | os.PathLike) -> int:
    """Bytes on disk of an IR: its ``.xml`` and its ``.bin`` (if there).

    Example:
        >>> ir_size(__file__) == os.path.getsize(__file__)   # no .bin beside it
        True
    """
    bin_ = weights_path(xml)
    return os.path.getsize(xml) + (os.path.getsize(bin_) if bin_.is_file() else 0)


def parse_shape(text: str) -> tuple:
    """An IR ``shape`` attribute as a tuple: dynamic dimensions (``?``, ``-1``, ranges such
    as ``1..10``) are ``None``.

    Example:
        >>> parse_shape("?,224,224,3"), parse_shape("1..8,16"), parse_shape("")
        ((None, 224, 224, 3), (None, 16), ())
    """
    dims = []
    for d in (part.strip() for part in text.split(",") if part.strip()):
        dims.append(int(d) if d.lstrip("-").isdigit() and int(d) >= 0 else None)
    return tuple(dims)


def inspect_ir(name: str | None, p: Path):
    """Size, inputs ``[(batch shape, dtype)]``, number of outputs and ``unsafe`` (always
    None: an IR runs no code of its own) of the IR at ``p``, as
    :func:`nbtool.catalog.files.read_model_file` wants them.

    The batch axis is reported as ``None`` (the worker reshapes it to its batch size).
    A file that is not an IR, or one whose ``.bin`` is missing, is a
    :class:`~nbtool.errors.ModelFileError`.

    Example:
        >>> inspect_ir("m", Path("does/not/exist.xml"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.ModelFileError: model 'm' (does/not/exist.xml): not a readable ...
    """
    try:
        root = ET.parse(p).getroot()
    except (ET.ParseError, OSError) as e:
        raise ModelFileError(name, str(p), f"not a readable OpenVINO IR .xml ({e})",
                             _FIX) from None
    if root.tag != "net":
        raise ModelFileError(name, str(p), "not an OpenVINO IR: its root element is "
                             f"<{root.tag}>, expected <net> (an .xml from "
                             "openvino.save_model)", _FIX)
    if not weights_path(p).is_file():
        raise ModelFileError(name, str(p), f"its weights file {weights_path(p).name} is not "
                             "beside it", _FIX)
    inputs, n_outputs = [], 0
    for layer in root.iterfind("./layers/layer"):
        kind = layer.get("type")
        if kind == "Result":
            n_outputs += 1
        elif kind == "Parameter":
            data = layer.find("data")
            data = {} if data is None else data.attrib
            shape = parse_shape(data.get("shape", ""))
            if shape:
                shape = (None, *shape[1:])   # the worker reshapes the batch axis
            element = data.get("element_type", "f32")
            inputs.append(InputSpec(layer.get("name") or f"input_{len(inputs)}",
                                    shape or None, ELEMENT_TYPES.get(element, element)))
    if not inputs or not n_outputs:
        raise ModelFileError(name, str(p), f"an OpenVINO IR with {len(inputs)} inputs "
                             f"(Parameter layers) and {n_outputs} outputs (Result layers)",
                             _FIX)
    return ir_size(p), inputs, n_outputs, None, None


#: File suffixes and what they are. A directory holding ``saved_model.pb`` is "savedmodel";
#: an ``.xml`` is an OpenVINO IR (its weights in the ``.bin`` beside it).
FORMATS = {".keras": "keras", ".h5": "h5", ".hdf5": "h5", ".tflite": "tflite",
           ".xml": "openvino"}

#: Why a Python lambda in a Keras config needs trust (the worker says the same at load).
_LAMBDA_WHY = ("Keras refuses to deserialize in safe mode (loading it runs the Python code "
               "stored in the file)")
#: Why a SavedModel always needs trust: no safe mode exists for a TensorFlow graph.
_SAVEDMODEL_WHY = ("can run arbitrary TensorFlow ops on the workers, including file reads "
                   "and writes (a SavedModel has no safe mode)")


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """What a model file says about itself: its format and size, its inputs
    (:class:`~nbtool.wire.InputSpec`, in the model's order) and outputs (their number, and
    their names where the model names them) where the file tells them, and ``unsafe``:
    ``(what, why)`` when loading it would run code of its own.

    Example:
        >>> ModelFile("savedmodel", 2048, [], None, ("a TensorFlow graph", "...")).input
        (None, None)
    """

    format: str
    size_bytes: int
    inputs: list
    n_outputs: int | None
    unsafe: tuple[str, str] | None = None
    output_names: tuple | None = None

    @property
    def input(self) -> tuple:
        """The first input's ``(batch shape, dtype)``, or ``(None, None)`` if unknown."""
        return (self.inputs[0].shape, self.inputs[0].dtype) if self.inputs else (None, None)


def read_model_file(path: str | os.PathLike, model: str | None = None) -> ModelFile:
    """Read a model file or SavedModel directory (never importing TensorFlow).

    ``model`` names it in errors: :class:`ModelFileError` for a missing, unreadable or
    damaged file, :class:`UnsupportedFormat` for one nbtool cannot run.

    Example:
        >>> import pathlib, tempfile
        >>> exported = pathlib.Path(tempfile.mkdtemp()) / "exported"   # model.export(...)
        >>> exported.mkdir(); _ = (exported / "saved_model.pb").write_bytes(b"...")
        >>> info = read_model_file(exported)
        >>> info.format, info.size_bytes, info.input, info.unsafe[0]
        ('savedmodel', 3, (None, None), 'a TensorFlow graph (a SavedModel directory)')
    """
    fmt = detect_format(path, model)
    p = Path(path).resolve()
    reader = {"keras": _read_keras_zip, "h5": _read_h5, "savedmodel": _read_savedmodel,
              "tflite": _read_tflite, "openvino": inspect_ir}[fmt]
    size, inputs, n_outputs, unsafe, output_names = reader(model, p)
    return ModelFile(fmt, size, inputs, n_outputs, unsafe, output_names)


def detect_format(path: str | os.PathLike, model: str | None = None) -> str:
    """Say which format a model path is in: ``"keras"``, ``"h5"``, ``"savedmodel"``,
    ``"tflite"`` or ``"openvino"`` (an IR ``.xml``).

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


def _read_keras_zip(name: str | None, p: Path):
    try:
        with zipfile.ZipFile(p) as z:
            config = json.loads(z.read("config.json"))
            weights = sum(i.file_size for i in z.infolist() if i.filename.endswith(".h5")
                          or i.filename.endswith(".npz"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as e:
        raise ModelFileError(name, str(p), f"not a readable .keras archive ({e})",
                             "re-save the model with model.save('name.keras')") from None
    inputs, n_outputs, names = _signature_from_config(config)
    return max(weights, p.stat().st_size), inputs, n_outputs, _lambda_trust(config), names


def _lambda_trust(config: dict) -> tuple[str, str] | None:
    """``(what, why)`` for :class:`UntrustedModel` if the config holds a lambda."""
    found = needs_trust(config)
    return None if found is None else (found, _LAMBDA_WHY)


def _read_h5(name: str | None, p: Path):
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
    inputs, n_outputs, names = _signature_from_config(config)
    return p.stat().st_size, inputs, n_outputs, _lambda_trust(config), names


def _read_savedmodel(name: str | None, p: Path):
    # Its graph is code: any SavedModel needs trusted=True (see _SAVEDMODEL_WHY).
    unsafe = ("a TensorFlow graph (a SavedModel directory)", _SAVEDMODEL_WHY)
    signature = savedmodel_signature(p / "saved_model.pb")
    if signature is None:   # unreadable here: the worker learns it at the first load
        return disk_size(p), [], None, unsafe, None
    inputs, outputs = signature
    return disk_size(p), inputs, len(outputs), unsafe, named_outputs(outputs)[1]


def disk_size(path: str | Path) -> int:
    """Bytes on disk of a model file, or of every file in a model directory (SavedModel);
    an OpenVINO IR ``.xml`` counts its ``.bin`` too.

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
    return ir_size(p) if p.suffix.lower() == ".xml" else p.stat().st_size


def _read_tflite(name: str | None, p: Path):
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
        signature = model.SignatureDefs(0) if model.SignatureDefsLength() == 1 else None
        input_names = _tflite_names(signature, "Inputs") if signature else {}
        output_names = _tflite_names(signature, "Outputs") if signature else {}
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
            name = input_names.get(graph.Inputs(i)) or (t.Name() or b"").decode() or f"input_{i}"
            inputs.append(InputSpec(name, shape or None, dtype))
        n_outputs = graph.OutputsLength()
    except ImportError:   # without ai-edge-litert the worker learns it at the first load
        return p.stat().st_size, [], None, None, None
    except Exception as e:   # a truncated or damaged flatbuffer
        raise ModelFileError(name, str(p), f"a damaged .tflite flatbuffer ({type(e).__name__}"
                             f": {e})", fix) from None
    names = tuple(output_names.get(graph.Outputs(i), "") for i in range(n_outputs))
    # Named as the worker returns them: a Keras conversion's output_0, output_1... are
    # numbers, not names (the worker orders its outputs by them).
    named = all(names) and not all(re.fullmatch(r"output_\d+", n) for n in names)
    return p.stat().st_size, inputs, n_outputs, None, names if named else None


def _tflite_names(signature, which: str) -> dict[int, str]:
    """A ``.tflite`` signature's names of its input or output tensors, by tensor index."""
    return {getattr(signature, which)(j).TensorIndex():
            getattr(signature, which)(j).Name().decode()
            for j in range(getattr(signature, f"{which}Length")())}


#: LiteRT's tensor type codes (schema ``TensorType``) for the dtypes a model input can have.
_TFLITE_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool",
                 7: "int16", 9: "int8", 10: "float64"}


def _signature_from_config(config: dict) -> tuple[list[InputSpec], int | None,
                                                   tuple | None]:
    """Inputs (:class:`InputSpec`, in the model's order), the number of outputs and their
    names (a dict of outputs: its keys in the order the worker flattens them, sorted) of
    a Keras config (Keras 3 or Keras 2)."""
    cfg = config.get("config", {})
    layers = cfg.get("layers", [])
    by_name = {l.get("config", {}).get("name"): l for l in layers}
    inputs: list[InputSpec] = []
    pre = cfg.get("preprocessor") if isinstance(cfg.get("preprocessor"), dict) else None
    if pre and cfg.get("backbone") and "tokenizer" in pre.get("config", {}):
        # A keras_hub task with a text preprocessor: it takes raw strings, one per row.
        return [InputSpec("text", (None,), "string")], 1, None
    if config.get("class_name") == "Sequential":
        first = layers[0] if layers else {}
        if first.get("class_name") == "InputLayer":
            inputs.append(_input_layer_signature(first))
        elif cfg.get("build_input_shape"):
            inputs.append(InputSpec("input", tuple(cfg["build_input_shape"]),
                                    _dtype_name(cfg.get("dtype"))))
        return inputs, 1, None
    for key, ref in _refs(cfg.get("input_layers")):
        layer = by_name.get(ref)
        if layer is not None and layer.get("class_name") == "InputLayer":
            spec = _input_layer_signature(layer)
            # A dict of inputs is called by its keys, a list by the layers' names.
            inputs.append(dataclasses.replace(spec, name=key or spec.name))
    outputs = _refs(cfg.get("output_layers"))
    names = named_outputs([k for k, _ in outputs])[1] \
        if outputs and all(k is not None for k, _ in outputs) else None
    return inputs, (len(outputs) or None), names


def _refs(spec) -> list[tuple[str | None, str]]:
    """``(key, layer name)`` pairs from Keras' ``input_layers``/``output_layers`` (one
    ref, a list of them, or a dict of them by key; the key is None but in a dict)."""
    if not spec:
        return []
    if isinstance(spec, list) and spec and isinstance(spec[0], str):
        return [(None, spec[0])]
    if isinstance(spec, dict):
        return [(k, r[0]) for k, r in spec.items()]
    return [(None, r[0]) for r in spec if isinstance(r, list) and r]


def _input_layer_signature(layer: dict) -> InputSpec:
    c = layer.get("config", {})
    shape = c.get("batch_shape") or c.get("batch_input_shape")
    return InputSpec(c.get("name") or layer.get("name") or "input",
                     tuple(shape) if shape else None, _dtype_name(c.get("dtype")))


def _dtype_name(dtype) -> str:
    if isinstance(dtype, dict):  # a DTypePolicy
        name = dtype.get("config", {}).get("name", "float32")
        return "float32" if name.startswith("mixed_") else name
    return dtype or "float32"
