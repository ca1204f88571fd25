"""The IPython face: ``%load_ext nbtool``, the ``%nbtool`` line magics (start,
attach, register, load, run, dashboard...) and the ``%%infer`` cell magic (``magics``), with
their argument parsing (``magic_args``). It talks to the engine, never to workers.

Example:
    >>> from nbtool.notebook import load_ipython_extension
    >>> callable(load_ipython_extension)
    True
"""

from __future__ import annotations

from nbtool.notebook.magics import load_ipython_extension

__all__ = ["load_ipython_extension"]
