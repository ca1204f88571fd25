"""What runs on a persistent engine's scheduler for the kernels that attach to it.

Functions sent with ``client.run_on_scheduler``: they run one at a time in the scheduler's
event loop, so two kernels attaching at once cannot both claim the engine. The registry a
kernel keeps there is under :data:`STATE_KEY` in the scheduler's metadata.

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
