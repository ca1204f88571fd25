"""The worker side's one door: the tasks the kernel sends to Dask workers, and the plugin
that prepares them. The kernel imports worker code only from here.

Importing this package imports no TensorFlow and no LiteRT: the kernel imports it to
reference the task functions (Dask pickles them by module path), and the workers import
TensorFlow the first time a task needs it (:func:`nbtool.worker.environment.tensorflow`); a
CPU worker whose models run from remembered OpenVINO or LiteRT conversions never does.

Inside, one module per concern:

- ``tasks``: predict a chunk, load, unload, report (what the kernel sends);
- ``process``: this worker process's model cache, idle memory and counters; the plugin;
- ``model_cache``: models resident under a budget, LRU eviction, OOM halving, their states;
- ``loading``: open a model file, its precision, load errors;
- ``runtimes/``: what a model runs in (TensorFlow, JAX/PyTorch, LiteRT, OpenVINO), one
  fixed-batch predictor each, built by one function;
- ``auto/``: ``runtime="auto"``: choosing the runtime, remembering the choice, guarding it;
- ``measure``: the batch-size sweep and the costs this machine measured;
- ``reading``: a chunk's rows from memory or files, read a piece ahead; ``writing``: a
  chunk's outputs into the result store;
- ``environment``: the TensorFlow handle, memory, this worker's name and device;
  ``keras_backends``: which Keras backend this worker runs and its device and memory
  questions;
- ``variants``: variants of a model (LiteRT, Keras int8, OpenVINO int8), made on a worker.

Example:
    >>> from nbtool.worker import predict_chunk, resource_name
    >>> resource_name("cpu0")
    'nbtool-worker-cpu0'
"""

from nbtool.wire import resource_name
from nbtool.worker.environment import machine_folder
from nbtool.worker.loading import PRECISIONS
from nbtool.worker.measure import model_costs, record_cost
from nbtool.worker.process import NbtoolWorkerPlugin
from nbtool.worker.reading import read_rows
from nbtool.worker.tasks import (load_model, predict_chunk, resident_models, unload_models,
    worker_status)
from nbtool.worker.variants import CONVERSIONS, convert_variant

__all__ = ["CONVERSIONS", "PRECISIONS", "NbtoolWorkerPlugin", "convert_variant", "load_model",
           "model_costs", "predict_chunk", "read_rows", "record_cost", "resident_models",
           "resource_name", "unload_models", "worker_status", "machine_folder"]
