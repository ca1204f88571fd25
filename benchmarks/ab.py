"""Two checkouts of nbtool on the same warm path, alternated: is a change slower?

Sequential ``make bench`` runs on a shared machine move by 20% between runs (their floors
move too), which hides a real change of that size. This alternates the two versions in one
run instead: each run starts a fresh engine on ``bench.py``'s four models, registers them
with default arguments, warms up twice, then times ``--repeats`` predictions. Both versions
share one temporary machine cache (primed by the new checkout first), so both run the same
remembered runtimes and batches: what differs is the code between the call and the result.

Usage:  .venv/bin/python benchmarks/ab.py OLD_CHECKOUT [NEW_CHECKOUT] [--rounds 3]
        (NEW_CHECKOUT defaults to this repository; a checkout: git worktree add DIR COMMIT)
Prints each run's median and the ratio new / old (median of the rounds, with its range).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import statistics
import subprocess
import sys
import tempfile

#: What each run does, in a fresh process with the checkout first on sys.path.
RUN = """
import statistics, sys, time
from pathlib import Path
import numpy as np
if __name__ == "__main__":
    import nbtool
    folder = Path(sys.argv[1])
    x = np.load(folder / "x.npy")
    eng = nbtool.start()
    names = []
    for p in sorted(folder.glob("*.keras")):
        eng.register(p.stem, p)
        names.append(p.stem)
    eng.predict(names, x)
    eng.predict(names, x)
    times = []
    for _ in range(int(sys.argv[2])):
        t0 = time.perf_counter()
        eng.predict(names, x)
        times.append(time.perf_counter() - t0)
    print("MEDIAN", statistics.median(times), flush=True)
    eng.close()
"""


def run(checkout: Path, folder: Path, repeats: int, env: dict) -> float:
    """One fresh process of ``checkout``: the median of its timed warm predictions."""
    out = subprocess.run([sys.executable, "-c", RUN, str(folder), str(repeats)],
                         cwd=folder, env={**env, "PYTHONPATH": str(checkout)},
                         capture_output=True, text=True, timeout=900)
    line = next((l for l in out.stdout.splitlines() if l.startswith("MEDIAN")), None)
    if line is None:
        raise SystemExit(f"{checkout}: the run failed:\n{out.stderr[-3000:]}")
    return float(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=Path(__file__).parents[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import numpy as np

    from bench import SHAPE, build_models

    with tempfile.TemporaryDirectory(prefix="nbtool-ab-") as tmp:
        folder = Path(tmp)
        build_models(folder)
        rng = np.random.default_rng(0)
        np.save(folder / "x.npy", rng.normal(size=(args.rows, *SHAPE)).astype("float32"))
        env = {**os.environ, "NBTOOL_CACHE_DIR": str(folder / "cache"),
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        run(args.new, folder, 1, env)   # primes the cache: runtimes chosen, costs measured
        ratios = []
        for r in range(args.rounds):
            old = run(args.old, folder, args.repeats, env)
            new = run(args.new, folder, args.repeats, env)
            ratios.append(new / old)
            print(f"round {r + 1}: old {old:.3f}s  new {new:.3f}s  new/old {new / old:.2f}",
                  flush=True)
        print(f"new / old: {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) over {args.rounds} rounds")


if __name__ == "__main__":
    main()
