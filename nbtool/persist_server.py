"""The process of a persistent engine: ``python -m nbtool.persist_server NAME OPTIONS``.

``nbtool.start(persist=True)`` launches it in a session (and process group) of its own, so
a kernel restart, which kills the kernel's process group, leaves it running. It holds the
local cluster (scheduler, nannies, and through them the workers with their loaded models),
writes the engine file a kernel attaches with (:mod:`nbtool.engine_files`), and watches:

* a kernel is attached (a client connected), or none has been for ``idle_timeout``: then it
  ends by itself, so nothing is left running for ever;
* ``nbtool.shutdown()`` asked it to end (:func:`request_end`, run on the scheduler);
* its engine file is still there: deleted, nobody could attach any more, so it ends;
* SIGTERM, SIGINT or SIGHUP: it ends cleanly.

Ending closes the cluster, removes the engine file and leaves a note of why. The registry a
kernel keeps on the scheduler and the one-kernel-at-a-time claim are here too: functions
that run on the scheduler (``client.run_on_scheduler``), where they cannot interleave.

Example:
    >>> import types
    >>> sched = types.SimpleNamespace(clients={"a": 1, "b": 2})
    >>> claim("a", {"pid": 11}, sched) is None      # free: kernel 'a' has it now
    True
    >>> claim("b", {"pid": 12}, sched)["pid"]       # 'a' is still connected: refused
    11
    >>> del sched.clients["a"]; claim("b", {"pid": 12}, sched) is None   # 'a' left
    True
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

#: Seconds between looks at the clients, the engine file and a shutdown request.
TICK = 0.5

#: The scheduler metadata key under which the attached kernel keeps its registry.
STATE_KEY = ["nbtool", "engine-state"]


def claim(client_id: str, who: dict, dask_scheduler=None) -> dict | None:
    """Make ``client_id`` the engine's one kernel, unless another connected one is;
    returns that one's description (``who`` as it gave it) or None when claimed.

    Run on the scheduler (``client.run_on_scheduler``), so two kernels attaching at once
    cannot both get it. A kernel that was killed lets go the moment its connection drops.

    Example:
        >>> import types
        >>> claim("c", {"pid": 1}, types.SimpleNamespace(clients={"c": 1})) is None
        True
    """
    held = getattr(dask_scheduler, "nbtool_owner", None)
    if held and held["client"] != client_id and held["client"] in dask_scheduler.clients:
        return held["who"]
    dask_scheduler.nbtool_owner = {"client": client_id, "who": who}
    return None


def request_end(reason: str, dask_scheduler=None) -> None:
    """Ask the engine's process to end, saying ``reason`` (run on the scheduler).

    Example:
        >>> import types; s = types.SimpleNamespace(); request_end("asked", s); s.nbtool_end
        'asked'
    """
    dask_scheduler.nbtool_end = reason


def kernel_clients(scheduler) -> list[str]:
    """The clients connected to ``scheduler`` (Dask's own bookkeeping entry aside).

    Example:
        >>> import types
        >>> kernel_clients(types.SimpleNamespace(clients={"fire-and-forget": 0, "c": 1}))
        ['c']
    """
    return [c for c in list(scheduler.clients) if c != "fire-and-forget"]


def why_end(scheduler, record, inode: int, last_client: float, signalled: list) -> str | None:
    """Why the engine should end now, or None while it should keep running.

    Example:
        >>> import types
        >>> rec = types.SimpleNamespace(path=__import__("pathlib").Path("/nonexistent"),
        ...                             idle_timeout=60)
        >>> why_end(types.SimpleNamespace(clients={}), rec, 0, time.monotonic(), [])
        'its engine file /nonexistent was deleted, so nobody could attach to it any more'
    """
    if signalled:
        return f"ended by signal {signalled[0]}"
    asked = getattr(scheduler, "nbtool_end", None)
    if asked:
        return asked
    try:
        if os.stat(record.path).st_ino != inode:
            raise FileNotFoundError
    except FileNotFoundError:
        return (f"its engine file {record.path} was deleted, so nobody could attach to it "
                "any more")
    idle = time.monotonic() - last_client
    if idle > record.idle_timeout:
        return f"no kernel attached for {idle_words(record.idle_timeout)} (its idle timeout)"
    return None


def idle_words(seconds: float) -> str:
    """``1800`` -> ``'30 min'``, ``90`` -> ``'90 s'``.

    Example:
        >>> idle_words(1800), idle_words(90), idle_words(7200)
        ('30 min', '90 s', '2 h')
    """
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def serve(name: str, options: dict) -> int:
    """Run the engine ``name`` until it should end; returns the process's exit code."""
    from distributed import Client
    from distributed.security import Security

    from .engine_files import EngineRecord, process_started
    from .quiet import planned_restart
    from .session import local_cluster, wait_for_start
    from .worker import NbtoolWorkerPlugin

    signalled: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda n, _f: signalled.append(signal.Signals(n).name))
    security = Security.temporary()   # this engine's own certificate, in the file only
    cluster = local_cluster(options["gpus"], options["n_workers"], options["memory_budget"],
                            options["dashboard_address"], security,
                            options["allow_remote_dashboard"], options["backend"])
    try:
        with Client(cluster) as setup:   # gone before kernels come: not counted as one
            wait_for_start(setup, cluster, len(cluster.slots), None)
            setup.register_plugin(NbtoolWorkerPlugin())
        record = EngineRecord(
            name=name, address=cluster.scheduler_address, pid=os.getpid(),
            process_started=process_started(os.getpid()),
            idle_timeout=float(options["idle_timeout"]), dashboard=cluster.dashboard_link,
            workers=list(cluster.slots), options=options, note=cluster.gpu_note,
            tls={"ca": security.tls_ca_file, "cert": security.tls_client_cert,
                 "key": security.tls_client_key})
        record.save()
        inode = os.stat(record.path).st_ino
        last_client = time.monotonic()
        while True:
            if kernel_clients(cluster.scheduler):
                last_client = time.monotonic()
            reason = why_end(cluster.scheduler, record, inode, last_client, signalled)
            if reason:
                break
            time.sleep(TICK)
        print(f"nbtool: the persistent engine {name!r} ends: {reason}", file=sys.stderr,
              flush=True)
    except BaseException as e:
        print(f"nbtool: the persistent engine {name!r} could not start: "
              f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        with planned_restart():
            cluster.close()
        return 1
    with planned_restart():
        cluster.close()
    try:
        still_ours = os.stat(record.path).st_ino == inode
    except FileNotFoundError:
        still_ours = True
    if still_ours:
        record.end(reason)
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], json.loads(sys.argv[2])))
