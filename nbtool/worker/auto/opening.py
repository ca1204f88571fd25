"""Opening a model for the runtime it runs on: a ``.tflite`` in LiteRT; a forced runtime
(``"tensorflow"``, or a conversion checked against TensorFlow at every load); or ``"auto"``:
this machine's remembered choice (a converted model then loads with no TensorFlow and no
Keras at all), else a choice made now (:mod:`~nbtool.worker.auto.choice`). On a worker whose
Keras runs on JAX or PyTorch, ``"auto"`` is that backend, with no choice (the conversions
are made with TensorFlow).

Example:
    >>> opened = open_for_runtime(spec, 64, sample=lambda: x[:64])   # doctest: +SKIP
    >>> opened.runtime, opened.note.startswith("remembered choice")  # doctest: +SKIP
    ('openvino', True)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from nbtool.errors import ModelLoadError
from nbtool.wire import ModelSpec
from nbtool.worker.auto.agreement import check_agreement
from nbtool.worker.auto.candidates import (CONVERTERS, LABELS, Opened, discard,
    open_original, reference_outputs)
from nbtool.worker.auto.choice import choose, fixed_tensorflow_note
from nbtool.worker.auto.guard import Envelope
from nbtool.worker.auto.records import RuntimeRecord, choice_lock, read_record
from nbtool.worker.environment import on_gpu, release_memory, worker_name
from nbtool.worker.keras_backends import backend_name
from nbtool.worker.runtimes import input_signature, make_predictor, open_tflite, read_ir

#: The batch a forced conversion is checked at (its predictor is made again at the
#: model's batch).
CHECK_BATCH = 16


def open_for_runtime(spec: ModelSpec, batch: int | None,
                     sample: Callable[[], np.ndarray] | None = None) -> Opened:
    """``spec``'s model opened for the runtime it runs on here. ``batch`` is the batch the
    user set (None: a choice also finds the best batch, and ``Opened.batch`` says it, as
    does a remembered choice); ``sample`` gives the user's rows when the load
    happens inside a prediction (called only if a conversion needs checking).

    Example:
        >>> open_for_runtime(spec, None).runtime   # doctest: +SKIP
        'tensorflow'
    """
    if spec.format in ("tflite", "openvino"):
        return open_original(spec)   # a .tflite or an IR file: the format's own runtime
    backend = backend_name()
    if backend != "tensorflow":
        return open_on_backend(spec, backend)
    if spec.runtime == "tensorflow":
        return open_original(spec)
    if spec.runtime in CONVERTERS:
        return open_forced(spec, user_rows(sample))
    fixed = fixed_tensorflow_note(spec.precision, on_gpu(), spec.inputs)
    if fixed is not None:
        return open_original(spec, fixed)
    with choice_lock(spec):   # a second worker waits here, then reads the first's record
        record, why = read_record(spec)
        if record is not None and record.user_batch and batch is None:
            # Only the user's batch was timed then (the same bytes registered again,
            # with batch_size= then and without it now): the batch is chosen now.
            record, why = None, f"chosen at batch_size={record.user_batch}, which this " \
                "registration does not set"
        if record is not None:
            return open_remembered(spec, record)
        return choose(spec, batch, user_rows(sample), why)


def open_on_backend(spec: ModelSpec, backend: str) -> Opened:
    """``spec``'s Keras file opened by Keras on ``backend`` (``"jax"`` or ``"torch"``):
    ``auto`` is that backend, with no choice; a forced runtime is refused (refused at
    register too: a worker placed by hand could still get here).

    Example:
        >>> open_on_backend(spec, "jax").note   # doctest: +SKIP
        "jax: the workers run Keras on JAX (start(backend='jax')); OpenVINO/LiteRT conversions need TensorFlow"
    """
    if spec.runtime not in (None, "auto"):
        raise ModelLoadError(spec.name, spec.path, worker_name(), f"runtime={spec.runtime!r} "
                             f"needs TensorFlow, and this worker runs Keras on {backend}",
                             "leave runtime= out (the backend runs it), or start the engine "
                             "with backend='tensorflow'")
    opened = open_original(spec)
    label = {"jax": "JAX", "torch": "PyTorch"}.get(backend, backend)
    return dataclasses.replace(
        opened, runtime=backend,
        note=f"{backend}: the workers run Keras on {label} (start(backend={backend!r})); "
             "OpenVINO/LiteRT conversions need TensorFlow")


def user_rows(sample: Callable[[], np.ndarray] | None) -> np.ndarray | None:
    """The user's rows, if there are any and they can be read (else None: random rows).

    Example:
        >>> user_rows(lambda: np.ones((2, 3))).shape, user_rows(None)
        ((2, 3), None)
    """
    if sample is None:
        return None
    try:
        rows = np.asarray(sample())
    except Exception:   # the chunk's own read will say what is wrong
        return None
    return rows if rows.ndim >= 1 and len(rows) else None


def open_remembered(spec: ModelSpec, record: RuntimeRecord) -> Opened:
    """``spec`` opened as its ``record`` says: for a conversion, its artifact read straight
    from the cache (no TensorFlow, no Keras: the check was made when it was chosen, on this
    machine, with these versions, and its sha256 still matches).

    Example:
        >>> open_remembered(spec, record).note   # doctest: +SKIP
        'remembered choice (openvino: 2.1x TensorFlow, ...)'
    """
    note = f"remembered choice ({record.summary})"
    # Its batch, if the choice found it (a choice made at a batch the user set found none).
    batch = record.batch if record.batch_seconds else None
    if record.runtime == "tensorflow":
        return dataclasses.replace(open_original(spec, note), batch=batch)
    own_shape = tuple(record.own_shape or ())
    if record.runtime == "openvino":
        artifact = read_ir(record.artifact[0], own_shape, record.own_dtype)
    else:
        artifact = open_tflite(spec, record.artifact[0])
    row_shape, dtype = input_signature(spec, own_shape, record.own_dtype)
    return Opened(artifact, tuple(row_shape), dtype, record.n_outputs,
                  record.weight_bytes or spec.size_bytes, record.runtime, note,
                  own_shape=own_shape, own_dtype=record.own_dtype, batch=batch,
                  envelope=Envelope.from_dict(record.envelope))


def open_forced(spec: ModelSpec, sample: np.ndarray | None) -> Opened:
    """``spec`` converted to the runtime it was registered with (or read from the cache),
    checked against TensorFlow on ``sample`` (else random rows) at every load; a
    conversion that disagrees fails the load (and is not kept).

    Example:
        >>> open_forced(spec, None).note   # doctest: +SKIP
        'converted to OpenVINO IR in 1.2 s; max abs diff 2.4e-07 from TensorFlow on 64 random rows'
    """
    runtime = spec.runtime
    if on_gpu():   # refused at register too; a worker placed by hand could still get here
        raise ModelLoadError(spec.name, spec.path, worker_name(), f"runtime={runtime!r} "
                             "converts the model to run on the CPU, and this worker has a GPU",
                             "register it with device='cpu' (or runtime='auto' or "
                             "'tensorflow')")
    tf_model = open_original(spec)
    artifact = CONVERTERS[runtime](spec, tf_model)
    row_shape, dtype = tf_model.row_shape, tf_model.dtype
    reference = make_predictor(spec, tf_model.call, CHECK_BATCH, row_shape, dtype)
    predictor = make_predictor(spec, artifact, CHECK_BATCH, row_shape, dtype)
    rows, what, want = reference_outputs(reference, row_shape, dtype, sample)
    checks = reference.checks() if hasattr(reference, "checks") else []
    try:
        diff = check_agreement(spec, runtime, predictor, lambda _: want, rows)
    except ModelLoadError:
        discard(artifact)
        raise
    tf_model.call = reference = predictor = None   # TensorFlow's copy is no longer needed
    release_memory()
    how = "converted to" if artifact.converted else "read cached"
    note = (f"{how} {LABELS[runtime]} in {artifact.seconds:.1f} s; max abs diff {diff:.2g} "
            f"from TensorFlow on {what}")
    if checks:   # forced by the user: runs, but says what it loses
        note += f"; its in-graph checks ({', '.join(checks)}) do not run there"
    return Opened(artifact, row_shape, dtype, tf_model.n_outputs, tf_model.weight_bytes,
                  runtime, note, own_shape=tf_model.own_shape, own_dtype=tf_model.own_dtype,
                  envelope=Envelope.of(rows))
