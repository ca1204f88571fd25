"""Plan where a run goes: which replicas of each not-yet-loaded model load it and run it
now, and which load it afterwards (:class:`nbtool.loads.BackgroundLoads`).

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
import os

from .wire import ModelSpec
from .worker import model_costs, resident_models

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


def plan_routes(pool, specs: list[ModelSpec], placement: dict[str, list[str]],
                n_rows: int, measured_here: bool = True) -> tuple[dict, dict]:
    """Where each model's chunks go in this run, and the replicas to load afterwards.

    Every replica, unless some replicated models are loaded nowhere yet and this
    machine has measured them before: then :func:`plan_cold_routes` decides which
    replicas load and run each of them now. ``measured_here``: the costs recorded on the
    workers are this machine's (a local cluster); ``NBTOOL_PLAN_COLD=0`` turns it off.
    ``pool`` is the engine's :class:`~nbtool.pool.WorkerPool`: one round trip asks which
    models the workers hold, and, only if some are cold, one more their recorded costs.

    Example:
        >>> plan_routes(pool, [spec], {"cnn": ["cpu0", "cpu1"]}, 2000)   # doctest: +SKIP
        ({'cnn': ['cpu0']}, {'cnn': ['cpu1']})
    """
    routes = {s.name: list(placement[s.name]) for s in specs}
    replicated = [s for s in specs if len(routes[s.name]) > 1]
    if not replicated or not measured_here or os.environ.get("NBTOOL_PLAN_COLD", "1") == "0":
        return routes, {}
    used = sorted({w for s in specs for w in routes[s.name]})
    held = pool.run_on(resident_models, names=used)   # worker -> {model: fingerprint}
    cold = [s for s in replicated
            if not any(m.get(s.name) == s.fingerprint for m in held.values())]
    if not cold:
        return routes, {}
    measured: dict[str, list[dict]] = {}
    for per_worker in pool.run_on(model_costs, specs, names=used).values():
        for name, c in per_worker.items():
            measured.setdefault(name, []).append(c)
    return route_cold_run(specs, routes, held, measured, n_rows)


def route_cold_run(specs: list[ModelSpec], routes: dict[str, list[str]],
                   held: dict[str, dict[str, str]], measured: dict[str, list[dict]],
                   n_rows: int) -> tuple[dict, dict]:
    """The arithmetic of :func:`plan_routes`: the routes of the cold replicated models
    from their measured costs (``measured``: model -> each worker's ``{"load": s, "row":
    s}``), the other models' work counted as each worker's busy time first. Returns
    (routes, replicas to load afterwards); every replica if some cold model was never
    measured here.

    Example:
        >>> spec = lambda n: ModelSpec(n, n, "keras", 1, "fp")
        >>> both = ["cpu0", "cpu1"]
        >>> route_cold_run([spec("a"), spec("b")], {"a": both, "b": both}, {"cpu0": {}},
        ...                {"a": [{"load": 3.0, "row": 1e-4}], "b": [{"load": 3.0, "row": 1e-4}]},
        ...                2000)
        ({'a': ['cpu0'], 'b': ['cpu1']}, {'a': ['cpu1'], 'b': ['cpu0']})
    """
    routes = dict(routes)
    cold = [s for s in specs if len(routes[s.name]) > 1
            and not any(m.get(s.name) == s.fingerprint for m in held.values())]
    if any(s.name not in measured for s in cold):
        return routes, {}   # first time here: every replica, and this run measures them
    cost = {n: (sum(c["load"] for c in cs) / len(cs), sum(c["row"] for c in cs) / len(cs))
            for n, cs in measured.items()}
    busy = dict.fromkeys(sorted({w for s in specs for w in routes[s.name]}), 0.0)
    for s in specs:
        if s not in cold and s.name in cost:   # the others' rows, and loads still due
            load, row = cost[s.name]
            for w in routes[s.name]:
                due = held.get(w, {}).get(s.name) != s.fingerprint
                busy[w] += (load if due else 0.0) + row * n_rows / len(routes[s.name])
    plan = plan_cold_routes({s.name: routes[s.name] for s in cold},
                            {s.name: (cost[s.name][0], cost[s.name][1] * n_rows)
                             for s in cold}, busy)
    later = {n: [w for w in routes[n] if w not in ws] for n, ws in plan.items()}
    routes.update(plan)
    return routes, {n: ws for n, ws in later.items() if ws}

