"""The clusters nbtool starts or joins: GPU pinning, loopback only, an existing scheduler,
and a notebook kernel that never imports TensorFlow."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest

import nbtool

pytestmark = pytest.mark.slow


def listening_ips(proc: psutil.Process) -> set[str]:
    procs = [proc, *proc.children(recursive=True)]
    return {c.laddr.ip for p in procs for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_fake_gpus_get_one_pinned_worker_each(monkeypatch, keep_default_engine, model_dir,
                                              reference):
    monkeypatch.setenv("NBTOOL_FAKE_GPUS", "2x4GB")
    with nbtool.start(dashboard_address="127.0.0.1:0") as eng:
        assert sorted(eng.workers) == ["gpu0", "gpu1"]
        st = eng.status()
        for i in (0, 1):
            s = st[f"gpu{i}"]
            # What the worker process really has: its own GPU only, memory growth on...
            assert s.env["CUDA_VISIBLE_DEVICES"] == str(i)
            assert s.env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
            assert s.device == f"gpu:{i}" and s.budget == int(4e9 * 0.8)
            # ... and TensorFlow's threads split the 2 cores between the two workers.
            assert s.threads == max(1, psutil.cpu_count() // 2)
            # No real GPU here: TF lists none. On a GPU machine it lists exactly one.
            assert len(s.gpus_seen) <= 1
        assert len({st["gpu0"].pid, st["gpu1"].pid}) == 2
        eng.register("pinned", model_dir / "mlp.keras", device="gpu:1")
        res = eng.predict("pinned", reference["x8"], chunk_size=9)
        assert res.timings["pinned"]["workers"] == ["gpu1"]
        assert np.abs(res["pinned"] - reference["mlp"]).max() <= 1e-5
        # Scheduler, dashboard, nannies and workers listen on loopback only, over TLS.
        assert eng.client.scheduler.address.startswith("tls://127.0.0.1:")
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
            assert eng.status()[name].state_of("remote").loads == 1
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


# -- nobody else gets in -----------------------------------------------------------------------

#: What another local user would try: Dask runs pickled functions, so a client that gets in
#: runs code on the workers as the notebook's user. Prints one JSON line of what happened.
ATTACKER = textwrap.dedent("""
    import json, os, socket, ssl, sys
    from distributed import Client
    from distributed.security import Security

    tls_address, marker = sys.argv[1], sys.argv[2]
    host, port = tls_address.split("://")[1].rsplit(":", 1)

    def pwn():
        with open(marker, "w") as f:
            f.write(str(os.getuid()))
        return "ran"

    def attempt(address, **kwargs):
        try:
            client = Client(address, timeout=5, **kwargs)
        except BaseException as e:
            return "refused: " + type(e).__name__
        try:
            return "CONNECTED, ran: " + repr(client.run(pwn))
        except BaseException as e:
            return "CONNECTED, then " + type(e).__name__
        finally:
            client.close()

    def raw_tls_without_certificate():
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                with ctx.wrap_socket(raw) as conn:
                    conn.sendall(b"x" * 64)
                    data = conn.recv(1)     # TLS 1.3: a missing client certificate shows here
                    return "refused: closed" if not data else "CONNECTED"
        except (ssl.SSLError, OSError) as e:
            return "refused: " + type(e).__name__

    print(json.dumps({
        "uid": os.getuid(),
        "plain tcp": attempt("tcp://%s:%s" % (host, port)),
        "tls, no credentials": attempt(tls_address),
        "tls, a certificate of its own": attempt(tls_address, security=Security.temporary()),
        "raw tls, no client certificate": raw_tls_without_certificate(),
    }))
""")


def run_attacker(address: str, marker, as_nobody: bool) -> dict:
    """Run :data:`ATTACKER` in a fresh process: as uid ``nobody`` if asked and possible."""
    import os

    python, env, kwargs = sys.executable, dict(os.environ), {}
    if as_nobody:
        # The venv's interpreter lives under /root (0700): nobody cannot run it. The system
        # Python of the same version can, with the venv's (world-readable) packages.
        site = next(p for p in sys.path if p.endswith("site-packages") and ".venv" in p)
        python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
        env = {"PYTHONPATH": site, "HOME": "/tmp", "PATH": "/usr/bin:/bin"}
        kwargs = {"user": "nobody", "cwd": "/tmp"}
    out = subprocess.run([python, "-c", ATTACKER, address, str(marker)], capture_output=True,
                         text=True, timeout=120, env=env, **kwargs)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def nobody_can_run_python() -> bool:
    """Whether a process of uid ``nobody`` can start the system Python with our packages."""
    import os

    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if os.getuid() != 0 or not os.path.exists(python):
        return False
    try:
        site = next(p for p in sys.path if p.endswith("site-packages") and ".venv" in p)
        probe = subprocess.run([python, "-c", "import distributed, cryptography"],
                               user="nobody", cwd="/tmp", capture_output=True, timeout=60,
                               env={"PYTHONPATH": site, "HOME": "/tmp"})
    except (OSError, StopIteration, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def test_every_part_of_the_local_cluster_speaks_tls(engine):
    info = engine.client.scheduler_info(n_workers=-1)
    assert engine.client.scheduler.address.startswith("tls://127.0.0.1:")
    assert engine.cluster.scheduler_address.startswith("tls://127.0.0.1:")
    assert len(info["workers"]) == 2
    for address, w in info["workers"].items():
        assert address.startswith("tls://127.0.0.1:"), address
        assert w["nanny"].startswith("tls://127.0.0.1:"), w["nanny"]
    # The session's certificate: made for this session, demanded of both sides.
    sec = engine.client.security
    assert sec.require_encryption and "BEGIN CERTIFICATE" in sec.tls_ca_file
    assert engine.cluster.security is sec


def test_another_local_user_cannot_run_code_on_the_workers(engine, tmp_path):
    """uid nobody, with Dask installed, knows the scheduler's address: every way in fails,
    and the function it tried to run never ran (no marker file)."""
    marker = tmp_path / "pwned"
    as_nobody = nobody_can_run_python()
    # Without a Python for nobody, the same user WITHOUT the certificate: that is the
    # property that matters (the certificate is the only key; the uid is not).
    tried = run_attacker(engine.client.scheduler.address, marker, as_nobody)
    assert tried.pop("uid") == (65534 if as_nobody else 0)
    for how, what in tried.items():
        # Refused by the TLS handshake or the comm; Dask itself will not even try TLS
        # without credentials (TypeError). An ImportError here would prove nothing.
        refusals = r"refused: (\w*CommClosedError|SSL\w*Error|ConnectionResetError|OSError|" \
                   r"TimeoutError|closed" + ("|TypeError" if "no credentials" in how else "") + ")$"
        assert re.match(refusals, what), (how, what)
    assert not marker.exists()
    engine.client.run(lambda: 1)   # and the cluster is still fine for its owner


def test_a_plain_tcp_client_is_refused(engine, tmp_path):
    from distributed import Client

    port = engine.client.scheduler.address.rsplit(":", 1)[1]
    with pytest.raises((OSError, TimeoutError)):
        Client(f"tcp://127.0.0.1:{port}", timeout=3)
    # nbtool.start against a TLS scheduler without credentials: told what to pass.
    with pytest.raises(ValueError, match="security="):
        nbtool.start(address=engine.client.scheduler.address)


def test_dashboard_on_all_interfaces_needs_an_opt_in_and_its_link_is_where_it_listens(
        keep_default_engine):
    with pytest.raises(ValueError, match="allow_remote_dashboard=True") as refused:
        nbtool.start(gpus="none", n_workers=1, dashboard_address="0.0.0.0:8799")
    assert "0.0.0.0:8799" in str(refused.value) and "127.0.0.1:8799" in str(refused.value)
    with pytest.raises(ValueError, match="every interface"):
        nbtool.start(gpus="none", n_workers=1, dashboard_address=":8799")   # Dask: all
    with nbtool.start(gpus="none", n_workers=1, dashboard_address="0.0.0.0:0",
                      allow_remote_dashboard=True) as eng:
        link = eng.dashboard_link
        host, port = link.split("://")[1].split("/")[0].rsplit(":", 1)
        # The host really bound and the port really given, not Dask's "127.0.0.1:0".
        assert host == "0.0.0.0" and int(port) > 0, link
        bound = {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
        assert ("0.0.0.0", int(port)) in bound
        assert link in repr(eng)


def test_a_script_on_stdin_fails_fast_with_the_workers_real_error(tmp_path):
    """``python - < script.py``: spawned workers cannot re-read a main module from stdin.
    The call fails in seconds (not after the 120 s start timeout) quoting why, and leaves
    no process behind."""
    script = textwrap.dedent("""
        import json, time, psutil, nbtool
        from nbtool.errors import NbtoolError
        t = time.monotonic()
        try:
            nbtool.start(gpus="none", n_workers=1, dashboard_address="127.0.0.1:0")
            outcome = "started"
        except NbtoolError as e:
            outcome = str(e)
        left = [p.pid for p in psutil.Process().children(recursive=True)
                if "resource_tracker" not in " ".join(p.cmdline())]
        print(json.dumps({"error": outcome, "seconds": time.monotonic() - t, "left": left}))
    """)
    out = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["seconds"] < 60, facts
    assert "worker 'cpu0' could not start" in facts["error"], facts
    assert "FileNotFoundError" in facts["error"] and "<stdin>" in facts["error"], facts
    assert "python script.py" in facts["error"]
    assert facts["left"] == [], facts


def test_start_removes_shared_memory_that_dead_kernels_left_and_nothing_else(tmp_path):
    import os

    from nbtool.engine.cluster import clean_stale_shared_folders

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    live = str(os.getppid())
    root = tmp_path / "shm"
    for pid in (dead, live):
        (root / f"nbtool-{pid}").mkdir(parents=True)
        (root / f"nbtool-{pid}" / "input-0.npy").write_bytes(b"x" * 100)
    (root / "nbtool-notapid").mkdir()
    (root / f"nbtool-{int(dead) + 10**7}").symlink_to(root / "nbtool-notapid")
    theirs = tmp_path / "shm-other" / f"nbtool-{dead}"   # the same dead pid, another user's
    theirs.mkdir(parents=True)
    os.chown(theirs, 65534, 65534)
    removed = clean_stale_shared_folders(root)
    assert removed == [root / f"nbtool-{dead}"]
    assert clean_stale_shared_folders(theirs.parent) == [] and theirs.exists()
    assert not (root / f"nbtool-{dead}").exists()
    assert (root / f"nbtool-{live}" / "input-0.npy").exists()     # a live kernel's stays
    assert (root / "nbtool-notapid").exists()                      # not ours by name
    assert (root / f"nbtool-{int(dead) + 10**7}").is_symlink()     # never followed

    # start() does it on the real /dev/shm, before it starts anything.
    real = f"/dev/shm/nbtool-{dead}"
    os.makedirs(real)
    open(os.path.join(real, "input-0.npy"), "wb").close()
    with pytest.raises(ValueError):   # no GPU 97 here: start() stops after the cleanup
        nbtool.start(gpus=[97], dashboard_address="127.0.0.1:0")
    assert not os.path.exists(real)


def test_a_worker_restarted_twice_fifteen_seconds_apart_is_not_lost(engine):
    """Dask's SpecCluster closed the Nanny of a worker still away 15 s after it left, judged
    at that moment: a second hard unload about 15 s after the first lost the worker."""
    import time

    first = time.monotonic()
    engine.client.restart_workers(["cpu1"])
    time.sleep(max(0.0, 14.2 - (time.monotonic() - first)))
    engine.client.restart_workers(["cpu1"], timeout=60)
    time.sleep(2)   # past the 15 s mark of the first restart
    names = sorted(str(w["name"]) for w in
                   engine.client.scheduler_info(n_workers=-1)["workers"].values())
    assert names == ["cpu0", "cpu1"]
