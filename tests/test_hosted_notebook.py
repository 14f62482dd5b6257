"""notebooks/hosted_gepa.ipynb runs top to bottom on a real kernel (nbclient) against the
stand-in Synth backend, with the notebook's own in-kernel relay: the same cells a user runs
against Synth, pointed elsewhere only by environment variables."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from standin_synth_backend import IMPROVEMENT, StandInSynthBackend
from support import port_is_free, serve, wait_for

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
    assert ast.literal_eval(results[-1]) == (
        "succeeded", 0.25, 1.0, {"main": "Answer the arithmetic question." + IMPROVEMENT})
    # The handle's cell shows the run view; its output was updated to the final card.
    job_cell = next(c for c in nb.cells if "job = run_in_process_job(" in c.source)
    (shown,) = job_cell.outputs
    assert shown["output_type"] == "display_data"
    assert "application/vnd.jupyter.widget-view+json" in shown["data"]
    card = shown["data"]["text/html"]
    assert 'data-state="succeeded"' in card and "Cancel" not in card
    assert "1.000" in card and "0.250" in card and "step by step" in card
    assert shown["data"]["text/plain"].startswith("hosted gepa · ")

    (create,) = [r for r in backend.requests if r.method == "POST"]
    container_url = create.body["config"]["prompt_learning"]["container_url"]
    assert "/s/rt_" in container_url  # a SynthTunnel URL of the in-kernel relay
    assert create.headers["x-synthtunnel-worker-token"]
    assert len(backend.rollouts) == 6 and all(r["status"] == 200 for r in backend.rollouts)


JOB_CELL = """
import os
from taskapp_notebook import TaskAppConfig, run_in_process_job

def rollout(request):
    return {"reward_info": {"outcome_reward": 0.5}}

job = run_in_process_job(
    config=TaskAppConfig(app_id="x", name="X", description="", rollout=rollout),
    tunnel_mode="local", seed_prompt="Seed.", poll_interval=0.05,
    config_dict={"prompt_learning": {"algorithm": "gepa",
        "task_data": {"train_pools": {"reflection_seeds": [0]}, "validation_seeds": [1]},
        "gepa": {"env_name": "x"}}},
)
job
"""


def test_kernel_shutdown_cancels_the_hosted_job_and_stops_its_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_kernel import ok, start_kernel, stop_kernel

    backend = StandInSynthBackend(KEY)
    backend.behaviour = "stuck"
    with serve(backend.app) as url:
        monkeypatch.setenv("SYNTH_API_KEY", KEY)
        monkeypatch.setenv("SYNTH_BACKEND_URL", url)
        kernel = start_kernel(tmp_path)
        try:
            shown = ok(kernel.kc, JOB_CELL)  # returns at once: the job runs on
            assert shown.outputs[0]["text/plain"].startswith("hosted gepa · ")
            assert wait_for(lambda: any(r.method == "POST" for r in backend.requests), 30)
            job_id = next(iter(backend.jobs))
            probe = ok(kernel.kc, "print('PORT', job.task_app.port, job.job_id)")
            port = int(probe.stdout.split()[1])
            assert probe.stdout.split()[2] == job_id and not port_is_free(port)
            kernel.km.shutdown_kernel(now=False)
        finally:
            stop_kernel(kernel)
        assert wait_for(lambda: bool(backend.cancels), 10), "no cancel reached the backend"
    assert backend.cancels == [{"job_id": job_id, "body": {"state": "cancelled"}}]
    assert port_is_free(port)


def test_interrupting_await_job_cancels_it_and_the_kernel_lives_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_kernel import collect, ok, send, start_kernel, stop_kernel

    backend = StandInSynthBackend(KEY)
    backend.behaviour = "stuck"
    with serve(backend.app) as url:
        monkeypatch.setenv("SYNTH_API_KEY", KEY)
        monkeypatch.setenv("SYNTH_BACKEND_URL", url)
        kernel = start_kernel(tmp_path)
        try:
            ok(kernel.kc, JOB_CELL)
            assert wait_for(lambda: bool(backend.jobs), 30)
            waiting = send(kernel.kc, "print('WAITING', flush=True)\nresult = await job")
            while True:  # the cell is awaiting the job now
                msg = kernel.kc.get_iopub_msg(timeout=30)
                if msg["parent_header"].get("msg_id") == waiting and \
                        "WAITING" in msg["content"].get("text", ""):
                    break
            time.sleep(0.3)
            kernel.km.interrupt_kernel()
            reply = collect(kernel.kc, waiting, 30)
            assert reply.status == "error" and reply.ename == "CancelledError"
            assert wait_for(lambda: bool(backend.cancels), 10)
            after = ok(kernel.kc, "print('STATE', job.progress.snapshot().state, "
                                  "job.task_app.state, job.done())")
            assert after.stdout.split() == ["STATE", "cancelled", "stopped", "True"]
        finally:
            stop_kernel(kernel)
    assert [c["body"] for c in backend.cancels] == [{"state": "cancelled"}]
