"""A kernel's side of a persistent engine it is attached to: :class:`AttachedCluster`
(keeps the registry on the scheduler, puts it back after a restart, notices the engine's
end), and the two errors of attaching, :class:`EngineNotRunning` and :class:`EngineInUse`.

An :class:`~nbtool.engine.engine.Engine` attached to a persistent engine holds an
:class:`AttachedCluster` where it would hold the cluster it started: closing the engine
only detaches, and every call first checks that the engine's process still runs.

Example:
    >>> str(EngineNotRunning("gpu", "there is no engine file")).split(". ")[0]
    "no persistent engine 'gpu' is running: there is no engine file"
"""

from __future__ import annotations

import asyncio

from nbtool._util import warn_user
from nbtool.engine.persist.engine_files import (EngineRecord, ended_note, engine_records,
    idle_words)
from nbtool.engine.persist.on_scheduler import STATE_KEY
from nbtool.errors import EngineNotRunning, NbtoolError


class AttachedCluster:
    """What an :class:`~nbtool.engine.engine.Engine` holds in place of a cluster it started:
    the persistent engine it is attached to. ``close()`` only detaches; the cluster and
    its models keep running until :func:`nbtool.shutdown` or the idle timeout.

    Example:
        >>> eng.cluster.name, eng.cluster.record.pid      # doctest: +SKIP
        ('default', 41234)
    """

    def __init__(self, record: EngineRecord, client):
        self.record = record
        self.name = record.name
        self.client = client
        self.gpu_note = ", ".join(n for n in (
            f"persistent {record.name!r} (ends after {idle_words(record.idle_timeout)} "
            "without a kernel)", record.note) if n)
        self._sent: bytes | None = None

    @property
    def dashboard_link(self) -> str | None:
        return self.record.dashboard

    def close(self) -> None:
        """Detach: the kernel's client is closed already, and that let go of the claim."""

    def check_running(self, engine) -> None:
        """Raise :class:`EngineNotRunning` (closing ``engine``) if the engine's process
        ended: a call would otherwise wait for the client to give up reconnecting.
        """
        if self.record.alive():
            return
        if not any(r.name == self.name for r in engine_records()) and \
                ended_note(self.name) is None:
            self.record.end(f"its process (pid {self.record.pid}) was gone: killed")
        from nbtool._util import cluster_gone

        with cluster_gone():
            engine.close()
        raise EngineNotRunning(self.name, f"it {ended_note(self.name) or 'ended'}")

    def save_state(self, catalog) -> None:
        """Keep ``catalog``'s registry and placement on the scheduler, if they changed.

        Called on every change (a registration, a placement, what a load learned). From
        the client's own event loop (a callback) the write is queued on it; elsewhere it
        is done before returning, so a kernel killed right after still left it there.
        """
        import cloudpickle

        try:
            blob = cloudpickle.dumps({"registry": list(catalog.registry),
                                      "placement": dict(catalog.placement)})
        except Exception as e:   # a preprocess that cannot travel cannot run either
            warn_user(f"the persistent engine {self.name!r} could not keep the registry "
                      f"({type(e).__name__}: {e}); after a restart, register again.")
            return
        if blob == self._sent:
            return
        self._sent = blob
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is self.client.loop.asyncio_loop:
            self.client.loop.add_callback(self.client.scheduler.set_metadata,
                                          keys=STATE_KEY, value=blob)
        else:
            self.client.set_metadata(STATE_KEY, blob)

    def restore(self, catalog) -> list[str]:
        """Put the registry and placement kept on the scheduler back into ``catalog``;
        models whose file changed while no kernel was attached are re-read (with a
        warning) or, when gone or broken now, unregistered (with the reason). Returns the
        names restored.
        """
        import pickle

        blob = self.client.get_metadata(STATE_KEY, default=None)
        if blob is not None:
            try:
                state = pickle.loads(blob)
            except Exception as e:
                warn_user(f"the registry kept by the persistent engine {self.name!r} could not "
                          f"be read ({type(e).__name__}: {e}); its models stay loaded on "
                          "the workers, but register them again to use them.")
                state = {"registry": [], "placement": {}}
            for spec in state["registry"]:
                catalog.registry.add(spec)
            catalog.set_placement({n: ws for n, ws in state["placement"].items()
                                   if n in catalog.registry})
            catalog.replan()
        for name in catalog.registry.names():
            try:
                catalog.refresh_changed([name])
            except NbtoolError as e:   # gone or broken now: nothing may serve the old copy
                catalog.registry.remove(name)
                catalog.placement.pop(name, None)
                warn_user(f"{e} (model {name!r} was unregistered when attaching)")
        self._sent = None
        catalog.on_change = lambda: self.save_state(catalog)
        catalog.on_change()
        return catalog.registry.names()
