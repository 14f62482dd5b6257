"""notebooks/hosted_gepa.ipynb runs top to bottom on a real kernel (nbclient) against the
stand-in Synth backend, with the notebook's own in-kernel relay: the same cells a user runs
against Synth, pointed elsewhere only by environment variables."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from standin_synth_backend import IMPROVEMENT, StandInSynthBackend
from support import serve

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "hosted_gepa.ipynb"
KEY = "synth-notebook-key-0123456789"

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]


def test_hosted_gepa_notebook_is_lint_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", str(NOTEBOOK)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hosted_gepa_notebook_runs_against_the_standin(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = StandInSynthBackend(KEY)
    with serve(backend.app) as url:
        monkeypatch.setenv("SYNTH_API_KEY", KEY)
        monkeypatch.setenv("SYNTH_RUST_BACKEND_URL", url)  # where jobs go (synth-ai's variable)
        monkeypatch.setenv("TASKAPP_DEMO_RELAY", "1")
        monkeypatch.delenv("SYNTH_BACKEND_URL", raising=False)
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = NotebookClient(nb, timeout=120, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOK.parent)}})
        client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    results = [o["data"]["text/plain"] for o in outputs if o.get("output_type") ==
               "execute_result"]
    # The handle displayed at once, then the awaited result.
    assert results[0].startswith("<HostedJob hosted gepa")
    assert ast.literal_eval(results[-1]) == (
        "succeeded", 0.25, 1.0, {"main": "Answer the arithmetic question." + IMPROVEMENT})

    (create,) = [r for r in backend.requests if r.method == "POST"]
    container_url = create.body["config"]["prompt_learning"]["container_url"]
    assert "/s/rt_" in container_url  # a SynthTunnel URL of the in-kernel relay
    assert create.headers["x-synthtunnel-worker-token"]
    assert len(backend.rollouts) == 6 and all(r["status"] == 200 for r in backend.rollouts)
