"""The run view fed by the real producers, in a real ipykernel kernel (jupyter_client).

A local GEPA run (the offline task and the deterministic stand-in model and reflection of
tests/gepa_task.py, the app served on the kernel's loop) and a hosted job (the stand-in Synth
backend of tests/standin_synth_backend.py) are each the last expression of a cell. After the
cell returned, widget updates keep arriving while the kernel is idle; a click on Stop /
Cancel is sent as JupyterLab sends it (a ``comm_msg`` to the button's model); the output's
display id then gets the final card. Re-running the start cell replaces the run (or job) it
started and closes the old view.
"""

from __future__ import annotations

import json
import queue
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standin_synth_backend import StandInSynthBackend
from support import launch_kernel, port_is_free, serve, wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]

TESTS = Path(__file__).resolve().parent
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
KEY = "synth-standin-key-run-view-0123456789"
APP_KEY = "task-app-key-run-view-0123456789"

APP_CELL = """%%taskapp --tunnel local --no-widget --var app --name view-app
from gepa_task import task_config
config = task_config(delay=0.02)
"""
START_CELL = """
import json
from taskapp_notebook.gepa import start_gepa
from gepa_task import BASELINE, stand_in_model, stand_in_reflection
run = start_gepa(app, seed_candidate=BASELINE, train=list(range(12)), val=list(range(4)),
                 upstream=stand_in_model, reflection_lm=stand_in_reflection,
                 max_metric_calls=100_000, concurrency=2, name="view-run")
run
"""
IDS = """
_v = {name}.view()
print("IDS " + json.dumps({{part: getattr(_v, part).model_id for part in
    ("header", "stop_button", "stats", "plot", "candidates", "diff", "message", "widget")}}))
"""
JOB_CELL = """
import json
from taskapp_notebook import TaskAppConfig, run_in_process_job

async def rollout(request):
    import httpx
    url = request.policy.config["inference_url"].rstrip("/") + "/chat/completions"
    async with httpx.AsyncClient(trust_env=False) as client:
        reply = await client.post(url, json={"messages": [
            {"role": "system", "content": "Answer the arithmetic question."},
            {"role": "user", "content": f"What is {request.env.seed} + 1?"}]})
    answer = reply.json()["choices"][0]["message"]["content"]
    return {"reward_info": {"outcome_reward": 1.0 if "step by step" in answer else 0.25}}

job = run_in_process_job(
    config=TaskAppConfig(app_id="arith", name="Arith", description="", rollout=rollout),
    tunnel_mode="local", seed_prompt="Answer the arithmetic question.", poll_interval=0.05,
    name="hosted-view", task_app_api_key="{app_key}",
    config_dict={"prompt_learning": {"algorithm": "gepa",
        "task_data": {"train_pools": {"reflection_seeds": [0, 1]}, "validation_seeds": [2]},
        "gepa": {"env_name": "arith", "rollout": {"budget": 4}}}},
)
job
""".replace("{app_key}", APP_KEY)


class Kernel:
    """A real ipykernel; execute requests carry a ``cellId`` as JupyterLab sends them."""

    def __init__(self, cwd: Path) -> None:
        self.km, self.kc = launch_kernel(cwd)
        #: Every iopub message read so far.
        self.seen: list[Any] = []

    def red_lines(self) -> str:
        """Everything written to stderr so far (what JupyterLab shows in red)."""
        return "".join(m["content"]["text"] for m in self.seen
                       if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")

    def get(self, timeout: float) -> Any:
        message = self.kc.get_iopub_msg(timeout=timeout)
        self.seen.append(message)
        return message

    def send(self, code: str, cell_id: str | None = None) -> str:
        """Send an execute request; its msg_id."""
        metadata = {"cellId": cell_id} if cell_id else {}
        msg = self.kc.session.msg("execute_request", {
            "code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True}, metadata=metadata)
        self.kc.shell_channel.send(msg)
        return str(msg["header"]["msg_id"])

    def reply(self, msg_id: str, timeout: float = 30) -> None:
        """Read the execute reply to ``msg_id``; it must be ``ok``."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                assert reply["content"]["status"] == "ok", reply["content"]
                return

    def execute(self, code: str, cell_id: str | None = None,
                timeout: float = 60) -> list[Any]:
        """Run ``code``; its iopub messages up to idle (other parents' too, in order)."""
        msg_id = self.send(code, cell_id)
        messages = []
        deadline = time.monotonic() + timeout
        while True:
            message = self.get(max(0.1, deadline - time.monotonic()))
            messages.append(message)
            errors = [m["content"] for m in messages if m["msg_type"] == "error"]
            assert not errors, errors
            if is_status(message, msg_id, "idle"):
                break
        self.reply(msg_id, max(0.1, deadline - time.monotonic()))
        return messages

    def stdout(self, code: str, timeout: float = 60) -> str:
        return "".join(m["content"]["text"] for m in self.execute(code, timeout=timeout)
                       if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")

    def json_line(self, code: str, prefix: str, timeout: float = 60) -> Any:
        for line in self.stdout(code, timeout).splitlines():
            if line.startswith(prefix + " "):
                return json.loads(line[len(prefix) + 1:])
        raise AssertionError(f"no {prefix} line")

    def drain(self, seconds: float) -> list[Any]:
        """Every iopub message that arrives within ``seconds``."""
        messages = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                messages.append(self.get(left))
            except queue.Empty:
                break
        return messages

    def drain_until(self, done: Any, timeout: float, what: str) -> list[Any]:
        """iopub messages until ``done(messages)`` is true."""
        messages: list[Any] = []
        deadline = time.monotonic() + timeout
        while not done(messages):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {what}"
            try:
                messages.append(self.get(min(left, 1.0)))
            except queue.Empty:
                pass
        return messages

    def click(self, button_model_id: str) -> None:
        """A click on a widget button, as JupyterLab sends it (a comm_msg on the shell)."""
        self.kc.shell_channel.send(self.kc.session.msg("comm_msg", {
            "comm_id": button_model_id,
            "data": {"method": "custom", "content": {"event": "click"}},
        }))

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    k = Kernel(tmp_path)
    k.execute(f"%load_ext taskapp_notebook\nimport sys; sys.path.insert(0, {str(TESTS)!r})")
    yield k
    k.close()


def updates(messages: list[Any], model_id: str) -> list[str]:
    """The ``value`` updates of widget ``model_id``, in order."""
    return [m["content"]["data"]["state"]["value"] for m in messages
            if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == model_id
            and m["content"]["data"].get("method") == "update"
            and "value" in m["content"]["data"].get("state", {})]


def is_status(message: Any, msg_id: str, state: str) -> bool:
    return bool(message["msg_type"] == "status"
                and message["parent_header"].get("msg_id") == msg_id
                and message["content"]["execution_state"] == state)


def polyline_points(html: str) -> int:
    found = re.search(r'class="taskapp-run-best" points="([^"]*)"', html)
    return len(found.group(1).split()) if found else 0


def rows(html: str) -> int:
    return html.count('class="taskapp-run-candidate"')


def states(messages: list[Any], header_id: str) -> list[str]:
    return [re.search(r'data-state="(\w+)"', h).group(1)  # type: ignore[union-attr]
            for h in updates(messages, header_id)]


def shown_view(messages: list[Any]) -> dict[str, Any]:
    """The one display of the cell: the widget view, the static card, the text."""
    assert not [m for m in messages if m["msg_type"] == "execute_result"]
    (shown,) = [m for m in messages if m["msg_type"] == "display_data"]
    data = shown["content"]["data"]
    assert {WIDGET_VIEW, "text/html", "text/plain"} <= set(data)
    return {"display_id": shown["content"]["transient"]["display_id"],
            "model_id": data[WIDGET_VIEW]["model_id"], "data": data}


def final_card(messages: list[Any], display_id: str) -> dict[str, Any]:
    (final,) = [m for m in messages if m["msg_type"] == "update_display_data"
                and m["content"]["transient"]["display_id"] == display_id]
    data: dict[str, Any] = final["content"]["data"]
    return data


def test_local_gepa_run_live_rerun_and_stop(kernel: Kernel) -> None:
    kernel.execute(APP_CELL, cell_id="app")
    first = shown_view(kernel.execute(START_CELL, cell_id="start"))
    old = kernel.json_line(IDS.format(name="run"), "IDS")
    assert old["widget"] == first["model_id"]
    kernel.execute("first = run")

    # the user re-runs the start cell: the old run is replaced and its view closed
    messages = kernel.execute(START_CELL, cell_id="start")
    shown = shown_view(messages)
    closed = {m["content"]["comm_id"] for m in messages if m["msg_type"] == "comm_close"}
    assert {old["widget"], old["stop_button"], old["plot"]} <= closed
    ids = kernel.json_line(IDS.format(name="run"), "IDS")
    assert ids["widget"] == shown["model_id"] != old["widget"]
    replaced = kernel.stdout("old_result = await first\nprint(old_result.state, "
                             "first.view().closed is False, run.view() is not first.view())")
    assert replaced.split() == ["stopped", "True", "True"], replaced

    # the kernel is idle: the view keeps getting the run's progress
    live = kernel.drain_until(
        lambda ms: polyline_points((updates(ms, ids["plot"]) or [""])[-1]) >= 4
        and rows((updates(ms, ids["candidates"]) or [""])[-1]) >= 2
        and "taskapp-diff-ins" in (updates(ms, ids["diff"]) or [""])[-1], 60,
        "four score points, two candidates and a better prompt than the seed")
    assert not any(m["msg_type"] == "status" and m["content"]["execution_state"] == "busy"
                   for m in live)
    plots = [polyline_points(svg) for svg in updates(live, ids["plot"])]
    assert len(plots) >= 2 and plots == sorted(plots), plots

    # Stop, clicked as JupyterLab sends it while a cell awaits the run (ipykernel 7 takes
    # the click meanwhile): the run ends between iterations, the best so far is kept, and
    # the output gets its final card before the awaiting cell ends
    waiting = kernel.send(
        "result = await run\nprint('RESULT', json.dumps({'state': result.state, "
        "'seed': result.seed_score, 'best': result.best_score, 'history': "
        "len(result.history), 'budget': result.budget_used, 'message': result.message}))")
    kernel.drain_until(lambda ms: any(is_status(m, waiting, "busy") for m in ms), 30,
                       "the cell to start awaiting")
    kernel.click(ids["stop_button"])
    after = kernel.drain_until(lambda ms: any(is_status(m, waiting, "idle") for m in ms), 60,
                               "the awaiting cell to end")
    kernel.reply(waiting)
    seen = states(after, ids["header"])
    assert "stopping" in seen and seen[-1] == "stopped", seen
    card = final_card(after, shown["display_id"])
    (line,) = [m["content"]["text"] for m in after if m["msg_type"] == "stream"
               and m["content"]["name"] == "stdout" and m["parent_header"].get("msg_id") == waiting]
    # no red line: the app's rollouts cut short on our side end quietly
    kernel.drain(1.0)
    assert kernel.red_lines() == ""  # the rollouts both stops cut short ended quietly
    result = json.loads(line.split("RESULT ", 1)[1])
    assert result["state"] == "stopped" and "stopped by the user" in result["message"]
    assert result["best"] > result["seed"]
    html = card["text/html"]
    assert 'data-state="stopped"' in html and f"{result['best']:.3f}" in html
    assert f"{result['seed']:.3f}" in html and f"{result['budget']} / 100000" in html
    assert polyline_points(html) == result["history"] + 1  # the seed and each iteration
    shown_iteration = re.match(r"local gepa · view-run: stopped · iteration (\d+)",
                               card["text/plain"])
    assert shown_iteration, card["text/plain"]  # the one it stopped in (discarded) or the last
    assert int(shown_iteration.group(1)) - result["history"] in (0, 1)
    assert "taskapp-diff-ins" in html
    # nothing left behind: no run thread, no redraw timer of either view
    left = kernel.stdout("import threading\nprint([t.name for t in threading.enumerate() "
                         "if t.name.startswith(('taskapp-gepa', 'taskapp-run-view'))])\n"
                         "%taskapp stop --all")
    assert left.splitlines()[0] == "[]"


def test_hosted_job_live_and_cancel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = StandInSynthBackend(KEY)
    backend.behaviour = "hold"  # baseline and one candidate, then running until cancelled
    backend.step_delay = 0.4
    backend.container_api_key = APP_KEY  # it calls the app's local URL (tunnel_mode="local")
    with serve(backend.app) as url:
        monkeypatch.setenv("SYNTH_API_KEY", KEY)
        monkeypatch.setenv("SYNTH_BACKEND_URL", url)
        kernel = Kernel(tmp_path)
        try:
            first = shown_view(kernel.execute(JOB_CELL, cell_id="job"))
            assert 'data-state="pending"' in first["data"]["text/html"]
            old = kernel.json_line(IDS.format(name="job") + "first = job", "IDS")
            assert old["widget"] == first["model_id"]
            assert wait_for(lambda: len(backend.jobs) == 1, 30)
            first_id = next(iter(backend.jobs))

            # the user re-runs the cell: the first job is cancelled, its view closed
            messages = kernel.execute(JOB_CELL, cell_id="job")
            shown = shown_view(messages)
            closed = {m["content"]["comm_id"] for m in messages
                      if m["msg_type"] == "comm_close"}
            assert {old["widget"], old["stop_button"], old["plot"]} <= closed
            ids = kernel.json_line(IDS.format(name="job"), "IDS")
            assert ids["widget"] == shown["model_id"] != old["widget"]
            replaced = kernel.stdout("old = await first\nprint(old.state, '|', old.error)")
            assert replaced.strip() == "cancelled | replaced by a new run of the same cell"
            assert backend.cancels == [{"job_id": first_id, "body": {"state": "cancelled"}}]

            # the kernel is idle; the job's events reach the view: the seed, a candidate
            live = kernel.drain_until(
                lambda ms: rows((updates(ms, ids["candidates"]) or [""])[-1]) >= 2
                and "step by step" in (updates(ms, ids["diff"]) or [""])[-1], 60,
                "the baseline and a better candidate")
            assert not any(m["msg_type"] == "status" and
                           m["content"]["execution_state"] == "busy" for m in live)
            assert "running" in states(live, ids["header"])
            assert polyline_points(updates(live, ids["plot"])[-1]) >= 2
            (job_id,) = set(backend.jobs) - {first_id}
            assert len(backend.cancels) == 1

            # Cancel, clicked as JupyterLab sends it: cancelled on the backend, app stopped
            kernel.click(ids["stop_button"])
            after = kernel.drain_until(
                lambda ms: any(m["msg_type"] == "update_display_data" for m in ms), 60,
                "the final card")
            assert backend.cancels[1:] == [{"job_id": job_id, "body": {"state": "cancelled"}}]
            seen = states(after, ids["header"])
            assert "stopping" in seen and seen[-1] == "cancelled", seen
            card = final_card(after, shown["display_id"])
            html = card["text/html"]
            assert 'data-state="cancelled"' in html and "1.000" in html and "0.250" in html
            assert "cancelled by the user" in html
            assert card["text/plain"].startswith("hosted gepa · hosted-view: cancelled")
            out = kernel.stdout("result = await job\nprint(result.state, result.job_id, "
                                "job.task_app.state, job.task_app.port)")
            state, got_id, app_state, port = out.split()
            assert (state, got_id, app_state) == ("cancelled", job_id, "stopped")
            assert port_is_free(int(port))
            kernel.drain(0.5)
            assert kernel.red_lines() == ""
            assert wait_for(lambda: backend.jobs[job_id].status["status"] == "cancelled", 5)
        finally:
            kernel.close()

