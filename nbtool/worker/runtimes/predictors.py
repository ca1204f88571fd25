"""One fixed-batch predictor per runtime, and the choice of one for a model's artifact.

A predictor takes rows and returns one float array per output, in row order; it runs a
fixed batch shape (the last batch padded, :mod:`~nbtool.worker.runtimes.fixed_batch`), so it compiles
or allocates once, at warm-up, which also records each output's row shape and dtype.
TensorFlow runs Keras files and SavedModels (:class:`CompiledPredictor`); LiteRT runs
``.tflite`` files and Keras models converted to LiteRT
(:class:`~nbtool.worker.runtimes.litert.LiteRTPredictor`); OpenVINO runs their OpenVINO IR
(:class:`~nbtool.worker.runtimes.openvino.OpenVINOPredictor`); on a worker whose Keras runs on JAX
or PyTorch, a Keras model runs in that backend's compiled predictor
(:mod:`~nbtool.worker.runtimes.backend_predictors`). :func:`make_predictor` picks by what was opened
and the worker's backend; a new runtime adds its predictor and one branch there.

Example:
    >>> from nbtool.wire import ModelSpec
    >>> input_signature(ModelSpec("m", "m.keras", "keras", 1, "1-1"), (8,), "float32")
    ((8,), 'float32')
"""

from __future__ import annotations

import numpy as np

from nbtool.wire import ModelSpec
from nbtool.worker.environment import tensorflow
from nbtool.worker.keras_backends import backend_name
from nbtool.worker.runtimes.backend_predictors import JaxPredictor, TorchPredictor
from nbtool.worker.runtimes.fixed_batch import FixedBatchPredictor
from nbtool.worker.runtimes.litert import LiteRTModel, LiteRTPredictor
from nbtool.worker.runtimes.openvino import OpenVINOModel, OpenVINOPredictor

#: The compiled predictor of a Keras model, by the worker's Keras backend.
KERAS_PREDICTORS = {"jax": JaxPredictor, "torch": TorchPredictor}

#: Batch size when the user gives none. Large enough to amortise the per-call overhead on
#: CPU, small enough that activations of a mid-size convnet stay in a few hundred MB.
DEFAULT_BATCH_SIZE = 64

#: Ops that raise when a value is wrong: OpenVINO and LiteRT drop them when converting, so
#: a model that would stop with an error in TensorFlow would give NaN without one there.
CHECK_OPS = frozenset({"CheckNumerics", "CheckNumericsV2", "Assert"})


class CompiledPredictor(FixedBatchPredictor):
    """A ``tf.function`` over ``model(x, training=False)`` with one fixed batch shape.

    ``model.predict`` builds a tf.data pipeline and callbacks on every call; this traces
    once (at warm-up) and then only runs the graph. The last, short batch of a chunk is
    padded up to the batch size, so nothing ever retraces. XLA stays off unless asked
    for: on CPU it made convnets ten times slower here. A ``preprocess`` runs inside the
    graph. Calls may overlap (a graph holds no tensors between calls).

    Example:
        >>> p = CompiledPredictor(model, batch_size=32, row_shape=(8,), dtype="float32")  # doctest: +SKIP
        >>> p(np.ones((70, 8), "float32"))[0].shape                                      # doctest: +SKIP
        (70, 3)
    """

    serial = False
    propagates_nan = True   # TensorFlow's own answer for a NaN row stays as it is

    def __init__(self, call, batch_size: int, row_shape: tuple, dtype: str,
                 preprocess=None, jit_compile: bool = False, name: str | None = None,
                 path: str | None = None):
        super().__init__(batch_size, row_shape, dtype, preprocess, name, path)
        tf = tensorflow()

        def tensor_spec(row_shape, dtype):   # text travels as tf.string
            return tf.TensorSpec((self.batch_size, *row_shape),
                                 tf.string if dtype.kind in "USO" else dtype)
        signature = [{k: tensor_spec(v, self.dtype[k]) for k, v in self.row_shape.items()}
                     if isinstance(self.row_shape, dict)
                     else tensor_spec(self.row_shape, self.dtype)]

        def infer(x):
            if preprocess is not None:
                x = preprocess(x)
            outs = tf.nest.flatten(call(x, training=False))
            # Reduced-precision outputs come back as float32, like everyone else's.
            return [tf.cast(o, tf.float32) if o.dtype in (tf.bfloat16, tf.float16) else o
                    for o in outs]

        self._fn = tf.function(infer, input_signature=signature, jit_compile=jit_compile)

    @property
    def traces(self) -> int:
        """How many times the graph was traced; stays at 1 after warm-up."""
        return self._fn.experimental_get_tracing_count()

    def prepare(self) -> None:
        """Nothing ahead: the graph is traced by the warm-up's first call."""

    def run_batch(self, batch: np.ndarray) -> list[np.ndarray]:
        """One batch through the graph."""
        return [y.numpy() for y in self._fn(batch)]

    def checks(self) -> list[str]:
        """The in-graph checks its graph runs (``tf.debugging.check_numerics``,
        ``tf.debugging.assert_*``), nested functions included: ops that raise on bad
        values, and that a conversion to another runtime silently drops.

        Example:
            >>> CompiledPredictor(model, 32, (8,), "float32").checks()   # doctest: +SKIP
            ['CheckNumerics']
        """
        graph = self._fn.get_concrete_function().graph.as_graph_def()
        ops = {n.op for n in graph.node}
        for function in graph.library.function:
            ops |= {n.op for n in function.node_def}
        return sorted(ops & CHECK_OPS)


def make_predictor(spec: ModelSpec, call, batch: int, row_shape, dtype) -> FixedBatchPredictor:
    """The predictor of what was opened for ``spec``: LiteRT for a LiteRT model (a
    ``.tflite``, or a conversion), OpenVINO for an IR, else the Keras model compiled by
    the worker's backend (``tf.function``, ``jax.jit``, PyTorch under inference mode);
    all take rows and return float outputs in row order.

    Example:
        >>> make_predictor(spec, call, 64, (8,), "float32").warm_up()   # doctest: +SKIP
    """
    kind = KERAS_PREDICTORS.get(backend_name(), CompiledPredictor)
    if isinstance(call, OpenVINOModel):
        kind = OpenVINOPredictor
    elif isinstance(call, LiteRTModel):
        kind = LiteRTPredictor
    return kind(call, batch, row_shape, dtype, preprocess=spec.preprocess, name=spec.name,
                path=spec.path)


def input_signature(spec: ModelSpec, row_shape: tuple, dtype) -> tuple[tuple, str]:
    """What the predictor takes: the model's input, or, with an in-graph
    :class:`~nbtool.preprocess.Preprocess`, its input dtype (and any size, if it resizes).

    Example:
        >>> input_signature(ModelSpec("m", "m.keras", "keras", 1, "1-1"), (8, 8, 3), "float32")
        ((8, 8, 3), 'float32')
    """
    pre = spec.preprocess
    input_dtype = getattr(pre, "input_dtype", None)
    if input_dtype is None:
        return row_shape, dtype
    if getattr(pre, "resize", None) is not None and len(row_shape) == 3:
        row_shape = (None, None, row_shape[-1])
    return row_shape, input_dtype
