"""What a prediction looks like in a notebook: numbers a person reads at a glance.

A summary table (per model: output, device, time, throughput, load time, errors, and with
labels the accuracy); for classifiers the predicted-class distribution, the models' pairwise
agreement and, with labels, the ensemble's confusion matrix; for image inputs a small
gallery of the samples the models disagree on most. Charts are inline SVG and the gallery
inline PNG: the HTML needs no server and stays small however many rows were predicted.

Example:
    >>> import numpy as np
    >>> from nbtool.results import Prediction
    >>> a, b = np.eye(3)[[0, 1, 2, 1]], np.eye(3)[[0, 1, 0, 0]]
    >>> res = Prediction(["a", "b"], {"a": [a], "b": [b]}, None, None, {}, [], 4, 4)
    >>> predicted_classes(res)["a"].tolist()
    [0, 1, 2, 1]
    >>> agreement(res)[1].tolist()
    [[1.0, 0.5], [0.5, 1.0]]
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from .svg import bar_chart, heatmap

MAX_CLASSES_SHOWN = 20
MAX_GALLERY = 8
GALLERY_PIXELS = 64


def classifier_scores(res) -> dict[str, np.ndarray]:
    """Per model, its (rows, classes) scores, for models that look like classifiers."""
    out = {}
    for m in res.models:
        outs = res._outputs.get(m)
        if not outs or len(outs) != 1 or outs[0].ndim != 2:
            continue
        o = outs[0]
        if o.shape[1] == 1:   # one unit: a sigmoid classifier only if it looks like one
            finite = o[np.isfinite(o)] if o.dtype.kind == "f" else o
            if finite.size == 0 or finite.min() < 0 or finite.max() > 1:
                continue
        out[m] = o
    return out


def to_classes(scores: np.ndarray) -> np.ndarray:
    """Argmax per row (a one-unit output is thresholded at 0.5); -1 where the row failed.

    Example:
        >>> to_classes(np.array([[0.2, 0.8], [np.nan, np.nan]])).tolist()
        [1, -1]
        >>> to_classes(np.array([[0.7], [0.1]])).tolist()
        [1, 0]
    """
    bad = np.isnan(scores).any(axis=1) if scores.dtype.kind == "f" else np.zeros(len(scores), bool)
    if scores.shape[1] == 1:
        classes = (np.nan_to_num(scores[:, 0]) > 0.5).astype(np.int64)
    else:
        classes = np.argmax(np.nan_to_num(scores, nan=-np.inf), axis=1).astype(np.int64)
    classes[bad] = -1
    return classes


def predicted_classes(res) -> dict[str, np.ndarray]:
    """Predicted class per row for each classifier model, plus ``"ensemble"`` if combined."""
    out = {m: to_classes(s) for m, s in classifier_scores(res).items()}
    if res.combined is not None and out and len(res.models) > 1:
        comb = np.asarray(res.combined)
        out["ensemble"] = comb.astype(np.int64) if comb.ndim == 1 else to_classes(comb)
    return out


def agreement(res) -> tuple[list[str], np.ndarray]:
    """Share of rows on which each pair of models predicts the same class."""
    classes = {m: c for m, c in predicted_classes(res).items() if m != "ensemble"}
    names = list(classes)
    mat = np.ones((len(names), len(names)))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            ok = (classes[a] >= 0) & (classes[b] >= 0)
            mat[i, j] = float((classes[a][ok] == classes[b][ok]).mean()) if ok.any() else np.nan
    return names, mat


def accuracy(res, labels) -> dict[str, float]:
    """Accuracy of each classifier (and the ensemble) against true labels."""
    labels = np.asarray(labels).reshape(-1)
    return {m: float((c == labels).mean()) for m, c in predicted_classes(res).items()}


def confusion(classes: np.ndarray, labels, n_classes: int) -> np.ndarray:
    """Counts: rows are true classes, columns predicted ones.

    Example:
        >>> confusion(np.array([0, 1, 1]), [0, 1, 0], 2).tolist()
        [[1, 1], [0, 1]]
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    mat = np.zeros((n_classes, n_classes), dtype=np.int64)
    ok = (classes >= 0) & (labels >= 0) & (labels < n_classes) & (classes < n_classes)
    np.add.at(mat, (labels[ok], classes[ok]), 1)
    return mat


def disagreement_rows(res, k: int = MAX_GALLERY) -> np.ndarray:
    """The rows where the models disagree most: most distinct classes, then least confident."""
    scores = classifier_scores(res)
    if len(scores) < 2:
        return np.array([], dtype=np.int64)
    classes = np.stack([to_classes(s) for s in scores.values()])
    distinct = np.array([len(set(col[col >= 0])) for col in classes.T])
    mean = np.nanmean(np.stack(list(scores.values())), axis=0) if all(
        s.shape == next(iter(scores.values())).shape for s in scores.values()) else None
    confidence = np.nanmax(mean, axis=1) if mean is not None and mean.shape[1] > 1 else \
        np.zeros(len(distinct))
    order = np.lexsort((np.nan_to_num(confidence, nan=1.0), -distinct))
    return order[:k][distinct[order[:k]] > 1]


def _image_rows(res, rows: np.ndarray):
    """The input rows as images, if the input looks like images and can be read cheaply."""
    src = res.source
    if src is None or len(rows) == 0:
        return None
    shape = tuple(src.row_shape)
    is_image = len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3, 4))
    if not is_image:
        return None
    from .sources import NpyFile, NpySource, read_rows

    if getattr(src, "array", None) is not None and isinstance(src.array, np.ndarray):
        return src.array[np.sort(rows)], np.sort(rows)
    if isinstance(src, NpySource):
        picked = np.sort(rows)
        return np.stack([read_rows(NpyFile(src.path), r, r + 1)[0] for r in picked]), picked
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
    """One row per model: what the table shows (also used by the text repr)."""
    acc = accuracy(res, res.labels) if res.labels is not None else {}
    rows = []
    for m in res.models:
        t = res.timings.get(m, {})
        outs = res._outputs.get(m)
        row = {
            "model": m,
            "output": ", ".join(str(o.shape) for o in outs) if outs else "failed",
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


def _fmt(v) -> str:
    if isinstance(v, float):
        if np.isnan(v):
            return "-"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


_WARN = ("<div class='nbtool-warning' style='border-left:4px solid #c0392b;padding:4px 8px;"
         "margin:4px 0;color:#c0392b;font-weight:bold'>{}</div>")


def notices(res) -> list[str]:
    """What must be read before any number of the view: the rows are gone (the result
    store was rewritten by another run), or combined is missing or partial.

    Example:
        >>> from nbtool.results import Prediction
        >>> res = Prediction(["m"], {"m": [np.ones((2, 3))]}, None, "mean", {}, [], 2, 2,
        ...                  combined_note="combined is not available: ...")
        >>> notices(res)
        ['combined is not available: ...']
    """
    stale = res.stale
    if stale:
        return [stale]
    return [res.combined_note] if res.combined_note else []


def render_html(res) -> str:
    """The whole inline view of a :class:`~nbtool.results.Prediction`."""
    top = "".join(_WARN.format(html.escape(n)) for n in notices(res))
    if res.stale:   # every number below would be another run's
        return f"<div class='nbtool-prediction'>{top}</div>"
    rows = summary_rows(res)
    cols = list(rows[0]) if rows else []
    table = ("<table class='nbtool-table'><thead><tr>"
             + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead><tbody>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>"
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
