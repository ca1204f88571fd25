"""The two decorators of the :class:`~nbtool.engine.engine.Engine` facade: a method's docstring
from the part that implements it, and the check that the engine is still open.

Example:
    >>> class Part:
    ...     def work(self):
    ...         "Do the work."
    >>> class Facade:
    ...     closed, cluster = True, None
    ...     @_open
    ...     @_doc(Part.work)
    ...     def work(self):
    ...         return "done"
    >>> Facade.work.__doc__
    'Do the work.'
    >>> Facade().work()
    Traceback (most recent call last):
    ...
    nbtool.errors.EngineClosed: ...
"""

from __future__ import annotations

import functools
import inspect

from nbtool.errors import EngineClosed


def _doc(implementation):
    """Give a facade method the docstring of the part that does its work: the behaviour is
    written once, where it is implemented (as ``dask.utils.derived_from`` does)."""
    def take(method):
        method.__doc__ = implementation.__doc__
        return method

    return take


def _open(method):
    """Refuse ``method`` on a closed engine with :class:`~nbtool.errors.EngineClosed`, and
    on a persistent one whose process ended with
    :class:`~nbtool.engine.persist.persistent.EngineNotRunning`.

    Checked before the method touches the cluster: a closed client otherwise fails deep
    inside Dask (``RuntimeError: IOLoop is closed``) or, for ``register``, not at all.
    """
    def check(self):
        if self.closed:
            raise EngineClosed(method.__name__)
        if hasattr(self.cluster, "check_running"):
            self.cluster.check_running(self)

    def check_after(self):
        # A persistent engine killed during the call: that, not the chunk errors it left.
        if not self.closed and hasattr(self.cluster, "check_running"):
            self.cluster.check_running(self)

    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def guarded_async(self, *args, **kwargs):
            check(self)
            try:
                return await method(self, *args, **kwargs)
            finally:
                check_after(self)

        return guarded_async

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        check(self)
        try:
            return method(self, *args, **kwargs)
        finally:
            check_after(self)

    return guarded
