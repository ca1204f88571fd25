"""Small helpers both sides use, each one idea: a quiet notebook (``quiet``), warnings
attributed to the user's line (``warn``), settings read from arguments or the environment
(``settings``), files only their owner may read (``private_files``), this machine's GPUs
read with NVML (``gpus``), and byte counts for people (``units``).

Shared: the kernel and the workers both import it, so it imports nothing else of nbtool.

Example:
    >>> from nbtool._util import human_bytes
    >>> human_bytes(3_000_000)
    '3.0 MB'
"""

from __future__ import annotations

from nbtool._util.gpus import FAKE_GPUS_ENV, GPU, discover_gpus, open_nvml, parse_inventory
from nbtool._util.private_files import (private_folder, private_problem, read_private,
    write_private)
from nbtool._util.quiet import (cluster_gone, expects_gpu, native_logs_filtered,
    planned_restart, quiet_dask, quiet_kernel)
from nbtool._util.settings import as_bytes, check_count, check_size, env_setting
from nbtool._util.units import human_bytes
from nbtool._util.warn import warn_user

__all__ = ["FAKE_GPUS_ENV", "GPU", "as_bytes", "check_count", "check_size", "cluster_gone",
           "discover_gpus", "env_setting", "expects_gpu", "human_bytes",
           "native_logs_filtered", "open_nvml", "parse_inventory", "planned_restart",
           "private_folder", "private_problem", "quiet_dask", "quiet_kernel", "read_private",
           "warn_user", "write_private"]
