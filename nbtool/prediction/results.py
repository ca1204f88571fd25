"""A prediction's result: per-model outputs in input order, combined, timed; or read back.

:func:`open_prediction` opens a result store (:mod:`nbtool.prediction.store`) as one, lazily.

Example:
    >>> res = eng.predict(["cnn", "mlp"], x, combine="mean")   # doctest: +SKIP
    >>> res["cnn"].shape, res.combined.shape                     # doctest: +SKIP
    ((1000, 10), (1000, 10))
    >>> res.timings["cnn"]["rows_per_second"]                    # doctest: +SKIP
    5123.4
"""

from __future__ import annotations

import os
from typing import Any
import warnings

import numpy as np

from nbtool.errors import CombineError, NbtoolError, PredictionFailed

COMBINE_METHODS = ("mean", "vote", None)


def check_combine(method) -> None:
    """Raise a ValueError naming the choices for an unknown combine method.

    Example:
        >>> check_combine("median")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: combine='median' is not a combine method; choose 'mean', 'vote' or None.
    """
    if method not in COMBINE_METHODS:
        raise ValueError(f"combine={method!r} is not a combine method; choose 'mean', "
                         "'vote' or None.")


def combine_outputs(outputs: list[np.ndarray], method: str | None):
    """Combine single-output predictions of several models row by row.

    ``"mean"`` averages them (models that failed on a row, NaN there, are left out);
    ``"vote"`` returns each row's majority class (argmax per model; a one-unit output is
    thresholded at 0.5), ties broken by the mean score. A row on which every model failed
    is NaN in the mean and -1 in the vote (never a class nobody voted for).

    Example:
        >>> a = np.array([[0.9, 0.1], [0.4, 0.6]]); b = np.array([[0.2, 0.8], [0.3, 0.7]])
        >>> combine_outputs([a, b], "mean")
        array([[0.55, 0.45],
               [0.35, 0.65]])
        >>> combine_outputs([a, b, b], "vote")
        array([1, 1])
    """
    if method is None:
        return None
    shapes = {o.shape for o in outputs}
    if len(shapes) != 1:
        raise CombineError(method, f"the outputs have different shapes {sorted(shapes)}")
    stack = np.stack(outputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # rows where every model failed
        mean = np.nanmean(stack, axis=0)
    if method == "mean":
        return mean
    if stack.ndim != 3:
        raise CombineError(method, f"voting needs outputs of shape (rows, classes); got "
                           f"{stack.shape[1:]}")
    if stack.shape[2] == 1:   # one sigmoid unit: two classes
        votes = np.concatenate([(stack <= 0.5).sum(0), (stack > 0.5).sum(0)], axis=1)
        score = np.concatenate([1 - mean, mean], axis=1)
    else:
        classes = np.argmax(np.nan_to_num(stack, nan=-np.inf), axis=2)
        votes = np.zeros(mean.shape, dtype=np.int64)
        for per_model in classes:
            np.add.at(votes, (np.arange(len(per_model)), per_model), 1)
        score = mean
    # A vote counts 1; the mean score (< 1) only breaks ties.
    winner = np.argmax(votes + np.nan_to_num(score, nan=0.0) * 0.5, axis=1)
    if stack.dtype.kind == "f":
        winner[np.isnan(stack).all(axis=(0, 2))] = -1   # nobody voted on these rows
    return winner


class Prediction:
    """Outputs of several models on one input, in input order.

    ``res[name]`` is the model's output (a list of arrays for a multi-output model);
    rows of chunks that failed are NaN, and the failures are in ``res.errors``.
    ``res.combined`` is the ensemble (``None`` without ``combine``). ``res.timings[name]``
    holds seconds, rows per second, load seconds, chunks and workers.

    Example:
        >>> res = Prediction(["m"], {"m": [np.ones((2, 3))]}, n_rows=2, chunk_size=2)
        >>> res["m"].shape, res.ok
        ((2, 3), True)
    """

    def __init__(self, models: list[str], outputs: dict[str, list[np.ndarray] | None], *,
                 n_rows: int, chunk_size: int, combined=None, combine: str | None = None,
                 timings: dict[str, dict[str, Any]] | None = None,
                 errors: list[Exception] = (), wall_seconds: float = 0.0, source=None,
                 combined_note: str | None = None, store_path: str | None = None,
                 store_runs: dict | None = None, output_names: dict | None = None,
                 row_ids=None):
        self.models = list(models)
        self._outputs = outputs
        #: Per model, its outputs' names where the model names them (``res[name]`` is
        #: then a dict by output name).
        self.output_names = {m: tuple(n) for m, n in (output_names or {}).items() if n}
        #: The input rows' labels (a table's index, ``ids=``), for :meth:`to_pandas`.
        self.row_ids = row_ids
        self._combined = combined     # an array, or a function that computes it on access
        self.combine = combine
        self.timings = dict(timings or {})
        self.errors = list(errors)
        self.n_rows = n_rows
        self.chunk_size = chunk_size
        self.wall_seconds = wall_seconds
        self.source = source    # the input (a reference, never a copy), for the gallery
        self.labels = None      # true labels, once given to evaluate()
        # Why combined is None although combine= was asked (a model failed), or what a
        # partial combine left out: shown at the top of the views.
        self.combined_note = combined_note
        # A Prediction backed by a result store: its path, and the run that wrote each
        # model there when this Prediction was made (checked on every read).
        self.store_path = store_path
        self.store_runs = dict(store_runs or {})

    def _check_store(self, models: list[str] | None = None) -> None:
        """Raise :class:`~nbtool.errors.StoreRewritten` if another run has written this
        Prediction's result store since: its rows would be that run's, not these."""
        if self.store_path is not None:
            from nbtool.prediction.store import check_runs

            check_runs(self.store_path, self.store_runs,
                       self.models if models is None else models)

    @property
    def stale(self) -> str | None:
        """Why this Prediction's rows are gone (its result store was rewritten by another
        run), or None while they are its own.

        Example:
            >>> Prediction(["m"], {"m": [np.ones(1)]}, n_rows=1, chunk_size=1).stale is None
            True
        """
        from nbtool.errors import StoreRewritten

        try:
            self._check_store()
        except StoreRewritten as e:
            return str(e)
        return None

    @property
    def combined(self):
        """The models combined row by row (``combine=``), or None: without ``combine``, or
        when a model failed on some rows (``combined_note`` says which; predict with
        ``partial_combine=True`` to combine the others). For a prediction backed by a
        result store it is computed on first access, reading the outputs then."""
        if callable(self._combined):
            self._check_store()
            compute, self._combined = self._combined, None
            try:
                self._combined = compute()
            except CombineError as e:
                self.errors.append(e)
        return self._combined

    def __getitem__(self, name: str):
        """The model's output: one array, a list of arrays for several outputs, or a dict
        by output name when the model names them (a dict of outputs, a ``.tflite``'s or
        SavedModel's signature)."""
        outs = self.outputs(name)
        names = self.output_names.get(name)
        if names and len(names) == len(outs):
            return dict(zip(names, outs))
        return outs[0] if len(outs) == 1 else list(outs)

    def outputs(self, name: str) -> list:
        """The model's outputs as a list, in the order the model returns them (by name:
        ``res.output_names[name]``).

        Example:
            >>> res = Prediction(["m"], {"m": [np.ones((2, 3))]}, n_rows=2, chunk_size=2)
            >>> [o.shape for o in res.outputs("m")]
            [(2, 3)]
        """
        if name not in self._outputs:
            from nbtool.errors import ModelNotFound

            raise ModelNotFound(name, self.models)
        outs = self._outputs[name]
        if outs is not None:
            self._check_store([name])
        if outs is None:
            mine = [e for e in self.errors if getattr(e, "model", None) == name]
            # No chunk of this model was kept: say so rather than "everything else was".
            raise PredictionFailed(mine or self.errors, kept=0 if mine else None)
        return list(outs)

    def to_pandas(self):
        """The result as a pandas DataFrame: one row per input row, indexed by the input's
        labels (a DataFrame's index, its ``ids=`` column, or ``ids=`` given with an array;
        else 0..n-1); per model and output, for a classifier its predicted class and that
        class's probability, else one column per value (``model.output[i]``).

        Example:
            >>> res = Prediction(["m"], {"m": [np.array([[0.9, 0.1], [0.2, 0.8]])]},
            ...                  n_rows=2, chunk_size=2, row_ids=["a", "b"])
            >>> res.to_pandas()
               m.class  m.probability
            a        0            0.9
            b        1            0.8
        """
        from nbtool.prediction.result_table import prediction_frame

        self._check_store()
        return prediction_frame(self)

    def keys(self) -> list[str]:
        return list(self.models)

    def __iter__(self):
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def items(self):
        return [(m, self[m]) for m in self.models if self._outputs.get(m) is not None]

    def output_lists(self) -> dict[str, list]:
        """Each model's outputs as a list (models that failed are left out).

        Example:
            >>> Prediction(["m"], {"m": [np.ones(2)]}, n_rows=2, chunk_size=2).output_lists()
            {'m': [array([1., 1.])]}
        """
        return {m: self.outputs(m) for m in self.models if self._outputs.get(m) is not None}

    @property
    def ok(self) -> bool:
        """True when every chunk of every model succeeded (and combining did)."""
        return not self.errors

    def raise_for_errors(self) -> "Prediction":
        """Raise :class:`~nbtool.errors.PredictionFailed` if anything failed, else return self.

        Example:
            >>> Prediction(["m"], {"m": [np.ones(1)]}, n_rows=1, chunk_size=1).raise_for_errors().ok
            True
        """
        if self.errors:
            raise PredictionFailed(self.errors, kept=self._kept_chunks())
        return self

    def _kept_chunks(self) -> int | None:
        """How many (model, chunk) results succeeded (computed, resumed or cached), if the timings
        say; None when they do not."""
        counts = [t.get("chunks") for t in self.timings.values()]
        if not counts or None in counts:
            return None
        return sum(counts) + sum(t.get("resumed_chunks", 0) + t.get("cached_chunks", 0)
                                 for t in self.timings.values())

    def evaluate(self, labels) -> dict[str, float]:
        """Compare with true labels: returns accuracy per model (and ``"ensemble"``).

        The labels are kept, so the inline view adds accuracy and a confusion matrix.

        Example:
            >>> res = Prediction(["m"], {"m": [np.eye(2)]}, n_rows=2, chunk_size=2)
            >>> res.evaluate([0, 0])
            {'m': 0.5}
        """
        from nbtool.prediction.metrics import accuracy

        self._check_store()
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != self.n_rows:
            from nbtool.errors import InputMismatch

            raise InputMismatch(None, None, f"{self.n_rows} labels, one per input row",
                                f"{len(labels)} labels", "pass the labels of the same rows")
        self.labels = labels
        return accuracy(self, labels)

    def __repr__(self) -> str:
        from nbtool.prediction.report import fmt, summary_rows

        head = (f"<Prediction: {len(self.models)} model(s) x {self.n_rows} rows, "
                f"combine={self.combine!r}, {len(self.errors)} error(s), "
                f"{self.wall_seconds:.2f}s>")
        lines = [head]
        stale = self.stale
        if stale:   # nothing below would be this Prediction's
            return "\n".join([head, f"  ! {stale}"])
        if self.combined_note:
            lines.append(f"  ! {self.combined_note}")
        for r in summary_rows(self):
            lines.append("  " + "  ".join(f"{k}={fmt(v)}" for k, v in r.items()
                                           if v != "" and k != "output") )
        lines += [f"  ! {e}" for e in self.errors[:3]]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from nbtool.prediction.report import render_html

        return render_html(self)

    def save(self, path: str) -> str:
        """Write every output (and the combined one) to an ``.npz`` file; returns the path.

        Example:
            >>> res.save("preds.npz")           # doctest: +SKIP
            'preds.npz'
        """
        self._check_store()
        arrays = {}
        for m in self.models:
            names = self.output_names.get(m)
            for i, o in enumerate(self._outputs.get(m) or []):
                arrays[f"{m}:{names[i]}" if names else m if i == 0 else f"{m}:{i}"] = o
        combined = self.combined
        if isinstance(combined, dict):   # combined per named output
            arrays.update({f"combined:{k}": v for k, v in combined.items()})
        elif combined is not None:
            arrays["combined"] = combined
        np.savez(path, **arrays)
        return path


def open_prediction(path: str | os.PathLike):
    """Open a result store as a :class:`~nbtool.prediction.results.Prediction`, lazily.

    ``res[name]`` is then a zarr array: indexing it reads only those rows. Chunks that
    never completed hold NaN; ``res.completed`` says which are stored.

    Example:
        A store of 10 rows in chunks of 4, of which a worker wrote chunk 1 (rows 4 to 7):

        >>> import pathlib, tempfile
        >>> from nbtool.prediction.store import ResultStore
        >>> from nbtool.wire import StoreRef; from nbtool.worker.writing import write_chunk
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "preds.zarr"
        >>> store = ResultStore(path)
        >>> store.prepare([("cnn", "model-fp", [((3,), "float32")])], "input-fp", 10, 4)
        {'cnn': set()}
        >>> write_chunk(StoreRef(store.path, 4, store.run_id), "cnn", 1, [np.ones((4, 3), "float32")])
        >>> store.release()
        >>> res = open_prediction(path)
        >>> res.completed, res["cnn"][3:5].tolist()
        ({'cnn': {1}}, [[nan, nan, nan], [1.0, 1.0, 1.0]])
    """
    from nbtool.prediction.store import open_result_store

    store = open_result_store(path)
    if store.manifest is None:
        raise NbtoolError(f"{path}: not an nbtool result store (no {store.manifest_name}). "
                          "Fix: pass the "
                          "path given as save= to predict.")
    m = store.manifest
    models = list(m["models"])
    n_chunks = -(-m["n_rows"] // m["chunk_size"])
    res = Prediction(models, {name: store.arrays(name) for name in models},
                     n_rows=m["n_rows"], chunk_size=m["chunk_size"], store_path=store.path,
                     store_runs=store.runs(),
                     output_names={n: m["models"][n].get("names") for n in models})
    res.completed = {name: store.completed(name) for name in models}
    res.n_chunks = n_chunks
    return res
