"""A notebook saved with its outputs but without widget state (as ``nbconvert --execute`` or
papermill leave it) shows the widget's static HTML card in JupyterLab, not an error.

JupyterLab renders an *untrusted* notebook's outputs with safe renderers only, so it picks
the ``text/html`` fallback the widget puts beside its view. (A notebook the user saved
themselves is trusted: JupyterLab then prefers the widget view, which needs widget state —
see the README.)
"""

from __future__ import annotations

import shutil

import nbformat
import pytest
from labdriver import REPO, JupyterServer, Page
from nbclient import NotebookClient
from test_lab import TASKAPP_CELL, unexpected_errors

pytestmark = [pytest.mark.browser, pytest.mark.kernel, pytest.mark.timeout(300)]

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def test_saved_notebook_shows_html_fallback(lab: JupyterServer, page: Page) -> None:
    folder = lab.root / "saved"
    folder.mkdir()
    shutil.copy(REPO / "notebooks" / "quickstart.ipynb", folder / "executed.ipynb")
    nb = nbformat.read(folder / "executed.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", store_widget_state=False,
                   resources={"metadata": {"path": str(folder)}}).execute()
    assert "widgets" not in nb.metadata
    outputs = next(c.outputs for c in nb.cells if c.source.startswith(TASKAPP_CELL))
    bundle = next(o.data for o in outputs if WIDGET_VIEW in o.get("data", {}))
    assert {"text/html", "text/plain"} <= set(bundle)
    nbformat.write(nb, folder / "executed.ipynb")

    page.open(lab, "saved/executed.ipynb")
    cell = page.cell_index(TASKAPP_CELL)
    card = page.cell(cell).locator(
        ".jp-OutputArea-output div.taskapp-view")
    card.wait_for(timeout=30_000)
    text = card.inner_text()
    assert "quickstart" in text and "running" in text and "public URL" in text, text
    assert "127.0.0.1" in text
    assert "Error displaying widget" not in page.page.inner_text(f"#{page.panel_id}")
    assert page.page.locator(f"#{page.panel_id} .widget-vbox").count() == 0
    page.shoot("saved-notebook-fallback")
    card.screenshot(path=str(page.screenshots / "widget-html-fallback.png"))
    assert unexpected_errors(page.console_errors) == [], page.console_errors
