"""What a Prediction shows inline: summary, class charts, agreement, accuracy, gallery."""

import numpy as np
import pytest

from nbtool.prediction.inputs import as_source
from nbtool.prediction.metrics import disagreement_rows
from nbtool.prediction.report import render_html
from predictions import digits_like_scores, make


@pytest.fixture
def digits_like():
    return digits_like_scores()


def test_html_has_table_charts_accuracy_confusion_and_gallery(digits_like):
    labels, good, noisy, images = digits_like
    mean = (good + noisy) / 2
    res = make({"good": good, "noisy": noisy}, combined=mean, combine="mean",
               source=as_source(images))
    acc = res.evaluate(labels)
    assert acc["ensemble"] >= 0.75
    html = res._repr_html_()
    assert "<table" in html and "rows/s" in html and "cpu:0" in html and "accuracy" in html
    assert html.count("<svg") == 3          # class distribution, agreement, confusion
    assert "predicted classes" in html and "agreement between models" in html
    assert "confusion (ensemble)" in html
    assert "where the models disagree most" in html and "data:image/png;base64," in html
    rows = disagreement_rows(res)
    assert set(rows.tolist()) <= set(range(10))   # exactly where they disagree
    text = repr(res)
    assert "accuracy=1.000" in text and "accuracy=0.750" in text


def test_no_class_charts_for_regression_outputs():
    rng = np.random.default_rng(1)
    res = make({"reg": rng.normal(size=(30, 1)) * 10})
    html = render_html(res)
    assert "<table" in html and "<svg" not in html


def test_the_view_stays_small_for_big_results():
    rng = np.random.default_rng(2)
    n = 200_000
    a = rng.random((n, 100)).astype("float32")
    b = rng.random((n, 100)).astype("float32")
    res = make({"a": a, "b": b}, n=n, source=as_source(rng.random((n, 8, 8)).astype("float32")))
    res.evaluate(rng.integers(0, 100, size=n))
    html = res._repr_html_()
    assert len(html) < 150_000                    # charts capped at 20 classes, 8 images
    assert html.count("<img") <= 8


def test_failed_chunks_and_errors_show(digits_like):
    from nbtool.errors import ChunkError

    _, good, _, _ = digits_like
    broken = good.copy()
    broken[10:20] = np.nan
    res = make({"m": broken})
    res.errors.append(ChunkError("m", 1, (10, 20), "cpu1", "ValueError: boom"))
    html = res._repr_html_()
    assert "nbtool-errors" in html and "rows 10:20" in html and "boom" in html


def test_a_missing_combined_is_said_first_in_the_html_and_the_text(engine, reference,
                                                                   failing_pair):
    """Before: an ensemble whose model failed on some chunks showed a combined column of
    the survivors alone, and nothing in the view said so."""
    from html import escape

    chk, good = failing_pair
    x = reference["x8"].copy()
    x[[5, 25, 45]] = np.nan                                     # 3 of 6 chunks fail
    res = engine.predict([chk, good], x, chunk_size=10)
    note = (f"combined is not available: model '{chk}' failed on 3 of 6 chunks; pass "
            "partial_combine=True to combine the others")
    html = res._repr_html_()
    assert html.startswith("<div class='nbtool-prediction'><div class='nbtool-warning'")
    assert html.index(escape(note)) < html.index("<table")     # above every number
    assert repr(res).splitlines()[1] == f"  ! {note}"          # right under the header
    part = engine.predict([chk, good], x, chunk_size=10, partial_combine=True)
    assert "combined is partial (partial_combine=True)" in part._repr_html_().split("<table")[0]
    whole = engine.predict([chk, good], reference["x8"], chunk_size=10)
    assert "nbtool-warning" not in whole._repr_html_() and " ! " not in repr(whole)
