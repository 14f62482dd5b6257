"""The run view in JupyterLab, in headless Debian chromium: what a user running an
optimisation sees and clicks.

A cell displays a RunView fed by a stand-in producer thread in the kernel (a simulated GEPA
run, named as such: it proposes prompt edits and scores them with a seeded random
generator). After the cell returned, the plot's SVG polyline grows, the candidates table
fills and the best prompt's diff shows; the texts meet WCAG AA contrast in the light and
the dark theme; Stop reaches ``on_stop`` in the kernel and the badge turns "stopped"; after
a kernel restart the badge says "disconnected".
Its screenshots are ``run-view-simulated*.png`` in the screenshot directory (the one in
``docs/`` is of a real run: ``test_gepa_lab.py``).
"""

from __future__ import annotations

import re
from typing import Any

import nbformat
import pytest
from labdriver import JupyterServer, Page, wait_for
from nbclient import NotebookClient
from test_lab import contrast, unexpected_errors

pytestmark = [pytest.mark.browser, pytest.mark.kernel, pytest.mark.timeout(300)]

SETUP = '''
import random, threading, time
from taskapp_notebook.progress import CandidateSummary, RunProgress
from taskapp_notebook.notebook.run_view import RunView

SEED_PROMPT = """You are a careful math tutor.
Solve the word problem and give the final answer as a number.
Keep the explanation short."""
EDITS = [
    "Read the problem twice and list the quantities before computing.",
    "Check the units of every intermediate result.",
    "Write the final answer on its own line as `Answer: <number>`.",
    "If the problem gives a percentage, convert it to a fraction first.",
    "Never round intermediate results.",
    "Re-check the arithmetic of the last step before answering.",
]

progress = RunProgress("local gepa", "gsm8k-tutor", budget_total=600)
stop = threading.Event()
stop_calls = []

def on_stop():
    stop_calls.append(threading.current_thread().name)
    stop.set()

def simulated_gepa(iterations, delay):
    """A stand-in for a GEPA run: seeded random scores for simulated prompt edits."""
    rng = random.Random(7)
    progress.update(state="running", seed_score=0.41, message="evaluating the seed",
                    extra={"run_dir": "runs/gsm8k-tutor"})
    progress.upsert_candidate(CandidateSummary("seed", score=0.41,
                                               components={"system_prompt": SEED_PROMPT}))
    best, best_id, prompts = 0.41, "seed", {"seed": SEED_PROMPT}
    for i in range(1, iterations + 1):
        if stop.is_set():
            progress.update(state="stopped", message=f"stopped by the user after "
                            f"iteration {i - 1}; best so far kept ({best_id}, {best:.3f})")
            return
        parent = best_id if rng.random() < 0.7 else rng.choice(list(prompts))
        lines = prompts[parent].splitlines()
        fresh = [edit for edit in EDITS if edit not in lines]
        if fresh:
            lines.insert(rng.randrange(1, len(lines) + 1), rng.choice(fresh))
        if rng.random() < 0.3:
            lines[-1] = lines[-1].replace("short", "short and precise")
        text = "\\n".join(lines)
        score = min(0.97, best + rng.uniform(-0.12, 0.09))
        cid = f"c{i:03d}"
        prompts[cid] = text
        progress.upsert_candidate(CandidateSummary(
            cid, score=round(score, 3), parents=(parent,), on_front=score >= best - 0.02,
            iteration=i, components={"system_prompt": text}))
        if score > best:
            best, best_id = score, cid
        progress.add_score_point(i, best)
        progress.update(iteration=i, budget_used=12 * i, rollouts=12 * i,
                        rollout_errors=i // 9, rollouts_per_second=round(rng.uniform(38, 44), 1),
                        best_score=best, best_candidate_id=best_id,
                        message=f"iteration {i}: proposed {cid} from {parent}")
        time.sleep(delay)
    progress.update(state="succeeded", message="budget used up")

view = RunView(progress, on_stop=on_stop)
'''
START = "thread = threading.Thread(target=simulated_gepa, args=(45, 0.25), daemon=True)"
RUN = START + "\nthread.start()\nview"


def run_view(page: Page, index: int) -> Any:
    return page.cell(index).locator(".widget-vbox.taskapp-run-view")


def points(view: Any) -> int:
    value = view.locator("polyline.taskapp-run-best").get_attribute("points") or ""
    return len(value.split())


def view_contrasts(page: Page, view: Any) -> dict[str, float]:
    """Contrast ratio of the view's texts on the notebook's background."""
    background = page.page.evaluate(
        "() => getComputedStyle(document.querySelector('.jp-Notebook')).backgroundColor")
    texts = {
        "name": view.locator(".taskapp-run-header b"),
        "label": view.locator(".taskapp-run-tile div").first,
        "figure": view.locator(".taskapp-run-value").first,
        "table": view.locator(".taskapp-run-candidate td").nth(2),
        "diff": view.locator(".taskapp-diff-text"),
        "axis": view.locator(".taskapp-run-plot span").first,
    }
    return {
        name: round(contrast(text.evaluate("e => getComputedStyle(e).color"), background), 1)
        for name, text in texts.items()
    }


def test_run_view_live_in_jupyterlab(lab: JupyterServer, page: Page) -> None:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {
        "display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}})
    nb.cells = [nbformat.v4.new_code_cell(SETUP), nbformat.v4.new_code_cell(RUN)]
    nbformat.write(nb, lab.root / "run_view.ipynb")
    page.open(lab, "run_view.ipynb")
    page.run_cell_and_wait("\nimport random")
    cell = page.run_cell_and_wait(START)  # returns at once: the run goes on in a thread
    view = run_view(page, cell)
    view.locator(".taskapp-run-badge[data-state='running']").wait_for(timeout=30_000)

    # while the kernel is idle, the plot grows, the table fills, the diff shows
    first = points(view)
    wait_for(lambda: points(view) >= first + 4, 30, "the score polyline to grow")
    wait_for(lambda: view.locator(".taskapp-run-candidate").count() >= 8, 30,
             "the candidates table to fill")
    view.locator("ins.taskapp-diff-ins").first.wait_for(timeout=30_000)
    assert view.locator(".taskapp-run-candidate[data-best='true']").count() == 1
    assert "<" not in view.locator(".taskapp-diff-text").inner_text().replace("<number>", "")
    wait_for(lambda: points(view) >= 14, 60, "a dozen iterations for the screenshot")
    ratios = view_contrasts(page, view)
    print(f"light theme contrast ratios: {ratios}")
    assert min(ratios.values()) >= 4.5, ratios  # WCAG AA for normal text
    view.screenshot(path=str(page.screenshots / "run-view-simulated.png"))

    # Stop: on_stop runs in the kernel, the run ends between iterations, the badge says so
    button = view.locator("button.taskapp-run-stop")
    assert button.is_enabled()
    button.click()
    view.locator(".taskapp-run-badge[data-state='stopped']").wait_for(timeout=30_000)
    assert button.is_disabled()
    assert page.evaluate_in_kernel("stop_calls") == "['taskapp-run-view-stop']"
    assert "stopped by the user" in view.locator(".taskapp-run-message").inner_text()
    stopped_at = points(view)
    assert stopped_at >= 14

    # the dark theme: the same texts stay readable
    page.page.evaluate(
        "() => window.jupyterapp.commands.execute('apputils:change-theme',"
        " {theme: 'JupyterLab Dark'})")
    try:
        page.page.wait_for_function(
            "() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
        dark = view_contrasts(page, view)
        print(f"dark theme contrast ratios: {dark}")
        view.screenshot(path=str(page.screenshots / "run-view-simulated-dark.png"))
        assert min(dark.values()) >= 4.5, dark
    finally:
        page.page.evaluate(
            "() => window.jupyterapp.commands.execute('apputils:change-theme',"
            " {theme: 'JupyterLab Light'})")
    assert re.fullmatch(r"'?stopped'?", page.evaluate_in_kernel("progress.snapshot().state"))

    # after a kernel restart the view can't be updated: its badge says so
    page.restart_kernel()
    view.locator(".taskapp-gone").wait_for(state="visible", timeout=30_000)
    assert view.locator(".taskapp-run-badge").is_hidden()
    assert unexpected_errors(page.console_errors) == [], page.console_errors


def test_saved_run_card_in_jupyterlab(lab: JupyterServer, page: Page) -> None:
    """Executed by nbclient without widget state (as papermill or ``nbconvert --execute``
    leave it): JupyterLab shows the sanitized HTML card with the final figures; its
    sanitizer drops the SVG, and the bar chart the SVG carries for that case takes its
    place."""
    folder = lab.root / "saved-run"
    folder.mkdir()
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {
        "display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}})
    nb.cells = [
        nbformat.v4.new_code_cell(SETUP),
        nbformat.v4.new_code_cell(RUN.replace("(45, 0.25)", "(20, 0.01)")),
        nbformat.v4.new_code_cell("thread.join()\nview.refresh()"),
    ]
    NotebookClient(nb, timeout=120, kernel_name="python3", store_widget_state=False,
                   resources={"metadata": {"path": str(folder)}}).execute()
    nbformat.write(nb, folder / "executed.ipynb")

    page.open(lab, "saved-run/executed.ipynb")
    card = page.cell(1).locator(".jp-OutputArea-output div.taskapp-run-view")
    card.wait_for(timeout=30_000)
    text = card.inner_text()
    assert "gsm8k-tutor" in text and "succeeded" in text and "240 / 600" in text, text
    assert card.locator("svg").count() == 0  # the sanitizer dropped it ...
    bars = card.locator(".taskapp-run-bars > div")
    assert bars.count() == 20 and card.locator(".taskapp-run-bars").is_visible()  # ... not this
    assert card.locator(".taskapp-run-candidate").count() in (10, 11)  # top 10 and the seed
    # (the sanitizer drops data-* attributes: look at what the rows say)
    assert card.locator(".taskapp-run-candidate", has_text="(seed)").count() == 1
    assert card.locator(".taskapp-run-candidate", has_text="(best)").count() == 1
    assert card.locator("ins.taskapp-diff-ins").count() >= 1
    assert "Error displaying widget" not in page.page.inner_text(f"#{page.panel_id}")
    card.screenshot(path=str(page.screenshots / "run-view-simulated-saved.png"))
    assert unexpected_errors(page.console_errors) == [], page.console_errors
