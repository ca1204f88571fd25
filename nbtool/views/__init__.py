"""The live views in the notebook: the dashboard panel (``panel``: devices, memory,
models, runs; load, unload and run buttons), its sections (``devices``, ``runs``), the
sparkline windows (``sparklines``), the GPU monitor (``gpu_monitor``), the custom widgets
(``_widgets``), and the progress bars (``progress``) and background runs
(``background``) the magics share. It is handed an engine; it never imports one.

Example:
    >>> from nbtool.views import Dashboard
    >>> Dashboard.__name__
    'Dashboard'
"""

from __future__ import annotations

from nbtool.views.background import BackgroundRun
from nbtool.views.panel import Dashboard
from nbtool.views.progress import progress_view, wait_with_progress

__all__ = ["BackgroundRun", "Dashboard", "progress_view", "wait_with_progress"]
