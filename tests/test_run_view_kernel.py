"""RunView in a real ipykernel kernel (jupyter_client) and in a notebook saved by nbclient.

A cell starts a stand-in producer thread and returns; widget updates keep arriving while the
kernel is idle; a Stop click sent as the frontend sends it (a ``comm_msg`` to the button's
model) reaches ``on_stop``; the output's display id gets the final card.
"""

from __future__ import annotations

import json
import queue
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from support import launch_kernel

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

#: A stand-in GEPA producer: one iteration every ``DELAY`` seconds until stopped.
PRODUCER = """
import json, threading, time
from taskapp_notebook.progress import CandidateSummary, RunProgress
from taskapp_notebook.notebook.run_view import RunView

progress = RunProgress("local gepa", "kernel-demo", budget_total=400)
stop = threading.Event()
stop_calls = []

def on_stop():
    stop_calls.append(threading.current_thread().name)
    stop.set()

def produce(iterations, delay):
    progress.update(state="running", seed_score=0.3)
    progress.upsert_candidate(CandidateSummary("seed", score=0.3,
                                               components={"system": "Answer briefly."}))
    for i in range(1, iterations + 1):
        if stop.is_set():
            progress.update(state="stopped", message=f"stopped after iteration {i - 1}")
            return
        score = 0.3 + 0.6 * i / iterations
        progress.upsert_candidate(CandidateSummary(
            f"c{i}", score=score, parents=("seed",), on_front=True, iteration=i,
            components={"system": f"Answer briefly and check step {i}."}))
        progress.add_score_point(i, score)
        progress.update(iteration=i, budget_used=2 * i, rollouts=2 * i, best_score=score,
                        best_candidate_id=f"c{i}")
        time.sleep(delay)
    progress.update(state="succeeded", message="budget used up")

view = RunView(progress, on_stop=on_stop)
"""


class Kernel:
    """A real ipykernel with a blocking client and an iopub reader that keeps every message."""

    def __init__(self, cwd: Path) -> None:
        self.km, self.kc = launch_kernel(cwd)

    def execute(self, code: str, timeout: float = 60) -> tuple[dict[str, Any], list[Any]]:
        """Run ``code``; return its execute_reply content and its iopub messages up to idle."""
        msg_id = self.kc.execute(code)
        messages = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            messages.append(msg)
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "idle"):
                break
        while True:
            reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                assert reply["content"]["status"] == "ok", reply["content"]
                return reply["content"], messages

    def drain(self, seconds: float) -> list[Any]:
        """Every iopub message that arrives within ``seconds``."""
        messages = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                messages.append(self.kc.get_iopub_msg(timeout=left))
            except queue.Empty:
                break
        return messages

    def stdout(self, code: str) -> str:
        _, messages = self.execute(code)
        return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    k = Kernel(tmp_path)
    yield k
    k.close()


def updates(messages: list[Any], model_id: str) -> list[str]:
    """The ``value`` updates of widget ``model_id`` in ``messages``, in order."""
    return [
        m["content"]["data"]["state"]["value"]
        for m in messages
        if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == model_id
        and m["content"]["data"].get("method") == "update"
        and "value" in m["content"]["data"].get("state", {})
    ]


def polyline_points(svg: str) -> int:
    found = re.search(r'class="taskapp-run-best" points="([^"]*)"', svg)
    return len(found.group(1).split()) if found else 0


def test_updates_arrive_while_idle_and_stop_click_reaches_on_stop(kernel: Kernel) -> None:
    kernel.execute(PRODUCER)
    ids = json.loads(kernel.stdout(
        "print(json.dumps({'button': view.stop_button.model_id, 'plot': view.plot.model_id,"
        " 'header': view.header.model_id}))"))
    _, messages = kernel.execute(
        "threading.Thread(target=produce, args=(1000, 0.05), daemon=True).start()\nview")
    shown = [m for m in messages if m["msg_type"] == "display_data"]
    assert len(shown) == 1 and WIDGET_VIEW in shown[0]["content"]["data"]
    assert {"text/html", "text/plain"} <= set(shown[0]["content"]["data"])
    display_id = shown[0]["content"]["transient"]["display_id"]

    # the cell has returned (kernel idle); the producer's updates keep reaching the frontend
    idle = kernel.drain(2.0)
    assert not any(m["msg_type"] == "status" and m["content"]["execution_state"] == "busy"
                   for m in idle)
    plots = updates(idle, ids["plot"])
    assert len(plots) >= 3, len(plots)
    counts = [polyline_points(svg) for svg in plots]
    assert counts == sorted(counts) and counts[-1] > counts[0] >= 1, counts
    assert len(plots) <= 2.0 / 0.2 + 3  # throttled: ~5 redraws a second, not 20 updates

    # a click as JupyterLab sends it: a comm_msg to the button's model
    click = kernel.kc.session.msg("comm_msg", {
        "comm_id": ids["button"], "data": {"method": "custom", "content": {"event": "click"}},
    })
    kernel.kc.shell_channel.send(click)
    after = kernel.drain(3.0)
    headers = updates(after, ids["header"])
    states = [re.search(r'data-state="(\w+)"', h).group(1) for h in headers]  # type: ignore[union-attr]
    assert "stopping" in states and states[-1] == "stopped", states
    final = [m for m in after if m["msg_type"] == "update_display_data"]
    assert len(final) == 1 and final[0]["content"]["transient"]["display_id"] == display_id
    card = final[0]["content"]["data"]["text/html"]
    assert 'data-state="stopped"' in card and "taskapp-run-best" in card
    assert "stopped after iteration" in final[0]["content"]["data"]["text/plain"]
    result = kernel.stdout("print(stop_calls, progress.snapshot().state)")
    assert result.strip() == "['taskapp-run-view-stop'] stopped", result


def test_saved_notebook_keeps_the_final_card(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(PRODUCER),
        nbformat.v4.new_code_cell(
            "thread = threading.Thread(target=produce, args=(15, 0.02))\nthread.start()\nview"),
        nbformat.v4.new_code_cell("thread.join()\nview.refresh()  # the final card, now"),
    ]
    NotebookClient(nb, timeout=120, kernel_name="python3", store_widget_state=False,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / "saved.ipynb")
    saved = nbformat.read(tmp_path / "saved.ipynb", as_version=4)
    assert "widgets" not in saved.metadata
    outputs = saved.cells[1].outputs
    assert len(outputs) == 1
    bundle = outputs[0]["data"]
    assert WIDGET_VIEW in bundle
    card, text = bundle["text/html"], bundle["text/plain"]
    # the card shows the end of the run, not the moment the cell ran
    assert 'data-state="succeeded"' in card and "budget used up" in card
    assert polyline_points(card) == 15
    # and the bar chart a sanitizer leaves when it drops the SVG: one bar per iteration
    bars = card[card.index('class="taskapp-run-bars"'):card.index("</foreignObject>")]
    assert bars.count("<div style=") == 15
    assert "30 / 400" in card and "0.900" in card
    assert "var(" not in card and "<style" not in card
    assert text.startswith("local gepa · kernel-demo: succeeded · iteration 15")


def test_async_on_stop_runs_on_the_kernel_loop(kernel: Kernel) -> None:
    """A hosted job's cancel is a coroutine: the view awaits it on the kernel's own loop."""
    clicked = kernel.stdout(PRODUCER + """
import asyncio
seen = []

async def cancel():
    await asyncio.sleep(0)
    seen.append(asyncio.get_running_loop() is kernel_loop)
    progress.update(state="cancelled", message="job cancelled")

kernel_loop = asyncio.get_running_loop()
hosted = RunView(progress, on_stop=cancel, stop_label="Cancel")
progress.update(state="running")
hosted.stop_button.click()  # in-kernel click: returns while the loop is still busy here
print(hosted.stop_button.description, progress.snapshot().state)
""")
    assert clicked.strip() == "stopping… running", clicked
    out = kernel.stdout("await asyncio.sleep(0.5)\nprint(seen, "
                        "progress.snapshot().state, hosted.stop_button.disabled)")
    assert out.strip() == "[True] cancelled True", out
