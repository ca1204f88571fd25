"""What the user holds: the :class:`Engine` and how one starts.

- ``engine``: the Engine, the one place the user-facing options are documented and checked
  (``ModelOptions``, ``RunOptions``); it hands them to the catalog, the loads and the runs;
- ``session``: ``start()`` and the default engine (``current`` keeps which one it is, so
  the persistent engine can set it without importing ``session``);
- ``cluster``: the local cluster with one pinned worker per GPU (or CPU slice);
  ``devices``: how many workers, their environment and budget; ``backends``: the Keras
  backend the workers run, as the kernel sees it (never imported here);
- ``pool``: the workers by stable name, their status;
- ``optimize``: variants of a model (LiteRT, int8), checked against the original;
- ``persist/``: an engine that outlives the kernel (``start(persist=True)``, ``attach``).

Example:
    >>> from nbtool.engine import Engine, start
    >>> Engine.predict.__doc__.splitlines()[0]
    'Predict ``models`` on ``x`` and wait for the result.'
"""

from __future__ import annotations

from nbtool._util import discover_gpus   # the GPUs a plan would use, for notebooks
from nbtool.engine.backends import check_backend
from nbtool.engine.current import current_engine, default_engine
from nbtool.engine.devices import select_gpus
from nbtool.engine.engine import Engine
from nbtool.engine.optimize import VARIANTS
from nbtool.engine.persist import attach, idle_seconds, idle_words, running, shutdown
from nbtool.engine.session import start

__all__ = ["Engine", "VARIANTS", "attach", "check_backend", "current_engine", "default_engine",
           "discover_gpus",
           "idle_seconds", "idle_words", "running", "select_gpus", "shutdown", "start"]
