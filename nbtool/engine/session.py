"""Starting an engine and the default one: ``start()``, its settings, ``default_engine()``.

``nbtool.start()`` builds a cluster (or connects to one), waits for its workers and
returns an :class:`~nbtool.engine.engine.Engine`, which becomes the default engine of the module
shortcuts (``nbtool.prediction`` ...), like Dask's default client. Settings left out are read
from the environment (``NBTOOL_N_WORKERS``, ``NBTOOL_MEMORY_BUDGET``, ``NBTOOL_CORES``,
``NBTOOL_BACKEND``).

Example:
    >>> eng = nbtool.start(n_workers=2)                 # doctest: +SKIP
    >>> current_engine() is eng                         # doctest: +SKIP
    True
    >>> gpu_note("none", [])
    "GPUs not used (gpus='none')"
"""

from __future__ import annotations

import time
from typing import Any

from distributed import Client

from nbtool._util import as_bytes, check_count, check_size, discover_gpus, env_setting
from nbtool.engine.backends import check_backend
from nbtool.engine.current import current_engine, default_engine, set_default_engine
from nbtool.engine.devices import plan_workers, select_gpus
from nbtool.engine.engine import Engine
from nbtool.errors import NbtoolError
from nbtool.worker import NbtoolWorkerPlugin

# The default-engine functions live in nbtool.engine.current; they are still found here.
__all__ = ["start", "current_engine", "default_engine", "set_default_engine", "local_cluster",
           "check_cluster_backend", "gpu_note", "connect", "wait_for_start"]

#: Seconds to wait for workers to start (each imports TensorFlow: a few seconds per core).
WORKER_START_TIMEOUT = 120

def start(address: str | None = None, *, gpus: str | int | list[int] | None = "auto",
          memory_budget: str | int | None = None, n_workers: int | None = None,
          dashboard_address: str | None = "127.0.0.1:8787", work_dir: str | None = None,
          security: Any = None, allow_remote_dashboard: bool = False,
          backend: str | None = None, persist: bool = False, name: str = "default",
          idle_timeout: float | str | None = None) -> Engine:
    """Start an engine: a local GPU-pinned cluster, or a client of an existing one.

    Without ``address``, it starts a local cluster on 127.0.0.1 with one worker per GPU
    (``gpus="auto"`` finds them with NVML; ``gpus=[0, 1]`` picks; ``gpus="none"`` uses the
    CPU), each worker seeing exactly one GPU. With no GPU, it starts single-threaded CPU
    workers, one per core (``n_workers`` sets how many, at least 1). With
    ``address="tcp://host:8786"`` it connects to that Dask scheduler instead; its workers
    run the same worker code (nbtool must be installed there). ``memory_budget`` (a
    positive size such as ``"6GB"`` or a number of bytes) is the model memory each worker
    may hold before it evicts the least recently used model. The new engine becomes the
    default one for ``nbtool.prediction`` and friends.

    Nobody else gets in: the local cluster speaks TLS under a certificate made for this
    session and held by this kernel (Dask's ``Security.temporary()``), so another process,
    even of this user, cannot connect without it. ``security`` (a
    :class:`distributed.security.Security`) is used instead when given: for an external
    cluster it is what the client presents (``address="tls://..."`` needs it; a cluster
    reached over plain ``tcp://`` is as open as its network). The dashboard is plain HTTP
    and listens on loopback only; ``dashboard_address="0.0.0.0:8787"`` is refused unless
    ``allow_remote_dashboard=True``. ``dashboard_address=None`` turns it off.

    Arguments left out are read from the environment, so a deployment can size the
    cluster without touching notebooks (``binder/start`` does this for mybinder.org):
    ``NBTOOL_N_WORKERS`` (CPU workers, e.g. ``1``; ignored when there are GPUs, which
    always get one worker each), ``NBTOOL_MEMORY_BUDGET`` (e.g.
    ``"256MB"``) and ``NBTOOL_CORES`` (the cores the CPU workers split among their
    TensorFlow threads; default ``os.cpu_count()``, which in a container reports the
    host's cores, not the container's share). An explicit argument wins.

    A worker process that cannot start fails the call at once with that worker's error;
    starting also removes input folders that killed kernels left in ``/dev/shm``.

    ``persist=True`` starts the local cluster in a process of its own that outlives the
    kernel (:mod:`nbtool.engine.persist.persistent`): after a kernel restart, ``nbtool.attach()`` finds
    its models registered and loaded as they were. If this user's persistent engine
    ``name`` runs already, this attaches to it. It ends with ``nbtool.shutdown()``, or by
    itself once no kernel was attached for ``idle_timeout`` (``"30min"`` by default,
    ``NBTOOL_IDLE_TIMEOUT``). Its TLS credentials are in a file only this user can read.

    Example:
        >>> eng = nbtool.start()                                  # doctest: +SKIP
        >>> eng = nbtool.start(gpus=[0, 1], memory_budget="6GB")  # doctest: +SKIP
        >>> eng = nbtool.start(backend="torch", gpus="none")      # doctest: +SKIP
        >>> eng = nbtool.start(persist=True, idle_timeout="2h")   # doctest: +SKIP
        >>> eng = nbtool.start(address="tls://10.0.0.5:8786",
        ...                    security=Security(tls_ca_file="ca.pem", tls_client_cert="me.pem",
        ...                                      tls_client_key="me.key",
        ...                                      require_encryption=True))  # doctest: +SKIP
    """
    from nbtool._util import quiet_dask, quiet_kernel

    quiet_kernel()
    quiet_dask()
    n_workers = check_count(n_workers, "n_workers")
    if memory_budget is None:
        memory_budget = env_setting("NBTOOL_MEMORY_BUDGET", as_bytes)
    budget = check_size(memory_budget, "memory_budget")
    if persist and (address is not None or security is not None):
        raise ValueError("persist=True starts a local cluster with credentials of its own; "
                         f"got {'address=' if address is not None else 'security='} too. Fix: "
                         "leave it out (a cluster at an address outlives the kernel anyway).")
    if address is None:
        from nbtool.engine.cluster import check_dashboard_address, clean_stale_shared_folders

        backend = check_backend(backend)
        check_dashboard_address(dashboard_address, allow_remote_dashboard)
        clean_stale_shared_folders()
        if persist:
            from nbtool.engine.persist import start_persistent

            return start_persistent(
                name, idle_timeout, work_dir, gpus=gpus, n_workers=n_workers,
                memory_budget=budget, dashboard_address=dashboard_address,
                allow_remote_dashboard=allow_remote_dashboard, backend=backend)
        cluster = local_cluster(gpus, n_workers, budget, dashboard_address, security,
                                allow_remote_dashboard, backend)
        n_expected = len(cluster.slots)
        plugin = NbtoolWorkerPlugin()    # budgets travel in each worker's environment
    else:
        cluster = None
        n_expected = 1
        plugin = NbtoolWorkerPlugin(budget)
    client = None
    try:
        client = Client(cluster) if cluster is not None else connect(address, security)
        wait_for_start(client, cluster, n_expected, address)
        client.register_plugin(plugin)
        eng = Engine(client, cluster, work_dir)
        if cluster is None and backend is not None:
            check_cluster_backend(eng, address, backend)
    except BaseException:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        raise
    set_default_engine(eng)
    return eng


def local_cluster(gpus, n_workers, budget, dashboard_address, security,
                  allow_remote_dashboard, backend: str = "tensorflow"):
    """The PinnedCluster for :func:`start`: one worker per GPU, else CPU workers, all
    running Keras on ``backend``.

    Example:
        >>> local_cluster("none", 2, None, "127.0.0.1:0", None, False)   # doctest: +SKIP
        PinnedCluster(...)
    """
    from nbtool.engine.cluster import PinnedCluster, free_dashboard_address

    selected = select_gpus(gpus, discover_gpus())
    env_workers = env_setting("NBTOOL_N_WORKERS", int)
    if n_workers is None and not selected:   # GPUs always get one worker each
        n_workers = env_workers
    slots = plan_workers(selected, n_workers=n_workers, memory_budget=budget,
                         cores=env_setting("NBTOOL_CORES", int), backend=backend)
    cluster = PinnedCluster(slots, dashboard_address=free_dashboard_address(dashboard_address),
                            security=security, allow_remote_dashboard=allow_remote_dashboard)
    # Said once in the engine's repr: the devices, and a backend other than the default.
    cluster.gpu_note = ", ".join(n for n in (gpu_note(gpus, selected), "" if backend ==
                                             "tensorflow" else f"Keras on {backend}") if n)
    return cluster


def check_cluster_backend(eng: Engine, address: str, backend: str) -> None:
    """Refuse an external cluster whose workers run another Keras backend than
    ``backend``: nbtool cannot change what a running worker imported.

    Example:
        >>> check_cluster_backend(eng, "tcp://10.0.0.5:8786", "jax")   # doctest: +SKIP
        Traceback (most recent call last):
        ...
        nbtool.errors.NbtoolError: backend='jax': the workers at tcp://10.0.0.5:8786 run Keras on 'tensorflow' ...
    """
    wanted = str(backend).strip().lower()
    wanted = "torch" if wanted == "pytorch" else wanted
    found = sorted({w.backend for w in eng.pool.workers.values()})
    if found != [wanted]:
        raise NbtoolError(
            f"backend={backend!r}: the workers at {address} run Keras on "
            f"{', '.join(repr(f) for f in found)} (their KERAS_BACKEND, read when they "
            "started); nbtool cannot change it. Fix: leave backend= out to use theirs, or "
            f"start the cluster's workers with KERAS_BACKEND={wanted} in their environment.")


def gpu_note(gpus, selected: list) -> str:
    """How the engine came to its workers' devices, said once in its repr.

    Example:
        >>> gpu_note("none", []), gpu_note("auto", []), gpu_note("auto", ["gpu:0"])
        ("GPUs not used (gpus='none')", 'no GPU found', '')
    """
    if selected:
        return ""
    if gpus in (None, "none", 0, []):
        return "GPUs not used (gpus={!r})".format(gpus)
    return "no GPU found"


def connect(address: str, security) -> Client:
    """A client of an external scheduler, with the user's Security if any.

    Example:
        >>> connect("tls://10.0.0.5:8786", None)   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: address='tls://10.0.0.5:8786' is a TLS scheduler, but no security= ...
    """
    if str(address).startswith("tls://") and security is None:
        raise ValueError(
            f"address={address!r} is a TLS scheduler, but no security= was given: expected "
            "a distributed.security.Security with the cluster's CA and a client certificate. "
            "Fix: nbtool.start(address, security=Security(tls_ca_file=..., "
            "tls_client_cert=..., tls_client_key=..., require_encryption=True)).")
    return Client(address, security=security)


def wait_for_start(client: Client, cluster, n_expected: int, address: str | None) -> None:
    """Wait for the workers; a local worker process that fails ends the wait at once.

    Dask keeps a Nanny's startup failure in a background task and the scheduler just never
    hears from that worker; without looking, the wait would run out its whole timeout.

    Example:
        >>> wait_for_start(client, cluster, 2, None)   # doctest: +SKIP
    """
    from nbtool.engine.cluster import start_failure

    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while True:
        failed = cluster.failed_workers() if cluster is not None else {}
        if failed:
            raise start_failure(failed)
        try:
            client.wait_for_workers(n_expected, timeout=0.5)
            return
        except TimeoutError:
            if time.monotonic() >= deadline:
                break
    raise NbtoolError(
        f"fewer than {n_expected} worker(s) started within {WORKER_START_TIMEOUT}s"
        + (f" at {address}" if address else "") + ". Fix: look at the worker logs "
        "above; in a script, guard the call with `if __name__ == '__main__':` "
        "(workers are spawned processes that import the main module).")
