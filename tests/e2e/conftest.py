"""Fixtures for the browser tests: a real Jupyter server (JupyterLab or Notebook 7) on
127.0.0.1 and Debian's chromium driven by Playwright.

Nothing is downloaded: Playwright drives ``/usr/bin/chromium`` through ``executable_path``
(``scripts/install-browser-deps`` installs it with apt-get). Each server gets its own config,
data, runtime and settings directories, a token, and a temporary root directory; the
browser runs headless with the background-networking flags, so it talks to loopback only.
Screenshots go to ``TASKAPP_SCREENSHOT_DIR`` (default ``build/e2e-screenshots``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from labdriver import APP_KEY, CHROMIUM, REPO, TOKEN, JupyterServer, Page, wait_for
from support import free_port

BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _missing() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return "Debian's chromium is not installed"
    for module in ("playwright", "jupyterlab", "notebook"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed in this environment"
    return None


MISSING = _missing()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every browser test is skipped, saying why and how to fix it, when a part is missing —
    except under CI=true, where each one fails saying so (``pytest_runtest_setup``)."""
    if MISSING is None or os.environ.get("CI") == "true":
        return
    skip = pytest.mark.skip(reason=f"{MISSING}; run scripts/install-browser-deps")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under CI=true a browser test with a part missing fails before any fixture starts."""
    if MISSING is not None and os.environ.get("CI") == "true" and "browser" in item.keywords:
        pytest.fail(f"{MISSING}: CI=true runs the browser tests; scripts/install-browser-deps "
                    "installs what they need.", pytrace=False)


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """Where the tests write their screenshots (kept after the run, for people to look at)."""
    directory = Path(os.environ.get("TASKAPP_SCREENSHOT_DIR") or REPO / "build" / "e2e-screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("failure-*.png"):  # from an earlier run
        stale.unlink()
    return directory


@contextlib.contextmanager
def jupyter_server(tmp: Path, frontend: str, env: dict[str, str]) -> Iterator[JupyterServer]:
    """Start ``jupyter lab`` or ``jupyter notebook`` (Notebook 7) on a free loopback port."""
    root = tmp / "root"
    root.mkdir(parents=True)
    config = tmp / "config"
    (config / "labconfig").mkdir(parents=True)
    if frontend == "lab":
        # no "Would you like to receive news?" toast (it would also try the network)
        (config / "labconfig" / "page_config.json").write_text(json.dumps(
            {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
        ))
    port = free_port()
    app_class = "LabApp" if frontend == "lab" else "JupyterNotebookApp"
    server_env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_DATA_DIR": str(tmp / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
        "IPYTHONDIR": str(tmp / "ipython"),
        **env,
    }
    log_path = tmp / f"{frontend}.log"
    log = log_path.open("w")
    module = "jupyterlab" if frontend == "lab" else "notebook"
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--no-browser", "--ip=127.0.0.1",
         f"--port={port}", "--port-retries=0", f"--IdentityProvider.token={TOKEN}",
         f"--ServerApp.root_dir={root}", f"--{app_class}.expose_app_in_browser=True",
         "--ServerApp.allow_root=True", "--ServerApp.terminals_enabled=False",
         "--LabApp.extension_manager=readonly", "--ServerApp.open_browser=False"],
        env=server_env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"jupyter {frontend} exited:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{base}/api/status", params={"token": TOKEN}, timeout=2,
                                 trust_env=False)
            return response.status_code == 200
        return False

    try:
        wait_for(ready, 90, f"jupyter {frontend} to answer /api/status")
        yield JupyterServer(base=base, root=root, frontend=frontend, process=proc,
                            log_path=log_path)
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


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Debian chromium per module; each test opens its own context. (Not per
    session: Playwright's sync API keeps an event loop and greenlets in the main thread while
    it runs, which the asyncio tests collected after these must not inherit.)"""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS,
        )
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page(browser: Any, screenshots: Path, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context and page that records console errors; on failure it saves a
    screenshot and prints the page text. Afterwards the kernels the page started are shut
    down, so tests sharing a server don't see each other's."""
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  permissions=["clipboard-read", "clipboard-write"])
    wrapped = Page(context.new_page(), screenshots)
    try:
        yield wrapped
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            with contextlib.suppress(Exception):
                name = f"failure-{request.node.name}.png"
                wrapped.page.screenshot(path=str(screenshots / name))
                print(f"screenshot of the failure: {screenshots / name}\n"
                      f"console errors: {wrapped.console_errors}\n"
                      f"page text:\n{wrapped.page.inner_text('body')[-3000:]}")
        context.close()
        if wrapped.server is not None:
            wrapped.server.shutdown_sessions()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _server(factory: pytest.TempPathFactory, frontend: str) -> Iterator[JupyterServer]:
    tmp = factory.mktemp(frontend)
    # kernels inherit the server's environment: their task apps use this key
    with jupyter_server(tmp, frontend, {"ENVIRONMENT_API_KEY": APP_KEY}) as server:
        shutil.copytree(REPO / "notebooks", server.root / "notebooks")
        yield server


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    """JupyterLab with the repository's notebooks under ``notebooks/``."""
    yield from _server(tmp_path_factory, "lab")


@pytest.fixture(scope="session")
def notebook7(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    """Jupyter Notebook 7 with the repository's notebooks under ``notebooks/``."""
    yield from _server(tmp_path_factory, "notebook")
