"""Worker-side code: the model cache and the tasks that run on Dask workers.

This module is imported by reference on every worker (it lives in the installed package),
so its module-level cache is one real cache per worker process. Functions defined in a
notebook would be pickled by value with their globals, and a cache kept there would be a
fresh, empty dict in every task.

TensorFlow is imported lazily, inside the functions that run on workers: the notebook
kernel imports this module to reference its functions, and must not import TensorFlow.

Example (what the engine sends to a worker):
    >>> from nbtool.worker import predict_chunk
    >>> out = client.submit(predict_chunk, spec, x, 0, 100, 0, workers=["cpu0"])  # doctest: +SKIP
    >>> out.result().outputs[0].shape                                              # doctest: +SKIP
    (100, 10)
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import os
import re
import threading
import time
import traceback
from typing import Any

import numpy as np

from .errors import ChunkCancelled, ChunkError, ModelFileChanged, ModelLoadError, NbtoolError, first_line
from .wire import ChunkOutput, ModelSpec, file_fingerprint
from . import overlap
from .batching import run_in_batches
from .litert import LiteRTPredictor, open_tflite
from .machine_cache import machine_cache
from .quiet import native_logs_filtered
from .sources import read_rows
from .wire import is_file_ref

logger = logging.getLogger("nbtool.worker")
#: Chunk failures go where Dask keeps its worker's log (a child of "distributed.worker"):
#: ``eng.client.get_worker_logs()`` shows them, one line each.
failure_log = logging.getLogger("distributed.worker.nbtool")

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
        import tensorflow as tf

        self.name, self.path = name, path   # for errors: which model this is
        self.batch_size = int(batch_size)
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
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


@dataclasses.dataclass
class LoadedModel:
    """A model resident in one worker, with what it cost."""

    spec: ModelSpec
    predictor: CompiledPredictor
    call: Any               # the model (or SavedModel layer) the predictor compiles
    weight_bytes: int       # the bytes of its variables, counted exactly
    footprint: int          # measured growth: GPU allocator bytes, or RSS on CPU
    on_gpu: bool
    load_seconds: float
    loaded_at: float
    last_used: float
    uses: int = 0
    row_cost_recorded: bool = False   # its seconds per row, measured once per load

    @property
    def accounted(self) -> int:
        """Bytes charged against the budget.

        On a GPU, the allocator's growth is exact, so the larger of it and the weights. On
        CPU the RSS growth is not: the first load also pays transient copies (zip, h5,
        numpy) that glibc keeps, later loads reuse freed memory and measure ~0; so the
        weights, counted from the variables, are what a model holds.
        """
        weights = self.weight_bytes or self.spec.size_bytes
        return max(weights, self.footprint) if self.on_gpu else weights


class ModelCache:
    """The models resident in one worker: loaded on demand, evicted LRU under a budget.

    Loads happen under a per-model lock, so two tasks that need the same model load it
    once. Before a load that would take the resident models over ``budget`` bytes, the
    least recently used models are evicted; so the worker never holds more than the budget
    plus the one model being loaded.

    Example:
        >>> cache = ModelCache(budget=2**30, device="cpu:0", worker="cpu0")
        >>> cache.get(spec).predictor(x)        # loads on first use  # doctest: +SKIP
        >>> cache.status()["models"]["cnn"]["state"]                  # doctest: +SKIP
        'loaded'
    """

    def __init__(self, budget: int, device: str, worker: str):
        self.budget = int(budget)
        self.device = device
        self.worker = worker
        self._models: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()
        self._info: dict[str, dict[str, Any]] = {}   # per model: state, reason, loads...
        self._lock = threading.RLock()
        self._model_locks: dict[str, threading.Lock] = {}
        self.evictions = 0
        self.peak_accounted = 0

    # -- memory ----------------------------------------------------------------------
    @property
    def on_gpu(self) -> bool:
        """Whether TensorFlow in this worker runs on a GPU (it sees at most one)."""
        return bool(_tensorflow().config.list_logical_devices("GPU"))

    def memory_in_use(self) -> int:
        """Bytes this worker's process holds: GPU allocator bytes if it has a GPU, else RSS."""
        tf = _tensorflow()
        if self.on_gpu:
            return int(tf.config.experimental.get_memory_info("GPU:0")["current"])
        import psutil

        return psutil.Process().memory_info().rss

    def resident_bytes(self) -> int:
        """Bytes charged to the budget by the models resident now."""
        with self._lock:
            return sum(m.accounted for m in self._models.values())

    def evict_lru(self, needed: int) -> list[str]:
        """Evict least-recently-used models until ``needed`` more bytes fit the budget."""
        evicted = []
        with self._lock:
            while self._models and self.resident_bytes() + needed > self.budget:
                name, _ = next(iter(self._models.items()))
                self._drop(name, state="evicted")
                evicted.append(name)
                self.evictions += 1
        if evicted:
            _release_memory()
            logger.info("worker %s evicted %s to fit %d bytes", self.worker, evicted, needed)
        return evicted

    # -- loading -----------------------------------------------------------------------
    def get(self, spec: ModelSpec) -> tuple[LoadedModel, float]:
        """The loaded model for ``spec`` (loading it now if needed) and the load seconds
        this call spent (0 when it was already resident)."""
        with self._lock:
            lock = self._model_locks.setdefault(spec.name, threading.Lock())
        with lock:
            with self._lock:
                loaded = self._models.get(spec.name)
                if loaded is not None and loaded.spec.cache_key == spec.cache_key \
                        and loaded.spec.batch_size == spec.batch_size:
                    self._models.move_to_end(spec.name)
                    loaded.last_used = time.time()
                    loaded.uses += 1
                    return loaded, 0.0
                if loaded is not None:  # the file or the settings changed: reload
                    self._drop(spec.name, state="replaced")
            loaded = self._load(spec)
            loaded.uses += 1
            return loaded, loaded.load_seconds

    def _load(self, spec: ModelSpec) -> LoadedModel:
        self._check_file(spec)
        # What it will be charged: its weights as counted at its last load here, if any.
        known = self._info.get(spec.name, {})
        same_file = known.get("fingerprint") == spec.fingerprint
        self.evict_lru((known.get("weight_bytes") if same_file else None) or spec.size_bytes)
        info = self._info.setdefault(spec.name, {"loads": 0})
        info.update(state="loading", reason=None, path=spec.path)
        before = self.memory_in_use()
        t0 = time.perf_counter()
        try:
            call, row_shape, dtype, n_outputs, weight_bytes = _open_model(spec)
            row_shape, dtype = _input_signature(spec, row_shape, dtype)
            # "auto": a sweep, opt-in: bigger batches gained 0-13% here, and their
            # activations can take far more memory than the budget allows for.
            batch = best_batch_size(spec, call, row_shape, dtype, self.device,
                                    self.memory_in_use, self.budget // 4) \
                if spec.batch_size == "auto" else (spec.batch_size or DEFAULT_BATCH_SIZE)
            predictor = self._compile(spec, call, row_shape, dtype, batch)
        except NbtoolError as e:
            info.update(state="failed", reason=str(e))
            raise
        except Exception as e:  # anything Keras/TF raises while loading
            err = _load_error(spec, self.worker, e)
            info.update(state="failed", reason=err.reason)
            raise err from None
        seconds = time.perf_counter() - t0
        footprint = max(0, self.memory_in_use() - before)
        now = time.time()
        loaded = LoadedModel(spec, predictor, call, weight_bytes, footprint, self.on_gpu,
                             seconds, now, now)
        with self._lock:
            self._models[spec.name] = loaded
            info.update(size_bytes=spec.size_bytes, weight_bytes=weight_bytes, state="loaded", footprint=footprint, load_seconds=seconds,
                        loads=info["loads"] + 1, input_shape=(None, *row_shape),
                        input_dtype=str(np.dtype(dtype)), n_outputs=n_outputs,
                        batch_size=predictor.batch_size, fingerprint=spec.fingerprint,
                        output_specs=predictor.output_specs, precision=spec.precision,
                        batch_note=getattr(predictor, "batch_note", None),
                        oom_retries=info.get("oom_retries", 0))
            self.peak_accounted = max(self.peak_accounted, self.resident_bytes())
        logger.info("worker %s loaded %s in %.2fs (%d bytes)", self.worker, spec.name,
                    seconds, footprint)
        record_cost(spec, self.device, load=seconds)
        return loaded

    def _check_file(self, spec: ModelSpec) -> None:
        """Refuse to load a file that changed since ``spec`` was registered.

        Loading it anyway would serve the new weights under the old registration (and mix
        them with chunks other workers computed from the old ones); the engine re-registers
        instead. The fingerprint (size and mtime) is cheap enough to take at every load.
        """
        now = file_fingerprint(spec.path) if os.path.exists(spec.path) else "missing"
        if now == spec.fingerprint:
            return
        err = ModelFileChanged(spec.name, spec.path, spec.fingerprint, now, self.worker)
        info = self._info.setdefault(spec.name, {"loads": 0})
        info.update(state="failed", reason=str(err), path=spec.path)
        raise err

    # -- running, with smaller batches when memory runs out -------------------------------
    def _compile(self, spec: ModelSpec, call, row_shape, dtype, batch: int) -> CompiledPredictor:
        """A warmed-up predictor; on an out-of-memory error, the batch is halved (to 1)."""
        tf = _tensorflow()
        while True:
            try:
                predictor = make_predictor(spec, call, batch, row_shape, dtype)
                predictor.warm_up()
                return predictor
            except tf.errors.ResourceExhaustedError:
                if batch <= 1:
                    raise
                batch = self._note_oom(spec.name, batch)

    def _note_oom(self, name: str, batch: int) -> int:
        smaller = max(1, batch // 2)
        info = self._info.setdefault(name, {"loads": 0})
        info["oom_retries"] = info.get("oom_retries", 0) + 1
        info["batch_size"] = smaller
        logger.warning("worker %s: %s ran out of memory with batch %d; retrying with %d",
                       self.worker, name, batch, smaller)
        gc.collect()
        return smaller

    def run(self, loaded: LoadedModel, rows: np.ndarray) -> list[np.ndarray]:
        """Predict ``rows``; if memory runs out, retry with the batch halved, down to 1.

        The smaller batch is kept for this model on this worker, so later chunks start
        with what fits.
        """
        tf = _tensorflow()
        while True:
            predictor = loaded.predictor
            try:
                return predictor(rows)
            except tf.errors.ResourceExhaustedError:
                if predictor.batch_size <= 1:
                    raise
                batch = self._note_oom(loaded.spec.name, predictor.batch_size)
                loaded.predictor = self._compile(loaded.spec, loaded.call, predictor.row_shape,
                                                 predictor.dtype, batch)

    # -- unloading -----------------------------------------------------------------------
    def unload(self, names: list[str] | None = None) -> list[str]:
        """Drop models (all if ``names`` is None) and clear Keras' global state.

        The memory becomes reusable inside this process; TensorFlow does not give it back
        to the device or the OS while the process lives (that is what a hard unload is for).
        """
        with self._lock:
            targets = [n for n in (list(self._models) if names is None else names)
                       if n in self._models]
            for name in targets:
                self._drop(name, state="unloaded")
        if targets:
            _release_memory()
        return targets

    def _drop(self, name: str, state: str) -> None:
        self._models.pop(name, None)
        if name in self._info:
            self._info[name]["state"] = state

    # -- reporting ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A snapshot for the client: models and their states, memory, budget."""
        with self._lock:
            models = {}
            for name, info in self._info.items():
                row = dict(info)
                m = self._models.get(name)
                if m is not None:
                    row.update(last_used=m.last_used, uses=m.uses, accounted=m.accounted,
                               traces=m.predictor.traces)
                models[name] = row
            return {"worker": self.worker, "device": self.device, "budget": self.budget,
                    "resident_bytes": self.resident_bytes(), "evictions": self.evictions,
                    "peak_accounted": self.peak_accounted, "models": models,
                    "lru_order": list(self._models)}


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
    if os.environ.get("NBTOOL_BATCH_SWEEP", "1") == "0" or None in row_shape:
        return DEFAULT_BATCH_SIZE
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

    tf = _tensorflow()
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
    except tf.errors.ResourceExhaustedError:
        pass   # keep what fitted; the OOM path halves further if needed
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
                              spec.preprocess is not None, *settings)))


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
    planning of later cold runs (:func:`nbtool.planning.plan_cold_routes`).

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


def _input_signature(spec: ModelSpec, row_shape: tuple, dtype) -> tuple[tuple, str]:
    """What the compiled function takes: the model's input, or, with an in-graph
    :class:`~nbtool.preprocess.Preprocess`, its input dtype (and any size, if it resizes)."""
    pre = spec.preprocess
    input_dtype = getattr(pre, "input_dtype", None)
    if input_dtype is None:
        return row_shape, dtype
    if getattr(pre, "resize", None) is not None and len(row_shape) == 3:
        row_shape = (None, None, row_shape[-1])
    return row_shape, input_dtype


def make_predictor(spec: ModelSpec, call, batch: int, row_shape, dtype):
    """The predictor for ``spec``'s format: LiteRT for ``.tflite``, else a compiled
    ``tf.function``; both take rows and return float outputs in row order.

    Example:
        >>> make_predictor(spec, call, 64, (8,), "float32").warm_up()   # doctest: +SKIP
    """
    if spec.format == "tflite":
        return LiteRTPredictor(call, batch, row_shape, dtype, preprocess=spec.preprocess,
                               name=spec.name, path=spec.path)
    return CompiledPredictor(call, batch, row_shape, dtype, preprocess=spec.preprocess,
                             name=spec.name, path=spec.path)


def _open_model(spec: ModelSpec):
    """Load the file; return a callable ``f(x, training=False)`` (for ``.tflite``, a
    :class:`~nbtool.litert.LiteRTModel`), the input row shape and dtype, the number of outputs, and the
    bytes of its weights."""
    if spec.format == "tflite":
        m = open_tflite(spec)
        # Quantized inputs are quantized by the predictor: callers send float32 rows.
        dtype = "float32" if np.dtype(m.input["dtype"]).kind in "iu" \
            and m.input.get("quantization", (0.0, 0))[0] else np.dtype(m.input["dtype"]).name
        # The flatbuffer holds the weights: its size is what the model holds.
        return m, m.row_shape, dtype, len(m.outputs), os.path.getsize(spec.path)
    tf = _tensorflow()
    import keras

    if spec.format == "savedmodel":
        obj = tf.saved_model.load(spec.path)
        endpoint = "serve" if hasattr(obj, "serve") else "serving_default"
        del obj
        layer = keras.layers.TFSMLayer(spec.path, call_endpoint=endpoint)
        fn = layer.call_endpoint_fn
        signature = getattr(fn, "input_signature", None) or fn.structured_input_signature
        inputs = [s for s in tf.nest.flatten(signature) if isinstance(s, tf.TensorSpec)]
        if len(inputs) != 1:
            raise ModelLoadError(spec.name, spec.path, _worker_name(),
                                 f"its endpoint {endpoint!r} takes {len(inputs)} inputs",
                                 "nbtool runs single-input models; export one that takes "
                                 "one tensor")
        shape, dtype = tuple(inputs[0].shape)[1:], inputs[0].dtype.name

        def call(x, training=False):
            return layer(x)
        return call, shape, dtype, None, _weight_bytes(layer.weights)
    model = keras.saving.load_model(spec.path, compile=False, safe_mode=not spec.trusted)
    if spec.precision:
        model = with_precision(model, spec.precision)
    if len(model.inputs) != 1:
        raise ModelLoadError(spec.name, spec.path, _worker_name(),
                             f"the model takes {len(model.inputs)} inputs",
                             "nbtool runs single-input models; wrap it in a model that "
                             "takes one tensor")
    shape = tuple(model.inputs[0].shape)[1:]
    return model, shape, model.inputs[0].dtype, len(model.outputs), _weight_bytes(model.weights)


PRECISIONS = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def with_precision(model, precision: str):
    """A copy of ``model`` that computes in ``precision`` (mixed: variables stay float32).

    Every layer's dtype policy in the model's config becomes ``mixed_<precision>`` (inputs
    stay as they are), the model is rebuilt from that config, and the weights are copied.

    Example:
        >>> fast = with_precision(model, "bfloat16")   # doctest: +SKIP
    """
    policy = PRECISIONS.get(precision)
    if policy is None:
        raise ValueError(f"precision={precision!r}: expected one of {sorted(PRECISIONS)}.")

    def patch(node, in_input_layer=False):
        if isinstance(node, dict):
            is_input = in_input_layer or node.get("class_name") == "InputLayer"
            out = {}
            for k, v in node.items():
                if k == "dtype" and not is_input and isinstance(v, dict) \
                        and v.get("class_name") == "DTypePolicy":
                    v = {**v, "config": {**v.get("config", {}), "name": policy}}
                out[k] = patch(v, is_input)
            return out
        if isinstance(node, list):
            return [patch(v, in_input_layer) for v in node]
        return node

    rebuilt = model.__class__.from_config(patch(model.get_config()))
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def _weight_bytes(weights) -> int:
    return int(sum(np.prod(w.shape, dtype=np.int64) * np.dtype(w.dtype).itemsize
                   for w in weights))


def _load_error(spec: ModelSpec, worker: str, e: Exception) -> ModelLoadError:
    if type(e).__name__ == "ResourceExhaustedError":   # halving the batch did not help
        return ModelLoadError(spec.name, spec.path, worker, "out of memory even with batch "
                              "size 1", "free memory on this device (eng.unload(...)), lower "
                              "the memory budget, or place the model on a bigger device")
    msg = _describe(e)
    low = f"{msg} {e}".lower()
    if "safe_mode" in low or "lambda" in low and "deserializ" in low:
        return ModelLoadError(spec.name, spec.path, worker,
                              "it contains a Lambda layer (stored Python code), which Keras "
                              "refuses to deserialize in safe mode",
                              f"if you trust this file, register it with trusted=True: "
                              f"eng.register({spec.name!r}, {spec.path!r}, trusted=True)")
    if "could not locate" in low or "unknown layer" in low or "custom_objects" in low:
        return ModelLoadError(spec.name, spec.path, worker, first_line(msg),
                              "the model uses a custom class; make it importable on the "
                              "workers (register it with @keras.saving."
                              "register_keras_serializable in an installed module)")
    return ModelLoadError(spec.name, spec.path, worker, first_line(msg), _load_fix(spec))


def _load_fix(spec: ModelSpec) -> str:
    """The fix for a file that failed to load, by format: a SavedModel or a ``.tflite`` is
    often someone else's file, which its user cannot simply re-save with ``model.save``.

    Example:
        >>> _load_fix(ModelSpec("m", "m.tflite", "tflite", 1, "1-1"))  # doctest: +ELLIPSIS
        'it may use ops this LiteRT does not run (TensorFlow "Select" ops, custom ops)...'
    """
    if spec.format == "savedmodel":
        version = getattr(_TF, "__version__", None)
        here = f" (this worker has TensorFlow {version})" if version else ""
        return ("it was probably made with another TensorFlow version" + here + ": ask its "
                "publisher for a .keras or .tflite export, or load it with the TensorFlow it "
                "was made with and re-export it there (tf.saved_model.save, or convert it "
                "with tf.lite.TFLiteConverter.from_saved_model)")
    if spec.format == "tflite":
        return ('it may use ops this LiteRT does not run (TensorFlow "Select" ops, custom '
                "ops) or a newer format: ask its publisher for a .tflite with built-in ops "
                "only (or a .keras export), or upgrade ai-edge-litert on the workers")
    return ("check that the file is complete (re-save it with model.save('name.keras')) and "
            "that the Keras version matches")


def _describe(e: Exception) -> str:
    """``Type: message`` on one line; TensorFlow's op errors without their graph noise."""
    text = getattr(e, "message", None) or str(e)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[\[.*?\]\]|\s*\[Op:[^\]]*\]", "", text, flags=re.S)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Graph execution error"):
        lines = lines[-1:]   # the op's own message comes last, after the Python stack
    return f"{type(e).__name__}: {first_line(chr(10).join(lines))}"


def _release_memory() -> None:
    import keras

    # Keras' global state (name scopes, graph) and the eager kernel cache; then Python's
    # garbage. The freed memory is reusable in this process, not returned to the device.
    keras.backend.clear_session(free_memory=True)
    gc.collect()


_TF = None


def _tensorflow():
    global _TF
    if _TF is None:
        import tensorflow as tf

        threads = int(os.environ.get("NBTOOL_TF_THREADS", "0") or 0)
        if threads:
            try:  # only possible before TensorFlow's runtime starts
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:
                pass
        # Each model gets its own tf.function over the same Python function, traced once;
        # TF counts those as "retracing" and warns. They are not: drop just that warning.
        tf.get_logger().addFilter(
            lambda record: "triggered tf.function retracing" not in record.getMessage())
        _TF = tf
    return _TF


# -- the per-process cache ---------------------------------------------------------------
_CACHE: ModelCache | None = None
_CACHE_LOCK = threading.Lock()
_IDLE_MEMORY: int | None = None


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except ValueError:
        return f"pid{os.getpid()}"


def resource_name(worker) -> str:
    """The Dask resource that only the worker of this name has.

    Example:
        >>> resource_name("gpu0")
        'nbtool-worker-gpu0'
    """
    return f"nbtool-worker-{worker}"


def worker_device() -> str:
    """This worker's device label: from the plan (``NBTOOL_DEVICE``) or what TF sees.

    Example:
        >>> client.run(worker_device)   # doctest: +SKIP
        {'tcp://127.0.0.1:40101': 'gpu:0', 'tcp://127.0.0.1:40102': 'gpu:1'}
    """
    device = os.environ.get("NBTOOL_DEVICE")
    if device:
        return device
    tf = _tensorflow()
    if tf.config.list_physical_devices("GPU"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        return f"gpu:{visible}"
    return "cpu:0"


def get_cache(budget: int | None = None, worker: str | None = None) -> ModelCache:
    """This worker process's model cache (created on first use).

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
            _CACHE = ModelCache(budget, worker_device(), worker or _worker_name())
        return _CACHE


# -- tasks (called by the engine through Dask) ---------------------------------------------
#: Rows this process has predicted, and the seconds it spent on them, since it started: the
#: dashboard turns their change between two looks into rows/s and busy % per worker.
_THROUGHPUT = {"rows": 0, "busy_seconds": 0.0}
_THROUGHPUT_LOCK = threading.Lock()   # chunks may run in several task threads


def predict_chunk(spec: ModelSpec, data: Any, start: int, stop: int | None,
                  chunk: int, store=None) -> ChunkOutput:
    """Run one model on rows ``start:stop`` of ``data``; the unit of work of a prediction.

    ``data`` is an ndarray scattered to the worker, a Dask array block, or a file
    reference (:mod:`nbtool.sources`) that the worker opens and slices itself. With a
    ``store`` (:class:`nbtool.store.StoreRef`) the outputs are written to the result store
    here and only a receipt travels back.

    Example:
        >>> predict_chunk(spec, x, 0, 10, chunk=0).outputs[0].shape   # doctest: +SKIP
        (10, 3)
    """
    worker = _worker_name()
    try:
        cache = prepare_worker()
        loaded, load_seconds = cache.get(spec)
        t0 = time.perf_counter()
        n_rows, outputs = _read_and_run(cache, loaded, data, start, stop)
        seconds = time.perf_counter() - t0
        with _THROUGHPUT_LOCK:
            _THROUGHPUT["rows"] += n_rows
            _THROUGHPUT["busy_seconds"] += seconds
        if not loaded.row_cost_recorded and n_rows:   # once per load: no I/O per chunk
            loaded.row_cost_recorded = True
            record_cost(spec, cache.device, row=seconds / n_rows)
        if store is not None:   # written here, on the worker; only a receipt goes back
            store.write(spec.name, chunk, outputs)
            outputs = None
        return ChunkOutput(outputs, seconds, load_seconds, worker,
                           loaded.predictor.batch_size, rows=n_rows)
    except (ChunkError, ChunkCancelled):   # a cancelled chunk is no failure: nothing to log
        raise
    except Exception as e:
        if type(e).__name__ == "ResourceExhaustedError":
            e = ModelLoadError(spec.name, spec.path, worker, "out of memory even with batch "
                               "size 1", "free memory on this device (eng.unload(...)), lower "
                               "the memory budget, or place the model on a bigger device")
        end = stop if stop is not None else start + len(data)
        reason = str(e) if isinstance(e, NbtoolError) else _describe(e)
        # One line per failure: a run whose every chunk fails must not print a traceback
        # per chunk. The traceback travels with the error (res.errors[i].traceback).
        _keep_failures_off_the_notebook()
        failure_log.warning("chunk %d (rows %d:%d) of %s failed on %s: %s", chunk, start, end,
                            spec.name, worker, first_line(reason, 200))
        _quiet_dask_chunk_failures()
        raise ChunkError(spec.name, chunk, (start, end), worker, reason,
                         traceback=traceback.format_exc()) from None


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


class _OneLinePerChunkFailure(logging.Filter):
    """Drops Dask's own multi-line "Compute Failed" record (task repr, exception,
    traceback) for a :class:`ChunkError`: :func:`predict_chunk` has logged its one line,
    and the traceback travels on the error."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("Compute Failed") and len(args) >= 4
                    and str(args[3]).startswith(f"{ChunkError.__name__}("))


def _quiet_dask_chunk_failures() -> None:
    """Install :class:`_OneLinePerChunkFailure` on Dask's worker logger, once per process
    (at the first failure: before Dask logs it, after this task raises)."""
    dask_log = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _OneLinePerChunkFailure) for f in dask_log.filters):
        dask_log.addFilter(_OneLinePerChunkFailure())


def _read_and_run(cache: ModelCache, loaded: LoadedModel, data: Any, start: int,
                  stop: int | None) -> tuple[int, list[np.ndarray]]:
    """Rows ``start:stop`` through the model; a chunk in a file is read a piece ahead of
    the compute (:mod:`nbtool.overlap`). Returns (rows, outputs)."""
    if stop is None or not is_file_ref(data) or not overlap.enabled():
        rows = read_rows(data, start, stop)
        return len(rows), cache.run(loaded, rows)
    bounds = overlap.pieces(start, stop, loaded.predictor.batch_size * overlap.PIECE_BATCHES)
    outputs = overlap.overlapped(lambda a, b: read_rows(data, a, b), bounds,
                                 lambda rows: cache.run(loaded, rows))
    return stop - start, outputs


def load_model(spec: ModelSpec) -> dict[str, Any]:
    """Make ``spec`` resident on this worker (a no-op if it is); returns its cache entry.

    Example:
        >>> client.submit(load_model, spec, workers=["cpu0"]).result()["state"]  # doctest: +SKIP
        'loaded'
    """
    cache = prepare_worker()
    cache.get(spec)
    return cache.status()["models"][spec.name]


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
    cache = prepare_worker()
    with cache._lock:
        return {name: m.spec.fingerprint for name, m in cache._models.items()}


def worker_status() -> dict[str, Any]:
    """The cache status plus process facts (pid, RSS, idle RSS, GPUs TF sees, env).

    Example:
        >>> client.run(worker_status)   # doctest: +SKIP
    """
    import psutil

    cache = prepare_worker()
    tf = _tensorflow()
    status = cache.status()
    with _THROUGHPUT_LOCK:
        throughput = dict(_THROUGHPUT)
    status.update(
        pid=os.getpid(),
        throughput=throughput,
        rss=psutil.Process().memory_info().rss,
        idle_memory=_IDLE_MEMORY,
        memory_in_use=cache.memory_in_use(),
        tf_gpus=[d.name for d in tf.config.list_physical_devices("GPU")],
        tf_intra_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        env={k: os.environ.get(k) for k in (
            "CUDA_VISIBLE_DEVICES", "TF_FORCE_GPU_ALLOW_GROWTH", "TF_NUM_INTRAOP_THREADS",
            "OMP_NUM_THREADS", "NBTOOL_DEVICE", "NBTOOL_MEMORY_BUDGET")},
    )
    return status


_PREPARE_LOCK = threading.Lock()


def prepare_worker(budget: int | None = None, worker: str | None = None) -> ModelCache:
    """Start TensorFlow, create the cache and record the idle memory of this worker.

    Run by :class:`NbtoolWorkerPlugin` when a worker starts, and by the first task if that
    comes first; so the first prediction pays no import, and the idle baseline excludes
    everything a model adds. Calling it again only updates the budget.
    """
    global _IDLE_MEMORY
    with _PREPARE_LOCK:
        cache = get_cache(budget, worker)
        if budget and budget != cache.budget:
            cache.budget = int(budget)
            cache.evict_lru(0)
            cache.peak_accounted = cache.resident_bytes()   # the peak under this budget
        if _IDLE_MEMORY is None:
            # TensorFlow starts here: its known-harmless start-up lines stay out of the
            # notebook (they would land in red under whatever cell runs).
            with native_logs_filtered(expect_gpu=_expects_gpu()):
                _warm_runtime()
            gc.collect()
            _IDLE_MEMORY = cache.memory_in_use()
        return cache


def _expects_gpu() -> bool:
    """Whether this worker should see a GPU: by its plan, else by what NVML finds."""
    from .devices import FAKE_GPUS_ENV, discover_gpus

    if os.environ.get(FAKE_GPUS_ENV):   # an injected inventory: no real GPU behind it
        return False
    device = os.environ.get("NBTOOL_DEVICE")
    if device:
        return device.startswith("gpu")
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() in ("-1",):
        return False
    return bool(discover_gpus())


def _warm_runtime() -> None:
    """Pay TensorFlow's and Keras' one-time costs (runtime start, lazy imports, the first
    trace) with a throwaway model, so they count in the idle baseline and not in the first
    real model's load time and footprint."""
    _tensorflow()
    import keras

    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    CompiledPredictor(tiny, 2, (4,), "float32").warm_up()
    del tiny
    _release_memory()


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
