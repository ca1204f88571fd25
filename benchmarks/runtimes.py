"""TensorFlow against OpenVINO (``runtime="openvino"``) on the workers, per model, one run.

The suite's four models (MobileNetV3Small, EfficientNetB0, a small CNN, an MLP; random
weights, 64x64x3) are each registered twice from the same file: once as saved (TensorFlow)
and once with ``runtime="openvino"``. Everything else is default. Each is warmed, then timed
alone, TensorFlow and OpenVINO alternating, on the same rows; the ensemble is timed the same
way (all four on TensorFlow, then all four on OpenVINO). Reported: medians, the range, the
ratio TensorFlow / OpenVINO (above 1: OpenVINO is faster) and the largest difference between
the two runtimes' outputs.

Usage:  .venv/bin/python benchmarks/runtimes.py [--rows 2000] [--repeats 5]
Writes benchmarks/results/runtimes.json.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _common import arguments, timed  # noqa: E402  (benchmarks/ is on sys.path)
from bench import SHAPE, build_models  # noqa: E402


def main():
    import numpy as np

    import nbtool

    args = arguments(__doc__, rows=2000, repeats=5).parse_args()
    results: dict[str, object] = {"rows": args.rows, "repeats": args.repeats,
                                  "cores": os.cpu_count(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp, \
            nbtool.start(dashboard_address="127.0.0.1:0") as eng:
        paths = build_models(Path(tmp))
        x = np.random.default_rng(0).random((args.rows, *SHAPE), dtype=np.float32)
        names = [p.stem for p in paths]
        for p in paths:
            eng.register(p.stem, str(p))
            eng.register(f"{p.stem}@ov", str(p), runtime="openvino")
        for n in names:   # loads, conversions and traces outside the timing
            eng.predict([n, f"{n}@ov"], x[:256], combine=None)
        for n in names:
            tf_s, ov_s = [], []
            for _ in range(args.repeats):
                tf_s += timed(lambda: eng.predict(n, x, combine=None), 1)
                ov_s += timed(lambda: eng.predict(f"{n}@ov", x, combine=None), 1)
            a = eng.predict(n, x, combine=None)[n]
            b = eng.predict(f"{n}@ov", x, combine=None)[f"{n}@ov"]
            results["models"][n] = {
                "tensorflow_s": statistics.median(tf_s), "tensorflow_range": [min(tf_s), max(tf_s)],
                "openvino_s": statistics.median(ov_s), "openvino_range": [min(ov_s), max(ov_s)],
                "speedup": statistics.median(tf_s) / statistics.median(ov_s),
                "max_abs_diff": float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                "top1_agreement": float((np.argmax(a, 1) == np.argmax(b, 1)).mean())}
        tf_e, ov_e = [], []
        for _ in range(args.repeats):
            tf_e += timed(lambda: eng.predict(names, x), 1)
            ov_e += timed(lambda: eng.predict([f"{n}@ov" for n in names], x), 1)
        results["ensemble"] = {"tensorflow_s": statistics.median(tf_e),
                               "tensorflow_range": [min(tf_e), max(tf_e)],
                               "openvino_s": statistics.median(ov_e),
                               "openvino_range": [min(ov_e), max(ov_e)],
                               "speedup": statistics.median(tf_e) / statistics.median(ov_e)}
        states = eng.status().values()
        results["conversions"] = {f"{n}@ov": [s.state_of(f"{n}@ov").runtime_note for s in states
                                              if s.state_of(f"{n}@ov").loaded] for n in names}
    report(results)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "runtimes.json").write_text(json.dumps(results, indent=2, default=str))


def report(r):
    print(f"\n{r['rows']} rows of {SHAPE}, {r['cores']} cores; median of {r['repeats']} "
          "(range); default engine, each model alone on one worker")
    print(f"  {'model':18s} {'tensorflow s':>22s} {'openvino s':>22s} {'TF/OV':>6s} "
          f"{'max diff':>9s} {'top-1':>6s}")
    for n, m in r["models"].items():
        print(f"  {n:18s} {m['tensorflow_s']:8.3f} ({m['tensorflow_range'][0]:.3f}-"
              f"{m['tensorflow_range'][1]:.3f}) {m['openvino_s']:8.3f} ({m['openvino_range'][0]:.3f}-"
              f"{m['openvino_range'][1]:.3f}) {m['speedup']:6.2f} {m['max_abs_diff']:9.1e} "
              f"{m['top1_agreement']:6.3f}")
    e = r["ensemble"]
    print(f"  {'ensemble (mean)':18s} {e['tensorflow_s']:8.3f} ({e['tensorflow_range'][0]:.3f}-"
          f"{e['tensorflow_range'][1]:.3f}) {e['openvino_s']:8.3f} ({e['openvino_range'][0]:.3f}-"
          f"{e['openvino_range'][1]:.3f}) {e['speedup']:6.2f}")


if __name__ == "__main__":
    main()
