"""Custom views whose browser-side code lives in the top-level ``widgets/`` folder.

The folder ships inside the wheel as ``nbtool/widgets``; in a source checkout it is read
from the repository. The views are anywidget ES modules: no build step.
"""

from __future__ import annotations

from pathlib import Path

import anywidget
import traitlets


def widgets_dir() -> Path:
    """Where the ES modules and CSS are: inside the installed package, else the checkout.

    Example:
        >>> (widgets_dir() / "memory_bars.js").exists()
        True
    """
    package = Path(__file__).resolve().parents[1]   # nbtool/dashboard -> nbtool
    here = package
    for candidate in (package / "widgets", package.parent / "widgets"):
        if (candidate / "memory_bars.js").exists():
            return candidate
    raise FileNotFoundError(f"nbtool's widget files are missing (looked in {here / 'widgets'} "
                            f"and {here.parent / 'widgets'}); reinstall nbtool.")


class MemoryBars(anywidget.AnyWidget):
    """The Devices view. One bar per worker: models resident vs. the budget, and the
    process's memory, with a sparkline of that memory over the last minutes and the
    worker's rows/s; then one bar per GPU (memory) with a sparkline of its utilisation.

    ``rows``: dicts with worker, device, used, budget, resident, models, and optionally
    history (memory samples, oldest first), rate (rows/s) and busy (share of the time
    spent predicting). ``gpus``: dicts with label, name, total, used, utilization and
    history (utilisation samples); ``None`` where a value is unknown, shown as "n/a".

    Example:
        >>> bars = MemoryBars(rows=[{"worker": "cpu0", "device": "cpu:0", "used": 8e8,
        ...                          "budget": 4e9, "resident": 1e8, "models": "cnn",
        ...                          "history": [7e8, 8e8], "rate": 1500.0, "busy": 0.4}])
        >>> bars.rows[0]["worker"], bars.gpus
        ('cpu0', [])
    """

    _esm = widgets_dir() / "memory_bars.js"
    _css = widgets_dir() / "memory_bars.css"
    rows = traitlets.List(traitlets.Dict()).tag(sync=True)
    gpus = traitlets.List(traitlets.Dict()).tag(sync=True)
