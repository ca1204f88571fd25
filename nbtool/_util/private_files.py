"""Folders and files only this user can use: the input hand-over folder, the output cache
and the persistent engines' credentials.

What is in them is trusted (outputs read back as results, TLS keys that let a process run
code on the cluster), so each is checked before use: a real folder or file (a symlink is
refused, not followed), owned by this user, with no access for the group or others. A
folder of ours with a wider mode is narrowed; anyone else's is refused.

Example:
    >>> import tempfile, pathlib
    >>> folder = private_folder(pathlib.Path(tempfile.mkdtemp()) / "secrets")
    >>> write_private(folder / "key", "k"); read_private(folder / "key")
    'k'
    >>> oct((folder / "key").stat().st_mode & 0o777)
    '0o600'
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
import stat

from nbtool.errors import NotPrivate


def private_problem(path: str | os.PathLike, folder: bool = True,
                    narrow: bool = True) -> str | None:
    """Why ``path`` is not a folder (or file) of this user alone, or None if it is.

    A folder or file of ours whose mode lets others in is narrowed first (0700 / 0600):
    what others could read before is theirs already, but nothing new goes in it. With
    ``narrow=False`` it is refused instead (others may have put something in it).

    Example:
        >>> import tempfile, pathlib
        >>> wide = pathlib.Path(tempfile.mkdtemp()); wide.chmod(0o755)
        >>> private_problem(wide), oct(wide.stat().st_mode & 0o777)   # ours: narrowed
        (None, '0o700')
        >>> (wide / "link").symlink_to(wide)
        >>> private_problem(wide / "link")                           # doctest: +ELLIPSIS
        '.../link is owned by uid ... with mode 777 (a symlink): expected a folder of uid ...'
    """
    try:
        st = os.lstat(path)
        wanted = 0o700 if folder else 0o600
        if narrow and st.st_uid == os.getuid() and not stat.S_ISLNK(st.st_mode) and \
                stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(path, wanted)
            st = os.lstat(path)
    except OSError as e:
        return f"{path} cannot be used: {e}"
    kind_ok = stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)
    if kind_ok and st.st_uid == os.getuid() and not stat.S_IMODE(st.st_mode) & 0o077:
        return None
    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else \
        "not a folder" if folder and not kind_ok else "not a file" if not kind_ok else ""
    return (f"{path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}"
            f"{' (' + kind + ')' if kind else ''}: expected a {'folder' if folder else 'file'} "
            f"of uid {os.getuid()} alone, mode {wanted:o}")


def private_folder(path: str | os.PathLike, narrow: bool = True) -> Path:
    """``path`` as a folder of this user alone (made 0700 if missing); raises
    :class:`NotPrivate` if it is someone else's, a symlink, or others may use it (an
    existing folder of ours is narrowed to 0700 first, unless ``narrow=False``).

    Example:
        >>> import tempfile, pathlib
        >>> p = private_folder(pathlib.Path(tempfile.mkdtemp()) / "a" / "b")
        >>> oct(p.stat().st_mode & 0o777)
        '0o700'
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise NotPrivate(f"{path} cannot be made: {e}") from None
    problem = private_problem(path, narrow=narrow)
    if problem:
        raise NotPrivate(problem)
    return path


def write_private(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (0600), atomically: a reader
    sees the old file or the whole new one, never a part.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "f.json"
        >>> write_private(f, "{}"); f.read_text()
        '{}'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_private(path: str | os.PathLike) -> str:
    """The text of ``path``, if it is a file of this user alone; raises
    :class:`NotPrivate` otherwise and FileNotFoundError if it is not there.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "f"; write_private(f, "x")
        >>> read_private(f)
        'x'
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotPrivate(f"{path} is a symlink: expected a file of uid {os.getuid()} "
                             "alone, mode 600") from None
        raise
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            # Not narrowed here: what it holds may have been read by others already.
            raise NotPrivate(f"{path} is owned by uid {st.st_uid} with mode "
                             f"{stat.S_IMODE(st.st_mode):o}: expected a file of uid "
                             f"{os.getuid()} alone (mode 600)")
        return f.read()
