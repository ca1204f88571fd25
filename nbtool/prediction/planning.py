"""Plan where a run goes: which of the workers each model may run on compute its chunks
now, and which load it afterwards (:class:`nbtool.catalog.loads.BackgroundLoads`).

A model placed on several workers (every worker with room, by default:
:mod:`nbtool.catalog.placement`; or ``replicas=N``) could run on all of them, but not every split
pays: a worker that does not hold the model yet pays its load and trace before its first
chunk, and a worker already busy with other models' chunks finishes later. With what this
machine measured before (:func:`nbtool.worker.model_costs`: load seconds, seconds per row)
and what each worker holds now (:func:`nbtool.worker.resident_models`), the plan is the
schedule that finishes first, found by trying how many of its workers each model uses
(:func:`plan_model_routes`): a warm ensemble splits every model's chunks over every worker;
a cold one lets different workers load different models, and splits only the models whose
compute is worth a second load. The workers left out load the model in the background
after the run, so the next run finds it everywhere. Never measured here (a model's first
run on this machine): it loads and runs on every worker it may run on (measured: see
:func:`first_routes`).

Example:
    >>> both = ["cpu0", "cpu1"]
    >>> plan_model_routes({"effnet": both, "mobilenet": both, "cnn": both, "mlp": both},
    ...                   {"effnet": (2.4, 3.5), "mobilenet": (1.6, 0.7),  # (load s, run s)
    ...                    "cnn": (0.3, 1.5), "mlp": (0.3, 0.3)})
    {'effnet': ['cpu0'], 'mobilenet': ['cpu1'], 'cnn': ['cpu1'], 'mlp': ['cpu1']}
    >>> # the same models warm on both workers: every model split over both
    >>> plan_model_routes({"effnet": both, "mobilenet": both, "cnn": both, "mlp": both},
    ...                   {"effnet": (2.4, 3.5), "mobilenet": (1.6, 0.7),
    ...                    "cnn": (0.3, 1.5), "mlp": (0.3, 0.3)},
    ...                   resident={m: both for m in ("effnet", "mobilenet", "cnn", "mlp")})
    {'effnet': ['cpu0', 'cpu1'], 'mobilenet': ['cpu0', 'cpu1'],
     'cnn': ['cpu0', 'cpu1'], 'mlp': ['cpu0', 'cpu1']}
"""

from __future__ import annotations

import itertools
import math
import os

from nbtool.wire import ModelSpec
from nbtool.worker import model_costs, resident_models

#: Above this many combinations the search goes model by model instead of trying them all.
MAX_COMBINATIONS = 1024


def plan_model_routes(eligible: dict[str, list[str]], costs: dict[str, tuple[float, float]],
                      busy: dict[str, float] | None = None,
                      resident: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """For each model, the workers among ``eligible`` that should run it in this run.

    ``eligible``: model -> the workers it may run on. ``costs``: model -> (load seconds,
    seconds to compute all of this run's rows on one worker). ``busy``: worker -> seconds
    of work it already has in this run (the chunks of models that have one worker).
    ``resident``: model -> the workers that hold it now (they pay no load). Models are
    placed largest first, each on the ``k`` of its workers that would be free first
    (counting its load where it is due), which share its rows equally; every choice of
    ``k`` per model is tried (model by model beyond ``MAX_COMBINATIONS``), and the plan
    that finishes first wins, with fewer loads, then more workers, breaking ties.

    Example:
        >>> both = ["cpu0", "cpu1"]
        >>> # loading dominates: each worker loads one model
        >>> plan_model_routes({"a": both, "b": both}, {"a": (3.0, 0.2), "b": (3.0, 0.2)})
        {'a': ['cpu0'], 'b': ['cpu1']}
        >>> # compute dominates: both workers load it and share its rows
        >>> plan_model_routes({"a": both}, {"a": (0.5, 8.0)})
        {'a': ['cpu0', 'cpu1']}
        >>> # cpu0 is busy with other models' chunks: the cold one goes to cpu1 alone
        >>> plan_model_routes({"a": both}, {"a": (1.0, 0.5)}, busy={"cpu0": 4.0})
        {'a': ['cpu1']}
        >>> # held by cpu1 only: a short run stays there, a long one pays a load on cpu0
        >>> plan_model_routes({"a": both}, {"a": (2.0, 1.0)}, resident={"a": ["cpu1"]})
        {'a': ['cpu1']}
        >>> plan_model_routes({"a": both}, {"a": (2.0, 9.0)}, resident={"a": ["cpu1"]})
        {'a': ['cpu0', 'cpu1']}
    """
    busy, resident = busy or {}, resident or {}
    workers = sorted({w for ws in eligible.values() for w in ws} | set(busy))
    start = {w: float(busy.get(w, 0.0)) for w in workers}
    order = sorted(eligible, key=lambda m: (-(costs[m][0] + costs[m][1]), m))
    prepared = [(eligible[m], set(resident.get(m, ())), *costs[m]) for m in order]

    def place(ks):
        """The score (finish, loads, -workers) and the routes when model i goes to its
        ks[i] workers free first."""
        finish, routes, loads = dict(start), [], 0
        for (ws, held, load, work), k in zip(prepared, ks):
            chosen = sorted(ws, key=lambda w: (finish[w] + (0.0 if w in held else load), w))[:k]
            for w in chosen:
                finish[w] += work / k + (0.0 if w in held else load)
                loads += w not in held
            routes.append(chosen)
        # Rounded: a plan that only moves float noise around is no better. At equal
        # finish and loads, the wider split wins: it is balanced whatever the estimates.
        return (round(max(finish.values(), default=0.0), 9), loads, -sum(ks)), routes

    choices = [range(1, len(eligible[m]) + 1) for m in order]
    if math.prod(len(c) for c in choices) <= MAX_COMBINATIONS:
        ks = min(itertools.product(*choices), key=lambda ks: place(ks)[0])
    else:   # model by model: each takes the k that finishes earliest so far
        ks = []
        for c in choices:
            ks.append(min(c, key=lambda k: place(ks + [k])[0]))
    routes = dict(zip(order, place(ks)[1]))
    return {m: sorted(routes[m]) for m in eligible}


def plan_routes(pool, specs: list[ModelSpec], placement: dict[str, list[str]],
                n_rows: int, measured_here: bool = True) -> tuple[dict, dict]:
    """Where each model's chunks go in this run, and the workers to load it on afterwards.

    A model placed on one worker runs there. For the others, one round trip asks which
    models the workers hold; if every model is held by every worker it may run on, and
    all may run on the same workers, every model's chunks are split over all of them.
    Else one more round trip asks the costs this machine recorded, and
    :func:`route_run` plans. ``measured_here``: the costs recorded on the workers are
    this machine's (a local cluster); elsewhere, or with ``NBTOOL_PLAN_COLD=0``, every
    model runs on every worker it is placed on. ``pool`` is the engine's
    :class:`~nbtool.engine.pool.WorkerPool`.

    Example:
        >>> plan_routes(pool, [spec], {"cnn": ["cpu0", "cpu1"]}, 2000)   # doctest: +SKIP
        ({'cnn': ['cpu0']}, {'cnn': ['cpu1']})
    """
    routes = {s.name: list(placement[s.name]) for s in specs}
    if all(len(ws) < 2 for ws in routes.values()) or not measured_here \
            or os.environ.get("NBTOOL_PLAN_COLD", "1") == "0":
        return routes, {}
    used = sorted({w for ws in routes.values() for w in ws})
    held = pool.run_on(resident_models, names=used)   # worker -> {model: fingerprint}
    if not needs_costs(specs, routes, held):
        return routes, {}
    measured: dict[str, list[dict]] = {}
    for per_worker in pool.run_on(model_costs, specs, names=used).values():
        for name, c in per_worker.items():
            measured.setdefault(name, []).append(c)
    return route_run(specs, routes, held, measured, n_rows)


def holders(spec: ModelSpec, workers: list[str], held: dict[str, dict[str, str]]) -> list[str]:
    """Those of ``workers`` that hold ``spec``'s file now (``held``: worker -> {model:
    fingerprint}, as :func:`nbtool.worker.resident_models` says).

    Example:
        >>> spec = ModelSpec("a", "a", "keras", 1, "fp")
        >>> holders(spec, ["cpu0", "cpu1"], {"cpu0": {"a": "fp"}, "cpu1": {"a": "old"}})
        ['cpu0']
    """
    return [w for w in workers if held.get(w, {}).get(spec.name) == spec.identity]


def needs_costs(specs: list[ModelSpec], routes: dict[str, list[str]],
                held: dict[str, dict[str, str]]) -> bool:
    """Whether planning this run needs the measured costs: not when every model is held
    by every worker it may run on, and all may run on the same workers (then splitting
    every model over all of them is as balanced as it gets).

    Example:
        >>> a, b = ModelSpec("a", "a", "keras", 1, "fp"), ModelSpec("b", "b", "keras", 1, "fp")
        >>> both = {"cpu0": {"a": "fp", "b": "fp"}, "cpu1": {"a": "fp", "b": "fp"}}
        >>> needs_costs([a, b], {"a": ["cpu0", "cpu1"], "b": ["cpu1", "cpu0"]}, both)
        False
        >>> needs_costs([a, b], {"a": ["cpu0", "cpu1"], "b": ["cpu0"]}, both)
        True
    """
    sets = {frozenset(routes[s.name]) for s in specs}
    return len(sets) > 1 or any(len(holders(s, routes[s.name], held)) < len(routes[s.name])
                                for s in specs)


def route_run(specs: list[ModelSpec], routes: dict[str, list[str]],
              held: dict[str, dict[str, str]], measured: dict[str, list[dict]],
              n_rows: int) -> tuple[dict, dict]:
    """The arithmetic of :func:`plan_routes`: from the workers each model may run on
    (``routes``), what they hold (``held``) and the costs measured here (``measured``:
    model -> each worker's ``{"load": s, "row": s}``), the routes of this run and the
    workers to load each model on afterwards. With every model that has several workers
    measured (or held by all of them), :func:`plan_model_routes` plans, the one-worker
    models' work counted first; else :func:`first_routes` does.

    Example:
        >>> spec = lambda n: ModelSpec(n, n, "keras", 1, "fp")
        >>> both = ["cpu0", "cpu1"]
        >>> route_run([spec("a"), spec("b")], {"a": both, "b": both}, {"cpu0": {}},
        ...           {"a": [{"load": 3.0, "row": 1e-4}], "b": [{"load": 3.0, "row": 1e-4}]},
        ...           2000)
        ({'a': ['cpu0'], 'b': ['cpu1']}, {'a': ['cpu1'], 'b': ['cpu0']})
    """
    routes = dict(routes)
    resident = {s.name: holders(s, routes[s.name], held) for s in specs}
    multi = [s for s in specs if len(routes[s.name]) > 1]
    cost = {n: (sum(c["load"] for c in cs) / len(cs), sum(c["row"] for c in cs) / len(cs))
            for n, cs in measured.items() if cs}
    if any(s.name not in cost and len(resident[s.name]) < len(routes[s.name])
           for s in multi):
        plan = first_routes(specs, routes, resident)
    else:
        busy = dict.fromkeys(sorted({w for s in specs for w in routes[s.name]}), 0.0)
        for s in specs:
            if len(routes[s.name]) == 1 and s.name in cost:   # their rows, loads still due
                load, row = cost[s.name]
                w = routes[s.name][0]
                busy[w] += (0.0 if resident[s.name] else load) + row * n_rows
        planned = [s for s in multi if s.name in cost]
        plan = plan_model_routes({s.name: routes[s.name] for s in planned},
                                 {s.name: (cost[s.name][0], cost[s.name][1] * n_rows)
                                  for s in planned}, busy,
                                 {s.name: resident[s.name] for s in planned})
    later = {n: [w for w in routes[n] if w not in ws and w not in resident[n]]
             for n, ws in plan.items()}
    routes.update(plan)
    return routes, {n: ws for n, ws in later.items() if ws}


def first_routes(specs: list[ModelSpec], routes: dict[str, list[str]],
                 resident: dict[str, list[str]]) -> dict[str, list[str]]:
    """Routes with nothing measured yet (a model's first run on this machine): a model
    held somewhere runs where it is held (it loads on the others afterwards); one held
    nowhere loads and runs on every worker it may run on.

    Every worker, measured against the alternative (each model loaded on one worker, the
    least busy, the others loading after the run): a 3-model ensemble (MobileNetV3Small, a
    residual CNN, an MLP at 96x96) on 2,000 rows and two CPU workers took 7.7 s this way
    against 9.5 s (``benchmarks/balance.py``, medians of 3): without costs nothing says
    the compute is small, and a split compute is what a big one needs.

    Example:
        >>> spec = lambda n: ModelSpec(n, n, "keras", 1, "fp", replicas=None)
        >>> both = ["cpu0", "cpu1"]
        >>> first_routes([spec("a"), spec("b"), spec("c")], {"a": both, "b": both, "c": ["cpu0"]},
        ...              {"b": ["cpu1"]})
        {'a': ['cpu0', 'cpu1'], 'b': ['cpu1']}
    """
    return {s.name: list(resident.get(s.name) or routes[s.name])
            for s in specs if len(routes[s.name]) > 1}


class RunOrder:
    """The order a run's tasks go in on each worker, and what each worker reads ahead.

    On a worker whose budget holds every model of the run routed to it, chunk i of every
    model goes before chunk i+1 of any: an ensemble progresses together, and an
    interrupted run has stored some of each. On a worker whose budget does not hold them
    all (*crowded*), that order would have each model's chunks evict the others' models,
    chunk after chunk; there the models go one after another instead, all of a model's
    chunks while it is resident, so each loads once per run, and the first chunk of each
    model starts reading the next model's file (``read_ahead``) while it computes.
    Sizes are the models' files (what a load charges to the budget, near enough).
    ``NBTOOL_ORDER_BY_MODEL=0`` keeps chunk order everywhere (what ``benchmarks/
    budget_order.py`` compares with).

    Example:
        >>> a, b = (ModelSpec(n, f"/m/{n}.keras", "keras", 600, n) for n in "ab")
        >>> order = RunOrder([(a, ["w0"]), (b, ["w0"])], {"w0": 1000}, n_chunks=3)
        >>> order.crowded, [order.task(m, i, "w0")[0] for m in (0, 1) for i in range(3)]
        ({'w0'}, [0, -1, -2, -3, -4, -5])
        >>> order.task(0, 0, "w0")[1], order.task(0, 1, "w0")[1], order.task(1, 0, "w0")[1]
        ('/m/b.keras', None, None)
        >>> RunOrder([(a, ["w0"]), (b, ["w0"])], {"w0": 2000}, 3).task(1, 2, "w0")
        (-2, None)
    """

    def __init__(self, placements: list[tuple[ModelSpec, list[str]]], budgets: dict,
                 n_chunks: int):
        self.placements, self.n_chunks = placements, n_chunks
        # Each worker's budget: a number, or anything with .budget (the pool's WorkerInfo).
        budget = {w: getattr(b, "budget", b) for w, b in budgets.items()}
        held: dict[str, int] = {}
        for spec, workers in placements:
            for w in set(workers):
                held[w] = held.get(w, 0) + (spec.size_bytes or 0)
        self.crowded = {w for w, size in held.items() if budget.get(w) and size > budget[w]}
        if os.environ.get("NBTOOL_ORDER_BY_MODEL", "1") == "0":   # the order before (bench)
            self.crowded = set()

    def task(self, m: int, i: int, worker: str) -> tuple[int, str | None]:
        """(Dask priority, the file to read ahead or None) of chunk ``i`` of the run's
        ``m``-th model on ``worker``."""
        if worker not in self.crowded:
            return -i, None
        ahead = None
        if worker == self._first_worker(m, i):   # this model's first chunk here
            ahead = next((s.path for s, ws in self.placements[m + 1:] if worker in ws), None)
        return -(m * self.n_chunks + i), ahead

    def _first_worker(self, m: int, i: int) -> str | None:
        """The worker of model ``m``'s chunk ``i`` if no earlier chunk of it went there
        (chunks go to a model's workers in turn, offset by ``m``: see prediction/run.py)."""
        workers = self.placements[m][1]
        return workers[(i + m) % len(workers)] if i < len(workers) else None
