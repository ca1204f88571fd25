"""The worker process's environment: the TensorFlow handle, the device and memory questions
asked of whichever Keras backend runs here, and this worker's name and device (its Dask
resource is named by :func:`nbtool.wire.resource_name`).

TensorFlow is imported here, once, the first time :func:`tensorflow` is called on a worker;
nothing in this module imports it at import time, so the kernel can import the package.
A worker whose Keras runs on JAX or PyTorch (:mod:`~nbtool.worker.keras_backends`) asks that
backend instead, and never imports TensorFlow.

Example:
    >>> describe_exception(ValueError("bad shape\\n  at line 3"))
    'ValueError: bad shape'
"""

from __future__ import annotations

import gc
import hashlib
import os
import re
import sys
import threading

from nbtool._util import expects_gpu, native_logs_filtered
from nbtool.errors import first_line
from nbtool.worker import keras_backends as backends

_TF = None
_TF_LOCK = threading.Lock()


def tensorflow():
    """The ``tensorflow`` module, imported on first use with this worker's thread settings.

    ``NBTOOL_TF_THREADS`` sets the intra-op threads (the plan gives each CPU worker its
    share of the cores); it can only be set before TensorFlow's runtime starts.

    Example:
        >>> tf = tensorflow()   # doctest: +SKIP
    """
    global _TF
    if _TF is None:
        with _TF_LOCK, native_logs_filtered(expect_gpu=expects_gpu()):
            if _TF is None:
                _TF = _start_tensorflow()
    return _TF


def _start_tensorflow():
    """Import TensorFlow and start its runtime with this worker's threads. On a CPU worker
    this happens at the first model that needs it, inside a task: its known-harmless
    start-up lines are filtered here as :func:`nbtool.worker.process.prepare_worker` does
    on a GPU worker (they would land in red under whatever cell runs)."""
    import tensorflow as tf

    threads = int(os.environ.get("NBTOOL_TF_THREADS", "0") or 0)
    if threads:
        try:  # only possible before TensorFlow's runtime starts
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass
    # Each model gets its own tf.function over the same Python function, traced once;
    # TF counts those as "retracing" and warns. They are not: drop just that warning.
    tf.get_logger().addFilter(
        lambda record: "triggered tf.function retracing" not in record.getMessage())
    tf.config.list_logical_devices()   # the runtime starts now, inside the filter
    return tf


def started_tensorflow():
    """The ``tensorflow`` module if this process has started it (:func:`tensorflow`), else
    None: for questions that must not start it.

    Example:
        >>> started_tensorflow() is None or started_tensorflow().__name__ == "tensorflow"
        True
    """
    return _TF


def tensorflow_version() -> str | None:
    """The version of the TensorFlow this process runs, or None if it has not started it.

    Example:
        >>> tensorflow_version() is None or isinstance(tensorflow_version(), str)
        True
    """
    return getattr(_TF, "__version__", None)


class TensorFlowBackend(backends.KerasBackend):
    """TensorFlow, through this worker's handle (:func:`tensorflow`): its logical GPUs,
    its allocator's ``current`` bytes; it does not say its pool's size and never shrinks
    it, so its ``peak`` is the closest it says to what it holds.

    Example:
        >>> keras_backend().name in backends.BACKENDS
        True
    """

    name = "tensorflow"

    def on_gpu(self) -> bool:
        return bool(tensorflow().config.list_logical_devices("GPU"))

    def gpus_seen(self) -> list[str]:
        # A CPU worker whose models run without TensorFlow is not made to start it to say.
        tf = started_tensorflow() if cpu_worker() else tensorflow()
        return [d.name for d in tf.config.list_physical_devices("GPU")] if tf else []

    def allocator_bytes(self) -> int:
        return int(tensorflow().config.experimental.get_memory_info("GPU:0")["current"])

    def reserved_bytes(self) -> int:
        info = tensorflow().config.experimental.get_memory_info("GPU:0")
        return int(info.get("peak", info["current"]))

    def threads(self) -> int | None:
        tf = started_tensorflow() if cpu_worker() else tensorflow()
        return tf.config.threading.get_intra_op_parallelism_threads() if tf is not None \
            else backends.planned_threads()


_TENSORFLOW = TensorFlowBackend()


def keras_backend() -> backends.KerasBackend:
    """The object that answers for the Keras backend this worker runs.

    Example:
        >>> keras_backend().name == backends.backend_name()
        True
    """
    name = backends.backend_name()
    return _TENSORFLOW if name == "tensorflow" else backends.BACKEND_OBJECTS[name]


def cpu_worker() -> bool:
    """Whether the plan made this a CPU worker (``NBTOOL_DEVICE`` is ``cpu:<n>``): then it
    has no GPU to ask TensorFlow about, and needs TensorFlow only for what runs in it.

    Example:
        >>> os.environ.get("NBTOOL_DEVICE", "").startswith("cpu") == cpu_worker()
        True
    """
    return os.environ.get("NBTOOL_DEVICE", "").startswith("cpu")


def on_gpu() -> bool:
    """Whether this worker's Keras backend runs on a GPU (it sees at most one). A CPU
    worker answers without importing anything; elsewhere the backend is asked (TensorFlow:
    its logical GPUs; JAX: its first device's platform; PyTorch: ``cuda.is_available``).

    Example:
        >>> on_gpu()   # doctest: +SKIP
        False
    """
    return not cpu_worker() and keras_backend().on_gpu()


def memory_in_use() -> int:
    """Bytes this worker's process holds: the backend's GPU allocator bytes if it has a
    GPU (TensorFlow's ``current``, JAX's ``bytes_in_use``, PyTorch's
    ``memory_allocated``), else RSS.

    Example:
        >>> memory_in_use() > 0   # doctest: +SKIP
        True
    """
    if on_gpu():
        return keras_backend().allocator_bytes()
    import psutil

    return psutil.Process().memory_info().rss


def held_memory() -> int:
    """Bytes this process holds from its device, whether in use or kept for reuse: on a
    GPU what the driver (NVML) says this process holds, else the backend's reserved bytes;
    on CPU its RSS. What a soft unload gives back shows here, not in
    :func:`memory_in_use` (an allocator's bytes in use drop even when it keeps the memory).

    Example:
        >>> held_memory() > 0   # doctest: +SKIP
        True
    """
    if on_gpu():
        seen = backends.process_gpu_bytes()
        return seen if seen is not None else keras_backend().reserved_bytes()
    import psutil

    return psutil.Process().memory_info().rss


def release_memory() -> None:
    """Clear Keras' global state (if Keras runs here), collect garbage after models were
    dropped, and give the backend's cached GPU memory back where it can (PyTorch's
    ``empty_cache``).

    The freed memory is reusable in this process; TensorFlow (and JAX's allocator) do not
    give it back to the device or the OS while the process lives (that is what a hard
    unload is for). A worker whose models all run without Keras never imports it for this.

    Example:
        >>> release_memory()
    """
    keras = sys.modules.get("keras")
    if keras is not None:
        # Keras' global state (name scopes, graph) and the eager kernel cache.
        keras.backend.clear_session(free_memory=True)
    gc.collect()
    keras_backend().empty_cache()


def out_of_memory_error(e: BaseException) -> bool:
    """Whether ``e`` is the backend's out-of-memory error, asked by its type's name (and,
    for JAX, its message): TensorFlow's ``ResourceExhaustedError``, PyTorch's
    ``OutOfMemoryError``, JAX's ``XlaRuntimeError``/``JaxRuntimeError`` saying
    ``RESOURCE_EXHAUSTED``. A worker must not import a framework to ask.

    Example:
        >>> out_of_memory_error(ValueError("x")), out_of_memory_error(
        ...     type("ResourceExhaustedError", (Exception,), {})())
        (False, True)
        >>> out_of_memory_error(type("XlaRuntimeError", (Exception,), {})(
        ...     "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"))
        True
    """
    return type(e).__name__ == "ResourceExhaustedError" or backends.oom_by_name(e)


def machine_folder() -> str:
    """This machine's nbtool folder (runtime choices, conversions, measured costs, the
    output memo), shared by its workers across sessions:
    ``NBTOOL_CACHE_DIR``, else ``$XDG_CACHE_HOME/nbtool`` or ``~/.cache/nbtool``.

    Example:
        >>> os.path.basename(machine_folder()) == "nbtool" or "NBTOOL_CACHE_DIR" in os.environ
        True
    """
    return os.environ.get("NBTOOL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nbtool")


def artifact_key(spec) -> str:
    """How what this machine remembers for a model's bytes (its runtime choice, its
    conversions) is named in the cache: the bytes' digest, so a copy of the file shares
    it and other bytes under the same path, size and times never do; for a spec made by
    hand without one, the path's hash and the fingerprint.

    Example:
        >>> from nbtool.wire import ModelSpec
        >>> artifact_key(ModelSpec("m", "/m.keras", "keras", 1, "1-1", content="ab" * 32))
        'abababababababababababababababab'
        >>> artifact_key(ModelSpec("m", "/m.keras", "keras", 1, "1-1")).endswith("-1-1")
        True
    """
    if spec.content:
        return spec.content[:32]
    return f"{hashlib.sha1(spec.path.encode()).hexdigest()[:12]}-{spec.fingerprint}"


def worker_name() -> str:
    """This worker's nbtool name (``cpu0``, ``gpu1``...); ``pid<n>`` outside a Dask worker.

    Example:
        >>> worker_name().startswith("pid")   # not in a Dask worker here
        True
    """
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except ValueError:
        return f"pid{os.getpid()}"


def worker_device() -> str:
    """This worker's device label: from the plan (``NBTOOL_DEVICE``) or what its backend
    sees (a worker of a cluster nbtool did not start).

    Example:
        >>> client.run(worker_device)   # doctest: +SKIP
        {'tcp://127.0.0.1:40101': 'gpu:0', 'tcp://127.0.0.1:40102': 'gpu:1'}
    """
    device = os.environ.get("NBTOOL_DEVICE")
    if device:
        return device
    if keras_backend().gpus_seen():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        return f"gpu:{visible}"
    return "cpu:0"


def describe_exception(e: BaseException) -> str:
    """``Type: message`` on one line; TensorFlow's op errors without their graph noise.

    Example:
        >>> describe_exception(RuntimeError("Graph execution error:\\n  File x\\nOOM here"))
        'RuntimeError: OOM here'
        >>> describe_exception(RuntimeError("gather index out of boundsNode number 3 (GATHER) failed"))
        'RuntimeError: gather index out of bounds. Node number 3 (GATHER) failed'
    """
    text = getattr(e, "message", None) or str(e)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[\[.*?\]\]|\s*\[Op:[^\]]*\]", "", text, flags=re.S)
    # LiteRT glues its op's message to the node's ("...out of boundsNode number 3").
    text = re.sub(r"(?<=[a-z])(?=Node number \d+ )", ". ", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Graph execution error"):
        lines = lines[-1:]   # the op's own message comes last, after the Python stack
    return f"{type(e).__name__}: {first_line(chr(10).join(lines))}"
