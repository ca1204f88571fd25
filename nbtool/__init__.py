"""nbtool: run many Keras models at once from a Jupyter notebook, on a Dask cluster.

    >>> import nbtool
    >>> eng = nbtool.start()                       # doctest: +SKIP
    >>> eng.register("cnn", "models/cnn.keras")    # doctest: +SKIP
    >>> res = eng.predict(["cnn"], x)              # doctest: +SKIP

The shortcuts ``nbtool.register``, ``nbtool.prediction`` ... act on the last engine started.
Importing nbtool is light: nothing heavy loads until it is used, and the notebook kernel
never imports TensorFlow (models load inside the workers). In a notebook kernel, importing
it (or ``%load_ext nbtool``) also keeps TensorFlow's known-harmless start-up lines out of
the cells from then on (:mod:`nbtool._util.quiet`; ``NBTOOL_QUIET=0`` shows them): import nbtool
before Keras.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "Engine", "Prediction", "start", "default_engine", "register", "register_dir",
    "models", "devices", "load", "unload", "predict", "predict_async", "close", "dashboard",
    "errors", "open_prediction", "images", "cache_info", "clear_cache", "attach",
    "running", "shutdown",
]

_LAZY = {
    "Engine": ("nbtool.engine.engine", "Engine"),
    "start": ("nbtool.engine.session", "start"),
    "default_engine": ("nbtool.engine.session", "default_engine"),
    "Prediction": ("nbtool.prediction.results", "Prediction"),
    "open_prediction": ("nbtool.prediction.results", "open_prediction"),
    "images": ("nbtool.prediction.inputs", "images"),
    "cache_info": ("nbtool.prediction.output_memo", "cache_info"),
    "clear_cache": ("nbtool.prediction.output_memo", "clear_cache"),
    "errors": ("nbtool.errors", None),
    "attach": ("nbtool.engine.persist.persistent", "attach"),
    "running": ("nbtool.engine.persist.persistent", "running"),
    "shutdown": ("nbtool.engine.persist.persistent", "shutdown"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'nbtool' has no attribute {name!r}")


def _on_default(method: str):
    def shortcut(*args, **kwargs):
        from nbtool.engine import default_engine

        return getattr(default_engine(), method)(*args, **kwargs)

    shortcut.__name__ = shortcut.__qualname__ = method
    shortcut.__doc__ = (f"``Engine.{method}`` on the default engine (the last one started).\n\n"
                        f"Example:\n    >>> nbtool.{method}(...)   # doctest: +SKIP\n")
    return shortcut


register = _on_default("register")
register_dir = _on_default("register_dir")
models = _on_default("models")
devices = _on_default("devices")
load = _on_default("load")
unload = _on_default("unload")
predict = _on_default("predict")
predict_async = _on_default("predict_async")
close = _on_default("close")
dashboard = _on_default("dashboard")


def load_ipython_extension(ip) -> None:
    """``%load_ext nbtool``: the ``%nbtool`` and ``%%infer`` magics."""
    from nbtool.notebook import load_ipython_extension as load

    load(ip)


def _quiet_kernel() -> None:
    from nbtool._util import quiet_kernel

    quiet_kernel()


_quiet_kernel()
