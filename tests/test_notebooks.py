"""The notebooks run end to end in a real kernel (nbclient), and show what they promise."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from notebook_output import assert_quiet

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

pytestmark = pytest.mark.slow


def execute(nb, path) -> None:
    """Run ``nb`` in a fresh kernel in folder ``path``. A run far slower than its cells
    says where the time went (as a warning in the summary: slowness is not a failure).

    Twice in CI a test here took 300 s more than its cells (the kernel's own timestamps)
    and still passed: this finds out whether kernel start, a cell's reply or the shutdown.
    """
    import time
    import warnings

    marks = [("start", time.monotonic())]

    def mark(what):
        return lambda **kw: marks.append((what + str(kw.get("cell_index", "")),
                                          time.monotonic()))

    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path)}},
                   on_notebook_start=mark("kernel ready"), on_cell_start=mark("cell "),
                   on_cell_executed=mark("done "),
                   on_notebook_complete=mark("kernel shut down")).execute()
    marks.append(("end", time.monotonic()))
    steps = [(b[0], round(b[1] - a[1], 1)) for a, b in zip(marks, marks[1:])]
    if marks[-1][1] - marks[0][1] > 120:
        warnings.warn(f"a notebook took {marks[-1][1] - marks[0][1]:.0f}s; steps: {steps}")


def run_notebook(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    execute(nb, NOTEBOOKS)
    # Quiet on a CPU machine: no TensorFlow start-up lines, no Dask restart warnings.
    assert_quiet(nb, name)
    return nb


def cell_seconds(nb) -> list[tuple[str, float]]:
    """How long each cell ran (from nbclient's timing record): what a failure shows."""
    from datetime import datetime

    out = []
    for c in nb.cells:
        t = c.get("metadata", {}).get("execution", {})
        a, b = t.get("iopub.execute_input"), t.get("shell.execute_reply")
        if a and b:
            seconds = (datetime.fromisoformat(b.replace("Z", "+00:00"))
                       - datetime.fromisoformat(a.replace("Z", "+00:00"))).total_seconds()
            out.append((c.source.splitlines()[0][:40], round(seconds, 2)))
    return out


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            data = out.get("data", {})
            parts += [data.get("text/html", ""), data.get("text/plain", "")]
    return "\n".join(parts)


def test_quickstart_trains_registers_predicts_and_reports_accuracy():
    nb = run_notebook("quickstart.ipynb")
    text = outputs_text(nb)
    assert "nbtool-prediction" in text and "<table" in text      # the inline result table
    assert "<svg" in text and "predicted classes" in text        # and its charts
    assert "confusion (ensemble)" in text and "data:image/png" in text
    assert "same as %%infer: True" in text
    for name in ("mlp_small", "mlp_wide", "cnn", "ensemble"):
        line = next(l for l in text.splitlines() if l.startswith(name) and "accuracy" in l)
        assert float(line.split()[-1]) > 0.8, line
    assert "Traceback" not in text


def test_background_infer_in_a_real_kernel_binds_while_the_kernel_stays_free(tmp_path,
                                                                             model_dir):
    """--background in ipykernel: the watcher is a task on the kernel's event loop."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in (
        "import numpy as np\n%load_ext nbtool\n%nbtool start --workers 1 --gpus none",
        f"%nbtool register bg {model_dir / 'mlp.keras'}",
        # The input waits for a flag that only the next cell sets, so that cell runs
        # while the prediction is still going (a timing race failed on a slower machine).
        "import os, time, dask, dask.array as da\nflag = os.path.abspath('go')\n"
        "def rows_once_flagged(n):\n    while not os.path.exists(flag):\n"
        "        time.sleep(0.02)\n"
        "    return np.random.default_rng(0).normal(size=(n, 8)).astype('float32')\n"
        "x = da.from_delayed(dask.delayed(rows_once_flagged)(100000), (100000, 8), 'float32')",
        "%%infer bg --background --out later --chunk-size 1000\nx",
        "handle = _\nran_meanwhile = ('later' not in globals() and not handle.done\n"
        "                 and sum(range(1000)))\nopen(flag, 'w').close()",
        "import asyncio\nwhile not handle.done:\n    await asyncio.sleep(0.05)\n"
        "print('bound:', later is handle.result(), 'task:', handle.task is not None, "
        "'rows:', later['bg'].shape[0], 'meanwhile:', ran_meanwhile)",
        "%nbtool stop",
    )]
    execute(nb, tmp_path)
    text = outputs_text(nb)
    assert "bound: True task: True rows: 100000 meanwhile: 499500" in text, (
        text[-2000:], cell_seconds(nb))
    assert_quiet(nb, "the --background notebook")
    widgets = [o for c in nb.cells for o in c.get("outputs", [])
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets                                            # the live progress bars


# Every teaching notebook runs; optimization.ipynb has its own test (tests/test_optimize.py).
OWN_TESTS = {"optimization.ipynb"}


def test_every_notebook_has_a_test_here():
    tested = {"quickstart.ipynb", "ensembles.ipynb", "memory.ipynb", "multi_gpu.ipynb",
              "large_data.ipynb", "tables_and_text.ipynb"}
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} - OWN_TESTS == tested


def printed(nb) -> str:
    """Only what the cells printed or returned (no stderr: worker logs land there)."""
    return "\n".join(o.get("text", "") if o.get("name") != "stderr" else ""
                     for c in nb.cells for o in c.get("outputs", []) if
                     o["output_type"] == "stream") + "\n" + "\n".join(
        o["data"].get("text/plain", "") for c in nb.cells for o in c.get("outputs", [])
        if o["output_type"] in ("execute_result", "display_data"))


def line_with(text: str, start: str) -> str:
    return next(l for l in text.splitlines() if l.startswith(start))


def test_ensembles_mean_vote_best_per_metric_and_agreement():
    nb = run_notebook("ensembles.ipynb")
    text = printed(nb)
    accuracy = {n: float(line_with(text, f"{n} ").split()[-1])
                for n in ("mlp_tiny", "mlp_wide", "cnn", "mean", "vote")}
    assert accuracy["mean"] > 0.85 and accuracy["vote"] > 0.85, accuracy
    best = {m: line_with(text, f"best by {m}:").split()[-1]
            for m in ("accuracy", "log loss", "rows/s")}
    assert best["accuracy"] == max(("mlp_tiny", "mlp_wide", "cnn"), key=accuracy.get)
    assert set(best.values()) <= {"mlp_tiny", "mlp_wide", "cnn"}
    share = float(line_with(text, "cnn vs mlp_tiny:").split("same class on ")[1].split("%")[0])
    assert 0 < share <= 100
    assert "nbtool-prediction" in outputs_text(nb)                  # the inline report
    assert "Traceback" not in text


def test_memory_on_demand_budget_eviction_soft_and_hard_unload():
    text = printed(run_notebook("memory.ipynb"))
    assert "second call loaded: 0.00s" in text
    assert "{'a': 'cpu0: evicted', 'b': 'cpu0: loaded', 'c': 'cpu0: loaded'}" in text
    assert "resident now: b, c" in text
    pids = {k: int(line_with(text, f"{k}:").split("pid ")[1].split(",")[0])
            for k in ("loaded", "soft unload", "hard unload")}
    assert pids["loaded"] == pids["soft unload"] != pids["hard unload"]   # a new process
    scale = {"B": 1e-6, "kB": 1e-3, "MB": 1.0, "GB": 1e3, "TB": 1e6}   # human_bytes' units
    mb = {k: float(value) * scale[unit] for k in ("loaded", "soft unload", "hard unload")
          for value, unit in [line_with(text, f"{k}:").split("memory ")[1].split()[:2]]}
    assert mb["hard unload"] < mb["soft unload"] - 20     # the models' memory came back


def test_multi_gpu_pins_one_fake_gpu_per_worker_and_places_models():
    text = printed(run_notebook("multi_gpu.ipynb"))
    assert "('gpu:0', 'fake', 16000000000), ('gpu:1', 'fake', 16000000000)" in text
    seen = sorted(l.split("'CUDA_VISIBLE_DEVICES': '")[1][0] for l in text.splitlines()
                  if "'CUDA_VISIBLE_DEVICES'" in l)
    assert seen == ["0", "1"]
    assert "big     ran on ['gpu0']" in text
    assert "pinned  ran on ['gpu1']" in text
    assert "wide    ran on ['gpu0', 'gpu1']" in text


def test_large_data_npy_zarr_store_interrupted_and_resumed():
    text = printed(run_notebook("large_data.ipynb"))
    acc = line_with(text, "rows: 10800 accuracy:")
    assert float(acc.split("'ensemble': ")[1].rstrip("}")) > 0.85, acc
    assert "same as from .npy: True" in text
    assert "same result as without interruption: True" in text
    stored = line_with(text, "stored before the interruption:")
    for m in ("mlp", "cnn"):
        resumed, computed = (int(v) for v in line_with(text, f"{m}: ").split()[1:7:5])
        assert resumed + computed == 108 and resumed >= 1 and computed >= 1, stored
    assert "Array (10800, 10)" in text


def test_a_failed_chunk_is_one_line_and_background_output_stays_in_its_own_cell(tmp_path,
                                                                               model_dir):
    """Before: each failed chunk printed a worker log line in red under whatever cell ran,
    and a background run's outcome landed under the cell running when it finished. Now the
    failure is one line in the result's report, and the background run's result is in the
    output area it placed in its own cell; no cell shows stderr."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in (
        "import numpy as np\n%load_ext nbtool\n%nbtool start --workers 1 --gpus none",
        f"%nbtool register chk {model_dir / 'checked.keras'} --trusted\n"
        f"%nbtool register good {model_dir / 'mlp.keras'}",
        "x = np.random.default_rng(0).normal(size=(40, 8)).astype('float32')\nx[15] = np.nan\n"
        "big = np.random.default_rng(1).normal(size=(20000, 8)).astype('float32')",
        "%%infer chk good --chunk-size 10 --combine none --out r\nx",
        "%%infer good --background --out later --chunk-size 100\nbig",
        "handle = _\nimport asyncio\nwhile not handle.done:\n    await asyncio.sleep(0.05)\n"
        "print('finished:', later['good'].shape)",
        "print([o['data']['text/plain'].splitlines()[0] for o in handle.output.outputs\n"
        "       if o['data']['text/plain'].startswith('<Prediction')])",
        "%nbtool stop",
    )]
    execute(nb, tmp_path)
    assert_quiet(nb, "the failing-chunk notebook")
    report = "".join(o.get("data", {}).get("text/html", "") for o in nb.cells[3].outputs)
    assert report.count("<li>") == 1 and "chunk 1 (rows 10:20)" in report, report[-1500:]
    waited = [o for o in nb.cells[5].outputs]
    assert [o.get("text") for o in waited] == ["finished: (20000, 3)\n"], waited
    # The run's output area sits in its own cell, and holds its result (read in the kernel).
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) and
               o["data"]["text/plain"] == "Output()" for o in nb.cells[4].outputs)
    held = nb.cells[6].outputs[0]["text"]
    assert held.startswith("[\"<Prediction: 1 model(s) x 20000 rows, combine='mean', "
                           "0 error(s)"), held


def end_engines(folder) -> None:
    """Kill what persistent engines a test left in its runtime folder (their process groups)."""
    import json
    import os
    import signal

    for f in Path(folder).glob("*.json"):
        if f.name.endswith(".ended.json"):
            continue
        try:
            os.killpg(json.loads(f.read_text())["pid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass


def test_a_persistent_engine_survives_kernel_restart_in_a_real_kernel(tmp_path, model_dir,
                                                                       monkeypatch):
    """Kernel > Restart kills the kernel's process group; a persistent engine runs in its
    own, so after `%nbtool attach` the model is still loaded (no second load) and gives the
    same outputs."""
    from jupyter_core.utils import run_sync

    runtime = tmp_path / "runtime"
    monkeypatch.setenv("NBTOOL_RUNTIME_DIR", str(runtime))   # the kernels inherit it
    make_x = "import numpy as np, os\nx = np.random.default_rng(0).normal(size=(500, 8))" \
             ".astype('float32')"
    before = ["%load_ext nbtool\n%nbtool start --persist --workers 1 --gpus none",
              f"%nbtool register m {model_dir / 'mlp.keras'}",
              make_x, "%%infer m --out first\nx",
              "np.save('first.npy', first['m']); print('pid', os.getpid())"]
    after = ["%load_ext nbtool\n%nbtool attach", make_x, "%%infer m --out again\nx",
             "print('same:', np.array_equal(again['m'], np.load('first.npy')), 'loads:', "
             "eng.status()['cpu0'].state_of('m').loads, 'pid', os.getpid())",
             "%nbtool stop --shutdown"]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in before + after]
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        with client.setup_kernel():
            for i in range(len(before)):
                client.execute_cell(nb.cells[i], i)
            # What Kernel > Restart does: SIGKILL to the kernel's process group.
            run_sync(client.km.restart_kernel)(now=True)
            run_sync(client.kc.wait_for_ready)(timeout=60)
            for i in range(len(before), len(nb.cells)):
                client.execute_cell(nb.cells[i], i)
    finally:
        end_engines(runtime)
    text = outputs_text(nb)
    models = "".join(o.get("data", {}).get("text/plain", "")
                     for o in nb.cells[len(before)].outputs)
    assert "m " in models and "cpu0: loaded" in models, models
    pids = [line.split()[-1] for line in text.splitlines() if "pid" in line]
    assert len(set(pids)) == 2, text                 # really another kernel process
    assert "same: True loads: 1" in text, text       # loaded once, before the restart
    assert "ended at" in text and "shut down by nbtool.shutdown()" in text, text
    assert not list(runtime.glob("default.json"))
    assert_quiet(nb, "the kernel-restart notebook")


def test_tables_and_text_runs_both_models_from_one_dataframe():
    nb = run_notebook("tables_and_text.ipynb")
    text = printed(nb)
    for name in ("churn", "sentiment"):
        assert float(line_with(text, f"{name} accuracy").split()[-1]) > 0.8, text
    assert "rows labelled by customer: True" in text
    assert "sentiment of two reviews: [0, 1]" in text
    assert float(line_with(text, "churn: max abs diff against Keras").split()[-1]) <= 1e-5
    assert "('review', (None, 1), 'string')" in text
    assert "nbtool-prediction" in outputs_text(nb)                  # the inline report
    assert "Traceback" not in text
