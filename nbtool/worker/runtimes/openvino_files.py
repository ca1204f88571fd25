"""Opening an OpenVINO IR file registered as a model (``.xml`` with its ``.bin``) on a
worker: no TensorFlow, no conversion, and the precision it computes in, said honestly.

An IR file is OpenVINO's own model: it is read as it is and run by
:class:`~nbtool.worker.runtimes.openvino.OpenVINOPredictor`. It computes in float32
(``INFERENCE_PRECISION_HINT=f32``) unless the IR itself asks for another precision in its
``rt_info`` (``runtime_options/INFERENCE_PRECISION_HINT``, OpenVINO's own place for it,
which ``compile_model`` honours): that is how ``eng.optimize``'s ``openvino-bf16`` variant
says it wants bfloat16. On a CPU without bfloat16 support OpenVINO computes in float32
anyway; :func:`precision_note` says which happens here.

Example:
    >>> precision_note("f32", True)
    'OpenVINO IR file, float32'
    >>> precision_note("bf16", False)  # doctest: +ELLIPSIS
    'OpenVINO IR file asking for bf16: runs as float32 on this CPU (OpenVINO lists no BF16...)'
"""

from __future__ import annotations

import os
import time

import numpy as np

from nbtool.errors import ModelLoadError
from nbtool.wire import ModelSpec
from nbtool.worker.environment import worker_name
from nbtool.worker.runtimes.openvino import OpenVINOModel, import_openvino

#: Where an IR keeps the precision it wants (OpenVINO's ``runtime_options`` in rt_info).
HINT_PATH = ["runtime_options", "INFERENCE_PRECISION_HINT"]


def bf16_supported() -> bool:
    """Whether OpenVINO computes bfloat16 on this CPU (``BF16`` in its CPU's
    ``OPTIMIZATION_CAPABILITIES``: avx512_bf16 or AMX); elsewhere a bf16 hint runs float32.

    Example:
        >>> isinstance(bf16_supported(), bool)
        True
    """
    caps = import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in caps


def asked_precision(model) -> str:
    """The precision an IR's rt_info asks for (``"bf16"``...), or ``"f32"`` if it asks none.

    Example:
        >>> ov = import_openvino()
        >>> p = ov.opset13.parameter([-1, 2], np.float32)
        >>> m = ov.Model([ov.opset13.relu(p)], [p])
        >>> asked_precision(m)
        'f32'
        >>> m.set_rt_info("bf16", HINT_PATH); asked_precision(m)
        'bf16'
    """
    if not model.has_rt_info(HINT_PATH):
        return "f32"
    return str(model.get_rt_info(HINT_PATH).astype(str)).lower() or "f32"


def precision_note(hint: str, supported: bool, quantized: bool = False) -> str:
    """One phrase for the model's state: the precision an IR file computes in here
    (``quantized``: it holds int8 FakeQuantize ops, as NNCF's output does).

    Example:
        >>> precision_note("bf16", True)
        'OpenVINO IR file, bf16 (its rt_info asks for it; this CPU computes it)'
        >>> precision_note("f32", True, quantized=True)
        'OpenVINO IR file, int8 where quantized, float32 elsewhere'
    """
    if hint in ("f32", "float32"):
        return "OpenVINO IR file, " + ("int8 where quantized, float32 elsewhere" if quantized
                                       else "float32")
    if hint == "bf16" and not supported:
        return ("OpenVINO IR file asking for bf16: runs as float32 on this CPU (OpenVINO "
                "lists no BF16 in its CPU capabilities)")
    return f"OpenVINO IR file, {hint} (its rt_info asks for it; this CPU computes it)"


def open_ir_file(spec: ModelSpec) -> OpenVINOModel:
    """The IR file ``spec`` names, read, with its input and the precision it computes in;
    a :class:`~nbtool.errors.ModelLoadError` for an IR nbtool cannot run (several inputs).

    Example:
        >>> m = open_ir_file(spec)            # doctest: +SKIP
        >>> m.row_shape, m.precision_hint     # doctest: +SKIP
        ((8, 8, 1), 'f32')
    """
    t0 = time.perf_counter()
    model = import_openvino().Core().read_model(spec.path)
    if len(model.inputs) != 1:
        raise ModelLoadError(spec.name, spec.path, worker_name(),
                             f"the IR takes {len(model.inputs)} inputs", "nbtool runs "
                             "single-input models; save an IR that takes one tensor")
    port = model.inputs[0]
    dims = list(port.get_partial_shape())
    row_shape = tuple(d.get_length() if d.is_static else None for d in dims[1:])
    dtype = np.dtype(port.get_element_type().to_dtype()).name
    return OpenVINOModel(model, spec.path, row_shape, dtype, False,
                         time.perf_counter() - t0, precision_hint=asked_precision(model))


def ir_note(ir: OpenVINOModel) -> str:
    """What the model's state says of an IR file: read, and the precision it computes in.

    Example:
        >>> ir_note(open_ir_file(spec))      # doctest: +SKIP
        'OpenVINO IR file, float32; read in 0.0 s'
    """
    hint = ir.precision_hint
    supported = hint != "bf16" or bf16_supported()
    quantized = any(op.get_type_name() == "FakeQuantize" for op in ir.model.get_ops())
    return f"{precision_note(hint, supported, quantized)}; read in {ir.seconds:.1f} s"


def ir_weight_bytes(ir: OpenVINOModel) -> int:
    """The bytes an IR's weights take: its ``.bin`` (what the model holds once compiled,
    give or take OpenVINO's repacking).

    Example:
        >>> ir_weight_bytes(open_ir_file(spec)) > 0   # doctest: +SKIP
        True
    """
    bin_ = os.path.splitext(ir.ir_path)[0] + ".bin"
    return os.path.getsize(bin_) if os.path.exists(bin_) else 0
