"""The process of a persistent engine: ``python -m nbtool.engine.persist.server NAME OPTIONS``.

``nbtool.start(persist=True)`` launches it in a session (and process group) of its own, so
a kernel restart, which kills the kernel's process group, leaves it running. It holds the
local cluster (scheduler, nannies, and through them the workers with their loaded models),
writes the engine file a kernel attaches with (:mod:`nbtool.engine.persist.engine_files`), and watches:

* a kernel is attached (a client connected), or none has been for ``idle_timeout``: then it
  ends by itself, so nothing is left running for ever;
* ``nbtool.shutdown()`` asked it to end (:func:`request_end`, run on the scheduler);
* its engine file is still there: deleted, nobody could attach any more, so it ends;
* SIGTERM, SIGINT or SIGHUP: it ends cleanly.

Ending closes the cluster, removes the engine file and leaves a note of why. What runs on
its scheduler for the kernels (the claim, the end request) is in :mod:`nbtool.engine.persist.on_scheduler`.

Example:
    >>> import types, pathlib
    >>> rec = types.SimpleNamespace(path=pathlib.Path("/nonexistent"), idle_timeout=60)
    >>> why_end(types.SimpleNamespace(), rec, 0, time.monotonic(), ["SIGTERM"])
    'ended by signal SIGTERM'
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

#: Seconds between looks at the clients, the engine file and a shutdown request.
TICK = 0.5

#: Seconds a new engine waits for its first kernel, however short its idle timeout: the
#: kernel that started it attaches right away, but a busy machine can make that slow.
FIRST_ATTACH = 60.0


def why_end(scheduler, record, inode: int, last_client: float, signalled: list,
            attached_once: bool = True) -> str | None:
    """Why the engine should end now, or None while it should keep running.

    ``last_client``: when a kernel was last attached (or the engine started);
    ``attached_once``: whether one ever was (until then, it waits :data:`FIRST_ATTACH`).

    Example:
        >>> import pathlib, types
        >>> rec = types.SimpleNamespace(path=pathlib.Path("/nonexistent"), idle_timeout=60)
        >>> why_end(types.SimpleNamespace(clients={}), rec, 0, time.monotonic(), [])
        'its engine file /nonexistent was deleted, so nobody could attach to it any more'
        >>> import tempfile
        >>> rec.path, rec.idle_timeout = pathlib.Path(tempfile.mkdtemp()), 3   # it is there
        >>> inode, ten_s_ago = os.stat(rec.path).st_ino, time.monotonic() - 10
        >>> why_end(types.SimpleNamespace(), rec, inode, ten_s_ago, [], attached_once=True)
        'no kernel attached for 3 s (its idle timeout)'
        >>> why_end(types.SimpleNamespace(), rec, inode, ten_s_ago, [], attached_once=False)
        >>> rec.path.rmdir()
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
    limit = record.idle_timeout if attached_once else max(record.idle_timeout, FIRST_ATTACH)
    if idle > limit:
        from nbtool.engine.persist.engine_files import idle_words

        if not attached_once:
            return f"no kernel attached within {idle_words(limit)} of its start"
        return f"no kernel attached for {idle_words(record.idle_timeout)} (its idle timeout)"
    return None


def serve(name: str, options: dict) -> int:
    """Run the engine ``name`` until it should end; returns the process's exit code."""
    from distributed import Client
    from distributed.security import Security

    from nbtool.engine.persist.engine_files import ALREADY_RUNNING, EngineRecord, hold_name, process_started
    from nbtool.engine.persist.on_scheduler import kernel_clients
    from nbtool._util import planned_restart
    from nbtool.engine.session import local_cluster, wait_for_start
    from nbtool.worker import NbtoolWorkerPlugin

    # Held until this process ends: a second engine of this name (two kernels starting
    # it at once) stops here, and its kernel attaches to this one.
    if hold_name(name) is None:
        print(f"nbtool: another persistent engine {name!r} runs or is starting; this one "
              "stops", file=sys.stderr, flush=True)
        return ALREADY_RUNNING
    signalled: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda n, _f: signalled.append(signal.Signals(n).name))
    security = Security.temporary()   # this engine's own certificate, in the file only
    cluster = local_cluster(options["gpus"], options["n_workers"], options["memory_budget"],
                            options["dashboard_address"], security,
                            options["allow_remote_dashboard"], options["backend"])
    record = None
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
        last_client, attached_once = time.monotonic(), False
        while True:
            if kernel_clients(cluster.scheduler):
                last_client, attached_once = time.monotonic(), True
            reason = why_end(cluster.scheduler, record, inode, last_client, signalled,
                             attached_once)
            if reason:
                break
            time.sleep(TICK)
        print(f"nbtool: the persistent engine {name!r} ends: {reason}", file=sys.stderr,
              flush=True)
    except BaseException as e:
        print(f"nbtool: the persistent engine {name!r} "
              f"{'could not start' if record is None else 'failed'}: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        with planned_restart():
            cluster.close()
        if record is not None:
            record.end(f"it failed ({type(e).__name__}: {e}); its log has the details")
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
