"""Warnings that point at the user's line, not at nbtool's insides.

A warning shows the file and line it is attributed to. ``stacklevel`` counted by hand breaks
whenever a call goes through one more layer (the engine's facade, a decorator), and the
user then reads ``engine.py:73: UserWarning`` instead of their own cell. :func:`warn_user`
attributes it to the first caller outside the nbtool package, however deep the call.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_user("model 'cnn' changed since it was registered")
    >>> caught[0].filename.endswith("warn.py")   # called from outside the package: here
    False
"""

from __future__ import annotations

import os
import sys
import warnings

# nbtool/_util/warn.py -> the nbtool package folder, whose every file counts as "inside".
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn, attributed to the nearest caller outside the nbtool package.

    Example:
        >>> warn_user("result store preds.zarr: the input changed")  # doctest: +SKIP
        <stdin>:1: UserWarning: result store preds.zarr: the input changed
    """
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
