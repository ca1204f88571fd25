"""What this worker's machine measured: the batch size each model's sweep chose, and what
each model costs to load and per row to run (for planning cold runs).

Both are kept in small JSON files shared by the machine's workers across sessions
(:class:`MeasurementsFile`): ``batch_sizes.json`` and ``costs.json`` in ``NBTOOL_CACHE_DIR``,
else ``$XDG_CACHE_HOME/nbtool`` or ``~/.cache/nbtool``. Several worker processes write at
once: each write merges with the file as it is, and a reader that misses looks at the file
again.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "batch_sizes.json")
    >>> MeasurementsFile(path).put("mlp|cpu", 128)
    >>> MeasurementsFile(path).get("mlp|cpu")             # another worker process reads it
    128
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from nbtool.wire import ModelSpec, is_text_dtype
from nbtool.worker.environment import machine_folder, out_of_memory_error, worker_device
from nbtool.worker.runtimes import DEFAULT_BATCH_SIZE, make_predictor

#: Batch sizes the sweep may pick, tried outwards from the default.
SWEEP_UP, SWEEP_DOWN = (128, 256, 512), (32, 16)
#: A bigger batch must be this much faster to be worth its memory.
SWEEP_MARGIN = 1.03


def best_batch_size(spec: ModelSpec, call, row_shape, dtype, device: str,
                    memory_in_use=None, memory_limit: int | None = None) -> int:
    """The batch size with the best throughput for this model here, found by a quick sweep.

    Starts at the default, climbs while a bigger batch is faster by ``SWEEP_MARGIN``, else
    tries smaller ones; each step costs one trace and two timed batches. It stops climbing
    once the sweep has grown the worker's memory by ``memory_limit`` (a quarter of the
    budget): activations grow with the batch, and memory, not speed, is then the limit.
    The answer is cached on disk per (model file, input, device, threads), so a model is
    swept once per machine. ``NBTOOL_BATCH_SWEEP=0`` turns the sweep off.

    Example:
        >>> best_batch_size(spec, model, (8,), "float32", "cpu:0")   # doctest: +SKIP
        256
    """
    if os.environ.get("NBTOOL_BATCH_SWEEP", "1") == "0" or isinstance(row_shape, dict) \
            or None in row_shape or is_text_dtype(dtype):
        return DEFAULT_BATCH_SIZE   # free sizes, several inputs, text: no one row to time
    key = machine_key(spec, device, row_shape, np.dtype(dtype))
    cache = machine_cache("batch_sizes.json")
    if cache.get(key) is not None:
        return int(cache.get(key))

    def rate(batch: int) -> float:
        p = make_predictor(spec, call, batch, row_shape, dtype)
        rows = np.zeros((batch, *row_shape), dtype)
        p(rows)                                   # trace
        t0 = time.perf_counter()
        p(rows)
        p(rows)
        return 2 * batch / (time.perf_counter() - t0)

    best = DEFAULT_BATCH_SIZE   # if even the default runs out of memory
    try:
        before = memory_in_use() if memory_in_use else 0
        best, best_rate = DEFAULT_BATCH_SIZE, rate(DEFAULT_BATCH_SIZE)
        for batch in SWEEP_UP:
            if memory_in_use and memory_limit and memory_in_use() - before > memory_limit:
                break
            r = rate(batch)
            if r < best_rate * SWEEP_MARGIN:
                break
            best, best_rate = batch, r
        if best == DEFAULT_BATCH_SIZE:
            for batch in SWEEP_DOWN:
                r = rate(batch)
                if r <= best_rate:
                    break
                best, best_rate = batch, r
    except Exception as e:
        if not out_of_memory_error(e):
            raise
        # keep what fitted; the OOM path halves further if needed
    cache.put(key, best)
    return best


def machine_key(spec: ModelSpec, device: str, *settings) -> str:
    """The key of what this machine measured for a model: its file, the device kind, the
    worker's threads, its preprocessing, and the ``settings`` that change the measure.

    CPU workers of one machine are alike (their threads are in the key); GPUs may differ.

    Example:
        >>> spec = ModelSpec("mlp", "/m/mlp.keras", "keras", 10, "10-1")
        >>> machine_key(spec, "cpu:1", 64) == machine_key(spec, "cpu:0", 64)
        True
    """
    kind = "cpu" if device.startswith("cpu") else device
    return "|".join(map(str, (spec.fingerprint, spec.path, kind,
                              os.environ.get("NBTOOL_TF_THREADS", ""),
                              spec.preprocess is not None, *settings,
                              # Another runtime is another measure (old keys stay valid).
                              *([spec.runtime] if spec.runtime != "tensorflow" else []))))


def cost_key(spec: ModelSpec, device: str) -> str:
    """The key of a model's load and per-row costs here (see :func:`machine_key`).

    Example:
        >>> spec = ModelSpec("mlp", "/m/mlp.keras", "keras", 10, "10-1")
        >>> cost_key(spec, "cpu:1") == cost_key(spec, "cpu:0")   # CPU workers are alike
        True
    """
    return machine_key(spec, device, spec.batch_size, spec.precision)


def record_cost(spec: ModelSpec, device: str, **measured: float) -> None:
    """Remember what ``spec`` cost here (``load`` seconds, seconds per ``row``), for the
    planning of later runs (:func:`nbtool.prediction.planning.plan_model_routes`).

    Example:
        >>> record_cost(spec, "cpu:0", load=1.2)   # doctest: +SKIP
    """
    costs = machine_cache("costs.json")
    key = cost_key(spec, device)
    costs.put(key, {**(costs.get(key) or {}), **measured})


def model_costs(specs: list[ModelSpec]) -> dict[str, dict[str, float]]:
    """What this worker's machine measured for these models: ``{"load": s, "row": s}``
    each, for those measured before (load and run at least once).

    Example:
        >>> client.run(model_costs, [spec], workers=[addr])   # doctest: +SKIP
        {'tcp://127.0.0.1:40101': {'cnn': {'load': 1.21, 'row': 0.0004}}}
    """
    costs, device = machine_cache("costs.json"), worker_device()
    found = {s.name: costs.get(cost_key(s, device)) for s in specs}
    return {n: c for n, c in found.items() if c and "load" in c and "row" in c}


# -- the files ---------------------------------------------------------------------------
_CACHES: dict[str, "MeasurementsFile"] = {}


class MeasurementsFile:
    """One JSON file of measurements, read once and merged on every write.

    Example:
        >>> import tempfile, os
        >>> c = MeasurementsFile(os.path.join(tempfile.mkdtemp(), "x.json"))
        >>> c.get("k") is None
        True
    """

    def __init__(self, path: str):
        self.path = path
        self.data = self._read()

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def get(self, key: str, default: Any = None) -> Any:
        """The cached value, looking at the file again on a miss (another worker of this
        machine may have written it since).

        Example:
            >>> import tempfile, os
            >>> MeasurementsFile(os.path.join(tempfile.mkdtemp(), "x.json")).get("missing", 0)
            0
        """
        if key not in self.data:
            self.data.update(self._read())
        return self.data.get(key, default)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``, keeping what other workers wrote meanwhile.

        Example:
            >>> import tempfile, os
            >>> c = MeasurementsFile(os.path.join(tempfile.mkdtemp(), "x.json"))
            >>> c.put("k", 1); c.put("j", 2); sorted(MeasurementsFile(c.path).data.items())
            [('j', 2), ('k', 1)]
        """
        self.data = {**self._read(), **self.data, key: value}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f)
            os.replace(tmp, self.path)   # concurrent workers: last complete write wins
        except OSError:
            pass   # a read-only home only costs a measurement next time


def machine_cache(filename: str) -> MeasurementsFile:
    """The process's cache for ``filename`` in this machine's nbtool cache folder.

    Example:
        >>> machine_cache("batch_sizes.json").path.endswith("batch_sizes.json")
        True
    """
    path = os.path.join(machine_folder(), filename)
    if path not in _CACHES:
        _CACHES[path] = MeasurementsFile(path)
    return _CACHES[path]
