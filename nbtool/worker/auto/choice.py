"""``runtime="auto"``: the fastest runtime that computes what TensorFlow computes, chosen by
measurement at a model's first load on this machine, and why.

On a CPU worker the candidates are TensorFlow (``tf.function``, also the reference),
OpenVINO float32 and LiteRT float32. Each conversion is checked against TensorFlow on the
same rows (:mod:`~nbtool.worker.auto.agreement`: max abs diff, same top-1); a conversion that
fails or disagrees is skipped with one line of why, never an error. Those that agree are
timed on the same block of rows, taking turns; the fastest, and any within
:data:`NEAR_TIE` of it, are then timed at each batch worth trying (unless the user set
one), and the fastest runtime at its best batch is kept; the others are dropped.
The choice is remembered (:mod:`~nbtool.worker.auto.records`). On a GPU worker, or for mixed
precision, ``auto`` is TensorFlow without a choice (:func:`fixed_tensorflow_note`).

Example:
    >>> fixed_tensorflow_note(None, gpu=False) is None     # a CPU worker chooses
    True
    >>> fixed_tensorflow_note("bfloat16", gpu=False)
    "tensorflow: precision='bfloat16' is TensorFlow's mixed precision"
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from nbtool.signature import tensorflow_only
from nbtool.wire import ModelSpec
from nbtool.worker.auto.agreement import (candidate_batches, compare, time_alternating,
    timing_batch)
from nbtool.worker.auto.candidates import (CONVERTERS, Opened, artifact_files, discard,
    open_original, reference_outputs)
from nbtool.worker.auto.guard import Envelope
from nbtool.worker.auto.records import (RuntimeRecord, files_sha256, machine_facts,
    runtime_versions, write_record)
from nbtool.worker.environment import describe_exception, release_memory
from nbtool.worker.runtimes import DEFAULT_BATCH_SIZE, LiteRTModel, make_predictor, open_tflite

logger = logging.getLogger("nbtool.worker")

#: A runtime within this factor of the fastest at the default batch is also timed at the
#: other batches: a near tie at one batch may part at another.
NEAR_TIE = 1.15


def fixed_tensorflow_note(precision: str | None, gpu: bool, inputs=()) -> str | None:
    """Why ``auto`` is TensorFlow here without measuring anything, or None when the
    choice runs (a CPU worker, the model as saved).

    OpenVINO's GPU plugin targets Intel GPUs and nbtool runs LiteRT on the CPU, so a GPU
    worker keeps TensorFlow; mixed precision is TensorFlow's own; a model with several
    ``inputs`` or a text input is not converted.

    Example:
        >>> fixed_tensorflow_note(None, gpu=True)  # doctest: +ELLIPSIS
        "tensorflow: this worker has a GPU, and TensorFlow runs on it (OpenVINO's GPU plugin targets Intel GPUs; nbtool runs LiteRT on CPU)..."
    """
    if gpu:
        return ("tensorflow: this worker has a GPU, and TensorFlow runs on it (OpenVINO's "
                "GPU plugin targets Intel GPUs; nbtool runs LiteRT on CPU); no choice made")
    if precision not in (None, "float32"):
        return f"tensorflow: precision={precision!r} is TensorFlow's mixed precision"
    why = tensorflow_only(inputs)
    if why:
        return (f"tensorflow: {why}, and nbtool converts models with one numeric input to "
                "OpenVINO and LiteRT; no choice made")
    return None


def choose(spec: ModelSpec, batch: int | None, sample, again: str | None = None) -> Opened:
    """Open ``spec`` in TensorFlow, convert it to each other runtime, keep the fastest that
    agrees with TensorFlow on ``sample`` (the user's rows, or None: random rows) at its
    best batch (``batch`` if the user set one), remember it, and return it opened, with a
    warmed-up predictor at that batch. ``again`` says why an earlier choice no longer held.

    Example:
        >>> opened = choose(spec, None, x[:64])   # doctest: +SKIP
        >>> opened.runtime, opened.batch, opened.note         # doctest: +SKIP
        ('openvino', 32, 'openvino: 2.1x TensorFlow (litert 1.6x), at batch 32, max abs diff 3e-06 on 64 of your rows; chosen at first load, remembered')
    """
    t0 = time.perf_counter()
    user_batch = batch
    tf_model = open_original(spec)
    start = batch or DEFAULT_BATCH_SIZE
    reference = make_predictor(spec, tf_model.call, start, tf_model.row_shape, tf_model.dtype)
    reference.warm_up()
    prepared = {"tensorflow": round(time.perf_counter() - t0, 3)}
    rows, what, want = reference_outputs(reference, tf_model.row_shape, tf_model.dtype, sample)
    agreeing = {"tensorflow": (tf_model.call, reference, 0.0)}
    checks = reference.checks() if hasattr(reference, "checks") else []
    # A conversion would run the model without its checks: an error would become NaN.
    skipped = {name: f"not tried: the model checks its values in-graph "
                     f"({', '.join(checks)}) and a conversion drops the check"
               for name in CONVERTERS} if checks else {}
    for name, convert in CONVERTERS.items():
        if name in skipped:
            continue
        artifact, started = None, time.perf_counter()
        try:
            artifact = convert(spec, tf_model)
            predictor = make_predictor(spec, artifact, start, tf_model.row_shape,
                                       tf_model.dtype)
            predictor.warm_up()
            agreement = compare(want, predictor(rows))
        except Exception as e:   # a conversion that cannot be made or run: TF remains
            skipped[name] = f"failed ({describe_exception(e)[:160]})"
            continue
        finally:   # what the first load paid for each candidate: convert, compile, check
            prepared[name] = round(time.perf_counter() - started, 3)
        if agreement.agrees:
            agreeing[name] = (artifact, predictor, agreement.diff)
        else:
            skipped[name] = f"disagrees with TensorFlow: {agreement.why}"
            discard(artifact)
    batches = (start,) if batch else candidate_batches(tf_model.row_shape, tf_model.dtype,
                                                       start)
    block = timing_batch(rows, max(batches))   # the same rows for every batch tried
    seconds = time_alternating({name: (lambda p=p: p(block))
                                for name, (_, p, _) in agreeing.items()}) \
        if len(agreeing) > 1 else {}
    best = min(seconds, key=seconds.get) if seconds else "tensorflow"
    best, batch, predictor, artifact, batch_seconds = fastest_batch(
        spec, tf_model, agreeing, seconds, best, batches, start, block)
    record = RuntimeRecord(
        best, batch, machine_facts(), runtime_versions(), artifact_files(artifact),
        diffs={n: d for n, (_, _, d) in agreeing.items() if n != "tensorflow"},
        seconds=seconds, batch_seconds=batch_seconds, skipped=skipped, rows=what,
        prepare_seconds=prepared,
        threads=os.environ.get("NBTOOL_TF_THREADS", ""),
        own_shape=list(tf_model.own_shape), own_dtype=tf_model.own_dtype,
        n_outputs=len(reference.output_specs), weight_bytes=tf_model.weight_bytes)
    record.user_batch = user_batch
    envelope = Envelope.of(rows) if best != "tensorflow" else None
    record.envelope = envelope.to_dict() if envelope is not None else None
    record.sha256 = files_sha256(record.artifact) if record.artifact else None
    prepared["total"] = round(time.perf_counter() - t0, 3)   # timing included
    record.summary = choice_summary(record)
    remembered = write_record(spec, record)
    # The others go: their graphs, interpreters and compiled models hold memory, and
    # their files would only be read by a later choice (after an upgrade: made again).
    for name, (other, _, _) in agreeing.items():
        if name != best:
            discard(other)
    agreeing.clear()
    if best != "tensorflow":
        tf_model.call, reference = None, None
    release_memory()
    logger.info("%s: auto chose %s in %.1f s (%s)", spec.name, best,
                time.perf_counter() - t0, record.summary)
    tail = "chosen at first load, remembered" if remembered else \
        "chosen at this load (the cache folder is not writable: not remembered)"
    if again:
        tail = f"chosen again ({again}), remembered" if remembered else tail
    return Opened(artifact, tf_model.row_shape, tf_model.dtype, record.n_outputs,
                  tf_model.weight_bytes, best, f"{record.summary}; {tail}", predictor,
                  tf_model.own_shape, tf_model.own_dtype, batch, envelope)


def fastest_batch(spec: ModelSpec, tf_model: Opened, agreeing: dict, seconds: dict,
                  best: str, batches: tuple[int, ...], start: int, block):
    """The fastest runtime at its best batch: ``best`` and the runtimes within
    :data:`NEAR_TIE` of it at ``start`` are timed at each of ``batches`` on ``block``,
    taking turns. Returns (runtime, batch, its warmed-up predictor, the artifact that
    predictor runs, seconds per ``runtime@batch``); ``seconds`` is updated with each one's
    best. A batch a runtime cannot run at (a size built into the file, memory) is left out.

    Example:
        >>> fastest_batch(spec, tf_model, agreeing, {}, "tensorflow", (64,), 64, x)[:2]  # doctest: +SKIP
        ('tensorflow', 64)
    """
    if len(batches) == 1:
        return best, start, agreeing[best][1], agreeing[best][0], {}
    runners = {}
    for name, (artifact, at_start, _) in agreeing.items():
        if name != best and not seconds.get(name, float("inf")) <= NEAR_TIE * seconds[best]:
            continue
        for b in batches:
            try:
                p, own = at_start, artifact
                if b != start:
                    own = own_copy(spec, artifact)
                    p = make_predictor(spec, own, b, tf_model.row_shape, tf_model.dtype)
                    p.warm_up()
            except Exception as e:   # e.g. out of memory: the batches that ran decide
                logger.info("%s: %s at batch %d not timed (%s)", spec.name, name, b,
                            describe_exception(e)[:120])
                continue
            runners.setdefault(f"{name}@{p.batch_size}", (p, own))
    timed = time_alternating({key: (lambda p=p: p(block)) for key, (p, _) in runners.items()})
    key = min(timed, key=timed.get)
    for name in {k.rsplit("@", 1)[0] for k in timed}:
        if name in seconds:
            seconds[name] = min(t for k, t in timed.items() if k.rsplit("@", 1)[0] == name)
    name, b = key.rsplit("@", 1)
    return (name, int(b), *runners[key], timed)


def own_copy(spec: ModelSpec, artifact):
    """``artifact`` as a second predictor can use it beside the first: a LiteRT interpreter
    holds one set of tensors, sized for one batch, so another batch needs its own
    interpreter (of the same file); the others make their own state per predictor.

    Example:
        >>> own_copy(None, "a keras model")
        'a keras model'
    """
    if isinstance(artifact, LiteRTModel) and artifact.path:
        return dataclasses.replace(open_tflite(spec, artifact.path),
                                   converted=artifact.converted, seconds=artifact.seconds)
    return artifact


def choice_summary(record: RuntimeRecord) -> str:
    """The choice in one line: the runtime, its speed against TensorFlow (and the other
    agreeing candidates'), its difference from TensorFlow and on what, and why any
    candidate was skipped.

    Example:
        >>> r = RuntimeRecord("openvino", 64, {}, {}, seconds={"tensorflow": 2.0,
        ...     "openvino": 1.0, "litert": 1.25}, diffs={"openvino": 3e-6, "litert": 1e-6},
        ...     rows="64 of your rows")
        >>> choice_summary(r)
        'openvino: 2.0x TensorFlow (litert 1.6x), max abs diff 3e-06 on 64 of your rows'
        >>> r.batch, r.batch_seconds = 32, {"openvino@32": 0.9, "openvino@64": 1.0}
        >>> choice_summary(r).split(", max")[0]
        'openvino: 2.0x TensorFlow (litert 1.6x), at batch 32'
        >>> choice_summary(RuntimeRecord("tensorflow", 64, {}, {}, rows="64 random rows",
        ...     skipped={"openvino": "failed (ValueError: no)"}))
        'tensorflow: the only runtime that converted and agreed (on 64 random rows); openvino skipped: failed (ValueError: no)'
    """
    s, best = record.seconds, record.runtime
    others = ", ".join(f"{n} {s['tensorflow'] / t:.1f}x" for n, t in s.items()
                       if n not in (best, "tensorflow"))
    at_batch = f", at batch {record.batch}" if len(record.batch_seconds) > 1 else ""
    if best != "tensorflow":
        text = f"{best}: {s['tensorflow'] / s[best]:.1f}x TensorFlow" \
            + (f" ({others})" if others else "") + at_batch \
            + f", max abs diff {record.diffs[best]:.1g} on {record.rows}"
    elif s:
        text = f"tensorflow: the fastest ({others}; on {record.rows}){at_batch}"
    else:
        text = f"tensorflow: the only runtime that converted and agreed (on {record.rows})" \
            + at_batch
    skipped = "; ".join(f"{n} skipped: {why}" for n, why in record.skipped.items())
    return f"{text}; {skipped}" if skipped else text
