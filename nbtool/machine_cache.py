"""Small JSON files of what this machine measured, shared by its workers across sessions.

Two live here: the batch size each model's sweep chose (``batch_sizes.json``) and what each
model costs to load and per row to run (``costs.json``, used to plan cold runs). They sit
in ``NBTOOL_CACHE_DIR``, else ``$XDG_CACHE_HOME/nbtool`` or ``~/.cache/nbtool``. Several
worker processes write at once: each write merges with the file as it is, and a reader that
misses looks at the file again.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "batch_sizes.json")
    >>> MachineCache(path).put("mlp|cpu", 128)
    >>> MachineCache(path).get("mlp|cpu")             # another worker process reads it
    128
"""

from __future__ import annotations

import json
import os
from typing import Any

_CACHES: dict[str, "MachineCache"] = {}


class MachineCache:
    """One JSON file of measurements, read once and merged on every write.

    Example:
        >>> import tempfile, os
        >>> c = MachineCache(os.path.join(tempfile.mkdtemp(), "x.json"))
        >>> c.get("k") is None
        True
    """

    def __init__(self, path: str):
        self.path = path
        self.data = self._read()

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def get(self, key: str, default: Any = None) -> Any:
        """The cached value, looking at the file again on a miss (another worker of this
        machine may have written it since).

        Example:
            >>> import tempfile, os
            >>> MachineCache(os.path.join(tempfile.mkdtemp(), "x.json")).get("missing", 0)
            0
        """
        if key not in self.data:
            self.data.update(self._read())
        return self.data.get(key, default)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``, keeping what other workers wrote meanwhile.

        Example:
            >>> import tempfile, os
            >>> c = MachineCache(os.path.join(tempfile.mkdtemp(), "x.json"))
            >>> c.put("k", 1); c.put("j", 2); sorted(MachineCache(c.path).data.items())
            [('j', 2), ('k', 1)]
        """
        self.data = {**self._read(), **self.data, key: value}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f)
            os.replace(tmp, self.path)   # concurrent workers: last complete write wins
        except OSError:
            pass   # a read-only home only costs a measurement next time


def machine_cache(filename: str) -> MachineCache:
    """The process's cache for ``filename`` in this machine's nbtool cache folder.

    Example:
        >>> machine_cache("batch_sizes.json").path.endswith("batch_sizes.json")
        True
    """
    root = os.environ.get("NBTOOL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nbtool")
    path = os.path.join(root, filename)
    if path not in _CACHES:
        _CACHES[path] = MachineCache(path)
    return _CACHES[path]
