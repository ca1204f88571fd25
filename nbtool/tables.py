"""A small table for ``eng.models()`` and ``eng.devices()``: rows of dicts with reprs.

Example:
    >>> t = Table([{"name": "cnn", "size": "1.2 MB"}], title="models")
    >>> print(t)
    models
    name  size
    cnn   1.2 MB
    >>> t[0]["name"], len(t)
    ('cnn', 1)
"""

from __future__ import annotations

import html
from typing import Any


class Table:
    """Rows (dicts with the same keys) that print as text and render as HTML.

    Example:
        >>> Table([{"a": 1}]).to_records()
        [{'a': 1}]
    """

    def __init__(self, rows: list[dict[str, Any]], title: str = ""):
        self.rows = list(rows)
        self.title = title

    @property
    def columns(self) -> list[str]:
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        return cols

    def __getitem__(self, i):
        return self.rows[i]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def to_records(self) -> list[dict[str, Any]]:
        """The rows as plain dicts (``pandas.DataFrame(t.to_records())`` for a frame)."""
        return [dict(r) for r in self.rows]

    def __repr__(self) -> str:
        cols = self.columns
        cells = [[str(r.get(c, "")) for c in cols] for r in self.rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
        if not self.rows:
            lines.append("(none)")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cols = self.columns
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>"
                                        for c in cols) + "</tr>" for r in self.rows)
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table class='nbtool-table'>{caption}<thead><tr>{head}</tr></thead>" \
               f"<tbody>{body or '<tr><td>(none)</td></tr>'}</tbody></table>"


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
