"""The engine's workers by name: status, work sent to one of them, a restart waited for."""

import pytest

from nbtool.worker.tasks import worker_status


def test_work_sent_to_a_named_worker_runs_there_and_answers_by_name(engine):
    pool = engine.pool
    assert set(pool.workers) == {"cpu0", "cpu1"}
    assert set(pool.addresses()) == {"cpu0", "cpu1"}
    for name in ("cpu0", "cpu1"):
        # Pinned by the worker's own resource: the answer comes from that process.
        there = pool.submit_to(name, worker_status, what="probe").result()
        assert there.worker == name and there.device == pool.workers[name].device
    only = pool.run_on(worker_status, names=["cpu1"])
    assert list(only) == ["cpu1"] and only["cpu1"].worker == "cpu1"
    assert pool.run_on(worker_status, names=["nobody"]) == {}      # not there: left out
    assert {n: s.pid for n, s in pool.status().items()} == \
        {n: s.pid for n, s in engine.status().items()}              # the engine reads this


@pytest.mark.slow
def test_a_restarted_worker_comes_back_under_its_name_in_a_new_process(engine):
    pool = engine.pool
    before = pool.status()
    pool.restart(["cpu1"])
    after = pool.status()                    # right after a restart: waited for, not missing
    assert set(after) == {"cpu0", "cpu1"}
    assert after["cpu1"].pid != before["cpu1"].pid and after["cpu0"].pid == before["cpu0"].pid
    assert after["cpu1"].models == {} and after["cpu1"].budget == before["cpu1"].budget
    assert pool.submit_to("cpu1", worker_status, what="probe").result().pid == after["cpu1"].pid
