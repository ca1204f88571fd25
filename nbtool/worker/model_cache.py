"""The models resident in one worker: loaded on demand under a per-model lock, evicted LRU
under a memory budget, rerun with smaller batches when memory runs out; each model's
:class:`~nbtool.wire.ModelState` is what the worker reports.

Example:
    >>> cache = ModelCache(budget=2**30, device="cpu:0", worker="cpu0")
    >>> cache.status().state_of("cnn").describe()
    'not loaded'
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import os
import threading
import time
from typing import Any

import numpy as np

from nbtool._util import human_bytes
from nbtool.errors import ConversionDisagrees, ModelFileChanged, NbtoolError
from nbtool.signature import InputSpec
from nbtool.wire import (ModelSpec, ModelState, SOFT_UNLOAD_ON_GPU, UnloadResult,
    WorkerStatus, file_fingerprint, is_text_dtype)
from nbtool.worker.auto import (CONVERTERS, Guard, discard, open_for_runtime,
    remember_envelope, remember_fallback)
from nbtool.worker.environment import (describe_exception, held_memory, memory_in_use, on_gpu,
    out_of_memory_error, release_memory)
from nbtool.worker.keras_backends import backend_name
from nbtool.worker.loading import load_error
from nbtool.worker.measure import best_batch_size, record_cost
from nbtool.worker.runtimes import DEFAULT_BATCH_SIZE, FixedBatchPredictor, make_predictor

logger = logging.getLogger("nbtool.worker")

#: Below this many bytes of dropped models, what RSS or the driver says is mostly noise
#: (pages, allocator slack): a soft unload's verdict then says it could not tell.
MEASURABLE_BYTES = 4 * 2**20


@dataclasses.dataclass
class LoadedModel:
    """A model resident in one worker, with what it cost.

    Example:
        >>> m = LoadedModel(spec, predictor, model, 4096, 0, False, 0.5, 0.0, 0.0)  # doctest: +SKIP
        >>> m.accounted                                                             # doctest: +SKIP
        4096
    """

    spec: ModelSpec
    predictor: FixedBatchPredictor
    call: Any               # what the predictor runs: the model, or its conversion
    weight_bytes: int       # the bytes of its variables, counted exactly
    footprint: int          # measured growth: GPU allocator bytes, or RSS on CPU
    on_gpu: bool
    load_seconds: float
    loaded_at: float
    last_used: float
    uses: int = 0
    row_cost_recorded: bool = False   # its seconds per row, measured once per load
    guard: Guard | None = None        # a conversion's check against TensorFlow, per row
    #: What the user must hear from this worker about the model (a fallback to
    #: TensorFlow): taken by the next chunk's output, then cleared.
    notes: list = dataclasses.field(default_factory=list)

    @property
    def accounted(self) -> int:
        """Bytes charged against the budget.

        On a GPU, the allocator's growth is exact, so the larger of it and the weights. On
        CPU the RSS growth is not: the first load also pays transient copies (zip, h5,
        numpy) that glibc keeps, later loads reuse freed memory and measure ~0; so the
        weights, counted from the variables, are what a model holds.
        """
        weights = self.weight_bytes or self.spec.size_bytes
        if self.guard is not None:   # TensorFlow's copy, once opened to check rows
            weights += self.guard.reference_bytes
        return max(weights, self.footprint) if self.on_gpu else weights


class ModelCache:
    """The models resident in one worker: loaded on demand, evicted LRU under a budget.

    Loads happen under a per-model lock, so two tasks that need the same model load it
    once. Before a load that would take the resident models over ``budget`` bytes, the
    least recently used models are evicted; so the worker never holds more than the budget
    plus the one model being loaded.

    Example:
        >>> cache = ModelCache(budget=2**30, device="cpu:0", worker="cpu0")
        >>> cache.get(spec)[0].predictor(x)     # loads on first use  # doctest: +SKIP
        >>> cache.state_of("cnn").state                               # doctest: +SKIP
        'loaded'
    """

    def __init__(self, budget: int, device: str, worker: str):
        self.budget = int(budget)
        self.device = device
        self.worker = worker
        self._models: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()
        self._states: dict[str, ModelState] = {}   # per model: state, reason, loads...
        self._lock = threading.RLock()
        self._model_locks: dict[str, threading.Lock] = {}
        self.evictions = 0
        self.peak_accounted = 0
        self.last_soft_unload: dict | None = None   # what the last unload measured

    # -- memory ----------------------------------------------------------------------
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
            release_memory()
            logger.info("worker %s evicted %s to fit %d bytes", self.worker, evicted, needed)
        return evicted

    def set_budget(self, budget: int) -> None:
        """A new budget: evict what no longer fits; the peak restarts under it.

        Example:
            >>> cache = ModelCache(budget=2**30, device="cpu:0", worker="cpu0")
            >>> cache.set_budget(2**29); cache.budget
            536870912
        """
        self.budget = int(budget)
        self.evict_lru(0)
        self.peak_accounted = self.resident_bytes()   # the peak under this budget

    # -- loading -----------------------------------------------------------------------
    def get(self, spec: ModelSpec, sample=None) -> tuple[LoadedModel, float]:
        """The loaded model for ``spec`` (loading it now if needed) and the load seconds
        this call spent (0 when it was already resident).

        ``sample``: a function giving the user's rows (the first of the chunk being
        predicted), asked only if this load checks a conversion against TensorFlow.
        """
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
            loaded = self._load(spec, sample)
            loaded.uses += 1
            return loaded, loaded.load_seconds

    def _load(self, spec: ModelSpec, sample=None) -> LoadedModel:
        self._check_file(spec)
        # What it will be charged: its weights as counted at its last load here, if any.
        info = self._state(spec.name)
        same_file = info.fingerprint == spec.fingerprint
        self.evict_lru((info.weight_bytes if same_file else None) or spec.size_bytes)
        info.state, info.reason, info.path = "loading", None, spec.path
        before = memory_in_use()
        t0 = time.perf_counter()
        try:
            sweep = spec.batch_size == "auto"
            # The user's batch, else None: auto's choice also finds the best batch here.
            fixed = spec.batch_size if isinstance(spec.batch_size, int) else None
            # Its runtime: the format's own, the one forced, or auto's (remembered/chosen).
            while True:   # a batch too big for memory already fails while choosing
                try:
                    opened = open_for_runtime(spec, fixed, sample)
                    break
                except Exception as e:
                    if not out_of_memory_error(e) or (fixed or DEFAULT_BATCH_SIZE) <= 1:
                        raise
                    fixed = self._note_oom(spec.name, fixed or DEFAULT_BATCH_SIZE)
            batch = fixed or opened.batch or DEFAULT_BATCH_SIZE
            call, row_shape, dtype = opened.call, opened.row_shape, opened.dtype
            n_outputs, weight_bytes = opened.n_outputs, opened.weight_bytes
            if sweep:   # opt-in: bigger batches gained 0-13% here, and their activations
                # can take far more memory than the budget allows for.
                batch = best_batch_size(dataclasses.replace(spec, runtime=opened.runtime),
                                        call, row_shape, dtype, self.device, memory_in_use,
                                        self.budget // 4)
            predictor = opened.predictor if opened.predictor is not None \
                and opened.predictor.batch_size == batch \
                else self._compile(spec, call, row_shape, dtype, batch)
        except NbtoolError as e:
            info.state, info.reason = "failed", str(e)
            raise
        except Exception as e:  # anything Keras/TF raises while loading
            err = load_error(spec, self.worker, e)
            info.state, info.reason = "failed", err.reason
            raise err from None
        seconds = time.perf_counter() - t0
        footprint = max(0, memory_in_use() - before)
        now = time.time()
        loaded = LoadedModel(spec, predictor, call, weight_bytes, footprint, on_gpu(),
                             seconds, now, now, guard=self._guard(spec, opened, predictor))
        with self._lock:
            self._models[spec.name] = loaded
            self._states[spec.name] = dataclasses.replace(
                info, state="loaded", size_bytes=spec.size_bytes, weight_bytes=weight_bytes,
                footprint=footprint, load_seconds=seconds, loads=info.loads + 1,
                **input_signature_state(row_shape, dtype),
                # A SavedModel's graph says its outputs only when it runs: at warm-up.
                n_outputs=len(predictor.output_specs) if n_outputs is None else n_outputs,
                batch_size=predictor.batch_size,
                fingerprint=spec.fingerprint, output_specs=predictor.output_specs,
                precision=spec.precision, batch_note=getattr(predictor, "batch_note", None),
                runtime=opened.runtime, runtime_note=opened.note)
            self.peak_accounted = max(self.peak_accounted, self.resident_bytes())
        logger.info("worker %s loaded %s in %.2fs (%d bytes)", self.worker, spec.name,
                    seconds, footprint)
        record_cost(spec, self.device, load=seconds)
        return loaded

    @staticmethod
    def _guard(spec: ModelSpec, opened, predictor) -> Guard | None:
        """The guard of a conversion of a Keras model (None for TensorFlow itself, and for
        a ``.tflite`` or IR file, which have no TensorFlow to check against)."""
        if opened.runtime not in CONVERTERS or spec.format in ("tflite", "openvino") \
                or opened.envelope is None:
            return None
        return Guard(spec, opened.runtime, opened.envelope, forced=spec.runtime != "auto",
                     batch=predictor.batch_size)

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
        info = self._state(spec.name)
        info.state, info.reason, info.path = "failed", str(err), spec.path
        raise err

    # -- running, with smaller batches when memory runs out -------------------------------
    def _compile(self, spec: ModelSpec, call, row_shape, dtype, batch: int):
        """A warmed-up predictor; on an out-of-memory error, the batch is halved (to 1)."""
        while True:
            try:
                predictor = make_predictor(spec, call, batch, row_shape, dtype)
                predictor.warm_up()
                return predictor
            except Exception as e:
                if not out_of_memory_error(e) or batch <= 1:
                    raise
                batch = self._note_oom(spec.name, batch)

    def _note_oom(self, name: str, batch: int) -> int:
        smaller = max(1, batch // 2)
        info = self._state(name)
        info.oom_retries += 1
        info.batch_size = smaller
        logger.warning("worker %s: %s ran out of memory with batch %d; retrying with %d",
                       self.worker, name, batch, smaller)
        gc.collect()
        return smaller

    def run(self, loaded: LoadedModel, rows: np.ndarray) -> list[np.ndarray]:
        """Predict ``rows``; if memory runs out, retry with the batch halved, down to 1.

        The smaller batch is kept for this model on this worker, so later chunks start
        with what fits.
        """
        while True:
            predictor = loaded.predictor
            try:
                try:
                    outputs = predictor(rows)
                except Exception as e:
                    if loaded.guard is None or out_of_memory_error(e):
                        raise
                    return self._conversion_failed(loaded, rows, e)
                return outputs if loaded.guard is None else self._guarded(loaded, rows, outputs)
            except Exception as e:
                if not out_of_memory_error(e) or predictor.batch_size <= 1:
                    raise
                batch = self._note_oom(loaded.spec.name, predictor.batch_size)
                loaded.predictor = self._compile(loaded.spec, loaded.call, predictor.row_shape,
                                                 predictor.dtype, batch)

    def _guarded(self, loaded: LoadedModel, rows: np.ndarray, outputs: list) -> list:
        """``outputs`` if the guard trusts them (:mod:`~nbtool.worker.auto.guard`); else the
        rows computed again by TensorFlow, which runs the model from now on (``auto``),
        or a :class:`~nbtool.errors.ConversionDisagrees` (a forced runtime)."""
        guard = loaded.guard
        verdict = guard.check(rows, outputs)
        if verdict is None:
            if guard.widened and not guard.forced:
                guard.widened = False
                remember_envelope(loaded.spec, guard.runtime, guard.envelope.to_dict())
            return outputs
        agreement, n = verdict
        if guard.forced:
            raise ConversionDisagrees(loaded.spec.name, loaded.spec.path, self.worker,
                                      guard.runtime, agreement.why, n)
        return self._fall_back(loaded, rows, f"gave {agreement.why} from TensorFlow on {n} "
                                             "of the rows it ran")

    def _conversion_failed(self, loaded: LoadedModel, rows: np.ndarray, error: Exception):
        """A conversion raised on ``rows``: TensorFlow runs them instead. If TensorFlow
        fails too, its error is the one raised (it names the op and the value, where
        LiteRT says "Node number 3 (GATHER) failed"); if it does not, the model falls back
        to it (``auto``), or the conversion's error stands (a forced runtime)."""
        guard = loaded.guard
        guard.open_reference()(rows)   # raises TensorFlow's own error, if it has one
        if guard.forced:
            raise error
        return self._fall_back(loaded, rows, f"failed on rows TensorFlow runs "
                                             f"({describe_exception(error)[:160]})")

    def _fall_back(self, loaded: LoadedModel, rows: np.ndarray, what: str) -> list:
        """TensorFlow runs ``loaded`` from now on, on this worker and (remembered) every
        later load of its file on this machine; ``rows`` are computed by it; the user
        hears why with the chunk's result."""
        guard, spec = loaded.guard, loaded.spec
        note = f"tensorflow: fell back from {guard.runtime}, which {what}; remembered"
        conversion = loaded.call
        loaded.predictor, loaded.call = guard.open_reference(), guard.reference_call
        loaded.weight_bytes = guard.reference_bytes or loaded.weight_bytes
        loaded.guard = None
        remember_fallback(spec, loaded.predictor.batch_size, note)
        discard(conversion)   # its files: the record no longer names them
        with self._lock:
            info = self._state(spec.name)
            info.runtime, info.runtime_note = "tensorflow", note
            info.weight_bytes = loaded.weight_bytes
        loaded.notes.append(
            f"model {spec.name!r}: its {guard.runtime} conversion {what} (rows of yours "
            f"unlike those it was checked on) on worker {self.worker!r}; those rows were "
            "computed in TensorFlow, which runs this model from now on (remembered for this "
            "file on this machine)")
        logger.warning("worker %s: %s", self.worker, loaded.notes[-1])
        return loaded.predictor(rows)

    # -- unloading -----------------------------------------------------------------------
    def unload(self, names: list[str] | None = None) -> UnloadResult:
        """Drop models (all if ``names`` is None), clear Keras' global state, and say what
        this gave back: an :class:`~nbtool.wire.UnloadResult` of the names dropped, with
        the bytes this process held before minus after (the driver's count on a GPU, RSS
        on CPU) and a verdict (:func:`soft_unload_verdict`), kept for the status too.

        The memory becomes reusable inside this process; TensorFlow (and JAX) do not give
        GPU memory back while the process lives (that is what a hard unload is for);
        PyTorch's caching allocator does, after ``empty_cache()``.

        Example:
            >>> ModelCache(2**30, "cpu:0", "cpu0").unload(["cnn"])
            []
        """
        with self._lock:
            targets = [n for n in (list(self._models) if names is None else names)
                       if n in self._models]
            if not targets:
                return UnloadResult([])
            dropped = sum(self._models[n].accounted for n in targets)
            gpu = any(self._models[n].on_gpu for n in targets)
            before = held_memory()
            for name in targets:
                self._drop(name, state="unloaded")
        release_memory()
        freed = max(0, before - held_memory())
        verdict = soft_unload_verdict(freed, dropped, gpu, backend_name())
        self.last_soft_unload = {"models": targets, "freed": freed, "returns_memory": verdict}
        logger.info("worker %s unloaded %s: %d bytes freed (%s)", self.worker, targets, freed,
                    verdict)
        return UnloadResult(targets, {self.worker: freed}, {self.worker: verdict})

    def _drop(self, name: str, state: str) -> None:
        self._models.pop(name, None)
        if name in self._states:
            self._states[name].state = state

    def _state(self, name: str) -> ModelState:
        """The model's entry, created on first sight."""
        return self._states.setdefault(name, ModelState())

    # -- reporting ---------------------------------------------------------------------
    def state_of(self, name: str) -> ModelState:
        """A copy of the model's entry, with its live fields filled while it is resident.

        Example:
            >>> ModelCache(2**30, "cpu:0", "cpu0").state_of("cnn").describe()
            'not loaded'
        """
        with self._lock:
            state = dataclasses.replace(self._states.get(name) or ModelState())
            m = self._models.get(name)
            if m is not None:
                state.accounted, state.last_used = m.accounted, m.last_used
                state.uses, state.traces = m.uses, m.predictor.traces
            return state

    def resident(self) -> dict[str, str]:
        """The models resident now (least recently used first), with what their bytes are
        (:attr:`~nbtool.wire.ModelSpec.identity`).

        Example:
            >>> ModelCache(2**30, "cpu:0", "cpu0").resident()
            {}
        """
        with self._lock:
            return {name: m.spec.identity for name, m in self._models.items()}

    def status(self) -> WorkerStatus:
        """A snapshot for the client: models and their states, memory, budget.

        Example:
            >>> ModelCache(2**30, "cpu:0", "cpu0").status().free_budget
            1073741824
        """
        with self._lock:
            return WorkerStatus(
                worker=self.worker, device=self.device, budget=self.budget,
                models={name: self.state_of(name) for name in self._states},
                lru_order=list(self._models), resident_bytes=self.resident_bytes(),
                evictions=self.evictions, peak_accounted=self.peak_accounted,
                backend=backend_name(), last_soft_unload=self.last_soft_unload)


def soft_unload_verdict(freed: int, dropped: int, gpu: bool, backend: str) -> str:
    """Whether a soft unload gave the memory back, from what it measured: ``freed`` bytes
    against the ``dropped`` models' accounted bytes. Too small to measure, a GPU worker
    says what its backend does (:data:`~nbtool.wire.SOFT_UNLOAD_ON_GPU`).

    Example:
        >>> soft_unload_verdict(11 * 2**20, 12 * 2**20, False, "torch")
        'yes (11.5 MB of 12.6 MB)'
        >>> soft_unload_verdict(0, 12 * 2**20, True, "tensorflow")
        'no (0 B of 12.6 MB)'
        >>> soft_unload_verdict(0, 1000, True, "torch")
        'too small to tell (1.0 kB); expected: returns memory'
    """
    if dropped < MEASURABLE_BYTES:
        expected = SOFT_UNLOAD_ON_GPU.get(backend) if gpu else None
        return f"too small to tell ({human_bytes(dropped)})" + \
            (f"; expected: {expected}" if expected else "")
    share = freed / dropped
    word = "yes" if share >= 0.5 else "no" if share < 0.1 else "partly"
    return f"{word} ({human_bytes(freed)} of {human_bytes(dropped)})"


def input_signature_state(row_shape, dtype) -> dict:
    """What a load reports of the input it took: its batch shape and dtype (text as
    ``"string"``), and every input (:class:`~nbtool.wire.InputSpec`) for several.

    Example:
        >>> input_signature_state((8,), np.float32)
        {'input_shape': (None, 8), 'input_dtype': 'float32'}
        >>> input_signature_state({"a": (2,), "t": (1,)}, {"a": "float32", "t": "string"})["inputs"]
        [InputSpec(name='a', shape=(None, 2), dtype='float32'), InputSpec(name='t', shape=(None, 1), dtype='string')]
    """
    def name(d):
        return "string" if is_text_dtype(d) else str(np.dtype(getattr(d, "name", d)))
    if not isinstance(row_shape, dict):
        return {"input_shape": (None, *row_shape), "input_dtype": name(dtype)}
    inputs = [InputSpec(k, (None, *v), name(dtype[k])) for k, v in row_shape.items()]
    return {"input_shape": inputs[0].shape, "input_dtype": inputs[0].dtype, "inputs": inputs}
