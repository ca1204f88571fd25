"""The errors nbtool raises.

Every message names the thing (model, file, worker), says what was expected and what was
found, and ends with the fix. All of them derive from :class:`NbtoolError`, so
``except nbtool.errors.NbtoolError`` catches everything nbtool raises on purpose.

Example:
    >>> from nbtool.errors import ModelNotFound
    >>> raise ModelNotFound("cnm", known=["cnn", "mlp"])
    Traceback (most recent call last):
    ...
    nbtool.errors.ModelNotFound: no model named 'cnm' is registered; did you mean 'cnn'? ...
"""

from __future__ import annotations

import difflib


class NbtoolError(Exception):
    """Base class of every error nbtool raises on purpose.

    Example:
        >>> issubclass(ModelNotFound, NbtoolError)
        True
    """


class ModelNotFound(NbtoolError, KeyError):
    """A model name that is not registered.

    Example:
        >>> str(ModelNotFound("cnm", known=["cnn"]))  # doctest: +ELLIPSIS
        "no model named 'cnm' is registered; did you mean 'cnn'? ..."
    """

    def __init__(self, name: str, known: list[str] | tuple[str, ...] = (),
                 register_hint: str | None = None):
        self.name = name
        self.known = sorted(known)
        close = difflib.get_close_matches(name, self.known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listing = ", ".join(repr(k) for k in self.known[:10]) or "none yet"
        if len(self.known) > 10:
            listing += f" and {len(self.known) - 10} more (eng.models() lists them)"
        super().__init__(
            f"no model named {name!r} is registered; {hint}registered: {listing}. "
            "Register it first with "
            + (register_hint or f"eng.register({name!r}, 'path/to/model.keras')") + "."
        )

    # KeyError's str() adds quotes around the message; keep it readable.
    __str__ = Exception.__str__

    def __reduce__(self):
        return (type(self), (self.name, self.known))


class ModelFileError(NbtoolError, FileNotFoundError):
    """A model file that is missing, unreadable or corrupt.

    Example:
        >>> str(ModelFileError("cnn", "models/cnn.keras", "the file does not exist",
        ...     "check the path"))
        "model 'cnn' (models/cnn.keras): the file does not exist. Fix: check the path."
    """

    def __init__(self, model: str | None, path: str, problem: str, fix: str):
        self.model, self.path, self.problem, self.fix = model, str(path), problem, fix
        who = f"model {model!r} ({path})" if model else f"file {path}"
        super().__init__(f"{who}: {problem}. Fix: {fix}.")

    __str__ = Exception.__str__

    def __reduce__(self):  # keep it picklable across Dask workers
        return (type(self), (self.model, self.path, self.problem, self.fix))


class UnsupportedFormat(NbtoolError, ValueError):
    """A path whose format nbtool cannot run.

    Example:
        >>> str(UnsupportedFormat("m", "m.onnx"))  # doctest: +ELLIPSIS
        "model 'm' (m.onnx): ... expected a .keras, .h5 or .tflite file..."
    """

    def __init__(self, model: str | None, path: str, found: str | None = None):
        self.model, self.path, self.found = model, str(path), found
        what = found or f"a file ending in {_suffix(path)!r}"
        super().__init__(
            f"model {model!r} ({path}): nbtool cannot run {what}; expected a .keras, .h5 "
            "or .tflite file, or a TensorFlow SavedModel directory (one with saved_model.pb). "
            "Fix: save the model with model.save('name.keras'), or model.export('dir') for "
            "a SavedModel."
        )

    __str__ = Exception.__str__

    def __reduce__(self):
        return (type(self), (self.model, self.path, self.found))


class ModelLoadError(NbtoolError, RuntimeError):
    """A model file that exists but could not be loaded on a worker.

    Example:
        >>> str(ModelLoadError("cnn", "cnn.keras", "gpu0", "bad zip", "re-save it"))
        "model 'cnn' (cnn.keras) failed to load on worker 'gpu0': bad zip. Fix: re-save it."
    """

    def __init__(self, model: str, path: str, worker: str | None, reason: str, fix: str):
        self.model, self.path, self.worker, self.reason, self.fix = (
            model, str(path), worker, reason, fix)
        where = f" on worker {worker!r}" if worker else ""
        super().__init__(f"model {model!r} ({path}) failed to load{where}: {reason}. Fix: {fix}.")

    def __reduce__(self):
        return (type(self), (self.model, self.path, self.worker, self.reason, self.fix))


class InputMismatch(NbtoolError, ValueError):
    """An input whose shape or dtype does not fit a model; raised before anything runs.

    Example:
        >>> str(InputMismatch("mlp", "mlp.h5", "rows of shape (8,)", "rows of shape (3,)",
        ...     "reshape the input"))
        "model 'mlp' (mlp.h5) expects rows of shape (8,), got rows of shape (3,). Fix: reshape the input."
    """

    def __init__(self, model: str | None, path: str | None, expected: str, found: str, fix: str):
        self.model, self.path, self.expected, self.found, self.fix = (
            model, path, expected, found, fix)
        who = f"model {model!r} ({path})" if model else "the input"
        super().__init__(f"{who} expects {expected}, got {found}. Fix: {fix}.")

    def __reduce__(self):
        return (type(self), (self.model, self.path, self.expected, self.found, self.fix))


class PlacementError(NbtoolError, ValueError):
    """A device request that no worker of the cluster can satisfy.

    Example:
        >>> str(PlacementError("cnn", "gpu:3", ["cpu:0", "cpu:1"], "start with gpus=[3]"))
        "model 'cnn' asks for device 'gpu:3', but the cluster has cpu:0, cpu:1. Fix: start with gpus=[3]."
    """

    def __init__(self, model: str, device: str, available: list[str], fix: str,
                 replicas: int = 1):
        self.model, self.device, self.available, self.fix, self.replicas = (
            model, device, available, fix, replicas)
        have = ", ".join(available) or "no workers"
        on = f" on {replicas} workers" if replicas > 1 else ""
        super().__init__(f"model {model!r} asks for device {device!r}{on}, but the cluster "
                         f"has {have}. Fix: {fix}.")

    def __reduce__(self):
        return (type(self), (self.model, self.device, self.available, self.fix, self.replicas))


class ChunkError(NbtoolError, RuntimeError):
    """One (model, chunk) task that failed; the other chunks are kept.

    Example:
        >>> e = ChunkError("cnn", 3, (300, 400), "cpu0", "ValueError: boom")
        >>> str(e)  # doctest: +ELLIPSIS
        "model 'cnn' failed on chunk 3 (rows 300:400) on worker 'cpu0': ValueError: boom..."
    """

    def __init__(self, model: str, chunk: int, rows: tuple[int, int], worker: str | None,
                 reason: str):
        self.model, self.chunk, self.rows, self.worker, self.reason = (
            model, chunk, tuple(rows), worker, reason)
        where = f" on worker {worker!r}" if worker else ""
        super().__init__(
            f"model {model!r} failed on chunk {chunk} (rows {rows[0]}:{rows[1]}){where}: "
            f"{reason}. The other chunks were kept; rerun just these rows with "
            f"eng.predict([{model!r}], x[{rows[0]}:{rows[1]}]) once the cause is fixed.")

    def __reduce__(self):
        return (type(self), (self.model, self.chunk, self.rows, self.worker, self.reason))


class PredictionFailed(NbtoolError, RuntimeError):
    """Raised by ``Prediction.raise_for_errors()`` when any chunk failed.

    Example:
        >>> err = PredictionFailed([ChunkError("cnn", 0, (0, 10), None, "boom")])
        >>> len(err.errors)
        1
    """

    def __init__(self, errors: list[Exception]):
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors[:10])
        more = f"\n  ... and {len(self.errors) - 10} more" if len(self.errors) > 10 else ""
        super().__init__(
            f"{len(self.errors)} part(s) of the prediction failed; everything else was kept "
            f"in the Prediction (rows of failed chunks are NaN):\n{lines}{more}")

    def __reduce__(self):
        return (type(self), (self.errors,))


def _suffix(path: str) -> str:
    name = str(path).rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1] if "." in name else "(no suffix)"


def first_line(text: str, limit: int = 300) -> str:
    r"""The first line of a (library's) error message, cut at ``limit`` characters: what an
    nbtool error quotes as its reason.

    Example:
        >>> first_line("ValueError: bad magic\n  at line 3")
        'ValueError: bad magic'
    """
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else line[:limit] + "..."
