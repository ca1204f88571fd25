"""The engine's predictions: each prepared, submitted, followed while it runs, and summed up.

:meth:`Runs.submit` does everything that can refuse a run before anything is scheduled
(the input read and checked against every model, the save target, the chunk size), at most
one load round trip (only for a model whose signature no load has taught yet), then plans
the routes, hands the input over and submits a :class:`~nbtool.prediction.run.PredictionRun`. It
subscribes to the run's end: a finished run leaves the running list for the history, and
the replicas it left out start loading.

Example:
    >>> runs = Runs(pool, loads, local=True)                         # doctest: +SKIP
    >>> run = runs.submit(["cnn"], x, RunOptions(combine="mean"))    # doctest: +SKIP
    >>> run.collect().n_rows, len(runs.history)                      # doctest: +SKIP
    (2000, 1)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
import shutil
import time
from typing import Any
import uuid

from nbtool.prediction.binding import bind_input
from nbtool.prediction.inputs import check_fits, resolve_chunk_size
from nbtool.prediction.metrics import output_agreement
from nbtool.prediction.output_memo import RunCache
from nbtool.prediction.planning import plan_routes
from nbtool.prediction.results import Prediction, check_combine
from nbtool.prediction.run import PredictionRun
from nbtool.wire import ModelSpec

logger = logging.getLogger("nbtool")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The options of a prediction run, declared and checked once: the engine's
    ``predict``, ``predict_async`` and ``submit`` take them as their own parameters (and
    :meth:`nbtool.engine.Engine.submit` documents them); the magics and the dashboard
    pass them on. What depends on the input (the chunk size against its rows, a store
    against its models) is checked by the run, with the input.

    Example:
        >>> RunOptions(500, "vote").combine
        'vote'
        >>> RunOptions(combine="median")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: combine='median' is not a combine method; choose 'mean', 'vote' or None.
        >>> RunOptions(save="p.zarr", cache=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: cache=True with save='p.zarr': a result store already resumes ...
    """

    chunk_size: int | None = None
    combine: str | None = "mean"
    save: str | None = None
    partial_combine: bool = dataclasses.field(default=False, kw_only=True)
    cache: bool = dataclasses.field(default=False, kw_only=True)
    #: A table's columns for each model input, by input name (a column or a list of them).
    columns: dict | None = dataclasses.field(default=None, kw_only=True)
    #: The table column that labels the rows (else its index), or an array's row labels.
    ids: Any = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        check_combine(self.combine)
        if self.cache and self.save and str(self.save).lower().endswith((".zarr", ".parquet")):
            raise ValueError(f"cache=True with save={self.save!r}: a result store already "
                             "resumes (its chunks are not computed again), so the two do "
                             "not combine. Fix: drop cache=True, or save to a .npz file.")


class Runs:
    """Submitted runs until they end (``running()``), and one summary per ended run.

    ``local``: the cluster is this machine's (inputs go over shared memory, and the costs
    the workers recorded are this machine's); ``work_dir`` holds the shared inputs.

    Example:
        >>> [r.run_id for r in runs.running()]   # doctest: +SKIP
        ['3f2a9c1e']
    """

    def __init__(self, pool, loads, local: bool, work_dir: Path | None = None):
        self.pool = pool
        self.loads = loads              # a Loads: what a signature is not known of loads
        self.catalog = loads.catalog
        self.local = local
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.history: list[dict[str, Any]] = []   # one summary per prediction
        self.shared_dirs: set[Path] = set()       # where inputs were handed to local workers
        self._runs: list[PredictionRun] = []

    def submit(self, names: list[str], x: Any, options: RunOptions = RunOptions()) -> PredictionRun:
        """Check, plan and submit a run of the models ``names`` on ``x`` with ``options``
        (the user's documentation is :meth:`nbtool.engine.Engine.submit`).

        Example:
            >>> run = runs.submit(["cnn"], x, RunOptions(chunk_size=500))   # doctest: +SKIP
        """
        chunk_size, combine, save = options.chunk_size, options.combine, options.save
        names = list(dict.fromkeys(names))
        if not names:
            raise ValueError("predict needs at least one model name.")
        # A file re-saved in place: re-registered and its old copies unloaded, before
        # anything below reads its spec (the signature may have changed too).
        self.loads.refresh(names)
        # Everything that can refuse the run comes first; the input goes to shared memory
        # last (see handoff), so a refused input costs no RAM.
        store = save_target(save)   # a path that cannot be written fails before any load
        specs = self.signed(names, outputs=store is not None)
        source = bind_input(x, specs, options.columns, options.ids)
        for spec in specs:
            check_fits(spec, source)
        used = {w for n in names for w in self.catalog.placement[n]}
        # A quarter of the smallest worker memory limit: input rows, their copy in the
        # batch loop and the outputs of a chunk must fit beside the models.
        limits = self.pool.memory_limits(used)
        size = resolve_chunk_size(chunk_size, source, len(used),
                                  min(limits) // 4 if limits else None)
        run_id = uuid.uuid4().hex[:8]   # names its tasks, and its writes to a result store
        stored = open_store(store, specs, source, size, run_id)
        try:
            cached = self.cached(specs, source, size) if options.cache else None
            routes, later = plan_routes(self.pool, specs, self.catalog.placement,
                                        source.n_rows, measured_here=self.local)
            source = self.handoff(source)
            run = PredictionRun(self.pool, [(s, routes[s.name]) for s in specs], source, size,
                                combine=combine, store=store, stored=stored,
                                save=save if save and store is None else None,
                                run_id=run_id, partial_combine=options.partial_combine,
                                cache=cached)
        except BaseException:
            if store is not None:
                store.release()
            getattr(source, "cleanup", lambda: None)()
            raise
        run.add_done_callback(functools.partial(self.finished, later=later))
        try:
            run.submit()
        except BaseException:
            run.cancel()   # the store lock, the input file, any task already sent
            raise
        self._runs = [r for r in self._runs if not r.done] + [run]
        return run

    def agreement(self, a: str, b: str, x: Any, chunk_size: int | None = None) -> dict:
        """How far two models' outputs are apart on ``x``: top-1 agreement, max abs diff.

        For checking a variant (another precision, a quantized copy) against its original.

        Example:
            >>> eng.register("cnn_bf16", "cnn.keras", precision="bfloat16")   # doctest: +SKIP
            >>> eng.agreement("cnn", "cnn_bf16", x_test)                      # doctest: +SKIP
            {'top1_agreement': 0.998, 'max_abs_diff': 0.0061, 'rows': 2000}
        """
        res = self.submit([a, b], x, RunOptions(chunk_size, combine=None)).collect()
        res.raise_for_errors()
        try:
            out = output_agreement(res[a], res[b])
        except ValueError as e:
            raise ValueError(f"models {a!r} and {b!r} give {e}") from None
        return {**out, "rows": res.n_rows}

    def cached(self, specs: list[ModelSpec], source, chunk_size: int) -> RunCache:
        """Look every (model, chunk) of a run up in the output cache (keyed with the
        Keras backend of each model's workers: it changes the last digits).

        Example:
            >>> runs.cached(specs, as_source(x), 500).found   # doctest: +SKIP
            {'cnn': {0: [array(...)], 1: [array(...)]}}
        """
        backends = {s.name: [self.pool.workers[w].backend for w in
                             self.catalog.placement[s.name] if w in self.pool.workers]
                    for s in specs}
        return RunCache(specs, backends, source, source.chunk_bounds(chunk_size))

    def signed(self, names: list[str], outputs: bool = False) -> list[ModelSpec]:
        """The specs of ``names``, each knowing its input (with ``outputs``, its outputs
        too): a model no load has taught it yet loads first, all in one round trip, each
        on one of its workers (the run's plan decides where else it loads).

        Example:
            >>> runs.signed(["exported"])[0].input_shape   # doctest: +SKIP
            (None, 8)
        """
        specs = self.catalog.specs(names)
        unknown = [s.name for s in specs if (s.input_shape is None and not s.inputs
                                             and s.preprocess is None)
                   or (outputs and s.output_specs is None)]
        if unknown:
            self.loads.load(unknown, main_only=True)
            specs = self.catalog.specs(names)
        return specs

    def finished(self, res: Prediction, later: dict[str, list[str]]) -> None:
        """A run was collected: forget it (it holds its Prediction's arrays), keep its
        summary, and load the replicas it left out (queued beside the run, these loads
        went ahead of its chunks: measured).

        Example:
            >>> runs.finished(res, later={})   # doctest: +SKIP
        """
        self._runs = [r for r in self._runs if not r.done]
        self.history.append({
            "time": time.time(), "models": res.models, "rows": res.n_rows,
            "chunk_size": res.chunk_size, "seconds": res.wall_seconds,
            "rows_per_second": {m: t["rows_per_second"] for m, t in res.timings.items()},
            "errors": len(res.errors)})
        self.loads.start_later(later)

    def running(self) -> list[PredictionRun]:
        """The runs submitted and not yet finished or cancelled, oldest first.

        Example:
            >>> runs.running()   # doctest: +SKIP
            []
        """
        self._runs = [r for r in self._runs if not r.done]
        return list(self._runs)

    def handoff(self, source):
        """On a local cluster, hand an ndarray over as a shared memory-mapped file.

        Called last in :meth:`submit`, once everything that can refuse the run has passed:
        the file takes RAM in ``/dev/shm`` until the run ends. A write that fails (a full
        disk) leaves no partial file: the array is scattered instead.

        Example:
            >>> type(runs.handoff(as_source(x))).__name__   # doctest: +SKIP
            'SharedArraySource'
        """
        from nbtool.prediction.sources import (ArraySource, SeveralSource, SharedArraySource,
            shared_folder)

        if isinstance(source, SeveralSource):   # each input's array, in place
            for key, part in source.parts.items():
                source.parts[key] = self.handoff(part)
            return source
        if not self.local or self.work_dir is None or type(source) is not ArraySource:
            return source
        folder = shared_folder(self.work_dir / "inputs", source.array.nbytes)
        self.shared_dirs.add(folder)
        before = set(os.listdir(folder)) if folder.is_dir() else set()
        try:
            shared = SharedArraySource(source.array, folder)
            shared.row_ids = source.row_ids
            return shared
        except OSError as e:
            for name in set(os.listdir(folder)) - before if folder.is_dir() else ():
                if name.startswith("input-"):
                    Path(folder, name).unlink(missing_ok=True)
            logger.warning("could not write the input to %s (%s); sending it to the "
                           "workers instead", folder, e)
            return source


def save_target(save):
    """Check ``save`` before anything runs: ``"*.zarr"`` (or ``"*.parquet"``, a Parquet
    dataset) gives the (not yet locked) :class:`~nbtool.prediction.store.ResultStore`;
    ``"*.npz"`` is checked writable (it is written at the end, by the run); None is nothing
    to save.

    Example:
        >>> save_target(None) is None, save_target("/tmp/p.npz") is None
        (True, True)
        >>> save_target("p.csv")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: save='p.csv': expected a path ending in .zarr or .parquet (a result store ...
    """
    if not save:
        return None
    suffix = str(save).lower().rsplit(".", 1)[-1]
    if suffix not in ("zarr", "parquet", "npz"):
        raise ValueError(f"save={save!r}: expected a path ending in .zarr or .parquet (a "
                         "result store written chunk by chunk, resumable) or .npz (written "
                         "once at the end).")
    from nbtool.prediction.store import check_npz_target, open_result_store

    if suffix == "npz":
        check_npz_target(save)
        return None
    store = open_result_store(save)
    store.check_target()   # a path that cannot be a store fails before models load
    return store


def open_store(store, specs: list[ModelSpec], source, chunk_size: int,
               run_id: str) -> dict[str, set[int]] | None:
    """Take ``store``'s writer lock for ``run_id`` (another run writing it is refused)
    and prepare it; returns the chunks it already holds per model (None without a store).

    Example:
        >>> open_store(save_target("p.zarr"), specs, source, 500, "3f2a9c1e")  # doctest: +SKIP
        {'cnn': {0, 1}}
    """
    if store is None:
        return None
    models = [(s.name, s.identity, list(s.output_specs), s.output_names) for s in specs]
    store.acquire(run_id)
    try:
        return store.prepare(models, source.fingerprint(), source.n_rows, chunk_size,
                             len(source.chunk_bounds(chunk_size)))
    except OSError as e:
        store.release()
        raise store.unwritable(e) from None
    except BaseException:
        store.release()
        raise


def remove_folders(shared_dirs: set[Path], work_dir: Path | None) -> None:
    """Remove an engine's input folders and its own work folder (``close`` and at exit).

    Example:
        >>> import tempfile; d = Path(tempfile.mkdtemp())
        >>> remove_folders({d}, None); d.exists()
        False
    """
    for folder in shared_dirs:
        shutil.rmtree(folder, ignore_errors=True)
    if work_dir is not None:
        shutil.rmtree(work_dir, ignore_errors=True)
