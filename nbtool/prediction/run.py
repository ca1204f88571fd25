"""Turn a prediction request into Dask work and its results into a :class:`Prediction`.

One ``dask.delayed`` task per (model, chunk), restricted (by worker *name*, which survives
restarts) to the workers that hold that model, in :class:`~nbtool.prediction.planning.RunOrder`. Results
are collected as they complete; assembly puts every chunk back at its rows.

The run knows nothing of the engine: whoever wants to hear that it finished (the engine,
for its history and the replicas it loads afterwards) subscribes with
:meth:`PredictionRun.add_done_callback`, as with a future.

Example:
    >>> run = PredictionRun(pool, [(spec, ["cpu0"])], as_source(x), chunk_size=100)  # doctest: +SKIP
    >>> run.submit(); res = run.collect()                                            # doctest: +SKIP
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Callable
import uuid

import dask
import numpy as np
from distributed import Future, as_completed

from nbtool._util import warn_user
from nbtool.errors import ChunkError, NbtoolError
from nbtool.prediction.planning import RunOrder
from nbtool.prediction.results import CombineError, Prediction, combine_outputs
from nbtool.prediction.sources import Source
from nbtool.wire import ChunkOutput, ModelSpec, StoreRef, resource_name
from nbtool.worker import predict_chunk


def _timings(chunks: list[tuple[int, ChunkOutput]], seconds: float, n_rows: int) -> dict:
    """The timings of one model's chunks: rows, seconds, rows/s, loads, workers.

    Example:
        >>> _timings([], 1.0, 10)["chunks"]
        0
    """
    rows = sum(r.rows for _, r in chunks)
    compute = sum(r.seconds for _, r in chunks)
    return {
        "seconds": seconds,
        "compute_seconds": compute,
        "rows": rows,
        "rows_per_second": rows / seconds if seconds > 0 else float("nan"),
        "load_seconds": sum(r.load_seconds for _, r in chunks),
        "chunks": len(chunks),
        "workers": sorted({r.worker for _, r in chunks}),
        "batch_size": chunks[0][1].batch_size if chunks else None,
    }


#: Seconds a cancelled run waits for the chunks already computing before it removes their
#: input file (they would fail reading it, with a FileNotFoundError in the worker logs).
CANCEL_GRACE = 5.0


def _tasks_of_run(suffix: str, dask_worker=None) -> int:
    """On a worker: how many tasks whose key ends with ``suffix`` it still runs (a
    cancelled task keeps executing until its function returns)."""
    running = ("executing", "long-running", "cancelled", "resumed")
    return sum(1 for ts in dask_worker.state.tasks.values()
               if str(ts.key).endswith(suffix) and ts.state in running)


class PredictionRun:
    """One prediction in flight: its tasks, their futures, and the bookkeeping to assemble.

    ``pool`` is the engine's :class:`~nbtool.engine.pool.WorkerPool`; ``placements`` pairs each
    model's spec with the workers its chunks go to. ``store`` is an open
    :class:`~nbtool.prediction.store.ResultStore` (its writer lock held for ``run_id``) and
    ``stored`` the chunks it holds already, per model; ``save`` a ``.npz`` path the
    outputs are written to once assembled.

    Example:
        >>> run = PredictionRun(pool, placements, source, 512, combine="mean")  # doctest: +SKIP
        >>> run.add_done_callback(lambda res: print(res.n_rows))                # doctest: +SKIP
        >>> run.submit(); res = run.collect()                                   # doctest: +SKIP
        2000
    """

    def __init__(self, pool, placements: list[tuple[ModelSpec, list[str]]], source: Source,
                 chunk_size: int, *, combine: str | None = "mean", store=None,
                 stored: dict[str, set[int]] | None = None, save: str | None = None,
                 run_id: str | None = None, partial_combine: bool = False, cache=None):
        self.pool = pool
        self.client = pool.client
        self.placements = placements
        self.source = source
        self.chunk_size = chunk_size
        self.combine = combine
        # False: combined only when every model succeeded on every row (a mean of the
        # survivors passed off as the ensemble is wrong without a sign).
        self.partial_combine = bool(partial_combine)
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.bounds = source.chunk_bounds(chunk_size)
        self.futures = []
        self._scattered = []       # inputs sent to the workers for this run (released with it)
        self._all_done = threading.Event()
        self._pending = 0
        self._count_lock = threading.Lock()
        self.cancelled = False
        self._task_of = {}         # future key -> (model, chunk index)
        self.started = None
        self.finished = 0
        # worker name -> device label, for the report
        self.devices = {name: w.device for name, w in pool.workers.items()}
        self._callbacks: list[Callable[[Prediction], None]] = []
        self.result: Prediction | None = None
        self.store = store                     # a ResultStore, or None
        self.stored = stored or {}             # model -> chunks already in the store
        self.save = save                       # a .npz path, written once at the end
        self.cache = cache                     # a RunCache (cache=True), or None
        # model -> {chunk: outputs} read from the output cache: skipped as stored ones are
        self.cached = cache.found if cache is not None else {}

    def add_done_callback(self, fn: Callable[[Prediction], None]) -> None:
        """Call ``fn(prediction)`` when the run is collected (at once if it is already).

        Called in the thread that collects, once; a cancelled run never calls it.

        Example:
            >>> run.add_done_callback(history.append)   # doctest: +SKIP
        """
        if self.result is not None:
            fn(self.result)
        else:
            self._callbacks.append(fn)

    def submit(self) -> list:
        """Build the delayed graph (model x chunk) and send it to the cluster."""
        names = list(dict.fromkeys(w for _, ws in self.placements for w in ws))
        workers = self.pool.restriction(names)   # as Dask knows them
        args = self.source.chunk_args(self.client, workers, self.chunk_size)
        order = RunOrder(self.placements, self.pool.workers, len(args))
        tasks, keys = [], []
        for m, (spec, names) in enumerate(self.placements):
            done = self.stored.get(spec.name, set()) | set(self.cached.get(spec.name, ()))
            for i, chunk in enumerate(args):
                if i in done:      # in the result store or the output cache: not recomputed
                    continue
                data, start, stop = self.source.task_args(spec.name, chunk)
                # Each chunk goes to one of the model's workers, in turn (offset per model
                # so an ensemble's first chunks start on every worker at once). The worker
                # is named by its resource, which survives restarts and cannot be stolen.
                worker = names[(i + m) % len(names)]
                key = f"nbtool-{spec.name}-{i}-{self.run_id}"
                ref = StoreRef(self.store.path, self.bounds[i][0], self.run_id) \
                    if self.store else None
                # Chunk i of every model before chunk i+1 of any, or model after model
                # where the budget cannot hold them all (RunOrder; Dask runs higher
                # priorities first).
                priority, ahead = order.task(m, i, worker)
                with dask.annotate(resources={resource_name(worker): 1}, priority=priority):
                    tasks.append(dask.delayed(predict_chunk, pure=False)(
                        spec, data, start, stop, i, ref, ahead, dask_key_name=key))
                keys.append((spec.name, i))
        self._scattered = list({d.key: d for d in self.source.scattered(args)
                                if isinstance(d, Future)}.values())
        self.started = time.perf_counter()
        self.futures = self.client.compute(tasks, optimize_graph=False)
        self._task_of = {f.key: k for f, k in zip(self.futures, keys)}
        self._pending = len(self.futures)
        if not self.futures:
            self._all_done.set()
        for f in self.futures:
            f.add_done_callback(self._one_done)
        return self.futures

    def _one_done(self, _future) -> None:
        with self._count_lock:
            self._pending -= 1
            if self._pending <= 0:
                self._all_done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every task has finished (or failed), at most ``timeout`` seconds;
        True if they have.

        An event, not ``distributed.wait(..., timeout=)``: each timeout of that leaves the
        futures in a reference cycle (its TimeoutError's traceback) that keeps every task
        of the run wanted until the garbage collector runs, so a hard unload in between
        made the scheduler compute the finished run again on the restarted workers.

        Example:
            >>> while not run.wait(0.2): print(run.progress())   # doctest: +SKIP
        """
        return self._all_done.wait(timeout) or self.done

    def progress(self) -> dict[str, tuple[int, int]]:
        """Per model: (chunks finished, chunks in all), read from the futures' states."""
        if self.finished:
            return {spec.name: (len(self.bounds), len(self.bounds)) for spec, _ in self.placements}
        done = {spec.name: len(self.stored.get(spec.name, ())) +
                len(self.cached.get(spec.name, ())) for spec, _ in self.placements}
        for f in self.futures:
            if f.status in ("finished", "error", "cancelled"):
                done[self._task_of[f.key][0]] += 1
        return {m: (n, len(self.bounds)) for m, n in done.items()}

    def collect(self) -> Prediction:
        """Wait for every task, keep what succeeded, and assemble the :class:`Prediction`.

        Then everything of the run is let go: its tasks (the scheduler forgets them, so
        nothing recomputes them after a worker restart), the result store's writer lock
        and the input's shared file. If waiting fails or is interrupted, the run is
        cancelled. A second call returns the same Prediction.
        """
        if self.result is not None:
            return self.result
        if self.cancelled:
            raise NbtoolError(f"prediction run {self.run_id} was cancelled, so it has no "
                              "result. Fix: run the prediction again.")
        try:
            result = self._collect()
            if self.cancelled:   # cancelled from another thread while this one waited
                raise NbtoolError(f"prediction run {self.run_id} was cancelled while it "
                                  "ran, so it has no result. Fix: run the prediction again.")
            self.result = result
        except BaseException:
            self.cancel()   # interrupted or failed: nothing of it keeps running or held
            raise
        finally:
            self._release()
        if self.save:
            self._save_npz(self.result)
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self.result)
        return self.result

    def _save_npz(self, res: Prediction) -> None:
        """Write the outputs to ``save``; a failure is kept in the result, never loses it."""
        try:
            res.save(self.save)
        except OSError as e:   # checked before the run; still, never lose the result
            err = NbtoolError(f"save={self.save!r}: writing the results failed ({e}); they "
                              "are kept in this Prediction. Fix: res.save('other.npz').")
            res.errors.append(err)
            warn_user(str(err))

    def cancel(self) -> None:
        """Stop the run and let go of everything it holds: its tasks are cancelled (one
        already computing finishes, but writes nothing to a result store), the store's
        writer lock is released and the input's shared file removed.

        Example:
            >>> run = eng.submit(["cnn"], x); run.cancel()   # doctest: +SKIP
        """
        if self.result is None:
            self.cancelled = True
        self._release()

    def _release(self) -> None:
        """Let go of the run's futures (explicitly: the scheduler forgets the keys even if
        a stray reference to a future lives on somewhere), the store lock, the input file."""
        futures, self.futures = self.futures, []
        scattered, self._scattered = self._scattered, []
        in_flight = any(not f.done() for f in futures)
        if futures or scattered:
            try:
                self.client.cancel(futures + scattered)
            except Exception:   # the client is closing: the scheduler forgets them with it
                pass
        self._all_done.set()
        cleanup = getattr(self.source, "cleanup", None)
        if in_flight and (cleanup is not None or self.store is not None):
            # Cancelled mid-run: a chunk already computing goes on (a thread cannot be
            # stopped). It reads the input file piece by piece, and writes to the store
            # only while this run holds it: the file goes, and the lock, after them.
            self._wait_for_workers_to_drop()
        if self.store is not None:
            self.store.release()
        if cleanup is not None:
            cleanup()

    def _wait_for_workers_to_drop(self, timeout: float = CANCEL_GRACE) -> None:
        """Wait (at most ``timeout`` s) until no worker still runs a task of this run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                busy = self.client.run(_tasks_of_run, f"-{self.run_id}")
            except Exception:   # workers gone or the client closing: nothing to wait for
                return
            if not any(busy.values()):
                return
            time.sleep(0.05)

    def _collect(self) -> Prediction:
        results: dict[tuple[str, int], ChunkOutput] = {}
        errors: list[Exception] = []
        finished_at: dict[str, float] = {}
        for batch in as_completed(self.futures).batches():
            for future, value in zip(batch, self._outcomes(batch)):
                model, chunk = self._task_of[future.key]
                finished_at[model] = time.perf_counter()
                if isinstance(value, ChunkOutput):
                    results[(model, chunk)] = value
                    for note in value.notes:   # a fallback to TensorFlow: said once
                        warn_user(note)
                    if self.cache is not None:   # kept as it arrives: an interrupted run keeps it
                        self.cache.store(model, chunk, value.outputs)
                else:   # the task raised, or Dask gave up on it (a worker or the cluster died)
                    errors.append(value if isinstance(value, ChunkError) else ChunkError(
                        model, chunk, self.bounds[chunk], None,
                        f"{type(value).__name__}: {value}"))
        wall = time.perf_counter() - self.started
        self.finished = len(self.futures)
        if self.cache is not None:
            self.cache.finish()
        errors.sort(key=lambda e: (getattr(e, "model", ""), getattr(e, "chunk", 0)))
        # Assembled before the lock goes: a store's completed chunks are read under it.
        return self._assemble(results, errors, finished_at, wall)

    def _outcomes(self, batch: list) -> list:
        """Each finished future's result, or its exception: the results in one round trip.

        Fetched here rather than by ``as_completed(with_results=True)``: when the cluster
        goes away mid-run (a persistent engine killed), Dask drops a future whose result it
        could not fetch and that iterator then waits for ever; here the error comes back.
        """
        ok = [f for f in batch if f.status == "finished"]
        try:
            got = dict(zip([f.key for f in ok], self.client.gather(ok))) if ok else {}
        except Exception as e:
            if self.client.status != "running":   # the cluster is gone: so is every chunk
                return [e] * len(batch)
            got = {}   # a result was lost with its worker: Dask computes it again
        return [got[f.key] if f.key in got else self._outcome(f) for f in batch]

    def _outcome(self, future):
        """One future's result or exception, waiting while Dask computes it again (its
        worker died); an error as soon as the cluster itself is gone."""
        while self.client.status == "running":
            try:
                return future.result(timeout=5)
            except TimeoutError:   # still being computed again
                continue
            except Exception as e:   # the task's own error, or cancelled
                return e
        return ConnectionError("the cluster went away before this chunk's result came back")

    @property
    def done(self) -> bool:
        """True once every task has finished (or failed); ``collect()`` will not wait."""
        return bool(self.finished) or self.cancelled or all(f.done() for f in self.futures)

    # -- assembling the outputs: every chunk back at its rows, timings, the ensemble --

    def _combine(self, outputs: dict):
        """The ensemble of single-output models, or of models whose outputs agree in
        names (a dict by output name, each combined); a :class:`CombineError` if
        impossible. One model alone is nothing to combine: its several outputs are no
        failure."""
        done = [(s, outputs[s.name]) for s, _ in self.placements if outputs[s.name] is not None]
        multi = [s for s, outs in done if len(outs) > 1]
        if multi and len(self.placements) == 1:
            return None
        if not multi:
            singles = [np.asarray(outs[0]) for _, outs in done]
            return combine_outputs(singles, self.combine) if singles else None
        names = {s.name: s.output_names for s, _ in done}
        if len(multi) < len(done) or None in names.values() or len(set(names.values())) > 1:
            raise CombineError(self.combine, "the models' outputs differ (several outputs "
                               "combine per name, where every model names the same "
                               "outputs): " + "; ".join(
                f"{m!r} has {len(outputs[m])} output(s)" +
                (f" named {list(n)}" if n else " without names") for m, n in names.items()))
        order = next(iter(names.values()))
        combined = {}
        for k, name in enumerate(order):
            try:
                combined[name] = combine_outputs([np.asarray(outs[k]) for _, outs in done],
                                                 self.combine)
            except CombineError as e:
                raise CombineError(self.combine, f"output {name!r}: {e.reason}") from None
        return combined

    def _assemble(self, results, errors, finished_at, wall) -> Prediction:
        outputs, timings = {}, {}
        n = self.source.n_rows
        for spec, _ in self.placements:
            mine = [(i, results[(spec.name, i)]) for i in range(len(self.bounds))
                    if (spec.name, i) in results]
            timings[spec.name] = _timings(mine, finished_at.get(spec.name, self.started)
                                          - self.started, n)
            timings[spec.name]["resumed_chunks"] = len(self.stored.get(spec.name, ()))
            cached = self.cached.get(spec.name, {})
            timings[spec.name]["cached_chunks"] = len(cached)
            timings[spec.name]["devices"] = sorted({self.devices.get(w, w) for w in
                                                    timings[spec.name]["workers"]})
            if self.store is not None:   # the chunks stay on disk, read where indexed
                stored = self.store.completed(spec.name)
                outputs[spec.name] = self.store.arrays(spec.name) if stored else None
                continue
            chunks = {**{i: r.outputs for i, r in mine}, **cached}
            if not chunks:
                outputs[spec.name] = None
                continue
            complete = len(chunks) == len(self.bounds)
            template = next(iter(chunks.values()))
            arrays = []
            for k, t in enumerate(template):
                dtype = t.dtype if complete or t.dtype.kind in "fc" else np.float64
                out = np.empty((n, *t.shape[1:]), dtype) if complete else \
                    np.full((n, *t.shape[1:]), np.nan, dtype)
                for i, outs in chunks.items():
                    a, b = self.bounds[i]
                    out[a:b] = outs[k]
                arrays.append(out)
            outputs[spec.name] = arrays
        combined, note = None, self._combine_note(errors, outputs)
        if self.combine is None or (note is not None and not self.partial_combine):
            pass   # never a combine of the survivors passed off as the ensemble
        elif self.store is not None:
            # On first access: reading every stored output is the caller's choice.
            combined = functools.partial(self._combine, outputs)
        else:
            try:
                combined = self._combine(outputs)
            except CombineError as e:
                errors.append(e)
        return Prediction([s.name for s, _ in self.placements], outputs, combined=combined,
                          combine=self.combine, timings=timings, errors=errors, n_rows=n,
                          chunk_size=self.chunk_size, wall_seconds=wall,
                          source=self.source, combined_note=note,
                          store_path=self.store.path if self.store is not None else None,
                          store_runs=self.store.runs() if self.store is not None else None,
                          output_names={s.name: s.output_names for s, _ in self.placements},
                          row_ids=self.source.row_ids)

    def _combine_note(self, errors: list, outputs: dict) -> str | None:
        """Why ``combined`` is missing (or, with ``partial_combine``, what it leaves out)
        when a model failed on some of its chunks; None when every model has every row."""
        if self.combine is None:
            return None
        failed: dict[str, set[int]] = {}
        for e in errors:
            if isinstance(e, ChunkError):
                failed.setdefault(e.model, set()).add(e.chunk)
        for spec, _ in self.placements:   # no output at all, whatever the errors say
            if outputs.get(spec.name) is None and spec.name not in failed:
                failed[spec.name] = set(range(len(self.bounds)))
        if not failed:
            return None
        n = len(self.bounds)
        what = ", ".join(f"model {m!r} failed on {len(c)} of {n} chunk{'s' * (n != 1)}"
                         for m, c in failed.items())
        if self.partial_combine:
            return (f"combined is partial (partial_combine=True): {what}; on those rows it "
                    "combines the other models only (NaN, or -1 for a vote, where none succeeded)")
        return (f"combined is not available: {what}; pass partial_combine=True to combine "
                "the others")
