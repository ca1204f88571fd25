"""The tasks the engine sends to workers: predict a chunk, load, unload, report; and the
one log line a failed chunk leaves.

Example (what the engine sends to a worker):
    >>> from nbtool.worker import predict_chunk
    >>> out = client.submit(predict_chunk, spec, x, 0, 100, 0, workers=["cpu0"])  # doctest: +SKIP
    >>> out.result().outputs[0].shape                                              # doctest: +SKIP
    (100, 10)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback
from typing import Any

import numpy as np

from nbtool.errors import ChunkCancelled, ChunkError, NbtoolError, first_line
from nbtool.signature import row_count
from nbtool.wire import ChunkOutput, ModelSpec, ModelState, WorkerStatus, is_file_ref
from nbtool.worker.auto import CHECK_ROWS
from nbtool.worker.environment import (cpu_worker, describe_exception, held_memory,
    keras_backend, memory_in_use, out_of_memory_error, worker_name)
from nbtool.worker.loading import out_of_memory
from nbtool.worker.measure import record_cost
from nbtool.worker.model_cache import LoadedModel, ModelCache
from nbtool.worker.process import count_rows, idle_memory, prepare_worker, throughput
from nbtool.worker.reading import (PIECE_BATCHES, overlapped, pieces, read_ahead_enabled,
    read_file_ahead, read_rows)
from nbtool.worker.writing import write_chunk

#: Chunk failures go where Dask keeps its worker's log (a child of "distributed.worker"):
#: ``eng.client.get_worker_logs()`` shows them, one line each.
failure_log = logging.getLogger("distributed.worker.nbtool")


def predict_chunk(spec: ModelSpec, data: Any, start: int, stop: int | None,
                  chunk: int, store=None, read_ahead: str | None = None) -> ChunkOutput:
    """Run one model on rows ``start:stop`` of ``data``; the unit of work of a prediction.

    ``data`` is an ndarray scattered to the worker, a Dask array block, or a file
    reference (:mod:`nbtool.wire`) that the worker opens and slices itself. With a
    ``store`` (:class:`nbtool.wire.StoreRef`) the outputs are written to the result store
    here and only a receipt travels back. ``read_ahead``: the file of the model this
    worker runs next, read into the page cache while this chunk computes.

    Example:
        >>> predict_chunk(spec, x, 0, 10, chunk=0).outputs[0].shape   # doctest: +SKIP
        (10, 3)
    """
    worker = worker_name()
    try:
        cache = prepare_worker()
        # The chunk's first rows: what a conversion is checked on if this call loads it.
        loaded, load_seconds = cache.get(spec, sample=lambda: read_rows(
            data, start, start + CHECK_ROWS if stop is None else min(stop, start + CHECK_ROWS)))
        if read_ahead:
            read_file_ahead(read_ahead)
        t0 = time.perf_counter()
        n_rows, outputs = read_and_run(cache, loaded, data, start, stop)
        seconds = time.perf_counter() - t0
        count_rows(n_rows, seconds)
        if not loaded.row_cost_recorded and n_rows:   # once per load: no I/O per chunk
            loaded.row_cost_recorded = True
            record_cost(spec, cache.device, row=seconds / n_rows)
        if store is not None:   # written here, on the worker; only a receipt goes back
            write_chunk(store, spec.name, chunk, outputs, spec.output_names)
            outputs = None
        notes, loaded.notes = tuple(loaded.notes), []
        return ChunkOutput(outputs, seconds, load_seconds, worker,
                           loaded.predictor.batch_size, rows=n_rows, notes=notes)
    except (ChunkError, ChunkCancelled):   # a cancelled chunk is no failure: nothing to log
        raise
    except Exception as e:
        if out_of_memory_error(e):
            e = out_of_memory(spec, worker)
        end = stop if stop is not None else start + len(data)
        reason = str(e) if isinstance(e, NbtoolError) else describe_exception(e)
        # One line per failure: a run whose every chunk fails must not print a traceback
        # per chunk. The traceback travels with the error (res.errors[i].traceback).
        _keep_failures_off_the_notebook()
        failure_log.warning("chunk %d (rows %d:%d) of %s failed on %s: %s", chunk, start, end,
                            spec.name, worker, first_line(reason, 200))
        _quiet_dask_chunk_failures()
        raise ChunkError(spec.name, chunk, (start, end), worker, reason,
                         traceback=traceback.format_exc()) from None


def read_and_run(cache: ModelCache, loaded: LoadedModel, data: Any, start: int,
                 stop: int | None) -> tuple[int, list[np.ndarray]]:
    """Rows ``start:stop`` through the model; a chunk in a file is read a piece ahead of
    the compute (:mod:`nbtool.worker.reading`). Returns (rows, outputs).

    Example:
        >>> n, outputs = read_and_run(cache, loaded, NpyFile("x.npy"), 0, 1000)  # doctest: +SKIP
    """
    if stop is None or not is_file_ref(data) or not read_ahead_enabled():
        rows = read_rows(data, start, stop)
        return row_count(rows), cache.run(loaded, rows)
    bounds = pieces(start, stop, loaded.predictor.batch_size * PIECE_BATCHES)
    outputs = overlapped(lambda a, b: read_rows(data, a, b), bounds,
                         lambda rows: cache.run(loaded, rows))
    return stop - start, outputs


def load_model(spec: ModelSpec) -> ModelState:
    """Make ``spec`` resident on this worker (a no-op if it is); returns its cache entry,
    which holds its signature (input, outputs) as this load learned it.

    Example:
        >>> client.submit(load_model, spec, workers=["cpu0"]).result().state  # doctest: +SKIP
        'loaded'
    """
    cache = prepare_worker()
    cache.get(spec)
    return cache.state_of(spec.name)


def unload_models(names: list[str] | None = None) -> list[str]:
    """Soft-unload ``names`` (all if None) on this worker; returns those it dropped.

    Example:
        >>> client.run(unload_models, ["cnn"])   # doctest: +SKIP
        {'tcp://127.0.0.1:40101': ['cnn'], 'tcp://127.0.0.1:40102': []}
    """
    return prepare_worker().unload(names)


def resident_models() -> dict[str, str]:
    """The models loaded in this worker now, with their files' fingerprints: a cheap
    question asked before every run of a replicated model.

    Example:
        >>> client.run(resident_models)   # doctest: +SKIP
        {'tcp://127.0.0.1:40101': {'cnn': '1048-1795...'}}
    """
    return prepare_worker().resident()


#: The environment variables a worker reports: what decides its device, threads and budget.
REPORTED_ENV = ("CUDA_VISIBLE_DEVICES", "TF_FORCE_GPU_ALLOW_GROWTH", "TF_NUM_INTRAOP_THREADS",
                "OMP_NUM_THREADS", "NBTOOL_DEVICE", "NBTOOL_MEMORY_BUDGET", "KERAS_BACKEND",
                "NBTOOL_BACKEND", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS")


def worker_status() -> WorkerStatus:
    """The cache status plus process facts (pid, RSS, idle RSS, GPUs its backend sees,
    threads, env, its Keras backend).

    A worker that has not started its backend (a CPU worker whose models run without it)
    is not made to start it to answer: it sees no GPU, and its threads are the plan's. A
    worker whose Keras runs on JAX or PyTorch asks that backend, never TensorFlow.

    Example:
        >>> client.run(worker_status)   # doctest: +SKIP
    """
    import psutil

    cache = prepare_worker()
    backend = keras_backend()
    gpus = [] if cpu_worker() else backend.gpus_seen()
    return dataclasses.replace(
        cache.status(),
        pid=os.getpid(),
        throughput=throughput(),
        rss=psutil.Process().memory_info().rss,
        idle_memory=idle_memory(),
        memory_in_use=memory_in_use(),
        held_memory=held_memory(),
        gpus_seen=gpus,
        threads=backend.threads(),
        env={k: os.environ.get(k) for k in REPORTED_ENV},
    )


# -- one line per failed chunk -------------------------------------------------------------
def _keep_failures_off_the_notebook() -> None:
    """A local worker's stderr is the notebook kernel's, so its log lines land in red under
    whatever cell runs: there, failure lines go only to the worker's log that
    ``eng.client.get_worker_logs()`` reads (the error itself reaches the result and its
    report). A worker nbtool did not start (an existing cluster) keeps its usual log."""
    if not os.environ.get("NBTOOL_DEVICE") or not failure_log.propagate:
        return
    from distributed.utils import DequeHandler

    failure_log.propagate = False
    for handler in logging.getLogger("distributed.worker").handlers:
        if isinstance(handler, DequeHandler):
            failure_log.addHandler(handler)


class OneLinePerChunkFailure(logging.Filter):
    """Drops Dask's own multi-line "Compute Failed" record (task repr, exception,
    traceback) for a :class:`ChunkError`: :func:`predict_chunk` has logged its one line,
    and the traceback travels on the error.

    Example:
        >>> import logging
        >>> record = logging.LogRecord("distributed.worker", logging.WARNING, "", 0,
        ...     "Compute Failed\\nKey: %s\\nFunction: %s\\nargs: %s\\nException: %s",
        ...     ("k", "predict_chunk", "()", "ChunkError('x')"), None)
        >>> OneLinePerChunkFailure().filter(record)
        False
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("Compute Failed") and len(args) >= 4
                    and str(args[3]).startswith(f"{ChunkError.__name__}("))


def _quiet_dask_chunk_failures() -> None:
    """Install :class:`OneLinePerChunkFailure` on Dask's worker logger, once per process
    (at the first failure: before Dask logs it, after this task raises)."""
    dask_log = logging.getLogger("distributed.worker")
    if not any(isinstance(f, OneLinePerChunkFailure) for f in dask_log.filters):
        dask_log.addFilter(OneLinePerChunkFailure())
