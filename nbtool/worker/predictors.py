"""One fixed-batch predictor per runtime, and the choice of one for a model's format.

A predictor takes rows and returns one float array per output, in row order; it runs a
fixed batch shape (the last batch padded, :mod:`~nbtool.worker.batching`), so it compiles or
allocates once, at :meth:`warm_up`, which also records each output's row shape and dtype.
TensorFlow runs Keras files and SavedModels (:class:`CompiledPredictor`); LiteRT runs
``.tflite`` files (:class:`~nbtool.worker.litert.LiteRTPredictor`); OpenVINO runs what was
registered with ``runtime="openvino"`` (:class:`~nbtool.worker.openvino.OpenVINOPredictor`,
prepared by :func:`to_openvino`). A new runtime adds its predictor and one branch of
:func:`make_predictor`.

Example:
    >>> from nbtool.wire import ModelSpec
    >>> input_signature(ModelSpec("m", "m.keras", "keras", 1, "1-1"), (8,), "float32")
    ((8,), 'float32')
"""

from __future__ import annotations

import numpy as np

from ..wire import ModelSpec
from .batching import run_in_batches
from .litert import LiteRTPredictor, probe_rows
from .openvino import CHECK_ROWS, OpenVINOPredictor, check_agreement, open_openvino
from .runtime import on_gpu, tensorflow, worker_name

#: Batch size when the user gives none. Large enough to amortise the per-call overhead on
#: CPU, small enough that activations of a mid-size convnet stay in a few hundred MB.
DEFAULT_BATCH_SIZE = 64


class CompiledPredictor:
    """A ``tf.function`` over ``model(x, training=False)`` with one fixed batch shape.

    ``model.predict`` builds a tf.data pipeline and callbacks on every call; this traces
    once (at warm-up) and then only runs the graph. The last, short batch of a chunk is
    padded up to the batch size, so nothing ever retraces. XLA stays off unless asked
    for: on CPU it made convnets ten times slower here.

    Example:
        >>> p = CompiledPredictor(model, batch_size=32, row_shape=(8,), dtype="float32")  # doctest: +SKIP
        >>> p(np.ones((70, 8), "float32"))[0].shape                                      # doctest: +SKIP
        (70, 3)
    """

    def __init__(self, call, batch_size: int, row_shape: tuple, dtype: str,
                 preprocess=None, jit_compile: bool = False, name: str | None = None,
                 path: str | None = None):
        tf = tensorflow()
        self.name, self.path = name, path   # for errors: which model this is
        self.batch_size = int(batch_size)
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.output_specs: list[tuple[tuple, str]] = []
        signature = [tf.TensorSpec((self.batch_size, *self.row_shape), self.dtype)]

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

    def warm_up(self) -> None:
        """Trace and run once on zeros, so the first real chunk pays no tracing; records
        each output's row shape and dtype in ``output_specs``."""
        shape = tuple(1 if d is None else d for d in self.row_shape)
        outs = self(np.zeros((1, *shape), self.dtype))
        self.output_specs = [(tuple(o.shape[1:]), str(o.dtype)) for o in outs]

    def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        return run_in_batches(rows, self.batch_size, self.dtype,
                              lambda batch: [y.numpy() for y in self._fn(batch)],
                              self.name, self.path)


def make_predictor(spec: ModelSpec, call, batch: int, row_shape, dtype):
    """The predictor for ``spec``'s format: LiteRT for ``.tflite``, else a compiled
    ``tf.function``; both take rows and return float outputs in row order.

    Example:
        >>> make_predictor(spec, call, 64, (8,), "float32").warm_up()   # doctest: +SKIP
    """
    if spec.runtime == "openvino":
        return OpenVINOPredictor(call, batch, row_shape, dtype, preprocess=spec.preprocess,
                                 name=spec.name, path=spec.path)
    if spec.format == "tflite":
        return LiteRTPredictor(call, batch, row_shape, dtype, preprocess=spec.preprocess,
                               name=spec.name, path=spec.path)
    return CompiledPredictor(call, batch, row_shape, dtype, preprocess=spec.preprocess,
                             name=spec.name, path=spec.path)


def to_openvino(spec: ModelSpec, model, own_shape, own_dtype, row_shape, dtype):
    """``model`` converted to OpenVINO (or its IR read from the cache), checked against
    TensorFlow on up to ``CHECK_ROWS`` random rows (seeded) of what the predictor takes;
    returns the :class:`~nbtool.worker.openvino.OpenVINOModel` and a phrase saying how it
    was prepared. A conversion off by more than the tolerance fails the load.

    Example:
        >>> ov_model, note = to_openvino(spec, model, (8,), "float32", (8,), "float32")  # doctest: +SKIP
        >>> note                                                                       # doctest: +SKIP
        'converted to OpenVINO IR in 1.2 s; max abs diff 2.4e-07 from TensorFlow on 64 rows'
    """
    from ..errors import ModelLoadError

    if on_gpu():   # refused at register too; a worker placed by hand could still get here
        raise ModelLoadError(spec.name, spec.path, worker_name(), "runtime='openvino' runs "
                             "on CPU workers only, and this worker has a GPU",
                             "register it with device='cpu' (or runtime='tensorflow')")
    ov_model = open_openvino(spec, model, own_shape, own_dtype)
    rows = probe_rows(row_shape, dtype, CHECK_ROWS)
    batch = 16
    reference = CompiledPredictor(model, batch, row_shape, dtype, preprocess=spec.preprocess,
                                  name=spec.name, path=spec.path)
    predictor = OpenVINOPredictor(ov_model, batch, row_shape, dtype,
                                  preprocess=spec.preprocess, name=spec.name, path=spec.path)
    diff = check_agreement(spec, predictor, reference, rows)
    how = "converted to" if ov_model.converted else "read cached"
    return ov_model, (f"{how} OpenVINO IR in {ov_model.seconds:.1f} s; max abs diff "
                      f"{diff:.2g} from TensorFlow on {len(rows)} rows")


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
