"""Byte counts written for people: one spelling everywhere (tables, errors, the dashboard).

Example:
    >>> human_bytes(1536), human_bytes(12_000_000)
    ('1.5 kB', '12.0 MB')
"""

from __future__ import annotations


def human_bytes(n: int | float | None) -> str:
    """``1234567`` -> ``'1.2 MB'``.

    Example:
        >>> human_bytes(1234567), human_bytes(None)
        ('1.2 MB', '-')
    """
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
