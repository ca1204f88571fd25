"""``runtime="auto"``: the choice is measured at the first load, remembered per machine and
model file, made again when it no longer holds, never made from a conversion that fails or
disagrees, and a remembered conversion loads without TensorFlow.

In-process (a :class:`~nbtool.worker.model_cache.ModelCache` is what a worker runs), each test
with its own machine cache; one subprocess runs the worker's own load path.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

from nbtool.wire import ModelSpec, file_fingerprint
from nbtool.worker.model_cache import ModelCache
from nbtool.worker.auto.choice import choice_summary, fixed_tensorflow_note
from nbtool.worker.runtimes.openvino import ir_dir
from nbtool.worker.auto.records import RuntimeRecord, record_path
from nbtool.worker.runtimes.to_litert import litert_path

TOL = 1e-4


@pytest.fixture
def machine_cache(tmp_path, monkeypatch):
    """This test's own machine cache: no choice read from, or left for, another test."""
    folder = tmp_path / "machine-cache"
    monkeypatch.setenv("NBTOOL_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def choice_models(tmp_path_factory, keras):
    """name -> (path, rows, Keras' outputs): an MLP, a small CNN, its twin with other
    weights, and a model LiteRT cannot convert (bitwise ops are not among its built-ins)."""
    d = tmp_path_factory.mktemp("choice_models")
    L = keras.layers
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 8)).astype("float32")
    img = rng.normal(size=(40, 10, 10, 3)).astype("float32")

    def cnn(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((10, 10, 3)), L.Conv2D(6, 3, activation="relu"),
                                 L.GlobalAveragePooling2D(), L.Dense(4, activation="softmax")])

    keras.utils.set_random_seed(5)
    made = {"mlp": (keras.Sequential([keras.Input((8,)), L.Dense(32, activation="relu"),
                                      L.Dense(3, activation="softmax")]), x),
            "cnn": (cnn(1), img), "twin": (cnn(2), img),
            "bitwise": (keras.Sequential([
                keras.Input((8,)),
                # Imported inside: a deserialized lambda does not see this module's globals.
                keras.layers.Lambda(lambda t: __import__("tensorflow").cast(
                    __import__("tensorflow").bitwise.invert(
                        __import__("tensorflow").cast(t * 10, "int32")), "float32")),
                L.Dense(3)]), x)}
    out = {}
    for name, (model, rows) in made.items():
        model.save(d / f"{name}.keras")
        out[name] = (d / f"{name}.keras", rows, model.predict(rows, verbose=0))
    return out


def spec_of(path, runtime="auto", name=None, **options):
    return ModelSpec(name or path.stem, str(path), "keras", path.stat().st_size,
                     file_fingerprint(path), runtime=runtime, **options)


def load(spec, rows=None):
    """Load in a fresh cache (a fresh worker process would be the same): (predict, state)."""
    cache = ModelCache(budget=10**9, device="cpu:0", worker="here")
    loaded, _ = cache.get(spec, sample=None if rows is None else (lambda: rows[:64]))
    return (lambda x: cache.run(loaded, x)), cache.state_of(spec.name)


def test_auto_chooses_once_and_a_fresh_worker_reads_the_choice(machine_cache, choice_models):
    path, x, want = choice_models["cnn"]
    spec = spec_of(path)
    predict, state = load(spec, x)
    assert np.abs(predict(x)[0] - want).max() <= TOL
    assert state.runtime in ("tensorflow", "openvino", "litert")
    assert state.runtime_note.startswith(f"{state.runtime}: ")
    assert state.runtime_note.endswith("chosen at first load, remembered")
    assert "40 of your rows" in state.runtime_note
    record = json.loads(open(record_path(spec)).read())
    assert record["runtime"] == state.runtime
    # The runtime and its batch were chosen together: the fastest of those timed.
    timed = record["batch_seconds"]
    assert {k.split("@")[1] for k in timed} == {"32", "64", "128"}
    assert min(timed, key=timed.get) == f"{state.runtime}@{record['batch']}"
    assert state.batch_size == record["batch"]
    assert f"at batch {record['batch']}" in state.runtime_note
    assert set(record["seconds"]) >= {"tensorflow", state.runtime}
    assert record["machine"]["cores"] == os.cpu_count() and record["versions"]["openvino"]
    # The candidates not chosen are gone, from memory and from disk.
    others = {"openvino": ir_dir(spec), "litert": os.path.dirname(litert_path(spec))}
    kept = others.pop(state.runtime, None)
    assert not any(os.path.exists(p) for p in others.values())
    mtime = os.stat(kept).st_mtime_ns if kept else None

    predict, again = load(spec)   # no rows: a remembered choice needs none
    assert again.runtime == state.runtime and again.batch_size == state.batch_size
    assert again.runtime_note == f"remembered choice ({record['summary']})"
    assert np.abs(predict(x)[0] - want).max() <= TOL
    # Nothing was converted again: the other candidates' folders were not made again.
    assert not any(os.path.exists(p) for p in others.values())
    assert (os.stat(kept).st_mtime_ns if kept else None) == mtime


def test_a_batch_the_user_set_is_the_only_one_timed(machine_cache, choice_models):
    path, x, want = choice_models["mlp"]
    predict, state = load(spec_of(path, batch_size=16), x)
    assert state.batch_size == 16
    assert np.abs(predict(x)[0] - want).max() <= TOL
    record = json.loads(open(record_path(spec_of(path, batch_size=16))).read())
    assert record["batch"] == 16 and record["batch_seconds"] == {}
    assert "at batch" not in state.runtime_note
    # The user's batch is no choice of a batch: the same bytes registered without one
    # time the batches now (the conversions are read back, not made again).
    _, again = load(spec_of(path))
    assert again.batch_size in (32, 64, 128)
    assert "chosen again (chosen at batch_size=16, which this registration does not set)" \
        in again.runtime_note
    record = json.loads(open(record_path(spec_of(path))).read())
    assert record["user_batch"] is None and record["batch"] == again.batch_size
    _, third = load(spec_of(path, batch_size=16))   # and the user's batch still holds
    assert third.batch_size == 16 and third.runtime_note.startswith("remembered choice")


@pytest.mark.parametrize("change, why", [
    (lambda r: r.update(sha256="0" * 64), "artifact changed or is gone"),
    (lambda r: r["versions"].update(openvino="2000.0"), "chosen with other versions"),
    (lambda r: r["machine"].update(cpu="another CPU"), "chosen on another machine"),
])
def test_a_record_that_no_longer_holds_is_chosen_again(machine_cache, choice_models, change,
                                                       why):
    path, x, want = choice_models["mlp"]
    spec = spec_of(path)
    load(spec)
    record = json.loads(open(record_path(spec)).read())
    assert record["artifact"] and record["sha256"], record   # a conversion was chosen
    change(record)
    with open(record_path(spec), "w") as f:
        json.dump(record, f)
    predict, state = load(spec)
    assert "chosen again (" in state.runtime_note and why in state.runtime_note
    assert np.abs(predict(x)[0] - want).max() <= TOL
    assert json.loads(open(record_path(spec)).read())["machine"]["cpu"] != "another CPU"


def test_conversions_that_disagree_with_tensorflow_are_not_chosen(machine_cache,
                                                                   choice_models):
    """The cache holds, for the cnn, conversions of its twin (same layers, other weights):
    they load and run, and give other numbers. The check catches both, TensorFlow runs it,
    and the wrong files are removed."""
    path, x, want = choice_models["cnn"]
    twin_path = choice_models["twin"][0]
    spec, twin = spec_of(path), spec_of(twin_path)
    for runtime, where in (("openvino", ir_dir), ("litert",
                                                  lambda s: os.path.dirname(litert_path(s)))):
        load(spec_of(twin_path, runtime))               # the twin's conversion, cached
        os.makedirs(os.path.dirname(where(spec)), exist_ok=True)
        os.rename(where(twin), where(spec))             # ... where the cnn's would be
    predict, state = load(spec, x)
    assert state.runtime == "tensorflow"
    note = state.runtime_note
    assert "openvino skipped: disagrees with TensorFlow: max abs diff" in note
    assert "litert skipped: disagrees with TensorFlow: max abs diff" in note
    assert np.abs(predict(x)[0] - want).max() <= TOL
    assert not os.path.exists(ir_dir(spec)) and not os.path.exists(litert_path(spec))


def test_a_conversion_that_fails_is_skipped_with_one_line_of_why(machine_cache,
                                                                  choice_models):
    path, x, want = choice_models["bitwise"]
    predict, state = load(spec_of(path, trusted=True), x)
    assert state.state == "loaded" and state.runtime in ("tensorflow", "openvino")
    assert "litert skipped: failed (ConverterError" in state.runtime_note
    assert "\n" not in state.runtime_note
    assert np.abs(predict(x)[0] - want).max() <= TOL


def test_two_workers_loading_at_once_choose_once(machine_cache, choice_models):
    path, x, want = choice_models["mlp"]
    spec = spec_of(path)
    states = []
    threads = [threading.Thread(target=lambda: states.append(load(spec)[1]))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    notes = sorted(s.runtime_note.split(" (")[0].split(":")[0] for s in states)
    assert notes == sorted([states[0].runtime, "remembered choice"]) \
        or notes == sorted([states[1].runtime, "remembered choice"]), notes
    assert states[0].runtime == states[1].runtime


def test_mixed_precision_and_gpu_workers_keep_tensorflow_and_say_why():
    assert fixed_tensorflow_note(None, gpu=False) is None
    gpu = fixed_tensorflow_note(None, gpu=True)
    assert gpu.startswith("tensorflow: this worker has a GPU") and "Intel GPUs" in gpu
    assert "LiteRT on CPU" in gpu
    assert fixed_tensorflow_note("float16", gpu=False) == \
        "tensorflow: precision='float16' is TensorFlow's mixed precision"
    assert fixed_tensorflow_note("bfloat16", gpu=True).startswith("tensorflow: this worker")
    record = RuntimeRecord("tensorflow", 64, {}, {}, seconds={"tensorflow": 1.0,
                                                             "openvino": 2.0},
                           rows="64 random rows")
    assert choice_summary(record) == "tensorflow: the fastest (openvino 0.5x; on 64 random rows)"


def test_a_mixed_precision_model_with_auto_runs_in_tensorflow(machine_cache, choice_models):
    path, x, want = choice_models["mlp"]
    _, state = load(spec_of(path, precision="float16"))
    assert state.runtime == "tensorflow"
    assert state.runtime_note == "tensorflow: precision='float16' is TensorFlow's mixed " \
                                 "precision"
    assert not os.path.exists(record_path(spec_of(path)))   # nothing was chosen


WORKER = """
import json, os, pickle, sys
import numpy as np
from nbtool.worker.tasks import predict_chunk, worker_status
out = {}
for spec, x, want in pickle.load(open(sys.argv[1], "rb")):
    got = predict_chunk(spec, x, 0, None, 0).outputs
    out[spec.name] = float(np.abs(got[0] - want).max())
status = worker_status()
print(json.dumps({"diffs": out, "tensorflow": "tensorflow" in sys.modules,
                  "keras": "keras" in sys.modules, "gpus": status.gpus_seen,
                  "runtimes": {n: status.state_of(n).runtime for n in out},
                  "notes": {n: status.state_of(n).runtime_note for n in out}}))
"""


def test_a_cpu_worker_loads_remembered_conversions_without_tensorflow(machine_cache,
                                                                       choice_models,
                                                                       tmp_path):
    """The worker's own load path (prepare_worker, the cache, a chunk), in a fresh process
    planned as a CPU worker, for models whose choice this machine remembers."""
    jobs = []
    for name in ("mlp", "cnn"):
        path, x, want = choice_models[name]
        spec = spec_of(path)
        if load(spec, x)[1].runtime != "tensorflow":
            jobs.append((spec, x, want))
    assert jobs, "the MLP and the CNN both ran fastest in TensorFlow"
    with open(tmp_path / "jobs.pkl", "wb") as f:
        pickle.dump(jobs, f)
    # The same threads as the choice (they are part of it), the same machine cache.
    env = {**os.environ, "NBTOOL_DEVICE": "cpu:0", "NBTOOL_CACHE_DIR": str(machine_cache)}
    done = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "jobs.pkl")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["tensorflow"] is False and seen["keras"] is False, seen
    assert seen["gpus"] == []
    assert all(d <= TOL for d in seen["diffs"].values()), seen
    assert all(n.startswith("remembered choice") for n in seen["notes"].values()), seen


# -- the guard: every row a conversion computes is like the checked ones, or checked ------
@pytest.fixture(scope="module")
def unlike_rows_models(tmp_path_factory, keras):
    """name -> (path, rows): models whose LiteRT conversion agrees with Keras on ordinary
    rows and not on the rows after the 64th (scaled by 200 into softplus' overflow, or
    offset to 3e3 where LayerNormalization loses digits in float32)."""
    d = tmp_path_factory.mktemp("unlike_rows")
    L = keras.layers
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(1)
    soft = keras.Sequential([keras.Input((8,)), L.Dense(16, activation="softplus"),
                             L.Dense(4)])
    norm = keras.Sequential([keras.Input((8,)), L.LayerNormalization(), L.Dense(4)])
    scaled = rng.normal(size=(1000, 8)).astype("float32")
    scaled[64:] *= 200
    offset = rng.normal(size=(1000, 8)).astype("float32")
    offset[64:] = 3e3 + offset[64:] * 0.01
    out = {}
    for name, model, rows in (("softplus", soft, scaled), ("layernorm", norm, offset)):
        model.save(d / f"{name}.keras")
        out[name] = (d / f"{name}.keras", rows, model.predict(rows, verbose=0))
    return out


def remember(spec, runtime, rows):
    """Have this machine remember ``runtime`` for ``spec``'s file, as a choice that timed
    it fastest would have (its conversion made, checked on ``rows``): whichever runtime
    the timing picks on this machine, the remembered path is the one under test."""
    from nbtool.worker.auto.guard import Envelope
    from nbtool.worker.auto.records import (files_sha256, machine_facts, runtime_versions,
                                       write_record)

    forced = __import__("dataclasses").replace(spec, runtime=runtime)
    load(forced, rows)   # converts, checks on the first 64 rows, keeps the artifact
    artifact = [str(litert_path(spec))] if runtime == "litert" else \
        [str(p) for p in sorted(__import__("pathlib").Path(ir_dir(spec)).glob("*"))
         if p.suffix in (".xml", ".bin")]
    write_record(spec, RuntimeRecord(
        runtime, 64, machine_facts(), runtime_versions(), artifact, files_sha256(artifact),
        summary=f"{runtime}: remembered by the test", own_shape=[8], own_dtype="float32",
        n_outputs=1, envelope=Envelope.of(rows[:64]).to_dict()))


@pytest.mark.parametrize("name", ["softplus", "layernorm"])
def test_rows_unlike_the_checked_ones_that_a_conversion_gets_wrong_fall_back_to_tensorflow(
        machine_cache, unlike_rows_models, name):
    path, x, want = unlike_rows_models[name]
    spec = spec_of(path)
    remember(spec, "litert", x)
    cache = ModelCache(budget=10**9, device="cpu:0", worker="here")
    loaded, _ = cache.get(spec, sample=lambda: x[:64])
    assert cache.state_of(spec.name).runtime == "litert"
    first = cache.run(loaded, x[:64])[0]            # the rows it was checked on: trusted
    assert loaded.guard is not None and loaded.guard.reference is None   # no TF needed
    assert np.abs(first - want[:64]).max() <= TOL
    got = cache.run(loaded, x)[0]                   # then rows unlike them
    assert np.isfinite(got).all() and np.abs(got - want).max() <= TOL
    state = cache.state_of(spec.name)
    assert state.runtime == "tensorflow"
    assert state.runtime_note.startswith("tensorflow: fell back from litert, which gave max "
                                         "abs diff")
    assert loaded.notes and "computed in TensorFlow" in loaded.notes[0]
    # Remembered: a fresh worker of this machine runs it in TensorFlow from the start.
    predict, again = load(spec, x)
    assert again.runtime == "tensorflow" and "fell back from litert" in again.runtime_note
    assert np.abs(predict(x)[0] - want).max() <= TOL


def test_a_forced_conversion_that_gets_unlike_rows_wrong_fails_the_chunk_saying_so(
        machine_cache, unlike_rows_models):
    from nbtool.errors import ConversionDisagrees

    path, x, want = unlike_rows_models["softplus"]
    cache = ModelCache(budget=10**9, device="cpu:0", worker="here")
    loaded, _ = cache.get(spec_of(path, runtime="litert"), sample=lambda: x[:64])
    assert np.abs(cache.run(loaded, x[:64])[0] - want[:64]).max() <= TOL
    with pytest.raises(ConversionDisagrees, match=r"model 'softplus' .*its litert conversion "
                       r"gave max abs diff .* from TensorFlow on \d+ rows of this chunk.*"
                       r"Fix: register it with runtime='auto'"):
        cache.run(loaded, x)


def test_unlike_rows_that_agree_widen_what_was_checked_and_are_remembered(machine_cache,
                                                                          choice_models):
    path, x, want = choice_models["mlp"]
    spec = spec_of(path)
    remember(spec, "litert", x)
    cache = ModelCache(budget=10**9, device="cpu:0", worker="here")
    loaded, _ = cache.get(spec)
    before = json.loads(open(record_path(spec)).read())["envelope"]
    wide = x * 3                                  # softmax outputs: still within 1e-4
    keras_out = __import__("keras").saving.load_model(path).predict(wide, verbose=0)
    assert np.abs(cache.run(loaded, wide)[0] - keras_out).max() <= TOL
    assert cache.state_of(spec.name).runtime == "litert"     # they agreed: no fallback
    assert loaded.guard.checked_rows > 0            # compared with TensorFlow...
    assert loaded.guard.reference is None            # ...which was let go once they agreed
    assert cache.state_of(spec.name).accounted == loaded.weight_bytes   # no second copy
    after = json.loads(open(record_path(spec)).read())["envelope"]
    assert max(after["hi"]) > max(before["hi"]) and min(after["lo"]) < min(before["lo"])
    # The next load of this machine trusts those rows: no TensorFlow opened for them.
    cache2 = ModelCache(budget=10**9, device="cpu:0", worker="there")
    loaded2, _ = cache2.get(spec)
    assert np.abs(cache2.run(loaded2, wide)[0] - keras_out).max() <= TOL
    assert loaded2.guard.checked_rows == 0


def test_a_file_with_other_bytes_but_the_same_size_and_times_is_a_new_choice(
        machine_cache, tmp_path, keras):
    """``cp -p`` of another model of the same architecture: what this machine remembers
    for the old bytes (its runtime, its conversion) is never read for the new ones."""
    from conftest import twin_h5
    from nbtool.wire import content_digest

    path, other = tmp_path / "m.h5", tmp_path / "other.h5"
    _, b = twin_h5(keras, path, 1), twin_h5(keras, other, 2)
    x = np.random.default_rng(0).normal(size=(40, 8)).astype("float32")
    old = ModelSpec("m", str(path), "h5", path.stat().st_size, file_fingerprint(path),
                    runtime="auto", content=content_digest(path))
    load(old, x)
    st = path.stat()
    __import__("time").sleep(0.05)
    path.write_bytes(other.read_bytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert file_fingerprint(path) != old.fingerprint      # the change time gives it away
    new = ModelSpec("m", str(path), "h5", path.stat().st_size, file_fingerprint(path),
                    runtime="auto", content=content_digest(path))
    assert new.content != old.content and record_path(new) != record_path(old)
    predict, state = load(new, x)
    assert not state.runtime_note.startswith("remembered choice")
    assert np.abs(predict(x)[0] - b.predict(x, verbose=0)).max() <= TOL
