"""Local GEPA in a real ipykernel (jupyter_client): the task app serves on the kernel's loop
while the run goes on in the background. The model and the reflection LM are the
deterministic stand-ins of tests/gepa_task.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_kernel import Kernel, collect, ok, run, send, start_kernel, stop_kernel

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(300)]

TESTS = Path(__file__).resolve().parent

APP_CELL = """%%taskapp --tunnel local --var app --name gepa-kernel
from gepa_task import task_config
config = task_config(delay=0.02)
"""

START_CELL = """
from taskapp_notebook.gepa import start_gepa, optimize
from gepa_task import BASELINE, stand_in_model, stand_in_reflection
pushes = []
run = start_gepa(app, seed_candidate=BASELINE, train=list(range(12)), val=list(range(4)),
                 upstream=stand_in_model, reflection_lm=stand_in_reflection,
                 max_metric_calls=100_000, concurrency=2, name="kernel-run")
run.progress.subscribe(lambda snap: pushes.append(snap.budget_used))
print("STATE", run.state)
run
"""

PROBE = """
import asyncio, json, threading
print("PROBE " + json.dumps({
    "state": run.state, "pushes": len(pushes), "budget": run.progress.snapshot().budget_used,
    "iteration": run.progress.snapshot().iteration,
    "candidates": len(run.progress.snapshot().candidates),
    "points": len(run.progress.snapshot().score_history),
    "gepa_threads": [t.name for t in threading.enumerate() if t.name.startswith("taskapp-gepa")],
    "tasks": len(asyncio.all_tasks()),
}))
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    k = start_kernel(tmp_path_factory.mktemp("gepa-kernel"))
    ok(k.kc, f"import sys; sys.path.insert(0, {str(TESTS)!r})")
    yield k
    stop_kernel(k)


def probe(kernel: Kernel) -> dict[str, Any]:
    data: dict[str, Any] = ok(kernel.kc, PROBE).json_line("PROBE")
    return data


def test_run_in_the_background_of_a_kernel(kernel: Kernel) -> None:
    kc = kernel.kc
    ok(kc, APP_CELL, cell_id="gepa-app")
    url = ok(kc, "print('URL', app.local_url)").stdout.split("URL ", 1)[1].strip()
    app_port = int(url.rsplit(":", 1)[1])
    tasks_before = probe_tasks(kernel)

    reply = ok(kc, START_CELL, cell_id="gepa-start")
    assert "STATE pending" in reply.stdout or "STATE running" in reply.stdout  # returned at once
    (shown,) = reply.outputs  # the run view: widget, static card, text
    assert "application/vnd.jupyter.widget-view+json" in shown and "text/html" in shown
    assert shown["text/plain"].startswith("local gepa · kernel-run: ")

    # the kernel is idle: the run goes on, progress keeps arriving, the app answers /health
    first = probe(kernel)
    time.sleep(1.5)
    health = httpx.get(url + "/health", trust_env=False, timeout=10,
                       headers={"X-API-Key": ok(kc, "print('K', app.api_key)").stdout.split()[1]})
    assert health.status_code == 200
    second = probe(kernel)
    assert second["state"] == "running", second
    assert second["budget"] > first["budget"] and second["pushes"] > first["pushes"]
    assert second["candidates"] >= 2 and second["points"] > first["points"]
    assert second["gepa_threads"] == ["taskapp-gepa-kernel-run"]  # I/O on the kernel's loop

    # "Interrupt kernel" while idle never touches the run
    kernel.km.interrupt_kernel()
    time.sleep(0.5)
    third = probe(kernel)
    assert third["state"] == "running" and third["budget"] > second["budget"]

    # ... nor while a cell awaits the run: the await is interrupted, the run goes on
    msg_id = send(kc, "result = await run")
    time.sleep(0.5)
    kernel.km.interrupt_kernel()
    interrupted = collect(kc, msg_id)
    assert interrupted.status == "error", interrupted
    fourth = probe(kernel)
    assert fourth["state"] == "running" and fourth["budget"] > third["budget"]

    # the synchronous call that would deadlock is refused, at once, with the fix
    refused = run(kc, "optimize(app, seed_candidate='x', train=[1], upstream=stand_in_model, "
                      "reflection_lm=stand_in_reflection, max_metric_calls=5)")
    assert refused.ename == "DeadlockError" and "await run" in (refused.evalue or "")
    assert len(refused.traceback) == 1  # one red line, no traceback
    bad = run(kc, "start_gepa(app, seed_candidate='', train=[1], upstream=stand_in_model, "
                  "reflection_lm=stand_in_reflection, max_metric_calls=5)")
    assert bad.ename == "GepaParameterError" and "empty string" in (bad.evalue or "")
    assert len(bad.traceback) == 1

    # Stop: ends between iterations, cancels in-flight rollouts, keeps the best so far
    done = ok(kc, "run.stop()\nresult = await run\n"
                  "print('RESULT', json.dumps({'state': result.state, 'seed': result.seed_score,"
                  " 'best': result.best_score, 'history': len(result.history), "
                  "'message': result.message}))")
    result = done.json_line("RESULT")
    assert result["state"] == "stopped" and result["best"] >= result["seed"]
    assert result["history"] >= 3

    # nothing left behind: no run thread, no interceptor socket, no extra task
    after = probe(kernel)
    assert after["gepa_threads"] == [] and after["state"] == "stopped"
    assert kernel.app_listening_ports() == {app_port}
    assert probe_tasks(kernel) <= tasks_before
    ok(kc, "%taskapp stop --all")
    assert kernel.app_listening_ports() == set()


def test_rerunning_the_app_cell_stops_the_run_with_a_message(kernel: Kernel) -> None:
    kc = kernel.kc
    ok(kc, APP_CELL, cell_id="gepa-app-2")
    ok(kc, START_CELL, cell_id="gepa-start-2")
    time.sleep(1.0)
    ok(kc, APP_CELL, cell_id="gepa-app-2")  # the user re-runs the app's cell
    done = ok(kc, "result = await run\nprint('RESULT', json.dumps({'state': result.state, "
                  "'errors': result.rollout_errors, 'message': result.message}))")
    result = done.json_line("RESULT")
    assert result["state"] == "stopped" and result["errors"] == 0
    assert "stopped during the run" in result["message"]
    ok(kc, "%taskapp stop --all")


def probe_tasks(kernel: Kernel) -> int:
    reply = ok(kernel.kc, "import asyncio\nprint('TASKS', len(asyncio.all_tasks()))")
    return int(reply.stdout.split("TASKS ", 1)[1].split()[0])


def test_rerunning_the_start_cell_replaces_the_run(kernel: Kernel) -> None:
    kc = kernel.kc
    ok(kc, APP_CELL, cell_id="gepa-app-3")
    ok(kc, START_CELL, cell_id="gepa-start-3")
    ok(kc, "first = run")
    time.sleep(0.5)
    ok(kc, START_CELL, cell_id="gepa-start-3")  # the user re-runs the start cell
    done = ok(kc, "old = await first\n"
                  "from taskapp_notebook.gepa.run import active_runs\n"
                  "print('RESULT', json.dumps({'old': old.state, 'message': old.message, "
                  "'active': [r.name for r in active_runs()], 'new': run.state}))")
    result = done.json_line("RESULT")
    assert result["old"] == "stopped" and "replaced by a new run" in result["message"]
    assert result["active"] == ["kernel-run"] and result["new"] in ("pending", "running")
    ok(kc, "run.stop()\nawait run")
    ok(kc, "%taskapp stop --all")
