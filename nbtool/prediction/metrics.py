"""What a prediction's numbers say: classes, agreement, accuracy, confusion, distance.

Predicted classes per model, how often two models agree, accuracy against labels, the
confusion matrix, the rows the models disagree on most, and how far two models' outputs
are apart.

Pure numpy, on a :class:`~nbtool.prediction.results.Prediction` (or anything with its ``models``,
``items()`` and ``combined``): the inline report (:mod:`nbtool.prediction.report`), ``evaluate`` and
the variant comparison (:mod:`nbtool.engine.optimize`) all count the same way.

Example:
    >>> from nbtool.prediction.results import Prediction
    >>> a, b = np.eye(3)[[0, 1, 2, 1]], np.eye(3)[[0, 1, 0, 0]]
    >>> res = Prediction(["a", "b"], {"a": [a], "b": [b]}, n_rows=4, chunk_size=4)
    >>> predicted_classes(res)["a"].tolist()
    [0, 1, 2, 1]
    >>> agreement(res)[1].tolist()
    [[1.0, 0.5], [0.5, 1.0]]
    >>> accuracy(res, [0, 1, 2, 0])
    {'a': 0.75, 'b': 0.75}
"""

from __future__ import annotations

import warnings

import numpy as np

#: How many rows the gallery of disagreements shows at most.
MAX_GALLERY = 8


def outputs_by_model(res) -> dict[str, list]:
    """Each model's outputs as a list (one array per output); models that failed are left out.

    Example:
        >>> from nbtool.prediction.results import Prediction
        >>> res = Prediction(["m"], {"m": [np.ones((2, 3))]}, n_rows=2, chunk_size=2)
        >>> [o.shape for o in outputs_by_model(res)["m"]]
        [(2, 3)]
    """
    return res.output_lists()


def classifier_scores(res) -> dict[str, np.ndarray]:
    """Per model, its (rows, classes) scores, for models that look like classifiers: one
    output of two or more columns, or one column of values in [0, 1] (a sigmoid).

    Example:
        >>> from nbtool.prediction.results import Prediction
        >>> a, b = np.eye(3)[[0, 1, 2, 1]], np.eye(3)[[0, 1, 0, 0]]
        >>> res = Prediction(["a", "b"], {"a": [a], "b": [b]}, n_rows=4, chunk_size=4)
        >>> sorted(classifier_scores(res))
        ['a', 'b']
    """
    return {m: outs[0] for m, outs in outputs_by_model(res).items()
            if len(outs) == 1 and looks_like_classifier(outs[0])}


def looks_like_classifier(o) -> bool:
    """Whether an output looks like class scores: (rows, classes) with two or more
    columns, or one column of values in [0, 1] (a sigmoid).

    Example:
        >>> looks_like_classifier(np.eye(3)), looks_like_classifier(np.array([[3.5], [-1.0]]))
        (True, False)
    """
    o = np.asarray(o)
    if o.ndim != 2:
        return False
    if o.shape[1] == 1:   # one unit: a sigmoid classifier only if it looks like one
        finite = o[np.isfinite(o)] if o.dtype.kind == "f" else o
        return bool(finite.size and finite.min() >= 0 and finite.max() <= 1)
    return True


def to_classes(scores: np.ndarray) -> np.ndarray:
    """Argmax per row (a one-unit output is thresholded at 0.5); -1 where the row failed.

    Example:
        >>> to_classes(np.array([[0.2, 0.8], [np.nan, np.nan]])).tolist()
        [1, -1]
        >>> to_classes(np.array([[0.7], [0.1]])).tolist()
        [1, 0]
    """
    failed = scores.dtype.kind == "f"
    bad = np.isnan(scores).any(axis=1) if failed else np.zeros(len(scores), bool)
    if scores.shape[1] == 1:
        classes = (np.nan_to_num(scores[:, 0]) > 0.5).astype(np.int64)
    else:
        classes = np.argmax(np.nan_to_num(scores, nan=-np.inf), axis=1).astype(np.int64)
    classes[bad] = -1
    return classes


def predicted_classes(res) -> dict[str, np.ndarray]:
    """Predicted class per row for each classifier model, plus ``"ensemble"`` if combined.

    Example:
        >>> from nbtool.prediction.results import Prediction
        >>> a, b = np.eye(3)[[0, 1, 2, 1]], np.eye(3)[[0, 1, 0, 0]]
        >>> res = Prediction(["a", "b"], {"a": [a], "b": [b]}, n_rows=4, chunk_size=4)
        >>> {m: c.tolist() for m, c in predicted_classes(res).items()}
        {'a': [0, 1, 2, 1], 'b': [0, 1, 0, 0]}
    """
    out = {m: to_classes(s) for m, s in classifier_scores(res).items()}
    if res.combined is not None and not isinstance(res.combined, dict) and out \
            and len(res.models) > 1:
        comb = np.asarray(res.combined)
        out["ensemble"] = comb.astype(np.int64) if comb.ndim == 1 else to_classes(comb)
    return out


def agreement(res) -> tuple[list[str], np.ndarray]:
    """Share of rows on which each pair of models predicts the same class (rows that failed
    for either model are left out): the model names and the matrix.

    Example:
        >>> from nbtool.prediction.results import Prediction
        >>> a, b = np.eye(3)[[0, 1, 2, 1]], np.eye(3)[[0, 1, 0, 0]]
        >>> res = Prediction(["a", "b"], {"a": [a], "b": [b]}, n_rows=4, chunk_size=4)
        >>> names, mat = agreement(res)
        >>> names, mat.tolist()
        (['a', 'b'], [[1.0, 0.5], [0.5, 1.0]])
    """
    classes = {m: c for m, c in predicted_classes(res).items() if m != "ensemble"}
    names = list(classes)
    mat = np.ones((len(names), len(names)))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            ok = (classes[a] >= 0) & (classes[b] >= 0)
            mat[i, j] = float((classes[a][ok] == classes[b][ok]).mean()) if ok.any() else np.nan
    return names, mat


def accuracy(res, labels) -> dict[str, float]:
    """Accuracy of each classifier (and the ensemble) against true labels.

    Example:
        >>> from nbtool.prediction.results import Prediction
        >>> a, b = np.eye(3)[[0, 1, 2, 1]], np.eye(3)[[0, 1, 0, 0]]
        >>> res = Prediction(["a", "b"], {"a": [a], "b": [b]}, n_rows=4, chunk_size=4)
        >>> accuracy(res, [0, 1, 2, 0])
        {'a': 0.75, 'b': 0.75}
    """
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
    """The rows where the models disagree most: most distinct classes, then least confident
    (at most ``k``; rows where all agree are never among them).

    Example:
        >>> from nbtool.prediction.results import Prediction
        >>> a, b = np.eye(3)[[0, 1, 2, 1]], np.eye(3)[[0, 1, 0, 0]]
        >>> res = Prediction(["a", "b"], {"a": [a], "b": [b]}, n_rows=4, chunk_size=4)
        >>> disagreement_rows(res).tolist()
        [2, 3]
    """
    scores = classifier_scores(res)
    if len(scores) < 2:
        return np.array([], dtype=np.int64)
    classes = np.stack([to_classes(s) for s in scores.values()])
    distinct = np.array([len(set(col[col >= 0])) for col in classes.T])
    # A row every model failed on (or got NaN in) is NaN here: no warning, it sorts last.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(np.stack(list(scores.values())), axis=0) if all(
            s.shape == next(iter(scores.values())).shape for s in scores.values()) else None
        confidence = np.nanmax(mean, axis=1) if mean is not None and mean.shape[1] > 1 \
            else np.zeros(len(distinct))
    order = np.lexsort((np.nan_to_num(confidence, nan=1.0), -distinct))
    return order[:k][distinct[order[:k]] > 1]


def output_agreement(a, b) -> dict[str, float]:
    """How far two models' outputs on the same rows are apart: ``max_abs_diff`` and, for
    class scores (rows of two or more), ``top1_agreement`` (the share of rows whose argmax
    is the same).

    Example:
        >>> output_agreement([[0.75, 0.25], [0.25, 0.75]], [[1.0, 0.0], [0.75, 0.25]])
        {'max_abs_diff': 0.5, 'top1_agreement': 0.5}
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"outputs of shapes {a.shape} and {b.shape}; agreement needs the "
                         "same shape.")
    out = {"max_abs_diff": float(np.abs(a - b).max())}
    if a.ndim == 2 and a.shape[1] > 1:
        out["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
    return out
