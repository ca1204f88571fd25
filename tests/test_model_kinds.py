"""Models people really have: several inputs (list or dict), tables, text, named outputs.
Each kind equals Keras' own predict (the interpreter's, for a .tflite) through the API,
the magic's engine call, the result store and the output cache; bad input is refused
before anything runs, naming the model and its inputs, and leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

TOL = 1e-5
N = 90


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, keras):
    """The models, their files, inputs and Keras' answers."""
    import pandas as pd
    import tensorflow as tf

    d = tmp_path_factory.mktemp("kinds")
    rng = np.random.default_rng(7)
    keras.utils.set_random_seed(7)
    # An image model with a metadata input (a list of inputs) ...
    image, meta = keras.Input((4, 4, 1), name="image"), keras.Input((3,), name="meta")
    h = keras.layers.Concatenate()([keras.layers.Flatten()(image), meta])
    two = keras.Model([image, meta], keras.layers.Dense(3, activation="softmax")(h))
    two.save(d / "two.keras")
    # ... the same inputs as a dict, with named heads.
    image2, meta2 = keras.Input((4, 4, 1), name="image"), keras.Input((3,), name="meta")
    h2 = keras.layers.Concatenate()([keras.layers.Flatten()(image2), meta2])
    heads = keras.Model({"image": image2, "meta": meta2},
                        {"class": keras.layers.Dense(3, activation="softmax")(h2),
                         "box": keras.layers.Dense(4)(h2)})
    heads.save(d / "heads.keras")
    heads.export(str(d / "heads_savedmodel"), verbose=False)
    twin = keras.Model({"image": image2, "meta": meta2},
                       {"class": keras.layers.Dense(3, activation="softmax")(h2),
                        "box": keras.layers.Dense(4)(h2)})
    twin.save(d / "twin.keras")
    # A tabular model: three named feature columns.
    cols = {c: keras.Input((1,), name=c) for c in ("age", "income", "score")}
    t = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()(list(cols.values())))
    tab = keras.Model(cols, keras.layers.Dense(2, activation="softmax")(t))
    tab.save(d / "tab.keras")
    flat = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
    flat.save(d / "flat.keras")
    # A text classifier taking raw strings.
    text_in = keras.Input((1,), dtype="string", name="review")
    vec = keras.layers.TextVectorization(max_tokens=50, output_sequence_length=6)
    vec.adapt(["a good film", "a bad film", "so so", "great acting and a good plot"])
    e = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 4)(vec(text_in)))
    text = keras.Model(text_in, keras.layers.Dense(2, activation="softmax")(e))
    text.save(d / "text.keras")

    x_img = rng.normal(size=(N, 4, 4, 1)).astype("float32")
    x_meta = rng.normal(size=(N, 3)).astype("float32")
    df = pd.DataFrame({"age": rng.uniform(18, 90, N), "income": rng.normal(size=N),
                       "score": rng.integers(0, 10, N)}, index=[f"u{i}" for i in range(N)])
    reviews = [["a good film", "bad", "so so plot", "great acting"][i % 4] for i in range(N)]
    feats = {c: df[[c]].to_numpy("float32") for c in cols}
    out = {"dir": d, "img": x_img, "meta": x_meta, "df": df, "reviews": reviews,
           "two": two.predict([x_img, x_meta], verbose=0),
           "heads": heads.predict({"image": x_img, "meta": x_meta}, verbose=0),
           "twin": twin.predict({"image": x_img, "meta": x_meta}, verbose=0),
           "tab": tab.predict(feats, verbose=0),
           "flat": flat.predict(df.to_numpy("float32"), verbose=0),
           "text": text.predict(tf.constant([[r] for r in reviews]), verbose=0)}
    np.save(d / "img.npy", x_img)
    np.save(d / "meta.npy", x_meta)
    return out


@pytest.fixture
def models(engine, kinds, unique):
    """The kinds registered under this test's names: name -> registered name."""
    names = {}
    for kind in ("two", "heads", "twin", "tab", "flat", "text"):
        names[kind] = f"{unique}_{kind}"
        engine.register(names[kind], kinds["dir"] / f"{kind}.keras")
    return names


def close(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# -- several inputs --------------------------------------------------------------------
def test_register_reads_every_input_and_the_output_names(engine, models):
    spec = engine.catalog.specs([models["heads"]])[0]
    assert [(i.name, i.shape, i.dtype) for i in spec.inputs] == [
        ("image", (None, 4, 4, 1), "float32"), ("meta", (None, 3), "float32")]
    assert spec.output_names == ("box", "class")
    assert engine.catalog.specs([models["text"]])[0].inputs[0].dtype == "string"
    assert [i.name for i in engine.catalog.specs([models["two"]])[0].inputs] == ["image", "meta"]


def test_several_inputs_as_a_list_a_dict_and_files_equal_keras(engine, kinds, models):
    two = models["two"]
    res = engine.predict(two, [kinds["img"], kinds["meta"]], chunk_size=32)
    assert res.ok and close(res[two], kinds["two"]) <= TOL
    res = engine.predict(two, {"meta": kinds["meta"], "image": kinds["img"]}, chunk_size=50)
    assert close(res[two], kinds["two"]) <= TOL
    d = kinds["dir"]
    res = engine.predict(two, {"image": str(d / "img.npy"), "meta": str(d / "meta.npy")},
                         chunk_size=40)
    assert close(res[two], kinds["two"]) <= TOL
    np.savez(d / "both.npz", image=kinds["img"], meta=kinds["meta"])
    assert close(engine.predict(two, d / "both.npz")[two], kinds["two"]) <= TOL


def test_several_inputs_from_dask_arrays_and_a_zarr_group(engine, kinds, models, tmp_path):
    import dask.array as da
    import zarr

    two = models["two"]
    x = {"image": da.from_array(kinds["img"], chunks=25), "meta": da.from_array(kinds["meta"], chunks=25)}
    res = engine.predict(two, x)
    assert res.ok and close(res[two], kinds["two"]) <= TOL
    group = zarr.open_group(str(tmp_path / "inputs.zarr"), mode="w")
    group.create_array("image", data=kinds["img"], chunks=(30, 4, 4, 1))
    group.create_array("meta", data=kinds["meta"], chunks=(30, 3))
    res = engine.predict(two, tmp_path / "inputs.zarr", chunk_size=30)
    assert res.ok and close(res[two], kinds["two"]) <= TOL


def test_named_outputs_come_back_by_name_and_combine_per_name(engine, kinds, models):
    heads, twin = models["heads"], models["twin"]
    x = {"image": kinds["img"], "meta": kinds["meta"]}
    res = engine.predict([heads, twin], x, combine="mean", chunk_size=40)
    assert set(res[heads]) == {"box", "class"}
    for name in ("box", "class"):
        assert close(res[heads][name], kinds["heads"][name]) <= TOL
        assert close(res.combined[name],
                     (kinds["heads"][name] + kinds["twin"][name]) / 2) <= TOL
    assert "box (90, 4), class (90, 3)" in res._repr_html_()   # the inline report
    frame = res.to_pandas()
    assert f"{heads}.class.class" in frame and f"{heads}.box.output[3]" in frame


def test_combine_of_outputs_that_differ_is_refused_with_the_reason(engine, kinds, models):
    res = engine.predict([models["heads"], models["two"]],
                         {"image": kinds["img"], "meta": kinds["meta"]})
    assert res.combined is None
    assert any("outputs differ" in str(e) and "named ['box', 'class']" in str(e)
               for e in res.errors)
    assert close(res[models["two"]], kinds["two"]) <= TOL   # kept


def test_several_inputs_through_the_store_and_the_cache(engine, kinds, models, tmp_path):
    heads = models["heads"]
    x = {"image": kinds["img"], "meta": kinds["meta"]}
    res = engine.predict(heads, x, save=str(tmp_path / "p.zarr"), chunk_size=30)
    assert close(np.asarray(res[heads]["box"]), kinds["heads"]["box"]) <= TOL
    first = engine.predict(heads, x, cache=True, chunk_size=30)
    again = engine.predict(heads, x, cache=True, chunk_size=30)
    assert again.timings[heads]["cached_chunks"] == 3
    assert close(again[heads]["class"], kinds["heads"]["class"]) <= TOL
    assert close(first[heads]["box"], again[heads]["box"]) == 0


def test_a_savedmodel_signature_is_read_at_register_and_run_by_name(engine, kinds, unique):
    name = f"{unique}_sm"
    engine.register(name, kinds["dir"] / "heads_savedmodel", trusted=True)
    spec = engine.catalog.specs([name])[0]
    assert spec.input_names == ("image", "meta") and spec.output_names == ("box", "class")
    res = engine.predict(name, {"image": kinds["img"], "meta": kinds["meta"]})
    assert close(res[name]["box"], kinds["heads"]["box"]) <= TOL


def shm_files() -> set[str]:
    folder = Path(f"/dev/shm/nbtool-{os.getpid()}")
    return set(os.listdir(folder)) if folder.is_dir() else set()


@pytest.mark.parametrize("bad, said", [
    ("one array", "expects 2 inputs: 'image' (rows of (4, 4, 1), float32), 'meta' (rows of "
                  "(3,), float32), got one array of shape (90, 4, 4, 1)"),
    ("missing", "missing ['meta']"),
    ("extra", "the extra keys ['label']"),
    ("rows", "got inputs of different row counts: 'image' 90 rows, 'meta' 10 rows"),
    ("dtype", "input 'meta': float32 input, got complex64"),
    ("shape", "input 'meta': rows of shape (3,)"),
])
def test_bad_several_inputs_are_refused_naming_the_inputs(engine, kinds, models, tmp_path,
                                                          bad, said):
    from nbtool.errors import InputMismatch

    img, meta = kinds["img"], kinds["meta"]
    x = {"one array": img, "missing": {"image": img},
         "extra": {"image": img, "meta": meta, "label": meta},
         "rows": [img, meta[:10]], "dtype": [img, meta.astype("complex64")],
         "shape": {"image": img, "meta": meta[:, :2]}}[bad]
    before = shm_files()
    with pytest.raises(InputMismatch) as e:
        engine.predict(models["two"], x, save=str(tmp_path / "never.zarr"))
    assert said in str(e.value)
    assert shm_files() == before and not (tmp_path / "never.zarr").exists()


# -- tables ----------------------------------------------------------------------------
def test_a_dataframe_feeds_a_tabular_and_a_flat_model(engine, kinds, models):
    tab, flat = models["tab"], models["flat"]
    res = engine.predict([tab, flat], kinds["df"], combine=None)
    assert close(res[tab], kinds["tab"]) <= TOL and close(res[flat], kinds["flat"]) <= TOL
    frame = res.to_pandas()
    assert list(frame.index[:2]) == ["u0", "u1"]
    assert list(frame.columns) == [f"{tab}.class", f"{tab}.probability", f"{flat}.class",
                                   f"{flat}.probability"]
    assert (frame[f"{tab}.class"].to_numpy() == kinds["tab"].argmax(1)).all()
    assert np.allclose(frame[f"{tab}.probability"], kinds["tab"].max(1), atol=TOL)


def test_arrow_dask_and_parquet_tables_with_ids_and_columns(engine, kinds, models, tmp_path):
    import dask.dataframe as dd
    import pyarrow as pa

    tab = models["tab"]
    df = kinds["df"].rename(columns={"age": "Age"}).reset_index(names="user")
    res = engine.predict(tab, pa.Table.from_pandas(df, preserve_index=False),
                         columns={"age": "Age"}, ids="user")
    assert close(res[tab], kinds["tab"]) <= TOL
    assert res.to_pandas().index.name == "user" and res.to_pandas().index[5] == "u5"
    res = engine.predict(tab, dd.from_pandas(df, npartitions=3), columns={"age": "Age"},
                         ids="user")
    assert close(res[tab], kinds["tab"]) <= TOL and res.to_pandas().index[-1] == "u89"
    df.to_parquet(tmp_path / "rows.parquet")
    res = engine.predict(tab, tmp_path / "rows.parquet", columns={"age": "Age"}, ids="user")
    assert close(res[tab], kinds["tab"]) <= TOL


@pytest.mark.parametrize("bad, said", [
    ("missing", "none for ['age']"),
    ("extra", "the extra columns ['label']"),
    ("mixed", "column 'income' to hold one kind of value"),
])
def test_bad_tables_are_refused_naming_the_columns(engine, kinds, models, bad, said):
    from nbtool.errors import InputMismatch

    df = kinds["df"]
    x = {"missing": df.drop(columns="age"), "extra": df.assign(label=1),
         "mixed": df.assign(income=["n/a"] + list(df.income[1:]))}[bad]
    with pytest.raises(InputMismatch) as e:
        engine.predict(models["tab"], x)
    assert said in str(e.value)


# -- text ------------------------------------------------------------------------------
def test_raw_strings_feed_a_text_model_and_auto_keeps_tensorflow(engine, kinds, models):
    import pandas as pd

    text = models["text"]
    for x in (kinds["reviews"], np.array(kinds["reviews"], dtype=object),
              pd.DataFrame({"review": kinds["reviews"]})):
        res = engine.predict(text, x, chunk_size=40)
        assert res.ok and close(res[text], kinds["text"]) <= TOL
    row = next(r for r in engine.models() if r["name"] == text)
    assert row["runtime"].startswith("tensorflow")
    assert "text (strings)" in (row["runtime"].title or "")


def test_text_given_to_a_numeric_model_and_numbers_to_a_text_model(engine, kinds, models):
    from nbtool.errors import InputMismatch

    with pytest.raises(InputMismatch, match="text"):
        engine.predict(models["flat"], [["a", "b", "c"]])
    with pytest.raises(InputMismatch, match=r"expects text \(strings\), got numbers"):
        engine.predict(models["text"], np.zeros((4, 1), "float32"))


def test_a_keras_hub_text_classifier_takes_raw_strings(engine, keras, tmp_path, unique):
    keras_hub = pytest.importorskip("keras_hub")
    tf = pytest.importorskip("tensorflow")
    # A tiny BERT built from a config: random weights, a made-up vocabulary, no download.
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "was", "good", "bad"]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab)
    pre = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=8)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=len(vocab), num_layers=1,
                                             num_heads=1, hidden_dim=8, intermediate_dim=16,
                                             max_sequence_length=8)
    clf = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=pre,
                                              activation="softmax")
    clf.save(tmp_path / "bert.keras")   # the task itself, as keras_hub users save it
    model = keras.saving.load_model(tmp_path / "bert.keras")
    sentences = ["the film was good", "the film was bad", "good", "bad bad film"] * 5
    want = model.predict(tf.constant(sentences), verbose=0)   # its preprocessor, then it
    name = f"{unique}_bert"
    engine.register(name, tmp_path / "bert.keras")
    res = engine.predict(name, sentences, chunk_size=8)
    res.raise_for_errors()
    assert close(res[name], want) <= TOL


def named_heads_tflite(path: Path) -> Path:
    """A ``.tflite`` whose signature names its outputs (as basic-pitch's ``nmp.tflite``
    names ``contour``, ``note``, ``onset``), in an order unlike their names'."""
    import tensorflow as tf

    w = tf.constant(np.linspace(-1, 1, 12, dtype="float32").reshape(4, 3))

    class Heads(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32, name="audio")])
        def serve(self, x):
            return {"onset": tf.sigmoid(x @ w), "note": x * 2.0, "contour": tf.reduce_sum(x, 1,
                                                                                  keepdims=True)}

    module = Heads()
    conv = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module)
    path.write_bytes(conv.convert())
    return path


def test_a_tflite_gives_its_signature_output_names(engine, tmp_path, unique):
    from ai_edge_litert.interpreter import Interpreter

    path = named_heads_tflite(tmp_path / "heads.tflite")
    x = np.random.default_rng(3).normal(size=(50, 4)).astype("float32")
    runner = Interpreter(model_path=str(path)).get_signature_runner()
    want = {k: np.concatenate([runner(audio=x[i:i + 1])[k] for i in range(len(x))])
            for k in ("contour", "note", "onset")}
    name = f"{unique}_heads_tflite"
    engine.register(name, path)
    assert sorted(engine.catalog.specs([name])[0].output_names) == ["contour", "note", "onset"]
    res = engine.predict(name, x, chunk_size=16)
    assert set(res[name]) == {"contour", "note", "onset"}
    for k, v in want.items():
        assert close(res[name][k], v) == 0, k


def test_a_tflite_or_ir_of_several_inputs_is_refused_at_register(engine, tmp_path, unique):
    import tensorflow as tf

    from nbtool.errors import UnsupportedFormat

    class Two(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 2), tf.float32, name="a"),
                                      tf.TensorSpec((None, 3), tf.float32, name="b")])
        def serve(self, a, b):
            return tf.concat([a, b], 1)

    module = Two()
    conv = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module)
    (tmp_path / "two.tflite").write_bytes(conv.convert())
    with pytest.raises(UnsupportedFormat, match=r"takes 2 inputs \('(a|b)', '(a|b)'\).*Keras original"):
        engine.register(f"{unique}_two_tflite", tmp_path / "two.tflite")


def test_save_to_parquet_writes_a_dataset_that_resumes_and_reads_everywhere(
        engine, kinds, models, tmp_path):
    import dask.dataframe as dd
    import pandas as pd
    import pyarrow.parquet as pq

    import nbtool

    heads, tab = models["heads"], models["two"]
    x = {"image": kinds["img"], "meta": kinds["meta"]}
    path = tmp_path / "preds.parquet"
    res = engine.predict([heads, tab], x, save=str(path), chunk_size=30, combine=None)
    assert close(res[heads]["box"], kinds["heads"]["box"]) <= TOL
    assert sorted(p.name for p in (path / heads).iterdir()) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    frame = pd.read_parquet(path)
    assert len(frame) == N * 3 and set(frame.model) == {heads, tab}   # (box, class) + one
    box = frame[(frame.model == heads) & (frame.output == "box")].sort_values("row")
    assert close(np.stack(box["values"].to_list()), kinds["heads"]["box"]) <= TOL
    assert pq.read_table(path).num_rows == N * 3 and len(dd.read_parquet(path)) == N * 3
    (path / tab / "part-00001.parquet").unlink()   # a lost chunk: only it is computed again
    again = engine.predict([heads, tab], x, save=str(path), chunk_size=30, combine=None)
    assert again.timings[heads]["resumed_chunks"] == 3
    assert again.timings[tab]["resumed_chunks"] == 2
    assert close(again[tab], kinds["two"]) <= TOL
    back = nbtool.open_prediction(path)
    assert close(back[tab], kinds["two"]) <= TOL
    assert close(back[heads]["class"], kinds["heads"]["class"]) <= TOL   # by name again


def test_the_infer_magic_takes_inputs_by_name_and_a_table_with_ids(engine, kinds, models):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbtool")
    ip.user_ns.update(img=kinds["img"], meta=kinds["meta"],
                      table=kinds["df"].rename(columns={"age": "Age"}).reset_index(names="user"))
    two, tab = models["two"], models["tab"]
    res = ip.run_cell_magic("infer", f"{two} --out r1", "{'meta': meta, 'image': img}")
    assert close(res[two], kinds["two"]) <= TOL and ip.user_ns["r1"] is res
    res = ip.run_cell_magic("infer", f"{tab} --ids user --columns \"{{'age': 'Age'}}\"", "table")
    assert close(res[tab], kinds["tab"]) <= TOL
    assert res.to_pandas().index.name == "user"


@pytest.fixture(scope="module")
def basic_pitch(tmp_path_factory):
    """Spotify's basic-pitch model files as its PyPI wheel ships them (a .tflite and a
    SavedModel with named outputs ``contour``, ``note``, ``onset``): files nbtool did not
    write. Fetched with pip (--no-deps: only the 750 kB wheel); CI must be able to."""
    import subprocess
    import sys
    import zipfile

    d = tmp_path_factory.mktemp("basic_pitch")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "basic-pitch==0.4.0",
                          "--no-deps", "-d", str(d), "-q"], capture_output=True, text=True,
                         timeout=300)
    wheels = list(d.glob("basic_pitch-*.whl"))
    if got.returncode or not wheels:
        if os.environ.get("CI") == "true":   # CI installs from the index: it can fetch
            pytest.fail(f"pip could not fetch basic-pitch: {got.stderr[-500:]}")
        pytest.skip("basic-pitch's wheel cannot be fetched here (no package index)")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(d, [n for n in z.namelist() if "/icassp_2022/nmp" in n
                         and "mlpackage" not in n and not n.endswith(".onnx")])
    return d / "basic_pitch" / "saved_models" / "icassp_2022"


def test_third_party_tflite_gives_its_named_outputs_and_its_savedmodel_says_why_not(
        engine, basic_pitch, unique):
    from ai_edge_litert.interpreter import Interpreter

    x = np.random.default_rng(0).uniform(-0.5, 0.5, size=(3, 43844, 1)).astype("float32")
    runner = Interpreter(model_path=str(basic_pitch / "nmp.tflite")).get_signature_runner()
    lite = {k: np.concatenate([runner(input_2=x[i:i + 1])[k] for i in range(len(x))])
            for k in ("contour", "note", "onset")}
    t, s = f"{unique}_nmp_tflite", f"{unique}_nmp_sm"
    engine.register(t, basic_pitch / "nmp.tflite")
    res = engine.predict(t, x, chunk_size=2).raise_for_errors()
    assert set(res[t]) == {"contour", "note", "onset"}
    for k, v in lite.items():
        assert close(res[t][k], v) <= TOL, k
    # Its SavedModel: the signature is read at register (no TensorFlow in the kernel) ...
    spec = engine.register(s, basic_pitch / "nmp", trusted=True)
    assert spec.input_names == ("input_2",) and spec.output_names == ("contour", "note", "onset")
    # ... but this TensorFlow cannot load it (Keras 2 optimizer slots): said, with the fix.
    res = engine.predict(s, x[:1])
    assert not res.ok and "another TensorFlow version" in str(res.errors[0])
