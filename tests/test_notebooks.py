"""Every notebook in notebooks/ executes top to bottom on a real kernel (nbclient)."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
#: Notebooks that need a job backend run in their own test against the stand-in backend
#: (tests/test_hosted_notebook.py), with the environment a user would set.
NEEDS_BACKEND = {"hosted_gepa.ipynb"}
NOTEBOOKS = sorted(p for p in NOTEBOOK_DIR.glob("*.ipynb") if p.name not in NEEDS_BACKEND)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]


def test_there_are_notebooks() -> None:
    assert [p.name for p in NOTEBOOKS].count("quickstart.ipynb") == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [out for c in nb.cells if c.cell_type == "code" for out in c.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    assert any(out.get("output_type") in ("execute_result", "display_data") for out in outputs)


def test_quickstart_happy_path_prints_nothing_red_when_8114_is_taken() -> None:
    """The default port busy (another notebook, another app): the quickstart moves to the
    next free port and says so at INFO only — no stderr output, so no red line."""
    path = NOTEBOOK_DIR / "quickstart.ipynb"
    with contextlib.ExitStack() as stack:
        holder = stack.enter_context(socket.socket())
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        # an app of an earlier test may still be letting 8114 go: hold it ourselves, so the
        # quickstart cannot get it back half-way through this test
        deadline = time.monotonic() + 30
        while True:
            try:
                holder.bind(("127.0.0.1", 8114))
                holder.listen()
                break
            except OSError:
                if time.monotonic() > deadline:
                    break  # held for good by someone else: just as good
                time.sleep(0.1)
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    stderr = [out.get("text") for c in nb.cells if c.cell_type == "code"
              for out in c.get("outputs", [])
              if out.get("output_type") == "stream" and out.get("name") == "stderr"]
    assert stderr == []
    listed = [out for c in nb.cells if "%taskapp list" in c.source for out in c.outputs]
    assert "8114" not in str(listed)  # it did move


def test_binder_installs_this_package_on_a_supported_python() -> None:
    binder = NOTEBOOK_DIR.parent / "binder"
    post_build = binder / "postBuild"
    assert post_build.stat().st_mode & 0o111, "postBuild must be executable"
    assert "pip install --no-cache-dir ." in post_build.read_text()
    assert (binder / "runtime.txt").read_text().strip() == "python-3.11"
    assert not (binder / "environment.yml").exists()  # conda would win over requirements.txt
    assert "ipywidgets" in (binder / "requirements.txt").read_text()


def test_gepa_notebook_improves_the_prompt_through_the_tunnel(tmp_path: Path) -> None:
    """gepa_local.ipynb: the last code cell is a plain dict with best > seed; the cell that
    needs a real model (tag ``skip-execution``) is not run. Saved without widget state (as
    ``nbconvert --execute`` or papermill leave it) and opened again, the run's cell shows
    the static card with the final figures and the plot."""
    import ast

    path = NOTEBOOK_DIR / "gepa_local.ipynb"
    executed = nbformat.read(path, as_version=4)
    NotebookClient(executed, timeout=120, kernel_name="python3", store_widget_state=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(executed, tmp_path / "gepa_local.ipynb")
    nb = nbformat.read(tmp_path / "gepa_local.ipynb", as_version=4)
    assert "widgets" not in nb.metadata
    code = [c for c in nb.cells if c.cell_type == "code"]
    skipped = [c for c in code if "skip-execution" in c.metadata.get("tags", [])]
    assert len(skipped) == 1 and skipped[0].execution_count is None
    assert "Upstream(" in skipped[0].source and "ChatCompletionsLM(" in skipped[0].source
    last = [c for c in code if c not in skipped][-1]
    (result,) = [o for o in last.outputs if o["output_type"] == "execute_result"]
    figures = ast.literal_eval(result["data"]["text/plain"])
    assert set(figures) == {"seed_score", "best_score", "rollouts"}
    assert figures["best_score"] > figures["seed_score"] and figures["rollouts"] > 0
    run_cell = next(c for c in code if "start_gepa(" in c.source)
    assert "through_tunnel=True" in run_cell.source
    # the run view (widget + static card), its output updated to the final card
    (shown,) = run_cell.outputs
    assert shown["output_type"] == "display_data"
    assert "application/vnd.jupyter.widget-view+json" in shown["data"]
    card, text = shown["data"]["text/html"], shown["data"]["text/plain"]
    assert 'data-state="succeeded"' in card and "Score threshold 1 reached" in card
    assert f"{figures['best_score']:.3f}" in card and f"{figures['seed_score']:.3f}" in card
    # the plot: the best score per iteration, and the bars a sanitizer that drops SVG leaves
    plot = re.search(r'class="taskapp-run-best" points="([^"]*)"', card)
    assert plot is not None and len(plot.group(1).split()) >= 2
    assert 'class="taskapp-run-bars"' in card
    assert "taskapp-diff-ins" in card  # the best prompt against the seed
    assert text.startswith("local gepa · ") and ": succeeded · " in text
