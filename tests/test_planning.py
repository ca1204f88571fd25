"""Placement and run plans, pure: balanced by default, never more loads under a tight budget.

Where models may run (nbtool.catalog.placement) and where a run sends their chunks
(nbtool.prediction.planning), from sizes, budgets, what the workers hold and what they measured.
"""

import random

import pytest

from nbtool.catalog.placement import WorkerInfo, place
from nbtool.errors import PlacementError
from nbtool.catalog.placement import assigned_bytes, place_all, placed_with
from nbtool.prediction.planning import first_routes, needs_costs, plan_model_routes, route_run
from nbtool.wire import ModelSpec

CPUS = [WorkerInfo("cpu0", "cpu:0", 1000), WorkerInfo("cpu1", "cpu:1", 1000)]
BOTH = ["cpu0", "cpu1"]


def spec(name, size=100, replicas=None, device="auto"):
    return ModelSpec(name, f"/m/{name}.keras", "keras", size, f"fp-{name}",
                     device=device, replicas=replicas)


def register_all(specs, workers=CPUS):
    """The placement after registering ``specs`` one by one, as the catalog does."""
    registered, placement = {}, {}
    for s in specs:
        placement = placed_with(s, registered, placement, workers)
        registered[s.name] = s
    return placement


def held_everywhere(specs, workers=BOTH):
    return {w: {s.name: s.fingerprint for s in specs} for w in workers}


# -- placement -----------------------------------------------------------------------------
def test_an_ensemble_with_room_may_run_on_every_worker():
    specs = [spec("mobilenet", 300), spec("cnn", 200), spec("mlp", 50)]
    placement = register_all(specs)
    assert {n: sorted(ws) for n, ws in placement.items()} == {n.name: BOTH for n in specs}
    # the main workers alternate, largest first, as replicas=1 placed them
    assert [ws[0] for ws in placement.values()] == ["cpu0", "cpu1", "cpu1"]


@pytest.mark.parametrize("jitter", [0, 5])
def test_a_tight_budget_keeps_one_worker_per_model_as_replicas_1_did(jitter):
    """Eight models, budget for two on each worker: no copies at all (a copy would be
    evicted and loaded again on every run), each worker holds four, as before. Sizes a
    few bytes apart (files of one architecture): once, a later and larger model took an
    older one's worker while that one stayed, and six of the eight ended on one worker."""
    rng = random.Random(2)
    specs = [spec(f"m{i}", 500 + rng.randint(-jitter, jitter)) for i in range(8)]
    placement = register_all(specs)
    assert all(len(ws) == 1 for ws in placement.values())
    per_worker = [sum(ws == [w] for ws in placement.values()) for w in BOTH]
    assert per_worker == [4, 4]
    # and runs plan nothing to load afterwards: every model has its one worker
    routes, later = route_run(specs, placement, {}, {}, 1000)
    assert routes == placement and later == {}


def test_registering_more_models_never_moves_the_ones_placed_before():
    """A model moved is a model loaded again: under a tight budget too, where nothing fits,
    each keeps its main worker as the next ones are registered."""
    mains, registered, placement = {}, {}, {}
    for i in range(8):
        s = spec(f"m{i}", 500)
        placement = placed_with(s, registered, placement, CPUS)
        registered[s.name] = s
        mains[s.name] = placement[s.name][0]
        assert {n: ws[0] for n, ws in placement.items()} == mains


def test_copies_give_way_to_a_model_registered_later():
    big = spec("big", 600)
    assert sorted(register_all([big])["big"]) == BOTH
    late = spec("late", 600)
    placement = register_all([big, late])
    assert placement == {"big": ["cpu0"], "late": ["cpu1"]}


@pytest.mark.parametrize("seed", range(30))
def test_main_workers_are_what_replicas_1_chose_and_copies_only_where_they_fit(seed):
    rng = random.Random(seed)
    workers = [WorkerInfo(f"cpu{i}", f"cpu:{i}", rng.randint(200, 2000))
               for i in range(rng.randint(1, 4))]
    specs = [spec(f"m{i}", rng.randint(10, 700)) for i in range(rng.randint(1, 9))]
    placement = place_all({s.name: s for s in specs}, {}, workers)
    # Today's replicas=1, largest first (register_dir's order).
    assigned, before = {}, {}
    for s in sorted(specs, key=lambda s: (-s.size_bytes, s.name)):
        before[s.name] = place(s.name, s.size_bytes, "auto", 1, workers, assigned)
        assigned[before[s.name][0]] = assigned.get(before[s.name][0], 0) + s.size_bytes
    assert {n: ws[0] for n, ws in placement.items()} == {n: ws[0] for n, ws in before.items()}
    load = {w.name: sum(s.size_bytes for s in specs if w.name in placement[s.name])
            for w in workers}
    for w in workers:
        copies = [n for n, ws in placement.items() if w.name in ws[1:]]
        assert not copies or load[w.name] <= w.budget, (w, copies, load)


def test_pinned_models_stay_put_and_take_their_room_first():
    pinned = spec("pinned", 700, device="cpu:1")
    auto = spec("auto", 400)
    placement = register_all([auto, pinned])
    assert placement == {"auto": ["cpu0"], "pinned": ["cpu1"]}
    two = spec("two", 100, replicas=2)
    assert sorted(register_all([auto, two])["two"]) == BOTH
    assert assigned_bytes({"auto": auto, "two": two}, {"auto": BOTH, "two": BOTH}) == \
        {"cpu0": 500, "cpu1": 100}


def test_auto_prefers_gpus_and_a_kind_or_one_device_is_honoured():
    workers = [WorkerInfo("gpu0", "gpu:0", 1000), WorkerInfo("gpu1", "gpu:1", 1000),
               WorkerInfo("cpu0", "cpu:0", 1000)]
    placement = register_all([spec("a"), spec("c", device="cpu"), spec("g1", device="gpu:1")],
                             workers)
    assert sorted(placement["a"]) == ["gpu0", "gpu1"]
    assert placement["c"] == ["cpu0"] and placement["g1"] == ["gpu1"]
    with pytest.raises(PlacementError, match="model 'g'"):
        register_all([spec("g", device="gpu")])   # CPU workers only


# -- run plans -----------------------------------------------------------------------------
COSTS = {"mobilenet": [{"load": 1.6, "row": 4e-4}], "cnn": [{"load": 0.4, "row": 3e-4}],
         "mlp": [{"load": 0.3, "row": 1e-4}]}


def test_a_warm_ensemble_splits_every_model_over_both_workers():
    specs = [spec("mobilenet"), spec("cnn"), spec("mlp")]
    routes = {s.name: BOTH for s in specs}
    held = held_everywhere(specs)
    assert not needs_costs(specs, routes, held)   # no second round trip
    planned, later = route_run(specs, routes, held, COSTS, 4000)
    assert planned == routes and later == {}


def test_a_warm_model_beside_a_pinned_one_goes_where_there_is_time():
    specs = [spec("pinned", replicas=1), spec("mlp")]
    routes = {"pinned": ["cpu0"], "mlp": BOTH}
    held = held_everywhere(specs)
    assert needs_costs(specs, routes, held)
    costs = {"pinned": [{"load": 1.0, "row": 1e-3}], "mlp": [{"load": 0.3, "row": 1e-4}]}
    planned, later = route_run(specs, routes, held, costs, 4000)   # cpu0 busy 4 s, mlp 0.4 s
    assert planned == {"pinned": ["cpu0"], "mlp": ["cpu1"]} and later == {}


def test_first_run_here_every_worker_loads_and_runs_every_model():
    """Nothing measured: every worker it may run on (faster than one worker each on a
    2,000-row ensemble, measured), auto or pinned alike; a model already held somewhere
    runs there and loads on the others afterwards."""
    specs = [spec("mobilenet", 300), spec("cnn", 200), spec("two", 50, replicas=2)]
    routes = {s.name: BOTH for s in specs}
    assert route_run(specs, routes, {}, {}, 4000) == (routes, {})
    held = {"cpu1": {"cnn": "fp-cnn"}}
    assert first_routes(specs, routes, {"cnn": ["cpu1"]})["cnn"] == ["cpu1"]
    planned, later = route_run(specs, routes, held, {}, 4000)
    assert planned["cnn"] == ["cpu1"] and later == {"cnn": ["cpu0"]}


def test_measured_cold_models_load_on_different_workers_when_loading_dominates():
    specs = [spec("mobilenet"), spec("cnn"), spec("mlp")]
    routes = {s.name: BOTH for s in specs}
    planned, later = route_run(specs, routes, {}, COSTS, 500)
    assert sorted(w for ws in planned.values() for w in ws) == ["cpu0", "cpu1", "cpu1"]
    assert all(len(later[n]) + len(planned[n]) == 2 for n in planned)


def test_held_on_one_worker_a_long_run_pays_a_second_load_a_short_one_does_not():
    specs = [spec("mobilenet")]
    held = {"cpu0": {"mobilenet": "fp-mobilenet"}, "cpu1": {}}
    short, later = route_run(specs, {"mobilenet": BOTH}, held, COSTS, 1000)
    assert short == {"mobilenet": ["cpu0"]} and later == {"mobilenet": ["cpu1"]}
    long, later = route_run(specs, {"mobilenet": BOTH}, held, COSTS, 100_000)
    assert long == {"mobilenet": BOTH} and later == {}


def test_the_plan_finishes_no_later_than_every_worker_or_one_worker_each():
    """Against the two obvious plans, on random costs: the search never loses."""
    rng = random.Random(7)

    def makespan(plan, costs, resident):
        finish = {"cpu0": 0.0, "cpu1": 0.0}
        for m, ws in plan.items():
            load, work = costs[m]
            for w in ws:
                finish[w] += (0.0 if w in resident[m] else load) + work / len(ws)
        return max(finish.values())

    for _ in range(200):
        names = [f"m{i}" for i in range(rng.randint(1, 5))]
        costs = {m: (rng.uniform(0, 3), rng.uniform(0, 5)) for m in names}
        resident = {m: rng.choice([[], ["cpu0"], ["cpu1"], BOTH]) for m in names}
        plan = plan_model_routes({m: BOTH for m in names}, costs, resident=resident)
        everywhere = {m: BOTH for m in names}
        assert makespan(plan, costs, resident) <= makespan(everywhere, costs, resident) + 1e-9
