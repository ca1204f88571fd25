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
    for name in ("mlp_small", "mlp_wide", "cnn", "ensemble"):
        line = next(l for l in text.splitlines() if l.startswith(name) and "accuracy" in l)
        assert float(line.split()[-1]) > 0.8, line
    assert "Traceback" not in text
