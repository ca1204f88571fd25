"""What the GPU checks share (tests/test_gpu.py and benchmarks/gpu.py): the real GPUs, the
Keras backends to check, the fixture models and their CPU references (made in child
processes that never touch the GPU), NVML readings per process, probes that run inside a
worker, and the results file ``benchmarks/results/gpu.json``.

The test process itself never imports Keras, JAX, PyTorch or TensorFlow: NVML's device-wide
readings then count the workers alone, and no framework takes GPU memory in it.

``NBTOOL_GPU_TEST_ON_CPU=1`` is a dry run for machines without a GPU: an injected
inventory gives a worker named ``gpu0`` that runs on the CPU, so the tests' Python runs end
to end; checks that need a real GPU are recorded instead of asserted, and nothing is written
unless ``NBTOOL_GPU_RESULTS`` names a file (no GPU figure is ever written from a dry run).

Run as a script (what the child processes do), with ``KERAS_BACKEND`` set:
``python gpu_support.py build DIR`` saves the fixture models and inputs into DIR;
``python gpu_support.py reference DIR OUT.npz`` predicts them with Keras on the CPU.
(benchmarks/gpu.py builds its models the same way, in a child process on the CPU.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS_ENV = "NBTOOL_GPU_RESULTS"
DRY_ENV = "NBTOOL_GPU_TEST_ON_CPU"
DRY = os.environ.get(DRY_ENV) == "1"
#: The Keras backends nbtool's workers can run, in the order they are checked.
ALL_BACKENDS = ("jax", "torch", "tensorflow")
#: An environment in which Keras sees no GPU, whatever its backend.
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
#: float32 on the GPU as on the CPU: no TF32 in cuBLAS/cuDNN, JAX's dots at full precision.
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}

#: The fixture models: name -> the input they take (a key of inputs.npz).
MODELS = {"cnn": "img", "mlp": "x64", "big0": "x64", "big1": "x64", "big2": "x64",
          "wide": "wide_x"}
#: Rows of the out-of-memory test's input, and the batch it asks for first.
WIDE_ROWS, WIDE_BATCH = 20_000, 16_384


# -- what there is to check --------------------------------------------------------------
def real_gpus():
    """The machine's GPUs by nbtool's own discovery (NVML), never an injected inventory;
    in a dry run, one injected GPU (its worker runs on the CPU)."""
    from nbtool._util.gpus import FAKE_GPUS_ENV, discover_gpus, parse_inventory

    if DRY:
        return parse_inventory("1x8GB")
    with environment(**{FAKE_GPUS_ENV: None}):
        return discover_gpus()


def backends() -> list[str]:
    """The Keras backends importable here (``NBTOOL_GPU_BACKENDS=jax,torch`` narrows them),
    found without importing any: an import would take GPU memory in this process."""
    wanted = [b for b in os.environ.get("NBTOOL_GPU_BACKENDS", ",".join(ALL_BACKENDS)).split(",")
              if b]
    if importlib.util.find_spec("keras") is None:
        return []
    return [b for b in ALL_BACKENDS if b in wanted and importlib.util.find_spec(b) is not None]


@contextlib.contextmanager
def environment(**values):
    """Set (or, with None, remove) environment variables for a while; workers started
    meanwhile inherit them (a Nanny spawns its worker with this process's environment)."""
    before = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, str(v))
        yield
    finally:
        for k, v in before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


# -- models and CPU references, made in child processes ------------------------------------
def keras_child(backend: str, *args: str, script: str = __file__) -> subprocess.Popen:
    """``script`` (this file) run with Keras on ``backend``, on the CPU only."""
    env = {**os.environ, **CPU_ONLY, "KERAS_BACKEND": backend}
    return subprocess.Popen([sys.executable, script, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(children: dict) -> None:
    """Wait for child processes; one that failed raises with its output."""
    for what, child in children.items():
        out, _ = child.communicate(timeout=600)
        if child.returncode:
            raise RuntimeError(f"{what} failed (exit {child.returncode}):\n{out[-3000:]}")


def build_fixtures(folder: Path, check: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Save the fixture models and inputs into ``folder``; returns, per backend in
    ``check``, Keras' own ``model.predict`` of each on the CPU (the references)."""
    folder.mkdir(parents=True, exist_ok=True)
    finish({"building the fixture models": keras_child(check[0], "build", str(folder))})
    children = {f"the {b} CPU reference": keras_child(b, "reference", str(folder),
                                                      str(folder / f"ref-{b}.npz"))
                for b in check}
    finish(children)
    return {b: dict(np.load(folder / f"ref-{b}.npz")) for b in check}


def inputs(folder: Path) -> dict[str, np.ndarray]:
    """The fixture inputs saved beside the models."""
    return dict(np.load(folder / "inputs.npz"))


# -- NVML readings -------------------------------------------------------------------------
def nvml_read(fn, index: int = 0):
    """``fn(nvml, handle)`` for GPU ``index`` with NVML open; None without NVML."""
    from nbtool._util.gpus import open_nvml

    nvml = open_nvml()
    if nvml is None:
        return None
    try:
        return fn(nvml, nvml.nvmlDeviceGetHandleByIndex(index))
    finally:
        nvml.nvmlShutdown()


def process_memory(index: int = 0) -> dict[int, int | None] | None:
    """GPU memory per process (pid -> bytes, None where the driver does not say), as NVML's
    compute-process list has it; None without NVML."""
    return nvml_read(lambda nvml, h: {p.pid: p.usedGpuMemory for p in
                                      nvml.nvmlDeviceGetComputeRunningProcesses(h)}, index)


def memory_of(pid: int, index: int = 0) -> int:
    """The GPU memory NVML charges to ``pid`` (0 if it holds no context there)."""
    return int((process_memory(index) or {}).get(pid) or 0)


def device_used(index: int = 0) -> int | None:
    """The GPU's used memory, all processes together (NVML)."""
    return nvml_read(lambda nvml, h: int(nvml.nvmlDeviceGetMemoryInfo(h).used), index)


def wait_gone(pid: int, index: int = 0, seconds: float = 30) -> bool:
    """Whether ``pid`` left NVML's process list within ``seconds`` (its context freed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pid not in (process_memory(index) or {}):
            return True
        time.sleep(0.2)
    return False


def device_facts(index: int = 0) -> dict:
    """What the results say about the machine: GPU, driver, Python, package versions."""
    def read(nvml, h):
        name = nvml.nvmlDeviceGetName(h)
        driver = nvml.nvmlSystemGetDriverVersion()
        return {"name": name.decode() if isinstance(name, bytes) else name,
                "memory_total": int(nvml.nvmlDeviceGetMemoryInfo(h).total),
                "driver": driver.decode() if isinstance(driver, bytes) else driver,
                "cuda_driver": nvml.nvmlSystemGetCudaDriverVersion()}

    import nbtool

    versions = {}
    for dist in ("keras", "jax", "jaxlib", "jax-cuda13-plugin", "torch", "tensorflow", "dask",
                 "distributed", "numpy", "nvidia-ml-py"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {"gpu": nvml_read(read, index), "python": platform.python_version(),
            "cores": os.cpu_count(), "nbtool": nbtool.__version__, "versions": versions,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# -- probes that run inside a worker (eng.pool.run_on) ------------------------------------
def array_device(a) -> str | None:
    """``"gpu"``/``"cpu"`` for a JAX array, PyTorch tensor or TensorFlow tensor, else None."""
    if isinstance(a, type) or not type(a).__module__.startswith(
            ("jax", "torch", "tensorflow")):
        return None
    devices = getattr(a, "devices", None)
    if callable(devices):                                   # jax.Array
        kinds = {d.platform for d in devices()}
        return "gpu" if kinds & {"gpu", "cuda"} else "cpu"
    device = getattr(a, "device", None)
    if device is None:
        return None
    kind = getattr(device, "type", None) or str(device).lower()   # torch, or TF's string
    return "gpu" if "cuda" in kind or "gpu" in kind else "cpu"


def backend_devices() -> dict:
    """This worker's Keras backend and the GPUs that backend lists (worker side)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        gpus = [str(d) for d in jax.devices() if d.platform in ("gpu", "cuda")]
    elif backend == "torch":
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        import tensorflow as tf

        gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    return {"backend": backend, "gpus": gpus, "pid": os.getpid(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "keras_backend_env": os.environ.get("KERAS_BACKEND")}


def model_devices(spec) -> dict:
    """Where a resident model's weights live, and the arrays its predictor holds: counts of
    ``gpu`` and ``cpu`` (worker side). A model not resident is not loaded to answer."""
    from nbtool.worker.process import get_cache

    cache = get_cache()
    if spec.name not in cache.resident():
        return {"error": f"{spec.name} is not resident"}
    loaded, _ = cache.get(spec)
    weights: dict[str, int] = {}
    for v in getattr(loaded.call, "weights", []):
        kind = array_device(getattr(v, "value", v))
        weights[str(kind)] = weights.get(str(kind), 0) + 1
    held: dict[str, int] = {}

    def walk(value, depth=0):   # the arrays a predictor holds: attributes, lists, dicts
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (list, tuple)) and depth < 3:
            for item in value:
                walk(item, depth + 1)
        elif not isinstance(value, np.ndarray) and array_device(value) is not None:
            kind = array_device(value)
            held[kind] = held.get(kind, 0) + 1

    walk(list(vars(loaded.predictor).values()))
    return {"weights": weights, "predictor_arrays": held,
            "predictor": type(loaded.predictor).__name__}


def precision_settings(tf32: bool | None = None) -> dict:
    """The worker's float32 settings (TF32, matmul precision); ``tf32=False`` turns
    PyTorch's TF32 off too (worker side)."""
    import keras

    backend = keras.backend.backend()
    out = {"backend": backend, **{k: os.environ.get(k) for k in NO_TF32}}
    if backend == "torch":
        import torch

        out.update(torch_tf32(torch, tf32))
    elif backend == "jax":
        import jax

        out["matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    return out


def torch_tf32(torch, allow: bool | None) -> dict:
    """PyTorch's TF32 switches for matmuls and convolutions, set first unless ``allow`` is
    None: its newer ``fp32_precision`` ("ieee"/"tf32"), else the older ``allow_tf32``
    (a PyTorch that has both refuses a mix of the two)."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        if hasattr(matmul, "fp32_precision"):
            conv = conv.conv
            if allow is not None:
                matmul.fp32_precision = conv.fp32_precision = "tf32" if allow else "ieee"
            found = {"matmul": matmul.fp32_precision, "conv": conv.fp32_precision}
            return {**found, "tf32_off": all(v == "ieee" for v in found.values())}
        if allow is not None:
            matmul.allow_tf32 = conv.allow_tf32 = allow
        return {"matmul_tf32": matmul.allow_tf32, "conv_tf32": conv.allow_tf32,
                "tf32_off": not (matmul.allow_tf32 or conv.allow_tf32)}
    except Exception as e:   # said in the results; the test then fails on tf32_off
        return {"tf32_error": repr(e), "tf32_off": None}


def memory_limit() -> dict:
    """The device memory this worker's backend may allocate: JAX's ``bytes_limit``,
    PyTorch's per-process fraction of the GPU (worker side)."""
    import keras

    backend = keras.backend.backend()
    out = {"backend": backend, "NBTOOL_GPU_MEMORY_FRACTION":
           os.environ.get("NBTOOL_GPU_MEMORY_FRACTION"),
           "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}
    if backend == "torch":
        import torch

        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if getter is not None and torch.cuda.is_available():
            fraction = getter(0)
            out["limit"] = int(fraction * torch.cuda.get_device_properties(0).total_memory)
    elif backend == "jax":
        import jax

        out["limit"] = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    return out


# -- the results file ------------------------------------------------------------------------
def results_path() -> Path | None:
    """Where figures go: ``NBTOOL_GPU_RESULTS``, else benchmarks/results/gpu.json; None in
    a dry run without ``NBTOOL_GPU_RESULTS`` (a dry run's numbers are not GPU figures)."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    return None if DRY else REPO / "benchmarks" / "results" / "gpu.json"


def merge_results(section: str, figures: dict) -> Path | None:
    """Write ``figures`` as ``section`` of the results file, keeping its other sections
    (the tests write "tests", the benchmark "benchmark"); returns the path written."""
    path = results_path()
    if path is None:
        return None
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update({"measured_on": device_facts(), section: figures})
    if DRY:
        old["dry_run"] = "NBTOOL_GPU_TEST_ON_CPU=1: a CPU machine; no figure here is a GPU's"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old, indent=2, default=str) + "\n")
    return path


# -- the child processes' side: Keras on the CPU -------------------------------------------
def _build(folder: Path) -> None:
    import keras

    layers = keras.layers

    def dense(seed, *units, n_in=64):
        keras.utils.set_random_seed(seed)
        hidden = [layers.Dense(u, activation="relu") for u in units]
        return keras.Sequential([keras.Input((n_in,)), *hidden,
                                 layers.Dense(10, activation="softmax")])

    keras.utils.set_random_seed(0)
    cnn = keras.Sequential([
        keras.Input((32, 32, 3)), layers.Conv2D(16, 3), layers.BatchNormalization(),
        layers.ReLU(), layers.DepthwiseConv2D(3, activation="relu"),
        layers.Conv2D(32, 1, activation="relu"), layers.GlobalAveragePooling2D(),
        layers.Dense(10, activation="softmax")])
    rng = np.random.default_rng(0)
    data = {"x64": rng.normal(size=(2048, 64)).astype("float32"),
            "img": rng.normal(size=(512, 32, 32, 3)).astype("float32"),
            "wide_x": rng.normal(size=(WIDE_ROWS, 64)).astype("float32")}
    # BatchNorm's statistics from one training-mode pass: outputs that differ by row.
    norm = [layer for layer in cnn.layers if isinstance(layer, layers.BatchNormalization)][0]
    norm.momentum = 0.0
    cnn(data["img"][:64], training=True)
    norm.momentum = 0.99
    models = {"cnn": cnn, "mlp": dense(1, 256, 256),
              # ~34 MB of weights each: big enough for NVML to see, small enough to be quick.
              "big0": dense(10, 2048, 4096), "big1": dense(11, 2048, 4096),
              "big2": dense(12, 2048, 4096),
              # 128 KB of activations per row: 16384 rows need 2 GiB, 4096 rows 512 MiB.
              "wide": dense(20, 32768)}
    for name, m in models.items():
        m.save(folder / f"{name}.keras")
    np.savez(folder / "inputs.npz", **data)


def _reference(folder: Path, out: Path) -> None:
    import keras

    data = inputs(folder)
    refs = {}
    for name, key in MODELS.items():
        model = keras.saving.load_model(folder / f"{name}.keras", compile=False)
        refs[name] = np.asarray(model.predict(data[key], batch_size=1024, verbose=0))
    np.savez(out, **refs)


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "build":
        _build(folder)
    else:
        _reference(folder, Path(sys.argv[3]))
