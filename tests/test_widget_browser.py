"""The status widget in a real browser: JupyterLab + headless Debian chromium via playwright.

A notebook starts an app with ``%%taskapp --tunnel local`` on the kernel's loop; the test
checks what the page shows (badge, URL link), that a blocking cell turns the badge to
"kernel busy" and back, and that clicking Stop frees the port. Skipped only when chromium,
playwright or jupyterlab is missing (``scripts/install-browser-deps`` installs them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import free_port, port_is_free

from taskapp_notebook.health import auth_headers

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SECRET = "browser-test-secret-key-0123456789"
TOKEN = "browser-test-token-4b1d"
BROWSER_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def _missing() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return "chromium is not installed"
    for module in ("playwright", "jupyterlab"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed in this environment"
    return None


MISSING = _missing()
pytestmark = [
    pytest.mark.kernel,
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(MISSING is not None,
                       reason=f"{MISSING}; run scripts/install-browser-deps"),
]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def notebook(port: int) -> dict[str, Any]:
    cells = [
        "%load_ext taskapp_notebook",
        "%%taskapp --tunnel local --name browser-demo --var ta "
        f"--port {port} --no-auto-port --api-key-env TASKAPP_BROWSER_TEST_KEY\n"
        "from fastapi import FastAPI\n"
        "app = FastAPI()\n\n"
        "@app.get('/health')\n"
        "async def health():\n"
        "    return {'ok': True}",
        "import time\ntime.sleep(5)  # blocks the kernel loop the server runs on",
    ]
    return {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        },
        "cells": [
            {"cell_type": "code", "id": f"cell-{i}", "metadata": {}, "source": source,
             "outputs": [], "execution_count": None}
            for i, source in enumerate(cells)
        ],
    }


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A JupyterLab server on 127.0.0.1 with a token and its own config/data/runtime dirs."""
    root = tmp_path / "root"
    root.mkdir()
    config = tmp_path / "config"
    (config / "labconfig").mkdir(parents=True)
    # no "Would you like to receive news?" toast (it would also try the network)
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
    ))
    port = free_port()
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "TASKAPP_BROWSER_TEST_KEY": SECRET,
    }
    log = (tmp_path / "lab.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
         f"--port={port}", "--port-retries=0", f"--IdentityProvider.token={TOKEN}",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--ServerApp.allow_root=True", "--ServerApp.terminals_enabled=False",
         "--LabApp.extension_manager=readonly"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"jupyter lab exited:\n{(tmp_path / 'lab.log').read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{base}/api/status", params={"token": TOKEN}, timeout=2,
                                 trust_env=False)
            return response.status_code == 200
        return False

    try:
        wait_for(ready, 90, "jupyter lab to answer /api/status")
        yield base, root
    finally:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{base}/api/shutdown", headers={"Authorization": f"token {TOKEN}"},
                       timeout=10, trust_env=False)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def badge(page: Any, status: str, timeout: float) -> None:
    page.wait_for_selector(f'.taskapp-badge[data-status="{status}"]',
                           timeout=timeout * 1000)


def test_widget_in_jupyterlab(lab: tuple[str, Path]) -> None:
    from playwright.sync_api import sync_playwright

    base, root = lab
    app_port = free_port()
    (root / "widget.ipynb").write_text(json.dumps(notebook(app_port)))
    shots = Path(os.environ.get("TASKAPP_SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="taskapp-"))
    shots.mkdir(parents=True, exist_ok=True)

    def serves() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"http://127.0.0.1:{app_port}/health",
                                 headers=auth_headers(SECRET), timeout=10, trust_env=False)
            return response.status_code == 200
        return False

    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            page.goto(f"{base}/lab/tree/widget.ipynb?token={TOKEN}")
            page.wait_for_function(
                """() => {
                    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                    const k = w && w.sessionContext && w.sessionContext.session
                        && w.sessionContext.session.kernel;
                    return k && k.status === 'idle';
                }""",
                timeout=90_000,
            )
            # not awaited: the command's promise resolves only once every cell ran
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")

            # the blocking cell follows at once: the badge shows the kernel busy, not down
            badge(page, "kernel busy", 60)
            busy_text = page.inner_text(".taskapp-header")
            page.screenshot(path=str(shots / "taskapp-widget-busy.png"))
            badge(page, "running", 30)
            assert serves()
            url = f"http://127.0.0.1:{app_port}"
            assert page.get_attribute("a.taskapp-url", "href") == url
            assert "browser-demo" in page.inner_text(".taskapp-header")
            info = page.inner_text(".taskapp-info")
            assert "local" in info and f"port {app_port}" in info
            page.wait_for_function(
                "() => /HTTP 200/.test(document.querySelector('.taskapp-info').innerText)",
                timeout=30_000,
            )
            page.screenshot(path=str(shots / "taskapp-widget.png"))
            assert SECRET not in page.content()

            page.click("button.taskapp-stop")
            badge(page, "stopped", 30)
            wait_for(lambda: port_is_free(app_port), 30, f"port {app_port} to be freed")
            assert not serves()
            assert page.is_disabled("button.taskapp-stop")
            assert page.is_enabled("button.taskapp-start")
            page.screenshot(path=str(shots / "taskapp-widget-stopped.png"))
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(shots / "taskapp-widget-failure.png"))
                print(f"screenshot of the failure: {shots / 'taskapp-widget-failure.png'}\n"
                      f"page text:\n{page.inner_text('body')[-3000:]}")
            raise
        finally:
            context.close()
    assert "kernel busy (" in busy_text
