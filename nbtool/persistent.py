"""Engines that outlive the kernel: ``start(persist=True)``, ``attach()``, ``running()``,
``shutdown()``.

A kernel restart (a changed import, a stuck cell, a memory blow-up) used to end the
cluster with it: the next start paid worker start-up, a TensorFlow import per worker and
every model load again. A persistent engine's cluster runs in a process of its own
(:mod:`nbtool.persist_server`) and the kernel only attaches to it. What the kernel knows
(the registered models with their fingerprints, and where they are placed) is kept on the
cluster's scheduler as it changes; the workers keep their loaded models, chosen runtimes
and batch sizes. After a restart, ``nbtool.attach()`` finds it all as it was, and the next
prediction is warm.

Only its owner gets in: the engine file with the cluster's address and TLS credentials is
readable by this user alone (:mod:`nbtool.engine_files`), and every connection to the
cluster must present that certificate. One kernel is attached at a time: a second is told
which kernel holds it. With no kernel attached for ``idle_timeout`` (30 minutes by
default, ``NBTOOL_IDLE_TIMEOUT``), the engine ends by itself.

Example:
    >>> eng = nbtool.start(persist=True)           # doctest: +SKIP
    >>> eng.register("cnn", "models/cnn.keras"); eng.load("cnn")   # doctest: +SKIP
    >>> # ... the kernel restarts ...
    >>> eng = nbtool.attach()                      # doctest: +SKIP
    >>> eng.models()                               # cnn: loaded, as before   # doctest: +SKIP
    >>> nbtool.shutdown()                          # doctest: +SKIP
    "'default' ended at ..., shut down by nbtool.shutdown() from pid ..."
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

from .engine_files import (EngineRecord, check_name, engine_records, ended_note, idle_words,
                           read_record, runtime_folder)
from .errors import NbtoolError
from .on_scheduler import STATE_KEY, claim, request_end
from .warn import warn_user

#: An engine with no kernel attached for this long ends by itself (seconds).
IDLE_TIMEOUT = 1800.0

#: Seconds a new engine's process may take to start its workers and write its file.
START_TIMEOUT = 180


class EngineNotRunning(NbtoolError, LookupError):
    """No persistent engine of that name runs for this user; the message says what is
    known of the last one (when and why it ended) and how to start one.

    Example:
        >>> str(EngineNotRunning("default", "ended at 10:00, no kernel attached for 30 min"))
        "no persistent engine 'default' is running: it ended at 10:00, ... Fix: ..."
    """

    def __init__(self, name: str, why: str):
        super().__init__(
            f"no persistent engine {name!r} is running: {why}. Its models are no longer "
            f"loaded anywhere. Fix: eng = nbtool.start(persist=True"
            f"{'' if name == 'default' else f', name={name!r}'}) starts a new one (register "
            "the models again), or nbtool.running() lists the ones that run.")


class EngineInUse(NbtoolError, RuntimeError):
    """Another kernel is attached to the persistent engine: one kernel at a time.

    Example:
        >>> str(EngineInUse("default", {"pid": 12, "host": "h", "since": 0.0}))
        "the persistent engine 'default' is in use by another kernel (pid 12 on h, ..."
    """

    def __init__(self, name: str, who: dict):
        since = time.strftime("%H:%M:%S", time.localtime(who.get("since", 0)))
        super().__init__(
            f"the persistent engine {name!r} is in use by another kernel (pid "
            f"{who.get('pid')} on {who.get('host')}, attached at {since}); one kernel is "
            "attached at a time, so two cannot change its models under each other. Fix: "
            "detach there (eng.close() or %nbtool stop), or restart that kernel, then "
            "attach again; or start another engine with nbtool.start(persist=True, "
            "name='other').")


class AttachedCluster:
    """What an :class:`~nbtool.engine.Engine` holds in place of a cluster it started:
    the persistent engine it is attached to. ``close()`` only detaches; the cluster and
    its models keep running until :func:`shutdown` or the idle timeout.

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
        if find_running(self.name) is None and ended_note(self.name) is None:
            self.record.end(f"its process (pid {self.record.pid}) was gone: killed")
        import logging

        quiet = [logging.getLogger(n) for n in ("distributed.client", "distributed.utils")]
        levels = [q.level for q in quiet]
        for q in quiet:   # the client's reconnecting, cancelled: Dask logs it as an error
            q.setLevel(logging.CRITICAL)
        try:
            engine.close()
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
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


def find_running(name: str) -> EngineRecord | None:
    """The record of this user's running engine ``name``; a dead one's file is replaced
    by the note of its end.

    Example:
        >>> find_running("no-such-engine") is None
        True
    """
    return next((r for r in engine_records() if r.name == name), None)


def attach(name: str = "default", work_dir: str | None = None):
    """Attach this kernel to the persistent engine ``name``; returns its
    :class:`~nbtool.engine.Engine`, which becomes the default engine.

    The models registered before are registered again, those that were loaded are still
    loaded, and the next prediction is warm. A model whose file changed meanwhile is read
    again (a warning says so; its old copies are unloaded). Raises
    :class:`EngineNotRunning` (with when and why it ended, if known) or
    :class:`EngineInUse` (another kernel is attached).

    Example:
        >>> eng = nbtool.attach()                     # doctest: +SKIP
        >>> eng.models()                              # doctest: +SKIP
    """
    from distributed import Client

    from .engine import Engine
    from .current import set_default_engine

    record = find_running(check_name(name))
    if record is None:
        raise EngineNotRunning(name, ("it " + ended_note(name)) if ended_note(name) else
                               f"there is no engine file {runtime_folder() / (name + '.json')}")
    try:
        client = Client(record.address, security=record.security(), timeout="20s")
    except (OSError, TimeoutError) as e:
        if not record.alive():
            record.end(f"its process (pid {record.pid}) was gone: killed")
            raise EngineNotRunning(name, f"it {ended_note(name)}") from None
        raise NbtoolError(f"the persistent engine {record.describe()} runs but did not "
                          f"answer ({type(e).__name__}: {e}). Fix: try again; if it stays "
                          "stuck, nbtool.shutdown(force=True) ends it.") from None
    try:
        who = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        holder = claim_with_patience(client, who)
        if holder is not None:
            raise EngineInUse(name, holder)
        cluster = AttachedCluster(record, client)
        eng = Engine(client, cluster, work_dir)
        cluster.restore(eng.catalog)
    except BaseException:
        client.close()
        raise
    set_default_engine(eng)
    return eng


def claim_with_patience(client, who: dict, patience: float = 3.0) -> dict | None:
    """Claim the engine for this kernel; a holder that does not let go within
    ``patience`` seconds (a killed kernel's connection can take a moment to drop) is
    returned.
    """
    deadline = time.monotonic() + patience
    while True:
        holder = client.run_on_scheduler(claim, client.id, who)
        if holder is None or time.monotonic() > deadline:
            return holder
        time.sleep(0.25)


def start_persistent(name: str = "default", idle_timeout: float | None = None,
                     work_dir: str | None = None, **options):
    """Start the persistent engine ``name`` (or attach to it if it runs); the options are
    :func:`nbtool.start`'s local-cluster ones, already checked.

    Example:
        >>> eng = start_persistent("default", gpus="none", n_workers=1, memory_budget=None,
        ...                        dashboard_address="127.0.0.1:0",
        ...                        allow_remote_dashboard=False, backend="tensorflow")  # doctest: +SKIP
    """
    idle = idle_seconds(idle_timeout)
    if find_running(check_name(name)) is not None:
        return attach(name, work_dir)
    folder = runtime_folder()
    log = folder / f"{name}.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbtool.persist_server", name,
             __import__("json").dumps({**options, "idle_timeout": idle})],
            stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    threading.Thread(target=proc.wait, daemon=True).start()   # reaped whenever it ends
    deadline = time.monotonic() + START_TIMEOUT
    while (record := read_record(name)) is None or record.pid != proc.pid:
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            tail = log.read_text(errors="replace").strip().splitlines()[-12:]
            raise NbtoolError(
                f"the persistent engine {name!r} could not start"
                f"{'' if proc.returncode is not None else f' within {START_TIMEOUT}s'}. Its "
                f"log ({log}) ends with:\n" + "\n".join(tail) + "\nFix: see the error "
                "there; nbtool.start() without persist=True shows it in the cell.")
        time.sleep(0.1)
    return attach(name, work_dir)


def idle_seconds(idle_timeout) -> float:
    """``idle_timeout`` (seconds, or ``"30min"``, ``"2h"``; default ``NBTOOL_IDLE_TIMEOUT``,
    else 30 minutes) as positive seconds.

    Example:
        >>> idle_seconds("2h"), idle_seconds(90), idle_seconds(None) == IDLE_TIMEOUT
        (7200.0, 90.0, True)
    """
    from dask.utils import parse_timedelta

    value = idle_timeout if idle_timeout is not None else \
        os.environ.get("NBTOOL_IDLE_TIMEOUT") or IDLE_TIMEOUT
    try:
        seconds = float(parse_timedelta(value, default="seconds"))
    except (ValueError, TypeError, KeyError):
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"idle_timeout={value!r}: expected a positive duration such as "
                         "1800, '30min' or '2h' (a persistent engine must end some time "
                         "after its last kernel left). Fix: pass one of those.")
    return seconds


def running():
    """This user's persistent engines that run now, as a table (name, process, started,
    idle timeout, workers, address, dashboard); an ended one is not listed.

    Example:
        >>> nbtool.running()                   # doctest: +SKIP
        name     pid    started   idle timeout  workers  ...
        default  41234  10:02:11  30 min        cpu0     ...
    """
    from .tables import Table

    return Table([{"name": r.name, "pid": r.pid,
                   "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started)),
                   "idle timeout": idle_words(r.idle_timeout),
                   "workers": ", ".join(r.workers), "address": r.address,
                   "dashboard": r.dashboard or ""} for r in engine_records()],
                 title="persistent engines")


def shutdown(name: str | None = None, timeout: float = 60.0, force: bool = False) -> str:
    """End the persistent engine ``name`` (default: the one this kernel is attached to,
    else ``"default"``): its workers stop and its models' memory goes back. Returns the
    note of its end. ``force=True`` kills its process group instead of asking.

    Example:
        >>> nbtool.shutdown()                   # doctest: +SKIP
        "'default' ended at 2026-11-24 10:40:02, shut down by nbtool.shutdown() from pid 4242"
    """
    import signal

    from .current import current_engine

    eng = current_engine()
    attached = eng is not None and isinstance(eng.cluster, AttachedCluster)
    name = check_name(name or (eng.cluster.name if attached else "default"))
    record = find_running(name)
    if record is None:
        raise EngineNotRunning(name, ("it " + ended_note(name)) if ended_note(name) else
                               "there is no engine file for it")
    reason = f"shut down by nbtool.shutdown() from pid {os.getpid()}"
    if force:
        os.killpg(record.pid, signal.SIGKILL)
        record.end(reason + " (force=True: killed)")
    else:
        ask(record, reason, eng.client if attached and eng.cluster.name == name else None)
    if attached and eng.cluster.name == name:
        eng.close()
    deadline = time.monotonic() + timeout
    while record.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if record.alive():
        raise NbtoolError(f"the persistent engine {record.describe()} did not end within "
                          f"{timeout:g}s. Fix: nbtool.shutdown({name!r}, force=True).")
    return f"{name!r} {ended_note(name) or 'ended'}"


def ask(record: EngineRecord, reason: str, client=None) -> None:
    """Ask engine ``record`` to end, through ``client`` or a connection of its own."""
    from distributed import Client

    if client is not None:
        client.run_on_scheduler(request_end, reason)
        return
    with Client(record.address, security=record.security(), timeout="20s") as own:
        own.run_on_scheduler(request_end, reason)
