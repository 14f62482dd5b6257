"""Local GEPA in JupyterLab, in headless Debian chromium: ``notebooks/gepa_local.ipynb`` run
cell by cell as a user runs it (the in-kernel SynthTunnel relay, the task app on the
kernel's loop, the notebook's stand-in model and reflection), then a longer run started in
the same notebook and stopped from the page; the notebook executed by nbclient without
widget state, opened again; and ``notebooks/hosted_gepa.ipynb`` against the stand-in Synth
backend (``tests/standin_synth_backend.py``), cancelled from the page.

The screenshot of the finished run (``gepa-view.png`` in the screenshot directory) is the
one in ``docs/``.
"""

from __future__ import annotations

import re
from typing import Any

import nbformat
import pytest
from labdriver import REPO, JupyterServer, Page, wait_for
from nbclient import NotebookClient
from standin_synth_backend import StandInSynthBackend
from support import serve
from test_lab import unexpected_errors

pytestmark = [pytest.mark.browser, pytest.mark.kernel, pytest.mark.timeout(300)]

NOTEBOOK = "notebooks/gepa_local.ipynb"
LONG_RUN = """long_run = start_gepa(
    task_app, through_tunnel=True, seed_candidate=BASELINE,
    train=list(range(12)), val=list(range(8)),
    upstream=stand_in_model, reflection_lm=stand_in_reflection,
    max_metric_calls=1_000_000, name="long-run",
)
long_run"""


def run_view(page: Page, index: int) -> Any:
    return page.cell(index).locator(".widget-vbox.taskapp-run-view")


def points(view: Any) -> int:
    value = view.locator("polyline.taskapp-run-best").get_attribute("points") or ""
    return len(value.split())


def tile(view: Any, name: str) -> float:
    """The figure of a stats tile (``best-score``...), as a number."""
    text = view.locator(f".taskapp-run-{name} .taskapp-run-value").inner_text()
    return float(re.sub(r"[^0-9.]", "", text))


def kernel_true(page: Page, expression: str) -> bool:
    return page.evaluate_in_kernel(expression) == "True"


def test_gepa_notebook_live_then_stop_in_jupyterlab(lab: JupyterServer, page: Page) -> None:
    page.open(lab, NOTEBOOK)
    for prefix in ("%load_ext", "import os", "%%taskapp", "def stand_in_model"):
        page.run_cell_and_wait(prefix)

    # the notebook's run: the view fills while the kernel is idle and ends "succeeded"
    cell = page.run_cell_and_wait("import tempfile")
    view = run_view(page, cell)
    view.locator(".taskapp-run-badge[data-state='succeeded']").wait_for(timeout=60_000)
    assert points(view) >= 3  # the seed and each iteration
    assert view.locator(".taskapp-run-candidate").count() >= 3
    assert view.locator(".taskapp-run-candidate[data-best='true']").count() == 1
    assert view.locator("ins.taskapp-diff-ins").count() >= 1
    assert "Score threshold 1 reached" in view.locator(".taskapp-run-message").inner_text()
    assert view.locator("button.taskapp-run-stop").is_disabled()
    assert kernel_true(page, "run.progress.snapshot().best_score > "
                             "run.progress.snapshot().seed_score")
    assert tile(view, "best-score") == 1.0
    view.screenshot(path=str(page.screenshots / "gepa-view.png"))  # docs/gepa-view.png

    # a longer run in the same kernel: the plot grows while idle; Stop in the page ends it
    # between iterations and keeps the best so far
    page.append_cell(LONG_RUN)
    cell = page.run_cell_and_wait("long_run = start_gepa(")
    view = run_view(page, cell)
    view.locator(".taskapp-run-badge[data-state='running']").wait_for(timeout=60_000)
    wait_for(lambda: points(view) >= 3, 60, "the first iterations")
    first = points(view)
    wait_for(lambda: points(view) >= first + 5, 60, "the score polyline to grow")
    wait_for(lambda: view.locator(".taskapp-run-candidate").count() >= 3, 60,
             "the candidates table to fill")
    view.locator("ins.taskapp-diff-ins").first.wait_for(timeout=30_000)
    button = view.locator("button.taskapp-run-stop")
    assert button.is_enabled()
    button.click()
    view.locator(".taskapp-run-badge[data-state='stopped']").wait_for(timeout=60_000)
    assert button.is_disabled()
    assert "stopped by the user" in view.locator(".taskapp-run-message").inner_text()
    assert page.evaluate_in_kernel("long_run.state") == "'stopped'"
    assert kernel_true(page, "long_run.done() and (lambda r: r.best_score > r.seed_score)"
                             "(long_run.result())")
    view.screenshot(path=str(page.screenshots / "gepa-view-stopped.png"))

    # the rest of the notebook: the result, then the app and the relay stop
    page.run_cell_and_wait("result = await run")
    page.run_cell_and_wait("result.history")
    page.run_cell_and_wait("%taskapp stop --all")
    assert kernel_true(page, "result.best_score > result.seed_score")
    assert kernel_true(page, "not task_app.is_running")
    # no red line anywhere (the app's rollouts a stop cut short end quietly)
    stderr = page.page.locator(
        f"#{page.panel_id} [data-mime-type='application/vnd.jupyter.stderr']")
    assert stderr.count() == 0, stderr.all_inner_texts()
    assert unexpected_errors(page.console_errors) == [], page.console_errors


def test_saved_gepa_notebook_in_jupyterlab(lab: JupyterServer, page: Page) -> None:
    """Executed by nbclient without widget state and opened again: the run's cell shows the
    static card with the final figures, and the plot's bar chart (JupyterLab's sanitizer
    drops the SVG of an untrusted notebook)."""
    folder = lab.root / "saved-gepa"
    folder.mkdir()
    nb = nbformat.read(REPO / NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", store_widget_state=False,
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    nbformat.write(nb, folder / "executed.ipynb")

    page.open(lab, "saved-gepa/executed.ipynb")
    index = page.cell_index("import tempfile")
    card = page.cell(index).locator(".jp-OutputArea-output div.taskapp-run-view")
    card.wait_for(timeout=30_000)
    # JupyterLab skips drawing cells out of view (CSS content-visibility): scroll to it
    card.scroll_into_view_if_needed()
    wait_for(lambda: card.inner_text().strip() != "", 30, "the card to be drawn")
    text = card.inner_text()
    assert "succeeded" in text and "Score threshold 1 reached" in text, text
    best = float(re.search(r"best score\s*([0-9.]+)", text, re.I).group(1))  # type: ignore[union-attr]
    seed = float(re.search(r"seed\s*([0-9.]+)", text).group(1))  # type: ignore[union-attr]
    assert best > seed, text
    assert card.locator(".taskapp-run-bars > div").count() >= 3
    assert card.locator(".taskapp-run-bars").is_visible()
    assert card.locator(".taskapp-run-candidate", has_text="(best)").count() == 1
    assert card.locator("ins.taskapp-diff-ins").count() >= 1
    assert "Error displaying widget" not in page.page.inner_text(f"#{page.panel_id}")
    card.screenshot(path=str(page.screenshots / "gepa-view-saved-notebook.png"))
    assert unexpected_errors(page.console_errors) == [], page.console_errors


def test_hosted_job_cancelled_in_jupyterlab(lab: JupyterServer, page: Page) -> None:
    """The hosted notebook's job against the stand-in backend: the view fills from the
    job's events while the kernel is idle; Cancel in the page cancels the job on the
    backend and stops the app."""
    key = "synth-standin-key-browser-0123456789"
    backend = StandInSynthBackend(key)
    backend.behaviour = "hold"  # baseline and one candidate, then running until cancelled
    backend.step_delay = 0.3
    with serve(backend.app) as url:
        page.open(lab, "notebooks/hosted_gepa.ipynb")
        # the environment a user sets for the offline variant (see the notebook)
        page.evaluate_in_kernel(f"__import__('os').environ.update(SYNTH_API_KEY={key!r}, "
                                f"SYNTH_RUST_BACKEND_URL={url!r}, TASKAPP_DEMO_RELAY='1')")
        for prefix in ("import os", "if os.environ", "import httpx"):
            page.run_cell_and_wait(prefix)
        cell = page.run_cell_and_wait("job = run_in_process_job(")
        view = run_view(page, cell)
        view.locator(".taskapp-run-badge[data-state='running']").wait_for(timeout=60_000)
        wait_for(lambda: view.locator(".taskapp-run-candidate").count() >= 2, 60,
                 "the baseline and a candidate")
        view.locator("ins.taskapp-diff-ins").first.wait_for(timeout=30_000)
        assert points(view) >= 2
        button = view.locator("button.taskapp-run-stop")
        assert button.inner_text().strip() == "Cancel" and button.is_enabled()
        button.click()
        view.locator(".taskapp-run-badge[data-state='cancelled']").wait_for(timeout=60_000)
        (job_id,) = backend.jobs
        assert backend.cancels == [{"job_id": job_id, "body": {"state": "cancelled"}}]
        assert "cancelled by the user" in view.locator(".taskapp-run-message").inner_text()
        assert tile(view, "best-score") == 1.0
        view.screenshot(path=str(page.screenshots / "hosted-view-cancelled.png"))
        page.run_cell_and_wait("result = await job")
        assert page.evaluate_in_kernel("(result.state, str(job.task_app.state))") == \
            "('cancelled', 'stopped')"
        page.run_cell_and_wait("await http.aclose()")
    stderr = page.page.locator(
        f"#{page.panel_id} [data-mime-type='application/vnd.jupyter.stderr']")
    assert stderr.count() == 0, stderr.all_inner_texts()
    assert unexpected_errors(page.console_errors) == [], page.console_errors
