"""The workers' Keras backends: TensorFlow, JAX and PyTorch.

One real single-worker CPU cluster per backend (module scope): the same ``.keras`` and
``.h5`` files give what TensorFlow's ``model.predict`` gives in this process (within 1e-4),
the worker never imports TensorFlow, what needs TensorFlow is refused at register with a
clear error, and a soft unload says what it gave back. The checks that need no cluster
(the plan's environment, the start checks, the OOM recognition, the unload result and the
devices table) run here without one.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys

import numpy as np
import pytest

from nbtool.errors import InvalidOption, NbtoolError

BACKENDS = ("jax", "torch")


# -- no cluster ------------------------------------------------------------------------
def test_the_plan_gives_each_worker_its_backend_and_its_memory_settings():
    from nbtool._util.gpus import parse_inventory
    from nbtool.engine.devices import plan_workers

    (cpu,) = plan_workers([], n_workers=1, cores=2, total_memory=2**34, backend="jax")
    assert cpu.backend == "jax"
    assert cpu.env["KERAS_BACKEND"] == cpu.env["NBTOOL_BACKEND"] == "jax"
    assert cpu.env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert cpu.env["JAX_PLATFORMS"] == "cpu" and cpu.env["NBTOOL_TF_THREADS"] == "2"
    one = plan_workers([], n_workers=2, cores=2, total_memory=2**34, backend="torch")[0]
    assert one.env["NBTOOL_TF_THREADS"] == "1"   # the plan's share: torch.set_num_threads
    (gpu,) = plan_workers(parse_inventory("1x16GB"), cores=2, total_memory=2**34,
                          backend="torch")
    assert gpu.env["KERAS_BACKEND"] == "torch" and gpu.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert "JAX_PLATFORMS" not in gpu.env
    (tf,) = plan_workers([], n_workers=1, cores=2, total_memory=2**34)
    assert tf.env["KERAS_BACKEND"] == "tensorflow" and tf.env["TF_FORCE_GPU_ALLOW_GROWTH"]


def test_start_refuses_an_unknown_backend_and_one_not_installed(monkeypatch):
    import nbtool
    import nbtool.engine.backends as keras_backend

    with pytest.raises(InvalidOption, match=r"backend='mxnet'; expected one of 'tensorflow', "
                                            r"'jax', 'torch'"):
        nbtool.start(backend="mxnet")
    # The check asks importlib for the package, never imports it: one that is not there.
    monkeypatch.setitem(keras_backend.BACKEND_PACKAGES, "jax", "jax_is_not_installed_here")
    with pytest.raises(NbtoolError, match=r"backend='jax': the 'jax_is_not_installed_here' "
                                          r"package is not installed .* Fix: pip install "
                                          r"jax_is_not_installed_here"):
        nbtool.start(backend="jax", gpus="none")
    monkeypatch.setenv("NBTOOL_BACKEND", "PyTorch")
    assert keras_backend.check_backend(None) == "torch"


def test_the_magic_takes_a_backend_and_refuses_a_wrong_one():
    import argparse

    from nbtool.notebook.magic_args import backend_arg

    assert backend_arg("jax") == "jax" and backend_arg("pytorch") == "torch"
    with pytest.raises(argparse.ArgumentTypeError, match="Fix: e.g. --backend jax"):
        backend_arg("theano")


def test_out_of_memory_errors_of_every_backend_are_recognized_by_name():
    from nbtool.worker.environment import out_of_memory_error

    def error(type_name, message=""):
        return type(type_name, (RuntimeError,), {})(message)

    assert out_of_memory_error(error("ResourceExhaustedError"))            # TensorFlow
    assert out_of_memory_error(error("OutOfMemoryError", "CUDA out of memory. Tried to "
                                                         "allocate 2.00 GiB"))  # torch
    assert out_of_memory_error(error("XlaRuntimeError", "RESOURCE_EXHAUSTED: Out of memory "
                                                        "while trying to allocate 1.5GiB"))
    assert out_of_memory_error(error("JaxRuntimeError", "Out of memory allocating 9 bytes"))
    assert not out_of_memory_error(error("XlaRuntimeError", "INVALID_ARGUMENT: bad shape"))
    assert not out_of_memory_error(MemoryError("host"))   # not the device's: not halved


def test_what_needs_tensorflow_is_refused_on_another_backend_with_the_fix():
    from nbtool.errors import BackendUnsupported
    from nbtool.catalog.registration import check_backend_support
    from nbtool.wire import ModelSpec

    def spec(fmt="keras", **kw):
        return ModelSpec("m", f"/models/m.{fmt}", fmt, 1, "1-1", **{"runtime": "auto", **kw})

    for ok in (spec(), spec("h5"), spec("tflite", runtime="litert"),
               spec("openvino", runtime="openvino")):
        check_backend_support(ok, {"jax"})
        check_backend_support(ok, {"torch"})
    check_backend_support(spec("savedmodel"), {"tensorflow"})
    cases = {spec("savedmodel"): "a SavedModel runs only in TensorFlow",
             spec(preprocess=lambda x: x): "preprocess= runs TensorFlow ops",
             spec("tflite", runtime="litert", preprocess=abs): "preprocess= runs TensorFlow",
             spec(runtime="openvino"): "runtime='openvino' needs TensorFlow",
             spec(runtime="tensorflow"): "runtime='tensorflow' needs TensorFlow"}
    for bad, why in cases.items():
        with pytest.raises(BackendUnsupported) as e:
            check_backend_support(bad, {"torch"})
        assert isinstance(e.value, InvalidOption)
        text = str(e.value)
        assert text.startswith(f"model 'm' ({bad.path}): {why}") and "on torch" in text
        assert "Fix: " in text and "backend='tensorflow'" in text


def test_an_unload_result_is_the_list_it_always_was_and_says_what_it_freed():
    from nbtool.wire import UnloadResult

    r = UnloadResult.merged({"cpu0": UnloadResult(["cnn"], {"cpu0": 5_000_000},
                                                  {"cpu0": "yes (5.0 MB of 6.0 MB)"}),
                             "cpu1": UnloadResult([])})
    assert r == ["cnn"] and isinstance(r, list) and sorted(r) == ["cnn"]
    assert r.freed == {"cpu0": 5_000_000}
    assert repr(r) == "['cnn'] (freed: cpu0 5.0 MB; returns memory: cpu0 yes (5.0 MB of 6.0 MB))"
    back = pickle.loads(pickle.dumps(r))   # it crosses from the workers pickled
    assert back == r and back.freed == r.freed and back.returns_memory == r.returns_memory
    assert repr(UnloadResult(["a"])) == "['a']"


def test_the_devices_table_says_each_workers_backend_and_what_a_soft_unload_does():
    from nbtool.tables import Table, device_rows
    from nbtool.wire import WorkerStatus

    statuses = {
        "gpu0": WorkerStatus("gpu0", "gpu:0", 2**30, backend="torch"),
        "gpu1": WorkerStatus("gpu1", "gpu:1", 2**30, backend="jax"),
        "gpu2": WorkerStatus("gpu2", "gpu:2", 2**30),
        "cpu0": WorkerStatus("cpu0", "cpu:0", 2**30, backend="jax", last_soft_unload={
            "models": ["cnn"], "freed": 0, "returns_memory": "no (0 B of 12.6 MB)"})}
    rows = {r["worker"]: r for r in Table(device_rows(statuses))}
    assert {w: r["backend"] for w, r in rows.items()} == {
        "cpu0": "jax", "gpu0": "torch", "gpu1": "jax", "gpu2": "tensorflow"}
    assert rows["gpu0"]["soft unload"] == "returns memory"
    assert rows["gpu1"]["soft unload"] == rows["gpu2"]["soft unload"] == \
        "keeps memory (hard unload returns it)"
    assert rows["cpu0"]["soft unload"] == "last: no (0 B of 12.6 MB)"


# -- one real cluster per backend ----------------------------------------------------------
@pytest.fixture(scope="module")
def backend_models(tmp_path_factory, keras, model_dir, reference):
    """Models TensorFlow's Keras builds and saves here (conv + BatchNorm with real moving
    statistics, depthwise and separable convs), beside the session's mlp (.keras and the
    Keras-2 .h5 layout), multi-output model and SavedModel; with ``model.predict``'s
    answers computed in this process, which runs Keras on TensorFlow."""
    d = tmp_path_factory.mktemp("backends")
    rng = np.random.default_rng(16)
    img = rng.normal(size=(70, 12, 12, 3)).astype("float32")
    keras.utils.set_random_seed(16)
    conv_bn = keras.Sequential([
        keras.Input((12, 12, 3)), keras.layers.Conv2D(8, 3, padding="same"),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Conv2D(8, 3, strides=2), keras.layers.BatchNormalization(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4, activation="softmax")],
        name="conv_bn")
    for layer in conv_bn.layers:   # moving statistics that are not the identity
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(size=beta.shape),
                               rng.normal(size=mean.shape), rng.uniform(0.5, 2, var.shape)])
    depthwise = keras.Sequential([
        keras.Input((12, 12, 3)), keras.layers.DepthwiseConv2D(3, depth_multiplier=2),
        keras.layers.SeparableConv2D(6, 3, activation="relu"), keras.layers.Flatten(),
        keras.layers.Dense(5)], name="depthwise")
    models = {"conv_bn": (conv_bn, img), "depthwise": (depthwise, img)}
    files = {"mlp_h5": (model_dir / "mlp.h5", reference["x8"], [reference["mlp"]]),
             "multi": (model_dir / "multi.keras", reference["x8"], reference["multi"]),
             "cnn": (model_dir / "cnn.keras", reference["img"], [reference["cnn"]])}
    for name, (model, x) in models.items():
        model.save(d / f"{name}.keras")
        files[name] = (d / f"{name}.keras", x, [model.predict(x, verbose=0)])
    import tensorflow as tf   # the .tflite, made where TensorFlow runs: here

    mlp = keras.saving.load_model(model_dir / "mlp.keras")
    (d / "mlp.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(mlp).convert())
    files["mlp_tflite"] = (d / "mlp.tflite", reference["x8"], [reference["mlp"]])
    return files


@pytest.fixture(scope="module", params=BACKENDS)
def backend_engine(request):
    """A one-worker CPU engine whose worker runs Keras on the backend (one per backend,
    started once for the module's tests)."""
    backend = request.param
    if importlib.util.find_spec(backend) is None:
        if os.environ.get("CI") == "true":   # CI installs the test extra: all three run there
            pytest.fail(f"{backend} is not installed; under CI=true every backend is tested "
                        "(pip install -e '.[test]' installs it)")
        pytest.skip(f"{backend} is not installed (pip install -e '.[test]' installs it)")
    import nbtool
    from nbtool.engine.session import current_engine, set_default_engine

    before = current_engine()
    eng = nbtool.start(backend=backend, gpus="none", n_workers=1,
                       dashboard_address="127.0.0.1:0")
    yield eng
    eng.close()
    set_default_engine(before)


def frameworks_in_worker(eng) -> dict:
    """Which of the three frameworks the worker process has imported."""
    (found,) = eng.client.run(lambda: sorted(m for m in ("tensorflow", "jax", "torch")
                                             if m in sys.modules)).values()
    return found


@pytest.mark.slow
def test_keras_files_predict_on_the_backend_what_tensorflow_predicts(
        backend_engine, backend_models, unique):
    eng = backend_engine
    backend = eng.pool.workers["cpu0"].backend
    assert backend in BACKENDS and backend in repr(eng)
    for name, (path, x, want) in backend_models.items():
        model = f"{unique}_{name}"
        eng.register(model, path, batch_size=32)   # 60-70 rows: the last batch is padded
        got = eng.predict(model, x, combine=None).raise_for_errors()[model]
        outs = got if isinstance(got, list) else [got]
        assert len(outs) == len(want), name
        for o, w in zip(outs, want):
            assert o.dtype == np.float32 and o.shape == w.shape, name
            np.testing.assert_allclose(o, w, atol=1e-4, rtol=0, err_msg=f"{name} on {backend}")
        state = eng.status()["cpu0"].state_of(model)
        if name == "mlp_tflite":
            assert state.runtime == "litert"   # LiteRT needs no TensorFlow either
        else:
            assert state.runtime == backend and state.runtime_note.startswith(
                f"{backend}: the workers run Keras on "), state.runtime_note
            assert state.traces == 1, name   # one batch shape: compiled (traced) once
    # Mixed precision is Keras' own policy: it runs on every backend (bfloat16: ~1e-3 off).
    path, x, (want,) = backend_models["conv_bn"]
    eng.register(f"{unique}_bf16", path, precision="bfloat16")
    got = eng.predict(f"{unique}_bf16", x).raise_for_errors()[f"{unique}_bf16"]
    assert got.dtype == np.float32 and 0 < np.abs(got - want).max() < 2e-2
    assert eng.status()["cpu0"].state_of(f"{unique}_bf16").precision == "bfloat16"
    status = eng.status()["cpu0"]
    assert status.backend == backend and status.env["KERAS_BACKEND"] == backend
    assert status.threads == 2 and status.gpus_seen == []
    found = frameworks_in_worker(eng)
    assert "tensorflow" not in found and backend in found, found


@pytest.mark.slow
def test_what_needs_tensorflow_is_refused_at_register_naming_the_backend(
        backend_engine, model_dir, unique):
    from nbtool.errors import BackendUnsupported

    eng = backend_engine
    backend = eng.pool.workers["cpu0"].backend
    for kwargs, why in (({"model": model_dir / "mlp_savedmodel", "trusted": True},
                         "a SavedModel runs only in TensorFlow"),
                        ({"model": model_dir / "cnn.keras", "preprocess": "rescale"},
                         "preprocess= runs TensorFlow ops"),
                        ({"model": model_dir / "mlp.keras", "runtime": "litert"},
                         "runtime='litert' needs TensorFlow")):
        with pytest.raises(BackendUnsupported, match=f"{why}.*the workers run Keras on "
                                                     f"{backend}. Fix: .*backend='tensorflow'"):
            eng.register(f"{unique}_refused", **kwargs)
        assert f"{unique}_refused" not in eng.registry
    # A folder: what cannot run is skipped with the same words, the rest registered.
    with pytest.warns(UserWarning, match="a SavedModel runs only in TensorFlow"):
        specs = eng.register_dir(model_dir, trusted=True)
    assert "mlp_savedmodel" not in {s.name for s in specs} and "mlp" in {s.name for s in specs}
    # eng.optimize makes every variant with TensorFlow's converters: refused, with the fix.
    with pytest.raises(ValueError, match=f"Keras on {backend}. Fix: optimize in an engine "
                                         "started with backend='tensorflow'"):
        eng.optimize("mlp", ["float16"], calibration=np.zeros((4, 8), "float32"))


@pytest.mark.slow
def test_an_external_cluster_keeps_its_backend_and_another_is_refused(backend_engine):
    import nbtool
    from nbtool.engine.session import set_default_engine

    eng = backend_engine
    backend = eng.pool.workers["cpu0"].backend
    other = "torch" if backend == "jax" else "jax"
    address, security = eng.cluster.scheduler_address, eng.cluster.security
    with pytest.raises(NbtoolError, match=f"backend='{other}': the workers at .* run Keras on "
                                          f"'{backend}'.*KERAS_BACKEND={other}"):
        nbtool.start(address, security=security, backend=other)
    same = nbtool.start(address, security=security, backend=backend)
    assert same.pool.workers["cpu0"].backend == backend
    same.client.close()
    set_default_engine(eng)


@pytest.mark.slow
def test_an_unload_says_per_worker_what_it_freed(backend_engine, keras, tmp_path, unique):
    eng = backend_engine
    backend = eng.pool.workers["cpu0"].backend
    keras.utils.set_random_seed(3)
    big = keras.Sequential([keras.Input((512,)), keras.layers.Dense(4096),
                            keras.layers.Dense(2048), keras.layers.Dense(8)])   # 42.0 MB
    big.save(tmp_path / "big.keras")
    name = f"{unique}_big"
    eng.register(name, tmp_path / "big.keras")
    eng.load(name)
    out = eng.unload(name)
    assert out == [name] and isinstance(out, list)
    assert set(out.freed) == {"cpu0"} and isinstance(out.freed["cpu0"], int)
    verdict = out.returns_memory["cpu0"]
    assert verdict.split(" ")[0] in ("yes", "no", "partly") and "of 42.0 MB)" in verdict, verdict
    assert repr(out).startswith(f"['{name}'] (freed: cpu0 ")
    (row,) = eng.devices()
    assert row["backend"] == backend and row["soft unload"] == f"last: {verdict}"
    again = eng.unload(name)
    assert again == [] and again.freed == {}
    # Hard: a new process, which comes back on the same backend (the Nanny's environment).
    eng.load(name)
    hard = eng.unload(name, hard=True)
    assert hard == ["cpu0"] and hard.freed["cpu0"] > 42_000_000, repr(hard)
    assert hard.returns_memory == {"cpu0": "yes (a new process)"}
    assert eng.status()["cpu0"].backend == backend
    assert "tensorflow" not in frameworks_in_worker(eng)
