"""HealthMonitor: unit behaviour on a thread-served app, and "kernel busy" in a real kernel."""

from __future__ import annotations

import json
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Response
from support import wait_for

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.errors import InvalidParameterError
from taskapp_notebook.health import auth_headers
from taskapp_notebook.monitor import STATUSES, HealthMonitor, monitor_for
from taskapp_notebook.notebook.presenter import present
from taskapp_notebook.tunnels.base import TunnelState

SECRET = "monitor-test-secret-key-abcdefgh"


def detail(monitor: HealthMonitor) -> str:
    """The status line every view shows for the monitored app."""
    assert monitor.app is not None
    return present(monitor.app).detail




def make_api(healthy: dict[str, bool]) -> FastAPI:
    api = FastAPI()

    @api.get("/health")
    async def health(response: Response) -> dict[str, bool]:
        if not healthy["ok"]:
            response.status_code = 503
        return {"ok": healthy["ok"]}

    @api.get("/block")
    async def block(seconds: float = 1.5) -> dict[str, float]:
        time.sleep(seconds)  # a handler that blocks the server's own loop
        return {"slept": seconds}

    return api


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("taskapp-monitor-")]


@pytest.fixture
def healthy() -> dict[str, bool]:
    return {"ok": True}


@pytest.fixture
def app(healthy: dict[str, bool]) -> Iterator[InProcessTaskApp]:
    task_app = InProcessTaskApp(app=make_api(healthy), tunnel_mode="local", serve_on="thread",
                                api_key=SECRET)
    task_app.start()
    yield task_app
    task_app.stop()
    monitor = monitor_for(task_app)
    if monitor is not None:
        monitor.close()


def test_attach_is_idempotent(app: InProcessTaskApp) -> None:
    monitor = HealthMonitor.attach(app, interval=0.1)
    assert HealthMonitor.attach(app) is monitor
    assert monitor_for(app) is monitor
    assert monitor.interval == 0.1
    assert HealthMonitor.attach(app, interval=0.3) is monitor and monitor.interval == 0.3
    with pytest.raises(InvalidParameterError):
        HealthMonitor.attach(app, interval=0)
    monitor.close()
    assert monitor_for(app) is None
    assert wait_for(lambda: not monitor_threads())
    again = HealthMonitor.attach(app, interval=0.1)
    assert again is not monitor and monitor_for(app) is again


def test_running_then_unhealthy_on_503_then_recovers(
    app: InProcessTaskApp, healthy: dict[str, bool]
) -> None:
    monitor = HealthMonitor.attach(app, interval=0.1)
    assert wait_for(lambda: monitor.last is not None and monitor.last.ok)
    assert monitor.status == "running"
    assert detail(monitor).startswith("running — health HTTP 200")
    assert app.health is not None and app.health.ok

    healthy["ok"] = False
    assert wait_for(lambda: monitor.status == "unhealthy")
    assert monitor.last is not None and monitor.last.status == 503
    assert "GET /health: HTTP 503" in detail(monitor)
    assert app.health is not None and app.health.status == 503

    healthy["ok"] = True
    assert wait_for(lambda: monitor.status == "running")
    statuses = [status for _, status, _ in monitor.history]
    assert statuses[-2:] == ["unhealthy", "running"]
    assert set(statuses) <= set(STATUSES)


def test_stopped_when_app_stops_and_resumes_on_start(app: InProcessTaskApp) -> None:
    monitor = HealthMonitor.attach(app, interval=0.1)
    assert wait_for(lambda: monitor.checks >= 1)
    assert len(monitor_threads()) == 1
    ticks: list[str] = []
    monitor.add_listener(lambda m: ticks.append(m.status))

    app.stop()
    assert monitor.status == "stopped"
    assert ticks[-1] == "stopped"
    assert wait_for(lambda: not monitor_threads())
    checks = monitor.checks
    time.sleep(0.3)
    assert monitor.checks == checks  # no more checks against a stopped app

    app.start()
    assert monitor_for(app) is monitor
    assert wait_for(lambda: monitor.checks > checks and monitor.status == "running")
    assert len(monitor_threads()) == 1


def test_busy_loop_is_kernel_busy_not_down(app: InProcessTaskApp) -> None:
    """A handler blocking the server's loop shows as busy; its health is not held against it."""
    monitor = HealthMonitor.attach(app, interval=0.1)
    assert wait_for(lambda: monitor.status == "running" and monitor.checks >= 1)
    seen: list[tuple[str, float]] = []
    monitor.add_listener(lambda m: seen.append((m.status, m.lag_seconds)))
    result: dict[str, Any] = {}

    def call_block() -> None:
        response = httpx.get(f"{app.local_url}/block", params={"seconds": 2.0},
                             headers=auth_headers(SECRET), timeout=30, trust_env=False)
        result["status"] = response.status_code

    caller = threading.Thread(target=call_block)
    caller.start()
    assert wait_for(lambda: monitor.status == "kernel busy")
    assert detail(monitor).startswith("kernel busy (")
    caller.join(30)
    assert result == {"status": 200}
    assert wait_for(lambda: monitor.status == "running")
    busy_lags = [lag for status, lag in seen if status == "kernel busy"]
    assert busy_lags and max(busy_lags) >= 1.0
    assert monitor.max_lag_seconds >= 1.5
    assert monitor.failures == 0


def test_tunnel_status_maps_to_reconnecting_and_unhealthy(app: InProcessTaskApp) -> None:
    monitor = HealthMonitor.attach(app, interval=0.1)
    assert wait_for(lambda: monitor.status == "running")
    tunnel = app.tunnel
    assert tunnel is not None
    # the local backend's real status object, moved as a reconnecting backend would move it
    tunnel.status.set(TunnelState.RECONNECTING, f"relay closed the socket (key {SECRET})")
    assert monitor.status == "reconnecting"
    text = detail(monitor)
    assert text.startswith("reconnecting — tunnel reconnecting: relay closed")
    assert SECRET not in text and SECRET[-4:] in text
    tunnel.status.set(TunnelState.DOWN, "gave up after 5 attempts")
    assert monitor.status == "unhealthy"
    assert detail(monitor) == "unhealthy — tunnel down: gave up after 5 attempts"
    tunnel.status.set(TunnelState.CONNECTED)
    assert monitor.status == "running"


def test_failed_start_shows_failed(healthy: dict[str, bool]) -> None:
    healthy["ok"] = False
    task_app = InProcessTaskApp(app=make_api(healthy), tunnel_mode="local", serve_on="thread",
                                health_check_timeout=0.3)
    monitor = HealthMonitor.attach(task_app, interval=0.1)
    assert monitor.status == "stopped"
    with pytest.raises(RuntimeError):
        task_app.start()
    assert monitor.status == "failed"
    assert detail(monitor).startswith("failed — HealthCheckError")
    assert not monitor_threads()
    monitor.close()


# ---------------------------------------------------------------------- a real kernel

SETUP = textwrap.dedent(
    """
    import asyncio, json, time
    from fastapi import FastAPI
    from taskapp_notebook import InProcessTaskApp
    from taskapp_notebook.monitor import HealthMonitor

    api = FastAPI()

    @api.get("/health")
    async def health():
        return {"ok": True}

    ta = InProcessTaskApp(app=api, tunnel_mode="local", serve_on="loop", api_key=%r)
    ta.start()
    m = HealthMonitor.attach(ta, interval=0.2)
    seen = []
    m.add_listener(lambda mon: seen.append((mon.status, round(mon.lag_seconds, 2))))
    await asyncio.sleep(0.5)
    print(json.dumps({"port": ta.port, "serve_on": ta.serve_on, "status": m.status}))
    """
) % SECRET

REPORT = textwrap.dedent(
    """
    await asyncio.sleep(0.6)
    print(json.dumps({"seen": seen, "status": m.status, "max_lag": m.max_lag_seconds,
                      "history": [[s, round(lag, 2)] for _, s, lag in m.history]}))
    """
)


def execute(client: Any, code: str, timeout: float = 60.0) -> str:
    """Run ``code`` in the kernel; return its stdout, raise on an error reply."""
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])

    reply = client.execute_interactive(code, output_hook=hook, timeout=timeout)
    content = reply["content"]
    if content["status"] != "ok":
        raise AssertionError(f"cell failed: {content.get('ename')}: {content.get('evalue')}\n"
                             + "\n".join(content.get("traceback", [])))
    return "".join(out)


@pytest.fixture
def kernel() -> Iterator[Any]:
    from jupyter_client.manager import KernelManager

    manager = KernelManager(kernel_name="python3")
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        yield client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)


@pytest.mark.kernel
def test_blocking_cell_shows_kernel_busy_then_running(kernel: Any) -> None:
    setup = json.loads(execute(kernel, SETUP))
    assert setup == {"port": setup["port"], "serve_on": "loop", "status": "running"}

    # during the blocking cell, a request from outside is delayed, not refused
    answered: dict[str, Any] = {}

    def request_during_cell() -> None:
        time.sleep(1.0)
        response = httpx.get(f"http://127.0.0.1:{setup['port']}/health",
                             headers=auth_headers(SECRET), timeout=30, trust_env=False)
        answered["status"] = response.status_code

    caller = threading.Thread(target=request_during_cell)
    caller.start()
    execute(kernel, "time.sleep(3)")
    caller.join(30)
    assert answered == {"status": 200}

    report = json.loads(execute(kernel, REPORT))
    statuses = [status for status, _ in report["seen"]]
    assert "kernel busy" in statuses
    busy_lags = [lag for status, lag in report["seen"] if status == "kernel busy"]
    assert max(busy_lags) >= 2.0
    assert report["max_lag"] >= 2.5
    # busy came after running, and it ended in running again
    assert statuses.index("kernel busy") > statuses.index("running")
    assert report["status"] == "running"
    assert [s for s, _ in report["history"]][-2:] == ["kernel busy", "running"]
    assert "unhealthy" not in statuses
    execute(kernel, "ta.stop(); assert m.status == 'stopped', m.status")
