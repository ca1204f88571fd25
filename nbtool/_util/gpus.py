"""The GPUs of this machine, read with NVML (``nvidia-ml-py``), never by importing a
framework: TensorFlow, JAX or PyTorch would take GPU memory in the kernel. Shared by the
engine's worker plan and the dashboard's GPU monitor.

Set ``NBTOOL_FAKE_GPUS`` to inject an inventory (tests, or planning for a GPU machine from
a laptop): a JSON list such as ``[{"index": 0, "name": "A100", "memory_total": "40GB"}]``,
or the shorthand ``"2x16GB"``.

Example:
    >>> parse_inventory("2x16GB")[0].label
    'gpu:0'
"""

from __future__ import annotations

import dataclasses
import json
import os

from nbtool._util.settings import as_bytes

FAKE_GPUS_ENV = "NBTOOL_FAKE_GPUS"


@dataclasses.dataclass(frozen=True)
class GPU:
    """One GPU as NVML (or an injected inventory) describes it.

    Example:
        >>> GPU(0, "H100", 80 * 2**30).label
        'gpu:0'
    """

    index: int
    name: str
    memory_total: int
    uuid: str = ""

    @property
    def label(self) -> str:
        """The device name workers and placement use: ``gpu:<index>``."""
        return f"gpu:{self.index}"


def discover_gpus() -> list[GPU]:
    """The GPUs of this machine, from NVML (or ``NBTOOL_FAKE_GPUS``); ``[]`` if none.

    Example:
        >>> import os
        >>> os.environ["NBTOOL_FAKE_GPUS"] = "2x16GB"
        >>> [g.label for g in discover_gpus()]
        ['gpu:0', 'gpu:1']
        >>> del os.environ["NBTOOL_FAKE_GPUS"]
    """
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake:
        return parse_inventory(fake)
    pynvml = open_nvml()
    if pynvml is None:
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append(GPU(i, name.decode() if isinstance(name, bytes) else name,
                            int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                            str(pynvml.nvmlDeviceGetUUID(h))))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def open_nvml():
    """The ``pynvml`` module with NVML started, or None where there is no NVML (no
    nvidia-ml-py, or no driver: a CPU machine). NVML counts its users: match each
    successful call with ``nvml.nvmlShutdown()``.

    Example:
        >>> nvml = open_nvml()
        >>> nvml is None or nvml.nvmlShutdown() is None
        True
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:   # no driver: a CPU machine
        return None
    return pynvml


def parse_inventory(text: str) -> list[GPU]:
    """Parse an injected GPU inventory: JSON, or the shorthand ``"NxSIZE"``.

    Example:
        >>> parse_inventory("2x16GB")[1]
        GPU(index=1, name='fake', memory_total=16000000000, uuid='')
        >>> parse_inventory('[{"index": 3, "name": "T4", "memory_total": "15GB"}]')[0].label
        'gpu:3'
    """
    text = text.strip()
    if "x" in text and not text.startswith("["):
        count, size = text.split("x", 1)
        return [GPU(i, "fake", as_bytes(size)) for i in range(int(count))]
    try:
        items = json.loads(text)
        return [GPU(int(d["index"]), str(d.get("name", "fake")),
                    as_bytes(d["memory_total"]), str(d.get("uuid", "")))
                for d in items]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{FAKE_GPUS_ENV}={text!r} is not a GPU inventory ({e}); expected JSON like "
            '[{"index": 0, "name": "A100", "memory_total": "40GB"}] or the shorthand '
            "'2x16GB'.") from None
