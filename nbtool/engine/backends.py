"""The Keras backend the workers run (TensorFlow, JAX or PyTorch), as the kernel sees it:
the check of ``start(backend=...)`` and what a worker's environment needs for it.

The kernel never imports JAX or PyTorch (either would take GPU memory here): whether one
is installed is asked with ``importlib.util.find_spec``. The workers' side of it is
:mod:`nbtool.worker.keras_backends`.

Example:
    >>> check_backend("tensorflow"), backend_env("torch", "cpu:0")["KERAS_BACKEND"]
    ('tensorflow', 'torch')
"""

from __future__ import annotations

import importlib.util
import os

from nbtool.errors import InvalidOption, NbtoolError

#: The Keras backends the workers may run, and the package each needs installed.
BACKEND_PACKAGES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def backend_env(backend: str, device: str) -> dict[str, str]:
    """What a worker's environment needs for its Keras ``backend`` before anything imports
    Keras: ``KERAS_BACKEND`` and ``NBTOOL_BACKEND``, and the backend's memory and thread
    settings. TensorFlow: memory growth (in every worker's environment). JAX: no
    preallocation (it would map 75% of the GPU at its first array); on a CPU worker, the
    CPU platform only (no probing for CUDA). No XLA thread flag: JAX 0.10's CPU runtime
    ran a convnet and an MLP at 1.0 core here with or without
    ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` (CPU time over
    wall time, 3 runs each), so a one-thread worker already keeps to its core. PyTorch:
    its threads are set when it starts (:func:`nbtool.worker.keras_backends.torch_module`).

    Example:
        >>> backend_env("jax", "gpu:0")
        {'KERAS_BACKEND': 'jax', 'NBTOOL_BACKEND': 'jax', 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
        >>> backend_env("torch", "cpu:0")
        {'KERAS_BACKEND': 'torch', 'NBTOOL_BACKEND': 'torch'}
    """
    env = {"KERAS_BACKEND": backend, "NBTOOL_BACKEND": backend}
    if backend == "jax":
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        if device.startswith("cpu"):
            env["JAX_PLATFORMS"] = "cpu"
    return env


def check_backend(backend: str | None) -> str:
    """The Keras backend the workers will run: ``backend``, else ``NBTOOL_BACKEND``, else
    ``"tensorflow"``. A name that is none of :data:`BACKEND_PACKAGES`, or a backend whose
    package is not installed here (looked up with ``importlib.util.find_spec``, never
    imported: JAX or PyTorch would take GPU memory in the kernel), is refused; the local
    workers run this environment's Python.

    Example:
        >>> check_backend(None) in BACKEND_PACKAGES
        True
        >>> check_backend("tensorflow")
        'tensorflow'
        >>> check_backend("mxnet")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.InvalidOption: backend='mxnet'; expected one of 'tensorflow', 'jax', 'torch' ...
    """
    if backend is None:
        backend = os.environ.get("NBTOOL_BACKEND") or "tensorflow"
    name = str(backend).strip().lower()
    name = "torch" if name == "pytorch" else name
    if name not in BACKEND_PACKAGES:
        raise InvalidOption(None, "backend", backend, "one of 'tensorflow', 'jax', 'torch' (the "
                            "Keras backend the workers run)", "backend='jax' or 'torch', or "
                            "leave it out for TensorFlow")
    package = BACKEND_PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise NbtoolError(
            f"backend={backend!r}: the {package!r} package is not installed in this Python "
            f"environment, whose interpreter the workers run. Fix: pip install {package} (or "
            f"pip install 'nbtool[{name}]'), then start again; or use backend='tensorflow'.")
    return name
