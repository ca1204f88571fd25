"""A quiet notebook: nothing in red unless something needs the user.

Each story runs in a child process whose stderr is the thing under test (in a notebook,
a process's stderr is what lands in red under the cells).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from nbtool._util.quiet import is_noise


def run_child(code: str, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})


TF_STARTUP = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1.1 7 port.cc:153] oneDNN custom operations are on. You may see ...\n"
    b"I0000 00:00:1.2 7 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    b"GPU will not be used.\n"
    b"I0000 00:00:1.3 7 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    b"available CPU instructions in performance-critical operations.\n"
    b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow "
    b"with the appropriate compiler flags.\n"
    b"E0000 00:00:1.4 7 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    b"Failed call to cuInit: UNKNOWN ERROR (303)\n"
)


@pytest.mark.parametrize("expect_gpu", [False, True])
def test_native_start_up_lines_are_dropped_and_real_problems_pass(expect_gpu):
    """What C++ writes to descriptor 2 while TensorFlow starts: the harmless lines go,
    a real error and a line without its newline still come through, in order; on a GPU
    worker the "no GPU" lines are the real problem and stay."""
    child = run_child(f"""
        import os
        from nbtool._util.quiet import native_logs_filtered
        with native_logs_filtered(expect_gpu={expect_gpu}) as f:
            os.write(2, {TF_STARTUP!r})
            os.write(2, b"E0000 real problem: out of memory\\n")
            os.write(2, b"last words without a newline")
        os.write(2, b"\\nafter: " + str(f.dropped).encode() + b"\\n")
    """)
    err = child.stderr
    assert "oneDNN" not in err and "absl::InitializeLog" not in err
    assert "optimized to use" not in err and "To enable the following" not in err
    assert err.index("real problem: out of memory") < err.index("last words without")
    if expect_gpu:
        assert "cuInit" in err and "Could not find cuda drivers" in err
        assert "after: 4" in err
    else:
        assert "cuInit" not in err and "cuda drivers" not in err
        assert "after: 6" in err


def test_nbtool_quiet_0_shows_everything():
    child = run_child(f"""
        import os
        from nbtool._util.quiet import native_logs_filtered
        with native_logs_filtered(expect_gpu=False):
            os.write(2, {TF_STARTUP!r})
    """, NBTOOL_QUIET="0")
    assert "oneDNN" in child.stderr and "cuInit" in child.stderr


def test_is_noise_keeps_everything_it_does_not_know():
    for line in (b"Fatal Python error: Segmentation fault", b"", b"W0000 something new",
                 b"E0000 cuda_dnn.cc] Could not create cudnn handle"):
        assert not is_noise(line, expect_gpu=False)


@pytest.mark.slow
def test_an_engine_starts_restarts_and_stops_without_a_line_on_stderr(model_dir):
    """Before: every worker start printed TensorFlow's banners and cuInit error, a hard
    unload printed Dask's "Restarting worker", and a second engine on the machine printed
    "Port 8787 is already in use". Now stderr stays empty from start to close, the repr
    says in plain words that there is no GPU, and the dashboard is on a free port."""
    child = run_child(f"""
        import socket
        import numpy as np
        import nbtool

        if __name__ == "__main__":
            taken = socket.socket(); taken.bind(("127.0.0.1", 0)); taken.listen()
            port = taken.getsockname()[1]
            eng = nbtool.start(n_workers=2, dashboard_address=f"127.0.0.1:{{port}}")
            print("REPR", eng)
            print("PORT", port, eng.dashboard_link)
            eng.register("m", {str(model_dir / "mlp.keras")!r}, replicas=2)
            x = np.ones((50, 8), "float32")
            print("ROWS", eng.predict("m", x)["m"].shape[0])
            print("RESTARTED", eng.unload(hard=True))
            print("AGAIN", eng.predict("m", x)["m"].shape[0])
            eng.close()
    """)   # the script itself never imports TensorFlow: its stderr is nbtool's alone
    out = child.stdout
    assert child.returncode == 0, child.stderr[-3000:]
    assert "ROWS 50" in out and "RESTARTED ['cpu" in out and "AGAIN 50" in out
    repr_line = next(l for l in out.splitlines() if l.startswith("REPR"))
    assert "no GPU found: 2 CPU workers [cpu0 (cpu:0), cpu1 (cpu:1)]" in repr_line
    port_line = next(l for l in out.splitlines() if l.startswith("PORT")).split()
    assert f":{port_line[1]}/" not in port_line[2] and port_line[2].startswith("http://127.0.0.1:")
    assert child.stderr == "", child.stderr[-3000:]


def test_a_line_without_its_newline_goes_on_at_once():
    """ipykernel, shutting down, writes one NUL byte to descriptor 2 and waits until its
    reader sees it: held back waiting for a newline, it kept every kernel from exiting."""
    child = run_child("""
        import os, select, sys
        from nbtool._util.quiet import NativeLogFilter
        r, w = os.pipe()
        os.dup2(w, 2)                      # descriptor 2 is a pipe, as in ipykernel
        f = NativeLogFilter(expect_gpu=False).start()
        os.write(2, b"\\0")
        ready, _, _ = select.select([r], [], [], 10)
        print("seen" if ready and os.read(r, 10) == b"\\0" else "held back", flush=True)
        os._exit(0)
    """)
    assert child.stdout == "seen\n", (child.stdout, child.stderr)
