"""A SavedModel's serving signature read from its ``saved_model.pb``, without TensorFlow.

The notebook kernel never imports TensorFlow, and TensorFlow's protobuf classes come only
with it; so the few fields that say a signature's inputs and outputs are decoded here from
the protobuf wire format (varints and length-delimited fields, nothing else is needed):
``SavedModel.meta_graphs[0].signature_def[key]`` with its ``inputs`` and ``outputs`` maps of
``TensorInfo`` (dtype, shape). The graph itself is skipped over, never parsed.

Example:
    >>> import pathlib, tempfile
    >>> pb = pathlib.Path(tempfile.mkdtemp()) / "saved_model.pb"
    >>> _ = pb.write_bytes(b"not a protobuf")
    >>> savedmodel_signature(pb) is None      # unreadable: the worker learns it at load
    True
"""

from __future__ import annotations

import os
from typing import Iterator

from nbtool.signature import SAVEDMODEL_ENDPOINTS, InputSpec

#: TensorFlow's ``DataType`` enum values, as dtype names.
DTYPES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
          7: "string", 9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 19: "float16",
          22: "uint32", 23: "uint64"}



def savedmodel_signature(pb: str | os.PathLike) -> tuple[list[InputSpec], list[str]] | None:
    """The inputs (by name, sorted) and the output names of the endpoint the worker calls
    (:data:`~nbtool.wire.SAVEDMODEL_ENDPOINTS`); None when the file cannot be read this
    way.

    Example:
        >>> savedmodel_signature("/no/such/saved_model.pb") is None
        True
    """
    try:
        with open(pb, "rb") as f:
            data = f.read()
        signatures = {}
        for field, value in _fields(data):
            if field == 2:   # meta_graphs: the first one is what TensorFlow serves
                signatures = _signature_defs(value)
                break
        for endpoint in SAVEDMODEL_ENDPOINTS:
            if endpoint in signatures:
                inputs, outputs = signatures[endpoint]
                return ([InputSpec(name, *inputs[name]) for name in sorted(inputs)],
                        sorted(outputs))
    except (OSError, ValueError, IndexError):
        return None
    return None


def _signature_defs(meta_graph: bytes) -> dict[str, tuple[dict, dict]]:
    """``MetaGraphDef.signature_def`` (field 5, a map): key -> (inputs, outputs), each
    name -> (batch shape, dtype)."""
    out = {}
    for field, entry in _fields(meta_graph):
        if field != 5:
            continue
        key, value = _map_entry(entry)
        inputs, outputs = {}, {}
        for f, item in _fields(value):
            if f in (1, 2):
                name, info = _map_entry(item)
                (inputs if f == 1 else outputs)[name] = _tensor_info(info)
        out[key] = (inputs, outputs)
    return out


def _tensor_info(data: bytes) -> tuple[tuple | None, str]:
    """``TensorInfo``: (batch shape with None for unknown sizes, dtype name)."""
    dtype, shape = "float32", None
    for field, value in _fields(data):
        if field == 2:
            dtype = DTYPES.get(value, f"dtype {value}")
        elif field == 3:
            shape = _shape(value)
    if shape:
        shape = (None, *shape[1:])   # the worker sends its own batch
    return shape, dtype


def _shape(data: bytes) -> tuple | None:
    """``TensorShapeProto``: its dims' sizes (-1 as None); None for an unknown rank."""
    dims = []
    for field, value in _fields(data):
        if field == 3 and value:   # unknown_rank
            return None
        if field == 2:
            size = next((v for f, v in _fields(value) if f == 1), 0)
            size = size - (1 << 64) if size >= 1 << 63 else size   # int64 -1 as a varint
            dims.append(None if size < 0 else size)
    return tuple(dims)


def _map_entry(data: bytes) -> tuple[str, bytes]:
    """A protobuf map entry: (key as text, value bytes)."""
    key, value = "", b""
    for field, v in _fields(data):
        if field == 1:
            key = v.decode("utf-8")
        elif field == 2:
            value = v
    return key, value


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """``(field number, value)`` of each field of a protobuf message: an int for a varint,
    bytes for a length-delimited field; fixed-width fields are skipped."""
    i, n = 0, len(data)
    while i < n:
        key, i = _varint(data, i)
        field, kind = key >> 3, key & 7
        if kind == 0:
            value, i = _varint(data, i)
            yield field, value
        elif kind == 2:
            length, i = _varint(data, i)
            if i + length > n:
                raise ValueError("truncated field")
            yield field, data[i:i + length]
            i += length
        elif kind == 1:
            i += 8
        elif kind == 5:
            i += 4
        else:
            raise ValueError(f"wire type {kind} is not in a SavedModel's signature")


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """A base-128 varint at ``data[i:]``: (value, index after it)."""
    value = shift = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
