"""Shared fixtures: small real Keras models saved in every format, and one real cluster.

Starting workers costs seconds (each imports TensorFlow), so one two-worker engine serves
the whole session; tests register models under their own names so they never collide.

Isolation: before anything else runs, the session gets one private folder (``SESSION_DIR``,
under the real temp dir) that becomes TMPDIR and holds Jupyter's, IPython's, Keras' and
nbtool's folders. The tests and every process they start (kernels, ``jupyter lab``, Dask
workers) inherit it, so nothing lands in the user's home or in /tmp; it is removed when
the session ends, failures included. tests/test_hygiene.py checks it is in force.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: The session's private folder: everything the tests write goes under it.
SESSION_DIR = Path(tempfile.mkdtemp(prefix="nbtool-tests-")).resolve()

#: Each variable that says where a tool writes, and its folder inside SESSION_DIR.
ISOLATED_DIRS = {
    "TMPDIR": "tmp",                          # tempfile, Dask's scratch, TF's autograph files
    "JUPYTER_CONFIG_DIR": "jupyter-config",   # ~/.jupyter (and lab/ settings, workspaces)
    "JUPYTER_DATA_DIR": "jupyter-data",       # ~/.local/share/jupyter
    "JUPYTER_RUNTIME_DIR": "jupyter-runtime",  # kernel and server connection files
    # jupyterlab.commands.get_workspaces_dir: the browser test's notebook stayed in the
    # user's workspace, and their next `make lab` asked for it (a 404).
    "JUPYTERLAB_WORKSPACES_DIR": "jupyterlab-workspaces",
    "JUPYTERLAB_SETTINGS_DIR": "jupyterlab-settings",
    "IPYTHONDIR": "ipython",                  # kernels' profile, history, security
    "XDG_RUNTIME_DIR": "xdg-runtime",         # chromium's dconf (else ~/.cache/dconf)
    "NBTOOL_CACHE_DIR": "nbtool-cache",       # the batch-size sweep's answers
    "MPLCONFIGDIR": "matplotlib",
    "KERAS_HOME": "keras",                    # keras.json, written on first import
}
for _name, _sub in ISOLATED_DIRS.items():
    (SESSION_DIR / _sub).mkdir(mode=0o700)
    os.environ[_name] = str(SESSION_DIR / _sub)
# tempfile caches its folder on first use, and pytest's capture has used it already.
tempfile.tempdir = os.environ["TMPDIR"]
# The kernels nbclient starts still find the venv's python3 kernelspec: it is in
# sys.prefix/share/jupyter, searched whatever JUPYTER_DATA_DIR says.


def end_persistent_engines() -> list[int]:
    """Kill the persistent engines this session started that are still running (their
    process groups); returns their pids. They outlive the processes that started them, so
    a test that failed before its cleanup would leave them running after the session.
    """
    import psutil

    from nbtool.engine.persist.engine_files import kill_group

    ended = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "nbtool.engine.persist.server" not in (proc.info["cmdline"] or []):
                continue
            tmp = proc.environ().get("TMPDIR", "")
        except psutil.Error:
            continue
        if tmp and SESSION_DIR in Path(tmp).resolve().parents:
            kill_group(proc.pid)   # its workers and semaphores too
            ended.append(proc.pid)
    return ended


@atexit.register
def remove_session_dir() -> None:
    """Remove the session folder when the test process ends, whatever happened.

    At exit rather than in pytest_unconfigure: IPython's shell (the magics tests) writes its
    history into IPYTHONDIR from an exit hook; exit hooks run newest first, so this one,
    registered before IPython or Dask is even imported, runs after theirs.
    """
    end_persistent_engines()
    for _ in range(5):   # a worker or kernel still exiting can write one last file
        shutil.rmtree(SESSION_DIR, ignore_errors=True)
        if not SESSION_DIR.exists():
            return
        time.sleep(1)


@pytest.hookimpl(tryfirst=True)   # before pytest's tmpdir plugin reads the option
def pytest_configure(config):
    """pytest's own tmp_path folders (else /tmp/pytest-of-<user>) go with the session."""
    if config.option.basetemp is None:
        config.option.basetemp = str(SESSION_DIR / "pytest")


@pytest.fixture(scope="session")
def keras():
    import keras as _keras

    _keras.utils.set_random_seed(0)
    return _keras


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, keras):
    """A folder with the models the tests use, saved the ways users save them."""
    d = tmp_path_factory.mktemp("models")
    mlp = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                            keras.layers.Dense(3, activation="softmax")], name="mlp")
    mlp.save(d / "mlp.keras")
    mlp.save(d / "mlp.h5")
    mlp.export(str(d / "mlp_savedmodel"), verbose=False)
    mlp2 = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="tanh"),
                             keras.layers.Dense(3, activation="softmax")], name="mlp2")
    mlp2.save(d / "mlp2.keras")
    cnn = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                            keras.layers.Flatten(), keras.layers.Dense(5, activation="softmax")],
                           name="cnn")
    cnn.save(d / "cnn.keras")
    inp = keras.Input((8,), name="features")
    h = keras.layers.Dense(8, activation="relu")(inp)
    multi = keras.Model(inp, [keras.layers.Dense(2)(h), keras.layers.Dense(4)(h)], name="multi")
    multi.save(d / "multi.keras")
    # Fails for real, inside the graph, on rows holding NaN: a chunk failure on demand.
    checked = keras.Sequential([
        keras.Input((8,)),
        # The import is inside: a deserialized lambda does not see this module's globals.
        keras.layers.Lambda(lambda t: __import__("tensorflow").debugging.check_numerics(
            t, "row is not finite")),
        keras.layers.Dense(3)], name="checked")
    checked.save(d / "checked.keras")
    (d / "corrupt.keras").write_bytes(b"PK\x03\x04 this is not a real zip")
    return d


@pytest.fixture(scope="session")
def reference(model_dir, keras):
    """Keras' own ``model.predict`` of each model on fixed inputs: the ground truth."""
    rng = np.random.default_rng(0)
    x8 = rng.normal(size=(60, 8)).astype("float32")
    img = rng.normal(size=(60, 8, 8, 1)).astype("float32")
    out = {"x8": x8, "img": img}
    for name, x in (("mlp", x8), ("mlp2", x8), ("cnn", img), ("multi", x8)):
        m = keras.saving.load_model(model_dir / f"{name}.keras")
        out[name] = m.predict(x, verbose=0)
    return out


@pytest.fixture(scope="session")
def engine():
    """One real two-worker local cluster for the session (127.0.0.1, random ports)."""
    import nbtool

    eng = nbtool.start(n_workers=2, gpus="none", dashboard_address="127.0.0.1:0")
    yield eng
    eng.close()


@pytest.fixture
def keep_default_engine():
    """Starting another engine makes it the default; give the session's back afterwards."""
    from nbtool.engine.session import current_engine, set_default_engine

    before = current_engine()
    yield
    set_default_engine(before)


@pytest.fixture
def unique():
    """A fresh model name prefix, so tests sharing the engine never collide."""
    return f"t{uuid.uuid4().hex[:6]}"


def dense_model(keras, units: int, seed: int, n_in: int = 32):
    """A model whose weights take about ``4 * (n_in + 4) * units`` bytes: memory tests."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((n_in,)), keras.layers.Dense(units, activation="relu"),
                             keras.layers.Dense(4)], name=f"dense{seed}")


def twin_h5(keras, path, seed: int):
    """Save an .h5 MLP whose file has the same size as every other seed's (same names and
    layout, other weights): what a retrained model re-saved in place looks like on disk,
    the case a size-and-mtime fingerprint misses. Returns the model.
    """
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8,), name="x"),
                              keras.layers.Dense(16, activation="relu", name="d1"),
                              keras.layers.Dense(3, activation="softmax", name="d2")],
                             name="twin")
    model.save(path)
    return model


@pytest.fixture
def two(engine, model_dir, unique):
    """Two small MLPs registered under this test's names (``mlp`` and ``mlp2``): ensembles."""
    a, b = f"{unique}_a", f"{unique}_b"
    engine.register(a, model_dir / "mlp.keras")
    engine.register(b, model_dir / "mlp2.keras")
    return a, b


@pytest.fixture
def failing_pair(engine, model_dir, unique):
    """Two models registered side by side: ``checked`` (fails in-graph on a chunk holding a
    NaN row) and the mlp; their names, for ensembles where one member fails."""
    chk, good = f"{unique}_chk", f"{unique}_good"
    engine.register(chk, model_dir / "checked.keras", trusted=True)
    engine.register(good, model_dir / "mlp.keras")
    return chk, good
