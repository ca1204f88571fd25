"""The guard on a converted runtime: every row it computes is either like the rows its
agreement check saw at load, or checked against TensorFlow before its result leaves the
worker.

A conversion (OpenVINO, LiteRT) is chosen or forced after agreeing with TensorFlow on 64
rows. Rows unlike those can still differ (a ``softplus`` overflowing to inf in float32
where TensorFlow's stays finite; ``LayerNormalization`` losing digits on rows offset to
thousands), so each piece of rows a converted model runs is looked at before its outputs
are returned:

- **Unlike the checked rows**: a row with a value outside the range each input feature
  took in the checked rows (for an image or a sequence: outside the range of all their
  values), or whose mean or spread (max - min) is outside what the checked rows had (each
  range widened by :data:`MARGIN` of itself on both sides), is computed by TensorFlow too
  and compared. Rows that agree widen the range, so a drift is
  paid for once, not every chunk.
- **A non-finite output from a finite row** is compared the same way (TensorFlow may give
  inf too; then they agree).
- **Spot checks**: whenever TensorFlow is opened for such rows, :data:`SPOT_ROWS` random
  ordinary rows of the same piece are compared too. TensorFlow's copy is let go after the
  comparison (it would hold a second copy of the weights against the budget); the rows it
  was opened for are in the envelope from then on, and the envelope is remembered with the
  machine's choice, so a drift costs one comparison per machine, not one per chunk.

If they disagree (:func:`~nbtool.worker.auto.agreement.compare`: max abs diff over
:data:`~nbtool.worker.auto.agreement.TOLERANCE`, or another top-1), an ``auto`` model falls back
to TensorFlow on that worker for good (the piece is computed again in TensorFlow, and the
machine remembers TensorFlow for that file), with a note that reaches the notebook; a
forced runtime fails the chunk with an error that says so. Rows with a NaN or inf input are
not judged: a converted runtime gives NaN for them by design.

Example:
    >>> env = Envelope.of(np.array([[0.0, 1.0], [1.0, 3.0]], "float32"))
    >>> env.outside(np.array([[0.5, 2.0], [0.5, 9.0], [400.0, 2.0]], "float32")).tolist()
    [False, True, True]
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from nbtool.worker.auto.agreement import Agreement, compare

logger = logging.getLogger("nbtool.worker")

#: How far past the checked rows' range (as a share of that range, on each side) a value,
#: a row mean or a row spread may go and still count as like them. Wide enough that rows
#: drawn like the checked ones almost never leave it (64 normal rows span about +-2.4,
#: so about +-4.8 is allowed), narrow enough that the rows that broke conversions (values
#: scaled by 200, offset to 3e3) are far outside.
MARGIN = 0.5
#: Ordinary rows of a piece compared as well whenever TensorFlow is opened for it.
SPOT_ROWS = 4


def _views(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the box of its values (each feature's value for a row of features, the
    row's min and max for an image or a sequence), its (mean, spread), and whether every
    value is finite. Three passes over the rows at most (min, max, sum): this runs on
    every piece a conversion computes, so it must cost little beside the model.

    Example:
        >>> lo, hi, stats, ok = _views(np.array([[1.0, 5.0], [np.nan, 0.0]]))
        >>> lo[0].tolist(), stats[0].tolist(), ok.tolist()
        ([1.0, 5.0], [3.0, 4.0], [True, False])
        >>> lo, hi, _, _ = _views(np.zeros((2, 4, 4, 3), "uint8")); lo.shape
        (2, 1)
    """
    n = len(rows)
    flat = rows.reshape(n, -1)
    row_min, row_max = flat.min(axis=1), flat.max(axis=1)
    # float32 rows sum in float32 (pairwise: exact enough for a range check, and fast);
    # float16 in float64 (it would overflow); integers in numpy's default (int64).
    acc = (np.float32 if flat.dtype == np.float32 else np.float64) \
        if flat.dtype.kind == "f" else None
    mean = flat.sum(axis=1, dtype=acc) / max(flat.shape[1], 1)
    row_min, row_max = row_min.astype(np.float64), row_max.astype(np.float64)
    stats = np.stack([np.asarray(mean, np.float64), row_max - row_min], axis=1)
    ok = np.isfinite(row_min) & np.isfinite(row_max)   # a NaN or inf anywhere shows here
    if rows.ndim == 2:   # a row of features (a table): each feature's own range
        lo = hi = flat   # as they are: a float64 copy would cost more than the check
    else:                # an image, a sequence: the row's range (per-position ranges would
        lo, hi = row_min[:, None], row_max[:, None]   # cost passes over every pixel)
    return lo, hi, stats, ok


@dataclasses.dataclass
class Envelope:
    """What the agreement check saw: the range of each input feature's values (of all
    values, for images and sequences), and the range of the rows' means and spreads. Rows
    outside it (with :data:`MARGIN`) are unlike the checked rows.

    Example:
        >>> env = Envelope.of(np.zeros((4, 3), "float32"))
        >>> Envelope.from_dict(env.to_dict()) == env
        True
    """

    lo: np.ndarray
    hi: np.ndarray
    stats_lo: np.ndarray
    stats_hi: np.ndarray

    def __eq__(self, other) -> bool:
        return isinstance(other, Envelope) and all(
            np.array_equal(a, b) for a, b in zip(dataclasses.astuple(self),
                                                 dataclasses.astuple(other)))

    @classmethod
    def of(cls, rows: np.ndarray) -> "Envelope | None":
        """The envelope of ``rows``' finite rows; None if there is none (or the rows are
        not numbers: strings are never converted).

        Example:
            >>> Envelope.of(np.array([[np.nan]])) is None
            True
        """
        rows = np.asarray(rows)
        if rows.dtype.kind not in "biuf" or not len(rows):
            return None
        lo, hi, stats, ok = _views(rows)
        if not ok.any():
            return None
        return cls(lo[ok].min(axis=0).astype(np.float64), hi[ok].max(axis=0).astype(np.float64),
                   stats[ok].min(axis=0), stats[ok].max(axis=0))

    def _bounds(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # A constant feature (a padding zero, an unused one-hot column) gets no room: a row
        # that changes it is unlike every checked row. The tiny relative slack only lets
        # a value equal to a bound through after float rounding.
        margin = MARGIN * (hi - lo) + 1e-7 * np.maximum(np.abs(lo), np.abs(hi))
        return lo - margin, hi + margin

    def outside(self, rows: np.ndarray, with_finite: bool = False):
        """Which of ``rows`` (all values finite) are unlike the checked rows; a row with a
        NaN or inf is not (a converted runtime gives NaN for it, by design). With
        ``with_finite``, also which rows are all finite. Rows whose feature count differs
        (free sizes) are compared by their statistics only.

        Example:
            >>> Envelope.of(np.ones((3, 2))).outside(np.array([[1.0, np.inf], [1.0, 2.0]])).tolist()
            [False, True]
        """
        lo, hi, stats, ok = _views(np.asarray(rows))
        f_lo, f_hi = self._bounds(self.lo, self.hi)
        s_lo, s_hi = self._bounds(self.stats_lo, self.stats_hi)
        away = ((stats < s_lo) | (stats > s_hi)).any(axis=1)
        if lo.shape[1] == len(f_lo):
            if lo.dtype == np.float32:   # compared in float32 (the margin dwarfs the cast)
                f_lo, f_hi = f_lo.astype(np.float32), f_hi.astype(np.float32)
            away |= ((lo < f_lo) | (hi > f_hi)).any(axis=1)
        return (away & ok, ok) if with_finite else away & ok

    def widen(self, rows: np.ndarray) -> bool:
        """Take ``rows`` (checked, and agreeing) into the envelope; whether it grew.

        Example:
            >>> env = Envelope.of(np.zeros((2, 1))); env.widen(np.full((1, 1), 5.0)), env.hi.tolist()
            (True, [5.0])
        """
        other = Envelope.of(rows)
        if other is None or other.lo.shape != self.lo.shape:
            return False
        wider = Envelope(np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi),
                         np.minimum(self.stats_lo, other.stats_lo),
                         np.maximum(self.stats_hi, other.stats_hi))
        grew = wider != self
        self.lo, self.hi, self.stats_lo, self.stats_hi = dataclasses.astuple(wider)
        return grew

    def to_dict(self) -> dict:
        """Plain lists, for the runtime record (JSON).

        Example:
            >>> sorted(Envelope.of(np.zeros((1, 2))).to_dict())
            ['hi', 'lo', 'stats_hi', 'stats_lo']
        """
        return {k: np.asarray(v).tolist() for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Envelope | None":
        """The envelope :meth:`to_dict` wrote (None for None, or anything unreadable).

        Example:
            >>> Envelope.from_dict(None) is None, Envelope.from_dict({"lo": 1}) is None
            (True, True)
        """
        try:
            return cls(*(np.asarray(d[k], np.float64) for k in ("lo", "hi", "stats_lo",
                                                               "stats_hi")))
        except (TypeError, KeyError, ValueError):
            return None


def suspect_rows(envelope: Envelope, rows: np.ndarray, outputs: list[np.ndarray],
                 spot: int, rng: np.random.Generator) -> np.ndarray:
    """The indices of ``rows`` to compare against TensorFlow: those unlike the checked
    rows, those with a finite input but a non-finite output, and, if there are any,
    ``spot`` random others.

    Example:
        >>> env = Envelope.of(np.zeros((2, 2), "float32") + [[0], [1]])
        >>> x = np.array([[0.5, 0.5], [0.5, 0.5], [9, 9]], "float32")
        >>> out = [np.array([[1.0], [np.inf], [1.0]])]
        >>> suspect_rows(env, x, out, 0, np.random.default_rng(0)).tolist()
        [1, 2]
    """
    rows = np.asarray(rows)
    if rows.dtype.kind not in "biuf" or not len(rows):
        return np.zeros(0, int)
    suspect, finite_in = envelope.outside(rows, with_finite=True)
    for out in outputs:
        out = np.asarray(out)
        if out.dtype.kind == "f" and len(out) == len(rows):
            suspect |= finite_in & ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
    if spot and suspect.any():   # spot rows ride along only when TensorFlow opens anyway
        others = np.flatnonzero(~suspect & finite_in)
        if len(others):
            suspect[rng.choice(others, size=min(spot, len(others)), replace=False)] = True
    return np.flatnonzero(suspect)


def compare_checked(want: list[np.ndarray], got: list[np.ndarray]) -> Agreement:
    """:func:`~nbtool.worker.auto.agreement.compare`, where the same non-finite value in both
    (inf and inf, NaN and NaN) counts as agreeing: TensorFlow overflows too, sometimes.

    Example:
        >>> compare_checked([np.array([[np.inf, 1.0]])], [np.array([[np.inf, 1.0]])]).agrees
        True
        >>> compare_checked([np.array([[3.0, 1.0]])], [np.array([[np.inf, 1.0]])]).agrees
        False
    """
    same_w, same_g = [], []
    for a, b in zip(want, got):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape == b.shape:
            equal = (a == b) | (np.isnan(a) & np.isnan(b))
            a, b = np.where(equal, 0.0, a), np.where(equal, 0.0, b)
        same_w.append(a)
        same_g.append(b)
    return compare(same_w, same_g)


@dataclasses.dataclass
class Guard:
    """The guard of one converted model resident in one worker: its envelope, and
    TensorFlow's predictor for it, opened when rows need comparing (charged to the budget
    meanwhile) and let go once they agreed.

    ``forced``: the user forced the runtime (a disagreement fails the chunk instead of
    falling back).

    Example:
        >>> guard = Guard(spec, "openvino", Envelope.of(x[:64]), forced=False, batch=64)  # doctest: +SKIP
        >>> guard.check(rows, outputs) is None       # nothing unlike the checked rows  # doctest: +SKIP
        True
    """

    spec: object
    runtime: str
    envelope: Envelope
    forced: bool
    batch: int
    reference: object = None        # TensorFlow's predictor, at ``batch``
    reference_call: object = None   # the Keras model it runs
    reference_bytes: int = 0
    checked_rows: int = 0           # rows compared with TensorFlow so far
    widened: bool = False           # the envelope grew since it was last remembered
    rng: np.random.Generator = dataclasses.field(
        default_factory=lambda: np.random.default_rng(0))

    def open_reference(self):
        """TensorFlow's predictor for the model (opened now if it is not yet).

        Example:
            >>> guard.open_reference()(x[:3])[0].shape   # doctest: +SKIP
            (3, 4)
        """
        if self.reference is None:
            from nbtool.worker.auto.candidates import open_original
            from nbtool.worker.runtimes import make_predictor

            tf_model = open_original(self.spec)
            self.reference = make_predictor(self.spec, tf_model.call, self.batch,
                                            tf_model.row_shape, tf_model.dtype)
            self.reference.warm_up()
            self.reference_call = tf_model.call
            self.reference_bytes = tf_model.weight_bytes
            logger.info("%s: TensorFlow opened to check %s's rows", self.spec.name,
                        self.runtime)
        return self.reference

    def check(self, rows: np.ndarray, outputs: list[np.ndarray]) -> tuple[Agreement, int] | None:
        """None when ``outputs`` (the conversion's, for ``rows``) can be trusted: no row
        was suspect (:func:`suspect_rows`), or the suspects agreed with TensorFlow (the
        envelope then takes them in). Else the disagreement and how many rows were
        compared.

        Example:
            >>> guard.check(x[:10], [model(x[:10])]) is None   # doctest: +SKIP
            True
        """
        # TensorFlow is opened only for suspect rows; then a few ordinary ones come along.
        idx = suspect_rows(self.envelope, rows, outputs, SPOT_ROWS, self.rng)
        if not len(idx):
            return None
        picked = np.asarray(rows)[idx]
        want = self.open_reference()(picked)
        agreement = compare_checked(want, [np.asarray(o)[idx] for o in outputs])
        self.checked_rows += len(idx)
        if not agreement.agrees:
            return agreement, len(idx)   # TensorFlow's copy stays: it runs the model now
        self.widened = self.envelope.widen(picked) or self.widened
        self.release_reference()
        return None

    def release_reference(self) -> None:
        """Let TensorFlow's copy go: the rows it was opened for are taken into the
        envelope, so it is rarely needed again, and while it stayed it would hold a second
        copy of the weights against the worker's budget.

        Example:
            >>> guard.release_reference(); guard.reference is None   # doctest: +SKIP
            True
        """
        self.reference = self.reference_call = None
        self.reference_bytes = 0
