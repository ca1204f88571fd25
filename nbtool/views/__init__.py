"""The live views in the notebook: the dashboard panel (``panel``: devices, memory,
models, runs; load, unload and run buttons), its sections (``devices``, ``runs``), the
sparkline windows (``sparklines``), the GPU monitor (``gpu_monitor``), the custom widgets
(``_widgets``), and the progress bars (``progress``) and background runs
(``background``) the magics share. It is handed an engine; it never imports one. ``Dashboard`` loads when first asked for
(the panel's widgets are not imported for a progress bar).

Example:
    >>> from nbtool.views import Dashboard
    >>> Dashboard.__name__
    'Dashboard'
"""

from __future__ import annotations

from nbtool.views.background import BackgroundRun
from nbtool.views.progress import progress_view, wait_with_progress


def __getattr__(name: str):
    # The panel (ipywidgets, anywidget, the widgets' files) loads when a dashboard opens,
    # not when a magic shows a progress bar.
    if name == "Dashboard":
        from nbtool.views.panel import Dashboard

        return Dashboard
    raise AttributeError(f"module 'nbtool.views' has no attribute {name!r}")

__all__ = ["BackgroundRun", "Dashboard", "progress_view", "wait_with_progress"]
