"""What the magics accept: words of a line, shared options, checks that name their flag.

A magic's line is split into words as a shell would; the options several subcommands take
are declared once; a bad value is refused with a ``UsageError`` naming its flag and the fix.

Pure parsing: nothing here runs a model or needs a kernel, so it is tested on its own.

Example:
    >>> split_line('register cnn "my models/cnn.keras" --replicas 2', "%nbtool")
    ['register', 'cnn', 'my models/cnn.keras', '--replicas', '2']
    >>> whole_number("2"), gpus_arg("0,1"), batch_size_flag("auto")
    (2, '0,1', 'auto')
"""

from __future__ import annotations

import argparse
import difflib
import keyword
import shlex

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument


def gpus_arg(text: str) -> str:
    """argparse type for ``--gpus``: ``auto``, ``none``, or GPU indices like ``0,1``.

    Example:
        >>> gpus_arg("auto"), gpus_arg("0,1")
        ('auto', '0,1')
    """
    if text in ("auto", "none") or all(g.strip().isdigit() for g in text.split(",")):
        return text
    raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or GPU indices like 0,1, got "
                                     f"{text!r}. Fix: e.g. --gpus 0,1")


def backend_arg(text: str) -> str:
    """argparse type for ``--backend``: the Keras backend the workers run (whether it is
    installed is checked by ``nbtool.start``).

    Example:
        >>> backend_arg("jax"), backend_arg("PyTorch")
        ('jax', 'torch')
    """
    name = text.strip().lower()
    name = "torch" if name == "pytorch" else name
    if name in ("tensorflow", "jax", "torch"):
        return name
    raise argparse.ArgumentTypeError(f"expected 'tensorflow', 'jax' or 'torch', got {text!r}. "
                                     "Fix: e.g. --backend jax")


def whole_number(text: str) -> int:
    """argparse type: a count of rows, workers or replicas; 0 and negatives are refused.

    Example:
        >>> whole_number("3")
        3
        >>> whole_number("0")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected a whole number >= 1, got '0'. ...
    """
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise argparse.ArgumentTypeError(
            f"expected a whole number >= 1, got {text!r}. Fix: pass e.g. 2, or leave the "
            "option out for the default")
    return n


#: ``--device``, ``--replicas`` and ``--trusted``: what ``register`` and ``register-dir``
#: both take (a decorator each, like IPython's own ``@argument``).
device_option = argument("--device", default="auto",
                         help="auto, cpu, gpu or one device like gpu:1")
trusted_option = argument("--trusted", action="store_true", help="allow files that run "
                          "code when loaded: Lambda layers (Python stored in the file) and "
                          "SavedModel directories")


def replicas_flag(text: str) -> int | None:
    """argparse type for ``--replicas``: a whole number pins that many workers; ``auto``
    (the default) is None: every worker with room (:mod:`nbtool.catalog.placement`).

    Example:
        >>> replicas_flag("2"), replicas_flag("auto")
        (2, None)
    """
    return None if text.strip().lower() == "auto" else whole_number(text)


def replicas_option(help: str):
    """``--replicas N`` (a whole number, or ``auto``: the default), with its help text.

    Example:
        >>> from IPython.core.magic_arguments import magic_arguments
        >>> @magic_arguments(name="nbtool load")
        ... @replicas_option("workers that hold it")
        ... def load(self, args):
        ...     "Load a model."
        >>> load.parser.parse_args(["--replicas", "2"]).replicas
        2
        >>> load.parser.parse_args([]).replicas is None
        True
    """
    return argument("--replicas", type=replicas_flag, default=None, help=help)


def split_line(line: str, magic: str) -> list[str]:
    """A magic's line split into words as a shell would (quotes group, and are removed;
    ``#`` starts a comment, as in Python).

    Example:
        >>> split_line('register cnn "my models/cnn.keras"  # the small one', "%nbtool")
        ['register', 'cnn', 'my models/cnn.keras']
    """
    try:
        return shlex.split(line, comments=True)   # `%nbtool models  # note`, as in Python
    except ValueError as e:   # shlex says only "No closing quotation"
        raise UsageError(f"{magic} {line}: {str(e).lower()} (a quote opened but never "
                         "closed). Fix: close the quote, e.g. \"models/my model.keras\", or "
                         "drop it if the value has no spaces.") from None


def batch_size_flag(text: str | None) -> int | str | None:
    """``--batch-size``: a whole number >= 1, ``auto``, or absent (None).

    Example:
        >>> batch_size_flag("32"), batch_size_flag(None)
        (32, None)
        >>> batch_size_flag("0")
        Traceback (most recent call last):
        ...
        IPython.core.error.UsageError: --batch-size 0: expected a whole number >= 1 or 'auto'.
    """
    if text is None or text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"--batch-size {text}: expected a whole number >= 1 or 'auto'.")
    return int(text)


def check_variable_name(name: str, flag: str = "--out") -> str:
    """Refuse a name that cannot safely be bound in the notebook's namespace.

    An identifier, not a keyword (``class``), not a dunder: binding ``__builtins__`` or
    the like breaks the namespace itself (the next ``print`` is a NameError).

    Example:
        >>> check_variable_name("preds")
        'preds'
        >>> check_variable_name("1bad")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        IPython.core.error.UsageError: --out '1bad' is not a Python identifier...
    """
    if not name.isidentifier():
        problem = ("is not a Python identifier (letters, digits and _, not starting with a "
                   "digit; no dots or spaces)")
    elif keyword.iskeyword(name):
        problem = "is a Python keyword"
    elif name.startswith("__") and name.endswith("__"):
        problem = "is a dunder name, which Python keeps for itself (binding it breaks the " \
                  "notebook's namespace)"
    else:
        return name
    raise UsageError(f"{flag} {name!r} {problem}. Fix: pass a plain variable name, "
                     f"e.g. {flag} preds.")


def check_size(text: str | None, flag: str) -> None:
    """Refuse a size like ``4GB`` that Dask cannot read (or that is not positive), naming
    the flag; None (the option left out) is fine.

    Example:
        >>> check_size("4GB", "--memory-budget")
        >>> check_size("lots", "--memory-budget")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        IPython.core.error.UsageError: --memory-budget lots (...): expected a positive size like 4GB or 500MB. Fix: e.g. --memory-budget 4GB.
    """
    if text is None:
        return
    from nbtool._util import as_bytes

    try:
        ok = as_bytes(text) > 0
    except (ValueError, TypeError) as e:
        ok, text = False, f"{text} ({e})"
    if not ok:
        raise UsageError(f"{flag} {text}: expected a positive size like 4GB or 500MB. "
                         f"Fix: e.g. {flag} 4GB.")


def check_choice(flag: str, value: str, choices, what: str) -> str:
    """Refuse a value that is not one of ``choices``, suggesting the closest one.

    Example:
        >>> check_choice("--variants", "int9", ["float16", "int8"], "a variant")
        Traceback (most recent call last):
        ...
        IPython.core.error.UsageError: --variants int9: not a variant. Did you mean 'int8'? Variants: float16, int8.
    """
    if value in choices:
        return value
    close = difflib.get_close_matches(value, list(choices), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    kind = what.split(" ", 1)[-1]
    raise UsageError(f"{flag} {value}: not {what}.{hint} {kind.capitalize()}s: "
                     + ", ".join(choices) + ".")
