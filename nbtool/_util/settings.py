"""Sizes and counts from arguments and the environment: read once, refused clearly.

``as_bytes`` is the one place a size like ``"4GB"`` becomes bytes; ``check_size`` and
``check_count`` refuse 0, negatives and junk (never read as "the default"), and
``env_setting`` reads ``NBTOOL_*`` variables with the same care.

Example:
    >>> as_bytes("4GB"), as_bytes(1024)
    (4000000000, 1024)
    >>> check_size("256MB", "memory_budget"), check_count(None, "n_workers")
    (256000000, None)
"""

from __future__ import annotations

import operator
import os
from typing import Callable


def as_bytes(size: str | int | float) -> int:
    """A size in bytes from ``"4GB"`` (Dask's units) or a number.

    Example:
        >>> as_bytes("1.5kB"), as_bytes(2.0)
        (1500, 2)
    """
    from dask.utils import parse_bytes   # here: importing nbtool stays light (no Dask)

    return parse_bytes(size) if isinstance(size, str) else int(size)


def env_setting(name: str, parse: Callable[[str], int]) -> int | None:
    """A positive number from the environment (``None`` if unset or empty), checked early.

    Example:
        >>> env_setting("NBTOOL_SURELY_UNSET", int) is None
        True
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        example = "256MB" if parse is as_bytes else "1"
        raise ValueError(f"{name}={text!r} in the environment: expected a positive number "
                         f"such as {name}={example}. Fix: set it like that, or unset it.")
    return value


def check_count(value, name: str) -> int | None:
    """A whole number of at least 1, or None (the default); 0 is refused, not the default.

    Example:
        >>> check_count(2, "n_workers"), check_count(None, "n_workers")
        (2, None)
        >>> check_count(0, "n_workers")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: n_workers=0: expected a whole number of at least 1, such as n_workers=2...
    """
    if value is None:
        return None
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"{name}={value!r}: expected a whole number of at least 1, such as "
                         f"{name}=2. Fix: pass one, or leave {name} out for the default "
                         "(one worker per GPU, else per core).")
    return n


def check_size(value, name: str, allow_none: bool = True) -> int | None:
    """A positive size in bytes from ``"4GB"`` or a number; 0 and negatives are refused.

    Example:
        >>> check_size("4GB", "memory_budget")
        4000000000
        >>> check_size("0", "memory_budget")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: memory_budget='0': expected a positive size such as '4GB'...
    """
    if value is None and allow_none:
        return None
    try:
        if isinstance(value, bool) or value is None or (isinstance(value, str)
                                                         and not value.strip()):
            n = None
        else:
            n = as_bytes(value)
    except (TypeError, ValueError, OverflowError):
        n = None
    if n is None or n < 1:
        default = ", or leave it out for the default" if allow_none else ""
        raise ValueError(f"{name}={value!r}: expected a positive size such as '4GB' or "
                         f"4_000_000_000 (bytes). Fix: pass e.g. {name}='4GB'{default}.")
    return n
