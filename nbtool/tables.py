"""The tables ``eng.models()`` and ``eng.devices()`` show, and the model rows the dashboard
shows too: built here once from the workers' statuses, rendered as text or HTML.

Example:
    >>> t = Table([{"name": "cnn", "size": "1.2 MB"}], title="models")
    >>> print(t)
    models
    name  size
    cnn   1.2 MB
    >>> t[0]["name"], len(t)
    ('cnn', 1)
"""

from __future__ import annotations

import dataclasses
import html
from typing import Any

from nbtool._util import human_bytes
from nbtool.wire import ModelSpec, ModelState, SOFT_UNLOAD_ON_GPU, WorkerStatus


class Table:
    """Rows (dicts with the same keys) that print as text and render as HTML.

    Example:
        >>> Table([{"a": 1}]).to_records()
        [{'a': 1}]
    """

    def __init__(self, rows: list[dict[str, Any]], title: str = ""):
        self.rows = list(rows)
        self.title = title

    @property
    def columns(self) -> list[str]:
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        return cols

    def __getitem__(self, i):
        return self.rows[i]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def to_records(self) -> list[dict[str, Any]]:
        """The rows as plain dicts (``pandas.DataFrame(t.to_records())`` for a frame)."""
        return [dict(r) for r in self.rows]

    def __repr__(self) -> str:
        cols = self.columns
        cells = [[str(r.get(c, "")) for c in cols] for r in self.rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
        if not self.rows:
            lines.append("(none)")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cols = self.columns
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(_cell(r.get(c, "")) for c in cols) + "</tr>"
                       for r in self.rows)
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table class='nbtool-table'>{caption}<thead><tr>{head}</tr></thead>" \
               f"<tbody>{body or '<tr><td>(none)</td></tr>'}</tbody></table>"


class Hint(str):
    """A cell's text with a longer explanation, shown as its tooltip in the HTML table
    (a ``str``: printed tables, records and DataFrames show the text alone).

    Example:
        >>> h = Hint("litert (auto)", "litert: 2.9x TensorFlow, max abs diff 3e-06 on 64 rows")
        >>> h, h.title[:6]
        ('litert (auto)', 'litert')
        >>> Table([{"runtime": h}])._repr_html_().count('title="litert: 2.9x')
        1
    """

    def __new__(cls, text: str, title: str | None = None):
        self = super().__new__(cls, text)
        self.title = title
        return self


def _cell(value: Any) -> str:
    """One ``<td>``, with its :class:`Hint`'s explanation as its tooltip."""
    title = getattr(value, "title", None) if isinstance(value, Hint) else None
    attr = f' title="{html.escape(title, quote=True)}"' if title else ""
    return f"<td{attr}>{html.escape(str(value))}</td>"


@dataclasses.dataclass
class ModelRow:
    """One registered model as the tables and the dashboard show it: what it is, where it
    is placed, and its state on each of those workers.

    Example:
        >>> row = ModelRow("cnn", "keras", 2048, "/m/cnn.keras", ["cpu:0"],
        ...                {"cpu0": ModelState("loaded", accounted=4096, load_seconds=0.5)})
        >>> row.state_text(), human_bytes(row.footprint), row.load_seconds
        ('cpu0: loaded', '4.1 kB', 0.5)
    """

    name: str
    format: str
    size_bytes: int
    path: str
    devices: list[str]
    states: dict[str, ModelState]   # by worker, in placement order
    runtime: str = "auto"           # what it was registered to run on

    @property
    def loaded(self) -> list[ModelState]:
        """Its states on the workers where it is resident now."""
        return [s for s in self.states.values() if s.loaded]

    @property
    def footprint(self) -> int | None:
        """The most memory it takes on one worker (charged, else measured), if resident."""
        sizes = [s.accounted or s.footprint or 0 for s in self.loaded]
        return max(sizes) if sizes else None

    @property
    def load_seconds(self) -> float | None:
        """Its slowest load among the workers where it is resident."""
        return max((s.load_seconds or 0.0 for s in self.loaded), default=None)

    @property
    def last_used(self) -> float | None:
        """When a worker holding it last ran it (a time.time()), if resident."""
        return max((s.last_used or 0.0 for s in self.loaded), default=None)

    def state_text(self, describe=ModelState.describe) -> str:
        """``"cpu0: loaded; cpu1: not loaded"``; ``describe`` words one state.

        Example:
            >>> ModelRow("m", "h5", 1, "m.h5", [], {"cpu0": ModelState()}).state_text()
            'cpu0: not loaded'
        """
        return "; ".join(f"{w}: {describe(s)}" for w, s in self.states.items())

    @property
    def runtime_text(self) -> Hint:
        """What runs it: the runtime its workers run it on (``"litert (auto)"``: chosen
        by ``auto``), else what it was registered with; the why as the tooltip.

        Example:
            >>> row = ModelRow("m", "keras", 1, "m.keras", ["cpu:0"], {"cpu0": ModelState(
            ...     "loaded", runtime="openvino", runtime_note="openvino: 2.1x TensorFlow")})
            >>> row.runtime_text, row.runtime_text.title
            ('openvino (auto)', 'cpu0: openvino: 2.1x TensorFlow')
            >>> ModelRow("m", "keras", 1, "m.keras", [], {}).runtime_text
            'auto'
        """
        known = {w: s for w, s in self.states.items() if s.runtime and s.state != "failed"}
        chosen = sorted({s.runtime for s in known.values()})
        if not chosen:
            return Hint(self.runtime)
        text = ", ".join(chosen) + (" (auto)" if self.runtime == "auto" else "")
        notes = "\n".join(f"{w}: {s.runtime_note}" for w, s in known.items()
                          if s.runtime_note)
        return Hint(text, notes or None)

    def as_dict(self) -> dict[str, Any]:
        """The row of ``eng.models()``."""
        return {"name": self.name, "format": self.format, "size": human_bytes(self.size_bytes),
                "device": ", ".join(self.devices), "runtime": self.runtime_text,
                "state": self.state_text(),
                "footprint": human_bytes(self.footprint),
                "load s": "-" if self.load_seconds is None else f"{self.load_seconds:.2f}",
                "path": self.path}


def model_rows(specs: list[ModelSpec], placement: dict[str, list[str]],
               devices: dict[str, str], statuses: dict[str, WorkerStatus]) -> list[ModelRow]:
    """One :class:`ModelRow` per spec, from the workers' statuses.

    ``placement``: model -> worker names; ``devices``: worker name -> device label.

    Example:
        >>> spec = ModelSpec("cnn", "/m/cnn.keras", "keras", 2048, "1-1")
        >>> status = WorkerStatus("cpu0", "cpu:0", 2**30, {"cnn": ModelState("loaded")})
        >>> [r.state_text() for r in model_rows([spec], {"cnn": ["cpu0", "cpu1"]},
        ...                                     {"cpu0": "cpu:0"}, {"cpu0": status})]
        ['cpu0: loaded; cpu1: not loaded']
    """
    rows = []
    for spec in specs:
        workers = placement.get(spec.name, [])
        states = {w: statuses[w].state_of(spec.name) if w in statuses else ModelState()
                  for w in workers}
        rows.append(ModelRow(spec.name, spec.format, spec.size_bytes, spec.path,
                             [devices[w] for w in workers if w in devices], states,
                             spec.runtime))
    return rows


def device_rows(statuses: dict[str, WorkerStatus]) -> list[dict[str, Any]]:
    """The rows of ``eng.devices()``: per worker its memory, budget and resident models,
    its Keras backend, and what a soft unload does there (:func:`soft_unload_cell`).

    Example:
        >>> s = WorkerStatus("cpu0", "cpu:0", 2 * 10**9, resident_bytes=10**6,
        ...                  lru_order=["cnn"], memory_in_use=8 * 10**8, pid=7)
        >>> print(Table(device_rows({"cpu0": s})))
        worker  device  backend     memory    idle memory  budget  resident  models  soft unload  pid
        cpu0    cpu:0   tensorflow  800.0 MB  -            2.0 GB  1.0 MB    cnn     -            7
    """
    return [{"worker": name, "device": s.device, "backend": s.backend,
             "memory": human_bytes(s.memory_in_use),
             "idle memory": human_bytes(s.idle_memory), "budget": human_bytes(s.budget),
             "resident": human_bytes(s.resident_bytes),
             "models": ", ".join(s.lru_order) or "-", "soft unload": soft_unload_cell(s),
             "pid": s.pid}
            for name, s in sorted(statuses.items())]


def soft_unload_cell(s: WorkerStatus) -> str:
    """What a soft unload does on this worker: what its last one measured, else on a GPU
    what its backend does (PyTorch returns memory; TensorFlow and JAX keep it), else
    ``-`` (on CPU it depends on the allocator: the first soft unload measures it).

    Example:
        >>> soft_unload_cell(WorkerStatus("gpu0", "gpu:0", 1, backend="torch"))
        'returns memory'
        >>> soft_unload_cell(WorkerStatus("gpu0", "gpu:0", 1, last_soft_unload={
        ...     "models": ["cnn"], "freed": 0, "returns_memory": "no (0 B of 12.6 MB)"}))
        'last: no (0 B of 12.6 MB)'
    """
    if s.last_soft_unload:
        return f"last: {s.last_soft_unload['returns_memory']}"
    if s.device.startswith("gpu"):
        return SOFT_UNLOAD_ON_GPU.get(s.backend, "-")
    return "-"
