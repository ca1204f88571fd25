"""What crosses between the kernel and the workers: model specs, data references, chunk
outputs and the state each worker reports. Nothing here imports anything above it.

Both sides import this module, so it holds plain picklable dataclasses and no behaviour
that needs TensorFlow, Dask or the engine.

Example:
    >>> spec = ModelSpec(name="mlp", path="/m/mlp.keras", format="keras",
    ...                  size_bytes=1024, fingerprint="1024-1")
    >>> ModelState(state="loaded", loads=1).describe()
    'loaded'
    >>> ModelState(state="failed", reason="no such file").describe()
    'failed: no such file'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
import string
from typing import Any, Callable

import numpy as np

from nbtool._util import human_bytes


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to load and run one registered model.

    It is small and picklable: it travels with every task. ``fingerprint`` changes when the
    file changes, so a worker never keeps serving a stale copy.

    Example:
        >>> spec = ModelSpec(name="mlp", path="/m/mlp.keras", format="keras",
        ...                  size_bytes=1024, fingerprint="1024-1")
        >>> spec.input_row_shape
        >>> spec.cache_key
        ('mlp', '1024-1')
    """

    name: str
    path: str
    format: str
    size_bytes: int
    fingerprint: str
    input_shape: tuple | None = None      # batch shape, e.g. (None, 8); None if unknown
    input_dtype: str | None = None
    n_inputs: int = 1
    n_outputs: int | None = None
    device: str = "auto"
    replicas: int | None = 1   # None: placed on every worker with room (nbtool.catalog.placement)
    batch_size: int | str | None = None
    preprocess: Callable | None = None
    trusted: bool = False
    precision: str | None = None   # None (as saved) or "bfloat16" / "float16" (mixed)
    #: What runs it on the worker: "tensorflow", "openvino", or "litert" (``.tflite``).
    runtime: str = "tensorflow"
    #: Each output's row shape and dtype, learned at the model's first load and kept.
    output_specs: tuple | None = None
    #: The sha256 of the file's bytes (:func:`content_digest`): what is remembered for a
    #: file (its runtime, conversions, cached outputs, stored chunks) is keyed by it, not
    #: by its path or times. None for a spec made by hand: the fingerprint stands in.
    content: str | None = None
    #: Every input, in the model's order (:class:`~nbtool.signature.InputSpec`); empty while unknown (a
    #: spec made by hand). ``input_shape``/``input_dtype`` are the first one's.
    inputs: tuple = ()
    #: The outputs' names where the model names them (a dict of outputs, a ``.tflite``
    #: signature, a SavedModel signature), in the order the worker returns them.
    output_names: tuple | None = None

    @property
    def several(self) -> bool:
        """Whether the model takes more than one input (rows then travel as a dict).

        Example:
            >>> from nbtool.signature import InputSpec
            >>> ModelSpec("m", "/m", "keras", 1, "1-1", inputs=(InputSpec("a", (None, 2)),
            ...           InputSpec("b", (None, 3)))).several
            True
        """
        return len(self.inputs) > 1

    @property
    def input_names(self) -> tuple:
        """The inputs' names in the model's order (empty while unknown).

        Example:
            >>> from nbtool.signature import InputSpec
            >>> ModelSpec("m", "/m", "keras", 1, "1-1",
            ...           inputs=(InputSpec("x", (None, 2)),)).input_names
            ('x',)
        """
        return tuple(i.name for i in self.inputs)

    @property
    def input_row_shape(self) -> tuple | None:
        """The shape of one input row (the batch shape without its first axis), if known."""
        return None if self.input_shape is None else tuple(self.input_shape[1:])

    @property
    def identity(self) -> str:
        """What the model's bytes are: their digest, else the file's fingerprint.

        Example:
            >>> ModelSpec("m", "/m", "keras", 1, "1-1", content="ab12").identity
            'ab12'
        """
        return self.content or self.fingerprint

    @property
    def cache_key(self) -> tuple[str, str]:
        """What a worker's cache is keyed by: a changed file is a different model (the same
        bytes touched, copied back or chmod-ed are the same one)."""
        return (self.name, self.identity)


def files_of_model(path: str | os.PathLike) -> list[Path]:
    """The files a model is made of: the file, a directory's files (sorted), an OpenVINO
    ``.xml`` with its ``.bin``.

    Example:
        >>> files_of_model("/no/such/cnn.keras")
        []
    """
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    if p.suffix == ".xml" and p.with_suffix(".bin").is_file():   # an IR's weights are beside it
        files.append(p.with_suffix(".bin"))
    return files


def file_fingerprint(path: str | os.PathLike) -> str:
    """Size, modification time, and a tag of the inodes and change times of a model's
    files: ``<bytes>-<newest mtime>-<tag>``.

    Cheap enough to ask before every load and every run: a model re-saved in place gets a
    new fingerprint, so a stale copy is never served without a word. The change time is
    in it because no user tool can set it back: ``cp -p``, ``rsync -t``, a checkout or
    ``os.utime`` restore the size and modification time of another model's bytes, never
    the change time (or the inode).

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "m.keras"; _ = f.write_bytes(b"123")
        >>> before = file_fingerprint(f); before.startswith("3-")
        True
        >>> st = f.stat(); _ = f.write_bytes(b"456"); os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        >>> file_fingerprint(f) == before      # same size and mtime, other bytes
        False
    """
    stats = [f.stat() for f in files_of_model(path)]
    tag = hashlib.blake2b(repr([(s.st_dev, s.st_ino, s.st_ctime_ns) for s in stats]).encode(),
                          digest_size=4).hexdigest()
    return f"{sum(s.st_size for s in stats)}-{max((s.st_mtime_ns for s in stats), default=0)}" \
        f"-{tag}"


#: Digests already taken in this process, by path and fingerprint.
_DIGESTS: dict[tuple[str, str], str] = {}


def content_digest(path: str | os.PathLike, fingerprint: str | None = None) -> str:
    """The sha256 of a model's bytes (every file it is made of, with their names relative
    to it), remembered in this process while the fingerprint stays.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "a.keras").write_bytes(b"123"); _ = (d / "b.keras").write_bytes(b"123")
        >>> content_digest(d / "a.keras") == content_digest(d / "b.keras")   # a copy
        True
    """
    p = Path(path)
    fingerprint = fingerprint or file_fingerprint(p)
    key = (str(p), fingerprint)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for f in files_of_model(p):
            h.update(f"{f.relative_to(p) if p.is_dir() else f.suffix}\0".encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def is_text_dtype(dtype) -> bool:
    """Whether a dtype (a name, numpy's or TensorFlow's) holds strings.

    Example:
        >>> is_text_dtype("string"), is_text_dtype(np.dtype("<U5")), is_text_dtype("float32")
        (True, True, False)
    """
    name = getattr(dtype, "name", dtype)
    if isinstance(dtype, np.dtype):
        return dtype.kind in "USO"
    return str(name) in ("string", "str", "object", "bytes") or str(name).startswith(("<U", "|S", "str"))


def numpy_dtype(dtype) -> np.dtype:
    """The numpy dtype rows of a model input are sent as: text as fixed-width unicode
    (never Python objects: no file a worker opens ever needs ``allow_pickle``).

    Example:
        >>> numpy_dtype("string"), numpy_dtype("float32")
        (dtype('<U'), dtype('float32'))
    """
    if is_text_dtype(dtype):
        return np.dtype(str)
    # A numpy dtype stays as it is: bfloat16's name means nothing to numpy without ml_dtypes.
    return dtype if isinstance(dtype, np.dtype) else np.dtype(getattr(dtype, "name", dtype))


# -- references to rows that workers read themselves -------------------------------------
@dataclasses.dataclass(frozen=True)
class NpyFile:
    """A ``.npy`` file that workers open themselves (memory-mapped).

    Example:
        >>> NpyFile("/data/x.npy").path
        '/data/x.npy'
    """

    path: str


@dataclasses.dataclass(frozen=True)
class ZarrRef:
    """A zarr array on disk that workers open themselves (only their slice is read).

    Example:
        >>> ZarrRef("/data/x.zarr").store
        '/data/x.zarr'
    """

    store: str
    path: str = ""


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """Image files that workers decode and resize themselves; the client only lists them.

    Example:
        >>> ImageFiles(("a.png", "b.png"), (32, 32), scale=1 / 255).color
        'RGB'
    """

    files: tuple
    size: tuple            # (height, width)
    color: str = "RGB"     # "RGB" or "L"
    scale: float = 1.0     # multiply pixel values (uint8 0..255) by this


@dataclasses.dataclass(frozen=True)
class SeveralInputs:
    """One chunk of a model's several inputs: per input (by name, in the model's order)
    the reference to its rows as one input's chunk travels, ``(data, start, stop)``.
    ``start`` is the chunk's first row in the input: the task's rows ``a:b`` are each
    part's rows from its own start plus ``a - start``.

    Example:
        >>> chunk = SeveralInputs(("image", "meta"), ((NpyFile("i.npy"), 100, 200),
        ...                                           (np.zeros((300, 2)), 100, 200)), 100)
        >>> chunk.names, is_file_ref(chunk)
        (('image', 'meta'), True)
    """

    names: tuple
    parts: tuple
    start: int = 0


def is_file_ref(data: Any) -> bool:
    """Whether ``data`` is a reference the worker reads from a file (not rows in memory).

    Example:
        >>> is_file_ref(NpyFile("x.npy")), is_file_ref(np.zeros(3))
        (True, False)
    """
    if isinstance(data, SeveralInputs):
        return any(is_file_ref(d) for d, _, _ in data.parts)
    return isinstance(data, (NpyFile, ZarrRef, ImageFiles))


# -- what workers send back ------------------------------------------------------------
@dataclasses.dataclass
class ChunkOutput:
    """What one (model, chunk) task sends back.

    Example:
        >>> ChunkOutput([np.zeros((2, 3))], 0.01, 0.0, "cpu0", 64, rows=2).rows
        2
    """

    outputs: list[np.ndarray] | None   # None when they went to the result store
    seconds: float          # compute time on the worker, reading the rows included
    load_seconds: float     # > 0 when this task had to load the model
    worker: str
    batch_size: int
    rows: int = 0
    #: What the user must hear about the model from this chunk (its conversion fell back
    #: to TensorFlow on this worker), said once in the notebook.
    notes: tuple = ()


@dataclasses.dataclass
class ModelState:
    """One model's entry in one worker's cache: its state and what its loads measured.

    ``state`` is one of "loading", "loaded", "evicted", "unloaded", "replaced", "failed";
    ``reason`` says why it failed. The fields after ``loads`` are known once it has loaded.

    Example:
        >>> s = ModelState(state="loaded", loads=1, weight_bytes=4096, accounted=4096)
        >>> s.loaded, s.describe()
        (True, 'loaded')
    """

    state: str = "not loaded"
    reason: str | None = None
    path: str | None = None
    loads: int = 0
    oom_retries: int = 0
    size_bytes: int | None = None
    weight_bytes: int | None = None
    footprint: int | None = None        # measured growth at its last load
    load_seconds: float | None = None
    input_shape: tuple | None = None
    input_dtype: str | None = None
    inputs: list | None = None          # [InputSpec] of a model with several (or text)
    n_outputs: int | None = None
    output_specs: list | None = None    # [(row shape, dtype)] per output
    batch_size: int | None = None
    batch_note: str | None = None
    fingerprint: str | None = None
    precision: str | None = None
    runtime: str | None = None          # what runs it: tensorflow, openvino, litert
    runtime_note: str | None = None     # why, and how it was prepared (converted, reused)
    # While resident:
    accounted: int | None = None        # bytes charged against the budget
    last_used: float | None = None
    uses: int = 0
    traces: int | None = None

    @property
    def loaded(self) -> bool:
        """Whether the model is resident now."""
        return self.state == "loaded"

    def describe(self) -> str:
        """One phrase for tables: the state, and the reason when it failed.

        Example:
            >>> ModelState().describe()
            'not loaded'
        """
        if self.state == "failed":
            return f"failed: {self.reason}"
        return self.state


@dataclasses.dataclass
class WorkerStatus:
    """One worker's report: its cache (models, memory, budget) and process facts.

    Example:
        >>> s = WorkerStatus(worker="cpu0", device="cpu:0", budget=2**30,
        ...                  models={"mlp": ModelState(state="loaded")})
        >>> s.models["mlp"].describe(), s.free_budget
        ('loaded', 1073741824)
    """

    worker: str
    device: str
    budget: int
    models: dict[str, ModelState] = dataclasses.field(default_factory=dict)
    lru_order: list[str] = dataclasses.field(default_factory=list)   # oldest first
    resident_bytes: int = 0
    evictions: int = 0
    peak_accounted: int = 0
    pid: int | None = None
    rss: int | None = None
    idle_memory: int | None = None        # RSS after start-up, before any model
    memory_in_use: int | None = None      # GPU allocator bytes on a GPU, else RSS
    held_memory: int | None = None        # what the driver says it holds on a GPU, else RSS
    throughput: dict[str, float] = dataclasses.field(default_factory=dict)
    gpus_seen: list[str] = dataclasses.field(default_factory=list)   # by the backend
    threads: int | None = None            # the backend's intra-op threads
    env: dict[str, str | None] = dataclasses.field(default_factory=dict)
    backend: str = "tensorflow"           # the Keras backend it runs: tensorflow, jax, torch
    #: What its last soft unload measured: {"models", "freed" (bytes), "returns_memory"}.
    last_soft_unload: dict | None = None

    @property
    def free_budget(self) -> int:
        """Budget bytes not charged to a resident model."""
        return max(0, self.budget - self.resident_bytes)

    def state_of(self, model: str) -> ModelState:
        """The model's state here ("not loaded" if this worker never saw it).

        Example:
            >>> WorkerStatus("cpu0", "cpu:0", 1).state_of("cnn").state
            'not loaded'
        """
        return self.models.get(model) or ModelState()


# -- what an unload did ------------------------------------------------------------------
#: Whether a soft unload gives a GPU's memory back to the device, by Keras backend:
#: PyTorch's caching allocator does after ``empty_cache()``; TensorFlow's and JAX's (XLA's
#: BFC) allocators keep it for reuse until the process ends, which a hard unload does.
SOFT_UNLOAD_ON_GPU = {"torch": "returns memory",
                      "tensorflow": "keeps memory (hard unload returns it)",
                      "jax": "keeps memory (hard unload returns it)"}


class UnloadResult(list):
    """What ``eng.unload`` did: the list of the models dropped (soft) or of the workers
    restarted (hard), as before, carrying per worker ``freed`` (bytes: the memory it held
    before minus after, measured on the worker: what the driver says on a GPU, RSS on CPU)
    and ``returns_memory`` ("yes", "no", or what was measured).

    Example:
        >>> r = UnloadResult(["cnn"], freed={"cpu0": 12_000_000, "cpu1": 0},
        ...                  returns_memory={"cpu0": "yes", "cpu1": "no"})
        >>> r == ["cnn"], r.freed["cpu0"]
        (True, 12000000)
        >>> r
        ['cnn'] (freed: cpu0 12.0 MB, cpu1 0 B; returns memory: cpu0 yes, cpu1 no)
    """

    def __init__(self, items=(), freed: dict | None = None,
                 returns_memory: dict | None = None):
        super().__init__(items)
        self.freed: dict[str, int] = dict(freed or {})
        self.returns_memory: dict[str, str] = dict(returns_memory or {})

    def __repr__(self) -> str:
        if not self.freed:
            return list.__repr__(self)
        freed = ", ".join(f"{w} {human_bytes(n)}" for w, n in sorted(self.freed.items()))
        returns = ", ".join(f"{w} {r}" for w, r in sorted(self.returns_memory.items()))
        return f"{list.__repr__(self)} (freed: {freed}" + \
            (f"; returns memory: {returns})" if returns else ")")

    @classmethod
    def merged(cls, parts: dict[str, list]) -> "UnloadResult":
        """One result from each worker's (by name): the names sorted, the measurements
        kept per worker.

        Example:
            >>> UnloadResult.merged({"cpu0": UnloadResult(["b"], {"cpu0": 1}), "cpu1": ["a"]})
            ['a', 'b'] (freed: cpu0 1 B)
        """
        out = cls(sorted({n for part in parts.values() for n in part}))
        for part in parts.values():
            out.freed.update(getattr(part, "freed", {}))
            out.returns_memory.update(getattr(part, "returns_memory", {}))
        return out


def resource_name(worker) -> str:
    """The Dask resource that only the worker of this name has.

    Example:
        >>> resource_name("gpu0")
        'nbtool-worker-gpu0'
    """
    return f"nbtool-worker-{worker}"


#: The result store's lock file: the run that holds it is the only one that may write.
STORE_LOCK = ".nbtool.lock"


def store_owner(path: str | os.PathLike) -> str | None:
    """The id of the run holding the lock of the store at ``path`` (None if none holds it).

    Example:
        >>> import tempfile
        >>> store_owner(tempfile.mkdtemp()) is None
        True
    """
    try:
        text = (Path(path) / STORE_LOCK).read_text()
        return json.loads(text).get("run") if text.strip() else None
    except (OSError, ValueError):
        return None


#: The characters a model name keeps in its store folder's name; the others are encoded.
_SAFE = frozenset(string.ascii_letters + string.digits + "_-")


def store_key(model: str) -> str:
    """A model name as one folder name, one to one: every character outside
    ``[A-Za-z0-9_-]`` is percent-encoded, ``%`` included (so no two names share a folder)
    and ``.`` too (so ``.``/``..`` never climb); a leading ``_`` as well (zarr reserves
    names starting ``__``).

    Example:
        >>> store_key("a/b"), store_key("a%2Fb"), store_key(".."), store_key("cnn@int8")
        ('a%2Fb', 'a%252Fb', '%2E%2E', 'cnn%40int8')
    """
    if not model:
        raise ValueError("a model name cannot be empty")
    return "".join(ch if ch in _SAFE and not (i == 0 and ch == "_")
                   else "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
                   for i, ch in enumerate(model))


@dataclasses.dataclass(frozen=True)
class StoreRef:
    """What a task needs to write its chunk: the store's path and the chunk's first row.

    Example:
        >>> StoreRef("/data/preds.zarr", 0).path
        '/data/preds.zarr'
    """

    path: str
    start: int
    run: str | None = None   # the run that holds the store's lock: only it may write
