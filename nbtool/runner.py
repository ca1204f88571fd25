"""Turn a prediction request into Dask work and its results into a :class:`Prediction`.

One ``dask.delayed`` task per (model, chunk), restricted (by worker *name*, which survives
restarts) to the workers that hold that model. Results are collected as they complete, so a
chunk that fails costs only itself; assembly puts every chunk back at its rows.

Example:
    >>> run = PredictionRun(client, [(spec, ["cpu0"])], as_source(x), chunk_size=100)  # doctest: +SKIP
    >>> run.submit(); res = run.collect()                                              # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import threading
import time
import uuid

import dask
import numpy as np
from distributed import Future, as_completed

from .errors import ChunkError, InputMismatch, NbtoolError
from .wire import ModelSpec
from .results import CombineError, Prediction, combine_outputs
from .sources import DaskSource, Source
from .store import StoreRef
from .wire import ChunkOutput
from .worker import predict_chunk, resource_name

#: Default chunks per worker: enough to balance replicas and overlap, few enough that the
#: per-task overhead (a few ms) stays small against the work.
CHUNKS_PER_WORKER = 4
MIN_DEFAULT_CHUNK = 256
#: Seconds a cancelled run waits for the chunks already computing before it removes their
#: input file (they would fail reading it, with a FileNotFoundError in the worker logs).
CANCEL_GRACE = 5.0


def _tasks_of_run(suffix: str, dask_worker=None) -> int:
    """On a worker: how many tasks whose key ends with ``suffix`` it still runs (a
    cancelled task keeps executing until its function returns)."""
    running = ("executing", "long-running", "cancelled", "resumed")
    return sum(1 for ts in dask_worker.state.tasks.values()
               if str(ts.key).endswith(suffix) and ts.state in running)


def check_fits(spec: ModelSpec, source: Source) -> None:
    """Raise :class:`InputMismatch` if the input's rows or dtype do not fit the model.

    Nothing is scheduled before this passes. Unknown dimensions (``None``) match anything;
    a model with ``preprocess`` is not checked (the preprocessing may reshape).

    Example:
        >>> from nbtool.sources import as_source
        >>> spec = ModelSpec("mlp", "mlp.h5", "h5", 1, "x", input_shape=(None, 8),
        ...                  input_dtype="float32")
        >>> check_fits(spec, as_source(np.zeros((4, 3))))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.InputMismatch: model 'mlp' (mlp.h5) expects rows of shape (8,)...
    """
    pre = spec.preprocess
    if pre is not None and getattr(pre, "input_dtype", None) is not None:
        _check_preprocess_input(spec, pre, source)
        return
    if pre is not None or spec.input_shape is None:
        return
    want = spec.input_row_shape
    got = tuple(source.row_shape)
    fits = len(want) == len(got) and all(w is None or w == g for w, g in zip(want, got))
    if not fits:
        shown = tuple("?" if w is None else w for w in want)
        fix = _reshape_fix(tuple(want), got, source.n_rows)
        raise InputMismatch(spec.name, spec.path,
                            f"rows of shape {shown} (batch shape {spec.input_shape})",
                            f"rows of shape {got} from {source.describe()}", fix)
    want_dtype = np.dtype(spec.input_dtype or "float32")
    if not np.can_cast(source.dtype, want_dtype, casting="same_kind"):
        raise InputMismatch(spec.name, spec.path, f"{want_dtype} input",
                            f"{source.dtype} from {source.describe()}",
                            f"convert it first, e.g. x.astype('{want_dtype}')")


def _reshape_fix(want: tuple, got: tuple, n_rows: int) -> str:
    """The fix for rows of shape ``got`` where a model wants ``want``: a reshape only when
    one really gives whole rows, never one that would fail or scramble the values."""
    other = "pick a model made for this input"
    if None in want:
        return f"reshape the input to rows of that shape, or {other}"
    shape = ", ".join(map(str, want))
    row, per = math.prod(want), math.prod(got)
    if got and per == row:   # same values per row, other layout (e.g. images flattened)
        return f"reshape the input to rows of that shape, e.g. x.reshape(len(x), {shape})"
    if not got:   # a 1-D array: its n_rows values are one row, or several, or neither
        if n_rows == row:
            one = "x.reshape(1, -1) (or x[None])" if len(want) == 1 else \
                f"x.reshape(1, {shape})"
            return f"for one row, use {one}"
        if n_rows % row == 0:
            return (f"for {n_rows // row} rows of {row} values, use x.reshape(-1, {shape}), "
                    f"or {other}")
        return (f"your 1-D array has {n_rows} values, not a whole number of rows of {row}: "
                f"check how it was built, or {other}")
    return (f"your rows hold {per} values each and the model's hold {row}, so no reshape "
            f"fits: {other}, or check how the input was built")


def _check_preprocess_input(spec: ModelSpec, pre, source: Source) -> None:
    """Inputs for an in-graph preset: its dtype, and the model's rows (or any size if it
    resizes, with the model's channels)."""
    want = np.dtype(pre.input_dtype)
    if not np.can_cast(source.dtype, want, casting="safe"):
        raise InputMismatch(spec.name, spec.path, f"{want} input for its preprocessing "
                            f"{getattr(pre, 'name', pre)!r}", f"{source.dtype} from "
                            f"{source.describe()}", f"pass {want} pixels (0-255), or register "
                            "it without preprocess=")
    if spec.input_shape is None:
        return
    model_rows, got = tuple(spec.input_row_shape), tuple(source.row_shape)
    if getattr(pre, "resize", None) is not None:
        ok = len(got) == len(model_rows) and got[-1:] == model_rows[-1:]
    else:
        ok = len(got) == len(model_rows) and all(w is None or w == g
                                                 for w, g in zip(model_rows, got))
    if not ok:
        raise InputMismatch(spec.name, spec.path, f"rows of shape {model_rows}",
                            f"rows of shape {got} from {source.describe()}",
                            "resize the input, or use a preset with resize=(height, width)")


def default_chunk_size(n_rows: int, n_workers: int) -> int:
    """Rows per chunk when the user gives none.

    Example:
        >>> default_chunk_size(100_000, 2), default_chunk_size(100, 2)
        (12500, 100)
    """
    size = math.ceil(n_rows / (CHUNKS_PER_WORKER * max(n_workers, 1)))
    return int(min(n_rows, max(size, MIN_DEFAULT_CHUNK)))


def resolve_chunk_size(chunk_size, source: Source, n_workers: int,
                       max_chunk_bytes: int | None = None) -> int:
    """Validate a user's ``chunk_size`` (or pick one) for this source.

    ``max_chunk_bytes`` is what one chunk's rows may take on a worker; a default chunk is
    shrunk to fit it, a user's chunk that does not fit is refused with the size that does.
    """
    fits = max(1, max_chunk_bytes // max(source.row_nbytes, 1)) if max_chunk_bytes else None
    if chunk_size is None:
        if isinstance(source, DaskSource):
            size = source.natural_chunk_size()
        else:
            size = default_chunk_size(source.n_rows, n_workers)
        return min(size, fits) if fits else size
    if fits and isinstance(chunk_size, (int, np.integer)) and not isinstance(chunk_size, bool) \
            and min(chunk_size, source.n_rows) > fits:
        raise InputMismatch(None, None, f"chunks that fit a worker's memory (at most {fits:,} "
                            f"rows of {source.row_nbytes:,} bytes)",
                            f"chunk_size={chunk_size:,}, {chunk_size * source.row_nbytes:,} "
                            "bytes a chunk", f"pass chunk_size={fits} or less")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise InputMismatch(None, None, "chunk_size to be a whole number of rows >= 1",
                            f"chunk_size={chunk_size!r}",
                            "pass e.g. chunk_size=1024, or leave it out to let nbtool pick")
    return int(min(chunk_size, source.n_rows))


class PredictionRun:
    """One prediction in flight: its tasks, their futures, and the bookkeeping to assemble.

    Example:
        >>> run = PredictionRun(client, placements, source, 512, combine="mean")  # doctest: +SKIP
        >>> run.submit()                                                          # doctest: +SKIP
        >>> res = run.collect()                                                   # doctest: +SKIP
    """

    def __init__(self, client, placements: list[tuple[ModelSpec, list[str]]], source: Source,
                 chunk_size: int, combine: str | None = "mean",
                 devices: dict[str, str] | None = None, on_done=None, store=None,
                 done: dict[str, set[int]] | None = None, dask_names: dict | None = None,
                 run_id: str | None = None, partial_combine: bool = False):
        self.client = client
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
        self.devices = devices or {}   # worker name -> device label, for the report
        self.on_done = on_done         # called with the Prediction once it is assembled
        self.result: Prediction | None = None
        self.store = store                     # a ResultStore, or None
        self.dask_names = dask_names or {}     # nbtool's worker name -> Dask's
        self.stored = done or {}               # model -> chunks already in the store

    def submit(self) -> list:
        """Build the delayed graph (model x chunk) and send it to the cluster."""
        names = list(dict.fromkeys(w for _, ws in self.placements for w in ws))
        workers = [self.dask_names.get(w, w) for w in names]   # as Dask knows them
        args = self.source.chunk_args(self.client, workers, self.chunk_size)
        tasks, keys = [], []
        for m, (spec, names) in enumerate(self.placements):
            done = self.stored.get(spec.name, set())
            for i, (data, start, stop) in enumerate(args):
                if i in done:      # already in the result store: not recomputed
                    continue
                # Each chunk goes to one of the model's workers, in turn (offset per model
                # so an ensemble's first chunks start on every worker at once). The worker
                # is named by its resource, which survives restarts and cannot be stolen.
                worker = names[(i + m) % len(names)]
                key = f"nbtool-{spec.name}-{i}-{self.run_id}"
                ref = StoreRef(self.store.path, self.bounds[i][0], self.run_id) \
                    if self.store else None
                with dask.annotate(resources={resource_name(worker): 1}):
                    tasks.append(dask.delayed(predict_chunk, pure=False)(
                        spec, data, start, stop, i, ref, dask_key_name=key))
                keys.append((spec.name, i))
        self._scattered = list({d.key: d for d, _, _ in args if isinstance(d, Future)}.values())
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
        done = {spec.name: len(self.stored.get(spec.name, ())) for spec, _ in self.placements}
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
        if self.on_done is not None:
            self.on_done(self.result)
        return self.result

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
        for future, value in as_completed(self.futures, with_results=True,
                                          raise_errors=False):
            model, chunk = self._task_of[future.key]
            finished_at[model] = time.perf_counter()
            if isinstance(value, tuple) and len(value) == 3 and \
                    isinstance(value[1], BaseException):   # an erred task: (type, exc, tb)
                value = value[1]
            if isinstance(value, ChunkOutput):
                results[(model, chunk)] = value
            else:   # the task raised, or Dask gave up on it (e.g. a worker died)
                errors.append(value if isinstance(value, ChunkError) else ChunkError(
                    model, chunk, self.bounds[chunk], None,
                    f"{type(value).__name__}: {value}"))
        wall = time.perf_counter() - self.started
        self.finished = len(self.futures)
        errors.sort(key=lambda e: (getattr(e, "model", ""), getattr(e, "chunk", 0)))
        # Assembled before the lock goes: a store's completed chunks are read under it.
        return self._assemble(results, errors, finished_at, wall)

    @property
    def done(self) -> bool:
        """True once every task has finished (or failed); ``collect()`` will not wait."""
        return bool(self.finished) or self.cancelled or all(f.done() for f in self.futures)

    def _combine(self, outputs: dict):
        """The ensemble of single-output models; a :class:`CombineError` if impossible."""
        singles = [np.asarray(outputs[s.name][0]) for s, _ in self.placements
                   if outputs[s.name] is not None and len(outputs[s.name]) == 1]
        multi = [s.name for s, _ in self.placements
                 if outputs[s.name] is not None and len(outputs[s.name]) > 1]
        if multi:
            raise CombineError(self.combine, f"model(s) {multi} have several outputs")
        return combine_outputs(singles, self.combine) if singles else None

    def _assemble(self, results, errors, finished_at, wall) -> Prediction:
        outputs, timings = {}, {}
        n = self.source.n_rows
        for spec, _ in self.placements:
            mine = [(i, results[(spec.name, i)]) for i in range(len(self.bounds))
                    if (spec.name, i) in results]
            timings[spec.name] = _timings(mine, finished_at.get(spec.name, self.started)
                                          - self.started, n)
            timings[spec.name]["resumed_chunks"] = len(self.stored.get(spec.name, ()))
            timings[spec.name]["devices"] = sorted({self.devices.get(w, w) for w in
                                                    timings[spec.name]["workers"]})
            if self.store is not None:   # the chunks stay on disk, read where indexed
                stored = self.store.completed(spec.name)
                outputs[spec.name] = self.store.arrays(spec.name) if stored else None
                continue
            if not mine:
                outputs[spec.name] = None
                continue
            complete = len(mine) == len(self.bounds)
            template = mine[0][1].outputs
            arrays = []
            for k, t in enumerate(template):
                dtype = t.dtype if complete or t.dtype.kind in "fc" else np.float64
                out = np.empty((n, *t.shape[1:]), dtype) if complete else \
                    np.full((n, *t.shape[1:]), np.nan, dtype)
                for i, r in mine:
                    a, b = self.bounds[i]
                    out[a:b] = r.outputs[k]
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
        return Prediction([s.name for s, _ in self.placements], outputs, combined,
                          self.combine, timings, errors, n, self.chunk_size, wall,
                          source=self.source, combined_note=note,
                          store_path=self.store.path if self.store is not None else None,
                          store_runs=self.store.runs() if self.store is not None else None)

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


def _timings(chunks: list[tuple[int, ChunkOutput]], seconds: float, n_rows: int) -> dict:
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
