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
    here = Path(__file__).resolve().parent
    for candidate in (here / "widgets", here.parent / "widgets"):
        if (candidate / "memory_bars.js").exists():
            return candidate
    raise FileNotFoundError(f"nbtool's widget files are missing (looked in {here / 'widgets'} "
                            f"and {here.parent / 'widgets'}); reinstall nbtool.")


class MemoryBars(anywidget.AnyWidget):
    """One bar per worker: models resident vs. the budget, and the process's memory.

    Example:
        >>> bars = MemoryBars(rows=[{"worker": "cpu0", "device": "cpu:0", "used": 8e8,
        ...                          "budget": 4e9, "resident": 1e8, "models": "cnn"}])
        >>> bars.rows[0]["worker"]
        'cpu0'
    """

    _esm = widgets_dir() / "memory_bars.js"
    _css = widgets_dir() / "memory_bars.css"
    rows = traitlets.List(traitlets.Dict()).tag(sync=True)
