"""binder/ builds what mybinder.org would run, and the quick start fits in Binder's memory.

The slow test builds a virtual environment the way repo2docker does (install
binder/requirements.txt, then run binder/postBuild from the repository root with that
environment first on PATH), then executes the quick-start notebook in that environment's
kernel under binder/start's environment, measuring the kernel and its Dask workers.

Installing the requirements (TensorFlow, JupyterLab...) is most of the test's time, so that
environment is kept in pytest's cache (.pytest_cache/d/binder-env, about 2 GB) for the next
session, keyed by requirements.txt and the Python that built it: a changed requirement gets a
fresh one. postBuild (nbtool from this tree) runs every time. ``--cache-clear``, or
``-p no:cacheprovider``, builds everything from scratch, as CI does in its fresh clone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
#: mybinder.org's memory limit is 1-2 GB; the quick start must fit the larger.
BINDER_MEMORY = 2 * 2**30


def requirement_names(lines) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_binder_requirements_are_nbtools_dependencies_with_tensorflow_cpu():
    """postBuild installs nbtool with --no-deps: requirements.txt must hold its dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = requirement_names(project["dependencies"]) - {"tensorflow"} | {"tensorflow-cpu"}
    have = requirement_names((BINDER / "requirements.txt").read_text().splitlines())
    assert wanted <= have, f"binder/requirements.txt lacks {sorted(wanted - have)}"
    assert "tensorflow" not in have          # the CPU-only build, not both
    assert "scikit-learn" in have            # the notebooks' data


def test_binder_start_sets_one_worker_a_budget_and_quiet_threads():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBTOOL_", "OMP_", "TF_"))}
    out = subprocess.run([str(BINDER / "start"), "env"], env=env, capture_output=True,
                         text=True, check=True).stdout
    seen = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert seen["NBTOOL_N_WORKERS"] == "1" and seen["NBTOOL_MEMORY_BUDGET"] == "256MB"
    assert seen["TF_CPP_MIN_LOG_LEVEL"] == "2"
    cores = int(seen["NBTOOL_CORES"])
    assert 1 <= cores <= os.cpu_count()
    assert seen["OMP_NUM_THREADS"] == seen["TF_NUM_INTRAOP_THREADS"] == str(cores)


def test_start_refuses_a_malformed_environment_setting(monkeypatch):
    import nbtool

    monkeypatch.setenv("NBTOOL_N_WORKERS", "zero")
    with pytest.raises(ValueError, match="NBTOOL_N_WORKERS='zero'.*NBTOOL_N_WORKERS=1"):
        nbtool.start()
    monkeypatch.setenv("NBTOOL_N_WORKERS", "1")
    monkeypatch.setenv("NBTOOL_MEMORY_BUDGET", "-5MB")
    with pytest.raises(ValueError, match="NBTOOL_MEMORY_BUDGET"):
        nbtool.start()


@pytest.mark.slow
def test_start_reads_workers_budget_and_cores_from_the_environment(monkeypatch,
                                                                   keep_default_engine):
    import nbtool

    monkeypatch.setenv("NBTOOL_N_WORKERS", "1")
    monkeypatch.setenv("NBTOOL_MEMORY_BUDGET", "300MB")
    monkeypatch.setenv("NBTOOL_CORES", "1")
    with nbtool.start(gpus="none", dashboard_address="127.0.0.1:0") as eng:
        assert list(eng.workers) == ["cpu0"]
        assert eng.workers["cpu0"].budget == 300_000_000
        assert eng.status()["cpu0"].threads == 1
    # With GPUs the worker count is theirs: Binder's NBTOOL_N_WORKERS=1 must not
    # break a notebook that plans for two GPUs (multi_gpu.ipynb).
    monkeypatch.setenv("NBTOOL_FAKE_GPUS", "2x4GB")
    with nbtool.start(dashboard_address="127.0.0.1:0") as eng:
        assert sorted(eng.workers) == ["gpu0", "gpu1"]
        assert {w.budget for w in eng.workers.values()} == {300_000_000}


# Runs inside the Binder environment: nbclient (a dependency of jupyter_server, so present
# there as on Binder) executes the notebook with that environment's own python3 kernel.
DRIVER = textwrap.dedent("""
    import sys, nbformat
    from nbclient import NotebookClient
    src, dst, cwd = sys.argv[1:4]
    nb = nbformat.read(src, as_version=4)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": cwd}}).execute()
    finally:
        nbformat.write(nb, dst)
""")


def sample_peak(root: psutil.Process, stop: threading.Event, peaks: dict) -> None:
    """Peak summed RSS of the kernel's process tree, sampled every 0.1 s.

    Why sampling and not each process's VmHWM: the quick start hard-unloads, which restarts
    the worker, and a dead process's high-water mark is gone with it; and summing per-process
    peaks reached at different times overstates what was ever in use at once. RSS counts
    pages shared between processes (TensorFlow's libraries, mapped by the kernel and the
    worker) once per process, so the sum is an upper bound of what the container's memory
    cgroup charges. A spike shorter than 0.1 s can be missed; the margin below 2 GB covers it.
    """
    while not stop.is_set():
        try:
            procs = root.children(recursive=True)       # the kernel, its workers, helpers
        except psutil.NoSuchProcess:
            return
        kernel_tree = 0
        for p in procs:
            try:
                kernel_tree += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        try:
            driver = root.memory_info().rss
        except psutil.NoSuchProcess:
            return
        peaks["kernel_and_workers"] = max(peaks.get("kernel_and_workers", 0), kernel_tree)
        peaks["with_driver"] = max(peaks.get("with_driver", 0), kernel_tree + driver)
        peaks["processes"] = max(peaks.get("processes", 0), len(procs))
        stop.wait(0.1)


def binder_environ(venv: Path) -> dict[str, str]:
    """This process's environment as repo2docker's would be: ``venv`` first on PATH, and
    none of the settings binder/start makes (nor this venv's) carried over."""
    env = {k: v for k, v in os.environ.items()
           # PYTHONDONTWRITEBYTECODE: Binder's kernels write bytecode, and the requirements
           # are installed without it (below): each process would compile TensorFlow anew.
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE")
           and not k.startswith(("OMP_", "TF_NUM_", "JPY_"))
           # The session's nbtool cache folder stays (tests/conftest.py): not a Binder setting.
           and (not k.startswith("NBTOOL_") or k == "NBTOOL_CACHE_DIR")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


def install_requirements(venv: Path) -> None:
    """A new virtual environment at ``venv`` holding binder/requirements.txt."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # --no-compile: byte-compiling every installed module took more than half of the
    # install (147 s with it, 59 s without, on 2 busy cores); the first kernel compiles and
    # writes what it imports (a fraction of it), and later processes read that.
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--no-compile", "-r", str(BINDER / "requirements.txt")],
                   env=binder_environ(venv), cwd=ROOT, check=True)


def requirements_key(where: Path) -> str:
    """Names an installed requirements environment: what was installed, by which Python,
    and where (a virtual environment's scripts name their own path: it cannot move)."""
    h = hashlib.sha256((BINDER / "requirements.txt").read_bytes())
    h.update(f"{sys.version}|{sys.base_prefix}|{where.resolve()}".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def exclusive(lock_file: Path):
    """Held by one pytest session at a time: another waits rather than building, or
    reinstalling nbtool into, the same environment at once."""
    with open(lock_file, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture
def binder_requirements_env(request, tmp_path):
    """A virtual environment with binder/requirements.txt installed (nbtool not yet).

    Reused from pytest's cache when the same requirements were installed by the same
    Python before; built in ``tmp_path`` when the cache is off (``-p no:cacheprovider``).
    """
    cache = getattr(request.config, "cache", None)
    if cache is None:
        install_requirements(tmp_path / "binder-env")
        yield tmp_path / "binder-env"
        return
    root = cache.mkdir("binder-env")
    built = root / requirements_key(root)
    with exclusive(root / "lock"):
        if not (built / "complete").exists():   # never built, or its install was cut short
            for old in root.iterdir():           # older requirements' environments too
                if old.is_dir():
                    shutil.rmtree(old)
            install_requirements(built / "venv")
            (built / "complete").write_text("binder/requirements.txt installed\n")
        yield built / "venv"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_binder_environment_runs_the_quickstart_within_2gb(binder_requirements_env, tmp_path):
    t0 = time.monotonic()
    venv = binder_requirements_env
    env = binder_environ(venv)
    # What repo2docker does after the requirements: postBuild from the repository root.
    subprocess.run([str(BINDER / "postBuild")], env=env, cwd=ROOT, check=True)
    # TensorFlow itself is imported by the notebook's kernel below (it trains with Keras).
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import nbtool, importlib.metadata as m; print(nbtool.__file__, "
         "m.version('tensorflow-cpu'))"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert installed.startswith(str(venv)), installed    # nbtool from the new environment
    built = time.monotonic() - t0

    # The notebook in a scratch folder: its models are written next to it.
    work = tmp_path / "notebooks"
    work.mkdir()
    (tmp_path / "driver.py").write_text(DRIVER)
    executed = tmp_path / "quickstart.out.ipynb"
    proc = psutil.Popen([str(BINDER / "start"), str(venv / "bin" / "python"),
                         str(tmp_path / "driver.py"), str(ROOT / "notebooks/quickstart.ipynb"),
                         str(executed), str(work)],
                        env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True)
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_peak, args=(proc, stop, peaks), daemon=True)
    sampler.start()
    log, _ = proc.communicate(timeout=900)
    stop.set()
    sampler.join()
    ran = time.monotonic() - t0 - built
    print(f"\nbinder build {built:.0f}s, quickstart {ran:.0f}s; peak RSS: kernel+workers "
          f"{peaks.get('kernel_and_workers', 0) / 2**30:.2f} GiB, with the nbclient driver "
          f"{peaks.get('with_driver', 0) / 2**30:.2f} GiB, {peaks.get('processes')} processes")
    assert proc.returncode == 0, log[-3000:]

    import nbformat

    nb = nbformat.read(executed, as_version=4)
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                      for c in nb.cells for o in c.get("outputs", []))
    assert "same as %%infer: True" in text
    for name in ("mlp_small", "mlp_wide", "cnn", "ensemble"):
        line = next(l for l in text.splitlines() if l.startswith(name) and "accuracy" in l)
        assert float(line.split()[-1]) > 0.8, line
    # binder/start's settings reached nbtool.start(): one worker with a 256 MB budget.
    assert "cpu0" in text and "cpu1" not in text
    assert "256.0 MB" in text
    # The kernel and at least its one worker were seen, and together stayed under 2 GB.
    assert peaks.get("processes", 0) >= 2
    assert 0.5 * 2**30 < peaks["kernel_and_workers"] < BINDER_MEMORY, peaks
