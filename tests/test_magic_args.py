"""What the magics accept, parsed without a kernel: words, flags, names and sizes."""

import argparse

import pytest
from IPython.core.error import UsageError

from nbtool.notebook.magic_args import (batch_size_flag, check_choice, check_size, check_variable_name,
                               gpus_arg, split_line, whole_number)


def test_a_comment_after_a_line_magic_is_a_comment_as_in_python():
    """Before: `%nbtool models  # note` failed with "unrecognized arguments: # note"."""
    assert split_line("register cnn m.keras  # the small one", "%nbtool") == [
        "register", "cnn", "m.keras"]
    assert split_line('register cnn "my #1 model.keras"', "%nbtool")[-1] == "my #1 model.keras"


def test_each_bad_value_names_its_flag_and_the_fix():
    with pytest.raises(argparse.ArgumentTypeError, match=r"got '-3'\. Fix: pass e\.g\. 2"):
        whole_number("-3")
    with pytest.raises(argparse.ArgumentTypeError, match=r"got 'x'\. Fix: e\.g\. --gpus 0,1"):
        gpus_arg("x")
    with pytest.raises(UsageError, match=r"--batch-size 1\.5: expected a whole number >= 1"):
        batch_size_flag("1.5")
    with pytest.raises(UsageError, match=r"--memory-budget 0: expected a positive size"):
        check_size("0", "--memory-budget")
    with pytest.raises(UsageError, match=r"--out 'class' is a Python keyword\. Fix:"):
        check_variable_name("class")
    with pytest.raises(UsageError, match=r"not a variant\. Did you mean 'float16'\?"):
        check_choice("--variants", "float61", ["float16", "int8"], "a variant")
    assert (whole_number("4"), gpus_arg("none"), batch_size_flag("8")) == (4, "none", 8)
