"""Small SVG charts (bars, heatmaps), drawn as text for a result's inline HTML.

They need no server and no plotting library, and stay a few kilobytes however big the
prediction was.

Example:
    >>> svg = bar_chart({"cnn": [3, 1], "mlp": [2, 2]}, ["0", "1"], title="classes")
    >>> svg.startswith("<svg") and "classes" in svg
    True
"""

from __future__ import annotations

import html

#: Colours for series (models), distinguishable and readable on white and dark themes.
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac"]


def _text(x, y, s, size=10, anchor="middle", weight="normal", fill="currentColor"):
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}">{html.escape(str(s))}</text>')


def bar_chart(series: dict[str, list[float]], categories: list[str], title: str = "",
              width: int = 360, height: int = 180) -> str:
    """Grouped bars: one group per category, one bar (colour) per series.

    Example (two bars and one legend swatch):
        >>> bar_chart({"a": [1, 0]}, ["x", "y"]).count("<rect")
        3
    """
    names = list(series)
    top = max((max(v) for v in series.values() if len(v)), default=1) or 1
    left, bottom, head = 28, 22, 18 + 12 * ((len(names) + 3) // 4)
    plot_w, plot_h = width - left - 6, height - bottom - head
    group_w = plot_w / max(len(categories), 1)
    bar_w = max(group_w * 0.8 / max(len(names), 1), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'class="nbtool-chart" role="img" aria-label="{html.escape(title)}">']
    if title:
        parts.append(_text(width / 2, 12, title, 11, weight="bold"))
    for i, name in enumerate(names):   # legend
        lx, ly = left + (i % 4) * (plot_w / 4), 22 + 12 * (i // 4)
        parts.append(f'<rect x="{lx:.1f}" y="{ly - 7:.1f}" width="8" height="8" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"/>')
        parts.append(_text(lx + 11, ly, name[:14], 9, anchor="start"))
    base = head + plot_h
    parts.append(f'<line x1="{left}" y1="{base}" x2="{width - 6}" y2="{base}" '
                 'stroke="currentColor" stroke-width="0.5"/>')
    parts.append(_text(left - 3, head + 8, f"{top:g}", 8, anchor="end"))
    for c, cat in enumerate(categories):
        gx = left + c * group_w + group_w * 0.1
        for i, name in enumerate(names):
            v = series[name][c] if c < len(series[name]) else 0
            h = plot_h * v / top
            parts.append(f'<rect x="{gx + i * bar_w:.1f}" y="{base - h:.1f}" '
                         f'width="{bar_w:.1f}" height="{h:.1f}" '
                         f'fill="{PALETTE[i % len(PALETTE)]}"><title>{html.escape(name)} '
                         f'{html.escape(str(cat))}: {v:g}</title></rect>')
        parts.append(_text(left + (c + 0.5) * group_w, base + 12, cat, 9))
    parts.append("</svg>")
    return "".join(parts)


def heatmap(matrix, row_labels: list[str], col_labels: list[str], title: str = "",
            fmt: str = "{:.2f}", cell: int = 26, label_w: int = 70,
            row_axis: str = "", col_axis: str = "") -> str:
    """A matrix as coloured cells with their values written in.

    Example:
        >>> heatmap([[1.0, 0.5], [0.5, 1.0]], ["a", "b"], ["a", "b"]).count("<rect")
        4
    """
    rows, cols = len(row_labels), len(col_labels)
    values = [[float(v) for v in r] for r in matrix]
    top = max((v for r in values for v in r), default=1) or 1
    head = 18 + (12 if col_axis else 0) + 14
    width, height = label_w + cols * cell + 6, head + rows * cell + 4
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'class="nbtool-chart" role="img" aria-label="{html.escape(title)}">']
    if title:
        parts.append(_text(width / 2, 12, title, 11, weight="bold"))
    if col_axis:
        parts.append(_text(label_w + cols * cell / 2, 26, col_axis, 9))
    for j, lab in enumerate(col_labels):
        fits = max(3, cell // 6)   # characters that fit over one cell at 9px
        parts.append(_text(label_w + (j + 0.5) * cell, head - 3, str(lab)[:fits], 9))
    for i, lab in enumerate(row_labels):
        y = head + i * cell
        parts.append(_text(label_w - 4, y + cell / 2 + 3, str(lab)[:12], 9, anchor="end"))
        for j in range(cols):
            v = values[i][j]
            shade = v / top
            fill = f"rgba(78,121,167,{0.08 + 0.85 * shade:.2f})"
            ink = "#fff" if shade > 0.55 else "currentColor"
            parts.append(f'<rect x="{label_w + j * cell}" y="{y}" width="{cell - 1}" '
                         f'height="{cell - 1}" fill="{fill}"/>')
            parts.append(_text(label_w + (j + 0.5) * cell, y + cell / 2 + 3, fmt.format(v),
                               8, fill=ink))
    if row_axis:
        parts.append(_text(8, head + rows * cell / 2, row_axis, 9))
    parts.append("</svg>")
    return "".join(parts)
