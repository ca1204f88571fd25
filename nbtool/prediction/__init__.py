"""A prediction from the user's input to the result.

- ``runs``: a run checked once, planned and submitted (the engine's ``predict``);
- ``run``: one run in flight: its task graph, progress, the chunks collected and the
  outputs assembled (combined, saved);
- ``planning``: which worker computes which chunk;
- ``inputs``: what is accepted as input (one module), ``sources``: the input kinds
  (arrays, ``.npy``, zarr, image folders, Dask arrays);
- ``results``: the Prediction the user gets, ``metrics`` and ``report`` (+ ``svg``) show it;
- ``store``: the result store on disk (zarr/npz) and its lock;
- ``output_memo``: outputs remembered by content, so a repeated run is read back.

Example:
    >>> from nbtool.prediction import Prediction
    >>> Prediction.__name__
    'Prediction'
"""

from __future__ import annotations

from nbtool.prediction.inputs import as_source, check_fits, images
from nbtool.prediction.metrics import output_agreement
from nbtool.prediction.output_memo import cache_info, clear_cache
from nbtool.prediction.report import fmt
from nbtool.prediction.results import Prediction, open_prediction
from nbtool.prediction.run import PredictionRun
from nbtool.prediction.runs import RunOptions, Runs, remove_folders

__all__ = ["Prediction", "PredictionRun", "RunOptions", "Runs", "as_source", "cache_info",
           "check_fits", "clear_cache", "fmt", "images", "open_prediction", "output_agreement",
           "remove_folders"]
