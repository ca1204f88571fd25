"""The named workers of an engine: names <-> addresses, their status, work sent to one.

Workers are known by name (``cpu0``, ``gpu1``): a name survives a restart, an address does
not. Everything the engine sends to particular workers goes through here: a function run
on some of them now (:meth:`WorkerPool.run_on`), a task for one of them
(:meth:`WorkerPool.submit_to`, pinned by its resource, which cannot be stolen), and a
restart that waits for them to come back.

Example:
    >>> pool = WorkerPool(client)                    # doctest: +SKIP
    >>> pool.refresh()                               # doctest: +SKIP
    {'cpu0': WorkerInfo(name='cpu0', device='cpu:0', budget=...), ...}
    >>> pool.status()["cpu0"].models["cnn"].describe()   # doctest: +SKIP
    'loaded'
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from nbtool._util import planned_restart
from nbtool.catalog import WorkerInfo
from nbtool.errors import NbtoolError
from nbtool.wire import WorkerStatus, resource_name
from nbtool.worker import worker_status

#: Seconds after a restart during which a worker missing from the scheduler is waited for.
SETTLING_SECONDS = 30


class WorkerPool:
    """The workers of one Dask client, by name.

    Example:
        >>> pool = WorkerPool(client)                      # doctest: +SKIP
        >>> pool.run_on(unload_models, ["cnn"], names=["cpu0"])   # doctest: +SKIP
        {'cpu0': ['cnn']}
    """

    def __init__(self, client):
        self.client = client
        self.workers: dict[str, WorkerInfo] = {}   # name -> device and budget
        self.dask_names: dict[str, Any] = {}       # nbtool's name -> Dask's
        self.restarted_at = float("-inf")          # the last restart's time

    def refresh(self) -> dict[str, WorkerInfo]:
        """Ask every worker for its device and budget; returns them by worker name.

        Example:
            >>> sorted(pool.refresh())   # doctest: +SKIP
            ['cpu0', 'cpu1']
        """
        statuses = self.status()
        deadline = time.monotonic() + 10
        while not statuses and time.monotonic() < deadline:
            # Seen once in CI right after start(): the workers had registered but none was
            # listed yet; give them a moment before calling the cluster empty.
            time.sleep(0.2)
            statuses = self.status()
        self.workers = {name: WorkerInfo(name, s.device, s.budget, s.backend)
                        for name, s in sorted(statuses.items())}
        if not self.workers:
            raise NbtoolError("the cluster has no workers. Fix: start workers for the "
                              "scheduler (dask worker ADDRESS) or use nbtool.start() for a "
                              "local cluster.")
        return self.workers

    def addresses(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """Current address of each worker name (addresses change when workers restart).

        Example:
            >>> pool.addresses(["cpu0"])   # doctest: +SKIP
            {'cpu0': 'tls://127.0.0.1:40101'}
        """
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        by_name = {str(w["name"]): addr for addr, w in info.items()}
        # Dask matches restrictions against names as the workers gave them (an external
        # cluster may name workers 0, 1, ...); nbtool keeps them as strings.
        self.dask_names.update({str(w["name"]): w["name"] for w in info.values()})
        if names is None:
            return by_name
        return {n: by_name[n] for n in names if n in by_name}

    def restriction(self, names: Iterable[str]) -> list:
        """Worker names as Dask knows them, for ``workers=`` restrictions.

        Example:
            >>> pool.restriction(["cpu0"])   # doctest: +SKIP
            ['cpu0']
        """
        return [self.dask_names.get(n, n) for n in names]

    def memory_limits(self, names: Iterable[str]) -> list[int]:
        """The Dask memory limits (bytes) of these workers, where they have one.

        Example:
            >>> pool.memory_limits(["cpu0"])   # doctest: +SKIP
            [4000000000]
        """
        wanted = set(names)
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return [w["memory_limit"] for w in info.values()
                if str(w.get("name")) in wanted and w.get("memory_limit")]

    def run_on(self, func: Callable, *args, names: Iterable[str] | None = None,
               wait_settling: bool = False) -> dict[str, Any]:
        """Run ``func(*args)`` on the named workers (all by default) now, beside their
        tasks; returns each worker's answer by name (workers not listed now are left out).

        ``wait_settling``: within ``SETTLING_SECONDS`` of a restart, a known worker that
        the scheduler does not list at this instant (seen once in CI: re-registering
        after the restart) is waited for a few seconds rather than left out.

        Example:
            >>> pool.run_on(resident_models)   # doctest: +SKIP
            {'cpu0': {'cnn': '1048-1795...'}, 'cpu1': {}}
        """
        names = None if names is None else list(names)
        addrs = self.addresses(names)
        if wait_settling:
            wanted = set(names) if names is not None else set(self.workers)
            settling = time.monotonic() - self.restarted_at < SETTLING_SECONDS
            deadline = time.monotonic() + (5 if settling else 0)
            while wanted - set(addrs) and time.monotonic() < deadline:
                time.sleep(0.1)
                addrs = self.addresses(names)
        if not addrs:
            return {}
        raw = self.client.run(func, *args, workers=list(addrs.values()))
        back = {a: n for n, a in addrs.items()}
        return {back[a]: r for a, r in raw.items() if a in back}

    def status(self, names: Iterable[str] | None = None) -> dict[str, WorkerStatus]:
        """Each worker's :class:`~nbtool.wire.WorkerStatus` (all by default), by name.

        One round trip; a worker missing right after a restart is waited for a moment,
        otherwise a missing worker is missing (the dashboard asks every second and must
        not block).

        Example:
            >>> pool.status(["cpu0"])["cpu0"].resident_bytes   # doctest: +SKIP
            1048576
        """
        return self.run_on(worker_status, names=names, wait_settling=True)

    def submit_to(self, worker: str, func: Callable, *args, what: str) -> Any:
        """A task ``func(*args)`` for the worker named ``worker`` only; returns its future.

        Pinned by the worker's resource (it survives restarts and is never stolen);
        ``what`` names the task's key (``nbtool-<what>-...``) on the Dask dashboard.

        Example:
            >>> pool.submit_to("cpu0", load_model, spec, what="load-cnn").result().state  # doctest: +SKIP
            'loaded'
        """
        return self.client.submit(func, *args, resources={resource_name(worker): 1},
                                  pure=False,
                                  key=f"nbtool-{what}-{worker}-{time.monotonic_ns()}")

    def restart(self, names: list[str], timeout: float = 120) -> None:
        """Restart the named worker processes and wait until they are back.

        Example:
            >>> pool.restart(["cpu0"])   # doctest: +SKIP
        """
        with planned_restart():   # its outcome is what the caller says, not Dask's warnings
            self.client.restart_workers(self.restriction(names))
            self.wait_for(names, timeout)
        self.restarted_at = time.monotonic()

    def wait_for(self, names: list[str], timeout: float = 120) -> None:
        """Wait until every named worker is listed by the scheduler (after a restart).

        Example:
            >>> pool.wait_for(["cpu1"])   # doctest: +SKIP
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.addresses(names)) == len(names):
                return
            time.sleep(0.1)
        raise NbtoolError(f"workers {names} did not come back within {timeout:.0f}s after a "
                          "restart. Fix: look at the Dask dashboard or the worker logs "
                          "(eng.client.get_worker_logs()).")
