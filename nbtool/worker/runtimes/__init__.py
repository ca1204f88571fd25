"""The runtimes a model can run in on a worker: TensorFlow (``predictors``), the other
Keras backends (``backend_predictors``: JAX, PyTorch), LiteRT (``litert``, converted by
``to_litert``) and OpenVINO (``openvino``, its IR files in ``openvino_files``). Every one
is a fixed-batch predictor (``fixed_batch``: the shared base, the last batch padded);
:func:`make_predictor` is the one function that builds one.

Example:
    >>> from nbtool.worker.runtimes import DEFAULT_BATCH_SIZE
    >>> DEFAULT_BATCH_SIZE > 0
    True
"""

from __future__ import annotations

from nbtool.worker.runtimes.fixed_batch import FixedBatchPredictor
from nbtool.worker.runtimes.litert import LiteRTModel, open_tflite, probe_rows
from nbtool.worker.runtimes.openvino import (OpenVINOModel, import_openvino, ir_files,
    open_openvino, read_ir)
from nbtool.worker.runtimes.openvino_files import (HINT_PATH, ir_note, ir_weight_bytes,
    open_ir_file)
from nbtool.worker.runtimes.predictors import (CompiledPredictor, DEFAULT_BATCH_SIZE,
    KERAS_PREDICTORS, input_signature, make_predictor)
from nbtool.worker.runtimes.to_litert import (litert_converter, open_litert, package_version,
    quiet_converter)

__all__ = ["CompiledPredictor", "DEFAULT_BATCH_SIZE", "FixedBatchPredictor", "HINT_PATH",
           "KERAS_PREDICTORS", "LiteRTModel", "OpenVINOModel", "import_openvino",
           "input_signature", "ir_files", "ir_note", "ir_weight_bytes", "litert_converter",
           "make_predictor", "open_ir_file", "open_litert", "open_openvino", "open_tflite",
           "package_version", "probe_rows", "quiet_converter", "read_ir"]
