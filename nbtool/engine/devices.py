"""How many workers to run on this machine's devices, and each one's environment and budget.

The GPUs themselves are found by :mod:`nbtool._util.gpus` (NVML, or an injected inventory);
where each model goes is :mod:`nbtool.catalog.placement`.

Example:
    >>> from nbtool._util.gpus import GPU
    >>> from nbtool.engine.devices import plan_workers
    >>> slots = plan_workers([GPU(0, "A100", 40 * 2**30), GPU(1, "A100", 40 * 2**30)],
    ...                      cores=16, total_memory=64 * 2**30)
    >>> [(s.name, s.env["CUDA_VISIBLE_DEVICES"], s.tf_threads) for s in slots]
    [('gpu0', '0', 8), ('gpu1', '1', 8)]
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from nbtool._util import GPU, as_bytes
from nbtool.engine.backends import backend_env


#: Memory one worker needs before any model: TensorFlow's runtime alone is ~0.65 GB of RSS
#: on this stack (measured: RSS after ``import tensorflow`` in a fresh process).
WORKER_BASE_MEMORY = int(0.7 * 2**30)

#: Share of a GPU's memory that models may take; the rest is for activations.
GPU_BUDGET_SHARE = 0.8


@dataclasses.dataclass(frozen=True)
class WorkerSlot:
    """The plan for one worker process: its name, device, environment and budget.

    ``env`` is set by the Nanny before the worker process starts, which is the only time
    CUDA and TensorFlow read it.

    Example:
        >>> slot = plan_workers([], n_workers=1, cores=2, total_memory=8 * 2**30)[0]
        >>> slot.name, slot.device, slot.env["CUDA_VISIBLE_DEVICES"]
        ('cpu0', 'cpu:0', '-1')
    """

    name: str
    device: str
    tf_threads: int
    budget: int
    env: dict = dataclasses.field(default_factory=dict)
    backend: str = "tensorflow"


def select_gpus(gpus: str | int | Sequence[int] | None, inventory: list[GPU]) -> list[GPU]:
    """Pick the GPUs asked for: ``"auto"``/``None`` all, ``"none"``/``[]`` none, or indices.

    Example:
        >>> from nbtool._util.gpus import parse_inventory
        >>> inv = parse_inventory("2x16GB")
        >>> [g.index for g in select_gpus("auto", inv)], select_gpus("none", inv)
        ([0, 1], [])
        >>> [g.index for g in select_gpus("1", inv)]
        [1]
    """
    if gpus is None or gpus == "auto":
        return list(inventory)
    if gpus in ("none", False) or (isinstance(gpus, (list, tuple)) and not gpus):
        return []
    if isinstance(gpus, str):
        wanted = [int(g) for g in gpus.replace(" ", "").split(",") if g]
    elif isinstance(gpus, int):
        wanted = [gpus]
    else:
        wanted = [int(g) for g in gpus]
    by_index = {g.index: g for g in inventory}
    missing = [g for g in wanted if g not in by_index]
    if missing:
        have = ", ".join(str(i) for i in by_index) or "none"
        raise ValueError(
            f"gpus={gpus!r} asks for GPU(s) {missing}, but this machine has GPU index(es) "
            f"{have}. Fix: pass gpus='auto' to use every GPU, or gpus='none' for CPU workers.")
    return [by_index[g] for g in wanted]


def default_cpu_workers(cores: int, total_memory: int) -> int:
    """How many CPU workers to run: one single-threaded worker per core.

    Measured on a 2-core machine (``benchmarks/worker_layout.py``, three small convnets and
    an MLP on 4,000 32x32x3 inputs, median of 5): two workers with one TensorFlow thread
    each took 0.469 s, one worker with two threads 0.547 s (1.17x slower). TF's intra-op
    parallelism does little for these batch sizes, while two processes overlap their Python
    overhead. Capped so that each worker keeps at least ``2 * WORKER_BASE_MEMORY`` of RAM,
    and at 8 (beyond that, more threads per worker).

    Example:
        >>> default_cpu_workers(2, 24 * 2**30), default_cpu_workers(64, 24 * 2**30)
        (2, 8)
        >>> default_cpu_workers(4, 2 * 2**30)
        1
    """
    by_memory = max(1, total_memory // (2 * WORKER_BASE_MEMORY))
    return int(max(1, min(cores, 8, by_memory)))


def plan_workers(gpus: list[GPU], *, n_workers: int | None = None,
                 memory_budget: int | str | None = None, cores: int | None = None,
                 total_memory: int | None = None,
                 backend: str = "tensorflow") -> list[WorkerSlot]:
    """Plan the worker processes: one per GPU, or CPU workers when there is no GPU.

    Each GPU worker sees exactly its GPU (``CUDA_VISIBLE_DEVICES=<index>``) with memory
    growth on; CPU workers see none. The backend's thread counts split the cores so the
    workers together use them all without oversubscribing. ``backend`` is the Keras
    backend every worker runs (:func:`~nbtool.engine.backends.backend_env` says what that sets).

    Example:
        >>> [(s.name, s.tf_threads) for s in plan_workers([], cores=4, total_memory=2**35)]
        [('cpu0', 1), ('cpu1', 1), ('cpu2', 1), ('cpu3', 1)]
        >>> plan_workers([], n_workers=1, cores=2, backend="jax")[0].env["KERAS_BACKEND"]
        'jax'
    """
    import psutil

    cores = cores or os.cpu_count() or 1
    total_memory = total_memory or psutil.virtual_memory().total
    budget = None if memory_budget is None else as_bytes(memory_budget)
    if gpus:
        if n_workers not in (None, len(gpus)):
            raise ValueError(
                f"n_workers={n_workers} with {len(gpus)} GPU(s): nbtool runs exactly one "
                "worker per GPU. Fix: leave n_workers out, or choose the GPUs with gpus=[...].")
        threads = max(1, cores // len(gpus))
        return [WorkerSlot(
            name=f"gpu{g.index}", device=g.label, tf_threads=threads,
            budget=budget or int(g.memory_total * GPU_BUDGET_SHARE),
            env=_worker_env(str(g.index), threads, g.label, budget or
                            int(g.memory_total * GPU_BUDGET_SHARE), backend),
            backend=backend)
            for g in gpus]
    n = n_workers or default_cpu_workers(cores, total_memory)
    if n < 1:
        raise ValueError(f"n_workers={n_workers}: need at least one worker.")
    threads = max(1, cores // n)
    cpu_budget = budget or max(WORKER_BASE_MEMORY,
                               int((total_memory / n - WORKER_BASE_MEMORY) * 0.5))
    return [WorkerSlot(name=f"cpu{i}", device=f"cpu:{i}", tf_threads=threads,
                       budget=cpu_budget,
                       env=_worker_env("-1", threads, f"cpu:{i}", cpu_budget, backend),
                       backend=backend)
            for i in range(n)]


def _worker_env(visible: str, threads: int, device: str, budget: int,
                backend: str) -> dict[str, str]:
    return {
        # One GPU per worker, by index: a rotated list would still let TF take them all.
        "CUDA_VISIBLE_DEVICES": visible,
        # NVML numbers GPUs by PCI bus, CUDA fastest first: on a machine with mixed GPUs
        # the index NVML planned with would name another GPU in CUDA without this.
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        # Without it TensorFlow maps nearly all of the GPU's memory at start.
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        "TF_NUM_INTRAOP_THREADS": str(threads),
        "TF_NUM_INTEROP_THREADS": "1",
        "OMP_NUM_THREADS": str(threads),
        # Warnings and errors only; the known-harmless start-up lines that TensorFlow
        # prints before this takes effect are dropped by nbtool._util.quiet.
        "TF_CPP_MIN_LOG_LEVEL": "1",
        "NBTOOL_DEVICE": device,
        "NBTOOL_TF_THREADS": str(threads),
        "NBTOOL_MEMORY_BUDGET": str(budget),
        **backend_env(backend, device),
    }


