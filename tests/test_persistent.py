"""Persistent engines (issue 17): a kernel restart keeps the models loaded, and every fault
(killed processes, a deleted engine file, two kernels at once, the idle timeout, a model
file changed while detached, another user) ends in a clear message, never a wrong result.

Real engines (``nbtool.start(persist=True, gpus="none", n_workers=1)``) run their cluster
in a process of their own; "a kernel" is a child Python process (killed for real) or this
test process. One engine, started by a kernel that then SIGKILLs itself, is shared by the
tests that leave it running; each test that ends an engine starts its own. Every engine
has a ``NBTOOL_RUNTIME_DIR`` of its own (set for this process and its children), and
whatever runs from that folder when its tests are over is killed, process group and all.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest

import nbtool
from nbtool.errors import ModelNotFound, PredictionFailed
from nbtool.engine.persist.engine_files import EngineFileDamaged, group_processes, kill_group
from nbtool.errors import EngineNotRunning
from test_cluster import nobody_can_run_python, run_attacker

pytestmark = pytest.mark.slow

#: A small local engine: one CPU worker, a dashboard on a free port.
SMALL = {"gpus": "none", "n_workers": 1, "dashboard_address": "127.0.0.1:0"}

#: The shared engine ends by itself if this module's cleanup never ran (a killed pytest).
SHARED_IDLE = 600


# -- what a test leaves behind ----------------------------------------------------------------
def servers_in(folder: Path) -> list[int]:
    """The pids of the engine processes whose runtime folder is ``folder``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "nbtool.engine.persist.server" in (p.info["cmdline"] or []) and \
                    p.environ().get("NBTOOL_RUNTIME_DIR") == str(folder):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def wait_until(condition, timeout: float, step: float = 0.1) -> float:
    """Seconds until ``condition()`` held; fails the test if it did not within ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{getattr(condition, '__doc__', None) or condition} did not happen "
                        f"within {timeout:g}s")
        time.sleep(step)
    return time.monotonic() - start


class Runtime:
    """One test's runtime folder, and the processes it started there (ended at teardown)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.engine_pids: set[int] = set()
        self.kernels: list[subprocess.Popen] = []

    def record(self, name: str) -> dict:
        """Engine ``name``'s file as written (its pid is remembered for the cleanup)."""
        data = json.loads((self.folder / f"{name}.json").read_text())
        self.engine_pids.add(data["pid"])
        return data

    def note(self, name: str) -> str:
        """Why engine ``name`` ended, as its ended note says."""
        return json.loads((self.folder / f"{name}.ended.json").read_text())["reason"]

    def end_everything(self) -> None:
        """Kill every engine left in the folder (process group and all) and every kernel."""
        for k in self.kernels:
            if k.poll() is None:
                k.kill()
            k.wait(timeout=30)
            for pipe in (k.stdin, k.stdout, k.stderr):
                if pipe is not None:
                    pipe.close()
            # A killed kernel never removed its input folder in /dev/shm (memory).
            shutil.rmtree(f"/dev/shm/nbtool-{k.pid}", ignore_errors=True)
        for path in self.folder.glob("*.json"):
            if not path.name.endswith(".ended.json") and not path.name.startswith("."):
                try:
                    self.engine_pids.add(int(json.loads(path.read_text())["pid"]))
                except (OSError, ValueError, KeyError, TypeError):   # a damaged file
                    pass
        self.engine_pids |= set(servers_in(self.folder))   # its file deleted, or none yet
        for pid in self.engine_pids:
            if group_processes(pid):
                kill_group(pid)


@contextmanager
def runtime_folder_at(folder: Path):
    """NBTOOL_RUNTIME_DIR is ``folder`` (for this process and its children) meanwhile."""
    before = os.environ.get("NBTOOL_RUNTIME_DIR")
    os.environ["NBTOOL_RUNTIME_DIR"] = str(folder)
    rt = Runtime(folder)
    try:
        yield rt
    finally:
        rt.end_everything()
        if before is None:
            os.environ.pop("NBTOOL_RUNTIME_DIR", None)
        else:
            os.environ["NBTOOL_RUNTIME_DIR"] = before


@pytest.fixture
def runtime(tmp_path, keep_default_engine):
    """This test's own runtime folder; whatever it started there is ended afterwards."""
    with runtime_folder_at(tmp_path / "runtime") as rt:
        yield rt


@contextmanager
def attached(name: str):
    """This process attached to engine ``name`` meanwhile (detached afterwards)."""
    eng = nbtool.attach(name)
    try:
        yield eng
    finally:
        eng.close()


def run_kernel(script: str, *args, rt: Runtime, timeout: float = 240):
    """Run ``script`` in a fresh Python (a kernel) to its end: (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rt.kernels.append(proc)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# -- the shared engine: started by a kernel that was then killed -------------------------------
#: A kernel's life: start a persistent engine, register two models, predict, then die.
FIRST_KERNEL = """
    import json, os, pickle, signal, sys
    import numpy as np
    import nbtool

    models, out = sys.argv[1], sys.argv[2]
    eng = nbtool.start(persist=True, name="shared", idle_timeout=%d,
                       gpus="none", n_workers=1, dashboard_address="127.0.0.1:0")
    eng.register("a", models + "/mlp.keras")
    eng.register("b", models + "/mlp2.keras")
    res = eng.predict(["a", "b"], np.load(out + "/x.npy"))
    np.save(out + "/a.npy", res["a"]); np.save(out + "/b.npy", res["b"])
    with open(out + "/registry.pkl", "wb") as f:
        pickle.dump(list(eng.registry), f)
    facts = {"loads": {w: {m: s.state_of(m).loads for m in "ab"}
                       for w, s in eng.status().items()},
             "placement": eng.placement, "tensorflow": "tensorflow" in sys.modules}
    with open(out + "/facts.json", "w") as f:
        json.dump(facts, f)
    os.kill(os.getpid(), signal.SIGKILL)   # a kernel restart: nothing cleans up
""" % SHARED_IDLE


@pytest.fixture(scope="module")
def shared(tmp_path_factory, model_dir, reference):
    """The runtime of engine 'shared', which a killed kernel left with two models loaded;
    and what that kernel saw (its outputs, load counters, registry, placement)."""
    out = tmp_path_factory.mktemp("first-kernel")
    np.save(out / "x.npy", reference["x8"])
    with runtime_folder_at(tmp_path_factory.mktemp("shared") / "runtime") as rt:
        code, _, err = run_kernel(FIRST_KERNEL, model_dir, out, rt=rt)
        assert code == -signal.SIGKILL, err[-3000:]
        rt.record("shared")
        left = Path(f"/dev/shm/nbtool-{rt.kernels[0].pid}")   # its input folder, in memory
        with open(out / "registry.pkl", "rb") as f:
            registry = pickle.load(f)
        yield rt, {"a": np.load(out / "a.npy"), "b": np.load(out / "b.npy"),
                   "registry": registry, "left in /dev/shm": left if left.is_dir() else None,
                   **json.loads((out / "facts.json").read_text())}


@pytest.fixture
def on_shared(shared, keep_default_engine):
    """The shared engine's runtime folder is the one in force during this test."""
    rt, _ = shared
    before = os.environ["NBTOOL_RUNTIME_DIR"]
    os.environ["NBTOOL_RUNTIME_DIR"] = str(rt.folder)
    yield rt
    os.environ["NBTOOL_RUNTIME_DIR"] = before


def test_after_a_kernel_restart_the_models_are_still_loaded(shared, on_shared, reference):
    """1. The kernel that started the engine was SIGKILLed: a new one attaches and finds
    the registry, the placement and the loaded models as they were: warm, same outputs."""
    _, seen = shared
    assert seen["tensorflow"] is False   # the kernel side never imports TensorFlow
    assert seen["loads"] == {"cpu0": {"a": 1, "b": 1}}
    assert np.abs(seen["a"] - reference["mlp"]).max() <= 1e-5
    start = time.monotonic()
    with attached("shared") as eng:
        took = time.monotonic() - start
        rows = {r["name"]: r["state"] for r in eng.models()}
        assert rows == {"a": "cpu0: loaded", "b": "cpu0: loaded"}, rows
        assert list(eng.registry) == seen["registry"]
        assert eng.placement == seen["placement"]
        res = eng.predict(["a", "b"], reference["x8"])
        assert np.array_equal(res["a"], seen["a"]) and np.array_equal(res["b"], seen["b"])
        loads = {w: {m: s.state_of(m).loads for m in "ab"} for w, s in eng.status().items()}
        assert loads == seen["loads"], "the models were loaded again after the restart"
        assert nbtool.attach("shared") is eng   # a cell run twice: still the same
    assert took < 10, f"attaching took {took:.1f}s"
    # The killed kernel's input folder in /dev/shm (memory until reboot) went on attach.
    assert seen["left in /dev/shm"] is not None and not seen["left in /dev/shm"].exists()


def test_two_kernels_attaching_at_once_one_gets_it(shared, on_shared):
    """4. Two kernels attach at the same moment: one does, the other is told which kernel
    holds the engine; once that one detaches, the other attaches."""
    a, b = Kernel(on_shared), Kernel(on_shared)
    assert a.reply()["ready"] and b.reply()["ready"]
    (on_shared.folder.parent / "go").touch()
    first = {k: k.reply() for k in (a, b)}
    winners = [k for k, r in first.items() if "attached" in r]
    assert len(winners) == 1, first
    (winner,) = winners
    loser = b if winner is a else a
    assert {"a", "b"} <= set(first[winner]["attached"])
    said = first[loser]["in_use"]
    assert f"in use by another kernel (pid {winner.proc.pid} " in said, said
    assert "Fix: detach there (eng.close()" in said
    winner.send("detach")
    assert winner.reply() == {"detached": True}
    loser.send("attach")
    assert loser.reply()["attached"] == first[winner]["attached"]
    for k in (a, b):
        k.send("quit")
        assert k.proc.wait(timeout=60) == 0, k.proc.stderr.read()[-3000:]


def test_two_kernels_starting_it_at_once_share_one_engine(runtime):
    """4. Two kernels start the same engine at the same moment: one engine process runs;
    one kernel attaches, the other is told that kernel holds it (never 'could not
    start'), and attaches once it detached."""
    a, b = Kernel(runtime, "start"), Kernel(runtime, "start")
    assert a.reply()["ready"] and b.reply()["ready"]
    (runtime.folder.parent / "go").touch()
    first = {k: k.reply(timeout=120) for k in (a, b)}
    winners = [k for k, r in first.items() if "attached" in r]
    assert len(winners) == 1, first
    (winner,) = winners
    loser = b if winner is a else a
    assert f"(pid {winner.proc.pid} " in first[loser]["in_use"], first[loser]
    assert servers_in(runtime.folder) == [runtime.record("shared")["pid"]]
    winner.send("detach")
    assert winner.reply() == {"detached": True}
    loser.send("attach")
    assert "attached" in loser.reply()
    for k in (a, b):
        k.send("quit")
        assert k.proc.wait(timeout=60) == 0, k.proc.stderr.read()[-3000:]


#: A kernel that attaches when told ("go" file), reports as JSON lines, obeys stdin.
CONTENDER = """
    import json, os, sys, time
    from pathlib import Path
    import nbtool
    from nbtool.errors import EngineInUse

    def say(**facts):
        print(json.dumps(facts), flush=True)

    def attach(how="attach"):
        try:
            eng = nbtool.attach("shared") if how == "attach" else nbtool.start(
                persist=True, name="shared", idle_timeout=60, gpus="none", n_workers=1,
                dashboard_address="127.0.0.1:0")
        except EngineInUse as e:
            say(in_use=str(e))
            return None
        say(attached=sorted(eng.registry.names()))
        return eng

    say(ready=True)
    go = Path(sys.argv[1])
    while not go.exists():
        time.sleep(0.005)
    eng = attach(sys.argv[2])
    for line in sys.stdin:
        if line.strip() == "detach":
            eng.close()
            say(detached=True)
        elif line.strip() == "attach":
            eng = attach()
        else:
            break
"""


class Kernel:
    """A child kernel running :data:`CONTENDER`: ``send`` a command, read its ``reply``."""

    def __init__(self, rt: Runtime, how: str = "attach"):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CONTENDER), str(rt.folder.parent / "go"),
             how],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        rt.kernels.append(self.proc)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout],
                         daemon=True).start()

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return json.loads(self.lines.get(timeout=0.2))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break   # it died: no need to wait any longer
        self.proc.kill()
        self.proc.wait()
        pytest.fail(f"kernel {self.proc.pid} said nothing within {timeout}s: "
                    f"{self.proc.stderr.read()[-3000:]}")


def test_a_model_file_changed_while_detached_is_read_again(on_shared, model_dir, reference,
                                                          tmp_path):
    """6. A model file overwritten while no kernel was attached: attaching says so and
    predicts with the new file; one deleted meanwhile is unregistered, with a warning."""
    changing, doomed = tmp_path / "changing.keras", tmp_path / "doomed.keras"
    shutil.copyfile(model_dir / "mlp.keras", changing)
    shutil.copyfile(model_dir / "mlp.keras", doomed)
    with attached("shared") as eng:
        eng.register("changing", changing)
        eng.register("doomed", doomed)
        before = eng.predict(["changing", "doomed"], reference["x8"])
        assert np.abs(before["changing"] - reference["mlp"]).max() <= 1e-5
    shutil.copyfile(model_dir / "mlp2.keras", changing)   # same shapes, other weights
    doomed.unlink()
    with pytest.warns(UserWarning) as warned:
        eng = nbtool.attach("shared")
    try:
        said = "\n".join(str(w.message) for w in warned)
        assert f"model 'changing' ({changing}) changed since it was registered" in said, said
        assert "doomed" in said and "was unregistered when attaching" in said, said
        assert "doomed" not in eng.registry.names()
        assert "doomed" not in {r["name"] for r in eng.models()}
        with pytest.raises(ModelNotFound, match="doomed"):
            eng.predict("doomed", reference["x8"])
        out = eng.predict("changing", reference["x8"])["changing"]
        assert np.abs(out - reference["mlp2"]).max() <= 1e-5
        assert np.abs(out - reference["mlp"]).max() > 1e-2   # not the old copy
    finally:
        eng.close()


def test_a_model_overwritten_with_the_same_size_and_mtime_while_detached_is_noticed(
        on_shared, keras, tmp_path):
    """6b. ``cp -p`` of a same-architecture model over a registered file while no kernel
    was attached (size and modification time as before): attach reads it again."""
    from conftest import twin_h5

    path, other = tmp_path / "twin.h5", tmp_path / "other.h5"
    old, new = twin_h5(keras, path, 1), twin_h5(keras, other, 2)
    x = np.random.default_rng(2).normal(size=(30, 8)).astype("float32")
    with attached("shared") as eng:
        eng.register("twin", path)
        assert np.abs(eng.predict("twin", x)["twin"] - old.predict(x, verbose=0)).max() <= 1e-5
    st = path.stat()
    time.sleep(0.05)
    shutil.copy2(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.warns(UserWarning, match=r"model 'twin' .*changed since it was registered"):
        eng = nbtool.attach("shared")
    try:
        out = eng.predict("twin", x)["twin"]
        assert np.abs(out - new.predict(x, verbose=0)).max() <= 1e-5
    finally:
        eng.close()


def test_a_model_registered_as_an_object_outlives_the_kernel_that_saved_it(runtime, keras,
                                                                           model_dir,
                                                                           reference):
    """A model registered as an object is saved as a file the registry names: with a
    persistent engine that file is the engine's (kept beside it), not the kernel's
    temporary folder, which goes when the kernel ends; it goes when the engine ends."""
    eng = nbtool.start(persist=True, name="objects", **SMALL)
    eng.register("obj", keras.saving.load_model(model_dir / "mlp.keras"))
    saved = Path(eng.registry.get("obj").path)
    assert saved.parent == runtime.folder / "objects.work", saved
    eng.close()   # detached: as when its kernel ends (its temporary folders go)
    again = nbtool.attach("objects")
    try:
        out = again.predict("obj", reference["x8"])["obj"]
        assert np.abs(out - reference["mlp"]).max() <= 1e-5
    finally:
        nbtool.shutdown("objects")
    assert not saved.exists() and not (runtime.folder / "objects.work").exists()


def test_the_engine_file_is_the_users_alone_and_nobody_else_connects(on_shared, tmp_path):
    """7. The credentials are in a 0600 file in a 0700 folder; with the address alone,
    another user (or this one without the certificate) cannot connect."""
    record = on_shared.record("shared")
    path = on_shared.folder / "shared.json"
    for p, mode in ((on_shared.folder, 0o700), (path, 0o600)):
        st = os.lstat(p)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.getuid(), mode), p
    marker = tmp_path / "pwned"
    as_nobody = nobody_can_run_python()
    tried = run_attacker(record["address"], marker, as_nobody)
    assert tried.pop("uid") == (65534 if as_nobody else os.getuid())
    for how, what in tried.items():
        assert what.startswith("refused: "), (how, what)
    assert not marker.exists()
    with attached("shared") as eng:   # and its owner still gets in
        assert eng.client.run(os.getpid)


#: What uid nobody sees of the runtime folder, and of a readable file beside it.
PEEK = """
    import json, os, sys
    def look(f, *a):
        try:
            f(*a)
            return "read"
        except PermissionError:
            return "denied"
    with_open = lambda p: open(p).read()
    print(json.dumps({"list folder": look(os.listdir, sys.argv[1]),
                      "read engine file": look(with_open, sys.argv[2]),
                      "read a 0644 file beside": look(with_open, sys.argv[3])}))
"""


def test_another_user_cannot_read_the_engine_file(on_shared, tmp_path):
    """7. uid nobody, even where it can reach the folder's parent, can neither list the
    runtime folder nor read the engine file (a 0644 file beside it, it can)."""
    if not nobody_can_run_python():
        why = ("uid nobody cannot run Python here (not root, or no system Python "
               f"{sys.version_info.major}.{sys.version_info.minor})")
        if os.environ.get("CI") == "true":   # CI runs as root with it: this must not hide
            pytest.fail(why)
        pytest.skip(why)
    folder = on_shared.folder
    control = folder.parent / "open" / "readable.txt"
    control.parent.mkdir(exist_ok=True)
    control.parent.chmod(0o755)
    control.write_text("anyone")
    control.chmod(0o644)
    with reachable_by_others(folder.parent):
        out = subprocess.run(
            [f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}", "-c",
             textwrap.dedent(PEEK), str(folder), str(folder / "shared.json"), str(control)],
            user="nobody", group="nogroup", extra_groups=[], cwd="/", capture_output=True,
            text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == {"list folder": "denied", "read engine file": "denied",
                                      "read a 0644 file beside": "read"}


@contextmanager
def reachable_by_others(folder: Path):
    """Let other users traverse (not list) ``folder``'s ancestors meanwhile: the test
    session's folder is 0700, which alone would keep them out of everything inside."""
    changed = []
    for p in [folder, *folder.parents]:
        st = os.stat(p)
        if st.st_uid == os.getuid() and not st.st_mode & stat.S_IXOTH:
            changed.append((p, stat.S_IMODE(st.st_mode)))
            os.chmod(p, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
    try:
        yield
    finally:
        for p, mode in changed:
            os.chmod(p, mode)


# -- engines of their own: the tests that end them ----------------------------------------------
@pytest.mark.parametrize("how", ["process group", "process"])
def test_a_killed_engine_says_so_and_leaves_no_worker(runtime, model_dir, reference, how):
    """2. The engine's processes are SIGKILLed (its group; or its main process alone, as
    `kill -9 PID` from nbtool.running() would): the attached kernel's next call and a new
    attach say it was killed, at once; no worker is left; the file is replaced by a note."""
    eng = nbtool.start(persist=True, name="doomed", **SMALL)
    eng.register("m", model_dir / "mlp.keras")
    pid = runtime.record("doomed")["pid"]
    workers = psutil.Process(pid).children(recursive=True)
    assert workers, "no worker process under the engine"
    if how == "process group":
        kill_group(pid)
    else:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(pid) or
               psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10)
    start = time.monotonic()
    with pytest.raises(EngineNotRunning) as err:
        eng.predict("m", reference["x8"])
    took = time.monotonic() - start
    assert took < 5, f"the attached engine took {took:.1f}s to notice"
    said = str(err.value)
    assert "no persistent engine 'doomed' is running" in said and "killed" in said
    assert f"pid {pid}" in said and "nbtool.start(persist=True, name='doomed')" in said
    assert eng.closed
    with pytest.raises(EngineNotRunning, match=r"'doomed' is running: it ended at .*killed"):
        nbtool.attach("doomed")
    assert not (runtime.folder / "doomed.json").exists()
    assert "killed" in runtime.note("doomed")
    gone = wait_until(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                                      for w in workers), 15)
    assert gone < 10, f"its workers outlived it by {gone:.1f}s"


def test_a_prediction_running_when_the_engine_is_killed_ends_with_errors(runtime, model_dir,
                                                                          reference):
    """The engine killed mid-run: the run ends at once with the chunks it had (right) and
    errors for the others (NaN rows), not a wait for ever; predict() says the engine died."""
    eng = nbtool.start(persist=True, name="midrun", **SMALL)
    eng.register("m", model_dir / "mlp.keras")
    pid = runtime.record("midrun")["pid"]
    copies = 2000
    x = np.tile(reference["x8"], (copies, 1))      # 120,000 rows in 2,000 chunks
    run = eng.submit("m", x, chunk_size=60)
    wait_until(lambda: run.progress()["m"][0] >= 5, 60)
    kill_group(pid)
    start = time.monotonic()
    res = run.collect()
    took = time.monotonic() - start
    assert took < 30, f"collect() took {took:.1f}s after the engine was killed"
    assert res.errors and not any("NoneType" in str(e) for e in res.errors), res.errors[:3]
    try:
        out = res["m"]
    except PredictionFailed:   # nothing came back: the results were on the killed worker
        out = None
    want = np.tile(reference["mlp"], (copies, 1))
    done = ~np.isnan(out).any(axis=1) if out is not None else np.zeros(len(x), bool)
    assert not done.all()
    if done.any():
        assert np.abs(out[done] - want[done]).max() <= 1e-5   # what came back is right
    with pytest.raises(EngineNotRunning, match="killed"):
        eng.predict("m", reference["x8"])


@pytest.mark.parametrize("how", ["delete its file", "SIGTERM"])
def test_deleting_the_engine_file_or_a_sigterm_ends_the_engine(runtime, how):
    """3. With its engine file deleted nobody could attach any more: the engine ends by
    itself within seconds (its workers too), even with a kernel attached. SIGTERM too."""
    eng = nbtool.start(persist=True, name="ending", **SMALL)
    pid = runtime.record("ending")["pid"]
    if how == "SIGTERM":
        os.kill(pid, signal.SIGTERM)
        why = "ended by signal SIGTERM"
    else:
        (runtime.folder / "ending.json").unlink()
        why = f"its engine file {runtime.folder / 'ending.json'} was deleted, so nobody " \
              "could attach to it any more"
    took = wait_until(lambda: not group_processes(pid), 20)
    assert took < 10, f"it took {took:.1f}s to end"
    assert runtime.note("ending") == why
    assert not (runtime.folder / "ending.json").exists()
    for call in (eng.models, lambda: nbtool.attach("ending")):
        with pytest.raises(EngineNotRunning) as err:
            call()
        assert "no persistent engine 'ending' is running: it ended at " in str(err.value)
        assert why in str(err.value)


def test_the_idle_timeout_ends_an_engine_nobody_is_attached_to(runtime):
    """5. Attached for longer than its idle timeout, the engine runs on; once detached, it
    ends after that timeout, and attaching says why."""
    eng = nbtool.start(persist=True, name="idle", idle_timeout=3, **SMALL)
    pid = runtime.record("idle")["pid"]
    time.sleep(5)
    assert group_processes(pid) and eng.status()   # attached: kept
    eng.close()
    took = wait_until(lambda: not group_processes(pid), 30)
    assert 2.5 < took < 15, f"ended {took:.1f}s after the kernel detached"
    with pytest.raises(EngineNotRunning) as err:
        nbtool.attach("idle")
    assert "no kernel attached for 3 s (its idle timeout)" in str(err.value)
    assert "nbtool.start(persist=True, name='idle')" in str(err.value)


def test_shutdown_ends_it_and_start_attaches_to_a_running_one(runtime, model_dir):
    """8. start(persist=True) while the engine runs attaches to it (same process, models
    kept); nbtool.shutdown() ends it (attached or not), workers and all."""
    eng = nbtool.start(persist=True, name="s", **SMALL)
    eng.register("m", model_dir / "mlp.keras")
    pid = eng.cluster.record.pid
    eng.close()
    again = nbtool.start(persist=True, name="s", **SMALL)
    assert again.cluster.record.pid == pid and again.registry.names() == ["m"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the same settings: not a word
        assert nbtool.start(persist=True, name="s", **SMALL) is again   # a cell run twice
    with pytest.warns(UserWarning, match=r"'s' runs already, started with idle_timeout=1800.0"
                      r" \(asked now: idle_timeout=60.0\); attached to it as it is. Fix: "):
        assert nbtool.start(persist=True, name="s", idle_timeout=60, **SMALL) is again
    assert [(r["name"], r["pid"]) for r in nbtool.running()] == [("s", pid)]
    note = nbtool.shutdown()   # the engine this kernel is attached to
    assert note.startswith("'s' ended at ") and \
        note.endswith(f"shut down by nbtool.shutdown() from pid {os.getpid()}"), note
    assert not group_processes(pid) and again.closed
    assert len(nbtool.running()) == 0
    # Not attached: shutdown connects by itself.
    other = nbtool.start(persist=True, name="t", **SMALL)
    other_pid = other.cluster.record.pid
    other.close()
    assert "shut down by nbtool.shutdown()" in nbtool.shutdown("t")
    assert not group_processes(other_pid)
    with pytest.raises(EngineNotRunning, match="shut down by nbtool.shutdown"):
        nbtool.attach("t")
    # force=True kills it, and removes the semaphores its killed processes left in /dev/shm.
    forced = nbtool.start(persist=True, name="u", **SMALL)
    forced_pid = forced.cluster.record.pid
    semaphores = {m.path for p in group_processes(forced_pid) for m in p.memory_maps()
                  if m.path.startswith("/dev/shm/sem.")}
    note = nbtool.shutdown(force=True)
    assert "shut down by nbtool.shutdown() from pid" in note and "(force=True: killed)" in note
    assert not group_processes(forced_pid) and forced.closed
    assert semaphores and not [p for p in semaphores if os.path.exists(p)]


def test_bad_settings_are_refused_before_anything_starts(runtime):
    """9. A timeout that is not a positive duration, an address, or a name that is no file
    name: refused with the fix, and no engine process starts."""
    for bad in (0, "soon", -5, float("inf")):
        with pytest.raises(ValueError, match=rf"idle_timeout={bad!r}: .*Fix: "):
            nbtool.start(persist=True, idle_timeout=bad, **SMALL)
    with pytest.raises(ValueError, match="persist=True .* got address= .*Fix: "):
        nbtool.start("tcp://127.0.0.1:1", persist=True)
    for bad in ("../escape", "a/b", ".hidden", "", "x.ended"):
        with pytest.raises(ValueError, match=r"name=.*Fix: "):
            nbtool.start(persist=True, name=bad, **SMALL)
    with pytest.raises(ValueError, match=r"name=.*Fix: "):
        nbtool.attach("../escape")
    assert list(runtime.folder.glob("*.json")) == [] and not list(runtime.folder.glob("*.log"))


def test_a_damaged_engine_file_is_said_never_hangs_and_force_ends_the_engine(runtime,
                                                                             monkeypatch):
    """Garbage, a list, or a pid that is no number written in place of the engine file
    while the engine runs (and a file made 0644): attach, start and running() say what is
    wrong and which process runs it, in seconds (before: "no engine file", a 180 s hang,
    raw AttributeError/TypeError, an empty table); shutdown(force=True) ends it, workers
    and all (before: "not running", and the engine ran on until its idle timeout).
    NBTOOL_IDLE_TIMEOUT in the README's own words works (it broke every start)."""
    monkeypatch.setenv("NBTOOL_IDLE_TIMEOUT", "30min")
    eng = nbtool.start(persist=True, name="hurt", **SMALL)
    rec = runtime.record("hurt")
    pid, path = rec["pid"], runtime.folder / "hurt.json"
    assert rec["idle_timeout"] == 1800.0
    eng.close()
    os.chmod(path, 0o644)
    (row,) = [r for r in nbtool.running() if r["name"] == "hurt"]
    assert row["address"].startswith("unreachable: not used: ") and "mode 644" in row["address"]
    os.chmod(path, 0o600)
    for content, what in (("{garbage", "not JSON"), ("[]", "it holds a list, not an object"),
                          (json.dumps({**rec, "pid": "abc"}),
                           "field 'pid' is 'abc' (a str), not an int")):
        path.write_text(content)          # in place: its inode and mode stay
        says = (rf"engine 'hurt': its engine file .*hurt\.json is damaged "
                rf"\({re.escape(what)}.*\), so nbtool cannot reach the engine; its process "
                rf"{pid} still runs\. Fix: "
                r"nbtool\.shutdown\('hurt', force=True\)")
        with pytest.raises(EngineFileDamaged, match=says):
            nbtool.attach("hurt")
        started = time.monotonic()
        with pytest.raises(EngineFileDamaged, match=says):
            nbtool.start(persist=True, name="hurt", **SMALL)
        assert time.monotonic() - started < 10
        (row,) = [r for r in nbtool.running() if r["name"] == "hurt"]
        assert "is damaged" in row["address"]
        assert group_processes(pid)       # all the while, it ran
    note = nbtool.shutdown("hurt", force=True)
    assert f"force=True: its engine file was damaged; killed pid {pid}" in note
    wait_until(lambda: not group_processes(pid), 20)
    assert not path.exists() and "killed pid" in runtime.note("hurt")
    eng = nbtool.start(persist=True, name="hurt", **SMALL)   # and a new one starts
    assert eng.cluster.record.pid != pid
    nbtool.shutdown("hurt")
