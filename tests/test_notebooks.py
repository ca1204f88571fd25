"""The notebooks run end to end in a real kernel (nbclient), and show what they promise."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

pytestmark = pytest.mark.slow


def run_notebook(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


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
        "x = np.random.default_rng(0).normal(size=(20000, 8)).astype('float32')",
        "%%infer bg --background --out later --chunk-size 100\nx",
        "handle = _\nran_meanwhile = 'later' not in globals() and sum(range(1000))",
        "import asyncio\nwhile not handle.done:\n    await asyncio.sleep(0.05)\n"
        "print('bound:', later is handle.result(), 'task:', handle.task is not None, "
        "'rows:', later['bg'].shape[0], 'meanwhile:', ran_meanwhile)",
        "%nbtool stop",
    )]
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = outputs_text(nb)
    assert "bound: True task: True rows: 20000 meanwhile: 499500" in text, text[-2000:]
    widgets = [o for c in nb.cells for o in c.get("outputs", [])
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets                                            # the live progress bars
