"""The clusters nbtool starts or joins: GPU pinning, loopback only, an existing scheduler,
and a notebook kernel that never imports TensorFlow."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest

import nbtool
import nbtool.engine

pytestmark = pytest.mark.slow


@pytest.fixture
def keep_default_engine():
    """Starting another engine makes it the default; give the session's back afterwards."""
    before = nbtool.engine._default_engine
    yield
    nbtool.engine._default_engine = before


def listening_ips(proc: psutil.Process) -> set[str]:
    procs = [proc, *proc.children(recursive=True)]
    return {c.laddr.ip for p in procs for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_fake_gpus_get_one_pinned_worker_each(monkeypatch, keep_default_engine, model_dir,
                                              reference):
    monkeypatch.setenv("NBTOOL_FAKE_GPUS", "2x4GB")
    with nbtool.start(dashboard_address="127.0.0.1:0") as eng:
        assert sorted(eng.workers) == ["gpu0", "gpu1"]
        st = eng._statuses()
        for i in (0, 1):
            s = st[f"gpu{i}"]
            # What the worker process really has: its own GPU only, memory growth on...
            assert s["env"]["CUDA_VISIBLE_DEVICES"] == str(i)
            assert s["env"]["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
            assert s["device"] == f"gpu:{i}" and s["budget"] == int(4e9 * 0.8)
            # ... and TensorFlow's threads split the 2 cores between the two workers.
            assert s["tf_intra_threads"] == max(1, psutil.cpu_count() // 2)
            # No real GPU here: TF lists none. On a GPU machine it lists exactly one.
            assert len(s["tf_gpus"]) <= 1
        assert len({st["gpu0"]["pid"], st["gpu1"]["pid"]}) == 2
        eng.register("pinned", model_dir / "mlp.keras", device="gpu:1")
        res = eng.predict("pinned", reference["x8"], chunk_size=9)
        assert res.timings["pinned"]["workers"] == ["gpu1"]
        assert np.abs(res["pinned"] - reference["mlp"]).max() <= 1e-5
        # Scheduler, dashboard, nannies and workers listen on loopback only.
        assert eng.client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert eng.dashboard_link.startswith("http://127.0.0.1:")
        ips = listening_ips(psutil.Process())
        assert ips and ips <= {"127.0.0.1"}, ips


def test_an_existing_dask_cluster_runs_the_same_worker_code(keep_default_engine, model_dir,
                                                            reference):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        eng = nbtool.start(address=cluster.scheduler_address, memory_budget="300MB")
        try:
            (name,) = eng.workers
            assert eng.workers[name].budget == 300_000_000
            assert eng.workers[name].device == "cpu:0"
            eng.register("remote", model_dir / "mlp.h5")
            res = eng.predict("remote", reference["x8"], chunk_size=25)
            assert np.abs(res["remote"] - reference["mlp"]).max() <= 1e-5
            assert eng._statuses()[name]["models"]["remote"]["loads"] == 1
        finally:
            eng.close()
        assert cluster.status.name == "running"     # closing the engine left theirs alone


def test_the_notebook_side_never_imports_tensorflow(tmp_path, model_dir, reference):
    np.save(tmp_path / "x.npy", reference["x8"])
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import nbtool

        if __name__ == "__main__":
            eng = nbtool.start(n_workers=1, dashboard_address="127.0.0.1:0")
            eng.register("a", {str(model_dir / 'mlp.keras')!r})
            eng.register_dir({str(model_dir)!r})
            x = np.load({str(tmp_path / 'x.npy')!r})
            res = eng.predict(["a", "mlp2"], x, chunk_size=8)
            np.save({str(tmp_path / 'a.npy')!r}, res["a"])
            repr(eng.models()); repr(eng.devices())
            eng.close()
            print(json.dumps({{"tensorflow": "tensorflow" in sys.modules,
                               "keras": "keras" in sys.modules,
                               "workers": 1}}))
    """)
    (tmp_path / "client.py").write_text(script)
    out = subprocess.run([sys.executable, str(tmp_path / "client.py")], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts == {"tensorflow": False, "keras": False, "workers": 1}
    assert np.abs(np.load(tmp_path / "a.npy") - reference["mlp"]).max() <= 1e-5
