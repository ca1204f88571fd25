"""Opt-in reduced precision: speed and agreement against float32, per model.

Usage:  .venv/bin/python benchmarks/precision.py [--rows 1000] [--repeats 3]
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _common import arguments, timed  # noqa: E402  (benchmarks/ is on sys.path)


def main():
    import numpy as np

    import nbtool
    from bench import SHAPE, build_models

    ap = arguments(__doc__, rows=1000, repeats=3)
    args = ap.parse_args()
    x = np.random.default_rng(0).random((args.rows, *SHAPE), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp, nbtool.start(
            gpus="none", dashboard_address="127.0.0.1:0") as eng:
        print(f"{args.rows} rows of {SHAPE}, median of {args.repeats}:")
        for path in build_models(Path(tmp)):
            a, b = path.stem, path.stem + "@bf16"
            eng.register(a, path, replicas=len(eng.workers))
            eng.register(b, path, replicas=len(eng.workers), precision="bfloat16")
            agree = eng.agreement(a, b, x)
            ta = statistics.median(timed(lambda: eng.predict(a, x), args.repeats))
            tb = statistics.median(timed(lambda: eng.predict(b, x), args.repeats))
            print(f"  {a:<18} float32 {ta:.3f} s  bfloat16 {tb:.3f} s  ({ta / tb:.2f}x)  "
                  f"top-1 agreement {agree.get('top1_agreement', float('nan')):.3f}  "
                  f"max abs diff {agree['max_abs_diff']:.3g}")


if __name__ == "__main__":
    main()
