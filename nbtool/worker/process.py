"""This worker process: its one model cache, its idle memory and rows/s counters, and the
plugin that prepares it when Dask starts (or restarts) it.

The package is imported by reference on every worker (it is installed), so these module
globals are one real cache per worker process. Functions defined in a notebook would be
pickled by value with their globals, and a cache kept there would be a fresh, empty dict
in every task.

Example:
    >>> throughput()["rows"] >= 0
    True
"""

from __future__ import annotations

import gc
import os
import threading

from nbtool._util import expects_gpu, native_logs_filtered
from nbtool.wire import resource_name
from nbtool.worker.environment import (cpu_worker, memory_in_use, release_memory, tensorflow,
    worker_device, worker_name)
from nbtool.worker.keras_backends import backend_name, start_backend
from nbtool.worker.model_cache import ModelCache
from nbtool.worker.runtimes import CompiledPredictor, KERAS_PREDICTORS

_CACHE: ModelCache | None = None
_CACHE_LOCK = threading.Lock()
_PREPARE_LOCK = threading.Lock()
_IDLE_MEMORY: int | None = None

#: Rows this process has predicted, and the seconds it spent on them, since it started: the
#: dashboard turns their change between two looks into rows/s and busy % per worker.
_THROUGHPUT = {"rows": 0, "busy_seconds": 0.0}
_THROUGHPUT_LOCK = threading.Lock()   # chunks may run in several task threads


def get_cache(budget: int | None = None, worker: str | None = None) -> ModelCache:
    """This worker process's model cache (created on first use).

    Its budget is ``budget``, else ``NBTOOL_MEMORY_BUDGET``, else a quarter of the
    machine's memory.

    Example:
        >>> get_cache().budget > 0   # doctest: +SKIP
        True
    """
    global _CACHE
    with _CACHE_LOCK:
        if _CACHE is None:
            if budget is None:
                budget = int(os.environ.get("NBTOOL_MEMORY_BUDGET", "0") or 0)
            if not budget:
                import psutil

                budget = psutil.virtual_memory().total // 4
            _CACHE = ModelCache(budget, worker_device(), worker or worker_name())
        return _CACHE


def prepare_worker(budget: int | None = None, worker: str | None = None) -> ModelCache:
    """Create the cache, start the Keras backend on a GPU worker, and record the idle
    memory of this worker.

    Run by :class:`NbtoolWorkerPlugin` when a worker starts, and by the first task if that
    comes first; so the idle baseline excludes everything a model adds. A GPU worker runs
    TensorFlow whatever its models, so it pays the import here, not in its first load. A
    CPU worker does not import TensorFlow until a model needs it: models whose remembered
    runtime is OpenVINO or LiteRT never do, and TensorFlow's import (seconds) is the bulk
    of a cold start. Calling it again only updates the budget.

    Example:
        >>> prepare_worker().budget > 0   # doctest: +SKIP
        True
    """
    global _IDLE_MEMORY
    with _PREPARE_LOCK:
        cache = get_cache(budget, worker)
        if budget and budget != cache.budget:
            cache.set_budget(budget)
        if _IDLE_MEMORY is None:
            if not cpu_worker():
                # TensorFlow starts here: its known-harmless start-up lines stay out of the
                # notebook (they would land in red under whatever cell runs).
                with native_logs_filtered(expect_gpu=expects_gpu()):
                    warm_runtime()
            gc.collect()
            _IDLE_MEMORY = memory_in_use()
        return cache


def idle_memory() -> int | None:
    """This worker's memory after start-up, before any model (None before it is prepared).

    Example:
        >>> idle_memory() is None or idle_memory() > 0
        True
    """
    return _IDLE_MEMORY


def warm_runtime() -> None:
    """Pay the Keras backend's and Keras' one-time costs (runtime start, lazy imports, the
    first trace) with a throwaway model, so they count in the idle baseline and not in the
    first real model's load time and footprint. A JAX or PyTorch worker starts that
    backend (never TensorFlow).

    Example:
        >>> warm_runtime()   # doctest: +SKIP
    """
    backend = backend_name()
    if backend == "tensorflow":
        tensorflow()
    else:
        start_backend()
    import keras

    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    KERAS_PREDICTORS.get(backend, CompiledPredictor)(tiny, 2, (4,), "float32").warm_up()
    del tiny
    release_memory()


def count_rows(rows: int, seconds: float) -> None:
    """Add a chunk's rows and compute seconds to this process's counters.

    Example:
        >>> before = throughput()["rows"]; count_rows(10, 0.01); throughput()["rows"] - before
        10
    """
    with _THROUGHPUT_LOCK:
        _THROUGHPUT["rows"] += rows
        _THROUGHPUT["busy_seconds"] += seconds


def throughput() -> dict[str, float]:
    """Rows predicted and seconds spent by this process since it started (a copy).

    Example:
        >>> sorted(throughput())
        ['busy_seconds', 'rows']
    """
    with _THROUGHPUT_LOCK:
        return dict(_THROUGHPUT)


try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a hard dependency
    WorkerPlugin = object


class NbtoolWorkerPlugin(WorkerPlugin):
    """Prepares every worker, including ones that join or restart later.

    Registered by the engine with ``client.register_plugin``; Dask re-runs ``setup`` on a
    worker that restarts after a hard unload.

    Example:
        >>> client.register_plugin(NbtoolWorkerPlugin(memory_budget=4 * 2**30))  # doctest: +SKIP
    """

    name = "nbtool"

    def __init__(self, memory_budget: int | None = None):
        self.memory_budget = memory_budget

    async def setup(self, worker):
        import asyncio

        # TensorFlow takes seconds to import: keep the worker's event loop answering.
        await asyncio.to_thread(prepare_worker, self.memory_budget, str(worker.name))
        # Tasks find this worker by a resource named after it. Unlike an address, it
        # survives a restart (this runs again then), and unlike a loose restriction it
        # cannot be stolen by a worker that does not hold the model.
        if resource_name(worker.name) not in worker.state.total_resources:
            await worker.set_resources(**{resource_name(worker.name): 1})
