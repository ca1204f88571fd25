"""Engines that outlive the kernel: ``start(persist=True)``, ``attach()``, ``running()``,
``shutdown()``.

A kernel restart (a changed import, a stuck cell, a memory blow-up) used to end the
cluster with it: the next start paid worker start-up, a TensorFlow import per worker and
every model load again. A persistent engine's cluster runs in a process of its own
(:mod:`nbtool.engine.persist.server`) and the kernel only attaches to it. What the kernel knows
(the registered models with their fingerprints, and where they are placed) is kept on the
cluster's scheduler as it changes; the workers keep their loaded models, chosen runtimes
and batch sizes. After a restart, ``nbtool.attach()`` finds it all as it was, and the next
prediction is warm.

Only its owner gets in: the engine file with the cluster's address and TLS credentials is
readable by this user alone (:mod:`nbtool.engine.persist.engine_files`), and every connection to the
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

import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import weakref

from nbtool._util import private_folder, private_problem, warn_user
from nbtool.engine.persist.attached import AttachedCluster
from nbtool.engine.persist.engine_files import (ALREADY_RUNNING, EngineFileDamaged,
    EngineRecord, check_name, ended_note, engine_records, idle_words, kill_group, name_taken,
    read_record, runtime_folder, unreadable_engine_files)
from nbtool.engine.persist.on_scheduler import claim, request_end
from nbtool.errors import EngineInUse, EngineNotRunning, NbtoolError, NotPrivate

#: An engine with no kernel attached for this long ends by itself (seconds).
IDLE_TIMEOUT = 1800.0

#: Seconds a new engine's process may take to start its workers and write its file.
START_TIMEOUT = 180

#: Seconds an ended engine's workers may take to follow it before they are killed.
STRAGGLERS = 10

#: The engines this process is attached to, by name: attaching again returns the same.
ATTACHED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def find_running(name: str) -> EngineRecord | None:
    """The record of this user's running engine ``name``; a dead one's file is replaced
    by the note of its end.

    Example:
        >>> find_running("no-such-engine") is None
        True
    """
    try:
        record = read_record(name)   # a damaged file raises EngineFileDamaged: it says so
    except NotPrivate:
        return None                  # not used: not_running() says why
    if record is None:
        return None
    if record.alive():
        return record
    record.end(f"its process (pid {record.pid}) was gone: killed, or the machine restarted")
    return None


def not_running(name: str) -> NbtoolError:
    """The error that says why engine ``name`` cannot be reached: that its file is not this
    user's alone, or (:class:`EngineNotRunning`) when and why it ended, or that there is none.

    Example:
        >>> str(not_running("no-such-engine")).split(": ")[1].split(" (")[0]
        'there is no engine file'
    """
    path = runtime_folder() / f"{name}.json"
    problem = path.exists() and private_problem(path, folder=False, narrow=False)
    if problem:   # not read: others may have read its credentials, or written it
        return NbtoolError(f"the persistent engine {name!r} is not used: its engine file "
                           f"{problem}, so others may have read its credentials. Fix: end "
                           "that engine (kill the process group of the pid in the file: "
                           "kill -9 -PID), delete the file, and start a new one.")
    if ended_note(name):
        return EngineNotRunning(name, "it " + ended_note(name))
    return EngineNotRunning(name, f"there is no engine file ({path})")


def attach(name: str = "default", work_dir: str | None = None):
    """Attach this kernel to the persistent engine ``name``; returns its
    :class:`~nbtool.engine.engine.Engine`, which becomes the default engine.

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

    from nbtool.engine.cluster import clean_stale_shared_folders
    from nbtool.engine.current import set_default_engine
    from nbtool.engine.engine import Engine

    record = find_running(check_name(name))
    if record is None:
        raise not_running(name)
    mine = ATTACHED.get(name)
    if mine is not None and not mine.closed and mine.cluster.record.pid == record.pid:
        set_default_engine(mine)   # attached already (a cell run twice): the same engine
        return mine
    # A kernel killed mid-run left its input in /dev/shm (memory); start() would clean it.
    clean_stale_shared_folders()
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
        # Not the kernel's temporary folder: the files the registry names outlive it.
        eng = Engine(client, cluster, work_dir or private_folder(record.work_dir))
        cluster.restore(eng.catalog)
        eng.loads.drop_replaced()   # files changed while detached: their old copies go
    except BaseException:
        client.close()
        raise
    ATTACHED[name] = eng
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
    asked = json.loads(json.dumps({**options, "idle_timeout": idle}))   # as the file has them
    try:
        running_one = find_running(check_name(name))
    except EngineFileDamaged as e:
        if e.pids:   # it may still run: never a second engine beside it
            raise
        end_unreachable(e, "its damaged file was replaced by a new start")
        running_one = None
    if running_one is not None:
        differ = {k: v for k, v in asked.items()   # None: left to the engine, not asked
                  if v is not None and running_one.options.get(k, v) != v}
        if differ:
            warn_user(f"the persistent engine {name!r} runs already, started with "
                      + ", ".join(f"{k}={running_one.options[k]!r}" for k in differ)
                      + " (asked now: " + ", ".join(f"{k}={v!r}" for k, v in differ.items())
                      + "); attached to it as it is. Fix: nbtool.shutdown("
                      f"{'' if name == 'default' else repr(name)}) first to start it anew, "
                      "or start another with name='other'.")
        return attach(name, work_dir)
    log = runtime_folder() / f"{name}.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        if os.fstat(fd).st_size > 2**20:   # appended to (two starts may share it): bounded
            os.ftruncate(fd, 0)
        logged = os.fstat(fd).st_size
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbtool.engine.persist.server", name, json.dumps(asked)],
            stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    threading.Thread(target=proc.wait, daemon=True).start()   # reaped whenever it ends
    deadline = time.monotonic() + START_TIMEOUT
    while (record := read_record(name)) is None or record.pid != proc.pid:
        # Another kernel started it at the same moment: its process won; attach to it.
        other_won = proc.poll() == ALREADY_RUNNING and name_taken(name)
        if other_won and record is not None and record.alive():
            break
        if (proc.poll() is not None and not other_won) or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            with open(log, "rb") as f:
                f.seek(logged)
                tail = f.read().decode(errors="replace").strip().splitlines()[-12:]
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
        >>> idle_seconds("30min"), idle_seconds("45 mins"), idle_seconds("1 hr"), idle_seconds("90sec")
        (1800.0, 2700.0, 3600.0, 90.0)
    """
    from dask.utils import parse_timedelta

    value = idle_timeout if idle_timeout is not None else \
        os.environ.get("NBTOOL_IDLE_TIMEOUT") or IDLE_TIMEOUT
    try:
        # Dask knows "m"/"minutes" but not the "min" people write (and nbtool's own
        # docs say): the common short words are spelled out first.
        text = re.sub(r"(?<=[\d\s])(mins?|hrs?|secs?)\s*$",
                      lambda m: {"min": "minutes", "hr": "hours", "sec": "seconds"}[
                          m.group(1).rstrip("s")], value.strip()) \
            if isinstance(value, str) else value
        seconds = float(parse_timedelta(text, default="seconds"))
    except (ValueError, TypeError, KeyError):
        seconds = -1.0
    if not 0 < seconds < math.inf:
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
    from nbtool.tables import Table

    rows = [{"name": r.name, "pid": r.pid,
             "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started)),
             "idle timeout": idle_words(r.idle_timeout),
             "workers": ", ".join(r.workers), "address": r.address,
             "dashboard": r.dashboard or ""} for r in engine_records()]
    # Files that name an engine nbtool cannot use: listed with why, never hidden.
    rows += [{"name": name, "pid": "?", "started": "?", "idle timeout": "?", "workers": "",
              "address": "unreachable: " + why, "dashboard": ""}
             for name, why in unreadable_engine_files().items()]
    return Table(rows, title="persistent engines")


def shutdown(name: str | None = None, timeout: float = 60.0, force: bool = False) -> str:
    """End the persistent engine ``name`` (default: the one this kernel is attached to,
    else ``"default"``): its workers stop and its models' memory goes back. Returns the
    note of its end. ``force=True`` kills its process group instead of asking.

    Example:
        >>> nbtool.shutdown()                   # doctest: +SKIP
        "'default' ended at 2026-11-24 10:40:02, shut down by nbtool.shutdown() from pid 4242"
    """
    from nbtool.engine.current import current_engine

    eng = current_engine()
    attached = eng is not None and isinstance(eng.cluster, AttachedCluster)
    name = check_name(name or (eng.cluster.name if attached else "default"))
    reason = f"shut down by nbtool.shutdown() from pid {os.getpid()}"
    try:
        record = find_running(name)
    except EngineFileDamaged as e:
        if not force:
            raise
        return end_unreachable(e, reason)
    if record is None:
        raise not_running(name)
    if force:
        record.kill()
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
    # Its workers hold the models' memory: they go too (they follow it within a moment).
    deadline = time.monotonic() + STRAGGLERS
    while record.processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    if record.processes():
        record.kill()
    return f"{name!r} {ended_note(name) or 'ended'}"


def end_unreachable(damaged: EngineFileDamaged, reason: str) -> str:
    """End engine ``damaged.name`` whose file is damaged: kill the process groups of the
    processes that run it (found by their command line), then replace the file by a note.

    Example:
        >>> end_unreachable(EngineFileDamaged("x", runtime_folder() / "x.json", "not JSON", []),
        ...                 "test")   # doctest: +ELLIPSIS
        "'x' ended at ..., test (force=True: its engine file was damaged; no process of it ran)"
    """
    for pid in damaged.pids:
        kill_group(pid)
    killed = f"killed pid {', '.join(map(str, damaged.pids))}" if damaged.pids else \
        "no process of it ran"
    EngineRecord(name=damaged.name, address="", pid=damaged.pids[0] if damaged.pids else 0) \
        .end(f"{reason} (force=True: its engine file was damaged; {killed})")
    return f"{damaged.name!r} {ended_note(damaged.name) or 'ended'}"


def ask(record: EngineRecord, reason: str, client=None) -> None:
    """Ask engine ``record`` to end, through ``client`` or a connection of its own."""
    from distributed import Client

    if client is not None:
        client.run_on_scheduler(request_end, reason)
        return
    with Client(record.address, security=record.security(), timeout="20s") as own:
        own.run_on_scheduler(request_end, reason)
