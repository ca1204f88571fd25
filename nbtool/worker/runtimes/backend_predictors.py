"""The compiled predictors of Keras on JAX and on PyTorch: one fixed batch shape each, the
last batch padded (:mod:`~nbtool.worker.runtimes.fixed_batch`), outputs back as float32 numpy, one
per output in Keras' order, like every predictor.

JAX: ``jax.jit`` over the model's ``stateless_call`` with its variables' values held as
arrays on the worker's device; traced once per batch shape, so once after warm-up.
PyTorch: the model called under ``torch.inference_mode()`` on the worker's device
(no autograd bookkeeping); ``torch.compile`` is not used (measured: see
:class:`TorchPredictor`).

Example:
    >>> import numpy as np
    >>> [y.dtype.name for y in float32_outputs([np.ones(2, "float16"), np.ones(2, "int32")])]
    ['float32', 'int32']
"""

from __future__ import annotations

import numpy as np

from nbtool.worker.keras_backends import jax_module, torch_module
from nbtool.worker.runtimes.fixed_batch import FixedBatchPredictor, as_float32


class JaxPredictor(FixedBatchPredictor):
    """``jax.jit`` over ``model.stateless_call(trainable, non_trainable, x,
    training=False)`` with one fixed batch shape.

    The variables' values are taken once, as JAX arrays on the worker's device, and passed
    to the compiled function as arguments (not captured as constants, which XLA would fold
    into the program and copy). Reduced-precision outputs are cast to float32 inside the
    program. Calls may overlap (a compiled function holds no state between calls).

    Example:
        >>> p = JaxPredictor(model, batch_size=32, row_shape=(8,), dtype="float32")  # doctest: +SKIP
        >>> p(np.ones((70, 8), "float32"))[0].shape, p.traces                       # doctest: +SKIP
        ((70, 3), 1)
    """

    serial = False
    propagates_nan = True   # the model's own answer for a NaN row stays as it is

    def __init__(self, model, batch_size: int, row_shape: tuple, dtype: str,
                 preprocess=None, name: str | None = None, path: str | None = None):
        super().__init__(batch_size, row_shape, dtype, preprocess, name, path)
        jax = jax_module()
        import keras

        self._trainable = [v.value for v in model.trainable_variables]
        self._non_trainable = [v.value for v in model.non_trainable_variables]
        self._traced = 0

        def infer(trainable, non_trainable, x):
            self._traced += 1   # runs only while JAX traces: counts the compilations
            outs, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            return [o.astype("float32") if o.dtype in ("bfloat16", "float16") else o
                    for o in keras.tree.flatten(outs)]

        self._fn = jax.jit(infer)

    @property
    def traces(self) -> int:
        """How many times JAX traced it; stays at 1 after warm-up."""
        return self._traced

    def prepare(self) -> None:
        """Nothing ahead: the warm-up's first call traces and compiles."""

    def run_batch(self, batch: np.ndarray) -> list[np.ndarray]:
        """One batch through the compiled function."""
        outs = self._fn(self._trainable, self._non_trainable, batch)
        return [np.asarray(y) for y in outs]


class TorchPredictor(FixedBatchPredictor):
    """The Keras model called on one fixed batch shape under ``torch.inference_mode()``,
    on the device Keras put its weights on (the worker's one GPU, else the CPU).

    ``torch.compile`` is not used. Measured on this 2-core CPU (one thread, batch 64,
    torch 2.13): a small convnet ran 1.4-2.6x faster per batch compiled (an MLP 1.5x),
    same outputs within 5e-8, but compiling took 1.8-6.5 s per model and batch shape
    (22 s for the first in a process), paid again on every worker and at every
    out-of-memory halving; it pays back only after some 5,000 rows per model per worker.
    Calls may overlap (PyTorch's inference is thread-safe).

    Example:
        >>> p = TorchPredictor(model, batch_size=32, row_shape=(8,), dtype="float32")  # doctest: +SKIP
        >>> p(np.ones((70, 8), "float32"))[0].shape                                   # doctest: +SKIP
        (70, 3)
    """

    serial = False
    propagates_nan = True

    def __init__(self, model, batch_size: int, row_shape: tuple, dtype: str,
                 preprocess=None, name: str | None = None, path: str | None = None):
        super().__init__(batch_size, row_shape, dtype, preprocess, name, path)
        self._torch = torch_module()
        self._model = model

    def prepare(self) -> None:
        """Nothing ahead: PyTorch runs eagerly."""
        self.prepared += 1

    def run_batch(self, batch: np.ndarray) -> list[np.ndarray]:
        """One batch through the model, with no autograd."""
        import keras

        if not batch.flags.writeable:   # torch refuses (warns on) read-only memory
            batch = batch.copy()
        with self._torch.inference_mode():
            x = keras.ops.convert_to_tensor(batch)   # onto Keras' device
            outs = keras.tree.flatten(self._model(x, training=False))
            half = (self._torch.float16, self._torch.bfloat16)   # numpy has no bfloat16
            return float32_outputs([o.float() if o.dtype in half else o for o in outs])


def float32_outputs(outputs) -> list[np.ndarray]:
    """Outputs (torch tensors on any device, or arrays) as numpy, reduced-precision floats
    as float32.

    Example:
        >>> float32_outputs([np.zeros(2, "float16")])[0].dtype.name
        'float32'
    """
    return as_float32([o.cpu().numpy() if hasattr(o, "cpu") else o for o in outputs])
