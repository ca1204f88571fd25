"""Every error nbtool raises on purpose (all of them: no module defines its own), and how they cross between processes.

Every message names the thing (model, file, worker), says what was expected and what was
found, and ends with the fix. All derive from :class:`NbtoolError`, so ``except
nbtool.errors.NbtoolError`` catches everything nbtool raises on purpose.

Example:
    >>> str(ModelNotFound("cnm", known=["cnn", "mlp"]))  # doctest: +ELLIPSIS
    "no model named 'cnm' is registered; did you mean 'cnn'? ..."
"""

from __future__ import annotations

import difflib
import functools
import inspect
import time
from typing import Sequence


class NbtoolError(Exception):
    """Base class of every error nbtool raises on purpose.

    Errors cross processes pickled, and an exception pickles as its class and ``args`` (the
    message here). So each subclass's ``__init__`` is wrapped once, here: it records its
    arguments for unpickling to call it again with (no class writes a ``__reduce__``), and
    keeps each as an attribute of its name (``e.model``...).

    Example:
        >>> import pickle
        >>> e = ModelNotFound("cnm", known=["cnn"], register_hint="%nbtool register cnm x")
        >>> e.name, str(pickle.loads(pickle.dumps(e))) == str(e)
        ('cnm', True)
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            if "_init_args" not in self.__dict__:   # the outermost call: the real arguments
                self._init_args = (args, kw)
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                self.__dict__.update(list(bound.arguments.items())[1:])   # after self
            init(self, *args, **kw)

        cls.__init__ = recording_init

    def __reduce__(self):   # unpickled as its class called with the arguments it was given
        args, kw = self.__dict__.get("_init_args", (self.args, {}))
        return functools.partial(type(self), *args, **kw), ()

    # KeyError and OSError subclasses print their message differently; every one reads as is.
    __str__ = Exception.__str__


def _end(text: str) -> str:
    """``text`` ending in one period: none added after one, or after a cut's "..."."""
    text = str(text).rstrip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _who(model: str | None, path, otherwise: str) -> str:
    """How a message names its model: ``model 'cnn' (cnn.keras)``, else ``otherwise``."""
    return f"model {model!r} ({path})" if model else otherwise


def _on(worker: str | None) -> str:
    return f" on worker {worker!r}" if worker else ""


def first_line(text: str, limit: int = 300) -> str:
    r"""The first line of a library's error message, cut at ``limit`` characters.

    Example:
        >>> first_line("ValueError: bad magic\n  at line 3")
        'ValueError: bad magic'
    """
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else line[:limit] + "..."


# -- registering: names, files, options ---------------------------------------------------
class ModelNotFound(NbtoolError, KeyError):
    """A model name that is not registered.

    Example:
        >>> str(ModelNotFound("cnm", known=["cnn"]))  # doctest: +ELLIPSIS
        "no model named 'cnm' is registered; did you mean 'cnn'? ..."
    """

    def __init__(self, name: str, known: Sequence[str] = (), register_hint: str | None = None):
        self.known = sorted(known)
        close = difflib.get_close_matches(name, self.known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listing = ", ".join(repr(k) for k in self.known[:10]) or "none yet"
        if len(self.known) > 10:
            listing += f" and {len(self.known) - 10} more (eng.models() lists them)"
        how = register_hint or f"eng.register({name!r}, 'path/to/model.keras')"
        super().__init__(f"no model named {name!r} is registered; {hint}registered: "
                         f"{listing}. Register it first with {how}.")


class ModelFileError(NbtoolError, FileNotFoundError):
    """A model file that is missing, unreadable or corrupt.

    Example:
        >>> str(ModelFileError("cnn", "cnn.keras", "it does not exist", "check the path"))
        "model 'cnn' (cnn.keras): it does not exist. Fix: check the path."
    """

    def __init__(self, model: str | None, path: str, problem: str, fix: str):
        self.path = str(path)
        super().__init__(f"{_who(model, path, f'file {path}')}: {_end(problem)} "
                         f"Fix: {_end(fix)}")


class UnsupportedFormat(NbtoolError, ValueError):
    """A path whose format nbtool cannot run.

    Example:
        >>> str(UnsupportedFormat("m", "m.onnx"))  # doctest: +ELLIPSIS
        "model 'm' (m.onnx): ... expected a .keras, .h5, .tflite or OpenVINO .xml file..."
    """

    def __init__(self, model: str | None, path: str, found: str | None = None,
                 fix: str | None = None):
        self.path = str(path)
        name = str(path).rsplit("/", 1)[-1]
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else "(no suffix)"
        what = found or f"a file ending in {suffix!r}"
        if fix is not None:   # a format nbtool runs, in a form it does not
            super().__init__(f"model {model!r} ({path}): nbtool cannot run {what}. Fix: {fix}.")
            return
        super().__init__(
            f"model {model!r} ({path}): nbtool cannot run {what}; expected a .keras, .h5, "
            ".tflite or OpenVINO .xml file, or a TensorFlow SavedModel directory (one with "
            "saved_model.pb). "
            "Fix: save the model with model.save('name.keras'), or model.export('dir') for "
            "a SavedModel.")


class UntrustedModel(NbtoolError, ValueError):
    """A model file that runs code when loaded, registered without ``trusted=True``.

    Example:
        >>> str(UntrustedModel("lam", "lam.keras", "a Lambda layer", "runs code"))  # doctest: +ELLIPSIS
        "model 'lam' (lam.keras): it contains a Lambda layer, which runs code; ... trusted=True)."
    """

    def __init__(self, model: str, path: str, found: str, why: str):
        self.path = str(path)
        super().__init__(
            f"model {model!r} ({path}): it contains {found}, which {why}; nbtool refuses it "
            f"unless you say you trust the file. Fix: if you trust it, register it with "
            f"trusted=True: eng.register({model!r}, {str(path)!r}, trusted=True).")


class InvalidModelName(NbtoolError, ValueError):
    """A model name outside the safe set (it names files and result-store arrays).

    Example:
        >>> str(InvalidModelName("a/b", "a_b"))  # doctest: +ELLIPSIS
        "model name 'a/b': expected letters, digits and _ - . @ + ... Fix: ...'a_b'..."
    """

    def __init__(self, name: object, suggestion: str, path: str | None = None,
                 limit: int = 100):
        source = f" (from {path})" if path else ""
        target = repr(str(path)) if path else "..."
        super().__init__(
            f"model name {name!r}{source}: expected letters, digits and _ - . @ + only, not "
            f"starting with '.', at most {limit} characters (it names files and result "
            f"arrays, where other characters collide or escape). Fix: use a clean name such "
            f"as {suggestion!r}: eng.register({suggestion!r}, {target}).")


class InvalidOption(NbtoolError, ValueError):
    """A register option with a value nbtool cannot use (batch_size, replicas ...).

    Example:
        >>> str(InvalidOption("cnn", "batch_size", 0, "a whole number >= 1", "batch_size=64"))
        "model 'cnn': batch_size=0; expected a whole number >= 1. Fix: pass batch_size=64."
    """

    def __init__(self, model: str | None, option: str, value: object, expected: str, fix: str):
        who = f"model {model!r}: " if model else ""
        super().__init__(f"{who}{option}={value!r}; expected {expected}. Fix: pass {fix}.")


class PlacementError(NbtoolError, ValueError):
    """A device request that no worker of the cluster can satisfy.

    Example:
        >>> str(PlacementError("cnn", "gpu:3", ["cpu:0", "cpu:1"], "start with gpus=[3]"))
        "model 'cnn' asks for device 'gpu:3', but the cluster has cpu:0, cpu:1. Fix: start with gpus=[3]."
    """

    def __init__(self, model: str, device: str, available: list, fix: str, replicas: int = 1):
        have = ", ".join(available) or "no workers"
        on = f" on {replicas} workers" if replicas > 1 else ""
        super().__init__(f"model {model!r} asks for device {device!r}{on}, but the cluster "
                         f"has {have}. Fix: {_end(fix)}")


# -- loading on a worker ------------------------------------------------------------------
class ModelLoadError(NbtoolError, RuntimeError):
    """A model file that exists but could not be loaded on a worker.

    Example:
        >>> str(ModelLoadError("cnn", "cnn.keras", "gpu0", "bad zip", "re-save it"))
        "model 'cnn' (cnn.keras) failed to load on worker 'gpu0': bad zip. Fix: re-save it."
    """

    def __init__(self, model: str, path: str, worker: str | None, reason: str, fix: str):
        self.path = str(path)
        super().__init__(f"model {model!r} ({path}) failed to load{_on(worker)}: "
                         f"{_end(reason)} Fix: {_end(fix)}")


class ConversionDisagrees(NbtoolError, RuntimeError):
    """A forced conversion (``runtime="openvino"`` or ``"litert"``) that computed other
    numbers than TensorFlow on rows of a prediction (rows unlike those it was checked on
    at load): the chunk fails rather than return them.

    Example:
        >>> str(ConversionDisagrees("cnn", "cnn.keras", "cpu0", "openvino",
        ...                         "max abs diff 0.01 (tolerance 0.0001)", 12))  # doctest: +ELLIPSIS
        "model 'cnn' (cnn.keras) on worker 'cpu0': its openvino conversion gave max abs diff 0.01 (tolerance 0.0001) from TensorFlow on 12 rows of this chunk... Fix: register it with runtime='auto' (it falls back to TensorFlow by itself) or runtime='tensorflow'."
    """

    def __init__(self, model: str, path: str, worker: str | None, runtime: str, why: str,
                 n_rows: int):
        self.path = str(path)
        super().__init__(
            f"model {model!r} ({path}){_on(worker)}: its {runtime} conversion gave {why} "
            f"from TensorFlow on {n_rows} rows of this chunk (rows unlike those it was "
            "checked on at load, or a non-finite output), so none of its rows are returned. "
            "Fix: register it with runtime='auto' (it falls back to TensorFlow by itself) "
            "or runtime='tensorflow'.")


class EngineFileDamaged(NbtoolError, RuntimeError):
    """An engine file that exists but does not hold a record (not JSON, not an object,
    fields of the wrong type): the engine may still run, unreachable. ``pids``: the
    processes of this user that run an engine of that name (found by their command line).

    Example:
        >>> str(EngineFileDamaged("x", "/r/x.json", "not JSON", [42]))  # doctest: +ELLIPSIS
        "the persistent engine 'x': its engine file /r/x.json is damaged (not JSON), ...; its process 42 still runs. Fix: nbtool.shutdown('x', force=True) ends it and removes the file..."
    """

    def __init__(self, name: str, path, what: str, pids: list[int]):
        self.name, self.path, self.what, self.pids = name, path, what, pids
        running = (f"its process{'es' if len(pids) > 1 else ''} "
                   f"{', '.join(map(str, pids))} still run{'' if len(pids) > 1 else 's'}"
                   if pids else "no process of that engine runs")
        super().__init__(
            f"the persistent engine {name!r}: its engine file {path} is damaged ({what}), "
            f"so nbtool cannot reach the engine; {running}. Fix: "
            f"nbtool.shutdown({name!r}, force=True) ends "
            f"{'it' if pids else 'nothing and removes the file'}"
            f"{' and removes the file' if pids else ''}; then start a new one.")


class ModelFileChanged(NbtoolError, RuntimeError):
    """A model file re-saved since it was registered: never loaded under the old name.

    Example:
        >>> str(ModelFileChanged("cnn", "cnn.keras", "1048-1", "2096-2"))  # doctest: +ELLIPSIS
        "model 'cnn' (cnn.keras): the file changed since it was registered (registered 1048-1, now 2096-2). Fix: eng.register('cnn', 'cnn.keras') again to use the new file..."
    """

    def __init__(self, model: str, path: str, registered: str, now: str,
                 worker: str | None = None):
        self.path = str(path)
        super().__init__(
            f"model {model!r} ({path}): the file changed since it was registered"
            f"{_on(worker)} (registered {registered}, now {now}). Fix: eng.register("
            f"{model!r}, {str(path)!r}) again to use the new file (fingerprints are "
            "size, times and inode; a worker that sees another copy of the file needs the same one).")


# -- running ------------------------------------------------------------------------------
class InputMismatch(NbtoolError, ValueError):
    """An input whose shape or dtype does not fit a model; raised before anything runs.

    Example:
        >>> str(InputMismatch("mlp", "mlp.h5", "rows of shape (8,)", "(3,)", "reshape it"))
        "model 'mlp' (mlp.h5) expects rows of shape (8,), got (3,). Fix: reshape it."
    """

    def __init__(self, model: str | None, path: str | None, expected: str, found: str, fix: str):
        super().__init__(f"{_who(model, path, 'the input')} expects {expected}, got "
                         f"{_end(found)} Fix: {_end(fix)}")


class BatchAxisMismatch(NbtoolError, RuntimeError):
    """A model whose output's first axis is not the rows it was given (refused: wrong).

    Example:
        >>> str(BatchAxisMismatch("pose", "pose.tflite", 0, 64, (1, 128, 2)))  # doctest: +ELLIPSIS
        "model 'pose' (pose.tflite) returned output 0 of shape (1, 128, 2) for a batch of 64 rows; expected 64 rows first. ..."
    """

    def __init__(self, model: str | None, path: str | None, output: int, rows: int, shape):
        self.shape = tuple(shape)
        again = f"eng.register({model!r}, {str(path)!r}, batch_size=1)" if model \
            else "register it with batch_size=1"
        super().__init__(
            f"{_who(model, path, 'the model')} returned output {output} of shape {self.shape} "
            f"for a batch of {rows} rows; expected {rows} rows first. Its batch axis does not "
            "follow the input's (a batch size built into the model, or a reshape that merges "
            f"rows), so nbtool refuses outputs that would be wrong. Fix: run it one row at a "
            f"time: {again}; or export the model with a batch axis that can vary.")


class ChunkError(NbtoolError, RuntimeError):
    """One (model, chunk) task that failed; its rows are NaN in the result.

    ``traceback`` is the worker's, as text: ``res.errors[0].traceback`` has the frames.

    Example:
        >>> str(ChunkError("cnn", 3, (300, 400), "cpu0", "ValueError: boom"))  # doctest: +ELLIPSIS
        "model 'cnn' failed on chunk 3 (rows 300:400) on worker 'cpu0': ValueError: boom. ..."
    """

    def __init__(self, model: str, chunk: int, rows: tuple[int, int], worker: str | None,
                 reason: str, traceback: str | None = None):
        self.rows = tuple(rows)
        # Only what this chunk knows: whether other chunks succeeded is the Prediction's say.
        super().__init__(
            f"model {model!r} failed on chunk {chunk} (rows {rows[0]}:{rows[1]}){_on(worker)}"
            f": {_end(reason)} Its rows are NaN in the result; rerun just these rows with "
            f"eng.predict([{model!r}], x[{rows[0]}:{rows[1]}]) once the cause is fixed.")


class ChunkCancelled(NbtoolError, RuntimeError):
    """A chunk that stopped between two batches because its run was cancelled.

    Example:
        >>> str(ChunkCancelled())
        'the chunk stopped: its prediction run was cancelled.'
    """

    def __init__(self):
        super().__init__("the chunk stopped: its prediction run was cancelled.")


class PredictionFailed(NbtoolError, RuntimeError):
    """Raised by ``Prediction.raise_for_errors()`` when any chunk failed.

    ``kept``: how many chunks succeeded, when the caller knows (else nothing is claimed).

    Example:
        >>> err = PredictionFailed([ChunkError("cnn", 0, (0, 10), None, "boom")], kept=0)
        >>> len(err.errors), str(err).splitlines()[0]
        (1, '1 part(s) of the prediction failed and none succeeded:')
    """

    def __init__(self, errors: list[Exception], kept: int | None = None):
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors[:10])
        more = f"\n  ... and {len(self.errors) - 10} more" if len(self.errors) > 10 else ""
        rest = (" (rows of failed chunks are NaN in the Prediction)" if kept is None else
                " and none succeeded" if kept == 0 else f"; the {kept} chunk(s) that "
                "succeeded were kept in the Prediction (rows of failed chunks are NaN)")
        super().__init__(f"{len(self.errors)} part(s) of the prediction failed{rest}:\n"
                         f"{lines}{more}")


class CombineError(NbtoolError, ValueError):
    """The models' outputs cannot be combined the way that was asked.

    Example:
        >>> str(CombineError("mean", "shapes differ"))  # doctest: +ELLIPSIS
        "combine='mean' is not possible: shapes differ. ..."
    """

    def __init__(self, method, reason: str):
        self.reason = reason
        super().__init__(f"combine={method!r} is not possible: {reason}. The per-model "
                         "outputs are kept in the Prediction; fix: predict with combine=None, "
                         "or with models whose outputs have the same shape.")


class EngineClosed(NbtoolError, RuntimeError):
    """An engine used after :meth:`~nbtool.engine.engine.Engine.close`: its cluster is gone.

    Example:
        >>> str(EngineClosed("predict"))  # doctest: +ELLIPSIS
        'eng.predict(...): this engine is closed; start a new one with nbtool.start()...'
    """

    def __init__(self, method: str | None = None):
        who = f"eng.{method}(...): " if method else ""
        super().__init__(f"{who}this engine is closed; start a new one with nbtool.start() "
                         "(its cluster and workers were shut down, and registrations do not "
                         "carry over: register the models again on the new engine).")


# -- result stores and variants -------------------------------------------------------------
class ResultStoreError(NbtoolError, RuntimeError):
    """A result store (``save="preds.zarr"``) that cannot be used as asked.

    Example:
        >>> str(ResultStoreError("/data/p.zarr", "it is a file", "save to a new path"))
        'result store /data/p.zarr: it is a file. Fix: save to a new path.'
    """

    def __init__(self, path: str, problem: str, fix: str):
        self.path = str(path)
        super().__init__(f"result store {path}: {problem}. Fix: {_end(fix)}")


class StoreBusy(ResultStoreError):
    """Another run is writing the result store now; this one is refused, not mixed in.

    Example:
        >>> str(StoreBusy("p.zarr", "run 1a2b is writing it now", "wait"))  # doctest: +ELLIPSIS
        'result store p.zarr: run 1a2b is writing it now. Fix: wait.'
    """


class StoreRewritten(ResultStoreError):
    """Another run wrote the result store behind a Prediction: its rows are not its own.

    Example:
        >>> isinstance(StoreRewritten("p.zarr", "it was rewritten", "reopen it"), StoreBusy)
        False
    """


class NoVariantQualifies(NbtoolError, ValueError):
    """No variant of a model meets the tolerance given to :meth:`Comparison.choose`.

    Example:
        >>> str(NoVariantQualifies("cnn", "agreement >= 0.99", {"cnn@int8": "0.97"}))
        "no variant of model 'cnn' meets agreement >= 0.99: cnn@int8 has 0.97. Fix: loosen the tolerance, try another variant, or keep the original 'cnn'."
    """

    def __init__(self, model: str, wanted: str, found: dict[str, str]):
        self.found = dict(found)
        have = "; ".join(f"{n} has {why}" for n, why in self.found.items()) or "no variants"
        super().__init__(f"no variant of model {model!r} meets {wanted}: {have}. Fix: loosen "
                         f"the tolerance, try another variant, or keep the original {model!r}.")


class EngineNotRunning(NbtoolError, LookupError):
    """No persistent engine of that name runs for this user; the message says what is
    known of the last one (when and why it ended) and how to start one.

    Example:
        >>> str(EngineNotRunning("default", "it ended at 10:00, no kernel attached for 30 min"))
        "no persistent engine 'default' is running: it ended at 10:00, ... Fix: ..."
    """

    def __init__(self, name: str, why: str):
        super().__init__(
            f"no persistent engine {name!r} is running: {why}. Its models are no longer "
            f"loaded anywhere. Fix: eng = nbtool.start(persist=True"
            f"{'' if name == 'default' else f', name={name!r}'}) starts a new one (register "
            "the models again), or nbtool.running() lists the ones that run.")


class EngineInUse(NbtoolError, RuntimeError):
    """Another kernel is attached to the persistent engine: one kernel at a time.

    Example:
        >>> str(EngineInUse("default", {"pid": 12, "host": "h", "since": 0.0}))
        "the persistent engine 'default' is in use by another kernel (pid 12 on h, ..."
    """

    def __init__(self, name: str, who: dict):
        since = time.strftime("%H:%M:%S", time.localtime(who.get("since", 0)))
        super().__init__(
            f"the persistent engine {name!r} is in use by another kernel (pid "
            f"{who.get('pid')} on {who.get('host')}, attached at {since}); one kernel is "
            "attached at a time, so two cannot change its models under each other. Fix: "
            "detach there (eng.close() or %nbtool stop), or restart that kernel, then "
            "attach again; or start another engine with nbtool.start(persist=True, "
            "name='other').")


class BackendUnsupported(InvalidOption):
    """A model, or an option of it, that the workers' Keras backend cannot run.

    Example:
        >>> str(BackendUnsupported("cnn", "cnn/", "jax", "a SavedModel runs in TensorFlow",
        ...                        "backend='tensorflow'"))
        "model 'cnn' (cnn/): a SavedModel runs in TensorFlow, and the workers run Keras on jax. Fix: backend='tensorflow'."
    """

    def __init__(self, model: str, path: str, backend: str, what: str, fix: str):
        NbtoolError.__init__(self, f"model {model!r} ({path}): {what}, and the workers run "
                             f"Keras on {backend}. Fix: {fix}.")


class NotPrivate(NbtoolError, PermissionError):
    """A folder or file that is not this user's alone; the message says whose and why."""
