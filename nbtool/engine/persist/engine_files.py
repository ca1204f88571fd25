"""Where a persistent engine says how to reach it: one private file per engine.

A persistent engine (``nbtool.start(persist=True)``) runs in a process of its own. Beside
it, in a folder of this user alone (0700, under Jupyter's runtime directory, where kernels
keep their connection files), it keeps ``<name>.json`` (0600): its scheduler address, its
process and the TLS credentials a client must present. Whoever can read that file can run
code as this user on the cluster, so nobody else can. When the engine ends, the file goes
and ``<name>.ended.json`` says when and why, so the next ``attach`` can tell the user.

Example:
    >>> import os
    >>> rec = EngineRecord(name="default", address="tls://127.0.0.1:1", pid=os.getpid(),
    ...                    process_started=process_started(os.getpid()))
    >>> rec.save(); [r.name for r in engine_records()]
    ['default']
    >>> rec.alive()
    True
    >>> rec.end("shut down by nbtool.shutdown()"); engine_records()
    []
    >>> ended_note("default").endswith(", shut down by nbtool.shutdown()")
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import re
import time

from nbtool._util import private_folder, read_private, write_private
from nbtool.errors import EngineFileDamaged, NotPrivate


def runtime_folder() -> Path:
    """This user's folder of persistent engines: ``NBTOOL_RUNTIME_DIR`` if set, else
    ``nbtool/`` in Jupyter's runtime directory; made 0700, refused if not ours alone.

    Example:
        >>> oct(runtime_folder().stat().st_mode & 0o777)
        '0o700'
    """
    folder = os.environ.get("NBTOOL_RUNTIME_DIR")
    if not folder:
        from jupyter_core.paths import jupyter_runtime_dir

        folder = os.path.join(jupyter_runtime_dir(), "nbtool")
    try:
        return private_folder(folder)
    except NotPrivate as e:
        from nbtool.errors import NbtoolError

        raise NbtoolError(f"the persistent engines' folder cannot be used: {e}. Its files "
                          "hold credentials, so it must be yours alone. Fix: set "
                          "NBTOOL_RUNTIME_DIR to a folder of your own (it is made 0700).") \
            from None


#: Exit code of an engine's process that found another of its name running or starting.
ALREADY_RUNNING = 3

#: A persistent engine's name: also its files' names, so nothing that leaves the folder.
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def check_name(name) -> str:
    """``name`` if it can name a persistent engine (and its files); ValueError otherwise.

    Example:
        >>> check_name("gpu-models")
        'gpu-models'
        >>> check_name("../x")
        Traceback (most recent call last):
        ...
        ValueError: name='../x': ... Fix: ...
    """
    if isinstance(name, str) and NAME.fullmatch(name) and not name.endswith(".ended"):
        return name
    raise ValueError(
        f"name={name!r}: a persistent engine's name is also the name of its file "
        "(<runtime folder>/<name>.json), so it must be 1 to 64 letters, digits, '_', '-' or "
        "'.', not starting with '.' nor ending with '.ended'. Fix: name='default' (the "
        "default) or a name such as 'gpu-models'.")


def hold_name(name: str) -> int | None:
    """Take engine ``name``'s lock (``<name>.lock``) for as long as this process lives;
    returns its descriptor, or None if another process holds it: an engine of that name
    runs or is starting. The system lets go of it when the process ends, killed or not.

    Example:
        >>> fd = hold_name("locked"); hold_name("locked") is None, name_taken("locked")
        (True, True)
        >>> os.close(fd); name_taken("locked")
        False
    """
    import fcntl

    fd = os.open(runtime_folder() / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def name_taken(name: str) -> bool:
    """Whether another process holds engine ``name``'s lock (it runs or is starting).

    Example:
        >>> name_taken("no-such-engine")
        False
    """
    if not (runtime_folder() / f"{name}.lock").exists():
        return False
    fd = hold_name(name)
    if fd is None:
        return True
    os.close(fd)
    return False


def process_started(pid: int) -> float | None:
    """When process ``pid`` started (None if there is none): with the pid, it names one
    process even after the pid is reused.

    Example:
        >>> process_started(os.getpid()) > 0
        True
    """
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


@dataclass
class EngineRecord:
    """How to reach one persistent engine, as its process wrote it.

    Example:
        >>> EngineRecord(name="x", address="tls://127.0.0.1:1", pid=1).describe()
        "'x' (pid 1, tls://127.0.0.1:1)"
    """

    name: str
    address: str
    pid: int
    process_started: float | None = None
    started: float = field(default_factory=time.time)
    idle_timeout: float = 1800.0
    dashboard: str | None = None
    workers: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    note: str = ""
    tls: dict = field(default_factory=dict)   # ca, cert, key: PEM text

    @property
    def path(self) -> Path:
        return runtime_folder() / f"{self.name}.json"

    def describe(self) -> str:
        return f"{self.name!r} (pid {self.pid}, {self.address})"

    def save(self) -> None:
        """Write the record, readable by this user alone (0600)."""
        write_private(self.path, json.dumps(dataclasses.asdict(self)))

    def security(self):
        """The :class:`distributed.security.Security` a client of this engine presents."""
        from distributed.security import Security

        return Security(tls_ca_file=self.tls["ca"], tls_client_cert=self.tls["cert"],
                        tls_client_key=self.tls["key"], require_encryption=True)

    def alive(self) -> bool:
        """Whether the engine's process still runs (the same process, not a reused pid)."""
        started = process_started(self.pid)
        if started is None:
            return False
        import psutil

        try:
            if psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            return False
        return self.process_started is None or abs(started - self.process_started) < 1

    def processes(self) -> list:
        """The engine's live processes: its own and its workers (see :func:`group_processes`).

        Example:
            >>> len(EngineRecord(name="x", address="", pid=2**22 + 1).processes())
            0
        """
        return group_processes(self.pid)

    def kill(self) -> None:
        """SIGKILL the engine and its workers (see :func:`kill_group`).

        Example:
            >>> EngineRecord(name="x", address="", pid=2**22 + 1).kill()   # none: nothing
        """
        kill_group(self.pid)

    @property
    def work_dir(self) -> Path:
        """Where its kernels keep files its registry names (a model registered as an object
        is saved there, optimize()'s variants too): it lasts as long as the engine.

        Example:
            >>> EngineRecord(name="x", address="", pid=1).work_dir.name
            'x.work'
        """
        return runtime_folder() / f"{self.name}.work"

    def end(self, reason: str) -> None:
        """Remove the record and the work folder, and leave a note of when and why the
        engine ended."""
        import shutil

        write_private(runtime_folder() / f"{self.name}.ended.json",
                      json.dumps({"name": self.name, "pid": self.pid, "ended": time.time(),
                                  "reason": reason}))
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        shutil.rmtree(self.work_dir, ignore_errors=True)


def group_processes(pgid: int) -> list:
    """The live processes of process group ``pgid``, zombies aside: a persistent engine's
    own and those it started (its workers), which share its group.

    Example:
        >>> group_processes(2**22 + 1)
        []
    """
    import psutil

    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            continue
    return out


def kill_group(pgid: int, wait: float = 10.0) -> None:
    """SIGKILL process group ``pgid`` and wait (up to ``wait`` s) for it to go; the named
    semaphores its processes held (``/dev/shm/sem.*``, which multiprocessing's tracker,
    killed with them, would have removed) go too.

    Example:
        >>> kill_group(2**22 + 1)   # no such group: nothing happens
    """
    import signal

    held = set()
    for p in group_processes(pgid):
        try:
            held |= {m.path for m in p.memory_maps() if m.path.startswith("/dev/shm/sem.")}
        except Exception:   # gone meanwhile, or not readable: nothing to remove
            continue
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while group_processes(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    for path in held:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


#: Each field of a record and the types it may hold (a file edited by hand, or written
#: by something else, must not reach the code as a string where a pid is expected).
_FIELD_TYPES = {"name": (str,), "address": (str,), "pid": (int,),
                "process_started": (int, float, type(None)), "started": (int, float),
                "idle_timeout": (int, float), "dashboard": (str, type(None)),
                "workers": (list,), "options": (dict,), "note": (str,), "tls": (dict,)}


def record_problem(data) -> str | None:
    """What is wrong with ``data`` as an engine record (None: nothing).

    Example:
        >>> record_problem([]), record_problem({"name": "x", "address": "a", "pid": "abc"})
        ('it holds a list, not an object', "field 'pid' is 'abc' (a str), not an int")
        >>> record_problem({"name": "x", "address": "a"})
        "field 'pid' is missing"
    """
    if not isinstance(data, dict):
        return f"it holds a {type(data).__name__}, not an object"
    for key, types in _FIELD_TYPES.items():
        required = key in ("name", "address", "pid")
        if key not in data:
            if required:
                return f"field {key!r} is missing"
            continue
        value = data[key]
        if not isinstance(value, types) or isinstance(value, bool):
            return (f"field {key!r} is {value!r:.40} (a {type(value).__name__}), not "
                    f"{'an' if types[0].__name__[0] in 'aeiou' else 'a'} {types[0].__name__}")
    return None


def engine_pids(name: str) -> list[int]:
    """This user's processes that run engine ``name`` (``python -m nbtool.engine.persist.server
    <name> ...``), found by their command line: what a damaged engine file no longer says.

    Example:
        >>> engine_pids("no-such-engine")
        []
    """
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            cmd, uids = proc.info["cmdline"] or [], proc.info["uids"]
        except (psutil.Error, KeyError):
            continue
        if uids is not None and uids.real != os.getuid():
            continue
        for i, word in enumerate(cmd[:-1]):
            if word == "nbtool.engine.persist.server" and i and cmd[i - 1] == "-m" \
                    and cmd[i + 1] == name:
                found.append(proc.info["pid"])
    return found


def read_record(name: str) -> EngineRecord | None:
    """The record of engine ``name``, or None if there is none; an
    :class:`EngineFileDamaged` if its file holds no record (it says what is wrong, and
    which processes run that engine), a :class:`NotPrivate` if others may read it.

    Example:
        >>> read_record("no-such-engine") is None
        True
    """
    path = runtime_folder() / f"{name}.json"
    try:
        text = read_private(path)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise EngineFileDamaged(name, path, f"not JSON: {e}", engine_pids(name)) from None
    problem = record_problem(data)
    if problem:
        raise EngineFileDamaged(name, path, problem, engine_pids(name))
    known = {f.name for f in dataclasses.fields(EngineRecord)}
    return EngineRecord(**{k: v for k, v in data.items() if k in known})


def unreadable_engine_files() -> dict[str, str]:
    """The engine files of this folder that hold no usable record, by engine name, with
    what is wrong (damaged, or not this user's alone): ``running()`` lists them.

    Example:
        >>> unreadable_engine_files()
        {}
    """
    out = {}
    for path in sorted(runtime_folder().glob("*.json")):
        if path.name.endswith(".ended.json") or path.name.startswith("."):
            continue
        try:
            read_record(path.stem)
        except EngineFileDamaged as e:
            out[path.stem] = str(e)
        except NotPrivate as e:
            out[path.stem] = (f"not used: {e}, so others may have read its credentials. Fix: "
                              "end that engine (kill -9 -PID of the pid in the file), delete "
                              "the file, and start a new one")
    return out


def engine_records() -> list[EngineRecord]:
    """The records of this user's persistent engines whose process still runs; the
    records of ended ones are replaced by a note that they ended (killed, most likely).

    Example:
        >>> engine_records()
        []
    """
    out = []
    for path in sorted(runtime_folder().glob("*.json")):
        if path.name.endswith(".ended.json") or path.name.startswith("."):
            continue
        try:
            rec = read_record(path.stem)
        except (NotPrivate, EngineFileDamaged):   # unreachable: unreadable_engine_files
            continue
        if rec is None:
            continue
        if rec.alive():
            out.append(rec)
        else:
            rec.end(f"its process (pid {rec.pid}) was gone: killed, or the machine restarted")
    return out


def ended_note(name: str) -> str | None:
    """When and why engine ``name`` ended, if it left a note (None otherwise).

    Example:
        >>> ended_note("no-such-engine") is None
        True
    """
    try:
        note = json.loads(read_private(runtime_folder() / f"{name}.ended.json"))
    except (OSError, ValueError):
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(note.get("ended", 0)))
    return f"ended at {when}, {note.get('reason', 'for a reason not recorded')}"


def idle_words(seconds: float) -> str:
    """``1800`` -> ``'30 min'``, ``90`` -> ``'90 s'``.

    Example:
        >>> idle_words(1800), idle_words(90), idle_words(7200)
        ('30 min', '90 s', '2 h')
    """
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
