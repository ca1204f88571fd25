"""The dashboard in a real JupyterLab, in a real browser (Debian's chromium, driven by
Playwright's Python package; no browser is downloaded)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("NBTOOL_ARTIFACTS",
                                Path(__file__).resolve().parent.parent / "build" / "screenshots"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser_path():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"chromium is not installed at {CHROMIUM}; under CI=true this test must "
                        "run (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    return CHROMIUM


@pytest.fixture
def lab(tmp_path):
    """A real `jupyter lab` on 127.0.0.1 with a token, serving tmp_path."""
    port, token = free_port(), "nbtool-test-token"
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         "--allow-root",   # CI runs as root
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={tmp_path}", "--LabApp.news_url=",
         # The workspace names this test's notebook: in the user's own folder it made their
         # next `make lab` ask for it (a 404). tests/conftest.py's session folder holds it.
         f"--LabApp.workspaces_dir={os.environ['JUPYTERLAB_WORKSPACES_DIR']}",
         f"--LabApp.user_settings_dir={os.environ['JUPYTERLAB_SETTINGS_DIR']}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError("jupyter lab did not start:\n"
                                     + (tmp_path / "lab.log").read_text()[-3000:])
            time.sleep(0.5)
    yield url, token, tmp_path
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.terminate()               # shuts the kernels down, which close their clusters
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    gone, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:
        p.kill()


def accept_kernel_dialog(page, wait_ms: int = 4000) -> None:
    """JupyterLab sometimes asks which kernel to start (a race with the session it starts
    itself); the notebook names python3, so accept its choice when asked."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    accept = page.locator(".jp-Dialog .jp-mod-accept")
    try:
        accept.first.wait_for(state="visible", timeout=wait_ms)
    except PlaywrightTimeout:
        return
    accept.first.click()


def test_dashboard_in_jupyterlab_loads_a_model_and_runs_a_prediction(browser_path, lab,
                                                                     model_dir):
    from playwright.sync_api import expect, sync_playwright

    url, token, root = lab
    cells = [
        "import numpy as np, nbtool\n"
        "eng = nbtool.start(n_workers=1, gpus='none', dashboard_address='127.0.0.1:0')",
        f"eng.register('web_mlp', {str(model_dir / 'mlp.keras')!r})\n"
        "x = np.random.default_rng(0).normal(size=(30000, 8)).astype('float32')",
        # An injected GPU inventory (this machine has none): the GPU section shows it,
        # with its memory total and no invented readings.
        "import os\nos.environ['NBTOOL_FAKE_GPUS'] = '1x16GB'\n"
        "dash = nbtool.dashboard(interval=0.5)\ndash",
    ]
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": c, "outputs": [],
                     "execution_count": None} for c in cells],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                      "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    (root / "dash.ipynb").write_text(json.dumps(nb))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as p:
        # XDG_CONFIG_HOME: chromium keeps its "Crash Reports" there (else ~/.config/chromium).
        browser = p.chromium.launch(executable_path=browser_path, headless=True, env={
            **os.environ, "XDG_CONFIG_HOME": tempfile.mkdtemp(prefix="chromium-config-")}, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            page.goto(f"{url}/lab/tree/dash.ipynb?token={token}")
            page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
            expect(page.locator(".jp-Notebook-ExecutionIndicator, .jp-KernelStatus").first
                   ).to_be_visible(timeout=60_000)
            accept_kernel_dialog(page)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            accept_kernel_dialog(page)

            dashboard = page.locator(".nbtool-dashboard")
            expect(dashboard).to_be_visible(timeout=180_000)
            expect(page.locator(".nbtool-membar-row")).to_have_count(1, timeout=30_000)
            state = page.locator(".nbtool-state-web_mlp")
            expect(state).to_contain_text("not loaded", timeout=30_000)
            expect(page.locator(".nbtool-gpu-row")).to_have_count(1)
            expect(page.locator(".nbtool-gpu-row")).to_contain_text(
                "utilisation n/a; memory n/a of 16.0 GB")
            # Memory over the last minutes: a sparkline per worker, with points by now.
            expect(page.locator(".nbtool-membar-row svg.nbtool-spark polyline")).to_have_count(
                1, timeout=30_000)
            expect(page.locator(".nbtool-running")).to_contain_text("nothing running")
            expect(page.locator(".nbtool-run-chunk input")).to_have_value("auto")

            # No label is cut: every button's and description's text fits its box.
            hard = page.locator("button.nbtool-hard-web_mlp")
            expect(hard).to_have_text("Hard unload")
            assert hard.evaluate("b => b.scrollWidth <= b.clientWidth"), "Hard unload is cut"
            cut = page.evaluate("""() => [...document.querySelectorAll(
                '.nbtool-dashboard button, .nbtool-dashboard .widget-label, .nbtool-membar-name')]
                .filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth)
                .map(e => e.textContent)""")
            assert cut == [], f"labels cut: {cut}"

            page.locator(".nbtool-load-web_mlp button, button.nbtool-load-web_mlp").first.click()
            expect(state).to_contain_text("cpu0: loaded", timeout=60_000)

            page.locator(".nbtool-run-models select").select_option("web_mlp")
            page.locator(".nbtool-run-input select").select_option("x")
            page.locator(".nbtool-run-chunk input").fill("20")    # 1,500 small chunks: a
            page.locator(".nbtool-run-button button, button.nbtool-run-button").first.click()

            # ... run of a few seconds, seen live: its bar, and the worker's rows/s.
            running = page.locator(".nbtool-running .nbtool-run-row")
            expect(running).to_have_count(1, timeout=30_000)
            expect(running).to_contain_text("30,000 rows in chunks of 20")
            expect(running).to_contain_text("/1500 chunks")
            expect(page.locator(".nbtool-membar-row")).to_contain_text(
                re.compile(r"\b[1-9][\d,]* rows/s"), timeout=30_000)
            dashboard.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "dashboard-running.png"), full_page=True)

            result = page.locator(".nbtool-run-result .nbtool-prediction")
            expect(result).to_be_visible(timeout=120_000)
            expect(result).to_contain_text("web_mlp")
            expect(page.locator(".nbtool-history")).to_contain_text("30,000 rows",
                                                                   timeout=30_000)
            expect(page.locator(".nbtool-running")).to_contain_text("nothing running",
                                                                   timeout=30_000)
            dashboard.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "dashboard-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    for shot in ("dashboard.png", "dashboard-running.png"):
        assert (ARTIFACTS / shot).stat().st_size > 10_000
