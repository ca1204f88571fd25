"""Each GPU's utilisation and memory now, read from NVML in the notebook kernel.

NVML (``nvidia-ml-py``) asks the driver directly, as jupyterlab-nvdashboard does;
TensorFlow is never imported here (it would take GPU memory in the kernel). A machine
without the NVIDIA driver has no GPUs to show: ``[]``. With ``NBTOOL_FAKE_GPUS`` set, the
injected GPUs are reported with their memory totals and no readings (``None``): a fake GPU
has no utilisation, and none is invented.

Example:
    >>> import os
    >>> os.environ["NBTOOL_FAKE_GPUS"] = "1x16GB"
    >>> GpuMonitor().read()
    [GpuReading(index=0, name='fake', memory_total=16000000000, memory_used=None, utilization=None)]
    >>> del os.environ["NBTOOL_FAKE_GPUS"]
"""

from __future__ import annotations

import dataclasses
import os

from nbtool._util import FAKE_GPUS_ENV, open_nvml, parse_inventory


@dataclasses.dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment. ``None`` means "not known" (a fake GPU, or NVML does not
    support that reading on this device), never zero.

    Example:
        >>> GpuReading(0, "H100", 80 * 10**9, 20 * 10**9, 87).label
        'gpu:0'
    """

    index: int
    name: str
    memory_total: int
    memory_used: int | None
    utilization: int | None    # % of the last sample period a kernel ran on the GPU

    @property
    def label(self) -> str:
        return f"gpu:{self.index}"


class GpuMonitor:
    """Reads every GPU's utilisation and memory; NVML is opened on the first read (once:
    a refresh per second must not pay its start) and shut by :meth:`close`.

    Example:
        >>> monitor = GpuMonitor()
        >>> readings = monitor.read()      # [] on a machine without the NVIDIA driver
        >>> all(r.memory_total > 0 for r in readings)
        True
        >>> monitor.close()
    """

    def __init__(self):
        self._handles: list | None = None    # None: NVML not opened yet
        self._nvml = None                    # the pynvml module, once NVML is open

    def read(self) -> list[GpuReading]:
        """Every GPU now, by index; ``[]`` without NVML (no driver, or no nvidia-ml-py)."""
        fake = os.environ.get(FAKE_GPUS_ENV)
        if fake:
            return [GpuReading(g.index, g.name, g.memory_total, None, None)
                    for g in parse_inventory(fake)]
        if self._handles is None:
            self._handles = self._open()
        return [self._read_one(index, handle) for index, handle in self._handles]

    def _open(self) -> list:
        pynvml = open_nvml()
        if pynvml is None:
            return []
        self._nvml = pynvml
        return [(i, pynvml.nvmlDeviceGetHandleByIndex(i))
                for i in range(pynvml.nvmlDeviceGetCount())]

    def _read_one(self, index: int, handle) -> GpuReading:
        nvml = self._nvml
        name = _or_none(nvml.nvmlDeviceGetName, handle) or "GPU"
        memory = _or_none(nvml.nvmlDeviceGetMemoryInfo, handle)
        rates = _or_none(nvml.nvmlDeviceGetUtilizationRates, handle)   # unsupported on MIG
        return GpuReading(index, name.decode() if isinstance(name, bytes) else str(name),
                          int(memory.total) if memory else 0,
                          int(memory.used) if memory else None,
                          int(rates.gpu) if rates else None)

    def close(self) -> None:
        """Let go of NVML (it counts its users: other readers in the kernel go on)."""
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
        self._nvml, self._handles = None, None


def _or_none(read, handle):
    """One NVML reading, or None where the device does not support it (or is lost)."""
    import pynvml

    try:
        return read(handle)
    except pynvml.NVMLError:
        return None
