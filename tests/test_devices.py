"""GPU inventory, worker planning and model placement (pure logic, no cluster)."""

import pytest

from nbtool._util.gpus import discover_gpus, parse_inventory
from nbtool.engine.devices import default_cpu_workers, plan_workers, select_gpus
from nbtool.catalog.placement import WorkerInfo, place
from nbtool.errors import PlacementError

GB = 2**30


def test_injected_inventory_replaces_nvml(monkeypatch):
    monkeypatch.setenv("NBTOOL_FAKE_GPUS", '[{"index": 0, "name": "A100", "memory_total": "40GB"},'
                                          ' {"index": 2, "name": "A100", "memory_total": 1000}]')
    gpus = discover_gpus()
    assert [g.label for g in gpus] == ["gpu:0", "gpu:2"]
    assert gpus[0].memory_total == 40_000_000_000 and gpus[1].memory_total == 1000


def test_a_machine_without_nvidia_driver_has_no_gpus(monkeypatch):
    monkeypatch.delenv("NBTOOL_FAKE_GPUS", raising=False)
    assert discover_gpus() == []


def test_bad_inventory_says_what_is_expected():
    with pytest.raises(ValueError, match="2x16GB"):
        parse_inventory('[{"name": "no index"}]')


def test_one_worker_per_gpu_each_seeing_only_its_own():
    slots = plan_workers(parse_inventory("3x16GB"), cores=12, total_memory=64 * GB)
    assert [s.name for s in slots] == ["gpu0", "gpu1", "gpu2"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "2"]
    assert all(s.env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true" for s in slots)
    assert all(s.tf_threads == 4 and s.env["TF_NUM_INTRAOP_THREADS"] == "4" for s in slots)
    assert all(s.budget == int(16e9 * 0.8) for s in slots)


def test_gpu_selection_by_index_and_errors_for_absent_gpus():
    inv = parse_inventory("2x16GB")
    assert [g.index for g in select_gpus([1], inv)] == [1]
    assert select_gpus("none", inv) == []
    with pytest.raises(ValueError, match=r"GPU\(s\) \[5\].*index\(es\) 0, 1"):
        select_gpus("0,5", inv)


def test_cpu_workers_split_the_cores_without_oversubscribing():
    slots = plan_workers([], cores=2, total_memory=24 * GB)
    assert [(s.name, s.device, s.tf_threads) for s in slots] == [("cpu0", "cpu:0", 1),
                                                                 ("cpu1", "cpu:1", 1)]
    assert all(s.env["CUDA_VISIBLE_DEVICES"] == "-1" for s in slots)
    one = plan_workers([], n_workers=1, cores=2, total_memory=24 * GB)
    assert one[0].tf_threads == 2
    assert default_cpu_workers(64, 512 * GB) == 8
    assert default_cpu_workers(16, 2 * GB) == 1      # Binder-sized: memory caps it


def test_explicit_budget_applies_to_every_worker():
    slots = plan_workers(parse_inventory("2x16GB"), memory_budget="6GB", cores=4,
                         total_memory=64 * GB)
    assert {s.budget for s in slots} == {6_000_000_000}
    assert slots[0].env["NBTOOL_MEMORY_BUDGET"] == "6000000000"


def test_n_workers_must_match_the_gpus():
    with pytest.raises(ValueError, match="one worker per GPU"):
        plan_workers(parse_inventory("2x16GB"), n_workers=3, cores=4, total_memory=64 * GB)


WORKERS = [WorkerInfo("gpu0", "gpu:0", 100), WorkerInfo("gpu1", "gpu:1", 100),
           WorkerInfo("cpu0", "cpu:0", 100)]


def test_auto_prefers_gpus_and_the_most_free_budget_largest_first():
    assigned: dict[str, int] = {}
    plan = {}
    for name, size in sorted({"a": 60, "b": 50, "c": 30, "d": 10}.items(), key=lambda kv: -kv[1]):
        plan[name] = place(name, size, "auto", 1, WORKERS, assigned)
        for w in plan[name]:
            assigned[w] = assigned.get(w, 0) + size
    assert plan == {"a": ["gpu0"], "b": ["gpu1"], "c": ["gpu1"], "d": ["gpu0"]}
    assert assigned == {"gpu0": 70, "gpu1": 80}


def test_explicit_devices_and_replicas():
    assert place("m", 1, "gpu:1", 1, WORKERS, {}) == ["gpu1"]
    assert place("m", 1, "cpu", 1, WORKERS, {}) == ["cpu0"]
    assert sorted(place("m", 1, "gpu", 2, WORKERS, {})) == ["gpu0", "gpu1"]


def test_impossible_placements_name_the_model_and_the_fix():
    with pytest.raises(PlacementError) as e:
        place("cnn", 1, "gpu:3", 1, WORKERS, {})
    assert "model 'cnn'" in str(e.value) and "'gpu:3'" in str(e.value)
    assert "the cluster has cpu:0, gpu:0, gpu:1" in str(e.value)
    with pytest.raises(PlacementError, match="lower replicas to 1"):
        place("cnn", 1, "cpu", 2, WORKERS, {})
    with pytest.raises(PlacementError, match="use device='auto'"):
        place("cnn", 1, "tpu", 1, WORKERS, {})
    cpu_only = [WorkerInfo("cpu0", "cpu:0", 1)]
    with pytest.raises(PlacementError, match=r"nbtool.start\(gpus='auto'\)"):
        place("cnn", 1, "gpu", 1, cpu_only, {})
