"""The models an engine knows and where they live.

- ``catalog``: data only: the registered models, where each is placed, what was learned
  about them (signatures, sizes). It never talks to workers;
- ``registry``: checking a registration (name, file, options) before anything runs;
- ``files``: reading ``.keras``/``.h5``/``.tflite``/SavedModel/OpenVINO IR files without
  TensorFlow (signatures, sizes);
- ``placement``: which workers may hold each model;
- ``loads``: the one part that talks to workers about models: load, unload, replicas,
  loads started in the background, old copies dropped.

Example:
    >>> from nbtool.catalog import WorkerInfo
    >>> WorkerInfo("cpu0", "cpu:0", 2**30).kind
    'cpu'
"""

from __future__ import annotations

from nbtool.catalog.catalog import Catalog, model_names
from nbtool.catalog.files import disk_size
from nbtool.catalog.loads import Loads
from nbtool.catalog.placement import WorkerInfo
from nbtool.catalog.registration import ModelOptions

__all__ = ["Catalog", "Loads", "ModelOptions", "WorkerInfo", "disk_size", "model_names"]
