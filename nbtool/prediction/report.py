"""What a prediction looks like in a notebook: numbers a person reads at a glance.

A summary table (per model: output, device, time, throughput, load time, errors, and with
labels the accuracy); for classifiers the predicted-class distribution, the models' pairwise
agreement and, with labels, the ensemble's confusion matrix; for image inputs a small
gallery of the samples the models disagree on most. Charts are inline SVG and the gallery
inline PNG: the HTML needs no server and stays small however many rows were predicted.

The numbers themselves (classes, agreement, accuracy, confusion) are counted in
:mod:`nbtool.prediction.metrics`; this module lays them out.

Example:
    >>> from nbtool.prediction.results import Prediction
    >>> a, b = np.eye(3)[[0, 1, 2, 1]], np.eye(3)[[0, 1, 0, 0]]
    >>> res = Prediction(["a", "b"], {"a": [a], "b": [b]}, n_rows=4, chunk_size=4)
    >>> [(r["model"], r["output"]) for r in summary_rows(res)]
    [('a', '(4, 3)'), ('b', '(4, 3)')]
    >>> html = render_html(res)
    >>> "<table" in html, "agreement between models" in html
    (True, True)
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from nbtool.prediction.metrics import (accuracy, agreement, classifier_scores, confusion,
    disagreement_rows, outputs_by_model, predicted_classes)
from nbtool.prediction.svg import bar_chart, heatmap

#: Bars and confusion rows beyond this many classes would not be read: the most predicted.
MAX_CLASSES_SHOWN = 20
GALLERY_PIXELS = 64


def _image_rows(res, rows: np.ndarray):
    """The input rows as images, if the input looks like images and can be read cheaply."""
    src = res.source
    if src is None or len(rows) == 0:
        return None
    shape = tuple(src.row_shape)
    is_image = len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3, 4))
    if not is_image:
        return None
    from nbtool.prediction.sources import NpySource

    picked = np.sort(rows)
    if getattr(src, "array", None) is not None and isinstance(src.array, np.ndarray):
        return src.array[picked], picked
    if isinstance(src, NpySource):   # memory-mapped: only the picked rows are read
        return np.asarray(np.load(src.path, mmap_mode="r")[picked]), picked
    return None


def png_data_uri(image: np.ndarray, size: int = GALLERY_PIXELS) -> str:
    """One image (H, W), (H, W, 1|3|4) as a small PNG ``data:`` URI, scaled to fit ``size``.

    Example:
        >>> png_data_uri(np.zeros((8, 8))).startswith("data:image/png;base64,")
        True
    """
    from PIL import Image

    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    lo, hi = np.nanmin(img), np.nanmax(img)
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    pil = Image.fromarray(np.uint8(np.nan_to_num(img) * 255))
    scale = max(1, size // max(pil.size))
    pil = pil.resize((pil.size[0] * scale, pil.size[1] * scale), Image.NEAREST)
    pil.thumbnail((size, size))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def summary_rows(res) -> list[dict]:
    """One row per model: what the table shows (also used by the text repr).

    Example:
        >>> from nbtool.prediction.results import Prediction
        >>> res = Prediction(["m"], {"m": [np.ones((2, 3))]}, n_rows=2, chunk_size=2,
        ...                  timings={"m": {"seconds": 0.5}})
        >>> row = summary_rows(res)[0]
        >>> row["output"], row["seconds"], fmt(row["rows/s"])
        ('(2, 3)', 0.5, '-')
    """
    acc = accuracy(res, res.labels) if res.labels is not None else {}
    rows = []
    outputs = outputs_by_model(res)
    for m in res.models:
        t = res.timings.get(m, {})
        outs = outputs.get(m)
        row = {
            "model": m,
            "output": output_shapes(outs, res.output_names.get(m)) if outs else "failed",
            "device": ", ".join(t.get("devices", [])) or "-",
            "seconds": t.get("seconds", float("nan")),
            "rows/s": t.get("rows_per_second", float("nan")),
            "load s": t.get("load_seconds", 0.0),
            "errors": sum(1 for e in res.errors if getattr(e, "model", None) == m),
        }
        if acc:
            row["accuracy"] = acc.get(m, float("nan"))
        rows.append(row)
    if acc and "ensemble" in acc:
        rows.append({"model": f"ensemble ({res.combine})", "output": "", "device": "",
                     "seconds": res.wall_seconds, "rows/s": res.n_rows / res.wall_seconds
                     if res.wall_seconds else float("nan"), "load s": "", "errors": "",
                     "accuracy": acc["ensemble"]})
    return rows


def output_shapes(outs: list, names: tuple | None = None) -> str:
    """A model's outputs as the table shows them: each one's shape, after its name when
    the model names them.

    Example:
        >>> output_shapes([np.ones((2, 4)), np.ones((2, 3))], ("box", "class"))
        'box (2, 4), class (2, 3)'
    """
    if names and len(names) == len(outs):
        return ", ".join(f"{n} {tuple(o.shape)}" for n, o in zip(names, outs))
    return ", ".join(str(tuple(o.shape)) for o in outs)


def fmt(value, spec: str | None = None) -> str:
    """A value as a table cell: ``"-"`` when missing (None or NaN), else formatted with
    ``spec``, or without one a float with 3 decimals (none from 100 up), anything else as is.

    Example:
        >>> fmt(0.12345), fmt(12345.6), fmt(float("nan")), fmt(None), fmt(3), fmt(0.5, "{:.1%}")
        ('0.123', '12,346', '-', '-', '3', '50.0%')
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if spec is not None:
        return spec.format(value)
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


_WARN = ("<div class='nbtool-warning' style='border-left:4px solid #c0392b;padding:4px 8px;"
         "margin:4px 0;color:#c0392b;font-weight:bold'>{}</div>")


def notices(res) -> list[str]:
    """What must be read before any number of the view: the rows are gone (the result
    store was rewritten by another run), or combined is missing or partial.

    Example:
        >>> from nbtool.prediction.results import Prediction
        >>> res = Prediction(["m"], {"m": [np.ones((2, 3))]}, n_rows=2, chunk_size=2,
        ...                  combine="mean", combined_note="combined is not available: ...")
        >>> notices(res)
        ['combined is not available: ...']
    """
    stale = res.stale
    if stale:
        return [stale]
    return [res.combined_note] if res.combined_note else []


def render_html(res) -> str:
    """The whole inline view of a :class:`~nbtool.prediction.results.Prediction`: notices first, the
    summary table, class charts, the gallery of disagreements, the errors.

    Example:
        >>> from nbtool.prediction.results import Prediction
        >>> res = Prediction(["reg"], {"reg": [np.ones((2, 1)) * 7]}, n_rows=2, chunk_size=2)
        >>> html = render_html(res)
        >>> "<table" in html, "<svg" in html       # no class charts for a regression
        (True, False)
    """
    top = "".join(_WARN.format(html.escape(n)) for n in notices(res))
    if res.stale:   # every number below would be another run's
        return f"<div class='nbtool-prediction'>{top}</div>"
    rows = summary_rows(res)
    cols = list(rows[0]) if rows else []
    table = ("<table class='nbtool-table'><thead><tr>"
             + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead><tbody>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c, '')))}</td>"
                                         for c in cols) + "</tr>" for r in rows)
             + "</tbody></table>")
    charts = _charts(res)
    gallery = _gallery(res)
    errs = "".join(f"<li>{html.escape(str(e))}</li>" for e in res.errors[:5])
    if len(res.errors) > 5:
        errs += f"<li>... and {len(res.errors) - 5} more (see res.errors)</li>"
    head = (f"<b>Prediction</b>: {len(res.models)} model(s) &times; {res.n_rows:,} rows in "
            f"{res.wall_seconds:.2f}s, chunks of {res.chunk_size:,}, combine="
            f"{html.escape(repr(res.combine))}")
    return (f"<div class='nbtool-prediction'>{top}<div>{head}</div>{table}"
            + (f"<div class='nbtool-charts' style='display:flex;flex-wrap:wrap;gap:12px'>"
               f"{charts}</div>" if charts else "")
            + gallery
            + (f"<ul class='nbtool-errors' style='color:#c0392b'>{errs}</ul>" if errs else "")
            + "</div>")


def _charts(res) -> str:
    classes = predicted_classes(res)
    scores = classifier_scores(res)
    if not classes:
        return ""
    n_classes = max(max(s.shape[1] for s in scores.values()), 2) if scores else 2
    if res.labels is not None:
        n_classes = max(n_classes, int(np.max(res.labels)) + 1)
    counts = {m: np.bincount(c[c >= 0], minlength=n_classes) for m, c in classes.items()}
    shown = np.argsort(-sum(counts.values()))[:MAX_CLASSES_SHOWN] if n_classes > \
        MAX_CLASSES_SHOWN else np.arange(n_classes)
    shown = np.sort(shown)
    parts = [bar_chart({m: [int(v) for v in c[shown]] for m, c in counts.items()},
                       [str(i) for i in shown], title="predicted classes")]
    names, mat = agreement(res)
    if len(names) >= 2:
        parts.append(heatmap(mat, names, names, title="agreement between models", cell=48,
                             label_w=80))
    if res.labels is not None:
        who = "ensemble" if "ensemble" in classes else next(iter(classes))
        cm = confusion(classes[who], res.labels, n_classes)
        if n_classes <= MAX_CLASSES_SHOWN:
            parts.append(heatmap(cm, [str(i) for i in range(n_classes)],
                                 [str(i) for i in range(n_classes)],
                                 title=f"confusion ({who})", fmt="{:.0f}", cell=20,
                                 label_w=30, row_axis="true", col_axis="predicted"))
    return "".join(parts)


def _gallery(res) -> str:
    rows = disagreement_rows(res)
    picked = _image_rows(res, rows)
    if picked is None:
        return ""
    images, order = picked
    classes = predicted_classes(res)
    cells = []
    for img, r in zip(images, order):
        preds = ", ".join(f"{m}: {classes[m][r]}" for m in classes if m != "ensemble")
        truth = f"<br>label {int(np.asarray(res.labels).reshape(-1)[r])}" \
            if res.labels is not None else ""
        cells.append(f"<figure style='margin:0;text-align:center;font-size:10px'>"
                     f"<img src='{png_data_uri(img)}' alt='row {r}'/><figcaption>row {r}"
                     f"{truth}<br>{html.escape(preds)}</figcaption></figure>")
    return ("<div class='nbtool-gallery'><div><b>where the models disagree most</b></div>"
            "<div style='display:flex;flex-wrap:wrap;gap:8px'>" + "".join(cells) + "</div></div>")
