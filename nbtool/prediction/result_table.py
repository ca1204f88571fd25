"""A prediction as a table: one row per input row, labelled as the input's rows were.

Example:
    >>> from nbtool.prediction.results import Prediction
    >>> res = Prediction(["reg"], {"reg": [np.array([[1.5, 2.0], [0.5, -1.0]])]},
    ...                  n_rows=2, chunk_size=2)
    >>> prediction_frame(res).columns.tolist()
    ['reg.output[0]', 'reg.output[1]']
"""

from __future__ import annotations

import numpy as np

from nbtool.prediction.metrics import looks_like_classifier, to_classes


def prediction_frame(res):
    """``res`` as a pandas DataFrame (what :meth:`Prediction.to_pandas` returns): per model
    (and ``combined``) and output, a classifier's ``.class`` and ``.probability``, else one
    column per value, ``model.output[i]`` (``model.name[i]`` for a named output).

    Example:
        >>> from nbtool.prediction.results import Prediction
        >>> res = Prediction(["a", "b"], {"a": [np.eye(2)], "b": [np.eye(2)[::-1]]},
        ...                  n_rows=2, chunk_size=2, combined=np.eye(2), combine="mean")
        >>> prediction_frame(res).columns.tolist()
        ['a.class', 'a.probability', 'b.class', 'b.probability', 'combined.class', 'combined.probability']
        >>> prediction_frame(res)["b.class"].tolist()
        [1, 0]
    """
    import pandas as pd

    columns: dict[str, np.ndarray] = {}
    for model, outs in res.output_lists().items():
        names = res.output_names.get(model)
        for i, y in enumerate(outs):
            label = model if len(outs) == 1 else f"{model}.{names[i] if names else i}"
            columns.update(_columns(label, np.asarray(y)))
    combined = res.combined if len(res.models) > 1 else None   # one model: itself
    if isinstance(combined, dict):
        for name, y in combined.items():
            columns.update(_columns(f"combined.{name}", np.asarray(y)))
    elif combined is not None:
        columns.update(_columns("combined", np.asarray(combined)))
    return pd.DataFrame(columns, index=_index(res))


def _columns(label: str, y: np.ndarray) -> dict[str, np.ndarray]:
    """One output's columns: class and probability for a classifier, else its values."""
    if y.ndim == 1:   # a vote: the classes themselves
        return {label if y.dtype.kind in "iu" else f"{label}.output": y}
    if _probabilities(y):
        classes = to_classes(y)
        scores = y if y.shape[1] > 1 else np.concatenate([1 - y, y], axis=1)
        safe = np.clip(classes, 0, None)
        probability = np.where(classes >= 0, scores[np.arange(len(y)), safe], np.nan)
        return {f"{label}.class": classes, f"{label}.probability": probability}
    flat = y.reshape(len(y), -1)
    return {f"{label}.output[{j}]": flat[:, j] for j in range(flat.shape[1])}


def _probabilities(y: np.ndarray) -> bool:
    """Whether an output is class probabilities: one sigmoid column, or rows of
    non-negative scores summing to 1 (a softmax); logits and regressions are values."""
    if not looks_like_classifier(y):
        return False
    if y.shape[1] == 1:
        return True
    rows = y[np.isfinite(y).all(axis=1)]
    return bool(len(rows) and rows.min() >= 0 and np.allclose(rows.sum(axis=1), 1, atol=1e-3))


def _index(res):
    """The input's row labels as a pandas Index (0..n-1 when it had none)."""
    import pandas as pd

    ids = res.row_ids
    if ids is None:
        return pd.RangeIndex(res.n_rows)
    if hasattr(ids, "compute"):   # a Dask table's ids= column: read now
        ids = ids.compute()
    return ids if isinstance(ids, pd.Index) else pd.Index(np.asarray(ids))
