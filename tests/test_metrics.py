"""What a prediction's numbers say: classes, agreement between models, accuracy, confusion,
and how far two models' outputs are apart."""

import numpy as np
import pytest

from nbtool.prediction.metrics import accuracy, agreement, confusion, output_agreement
from predictions import digits_like_scores, make


@pytest.fixture
def digits_like():
    return digits_like_scores()


def test_agreement_accuracy_and_confusion(digits_like):
    labels, good, noisy, _ = digits_like
    res = make({"good": good, "noisy": noisy})
    names, mat = agreement(res)
    assert names == ["good", "noisy"] and mat[0, 1] == pytest.approx(0.75)
    assert accuracy(res, labels) == {"good": 1.0, "noisy": 0.75}
    cm = confusion(np.argmax(noisy, 1), labels, 4)
    assert cm.sum() == 40 and np.trace(cm) == 30


def test_output_agreement_measures_how_far_two_models_are_apart():
    a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    b = np.array([[0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    got = output_agreement(a, b)
    assert got["max_abs_diff"] == pytest.approx(0.5)
    assert got["top1_agreement"] == pytest.approx(2 / 3)
    assert "top1_agreement" not in output_agreement(a[:, :1], b[:, :1])   # one column: no argmax
    with pytest.raises(ValueError, match=r"outputs of shapes \(3, 2\) and \(2, 2\)"):
        output_agreement(a, b[:2])
