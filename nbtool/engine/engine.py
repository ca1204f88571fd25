"""The engine: the one object a notebook talks to; it delegates to the parts below it.

It lives in the notebook kernel and never imports TensorFlow; models load inside the
workers. Its parts: the :class:`~nbtool.engine.pool.WorkerPool` (the named workers and their
status), the :class:`~nbtool.models.catalog.Catalog` (registered models, where they are placed,
loading and unloading them) and :class:`~nbtool.predict.runs.Runs` (the predictions).
``nbtool.start()`` (:mod:`nbtool.engine.session`) builds one.

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
import os
from pathlib import Path
import tempfile
from typing import Any, Callable
import weakref

from distributed import Client

from nbtool._util import check_size
from nbtool.engine.pool import WorkerPool
from nbtool.errors import EngineClosed, NbtoolError
from nbtool.models import BackgroundLoads, Catalog, Loads, WorkerInfo, model_names
from nbtool.predict import Prediction, PredictionRun, Runs, remove_folders
from nbtool.tables import Table, device_rows
from nbtool.wire import ModelSpec, ModelState, WorkerStatus
from nbtool.worker import NbtoolWorkerPlugin


def _doc(implementation):
    """Give a facade method the docstring of the part that does its work: the behaviour is
    written once, where it is implemented (as ``dask.utils.derived_from`` does)."""
    def take(method):
        method.__doc__ = implementation.__doc__
        return method

    return take


def _open(method):
    """Refuse ``method`` on a closed engine with :class:`~nbtool.errors.EngineClosed`, and
    on a persistent one whose process ended with
    :class:`~nbtool.engine.persist.persistent.EngineNotRunning`.

    Checked before the method touches the cluster: a closed client otherwise fails deep
    inside Dask (``RuntimeError: IOLoop is closed``) or, for ``register``, not at all.
    """
    def check(self):
        if self.closed:
            raise EngineClosed(method.__name__)
        if hasattr(self.cluster, "check_running"):
            self.cluster.check_running(self)

    def check_after(self):
        # A persistent engine killed during the call: that, not the chunk errors it left.
        if not self.closed and hasattr(self.cluster, "check_running"):
            self.cluster.check_running(self)

    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def guarded_async(self, *args, **kwargs):
            check(self)
            try:
                return await method(self, *args, **kwargs)
            finally:
                check_after(self)

        return guarded_async

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        check(self)
        try:
            return method(self, *args, **kwargs)
        finally:
            check_after(self)

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
        self.closed = False
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="nbtool-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.pool = WorkerPool(client)
        self.catalog = Catalog(self.pool, self.work_dir, BackgroundLoads())
        self.loads = Loads(self.pool, self.catalog)
        self.runs = Runs(self.pool, self.loads, local=cluster is not None,
                         work_dir=self.work_dir)
        # Ended without close() (a kernel shut down without `%nbtool stop`): the folders
        # still go when the interpreter exits; /dev/shm is memory, held until reboot.
        self._remove_folders = weakref.finalize(
            self, remove_folders, self.runs.shared_dirs, None if work_dir else self.work_dir)
        self._comparisons: dict[str, Any] = {}   # model -> its last optimize() Comparison
        self.pool.refresh()

    @property
    def registry(self):
        """The registered models' specs (:class:`~nbtool.models.registry.Registry`)."""
        return self.catalog.registry

    @property
    def placement(self) -> dict[str, list[str]]:
        """Model name -> the names of the workers it is placed on."""
        return self.catalog.placement

    @property
    def workers(self) -> dict[str, WorkerInfo]:
        """Worker name -> its device and budget, as last asked."""
        return self.pool.workers

    @property
    def history(self) -> list[dict[str, Any]]:
        """One summary per finished prediction (models, rows, seconds, rows/s, errors)."""
        return self.runs.history

    # -- workers ---------------------------------------------------------------------------
    def refresh_workers(self) -> dict[str, WorkerInfo]:
        """Ask every worker for its device and budget; returns them by worker name (the
        models placed automatically are placed again on what they say)."""
        workers, _ = self.pool.refresh(), self.catalog.replan()
        return workers

    @_open
    def status(self, workers: list[str] | None = None) -> dict[str, WorkerStatus]:
        """What each worker reports now (all by default), by worker name: its models'
        states (:class:`~nbtool.wire.ModelState`), memory, budget and process facts.

        Example:
            >>> eng.status()["cpu0"].state_of("cnn").describe()   # doctest: +SKIP
            'loaded'
        """
        return self.pool.status(workers)

    @_open
    def set_memory_budget(self, memory_budget: str | int) -> None:
        """Change every worker's model budget now (and for workers that restart later).

        Workers over the new budget evict their least recently used models at once.

        Example:
            >>> eng.set_memory_budget("2GB")   # doctest: +SKIP
        """
        budget = check_size(memory_budget, "memory_budget", allow_none=False)
        self.client.register_plugin(NbtoolWorkerPlugin(budget))   # now and on restarts
        self.refresh_workers()   # auto placement follows the new budgets

    # -- registering ---------------------------------------------------------------------
    @_open
    @_doc(Catalog.register)
    def register(self, name: str, model: Any, device: str = "auto", replicas: int | None = None,
                 batch_size: int | str | None = None, preprocess: Callable | None = None,
                 trusted: bool = False, precision: str | None = None,
                 runtime: str | None = None) -> ModelSpec:
        return self.catalog.register(name, model, device=device, replicas=replicas,
                                     batch_size=batch_size, preprocess=preprocess,
                                     trusted=trusted, precision=precision, runtime=runtime)

    @_open
    @_doc(Catalog.register_dir)
    def register_dir(self, folder: str | os.PathLike, device: str = "auto",
                     replicas: int | None = None,
                     batch_size: int | None = None, trusted: bool = False) -> list[ModelSpec]:
        return self.catalog.register_dir(folder, device=device, replicas=replicas,
                                         batch_size=batch_size, trusted=trusted)

    @_open
    @_doc(Runs.agreement)
    def agreement(self, a: str, b: str, x: Any, chunk_size: int | None = None) -> dict:
        return self.runs.agreement(a, b, x, chunk_size)

    # -- looking -----------------------------------------------------------------------
    @_open
    def models(self) -> Table:
        """A table of the registered models: format, size, placement, state per worker.

        ``device`` is where it may run: ``auto: cpu0, cpu1`` for a model placed
        automatically (every worker with room for it), the devices of a pinned one.

        Example:
            >>> eng.models()     # doctest: +SKIP
            name  format  size    device            state
            cnn   keras   1.2 MB  auto: cpu0, cpu1  cpu0: loaded; cpu1: loaded
            mlp   h5      9.3 kB  cpu:1             cpu1: loaded
        """
        return Table([r.as_dict() for r in self.catalog.model_rows(self.status())],
                     title="models")

    @_open
    def devices(self) -> Table:
        """A table of the workers: device, memory in use, model budget, resident models.

        Example:
            >>> eng.devices()    # doctest: +SKIP
            worker  device  memory    budget  resident  models
            cpu0    cpu:0   812.0 MB  5.6 GB  1.2 MB    cnn
        """
        return Table(device_rows(self.status()), title="devices")

    # -- loading and unloading -----------------------------------------------------------
    @_open
    @_doc(Loads.load)
    def load(self, *models: str | list[str]) -> dict[str, dict[str, ModelState]]:
        return self.loads.load(model_names(models))

    @_open
    @_doc(Loads.start_load)
    def start_load(self, *models: str | list[str]) -> dict[tuple[str, str], Any]:
        return self.loads.start_load(model_names(models))

    @_open
    @_doc(Loads.unload)
    def unload(self, models: str | list[str] | None = None, hard: bool = False) -> list[str]:
        names = self.registry.names() if models is None else model_names([models])
        return self.loads.unload(names, hard=hard)

    # -- predicting --------------------------------------------------------------------------
    @_open
    @_doc(Runs.submit)
    def predict(self, models: str | list[str], x: Any, chunk_size: int | None = None,
                combine: str | None = "mean", save: str | None = None, *,
                partial_combine: bool = False, cache: bool = False) -> Prediction:
        return self.submit(models, x, chunk_size, combine, save,
                           partial_combine=partial_combine, cache=cache).collect()

    @_open
    async def predict_async(self, models: str | list[str], x: Any,
                            chunk_size: int | None = None, combine: str | None = "mean",
                            save: str | None = None, *,
                            partial_combine: bool = False, cache: bool = False) -> Prediction:
        """The awaitable twin of :meth:`predict`: the event loop stays free while it runs.
        Cancelling the awaiting task cancels the run.

        Example:
            >>> res = await eng.predict_async(["cnn"], x)   # doctest: +SKIP
        """
        run = self.submit(models, x, chunk_size, combine, save,
                          partial_combine=partial_combine, cache=cache)
        try:
            return await asyncio.to_thread(run.collect)
        except asyncio.CancelledError:
            run.cancel()
            raise

    @_open
    @_doc(Runs.submit)
    def submit(self, models: str | list[str], x: Any, chunk_size: int | None = None,
               combine: str | None = "mean", save: str | None = None, *,
               partial_combine: bool = False, cache: bool = False) -> PredictionRun:
        return self.runs.submit(model_names([models]), x, chunk_size, combine, save,
                                partial_combine=partial_combine, cache=cache)

    def running(self) -> list[PredictionRun]:
        """The predictions submitted and not yet finished or cancelled, oldest first.

        Each has ``progress()`` (chunks done per model) and ``run_id``; the dashboard shows them.

        Example:
            >>> run = eng.submit(["cnn"], x)                     # doctest: +SKIP
            >>> [r.run_id for r in eng.running()]                # doctest: +SKIP
            ['3f2a9c1e']
        """
        return self.runs.running()

    @_open
    def dashboard(self, **options):
        """A live panel of this engine (see :class:`nbtool.dashboard.panel.Dashboard`).

        Example:
            >>> eng.dashboard()    # doctest: +SKIP
        """
        from nbtool.dashboard import Dashboard

        return Dashboard(self, **options)

    # -- optimizing (nbtool.engine.optimize) ---------------------------------------------------------
    @_open
    def optimize(self, name: str, variants=("float16", "dynamic-int8", "int8"),
                 calibration: Any = None, x: Any = None, labels: Any = None,
                 calibration_rows: int = 200, throughput_rows: int = 2048,
                 repeats: int = 2):
        """Make cheaper variants of model ``name``, register them, and compare them.

        ``variants`` are names from :data:`nbtool.engine.optimize.VARIANTS`: ``"float16"``,
        ``"dynamic-int8"``, ``"int8"`` and ``"float32"`` (LiteRT; int8s are calibrated on
        the first ``calibration_rows`` rows of ``calibration``), ``"keras-int8"``, and
        ``"openvino-bf16"``, ``"openvino-int8"`` (OpenVINO IR; NNCF). The conversion runs
        on a worker. Each variant is registered as
        ``"name@variant"`` on the original's device and runs like any model. They are all
        measured on ``x`` (default: the calibration rows): size on disk, load time,
        throughput on the workers, agreement with the original and, with ``labels``,
        accuracy. Returns a :class:`nbtool.engine.optimize.Comparison`, shown as a table; its
        ``choose(min_agreement=0.99)`` names the fastest variant within that tolerance.

        Example:
            >>> cmp = eng.optimize("cnn", ["float16", "int8"], calibration=x_train[:200],
            ...                    x=x_test, labels=y_test)                    # doctest: +SKIP
            >>> best = cmp.choose(max_accuracy_drop=0.01)                      # doctest: +SKIP
            >>> eng.predict(best, x_test)                                      # doctest: +SKIP
        """
        from nbtool.engine.optimize import optimize

        cmp = optimize(self, name, variants, calibration=calibration, x=x, labels=labels,
                       calibration_rows=calibration_rows, throughput_rows=throughput_rows,
                       repeats=repeats)
        self._comparisons[name] = cmp
        return cmp

    def choose(self, name: str, min_agreement: float | None = None,
               max_abs_diff: float | None = None,
               max_accuracy_drop: float | None = None) -> str:
        """The fastest variant of ``name`` within a tolerance, from its last :meth:`optimize`.

        See :meth:`nbtool.engine.optimize.Comparison.choose`; returns the variant's model name.

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
        """Shut down the client (and the local cluster, if this engine started it). A
        persistent engine's cluster keeps running: this detaches (``nbtool.shutdown()`` ends it).

        Closing twice is a no-op; anything else on a closed engine raises
        :class:`~nbtool.errors.EngineClosed`.

        Example:
            >>> eng.close()   # doctest: +SKIP
        """
        if self.closed:
            return
        self.closed = True   # first: a failure below must not leave a half-open engine
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                from nbtool._util import planned_restart

                with planned_restart():   # stopping workers is planned too: no warnings
                    self.cluster.close()
            self._remove_folders()

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
        if self.closed:
            return None
        if self.cluster is not None:
            return self.cluster.dashboard_link or None
        return getattr(self.client, "dashboard_link", None)

    def __repr__(self) -> str:
        if self.closed:
            return "<nbtool.Engine: closed; start a new one with nbtool.start()>"
        kinds = {w.kind for w in self.workers.values()}
        kind = f"{kinds.pop().upper()} " if len(kinds) == 1 else ""
        count = f"{len(self.workers)} {kind}worker{'s' if len(self.workers) != 1 else ''}"
        note = getattr(self.cluster, "gpu_note", "")
        ws = ", ".join(f"{w.name} ({w.device})" for w in self.workers.values())
        return (f"<nbtool.Engine: {note + ': ' if note else ''}{count} [{ws}], "
                f"{len(self.registry)} model(s), "
                + (f"dashboard {self.dashboard_link}>" if self.dashboard_link
                   else "no dashboard>"))
