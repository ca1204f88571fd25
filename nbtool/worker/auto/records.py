"""The remembered runtime choice: one small JSON record per model file on this machine,
so a later load skips the choice (and, for a converted model, TensorFlow itself).

A record (``<machine cache>/runtimes/<digest of the file's bytes>.json``) says which runtime
``runtime="auto"`` chose for the file, on which CPU (model string, cores), with which
runtime versions, at which batch and threads, what the candidates measured (diffs,
seconds) and the sha256 of the chosen artifact. It is used only while the CPU, the
versions and the artifact still hold here (:func:`read_record`): another CPU, another
version, or an artifact changed or gone, and the choice is made again. The batch and the
threads are kept as what was measured, not as conditions: the workers of one machine may
run a model at other batches or threads, and a choice that flipped with each would make
every load a first load. Two workers that load the model at once take turns
(:func:`choice_lock`): one chooses, the other then reads its record.

Example:
    >>> r = RuntimeRecord("openvino", batch=64, machine=machine_facts(),
    ...                   versions=runtime_versions(), envelope=Envelope.of([[1.0, 2.0]]).to_dict())
    >>> mismatch(r, machine_facts(), runtime_versions()) is None
    True
    >>> mismatch(r, {**machine_facts(), "cores": 1024}, runtime_versions()).split(" (")[0]
    'chosen on another machine'
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform

from nbtool.wire import ModelSpec
from nbtool.worker.auto.guard import Envelope
from nbtool.worker.environment import artifact_key, machine_folder
from nbtool.worker.runtimes import package_version

#: The packages whose versions a choice depends on (a newer one may convert or run
#: differently, or faster).
VERSIONED = ("tensorflow", "keras", "openvino", "ai-edge-litert")


@dataclasses.dataclass
class RuntimeRecord:
    """What ``auto`` chose for one model file on this machine, and what it measured.

    ``artifact``: the files the chosen runtime loads (none for TensorFlow, which loads the
    model file itself); ``sha256``: their digest when chosen. ``diffs`` and ``seconds``
    (medians over one timing block of rows, each at its best batch) are per candidate
    that agreed; ``batch_seconds`` the same per ``runtime@batch`` tried for the fastest
    ones; ``batch`` the batch chosen; ``skipped`` says why the others were not candidates.
    ``own_shape``/``own_dtype`` are the model's input, ``n_outputs`` and ``weight_bytes``
    what a TensorFlow load learned: a remembered load needs no TensorFlow to know them.
    """

    runtime: str
    batch: int
    machine: dict
    versions: dict
    artifact: list = dataclasses.field(default_factory=list)
    sha256: str | None = None
    diffs: dict = dataclasses.field(default_factory=dict)
    seconds: dict = dataclasses.field(default_factory=dict)
    skipped: dict = dataclasses.field(default_factory=dict)
    rows: str = ""                       # what the check ran on ("64 of your rows")
    threads: str = ""                    # NBTOOL_TF_THREADS of the worker that chose
    prepare_seconds: dict = dataclasses.field(default_factory=dict)   # open/convert + check
    own_shape: list | None = None
    own_dtype: str | None = None
    n_outputs: int | None = None
    weight_bytes: int | None = None
    summary: str = ""                    # the note of the load that chose
    batch_seconds: dict = dataclasses.field(default_factory=dict)   # "runtime@batch": s
    #: What the agreement check saw (:class:`~nbtool.worker.auto.guard.Envelope`, as a dict):
    #: rows unlike it are checked against TensorFlow as they run.
    envelope: dict | None = None
    #: The batch the user set when it was chosen (only that batch was timed), else None.
    user_batch: int | None = None


def cpu_model() -> str:
    """This machine's CPU model, as ``/proc/cpuinfo`` names it (else the platform's word).

    Example:
        >>> isinstance(cpu_model(), str) and len(cpu_model()) > 0
        True
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_facts() -> dict:
    """What a choice's speed depends on in this machine: its CPU model and cores.

    Example:
        >>> sorted(machine_facts())
        ['cores', 'cpu']
    """
    return {"cpu": cpu_model(), "cores": os.cpu_count()}


def runtime_versions() -> dict:
    """The versions of the packages a choice depends on, read without importing them.

    Example:
        >>> sorted(runtime_versions()) == sorted(VERSIONED)
        True
    """
    return {name: package_version(name) for name in VERSIONED}


def record_path(spec: ModelSpec) -> str:
    """Where the record of ``spec``'s file is kept: named by its bytes
    (:func:`~nbtool.worker.environment.artifact_key`), never by path and times alone.

    Example:
        >>> spec = ModelSpec("cnn", "/m/cnn.keras", "keras", 10, "10-1")
        >>> os.path.basename(record_path(spec)).endswith("-10-1.json")
        True
    """
    return os.path.join(machine_folder(), "runtimes", f"{artifact_key(spec)}.json")


def files_sha256(paths) -> str | None:
    """The sha256 of these files' bytes, in order; None if one is missing.

    Example:
        >>> files_sha256(["/no/such/file"]) is None
        True
    """
    digest = hashlib.sha256()
    try:
        for path in paths:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def mismatch(record: RuntimeRecord, machine: dict, versions: dict) -> str | None:
    """Why ``record`` does not hold here any more (None when it does); the artifact's own
    digest is checked by :func:`read_record`.

    Example:
        >>> r = RuntimeRecord("litert", 64, {"cpu": "A"}, {"openvino": "1"})
        >>> mismatch(r, {"cpu": "B"}, {"openvino": "1"})
        "chosen on another machine ({'cpu': 'A'})"
        >>> mismatch(r, {"cpu": "A"}, {"openvino": "2"})
        "chosen with other versions ({'openvino': '1'})"
    """
    if record.machine != machine:
        return f"chosen on another machine ({record.machine})"
    if record.versions != versions:
        return f"chosen with other versions ({record.versions})"
    if record.runtime != "tensorflow" and Envelope.from_dict(record.envelope) is None:
        return "chosen by an older nbtool, which kept no range of the rows it checked"
    return None


def read_record(spec: ModelSpec) -> tuple[RuntimeRecord | None, str | None]:
    """``spec``'s record if it holds here (same machine and versions, and its artifact's
    sha256 unchanged), else None and why not (None when there is none).

    Example:
        >>> spec = ModelSpec("cnn", "/nowhere/cnn.keras", "keras", 10, "10-1")
        >>> read_record(spec)
        (None, None)
    """
    try:
        with open(record_path(spec)) as f:
            record = RuntimeRecord(**json.load(f))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, TypeError) as e:
        return None, f"its record could not be read ({type(e).__name__})"
    why = mismatch(record, machine_facts(), runtime_versions())
    if why is None and record.artifact and files_sha256(record.artifact) != record.sha256:
        why = f"its {record.runtime} artifact changed or is gone"
    return (None, why) if why else (record, None)


def write_record(spec: ModelSpec, record: RuntimeRecord) -> bool:
    """Keep ``record`` for ``spec``'s file (written whole, then renamed into place); False
    if the cache folder is not writable (the choice is then made again next time).

    Example:
        >>> write_record(spec, record)   # doctest: +SKIP
        True
    """
    path = record_path(spec)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(record), f, indent=1)
        os.replace(tmp, path)
        return True
    except OSError:
        return False


def remember_envelope(spec: ModelSpec, runtime: str, envelope: dict) -> None:
    """Keep the range of rows a conversion has now been checked on (it grew as unlike
    rows agreed with TensorFlow), so a later load does not check them again. Only while
    the record still names ``runtime``; a lost race with another worker costs a re-check.

    Example:
        >>> remember_envelope(spec, "openvino", guard.envelope.to_dict())   # doctest: +SKIP
    """
    # The record as it is, without read_record's digest of the artifact: this runs while
    # a chunk waits, and whether the record still holds is the next load's question.
    try:
        with open(record_path(spec)) as f:
            record = RuntimeRecord(**json.load(f))
    except (OSError, ValueError, TypeError):
        return
    if record.runtime == runtime:
        write_record(spec, dataclasses.replace(record, envelope=envelope))


def remember_fallback(spec: ModelSpec, batch: int, note: str) -> bool:
    """Remember TensorFlow for ``spec``'s file: its conversion disagreed with TensorFlow
    on the user's rows while running (:mod:`~nbtool.worker.auto.guard`), so no later load, in
    any process of this machine, may use it. ``note`` says why.

    Example:
        >>> remember_fallback(spec, 64, "tensorflow: fell back from openvino ...")   # doctest: +SKIP
        True
    """
    with choice_lock(spec):
        return write_record(spec, RuntimeRecord("tensorflow", batch, machine_facts(),
                                                runtime_versions(), summary=note))


@contextlib.contextmanager
def choice_lock(spec: ModelSpec):
    """Hold the choice of ``spec``'s file: a second worker (or thread) of this machine
    waits here until the first has chosen, then reads its record. The lock is the
    operating system's (``flock``): a worker that dies mid-choice releases it.

    Example:
        >>> with choice_lock(spec):        # doctest: +SKIP
        ...     record, _ = read_record(spec)
    """
    path = record_path(spec) + ".lock"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "a")
    except OSError:   # a read-only cache: no record either, each worker chooses
        yield
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
