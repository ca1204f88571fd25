"""An engine that outlives the notebook kernel: ``start(persist=True)`` runs the
scheduler and workers in a process of their own (``server``), the kernel attaches to it
(``attached``); ``persistent`` starts, finds, attaches to and ends such engines; their
files (``engine_files``: one per name, private to the user) say where each one listens;
``on_scheduler`` holds the claim that only one kernel drives it at a time.

Example:
    >>> from nbtool.engine.persist import idle_seconds
    >>> idle_seconds("2h")
    7200.0
"""

from __future__ import annotations

from nbtool.engine.persist.engine_files import idle_words
from nbtool.engine.persist.persistent import (attach, idle_seconds, running, shutdown,
    start_persistent)

__all__ = ["attach", "idle_seconds", "idle_words", "running", "shutdown", "start_persistent"]
