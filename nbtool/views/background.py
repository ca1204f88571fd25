"""Predictions that run in the background while the notebook stays usable.

In a Jupyter kernel the watcher is a task on the kernel's own event loop: it redraws the
progress bars, waits for the result without blocking the loop, then binds it to the
notebook variable and shows it in the cell that started it. In a terminal IPython (no
running loop) a thread collects the result and binds it; nothing draws from that thread
but one closing line.

Example:
    >>> bg = BackgroundRun(run, progress_view(run.progress()), bind=print)  # doctest: +SKIP
    >>> bg.start(); bg.result(timeout=60)                                     # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import html
import sys
import threading
from typing import Callable
import warnings

from nbtool.views.progress import INTERVAL, TextProgress, WidgetProgress, in_notebook


class BackgroundRun:
    """A prediction in flight; ``result()`` waits for it, ``done`` says if it finished.

    Example:
        >>> bg.done, bg.progress()        # doctest: +SKIP
        (False, {'cnn': (3, 8)})
    """

    def __init__(self, run, view: TextProgress | WidgetProgress | None,
                 bind: Callable | None = None, name: str | None = None, show: bool = True):
        self.run = run
        self.view = view
        self.bind = bind
        self.name = name
        self.prediction = None
        self.exception: BaseException | None = None
        self._done = threading.Event()
        self.output = None   # the output area in the starting cell (a notebook)
        self.task = None
        self.show = show   # False when the caller places the progress and result itself

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def progress(self) -> dict[str, tuple[int, int]]:
        return self.run.progress()

    def start(self) -> "BackgroundRun":
        """Start watching: on the running event loop if there is one, else in a thread.

        In a notebook, everything the run shows (its progress, then its result, its
        failure or its warnings) goes to an output area placed now, in the cell that
        started it: never under whichever cell happens to run when it finishes.
        """
        if self.show and in_notebook():
            import ipywidgets as w
            from IPython.display import HTML, display

            self.output = w.Output()
            display(self.output)
            with self.output:   # this cell is running now: displays go into the area
                if self.view is not None:
                    self.view.show()
                display(HTML("<i>running in the background...</i>"))
        elif self.view is not None and self.show:
            self.view.show()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self.task = loop.create_task(self._watch())
        else:
            threading.Thread(target=self._collect, name="nbtool-background", daemon=True).start()
        return self

    async def _watch(self) -> None:
        try:
            while not self.run.done:
                if self.view is not None:
                    self.view.update(self.run.progress())
                await asyncio.sleep(INTERVAL)
            res, caught = await asyncio.to_thread(self._collect_warnings)
        except BaseException as e:   # shown below, never swallowed
            self._finish(None, e)
            return
        self._finish(res, None, caught)

    def _collect_warnings(self):
        """The run's result and the warnings raised while assembling it (a failed save,
        a model loaded again later...): they are shown in the run's own output area.

        ``catch_warnings`` is process-wide: a warning the notebook itself raises in these
        few milliseconds of assembling would show here rather than in its cell (never lost).
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = self.run.collect()
        return res, list(caught)

    def _collect(self) -> None:
        try:
            res, caught = self._collect_warnings()
        except BaseException as e:
            self._finish(None, e)
            return
        self._finish(res, None, caught)

    def _finish(self, res, error: BaseException | None, caught=()) -> None:
        if error is None and self.bind is not None:
            try:
                self.bind(res)
            except BaseException as e:   # a failing bind is an error of the run too
                error = e
        self.prediction, self.exception = res, error
        try:
            self._show(res, error, caught)
        finally:   # whatever showing did, whoever waits on the run is told it ended
            self._done.set()

    def _show(self, res, error, caught) -> None:
        if self.view is not None:
            self.view.finish(res, error)
        if self.output is not None:
            self._show_outcome(res, error, caught)
        elif not self.show:
            pass   # the caller shows the outcome (the dashboard's result area)
        elif error is not None:
            print(f"[nbtool] background prediction failed: {type(error).__name__}: {error}",
                  file=sys.stderr)
        else:
            where = f" -> {self.name}" if self.name else ""
            print(f"[nbtool] background prediction finished{where}: {res!r}".splitlines()[0])

    def _show_outcome(self, res, error, caught) -> None:
        """Into the run's output area (from any thread: ``append_*`` needs no cell)."""
        from IPython.display import HTML

        out = self.output
        out.outputs = tuple(o for o in out.outputs
                            if "running in the background" not in str(o.get("data", {})))
        for w in caught:
            out.append_display_data(HTML(
                f"<pre style='color:#b9770e'>{html.escape(w.category.__name__)}: "
                f"{html.escape(str(w.message))}</pre>"))
        if error is not None:
            out.append_display_data(HTML(
                f"<pre style='color:#c0392b'>background prediction failed: "
                f"{html.escape(type(error).__name__)}: {html.escape(str(error))}</pre>"))
        else:
            out.append_display_data(res)

    def result(self, timeout: float | None = None):
        """Wait for the prediction and return it (raising what the run raised).

        Example:
            >>> res = bg.result(timeout=600)   # doctest: +SKIP
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"the background prediction is still running after {timeout}s")
        if self.exception is not None:
            raise self.exception
        return self.prediction

    def __repr__(self) -> str:
        state = ("failed: " + str(self.exception)) if self.exception else \
            ("done" if self.done else "running")
        target = f", result -> {self.name}" if self.name else ""
        return f"<nbtool background prediction: {state}{target}>"
