"""What a model takes and gives, as both sides know it: each input (name, shape, dtype,
text or numbers), rows for several inputs (a dict of arrays by input name), and the names
and order of a model's outputs.

The kernel reads these from model files at register; the workers from the loaded model;
both speak of them the same way, so a name or an order never differs between the two.

Example:
    >>> meta = InputSpec("meta", (None, 3))
    >>> meta.describe(), tensorflow_only([meta, InputSpec("text", (None, 1), "string")])
    ("'meta' (rows of (3,), float32)", 'it takes 2 inputs')
    >>> take_rows({"image": np.zeros((4, 2)), "meta": np.ones((4, 3))}, 1, 3)["meta"].shape
    (2, 3)
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from nbtool.wire import is_text_dtype


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One input of a model: its name, batch shape (``None`` where any size goes) and
    dtype (``"string"`` for text).

    Example:
        >>> InputSpec("meta", (None, 3)).row_shape, InputSpec("text", (None, 1), "string").text
        ((3,), True)
    """

    name: str
    shape: tuple | None = None
    dtype: str = "float32"

    @property
    def row_shape(self) -> tuple | None:
        """The shape of one row (the batch shape without its first axis), if known."""
        return None if self.shape is None else tuple(self.shape[1:])

    @property
    def text(self) -> bool:
        """Whether it takes strings."""
        return is_text_dtype(self.dtype)

    def describe(self) -> str:
        """``'meta' (rows of (3,), float32)``: how errors name it.

        Example:
            >>> InputSpec("meta", (None, None, 3)).describe()
            "'meta' (rows of (?, 3), float32)"
        """
        rows = "?" if self.row_shape is None else \
            "(" + ", ".join("?" if d is None else str(d) for d in self.row_shape) + \
            ("," if len(self.row_shape) == 1 else "") + ")"
        return f"{self.name!r} (rows of {rows}, {self.dtype})"


def tensorflow_only(inputs) -> str | None:
    """Why a model with these inputs (:class:`InputSpec`) runs in TensorFlow
    only (its conversions to OpenVINO and LiteRT here take one numeric input), or None.

    Example:
        >>> tensorflow_only([InputSpec("text", (None, 1), "string")])
        'its input is text (strings)'
        >>> tensorflow_only([InputSpec("x", (None, 8))]) is None
        True
    """
    if len(inputs) > 1:
        return f"it takes {len(inputs)} inputs"
    if inputs and inputs[0].text:
        return "its input is text (strings)"
    return None


#: The SavedModel signatures the worker calls, in the order it looks for them
#: (``model.export`` writes "serve"; ``tf.saved_model.save`` writes "serving_default").
SAVEDMODEL_ENDPOINTS = ("serve", "serving_default")


def named_outputs(names) -> tuple[list[str], tuple | None]:
    """The order a model's outputs come back in, by their names (a dict's keys, a
    signature's), and the names to give them: ``(order, names)``, where ``names`` is None
    when they are only numbers (``output_0``, ``output_1``... as Keras and converters
    call unnamed outputs: ordered by their number, not as text).

    Example:
        >>> named_outputs(["output_1", "output_10", "output_2", "output_0"])
        (['output_0', 'output_1', 'output_2', 'output_10'], None)
        >>> named_outputs(["note", "contour", "onset"])
        (['contour', 'note', 'onset'], ('contour', 'note', 'onset'))
    """
    names = list(names)
    numbers = [re.fullmatch(r"output_(\d+)", n) for n in names]
    if names and all(numbers):
        return [n for _, n in sorted(zip((int(m.group(1)) for m in numbers), names))], None
    order = sorted(names)
    return order, tuple(order)


def row_count(rows) -> int:
    """The rows in ``rows``: an array, or a dict of arrays by input name (several inputs).

    Example:
        >>> row_count({"a": np.zeros((3, 2)), "b": np.zeros((3,))}), row_count(np.zeros(4))
        (3, 4)
    """
    if isinstance(rows, dict):
        return len(next(iter(rows.values()))) if rows else 0
    return int(np.shape(rows)[0]) if not hasattr(rows, "__len__") else len(rows)


def take_rows(rows, start: int, stop: int | None):
    """Rows ``start:stop`` of an array or of every array of a dict (several inputs).

    Example:
        >>> take_rows({"a": np.arange(4), "b": np.arange(4) * 2}, 1, 3)
        {'a': array([1, 2]), 'b': array([2, 4])}
    """
    if isinstance(rows, dict):
        return {k: v[start:stop] for k, v in rows.items()}
    return rows[start:stop]
