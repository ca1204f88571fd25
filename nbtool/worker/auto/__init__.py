"""``runtime="auto"``: choosing, per model file and machine, the fastest runtime whose
outputs agree with TensorFlow's. ``opening`` opens a model for its runtime (remembered in
``records``, else measured by ``choice`` among the ``candidates``, checked by
``agreement``); ``guard`` keeps checking the rows a conversion computes.

Example:
    >>> from nbtool.worker.auto import CHECK_ROWS
    >>> CHECK_ROWS > 0
    True
"""

from __future__ import annotations

from nbtool.worker.auto.agreement import CHECK_ROWS
from nbtool.worker.auto.candidates import CONVERTERS, discard
from nbtool.worker.auto.guard import Guard
from nbtool.worker.auto.opening import open_for_runtime
from nbtool.worker.auto.records import remember_envelope, remember_fallback

__all__ = ["CHECK_ROWS", "CONVERTERS", "Guard", "discard", "open_for_runtime",
           "remember_envelope", "remember_fallback"]
