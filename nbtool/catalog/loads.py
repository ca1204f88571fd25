"""Loading and unloading models on the workers they are placed on.

:class:`Loads` starts loads (a task per model and worker, pinned by the worker's
resource), waits for them, soft-unloads (the workers drop the models) and hard-unloads
(the workers that held them restart, then load again what else they held).
:class:`BackgroundLoads` keeps the replica loads a run left for later.

Example:
    >>> loads = Loads(pool, catalog)                          # doctest: +SKIP
    >>> loads.load(["cnn"])["cnn"]["cpu0"].describe()         # doctest: +SKIP
    'loaded'
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from nbtool._util import warn_user
from nbtool.errors import ModelLoadError, NbtoolError
from nbtool.wire import ModelState, UnloadResult
from nbtool.worker import load_model, unload_models


class Loads:
    """The loads and unloads of the models in ``catalog`` (a
    :class:`~nbtool.catalog.catalog.Catalog`), through ``pool`` (a
    :class:`~nbtool.engine.pool.WorkerPool`); ``background`` holds the replica loads a run
    left for later. The only part of the kernel that talks to workers about models.

    Example:
        >>> loads.start_load(["cnn"])   # doctest: +SKIP
        {('cnn', 'cpu0'): <Future: pending, key: nbtool-load-cnn-cpu0-...>}
    """

    def __init__(self, pool, catalog):
        self.pool = pool
        self.catalog = catalog
        self.background = BackgroundLoads()

    def refresh(self, names) -> None:
        """Re-register the models among ``names`` whose file changed since they were
        registered (:meth:`~nbtool.catalog.catalog.Catalog.refresh_changed`), and drop
        the old copies from every worker, also when the file is gone (then it raises).

        Example:
            >>> loads.refresh(["cnn"])   # doctest: +SKIP
        """
        try:
            self.catalog.refresh_changed(names)
        finally:
            self.drop_replaced()

    def drop_replaced(self) -> None:
        """Soft-unload every model the catalog replaced from every worker (not only where
        it is placed now: an older placement may still hold it), and cancel its queued
        replica loads, so an old copy never serves.

        Example:
            >>> eng.catalog.register("cnn", "cnn_v2.keras"); loads.drop_replaced()  # doctest: +SKIP
        """
        names = self.catalog.take_replaced()
        if names:
            self.background.cancel(names)
            self.pool.run_on(unload_models, names)

    def start_later(self, later: dict[str, list[str]]) -> None:
        """Start the replica loads a run left out (model -> workers), without waiting.

        Example:
            >>> loads.start_later({"cnn": ["cpu1"]})   # doctest: +SKIP
        """
        self.background.start(later, functools.partial(self.load_on, what="replica"))

    def load_on(self, name: str, worker: str, what: str = "load"):
        """A task loading ``name`` on ``worker``; ``what`` names it (load, rewarm...).

        Example:
            >>> loads.load_on("cnn", "cpu1", "replica").result().loaded   # doctest: +SKIP
            True
        """
        return self.pool.submit_to(worker, load_model, self.catalog.registry.get(name),
                                   what=f"{what}-{name}")

    def start_load(self, names: list[str],
                   main_only: bool = False) -> dict[tuple[str, str], Any]:
        """Start loading models on their workers and return at once.

        Returns the futures by (model, worker); :meth:`load` is this plus waiting.
        ``main_only``: on each model's first worker only (enough to learn its signature;
        a run's plan decides where else it loads). A model
        whose file changed since it was registered is re-registered first (with a warning),
        so the new file is what loads.

        Example:
            >>> futures = eng.start_load("cnn")      # doctest: +SKIP
            >>> futures[("cnn", "cpu0")].result().state   # doctest: +SKIP
            'loaded'
        """
        self.refresh(names)
        placement = self.catalog.placement
        return {(spec.name, w): self.load_on(spec.name, w)
                for spec in self.catalog.specs(names)
                for w in placement[spec.name][:1 if main_only else None]}

    def load(self, names: list[str], main_only: bool = False) -> dict[str, dict[str, ModelState]]:
        """Load models now on every worker they are placed on (else they load on first use).

        Returns, per model and worker, the cache entry (:class:`~nbtool.wire.ModelState`:
        state, footprint, load seconds...). Raises :class:`~nbtool.errors.ModelLoadError`
        if any load fails; the others stay loaded. What a load learns of a model's
        signature (its input, its outputs) is kept: no run loads it again to learn it.

        Example:
            >>> eng.load("cnn", "mlp")["cnn"]["cpu0"].state   # doctest: +SKIP
            'loaded'
        """
        out: dict[str, dict[str, ModelState]] = {n: {} for n in names}
        failures = []
        for (name, w), fut in self.start_load(names, main_only).items():
            try:
                out[name][w] = state = fut.result()
            except ModelLoadError as e:
                failures.append(e)
                continue
            self.catalog.learn(name, state)
        if failures:
            raise failures[0]
        return out

    def unload(self, names: list[str], hard: bool = False) -> UnloadResult:
        """Unload models (all if ``None``) from the workers.

        Soft (default): the workers drop them and clear Keras' state; the memory becomes
        reusable inside those workers, and goes back to the device only where the backend
        gives it back (PyTorch's caching allocator does; TensorFlow's and JAX's keep it).
        ``hard=True``: the worker processes that held them restart (TensorFlow never
        returns memory otherwise) and the models they held that were not asked to go are
        loaded again; this includes workers that soft-unloaded or evicted the models
        earlier, since they still hold the memory. Returns the workers restarted (hard) or
        the models dropped (soft), as a list (an :class:`~nbtool.wire.UnloadResult`) that
        also says, per worker, the bytes it ``freed`` (measured on the worker: what the
        driver says on a GPU, RSS on CPU; for a hard unload, before the restart minus
        after it, before anything is loaded again) and whether that ``returns_memory``.

        Example:
            >>> eng.unload("cnn")                  # doctest: +SKIP
            ['cnn'] (freed: cpu0 12.1 MB; returns memory: cpu0 yes (12.1 MB of 12.6 MB))
            >>> eng.unload(hard=True)              # doctest: +SKIP
            ['cpu0', 'cpu1'] (freed: cpu0 812.0 MB, cpu1 790.2 MB; returns memory: ...)
        """
        self.catalog.specs(names)   # unknown names fail before anything happens
        self.background.cancel(names)   # a queued replica must not come back
        if hard:
            return self._hard_unload(names)
        # Every worker: an auto model placed again (another model took its room) may
        # still be held where it ran before.
        return UnloadResult.merged(self.pool.run_on(unload_models, names))

    def _hard_unload(self, names: list[str]) -> UnloadResult:
        registry = self.catalog.registry
        # Every process that ever loaded one of them still holds its memory, even after a
        # soft unload or an eviction: TensorFlow keeps what it allocated.
        holders = {w: s for w, s in self.pool.status().items()
                   if any(n in s.models for n in names)}
        if not holders:
            return UnloadResult([])
        keep = {w: [m for m in s.lru_order if m not in names and m in registry]
                for w, s in holders.items()}
        # What comes back is what the files hold now, never a copy of a file since re-saved;
        # a model whose file is gone or now refused stays unloaded (it says why on next use).
        for m in sorted({m for ms in keep.values() for m in ms}):
            try:
                self.refresh([m])
            except NbtoolError as e:
                keep = {w: [k for k in ms if k != m] for w, ms in keep.items()}
                warn_user(f"hard unload: model {m!r} is not loaded again: {e}")
        # A finished load still held here is a task the scheduler would run again on the
        # restarted workers (a finished task is recomputed while someone wants it): let go.
        self.background.release_done()
        self.pool.restart(sorted(holders))
        after = self.pool.status(sorted(holders))   # the restarted processes, still empty
        futures = [self.load_on(m, w, "rewarm") for w, ms in keep.items() for m in ms]
        # Gathered without raising: a raised error's traceback would keep these futures in
        # a reference cycle, and the next restart would run the loads again.
        self.pool.client.gather(futures, errors="skip")
        for fut in futures:
            if fut.status == "error":   # the unload asked for has happened: say, not raise
                warn_user(f"hard unload: a model the restarted workers held could not "
                          f"be loaded again (it loads on its next use or says why): "
                          f"{fut.exception()}")
        return hard_unload_result(holders, after)


def hard_unload_result(before: dict, after: dict) -> UnloadResult:
    """The workers a hard unload restarted, with what each process held before the restart
    minus what the new one holds (``WorkerStatus.held_memory``: what the driver says on a
    GPU, RSS on CPU); a new process gives everything back.

    Example:
        >>> from nbtool.wire import WorkerStatus
        >>> hard_unload_result({"cpu0": WorkerStatus("cpu0", "cpu:0", 1, held_memory=900)},
        ...                    {"cpu0": WorkerStatus("cpu0", "cpu:0", 1, held_memory=300)})
        ['cpu0'] (freed: cpu0 600 B; returns memory: cpu0 yes (a new process))
    """
    freed = {w: max(0, (s.held_memory or 0) - (after[w].held_memory or 0))
             for w, s in before.items() if w in after}
    return UnloadResult(sorted(before), freed, {w: "yes (a new process)" for w in freed})


class BackgroundLoads:
    """Replica loads left out of a run, started after it, by (model, worker).

    Keeping a load's future keeps its task (Dask forgets unreferenced ones); a replaced or
    unloaded model's queued loads are cancelled, so it does not come back. A finished load
    is let go at once: a finished task still wanted is one the scheduler runs again on a
    worker that restarts (a copy would come back into a process restarted to be empty).

    Example:
        >>> from concurrent.futures import Future
        >>> loads = BackgroundLoads()
        >>> loads.start({"cnn": ["cpu1"]}, lambda model, worker: Future())
        >>> sorted(loads.futures)
        [('cnn', 'cpu1')]
        >>> loads.cancel(["cnn"]); loads.futures
        {}
        >>> done = Future(); done.set_result("loaded")
        >>> loads.start({"mlp": ["cpu0"]}, lambda model, worker: done); loads.futures
        {}
    """

    def __init__(self):
        self.futures: dict[tuple[str, str], Any] = {}

    def start(self, later: dict[str, list[str]], load_on: Callable[[str, str], Any]) -> None:
        """Load these (model -> workers) without waiting, each with ``load_on(model,
        worker)`` (a load already queued is kept)."""
        self.futures = {k: f for k, f in self.futures.items() if not f.done()}
        for name, workers in later.items():
            for w in workers:
                if (name, w) not in self.futures:
                    future = self.futures[(name, w)] = load_on(name, w)
                    future.add_done_callback(functools.partial(self.forget, (name, w)))

    def forget(self, key: tuple[str, str], future) -> None:
        """Let go of a finished load (its done callback); errors show at the next use."""
        if self.futures.get(key) is future:
            self.futures.pop(key, None)
            getattr(future, "release", lambda: None)()

    def cancel(self, names) -> None:
        """Cancel the queued loads of these models."""
        for key in [k for k in self.futures if k[0] in names]:
            self.futures.pop(key).cancel()

    def release_done(self) -> None:
        """Let go of finished loads: a finished task still wanted is one the scheduler
        would run again on a restarted worker."""
        for key in [k for k, f in self.futures.items() if f.done()]:
            self.futures.pop(key).release()
