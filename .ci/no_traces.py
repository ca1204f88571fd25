#!/usr/bin/env python3
"""Fail when a test run leaves something behind outside its own private folder.

The tests (and the kernels, ``jupyter lab`` servers, browsers and Dask workers they start)
must write only under the session folder that tests/conftest.py makes and removes. This
lists the places they would otherwise write to, before and after, and names every new
entry. Only the standard library: CI runs it before .venv exists.

Usage (CI runs it around `make test`; a developer can too):

    python3 .ci/no_traces.py snapshot FILE     # before the tests
    make test
    python3 .ci/no_traces.py compare FILE      # after: exit 1 naming every new entry

Only new entries count: what was there before (or changed in place) is not the tests'
doing. Other people's programs running at the same time can add entries too (another
`jupyter lab`, another test run): run it by hand on a quiet machine.

Example:
    $ python3 .ci/no_traces.py snapshot build/traces.txt && python3 .ci/no_traces.py compare build/traces.txt
    no_traces: nothing new in 11 watched places
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HOME = Path.home()

#: Watched with everything inside, any depth: where Jupyter, IPython, Keras and nbtool
#: keep per-user state. A test writing here is what the issue was about (a JupyterLab
#: workspace naming the test's notebook made the user's next `make lab` log a 404).
TREES = [HOME / ".jupyter", HOME / ".local/share/jupyter", HOME / ".ipython",
         HOME / ".keras", HOME / ".cache/nbtool"]

#: Watched one level deep: the shared scratch places, and where other tools put per-user
#: folders (chromium's ~/.config/chromium, dconf's ~/.cache/dconf, ~/.pki...).
TOP_LEVELS = [Path("/tmp"), Path("/dev/shm"), HOME, HOME / ".cache", HOME / ".config",
              HOME / ".local/share"]

#: New entries that are not the tests' doing, each with the reason. Exact paths: what is
#: inside them is watched (or not) on its own.
EXCLUDED = {
    # `make test` first installs .venv: pip keeps its download/wheel cache here, and makes
    # ~/.cache itself on a fresh machine (its contents are watched on their own above).
    HOME / ".cache": "made by pip (make install)",
    HOME / ".cache/pip": "pip's cache (make install)",
}


def entries(place: Path, recursive: bool) -> set[str]:
    """The paths under ``place`` (folders end in ``/``); empty when it does not exist.

    Example:
        >>> entries(Path("/nonexistent"), recursive=True)
        set()
    """
    found: set[str] = set()
    try:
        with os.scandir(place) as it:
            children = list(it)
    except OSError:   # absent, or not ours to read: nothing we could have written
        return found
    for child in children:
        is_dir = child.is_dir(follow_symlinks=False)
        found.add(child.path + ("/" if is_dir else ""))
        if recursive and is_dir:
            found |= entries(Path(child.path), recursive=True)
    return found


def snapshot() -> set[str]:
    """Every entry in the watched places, now.

    Example:
        >>> sorted(snapshot())[:1]   # doctest: +SKIP
        ['/dev/shm/sem.mp-0f69b58x']
    """
    found: set[str] = set()
    for tree in TREES:
        found |= entries(tree, recursive=True)
    for place in TOP_LEVELS:
        found |= entries(place, recursive=False)
    return found


def excluded(path: str, own_file: Path) -> bool:
    """Whether a new ``path`` is explained by something other than the tests.

    Example:
        >>> excluded(str(HOME / ".cache/pip") + "/", Path("snap.txt"))
        True
    """
    p = Path(path.rstrip("/"))
    return p == own_file or p in EXCLUDED


def outermost(paths: set[str]) -> dict[str, int]:
    """The new paths not inside another new folder, each with how many new entries it holds.

    Example:
        >>> outermost({"/tmp/a/", "/tmp/a/b", "/tmp/c"})
        {'/tmp/a/': 1, '/tmp/c': 0}
    """
    folders = sorted(p for p in paths if p.endswith("/"))
    tops: dict[str, int] = {}
    for p in sorted(paths):
        parent = next((f for f in folders if p != f and p.startswith(f)), None)
        if parent is None:
            tops.setdefault(p, 0)
        else:
            tops[parent] = tops.get(parent, 0) + 1
    return tops


def compare(before: set[str], own_file: Path) -> list[str]:
    """The lines naming each new entry since ``before`` (none: nothing was left).

    Example:
        >>> compare(set(), Path("snap.txt"))[:1]   # doctest: +SKIP
        ['  /root/.jupyter/  (3 entries inside)']
    """
    new = {p for p in snapshot() - before if not excluded(p, own_file)}
    return [f"  {p}" + (f"  ({n} entries inside)" if n else "")
            for p, n in outermost(new).items()]


def main(argv: list[str]) -> int:
    """``snapshot FILE`` or ``compare FILE``; the exit status CI acts on.

    Example:
        >>> main(["help"])   # doctest: +SKIP
        2
    """
    if len(argv) != 2 or argv[0] not in ("snapshot", "compare"):
        print(__doc__.split("Example:")[0].strip(), file=sys.stderr)
        return 2
    command, file = argv[0], Path(argv[1]).absolute()
    if command == "snapshot":
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("".join(f"{p}\n" for p in sorted(snapshot())))
        return 0
    if not file.exists():
        print(f"no_traces: {file} does not exist. Fix: run `{sys.argv[0]} snapshot {file}` "
              "before the tests, then compare.", file=sys.stderr)
        return 2
    lines = compare(set(file.read_text().splitlines()), file)
    places = len(TREES) + len(TOP_LEVELS)
    if not lines:
        print(f"no_traces: nothing new in {places} watched places")
        return 0
    print(f"no_traces: the test run left {len(lines)} new entries outside its private folder:\n"
          + "\n".join(lines) + "\n"
          "Expected: nothing; the tests write only under the session folder tests/conftest.py "
          "makes (TMPDIR, JUPYTER_*_DIR, IPYTHONDIR, KERAS_HOME, NBTOOL_CACHE_DIR point "
          "there) and removes. Fix: find what writes these (a subprocess started with an env= "
          "that drops TMPDIR, an engine or kernel never closed, a hard-coded path) and make it "
          "use the session folder or clean up; if a tool other than the tests made it, add it "
          "to EXCLUDED in .ci/no_traces.py with the reason.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
