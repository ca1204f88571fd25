"""A kernel restart with a persistent engine, against the restart as it was before.

Issue 17's measure "Kernel restart": the first prediction after ``nbtool.attach()``
<= 1.2x warm, no model reloads (the workers' load counters unchanged), outputs identical.
The ensemble is ``make bench``'s (``bench.build_models``: MobileNetV3-Small,
EfficientNet-B0, a small convnet and an MLP on 64x64x3), ``--rows`` rows, nbtool with
default arguments (``gpus="none"`` and a dashboard on a free port, as the bench starts it).

Each repeat, in processes of their own (kernels), with a new ``NBTOOL_RUNTIME_DIR``:

1. kernel 1 starts a persistent engine (``nbtool.start(persist=True)``), registers the
   models, predicts twice (the first run loads; the second loads the replicas the first
   left out), times three warm predictions, saves their outputs and the workers' load
   counters, and is killed: SIGKILL to its process group, as Jupyter restarts a kernel;
2. kernel 2 attaches (timed), times its first prediction of the same rows, checks it
   loaded nothing (the counters as kernel 1 left them) and gave kernel 1's outputs bit for
   bit, times three more, and shuts the engine down;
3. the restart as it was before: a new kernel runs ``nbtool.start()`` without persist,
   registers and predicts (timed together), then three warm predictions, and closes.

The machine cache (``NBTOOL_CACHE_DIR``: each model's remembered runtime and batch) is one
temporary folder for the whole run, filled by one untimed start-register-predict before the
repeats, so both paths find what a user's second run finds, and neither chooses runtimes in
its timings; the user's own cache is neither read nor written. The time of ``import nbtool``
in each new kernel is reported apart (tiny: what the kernel side needs is imported inside
``start()`` and ``attach()``, so it is in their times).

Usage:  .venv/bin/python benchmarks/restart.py [--rows 2000] [--repeats 3]
Writes benchmarks/results/restart.json.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _common import arguments  # noqa: E402  (benchmarks/ is on sys.path)

NAMES = ["mobilenet_v3s", "efficientnet_b0", "small_cnn", "mlp"]   # bench.build_models'
WARM_RUNS = 3
START = {"gpus": "none", "dashboard_address": "127.0.0.1:0"}      # as benchmarks/bench.py
CACHE_POLICY = ("one temporary NBTOOL_CACHE_DIR for the whole run, filled by an untimed "
                "start-register-predict before the repeats: both paths find the runtime and "
                "batch choices a user's second run finds")


# -- the kernels (each runs in a process of its own) -----------------------------------------
def timed_predict(eng, x) -> tuple[dict, dict]:
    """One ensemble prediction: its figures, and each model's output."""
    t0 = time.perf_counter()
    res = eng.predict(NAMES, x)
    seconds = time.perf_counter() - t0
    res.raise_for_errors()
    t = res.timings.values()
    return ({"seconds": seconds, "load_seconds": sum(v["load_seconds"] for v in t),
             "compute_seconds": sum(v["compute_seconds"] for v in t)},
            {n: res[n] for n in NAMES})


def load_counters(eng) -> dict:
    """``{"loads": worker -> model -> loads, "traces": ...}`` for the models each worker
    has seen (a retrace without a load would show in ``traces`` alone)."""
    status = sorted(eng.status().items())
    return {k: {w: {m: getattr(s, k) for m, s in sorted(st.models.items())}
                for w, st in status} for k in ("loads", "traces")}


def same(a: dict, b: dict) -> bool:
    import numpy as np

    return all(np.array_equal(a[n], b[n]) for n in NAMES)


def kernel1(folder: Path, x) -> dict:
    t0 = time.perf_counter()
    import nbtool
    imported = time.perf_counter() - t0
    t0 = time.perf_counter()
    eng = nbtool.start(persist=True, work_dir=str(folder / "work-k1"), **START)
    started = time.perf_counter() - t0
    for n in NAMES:
        eng.register(n, folder / f"{n}.keras")
    first, _ = timed_predict(eng, x)
    timed_predict(eng, x)   # settles: replicas the first run left out load here
    warm, outs = zip(*(timed_predict(eng, x) for _ in range(WARM_RUNS)))
    import numpy as np

    np.savez(folder / "kernel1.npz", **outs[-1])
    return {"import": imported, "start": started, "first_predict": first, "warm": list(warm),
            "warm_runs_identical": all(same(o, outs[0]) for o in outs),
            "loads": load_counters(eng), "engine_pid": eng.cluster.record.pid}


def kernel2(folder: Path, x) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    import nbtool
    imported = time.perf_counter() - t0
    t0 = time.perf_counter()
    eng = nbtool.attach(work_dir=str(folder / "work-k2"))
    attached = time.perf_counter() - t0
    first, outs = timed_predict(eng, x)
    loads_first = load_counters(eng)
    more = [timed_predict(eng, x)[0] for _ in range(WARM_RUNS)]
    loads_more = load_counters(eng)
    before = np.load(folder / "kernel1.npz")
    t0 = time.perf_counter()
    note = nbtool.shutdown()
    return {"import": imported, "attach": attached, "first_predict": first, "more": more,
            "identical": same(outs, before), "loads_after_first": loads_first,
            "loads_after_more": loads_more, "shutdown": time.perf_counter() - t0,
            "shutdown_note": note}


def old_restart(folder: Path, x) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    import nbtool
    imported = time.perf_counter() - t0
    t0 = time.perf_counter()
    eng = nbtool.start(work_dir=str(folder / "work-old"), **START)
    started = time.perf_counter() - t0
    for n in NAMES:
        eng.register(n, folder / f"{n}.keras")
    registered = time.perf_counter() - t0 - started
    first, outs = timed_predict(eng, x)
    out = {"import": imported, "start": started, "register": registered,
           "first_predict": first, "total": started + registered + first["seconds"]}
    if (folder / "kernel1.npz").exists():
        before = np.load(folder / "kernel1.npz")
        out["identical"] = same(outs, before)
        out["max_abs_diff"] = max(float(np.abs(outs[n] - before[n]).max()) for n in NAMES)
    timed_predict(eng, x)   # settles, as in kernel 1
    out["warm"] = [timed_predict(eng, x)[0] for _ in range(WARM_RUNS)]
    out["loads"] = load_counters(eng)
    eng.close()
    return out


def child(kind: str, folder: Path) -> None:
    import numpy as np

    x = np.load(folder / "x.npy")
    out = {"kernel1": kernel1, "kernel2": kernel2, "old": old_restart}[kind](folder, x)
    (folder / f"{kind}.json").write_text(json.dumps(out))
    print("done", flush=True)
    if kind == "kernel1":
        time.sleep(3600)   # killed here, with its engine attached, as a restart kills it


# -- the driver -------------------------------------------------------------------------------
def run_child(kind: str, folder: Path) -> dict:
    """Run one kernel; kernel 1 is killed (SIGKILL to its process group) once it is done."""
    cmd = [sys.executable, __file__, "--child", kind, "--folder", str(folder)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    done = False
    try:
        for line in proc.stdout:   # what else it prints goes on to ours
            if line.strip() == "done":
                done = True
                break
            print(line, end="", flush=True)
        if kind == "kernel1" and done:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if not done:
        raise RuntimeError(f"kernel {kind!r} failed (exit {proc.returncode}); its error is above")
    return json.loads((folder / f"{kind}.json").read_text())


def end_engines() -> list[int]:
    """Kill what is left of the persistent engines of this run's runtime folder (their
    process groups); returns their pids (none when every engine was shut down)."""
    from nbtool.engine.persist.engine_files import engine_records

    left = []
    for rec in engine_records():
        left.append(rec.pid)
        try:
            os.killpg(rec.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        rec.end("killed by benchmarks/restart.py's cleanup")
    return left


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def one_repeat(folder: Path, r: int) -> dict:
    os.environ["NBTOOL_RUNTIME_DIR"] = str(folder / f"runtime{r}")
    (folder / "kernel1.npz").unlink(missing_ok=True)
    try:
        k1 = run_child("kernel1", folder)
        k2 = run_child("kernel2", folder)
        pid = k1["engine_pid"]
        deadline = time.monotonic() + 30
        while group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        k2["engine_group_left_running"] = group_alive(pid)
        old = run_child("old", folder)
    finally:
        left = end_engines()
    warm = statistics.median(w["seconds"] for w in k1["warm"])
    first = k2["first_predict"]["seconds"]
    return {"kernel1": k1, "kernel2": k2, "old": old, "engines_killed_in_cleanup": left,
            "warm": warm, "attach": k2["attach"], "first_after_attach": first,
            "ratio_first_after_attach_to_warm": first / warm,
            "new_restart": k2["attach"] + first,
            "ratio_new_restart_to_warm": (k2["attach"] + first) / warm,
            "old_restart": old["total"], "ratio_old_restart_to_warm": old["total"] / warm,
            "loads_unchanged": (k1["loads"]["loads"] == k2["loads_after_first"]["loads"]
                                == k2["loads_after_more"]["loads"]),
            "traces_unchanged": (k1["loads"]["traces"] == k2["loads_after_first"]["traces"]
                                 == k2["loads_after_more"]["traces"]),
            "identical": k2["identical"]}


def summary(repeats: list[dict]) -> dict:
    keys = ["warm", "attach", "first_after_attach", "ratio_first_after_attach_to_warm",
            "new_restart", "ratio_new_restart_to_warm", "old_restart",
            "ratio_old_restart_to_warm"]
    out = {k: {"median": statistics.median(r[k] for r in repeats),
               "range": [min(r[k] for r in repeats), max(r[k] for r in repeats)]} for k in keys}
    for k, path in {"warm_after_attach": ("kernel2", "more"), "warm_plain": ("old", "warm")}.items():
        v = [statistics.median(w["seconds"] for w in r[path[0]][path[1]]) for r in repeats]
        out[k] = {"median": statistics.median(v), "range": [min(v), max(v)]}
    imports = [r[k]["import"] for r in repeats for k in ("kernel2", "old")]
    out["import_nbtool"] = {"median": statistics.median(imports),
                            "range": [min(imports), max(imports)]}
    out["loads_unchanged"] = all(r["loads_unchanged"] for r in repeats)
    out["traces_unchanged"] = all(r["traces_unchanged"] for r in repeats)
    out["identical"] = all(r["identical"] for r in repeats)
    return out


def report(res: dict) -> None:
    s = res["summary"]
    print(f"\nKernel restart, make bench's 4 models, {res['rows']} rows, {res['cores']} cores; "
          f"{res['repeats']} repeats: median (range)")

    def line(label, k, unit="s"):
        v = s[k]
        print(f"  {label:<52}{v['median']:7.3f}{unit} ({v['range'][0]:.3f}-{v['range'][1]:.3f})")
    for r, rep in enumerate(res["per_repeat"], 1):
        print(f"  repeat {r}: warm {rep['warm']:.2f} s, attach {rep['attach']:.2f} s, first "
              f"after attach {rep['first_after_attach']:.2f} s "
              f"({rep['ratio_first_after_attach_to_warm']:.2f}x), old restart "
              f"{rep['old_restart']:.2f} s ({rep['ratio_old_restart_to_warm']:.2f}x), loads "
              f"unchanged {rep['loads_unchanged']}, identical {rep['identical']}")
    line("warm prediction (kernel 1, persistent engine)", "warm")
    line("warm prediction (plain engine, old path)", "warm_plain")
    line("attach (kernel 2)", "attach")
    line("first prediction after attach", "first_after_attach")
    line("  / warm (target <= 1.2)", "ratio_first_after_attach_to_warm", "x")
    line("warm after attach", "warm_after_attach")
    line("new restart: attach + first prediction", "new_restart")
    line("  / warm", "ratio_new_restart_to_warm", "x")
    line("old restart: start + register + first prediction", "old_restart")
    line("  / warm", "ratio_old_restart_to_warm", "x")
    line("import nbtool in a new kernel (both paths, apart)", "import_nbtool")
    print(f"  loads unchanged after attach: {s['loads_unchanged']} (traces unchanged: "
          f"{s['traces_unchanged']}); outputs identical to kernel 1's: {s['identical']}")
    print(f"  machine cache: {res['machine_cache']}")


def main() -> None:
    import numpy as np

    ap = arguments(__doc__, rows=2000, repeats=3)
    ap.add_argument("--child", choices=["kernel1", "kernel2", "old"], help=argparse_hide())
    ap.add_argument("--folder", help=argparse_hide())
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.folder))
        return
    from bench import SHAPE, build_models

    load_before = os.getloadavg()   # 2 cores shared: others' work shows in the timings
    saved = {k: os.environ.get(k) for k in ("NBTOOL_CACHE_DIR", "NBTOOL_RUNTIME_DIR")}
    with tempfile.TemporaryDirectory(prefix="nbtool-bench-restart-") as tmp:
        folder = Path(tmp)
        os.environ["NBTOOL_CACHE_DIR"] = str(folder / "machine-cache")
        os.environ["NBTOOL_RUNTIME_DIR"] = str(folder / "runtime-priming")
        try:
            assert [p.stem for p in build_models(folder)] == NAMES
            np.save(folder / "x.npy",
                    np.random.default_rng(0).random((args.rows, *SHAPE), dtype=np.float32))
            t0 = time.perf_counter()
            run_child("old", folder)   # the machine cache learns the runtimes: a first run
            priming = time.perf_counter() - t0
            print(f"priming (first run on these files, untimed below): {priming:.1f} s",
                  flush=True)
            repeats = []
            for r in range(args.repeats):
                repeats.append(one_repeat(folder, r))
                rep = repeats[-1]
                print(f"repeat {r + 1}: first after attach "
                      f"{rep['ratio_first_after_attach_to_warm']:.2f}x warm, old restart "
                      f"{rep['ratio_old_restart_to_warm']:.2f}x", flush=True)
        finally:
            for k, v in saved.items():   # as they were: a caller's own settings come back
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    res = {"rows": args.rows, "shape": SHAPE, "models": NAMES, "cores": os.cpu_count(),
           "repeats": args.repeats, "start_options": START, "machine_cache": CACHE_POLICY,
           "priming_seconds": priming,
           "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]}, "summary": summary(repeats), "per_repeat": repeats}
    report(res)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "restart.json").write_text(json.dumps(res, indent=2))
    if not (res["summary"]["loads_unchanged"] and res["summary"]["identical"]):
        sys.exit("FAILED: after attach, a model loaded again or the outputs differ (above)")


def argparse_hide():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
