"""The best-engine floor: each model alone in this process on the fastest *exact* float32
engine, written by hand the way a careful user would, so nbtool's numbers have a target
that moves with the engines and not only with TensorFlow.

Per model, three engines, each at its best batch (of 32..256, all cores):
- TensorFlow: ``tf.function`` over ``model(x, training=False)``, one fixed batch shape;
- OpenVINO: ``ov.convert_model`` on ``model.export()``'s SavedModel, compiled on the CPU with
  ``INFERENCE_PRECISION_HINT=f32`` (its default on bf16-capable CPUs is not exact);
- LiteRT: ``TFLiteConverter.from_keras_model``, float32, no optimizations.

An engine counts for the floor only if its outputs on the benchmark rows are within 1e-4 of
TensorFlow's (max abs diff) with the same top-1; the floor per model is the fastest that is.

Usage (alone):  .venv/bin/python benchmarks/engines.py [--rows 2000] [--repeats 3]
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import tempfile
import time

import numpy as np

from _common import arguments, timed

TOLERANCE = 1e-4
BATCHES = (32, 64, 128, 256)


def in_batches(run, x, bs):
    """Outputs of ``run`` (one fixed batch shape) over all of ``x``, the last batch padded."""
    outs = []
    for s in range(0, len(x), bs):
        b = x[s:s + bs]
        n = len(b)
        if n < bs:
            b = np.concatenate([b, np.zeros((bs - n, *b.shape[1:]), b.dtype)])
        outs.append(run(b)[:n])
    return np.concatenate(outs)


def tensorflow_engine(model, row_shape):
    """``bs -> run(batch)``: a ``tf.function`` with the batch shape fixed."""
    import tensorflow as tf

    def at(bs):
        fn = tf.function(lambda b: model(b, training=False), autograph=False,
                         input_signature=[tf.TensorSpec((bs, *row_shape), tf.float32)])
        return lambda b: fn(b).numpy()
    return at


def openvino_engine(model, row_shape, folder):
    """``bs -> run(batch)``: the model's float32 OpenVINO IR compiled for that batch."""
    import sys

    sys.modules.setdefault("openvino_telemetry", None)   # no usage events, no ~/intel
    import openvino as ov

    path = os.path.join(folder, f"sm-{id(model)}")
    with contextlib.redirect_stdout(io.StringIO()):   # the exporter prints its signature
        model.export(path, format="tf_saved_model", verbose=False)
        ir = ov.convert_model(path)
    threads = os.cpu_count()

    def at(bs):
        m = ir.clone()
        m.reshape({m.inputs[0]: ov.PartialShape([bs, *row_shape])})
        compiled = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                      "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        out = compiled.outputs[0]
        return lambda b: np.asarray(request.infer([b])[out])
    return at


def litert_engine(model, row_shape):
    """``bs -> run(batch)``: the model converted to a float32 ``.tflite`` in LiteRT."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    with contextlib.redirect_stdout(io.StringIO()):   # the converter prints its signature
        data = tf.lite.TFLiteConverter.from_keras_model(model).convert()

    def at(bs):
        it = Interpreter(model_content=data, num_threads=os.cpu_count())
        inp = it.get_input_details()[0]
        it.resize_tensor_input(inp["index"], [bs, *row_shape], strict=False)
        it.allocate_tensors()
        out = it.get_output_details()[0]["index"]

        def run(b):
            it.set_tensor(inp["index"], b)
            it.invoke()
            return it.get_tensor(out).copy()
        return run
    return at


def best_batch(at, x):
    """The batch of ``BATCHES`` with the most rows per second over a few batches of ``x``."""
    rates = {}
    for bs in BATCHES:
        run = at(bs)
        run(x[:bs])                           # compile, allocate, trace
        t0 = time.perf_counter()
        for _ in range(2):
            run(x[:bs])
        rates[bs] = 2 * bs / (time.perf_counter() - t0)
    return max(rates, key=rates.get)


def engine_floors(models, names, x, repeats):
    """Per model: each engine's median seconds over ``x`` at its best batch, its range,
    its batch, its max abs diff and top-1 agreement with TensorFlow, and the fastest exact
    engine (``best``)."""
    row_shape = tuple(x.shape[1:])
    out = {}
    with tempfile.TemporaryDirectory(prefix="nbtool-bench-engines-") as folder:
        for name, model in zip(names, models):
            engines = {}
            makers = {"tensorflow": lambda: tensorflow_engine(model, row_shape),
                      "openvino": lambda: openvino_engine(model, row_shape, folder),
                      "litert": lambda: litert_engine(model, row_shape)}
            reference = None
            for engine, make in makers.items():
                try:
                    at = make()
                    bs = best_batch(at, x)
                    run = at(bs)
                    y = in_batches(run, x, bs)
                except Exception as e:   # a converter that fails: not a floor candidate
                    engines[engine] = {"error": f"{type(e).__name__}: {e}"[:200]}
                    continue
                if reference is None:
                    reference = y
                diff = float(np.abs(y.astype(np.float64) - reference).max())
                top1 = float((y.argmax(1) == reference.argmax(1)).mean())
                secs = timed(lambda: in_batches(run, x, bs), repeats)
                engines[engine] = {"seconds": statistics.median(secs),
                                   "range": [min(secs), max(secs)], "batch": bs,
                                   "max_abs_diff": diff, "top1": top1,
                                   "exact": diff <= TOLERANCE and top1 == 1.0}
            exact = {e: v for e, v in engines.items() if v.get("exact")}
            best = min(exact, key=lambda e: exact[e]["seconds"])
            out[name] = {"engines": engines, "best": best}
    return out


def floors(per_model) -> tuple[float, float]:
    """(TensorFlow floor, best-engine floor): seconds summed over the models."""
    tf = sum(m["engines"]["tensorflow"]["seconds"] for m in per_model.values())
    best = sum(m["engines"][m["best"]]["seconds"] for m in per_model.values())
    return tf, best


def print_engines(per_model) -> None:
    """One line per model: each engine's seconds (batch, diff), the best marked."""
    print(f"  {'model':18s}" + "".join(f"{e:>30s}" for e in ("tensorflow", "openvino", "litert")))
    for name, m in per_model.items():
        cells = []
        for e in ("tensorflow", "openvino", "litert"):
            v = m["engines"].get(e, {})
            if "seconds" not in v:
                cells.append(f"{'failed':>30s}")
                continue
            mark = "*" if e == m["best"] else ("" if v["exact"] else "!")
            cells.append(f"{v['seconds']:8.3f}s b{v['batch']:<3d} d{v['max_abs_diff']:.0e}{mark:1s}"
                         .rjust(30))
        print(f"  {name:18s}" + "".join(cells))
    print("  (* fastest exact engine; ! not exact: diff > 1e-4 or top-1 differs)")


if __name__ == "__main__":
    import keras

    from bench import SHAPE, build_models

    args = arguments(__doc__, rows=2000, repeats=3).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        paths = build_models(Path(tmp))
        models = [keras.models.load_model(p, compile=False) for p in paths]
        x = np.random.default_rng(0).random((args.rows, *SHAPE), dtype=np.float32)
        per_model = engine_floors(models, [p.stem for p in paths], x, args.repeats)
    print_engines(per_model)
    tf_floor, best_floor = floors(per_model)
    print(f"  TensorFlow floor {tf_floor:.3f}s, best-engine floor {best_floor:.3f}s "
          f"({tf_floor / best_floor:.2f}x)")
