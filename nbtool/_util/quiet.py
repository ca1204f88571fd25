"""A quiet notebook: known-harmless log lines are dropped, everything else still shows.

Three sources of noise reach a notebook's cells in red:

* TensorFlow's C++ start-up lines, written straight to file descriptor 2 (so neither
  Python's ``logging`` nor ``TF_CPP_MIN_LOG_LEVEL`` catches the ones printed before absl's
  logging starts): the oneDNN notice, the CPU-instructions notice, and on a machine without
  a GPU "Could not find cuda drivers" and "failed call to cuInit". :class:`NativeLogFilter`
  puts a pipe on descriptor 2 and passes on every line except those; the CUDA ones only
  where no GPU is expected, since on a GPU machine they are the real problem.
* Dask's messages about a worker restart that nbtool asked for (a hard unload):
  "Restarting worker", "Worker process still alive after 4.0 seconds, killing", "Removing
  worker ... caused the cluster to lose already computed task(s)". Inside
  :func:`planned_restart` they are dropped; the same messages about an unplanned restart
  (a worker that crashed) still show.

* Dask's "Event loop was unresponsive": the cluster's loop shares the kernel's process,
  so a long cell (training a model) stalls it; nothing for the user to do.

Setting ``NBTOOL_QUIET=0`` turns the filters off.

Example:
    >>> noisy = b"I0000 00:00:1.2 3 port.cc:153] oneDNN custom operations are on."
    >>> is_noise(noisy, expect_gpu=False)
    True
    >>> is_noise(b"Fatal Python error: Segmentation fault", expect_gpu=False)
    False
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time

#: Lines TensorFlow prints on every start, on every machine: never a problem.
ALWAYS_NOISE = (
    re.compile(rb"oneDNN custom operations are on"),
    re.compile(rb"This TensorFlow binary is optimized to use available CPU instructions"),
    # The second line of the message above.
    re.compile(rb"^To enable the following instructions: .* rebuild TensorFlow"),
    re.compile(rb"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    # LiteRT's line when an interpreter first allocates: XNNPACK is simply its CPU kernels.
    re.compile(rb"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU"),
    # The LiteRT converter, on options a Keras conversion never sets.
    re.compile(rb"tf_tfl_flatbuffer_helpers\.cc:\d+\] Ignored (output_format|"
               rb"drop_control_dependency)\."),
)
#: Lines that say "no GPU": the expected state of a CPU-only worker or machine, and a real
#: problem where a GPU is expected (they are kept there).
NO_GPU_NOISE = (
    re.compile(rb"Could not find cuda drivers on your machine, GPU will not be used"),
    re.compile(rb"failed call to cuInit"),
    re.compile(rb"Unable to register cu(DNN|FFT|BLAS) factory"),
)
#: Dask's messages about a worker restart; dropped only while one is planned.
RESTART_NOISE = (
    "Restarting worker",
    "Worker process still alive after",
    "caused the cluster to lose already computed task",
    "Nanny asking worker to close",
    "Worker process %d was killed by signal",
)
#: Dask's diagnostics a notebook user cannot act on: the cluster's event loop shares the
#: kernel's process, so any long cell (training a model) "blocks" it for a while.
ALWAYS_DASK_NOISE = ("Event loop was unresponsive",)
#: The loggers (in the notebook's process) that report worker restarts and loop stalls.
DASK_LOGGERS = ("distributed.nanny", "distributed.scheduler", "distributed.core",
                "distributed.client")


def enabled() -> bool:
    """False when the user asked to see everything (``NBTOOL_QUIET=0``).

    Example:
        >>> enabled()
        True
    """
    return os.environ.get("NBTOOL_QUIET", "1") != "0"


def is_noise(line: bytes, expect_gpu: bool) -> bool:
    """True for a known-harmless TensorFlow line (see the module's lists).

    Example:
        >>> is_noise(b"E0000 cuda_platform.cc:52] failed call to cuInit: (303)", True)
        False
    """
    patterns = ALWAYS_NOISE if expect_gpu else ALWAYS_NOISE + NO_GPU_NOISE
    return any(p.search(line) for p in patterns)


class NativeLogFilter:
    """Filters what this process writes to file descriptor 2 (C++ libraries included).

    ``start()`` moves the real descriptor aside, puts a pipe in its place and passes each
    line that is not :func:`is_noise` on to it, from a daemon thread; ``stop()`` puts the
    real descriptor back and passes on whatever was still in the pipe. A process that dies
    abruptly loses what the thread had not yet passed on, so worker processes filter only
    while TensorFlow starts (see :func:`native_logs_filtered`).

    Example:
        >>> f = NativeLogFilter(expect_gpu=False).start()      # doctest: +SKIP
        >>> f.stop()                                          # doctest: +SKIP
    """

    def __init__(self, expect_gpu: bool):
        self.expect_gpu = expect_gpu
        self.dropped = 0
        self._real = None
        self._read_end = None
        self._thread = None
        self._stopped = False

    def start(self) -> "NativeLogFilter":
        import sys

        with contextlib.suppress(Exception):
            sys.stderr.flush()   # what Python buffered goes out before the swap
        self._real = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._read_end = read_end
        self._thread = threading.Thread(target=self._pass_on, name="nbtool-native-log-filter",
                                        daemon=True)
        self._thread.start()
        return self

    def _pass_on(self) -> None:
        import select

        pending = b""
        while True:
            # A line still without its newline after a moment goes on as it is: a writer
            # may be waiting for it (ipykernel, closing, writes one NUL byte and waits
            # until its own reader sees it).
            try:
                ready, _, _ = select.select([self._read_end], [], [], 0.1)
            except (OSError, ValueError):   # closed by stop(): nothing more will come
                break
            if not ready:
                if pending:
                    self._write([pending], newline=False)
                    pending = b""
                continue
            try:
                data = os.read(self._read_end, 65536)
            except OSError:
                data = b""
            if not data:
                break
            *lines, pending = (pending + data).split(b"\n")
            self._write(lines)
        if pending:
            self._write([pending], newline=False)

    def _write(self, lines: list[bytes], newline: bool = True) -> None:
        kept = []
        for line in lines:
            if is_noise(line, self.expect_gpu):
                self.dropped += 1
            else:
                kept.append(line + (b"\n" if newline else b""))
        if kept:
            with contextlib.suppress(OSError):
                os.write(self._real, b"".join(kept))

    def stop(self, timeout: float = 2.0) -> None:
        """Put the real descriptor 2 back and pass on what is left in the pipe."""
        import sys

        if self._real is None or self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(self._real, 2)   # closes the pipe's last write end here: the thread sees EOF
        self._thread.join(timeout)
        if not self._thread.is_alive():   # else a child process still holds a write end:
            os.close(self._read_end)      # the thread keeps passing its lines on
            os.close(self._real)


@contextlib.contextmanager
def native_logs_filtered(expect_gpu: bool):
    """Drop TensorFlow's known-harmless start-up lines written while the block runs.

    Example:
        >>> with native_logs_filtered(expect_gpu=False):   # doctest: +SKIP
        ...     import tensorflow
    """
    if not enabled():
        yield
        return
    f = NativeLogFilter(expect_gpu).start()
    try:
        yield f
    finally:
        f.stop()


_KERNEL_FILTER: NativeLogFilter | None = None


def quiet_this_process(expect_gpu: bool) -> NativeLogFilter | None:
    """Filter this process's descriptor 2 for good (the notebook kernel); once per process.

    In a kernel, descriptor 2 is already a pipe that ipykernel reads and forwards to the
    cells, from a thread of its own process: filtering in front of it adds no new way to
    lose a line.

    Example:
        >>> quiet_this_process(expect_gpu=False)   # doctest: +SKIP
    """
    global _KERNEL_FILTER
    if _KERNEL_FILTER is None and enabled():
        _KERNEL_FILTER = NativeLogFilter(expect_gpu).start()
    return _KERNEL_FILTER


def expects_gpu() -> bool:
    """Whether this process should see a GPU: by its worker plan, else by what NVML finds.

    Asked before TensorFlow starts, to tell its harmless start-up lines from real trouble
    (a GPU worker that finds no GPU must say so). The kernel asks it too: it has no plan,
    so NVML answers.

    Example:
        >>> import os
        >>> os.environ["NBTOOL_DEVICE"] = "gpu:1"; expects_gpu()
        True
        >>> del os.environ["NBTOOL_DEVICE"]
    """
    if os.environ.get("NBTOOL_FAKE_GPUS"):   # an injected inventory: no real GPU behind it
        return False
    device = os.environ.get("NBTOOL_DEVICE")
    if device:
        return device.startswith("gpu")
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() == "-1":
        return False
    # A kernel, or a worker nbtool did not plan (an existing cluster): does this machine
    # have a GPU? (NVML directly: this module sits below devices.py.)
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:   # no nvidia-ml-py, or no driver: a CPU machine
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    finally:
        pynvml.nvmlShutdown()


def quiet_kernel() -> NativeLogFilter | None:
    """In a notebook kernel, drop TensorFlow's known-harmless lines from its cells.

    Called by ``%load_ext nbtool`` and :func:`nbtool.start`; it covers what TensorFlow
    prints in the kernel from then on (the notebook's own Keras training included), so
    load nbtool first. Outside a kernel (a script, a terminal) it does nothing.

    Example:
        >>> quiet_kernel() is None      # not in a kernel here
        True
    """
    try:
        from IPython import get_ipython
    except ImportError:   # pragma: no cover - IPython is a dependency
        return None
    ip = get_ipython()
    if ip is None or getattr(ip, "kernel", None) is None:   # not a kernel: nothing to do
        return None
    return quiet_this_process(expect_gpu=expects_gpu())


class _DaskNoise(logging.Filter):
    """Drops :data:`ALWAYS_DASK_NOISE`, and Dask's restart messages while
    :func:`planned_restart` is in force (and for a few seconds after, for the messages
    that arrive late from the cluster's thread)."""

    def __init__(self):
        super().__init__()
        self.active = 0
        self.until = 0.0
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        planned = self.active or time.monotonic() < self.until
        if any(text in message for text in ALWAYS_DASK_NOISE) or (
                planned and any(text in message for text in RESTART_NOISE)):
            self.dropped += 1
            return False
        return True


_DASK_NOISE = _DaskNoise()
_DASK_LOCK = threading.Lock()


def quiet_dask() -> None:
    """Put the filter of Dask's noise on Dask's loggers in this process (once).

    Example:
        >>> quiet_dask()
        >>> any(isinstance(f, _DaskNoise) for f in logging.getLogger("distributed.core").filters)
        True
    """
    if not enabled():
        return
    with _DASK_LOCK:
        for name in DASK_LOGGERS:
            log = logging.getLogger(name)
            if _DASK_NOISE not in log.filters:
                log.addFilter(_DASK_NOISE)


@contextlib.contextmanager
def planned_restart(grace: float = 5.0):
    """Silence Dask's worker-restart messages for a restart nbtool asked for.

    The outcome is what the caller returns (a hard unload returns the workers it
    restarted); the messages would only land in red under whichever cell made the client.

    Example:
        >>> with planned_restart():                         # doctest: +SKIP
        ...     client.restart_workers(["cpu0"])
    """
    if not enabled():
        yield
        return
    quiet_dask()
    with _DASK_LOCK:
        _DASK_NOISE.active += 1
    try:
        yield _DASK_NOISE
    finally:
        with _DASK_LOCK:
            _DASK_NOISE.active -= 1
            _DASK_NOISE.until = time.monotonic() + grace


@contextlib.contextmanager
def cluster_gone():
    """Silence the client's errors while it is closed after its cluster died: its
    reconnecting, cancelled by the close, is logged by Dask as an error with a traceback,
    though the caller is about to say what happened (``EngineNotRunning``).

    Example:
        >>> with cluster_gone():
        ...     logging.getLogger("distributed.utils").error("not shown")
    """
    logs = [logging.getLogger(n) for n in ("distributed.client", "distributed.utils")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
