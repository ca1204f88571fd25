"""The session's isolation (tests/conftest.py) is in force, here and in child processes.

Everything the tests write must go under the one private folder the session removes at
its end: a change that drops a variable, or starts a process that no longer inherits
them, would quietly put files back into the user's ~/.jupyter or /tmp. (CI also checks
the outcome from outside: .ci/no_traces.py around `make test`.)
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import ISOLATED_DIRS, SESSION_DIR

# What a child process (a kernel, `jupyter lab`, a Dask worker) would actually use.
CHILD = r"""
import json, tempfile
from IPython.paths import get_ipython_dir
from jupyter_core.paths import jupyter_config_dir, jupyter_data_dir, jupyter_runtime_dir
from jupyterlab.commands import get_user_settings_dir, get_workspaces_dir
print(json.dumps({
    "tempfile.gettempdir()": tempfile.gettempdir(),
    "jupyter_config_dir()": jupyter_config_dir(),
    "jupyter_data_dir()": jupyter_data_dir(),
    "jupyter_runtime_dir()": jupyter_runtime_dir(),
    "jupyterlab workspaces": get_workspaces_dir(),
    "jupyterlab user settings": get_user_settings_dir(),
    "IPython dir": get_ipython_dir(),
}))
"""


def outside(paths: dict) -> dict:
    """The entries whose folder is not inside the session folder."""
    return {k: v for k, v in paths.items() if SESSION_DIR not in Path(v).resolve().parents}


def test_every_tool_folder_points_inside_the_session_folder():
    assert SESSION_DIR.is_dir() and SESSION_DIR.name.startswith("nbtool-tests-")
    here = {name: os.environ.get(name, "<unset>") for name in ISOLATED_DIRS}
    here["tempfile.gettempdir()"] = tempfile.gettempdir()
    assert outside(here) == {}, f"not inside {SESSION_DIR}: {outside(here)}"
    assert all(Path(p).is_dir() for p in here.values())


def test_a_child_process_inherits_the_session_folders():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert outside(seen) == {}, f"a child process writes outside {SESSION_DIR}: {outside(seen)}"


def test_pytest_tmp_path_goes_with_the_session_folder(tmp_path):
    assert SESSION_DIR in tmp_path.resolve().parents, tmp_path


def test_kernels_still_find_the_python3_kernelspec():
    # JUPYTER_DATA_DIR moved: nbclient's kernels need the venv's spec (sys.prefix/share).
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    assert "python3" in specs, f"no python3 kernelspec; found {specs}"
