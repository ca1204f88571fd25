"""Live progress of a prediction: a bar per model in a notebook, a text line in a terminal.

Progress is read from the run's futures (client-side state, no round trip) and drawn from
the thread that owns the display: the kernel's main thread while a cell blocks, or the
kernel's event loop for background runs. Never from a worker thread writing into an
``Output`` widget, which is how notebooks end up with garbled or lost output.

:func:`progress_view` picks :class:`WidgetProgress` or :class:`TextProgress`, as Dask's
own ``progressbar`` module picks its widget or text bar.

Example:
    >>> run = eng.submit(["cnn", "mlp"], x)      # doctest: +SKIP
    >>> res = wait_with_progress(run)            # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time

#: Seconds between two redraws.
INTERVAL = 0.2


def in_notebook() -> bool:
    """True inside a Jupyter kernel (widgets can render), False in a terminal or script.

    Example:
        >>> in_notebook()
        False
    """
    try:
        from IPython import get_ipython
    except ImportError:   # pragma: no cover - IPython is a dependency
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


class TextProgress:
    """Chunks done per model as one text line, redrawn in place (a terminal, a script).

    Example:
        >>> view = TextProgress({"cnn": (0, 4)}, stream=sys.stdout)
        >>> view.update({"cnn": (2, 4)}, force=True)
        cnn 2/4
        >>> view.text_line()
        'cnn 2/4'
    """

    box = None   # nothing to place in a notebook

    def __init__(self, totals: dict[str, tuple[int, int]], stream=None):
        self.state = dict(totals)
        self.stream = stream or sys.stdout
        self._last_draw = 0.0

    def show(self) -> None:
        """Nothing to place: the line appears with the first update."""

    def text_line(self) -> str:
        return "  ".join(f"{m} {d}/{t}" for m, (d, t) in self.state.items())

    def update(self, progress: dict[str, tuple[int, int]], force: bool = False) -> None:
        """Redraw with new counts (at most every ``INTERVAL`` seconds unless ``force``)."""
        self.state.update(progress)
        if _too_soon(self, force):
            return
        self.stream.write("\r" + self.text_line() if not force else self.text_line() + "\n")
        self.stream.flush()

    def finish(self, result=None, error: BaseException | None = None) -> None:
        """The final line: every chunk counted once the result is there."""
        if result is not None:
            self.state.update({m: (t, t) for m, (_, t) in self.state.items()})
        self.update(self.state, force=True)


class WidgetProgress:
    """A bar per model (ipywidgets), green when done, red where a model had errors.

    Example:
        >>> view = WidgetProgress({"cnn": (0, 4)})
        >>> view.update({"cnn": (2, 4)}, force=True)
        >>> view.bars["cnn"].value, view.labels["cnn"].value
        (2, '2/4 chunks')
    """

    def __init__(self, totals: dict[str, tuple[int, int]]):
        import ipywidgets as w

        self.state = dict(totals)
        self._last_draw = 0.0
        self.bars = {m: w.IntProgress(value=d, min=0, max=max(t, 1), description=m,
                                      bar_style="info", style={"description_width": "initial"},
                                      layout=w.Layout(width="420px"))
                     for m, (d, t) in totals.items()}
        self.labels = {m: w.Label(f"{d}/{t} chunks") for m, (d, t) in totals.items()}
        self.box = w.VBox([w.HBox([self.bars[m], self.labels[m]]) for m in totals])

    def show(self) -> None:
        """Put the bars in the cell's output."""
        from IPython.display import display

        display(self.box)

    def update(self, progress: dict[str, tuple[int, int]], force: bool = False) -> None:
        """Redraw with new counts (at most every ``INTERVAL`` seconds unless ``force``)."""
        self.state.update(progress)
        if _too_soon(self, force):
            return
        with self.box.hold_sync():   # one message for all bars
            for m, (d, t) in progress.items():
                self.bars[m].value = d
                self.labels[m].value = f"{d}/{t} chunks"

    def finish(self, result=None, error: BaseException | None = None) -> None:
        """Show the final state: green bars, red where a model had errors."""
        if result is not None:
            self.state.update({m: (t, t) for m, (_, t) in self.state.items()})
        failed = {getattr(e, "model", None) for e in (result.errors if result else [])}
        with self.box.hold_sync():
            for m, bar in self.bars.items():
                if result is not None:
                    bar.value = bar.max
                bar.bar_style = "danger" if error or m in failed else "success"
                self.labels[m].value = ("failed" if error else
                                        f"{self.state[m][1]}/{self.state[m][1]} chunks"
                                        + (" (errors)" if m in failed else ""))


def progress_view(totals: dict[str, tuple[int, int]], widgets: bool | None = None,
                    stream=None) -> TextProgress | WidgetProgress:
    """The progress view for where the code runs: bars in a notebook, a text line elsewhere
    (``widgets=`` forces one). Both have ``show``, ``update`` and ``finish``.

    Example:
        >>> type(progress_view({"cnn": (0, 4)})).__name__     # not in a notebook here
        'TextProgress'
        >>> type(progress_view({"cnn": (0, 4)}, widgets=True)).__name__
        'WidgetProgress'
    """
    if in_notebook() if widgets is None else widgets:
        return WidgetProgress(totals)
    return TextProgress(totals, stream)


def _too_soon(view, force: bool) -> bool:
    """Whether to skip this redraw: at most one every ``INTERVAL`` seconds, unless forced."""
    now = time.monotonic()
    if not force and now - view._last_draw < INTERVAL:
        return True
    view._last_draw = now
    return False


def wait_with_progress(run, view: TextProgress | WidgetProgress | None = None):
    """Block until ``run`` is done, redrawing ``view``; returns the Prediction.

    Interrupting it (Ctrl-C, the notebook's stop button) cancels the run: nothing of it
    keeps computing or holding memory.

    Example:
        >>> res = wait_with_progress(eng.submit("cnn", x))   # doctest: +SKIP
    """
    if view is not None:
        view.show()
        view.update(run.progress(), force=False)
    try:
        # run.wait, not distributed.wait(timeout=): see PredictionRun.wait (a timed-out
        # distributed.wait kept the finished run's tasks wanted until the next gc).
        while not run.wait(INTERVAL):
            if view is not None:
                view.update(run.progress())
    except BaseException:
        run.cancel()
        raise
    res = run.collect()
    if view is not None:
        view.finish(res)
    return res
