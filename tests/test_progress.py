"""Progress bars (the widget model, kernel side), text progress, and background runs."""

import asyncio
import io

import numpy as np

from nbtool.views.background import BackgroundRun
from nbtool.views.progress import progress_view, wait_with_progress


def test_widget_bars_follow_the_counts_and_end_green_or_red():
    view = progress_view({"a": (0, 4), "b": (0, 2)}, widgets=True)
    assert [b.max for b in view.bars.values()] == [4, 2]
    view.update({"a": (3, 4), "b": (1, 2)}, force=True)
    assert view.bars["a"].value == 3 and view.labels["b"].value == "1/2 chunks"

    class Res:
        errors = [type("E", (), {"model": "b"})()]

    view.finish(Res())
    assert view.bars["a"].bar_style == "success" and view.bars["b"].bar_style == "danger"
    assert view.bars["a"].value == 4 and "(errors)" in view.labels["b"].value


def test_text_progress_in_a_terminal(engine, model_dir, reference, unique):
    name = f"{unique}_p"
    engine.register(name, model_dir / "mlp.keras")
    out = io.StringIO()
    run = engine.submit(name, reference["x8"], chunk_size=6)
    res = wait_with_progress(run, progress_view(run.progress(), widgets=False, stream=out))
    assert out.getvalue().rstrip().endswith(f"{name} 10/10")
    assert np.abs(res[name] - reference["mlp"]).max() <= 1e-5
    assert run.progress() == {name: (10, 10)}


def test_background_on_an_event_loop_keeps_it_free_and_binds(engine, model_dir, reference,
                                                             unique):
    name = f"{unique}_bg"
    engine.register(name, model_dir / "mlp.keras")
    bound = {}

    async def main():
        run = engine.submit(name, reference["x8"], chunk_size=3)
        bg = BackgroundRun(run, progress_view(run.progress(), widgets=True),
                           bind=lambda r: bound.setdefault("res", r), name="later").start()
        assert bg.task is not None            # watched by a task on this loop, no thread
        ticks = 0
        while not bg.done:
            ticks += 1
            await asyncio.sleep(0.01)
        return bg, ticks

    bg, ticks = asyncio.run(main())
    assert ticks > 0 and bound["res"] is bg.result()
    assert np.abs(bound["res"][name] - reference["mlp"]).max() <= 1e-5
    assert bg.view.bars[name].value == 20 and bg.view.bars[name].bar_style == "success"


def test_a_background_error_is_shown_not_swallowed(engine, model_dir, reference, unique,
                                                   capsys):
    name = f"{unique}_bgerr"
    engine.register(name, model_dir / "mlp.keras")

    def bind(res):
        raise RuntimeError("could not store the result")

    run = engine.submit(name, reference["x8"])
    bg = BackgroundRun(run, None, bind=bind).start()      # no loop here: a thread collects
    try:
        bg.result(timeout=120)
    except RuntimeError as e:
        assert "could not store" in str(e)
    else:
        raise AssertionError("the error was swallowed")
    assert "background prediction failed: RuntimeError" in capsys.readouterr().err
    assert "failed" in repr(bg)
