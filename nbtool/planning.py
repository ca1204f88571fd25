"""Plan a cold run: which replicas of each not-yet-loaded model should load it and run it.

A replicated model that no worker holds yet would, by default, be loaded by every replica
at once, each paying the same load and trace before its first chunk. When loading costs as
much as computing (an ensemble on a few thousand rows), it is faster to let different
workers load different models, and split only the models whose compute is worth a second
load. With what this machine measured before (:func:`nbtool.worker.model_costs`: load
seconds, seconds per row), the plan is the schedule that finishes first, found by trying
how many replicas each model uses. The replicas left out load in the background after the
run.

Example:
    >>> both = ["cpu0", "cpu1"]
    >>> plan_cold_routes({"effnet": both, "mobilenet": both, "cnn": both, "mlp": both},
    ...                  {"effnet": (2.4, 3.5), "mobilenet": (1.6, 0.7),  # (load s, run s)
    ...                   "cnn": (0.3, 1.5), "mlp": (0.3, 0.3)})
    {'effnet': ['cpu0'], 'mobilenet': ['cpu1'], 'cnn': ['cpu1'], 'mlp': ['cpu1']}
"""

from __future__ import annotations

import itertools
import math

#: Above this many combinations the search goes model by model instead of trying them all.
MAX_COMBINATIONS = 4096


def plan_cold_routes(replicas: dict[str, list[str]], costs: dict[str, tuple[float, float]],
                     busy: dict[str, float] | None = None) -> dict[str, list[str]]:
    """For each cold model, the replicas that should load and run it in this run.

    ``replicas``: model -> the workers it is placed on. ``costs``: model -> (load seconds,
    seconds to compute all of this run's rows on one worker). ``busy``: worker -> seconds
    of work it already has in this run (warm models' chunks). Models are placed largest
    first, each on its ``k`` least busy replicas, which all pay its load and share its
    compute; every choice of ``k`` per model is tried (model by model beyond
    ``MAX_COMBINATIONS``), and the plan that finishes first wins, with fewer loads breaking
    ties.

    Example:
        >>> both = ["cpu0", "cpu1"]
        >>> # loading dominates: each worker loads one model
        >>> plan_cold_routes({"a": both, "b": both}, {"a": (3.0, 0.2), "b": (3.0, 0.2)})
        {'a': ['cpu0'], 'b': ['cpu1']}
        >>> # compute dominates: both workers load it and share its rows
        >>> plan_cold_routes({"a": both}, {"a": (0.5, 8.0)})
        {'a': ['cpu0', 'cpu1']}
        >>> # cpu0 is busy with warm models' chunks: the cold one goes to cpu1 alone
        >>> plan_cold_routes({"a": both}, {"a": (1.0, 0.5)}, busy={"cpu0": 4.0})
        {'a': ['cpu1']}
    """
    busy = busy or {}
    workers = sorted({w for ws in replicas.values() for w in ws} | set(busy))
    start = {w: float(busy.get(w, 0.0)) for w in workers}
    order = sorted(replicas, key=lambda m: (-(costs[m][0] + costs[m][1]), m))

    def place(ks):
        """The routes and finish times when model i goes to its ks[i] least busy replicas."""
        finish, routes = dict(start), {}
        for model, k in zip(order, ks):
            load, work = costs[model]
            routes[model] = sorted(replicas[model], key=lambda w: (finish[w], w))[:k]
            for w in routes[model]:
                finish[w] += load + work / k
        return (max(finish.values(), default=0.0), sum(ks)), routes

    choices = [range(1, len(replicas[m]) + 1) for m in order]
    if math.prod(len(c) for c in choices) <= MAX_COMBINATIONS:
        _, routes = min((place(ks) for ks in itertools.product(*choices)),
                        key=lambda plan: plan[0])
    else:   # model by model: each takes the k that finishes earliest so far
        ks: list[int] = []
        for c in choices:
            ks.append(min(c, key=lambda k: place(ks + [k])[0]))
        _, routes = place(ks)
    return {m: routes[m] for m in replicas}
