"""One writer per result store: the OS lock on it, and which run holds it.

A run holds an OS lock (``flock``) on ``.nbtool.lock`` inside the store from submit to
collect, and a second run that asks for the same store is refused at once
(:class:`~nbtool.errors.StoreBusy`) rather than left waiting: a kernel blocked on a lock
for the length of someone else's run looks hung, and two runs on one path are almost
always a mistake. The lock goes with the process, so a crashed kernel leaves none behind.
The lock file holds the run's id, which a late task checks before it writes (:func:`owner`).

Example:
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> lock = StoreLock(folder); lock.acquire("run1")
    >>> owner(folder), lock.held
    ('run1', True)
    >>> StoreLock(folder).acquire("run2")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nbtool.errors.StoreBusy: result store ...: run run1 (process ...) is writing it now...
    >>> lock.release(); owner(folder) is None
    True
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nbtool.errors import StoreBusy

#: The lock file (holding the id of the run that holds the lock), inside the store.
LOCK = ".nbtool.lock"


class StoreLock:
    """The writer lock of the store at ``path`` (a folder that exists), through one open file.

    Example:
        >>> import tempfile
        >>> lock = StoreLock(tempfile.mkdtemp()); lock.acquire("run1")
        >>> lock.run_id, lock.held
        ('run1', True)
        >>> lock.release(); lock.held
        False
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.run_id: str | None = None   # the run holding the lock through this object
        self._file = None                # its open lock file, while held

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._file is not None

    def acquire(self, run_id: str) -> None:
        """Take the lock for run ``run_id`` (a no-op if this object holds it already);
        raise :class:`~nbtool.errors.StoreBusy` at once if another run holds it, and
        ``OSError`` if the lock file cannot be made."""
        if self._file is not None:
            return
        f = os.fdopen(os.open(Path(self.path) / LOCK, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        if not _try_lock(f):   # held: by another kernel, or by another run of this one
            holder = _holder_text(f.read())
            f.close()
            raise StoreBusy(self.path, f"{holder} is writing it now; a second run would mix "
                            "its rows into that one's", "wait for that run to finish "
                            "(run.collect()) or stop it (run.cancel()), or save this run to "
                            "another path") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"run": run_id, "pid": os.getpid(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self._file, self.run_id = f, run_id

    def release(self) -> None:
        """Give the lock back (a no-op if not held); late tasks of the run that held it
        find no owner in the lock file and write nothing."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.seek(0)
            f.truncate()
        except OSError:
            pass
        finally:
            f.close()   # closing the descriptor drops the flock


def owner(path: str | os.PathLike) -> str | None:
    """The id of the run holding the lock of the store at ``path`` (None if none holds it).

    Example:
        >>> import tempfile
        >>> owner(tempfile.mkdtemp()) is None
        True
    """
    try:
        text = (Path(path) / LOCK).read_text()
        return json.loads(text).get("run") if text.strip() else None
    except (OSError, ValueError):
        return None


def _try_lock(f) -> bool:
    """Take an exclusive lock on open file ``f`` without waiting; False if another open
    file holds it (another process, or another run of this one: flock locks belong to
    open files, not processes). The OS drops it when the file is closed or the process
    dies, so a crashed kernel leaves no stale lock."""
    try:
        import fcntl
    except ImportError:   # Windows
        import msvcrt

        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _holder_text(text: str) -> str:
    """Who holds a lock, from its lock file's text: "run 1a2b3c4d (process 123, since
    ...)", or "another run" when it has not written its id yet.

    Example:
        >>> _holder_text('{"run": "1a2b3c4d", "pid": 123, "since": "2025-01-01 10:00:00"}')
        'run 1a2b3c4d (process 123, since 2025-01-01 10:00:00)'
    """
    try:
        info = json.loads(text) if text.strip() else {}
    except ValueError:
        info = {}
    if not info.get("run"):
        return "another run"
    return f"run {info['run']} (process {info.get('pid')}, since {info.get('since')})"
