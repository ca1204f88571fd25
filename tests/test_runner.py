"""runner.py: the checks that run before anything is scheduled, on real model files."""

import numpy as np
import pytest

from nbtool.errors import InputMismatch
from nbtool.registry import inspect_model
from nbtool.runner import check_fits
from nbtool.sources import as_source


def test_a_1d_input_gets_the_reshape_that_gives_whole_rows(model_dir, reference):
    spec = inspect_model("mlp", model_dir / "mlp.keras")      # rows of shape (8,)
    row = reference["x8"][0]
    with pytest.raises(InputMismatch, match=r"Fix: for one row, use x\.reshape\(1, -1\) "
                                            r"\(or x\[None\]\)") as e:
        check_fits(spec, as_source(row))
    assert "len(x)" not in str(e.value)      # x.reshape(8, 8) would fail on 8 values
    check_fits(spec, as_source(row.reshape(1, -1)))     # the fix fits
    flat = reference["x8"][:3].reshape(-1)
    with pytest.raises(InputMismatch, match=r"for 3 rows of 8 values, use x\.reshape\(-1, 8\)"):
        check_fits(spec, as_source(flat))
    assert np.array_equal(flat.reshape(-1, 8), reference["x8"][:3])
    with pytest.raises(InputMismatch, match=r"has 10 values, not a whole number of rows of 8"):
        check_fits(spec, as_source(flat[:10]))
    cnn = inspect_model("cnn", model_dir / "cnn.keras")       # rows of shape (8, 8, 1)
    with pytest.raises(InputMismatch, match=r"for one row, use x\.reshape\(1, 8, 8, 1\)"):
        check_fits(cnn, as_source(reference["img"][0].reshape(-1)))
    with pytest.raises(InputMismatch, match=r"e\.g\. x\.reshape\(len\(x\), 8, 8, 1\)"):
        check_fits(cnn, as_source(reference["img"].reshape(60, 64)))
