"""The README's "Bring your own model" section stays true: its code runs as written on real
files of each format, gives what Keras and LiteRT give, and the errors it quotes are the
ones nbtool raises.

Everything runs on the session's engine: the code blocks are executed with ``eng`` bound
to it (what ``nbtool.start()`` / ``%nbtool start`` would make), the model names prefixed
so tests sharing the engine never collide.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nbtool.errors import ModelLoadError, NbtoolError

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "Bring your own model"


def readme_section(title: str) -> str:
    """The text of the README section ``## title``, up to the next ``## `` heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end == -1 else text[start:end]


def fenced_blocks(text: str, info: str) -> list[str]:
    """The bodies of the fenced code blocks whose info string is ``info`` ("" for none)."""
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
            if lang == info]


def flat(text: str) -> str:
    """Whitespace folded to single spaces: README lines wrap inside quoted messages."""
    return " ".join(text.split())


def run_tflite(path: Path, x: np.ndarray) -> list[np.ndarray]:
    """LiteRT's own answer for ``x``, every output in the interpreter's order."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()
    return [it.get_tensor(o["index"]).copy() for o in it.get_output_details()]


def to_tflite(model, path: Path) -> Path:
    import tensorflow as tf

    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


@pytest.fixture(scope="module")
def byom(tmp_path_factory, keras):
    """The README's files, made the ways users make them, each a different model, with
    its ground truth on ``x_test``: Keras' ``model.predict``, or LiteRT's interpreter."""
    d = tmp_path_factory.mktemp("byom")
    x = np.random.default_rng(7).normal(size=(40, 8)).astype("float32")

    def mlp(seed: int, name: str):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                 keras.layers.Dense(3, activation="softmax")], name=name)

    mine, old, lite, exported = (mlp(s, n) for s, n in
                                 ((11, "mine"), (12, "old"), (13, "lite"), (14, "exported")))
    mine.save(d / "mine.keras")
    # The HDF5 layout Keras 2 (tf.keras) wrote: model_config attribute + model_weights.
    old.save(d / "old.h5")
    to_tflite(lite, d / "lite.tflite")
    exported.export(str(d / "exported"), verbose=False)
    truth = {"mine": mine.predict(x, verbose=0), "old": old.predict(x, verbose=0),
             "lite": run_tflite(d / "lite.tflite", x)[0],
             "exported": exported.predict(x, verbose=0)}
    inp = keras.Input((8,))
    h = keras.layers.Dense(8, activation="relu")(inp)
    two = keras.Model(inp, [keras.layers.Dense(2)(h), keras.layers.Dense(4)(h)], name="two")
    two.save(d / "two.keras")
    to_tflite(two, d / "two.tflite")
    truth["two"] = two.predict(x, verbose=0)
    truth["two.tflite"] = run_tflite(d / "two.tflite", x)
    return d, x, truth


def prefixed_python(code: str, names: list[str], unique: str) -> str:
    """``code`` with each model name made unique where it stands as a whole string
    literal (``"old"``); file names (``"old.h5"``, ``"exported/"``) stay as they are."""
    for n in names:
        code = code.replace(f'"{n}"', f'"{unique}_{n}"')
    return code


def prefixed_magic(cell: str, names: list[str], unique: str) -> str:
    """A magic cell with each model name made unique where it is a whole word."""
    return "\n".join(" ".join(f"{unique}_{w}" if w in names else w for w in line.split(" "))
                     for line in cell.splitlines())


def test_python_block_registers_each_format_and_predicts_what_its_own_runtime_does(
        engine, byom, unique, monkeypatch):
    d, x, truth = byom
    (code,) = fenced_blocks(readme_section(SECTION), "python")
    names = re.findall(r'eng\.register\("([^"]+)"', code)
    assert names == ["mine", "old", "lite", "exported"]
    monkeypatch.chdir(d)   # the README's paths are relative, as a user's are
    ns = {"eng": engine, "x_test": x}
    exec(compile(prefixed_python(code, names, unique), f"{README}: {SECTION}", "exec"), ns)
    res = ns["res"].raise_for_errors()
    formats = {n: engine.registry.get(f"{unique}_{n}").format for n in names}
    assert formats == {"mine": "keras", "old": "h5", "lite": "tflite",
                       "exported": "savedmodel"}
    for n in names:
        np.testing.assert_allclose(res[f"{unique}_{n}"], truth[n], rtol=1e-5, atol=1e-6,
                                   err_msg=n)
    # The table: a SavedModel's input is read from its serving signature at register.
    fresh = engine.register(f"{unique}_exported2", d / "exported", trusted=True)
    assert fresh.input_shape == (None, 8) and fresh.input_dtype == "float32"


def test_magic_blocks_run_as_pasted(engine, byom, unique, monkeypatch, keep_default_engine):
    from IPython.core.interactiveshell import InteractiveShell

    from nbtool.engine.session import set_default_engine

    d, x, truth = byom
    register_cell, infer_cell = fenced_blocks(readme_section(SECTION), "")
    names = re.findall(r"^%nbtool register (\S+)", register_cell, re.M)
    assert names == ["mine"] and "%nbtool start" in register_cell
    # The session engine stands in for the one `%nbtool start` would start.
    set_default_engine(engine)
    monkeypatch.chdir(d)
    ip = InteractiveShell.instance()
    ip.user_ns["x_test"] = x
    pasted = "\n".join(line for line in register_cell.splitlines()
                       if not line.startswith("%nbtool start"))
    ip.run_cell(prefixed_magic(pasted, names, unique)).raise_error()
    head, body = prefixed_magic(infer_cell, names, unique).split("\n", 1)
    assert head.startswith("%%infer ")
    result = ip.run_cell(f"{head}\n{body}")
    result.raise_error()
    np.testing.assert_allclose(result.result[f"{unique}_mine"], truth["mine"], rtol=1e-5,
                               atol=1e-6)


def test_several_outputs_come_back_as_a_list_and_tflite_in_signature_order(engine, byom,
                                                                             unique):
    d, x, truth = byom
    k, t = f"{unique}_two_k", f"{unique}_two_t"
    engine.register(k, d / "two.keras")
    engine.register(t, d / "two.tflite")
    res = engine.predict([k, t], x, combine=None).raise_for_errors()
    for got, want in zip(res[k], truth["two"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The interpreter's own tensor order differs for this very model; nbtool follows the
    # signature (output_0, output_1: Keras' order), as the README says.
    by_shape = {o.shape: o for o in truth["two.tflite"]}
    assert [o.shape for o in res[k]] == [o.shape for o in res[t]] == [(40, 2), (40, 4)]
    assert [o.shape for o in truth["two.tflite"]] != [(40, 2), (40, 4)]
    for got in res[t]:
        np.testing.assert_allclose(got, by_shape[got.shape], rtol=1e-5, atol=1e-6)


def _register_time_failures(d: Path, keras) -> list[tuple[str, str, dict]]:
    """(phrase the README quotes, path that makes nbtool say it, register options)."""
    (d / "corrupt.keras").write_bytes(b"PK\x03\x04 a partial download")
    (d / "corrupt.h5").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    (d / "corrupt.tflite").write_bytes(b"<html>not found</html>")
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    m.save_weights(d / "w.weights.h5")
    (d / "weights.h5").write_bytes((d / "w.weights.h5").read_bytes())
    (d / "model.pt").write_bytes(b"\x80\x02torch")
    (d / "not_exported").mkdir()
    lam = keras.Sequential([keras.Input((8,)), keras.layers.Lambda(lambda t: t * 2.0,
                                                                   name="double")])
    lam.save(d / "lam.keras")
    return [
        ("the path does not exist", "nowhere/mine.keras", {}),
        ("not a readable .keras archive", "corrupt.keras", {}),
        ("not a readable HDF5 file", "corrupt.h5", {}),
        ("not a LiteRT (.tflite) flatbuffer", "corrupt.tflite", {}),
        ("the HDF5 file holds weights only", "weights.h5", {}),
        ("nbtool cannot run a file ending in '.pt'", "model.pt", {}),
        ("a directory without saved_model.pb", "not_exported", {}),
        ("it contains a Lambda layer 'double'", "lam.keras", {}),
        ("it contains a TensorFlow graph (a SavedModel directory)", "exported", {}),
    ]


def test_the_register_errors_it_quotes_are_the_ones_users_get(engine, byom, keras, unique,
                                                              monkeypatch):
    d, _, _ = byom
    text = flat(readme_section(SECTION))
    monkeypatch.chdir(d)
    for i, (phrase, path, options) in enumerate(_register_time_failures(d, keras)):
        assert phrase in text, f"the README no longer quotes {phrase!r}"
        with pytest.raises(NbtoolError) as caught:
            engine.register(f"{unique}_bad{i}", path, **options)
        assert phrase in str(caught.value), (phrase, str(caught.value))
        assert f"{unique}_bad{i}" not in engine.registry   # refused before any worker
    # and the fix it gives works: trusted=True for the two that run code
    engine.register(f"{unique}_lam", "lam.keras", trusted=True)
    engine.register(f"{unique}_sm", "exported", trusted=True)


def test_the_load_errors_it_quotes_are_the_ones_users_get(engine, byom, keras, unique):
    from tflite_models import select_ops_tflite

    d, x, _ = byom
    text = flat(readme_section(SECTION))

    @keras.saving.register_keras_serializable(package="readme")
    class Triple(keras.layers.Layer):   # known here only: the workers cannot import it
        def call(self, t):
            return t * 3.0

    custom = keras.Sequential([keras.Input((8,)), Triple(), keras.layers.Dense(3)])
    custom.save(d / "custom.keras")
    with zipfile.ZipFile(d / "mine.keras") as src, \
            zipfile.ZipFile(d / "damaged.keras", "w") as dst:
        for item in src.infolist():   # config intact, weights garbage: reads, cannot load
            dst.writestr(item, b"garbage" if item.filename.endswith(".h5")
                         else src.read(item))
    select_ops_tflite(d / "select.tflite")
    cases = [("Fix: the model uses a custom class", "custom.keras"),
             ("Select TensorFlow op(s)", "select.tflite"),
             ("not supported by this interpreter", "select.tflite"),
             ("Unable to synchronously open file (file signature not found)", "damaged.keras")]
    for phrase, file in cases:
        assert phrase in text, f"the README no longer quotes {phrase!r}"
        name = f"{unique}_{Path(file).stem}"
        if name not in engine.registry:
            engine.register(name, d / file)   # reads fine: the failure comes at load
        with pytest.raises(ModelLoadError, match="failed to load on worker") as caught:
            engine.load(name)
        assert phrase in str(caught.value), (phrase, str(caught.value))
        state = next(r["state"] for r in engine.models() if r["name"] == name)
        assert "failed: " in state
    # At predict: data that does not fit, in the words the README quotes.
    engine.register(f"{unique}_fit", d / "mine.keras")
    with pytest.raises(NbtoolError) as caught:
        engine.predict(f"{unique}_fit", x[:, :5])
    phrase = "expects rows of shape (8,) (batch shape (None, 8)), got rows of shape (5,)"
    assert phrase in text and phrase in str(caught.value)


KINDS = "Models with several inputs, tables and text"


@pytest.fixture(scope="module")
def kinds_files(tmp_path_factory, keras):
    """The section's three models, saved as users save them, and their inputs."""
    import pandas as pd

    d = tmp_path_factory.mktemp("readme_kinds")
    rng = np.random.default_rng(5)
    keras.utils.set_random_seed(5)
    image, meta = keras.Input((6, 6, 3), name="image"), keras.Input((2,), name="meta")
    h = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(image), meta])
    keras.Model([image, meta], keras.layers.Dense(4, activation="softmax")(h)).save(
        d / "photo_meta.keras")
    cols = {c: keras.Input((1,), name=c) for c in ("age", "income", "plan")}
    t = keras.layers.Dense(6, activation="relu")(keras.layers.Concatenate()(list(cols.values())))
    keras.Model(cols, keras.layers.Dense(2, activation="softmax")(t)).save(d / "churn.keras")
    text = keras.Input((1,), dtype="string", name="review")
    vec = keras.layers.TextVectorization(max_tokens=30, output_sequence_length=4)
    vec.adapt(["a fine film", "dull and long", "fine acting"])
    e = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(30, 3)(vec(text)))
    keras.Model(text, keras.layers.Dense(2, activation="softmax")(e)).save(d / "sentiment.keras")
    customers = pd.DataFrame({"age": rng.uniform(20, 70, 25), "income": rng.normal(size=25),
                              "plan": rng.integers(0, 3, 25)},
                             index=pd.Index([f"c{i}" for i in range(25)], name="customer"))
    ns = {"images": rng.normal(size=(25, 6, 6, 3)).astype("float32"),
          "meta": rng.normal(size=(25, 2)).astype("float32"), "customers": customers}
    return d, ns


def test_several_inputs_tables_and_text_blocks_run_and_equal_keras(engine, kinds_files, keras,
                                                                    unique, monkeypatch):
    import tensorflow as tf

    d, inputs = kinds_files
    blocks = fenced_blocks(readme_section(KINDS), "python")
    assert len(blocks) == 3
    monkeypatch.chdir(d)
    load = {n: keras.saving.load_model(d / f"{n}.keras")
            for n in ("photo_meta", "churn", "sentiment")}
    ns = {"eng": engine, **inputs}
    exec(compile(prefixed_python(blocks[0], ["photo_meta"], unique), KINDS, "exec"), ns)
    want = load["photo_meta"].predict([inputs["images"], inputs["meta"]], verbose=0)
    np.testing.assert_allclose(ns["res"][f"{unique}_photo_meta"], want, atol=1e-5)
    exec(compile(prefixed_python(blocks[1], ["churn"], unique), KINDS, "exec"), ns)
    df = inputs["customers"]
    want = load["churn"].predict({c: df[[c]].to_numpy("float32") for c in df}, verbose=0)
    np.testing.assert_allclose(ns["res"][f"{unique}_churn"], want, atol=1e-5)
    table = ns["res"].to_pandas()
    assert table.index.name == "customer" and list(table.columns) == [
        f"{unique}_churn.class", f"{unique}_churn.probability"]
    exec(compile(prefixed_python(blocks[2], ["sentiment"], unique), KINDS, "exec"), ns)
    want = load["sentiment"].predict(tf.constant([["a fine film"], ["dull and long"]]),
                                     verbose=0)
    np.testing.assert_allclose(ns["res"][f"{unique}_sentiment"], want, atol=1e-5)
