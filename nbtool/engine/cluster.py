"""A local Dask cluster with one worker process per GPU, each pinned to its own GPU.

Like dask-cuda's ``LocalCUDACluster``, it is Dask's own :class:`~distributed.LocalCluster`
with one override, :meth:`PinnedCluster.new_worker_spec`, which gives every worker the name,
environment and device of its :class:`~nbtool.engine.devices.WorkerSlot`. The environment reaches
the worker through the Nanny, before the worker process (spawned, never forked) imports
CUDA or TensorFlow.

Nobody else gets in: Dask runs pickled functions, so whoever can talk to the scheduler runs
code as the notebook's user. The cluster speaks TLS with mutual authentication, under a
certificate made for this session (:meth:`distributed.security.Security.temporary`) that
only this kernel and its worker processes hold; every component listens on 127.0.0.1.

Example:
    >>> from nbtool.engine.devices import plan_workers
    >>> cluster = PinnedCluster(plan_workers([], n_workers=2))   # doctest: +SKIP
    >>> sorted(cluster.worker_spec)                             # doctest: +SKIP
    ['cpu0', 'cpu1']
"""

from __future__ import annotations

import copy
import ipaddress
import os
from pathlib import Path
import re
import shutil
import stat

from distributed import LocalCluster, Nanny
from distributed.security import Security

from nbtool.engine.devices import WorkerSlot
from nbtool.errors import NbtoolError
from nbtool.wire import resource_name

#: Where :func:`nbtool.prediction.sources.shared_folder` hands inputs to local workers, one per kernel.
SHARED_ROOT = "/dev/shm"
_SHARED_NAME = re.compile(r"^nbtool-(\d+)$")


class PinnedCluster(LocalCluster):
    """One single-threaded worker per :class:`~nbtool.engine.devices.WorkerSlot`, on 127.0.0.1.

    Parameters
    ----------
    slots : list of WorkerSlot
        The workers to run (see :func:`nbtool.engine.devices.plan_workers`). Each worker is named
        after its slot (``"gpu0"``, ``"cpu1"``): names survive worker restarts, addresses
        do not, so nbtool always refers to workers by name.
    dashboard_address : str, default "127.0.0.1:8787"
        Where Dask's dashboard listens (plain HTTP, read-only). Only loopback addresses are
        accepted unless ``allow_remote_dashboard=True``.
    security : distributed.security.Security, optional
        How scheduler, nannies, workers and clients authenticate each other. Default: a
        fresh :meth:`~distributed.security.Security.temporary` (TLS, a self-signed
        certificate held in memory by this process), so a client without it is refused.
    allow_remote_dashboard : bool, default False
        Let the dashboard listen on a non-loopback address (e.g. ``"0.0.0.0:8787"``):
        anyone who can reach that address can watch the cluster.
    **kwargs
        Passed to :class:`distributed.LocalCluster`.

    Raises
    ------
    ValueError
        If ``slots`` is empty, two slots share a name, or the dashboard address is not
        loopback (without ``allow_remote_dashboard=True``).

    Examples
    --------
    >>> from nbtool.engine.devices import plan_workers
    >>> from nbtool._util.gpus import parse_inventory
    >>> slots = plan_workers(parse_inventory("2x16GB"), cores=2, total_memory=2**34)
    >>> cluster = PinnedCluster(slots)                       # doctest: +SKIP
    >>> cluster.worker_spec["gpu1"]["options"]["env"]["CUDA_VISIBLE_DEVICES"]  # doctest: +SKIP
    '1'
    """

    def __init__(self, slots: list[WorkerSlot], *, dashboard_address: str = "127.0.0.1:8787",
                 security: Security | None = None, allow_remote_dashboard: bool = False,
                 **kwargs):
        check_dashboard_address(dashboard_address, allow_remote_dashboard)
        if not slots:
            raise ValueError("PinnedCluster needs at least one WorkerSlot; got none.")
        names = [s.name for s in slots]
        if len(set(names)) != len(names):
            raise ValueError(f"worker slot names must be unique; got {names}.")
        self.slots = {s.name: s for s in slots}
        import psutil

        kwargs.setdefault("memory_limit", int(psutil.virtual_memory().total / len(slots)))
        self.dashboard_on = dashboard_address is not None
        if not self.dashboard_on:
            # Dask's scheduler serves HTTP (health, metrics) whatever ``dashboard`` says, on
            # port 8787 of every interface when given no address: off means no dashboard
            # pages, and the rest on a free loopback port.
            dashboard_address = "127.0.0.1:0"
            kwargs["scheduler_kwargs"] = {**kwargs.get("scheduler_kwargs", {}),
                                          "dashboard": False}
        super().__init__(
            n_workers=0,
            threads_per_worker=1,   # one task at a time: a worker runs one model at a time
            processes=True,
            host="127.0.0.1",
            dashboard_address=dashboard_address,
            worker_class=Nanny,
            # With require_encryption, LocalCluster picks tls:// for every component.
            security=security if security is not None else Security.temporary(),
            **kwargs,
        )
        self.scale(len(slots))

    @property
    def dashboard_link(self) -> str:
        """The dashboard where it really listens: the host bound and, for port 0, the port.

        Dask's own link names the scheduler's host, which is wrong for a dashboard bound to
        another address (``"0.0.0.0:8799"``).

        Example:
            >>> cluster.dashboard_link                           # doctest: +SKIP
            'http://127.0.0.1:40123/status'
        """
        from distributed.utils import format_dashboard_link

        server = getattr(self.scheduler, "services", {}).get("dashboard")
        if server is None or not getattr(self, "dashboard_on", True):
            return ""
        host = getattr(server, "address", None) or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host    # an IPv6 literal in a URL
        return format_dashboard_link(host, server.port)

    def failed_workers(self) -> dict[str, str]:
        """Workers whose Nanny gave up starting the worker process, with the reason.

        Dask keeps a Nanny's startup failure inside a background task; this makes it
        visible at once, so :func:`nbtool.start` fails now rather than after its timeout.

        Example:
            >>> cluster.failed_workers()                         # doctest: +SKIP
            {'cpu0': 'RuntimeError: Nanny failed to start worker process'}
        """
        from distributed.core import Status

        out = {}
        for name, nanny in list(self.workers.items()):
            if getattr(nanny, "status", None) == Status.failed:
                out[str(name)] = _exception_chain(getattr(nanny, "_Server__startup_exc", None))
        return out

    def _update_worker_status(self, op, msg):
        """Keep every Nanny when its worker leaves: here a worker leaves only to restart.

        Dask's SpecCluster closes the Nanny of a worker still away ``lost-worker-timeout``
        (15 s) after it left, judged by name at that moment; a worker restarted twice about
        15 s apart (two hard unloads) is then caught mid-restart and lost for good. A
        pinned worker is restarted by its own Nanny, and the Nannies close with the cluster.
        """
        from distributed.deploy.cluster import Cluster

        if op == "remove":
            Cluster._update_worker_status(self, op, msg)
        else:
            super()._update_worker_status(op, msg)

    def new_worker_spec(self) -> dict:
        """The spec of the next slot that has no worker yet: its name and environment."""
        name = next((n for n in self.slots if n not in self.worker_spec), None)
        if name is None:
            raise ValueError(
                f"this cluster has {len(self.slots)} worker slot(s) ({', '.join(self.slots)}) "
                "and all are running; it cannot scale beyond one worker per slot.")
        spec = copy.deepcopy(self.new_spec)
        spec["options"]["name"] = name
        spec["options"]["env"] = dict(self.slots[name].env)
        # The resource that tasks for this worker ask for: part of the spec, so the
        # worker has it again the moment its Nanny restarts it.
        spec["options"]["resources"] = {resource_name(name): 1}
        return {name: spec}


def check_dashboard_address(address: str | int | None, allow_remote: bool = False) -> None:
    """Refuse a dashboard address that is not loopback, unless the user opts in.

    Dask reads a bare port (``":8787"``, ``8787``) as every interface. ``None`` turns the
    dashboard off and is always fine.

    Example:
        >>> check_dashboard_address("127.0.0.1:0")
        >>> check_dashboard_address("0.0.0.0:8799")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: dashboard_address='0.0.0.0:8799' listens on every interface...
    """
    if address is None or allow_remote:
        return
    from distributed.utils import clean_dashboard_address

    try:
        hosts = [a["address"] for a in clean_dashboard_address(address)]
    except ValueError:   # Dask cannot read it either (e.g. an IPv6 literal with a port)
        raise ValueError(f"dashboard_address={address!r}: expected 'host:port' with a "
                         "loopback host, such as '127.0.0.1:8787' (port 0: any free port)."
                         " Fix: pass it in that form.") from None
    if all(_is_loopback(h) for h in hosts):
        return
    port = str(address).rsplit(":", 1)[-1]
    where = "every interface" if "" in hosts or "0.0.0.0" in hosts or "::" in hosts \
        else f"{', '.join(str(h) for h in hosts)}, not only this machine"
    raise ValueError(
        f"dashboard_address={address!r} listens on {where}: expected a loopback address "
        f"such as '127.0.0.1:{port if port.isdigit() else '8787'}'. Dask's dashboard is plain "
        "HTTP without a login, so anyone who can reach it can watch this cluster. Fix: use "
        "127.0.0.1 (reach it from elsewhere through an SSH tunnel), or pass "
        "allow_remote_dashboard=True if that is what you want.")


def free_dashboard_address(address: str | int | None) -> str | int | None:
    """``address`` if its port is free, else the same host on a free port (port 0).

    A second engine on the machine (another notebook, another user) finds 8787 taken;
    Dask would then warn "Port 8787 is already in use" in red and pick another port
    itself. Asking for port 0 picks one quietly; the engine's repr says where it is.

    Example:
        >>> free_dashboard_address("127.0.0.1:0")
        '127.0.0.1:0'
        >>> import socket
        >>> with socket.socket() as taken:
        ...     taken.bind(("127.0.0.1", 0)); taken.listen()
        ...     port = taken.getsockname()[1]
        ...     free_dashboard_address(f"127.0.0.1:{port}")
        '127.0.0.1:0'
    """
    import socket

    from distributed.utils import clean_dashboard_address

    if address is None:
        return None
    try:
        spec = clean_dashboard_address(address)
    except ValueError:
        return address   # check_dashboard_address says what is wrong with it
    taken = False
    for part in spec:
        host, port = part["address"] or "0.0.0.0", int(part["port"] or 0)
        if not port:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As Tornado binds: a port left in TIME_WAIT by a closed cluster is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host.strip("[]"), port))
            except OSError:
                taken = True
    if not taken:
        return address
    host = str(address).rsplit(":", 1)[0] if ":" in str(address) else ""
    return f"{host}:0"


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).strip("[]")).is_loopback
    except ValueError:
        return False


def _exception_chain(exc: BaseException | None) -> str:
    """``"RuntimeError: a <- OSError: b"``: an exception and the ones that caused it."""
    parts = []
    while exc is not None and len(parts) < 5:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts) or "unknown reason"


def spawn_problem() -> str | None:
    """Why a spawned worker process cannot start from this main module, if we can tell.

    Spawned processes (Dask's Nanny spawns its workers) first re-run the main module from
    its file, as ``__mp_main__``. A script fed on standard input (``python - < run.py``) or
    an ``exec``'d one has a file name that is no file, and every worker dies before Dask
    even starts in it; that error reaches only the terminal's stderr. This reads the same
    preparation data that ``multiprocessing`` sends and checks it, without running anything.

    Example:
        >>> spawn_problem() is None or "main module" in spawn_problem()
        True
    """
    from multiprocessing import spawn

    try:
        main_path = spawn.get_preparation_data("nbtool-check").get("init_main_from_path")
    except Exception:   # not ours to diagnose
        return None
    if main_path and not os.path.isfile(main_path):
        return (f"FileNotFoundError: [Errno 2] No such file or directory: {main_path!r} "
                "(each worker process re-runs the main module from its file, and this "
                "program's main module has no file: it was read from standard input or a "
                "string)")
    return None


def start_failure(failed: dict[str, str]) -> NbtoolError:
    """The error :func:`nbtool.start` raises when worker processes could not start.

    Example:
        >>> str(start_failure({"cpu0": "RuntimeError: boom"}))  # doctest: +ELLIPSIS
        "worker 'cpu0' could not start: RuntimeError: boom. Fix: ..."
    """
    name, reason = sorted(failed.items())[0]
    cause = spawn_problem()
    if cause:
        return NbtoolError(
            f"worker {name!r} could not start: {cause}. Fix: save the script to a file and "
            "run it as `python script.py`, with the nbtool.start() call under "
            "`if __name__ == '__main__':`.")
    return NbtoolError(
        f"worker {name!r} could not start: {reason}. Fix: read the worker's own error in "
        "the log above (stderr of this process); in a script, guard the call with "
        "`if __name__ == '__main__':` (workers are spawned processes that import the main "
        "module).")


def clean_stale_shared_folders(root: str | os.PathLike = SHARED_ROOT) -> list[Path]:
    """Remove the ``nbtool-<pid>`` input folders of kernels that are gone; returns them.

    A kernel that was killed never ran its cleanup, and ``/dev/shm`` is memory: what it
    left there stays until reboot. Only real folders owned by this user whose process no
    longer exists go; other users' folders, live processes' and symlinks are never touched.

    Example:
        >>> clean_stale_shared_folders("/nonexistent")
        []
    """
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        match = _SHARED_NAME.match(entry.name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        if _pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    except OverflowError:     # not a pid at all; keep it rather than guess
        return True
    return True
