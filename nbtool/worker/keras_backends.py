"""Which Keras backend this worker runs (TensorFlow, JAX or PyTorch), JAX's and PyTorch's
start with this worker's settings, and what only that backend can say: whether it runs on
a GPU, the bytes its GPU allocator holds, how it gives memory back, what it sees.

The plan sets ``NBTOOL_BACKEND`` and ``KERAS_BACKEND`` in each worker's environment before
the worker process starts (:func:`nbtool.engine.devices.plan_workers`); a worker of a cluster
nbtool did not start runs what its ``KERAS_BACKEND`` says. TensorFlow's own handle stays in
:mod:`~nbtool.worker.environment`, which asks here which backend runs. Nothing here imports
JAX or PyTorch at import time, and a JAX or PyTorch worker never imports TensorFlow.

Example:
    >>> backend_name() in BACKENDS
    True
    >>> oom_by_name(type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"))
    True
    >>> oom_by_name(type("XlaRuntimeError", (RuntimeError,), {})("INVALID_ARGUMENT: shape"))
    False
"""

from __future__ import annotations

import os
import threading

#: The Keras backends a worker may run.
BACKENDS = ("tensorflow", "jax", "torch")

_MODULES: dict = {}
_LOCK = threading.Lock()


def backend_name() -> str:
    """The Keras backend of this worker: ``NBTOOL_BACKEND``, else ``KERAS_BACKEND``, else
    ``"tensorflow"`` (Keras' own default); ``"pytorch"`` is Keras' other name for torch.

    Example:
        >>> os.environ.get("NBTOOL_BACKEND", "tensorflow") == backend_name() or "KERAS_BACKEND" in os.environ
        True
    """
    name = (os.environ.get("NBTOOL_BACKEND") or os.environ.get("KERAS_BACKEND")
            or "tensorflow").strip().lower()
    return "torch" if name == "pytorch" else name


def start_backend():
    """Make Keras run on this worker's backend: ``KERAS_BACKEND`` is set (before Keras is
    imported, the only time it reads it), and JAX or PyTorch is started with this worker's
    settings. Returns the JAX or torch module, or None for TensorFlow (started by
    :func:`nbtool.worker.environment.tensorflow`).

    Example:
        >>> start_backend() is None or start_backend().__name__ in ("jax", "torch")
        True
    """
    name = backend_name()
    if name == "tensorflow":
        return None
    os.environ["KERAS_BACKEND"] = name
    module = jax_module() if name == "jax" else torch_module()
    hide_tensorflow_from_keras()
    return module


def hide_tensorflow_from_keras() -> bool:
    """Make Keras treat TensorFlow as not installed in this process, as it is on a machine
    with only JAX or PyTorch. Keras asks its lazy ``tensorflow`` handle whether TensorFlow
    is available in a few places that do not need it: loading a Keras-2 ``.h5`` file
    decodes its config that way, and asking imports TensorFlow (seconds, and a second
    framework's memory in a JAX or PyTorch worker). Returns whether the handle was found;
    a Keras without it imports TensorFlow there again, which tests/test_backends.py sees.

    Example:
        >>> hide_tensorflow_from_keras()   # doctest: +SKIP
        True
    """
    try:
        from keras.src.utils import module_utils
    except ImportError:   # another Keras layout: nothing to hide
        return False
    handle = getattr(module_utils, "tensorflow", None)
    if handle is None or getattr(handle, "module", None) is not None:
        return False   # no handle, or TensorFlow already imported through it
    handle._available = False
    return True


def jax_module():
    """The ``jax`` module, imported once with no preallocation of GPU memory (JAX would
    otherwise map 75% of the GPU at its first array; set in the worker's environment by
    the plan too, this covers a worker nbtool did not start), and its GPU memory cap if one
    is set (:func:`gpu_memory_fraction`).

    Example:
        >>> jax = jax_module()   # doctest: +SKIP
    """
    with _LOCK:
        if "jax" not in _MODULES:
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            fraction = gpu_memory_fraction()
            if fraction is not None:   # the allocator's cap, preallocated or not
                os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(fraction)
            import jax

            _MODULES["jax"] = jax
    return _MODULES["jax"]


def torch_module():
    """The ``torch`` module, imported once with this worker's intra-op threads
    (``NBTOOL_TF_THREADS``, the plan's share of the cores), one inter-op thread, and its
    GPU memory cap if one is set (:func:`gpu_memory_fraction`).

    Example:
        >>> torch = torch_module()   # doctest: +SKIP
    """
    with _LOCK:
        if "torch" not in _MODULES:
            import torch

            threads = int(os.environ.get("NBTOOL_TF_THREADS", "0") or 0)
            if threads:
                torch.set_num_threads(threads)
                try:   # only before its first parallel work
                    torch.set_num_interop_threads(1)
                except RuntimeError:
                    pass
            fraction = gpu_memory_fraction()
            if fraction is not None and torch.cuda.is_available():
                torch.cuda.set_per_process_memory_fraction(fraction)
            _MODULES["torch"] = torch
    return _MODULES["torch"]


def gpu_memory_fraction() -> float | None:
    """The share of its GPU this worker's JAX or PyTorch may allocate, if capped:
    ``NBTOOL_GPU_MEMORY_FRACTION`` (e.g. ``0.1``; what an out-of-memory check runs under),
    else None (no cap: the whole GPU, taken as needed).

    Example:
        >>> os.environ.get("NBTOOL_GPU_MEMORY_FRACTION") is not None or gpu_memory_fraction() is None
        True
    """
    text = os.environ.get("NBTOOL_GPU_MEMORY_FRACTION")
    return float(text) if text else None


def process_gpu_bytes() -> int | None:
    """The GPU memory this process holds as the driver sees it (NVML, the first visible
    GPU), or None where NVML cannot say (no NVML, no GPU, another PID namespace).

    Example:
        >>> process_gpu_bytes() is None or process_gpu_bytes() >= 0
        True
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:   # no nvidia-ml-py, or no driver: a CPU machine
        return None
    try:
        visible = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
        if not visible.isdigit():
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible))
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == os.getpid():
                return int(p.usedGpuMemory or 0)
        return None
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def oom_by_name(e: BaseException) -> bool:
    """Whether ``e`` is PyTorch's or JAX's out-of-memory error, by its type's name and
    message (asking must not import either): ``torch.OutOfMemoryError``
    (``torch.cuda.OutOfMemoryError``), or JAX's ``XlaRuntimeError``/``JaxRuntimeError``
    saying ``RESOURCE_EXHAUSTED`` or "Out of memory".

    Example:
        >>> oom_by_name(type("JaxRuntimeError", (Exception,), {})("RESOURCE_EXHAUSTED: x"))
        True
    """
    kind = type(e).__name__
    if kind == "OutOfMemoryError":
        return True
    if kind in ("XlaRuntimeError", "JaxRuntimeError"):
        text = str(e)
        return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    return False


def planned_threads() -> int | None:
    """The intra-op threads the plan gave this worker (``NBTOOL_TF_THREADS``), or None.

    Example:
        >>> planned_threads() == (int(os.environ.get("NBTOOL_TF_THREADS", "0") or 0) or None)
        True
    """
    return int(os.environ.get("NBTOOL_TF_THREADS", "0") or 0) or None


class KerasBackend:
    """What only the Keras backend running here can say: one object per backend
    (:class:`JaxBackend`, :class:`TorchBackend`, and
    :class:`nbtool.worker.environment.TensorFlowBackend` beside TensorFlow's handle), asked
    through :func:`nbtool.worker.environment.keras_backend`, so the questions are asked the
    same way whichever runs.

    Example:
        >>> BACKEND_OBJECTS["torch"].name
        'torch'
    """

    name = ""

    def on_gpu(self) -> bool:
        """Whether it runs on a GPU here (a planned GPU worker sees at most one)."""
        raise NotImplementedError

    def gpus_seen(self) -> list[str]:
        """The GPUs it sees."""
        raise NotImplementedError

    def allocator_bytes(self) -> int:
        """Bytes its GPU allocator has handed out to arrays now (on a GPU worker)."""
        raise NotImplementedError

    def reserved_bytes(self) -> int:
        """Bytes it holds from the GPU, in use or kept for reuse (on a GPU worker)."""
        raise NotImplementedError

    def empty_cache(self) -> None:
        """Give its cached GPU memory back to the device where it can (most keep it until
        the process ends)."""

    def threads(self) -> int | None:
        """Its intra-op threads (the plan's where it does not say)."""
        return planned_threads()


class JaxBackend(KerasBackend):
    """JAX: its first device's platform, its allocator's statistics; XLA's BFC allocator
    keeps what it took until the process ends.

    Example:
        >>> JaxBackend().threads() == planned_threads()
        True
    """

    name = "jax"

    def on_gpu(self) -> bool:
        return jax_module().devices()[0].platform == "gpu"

    def gpus_seen(self) -> list[str]:
        return [str(d) for d in jax_module().devices() if d.platform == "gpu"]

    def allocator_bytes(self) -> int:
        stats = jax_module().devices()[0].memory_stats() or {}
        return int(stats.get("bytes_in_use", 0))

    def reserved_bytes(self) -> int:
        stats = jax_module().devices()[0].memory_stats() or {}
        return int(stats.get("pool_bytes") or stats.get("bytes_reserved")
                   or stats.get("bytes_in_use", 0))


class TorchBackend(KerasBackend):
    """PyTorch: ``cuda.is_available``, ``memory_allocated``/``memory_reserved``; its
    caching allocator gives memory back (``empty_cache``).

    Example:
        >>> TorchBackend().empty_cache()   # nothing to give back before torch is imported
    """

    name = "torch"

    def on_gpu(self) -> bool:
        return bool(torch_module().cuda.is_available())

    def gpus_seen(self) -> list[str]:
        torch = torch_module()
        if not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]

    def allocator_bytes(self) -> int:
        return int(torch_module().cuda.memory_allocated())

    def reserved_bytes(self) -> int:
        return int(torch_module().cuda.memory_reserved())

    def empty_cache(self) -> None:
        torch = _MODULES.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def threads(self) -> int | None:
        if "torch" in _MODULES:
            return int(_MODULES["torch"].get_num_threads())
        return planned_threads()


#: The backends other than TensorFlow, by name (TensorFlow's is the environment's).
BACKEND_OBJECTS: dict[str, KerasBackend] = {"jax": JaxBackend(), "torch": TorchBackend()}

