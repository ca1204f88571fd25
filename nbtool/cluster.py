"""A local Dask cluster with one worker process per GPU, each pinned to its own GPU.

Like dask-cuda's ``LocalCUDACluster``, it is Dask's own :class:`~distributed.LocalCluster`
with one override, :meth:`PinnedCluster.new_worker_spec`, which gives every worker the name,
environment and device of its :class:`~nbtool.devices.WorkerSlot`. The environment reaches
the worker through the Nanny, before the worker process (spawned, never forked) imports
CUDA or TensorFlow.

Example:
    >>> from nbtool.devices import plan_workers
    >>> cluster = PinnedCluster(plan_workers([], n_workers=2))   # doctest: +SKIP
    >>> sorted(cluster.worker_spec)                             # doctest: +SKIP
    ['cpu0', 'cpu1']
"""

from __future__ import annotations

import copy

from distributed import LocalCluster, Nanny

from .devices import WorkerSlot
from .worker import resource_name


class PinnedCluster(LocalCluster):
    """One single-threaded worker per :class:`~nbtool.devices.WorkerSlot`, on 127.0.0.1.

    Parameters
    ----------
    slots : list of WorkerSlot
        The workers to run (see :func:`nbtool.devices.plan_workers`). Each worker is named
        after its slot (``"gpu0"``, ``"cpu1"``): names survive worker restarts, addresses
        do not, so nbtool always refers to workers by name.
    dashboard_address : str, default "127.0.0.1:8787"
        Where Dask's dashboard listens. Only loopback addresses are accepted by default.
    **kwargs
        Passed to :class:`distributed.LocalCluster`.

    Raises
    ------
    ValueError
        If ``slots`` is empty or two slots share a name.

    Examples
    --------
    >>> from nbtool.devices import plan_workers, parse_inventory
    >>> slots = plan_workers(parse_inventory("2x16GB"), cores=2, total_memory=2**34)
    >>> cluster = PinnedCluster(slots)                       # doctest: +SKIP
    >>> cluster.worker_spec["gpu1"]["options"]["env"]["CUDA_VISIBLE_DEVICES"]  # doctest: +SKIP
    '1'
    """

    def __init__(self, slots: list[WorkerSlot], *, dashboard_address: str = "127.0.0.1:8787",
                 **kwargs):
        if not slots:
            raise ValueError("PinnedCluster needs at least one WorkerSlot; got none.")
        names = [s.name for s in slots]
        if len(set(names)) != len(names):
            raise ValueError(f"worker slot names must be unique; got {names}.")
        self.slots = {s.name: s for s in slots}
        import psutil

        kwargs.setdefault("memory_limit", int(psutil.virtual_memory().total / len(slots)))
        super().__init__(
            n_workers=0,
            threads_per_worker=1,   # one task at a time: a worker runs one model at a time
            processes=True,
            host="127.0.0.1",
            dashboard_address=dashboard_address,
            worker_class=Nanny,
            **kwargs,
        )
        self.scale(len(slots))

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
