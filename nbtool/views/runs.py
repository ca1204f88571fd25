"""The dashboard's "Running now" section: one row per unfinished prediction of the engine,
with a progress bar per model, its rows/s so far and the time it has taken.

It shows every run the engine submitted (``eng.submit``, ``%%infer --background``, the
dashboard's own run form); a run leaves when it is done, into the "Recent runs" history.
The widgets of a run are made once and then only updated, so a refresh per second sends
a few numbers, not new views.

Example:
    >>> section = RunningSection()
    >>> section.update([])
    >>> section.box.children[0].value
    '<i>nothing running</i>'
"""

from __future__ import annotations

import html
import time

import ipywidgets as w


class RunningSection:
    """The widgets of the section (``box``), updated from ``engine.running()``.

    Example:
        >>> section = RunningSection()               # doctest: +SKIP
        >>> section.update(eng.running())            # doctest: +SKIP
        >>> section.rows[run.run_id]["bars"]["cnn"].value   # chunks done   # doctest: +SKIP
        3
    """

    def __init__(self):
        self.box = w.VBox().add_class("nbtool-running")
        self.rows: dict[str, dict] = {}    # run_id -> {"header", "bars", "texts", "box"}
        self._idle = w.HTML("<i>nothing running</i>")
        self.box.children = [self._idle]

    def update(self, runs: list, now: float | None = None) -> None:
        """Show ``runs`` (PredictionRuns) as they are now; runs not among them leave."""
        now = time.perf_counter() if now is None else now
        wanted = {r.run_id: r for r in runs}
        for run_id in [k for k in self.rows if k not in wanted]:
            self.rows.pop(run_id)["box"].close()
        for run_id, run in wanted.items():
            if run_id not in self.rows:
                self.rows[run_id] = _run_row(run)
            _show(self.rows[run_id], run, now)
        boxes = [row["box"] for row in self.rows.values()] or [self._idle]
        if list(self.box.children) != boxes:
            self.box.children = boxes

    def widgets(self) -> list[w.Widget]:
        """Every widget that an update changes (to batch them under ``hold_sync``)."""
        return [x for row in self.rows.values() for x in
                [row["header"], *row["bars"].values(), *row["texts"].values()]]


def _run_row(run) -> dict:
    header = w.HTML().add_class("nbtool-run-header")
    bars, texts, lines = {}, {}, []
    for spec, _ in run.placements:
        bars[spec.name] = w.IntProgress(min=0, max=1, description=spec.name,
                                        style={"description_width": "initial"},
                                        layout=w.Layout(width="360px"))
        texts[spec.name] = w.HTML()
        lines.append(w.HBox([bars[spec.name], texts[spec.name]]))
    box = w.VBox([header, *lines]).add_class("nbtool-run-row").add_class(
        f"nbtool-run-{run.run_id}")
    return {"header": header, "bars": bars, "texts": texts, "box": box}


def _show(row: dict, run, now: float) -> None:
    elapsed = now - run.started if run.started is not None else 0.0
    n_rows = run.source.n_rows
    workers = sorted({x for _, names in run.placements for x in names})
    row["header"].value = (f"run <code>{html.escape(run.run_id)}</code> &middot; "
                           f"{n_rows:,} rows in chunks of {run.chunk_size:,} &middot; "
                           f"{elapsed:.1f}s so far &middot; on {html.escape(', '.join(workers))}")
    stored = getattr(run, "stored", {}) or {}
    for model, (done, total) in run.progress().items():
        bar = row["bars"].get(model)
        if bar is None:
            continue
        bar.max, bar.value = max(total, 1), done
        # Chunks taken from a result store were not computed in this run: not in its speed.
        fresh = max(0, done - len(stored.get(model, ())))
        rows = n_rows * fresh / total if total else 0
        speed = f"{rows / elapsed:,.0f} rows/s" if elapsed > 0 and fresh else "starting"
        row["texts"][model].value = f"{done}/{total} chunks &middot; {speed}"
