"""TaskAppView against a real thread-served InProcessTaskApp, driven by Button.click()."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import ipywidgets as widgets
import pytest
from fastapi import FastAPI
from support import free_port, port_is_free, wait_for

from taskapp_notebook import AppState, InProcessTaskApp
from taskapp_notebook.health import auth_headers
from taskapp_notebook.monitor import monitor_for
from taskapp_notebook.notebook.widget import TaskAppView

SECRET = "widget-test-secret-key-0123456789"


def make_api() -> FastAPI:
    api = FastAPI()

    @api.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @api.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    return api


def serves(app: InProcessTaskApp, port: int) -> bool:
    """True when GET /health on ``port`` answers 200 right now."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/health",
                             headers=auth_headers(SECRET), timeout=5.0, trust_env=False)
    except httpx.HTTPError:
        return False
    return response.status_code == 200




def all_widgets(root: Any) -> Iterator[Any]:
    yield root
    for name in ("layout", "style"):
        child = getattr(root, name, None)
        if isinstance(child, widgets.Widget):
            yield child
    for child in getattr(root, "children", ()):
        yield from all_widgets(child)


@pytest.fixture
def app() -> Iterator[InProcessTaskApp]:
    task_app = InProcessTaskApp(app=make_api(), tunnel_mode="local", serve_on="thread",
                                port=free_port(), auto_find_port=False, api_key=SECRET)
    task_app.start()
    yield task_app
    task_app.stop()


@pytest.fixture
def view(app: InProcessTaskApp) -> Iterator[TaskAppView]:
    task_view = TaskAppView(app, interval=0.1, max_lines=10)
    yield task_view
    task_view.close()
    monitor = monitor_for(app)
    if monitor is not None:
        monitor.close()


def test_shows_running_app(app: InProcessTaskApp, view: TaskAppView) -> None:
    assert view.status == "running"
    assert app.url is not None
    assert f'href="{app.url}"' in view.info.value
    assert "navigator.clipboard.writeText" in view.info.value
    assert f"port {app.port}" in view.info.value
    assert "local" in view.info.value
    assert 'data-status="running"' in view.header.value
    assert view.start_button.disabled
    assert not view.stop_button.disabled
    assert not view.restart_button.disabled
    # the monitor's health ticks reach the panel
    assert wait_for(lambda: view.monitor is not None and view.monitor.checks >= 2)
    assert wait_for(lambda: "HTTP 200" in view.info.value)
    # ... without counting as traffic: the panel shows callers' requests only
    assert app.stats.count == 0 and "0 requests" in view.info.value


def test_stop_start_restart_buttons(app: InProcessTaskApp, view: TaskAppView) -> None:
    port = app.port
    assert serves(app, port)

    view.stop_button.click()
    assert app.state is AppState.STOPPED
    assert port_is_free(port)
    assert not serves(app, port)
    assert view.status == "stopped"
    assert not view.start_button.disabled
    assert view.stop_button.disabled
    assert view.restart_button.disabled

    view.start_button.click()
    assert app.state is AppState.RUNNING
    assert serves(app, port)
    assert view.status == "running"

    first_start = app.started_at
    view.restart_button.click()
    assert app.state is AppState.RUNNING
    assert app.started_at is not None and first_start is not None
    assert app.started_at >= first_start
    assert serves(app, port)
    assert view.error == ""
    states = [line.split("state: ")[1] for line in app.events if "state: " in line]
    assert states[-4:] == ["stopping", "stopped", "starting", "running"]
    # the monitor resumed on the new run and keeps ticking
    assert view.monitor is not None
    checks = view.monitor.checks
    assert wait_for(lambda: view.monitor is not None and view.monitor.checks > checks)


def test_buttons_disabled_during_transitions(app: InProcessTaskApp, view: TaskAppView) -> None:
    seen: list[tuple[str, bool, bool, bool]] = []

    def record(task_app: InProcessTaskApp) -> None:
        seen.append((str(task_app.state), view.start_button.disabled,
                     view.stop_button.disabled, view.restart_button.disabled))

    app.add_listener(record)
    try:
        view.restart_button.click()
    finally:
        app.remove_listener(record)
    transitions = [row for row in seen if row[0] in ("stopping", "starting")]
    assert {row[0] for row in transitions} == {"stopping", "starting"}
    assert all(row[1:] == (True, True, True) for row in transitions)
    # between stop and start (state "stopped") the restart is still running: all disabled
    assert all(row[1:] == (True, True, True) for row in seen if row[0] == "stopped")
    assert not view.stop_button.disabled and view.start_button.disabled


def test_button_error_is_shown(app: InProcessTaskApp, view: TaskAppView) -> None:
    port = app.port
    view.stop_button.click()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        view.start_button.click()
    finally:
        blocker.close()
    assert app.state is AppState.FAILED
    assert view.error.startswith("Start failed: PortInUseError")
    assert "taskapp-error" in view.error_line.value
    assert str(port) in view.error_line.value
    assert view.status == "failed"
    assert 'data-status="failed"' in view.header.value
    assert not view.start_button.disabled
    # the next successful action clears the error line
    view.start_button.click()
    assert app.state is AppState.RUNNING
    assert view.error == "" and view.error_line.value == ""


def test_no_secret_in_widget_state_or_fallbacks(app: InProcessTaskApp,
                                                 view: TaskAppView) -> None:
    # put the secret where a careless panel would echo it: an event line and an error
    app.record_event(f"tunnel: connected with key {SECRET}")
    app.stop()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", app.port))
    blocker.listen()
    try:
        view.run_action("start")
    finally:
        blocker.close()
    view.run_action("start")
    assert wait_for(lambda: view.monitor is not None and view.monitor.checks >= 1)
    view.refresh()
    assert "…" + SECRET[-4:] in view.info.value
    assert "…" + SECRET[-4:] in "\n".join(view.log_lines())
    states = [json.dumps(w.get_state(), default=str) for w in all_widgets(view.widget)]
    assert len(states) >= 8
    bundle = view._repr_mimebundle_()
    assert set(bundle) >= {"text/plain", "text/html",
                           "application/vnd.jupyter.widget-view+json"}
    for text in [*states, bundle["text/plain"], bundle["text/html"], view._repr_html_(),
                 view.summary_text()]:
        assert SECRET not in text
        assert SECRET[:12] not in text


def test_fallbacks_are_readable(app: InProcessTaskApp, view: TaskAppView) -> None:
    bundle = view._repr_mimebundle_()
    text = bundle["text/plain"]
    assert text.startswith(f"{app.name}: running")
    assert f"public URL: {app.url}" in text
    assert "requests:" in text
    html_text = bundle["text/html"]
    assert 'class="taskapp-badge"' in html_text and f'href="{app.url}"' in html_text
    # a saved card survives HTML sanitizers: plain colours, no script, no <style>
    assert "var(" not in html_text and "onclick" not in html_text and "<style" not in html_text
    assert "var(--jp-" in view.info.value  # the live panel follows the theme
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == view.widget.model_id
    pretty: list[str] = []

    class Printer:
        def text(self, value: str) -> None:
            pretty.append(value)

    view._repr_pretty_(Printer(), False)
    assert pretty == [view.summary_text()]


def test_log_pane_is_bounded(app: InProcessTaskApp, view: TaskAppView) -> None:
    with httpx.Client(trust_env=False) as client:
        for _ in range(30):
            assert client.get(f"{app.local_url}/ping").status_code == 200
    view.refresh()
    lines = view.log_lines()
    assert len(lines) == 10
    assert all("GET /ping 200" in line for line in lines[-5:])
    assert view.log.value.count("\n") == 9
    assert "/ping" in view.log.value


def test_view_of_a_stopped_app_then_started_elsewhere() -> None:
    task_app = InProcessTaskApp(app=make_api(), tunnel_mode="local", serve_on="thread",
                                api_key=SECRET)
    task_view = TaskAppView(task_app, interval=0.1)
    try:
        assert task_view.status == "stopped"
        assert "public URL: —" in task_view.summary_text()
        assert task_view.stop_button.disabled and not task_view.start_button.disabled
        task_app.start()  # not through the view: it observes the app
        assert task_view.status == "running"
        assert task_app.url is not None and task_app.url in task_view.info.value
        assert task_view.start_button.disabled and not task_view.stop_button.disabled
    finally:
        task_app.stop()
        task_view.close()
    assert task_view.status == "stopped"
    monitor = monitor_for(task_app)
    assert monitor is not None
    assert monitor.status == "stopped"
    monitor.close()
    assert monitor_for(task_app) is None


def test_log_pane_orders_requests_and_events_by_time(app: InProcessTaskApp,
                                                     view: TaskAppView) -> None:
    # within one second too: the request was served before the stop, so it is listed first
    response = httpx.get(f"http://127.0.0.1:{app.port}/ping", headers=auth_headers(SECRET),
                         timeout=5.0, trust_env=False)
    assert response.status_code == 200
    assert wait_for(lambda: any("/ping" in line for line in view.log_lines()))
    app.stop()
    lines = view.log_lines()
    ping = next(i for i, line in enumerate(lines) if "GET /ping 200" in line)
    stopping = next(i for i, line in enumerate(lines) if line.endswith("state: stopping"))
    assert ping < stopping, lines
    assert app.events[-1].endswith("state: stopped")
    assert [text for _, text in app.timed_events] == list(app.events)


def test_restart_button_keeps_the_actual_port_and_key() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    wanted = busy.getsockname()[1]
    task_app = InProcessTaskApp(app=make_api(), tunnel_mode="local", serve_on="thread",
                                port=wanted)
    task_app.start()
    task_view = TaskAppView(task_app, monitor=False)
    try:
        moved, key = task_app.port, task_app.api_key
        assert moved != wanted
        busy.close()  # the port it wanted is free again: a restart must not jump back
        task_view.restart_button.click()
        assert task_app.is_running and task_app.port == moved and task_app.api_key == key
        assert task_view.error == ""
    finally:
        task_view.close()
        task_app.stop()
        busy.close()
