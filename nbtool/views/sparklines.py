"""The last few minutes of a few numbers, sampled on each dashboard refresh: the points of a
sparkline, and rates (rows/s) from cumulative counters.

Example:
    >>> recent = SampleWindow(seconds=300)
    >>> for t, rows in [(0, 0), (1, 500), (2, 1500)]:
    ...     recent.add("rows:cpu0", rows, t)
    >>> recent.rate("rows:cpu0", span=5)
    750.0
    >>> recent.series("rows:cpu0")
    [0, 500, 1500]
"""

from __future__ import annotations

import collections
import time


class SampleWindow:
    """Timestamped samples per key, kept for ``seconds`` (older ones are dropped).

    Example:
        >>> recent = SampleWindow(seconds=60)
        >>> recent.add("mem:cpu0", 10, t=0); recent.add("mem:cpu0", 20, t=100)
        >>> recent.series("mem:cpu0")      # the first is more than 60 s older than the last
        [20]
    """

    def __init__(self, seconds: float = 300.0):
        self.seconds = seconds
        self._samples: dict[str, collections.deque] = {}

    def add(self, key: str, value: float, t: float | None = None) -> None:
        """Record ``value`` for ``key`` at time ``t`` (now by default)."""
        t = time.monotonic() if t is None else t
        samples = self._samples.setdefault(key, collections.deque())
        samples.append((t, value))
        while samples and samples[0][0] < t - self.seconds:
            samples.popleft()

    def forget(self, key: str) -> None:
        """Drop a key's samples: its counter started again (its worker restarted).

        Example:
            >>> recent = SampleWindow(); recent.add("rows:cpu0", 9, t=0)
            >>> recent.forget("rows:cpu0"); recent.series("rows:cpu0")
            []
        """
        self._samples.pop(key, None)

    def series(self, key: str, points: int = 120) -> list:
        """The key's values, oldest first; at most ``points`` of them (the largest of each
        stretch, so a short peak still shows in a sparkline).

        Example:
            >>> recent = SampleWindow()
            >>> for t in range(6): recent.add("m", t % 3, t)
            >>> recent.series("m", points=3)
            [1, 2, 2]
        """
        values = [v for _, v in self._samples.get(key, ())]
        if len(values) <= points:
            return values
        step = len(values) / points
        return [max(values[int(i * step):int((i + 1) * step)]) for i in range(points)]

    def rate(self, key: str, span: float = 5.0) -> float | None:
        """Change per second of a cumulative counter over about the last ``span`` seconds
        (from the oldest sample in that span, or the one before the latest if none is);
        None until there are two samples.

        Example:
            >>> recent = SampleWindow(); recent.add("rows", 0, t=0); recent.rate("rows")
            >>> recent.add("rows", 300, t=30); recent.rate("rows", span=5)
            10.0
        """
        samples = self._samples.get(key)
        if not samples or len(samples) < 2:
            return None
        t_last, v_last = samples[-1]
        older = [s for s in list(samples)[:-1] if s[0] >= t_last - span] or [samples[-2]]
        t_then, v_then = older[0]
        return (v_last - v_then) / (t_last - t_then) if t_last > t_then else None
