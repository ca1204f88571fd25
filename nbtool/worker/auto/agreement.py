"""Whether another runtime computes what TensorFlow computes: the rows a conversion is
checked on, the comparison (max abs diff per output, and the same top-1), and the timing of
the runtimes that agree.

A conversion (OpenVINO IR, LiteRT flatbuffer) is used only after its outputs were compared
with TensorFlow's on the same rows: the user's own rows when the load happens inside a
prediction, else seeded random rows of the model's input.

Example:
    >>> ref = [np.array([[0.1, 0.9], [0.5, 0.5]])]
    >>> compare(ref, [np.array([[0.1, 0.9], [0.5, 0.5]]) + 1e-6]).agrees
    True
    >>> compare(ref, [np.array([[0.9, 0.1], [0.5, 0.5]])]).why
    'max abs diff 0.8 (tolerance 0.0001); top-1 differs on 1 of 1 rows'
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import numpy as np

from nbtool.errors import ModelLoadError
from nbtool.wire import ModelSpec
from nbtool.worker.environment import worker_name
from nbtool.worker.runtimes import probe_rows

#: The largest difference from TensorFlow (per output, absolute) a conversion may show.
TOLERANCE = 1e-4
#: Rows of the agreement check at load: the first of the user's, else random (seeded).
CHECK_ROWS = 64
#: About how long the timing of the candidates may take, all rounds together (seconds).
TIMING_BUDGET = 1.5


@dataclasses.dataclass
class Agreement:
    """How a runtime's outputs compare with TensorFlow's on the same rows.

    ``diff``: the largest absolute difference over every output (inf when their shapes
    differ, NaN when either holds NaN); ``top1_differs``: the rows whose top-1 differs,
    among those whose reference top-1 is clear (margin over the tolerance); ``why``: what
    was wrong, None when it agrees.
    """

    diff: float
    top1_differs: int = 0
    top1_rows: int = 0
    why: str | None = None

    @property
    def agrees(self) -> bool:
        """Within the tolerance everywhere, and the same top-1 on every clear row."""
        return self.why is None


def compare(want: list[np.ndarray], got: list[np.ndarray],
            tolerance: float = TOLERANCE) -> Agreement:
    """``got`` against the reference ``want``: max abs diff <= ``tolerance`` per output,
    and, for outputs whose last axis has more than one entry, the same top-1 on every row
    whose reference top-1 leads by more than ``tolerance`` (a near-tie is no disagreement).

    Example:
        >>> compare([np.zeros((2, 3))], [np.zeros((2, 1, 3))]).why
        'outputs of shapes [(2, 1, 3)] where TensorFlow gives [(2, 3)]'
    """
    shapes = [tuple(y.shape) for y in got], [tuple(y.shape) for y in want]
    if shapes[0] != shapes[1]:
        return Agreement(float("inf"), why=f"outputs of shapes {shapes[0]} where "
                                           f"TensorFlow gives {shapes[1]}")
    diff, differs, clear = 0.0, 0, 0
    for a, b in zip(want, got):
        a, b = a.astype(np.float64), b.astype(np.float64)
        d = float(np.max(np.abs(a - b), initial=0.0))
        diff = d if np.isnan(d) or d > diff else diff
        if a.ndim >= 2 and a.shape[-1] > 1 and a.size:
            top2 = np.sort(a, axis=-1)[..., -2:]
            sure = (top2[..., 1] - top2[..., 0]) > tolerance
            same = np.argmax(a, axis=-1) == np.argmax(b, axis=-1)
            clear += int(sure.sum())
            differs += int((sure & ~same).sum())
    problems = []
    if not diff <= tolerance:   # NaN too
        problems.append(f"max abs diff {diff:.2g} (tolerance {tolerance:g})")
    if differs:
        problems.append(f"top-1 differs on {differs} of {clear} rows")
    return Agreement(diff, differs, clear, "; ".join(problems) or None)


def check_agreement(spec: ModelSpec, runtime: str, predictor, reference, rows: np.ndarray,
                    tolerance: float = TOLERANCE) -> float:
    """The largest difference between ``predictor`` (a ``runtime`` conversion) and
    TensorFlow's ``reference`` on ``rows``; a :class:`~nbtool.errors.ModelLoadError` if
    they disagree (:func:`compare`), so a forced runtime's load fails.

    Example:
        >>> spec = ModelSpec("cnn", "/m/cnn.keras", "keras", 10, "10-1")
        >>> x = np.zeros((4, 2), "float32")
        >>> check_agreement(spec, "openvino", lambda r: [r + 1e-6], lambda r: [r], x) <= 1e-6
        True
        >>> check_agreement(spec, "openvino", lambda r: [r + 0.5], lambda r: [r], x)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.ModelLoadError: ...its openvino conversion gives max abs diff 0.5 (tolerance 0.0001) from TensorFlow on 4 rows...
    """
    agreement = compare(reference(rows), predictor(rows), tolerance)
    if not agreement.agrees:
        raise ModelLoadError(spec.name, spec.path, worker_name(),
                             f"its {runtime} conversion gives {agreement.why} from TensorFlow "
                             f"on {len(rows)} rows", "register it with runtime='auto' or "
                             f"runtime='tensorflow' (eng.register({spec.name!r}, "
                             f"{spec.path!r}, runtime='tensorflow'))")
    return agreement.diff


def check_rows(row_shape: tuple, dtype, sample: np.ndarray | None) -> tuple[np.ndarray, str]:
    """The rows a conversion is checked on, and how to name them: the user's ``sample``
    (its first ``CHECK_ROWS`` rows whose values are all finite: a NaN row checks nothing),
    topped up with random rows when it has fewer; else ``CHECK_ROWS`` random rows.

    Example:
        >>> rows, what = check_rows((2,), "float32", np.array([[1, 2], [np.nan, 0]], "float32"))
        >>> rows.shape, what
        ((64, 2), '1 of your rows and 63 random rows')
        >>> check_rows((2,), "float32", None)[1]
        '64 random rows'
    """
    dtype = np.dtype(dtype)
    if sample is None or not len(sample):
        return probe_rows(row_shape, dtype, CHECK_ROWS), f"{CHECK_ROWS} random rows"
    rows = np.asarray(sample[:CHECK_ROWS])
    if rows.dtype.kind == "f":
        rows = rows[np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)]
    rows = rows.astype(dtype, copy=False)
    missing = CHECK_ROWS - len(rows)
    if not missing:
        return rows, f"{len(rows)} of your rows"
    if None in row_shape or (len(rows) and rows.shape[1:] != tuple(row_shape)):
        if len(rows):   # any size (a resizing preprocess): random rows would not fit
            return rows, f"{len(rows)} of your rows"
        return probe_rows(row_shape, dtype, CHECK_ROWS), f"{CHECK_ROWS} random rows"
    if dtype.kind in "biu":   # ids (tokens, categories): random ones may be out of range
        extra = rows[np.arange(missing) % len(rows)]
        return np.concatenate([rows, extra]), f"{len(rows)} of your rows (repeated to {CHECK_ROWS})"
    extra = probe_rows(row_shape, dtype, missing)
    return np.concatenate([rows, extra]), f"{len(rows)} of your rows and {missing} random rows"


#: The batches ``auto`` times a model at when the user gave none, and the most input one
#: batch may hold: activations grow with the batch, and a 224x224 image batch of 128 is
#: already 77 MB of input alone.
CHOICE_BATCHES = (32, 64, 128)
BATCH_INPUT_LIMIT = 32 * 2**20


def candidate_batches(row_shape: tuple, dtype, default: int) -> tuple[int, ...]:
    """The batches worth timing for a model taking rows of ``row_shape`` and ``dtype``:
    those of :data:`CHOICE_BATCHES` whose input fits :data:`BATCH_INPUT_LIMIT`, and always
    ``default`` (only ``default`` when a dimension is not fixed).

    Example:
        >>> candidate_batches((64, 64, 3), "float32", 64)
        (32, 64, 128)
        >>> candidate_batches((224, 224, 3), "float32", 64), candidate_batches((None, 8), "float32", 64)
        ((32, 64), (64,))
    """
    if any(d is None for d in row_shape):
        return (default,)
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    return tuple(sorted({default, *(b for b in CHOICE_BATCHES
                                    if b * row_bytes <= BATCH_INPUT_LIMIT)}))


def timing_batch(rows: np.ndarray, batch_size: int) -> np.ndarray:
    """``rows`` repeated (or cut) to exactly one batch: what a predictor runs per call.

    Example:
        >>> timing_batch(np.arange(3)[:, None], 5).ravel().tolist()
        [0, 1, 2, 0, 1]
    """
    return rows[np.arange(batch_size) % len(rows)]


def time_alternating(runners: dict[str, Callable[[], object]],
                     budget: float = TIMING_BUDGET, min_rounds: int = 3,
                     max_rounds: int = 9) -> dict[str, float]:
    """The median seconds of each runner's call, the runners taking turns round after round
    (so a slower moment of the machine falls on all of them), at least ``min_rounds``, then
    more while the ``budget`` lasts. Each is called once first, untimed (warm caches).

    Example:
        >>> t = time_alternating({"a": lambda: time.sleep(0.001), "b": lambda: None}, 0.01)
        >>> t["a"] > t["b"]
        True
    """
    for run in runners.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    started = time.perf_counter()
    for i in range(max_rounds):
        if i >= min_rounds and time.perf_counter() - started > budget:
            break
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}
