"""SynthTunnel end to end through InProcessTaskApp: verification, a relay outage seen in the
status widget (reconnecting, log line), recovery on a fresh relay with the new URL surfaced,
and secrets masked throughout. Real relay, real agent, real app, all on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from support import free_port, health_app, wait_for

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.notebook.widget import TaskAppView
from taskapp_notebook.relay import RelayServer
from taskapp_notebook.tunnels.base import TunnelState


@pytest.fixture
def relay_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[RelayServer, int]]:
    port = free_port()
    relay = RelayServer(api_keys=["relay-key"], port=port).start_in_thread()
    monkeypatch.setenv("SYNTH_BACKEND_URL", relay.url)
    monkeypatch.setenv("SYNTH_API_KEY", "relay-key")
    try:
        yield relay, port
    finally:
        relay.stop_in_thread()


def widget_state_text(view: TaskAppView) -> str:
    children = [view.header, view.info, view.error_line, view.log]
    return json.dumps([child.get_state() for child in children], default=str)


def test_relay_outage_shows_in_widget_and_recovers_with_new_url(
    relay_env: tuple[RelayServer, int],
) -> None:
    relay, relay_port = relay_env
    task_app = InProcessTaskApp(app=health_app(), serve_on="thread", port=free_port(),
                                api_key="app-secret-key-123456", skip_tunnel_verification=False)
    task_app.start()  # verification: GET {url}/health through the relay with the worker token
    view = TaskAppView(task_app, interval=0.2)
    try:
        first_url, token = task_app.url, task_app.task_app_worker_token
        assert first_url and token and first_url.startswith(relay.url + "/s/rt_")
        assert wait_for(lambda: view.status == "running")
        state = widget_state_text(view)
        assert token not in state and task_app.api_key not in state
        assert token not in repr(task_app) and token not in json.dumps(task_app.snapshot())

        relay.stop_in_thread()  # the relay goes away: the agent reconnects with backoff
        assert wait_for(lambda: task_app.tunnel is not None and task_app.tunnel.status.state
                        in (TunnelState.RECONNECTING, TunnelState.DOWN))
        assert wait_for(lambda: view.status == "reconnecting" or view.status == "unhealthy")
        assert wait_for(lambda: any("SynthTunnel" in line for line in view.log_lines()))

        # A fresh relay on the same address knows nothing of the old lease: the agent takes a
        # new one, and the new public URL and worker token reach the app and the widget.
        fresh = RelayServer(api_keys=["relay-key"], port=relay_port).start_in_thread()
        try:
            assert wait_for(lambda: task_app.url is not None and task_app.url != first_url,
                            timeout=30)
            assert wait_for(lambda: view.status == "running")
            new_token = task_app.task_app_worker_token
            assert new_token and new_token != token
            response = httpx.get(f"{task_app.url}/health", trust_env=False,
                                 headers={"Authorization": f"Bearer {new_token}"})
            assert response.status_code == 200
            assert task_app.url in view.info.value
            assert new_token not in widget_state_text(view)
        finally:
            task_app.stop()
            fresh.stop_in_thread()
    finally:
        view.close()
        task_app.stop()
