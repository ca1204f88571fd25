"""A live panel for an engine: devices (memory now and over the last minutes, rows/s per
worker, GPUs from NVML), models with load/unload buttons, a run form, the predictions
running now, and the recent runs.

Standard ipywidgets for the controls, an anywidget view (``widgets/memory_bars.js``) for
the devices (:mod:`nbtool.views.devices`), the running runs in
:mod:`nbtool.views.runs`. One periodic callback on the kernel's event loop refreshes
everything, batched with ``hold_sync``; it reads the workers' state with one
``client.run`` round trip (which runs on the workers' event loops, beside their task
threads, so predictions do not slow down) and stops when the dashboard or the engine is
closed. Buttons never block the kernel: loads are Dask futures, a hard unload runs in a
helper thread that touches no widget, and runs are background runs watched from the event
loop.

Example (in a notebook):
    >>> dash = nbtool.dashboard()    # doctest: +SKIP
    >>> dash                         # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import html
import time
from typing import Any

import ipywidgets as w
import numpy as np

from nbtool._util import human_bytes
from nbtool.views.devices import DeviceSection
from nbtool.views.runs import RunningSection
from nbtool.wire import ModelState

#: Seconds between refreshes.
REFRESH_SECONDS = 1.0
#: Labelled controls size their label to its text: a fixed width cut "chunk size".
LABEL = {"description_width": "initial"}


class Dashboard:
    """The panel. ``display(dash)`` (or leaving it last in a cell) shows it.

    Parameters
    ----------
    engine : Engine
        The engine to show and drive.
    namespace : dict, optional
        Where the run form finds inputs and binds results (the notebook's, by default).
    interval : float
        Seconds between refreshes.
    autorefresh : bool
        Refresh from the running event loop (a notebook kernel has one); without it, call
        :meth:`refresh` yourself.

    Example:
        >>> dash = Dashboard(eng, namespace=globals())   # doctest: +SKIP
        >>> dash.load("cnn"); dash.refresh()             # doctest: +SKIP
    """

    def __init__(self, engine, namespace: dict | None = None, interval: float = REFRESH_SECONDS,
                 autorefresh: bool = True):
        self.engine = engine
        self.namespace = namespace if namespace is not None else _notebook_namespace()
        self.interval = interval
        self.closed = False
        self.task = None
        self.refreshes = 0
        self.pending: list[tuple[str, Any]] = []     # (what, future) of button actions
        self._threads = concurrent.futures.ThreadPoolExecutor(1, "nbtool-dashboard")
        self.run = None                              # the BackgroundRun of the run form
        self.model_lines: dict[str, dict[str, w.Widget]] = {}   # model -> its widgets

        self.title = w.HTML()
        self.message = w.HTML().add_class("nbtool-message")
        self.devices = DeviceSection()
        self.memory = self.devices.bars
        self.running = RunningSection()
        self.models_box = w.VBox().add_class("nbtool-models")
        self.run_models = w.SelectMultiple(description="models", rows=4, style=LABEL
                                           ).add_class("nbtool-run-models")
        self.run_input = w.Dropdown(description="input", style=LABEL).add_class(
            "nbtool-run-input")
        # Text, not a number box: "auto" (nbtool picks) is a value, not a 0.
        self.run_chunk = w.Combobox(value="auto", options=["auto", "256", "1024", "4096"],
                                    ensure_option=False, description="chunk size",
                                    style=LABEL).add_class("nbtool-run-chunk")
        self.run_combine = w.Dropdown(options=["mean", "vote", "none"], value="mean",
                                      description="combine", style=LABEL).add_class(
            "nbtool-run-combine")
        self.run_out = w.Text(value="dash_result", description="bind to", style=LABEL
                              ).add_class("nbtool-run-out")
        self.run_button = w.Button(description="Run", button_style="primary",
                                   icon="play").add_class("nbtool-run-button")
        self.run_button.on_click(lambda _: self.start_run())
        self.run_progress = w.VBox().add_class("nbtool-run-progress")
        self.run_result = w.HTML().add_class("nbtool-run-result")
        self.history = w.HTML().add_class("nbtool-history")
        close = w.Button(description="Close dashboard", icon="times",
                         layout=w.Layout(width="auto"))
        close.on_click(lambda _: self.close())
        form = w.VBox([w.HBox([self.run_models, w.VBox([self.run_input, self.run_chunk])]),
                       w.HBox([self.run_combine, self.run_out, self.run_button])])
        self.widget = w.VBox([
            w.HBox([self.title, close]), self.message,
            w.HTML("<b>Devices</b>"), self.memory,
            w.HTML("<b>Models</b>"), self.models_box,
            w.HTML("<b>Run</b>"), form, self.run_progress, self.run_result,
            w.HTML("<b>Running now</b>"), self.running.box,
            w.HTML("<b>Recent runs</b>"), self.history,
        ]).add_class("nbtool-dashboard")
        self.refresh()
        if autorefresh:
            self.start()

    # -- showing ------------------------------------------------------------------------
    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def start(self) -> bool:
        """Refresh periodically from the running event loop; False if there is none."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self.task is None:
            self.task = loop.create_task(self._refresh_forever())
        return True

    async def _refresh_forever(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.interval)
            if self.closed or self.engine.client.status in ("closing", "closed"):
                self.devices.close()   # the engine stopped: so does the panel
                break
            try:
                self.refresh()
            except Exception as e:   # keep refreshing; say what went wrong
                self.message.value = _error_html(f"refresh failed: {type(e).__name__}: {e}")

    def close(self) -> None:
        """Stop refreshing and remove the panel."""
        self.closed = True
        if self.task is not None:
            self.task.cancel()
        self._threads.shutdown(wait=False)
        self.devices.close()
        self.widget.close()

    # -- refreshing ---------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the engine and its workers once and update every part of the panel."""
        eng = self.engine
        statuses = eng.status()
        self._settle_pending()
        runs = eng.running()
        widgets = [self.title, self.run_models, self.run_input, self.history]
        with contextlib.ExitStack() as stack:
            for widget in widgets + self.running.widgets() + [
                    x for line in self.model_lines.values() for x in line.values()]:
                stack.enter_context(widget.hold_sync())
            self.title.value = (f"<b>nbtool dashboard</b> &middot; {len(statuses)} worker(s), "
                                f"{len(eng.registry)} model(s) &middot; "
                                f"<a href='{eng.dashboard_link}' target='_blank'>Dask</a>")
            self.devices.update(statuses)
            self.running.update(runs)
            self._refresh_models(statuses)
            names = tuple(eng.registry.names())
            if self.run_models.options != names:
                keep = tuple(v for v in self.run_models.value if v in names)
                self.run_models.options = names
                self.run_models.value = keep
            inputs = tuple(_candidate_inputs(self.namespace))
            if self.run_input.options != inputs:
                keep = self.run_input.value if self.run_input.value in inputs else None
                self.run_input.options = inputs
                self.run_input.value = keep if keep is not None else (inputs[0] if inputs
                                                                      else None)
            self.history.value = _history_html(eng.history)
        self.refreshes += 1

    def _refresh_models(self, statuses: dict) -> None:
        eng = self.engine
        if list(self.model_lines) != eng.registry.names():
            self.model_lines = {n: self._model_line(n) for n in eng.registry.names()}
            self.models_box.children = [_model_box(r) for r in self.model_lines.values()] \
                or [w.HTML("<i>no models registered</i>")]
        pending = {what.split(" ", 1)[1] for what, f in self.pending
                   if what.startswith("load ")}
        for row in eng.catalog.model_rows(statuses):   # "auto: cpu0, cpu1" where auto
            line = self.model_lines[row.name]
            queued = row.name in pending
            line["info"].value = (f"<b>{html.escape(row.name)}</b> {row.format}, "
                                  f"{human_bytes(row.size_bytes)} &rarr; "
                                  f"{', '.join(row.devices)}")
            line["state"].value = html.escape(row.state_text(lambda s: _state(s, queued)))
            line["cost"].value = (f"footprint {human_bytes(row.footprint)}, load "
                                  f"{row.load_seconds:.2f}s, last used {_ago(row.last_used)}"
                                  if row.loaded else "")

    def _model_line(self, name: str) -> dict[str, w.Widget]:
        info = w.HTML(layout=w.Layout(width="260px"))
        state = w.HTML(layout=w.Layout(flex="1 1 160px")).add_class(f"nbtool-state-{name}")
        cost = w.HTML(layout=w.Layout(flex="1 1 220px"))
        load = w.Button(description="Load", tooltip=f"load {name} now").add_class(
            f"nbtool-load-{name}")
        unload = w.Button(description="Unload", tooltip=f"drop {name} from the caches"
                          ).add_class(f"nbtool-unload-{name}")
        hard = w.Button(description="Hard unload", button_style="warning",
                        tooltip=f"restart the workers that held {name}").add_class(
            f"nbtool-hard-{name}")
        for b in (load, unload, hard):
            # As wide as its text (a fixed 110px cut "Hard unload"), never shrunk by the
            # row (flex items with overflow hidden shrink to nothing).
            b.layout = w.Layout(width="auto", min_width="80px", flex="0 0 auto")
        load.on_click(lambda _: self.load(name))
        unload.on_click(lambda _: self.unload(name))
        hard.on_click(lambda _: self.unload(name, hard=True))
        return {"info": info, "state": state, "cost": cost, "load": load, "unload": unload,
                "hard": hard}

    def _settle_pending(self) -> None:
        still = []
        for what, fut in self.pending:
            if not fut.done():
                still.append((what, fut))
                continue
            try:
                fut.result()
                self.message.value = f"done: {html.escape(what)}"
            except Exception as e:
                self.message.value = _error_html(f"{what} failed: {e}")
        self.pending = still

    # -- actions ------------------------------------------------------------------------
    def load(self, name: str) -> None:
        """Start loading a model on its workers (the button's action)."""
        try:
            for fut in self.engine.start_load(name).values():
                self.pending.append((f"load {name}", fut))
            self.message.value = f"loading {html.escape(name)}..."
        except Exception as e:
            self.message.value = _error_html(f"load {name} failed: {e}")

    def unload(self, name: str, hard: bool = False) -> None:
        """Unload a model: soft at once; hard in a helper thread (workers restart)."""
        if hard:
            # A load future held here is a task the scheduler would run again on the
            # restarted workers: finished ones are reported and let go, this model's
            # unfinished ones cancelled (it must not come back).
            self._settle_pending()
            for _, fut in [p for p in self.pending if p[0] == f"load {name}"]:
                fut.cancel()
            self.pending = [p for p in self.pending if p[0] != f"load {name}"]
            fut = self._threads.submit(self.engine.unload, name, True)
            self.pending.append((f"hard unload {name}", fut))
            self.message.value = f"restarting the workers that held {html.escape(name)}..."
            return
        try:
            self.engine.unload(name)
            self.message.value = f"unloaded {html.escape(name)}"
        except Exception as e:
            self.message.value = _error_html(f"unload {name} failed: {e}")

    def start_run(self):
        """Run the form's prediction in the background; bind and show it when done."""
        from nbtool.views.background import BackgroundRun
        from nbtool.views.progress import progress_view

        names, var, out = list(self.run_models.value), self.run_input.value, \
            self.run_out.value.strip()
        if not names or not var:
            self.message.value = _error_html("pick at least one model and an input first")
            return None
        if not out.isidentifier():
            self.message.value = _error_html(f"bind to: {out!r} is not a variable name")
            return None
        combine = None if self.run_combine.value == "none" else self.run_combine.value
        try:
            chunk_size = parse_chunk_size(self.run_chunk.value)
        except ValueError as e:
            self.message.value = _error_html(str(e))
            return None
        try:
            run = self.engine.submit(names, self.namespace[var], chunk_size, combine)
        except Exception as e:
            self.message.value = _error_html(f"{type(e).__name__}: {e}")
            return None
        view = progress_view(run.progress(), widgets=True)
        self.run_progress.children = [view.box]
        self.run_result.value = ""

        def bind(res):
            self.namespace[out] = res
            self.run_result.value = res._repr_html_()
            self.message.value = f"result bound to <code>{html.escape(out)}</code>"

        self.run = BackgroundRun(run, view, bind, out, show=False).start()
        return self.run


def parse_chunk_size(text: str) -> int | None:
    """The run form's chunk size: ``None`` for "auto" (or nothing), else a whole number >= 1.

    Example:
        >>> parse_chunk_size("auto"), parse_chunk_size(" 1,024 ")
        (None, 1024)
        >>> parse_chunk_size("abc")
        Traceback (most recent call last):
        ValueError: chunk size: expected 'auto' or a positive whole number, got 'abc'
    """
    value = str(text).strip().replace(",", "").replace("_", "")
    if value.lower() in ("", "auto"):
        return None
    if value.isascii() and value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"chunk size: expected 'auto' or a positive whole number, got {text!r}")


def _model_box(row: dict[str, w.Widget]) -> w.HBox:
    """One model's line: what it is, its state, its cost, then its buttons as one block
    that wraps to a second line in a narrow output (never shrunk: labels stay whole)."""
    buttons = w.HBox([row["load"], row["unload"], row["hard"]],
                     layout=w.Layout(flex="0 0 auto"))
    return w.HBox([row["info"], row["state"], row["cost"], buttons],
                  layout=w.Layout(flex_flow="row wrap", align_items="center"))


def _notebook_namespace() -> dict:
    try:
        from IPython import get_ipython

        ip = get_ipython()
    except ImportError:  # pragma: no cover
        ip = None
    return ip.user_ns if ip is not None else {}


def _candidate_inputs(ns: dict) -> list[str]:
    """Names in the namespace that can be predicted on: arrays, Dask arrays, .npy and
    Parquet paths, tables (pandas, Arrow, Dask), dicts of arrays (several inputs by
    name) and lists of strings (text).

    Example:
        >>> import pandas as pd
        >>> _candidate_inputs({"x": np.zeros((3, 2)), "df": pd.DataFrame({"a": [1]}),
        ...                    "two": {"image": np.zeros((2, 4)), "meta": np.ones((2, 1))},
        ...                    "reviews": ["good", "bad"], "n": 3, "_x": np.zeros(2)})
        ['df', 'reviews', 'two', 'x']
    """
    out = []
    for k, v in list(ns.items()):
        if k.startswith("_"):
            continue
        if _one_input(v):
            out.append(k)
        elif isinstance(v, dict) and v and all(isinstance(n, str) and _one_input(a)
                                               for n, a in v.items()):
            out.append(k)
        elif isinstance(v, list) and v and all(isinstance(t, str) for t in v[:100]):
            out.append(k)
        elif type(v).__module__.split(".")[0] in ("pandas", "pyarrow", "dask") \
                and hasattr(v, "columns" if not hasattr(v, "column_names") else "column_names"):
            out.append(k)
    return sorted(out)


def _one_input(v) -> bool:
    """Whether ``v`` is rows on its own: an array (of numbers or text), a Dask array, or
    a ``.npy``/``.parquet`` path."""
    if isinstance(v, np.ndarray):
        return v.ndim >= 1 and (v.dtype != object or v.size > 0 and isinstance(v.flat[0], str))
    if type(v).__module__.startswith("dask.array") and hasattr(v, "to_delayed"):
        return True
    return isinstance(v, str) and v.endswith((".npy", ".parquet"))


def _state(info: ModelState, queued: bool) -> str:
    """The state's text, plus what only the dashboard knows: a load it queued."""
    state = info.describe()
    if queued and state in ("not loaded", "unloaded", "evicted"):
        return "loading (queued)"
    return {"unloaded": "not loaded (unloaded)", "evicted": "not loaded (evicted)",
            "replaced": "not loaded"}.get(state, state)


def _ago(t: float) -> str:
    if not t:
        return "-"
    s = max(0.0, time.time() - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f} min ago"


def _error_html(text: str) -> str:
    return f"<span style='color:#c0392b'>{html.escape(text)}</span>"


def _history_html(history: list[dict]) -> str:
    if not history:
        return "<i>no runs yet</i>"
    rows = []
    for h in reversed(history[-10:]):
        when = datetime.datetime.fromtimestamp(h["time"]).strftime("%H:%M:%S")
        speed = ", ".join(f"{html.escape(m)} {v:,.0f}/s" for m, v in
                          h["rows_per_second"].items() if v == v)
        rows.append(f"<tr><td>{when}</td><td>{h['rows']:,} rows</td><td>{h['seconds']:.2f}s"
                    f"</td><td>{speed}</td><td>{h['errors']} error(s)</td></tr>")
    return ("<table class='nbtool-table'><thead><tr><th>time</th><th>input</th><th>took</th>"
            "<th>throughput per model</th><th>errors</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")
