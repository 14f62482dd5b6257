"""Smoke test: the quickstart's widget renders in Jupyter Notebook 7 too (headless chromium)."""

from __future__ import annotations

import re

import pytest
from labdriver import APP_KEY, JupyterServer, Page, wait_for
from support import port_is_free
from test_lab import QUICKSTART, TASKAPP_CELL, serves, unexpected_errors

pytestmark = [pytest.mark.browser, pytest.mark.kernel, pytest.mark.timeout(300)]


def test_quickstart_widget_in_notebook7(notebook7: JupyterServer, page: Page) -> None:
    page.open(notebook7, QUICKSTART)
    page.run_cell_and_wait("%load_ext taskapp_notebook")
    cell = page.run_cell(TASKAPP_CELL)
    page.wait_badge(cell, "running")
    url = page.widget(cell).locator("a.taskapp-url").get_attribute("href")
    assert url is not None and re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
    assert serves(url)
    assert APP_KEY not in page.page.content()
    page.shoot("notebook7-widget-running", cell)

    page.widget(cell).locator("button.taskapp-stop").click()
    page.wait_badge(cell, "stopped")
    port = int(url.rsplit(":", 1)[1])
    wait_for(lambda: port_is_free(port), 30, f"port {port} to be freed by Stop")
    assert unexpected_errors(page.console_errors) == [], page.console_errors
