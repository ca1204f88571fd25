"""The dashboard's "Devices" section: per worker its memory now and over the last minutes
(a sparkline) and the rows/s it predicts; per GPU its utilisation and memory from NVML.

Rates come from the workers' cumulative counters (``WorkerStatus.throughput``):
the change between refreshes over the wall time between them. A worker that restarted
(a new pid) starts its counters again, so its rate starts again too.

Example:
    >>> from nbtool.wire import WorkerStatus
    >>> section = DeviceSection()
    >>> status = WorkerStatus("cpu0", "cpu:0", budget=4 * 10**9, pid=1, memory_in_use=8 * 10**8,
    ...                       resident_bytes=10**8, lru_order=["cnn"],
    ...                       throughput={"rows": 0, "busy_seconds": 0.0})
    >>> section.update({"cpu0": status}, now=0.0)
    >>> status.throughput = {"rows": 2000, "busy_seconds": 0.5}
    >>> section.update({"cpu0": status}, now=1.0)
    >>> row = section.bars.rows[0]
    >>> row["rate"], row["busy"], row["history"]
    (2000.0, 0.5, [800000000, 800000000])
    >>> section.close()
"""

from __future__ import annotations

import time

from nbtool.views._widgets import MemoryBars
from nbtool.views.gpu_monitor import GpuMonitor
from nbtool.views.sparklines import SampleWindow
from nbtool.wire import WorkerStatus

#: How far back the sparklines reach (seconds).
HISTORY_SECONDS = 300.0
#: Rates are averaged over about this many seconds (chunks finish in steps, not smoothly).
RATE_SECONDS = 5.0


class DeviceSection:
    """The widget (``bars``) and what it remembers between refreshes.

    Example:
        >>> section = DeviceSection()
        >>> section.update({}, now=0.0)
        >>> section.bars.rows
        []
        >>> section.close()
    """

    def __init__(self, history_seconds: float = HISTORY_SECONDS):
        self.bars = MemoryBars()
        self.samples = SampleWindow(history_seconds)
        self.gpus = GpuMonitor()
        self._pids: dict[str, int] = {}

    def update(self, statuses: dict[str, WorkerStatus], now: float | None = None) -> None:
        """Sample every worker's status (``engine.status()``) and every GPU, and redraw."""
        now = time.monotonic() if now is None else now
        rows = []
        for name, s in sorted(statuses.items()):
            if self._pids.get(name) != s.pid:   # restarted: its counters start at 0
                self._pids[name] = s.pid
                self.samples.forget(f"rows:{name}")
                self.samples.forget(f"busy:{name}")
            counters = s.throughput or {}
            self.samples.add(f"mem:{name}", int(s.memory_in_use or 0), now)
            if counters:
                self.samples.add(f"rows:{name}", counters["rows"], now)
                self.samples.add(f"busy:{name}", counters["busy_seconds"], now)
            rows.append({"worker": name, "device": s.device, "used": int(s.memory_in_use or 0),
                         "budget": int(s.budget), "resident": int(s.resident_bytes),
                         "models": ", ".join(s.lru_order),
                         "history": self.samples.series(f"mem:{name}"),
                         "rate": self.samples.rate(f"rows:{name}", RATE_SECONDS),
                         "busy": self.samples.rate(f"busy:{name}", RATE_SECONDS)})
        gpus = []
        for g in self.gpus.read():
            if g.utilization is not None:
                self.samples.add(f"gpu:{g.index}", g.utilization, now)
            gpus.append({"label": g.label, "name": g.name, "total": g.memory_total,
                         "used": g.memory_used, "utilization": g.utilization,
                         "history": self.samples.series(f"gpu:{g.index}")})
        with self.bars.hold_sync():
            self.bars.rows = rows
            self.bars.gpus = gpus

    def close(self) -> None:
        """Let go of NVML."""
        self.gpus.close()
