"""What an OpenVINO IR file (``model.xml`` with its weights, ``model.bin``) says about
itself, read with ``xml.etree``: no OpenVINO, no TensorFlow in the kernel.

An IR is OpenVINO's own model format: the ``.xml`` holds the graph (``Parameter`` layers
are its inputs, ``Result`` layers its outputs), the ``.bin`` beside it the weights.
``eng.optimize``'s OpenVINO variants are IR files, and so is any IR a user brings
(``ov.save_model``, OpenVINO's model zoo). Its graph holds OpenVINO ops only, no code of
its own, so it needs no ``trusted=True``.

Example:
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "m.xml").write_text('''<net name="m" version="11"><layers>
    ...   <layer id="0" name="x" type="Parameter">
    ...     <data shape="?,8,8,3" element_type="f32"/></layer>
    ...   <layer id="1" name="y" type="Result"/></layers></net>''')
    >>> _ = (d / "m.bin").write_bytes(b"1234")
    >>> size, inputs, n_outputs, unsafe = inspect_ir(None, d / "m.xml")
    >>> inputs, n_outputs, unsafe, size == ir_size(d / "m.xml")
    ([((None, 8, 8, 3), 'float32')], 1, None, True)
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from nbtool.errors import ModelFileError

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
    :func:`nbtool.models.files.read_model_file` wants them.

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
            inputs.append((shape or None, ELEMENT_TYPES.get(element, element)))
    if not inputs or not n_outputs:
        raise ModelFileError(name, str(p), f"an OpenVINO IR with {len(inputs)} inputs "
                             f"(Parameter layers) and {n_outputs} outputs (Result layers)",
                             _FIX)
    return ir_size(p), inputs, n_outputs, None
