"""The default engine: the one started last, which ``nbtool.prediction`` and the other module
shortcuts act on (like Dask's default client).

Example:
    >>> before = set_default_engine(None)
    >>> current_engine() is None
    True
    >>> _ = set_default_engine(before)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbtool.errors import NbtoolError

if TYPE_CHECKING:
    from nbtool.engine.engine import Engine

_default: Engine | None = None


def current_engine() -> Engine | None:
    """The engine started last, or None if there is none (or it was closed).

    Example:
        >>> eng = nbtool.start()                     # doctest: +SKIP
        >>> current_engine() is eng                  # doctest: +SKIP
        True
    """
    global _default
    if _default is not None and _default.closed:
        _default = None   # closed: nothing to act on, and nothing to keep alive
    return _default


def default_engine() -> Engine:
    """The engine started last (what ``nbtool.prediction`` and friends use); raises if none.

    Example:
        >>> nbtool.default_engine() is eng   # doctest: +SKIP
        True
    """
    eng = current_engine()
    if eng is None:
        raise NbtoolError("no nbtool engine is running. Fix: eng = nbtool.start() first.")
    return eng


def set_default_engine(engine: Engine | None) -> Engine | None:
    """Make ``engine`` the default one (None: no default); returns the one it replaces.

    ``start()`` does this; a test or a tool that starts an engine of its own gives the
    previous one back with it.

    Example:
        >>> before = set_default_engine(None)
        >>> current_engine() is None
        True
        >>> _ = set_default_engine(before)
    """
    global _default
    before, _default = _default, engine
    return before
