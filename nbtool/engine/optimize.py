"""Cheaper variants of a model, in the kernel: what they are, having workers make them,
and choosing one by measurement.

``eng.optimize("cnn", variants=[...], calibration=x_sample)`` has the workers convert a
registered Keras model into variants (:mod:`nbtool.worker.variants`: conversion needs
TensorFlow, which the kernel never imports), registers each as a model of its own
(``cnn@float16``, ``cnn@int8``, ...), runs them all on the workers and returns a
:class:`Comparison`: size on disk, load time, throughput, agreement with the original and,
with labels, accuracy.
``comparison.choose(min_agreement=0.99)`` picks the fastest variant within that tolerance.

The variants (:data:`VARIANTS`):

- ``float32``: LiteRT, no quantization (the LiteRT runtime alone).
- ``float16``: LiteRT with float16 weights (half the size; computed in float32 on CPU).
- ``dynamic-int8``: LiteRT with int8 weights, activations quantized on the fly.
- ``int8``: LiteRT, full integer: weights, activations, input and output in int8, scaled
  with a representative dataset taken from ``calibration``. The worker quantizes the
  float input and dequantizes the output, so callers see float32 as with any model.
- ``keras-int8``: Keras' own ``model.quantize("int8")`` (Dense/EinsumDense/Embedding
  kernels in int8), saved as ``.keras`` and run by TensorFlow like the original.
- ``openvino-bf16``: the model's float32 OpenVINO IR, asking OpenVINO to compute in
  bfloat16 (``INFERENCE_PRECISION_HINT``, kept in the IR): fast on CPUs with avx512_bf16 or
  AMX, not exact. Where the CPU has no bf16, OpenVINO computes float32 and the comparison's
  note says so ("runs as float32 on this CPU").
- ``openvino-int8``: the IR quantized by NNCF (OpenVINO's post-training quantization),
  calibrated on ``calibration`` like ``int8``.

The OpenVINO variants are IR files (``.xml`` with its ``.bin``), registered like any
model file and run by OpenVINO on CPU workers without TensorFlow.

Pruning and distillation are not offered: Keras 3 has no pruning toolkit, and zeroed
weights in dense kernels cost the same multiply-adds, so magnitude pruning saves nothing at
inference here (the optimization notebook measures it); distillation is training, which
belongs to the user's training code, not to an inference engine.

Example:
    >>> cmp = eng.optimize("cnn", ["float16", "int8", "openvino-int8"],
    ...                    calibration=x_train[:200], x=x_test, labels=y_test)  # doctest: +SKIP
    >>> cmp                                                            # doctest: +SKIP
    >>> eng.predict(cmp.choose(min_agreement=0.99), x_test)            # doctest: +SKIP
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from nbtool._util import human_bytes
from nbtool.catalog import disk_size
from nbtool.errors import NoVariantQualifies
from nbtool.prediction import fmt, output_agreement
from nbtool.tables import Table
from nbtool.worker import convert_variant

#: The variants nbtool can make, and what each is.
VARIANTS = {
    "float32": "LiteRT, float32 (no quantization)",
    "float16": "LiteRT, float16 weights",
    "dynamic-int8": "LiteRT, int8 weights, activations quantized on the fly",
    "int8": "LiteRT, full int8 (weights, activations, input, output), calibrated",
    "keras-int8": "Keras model.quantize('int8'), run by TensorFlow",
    "openvino-bf16": "OpenVINO IR computing in bfloat16 (float32 where the CPU has no bf16)",
    "openvino-int8": "OpenVINO IR quantized to int8 by NNCF, calibrated",
}

#: Variants that need a representative dataset.
NEEDS_CALIBRATION = {"int8", "openvino-int8"}


def _unknown_variant(variant) -> str:
    return (f"variant {variant!r}: expected one of {', '.join(VARIANTS)} "
            "(e.g. variants=['float16', 'dynamic-int8', 'int8']).")


def variant_name(model: str, variant: str) -> str:
    """The registered name of a variant.

    Example:
        >>> variant_name("cnn", "int8")
        'cnn@int8'
    """
    return f"{model}@{variant}"


def optimize(engine, name: str, variants=("float16", "dynamic-int8", "int8"),
             calibration=None, x=None, labels=None, calibration_rows: int = 200,
             throughput_rows: int = 2048, repeats: int = 2) -> "Comparison":
    """Make ``variants`` of model ``name``, register them, and compare them on ``x``.

    See :meth:`nbtool.engine.engine.Engine.optimize`, which calls this.

    Example:
        >>> optimize(eng, "cnn", ["float16"], x=x_test)   # doctest: +SKIP
    """
    from nbtool.prediction import as_source, check_fits

    spec = engine.registry.get(name)
    variants = [variants] if isinstance(variants, str) else list(dict.fromkeys(variants))
    if not variants:
        raise ValueError(f"model {name!r}: no variants asked for; expected some of "
                         f"{', '.join(VARIANTS)}.")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"model {name!r}: " + _unknown_variant(v))
    if "@" in name:
        raise ValueError(f"model {name!r} is itself a variant; optimize the original "
                         f"{name.split('@')[0]!r} instead.")
    others = sorted({w.backend for w in engine.pool.workers.values()} - {"tensorflow"})
    if others:   # every variant is made with TensorFlow's converters, on a worker
        raise ValueError(f"model {name!r}: eng.optimize converts with TensorFlow (LiteRT's "
                         f"converter, model.export for OpenVINO), and these workers run Keras "
                         f"on {', '.join(others)}. Fix: optimize in an engine started with "
                         f"backend='tensorflow', then register the variant's file here.")
    calib = None
    if calibration is not None:
        calib = np.asarray(calibration)[:max(1, int(calibration_rows))]
        check_fits(spec, as_source(calib))   # a wrong shape fails here, not on a worker
    calibrated = [v for v in variants if v in NEEDS_CALIBRATION]
    if calibrated and calib is None:
        raise ValueError(f"model {name!r}: the {calibrated[0]!r} variant needs calibration "
                         "rows (a representative sample of real inputs, ~100-500 rows). Fix: "
                         "eng.optimize(..., calibration=x_train[:200]).")
    if x is None:
        if calib is None:
            raise ValueError(f"model {name!r}: nothing to compare the variants on. Fix: "
                             "pass x=... (and labels=... for accuracy), or calibration=.")
        x = calib
    x = np.asarray(x)
    check_fits(spec, as_source(x))
    if labels is not None and len(np.asarray(labels).reshape(-1)) != len(x):
        raise ValueError(f"model {name!r}: {len(np.asarray(labels).reshape(-1))} labels for "
                         f"{len(x)} rows of x; expected one label per row.")

    # Conversions need TensorFlow, so they run on the workers (nbtool.worker.variants),
    # spread over all of them; the bytes come back and are written here.
    workers = sorted(engine.workers)
    futures = {v: engine.pool.submit_to(
        workers[i % len(workers)], convert_variant, spec, v,
        calib if v in NEEDS_CALIBRATION else None, what=f"convert-{name}-{v}")
        for i, v in enumerate(variants)}
    folder = Path(engine.work_dir) / "variants"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for v, fut in futures.items():
        out = fut.result()
        # One file, or an OpenVINO IR's two: the .xml (registered) written last.
        files = out.get("files") or {out["suffix"]: out["data"]}
        for suffix in sorted(files, key=lambda s: s == ".xml"):
            path = folder / f"{variant_name(name, v)}{suffix}"
            tmp = path.with_suffix(path.suffix + ".part")
            tmp.write_bytes(files[suffix])
            os.replace(tmp, path)   # a reader never sees half a file
        # nbtool runs OpenVINO on CPU workers only (its GPU plugin is for Intel GPUs).
        device = "cpu" if v.startswith("openvino-") else spec.device
        engine.register(variant_name(name, v), str(path), device=device,
                        replicas=spec.replicas, batch_size=spec.batch_size,
                        preprocess=spec.preprocess, trusted=spec.trusted)
        names.append(variant_name(name, v))
    return compare(engine, name, names, x, labels, throughput_rows=throughput_rows,
                   repeats=repeats)


def compare(engine, original: str, others: list[str], x, labels=None,
            throughput_rows: int = 2048, repeats: int = 2) -> "Comparison":
    """Measure registered models against ``original`` on ``x``: size, load, speed, agreement.

    Every model is unloaded (soft), loaded again to time its load, then run alone on ``x``
    repeated up to ``throughput_rows`` rows, ``repeats`` times; throughput is rows per
    second of worker compute (best run), so scheduling and transfers do not blur it.
    Agreement compares the first output of each model with the original's on ``x``.

    Example:
        >>> compare(eng, "cnn", ["cnn@float16"], x_test, y_test).to_dict()  # doctest: +SKIP
    """
    x = np.asarray(x)
    models = [original] + [m for m in others if m != original]
    reps = max(1, math.ceil(int(throughput_rows) / max(len(x), 1)))
    x_run = np.concatenate([x] * reps) if reps > 1 else x
    engine.unload(models)
    rows = []
    outputs = {}
    for m in models:
        spec = engine.registry.get(m)
        entries = engine.load(m)[m]
        load_s = max((e.load_seconds or 0.0) for e in entries.values())
        best = 0.0
        for _ in range(max(1, int(repeats))):
            res = engine.predict(m, x_run, combine=None)
            res.raise_for_errors()
            t = res.timings[m]
            best = max(best, t["rows"] / t["compute_seconds"] if t["compute_seconds"] else 0)
        out = res[m]
        outputs[m] = np.asarray(out[0] if isinstance(out, list) else out,
                                dtype=np.float64)[:len(x)]
        variant = "original" if m == original else m.split("@", 1)[1] if "@" in m else m
        state = next(iter(entries.values()))
        rows.append({"model": m, "variant": variant,
                     "format": spec.format, "size_bytes": disk_size(spec.path),
                     "load_seconds": load_s, "rows_per_second": best,
                     # what ran it, and (an IR asking for bf16) in what precision, here
                     "runtime": state.runtime, "note": state.runtime_note})
    ref = outputs[original]
    y = None if labels is None else np.asarray(labels).reshape(-1)
    for row in rows:
        out = outputs[row["model"]]
        near = output_agreement(out, ref) if out.shape == ref.shape else {}
        row["max_abs_diff"] = near.get("max_abs_diff", float("nan"))
        row["top1_agreement"] = near.get("top1_agreement", float("nan"))
        if y is not None:
            row["accuracy"] = float((out.argmax(-1) == y).mean())
    base = rows[0]
    for row in rows:
        row["size_ratio"] = row["size_bytes"] / base["size_bytes"] if base["size_bytes"] \
            else float("nan")
        row["speedup"] = row["rows_per_second"] / base["rows_per_second"] \
            if base["rows_per_second"] else float("nan")
        if y is not None:
            row["accuracy_drop"] = base["accuracy"] - row["accuracy"]
    return Comparison(original, rows, n_rows=len(x), throughput_rows=len(x_run),
                      engine=engine)


class Comparison:
    """A model and its variants, measured side by side; shows as a table inline.

    ``cmp.rows`` (and ``cmp.to_dict()``, keyed by model name) hold the raw numbers:
    ``size_bytes``, ``size_ratio``, ``load_seconds``, ``rows_per_second``, ``speedup``,
    ``top1_agreement``, ``max_abs_diff`` and, with labels, ``accuracy`` and
    ``accuracy_drop`` (versus the original); ``runtime`` (what ran it) and ``note`` (how
    the worker prepared it: an ``openvino-bf16`` variant's says whether this CPU computes
    bf16 or runs it as float32). ``cmp.table()`` is the formatted
    :class:`~nbtool.tables.Table`; the notes show under it.

    Example:
        >>> cmp = Comparison("m", [
        ...     {"model": "m", "variant": "original", "rows_per_second": 100.0,
        ...      "top1_agreement": 1.0, "max_abs_diff": 0.0},
        ...     {"model": "m@int8", "variant": "int8", "rows_per_second": 300.0,
        ...      "top1_agreement": 0.97, "max_abs_diff": 0.05},
        ...     {"model": "m@float16", "variant": "float16", "rows_per_second": 150.0,
        ...      "top1_agreement": 1.0, "max_abs_diff": 0.001}])
        >>> cmp.choose(min_agreement=0.99)
        'm@float16'
        >>> cmp.choose(min_agreement=0.95)
        'm@int8'
    """

    def __init__(self, original: str, rows: list[dict[str, Any]], n_rows: int | None = None,
                 throughput_rows: int | None = None, engine=None):
        self.original = original
        self.rows = [dict(r) for r in rows]
        self.n_rows = n_rows
        self.throughput_rows = throughput_rows
        self._engine = engine

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The raw numbers, by model name.

        Example:
            >>> Comparison("m", [{"model": "m", "speedup": 1.0}]).to_dict()
            {'m': {'model': 'm', 'speedup': 1.0}}
        """
        return {r["model"]: dict(r) for r in self.rows}

    def __getitem__(self, model: str) -> dict[str, Any]:
        return self.to_dict()[model]

    @property
    def has_labels(self) -> bool:
        """Whether the comparison was given labels (so it has accuracy)."""
        return any("accuracy" in r for r in self.rows)

    def choose(self, min_agreement: float | None = None, max_abs_diff: float | None = None,
               max_accuracy_drop: float | None = None) -> str:
        """The fastest variant within the tolerances given; returns its model name.

        ``min_agreement``: top-1 agreement with the original at least this;
        ``max_abs_diff``: outputs at most this far from the original's;
        ``max_accuracy_drop``: accuracy at most this below the original's (needs labels).
        With none given, ``min_agreement=0.99``. The original itself is not a candidate:
        if no variant qualifies, :class:`NoVariantQualifies` says what each one reached.

        Example:
            >>> cmp.choose(max_accuracy_drop=0.01)   # doctest: +SKIP
            'cnn@dynamic-int8'
        """
        if min_agreement is None and max_abs_diff is None and max_accuracy_drop is None:
            min_agreement = 0.99
        if max_accuracy_drop is not None and not self.has_labels:
            raise ValueError(f"model {self.original!r}: max_accuracy_drop needs accuracy, "
                             "and this comparison has no labels. Fix: pass labels=y to "
                             "eng.optimize(...), or use min_agreement=.")
        checks = []
        if min_agreement is not None:
            checks.append(("top1_agreement", ">=", float(min_agreement), "top-1 agreement"))
        if max_abs_diff is not None:
            checks.append(("max_abs_diff", "<=", float(max_abs_diff), "max abs difference"))
        if max_accuracy_drop is not None:
            checks.append(("accuracy_drop", "<=", float(max_accuracy_drop), "accuracy drop"))
        wanted = " and ".join(f"{label} {op} {limit:g}" for _, op, limit, label in checks)
        found, ok = {}, []
        for r in self.rows:
            if r["model"] == self.original:
                continue
            failed = [f"{label} {fmt(r.get(key), '{:.4g}')}"
                      for key, op, limit, label in checks if not _passes(r.get(key), op, limit)]
            if failed:
                found[r["model"]] = ", ".join(failed)
            else:
                ok.append(r)
        if not ok:
            raise NoVariantQualifies(self.original, wanted, found)
        return max(ok, key=lambda r: r.get("rows_per_second") or 0.0)["model"]

    def table(self) -> Table:
        """The comparison as a formatted :class:`~nbtool.tables.Table`.

        Example:
            >>> Comparison("m", [{"model": "m", "variant": "original"}]).table()[0]["model"]
            'm'
        """
        out = []
        for r in self.rows:
            row = {"model": r["model"], "variant": r.get("variant", ""),
                   "format": r.get("format", ""), "runtime": r.get("runtime") or "",
                   "size": human_bytes(r.get("size_bytes")),
                   "size x": fmt(r.get("size_ratio"), "{:.2f}"),
                   "load s": fmt(r.get("load_seconds"), "{:.2f}"),
                   "rows/s": fmt(r.get("rows_per_second"), "{:,.0f}"),
                   "speedup": fmt(r.get("speedup"), "{:.2f}x"),
                   "top-1 agree": fmt(r.get("top1_agreement"), "{:.2%}"),
                   "max abs diff": fmt(r.get("max_abs_diff"), "{:.2g}")}
            if self.has_labels:
                row["accuracy"] = fmt(r.get("accuracy"), "{:.2%}")
            out.append(row)
        return Table(out, title=f"variants of {self.original}")

    def notes(self) -> list[str]:
        """One line per model the worker said something of (``note``), e.g. that a bf16
        variant runs as float32 on this CPU.

        Example:
            >>> Comparison("m", [{"model": "m@openvino-bf16", "note": "bf16"}]).notes()
            ['m@openvino-bf16: bf16']
        """
        return [f"{r['model']}: {r['note']}" for r in self.rows if r.get("note")]

    def _note(self) -> str:
        parts = []
        if self.n_rows:
            parts.append(f"agreement on {self.n_rows} rows")
        if self.throughput_rows:
            parts.append(f"throughput: worker compute over {self.throughput_rows} rows, "
                         "best run")
        return "; ".join(parts)

    def __repr__(self) -> str:
        note = self._note()
        return repr(self.table()) + "".join(f"\n{line}" for line in self.notes()) \
            + (f"\n({note})" if note else "")

    def _repr_html_(self) -> str:
        note = self._note()
        notes = "".join(f"<li>{html.escape(line)}</li>" for line in self.notes())
        return ("<div class='nbtool-comparison'>" + self.table()._repr_html_()
                + (f"<ul style='font-size:smaller'>{notes}</ul>" if notes else "")
                + (f"<p style='font-size:smaller'>{html.escape(note)}. "
                   "cmp.choose(min_agreement=0.99) picks the fastest variant within a "
                   "tolerance.</p>" if note else "") + "</div>")


def _passes(value, op: str, limit: float) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return value >= limit if op == ">=" else value <= limit
