"""Where each registered model may run: pinned ones as asked, the others on every worker
of their kind that has room.

A model registered with the default ``replicas=None`` ("auto") is not pinned to one
worker: it may run on every worker of its device kind whose model budget has room for it,
so an ensemble keeps every worker busy (the run's planner, :mod:`nbtool.prediction.planning`, splits
each model's chunks over the workers that hold it). Room is shared fairly: the auto models
are placed together, again whenever the catalog or the workers change, largest first one
worker each (the one with the most free budget), then one more worker each, in turn, while
a worker's budget still has room for the whole model. Under a tight budget a model thus
keeps one worker, as with ``replicas=1``, and no model's copies squeeze out one registered
later. Pinned models (``replicas=N``, ``device="gpu:1"``) are placed first and their bytes
count against the budgets.

Example:
    >>> ws = [WorkerInfo("cpu0", "cpu:0", 100), WorkerInfo("cpu1", "cpu:1", 100)]
    >>> place_auto({"a": (30, "auto"), "b": (20, "auto"), "c": (10, "auto")}, ws)
    {'a': ['cpu0', 'cpu1'], 'b': ['cpu1', 'cpu0'], 'c': ['cpu1', 'cpu0']}
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from nbtool.errors import PlacementError
from nbtool.wire import ModelSpec


def place_auto(models: dict[str, tuple[int, str]], workers: Iterable[WorkerInfo],
               pinned: dict[str, int] | None = None,
               previous: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """The workers each auto model may run on, first its main one.

    ``models``: name -> (size in bytes, device: ``"auto"``, ``"cpu"`` or ``"gpu"``);
    ``pinned``: bytes the pinned models take on each worker; ``previous``: the last plan,
    whose main worker a model keeps while it still has room there, or while no worker has
    (a model moved is a model loaded again). Those kept, the others get, largest first,
    the candidate with the most free budget (so registering one by one places each as
    ``replicas=1`` did); then, round by round, each model gets one more candidate that
    has room for it, until no worker has room for any.

    Example:
            >>> ws = [WorkerInfo("cpu0", "cpu:0", 100), WorkerInfo("cpu1", "cpu:1", 100)]
        >>> # eight models, room for two on each worker: one worker each, four per worker
        >>> tight = place_auto({f"m{i}": (50, "auto") for i in range(8)}, ws)
        >>> [len(w) for w in tight.values()], sorted(w[0] for w in tight.values())
        ([1, 1, 1, 1, 1, 1, 1, 1],
         ['cpu0', 'cpu0', 'cpu0', 'cpu0', 'cpu1', 'cpu1', 'cpu1', 'cpu1'])
        >>> # alone, "big" has a copy on both workers (cpu0 holds 30 pinned)...
        >>> place_auto({"big": (40, "auto")}, ws, {"cpu0": 30})
        {'big': ['cpu1', 'cpu0']}
        >>> # ...which does not squeeze out a model registered later
        >>> place_auto({"big": (40, "auto"), "late": (40, "auto")}, ws, {"cpu0": 30})
        {'big': ['cpu1'], 'late': ['cpu0', 'cpu1']}
        >>> # a main worker is kept while it has room
        >>> place_auto({"a": (30, "auto")}, ws, previous={"a": ["cpu1"]})
        {'a': ['cpu1', 'cpu0']}
    """
    workers = list(workers)
    budget = {w.name: w.budget for w in workers}
    used = {w.name: (pinned or {}).get(w.name, 0) for w in workers}
    previous = previous or {}
    order = sorted(models, key=lambda m: (-models[m][0], m))
    allowed = {m: [w.name for w in candidates(m, models[m][1], workers)] for m in order}

    def free(w: str) -> int:
        return budget[w] - used[w]

    plan: dict[str, list[str]] = {m: [] for m in order}   # [] : the caller refuses it
    # One worker each. First the models placed before keep theirs where they still fit,
    # or where nothing fits (moving them would not help): a new model, however large,
    # does not push an older one off its worker.
    for m in order:
        size, options, before = models[m][0], allowed[m], (previous.get(m) or [None])[0]
        if before in options and (free(before) >= size
                                  or all(free(w) < size for w in options)):
            plan[m] = [before]
            used[before] += size
    for m in order:   # then the others, largest first, each where most budget is free
        if allowed[m] and not plan[m]:
            main = min(allowed[m], key=lambda w: (-free(w), w))
            plan[m] = [main]
            used[main] += models[m][0]
    grown = True
    while grown:   # then one more each, in turn, while a worker has room for it
        grown = False
        for m in order:
            size = models[m][0]
            room = [w for w in allowed[m] if w not in plan[m] and free(w) >= size]
            if room:
                extra = min(room, key=lambda w: (-free(w), w))
                plan[m].append(extra)
                used[extra] += size
                grown = True
    return {m: plan[m] for m in models}


def is_auto(replicas: int | None, device: str) -> bool:
    """Whether a model registered with these options is placed by :func:`place_auto`:
    ``replicas=None`` on a device kind (``"auto"``, ``"cpu"``, ``"gpu"``), not one device.

    Example:
        >>> is_auto(None, "auto"), is_auto(None, "gpu"), is_auto(None, "gpu:1"), is_auto(2, "cpu")
        (True, True, False, False)
    """
    return replicas is None and ":" not in device


def placed_with(spec: ModelSpec, specs: dict[str, ModelSpec],
                placement: dict[str, list[str]],
                workers: Iterable[WorkerInfo]) -> dict[str, list[str]]:
    """The placement of every model once ``spec`` joins ``specs`` (the registered ones,
    placed as ``placement`` says): a pinned ``spec`` placed by :func:`place` beside the
    others (:func:`assigned_bytes`), the others kept, then every auto model placed again
    (:func:`place_all`). Raises :class:`~nbtool.errors.PlacementError` if ``spec`` cannot
    be placed (no worker of its kind, more replicas than workers).

    Example:
            >>> ws = [WorkerInfo("cpu0", "cpu:0", 100), WorkerInfo("cpu1", "cpu:1", 100)]
        >>> spec = lambda n, size, **kw: ModelSpec(n, n, "keras", size, "fp", replicas=None, **kw)
        >>> placement = placed_with(spec("a", 60), {}, {}, ws); placement
        {'a': ['cpu0', 'cpu1']}
        >>> placed_with(spec("p", 50, device="cpu:0"), {"a": spec("a", 60)}, placement, ws)
        {'a': ['cpu1'], 'p': ['cpu0']}
    """
    workers = list(workers)
    specs = {**specs, spec.name: spec}
    # Checked (and placed, if pinned) as ever: an impossible device fails here.
    pinned_to = place(spec.name, spec.size_bytes, spec.device, spec.replicas or 1, workers,
                      assigned_bytes(specs, placement, exclude=spec.name))
    kept = {n: ws for n, ws in placement.items() if n in specs and n != spec.name}
    if not is_auto(spec.replicas, spec.device):
        kept[spec.name] = pinned_to
    return place_all(specs, kept, workers)


def place_all(specs: dict[str, ModelSpec], placement: dict[str, list[str]],
              workers: Iterable[WorkerInfo]) -> dict[str, list[str]]:
    """The pinned models of ``placement`` where they are, and every auto model of
    ``specs`` placed again around them (:func:`place_auto`; one that no worker can take
    keeps where it was). In the order of ``specs``.

    Example:
            >>> ws = [WorkerInfo("cpu0", "cpu:0", 100), WorkerInfo("cpu1", "cpu:1", 100)]
        >>> specs = {"p": ModelSpec("p", "p", "keras", 50, "fp", device="cpu:1"),
        ...          "a": ModelSpec("a", "a", "keras", 60, "fp", replicas=None)}
        >>> place_all(specs, {"p": ["cpu1"]}, ws)
        {'p': ['cpu1'], 'a': ['cpu0']}
    """
    pinned: dict[str, int] = {}
    for n, ws in placement.items():
        if not is_auto(specs[n].replicas, specs[n].device):
            for w in ws:
                pinned[w] = pinned.get(w, 0) + specs[n].size_bytes
    auto = place_auto({n: (s.size_bytes, s.device) for n, s in specs.items()
                       if is_auto(s.replicas, s.device)}, workers, pinned, previous=placement)
    placed = {**placement, **{n: ws for n, ws in auto.items() if ws}}
    return {n: placed[n] for n in specs if n in placed}


def assigned_bytes(specs: dict[str, ModelSpec], placement: dict[str, list[str]],
                   exclude: str | None = None) -> dict[str, int]:
    """Bytes placed on each worker, for placing a pinned model: a pinned model's on each
    of its workers, an auto model's on its main one only (its copies elsewhere give way
    to the models placed after it).

    Example:
        >>> specs = {"a": ModelSpec("a", "a", "keras", 60, "fp", replicas=None),
        ...          "p": ModelSpec("p", "p", "keras", 10, "fp", replicas=2)}
        >>> assigned_bytes(specs, {"a": ["cpu0", "cpu1"], "p": ["cpu0", "cpu1"]})
        {'cpu0': 70, 'cpu1': 10}
    """
    assigned: dict[str, int] = {}
    for name, workers in placement.items():
        spec = specs.get(name)
        if name == exclude or spec is None:
            continue
        for w in workers[:1] if is_auto(spec.replicas, spec.device) else workers:
            assigned[w] = assigned.get(w, 0) + spec.size_bytes
    return assigned


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """A running worker as placement sees it: its stable name, device and model budget.

    Example:
        >>> WorkerInfo("gpu0", "gpu:0", 2**30).kind
        'gpu'
    """

    name: str
    device: str
    budget: int
    backend: str = "tensorflow"   # the Keras backend it runs

    @property
    def kind(self) -> str:
        """``"gpu"`` or ``"cpu"``: what ``device="gpu"`` matches."""
        return self.device.split(":", 1)[0]


def candidates(model: str, device: str, workers: Iterable[WorkerInfo]) -> list[WorkerInfo]:
    """The workers ``device`` allows for ``model``, in the order given.

    ``"auto"`` means the GPU workers if there are any, else the CPU workers; ``"gpu"`` and
    ``"cpu"`` every worker of that kind; ``"gpu:1"`` that one device.

    Example:
        >>> ws = [WorkerInfo("cpu0", "cpu:0", 100), WorkerInfo("gpu0", "gpu:0", 100)]
        >>> [w.name for w in candidates("cnn", "auto", ws)], candidates("cnn", "cpu:3", ws)
        (['gpu0'], [])
    """
    workers = list(workers)
    device = device.strip().lower()
    if device == "auto":
        return [w for w in workers if w.kind == "gpu"] or workers
    if device in ("cpu", "gpu"):
        return [w for w in workers if w.kind == device]
    if ":" in device:
        return [w for w in workers if w.device == device]
    raise PlacementError(model, device, sorted({w.device for w in workers}),
                         "use device='auto', 'cpu', 'gpu' or one device like 'gpu:0'")


def place(model: str, size: int, device: str, replicas: int, workers: Iterable[WorkerInfo],
          assigned: dict[str, int]) -> list[str]:
    """Choose the workers that will hold a model; returns their names.

    ``device`` is ``"auto"`` (GPU workers if there are any, else CPU workers), ``"gpu"``,
    ``"cpu"``, or one device such as ``"gpu:1"`` (see :func:`candidates`). Among the
    candidates, the ``replicas`` with the most free budget win (``assigned`` holds the
    bytes already placed on each worker); call it largest model first for a good packing.
    This is the placement of a model pinned by ``replicas=`` or ``device="gpu:1"``; the
    others are placed together by :func:`nbtool.catalog.placement.place_auto`.

    Example:
        >>> ws = [WorkerInfo("cpu0", "cpu:0", 100), WorkerInfo("cpu1", "cpu:1", 100)]
        >>> place("cnn", 60, "auto", 1, ws, {"cpu0": 50, "cpu1": 0})
        ['cpu1']
        >>> place("cnn", 60, "cpu", 2, ws, {})
        ['cpu0', 'cpu1']
    """
    workers = list(workers)
    if replicas < 1:
        raise ValueError(f"model {model!r}: replicas={replicas}; expected 1 or more.")
    device = device.strip().lower()
    found = candidates(model, device, workers)
    if len(found) < replicas:
        available = sorted({w.device for w in workers})
        if not found:
            fix = ("start the engine with GPUs (nbtool.start(gpus='auto')) or use "
                   "device='auto'" if device.startswith("gpu") else "use device='auto'")
        else:
            fix = f"lower replicas to {len(found)} or start more workers"
        raise PlacementError(model, device, available, fix, replicas)
    free = {w.name: w.budget - assigned.get(w.name, 0) for w in found}
    order = sorted(found, key=lambda w: (-free[w.name], w.name))
    return [w.name for w in order[:replicas]]
