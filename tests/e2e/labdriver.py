"""Drive a notebook in JupyterLab or Notebook 7 from Playwright, the way a person would,
plus the few kernel queries a test needs to check what the page claims.

The page's own application object (``window.jupyterapp``, exposed by the server option
``expose_app_in_browser``) runs commands and finds cells; the widget is driven by clicking its
buttons. Every wait is on a state (a selector, a kernel status, a port), never a sleep.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
#: Debian's chromium; TASKAPP_CHROMIUM names another binary (a path or a name on PATH).
CHROMIUM = (shutil.which(os.environ.get("TASKAPP_CHROMIUM", "chromium"))
            or os.environ.get("TASKAPP_CHROMIUM") or "/usr/bin/chromium")
TOKEN = "e2e-test-token-4b1d"
#: The task apps' key in the kernels the servers start (``ENVIRONMENT_API_KEY``).
APP_KEY = "e2e-environment-api-key-0123456789"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.1 s until it is true; fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class JupyterServer:
    base: str
    root: Path
    frontend: str  # "lab" or "notebook"
    process: subprocess.Popen[bytes]
    log_path: Path

    def url(self, path: str) -> str:
        """The browser URL that opens ``path`` (relative to the root) in this frontend."""
        if self.frontend == "lab":  # reset: no tabs restored from an earlier test's workspace
            return f"{self.base}/lab/tree/{path}?reset&token={TOKEN}"
        return f"{self.base}/notebooks/{path}?token={TOKEN}"

    def shutdown_sessions(self) -> None:
        """Shut down every kernel session (what closing the notebooks and their kernels does)."""
        headers = {"Authorization": f"token {TOKEN}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=30,
                          trust_env=False) as client:
            for session in client.get("/api/sessions").json():
                client.delete(f"/api/sessions/{session['id']}").raise_for_status()


# JavaScript run in the page; ``panel`` is the notebook on screen (the current widget).
_PANEL = """
const app = window.jupyterapp;
const panel = app.shell.currentWidget;
"""
_KERNEL_IDLE = """
const app = window.jupyterapp;  // undefined until the application has started
const panel = app && app.shell.currentWidget;
const kernel = panel && panel.sessionContext && panel.sessionContext.session
    && panel.sessionContext.session.kernel;
return !!kernel && kernel.status === 'idle' && kernel.connectionStatus === 'connected';
"""
_CELL_INDEX = """
(prefix) => {
    const cells = window.jupyterapp.shell.currentWidget.content.widgets;
    return cells.findIndex(c => c.model.sharedModel.getSource().startsWith(prefix));
}
"""
_RUN_CELL = _PANEL + """
const notebook = panel.content;
notebook.deselectAll();
notebook.activeCellIndex = index;
// not awaited: the command resolves only when the cell has finished
app.commands.execute('notebook:run-cell');
"""
_USER_EXPRESSION = _PANEL + """
const kernel = panel.sessionContext.session.kernel;
const future = kernel.requestExecute({code: '', silent: true, store_history: false,
                                      user_expressions: {value: expression}});
const reply = await future.done;
const value = reply.content.user_expressions.value;
if (value.status !== 'ok') { throw new Error(value.ename + ': ' + value.evalue); }
return value.data['text/plain'];
"""


def _function(body: str, *args: str) -> str:
    """A JavaScript async arrow function with ``args`` and ``body``, for ``page.evaluate``."""
    return f"async ({', '.join(args)}) => {{ {body} }}"


class Page:
    """A Playwright page showing one notebook, with the steps the tests take."""

    def __init__(self, page: Any, screenshots: Path) -> None:
        self.page = page
        self.screenshots = screenshots
        #: The DOM id of the notebook panel ``open`` opened (other tabs may hold cells too).
        self.panel_id = ""
        #: The server ``open`` used.
        self.server: JupyterServer | None = None
        #: Console errors and uncaught page errors, as text.
        self.console_errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", self._on_page_error)

    def _on_page_error(self, error: Any) -> None:
        self.console_errors.append(f"pageerror: {error} {error.stack}")

    def _on_console(self, message: Any) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    # ------------------------------------------------------------------ notebook

    def open(self, server: JupyterServer, path: str) -> None:
        """Open ``path`` and wait until its kernel is connected and idle."""
        self.server = server
        self.page.goto(server.url(path))
        self.wait_kernel_idle(120)
        self.panel_id = self.page.evaluate("() => window.jupyterapp.shell.currentWidget.id")

    def wait_kernel_idle(self, timeout: float = 60) -> None:
        # a plain function: wait_for_function takes a returned Promise as truthy
        self.page.wait_for_function(f"() => {{ {_KERNEL_IDLE} }}", timeout=timeout * 1000,
                                    polling=100)

    def cell_index(self, prefix: str) -> int:
        """Index of the first cell whose source starts with ``prefix``."""
        index: int = self.page.evaluate(_CELL_INDEX, prefix)
        assert index >= 0, f"no cell starts with {prefix!r}"
        return index

    def run_cell(self, prefix: str) -> int:
        """Run the first cell starting with ``prefix`` (as Ctrl+Enter would); don't wait."""
        index = self.cell_index(prefix)
        self.page.evaluate(_function(_RUN_CELL, "index"), index)
        return index

    def run_cell_and_wait(self, prefix: str, timeout: float = 60) -> int:
        """Run a cell and wait until it has a new execution count and the kernel is idle."""
        index = self.cell_index(prefix)
        before = self.page.evaluate(
            "(i) => window.jupyterapp.shell.currentWidget.content.widgets[i]"
            ".model.executionCount", index)
        self.page.evaluate(_function(_RUN_CELL, "index"), index)
        self.page.wait_for_function(
            """([index, before]) => {
                const panel = window.jupyterapp.shell.currentWidget;
                const count = panel.content.widgets[index].model.executionCount;
                return count !== null && count !== before
                    && panel.sessionContext.session.kernel.status === 'idle';
            }""",
            arg=[index, before], timeout=timeout * 1000, polling=100,
        )
        return index

    def append_cell(self, source: str) -> int:
        """Add a code cell with ``source`` at the end of the notebook; return its index."""
        index: int = self.page.evaluate(
            """(source) => {
                const model = window.jupyterapp.shell.currentWidget.content.model;
                model.sharedModel.addCell({cell_type: 'code', source});
                return model.cells.length - 1;
            }""",
            source,
        )
        return index

    def evaluate_in_kernel(self, expression: str) -> str:
        """``repr`` of a Python expression evaluated in the notebook's kernel (user_expressions)."""
        result: str = self.page.evaluate(_function(_USER_EXPRESSION, "expression"), expression)
        return result

    def restart_kernel(self) -> None:
        """Restart the kernel (as the Kernel menu does, without the confirmation dialog)."""
        restart = "await panel.sessionContext.session.kernel.restart();"
        self.page.evaluate(_function(_PANEL + restart))
        self.wait_kernel_idle(120)

    # ------------------------------------------------------------------ widget

    def cell(self, index: int) -> Any:
        """Cell ``index`` of the notebook ``open`` opened."""
        return self.page.locator(f"#{self.panel_id} .jp-Cell").nth(index)

    def widget(self, index: int) -> Any:
        """The task-app widget in the output of cell ``index``."""
        return self.cell(index).locator(".widget-vbox.taskapp-view")

    def wait_badge(self, index: int, status: str, timeout: float = 60) -> None:
        """Wait until the widget of cell ``index`` shows the badge ``status``."""
        self.widget(index).locator(f'.taskapp-badge[data-status="{status}"]').wait_for(
            timeout=timeout * 1000)

    def shoot(self, name: str, index: int | None = None) -> Path:
        """Screenshot the widget of cell ``index`` (or the page) as ``name``.png."""
        path = self.screenshots / f"{name}.png"
        if index is None:
            self.page.screenshot(path=str(path))
        else:
            self.widget(index).screenshot(path=str(path))
        return path
