"""%nbtool and %%infer in a real in-process IPython shell, on the session's real cluster."""

import importlib.util

import numpy as np
import pytest
from IPython.core.error import UsageError

import nbtool
from nbtool.engine.session import current_engine, set_default_engine


@pytest.fixture(scope="session")
def ip(engine):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbtool")
    return shell


@pytest.fixture
def models(ip, engine, model_dir, reference, unique):
    """Two registered models (through the magic) and the inputs in the user namespace."""
    a, b = f"{unique}_a", f"{unique}_b"
    ip.run_line_magic("nbtool", f"register {a} {model_dir / 'mlp.keras'}")
    ip.run_line_magic("nbtool", f"register {b} {model_dir / 'mlp2.keras'} --device cpu "
                                "--replicas 2 --batch-size 16")
    ip.user_ns.update(x8=reference["x8"], img=reference["img"],
                      y8=np.argmax(reference["mlp"], axis=1))
    return a, b


def test_help_lists_every_subcommand_and_flag(ip, capsys):
    doc = ip.find_line_magic("nbtool").__doc__
    for sub in ("start", "register", "register-dir", "models", "devices", "load", "unload",
                "stop"):
        assert f"%nbtool {sub}" in doc
    assert "--memory-budget" in doc and "--trusted" in doc and "--hard" in doc
    infer_doc = ip.find_cell_magic("infer").__doc__
    for flag in ("--chunk-size", "--combine", "--labels", "--out", "--save", "--background"):
        assert flag in infer_doc
    ip.run_line_magic("nbtool", "register --help")
    assert "--batch-size" in capsys.readouterr().out


def test_register_load_models_devices_unload(ip, engine, models):
    a, b = models
    assert engine.registry.get(b).batch_size == 16 and len(engine.placement[b]) == 2
    table = ip.run_line_magic("nbtool", f"load {a} {b}")
    row = next(r for r in table if r["name"] == b)
    assert row["state"].count("loaded") == 2
    devices = ip.run_line_magic("nbtool", "devices")
    assert {r["worker"] for r in devices} == {"cpu0", "cpu1"}
    assert any(a in r["models"] for r in ip.run_line_magic("nbtool", "devices"))
    ip.run_line_magic("nbtool", f"unload {a}")
    st = engine.status()
    assert all(a not in s.lru_order for s in st.values())
    # registered with the defaults: it may run on both workers, and the table says so
    assert sorted(engine.placement[a]) == ["cpu0", "cpu1"]
    shown = next(r for r in ip.run_line_magic("nbtool", "models") if r["name"] == a)
    assert shown["device"] == "auto: " + ", ".join(engine.placement[a])
    home = engine.placement[a][0]
    ip.run_line_magic("nbtool", f"load {a}")
    pid = engine.status()[home].pid
    ip.run_line_magic("nbtool", f"unload {a} --hard")
    assert engine.status()[home].pid != pid


def test_register_dir(ip, engine, tmp_path, model_dir):
    folder = tmp_path / "zoo"
    folder.mkdir()
    (folder / "zoo_mlp.keras").write_bytes((model_dir / "mlp.keras").read_bytes())
    (folder / "zoo_cnn.keras").write_bytes((model_dir / "cnn.keras").read_bytes())
    table = ip.run_line_magic("nbtool", f"register-dir {folder} --replicas 2")
    assert {"zoo_mlp", "zoo_cnn"} <= {r["name"] for r in table}
    assert len(engine.placement["zoo_cnn"]) == 2


def test_infer_equals_the_python_api_and_binds_out(ip, engine, models, reference):
    a, b = models
    res = ip.run_cell_magic("infer", f"{a} {b} --chunk-size 7 --out preds", "x = x8\nx")
    assert ip.user_ns["preds"] is res
    direct = engine.predict([a, b], reference["x8"], chunk_size=7)
    for m in (a, b):
        assert np.array_equal(res[m], direct[m])
    assert np.array_equal(res.combined, direct.combined)
    assert np.abs(res[a] - reference["mlp"]).max() <= 1e-5


def test_infer_result_is_returned_so_underscore_works(ip, models):
    import builtins

    # Plain Python's displayhook (run by the doctests) leaves a builtins._ behind, and
    # IPython then leaves `_` alone; a notebook kernel has none.
    builtins.__dict__.pop("_", None)
    a, _ = models
    out = ip.run_cell(f"%%infer {a} --combine none\nx8", store_history=True)
    assert out.success and ip.user_ns["_"] is out.result
    assert out.result.combined is None


def test_infer_combine_labels_save(ip, models, reference, tmp_path):
    a, b = models
    path = tmp_path / "p.npz"
    res = ip.run_cell_magic("infer", f"{a} {b} --combine vote --labels y8 --save {path}", "x8")
    assert res.combined.dtype.kind == "i" and res.labels is not None
    acc = res.evaluate(ip.user_ns["y8"])
    assert acc[a] == 1.0 and 0 <= acc["ensemble"] <= 1
    assert "accuracy" in res._repr_html_() and "confusion" in res._repr_html_()
    assert np.array_equal(np.load(path)[a], res[a])


def test_config_sets_the_default_chunk_size(ip, models):
    a, _ = models
    ip.run_line_magic("config", "Nbtool.chunk_size = 13")
    try:
        res = ip.run_cell_magic("infer", a, "x8")
        assert res.chunk_size == 13 and res.timings[a]["chunks"] == 5
    finally:
        ip.run_line_magic("config", "Nbtool.chunk_size = None")


def test_background_returns_at_once_and_binds_when_done(ip, models, reference):
    a, _ = models
    bg = ip.run_cell_magic("infer", f"{a} --background --out later --chunk-size 5", "x8")
    assert "background" in repr(bg)
    res = bg.result(timeout=120)
    assert ip.user_ns["later"] is res and bg.done
    assert np.abs(res[a] - reference["mlp"]).max() <= 1e-5


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_tab_completion_offers_model_names_and_subcommands(ip, models):
    a, b = models
    prefix = a.split("_")[0]
    _, matches = ip.complete("", f"%nbtool load {prefix}", len(f"%nbtool load {prefix}"))
    assert {a, b} <= set(matches)
    _, matches = ip.complete("", f"%%infer {prefix}", len(f"%%infer {prefix}"))
    assert {a, b} <= set(matches)
    _, matches = ip.complete("", "%nbtool reg", len("%nbtool reg"))
    assert {"register", "register-dir"} <= set(matches)


def test_mistakes_give_clear_messages_and_leave_the_engine_usable(ip, engine, models,
                                                                  reference):
    a, _ = models
    with pytest.raises(UsageError, match="unrecognized arguments: --chunks"):
        ip.run_cell_magic("infer", f"{a} --chunks 5", "x8")
    with pytest.raises(UsageError, match="Did you mean 'register'"):
        ip.run_line_magic("nbtool", "regster x y")
    with pytest.raises(UsageError, match="expected 'tensorflow', 'jax' or 'torch'.*--backend jax"):
        ip.run_line_magic("nbtool", "start --backend theano")   # the running engine stays
    with pytest.raises(UsageError, match=f"did you mean '{a}'.*%nbtool register"):
        ip.run_cell_magic("infer", a + "x", "x8")
    with pytest.raises(UsageError, match=r"InputMismatch: .*rows of shape \(8,\).*\(8, 8, 1\)"):
        ip.run_cell_magic("infer", a, "img")
    with pytest.raises(UsageError, match="must end with an expression"):
        ip.run_cell_magic("infer", a, "x = x8")
    with pytest.raises(UsageError, match="ModelFileError.*does not exist"):
        ip.run_line_magic("nbtool", "register ghost /no/such/file.keras")
    out = ip.run_cell(f"%%infer {a}\nraise ValueError('the body failed')\nx8")
    assert isinstance(out.error_in_exec, ValueError)
    res = ip.run_cell_magic("infer", a, "x8")                 # still works
    assert np.abs(res[a] - reference["mlp"]).max() <= 1e-5


@pytest.mark.slow
def test_start_and_stop_through_magics(ip, model_dir, reference):
    session_engine = current_engine()
    ip.user_ns["x8"] = reference["x8"]
    try:
        eng = ip.run_line_magic("nbtool", "start --workers 1 --memory-budget 300MB --gpus none")
        assert nbtool.default_engine() is eng and list(eng.workers) == ["cpu0"]
        assert eng.workers["cpu0"].budget == 300_000_000
        # Re-run: replaces it; here on another Keras backend where one is installed.
        backend = "torch" if importlib.util.find_spec("torch") else "tensorflow"
        again = ip.run_line_magic("nbtool", f"start --workers 1 --gpus none --backend {backend}")
        assert again is not eng and eng.client.status == "closed"
        assert again.workers["cpu0"].backend == backend
        ip.run_line_magic("nbtool", f"register solo {model_dir / 'mlp.keras'}")
        res = ip.run_cell_magic("infer", "solo", "x8")
        assert np.abs(res["solo"] - reference["mlp"]).max() <= 1e-5
        ip.run_line_magic("nbtool", "stop")
        assert again.client.status == "closed"
    finally:
        set_default_engine(session_engine)


@pytest.mark.slow
def test_start_with_an_address_joins_an_existing_cluster(ip, model_dir, reference):
    from distributed import LocalCluster

    session_engine = current_engine()
    ip.user_ns["x8"] = reference["x8"]
    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        try:
            eng = ip.run_line_magic("nbtool", f"start --address {cluster.scheduler_address} "
                                              "--memory-budget 200MB")
            assert eng.cluster is None and len(eng.workers) == 1
            ip.run_line_magic("nbtool", f"register far {model_dir / 'mlp.keras'}")
            res = ip.run_cell_magic("infer", "far --chunk-size 20", "x8")
            assert np.abs(res["far"] - reference["mlp"]).max() <= 1e-5
            ip.run_line_magic("nbtool", "stop")
        finally:
            set_default_engine(session_engine)
        assert cluster.status.name == "running"


@pytest.mark.parametrize("bad", ["1bad", "class", "a.b", "__builtins__"])
def test_out_that_is_not_a_plain_variable_is_refused_before_the_run(ip, models, bad):
    a, _ = models
    builtins_before = ip.user_ns["__builtins__"]
    with pytest.raises(UsageError, match=r"--out .*(identifier|keyword|dunder).*--out preds"):
        ip.run_cell_magic("infer", f"{a} --out {bad}", "x8")
    with pytest.raises(UsageError, match=r"--out .*Fix: pass a plain variable name"):
        ip.run_line_magic("nbtool", f"optimize {a} --variants float16 --out {bad}")
    assert ip.user_ns["__builtins__"] is builtins_before
    assert ip.run_cell("print('the namespace still works')").success


def test_chunk_size_zero_or_negative_is_refused_not_replaced_by_the_default(ip, models):
    a, _ = models
    for bad in ("0", "-3", "ten"):
        with pytest.raises(UsageError, match=rf"--chunk-size: expected a whole number >= 1, "
                                             rf"got '{bad}'"):
            ip.run_cell_magic("infer", f"{a} --chunk-size {bad}", "x8")


def test_start_with_zero_workers_or_a_bad_budget_is_refused_and_the_engine_kept(ip, engine):
    for line, msg in (("start --workers 0 --gpus none", r"--workers: expected a whole number"),
                      ("start --memory-budget lots --gpus none",
                       r"--memory-budget lots .*expected a positive size like 4GB"),
                      # A ValueError from nbtool itself: a UsageError, not a traceback.
                      ("start --gpus 7", r"asks for GPU\(s\) \[7\].*Fix:"),
                      ("start --gpus x", r"--gpus: expected 'auto', 'none' or GPU indices")):
        with pytest.raises(UsageError, match=msg):
            ip.run_line_magic("nbtool", line)
    assert current_engine() is engine and engine.client.status == "running"


def test_quotes_group_words_and_a_bad_quote_or_name_is_a_usage_error(ip, engine, models,
                                                                      model_dir, reference,
                                                                      tmp_path, unique):
    spaced = tmp_path / "my models" / "mlp copy.keras"
    spaced.parent.mkdir()
    spaced.write_bytes((model_dir / "mlp.keras").read_bytes())
    name = f"{unique}_spaced"
    # IPython's own split kept the quotes ('"…/mlp copy.keras"'): the file was not found.
    ip.run_line_magic("nbtool", f'register {name} "{spaced}" --replicas 1')
    res = ip.run_cell_magic("infer", f"{name} --out 'quoted'", "x8")
    assert ip.user_ns["quoted"] is res
    assert np.abs(res[name] - reference["mlp"]).max() <= 1e-5
    with pytest.raises(UsageError, match=r"no closing quotation.*Fix: close the quote"):
        ip.run_line_magic("nbtool", f'register m "{spaced}')
    with pytest.raises(UsageError, match=r"%%infer .*no closing quotation"):
        ip.run_cell_magic("infer", f"{name} --out 'x", "x8")
    # A quoted name with a space reaches register whole, and is refused there, clearly.
    with pytest.raises(UsageError, match=r"model name 'my model'.*Fix:"):
        ip.run_line_magic("nbtool", f'register "my model" "{spaced}"')


def test_infer_with_a_failed_model_combines_only_when_asked(ip, failing_pair):
    import numpy as np

    chk, good = failing_pair
    x = np.zeros((40, 8), "float32")
    x[5] = np.nan                                       # the first chunk of chk fails
    ip.user_ns["xbad"] = x
    res = ip.run_cell_magic("infer", f"{chk} {good} --chunk-size 10", "xbad")
    assert res.combined is None and "failed on 1 of 4 chunks" in res.combined_note
    part = ip.run_cell_magic("infer", f"{chk} {good} --chunk-size 10 --partial-combine", "xbad")
    assert part.combined is not None and part.combined_note.startswith("combined is partial")
