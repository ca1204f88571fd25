"""The engine: the one object a notebook talks to; it delegates to the parts below it.

It lives in the notebook kernel and never imports TensorFlow; models load inside the
workers. Its parts: the :class:`~nbtool.engine.pool.WorkerPool` (the named workers and their
status), the :class:`~nbtool.catalog.catalog.Catalog` (registered models and where they are
placed: data), :class:`~nbtool.catalog.loads.Loads` (loading and unloading them) and
:class:`~nbtool.prediction.runs.Runs` (the predictions), one way: runs use loads, loads use
the catalog. The options the user passes are declared once (``ModelOptions``,
``RunOptions``) and documented here, once. ``nbtool.start()`` (:mod:`nbtool.engine.session`)
builds one.

Example:
    >>> import nbtool
    >>> eng = nbtool.start()                                   # doctest: +SKIP
    >>> eng.register("cnn", "models/cnn.keras")                # doctest: +SKIP
    >>> res = eng.predict(["cnn"], x_test)                     # doctest: +SKIP
    >>> eng.close()                                            # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import os
from pathlib import Path
import tempfile
from typing import Any
import weakref

from distributed import Client

from nbtool._util import check_size
from nbtool.catalog import Catalog, Loads, ModelOptions, WorkerInfo, model_names
from nbtool.engine.pool import WorkerPool
from nbtool.errors import EngineClosed, NbtoolError
from nbtool.prediction import Prediction, PredictionRun, RunOptions, Runs, remove_folders
from nbtool.tables import Table, device_rows
from nbtool.wire import ModelSpec, ModelState, WorkerStatus
from nbtool.worker import NbtoolWorkerPlugin


def _doc(implementation):
    """Give an Engine method the docstring of the part that does its work: the behaviour is
    written once, where it is implemented (as ``dask.utils.derived_from`` does)."""
    def take(method):
        method.__doc__ = implementation.__doc__
        return method

    return take


def _with_options(options_type, only: tuple[str, ...] | None = None):
    """Let a method take the fields of ``options_type`` (a dataclass: the options are
    declared once, there) as parameters of its own: ``eng.predict("cnn", x, 500,
    combine="vote")`` calls the method with ``options=RunOptions(500, combine="vote")``,
    so checking happens in the options type, and ``help()`` and the IDE show every
    option. ``only`` restricts the method to some of the fields.
    """
    fields = [f for f in dataclasses.fields(options_type) if only is None or f.name in only]
    names = {f.name for f in fields}

    def wrap(method):
        own = [p for p in inspect.signature(method).parameters.values() if p.name != "options"]
        signature = inspect.Signature(own + [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY if f.kw_only
                              else inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=f.default, annotation=f.type) for f in fields])

        def options_of(args, kwargs) -> dict:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as e:
                takes = ", ".join(list(signature.parameters)[1:])
                raise TypeError(f"{method.__name__}(): {e}; it takes {takes}") from None
            bound.apply_defaults()
            given = dict(bound.arguments)
            given["options"] = options_type(**{n: given.pop(n) for n in names})
            return given

        if inspect.iscoroutinefunction(method):
            @functools.wraps(method)
            async def call_async(*args, **kwargs):
                return await method(**options_of(args, kwargs))

            call_async.__signature__ = signature
            return call_async

        @functools.wraps(method)
        def call(*args, **kwargs):
            return method(**options_of(args, kwargs))

        call.__signature__ = signature
        return call

    return wrap


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
        self.catalog = Catalog(self.pool, self.work_dir)
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
        """The registered models' specs (:class:`~nbtool.catalog.catalog.Registry`)."""
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
    @_with_options(ModelOptions)
    def register(self, name: str, model: Any, options: ModelOptions) -> ModelSpec:
        """Register a model file (or a Keras model object) under ``name`` and place it.

        ``model`` is a path to a ``.keras`` file, an ``.h5`` file (Keras 3, or an old
        Keras 2 / tf.keras one), a ``.tflite`` file (run by LiteRT's interpreter), an
        OpenVINO IR ``.xml`` with its ``.bin`` beside it (yours or a third party's, from
        ``openvino.save_model``; run by OpenVINO on CPU workers, in float32 unless its
        rt_info asks for bf16, with no TensorFlow) or a
        SavedModel directory (``model.export(dir)``, ``tf.saved_model.save``), or a Keras
        model you just built: that one is saved once as ``.keras`` in the engine's work
        folder. The file's input shape, dtype and outputs are read here without
        TensorFlow; a SavedModel's only when it first loads. ``device`` is ``"auto"``
        (the GPU workers if there are any, else the CPU workers), ``"cpu"``, ``"gpu"`` or
        one device such as ``"gpu:1"``. ``replicas=None`` (the default) lets the model run
        on every worker of that kind whose memory budget has room for it beside the other
        models (:mod:`nbtool.catalog.placement`), so an ensemble keeps every worker busy: each
        run splits its chunks over them, as measured costs say pays (:mod:`nbtool.prediction.planning`);
        ``eng.models()`` shows ``auto: cpu0, cpu1``. An int pins it to that many workers,
        and so does one device. Nothing loads now: the model loads on a
        worker the first time it is used (or on ``eng.load``), so a file that reads here
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
        place is picked up at the next run or load (see ``eng.submit``).
        ``precision="bfloat16"`` (or ``"float16"``) runs a ``.keras``/``.h5`` model in
        mixed precision, opt-in: check it with ``eng.agreement`` against the float32 model
        first. ``runtime`` is what runs a ``.keras``/``.h5``/SavedModel on CPU workers:
        ``None`` (``"auto"``: at its first load on this machine, the fastest of TensorFlow,
        OpenVINO float32 and LiteRT float32 that agrees with TensorFlow on your rows,
        remembered; TensorFlow on a GPU), or one forced: ``"tensorflow"``, ``"openvino"``
        or ``"litert"`` (converted once, cached on disk, checked against TensorFlow at
        every load). A ``.tflite`` runs in LiteRT, an ``.xml`` IR in OpenVINO. Registering
        a name again replaces it (a no-op if nothing changed).

        Example:
            >>> eng.register("cnn", "models/cnn.keras", device="gpu:0")   # doctest: +SKIP
            >>> eng.register("old", "models/old_keras2.h5")               # doctest: +SKIP
            >>> eng.register("det", "models/detector.tflite")             # doctest: +SKIP
            >>> eng.register("exported", "models/exported/", trusted=True)  # doctest: +SKIP
            >>> eng.register("fresh", trained_model)                      # doctest: +SKIP
        """
        try:
            return self.catalog.register(name, model, options)
        finally:
            self.loads.drop_replaced()   # a registration replaced: its old copies go

    @_open
    @_with_options(ModelOptions, only=("device", "replicas", "batch_size", "trusted"))
    def register_dir(self, folder: str | os.PathLike, options: ModelOptions) -> list[ModelSpec]:
        """Register every ``.keras``/``.h5``/``.tflite`` file and SavedModel directory in
        ``folder``, with the options of :meth:`register`.

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
        try:
            return self.catalog.register_dir(folder, options)
        finally:
            self.loads.drop_replaced()

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
    @_with_options(RunOptions)
    def predict(self, models: str | list[str], x: Any, options: RunOptions) -> Prediction:
        """Predict ``models`` on ``x`` and wait for the result.

        The models run on ``x`` in chunks on the workers. ``eng.predict`` returns the
        :class:`~nbtool.prediction.results.Prediction`; ``eng.submit`` (same options) checks
        the input, schedules the prediction and returns at once with the run;
        ``eng.predict_async`` is the awaitable twin.

        ``x`` is one of:

        - an ndarray or a list of rows (on a local cluster handed to the workers as one
          shared-memory file; else scattered once);
        - a path to a ``.npy`` file (workers memory-map their own slices);
        - a zarr array: a path (``"x.zarr"``, or a folder holding zarr metadata) or a
          zarr array object (workers read their own slices);
        - a folder of images, as a path or ``nbtool.images("photos/", size=(224, 224))``
          (workers decode and resize their own files);
        - a Dask array (its row blocks become the chunks);
        - for models of several inputs, a list of those in input order or a dict by input
          name (a ``.npz`` file, a zarr group), chunked in step;
        - a table (pandas, pyarrow, Dask, a Parquet path; the last two stay lazy): columns
          go to the inputs of their names (``columns={"input": "col" or [cols]}`` maps
          others), a model of one input ``(k,)`` takes k columns; the index (or
          ``ids="col"``; for an array, ``ids=labels``) labels ``res.to_pandas()``'s rows;
        - text for a string input: a list or array of strings, a text column (sent as
          fixed-width unicode, never pickled).

        ``chunk_size`` is the rows each task computes: None picks one from the rows, the
        workers and their memory (a Dask array's own row blocks, if it has them).

        The input is checked against every model before anything is scheduled (a
        SavedModel's input is read from its signature). ``res[name]`` is the model's
        output: a list of arrays for several outputs, a dict when the model names them.
        ``combine`` is ``"mean"``, ``"vote"`` or ``None`` (per output name where the models'
        outputs agree). ``res.to_pandas()``: one row per input row. A
        chunk that fails does not discard the others: see ``res.errors`` and
        ``res.raise_for_errors()``. Then ``res.combined`` is None (``res.combined_note``
        says which model failed where), unless ``partial_combine=True``: the rows a model
        failed on are then combined from the other models (NaN where every model failed).

        ``save="preds.zarr"`` writes a resumable result store: each chunk's outputs are
        written by its worker as it completes, ``res[name]`` is then a zarr array on disk,
        and running the same prediction again computes only the chunks not stored yet
        (one run at a time: another run on the same path is refused);
        ``nbtool.open_prediction("preds.zarr")`` reads it back later.
        ``save="preds.parquet"`` does the same as a Parquet dataset (one file per model and
        chunk, one schema: ``pd.read_parquet("preds.parquet")`` reads every model, a record
        per row, model and output). ``save="preds.npz"`` writes the outputs once, at the
        end.

        ``cache=True`` memoises each chunk's outputs on disk (:mod:`nbtool.prediction.output_memo`),
        keyed by the model (file fingerprint, precision, preprocessing, runtime) and the
        chunk's rows: running it again, after a restart too, reads them back instead of
        computing (``res.timings[name]["cached_chunks"]`` says how many); a changed model
        or chunk is computed again. ``nbtool.cache_info()``, ``nbtool.clear_cache()``.
        It does not combine with ``save="*.zarr"`` (which resumes by itself).

        A submitted run: ``run.progress()`` says how far each model is; ``run.collect()``
        waits and returns the Prediction (and lets go of the run's tasks, store lock and
        input file); ``run.cancel()`` stops it.

        Example:
            >>> res = eng.predict(["cnn", "mlp"], x, chunk_size=500, combine="vote")  # doctest: +SKIP
            >>> res["cnn"].shape, res.combined.shape                                  # doctest: +SKIP
            ((2000, 10), (2000,))
            >>> run = eng.submit(["cnn"], x)          # doctest: +SKIP
            >>> run.progress()                        # doctest: +SKIP
            {'cnn': (3, 8)}
        """
        return self.submit(models, x, **vars(options)).collect()

    @_open
    @_with_options(RunOptions)
    async def predict_async(self, models: str | list[str], x: Any,
                            options: RunOptions) -> Prediction:
        """The awaitable twin of :meth:`predict` (same options): the event loop stays free
        while it runs. Cancelling the awaiting task cancels the run.

        Example:
            >>> res = await eng.predict_async(["cnn"], x)   # doctest: +SKIP
        """
        run = self.submit(models, x, **vars(options))
        try:
            return await asyncio.to_thread(run.collect)
        except asyncio.CancelledError:
            run.cancel()
            raise

    @_open
    @_with_options(RunOptions)
    def submit(self, models: str | list[str], x: Any, options: RunOptions) -> PredictionRun:
        """Start :meth:`predict` (same options) and return at once with the run:
        ``run.progress()``, ``run.collect()``, ``run.cancel()``.

        Example:
            >>> run = eng.submit(["cnn"], x)          # doctest: +SKIP
            >>> run.progress()                        # doctest: +SKIP
            {'cnn': (3, 8)}
        """
        return self.runs.submit(model_names([models]), x, options)

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
        """A live panel of this engine (see :class:`nbtool.views.panel.Dashboard`).

        Example:
            >>> eng.dashboard()    # doctest: +SKIP
        """
        from nbtool.views import Dashboard

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
