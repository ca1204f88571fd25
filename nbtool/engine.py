"""The engine: a model registry, a Dask cluster, and the runs between them.

It lives in the notebook kernel and never imports TensorFlow; models load inside the
workers. ``nbtool.start()`` builds one; the module-level shortcuts (``nbtool.predict`` ...)
act on the last one started, like Dask's default client.

Example:
    >>> import nbtool
    >>> eng = nbtool.start()                                   # doctest: +SKIP
    >>> eng.register("cnn", "models/cnn.keras")                # doctest: +SKIP
    >>> res = eng.predict(["cnn"], x_test)                     # doctest: +SKIP
    >>> eng.close()                                            # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import operator
import os
import shutil
import tempfile
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable

from dask.utils import parse_bytes
from distributed import Client

from .devices import WorkerInfo, discover_gpus, place, plan_workers, select_gpus
from .errors import EngineClosed, InvalidOption, ModelLoadError, NbtoolError
from .planning import plan_cold_routes
from .registry import (ModelSpec, Registry, check_batch_size, check_name, check_replicas,
                       file_fingerprint, find_models, inspect_model)
from .results import Prediction, check_combine, output_agreement
from .quiet import planned_restart
from .runner import PredictionRun, check_fits, resolve_chunk_size
from .sources import as_source
from .tables import Table, human_bytes
from .worker import (NbtoolWorkerPlugin, load_model, model_costs, resident_models,
                     resource_name, unload_models, worker_status)

logger = logging.getLogger("nbtool")

#: Seconds to wait for workers to start (each imports TensorFlow: a few seconds per core).
WORKER_START_TIMEOUT = 120

_default_engine: "Engine | None" = None


def _open(method):
    """Refuse ``method`` on a closed engine with :class:`~nbtool.errors.EngineClosed`.

    Checked before the method touches the cluster: a closed client otherwise fails deep
    inside Dask (``RuntimeError: IOLoop is closed``) or, for ``register``, not at all.

    Example:
        >>> eng.close(); eng.predict("cnn", x)   # doctest: +SKIP
        Traceback (most recent call last):
        nbtool.errors.EngineClosed: eng.predict(...): this engine is closed; start a new one ...
    """
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def guarded_async(self, *args, **kwargs):
            if getattr(self, "_closed", False):
                raise EngineClosed(method.__name__)
            return await method(self, *args, **kwargs)

        return guarded_async

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if getattr(self, "_closed", False):
            raise EngineClosed(method.__name__)
        return method(self, *args, **kwargs)

    return guarded


class Engine:
    """Registered models, the cluster that runs them, and the runs so far.

    Build one with :func:`nbtool.start`; ``eng.client`` is the underlying
    :class:`distributed.Client` for people who know Dask.

    Example:
        >>> eng = nbtool.start(n_workers=2)              # doctest: +SKIP
        >>> eng.register("mlp", "models/mlp.h5", device="cpu", replicas=2)  # doctest: +SKIP
        >>> eng.predict("mlp", x).combined.shape         # doctest: +SKIP
        (1000, 10)
    """

    def __init__(self, client: Client, cluster=None, work_dir: str | None = None):
        self.client = client
        self.cluster = cluster
        self.registry = Registry()
        self.placement: dict[str, list[str]] = {}    # model -> worker names
        self.history: list[dict[str, Any]] = []      # one summary per prediction
        self._runs: list[PredictionRun] = []         # submitted runs, until they end
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="nbtool-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.workers: dict[str, WorkerInfo] = {}
        self._restarted_at = float("-inf")           # the last hard unload's restart
        self._dask_names: dict[str, Any] = {}
        self._shared_dirs: set[Path] = set()   # where inputs were handed to local workers
        # Ended without close() (a kernel shut down without `%nbtool stop`): the folders
        # still go when the interpreter exits; /dev/shm is memory, held until reboot.
        self._remove_folders = weakref.finalize(
            self, _remove_folders, self._shared_dirs,
            self.work_dir if self._own_work_dir else None)
        self._background_loads: dict[tuple[str, str], Any] = {}   # replicas loading
        self._comparisons: dict[str, Any] = {}   # model -> its last optimize() Comparison
        self.refresh_workers()

    # -- workers ---------------------------------------------------------------------------
    def refresh_workers(self) -> dict[str, WorkerInfo]:
        """Ask every worker for its device and budget; returns them by worker name."""
        statuses = self._statuses()
        deadline = time.monotonic() + 10
        while not statuses and time.monotonic() < deadline:
            # Seen once in CI right after start(): the workers had registered but none was
            # listed yet; give them a moment before calling the cluster empty.
            time.sleep(0.2)
            statuses = self._statuses()
        self.workers = {name: WorkerInfo(name, s["device"], s["budget"])
                        for name, s in sorted(statuses.items())}
        if not self.workers:
            raise NbtoolError("the cluster has no workers. Fix: start workers for the "
                              "scheduler (dask worker ADDRESS) or use nbtool.start() for a "
                              "local cluster.")
        return self.workers

    def _addresses(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """Current address of each worker name (addresses change when workers restart)."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        by_name = {str(w["name"]): addr for addr, w in info.items()}
        # Dask matches restrictions against names as the workers gave them (an external
        # cluster may name workers 0, 1, ...); nbtool keeps them as strings.
        self._dask_names.update({str(w["name"]): w["name"] for w in info.values()})
        if names is None:
            return by_name
        return {n: by_name[n] for n in names if n in by_name}

    def _restriction(self, names: Iterable[str]) -> list:
        """Worker names as Dask knows them, for ``workers=`` restrictions."""
        return [self._dask_names.get(n, n) for n in names]

    def _statuses(self, names: Iterable[str] | None = None) -> dict[str, dict]:
        """``worker_status()`` of the given workers (all by default), by worker name.

        Within 30 s of a hard unload, a known worker that the scheduler does not list at
        this instant (seen once in CI: re-registering after the restart) is waited for a
        few seconds rather than left out of the answer. Otherwise a missing worker is
        missing (the dashboard asks every second and must not block).
        """
        addrs = self._addresses(names)
        wanted = set(names) if names is not None else set(self.workers)
        settling = time.monotonic() - self._restarted_at < 30
        deadline = time.monotonic() + (5 if settling else 0)
        while wanted - set(addrs) and time.monotonic() < deadline:
            time.sleep(0.1)
            addrs = self._addresses(names)
        if not addrs:
            return {}
        raw = self.client.run(worker_status, workers=list(addrs.values()))
        back = {a: n for n, a in addrs.items()}
        return {back[a]: s for a, s in raw.items() if a in back}

    @_open
    def set_memory_budget(self, memory_budget: str | int) -> None:
        """Change every worker's model budget now (and for workers that restart later).

        Workers over the new budget evict their least recently used models at once.

        Example:
            >>> eng.set_memory_budget("2GB")   # doctest: +SKIP
        """
        budget = _check_size(memory_budget, "memory_budget", allow_none=False)
        # Re-registering the plugin runs its setup on every worker now and on restarts.
        self.client.register_plugin(NbtoolWorkerPlugin(budget))
        self.refresh_workers()

    # -- registering ---------------------------------------------------------------------
    @_open
    def register(self, name: str, model: Any, device: str = "auto", replicas: int = 1,
                 batch_size: int | str | None = None, preprocess: Callable | None = None,
                 trusted: bool = False, precision: str | None = None) -> ModelSpec:
        """Register a model file (or a Keras model object) under ``name`` and place it.

        ``model`` is a path to a ``.keras`` file, an ``.h5`` file (Keras 3, or an old
        Keras 2 / tf.keras one), a ``.tflite`` file (run by LiteRT's interpreter) or a
        SavedModel directory (``model.export(dir)``, ``tf.saved_model.save``), or a Keras
        model you just built: that one is saved once as ``.keras`` in the engine's work
        folder. The file's input shape, dtype and outputs are read here without
        TensorFlow; a SavedModel's only when it first loads. ``device`` is ``"auto"``,
        ``"cpu"``, ``"gpu"`` or e.g. ``"gpu:1"``; ``replicas`` places it on that many
        workers so its chunks run in parallel. Nothing loads now: the model loads on a
        worker the first time it is used (or on :meth:`load`), so a file that reads here
        but cannot load (damaged weights, a custom layer class the workers cannot
        import, a ``.tflite`` needing TensorFlow "Select" ops) fails then, with
        :class:`~nbtool.errors.ModelLoadError`. ``name`` holds letters, digits and
        ``_ - . @ +`` (it names files and result arrays).

        ``trusted=True`` is for files that run code when loaded: Keras' safe mode then
        lets a Lambda layer's stored Python be deserialized. Without it a ``.keras`` or
        ``.h5`` holding a Python lambda is refused here, and so is every SavedModel
        directory (its graph can run any TensorFlow op, file reads and writes included),
        with :class:`~nbtool.errors.UntrustedModel`. A custom layer class is not made
        loadable by ``trusted=True``: it must be importable on the workers (registered
        with ``@keras.saving.register_keras_serializable``).

        ``preprocess`` runs inside the compiled graph on the worker: a preset name
        (``"rescale"``, ``"mobilenet"``, ``"imagenet"``, ``"cast"``), a
        :class:`nbtool.preprocess.Preprocess`, or a function of TF ops; with a preset,
        inputs travel as uint8. ``batch_size`` (every format) is the rows per call:
        ``"auto"`` picks one by a quick sweep at the first load (remembered per machine);
        ``None`` means 64; any other value must be a whole number >= 1. A file re-saved in
        place is picked up at the next run or load (see :meth:`submit`).
        ``precision="bfloat16"`` (or ``"float16"``) runs a ``.keras``/``.h5`` model in
        mixed precision, opt-in: check it with :meth:`agreement` against the float32 model
        first. Registering a name again replaces it (a no-op if nothing changed).

        Example:
            >>> eng.register("cnn", "models/cnn.keras", device="gpu:0")   # doctest: +SKIP
            >>> eng.register("old", "models/old_keras2.h5")               # doctest: +SKIP
            >>> eng.register("det", "models/detector.tflite")             # doctest: +SKIP
            >>> eng.register("exported", "models/exported/", trusted=True)  # doctest: +SKIP
            >>> eng.register("fresh", trained_model)                      # doctest: +SKIP
        """
        # Everything is checked before a model object is saved under the name.
        check_name(name, model if isinstance(model, (str, os.PathLike)) else None)
        replicas = check_replicas(name, replicas)
        batch_size = check_batch_size(name, batch_size)
        path = self._model_path(name, model)
        if isinstance(preprocess, str):
            from .preprocess import preset

            preprocess = preset(preprocess)
        if precision not in (None, "float32"):
            from .worker import PRECISIONS

            if precision not in PRECISIONS:
                raise ValueError(f"model {name!r}: precision={precision!r}; expected None, "
                                 f"'float32' or one of {sorted(PRECISIONS)} (mixed: weights "
                                 "stay float32, the math runs in the lower precision).")
        spec = inspect_model(name, path, device=device, replicas=replicas,
                             batch_size=batch_size, preprocess=preprocess,
                             trusted=bool(trusted),
                             precision=None if precision == "float32" else precision)
        if spec.precision and spec.format in ("tflite", "savedmodel"):
            # Mixed precision rebuilds a Keras model; silently running float32 instead
            # would report a precision that was never used.
            raise InvalidOption(name, "precision", precision,
                                "None for a .tflite or SavedModel (mixed precision rebuilds "
                                "a Keras model; these are not Keras models)",
                                "precision=None, or register the .keras/.h5 original")
        return self._add(spec)

    def _model_path(self, name: str, model: Any) -> str:
        if isinstance(model, (str, os.PathLike)):
            return str(model)
        if hasattr(model, "save") and hasattr(model, "inputs"):   # a Keras model object
            path = self.work_dir / f"{name}.keras"   # name is checked: stays in work_dir
            # Saved aside, then moved: a worker loading the previous one never reads half.
            aside = Path(tempfile.mkdtemp(dir=self.work_dir, prefix=".saving-"))
            try:
                model.save(aside / path.name)
                os.replace(aside / path.name, path)
            finally:
                shutil.rmtree(aside, ignore_errors=True)
            return str(path)
        raise TypeError(f"model {name!r}: expected a path to a .keras, .h5 or .tflite file "
                        f"or a SavedModel directory, or a Keras model; got "
                        f"{type(model).__name__}.")

    def _add(self, spec: ModelSpec) -> ModelSpec:
        old = self.registry.get(spec.name) if spec.name in self.registry else None
        if old == spec:
            return old
        assigned = self._assigned_bytes(exclude=spec.name)
        # Place first: if that fails, the old registration stays as it was.
        workers = place(spec.name, spec.size_bytes, spec.device, spec.replicas,
                        self.workers.values(), assigned)
        if old is not None:   # replaced: the old copies must not keep serving
            self._drop_old_copies(spec.name)
        self.placement[spec.name] = workers
        self.registry.add(spec)
        return spec

    def _drop_old_copies(self, name: str) -> None:
        """Soft-unload ``name`` on every worker (not only where it is placed now: an older
        placement may still hold it), and cancel its queued background loads."""
        for key in [k for k in self._background_loads if k[0] == name]:
            self._background_loads.pop(key).cancel()
        addrs = self._addresses()
        if addrs:
            self.client.run(unload_models, [name], workers=list(addrs.values()))

    def _refresh_changed(self, names: Iterable[str]) -> None:
        """Re-register every model among ``names`` whose file changed since it was
        registered (same options, signature read again), with a warning; the old copies
        are unloaded from every worker before anything else is scheduled.

        A stat per model: cheap enough for every run and load. A file gone or broken
        now raises here, clearly, instead of serving the copy still in memory.
        """
        for name in dict.fromkeys(names):
            spec = self.registry.get(name)
            if file_fingerprint(spec.path) == spec.fingerprint:
                continue
            options = {f: getattr(spec, f) for f in ("device", "replicas", "batch_size",
                                                     "preprocess", "trusted", "precision")}
            try:
                changed = inspect_model(name, spec.path, **options)
            except NbtoolError:   # gone, broken or now refused: no old copy stays behind
                self._drop_old_copies(name)
                raise
            self._add(changed)
            warnings.warn(f"model {name!r} ({spec.path}) changed since it was registered; "
                          "using the new file (re-registered with the same options; the old "
                          "copies were unloaded from the workers).", stacklevel=3)

    def _assigned_bytes(self, exclude: str | None = None) -> dict[str, int]:
        assigned: dict[str, int] = {}
        for name, workers in self.placement.items():
            if name == exclude:
                continue
            for w in workers:
                assigned[w] = assigned.get(w, 0) + self.registry.get(name).size_bytes
        return assigned

    @_open
    def agreement(self, a: str, b: str, x: Any, chunk_size: int | None = None) -> dict:
        """How far two models' outputs are apart on ``x``: top-1 agreement, max abs diff.

        For checking a variant (another precision, a quantized copy) against its original.

        Example:
            >>> eng.register("cnn_bf16", "cnn.keras", precision="bfloat16")   # doctest: +SKIP
            >>> eng.agreement("cnn", "cnn_bf16", x_test)                      # doctest: +SKIP
            {'top1_agreement': 0.998, 'max_abs_diff': 0.0061, 'rows': 2000}
        """
        res = self.predict([a, b], x, chunk_size=chunk_size, combine=None)
        res.raise_for_errors()
        try:
            out = output_agreement(res[a], res[b])
        except ValueError as e:
            raise ValueError(f"models {a!r} and {b!r} give {e}") from None
        return {**out, "rows": res.n_rows}

    @_open
    def register_dir(self, folder: str | os.PathLike, device: str = "auto", replicas: int = 1,
                     batch_size: int | None = None, trusted: bool = False) -> list[ModelSpec]:
        """Register every ``.keras``/``.h5``/``.tflite`` file and SavedModel directory in
        ``folder``.

        Each is named after its file (without suffix). They are placed largest first, so
        ``device="auto"`` spreads them evenly over the workers' budgets. A file that cannot
        be read is skipped with a warning that says why; the others are registered. So is
        a file whose name is not a valid model name (``my model.keras``): the warning
        suggests a clean name to register it under (nbtool never picks one for you). So
        are SavedModels and files holding a Python lambda, unless ``trusted=True``.

        Example:
            >>> [s.name for s in eng.register_dir("models/")]   # doctest: +SKIP
            ['cnn', 'mlp', 'exported']
        """
        replicas = check_replicas(None, replicas)
        batch_size = check_batch_size(None, batch_size)
        found = find_models(folder)
        if not found:
            raise NbtoolError(f"folder {folder}: no models found; expected .keras, .h5 "
                              "or .tflite files or SavedModel directories inside. Fix: save "
                              "models there with model.save('folder/name.keras').")
        specs, problems = [], []
        for n, p in found.items():
            try:
                specs.append(inspect_model(n, p, device=device, replicas=replicas,
                                           batch_size=batch_size, trusted=bool(trusted)))
            except NbtoolError as e:   # one bad file must not cost the user the others
                problems.append(e)
        if problems and not specs:
            raise problems[0]
        for e in problems:
            warnings.warn(f"skipped: {e}", stacklevel=2)
        specs.sort(key=lambda s: -s.size_bytes)
        return [self._add(s) for s in specs]

    # -- looking -----------------------------------------------------------------------
    @_open
    def models(self) -> Table:
        """A table of the registered models: format, size, placement, state per worker.

        Example:
            >>> eng.models()     # doctest: +SKIP
            name  format  size    device  state
            cnn   keras   1.2 MB  cpu:0   cpu0: loaded
        """
        statuses = self._statuses()
        rows = []
        for spec in self.registry:
            states, footprints, loads = [], [], []
            for w in self.placement.get(spec.name, []):
                info = statuses.get(w, {}).get("models", {}).get(spec.name)
                state = _state_text(info)
                states.append(f"{w}: {state}")
                if info and info.get("state") == "loaded":
                    footprints.append(info.get("accounted") or info.get("footprint"))
                    loads.append(info.get("load_seconds"))
            rows.append({
                "name": spec.name, "format": spec.format,
                "size": human_bytes(spec.size_bytes),
                "device": ", ".join(self.workers[w].device for w in
                                    self.placement.get(spec.name, []) if w in self.workers),
                "state": "; ".join(states),
                "footprint": human_bytes(max(footprints)) if footprints else "-",
                "load s": f"{max(loads):.2f}" if loads else "-",
                "path": spec.path,
            })
        return Table(rows, title="models")

    @_open
    def devices(self) -> Table:
        """A table of the workers: device, memory in use, model budget, resident models.

        Example:
            >>> eng.devices()    # doctest: +SKIP
            worker  device  memory    budget  resident  models
            cpu0    cpu:0   812.0 MB  5.6 GB  1.2 MB    cnn
        """
        rows = []
        for name, s in sorted(self._statuses().items()):
            rows.append({
                "worker": name, "device": s["device"],
                "memory": human_bytes(s["memory_in_use"]),
                "idle memory": human_bytes(s["idle_memory"]),
                "budget": human_bytes(s["budget"]),
                "resident": human_bytes(s["resident_bytes"]),
                "models": ", ".join(s["lru_order"]) or "-",
                "pid": s["pid"],
            })
        return Table(rows, title="devices")

    # -- loading and unloading -----------------------------------------------------------
    @_open
    def load(self, *models: str | list[str]) -> dict[str, dict[str, dict]]:
        """Load models now on every worker they are placed on (else they load on first use).

        Returns, per model and worker, the cache entry (state, footprint, load seconds).
        Raises :class:`~nbtool.errors.ModelLoadError` if any load fails; the others stay
        loaded.

        Example:
            >>> eng.load("cnn", "mlp")["cnn"]["cpu0"]["state"]   # doctest: +SKIP
            'loaded'
        """
        names = _names(models)
        futures = self.start_load(*names)
        out: dict[str, dict[str, dict]] = {n: {} for n in names}
        failures = []
        for (name, w), fut in futures.items():
            try:
                out[name][w] = entry = fut.result()
            except ModelLoadError as e:
                failures.append(e)
                continue
            self._learn_signature(name, entry)
        if failures:
            raise failures[0]
        return out

    @_open
    def start_load(self, *models: str | list[str]) -> dict[tuple[str, str], Any]:
        """Start loading models on their workers and return at once.

        Returns the futures by (model, worker); :meth:`load` is this plus waiting. A model
        whose file changed since it was registered is re-registered first (with a warning),
        so the new file is what loads.

        Example:
            >>> futures = eng.start_load("cnn")      # doctest: +SKIP
            >>> futures[("cnn", "cpu0")].result()["state"]   # doctest: +SKIP
            'loaded'
        """
        self._refresh_changed(_names(models))
        specs = [self.registry.get(n) for n in _names(models)]
        futures = {}
        for spec in specs:
            for w in self.placement[spec.name]:
                futures[(spec.name, w)] = self.client.submit(
                    load_model, spec, resources={resource_name(w): 1}, pure=False,
                    key=f"nbtool-load-{spec.name}-{w}-{time.monotonic_ns()}")
        return futures

    def _learn_signature(self, name: str, entry: dict) -> None:
        """SavedModels tell their input only once loaded: remember it for input checks."""
        spec = self.registry.get(name)
        if spec.input_shape is None and entry.get("input_shape"):
            self.registry.add(spec.with_input(tuple(entry["input_shape"]),
                                              entry.get("input_dtype"),
                                              entry.get("n_outputs")))

    @_open
    def unload(self, models: str | list[str] | None = None, hard: bool = False) -> list[str]:
        """Unload models (all if ``None``) from the workers.

        Soft (default): the workers drop them and clear Keras' state; the memory becomes
        reusable inside those workers. ``hard=True``: the worker processes that held them
        restart (TensorFlow never returns memory otherwise) and the models they held that
        were not asked to go are loaded again; this includes workers that soft-unloaded or
        evicted the models earlier, since they still hold the memory. Returns the workers
        restarted (hard) or the models dropped (soft).

        Example:
            >>> eng.unload("cnn")                  # doctest: +SKIP
            >>> eng.unload(hard=True)              # doctest: +SKIP
            ['cpu0', 'cpu1']
        """
        names = self.registry.names() if models is None else _names([models])
        for n in names:
            self.registry.get(n)   # unknown names fail before anything happens
        for key in [k for k in self._background_loads if k[0] in names]:
            self._background_loads.pop(key).cancel()   # a queued replica must not come back
        if not hard:
            return self._soft_unload(names)
        statuses = self._statuses()
        # Every process that ever loaded one of them still holds its memory, even after a
        # soft unload or an eviction: TensorFlow keeps what it allocated.
        holders = {w: s for w, s in statuses.items() if any(n in s["models"] for n in names)}
        if not holders:
            return []
        keep = {w: [m for m in s["lru_order"] if m not in names and m in self.registry]
                for w, s in holders.items()}
        # What comes back is what the files hold now, never a copy of a file since re-saved;
        # a model whose file is gone or now refused stays unloaded (it says why on next use).
        for m in sorted({m for ms in keep.values() for m in ms}):
            try:
                self._refresh_changed([m])
            except NbtoolError as e:
                keep = {w: [k for k in ms if k != m] for w, ms in keep.items()}
                warnings.warn(f"hard unload: model {m!r} is not loaded again: {e}",
                              stacklevel=2)
        # A finished load still held here is a task the scheduler would run again on the
        # restarted workers (a finished task is recomputed while someone wants it): let go.
        for key in [k for k, f in self._background_loads.items() if f.done()]:
            self._background_loads.pop(key).release()
        with planned_restart():   # its outcome is what this returns, not Dask's warnings
            self.client.restart_workers(self._restriction(sorted(holders)))
            self._wait_for_workers(sorted(holders))
        self._restarted_at = time.monotonic()
        futures = [self.client.submit(load_model, self.registry.get(m),
                                      resources={resource_name(w): 1}, pure=False,
                                      key=f"nbtool-rewarm-{m}-{w}-{time.monotonic_ns()}")
                   for w, ms in keep.items() for m in ms]
        # Gathered without raising: a raised error's traceback would keep these futures in
        # a reference cycle, and the next restart would run the loads again.
        self.client.gather(futures, errors="skip")
        for fut in futures:
            if fut.status == "error":   # the unload asked for has happened: say, not raise
                warnings.warn(f"hard unload: a model the restarted workers held could not "
                              f"be loaded again (it loads on its next use or says why): "
                              f"{fut.exception()}", stacklevel=2)
        return sorted(holders)

    def _soft_unload(self, names: list[str]) -> list[str]:
        workers = sorted({w for n in names for w in self.placement.get(n, [])})
        addrs = self._addresses(workers)
        if not addrs:
            return []
        dropped = self.client.run(unload_models, names, workers=list(addrs.values()))
        return sorted({m for ms in dropped.values() for m in ms})

    def _wait_for_workers(self, names: list[str], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self._addresses(names)) == len(names):
                return
            time.sleep(0.1)
        raise NbtoolError(f"workers {names} did not come back within {timeout:.0f}s after a "
                          "restart. Fix: look at the Dask dashboard or the worker logs "
                          "(eng.client.get_worker_logs()).")

    # -- predicting --------------------------------------------------------------------------
    @_open
    def predict(self, models: str | list[str], x: Any, chunk_size: int | None = None,
                combine: str | None = "mean", save: str | None = None, *,
                partial_combine: bool = False) -> Prediction:
        """Run models on ``x`` in chunks on the workers; returns a :class:`Prediction`.

        ``x`` is one of:

        - an ndarray or a list of rows (on a local cluster handed to the workers as one
          shared-memory file; else scattered once);
        - a path to a ``.npy`` file (workers memory-map their own slices);
        - a zarr array: a path (``"x.zarr"``, or a folder holding zarr metadata) or a
          zarr array object (workers read their own slices);
        - a folder of images, as a path or ``nbtool.images("photos/", size=(224, 224))``
          (workers decode and resize their own files);
        - a Dask array (its row blocks become the chunks).

        The input is checked against every model before anything is scheduled (a
        SavedModel is loaded first to learn its input). ``res[name]`` is the model's
        output, a list of arrays for a model with several outputs (a ``.tflite`` gives
        them in LiteRT's order). ``combine`` is ``"mean"``, ``"vote"`` or ``None``. A
        chunk that fails does not discard the others: see ``res.errors`` and
        ``res.raise_for_errors()``. Then ``res.combined`` is None (``res.combined_note``
        says which model failed where), unless ``partial_combine=True``: the rows a model
        failed on are then combined from the other models (NaN where every model failed).

        ``save="preds.zarr"`` writes a resumable result store: each chunk's outputs are
        written by its worker as it completes, ``res[name]`` is then a zarr array on disk,
        and running the same prediction again computes only the chunks not stored yet
        (one run at a time: another run on the same path is refused);
        ``nbtool.open_prediction("preds.zarr")`` reads it back later. ``save="preds.npz"``
        writes the outputs once, at the end.

        Example:
            >>> res = eng.predict(["cnn", "mlp"], x, chunk_size=500, combine="vote")  # doctest: +SKIP
            >>> res["cnn"].shape, res.combined.shape                                  # doctest: +SKIP
            ((2000, 10), (2000,))
        """
        return self.submit(models, x, chunk_size, combine, save,
                           partial_combine=partial_combine).collect()

    @_open
    async def predict_async(self, models: str | list[str], x: Any,
                            chunk_size: int | None = None, combine: str | None = "mean",
                            save: str | None = None, *,
                            partial_combine: bool = False) -> Prediction:
        """The awaitable twin of :meth:`predict`: the event loop stays free while it runs.
        Cancelling the awaiting task cancels the run.

        Example:
            >>> res = await eng.predict_async(["cnn"], x)   # doctest: +SKIP
        """
        run = self.submit(models, x, chunk_size, combine, save,
                          partial_combine=partial_combine)
        try:
            return await asyncio.to_thread(run.collect)
        except asyncio.CancelledError:
            run.cancel()
            raise

    @_open
    def submit(self, models: str | list[str], x: Any, chunk_size: int | None = None,
               combine: str | None = "mean", save: str | None = None, *,
               partial_combine: bool = False) -> PredictionRun:
        """Check the input, schedule the prediction and return at once with the run.

        ``run.progress()`` says how far each model is; ``run.collect()`` waits and returns
        the :class:`Prediction` (and lets go of the run's tasks, store lock and input
        file); ``run.cancel()`` stops it. :meth:`predict` is ``submit(...).collect()``.

        Example:
            >>> run = eng.submit(["cnn"], x)          # doctest: +SKIP
            >>> run.progress()                        # doctest: +SKIP
            {'cnn': (3, 8)}
            >>> res = run.collect()                   # doctest: +SKIP
        """
        check_combine(combine)
        names = list(dict.fromkeys(_names([models])))
        if not names:
            raise ValueError("predict needs at least one model name.")
        # A file re-saved in place: re-registered and its old copies unloaded, before
        # anything below reads its spec (the signature may have changed too).
        self._refresh_changed(names)
        specs = [self.registry.get(n) for n in names]
        # Everything that can refuse the run comes first; the input goes to shared memory
        # last (see _local_handoff), so a refused input costs no RAM.
        source = as_source(x)
        unknown = [s.name for s in specs if s.input_shape is None and s.preprocess is None]
        if unknown:   # SavedModels: learn their input signature before checking
            self.load(*unknown)
            specs = [self.registry.get(n) for n in names]
        for spec in specs:
            check_fits(spec, source)
        used = {w for n in names for w in self.placement[n]}
        size = resolve_chunk_size(chunk_size, source, len(used), self._max_chunk_bytes(used))
        import uuid

        run_id = uuid.uuid4().hex[:8]   # names its tasks, and its writes to a result store
        store, done = self._open_store(save, specs, source, size, run_id)
        try:
            devices = {w.name: w.device for w in self.workers.values()}
            routes, later = self._routes(specs, source.n_rows)
            source = self._local_handoff(source)

            def finish(res):
                # A finished run holds its Prediction: let go of it here, or its arrays
                # stay alive after the user drops the result (until the next submit).
                self._runs = [r for r in self._runs if not r.done]
                self._finish_run(res, save)
                # Only now: queued beside the run, these loads went ahead of its chunks
                # (measured).
                self._load_in_background(later)

            run = PredictionRun(self.client, [(s, routes[s.name]) for s in specs],
                                source, size, combine,
                                devices=devices, on_done=finish, store=store, done=done,
                                dask_names=self._dask_names, run_id=run_id,
                                partial_combine=partial_combine)
        except BaseException:
            if store is not None:
                store.release()
            getattr(source, "cleanup", lambda: None)()
            raise
        try:
            run.submit()
        except BaseException:
            run.cancel()   # the store lock, the input file, any task already sent
            raise
        self._runs = [r for r in self._runs if not r.done] + [run]
        return run

    def running(self) -> list[PredictionRun]:
        """The predictions submitted and not yet finished or cancelled, oldest first.

        Each has ``progress()`` (chunks done per model) and ``run_id``; the dashboard
        shows them live.

        Example:
            >>> run = eng.submit(["cnn"], x)                     # doctest: +SKIP
            >>> [r.run_id for r in eng.running()]                # doctest: +SKIP
            ['3f2a9c1e']
        """
        self._runs = [r for r in self._runs if not r.done]
        return list(self._runs)

    def _routes(self, specs: list[ModelSpec], n_rows: int) -> tuple[dict, dict]:
        """Where each model's chunks go in this run, and the replicas to load afterwards.

        Every replica, unless some replicated models are loaded nowhere yet and this
        machine has measured them before: then :func:`nbtool.planning.plan_cold_routes`
        decides which replicas load and run each of them now (``NBTOOL_PLAN_COLD=0`` turns
        this off).
        """
        routes = {s.name: list(self.placement[s.name]) for s in specs}
        replicated = [s for s in specs if len(routes[s.name]) > 1]
        if not replicated or self.cluster is None \
                or os.environ.get("NBTOOL_PLAN_COLD", "1") == "0":   # local clusters only:
            return routes, {}                           # the costs are this machine's
        used = sorted({w for s in specs for w in routes[s.name]})
        by_name = self._addresses(used)
        addresses = list(by_name.values())
        resident = self.client.run(resident_models, workers=addresses)
        held = {w: resident.get(a, {}) for w, a in by_name.items()}   # worker -> its models
        cold = [s for s in replicated
                if not any(m.get(s.name) == s.fingerprint for m in held.values())]
        if not cold:
            return routes, {}
        measured: dict[str, list[dict]] = {}
        for per_worker in self.client.run(model_costs, specs, workers=addresses).values():
            for name, c in per_worker.items():
                measured.setdefault(name, []).append(c)
        if any(s.name not in measured for s in cold):
            return routes, {}   # first time here: every replica, and this run measures them
        cost = {n: (sum(c["load"] for c in cs) / len(cs), sum(c["row"] for c in cs) / len(cs))
                for n, cs in measured.items()}
        busy = dict.fromkeys(used, 0.0)
        for s in specs:
            if s not in cold and s.name in cost:   # the others' rows, and loads still due
                load, row = cost[s.name]
                for w in routes[s.name]:
                    due = held.get(w, {}).get(s.name) != s.fingerprint
                    busy[w] += (load if due else 0.0) + row * n_rows / len(routes[s.name])
        plan = plan_cold_routes({s.name: routes[s.name] for s in cold},
                                {s.name: (cost[s.name][0], cost[s.name][1] * n_rows)
                                 for s in cold}, busy)
        later = {n: [w for w in routes[n] if w not in ws] for n, ws in plan.items()}
        routes.update(plan)
        return routes, {n: ws for n, ws in later.items() if ws}

    def _load_in_background(self, later: dict[str, list[str]]) -> None:
        """Load these (model -> workers) without waiting; :meth:`load` waits for them."""
        self._background_loads = {k: f for k, f in self._background_loads.items()
                                  if not f.done()}
        for name, workers in later.items():
            for w in workers:
                if (name, w) not in self._background_loads:
                    # Keeping the future keeps the task: Dask forgets unreferenced ones.
                    self._background_loads[(name, w)] = self.client.submit(
                        load_model, self.registry.get(name), resources={resource_name(w): 1},
                        pure=False, key=f"nbtool-replica-{name}-{w}-{time.monotonic_ns()}")

    def _local_handoff(self, source):
        """On a local cluster, hand an ndarray over as a shared memory-mapped file.

        Called last in :meth:`submit`, once everything that can refuse the run has passed:
        the file takes RAM in ``/dev/shm`` until the run ends. A write that fails (a full
        disk) leaves no partial file: the array is scattered instead.
        """
        from .sources import ArraySource, SharedArraySource, shared_folder

        if self.cluster is None or type(source) is not ArraySource:
            return source
        nbytes = source.array.nbytes
        folder = shared_folder(self.work_dir / "inputs", nbytes)
        self._shared_dirs.add(folder)
        before = set(os.listdir(folder)) if folder.is_dir() else set()
        try:
            return SharedArraySource(source.array, folder)
        except OSError as e:
            for name in set(os.listdir(folder)) - before if folder.is_dir() else ():
                if name.startswith("input-"):
                    Path(folder, name).unlink(missing_ok=True)
            logger.warning("could not write the input to %s (%s); sending it to the "
                           "workers instead", folder, e)
            return source

    def _max_chunk_bytes(self, workers) -> int | None:
        """A quarter of the smallest worker memory limit: input rows, their copy in the
        batch loop and the outputs of a chunk must fit beside the models."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        limits = [w.get("memory_limit") for w in info.values()
                  if str(w.get("name")) in workers and w.get("memory_limit")]
        return min(limits) // 4 if limits else None

    def _open_store(self, save, specs, source, chunk_size, run_id: str | None = None):
        """For ``save="*.zarr"``: the result store with its writer lock taken for
        ``run_id`` (another run writing it is refused), and the chunks it already holds.
        For ``save="*.npz"``: checked now that it can be written, not after the run."""
        if not save:
            return None, None
        suffix = str(save).lower().rsplit(".", 1)[-1]
        if suffix not in ("zarr", "npz"):
            raise ValueError(f"save={save!r}: expected a path ending in .zarr (a result "
                             "store written chunk by chunk, resumable) or .npz (written once "
                             "at the end).")
        import uuid

        from .store import ResultStore, check_npz_target

        if suffix == "npz":
            check_npz_target(save)
            return None, None
        store = ResultStore(save)
        store.check_target()   # a path that cannot be a store fails before models load
        entries = self.load(*[s.name for s in specs])   # their output shapes, and warm
        models = [(s.name, s.fingerprint, next(iter(entries[s.name].values()))["output_specs"])
                  for s in specs]
        store.acquire(run_id or uuid.uuid4().hex[:8])
        try:
            return store, store.prepare(models, source.fingerprint(), source.n_rows,
                                        chunk_size, len(source.chunk_bounds(chunk_size)))
        except OSError as e:
            store.release()
            raise store._unwritable(e) from None
        except BaseException:
            store.release()
            raise

    def _finish_run(self, res: Prediction, save) -> None:
        if save and str(save).lower().endswith(".npz"):
            try:
                res.save(save)
            except OSError as e:   # checked before the run; still, never lose the result
                err = NbtoolError(f"save={save!r}: writing the results failed ({e}); they "
                                  "are kept in this Prediction. Fix: res.save('other.npz').")
                res.errors.append(err)
                warnings.warn(str(err), stacklevel=4)
        self.history.append({
            "time": time.time(), "models": res.models, "rows": res.n_rows,
            "chunk_size": res.chunk_size, "seconds": res.wall_seconds,
            "rows_per_second": {m: t["rows_per_second"] for m, t in res.timings.items()},
            "errors": len(res.errors)})

    @_open
    def dashboard(self, **options):
        """A live panel of this engine (see :class:`nbtool.dashboard.Dashboard`).

        Example:
            >>> eng.dashboard()    # doctest: +SKIP
        """
        from .dashboard import Dashboard

        return Dashboard(self, **options)

    # -- optimizing (nbtool.optimize) ---------------------------------------------------------
    @_open
    def optimize(self, name: str, variants=("float16", "dynamic-int8", "int8"),
                 calibration: Any = None, x: Any = None, labels: Any = None,
                 calibration_rows: int = 200, throughput_rows: int = 2048,
                 repeats: int = 2):
        """Make cheaper variants of model ``name``, register them, and compare them.

        ``variants`` are names from :data:`nbtool.optimize.VARIANTS`: ``"float16"``,
        ``"dynamic-int8"`` and ``"int8"`` (LiteRT, through TensorFlow's converter; full
        int8 is calibrated on the first ``calibration_rows`` rows of ``calibration``),
        ``"keras-int8"`` (Keras' ``model.quantize("int8")``) and ``"float32"`` (LiteRT
        alone). The conversion runs on a worker. Each variant is registered as
        ``"name@variant"`` on the original's device and runs like any model. They are all
        measured on ``x`` (default: the calibration rows): size on disk, load time,
        throughput on the workers, agreement with the original and, with ``labels``,
        accuracy. Returns a :class:`nbtool.optimize.Comparison`, shown as a table; its
        ``choose(min_agreement=0.99)`` names the fastest variant within that tolerance.

        Example:
            >>> cmp = eng.optimize("cnn", ["float16", "int8"], calibration=x_train[:200],
            ...                    x=x_test, labels=y_test)                    # doctest: +SKIP
            >>> best = cmp.choose(max_accuracy_drop=0.01)                      # doctest: +SKIP
            >>> eng.predict(best, x_test)                                      # doctest: +SKIP
        """
        from .optimize import optimize

        cmp = optimize(self, name, variants, calibration=calibration, x=x, labels=labels,
                       calibration_rows=calibration_rows, throughput_rows=throughput_rows,
                       repeats=repeats)
        self._comparisons[name] = cmp
        return cmp

    def choose(self, name: str, min_agreement: float | None = None,
               max_abs_diff: float | None = None,
               max_accuracy_drop: float | None = None) -> str:
        """The fastest variant of ``name`` within a tolerance, from its last :meth:`optimize`.

        See :meth:`nbtool.optimize.Comparison.choose`; returns the variant's model name.

        Example:
            >>> eng.optimize("cnn", ["float16", "int8"], calibration=x_train)   # doctest: +SKIP
            >>> eng.choose("cnn", min_agreement=0.99)                          # doctest: +SKIP
            'cnn@int8'
        """
        cmp = self._comparisons.get(name)
        if cmp is None:
            self.registry.get(name)   # an unknown name says so first
            raise NbtoolError(f"model {name!r} has no variants measured yet. Fix: "
                              f"eng.optimize({name!r}, ['float16', 'int8'], "
                              "calibration=x_sample) first.")
        return cmp.choose(min_agreement=min_agreement, max_abs_diff=max_abs_diff,
                          max_accuracy_drop=max_accuracy_drop)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Shut down the client (and the local cluster, if this engine started it).

        Closing twice is a no-op; anything else on a closed engine raises
        :class:`~nbtool.errors.EngineClosed`.

        Example:
            >>> eng.close()   # doctest: +SKIP
        """
        global _default_engine
        if getattr(self, "_closed", False):
            return
        self._closed = True   # first: a failure below must not leave a half-open engine
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                with planned_restart():   # stopping workers is planned too: no warnings
                    self.cluster.close()
            self._remove_folders()
            if _default_engine is self:
                _default_engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def dashboard_link(self) -> str | None:
        """Dask's dashboard for this cluster, where it really listens (None once closed).

        For a local cluster, the host the dashboard is bound to and its real port (also with
        ``dashboard_address="127.0.0.1:0"``); for an external one, what its scheduler says.

        Example:
            >>> eng.dashboard_link       # doctest: +SKIP
            'http://127.0.0.1:8787/status'
        """
        if getattr(self, "_closed", False):
            return None
        if self.cluster is not None:
            return self.cluster.dashboard_link or None
        return getattr(self.client, "dashboard_link", None)

    def __repr__(self) -> str:
        if getattr(self, "_closed", False):
            return "<nbtool.Engine: closed; start a new one with nbtool.start()>"
        kinds = {w.kind for w in self.workers.values()}
        kind = f"{kinds.pop().upper()} " if len(kinds) == 1 else ""
        count = f"{len(self.workers)} {kind}worker{'s' if len(self.workers) != 1 else ''}"
        note = getattr(self.cluster, "gpu_note", "")
        ws = ", ".join(f"{w.name} ({w.device})" for w in self.workers.values())
        return (f"<nbtool.Engine: {note + ': ' if note else ''}{count} [{ws}], "
                f"{len(self.registry)} model(s), dashboard {self.dashboard_link}>")


def _remove_folders(shared_dirs: set[Path], work_dir: Path | None) -> None:
    """Remove an engine's input folders and its own work folder (``close`` and at exit)."""
    for folder in shared_dirs:
        shutil.rmtree(folder, ignore_errors=True)
    if work_dir is not None:
        shutil.rmtree(work_dir, ignore_errors=True)


def _names(models) -> list[str]:
    out: list[str] = []
    for m in models:
        if m is None:
            continue
        if isinstance(m, str):
            out.append(m)
        else:
            out.extend(_names(list(m)))
    return out


def _state_text(info: dict | None) -> str:
    if not info:
        return "not loaded"
    state = info.get("state", "not loaded")
    if state == "failed":
        return f"failed: {info.get('reason')}"
    return state


def start(address: str | None = None, *, gpus: str | int | list[int] | None = "auto",
          memory_budget: str | int | None = None, n_workers: int | None = None,
          dashboard_address: str | None = "127.0.0.1:8787", work_dir: str | None = None,
          security: Any = None, allow_remote_dashboard: bool = False) -> Engine:
    """Start an engine: a local GPU-pinned cluster, or a client of an existing one.

    Without ``address``, it starts a local cluster on 127.0.0.1 with one worker per GPU
    (``gpus="auto"`` finds them with NVML; ``gpus=[0, 1]`` picks; ``gpus="none"`` uses the
    CPU), each worker seeing exactly one GPU. With no GPU, it starts single-threaded CPU
    workers, one per core (``n_workers`` sets how many, at least 1). With
    ``address="tcp://host:8786"`` it connects to that Dask scheduler instead; its workers
    run the same worker code (nbtool must be installed there). ``memory_budget`` (a
    positive size such as ``"6GB"`` or a number of bytes) is the model memory each worker
    may hold before it evicts the least recently used model. The new engine becomes the
    default one for ``nbtool.predict`` and friends.

    Nobody else gets in: the local cluster speaks TLS under a certificate made for this
    session and held by this kernel (Dask's ``Security.temporary()``), so another process,
    even of this user, cannot connect without it. ``security`` (a
    :class:`distributed.security.Security`) is used instead when given: for an external
    cluster it is what the client presents (``address="tls://..."`` needs it; a cluster
    reached over plain ``tcp://`` is as open as its network). The dashboard is plain HTTP
    and listens on loopback only; ``dashboard_address="0.0.0.0:8787"`` is refused unless
    ``allow_remote_dashboard=True``. ``dashboard_address=None`` turns it off.

    Arguments left out are read from the environment, so a deployment can size the
    cluster without touching notebooks (``binder/start`` does this for mybinder.org):
    ``NBTOOL_N_WORKERS`` (CPU workers, e.g. ``1``; ignored when there are GPUs, which
    always get one worker each), ``NBTOOL_MEMORY_BUDGET`` (e.g.
    ``"256MB"``) and ``NBTOOL_CORES`` (the cores the CPU workers split among their
    TensorFlow threads; default ``os.cpu_count()``, which in a container reports the
    host's cores, not the container's share). An explicit argument wins.

    A worker process that cannot start fails the call at once with that worker's error;
    starting also removes input folders that killed kernels left in ``/dev/shm``.

    Example:
        >>> eng = nbtool.start()                                  # doctest: +SKIP
        >>> eng = nbtool.start(gpus=[0, 1], memory_budget="6GB")  # doctest: +SKIP
        >>> eng = nbtool.start(address="tls://10.0.0.5:8786",
        ...                    security=Security(tls_ca_file="ca.pem", tls_client_cert="me.pem",
        ...                                      tls_client_key="me.key",
        ...                                      require_encryption=True))  # doctest: +SKIP
    """
    global _default_engine
    from .quiet import quiet_dask, quiet_kernel

    quiet_kernel()
    quiet_dask()
    n_workers = _check_count(n_workers, "n_workers")
    if memory_budget is None:
        memory_budget = _env_setting("NBTOOL_MEMORY_BUDGET", parse_bytes)
    budget = _check_size(memory_budget, "memory_budget")
    if address is None:
        from .cluster import check_dashboard_address, clean_stale_shared_folders

        check_dashboard_address(dashboard_address, allow_remote_dashboard)
        clean_stale_shared_folders()
        cluster = _local_cluster(gpus, n_workers, budget, dashboard_address, security,
                                 allow_remote_dashboard)
        n_expected = len(cluster.slots)
        plugin = NbtoolWorkerPlugin()    # budgets travel in each worker's environment
    else:
        cluster = None
        n_expected = 1
        plugin = NbtoolWorkerPlugin(budget)
    client = None
    try:
        client = Client(cluster) if cluster is not None else _connect(address, security)
        _wait_for_start(client, cluster, n_expected, address)
        client.register_plugin(plugin)
        eng = Engine(client, cluster, work_dir)
    except BaseException:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        raise
    _default_engine = eng
    return eng


def _local_cluster(gpus, n_workers, budget, dashboard_address, security,
                   allow_remote_dashboard):
    """The PinnedCluster for :func:`start`: one worker per GPU, else CPU workers."""
    from .cluster import PinnedCluster, free_dashboard_address

    selected = select_gpus(gpus, discover_gpus())
    env_workers = _env_setting("NBTOOL_N_WORKERS", int)
    if n_workers is None and not selected:   # GPUs always get one worker each
        n_workers = env_workers
    slots = plan_workers(selected, n_workers=n_workers, memory_budget=budget,
                         cores=_env_setting("NBTOOL_CORES", int))
    cluster = PinnedCluster(slots, dashboard_address=free_dashboard_address(dashboard_address),
                            security=security, allow_remote_dashboard=allow_remote_dashboard)
    cluster.gpu_note = _gpu_note(gpus, selected)
    return cluster


def _gpu_note(gpus, selected: list) -> str:
    """How the engine came to its workers' devices, said once in its repr."""
    if selected:
        return ""
    if gpus in (None, "none", 0, []):
        return "GPUs not used (gpus={!r})".format(gpus)
    return "no GPU found"


def _connect(address: str, security) -> Client:
    """A client of an external scheduler, with the user's Security if any."""
    if str(address).startswith("tls://") and security is None:
        raise ValueError(
            f"address={address!r} is a TLS scheduler, but no security= was given: expected "
            "a distributed.security.Security with the cluster's CA and a client certificate. "
            "Fix: nbtool.start(address, security=Security(tls_ca_file=..., "
            "tls_client_cert=..., tls_client_key=..., require_encryption=True)).")
    return Client(address, security=security)


def _wait_for_start(client: Client, cluster, n_expected: int, address: str | None) -> None:
    """Wait for the workers; a local worker process that fails ends the wait at once.

    Dask keeps a Nanny's startup failure in a background task and the scheduler just never
    hears from that worker; without looking, the wait would run out its whole timeout.
    """
    from .cluster import start_failure

    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while True:
        failed = cluster.failed_workers() if cluster is not None else {}
        if failed:
            raise start_failure(failed)
        try:
            client.wait_for_workers(n_expected, timeout=0.5)
            return
        except TimeoutError:
            if time.monotonic() >= deadline:
                break
    raise NbtoolError(
        f"fewer than {n_expected} worker(s) started within {WORKER_START_TIMEOUT}s"
        + (f" at {address}" if address else "") + ". Fix: look at the worker logs "
        "above; in a script, guard the call with `if __name__ == '__main__':` "
        "(workers are spawned processes that import the main module).")


def _env_setting(name: str, parse: Callable[[str], int]) -> int | None:
    """A positive number from the environment (``None`` if unset or empty), checked early.

    Example:
        >>> _env_setting("NBTOOL_SURELY_UNSET", int) is None
        True
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        example = "256MB" if parse is parse_bytes else "1"
        raise ValueError(f"{name}={text!r} in the environment: expected a positive number "
                         f"such as {name}={example}. Fix: set it like that, or unset it.")
    return value


def _check_count(value, name: str) -> int | None:
    """A whole number of at least 1, or None (the default); 0 is refused, not the default.

    Example:
        >>> _check_count(2, "n_workers"), _check_count(None, "n_workers")
        (2, None)
        >>> _check_count(0, "n_workers")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: n_workers=0: expected a whole number of at least 1, such as n_workers=2...
    """
    if value is None:
        return None
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"{name}={value!r}: expected a whole number of at least 1, such as "
                         f"{name}=2. Fix: pass one, or leave {name} out for the default "
                         "(one worker per GPU, else per core).")
    return n


def _check_size(value, name: str, allow_none: bool = True) -> int | None:
    """A positive size in bytes from ``"4GB"`` or a number; 0 and negatives are refused.

    Example:
        >>> _check_size("4GB", "memory_budget")
        4000000000
        >>> _check_size("0", "memory_budget")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: memory_budget='0': expected a positive size such as '4GB'...
    """
    if value is None and allow_none:
        return None
    try:
        if isinstance(value, bool) or value is None or (isinstance(value, str)
                                                         and not value.strip()):
            n = None
        else:
            n = parse_bytes(value) if isinstance(value, str) else int(value)
    except (TypeError, ValueError, OverflowError):
        n = None
    if n is None or n < 1:
        default = ", or leave it out for the default" if allow_none else ""
        raise ValueError(f"{name}={value!r}: expected a positive size such as '4GB' or "
                         f"4_000_000_000 (bytes). Fix: pass e.g. {name}='4GB'{default}.")
    return n


def default_engine() -> Engine:
    """The engine started last (what ``nbtool.predict`` and friends use).

    Example:
        >>> nbtool.default_engine() is eng   # doctest: +SKIP
        True
    """
    if _default_engine is None:
        raise NbtoolError("no nbtool engine is running. Fix: eng = nbtool.start() first.")
    return _default_engine
